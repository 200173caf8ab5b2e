//! `range_fault`: snapshot the CPU page table over a range, faulting pages
//! in where the device asks (the kernel's `hmm_range_fault`).
//!
//! Each page gets an [`HmmPfn`]: on input the request (`REQ_FAULT`,
//! `REQ_WRITE`), on output what the CPU page table says (`VALID`, `WRITE`,
//! `ERROR`, `ZERO`, and the order of the mapping, 9 for every 4 KiB slot of
//! a 2 MiB THP or hugetlb page). The effective request for a page is
//! `(pfns[i] & pfn_flags_mask) | default_flags`:
//!
//! - snapshot: `default_flags = 0`, `pfn_flags_mask = 0`;
//! - fault everything readable: `default_flags = REQ_FAULT`;
//! - per-page writes: `default_flags = REQ_FAULT`, `pfn_flags_mask =
//!   REQ_WRITE`, and `REQ_WRITE` in the chosen entries.
//!
//! How it is done in userspace: the mappings come from `PROCMAP_QUERY`, the
//! page states from `PAGEMAP_SCAN` (present, zero page, huge, write-protected)
//! and `/proc/self/pagemap` (whether a private page is exclusive, i.e. not
//! copy-on-write shared after a fork, which is what makes it writable), and
//! faults are taken with `MADV_POPULATE_READ/WRITE` on the calling thread —
//! never on the fault service.
//!
//! The output is a snapshot: use it under the device's lock after
//! [`IntervalNotifier::read_retry`] said no invalidation raced with it.

use super::notifier::IntervalNotifier;
use super::service::lock;
use super::state::Stored;
use super::{ForkedChild, Mm, Owner};
use crate::addr::{DevicePfn, PAGE_SHIFT, PAGE_SIZE, PageRange, VirtAddr};
use crate::sys::mem::{MemError, Prot};
use crate::sys::pagemap::{Categories, Pagemap, PagemapError, ScanQuery};
use crate::sys::procmap::{Procmap, ProcmapError, Vma, VmaKind};
use rustix::io::Errno;
use std::fmt;

/// One page's entry: request flags on input, CPU page-table state on output.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct HmmPfn(u64);

impl HmmPfn {
    /// Output: the page is mapped and at least readable.
    pub const VALID: HmmPfn = HmmPfn(1 << 63);
    /// Output: the page is writable (only with `VALID`): its mapping allows
    /// writes, uhmm has not write-protected it, and it is not shared
    /// copy-on-write with another process. One difference from the kernel:
    /// once the process it was shared with has exited, the page counts as
    /// writable, where the kernel's page table stays read-only until the
    /// next write fault; a device writing through the fault-tolerant
    /// accessor takes that fault itself and sees no difference.
    pub const WRITE: HmmPfn = HmmPfn(1 << 62);
    /// Output: the page cannot be accessed (no mapping, `PROT_NONE`, a
    /// special mapping); the device must fail the access.
    pub const ERROR: HmmPfn = HmmPfn(1 << 61);
    /// Output: the page is the shared zero page (read-only).
    pub const ZERO: HmmPfn = HmmPfn(1 << 60);
    /// Output: the page is in device memory of the range's
    /// `dev_private_owner`, at [`device_pfn`](Self::device_pfn) (with
    /// `VALID`).
    pub const DEVICE_PRIVATE: HmmPfn = HmmPfn(1 << 59);
    /// Input: fault the page in if it is not valid (the same bit as `VALID`).
    pub const REQ_FAULT: HmmPfn = HmmPfn::VALID;
    /// Input: fault the page in writable (the same bit as `WRITE`; only
    /// with `REQ_FAULT`).
    pub const REQ_WRITE: HmmPfn = HmmPfn::WRITE;
    /// No flag: on output, "not present, but faultable".
    pub const NONE: HmmPfn = HmmPfn(0);

    const ORDER_SHIFT: u32 = 53;
    const ORDER_MASK: u64 = 0x1f;
    const PFN_MASK: u64 = (1 << 46) - 1;

    /// The entry of a device-private page of the requesting owner.
    pub const fn device_private(pfn: DevicePfn, write: bool) -> HmmPfn {
        let w = if write { Self::WRITE.0 } else { 0 };
        HmmPfn(Self::VALID.0 | Self::DEVICE_PRIVATE.0 | w | (pfn.0 & Self::PFN_MASK))
    }

    /// The device page, for a `DEVICE_PRIVATE` entry.
    pub const fn device_pfn(self) -> Option<DevicePfn> {
        if self.contains(Self::DEVICE_PRIVATE) {
            Some(DevicePfn(self.0 & Self::PFN_MASK))
        } else {
            None
        }
    }

    /// The raw bits.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: HmmPfn) -> bool {
        self.0 & other.0 == other.0
    }

    /// log2 of the CPU mapping's size in pages (0 for 4 KiB, 9 for 2 MiB).
    pub const fn order(self) -> u32 {
        ((self.0 >> Self::ORDER_SHIFT) & Self::ORDER_MASK) as u32
    }

    /// The same entry with the mapping order `order`.
    pub const fn with_order(self, order: u32) -> HmmPfn {
        HmmPfn(
            (self.0 & !(Self::ORDER_MASK << Self::ORDER_SHIFT))
                | ((order as u64 & Self::ORDER_MASK) << Self::ORDER_SHIFT),
        )
    }
}

impl std::ops::BitOr for HmmPfn {
    type Output = HmmPfn;
    fn bitor(self, rhs: HmmPfn) -> HmmPfn {
        HmmPfn(self.0 | rhs.0)
    }
}

impl std::ops::BitAnd for HmmPfn {
    type Output = HmmPfn;
    fn bitand(self, rhs: HmmPfn) -> HmmPfn {
        HmmPfn(self.0 & rhs.0)
    }
}

impl fmt::Debug for HmmPfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        for (name, flag) in [
            ("VALID", Self::VALID),
            ("WRITE", Self::WRITE),
            ("ERROR", Self::ERROR),
            ("ZERO", Self::ZERO),
            ("DEVICE_PRIVATE", Self::DEVICE_PRIVATE),
        ] {
            if self.contains(flag) {
                parts.push(name.to_string());
            }
        }
        if self.order() != 0 {
            parts.push(format!("order {}", self.order()));
        }
        if parts.is_empty() {
            parts.push("NONE".into());
        }
        write!(f, "HmmPfn({})", parts.join("|"))
    }
}

/// A `range_fault` request: the range, how to fault it, and the entries.
#[derive(Debug)]
pub struct HmmRange<'a> {
    /// The notifier the device mirrors the range under.
    pub notifier: &'a IntervalNotifier,
    /// What [`IntervalNotifier::read_begin`] returned.
    pub notifier_seq: u64,
    /// The pages.
    pub range: PageRange,
    /// Request flags for every page.
    pub default_flags: HmmPfn,
    /// Which per-entry request bits are honoured.
    pub pfn_flags_mask: HmmPfn,
    /// One entry per page of `range`: requests in, states out.
    pub pfns: Vec<HmmPfn>,
    /// Device-private pages of this owner are reported
    /// ([`HmmPfn::DEVICE_PRIVATE`]) instead of faulted back; those of other
    /// owners are faulted back (migrated to system memory) when a fault is
    /// requested.
    pub dev_private_owner: Option<Owner>,
}

impl<'a> HmmRange<'a> {
    /// A snapshot request for `range` (no faulting), with `pfns` zeroed.
    pub fn new(notifier: &'a IntervalNotifier, notifier_seq: u64, range: PageRange) -> Self {
        Self {
            notifier,
            notifier_seq,
            range,
            default_flags: HmmPfn::NONE,
            pfn_flags_mask: HmmPfn::NONE,
            pfns: vec![HmmPfn::NONE; range.npages()],
            dev_private_owner: None,
        }
    }
}

/// Why `range_fault` failed.
#[derive(Debug, thiserror::Error)]
pub enum RangeFaultError {
    /// An invalidation hit the range: call `read_begin` again and retry.
    #[error("{range} was invalidated during range_fault; read_begin again and retry")]
    Busy {
        /// The range.
        range: PageRange,
    },
    /// A page asked to be faulted cannot be made valid (no mapping,
    /// `PROT_NONE`, a special mapping, or the fault failed).
    #[error("page {addr} cannot be faulted in: {reason}")]
    Fault {
        /// The page.
        addr: VirtAddr,
        /// Why.
        reason: &'static str,
    },
    /// A write was asked for on a read-only mapping.
    #[error("page {addr} is read-only; a write was requested")]
    PermissionDenied {
        /// The page.
        addr: VirtAddr,
    },
    /// `pfns` does not have one entry per page.
    #[error("{range} has {npages} pages but pfns has {len} entries")]
    BadLength {
        /// The range.
        range: PageRange,
        /// Pages in it.
        npages: usize,
        /// Entries given.
        len: usize,
    },
    /// The range is not inside the notifier's interval, or the notifier
    /// is not one of this address space's: the device would not be told of
    /// changes there, so nothing it mirrored could be kept coherent.
    #[error("{range} is not covered by the notifier ({notifier}) of this address space")]
    OutsideNotifier {
        /// The range asked for.
        range: PageRange,
        /// The notifier's interval.
        notifier: PageRange,
    },
    /// The pages could not be faulted in for want of memory.
    #[error("out of memory faulting {range} in")]
    NoMemory {
        /// The pages being faulted.
        range: PageRange,
    },
    /// The page table could not be read.
    #[error(transparent)]
    Pagemap(#[from] PagemapError),
    /// The mappings could not be read.
    #[error(transparent)]
    Procmap(#[from] ProcmapError),
    /// Called in a forked child on an `Mm` its parent made.
    #[error(transparent)]
    ForkedChild(#[from] ForkedChild),
}

/// A device's own page-table entry format: `range_fault` hands each entry
/// to the device already encoded (the seed series' "use device driver
/// encoding for HMM pfn").
pub trait PfnEncoding {
    /// The device's entry type.
    type Entry;
    /// Encodes the entry of the page at `addr`.
    fn encode(&self, addr: VirtAddr, pfn: HmmPfn) -> Self::Entry;
}

// Bit 56 of a /proc/self/pagemap entry: the page is mapped exclusively.
const PM_MMAP_EXCLUSIVE: u64 = 1 << 56;
// Bit 61: a file (page-cache) or shared-anonymous page. In a private
// mapping such a page is read-only until a write copies it.
const PM_FILE: u64 = 1 << 61;

/// Gives up after this many fault-and-rewalk rounds (each faults every
/// missing page it found, so more than a few means the range keeps being
/// zapped under us).
const MAX_ROUNDS: usize = 16;

impl Mm {
    /// Snapshots `r.range` into `r.pfns`, faulting in the pages the request
    /// flags ask for, on the calling thread.
    ///
    /// # Errors
    ///
    /// [`RangeFaultError::Busy`]: an invalidation raced — `read_begin` and
    /// retry. [`RangeFaultError::Fault`]: a requested page cannot be made
    /// valid — fail the device access. [`RangeFaultError::PermissionDenied`]:
    /// a write to read-only memory — fail it.
    /// [`RangeFaultError::OutsideNotifier`] and
    /// [`RangeFaultError::BadLength`]: the request itself is wrong.
    /// [`RangeFaultError::ForkedChild`]: called in a forked child. Entries
    /// are only written on success.
    pub fn range_fault(&self, r: &mut HmmRange<'_>) -> Result<(), RangeFaultError> {
        self.check_process()?;
        let range = r.range;
        if r.pfns.len() != range.npages() {
            return Err(RangeFaultError::BadLength {
                range,
                npages: range.npages(),
                len: r.pfns.len(),
            });
        }
        let covered = r.notifier.range();
        if !r.notifier.is_in(&self.inner.shared.notifiers)
            || range.start() < covered.start()
            || range.end() > covered.end()
        {
            return Err(RangeFaultError::OutsideNotifier {
                range,
                notifier: covered,
            });
        }
        // Discards and unmaps already returned to their callers are
        // handled (states dropped, devices told) before the table is read.
        self.inner.shared.sync_events();
        let maps = self.inner.shared.procmap()?;
        let pagemap = self.inner.shared.pagemap()?;
        for _ in 0..MAX_ROUNDS {
            if r.notifier.read_retry(r.notifier_seq) {
                return Err(RangeFaultError::Busy { range });
            }
            let vmas = maps.covering(range)?;
            let mut cpu = snapshot(pagemap, range, &vmas)?;
            if let Some(owner) = r.dev_private_owner {
                let stored = lock(&self.inner.shared.regions).states.entries(range);
                for (addr, st) in stored {
                    if let Stored::Device(o, pfn) = st
                        && o == owner
                    {
                        let write = vmas
                            .iter()
                            .find(|v| v.range.contains(addr))
                            .is_some_and(|v| v.perms.contains(Prot::WRITE));
                        let i = (addr.get() - range.start().get()) / PAGE_SIZE;
                        cpu[i] = HmmPfn::device_private(pfn, write);
                    }
                }
                self.mark_huge_device_pages(owner, range, &mut cpu)?;
            }
            let mut out = Vec::with_capacity(range.npages());
            let mut faults: Vec<(PageRange, bool)> = Vec::new();
            for (i, (&state, addr)) in cpu.iter().zip(range.pages()).enumerate() {
                let req = (r.pfns[i] & r.pfn_flags_mask) | r.default_flags;
                let want = req.contains(HmmPfn::REQ_FAULT);
                let want_write = want && req.contains(HmmPfn::REQ_WRITE);
                let vma = vmas.iter().find(|v| v.range.contains(addr));
                let accessible = vma
                    .is_some_and(|v| v.perms.contains(Prot::READ) && v.kind() != VmaKind::Special);
                if !accessible {
                    if want {
                        let reason = if vma.is_none() {
                            "no mapping"
                        } else {
                            "not readable or a special mapping"
                        };
                        return Err(RangeFaultError::Fault { addr, reason });
                    }
                    out.push(HmmPfn::ERROR);
                    continue;
                }
                if want_write && !vma.is_some_and(|v| v.perms.contains(Prot::WRITE)) {
                    return Err(RangeFaultError::PermissionDenied { addr });
                }
                let valid = state.contains(HmmPfn::VALID);
                if (want && !valid) || (want_write && !state.contains(HmmPfn::WRITE)) {
                    push_fault(&mut faults, addr, want_write);
                }
                out.push(state);
            }
            if faults.is_empty() {
                r.pfns = out;
                return Ok(());
            }
            for (pages, write) in faults {
                if let Err(e) = self.inner.shared.fault_in(pages, write) {
                    // ENOMEM also means "part of the range is not mapped":
                    // the layout changed under us (it may be mapped again
                    // by now, but then it is other memory, not managed).
                    // Walk again; the next round reports what is missing.
                    if is_nomem(&e) && (!fully_mapped(maps, pages)? || !self.is_managed(pages)) {
                        break;
                    }
                    return Err(fault_error(e, pages));
                }
            }
        }
        Err(RangeFaultError::Busy { range })
    }

    /// Reports at PMD order (9) the device entries of `range` that lie in a
    /// 2 MiB device page of `owner` mapped whole: a 2 MiB-aligned virtual
    /// block, inside one mapping, whose pages name the pages of one
    /// unsplit [`alloc_huge`](crate::devmem::DevicePagemap::alloc_huge)
    /// page in order (the kernel reports a device-private THP's entries at
    /// its folio's order).
    fn mark_huge_device_pages(
        &self,
        owner: super::Owner,
        range: PageRange,
        cpu: &mut [HmmPfn],
    ) -> Result<(), RangeFaultError> {
        use crate::devmem::pagemap::HUGE_PAGES;
        const HUGE: usize = HUGE_PAGES * PAGE_SIZE;
        let Some(pm) = self.inner.shared.device_pagemap(owner) else {
            return Ok(());
        };
        let mut at = range.start().align_down(HUGE);
        while at < range.end() {
            let Ok(block) = PageRange::new(at, HUGE) else {
                break;
            };
            at = block.end();
            let first =
                (block.start().get().max(range.start().get()) - range.start().get()) / PAGE_SIZE;
            if cpu.get(first).is_none_or(|e| e.device_pfn().is_none()) {
                continue;
            }
            // The states under the regions lock, then the pool's view with
            // it let go (the pool's lock is taken before the regions lock
            // where both are: a device's `add_chunk` may ask `device_page`).
            // A change between the two moves the notifier's sequence, which
            // the caller checks before it uses the entries.
            let head = {
                let regions = lock(&self.inner.shared.regions);
                let head = match regions.states.get(block.start()) {
                    Stored::Device(o, pfn) if o == owner && pfn.0 % HUGE_PAGES as u64 == 0 => pfn,
                    _ => continue,
                };
                let in_order = block.pages().enumerate().all(|(k, a)| {
                    regions.states.get(a) == Stored::Device(owner, DevicePfn(head.0 + k as u64))
                });
                if !in_order || regions.containing(block).is_none() {
                    continue;
                }
                head
            };
            if !pm.is_huge(head) {
                continue;
            }
            let vmas = self.inner.shared.procmap()?.covering(block)?;
            if vmas.len() != 1 || !vmas[0].range.contains_range(block) {
                continue;
            }
            let last = (block.end().get().min(range.end().get()) - range.start().get()) / PAGE_SIZE;
            for e in &mut cpu[first..last] {
                *e = e.with_order(9);
            }
        }
        Ok(())
    }

    /// [`range_fault`](Self::range_fault), then each entry encoded in the
    /// device's format into `out` (cleared first).
    pub fn range_fault_encoded<E: PfnEncoding>(
        &self,
        r: &mut HmmRange<'_>,
        encoding: &E,
        out: &mut Vec<E::Entry>,
    ) -> Result<(), RangeFaultError> {
        self.range_fault(r)?;
        out.clear();
        out.extend(
            r.range
                .pages()
                .zip(&r.pfns)
                .map(|(addr, &pfn)| encoding.encode(addr, pfn)),
        );
        Ok(())
    }
}

fn push_fault(faults: &mut Vec<(PageRange, bool)>, addr: VirtAddr, write: bool) {
    if let Some((last, w)) = faults.last_mut()
        && *w == write
        && last.end() == addr
        && let Ok(grown) = PageRange::new(last.start(), last.len() + PAGE_SIZE)
    {
        *last = grown;
        return;
    }
    if let Ok(page) = PageRange::new(addr, PAGE_SIZE) {
        faults.push((page, write));
    }
}

fn is_nomem(e: &MemError) -> bool {
    matches!(
        e,
        MemError::Advise {
            errno: Errno::NOMEM,
            ..
        }
    )
}

/// Whether mappings cover every page of `pages` now.
fn fully_mapped(maps: &Procmap, pages: PageRange) -> Result<bool, RangeFaultError> {
    let covered: usize = maps
        .covering(pages)?
        .iter()
        .filter_map(|v| v.range.intersection(pages))
        .map(PageRange::len)
        .sum();
    Ok(covered == pages.len())
}

fn fault_error(e: MemError, pages: PageRange) -> RangeFaultError {
    match e {
        e if is_nomem(&e) => RangeFaultError::NoMemory { range: pages },
        _ => RangeFaultError::Fault {
            addr: pages.start(),
            reason: "the fault failed",
        },
    }
}

/// The CPU state of every page of `range` as output entries.
fn snapshot(
    pagemap: &Pagemap,
    range: PageRange,
    vmas: &[Vma],
) -> Result<Vec<HmmPfn>, RangeFaultError> {
    let report = Categories::PRESENT | Categories::PFNZERO | Categories::HUGE | Categories::WRITTEN;
    let mut regions = Vec::new();
    pagemap.scan(
        range,
        &ScanQuery::new().require(Categories::PRESENT).report(report),
        &mut regions,
    )?;
    let mut states = vec![HmmPfn::NONE; range.npages()];
    let mut exclusive: Vec<u64> = Vec::new();
    // PAGEMAP_SCAN merges pages of equal categories across mappings: each
    // part of a region gets the permissions of its own mapping.
    let parts = regions.iter().flat_map(|region| {
        vmas.iter().filter_map(move |vma| {
            let part = region.range.intersection(vma.range)?;
            Some((part, region.categories, vma))
        })
    });
    for (part, c, vma) in parts {
        let order = if c.contains(Categories::HUGE) {
            (vma.page_size.max(2 << 20) >> PAGE_SHIFT).trailing_zeros()
        } else {
            0
        };
        // Private memory is writable only where the page is exclusively
        // ours: not copy-on-write shared after a fork, and not a file page
        // the mapping has only read.
        let private = !vma.shared;
        if private && !c.contains(Categories::PFNZERO) {
            exclusive.clear();
            pagemap.entries(part, &mut exclusive)?;
        }
        for (j, _) in part.pages().enumerate() {
            let i = (part.start().get() - range.start().get()) / PAGE_SIZE + j;
            let mut s = HmmPfn::VALID.with_order(order);
            if c.contains(Categories::PFNZERO) {
                s = s | HmmPfn::ZERO;
            } else {
                let writable_vma = vma.perms.contains(Prot::WRITE);
                let not_wp = c.contains(Categories::WRITTEN);
                let exclusive_page = !private
                    || exclusive
                        .get(j)
                        .is_some_and(|e| e & PM_MMAP_EXCLUSIVE != 0 && e & PM_FILE == 0);
                if writable_vma && not_wp && exclusive_page {
                    s = s | HmmPfn::WRITE;
                }
            }
            if let Some(slot) = states.get_mut(i) {
                *slot = s;
            }
        }
    }
    Ok(states)
}
