//! [`MigrateVma`]: moving pages between system memory and device memory,
//! in the kernel's three steps (`migrate_vma_setup`, `migrate_vma_pages`,
//! `migrate_vma_finalize`) and with its per-page src/dst contract.
//!
//! 1. [`setup`](MigrateVma::setup) notifies [`NotifyEvent::Migrate`] with
//!    the owner (so the migrating device can skip its own invalidation),
//!    selects the pages (system pages and/or device pages of the owner),
//!    records them *Migrating* and takes them out of the CPU page table: a
//!    private anonymous page is moved (`UFFDIO_MOVE`, no copy) into uhmm's
//!    staging area; a page that cannot be moved (read-only or file-backed
//!    private mappings, a page still shared copy-on-write with a child) is
//!    write-protected and copied instead, and leaves the page table when the
//!    migration commits. A CPU access to a page in flight waits in the
//!    fault service until the migration ends — it never races the copy.
//!    Holes and zero pages become [`MigrateSrc::Zero`] entries: the device
//!    allocates and clears, nothing is copied. Shared memory is not
//!    selected (as in the kernel: only private memory migrates).
//! 2. The device allocates destination pages, copies, and fills the dst
//!    entries ([`set_device_dst`](MigrateVma::set_device_dst), or for the way
//!    back the slices of [`system_dsts`](MigrateVma::system_dsts)); an entry
//!    left without a dst does not migrate.
//! 3. [`pages`](MigrateVma::pages) commits: device pages become the pages'
//!    state; system pages come back into the CPU page table (moved, or
//!    copied where moving is not possible) and their device pages are
//!    freed. [`migrated`](MigrateVma::migrated) tells what moved.
//! 4. [`finalize`](MigrateVma::finalize) (or dropping the value) puts
//!    back everything that did not migrate, frees what is left over, ends
//!    the invalidation and lets waiting CPU accesses go on.

use super::pagemap::DevmemError;
use super::staging::{BLOCK, Left, Run, Staging, StagingError, Want};
use crate::addr::{DevicePfn, PAGE_SIZE, PageRange, VirtAddr};
use crate::mm::notifier::{NotifierRange, NotifyEvent};
use crate::mm::regions::{Regions, Taken};
use crate::mm::service::{LayoutWait, Shared};
use crate::mm::state::{OpId, Stored};
use crate::mm::{Mm, MmError, Owner, lock_poisoned as lock};
use crate::sys::mem::{self, Prot};
use crate::sys::pagemap::{Categories, ScanQuery};
use crate::sys::procmap::{Vma, VmaKind};
use crate::sys::uffd::{CopyMode, Features, MoveMode, OpError, Progress, Stop};
use bitflags::bitflags;
use std::time::{Duration, Instant};

/// Largest run an eviction migrates at once.
pub(crate) const EVICT_RUN: usize = 2 << 20;

bitflags! {
    /// Which pages [`MigrateVma::setup`] selects (the kernel's
    /// `MIGRATE_VMA_SELECT_*`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Select: u32 {
        /// Pages in system memory (and holes of private memory).
        const SYSTEM = 1 << 0;
        /// Device pages of the migrating owner.
        const DEVICE_PRIVATE = 1 << 1;
    }
}

/// What a page of the range is, as selected (the kernel's src entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MigrateSrc {
    /// Not selected: it stays where it is.
    None,
    /// A hole or the zero page: the destination is allocated and cleared,
    /// nothing is copied.
    Zero,
    /// A system page; its bytes are [`MigrateVma::src_bytes`].
    System,
    /// A device page of the owner.
    Device(DevicePfn),
}

/// Where a page goes (the kernel's dst entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MigrateDst {
    /// Nowhere (yet): the page does not migrate.
    None,
    /// This device page (its reference passes to the migration).
    Device(DevicePfn),
    /// A system page, filled through [`MigrateVma::system_dsts`].
    System,
    /// The device page's own memory, at this address of host RAM
    /// registered with the `Mm` (`Mm::register_device_memory`), moved into
    /// place with no copy ([`MigrateVma::move_from_device`]).
    SystemFrom(VirtAddr),
}

/// Why a migration could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The range cannot be migrated at all (the kernel's EINVAL): not
    /// managed, not inside one managed region, a gap, `PROT_NONE`, hugetlb.
    #[error("{range} cannot be migrated: {reason}")]
    InvalidRange {
        /// The range.
        range: PageRange,
        /// Why.
        reason: &'static str,
    },
    /// An invalidation callback could not proceed without blocking, or a
    /// fork is in progress: set up again later.
    #[error("{range}: migration must be retried (a device was busy or a fork is in progress)")]
    Retry {
        /// The range.
        range: PageRange,
    },
    /// The staging area could not take the range.
    #[error(transparent)]
    Staging(#[from] StagingError),
    /// Device memory could not be had.
    #[error(transparent)]
    Devmem(#[from] DevmemError),
    /// The address space could not be read or registered.
    #[error(transparent)]
    Mm(#[from] MmError),
    /// The owner has no [`DevicePagemap`](super::DevicePagemap) in this
    /// address space: pages moved to its device could never be found
    /// again.
    #[error("{owner:?} has no DevicePagemap in this address space")]
    NoPagemap {
        /// The owner.
        owner: Owner,
    },
    /// A call named a page of the migration it cannot apply to.
    #[error("page {index} of the migration: {reason}")]
    BadEntry {
        /// The page's index in the range.
        index: usize,
        /// Why.
        reason: &'static str,
    },
}

/// What became of a page at the commit ([`MigrateVma::outcome`]): whether
/// it migrated, and if not, why — so that a device knows whether the copy
/// it made was wasted by its own choice, by the program, or by a moment
/// that passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageOutcome {
    /// It migrated.
    Migrated,
    /// It was not selected (pinned, shared, another owner's, not in a
    /// mapping that can migrate).
    NotSelected,
    /// The device gave it no destination (or skipped it).
    NoDestination,
    /// The program discarded, unmapped or moved it away while it was in
    /// flight, or a region drop or fork took it back from a migration that
    /// looked abandoned: it is not the migration's any more.
    Gone,
    /// A layout change the fault service had not applied yet refused it,
    /// or a device's invalidation could not run without blocking, and this
    /// migration may not wait (a fault back, on the fault service): it
    /// stayed where it was. Trying again shortly succeeds.
    Busy,
    /// The page table refused it (its mapping changed under it).
    Failed,
}

/// How a selected page left the CPU page table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum How {
    /// Not selected.
    None,
    /// Moved into its staging slot (a hole there: it was a hole).
    Moved,
    /// Write-protected and copied into its staging slot; still mapped
    /// until the commit.
    Copied,
    /// A device page (nothing in the CPU page table).
    Device,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    src: MigrateSrc,
    dst: MigrateDst,
    how: How,
    write: bool,
    migrate: bool,
    /// Its data already moved into device memory (no staging copy left).
    moved_out: bool,
    /// Its staging slot holds the zero page (a `Zero` entry that is not a
    /// hole).
    zero_pte: bool,
    /// Where `move_to_device` put its data.
    dev_addr: Option<VirtAddr>,
    /// Why it did not migrate, if it did not (set at the commit).
    why: Option<PageOutcome>,
    /// Part of a PMD-mapped THP when it was taken (the kernel's
    /// `MIGRATE_PFN_COMPOUND`).
    huge: bool,
}

impl Entry {
    const UNSELECTED: Entry = Entry {
        src: MigrateSrc::None,
        dst: MigrateDst::None,
        how: How::None,
        write: false,
        migrate: false,
        moved_out: false,
        zero_pte: false,
        dev_addr: None,
        why: None,
        huge: false,
    };
}

/// One migration of a range between system memory and one owner's device
/// memory. See the [module docs](self) for the steps.
///
/// It holds its range as the kernel's `mmap_lock` would (DESIGN.md,
/// concurrency rule 1): it is an operation with a generation of its own
/// (`OpId`), its pages are `Migrating(op)`, and every page-table change it
/// makes is checked against that state and made under the regions lock,
/// at the address the page has *now* (an mremap meanwhile moves it, a
/// discard or an unmap takes it away from the migration). So it never acts
/// on an address that has come to mean something else.
#[derive(Debug)]
pub struct MigrateVma<'a> {
    shared: &'a Shared,
    range: PageRange,
    owner: Owner,
    op: OpId,
    entries: Vec<Entry>,
    run: Option<Run>,
    /// Install by COPY (not MOVE): the mapping is not private anonymous
    /// read-write.
    copy_install: Vec<bool>,
    /// A page went home by COPY from its staging slot
    /// ([`copy_fill`](Self::copy_fill)): the run still holds pages.
    filled: std::cell::Cell<bool>,
    /// Its run was taken to bring 2 MiB device pages home as THPs
    /// (`Want::Huge`).
    thp_home: bool,
    /// Its run was taken for THPs to move in (`Staging::alloc`'s `thp`).
    thp_src: bool,
    /// Every page taken out so far was moved whole from a present page
    /// the scan before the move saw as no zero page: every slot holds
    /// data, and `classify` has nothing to look for.
    all_data: bool,
    blockable: bool,
    committed: bool,
    done: bool,
    /// The device pages that are some page's destination.
    dsts: Dsts,
    /// The owner's device memory (weak: a leaked migration must not keep
    /// a pagemap's drop waiting).
    pagemap: std::sync::Weak<super::pagemap::PagemapInner>,
}

/// `MOVE_QUIRK`: on Linux 6.18, a `UFFDIO_MOVE` that meets a transient
/// EAGAIN inside the kernel (a page-table entry that changed under it, as
/// a CPU thread touching the page makes it) retries the same address
/// without forgetting the EAGAIN, so the page it then moves is not
/// counted: with `ALLOW_SRC_HOLES` the retry finds a hole where it just
/// moved the page from and spins in the kernel for ever; without it, the
/// call ends at that page with EEXIST (the destination is checked first,
/// and holds the page now) or ENOENT, although the page moved. Taken at
/// its word, EEXIST left the page in staging and its address a hole that
/// the next touch filled with zeros (`uhmm stress`, 1 run in 2). uhmm
/// therefore never moves with `ALLOW_SRC_HOLES` (holes are found with a
/// page-table scan first), and every move it makes (`Shared::move_held`)
/// counts a page at which the move stopped as moved when its source holds
/// no page and its destination holds one. The call may also end with
/// EAGAIN and nothing counted after moving the page (seen under `uhmm
/// stress`, with another thread's mremap loop raising the layout-change
/// count): taken at its word, the page stayed in its slot, the next look
/// found a hole at its address and left it, and the next access read
/// zeros; so every stop is checked, whatever it says: an error, and an
/// EAGAIN after pages it did count, too. This rests on the destination
/// having been empty: a run taken for moving pages in has only holes in
/// its slots (`Staging::alloc`; an exclusive grab frees its run by what
/// the page table shows, as a migration does), and a page on its way home
/// is a hole every access to which waits for the migration. A destination
/// that something else filled meanwhile is counted too, but only where the
/// source is empty: nothing is left behind.
const _MOVE_QUIRK: () = ();

/// What [`MigrateVma::install_all`] did: the pages installed (index,
/// address), those to try again once pending events are applied, and those
/// that could not be installed at all.
type Installed = (Vec<(usize, VirtAddr)>, Vec<usize>, Vec<(usize, VirtAddr)>);

/// How often a migration waits for the service to apply pending events
/// and tries again before it leaves the pages concerned where they are.
const LAYOUT_RETRIES: u32 = 1000;

/// How long a migration keeps trying to put back pages whose install is
/// refused while the kernel says no layout change is pending (a refusal
/// nothing explains) before it gives them up as lost. A refusal by a
/// pending change is waited out however long changes follow each other:
/// the data is intact, and an install gets in between two changes (see
/// `LayoutWait`). (The refusal lasts until the thread whose discard,
/// unmap or mremap raised it runs again after the service read its event:
/// on a loaded machine that can take many service rounds, so the bound is
/// a time, not a count. It once applied to every refusal, and an mremap
/// loop in another thread made put-backs lose their pages.)
const PUT_BACK_PATIENCE: Duration = Duration::from_secs(10);

/// Waits between put-back attempts ([`Shared::layout_wait`]), with the
/// bound of [`PUT_BACK_PATIENCE`] on refusals that no pending layout
/// change explains.
struct Patience {
    deadline: Instant,
    wait: LayoutWait,
}

impl Patience {
    fn new() -> Self {
        Self {
            deadline: Instant::now() + crate::testing::loss_bound(PUT_BACK_PATIENCE),
            wait: LayoutWait::default(),
        }
    }

    /// Waits for the next attempt; false once refusals have gone on for
    /// the time allowed with no layout change pending whenever asked.
    fn wait(&mut self, shared: &Shared) -> bool {
        let now = Instant::now();
        if shared.uffd.layout_changing() {
            self.deadline = now + crate::testing::loss_bound(PUT_BACK_PATIENCE);
        } else if now >= self.deadline {
            return false;
        }
        shared.layout_wait(&mut self.wait);
        true
    }
}

/// How long the fault service tries again to install a fault back that
/// pending layout changes refused, before it serves the fault again on a
/// later turn (other faults wait meanwhile).
const SERVICE_LAYOUT_FOR: Duration = Duration::from_millis(1);

/// How often a setup looks again at a region that was dropped and mapped
/// anew while it read its mappings, before it gives up (`Retry`).
pub(crate) const SETUP_ATTEMPTS: usize = 100;

impl<'a> MigrateVma<'a> {
    /// Selects the pages of `range` that `select` names (device pages only
    /// if they belong to `owner`), and takes them out of the CPU's hands.
    ///
    /// A page that is pinned (by `O_DIRECT` I/O, say) is not selected, as
    /// the kernel skips pages with extra references; a page still shared
    /// copy-on-write with a child is made the process's own first.
    ///
    /// # Errors
    ///
    /// [`MigrateError::InvalidRange`] if the range is not inside one managed
    /// region, or has a gap, an unreadable part or hugetlb memory, or its
    /// region is being dropped; [`MigrateError::Retry`] if a device's
    /// invalidation could not be done now; [`MigrateError::Staging`] if the
    /// range is too large to migrate at once; [`MigrateError::Mm`] with
    /// [`StateError::TooManyOwners`](crate::mm::StateError) if the address
    /// space cannot name one more device, or with
    /// [`MmError::ForkedChild`] in a forked child. Memory is as it was on
    /// error.
    pub fn setup(
        mm: &'a Mm,
        range: PageRange,
        select: Select,
        owner: Owner,
    ) -> Result<MigrateVma<'a>, MigrateError> {
        mm.check_process().map_err(MmError::from)?;
        Self::setup_in(mm.shared(), range, select, owner, true)
    }

    pub(crate) fn setup_in(
        shared: &'a Shared,
        range: PageRange,
        select: Select,
        owner: Owner,
        blockable: bool,
    ) -> Result<MigrateVma<'a>, MigrateError> {
        let invalid = |reason| MigrateError::InvalidRange { range, reason };
        let Some(pagemap) = shared.device_pagemap(owner) else {
            return Err(MigrateError::NoPagemap { owner });
        };
        let pagemap = std::sync::Arc::downgrade(&pagemap);
        if !blockable && select.contains(Select::SYSTEM) {
            // Taking system pages out may have to wait for the service.
            return Err(MigrateError::Retry { range });
        }
        if blockable {
            shared.sync_events();
        }
        let mut attempt = 0;
        let (op, vmas) = loop {
            attempt += 1;
            let region = lock(&shared.regions)
                .containing(range)
                .ok_or(invalid("not inside one managed region"))?;
            // Device pages lie only where a migration to the device found
            // mappings; bringing them back needs no look at the mappings (an
            // unmapped page has no state, and installing picks MOVE or COPY
            // by what the kernel accepts). Selecting system pages does, and
            // needs the region armed: a CPU access to a page taken out of
            // the page table must reach the service.
            let vmas = if select.contains(Select::SYSTEM) {
                let vmas = shared
                    .procmap()
                    .map_err(MmError::from)?
                    .covering(range)
                    .map_err(MmError::from)?;
                check_vmas(range, &vmas).map_err(invalid)?;
                match shared.arm_once(region) {
                    Ok(()) => {}
                    // Replaced meanwhile: look again.
                    Err(MmError::NotManaged { .. }) if attempt < SETUP_ATTEMPTS => continue,
                    Err(e) => return Err(e.into()),
                }
                vmas
            } else {
                Vec::new()
            };
            if !shared.gate.enter(blockable) {
                return Err(MigrateError::Retry { range });
            }
            let mut regions = lock(&shared.regions);
            let begun = match regions.containing(range) {
                None => Err(invalid("not inside one managed region")),
                Some(r) if select.contains(Select::SYSTEM) && regions.closing(r.id, range) => {
                    Err(invalid("its region is being dropped"))
                }
                // Dropped and mapped anew since its mappings were read and
                // it was armed, or another piece of it moved here (pieces
                // of one mapping share its id): look again.
                Some(r) if r.id != region.id || (select.contains(Select::SYSTEM) && !r.armed) => {
                    Err(MigrateError::Retry { range })
                }
                Some(_) => regions
                    .begin_op(owner, range)
                    .inspect(|&op| {
                        // It passed the gate: ending it leaves the gate.
                        if let Some(o) = regions.op_mut(op) {
                            o.gated = true;
                        }
                    })
                    .map_err(|e| MigrateError::Mm(MmError::State(e))),
            };
            drop(regions);
            match begun {
                Ok(op) => break (op, vmas),
                Err(MigrateError::Retry { .. }) if attempt < SETUP_ATTEMPTS => {
                    shared.gate.leave();
                }
                Err(e) => {
                    shared.gate.leave();
                    return Err(e);
                }
            }
        };
        let notify = NotifierRange {
            range,
            event: NotifyEvent::Migrate,
            owner: Some(owner),
            blockable,
        };
        // Held while the pages are collected, as the kernel's
        // `migrate_vma_collect` holds it: from then on the pages are the
        // migration's (a CPU access waits; a page left mapped is
        // write-protected, which `range_fault` reports read-only, and is
        // invalidated again before it is dropped at the commit). So nothing
        // a caller does with the `MigrateVma` — leaking it included — keeps
        // devices' `read_begin` waiting.
        let guard = match shared.notifiers.invalidate_start(&notify) {
            Ok(g) => g,
            Err(_) => {
                shared.end_op(op);
                return Err(MigrateError::Retry { range });
            }
        };
        let mut m = MigrateVma {
            shared,
            range,
            owner,
            op,
            entries: vec![Entry::UNSELECTED; range.npages()],
            run: None,
            copy_install: Vec::with_capacity(range.npages()),
            filled: std::cell::Cell::new(false),
            thp_home: false,
            thp_src: false,
            all_data: true,
            blockable,
            committed: false,
            done: false,
            dsts: Dsts::default(),
            pagemap,
        };
        for addr in range.pages() {
            // Without a look at the mappings: MOVE, falling back to COPY.
            let vma = vma_of(&vmas, addr);
            m.copy_install.push(vma.is_some_and(|v| !movable(v)));
        }
        // (Dropping `m` on an error ends the operation.)
        let collected = m.collect(select, &vmas);
        drop(guard);
        collected?;
        Ok(m)
    }

    /// Where page `i` is now: its address at setup, moved by the mremaps
    /// since; `None` if it was unmapped meanwhile (whatever is there now is
    /// other memory). Under the regions lock.
    fn now(&self, regions: &Regions, i: usize) -> Option<VirtAddr> {
        regions.op(self.op)?.follow(self.addr(i))
    }

    /// Where page `i` is now, if it is the CPU's, in a managed region and
    /// not kept by another operation: a page this migration may take.
    /// Under the regions lock.
    fn takeable(&self, regions: &Regions, i: usize) -> Option<VirtAddr> {
        let at = self.now(regions, i)?;
        let page = PageRange::new(at, PAGE_SIZE).ok()?;
        (regions.states.get(at) == Stored::Cpu
            && regions.containing(page).is_some()
            && !regions.kept_by_other(self.op, at))
        .then_some(at)
    }

    /// Where page `i` is now, if it is still this migration's (not
    /// discarded or unmapped meanwhile). Under the regions lock.
    fn holds(&self, regions: &Regions, i: usize) -> Option<VirtAddr> {
        let at = self.now(regions, i)?;
        (regions.states.get(at) == Stored::Migrating(self.op)).then_some(at)
    }

    /// Selects the pages and takes the system pages out of the CPU page
    /// table.
    fn collect(&mut self, select: Select, vmas: &[Vma]) -> Result<(), MigrateError> {
        let owner = self.owner;
        let mut movable_idx = Vec::new();
        let mut copy_idx = Vec::new();
        {
            let mut regions = lock(&self.shared.regions);
            for (i, setup_addr) in self.range.pages().enumerate() {
                let vma = vma_of(vmas, setup_addr);
                // The device's invalidation callback may have blocked: the
                // range may have moved or gone since setup.
                let Some(addr) = self.now(&regions, i) else {
                    continue;
                };
                let e = &mut self.entries[i];
                e.write = vma.is_none_or(|v| v.perms.contains(Prot::WRITE));
                match (regions.states.get(addr), vma) {
                    (Stored::Cpu, Some(vma))
                        if select.contains(Select::SYSTEM) && private(self.shared, vma) =>
                    {
                        if movable(vma) {
                            movable_idx.push(i);
                        } else {
                            copy_idx.push(i);
                        }
                    }
                    // No page-table entry to change: a device page is a hole
                    // for the CPU.
                    (Stored::Device(o, pfn), _)
                        if o == owner
                            && select.contains(Select::DEVICE_PRIVATE)
                            && regions.states.set(addr, Stored::Migrating(self.op)).is_ok() =>
                    {
                        e.src = MigrateSrc::Device(pfn);
                        e.how = How::Device;
                        e.migrate = true;
                        regions.record_taken(self.op, i, Taken::Device(pfn));
                    }
                    _ => {}
                }
            }
        }
        if movable_idx.is_empty() && copy_idx.is_empty() {
            return Ok(());
        }
        let staging = self.shared.staging()?;
        self.thp_src = self.range.start().is_aligned(BLOCK)
            && self.range.len() % BLOCK == 0
            && self.holds_thp();
        let run = staging.alloc(self.range, Want::Empty, self.blockable, self.thp_src)?;
        self.run = Some(run);
        let mut todo = movable_idx;
        let mut busy = Vec::new();
        let mut cow_broken = false;
        let mut wait = LayoutWait::default();
        while wait.reads() < LAYOUT_RETRIES {
            let mut left = Vec::new();
            {
                let mut regions = lock(&self.shared.regions);
                if !todo.is_empty() {
                    left = self.take_out(&mut regions, staging, &run, &todo, &mut busy);
                }
                if !copy_idx.is_empty() {
                    self.copy_out(&mut regions, staging, &run, &copy_idx);
                    copy_idx.clear();
                }
                if left.is_empty() && !busy.is_empty() && !cow_broken {
                    // Still shared copy-on-write with a child, or pinned:
                    // make each the process's own (outside the lock; a
                    // write fault on a page that is not ours yet) and try
                    // once more. Still refused: pinned, not selected.
                    // Kept from other operations meanwhile: the fault must
                    // not wait for one that waits for a page of ours.
                    cow_broken = true;
                    busy.retain(|&i| self.takeable(&regions, i).is_some());
                    regions.keep(self.op, busy.iter().map(|&i| self.addr(i)));
                    drop(regions);
                    crate::testing::cow_break();
                    for &i in &busy {
                        // (Where it is now, in case an mremap moved it.)
                        let at = self.takeable(&lock(&self.shared.regions), i);
                        if let Some(page) = at.and_then(|a| PageRange::new(a, PAGE_SIZE).ok()) {
                            let _ = mem::populate(page, true);
                        }
                    }
                    left = std::mem::take(&mut busy);
                    todo = left;
                    continue;
                }
            }
            if left.is_empty() {
                break;
            }
            // The kernel said EAGAIN: an unmap, discard or mremap is under
            // way. Let the service apply it, then look again.
            self.shared.layout_wait(&mut wait);
            todo = left;
        }
        lock(&self.shared.regions).unkeep(self.op);
        if self.all_data {
            // (A present page that is no zero page stays one under the
            // lock or leaves the page table, which the move then says.)
            return Ok(());
        }
        self.classify()
    }

    /// Moves the system pages `idx` (in memory `UFFDIO_MOVE` takes) that
    /// are still the CPU's into their staging slots, recording each one
    /// `Migrating` once it has moved. Pages the kernel refused as busy
    /// (shared or pinned) go to `busy`; returns the pages to try again once
    /// pending events are applied.
    fn take_out(
        &mut self,
        regions: &mut Regions,
        staging: &Staging,
        run: &Run,
        idx: &[usize],
        busy: &mut Vec<usize>,
    ) -> Vec<usize> {
        let todo: Vec<(usize, VirtAddr)> = idx
            .iter()
            .filter_map(|&i| Some((i, self.takeable(regions, i)?)))
            .collect();
        let mut left = Vec::new();
        for group in contiguous(&todo) {
            let group = &todo[group];
            // Only pages with something in the page table are moved; a
            // hole is taken as it is (a CPU access to it waits from now
            // on, as it would for a page in flight).
            let (present, huge, zero) = self.present(group);
            for (&(i, _), &h) in group.iter().zip(&huge) {
                self.entries[i].huge = h;
            }
            // Holes, zero pages, or a scan that could not tell zero pages:
            // `classify` looks at what the slots hold.
            if !present.iter().all(|&p| p) || zero.iter().any(|&z| z) {
                self.all_data = false;
            }
            let mut k = 0;
            let mut single = false;
            while k < group.len() {
                let at = group[k].1;
                if !present[k] {
                    // A run of holes is taken as it is — once a move of its
                    // first page has confirmed that no layout change is
                    // pending (the scan may predate an mremap or munmap the
                    // kernel has made but the service not yet applied;
                    // then the move says EAGAIN).
                    let holes = present[k..].iter().take_while(|&&p| !p).count();
                    let (i, at) = group[k];
                    let (Ok(dst), Ok(src)) = (
                        PageRange::new(self.addr(i), PAGE_SIZE),
                        PageRange::new(at, PAGE_SIZE),
                    ) else {
                        break;
                    };
                    let res = self.shared.move_held(
                        staging.slots(run, dst),
                        src.start(),
                        MoveMode::DONTWAKE,
                    );
                    match progress(&res, PAGE_SIZE).1 {
                        // Still a hole, or (moved after all) no longer one.
                        None | Some(Stop::NoEntry) => {
                            for &page in &group[k..k + holes] {
                                if let Ok(p) = PageRange::new(page.1, PAGE_SIZE) {
                                    regions.unfence(p);
                                }
                                self.mark_taken(regions, page, How::Moved);
                            }
                            k += holes;
                        }
                        Some(Stop::LayoutChanging) => {
                            left.extend(group[k..].iter().map(|&(j, _)| j));
                            break;
                        }
                        // Something else is there now: leave it.
                        Some(_) => k += 1,
                    }
                    continue;
                }
                if regions.zap_pending(at) {
                    // A discard is about to zap it: let that happen first.
                    self.all_data = false;
                    left.push(group[k].0);
                    k += 1;
                    continue;
                }
                let (i, at) = group[k];
                let n = if single {
                    1
                } else {
                    let mut n = 1;
                    while present.get(k + n) == Some(&true) && !regions.zap_pending(group[k + n].1)
                    {
                        n += 1;
                    }
                    n
                };
                let (Ok(dst), Ok(src)) = (
                    PageRange::new(self.addr(i), n * PAGE_SIZE),
                    PageRange::new(at, n * PAGE_SIZE),
                ) else {
                    break;
                };
                // Never with ALLOW_SRC_HOLES: see `MOVE_QUIRK`.
                let res =
                    self.shared
                        .move_held(staging.slots(run, dst), src.start(), MoveMode::DONTWAKE);
                let (done, stop) = progress(&res, dst.len());
                for &page in &group[k..k + done / PAGE_SIZE] {
                    // The page has left the page table: now it is ours.
                    self.mark_taken(regions, page, How::Moved);
                }
                k += done / PAGE_SIZE;
                single = false;
                if !matches!(stop, None | Some(Stop::Partial | Stop::LayoutChanging)) {
                    self.all_data = false;
                }
                match stop {
                    None | Some(Stop::Partial) => {}
                    Some(Stop::LayoutChanging) => {
                        left.extend(group[k..].iter().map(|&(j, _)| j));
                        break;
                    }
                    Some(Stop::Busy) => {
                        busy.push(group[k].0);
                        k += 1;
                    }
                    // Nothing to move: a hole now (discarded since the
                    // scan), taken as it is.
                    Some(Stop::NoEntry) => {
                        self.mark_taken(regions, group[k], How::Moved);
                        k += 1;
                    }
                    // The mapping changed under the run (split, say): try
                    // the page alone, then go on.
                    Some(_) if n > 1 => single = true,
                    Some(_) => k += 1,
                }
            }
        }
        left
    }

    /// Which of the pages of `group` (contiguous at both ends) have
    /// something in the page table (all of them if it cannot be read),
    /// which are mapped by a PMD (a THP), and which are zero pages (all of
    /// them where the scan cannot tell).
    fn present(&self, group: &[(usize, VirtAddr)]) -> (Vec<bool>, Vec<bool>, Vec<bool>) {
        let all = (
            vec![true; group.len()],
            vec![false; group.len()],
            vec![true; group.len()],
        );
        let Ok(range) = PageRange::new(group[0].1, group.len() * PAGE_SIZE) else {
            return all;
        };
        let mut found = Vec::new();
        let query = ScanQuery::new().any_of(Categories::PRESENT | Categories::SWAPPED);
        // (Only PAGEMAP_SCAN tells HUGE: without it, no page is taken for
        // a THP's, and zero pages are not looked for.)
        let mut tells_zero = true;
        let scanned = self.shared.pagemap().ok().and_then(|pm| {
            pm.scan(
                range,
                &query.report(Categories::HUGE | Categories::PFNZERO),
                &mut found,
            )
            .or_else(|_| {
                found.clear();
                tells_zero = false;
                pm.scan(range, &query, &mut found)
            })
            .ok()
        });
        if scanned.is_none() {
            return all;
        }
        let mut present = vec![false; group.len()];
        let mut huge = vec![false; group.len()];
        let mut zero = vec![!tells_zero; group.len()];
        for r in found {
            let h = r.categories.contains(Categories::HUGE);
            let z = r.categories.contains(Categories::PFNZERO);
            for a in r.range.pages() {
                let k = (a.get() - range.start().get()) / PAGE_SIZE;
                present[k] = true;
                huge[k] = h;
                zero[k] |= z;
            }
        }
        (present, huge, zero)
    }

    /// Page `(i, at)` is out of the CPU page table: it is this migration's
    /// (and the operation's record says where it waits).
    fn mark_taken(&mut self, regions: &mut Regions, (i, at): (usize, VirtAddr), how: How) {
        let taken = match how {
            How::Copied => Some(Taken::Mapped),
            How::Moved => match (self.run.as_ref(), self.shared.staging()) {
                (Some(run), Ok(st)) => Some(Taken::At(st.slot(run, self.addr(i)))),
                _ => None,
            },
            How::Device | How::None => None,
        };
        if regions.states.set(at, Stored::Migrating(self.op)).is_ok() {
            if let Some(taken) = taken {
                regions.record_taken(self.op, i, taken);
            }
            let e = &mut self.entries[i];
            e.src = MigrateSrc::System;
            e.how = how;
            e.migrate = true;
        }
    }

    /// The copying fallback for memory `UFFDIO_MOVE` does not take
    /// (read-only, private file mappings): write-protect the pages (if the
    /// mapping is writable) so that CPU writes wait, then copy them into
    /// staging; they leave the page table when the migration commits.
    ///
    /// Under the regions lock, so nothing can discard them meanwhile (a
    /// discard waits until its event is read, which needs this lock); a
    /// page unmapped meanwhile fails the read cleanly and is not selected.
    fn copy_out(&mut self, regions: &mut Regions, staging: &Staging, run: &Run, idx: &[usize]) {
        self.all_data = false;
        let mut todo: Vec<(usize, VirtAddr)> = idx
            .iter()
            .filter_map(|&i| Some((i, self.takeable(regions, i)?)))
            .collect();
        // A page a discard is about to zap is left alone (not selected).
        todo.retain(|&(_, at)| !regions.zap_pending(at));
        for group in contiguous(&todo) {
            let group = &todo[group];
            let (first, at) = group[0];
            let Ok(pages) = PageRange::new(at, group.len() * PAGE_SIZE) else {
                continue;
            };
            let write = self.entries[first].write;
            if write
                && !matches!(self.shared.uffd.write_protect(pages, true, false), Ok(p) if p.is_complete())
            {
                let _ = self.shared.uffd.write_protect(pages, false, true);
                continue;
            }
            // Only pages with data are read (a hole reads as zeros).
            let mut with_data = vec![false; group.len()];
            let mut found = Vec::new();
            let query = ScanQuery::new()
                .any_of(Categories::PRESENT | Categories::SWAPPED)
                .report(Categories::PFNZERO);
            let Ok(_) = self
                .shared
                .pagemap()
                .map_err(drop)
                .and_then(|pm| pm.scan(pages, &query, &mut found).map_err(drop))
            else {
                if write {
                    let _ = self.shared.uffd.write_protect(pages, false, true);
                }
                continue;
            };
            for r in found {
                if !r.categories.contains(Categories::PFNZERO) {
                    for a in r.range.pages() {
                        with_data[(a.get() - at.get()) / PAGE_SIZE] = true;
                    }
                }
            }
            let slots: Vec<VirtAddr> = group
                .iter()
                .map(|&(i, _)| staging.slot(run, self.addr(i)))
                .collect();
            let mut bufs = staging.pages_mut(&slots);
            for (k, (&(i, a), buf)) in group.iter().zip(bufs.iter_mut()).enumerate() {
                // Read through the kernel: a page unmapped meanwhile is an
                // error, not a crash.
                if with_data[k] && mem::read_process(a, buf).is_err() {
                    if let Ok(page) = PageRange::new(a, PAGE_SIZE)
                        && write
                    {
                        let _ = self.shared.uffd.write_protect(page, false, true);
                    }
                    continue;
                }
                self.mark_taken(regions, (i, a), How::Copied);
            }
        }
    }

    /// Holes and zero pages among the selected system pages become Zero.
    fn classify(&mut self) -> Result<(), MigrateError> {
        let (Some(run), staging) = (self.run, self.shared.staging()?) else {
            return Ok(());
        };
        let slots = staging.slots(&run, self.range);
        let mut regions = Vec::new();
        let query = ScanQuery::new()
            .any_of(Categories::PRESENT | Categories::SWAPPED)
            .report(Categories::PRESENT | Categories::SWAPPED | Categories::PFNZERO);
        self.shared
            .pagemap()
            .map_err(MmError::from)?
            .scan(slots, &query, &mut regions)
            .map_err(MmError::from)?;
        let mut data = vec![false; self.entries.len()];
        let mut zero = vec![false; self.entries.len()];
        for r in regions {
            if r.categories.contains(Categories::PFNZERO) {
                for slot in r.range.pages() {
                    zero[(slot.get() - slots.start().get()) / PAGE_SIZE] = true;
                }
                continue;
            }
            for slot in r.range.pages() {
                data[(slot.get() - slots.start().get()) / PAGE_SIZE] = true;
            }
        }
        for ((e, has_data), zero_pte) in self.entries.iter_mut().zip(data).zip(zero) {
            if e.src == MigrateSrc::System && e.how != How::None && !has_data {
                e.src = MigrateSrc::Zero;
                e.zero_pte = zero_pte && e.how == How::Moved;
            }
        }
        Ok(())
    }

    /// The range.
    pub fn range(&self) -> PageRange {
        self.range
    }

    /// The owner.
    pub fn owner(&self) -> Owner {
        self.owner
    }

    /// Pages selected (the kernel's `cpages` after setup).
    pub fn cpages(&self) -> usize {
        self.entries.iter().filter(|e| e.migrate).count()
    }

    /// The selected pages: index, address and source.
    pub fn selected(&self) -> impl Iterator<Item = (usize, VirtAddr, MigrateSrc)> + '_ {
        self.entries
            .iter()
            .zip(self.range.pages())
            .enumerate()
            .filter(|(_, (e, _))| e.migrate)
            .map(|(i, (e, a))| (i, a, e.src))
    }

    /// Whether page `i` was writable (the kernel's `MIGRATE_PFN_WRITE`).
    pub fn writable(&self, i: usize) -> bool {
        self.entries.get(i).is_some_and(|e| e.write)
    }

    /// The bytes of selected system page `i` (held in staging while it
    /// migrates); `None` for other entries.
    pub fn src_bytes(&self, i: usize) -> Option<&[u8]> {
        // (Not in a forked child: staging is not inherited.)
        self.shared.check_process().ok()?;
        let e = self.entries.get(i)?;
        if !e.migrate || e.src != MigrateSrc::System {
            return None;
        }
        let run = self.run.as_ref()?;
        let staging = self.shared.staging().ok()?;
        let addr = self.range.start().checked_add(i * PAGE_SIZE)?;
        Some(staging.page(staging.slot(run, addr)))
    }

    /// Page `i` goes to device page `pfn` (allocated from the owner's
    /// pagemap), whose reference the migration takes: it is freed through
    /// the pagemap if the page does not migrate. A dst set before is
    /// replaced (and its reference dropped).
    ///
    /// # Errors
    ///
    /// [`MigrateError::BadEntry`] if page `i` is not selected, not from
    /// system memory, the migration has committed, or another page already
    /// goes to `pfn`; [`MigrateError::Devmem`] with
    /// [`DevmemError::BadPfn`] if `pfn` is not an allocated page of the
    /// owner's pagemap. Nothing changes on error (the reference stays the
    /// caller's).
    pub fn set_device_dst(&mut self, i: usize, pfn: DevicePfn) -> Result<(), MigrateError> {
        self.check_device_dst(i, pfn)?;
        self.set_device_dst_checked(i, pfn);
        Ok(())
    }

    /// [`set_device_dst`](Self::set_device_dst) of a destination checked
    /// already.
    fn set_device_dst_checked(&mut self, i: usize, pfn: DevicePfn) {
        let e = &mut self.entries[i];
        if let MigrateDst::Device(old) = e.dst {
            self.dsts.remove(old);
            self.shared.put_device_page(self.owner, old);
        }
        e.dst = MigrateDst::Device(pfn);
        self.dsts.insert(pfn);
    }

    /// Which of `pages` `set_device_dst` would accept, in one pass: the
    /// pagemap's pool is locked once, and a device page named twice is
    /// accepted the first time only.
    fn valid_device_dsts(&self, pages: &[(usize, DevicePfn, VirtAddr)]) -> Vec<bool> {
        let pfns: Vec<DevicePfn> = pages.iter().map(|p| p.1).collect();
        let allocated = match self.pagemap.upgrade() {
            Some(pm) => pm.allocated_all(&pfns),
            None => vec![false; pages.len()],
        };
        // Ascending, and above every destination named so far (the usual
        // batch): no page is named twice, and the entries need no look at
        // the destinations.
        let fresh = self.dsts.ascending_max().is_some_and(|max| {
            pages.first().is_none_or(|p| max.is_none_or(|m| p.1 > m))
                && pages.windows(2).all(|w| w[0].1 < w[1].1)
        });
        if fresh {
            return pages
                .iter()
                .zip(allocated)
                .map(|(&(i, pfn, _), allocated)| allocated && self.check_entry_dst(i, pfn).is_ok())
                .collect();
        }
        let mut named = PfnSet::with_capacity_and_hasher(pages.len(), Default::default());
        pages
            .iter()
            .zip(allocated)
            .map(|(&(i, pfn, _), allocated)| {
                allocated && named.insert(pfn) && self.check_entry_dst(i, pfn).is_ok()
            })
            .collect()
    }

    /// Whether `pfn` may become page `i`'s destination (see
    /// [`set_device_dst`](Self::set_device_dst)).
    fn check_device_dst(&self, i: usize, pfn: DevicePfn) -> Result<(), MigrateError> {
        self.shared.check_process().map_err(MmError::from)?;
        // (The entry is checked once the page is known allocated.)
        if self.entries.get(i).is_none() {
            return Err(MigrateError::BadEntry {
                index: i,
                reason: "outside the range",
            });
        }
        match self.pagemap.upgrade() {
            Some(pm) if pm.allocated(pfn) => self.check_entry_dst(i, pfn),
            _ => Err(DevmemError::BadPfn { pfn }.into()),
        }
    }

    /// The entry side of [`check_device_dst`](Self::check_device_dst).
    fn check_entry_dst(&self, i: usize, pfn: DevicePfn) -> Result<(), MigrateError> {
        let bad = |reason| Err(MigrateError::BadEntry { index: i, reason });
        let Some(e) = self.entries.get(i) else {
            return bad("outside the range");
        };
        if self.committed {
            return bad("the migration has committed");
        }
        if !e.migrate || !matches!(e.src, MigrateSrc::System | MigrateSrc::Zero) {
            return bad("not a selected page of system memory");
        }
        if e.moved_out && e.dst != MigrateDst::Device(pfn) {
            return bad("its data was moved into another device page already");
        }
        if e.dst != MigrateDst::Device(pfn) && self.dsts.contains(pfn) {
            return bad("its device page is already another page's destination");
        }
        Ok(())
    }

    /// Whether selected system page `i` was part of a transparent huge
    /// page mapped by a PMD when it was taken (the kernel's
    /// `MIGRATE_PFN_COMPOUND`): a device may give such a 2 MiB range a 2 MiB
    /// device page ([`DevicePagemap::alloc_huge`](super::DevicePagemap::alloc_huge))
    /// and move it as one unit.
    pub fn src_huge(&self, i: usize) -> bool {
        self.entries.get(i).is_some_and(|e| e.migrate && e.huge)
    }

    /// Page `i` does not migrate after all (its dst is dropped). Not for a
    /// page [`move_to_device`](Self::move_to_device) already moved.
    pub fn skip(&mut self, i: usize) {
        if self.shared.check_process().is_err() {
            return;
        }
        if let Some(e) = self.entries.get_mut(i)
            && !self.committed
            && !e.moved_out
        {
            if let MigrateDst::Device(old) = e.dst {
                self.dsts.remove(old);
                self.shared.put_device_page(self.owner, old);
            }
            e.dst = MigrateDst::None;
        }
    }

    /// For the way back: a system page for every selected device page,
    /// as (index, bytes to fill). Each entry's dst becomes
    /// [`MigrateDst::System`]; [`skip`](Self::skip) one whose copy failed.
    ///
    /// # Errors
    ///
    /// [`MigrateError::Staging`] if staging cannot take the range.
    pub fn system_dsts(&mut self) -> Result<Vec<(usize, &mut [u8])>, MigrateError> {
        self.shared.check_process().map_err(MmError::from)?;
        if self.committed {
            return Ok(Vec::new());
        }
        let staging = self.shared.staging()?;
        let run = match self.run {
            Some(r) => r,
            None => {
                let want = if self.whole_huge_device_pages() {
                    Want::Huge
                } else {
                    Want::Fill
                };
                let r = staging.alloc(self.range, want, self.blockable, false)?;
                self.run = Some(r);
                self.thp_home = want == Want::Huge;
                r
            }
        };
        let idx: Vec<usize> = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.migrate && e.how == How::Device)
            .map(|(i, _)| i)
            .collect();
        // Back the slots in one go (a 2 MiB run becomes one THP).
        let addrs: Vec<VirtAddr> = idx
            .iter()
            .map(|&i| VirtAddr::new(self.range.start().get() + i * PAGE_SIZE))
            .collect();
        // (A few pages fault in as they are written just as fast.)
        for r in super::pagemap::runs(&addrs, usize::MAX >> 1) {
            if r.npages() >= 16 {
                let _ = mem::populate(staging.slots(&run, r), true);
            }
        }
        for &i in &idx {
            self.entries[i].dst = MigrateDst::System;
        }
        let slots: Vec<VirtAddr> = addrs.iter().map(|&a| staging.slot(&run, a)).collect();
        Ok(idx.into_iter().zip(staging.pages_mut(&slots)).collect())
    }

    /// For device memory that is host RAM registered with the `Mm`
    /// (`Mm::register_device_memory`): moves each selected system page
    /// `i` into the hole at its address there, with no copy, and makes
    /// `pfn` its destination (whose reference the migration takes). A hole
    /// or zero page moves nothing (the device page stays a hole, which
    /// reads as zeros). Returns the indices done; the others (pages that
    /// were copied out, or whose move failed) are left for the caller to
    /// copy ([`src_bytes`](Self::src_bytes)) or skip, and so are entries
    /// that [`set_device_dst`](Self::set_device_dst) would refuse (and a
    /// device page named a second time).
    pub fn move_to_device(&mut self, pages: &[(usize, DevicePfn, VirtAddr)]) -> Vec<usize> {
        let mut done = Vec::with_capacity(pages.len());
        if self.shared.check_process().is_err() {
            return done;
        }
        let (Some(run), Ok(staging)) = (self.run, self.shared.staging()) else {
            return done;
        };
        // Only what `set_device_dst` would accept, checked in one go (a
        // device page named twice is one page's destination at most).
        let valid = self.valid_device_dsts(pages);
        let pages: Vec<(usize, DevicePfn, VirtAddr)> = pages
            .iter()
            .zip(valid)
            .filter_map(|(&p, ok)| ok.then_some(p))
            .collect();
        let pages = &pages[..];
        let mut k = 0;
        while k < pages.len() {
            let (i, pfn, to) = pages[k];
            let e = self.entries[i];
            if e.how != How::Moved {
                k += 1;
                continue;
            }
            if e.src == MigrateSrc::Zero && !e.zero_pte {
                self.set_device_dst_checked(i, pfn);
                done.push(i);
                k += 1;
                continue;
            }
            // A run of system pages at consecutive addresses on both sides.
            let mut n = 1;
            while let Some(&(j, _, t)) = pages.get(k + n) {
                let ok = j == i + n
                    && t.get() == to.get() + n * PAGE_SIZE
                    && self.entries.get(j).is_some_and(|f| {
                        f.migrate
                            && f.how == How::Moved
                            && (f.src == MigrateSrc::System || f.zero_pte)
                    });
                if !ok {
                    break;
                }
                n += 1;
            }
            let (Ok(dst), Some(first)) = (
                PageRange::new(to, n * PAGE_SIZE),
                self.range.start().checked_add(i * PAGE_SIZE),
            ) else {
                k += n;
                continue;
            };
            // Staging to device memory: neither end is the program's;
            // EAGAIN only says some event is pending on the userfaultfd.
            // Under the regions lock all the same, and only while the
            // migration is in flight: a reclaim (`Shared::reclaim_ops`)
            // puts pages back from where the operation's record says they
            // are, which this changes.
            let mut moved = 0;
            let mut wait = LayoutWait::default();
            while wait.reads() < LAYOUT_RETRIES {
                let (Some(rest), Some(from)) = (
                    dst.tail_from(VirtAddr::new(dst.start().get() + moved * PAGE_SIZE)),
                    first.checked_add(moved * PAGE_SIZE),
                ) else {
                    break;
                };
                let mut regions = lock(&self.shared.regions);
                if regions.op(self.op).is_none() {
                    break;
                }
                let res = self
                    .shared
                    .move_held(rest, staging.slot(&run, from), MoveMode::DONTWAKE);
                let (done, stop) = progress(&res, rest.len());
                for j in 0..done / PAGE_SIZE {
                    let at = VirtAddr::new(rest.start().get() + j * PAGE_SIZE);
                    regions.record_taken(self.op, i + moved + j, Taken::At(at));
                }
                moved += done / PAGE_SIZE;
                // A hole in its slot: nothing is left in staging to copy.
                if stop == Some(Stop::NoEntry) {
                    let at = VirtAddr::new(to.get() + moved * PAGE_SIZE);
                    regions.record_taken(self.op, i + moved, Taken::At(at));
                    moved += 1;
                }
                drop(regions);
                match stop {
                    None => break,
                    Some(Stop::Partial | Stop::NoEntry) => {}
                    Some(Stop::LayoutChanging) if self.blockable => {
                        self.shared.layout_wait(&mut wait)
                    }
                    _ => break,
                }
            }
            for &(j, pfn, to) in &pages[k..k + moved] {
                // Checked before the move; the data is in device memory now.
                self.set_device_dst_checked(j, pfn);
                self.entries[j].moved_out = true;
                self.entries[j].dev_addr = Some(to);
                done.push(j);
            }
            k += n;
        }
        done
    }

    /// For device memory that is host RAM registered with the `Mm`: each
    /// selected device page `i` comes back by moving its page at the given
    /// address into place, with no copy (a copy where the mapping does not
    /// allow a move). Replaces [`system_dsts`](Self::system_dsts) for those
    /// pages.
    pub fn move_from_device(&mut self, pages: &[(usize, VirtAddr)]) {
        self.back_from_device(pages, false);
    }

    /// For device memory the CPU can read through a mapping of this
    /// process (host-visible or coherent device memory, a BAR mapping):
    /// each selected device page `i` comes back by one copy the kernel
    /// makes from its address there straight into place (`UFFDIO_COPY`),
    /// with no staging page to fill first and no move to flush. The source
    /// must stay readable and unchanged until [`pages`](Self::pages)
    /// returns; a page whose source cannot be read does not migrate (it
    /// stays on the device). Replaces [`system_dsts`](Self::system_dsts)
    /// for those pages.
    pub fn copy_from_device(&mut self, pages: &[(usize, VirtAddr)]) {
        self.back_from_device(pages, true);
    }

    /// Each selected device page `i` of `pages` comes back from its
    /// address in device memory: copied (`copy`), or moved where the
    /// mapping allows.
    fn back_from_device(&mut self, pages: &[(usize, VirtAddr)], copy: bool) {
        if self.committed {
            return;
        }
        for &(i, from) in pages {
            if let Some(e) = self.entries.get_mut(i)
                && e.migrate
                && e.how == How::Device
            {
                e.dst = MigrateDst::SystemFrom(from);
                if copy {
                    self.copy_install[i] = true;
                }
            }
        }
    }

    /// Whether the migration brings whole 2 MiB device pages home, one
    /// for each 2 MiB block of its range (THPs that went to the device as
    /// one): its slots had best be THPs, which then move into place whole
    /// (`holds_pmd`).
    fn whole_huge_device_pages(&self) -> bool {
        let huge_pages = super::pagemap::HUGE_PAGES;
        if self.entries.is_empty()
            || self.entries.len() % huge_pages != 0
            || !self.range.start().is_aligned(huge_pages * PAGE_SIZE)
        {
            return false;
        }
        let Some(pm) = self.pagemap.upgrade() else {
            return false;
        };
        self.entries.chunks(huge_pages).all(|block| {
            let MigrateSrc::Device(head) = block[0].src else {
                return false;
            };
            pm.is_huge(head)
                && block.iter().enumerate().all(|(k, e)| {
                    e.migrate
                        && e.how == How::Device
                        && e.src == MigrateSrc::Device(DevicePfn(head.0 + k as u64))
                })
        })
    }

    /// Whether a THP maps the range's first page (one look at one page
    /// table entry: a hint for where its pages go in staging).
    fn holds_thp(&self) -> bool {
        PageRange::new(self.range.start(), PAGE_SIZE).is_ok_and(|first| self.thp_bytes(first) > 0)
    }

    /// The bytes of `range` that THPs map, as the page table says (0 where
    /// it cannot be read, or cannot tell THPs).
    fn thp_bytes(&self, range: PageRange) -> usize {
        let mut thp = Vec::new();
        let query = ScanQuery::new()
            .require(Categories::PRESENT | Categories::HUGE)
            .report(Categories::PRESENT | Categories::HUGE);
        match self
            .shared
            .pagemap()
            .map(|pm| pm.scan(range, &query, &mut thp))
        {
            Ok(Ok(_)) => thp.iter().map(|r| r.range.len()).sum(),
            _ => 0,
        }
    }

    /// Commits: pages with a dst migrate. Afterwards
    /// [`migrated`](Self::migrated) says which did.
    pub fn pages(&mut self) {
        if self.committed || self.shared.check_process().is_err() {
            return;
        }
        self.committed = true;
        // Not to be reclaimed halfway (`Shared::reclaim_ops` waits): the
        // commit drops pages that stayed mapped (copied) outside the
        // regions lock. Everything else it does under the lock, page by
        // page against the state the page has, so without such pages (a
        // fault back, say) it needs no mark.
        let unlocked = self
            .entries
            .iter()
            .any(|e| e.how == How::Copied && matches!(e.dst, MigrateDst::Device(_)));
        let (shared, id) = (self.shared, self.op);
        let mark = move |on: bool| {
            if let Some(op) = lock(&shared.regions).op_mut(id) {
                op.committing = on;
            }
        };
        if unlocked {
            mark(true);
        }
        self.commit();
        if unlocked {
            mark(false);
        }
    }

    fn commit(&mut self) {
        let to_device: Vec<usize> = self.indices(|e| matches!(e.dst, MigrateDst::Device(_)));
        let to_system: Vec<usize> =
            self.indices(|e| matches!(e.dst, MigrateDst::System | MigrateDst::SystemFrom(_)));
        for e in &mut self.entries {
            if e.dst == MigrateDst::None {
                if e.migrate {
                    e.why = Some(PageOutcome::NoDestination);
                }
                e.migrate = false;
            }
        }
        if !to_device.is_empty() {
            self.commit_to_device(&to_device);
        }
        if !to_system.is_empty() {
            self.commit_to_system(&to_system);
        }
        let stats = &self.shared.stats;
        let moved = |idx: &[usize]| idx.iter().filter(|&&i| self.entries[i].migrate).count() as u64;
        crate::trace::event!(
            target: "uhmm::migrate",
            owner = self.owner.get(),
            start = %self.range.start(),
            pages = self.range.npages(),
            to_device = moved(&to_device),
            to_system = moved(&to_system),
            "migration committed"
        );
        stats
            .pages_to_device
            .fetch_add(moved(&to_device), std::sync::atomic::Ordering::Relaxed);
        stats
            .pages_to_system
            .fetch_add(moved(&to_system), std::sync::atomic::Ordering::Relaxed);
    }

    fn indices(&self, pick: impl Fn(&Entry) -> bool) -> Vec<usize> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.migrate && pick(e))
            .map(|(i, _)| i)
            .collect()
    }

    fn addr(&self, i: usize) -> VirtAddr {
        VirtAddr::new(self.range.start().get() + i * PAGE_SIZE)
    }

    fn commit_to_device(&mut self, idx: &[usize]) {
        // Copied pages are still mapped (write-protected): drop them now.
        // (Outside the lock: the discard waits for its event to be read.)
        let copied: Vec<(usize, VirtAddr)> = {
            let regions = lock(&self.shared.regions);
            idx.iter()
                .filter(|&&i| self.entries[i].how == How::Copied)
                .filter_map(|&i| self.holds(&regions, i).map(|a| (i, a)))
                .collect()
        };
        for group in contiguous(&copied) {
            let group = &copied[group];
            let Ok(r) = PageRange::new(group[0].1, group.len() * PAGE_SIZE) else {
                continue;
            };
            // Devices may have mirrored them (read-only) since the setup's
            // invalidation ended: they let go before the pages do.
            let notify = NotifierRange {
                range: r,
                event: NotifyEvent::Migrate,
                owner: Some(self.owner),
                blockable: self.blockable,
            };
            let Ok(guard) = self.shared.notifiers.invalidate_start(&notify) else {
                for &(i, _) in group {
                    self.not_migrated(i, PageOutcome::Busy);
                }
                continue;
            };
            let discarded = self.shared.discard_own(r);
            drop(guard);
            if discarded.is_err() {
                // madvise goes on past a piece unmapped or moved meanwhile
                // (and then fails): pages of the group it zapped have
                // their data in the device page only, and commit; the
                // others stay.
                let regions = lock(&self.shared.regions);
                for &(i, at) in group {
                    let zapped = self.holds(&regions, i) == Some(at)
                        && self.shared.page_present(at) == Some(false);
                    if !zapped {
                        self.not_migrated(i, PageOutcome::Failed);
                    }
                }
            }
        }
        let mut regions = lock(&self.shared.regions);
        for &i in idx {
            let e = self.entries[i];
            let MigrateDst::Device(pfn) = e.dst else {
                continue;
            };
            // Not taken out of the page table, or discarded or unmapped
            // meanwhile: nothing to commit.
            let at = self.holds(&regions, i);
            let committed = e.migrate
                && e.how != How::None
                && at.is_some_and(|a| {
                    regions
                        .states
                        .set(a, Stored::Device(self.owner, pfn))
                        .is_ok()
                });
            if committed {
                let _ = regions.clear_taken(self.op, i);
            } else if e.migrate {
                let why = if at.is_none() {
                    PageOutcome::Gone
                } else {
                    PageOutcome::Failed
                };
                self.not_migrated(i, why);
            }
        }
    }

    /// Where page `i`'s data waits to come back to system memory: device
    /// memory (host RAM, moved with no copy) or its staging slot.
    fn source(&self, i: usize) -> Option<VirtAddr> {
        let e = &self.entries[i];
        match (e.dst, e.how) {
            (MigrateDst::SystemFrom(a), _) => Some(a),
            (MigrateDst::System, _) => Some(
                self.shared
                    .staging()
                    .ok()?
                    .slot(self.run.as_ref()?, self.addr(i)),
            ),
            // Put back after a migration to the device that did not happen.
            (_, How::Moved) if e.moved_out => e.dev_addr,
            (_, How::Moved) => Some(
                self.shared
                    .staging()
                    .ok()?
                    .slot(self.run.as_ref()?, self.addr(i)),
            ),
            _ => None,
        }
    }

    /// Installs the pages `idx` (still this migration's) at their addresses
    /// now from their sources, in runs contiguous at both ends, under the
    /// regions lock; each installed page becomes `Cpu`. Returns the pages
    /// installed and the pages to try again once pending events are
    /// applied; the rest could not be installed.
    fn install_all(&self, regions: &mut Regions, idx: &[usize]) -> Installed {
        // On the fault service, and within the staging's budget of dirty
        // blocks (the service cannot empty blocks itself). Staging is looked
        // at only where a page came through it: a zero-copy fault back does
        // not touch it.
        let fill = !self.blockable
            && idx.iter().any(|&i| self.copy_fill(i))
            && self
                .shared
                .staging()
                .is_ok_and(|st| st.keeps_dirty(self.run.as_ref()));
        let todo: Vec<(usize, VirtAddr, VirtAddr)> = idx
            .iter()
            .filter_map(|&i| Some((i, self.holds(regions, i)?, self.source(i)?)))
            .collect();
        let mut done_pages = Vec::new();
        let mut left = Vec::new();
        let mut failed = Vec::new();
        let mut k = 0;
        while k < todo.len() {
            let (i, at, from) = todo[k];
            let mut n = 1;
            while let Some(&(j, a, f)) = todo.get(k + n) {
                let d = n * PAGE_SIZE;
                if j != i + n || a.get() != at.get() + d || f.get() != from.get() + d {
                    break;
                }
                n += 1;
            }
            let filling = fill
                && !holds_pmd(at, n)
                && todo[k..k + n].iter().any(|&(j, _, _)| self.copy_fill(j));
            let copy = filling || todo[k..k + n].iter().any(|&(j, _, _)| self.copy_install[j]);
            let Ok(r) = PageRange::new(at, n * PAGE_SIZE) else {
                k += n;
                continue;
            };
            let (done, stop) = self.install(r, from, copy);
            let done = done / PAGE_SIZE;
            if filling && done > 0 {
                self.filled.set(true);
            }
            for &(j, a, _) in &todo[k..k + done] {
                let _ = regions.states.set(a, Stored::Cpu);
                let _ = regions.clear_taken(self.op, j);
                done_pages.push((j, a));
            }
            let rest = todo[k + done..k + n].iter().map(|&(j, a, _)| (j, a));
            match stop {
                None => {}
                Some(Stop::LayoutChanging) => {
                    // (Only a refusal of the very page the service serves
                    // explains why it stays: others are any thread's.)
                    let rest: Vec<(usize, VirtAddr)> = rest.collect();
                    if let Some(s) = regions.serving.as_mut()
                        && rest.iter().any(|&(_, a)| a == s.page)
                    {
                        s.refused = true;
                    }
                    left.extend(rest.iter().map(|&(j, _)| j));
                }
                // Someone else resolved the page meanwhile (it is present):
                // what is there is newer than what waited here.
                Some(Stop::Exists) => {
                    let mut rest = rest;
                    if let Some((j, a)) = rest.next() {
                        let _ = regions.states.set(a, Stored::Cpu);
                        let _ = regions.clear_taken(self.op, j);
                        done_pages.push((j, a));
                    }
                    left.extend(rest.map(|(j, _)| j));
                }
                Some(_) => failed.extend(rest),
            }
            k += n;
        }
        // The page whose fault the service is serving, put in place: that
        // fault is served (see `fault::serve`).
        if let Some(s) = regions.serving.as_mut()
            && done_pages.iter().any(|&(_, a)| a == s.page)
        {
            s.installed = true;
        }
        (done_pages, left, failed)
    }

    /// Whether page `i` may go home by COPY from its staging slot although
    /// MOVE could take it: a page the device wrote into staging
    /// ([`system_dsts`](Self::system_dsts)). It does on the fault service,
    /// while staging keeps fewer dirty blocks than it may
    /// ([`install_all`](Self::install_all)), in runs that hold no whole
    /// PMD block (see [`holds_pmd`]). The slot
    /// keeps its page, warm for the next fault back (which then neither
    /// allocates nor zeroes one: a 2 MiB block that had held 4 KiB pages
    /// never becomes a THP again, so it is 512 first touches), and no page
    /// leaves the staging page table (a MOVE flushes the TLB of every CPU
    /// the process runs on). The kernel's copy costs less than the first
    /// touches it saves (`uhmm bench`: the copying fault-back cases).
    /// Pages that went home this way stay in their slots: the run is
    /// known to hold pages without asking the page table.
    fn copy_fill(&self, i: usize) -> bool {
        self.entries[i].dst == MigrateDst::System
    }

    fn commit_to_system(&mut self, idx: &[usize]) {
        let mut todo = idx.to_vec();
        let here = crate::mm::service::on_service_of(self.shared);
        // When the first install was refused (none is, most of the time).
        let mut refused_at: Option<Instant> = None;
        let mut wait = LayoutWait::default();
        while wait.reads() < LAYOUT_RETRIES {
            let (done, left, failed) = {
                let mut regions = lock(&self.shared.regions);
                let held: Vec<usize> = todo
                    .iter()
                    .copied()
                    .filter(|&i| self.holds(&regions, i).is_some())
                    .collect();
                self.install_all(&mut regions, &held)
            };
            let mut installed = vec![false; self.entries.len()];
            for &(i, _) in &done {
                installed[i] = true;
            }
            let mut refused = vec![false; self.entries.len()];
            for &(i, _) in &failed {
                refused[i] = true;
            }
            for &i in &todo {
                if !installed[i] && !left.contains(&i) {
                    // Not installed (gone, or refused): it stays on the
                    // device, and `finish` gives it its state back.
                    let why = if refused[i] {
                        PageOutcome::Failed
                    } else {
                        PageOutcome::Gone
                    };
                    self.not_migrated(i, why);
                }
            }
            // Bookkeeping first: the device pages are freed before anyone
            // who waited is woken (DESIGN.md, concurrency rule 6).
            let freed: Vec<DevicePfn> = done
                .iter()
                .filter_map(|&(i, _)| match self.entries[i].src {
                    MigrateSrc::Device(pfn) => Some(pfn),
                    _ => None,
                })
                .collect();
            self.shared.put_device_pages(self.owner, &freed);
            let woken: Vec<VirtAddr> = done.iter().map(|&(_, a)| a).collect();
            for r in super::pagemap::runs(&woken, usize::MAX >> 1) {
                let _ = self.shared.uffd.wake(r);
            }
            if left.is_empty() {
                return;
            }
            let since = refused_at.get_or_insert_with(Instant::now).elapsed();
            let may_wait = self.blockable || (here && since < SERVICE_LAYOUT_FOR);
            if !may_wait {
                // Tried again on a later turn of the service (see
                // `fault::serve`: not a failure of the device).
                for i in left {
                    self.not_migrated(i, PageOutcome::Busy);
                }
                return;
            }
            // The fault service reads the events that refused the install
            // itself, and tries again in the window the threads they
            // release leave (see `LayoutWait`): its data copied already,
            // the fault back is not redone from the start on a later turn.
            self.shared.layout_wait(&mut wait);
            todo = left;
        }
        for &i in &todo {
            self.not_migrated(i, PageOutcome::Busy);
        }
    }

    /// Page `i` does not migrate after all, for `why`.
    fn not_migrated(&mut self, i: usize, why: PageOutcome) {
        let e = &mut self.entries[i];
        e.migrate = false;
        e.why = Some(why);
    }

    /// Puts the pages at `from` (staging slots, or device memory) at `r`
    /// (holes there, since every CPU access waits), without waking anyone
    /// yet. Moves where the kernel allows it, copies where it does not
    /// (`copy`: the mapping is known not to take MOVE; a page of the source
    /// that is shared or pinned), and never issues one call across two
    /// mappings. Returns the bytes done and why it stopped, if it did.
    fn install(&self, r: PageRange, from: VirtAddr, mut copy: bool) -> (usize, Option<Stop>) {
        let mut done = 0;
        let mut limit = r.len();
        while done < r.len() {
            let len = limit.min(r.len() - done);
            let (Ok(part), Some(src)) = (
                PageRange::new(VirtAddr::new(r.start().get() + done), len),
                from.checked_add(done),
            ) else {
                return (done, Some(Stop::NoEntry));
            };
            let res = if copy {
                self.shared.uffd.copy(part, src, CopyMode::DONTWAKE)
            } else {
                // Never with ALLOW_SRC_HOLES: see `MOVE_QUIRK`.
                self.shared.move_held(part, src, MoveMode::DONTWAKE)
            };
            let (did, stop) = match res {
                Ok(p) if p.is_complete() => (len, None),
                Ok(p) => (p.done, p.stop),
                // MOVE needs private anonymous read-write memory at both
                // ends; elsewhere the kernel says EINVAL: copy. For COPY,
                // EINVAL is a range not inside one registered mapping.
                Err(OpError::Invalid { .. }) if !copy => {
                    copy = true;
                    continue;
                }
                Err(OpError::Invalid { .. }) => (0, Some(Stop::NoEntry)),
                Err(_) => return (done, Some(Stop::NoEntry)),
            };
            done += did;
            match stop {
                None => limit = r.len(),
                Some(Stop::Partial) => {}
                // A page of the source shared (after a fork that uhmm did
                // not see) or pinned: MOVE refuses it for good; copy it.
                Some(Stop::Busy) => {
                    let Ok(page) = PageRange::new(VirtAddr::new(r.start().get() + done), PAGE_SIZE)
                    else {
                        return (done, stop);
                    };
                    match self.shared.uffd.copy(
                        page,
                        src.checked_add(did).unwrap_or(src),
                        CopyMode::DONTWAKE,
                    ) {
                        Ok(p) if p.is_complete() => done += PAGE_SIZE,
                        Ok(p) => return (done, p.stop),
                        Err(_) => return (done, Some(Stop::NoEntry)),
                    }
                }
                // MOVE: a hole at the source (a device page never
                // written): the destination reads as it should.
                Some(Stop::NoEntry) if !copy => done += PAGE_SIZE,
                // COPY: the run may cross into another mapping (a partial
                // mprotect or madvise split it): one mapping at a time.
                Some(Stop::NoEntry) if len > PAGE_SIZE => {
                    limit = self.mapping_bytes(VirtAddr::new(r.start().get() + done), len);
                }
                // No mapping at the destination for a single page: one is
                // being moved or unmapped (its event is not applied yet).
                // Look again once it is: the page follows, or is gone.
                Some(Stop::NoEntry) => {
                    crate::sys::uffd::ops::note_refusal_here();
                    return (done, Some(Stop::LayoutChanging));
                }
                Some(stop) => return (done, Some(stop)),
            }
        }
        (done, None)
    }

    /// How much of the `len` bytes from `at` lie in the mapping at `at`
    /// (at least a page, less than `len` unless the mappings cannot be
    /// read).
    fn mapping_bytes(&self, at: VirtAddr, len: usize) -> usize {
        let Ok(r) = PageRange::new(at, len) else {
            return PAGE_SIZE;
        };
        let end = self
            .shared
            .procmap()
            .ok()
            .and_then(|m| m.covering(r).ok())
            .and_then(|v| v.first().map(|v| v.range.end()));
        match end {
            Some(e) if e > at && e.get() - at.get() < len => e.get() - at.get(),
            _ => PAGE_SIZE,
        }
    }

    /// Whether page `i` migrated (after [`pages`](Self::pages)).
    pub fn migrated(&self, i: usize) -> bool {
        self.committed && self.entries.get(i).is_some_and(|e| e.migrate)
    }

    /// What became of page `i` at the commit, and why it did not migrate
    /// if it did not; `None` before [`pages`](Self::pages) or for an index
    /// outside the range.
    pub fn outcome(&self, i: usize) -> Option<PageOutcome> {
        let e = self.entries.get(i)?;
        if !self.committed {
            return None;
        }
        Some(match (e.migrate, e.why) {
            (true, _) => PageOutcome::Migrated,
            (false, Some(why)) => why,
            (false, None) => PageOutcome::NotSelected,
        })
    }

    /// Pages that migrated.
    pub fn migrated_count(&self) -> usize {
        if self.committed {
            self.entries.iter().filter(|e| e.migrate).count()
        } else {
            0
        }
    }

    /// Ends the migration: what did not migrate is put back as it was, the
    /// invalidation ends, and CPU accesses that waited go on.
    pub fn finalize(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        if !crate::mm::service::on_service_of(self.shared)
            && crate::mm::ForkedChild::check_exact(self.shared.pid).is_err()
        {
            // A forked child's copy: the migration is the parent's (whose
            // fork prepare reclaimed it, or waited for it); nothing here
            // is the child's to touch.
            return;
        }
        if !self.committed {
            // Never committed (an early return, an error): nothing migrated.
            for e in &mut self.entries {
                e.migrate = false;
            }
        }
        self.committed = true;
        // Put back what did not migrate, from wherever its data is (its
        // staging slot, or the device memory it was already moved to), at
        // the address each page has now — if it is still this migration's:
        // a page discarded or unmapped meanwhile stays gone.
        let mut todo: Vec<usize> = self.indices_all(|e| !e.migrate && e.src != MigrateSrc::None);
        let mut freed = Vec::new();
        // (Made at the first refusal: most migrations put nothing back, or
        // put it back at once, and need no clock.)
        let mut patience: Option<Patience> = None;
        loop {
            if todo.is_empty() {
                break;
            }
            let mut woken = Vec::new();
            let left = {
                let mut regions = lock(&self.shared.regions);
                let mut moved_back = Vec::new();
                for &i in &todo {
                    let e = self.entries[i];
                    let Some(at) = self.holds(&regions, i) else {
                        // Discarded or unmapped in flight: gone, and the
                        // reference its device page held is this
                        // migration's to drop (the service left it) —
                        // unless the migration was reclaimed, which has
                        // dealt with it (`Shared::reclaim_ops`).
                        if let MigrateSrc::Device(pfn) = e.src
                            && regions.clear_taken(self.op, i) == Some(Taken::Device(pfn))
                        {
                            freed.push(pfn);
                        }
                        continue;
                    };
                    match (e.how, e.src) {
                        (How::Device, MigrateSrc::Device(pfn)) => {
                            let _ = regions.states.set(at, Stored::Device(self.owner, pfn));
                        }
                        (How::Copied, _) => {
                            // Still mapped: writes may go on.
                            if let Ok(page) = PageRange::new(at, PAGE_SIZE) {
                                let _ = self.shared.uffd.write_protect(page, false, false);
                            }
                            let _ = regions.states.set(at, Stored::Cpu);
                            woken.push(at);
                        }
                        (How::Moved, _) => moved_back.push(i),
                        _ => {
                            let _ = regions.states.set(at, Stored::Cpu);
                        }
                    }
                    if e.how != How::Moved {
                        let _ = regions.clear_taken(self.op, i);
                    }
                }
                let (done, left, failed) = self.install_all(&mut regions, &moved_back);
                woken.extend(done.iter().map(|&(_, a)| a));
                // What cannot be put back at all is lost: an access gets
                // SIGBUS (never zeros, never a wait).
                for (i, at) in failed {
                    let _ = regions.clear_taken(self.op, i);
                    if let Ok(page) = PageRange::new(at, PAGE_SIZE) {
                        self.shared.lose_locked(&mut regions, page);
                    }
                }
                left
            };
            for r in super::pagemap::runs(&woken, usize::MAX >> 1) {
                let _ = self.shared.uffd.wake(r);
            }
            todo = left;
            if todo.is_empty()
                || !self.blockable
                || !patience.get_or_insert_with(Patience::new).wait(self.shared)
            {
                break;
            }
        }
        if !todo.is_empty() {
            // Refused for long with no layout change pending: what is
            // still out is lost rather than left waiting.
            let mut regions = lock(&self.shared.regions);
            for &i in &todo {
                if let Some(at) = self.holds(&regions, i)
                    && let Ok(page) = PageRange::new(at, PAGE_SIZE)
                {
                    self.shared.lose_locked(&mut regions, page);
                }
            }
        }
        // Device pages that did not become a page's home are unused.
        freed.extend(
            self.entries
                .iter()
                .filter_map(|e| match (e.migrate, e.dst) {
                    (false, MigrateDst::Device(pfn)) => Some(pfn),
                    _ => None,
                }),
        );
        self.shared.put_device_pages(self.owner, &freed);
        if let (Some(run), Ok(staging)) = (self.run.take(), self.shared.staging()) {
            // Whether pages are left in the run, as the page table says
            // (what was discarded in flight, or stayed after a copy).
            // (Deciding it from the entries instead, to save the scan,
            // made the MADV_DONTNEED-under-migration repro read stale
            // data about one run in three: kept as the page table says.)
            if run.whole_blocks() && (self.thp_home || self.thp_src) {
                let left = self.blocks_left(staging, &run);
                staging.free_blocks(run, &left, self.blockable);
            } else {
                let span = run.span();
                let mut left = Vec::new();
                let query = ScanQuery::new()
                    .any_of(Categories::PRESENT | Categories::SWAPPED)
                    .max_pages(1);
                // (Pages copied out of their slots stay there: no scan.)
                let dirty = self.filled.get()
                    || self
                        .shared
                        .pagemap()
                        .ok()
                        .and_then(|pm| pm.scan(staging.slots(&run, span), &query, &mut left).ok())
                        .is_none_or(|_| !left.is_empty());
                staging.free(run, dirty, self.blockable);
            }
        }
        // End the operation and the invalidation, let the fork gate go, and
        // have the service look at the faults that waited for these pages.
        // (Reclaimed meanwhile, it has ended already: `Shared::reclaim_ops`.)
        self.shared.end_op(self.op);
        self.shared.poke();
    }

    /// What each block of `run` (of whole blocks, where THPs went) holds
    /// now, as the page table says: one whole THP, pages, or nothing —
    /// and then whether it is flat (see `staging`): known only where a THP
    /// came home whole out of a block that was flat or held one.
    fn blocks_left(&self, staging: &Staging, run: &Run) -> Vec<Left> {
        let held = self
            .shared
            .pagemap()
            .ok()
            .and_then(|pm| staging.held(pm, run));
        let Some(held) = held else {
            return vec![Left::Pages; run.span().len() / BLOCK];
        };
        let home_whole = self.thp_home && self.landed_whole();
        held.iter()
            .enumerate()
            .map(|(k, &(pages, in_thp))| match (pages, in_thp) {
                (0, _) => Left::Empty {
                    flat: home_whole && staging.was_thp_shaped(run, k),
                },
                (p, t) if p == BLOCK / PAGE_SIZE && t == p => Left::Thp,
                _ => Left::Pages,
            })
            .collect()
    }

    /// Whether the range is mapped by whole THPs now (a THP that came home
    /// moved in as one, its PMD).
    fn landed_whole(&self) -> bool {
        self.thp_bytes(self.range) == self.range.len()
    }

    fn indices_all(&self, pick: impl Fn(&Entry) -> bool) -> Vec<usize> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| pick(e))
            .map(|(i, _)| i)
            .collect()
    }
}

/// Whether the run of `n` pages at `at` holds a whole 2 MiB (PMD) block.
/// Such a run goes home by MOVE, never by the kernel's copy from staging
/// (`MigrateVma::copy_fill`): a THP in staging then moves as one PMD (no
/// copy, no allocation, and a THP where it lands if no page table is
/// there), and 512 pages moved still cost less than 512 copies into fresh
/// pages. Measured on the fault service, 1 GiB read sequentially with
/// 2 MiB fault blocks from a copying device: 5.2–5.4 GB/s against
/// 2.5 GB/s copied (a THP region), 2.2 against 0.8–1.4 GB/s (4 KiB pages).
/// A page slot keeps its offset within its 2 MiB block, so the source is
/// aligned as the destination is.
fn holds_pmd(at: VirtAddr, n: usize) -> bool {
    let first = at.get().next_multiple_of(BLOCK);
    first + BLOCK <= at.get() + n * PAGE_SIZE
}

impl Drop for MigrateVma<'_> {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A set of device pages, hashed by multiplying the page number (distinct
/// numbers; no untrusted input to defend against, and SipHash cost a
/// fifth of a small migration's time).
type PfnSet = std::collections::HashSet<DevicePfn, crate::addr::IdBuildHasher>;

/// The device pages named as destinations so far: a sorted list while they
/// come in ascending order (a device allocates a batch in order, and names
/// it in order: no hashing at all), a hash set once they do not.
#[derive(Debug)]
enum Dsts {
    Ascending(Vec<DevicePfn>),
    Set(PfnSet),
}

impl Default for Dsts {
    fn default() -> Self {
        Dsts::Ascending(Vec::new())
    }
}

impl Dsts {
    fn contains(&self, pfn: DevicePfn) -> bool {
        match self {
            Dsts::Ascending(v) => {
                v.last().is_some_and(|&l| pfn <= l) && v.binary_search(&pfn).is_ok()
            }
            Dsts::Set(s) => s.contains(&pfn),
        }
    }

    /// The largest destination, while they came in ascending order.
    fn ascending_max(&self) -> Option<Option<DevicePfn>> {
        match self {
            Dsts::Ascending(v) => Some(v.last().copied()),
            Dsts::Set(_) => None,
        }
    }

    fn insert(&mut self, pfn: DevicePfn) {
        match self {
            Dsts::Ascending(v) if v.last().is_none_or(|&l| pfn > l) => v.push(pfn),
            Dsts::Ascending(v) => {
                let mut s: PfnSet = v.drain(..).collect();
                s.insert(pfn);
                *self = Dsts::Set(s);
            }
            Dsts::Set(s) => {
                s.insert(pfn);
            }
        }
    }

    fn remove(&mut self, pfn: DevicePfn) {
        match self {
            Dsts::Ascending(v) if v.last() == Some(&pfn) => {
                v.pop();
            }
            // Not the last: a hash set from now on (removing from the
            // middle of the list, page after page, would be quadratic).
            Dsts::Ascending(v) => {
                if v.binary_search(&pfn).is_ok() {
                    let mut s: PfnSet = v.drain(..).collect();
                    s.remove(&pfn);
                    *self = Dsts::Set(s);
                }
            }
            Dsts::Set(s) => {
                s.remove(&pfn);
            }
        }
    }
}

/// Bytes done by a move over `len` bytes, and why it stopped. An error
/// (EINVAL: the run crosses two mappings, or a mapping changed) stops it
/// with nothing done, like a page already present at the destination: the
/// callers then try the first page alone, or leave it.
fn progress(res: &Result<Progress, OpError>, len: usize) -> (usize, Option<Stop>) {
    match res {
        Ok(p) if p.is_complete() => (len, None),
        Ok(p) => (p.done, p.stop),
        Err(_) => (0, Some(Stop::Exists)),
    }
}

/// Splits `pages` ((index, address) pairs, by index) into runs whose
/// indices and addresses both go up a page at a time.
fn contiguous(pages: &[(usize, VirtAddr)]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    for k in 1..=pages.len() {
        let joins = pages.get(k).is_some_and(|&(i, a)| {
            let (pi, pa) = pages[k - 1];
            i == pi + 1 && a.get() == pa.get() + PAGE_SIZE
        });
        if !joins {
            out.push(start..k);
            start = k;
        }
    }
    out
}

fn vma_of(vmas: &[Vma], addr: VirtAddr) -> Option<&Vma> {
    vmas.iter().find(|v| v.range.contains(addr))
}

/// Private memory whose pages can migrate: anonymous, or a private
/// mapping of a shmem file when MINOR faults are available (a page dropped
/// from it must fault, not be refilled from the page cache). Shared memory
/// cannot migrate (as in the kernel), nor private mappings of other files.
fn private(shared: &Shared, vma: &Vma) -> bool {
    match vma.kind() {
        VmaKind::AnonPrivate => true,
        VmaKind::File => {
            !vma.shared && vma.is_shmem() && shared.uffd.features().contains(Features::MINOR_SHMEM)
        }
        _ => false,
    }
}

/// Pages `UFFDIO_MOVE` can take: private anonymous, read-write.
fn movable(vma: &Vma) -> bool {
    vma.kind() == VmaKind::AnonPrivate && vma.perms.contains(Prot::READ | Prot::WRITE)
}

/// The kernel's checks: mapped without gaps, readable, not hugetlb.
fn check_vmas(range: PageRange, vmas: &[Vma]) -> Result<(), &'static str> {
    let mut cursor = range.start();
    for v in vmas {
        if v.range.start() > cursor {
            return Err("it has a gap (an unmapped part)");
        }
        if !v.perms.contains(Prot::READ) {
            return Err("part of it is not readable (PROT_NONE)");
        }
        match v.kind() {
            VmaKind::Hugetlb { .. } => return Err("hugetlb memory does not migrate"),
            VmaKind::Special => return Err("a special mapping"),
            _ => {}
        }
        cursor = cursor.max(v.range.end());
    }
    if cursor < range.end() {
        return Err("it has a gap (an unmapped part)");
    }
    Ok(())
}
