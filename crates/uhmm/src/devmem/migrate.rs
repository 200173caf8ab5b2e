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
use super::staging::{Run, StagingError, Want};
use crate::addr::{DevicePfn, PAGE_SIZE, PageRange, VirtAddr};
use crate::mm::notifier::{InvalidateGuard, NotifierRange, NotifyEvent};
use crate::mm::service::Shared;
use crate::mm::state::Stored;
use crate::mm::{Mm, MmError, Owner, lock_poisoned as lock};
use crate::sys::mem::{self, Prot};
use crate::sys::pagemap::{Categories, ScanQuery};
use crate::sys::procmap::{Vma, VmaKind};
use crate::sys::uffd::{CopyMode, Features, MoveMode, OpError, Progress};
use bitflags::bitflags;

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
    };
}

/// One migration of a range between system memory and one owner's device
/// memory. See the [module docs](self) for the steps.
#[derive(Debug)]
pub struct MigrateVma<'a> {
    shared: &'a Shared,
    range: PageRange,
    owner: Owner,
    entries: Vec<Entry>,
    run: Option<Run>,
    /// Install by COPY (not MOVE): the mapping is not private anonymous
    /// read-write.
    copy_install: Vec<bool>,
    guard: Option<InvalidateGuard<'a>>,
    /// Where the address space's log of mremaps stood at setup.
    remap_mark: u64,
    blockable: bool,
    committed: bool,
    done: bool,
}

impl<'a> MigrateVma<'a> {
    /// Selects the pages of `range` that `select` names (device pages only
    /// if they belong to `owner`), and takes them out of the CPU's hands.
    ///
    /// # Errors
    ///
    /// [`MigrateError::InvalidRange`] if the range is not inside one managed
    /// region, or has a gap, an unreadable part or hugetlb memory;
    /// [`MigrateError::Retry`] if a device's invalidation could not be done
    /// now; [`MigrateError::Staging`] if the range is too large to migrate
    /// at once. Memory is as it was on error.
    pub fn setup(
        mm: &'a Mm,
        range: PageRange,
        select: Select,
        owner: Owner,
    ) -> Result<MigrateVma<'a>, MigrateError> {
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
        if blockable {
            shared.sync_events();
        }
        let (region, armed) = lock(&shared.regions)
            .containing(range)
            .ok_or(invalid("not inside one managed region"))?;
        // Device pages lie only where a migration to the device found
        // mappings; bringing them back needs no look at the mappings (an
        // unmapped page has no state, and installing picks MOVE or COPY by
        // what the kernel accepts). Selecting system pages does.
        let vmas = if select.contains(Select::SYSTEM) {
            let vmas = shared
                .procmap()
                .map_err(MmError::from)?
                .covering(range)
                .map_err(MmError::from)?;
            check_vmas(range, &vmas).map_err(invalid)?;
            if !armed {
                shared.arm(region, &vmas)?;
            }
            vmas
        } else {
            Vec::new()
        };
        if !shared.gate.enter(blockable) {
            return Err(MigrateError::Retry { range });
        }
        let notify = NotifierRange {
            range,
            event: NotifyEvent::Migrate,
            owner: Some(owner),
            blockable,
        };
        let guard = match shared.notifiers.invalidate_start(&notify) {
            Ok(g) => g,
            Err(_) => {
                shared.gate.leave();
                return Err(MigrateError::Retry { range });
            }
        };
        let mut m = MigrateVma {
            shared,
            range,
            owner,
            entries: vec![Entry::UNSELECTED; range.npages()],
            run: None,
            copy_install: Vec::with_capacity(range.npages()),
            guard: Some(guard),
            remap_mark: shared.remap_mark(),
            blockable,
            committed: false,
            done: false,
        };
        for addr in range.pages() {
            // Without a look at the mappings: MOVE, falling back to COPY.
            let vma = vma_of(&vmas, addr);
            m.copy_install.push(vma.is_some_and(|v| !movable(v)));
        }
        m.collect(select, &vmas)?;
        Ok(m)
    }

    /// Records the selected pages Migrating and takes them out.
    fn collect(&mut self, select: Select, vmas: &[Vma]) -> Result<(), MigrateError> {
        let owner = self.owner;
        let mut system: Vec<VirtAddr> = Vec::new();
        {
            let mut regions = lock(&self.shared.regions);
            for (i, addr) in self.range.pages().enumerate() {
                let vma = vma_of(vmas, addr);
                let write = vma.is_none_or(|v| v.perms.contains(Prot::WRITE));
                let stored = regions.states.get(addr);
                let src = match (stored, vma) {
                    (Stored::Cpu, Some(vma))
                        if select.contains(Select::SYSTEM) && private(self.shared, vma) =>
                    {
                        system.push(addr);
                        MigrateSrc::System
                    }
                    (Stored::Device(o, pfn), _)
                        if o == owner && select.contains(Select::DEVICE_PRIVATE) =>
                    {
                        MigrateSrc::Device(pfn)
                    }
                    _ => continue,
                };
                if regions.states.set(addr, Stored::Migrating(owner)).is_err() {
                    continue;
                }
                let e = &mut self.entries[i];
                e.src = src;
                e.write = write;
                e.migrate = true;
                e.how = if matches!(src, MigrateSrc::Device(_)) {
                    How::Device
                } else {
                    How::None
                };
            }
        }
        if !system.is_empty() {
            self.isolate(&system, vmas)?;
        }
        Ok(())
    }

    /// Takes the selected system pages out of the CPU page table.
    fn isolate(&mut self, pages: &[VirtAddr], vmas: &[Vma]) -> Result<(), MigrateError> {
        let run = match self
            .shared
            .staging()?
            .alloc(self.range, Want::Empty, self.blockable)
        {
            Ok(run) => run,
            Err(e) => {
                self.unselect_all();
                return Err(e.into());
            }
        };
        self.run = Some(run);
        let staging = self.shared.staging()?;
        for pages in super::pagemap::runs(pages, usize::MAX >> 1) {
            let movable_run = vma_of(vmas, pages.start()).is_some_and(movable)
                && pages.pages().all(|a| vma_of(vmas, a).is_some_and(movable));
            let mut rest = Some(pages);
            if movable_run {
                while let Some(r) = rest {
                    let slots = staging.slots(&run, r);
                    let res = self.shared.move_pages(
                        slots,
                        r.start(),
                        MoveMode::ALLOW_SRC_HOLES | MoveMode::DONTWAKE,
                    );
                    let done = bytes_done(res, r.len());
                    self.mark(r, done, How::Moved);
                    rest = r.tail_from(r.start().checked_add(done).unwrap_or(r.end()));
                    if let Some(stuck) = rest {
                        // The first page that would not move (shared after
                        // a fork, pinned): copy it instead, go on after it.
                        let page = PageRange::new(stuck.start(), PAGE_SIZE)
                            .unwrap_or_else(|_| unreachable!("a page of a valid range"));
                        self.copy_out(page, true);
                        rest = stuck.tail_from(page.end());
                    }
                }
            } else {
                let write = self.entry(pages.start()).write;
                self.copy_out(pages, write);
            }
        }
        self.classify()
    }

    fn index(&self, addr: VirtAddr) -> usize {
        (addr.get() - self.range.start().get()) / PAGE_SIZE
    }

    fn entry(&self, addr: VirtAddr) -> Entry {
        self.entries[self.index(addr)]
    }

    fn mark(&mut self, r: PageRange, done: usize, how: How) {
        for addr in r.pages().take(done / PAGE_SIZE) {
            let i = self.index(addr);
            self.entries[i].how = how;
        }
    }

    /// The copying fallback: write-protect `pages` (if the mapping is
    /// writable) so that CPU writes wait, then copy them into staging.
    /// Pages that cannot be read are not selected.
    fn copy_out(&mut self, pages: PageRange, write: bool) {
        if write && self.shared.uffd.write_protect(pages, true, false).is_err() {
            self.unselect(pages);
            return;
        }
        let Some(run) = self.run else {
            self.unselect(pages);
            return;
        };
        let Ok(staging) = self.shared.staging() else {
            self.unselect(pages);
            return;
        };
        // Only pages with data are read: reading a hole of this (armed)
        // region would fault, and the fault would wait for this migration.
        let mut with_data = vec![false; pages.npages()];
        let mut regions = Vec::new();
        let query = ScanQuery::new()
            .any_of(Categories::PRESENT | Categories::SWAPPED)
            .report(Categories::PFNZERO);
        let scanned = self
            .shared
            .pagemap()
            .map_err(|_| ())
            .and_then(|pm| pm.scan(pages, &query, &mut regions).map_err(|_| ()));
        if scanned.is_err() {
            if write {
                let _ = self.shared.uffd.write_protect(pages, false, true);
            }
            self.unselect(pages);
            return;
        }
        for r in regions {
            if !r.categories.contains(Categories::PFNZERO) {
                for a in r.range.pages() {
                    with_data[(a.get() - pages.start().get()) / PAGE_SIZE] = true;
                }
            }
        }
        let slots = staging.slots(&run, pages);
        // Read through the kernel: a page unmapped meanwhile is an error,
        // not a crash. The slots are ours (see `Staging::pages_mut`).
        let slot_addrs: Vec<VirtAddr> = slots.pages().collect();
        let mut bufs = staging.pages_mut(&slot_addrs);
        let mut ok = true;
        for ((addr, buf), data) in pages.pages().zip(bufs.iter_mut()).zip(with_data) {
            if data && mem::read_process(addr, buf).is_err() {
                ok = false;
                break;
            }
        }
        drop(bufs);
        if ok {
            self.mark(pages, pages.len(), How::Copied);
        } else {
            if write {
                let _ = self.shared.uffd.write_protect(pages, false, true);
            }
            self.unselect(pages);
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

    fn unselect(&mut self, pages: PageRange) {
        let mut regions = lock(&self.shared.regions);
        for addr in pages.pages() {
            let i = self.index(addr);
            if self.entries[i].migrate {
                let _ = regions.states.set(addr, Stored::Cpu);
                self.entries[i] = Entry::UNSELECTED;
            }
        }
    }

    fn unselect_all(&mut self) {
        self.unselect(self.range);
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
        let e = self.entries.get(i)?;
        if !e.migrate || e.src != MigrateSrc::System {
            return None;
        }
        let run = self.run.as_ref()?;
        let staging = self.shared.staging().ok()?;
        let addr = self.range.start().checked_add(i * PAGE_SIZE)?;
        Some(staging.page(staging.slot(run, addr)))
    }

    /// Page `i` goes to device page `pfn`, whose reference the migration
    /// takes (it is freed through the owner's pagemap if the page does not
    /// migrate). Ignored for entries not selected or not from system memory.
    pub fn set_device_dst(&mut self, i: usize, pfn: DevicePfn) {
        if let Some(e) = self.entries.get_mut(i)
            && e.migrate
            && matches!(e.src, MigrateSrc::System | MigrateSrc::Zero)
            && !self.committed
        {
            if let MigrateDst::Device(old) = e.dst {
                self.shared.put_device_page(self.owner, old);
            }
            e.dst = MigrateDst::Device(pfn);
        }
    }

    /// Page `i` does not migrate after all (its dst is dropped). Not for a
    /// page [`move_to_device`](Self::move_to_device) already moved.
    pub fn skip(&mut self, i: usize) {
        if let Some(e) = self.entries.get_mut(i)
            && !self.committed
            && !e.moved_out
        {
            if let MigrateDst::Device(old) = e.dst {
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
        if self.committed {
            return Ok(Vec::new());
        }
        let staging = self.shared.staging()?;
        let run = match self.run {
            Some(r) => r,
            None => {
                let r = staging.alloc(self.range, Want::Fill, self.blockable)?;
                self.run = Some(r);
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
    /// copy ([`src_bytes`](Self::src_bytes)) or skip.
    pub fn move_to_device(&mut self, pages: &[(usize, DevicePfn, VirtAddr)]) -> Vec<usize> {
        let mut done = Vec::with_capacity(pages.len());
        let (Some(run), Ok(staging)) = (self.run, self.shared.staging()) else {
            return done;
        };
        let mut k = 0;
        while k < pages.len() {
            let (i, pfn, to) = pages[k];
            let Some(e) = self.entries.get(i).copied() else {
                k += 1;
                continue;
            };
            if self.committed || !e.migrate || e.how != How::Moved {
                k += 1;
                continue;
            }
            if e.src == MigrateSrc::Zero && !e.zero_pte {
                self.set_device_dst(i, pfn);
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
            let res = self
                .shared
                .move_pages(dst, staging.slot(&run, first), MoveMode::DONTWAKE);
            let moved = bytes_done(res, dst.len()) / PAGE_SIZE;
            for &(j, pfn, to) in &pages[k..k + moved] {
                self.set_device_dst(j, pfn);
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
        if self.committed {
            return;
        }
        for &(i, from) in pages {
            if let Some(e) = self.entries.get_mut(i)
                && e.migrate
                && e.how == How::Device
            {
                e.dst = MigrateDst::SystemFrom(from);
            }
        }
    }

    /// Commits: pages with a dst migrate. Afterwards
    /// [`migrated`](Self::migrated) says which did.
    pub fn pages(&mut self) {
        if self.committed {
            return;
        }
        self.committed = true;
        let to_device: Vec<usize> = self.indices(|e| matches!(e.dst, MigrateDst::Device(_)));
        let to_system: Vec<usize> =
            self.indices(|e| matches!(e.dst, MigrateDst::System | MigrateDst::SystemFrom(_)));
        for e in &mut self.entries {
            if e.dst == MigrateDst::None {
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
        let copied: Vec<VirtAddr> = idx
            .iter()
            .filter(|&&i| self.entries[i].how == How::Copied)
            .map(|&i| self.addr(i))
            .collect();
        for r in super::pagemap::runs(&copied, usize::MAX >> 1) {
            if self.shared.discard_own(r).is_err() {
                for a in r.pages() {
                    let i = self.index(a);
                    self.entries[i].migrate = false;
                }
            }
        }
        let mut regions = lock(&self.shared.regions);
        for &i in idx {
            let e = self.entries[i];
            let MigrateDst::Device(pfn) = e.dst else {
                continue;
            };
            let addr = self.addr(i);
            // Not taken out of the page table, or unmapped meanwhile (the
            // state was dropped): nothing to commit.
            if !e.migrate
                || e.how == How::None
                || regions.states.get(addr) != Stored::Migrating(self.owner)
            {
                self.entries[i].migrate = false;
                continue;
            }
            if regions
                .states
                .set(addr, Stored::Device(self.owner, pfn))
                .is_err()
            {
                self.entries[i].migrate = false;
            }
        }
    }

    fn commit_to_system(&mut self, idx: &[usize]) {
        let staging = self.shared.staging().ok();
        // Where each page's data is: its staging slot, or device memory.
        let source = |me: &Self, i: usize| -> Option<(VirtAddr, bool)> {
            match me.entries[i].dst {
                MigrateDst::SystemFrom(a) => Some((a, true)),
                MigrateDst::System => {
                    let (run, st) = (me.run.as_ref()?, staging?);
                    Some((st.slot(run, me.addr(i)), false))
                }
                _ => None,
            }
        };
        let mut freed = Vec::new();
        let mut k = 0;
        while k < idx.len() {
            let i = idx[k];
            let Some((src, from_device)) = source(self, i) else {
                self.entries[i].migrate = false;
                k += 1;
                continue;
            };
            // A run contiguous at both ends, from the same kind of source.
            let mut n = 1;
            while let Some(&j) = idx.get(k + n) {
                let ok = j == i + n
                    && source(self, j)
                        == Some((VirtAddr::new(src.get() + n * PAGE_SIZE), from_device));
                if !ok {
                    break;
                }
                n += 1;
            }
            let Ok(r) = PageRange::new(self.addr(i), n * PAGE_SIZE) else {
                k += n;
                continue;
            };
            let still = {
                let regions = lock(&self.shared.regions);
                r.pages()
                    .all(|a| regions.states.get(a) == Stored::Migrating(self.owner))
            };
            let done = if still { self.install(r, src) } else { 0 };
            {
                let mut regions = lock(&self.shared.regions);
                for (m, a) in r.pages().enumerate() {
                    let j = self.index(a);
                    if m * PAGE_SIZE < done {
                        let _ = regions.states.set(a, Stored::Cpu);
                        if let MigrateSrc::Device(pfn) = self.entries[j].src {
                            freed.push(pfn);
                        }
                    } else {
                        self.entries[j].migrate = false;
                    }
                }
            }
            // Woken only now, so that a thread that faulted finds the
            // page's state already updated.
            if done > 0
                && let Some(woken) = PageRange::new(r.start(), done).ok()
            {
                let _ = self.shared.uffd.wake(woken);
            }
            k += n;
        }
        for pfn in freed {
            self.shared.put_device_page(self.owner, pfn);
        }
    }

    /// Puts the pages at `src` (staging slots, or device memory) at `r`
    /// (holes there, since every CPU access waits), without waking anyone
    /// yet; returns the bytes done.
    fn install(&self, r: PageRange, src: VirtAddr) -> usize {
        let copy = r.pages().any(|a| self.copy_install[self.index(a)]);
        let res = if copy {
            self.shared.uffd.copy(r, src, CopyMode::DONTWAKE)
        } else {
            // MOVE needs private anonymous read-write memory at both ends;
            // elsewhere (read-only, a private file mapping) the kernel says
            // EINVAL and the pages are copied.
            // (A hole at the source — a device page never written — stays
            // a hole: it reads as zeros.)
            match self
                .shared
                .move_pages(r, src, MoveMode::DONTWAKE | MoveMode::ALLOW_SRC_HOLES)
            {
                Err(OpError::Invalid { .. }) => self.shared.uffd.copy(r, src, CopyMode::DONTWAKE),
                res => res,
            }
        };
        bytes_done(res, r.len())
    }

    /// Whether page `i` migrated (after [`pages`](Self::pages)).
    pub fn migrated(&self, i: usize) -> bool {
        self.committed && self.entries.get(i).is_some_and(|e| e.migrate)
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
        if !self.committed {
            // Never committed (an early return, an error): nothing migrated.
            for e in &mut self.entries {
                e.migrate = false;
            }
        }
        self.committed = true;
        if self.blockable {
            // An mremap that already returned has its event handled (and
            // logged) before the pages are put back.
            self.shared.sync_events();
        }
        let staging = self.shared.staging().ok();
        // Where each page is now: an mremap while the migration ran moved
        // its address (and its Migrating state) elsewhere.
        let moves = self.shared.remaps_since(self.remap_mark);
        let now = |a: VirtAddr| follow(&moves, a);
        // Put back what did not migrate, from wherever its data is: its
        // staging slot, or the device memory it was already moved to.
        let mut unprotect = Vec::new();
        let mut unused_dst = Vec::new();
        let mut back: Vec<(VirtAddr, VirtAddr)> = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            let addr = self.addr(i);
            if e.how == How::Copied {
                unprotect.push(now(addr));
            }
            if e.migrate || e.src == MigrateSrc::None {
                continue;
            }
            let from = match (e.how, e.dev_addr, self.run, staging) {
                (How::Moved, Some(d), _, _) if e.moved_out => Some(d),
                (How::Moved, _, Some(run), Some(st)) => Some(st.slot(&run, addr)),
                _ => None,
            };
            if let Some(from) = from {
                back.push((now(addr), from));
            }
        }
        let mut restored = Vec::new();
        let mut k = 0;
        while k < back.len() {
            let (to, from) = back[k];
            let mut n = 1;
            while back.get(k + n).is_some_and(|&(t, f)| {
                t.get() == to.get() + n * PAGE_SIZE && f.get() == from.get() + n * PAGE_SIZE
            }) {
                n += 1;
            }
            if let Ok(r) = PageRange::new(to, n * PAGE_SIZE) {
                let res = self.shared.move_pages(r, from, MoveMode::ALLOW_SRC_HOLES);
                let done = bytes_done(res, r.len());
                restored.extend(r.pages().take(done / PAGE_SIZE));
            }
            k += n;
        }
        {
            let mut regions = lock(&self.shared.regions);
            for (i, e) in self.entries.iter().enumerate() {
                if e.migrate || e.src == MigrateSrc::None {
                    continue;
                }
                let addr = now(self.addr(i));
                if regions.states.get(addr) != Stored::Migrating(self.owner) {
                    continue;
                }
                let state = match e.src {
                    MigrateSrc::Device(pfn) => Stored::Device(self.owner, pfn),
                    _ => Stored::Cpu,
                };
                let _ = regions.states.set(addr, state);
            }
        }
        for r in super::pagemap::runs(&unprotect, usize::MAX >> 1) {
            let _ = self.shared.uffd.write_protect(r, false, true);
        }
        // A device page that got its data but did not migrate is unused,
        // unless its data could not be moved back (then it is kept: losing
        // a page of device memory beats losing the data).
        for (i, e) in self.entries.iter().enumerate() {
            if let (false, MigrateDst::Device(pfn)) = (e.migrate, e.dst) {
                let stranded =
                    e.moved_out && e.dev_addr.is_some() && !restored.contains(&now(self.addr(i)));
                if !stranded {
                    unused_dst.push(pfn);
                }
            }
        }
        for pfn in unused_dst {
            self.shared.put_device_page(self.owner, pfn);
        }
        if let (Some(run), Some(staging)) = (self.run.take(), staging) {
            // Whether pages are left in the run, as the page table says
            // (what did not come home, or stayed after a copy).
            let span = run.span();
            let mut left = Vec::new();
            let query = ScanQuery::new()
                .any_of(Categories::PRESENT | Categories::SWAPPED)
                .max_pages(1);
            let dirty = self
                .shared
                .pagemap()
                .ok()
                .and_then(|pm| pm.scan(staging.slots(&run, span), &query, &mut left).ok())
                .is_none_or(|_| !left.is_empty());
            staging.free(run, dirty, self.blockable);
        }
        // End the invalidation, let the fork gate go, and have the service
        // look at the faults that waited for these pages.
        self.guard.take();
        self.shared.gate.leave();
        self.shared.poke();
    }
}

/// Where `addr` is after the mremaps in `moves` (in order).
fn follow(moves: &[(PageRange, VirtAddr)], mut addr: VirtAddr) -> VirtAddr {
    for &(old, to) in moves {
        if old.contains(addr) {
            addr = VirtAddr::new(to.get() + (addr.get() - old.start().get()));
        }
    }
    addr
}

impl Drop for MigrateVma<'_> {
    fn drop(&mut self) {
        self.finish();
    }
}

/// How many bytes of a `len`-byte resolve ioctl were done (a stop or an
/// error ends it where it stopped).
pub(crate) fn bytes_done(res: Result<Progress, OpError>, len: usize) -> usize {
    match res {
        Ok(p) if p.is_complete() => len,
        Ok(p) => p.done,
        Err(_) => 0,
    }
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
