//! [`DevicePagemap`]: the device memory of one owner (the kernel's
//! `dev_pagemap` of type `MEMORY_DEVICE_PRIVATE`).

use super::migrate::{MigrateError, MigrateVma, Select};
use crate::addr::{DevicePfn, PAGE_SIZE, PageRange, VirtAddr};
use crate::mm::callback::call;
use crate::mm::regions::Regions;
use crate::mm::service::Shared;
use crate::mm::state::Stored;
use crate::mm::{ForkedChild, Mm, MmError, Owner, lock_poisoned as lock};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a device does for its device memory (the kernel's
/// `dev_pagemap_ops`).
pub trait DevicePagemapOps: Send + Sync + fmt::Debug {
    /// The last reference to device page `pfn` went (its virtual page was
    /// unmapped, discarded, or migrated back): the device may reuse it.
    /// Runs on whichever thread dropped that reference (the fault service
    /// included), with no uhmm lock held; it must not block on the device's
    /// own migration paths. If it panics, the panic is contained and the
    /// page is never handed out again.
    fn page_free(&self, pfn: DevicePfn);

    /// A CPU access touched device-resident pages: migrate the pages of
    /// this owner in `fault.range()` back to system memory, with
    /// [`DeviceFault::migrate`] and the device's copy engine. Called by the
    /// fault service (then `fault.blockable()` is false: do not wait for
    /// locks a faulting thread may hold; return [`FaultError::Retry`]
    /// instead), and by eviction and fork (blockable).
    ///
    /// # Errors
    ///
    /// [`FaultError::Retry`] to be called again shortly;
    /// [`FaultError::Device`] or [`FaultError::NoMemory`] when the pages
    /// cannot come back. A CPU fault is served again while its device
    /// fails it, within bounds: after 8 failed calls in a row, or 1 s of
    /// failing every call, whichever comes first (a panic counts as a
    /// failure; a `Retry` or an `Ok` between two failures ends the run),
    /// or after 10 s of `Retry` (or of `Ok` with the faulting page still on
    /// the device), the access fails as the kernel's `VM_FAULT_SIGBUS`
    /// makes it fail (once the access is known to wait: its page is
    /// woken first, and its fault, made again, fails once more): the
    /// faulting page is poisoned, so the thread gets
    /// SIGBUS (a system call reading it, EFAULT) and so does any later
    /// access; its device page is freed, and
    /// [`MmStats::faults_sigbus`](crate::mm::MmStats::faults_sigbus) counts
    /// it. Never zeros, never an endless wait. Eviction
    /// ([`DevicePagemap::evict_all`]) retries for 10 s.
    ///
    /// # Panics
    ///
    /// A panic here (as in every device callback) is caught, counted in
    /// [`MmStats::callback_panics`](crate::mm::MmStats::callback_panics)
    /// and treated as [`FaultError::Device`]; the fault service goes on.
    fn migrate_to_ram(&self, fault: &DeviceFault<'_>) -> Result<(), FaultError>;

    /// Device pages `first .. first + npages` are about to be handed out
    /// for the first time (the pagemap grows by a chunk): make their
    /// backing ready.
    ///
    /// # Errors
    ///
    /// [`DevmemError::Grow`] if the device cannot back them; the
    /// allocation that needed them fails with it.
    fn add_chunk(&self, first: DevicePfn, npages: usize) -> Result<(), DevmemError> {
        let _ = (first, npages);
        Ok(())
    }
}

/// Why bringing device pages back failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultError {
    /// Try again later (a lock was busy and the caller cannot block).
    #[error("retry later")]
    Retry,
    /// No system memory for the pages.
    #[error("out of memory")]
    NoMemory,
    /// The device failed (the kernel's `VM_FAULT_SIGBUS`).
    #[error("device failure: {0}")]
    Device(String),
    /// Called in a forked child on device memory its parent made
    /// ([`DevicePagemap::evict_all`]).
    #[error(transparent)]
    ForkedChild(#[from] ForkedChild),
}

impl From<MigrateError> for FaultError {
    /// What passes (a busy device or fork, staging full for now, the
    /// address space naming too many devices for now, a range split by an
    /// unmap meanwhile) is `Retry`; the rest is a device failure.
    fn from(e: MigrateError) -> Self {
        match e {
            MigrateError::Mm(MmError::ForkedChild(f)) => FaultError::ForkedChild(f),
            MigrateError::Retry { .. }
            | MigrateError::Staging(_)
            | MigrateError::Mm(_)
            | MigrateError::InvalidRange { .. } => FaultError::Retry,
            e => FaultError::Device(e.to_string()),
        }
    }
}

/// Why device memory could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DevmemError {
    /// Every page of every chunk the pagemap may have is in use.
    #[error("device memory exhausted: {in_use} of {capacity} pages in use ({wanted} more wanted)")]
    Exhausted {
        /// Pages in use.
        in_use: usize,
        /// Pages the pagemap may ever have.
        capacity: usize,
        /// Pages asked for.
        wanted: usize,
    },
    /// The device could not back a new chunk.
    #[error("the device could not add a chunk of memory: {reason}")]
    Grow {
        /// Why.
        reason: String,
    },
    /// `DevicePfn` given that this pagemap never handed out, or that has
    /// been freed (a second `put` of the same page, say).
    #[error("{pfn} is not an allocated page of this pagemap")]
    BadPfn {
        /// The page.
        pfn: DevicePfn,
    },
    /// The owner has device memory already in this address space: an
    /// owner's device pages are found through exactly one pagemap.
    #[error("{owner:?} already has a DevicePagemap in this address space")]
    OwnerTaken {
        /// The owner.
        owner: Owner,
    },
    /// A [`PagemapConfig`] out of bounds.
    #[error("bad PagemapConfig: {reason}")]
    BadConfig {
        /// What is wrong, with the bound.
        reason: String,
    },
    /// Called in a forked child on an `Mm`, or device memory, its parent
    /// made.
    #[error(transparent)]
    ForkedChild(#[from] ForkedChild),
}

/// How a [`DevicePagemap`] grows: by chunks of `chunk_pages` pages (of
/// [`PAGE_SIZE`] bytes each), up to `max_chunks` chunks.
///
/// ```
/// use uhmm::devmem::PagemapConfig;
///
/// // 1 GiB of device memory in 64 MiB chunks.
/// let cfg = PagemapConfig::from_bytes(64 << 20, 1 << 30)?;
/// assert_eq!((cfg.chunk_pages, cfg.max_chunks), (16384, 16));
/// # Ok::<(), uhmm::devmem::DevmemError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagemapConfig {
    /// Pages (not bytes) per chunk, 1 to [`MAX_CHUNK_PAGES`](Self::MAX_CHUNK_PAGES)
    /// (the kernel's test driver uses 256 MiB chunks: 65,536 pages).
    pub chunk_pages: usize,
    /// Chunks at most, at least 1: the device's memory size is
    /// `chunk_pages * max_chunks` pages, at most
    /// [`MAX_PAGES`](Self::MAX_PAGES).
    pub max_chunks: usize,
}

impl PagemapConfig {
    /// The largest chunk: 1 GiB. (A chunk's bookkeeping is made when it
    /// is added, 12 bytes a page.)
    pub const MAX_CHUNK_PAGES: usize = (1 << 30) / PAGE_SIZE;
    /// The most device memory a pagemap may name: 2^47 bytes (128 TiB, a
    /// 47-bit address space's worth).
    pub const MAX_PAGES: usize = (1 << 47) / PAGE_SIZE;

    /// `total_bytes` of device memory in chunks of `chunk_bytes` (both
    /// multiples of [`PAGE_SIZE`], `total_bytes` of `chunk_bytes`).
    ///
    /// # Errors
    ///
    /// [`DevmemError::BadConfig`] if a size is not such a multiple, or out
    /// of the bounds of [`validate`](Self::validate).
    pub fn from_bytes(chunk_bytes: usize, total_bytes: usize) -> Result<Self, DevmemError> {
        let bad = |reason: String| Err(DevmemError::BadConfig { reason });
        if chunk_bytes == 0 || chunk_bytes % PAGE_SIZE != 0 {
            return bad(format!(
                "chunk of {chunk_bytes} bytes: must be a non-zero multiple of {PAGE_SIZE} bytes"
            ));
        }
        if total_bytes == 0 || total_bytes % chunk_bytes != 0 {
            return bad(format!(
                "{total_bytes} bytes of device memory: must be a non-zero multiple of the chunk ({chunk_bytes} bytes)"
            ));
        }
        let cfg = Self {
            chunk_pages: chunk_bytes / PAGE_SIZE,
            max_chunks: total_bytes / chunk_bytes,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the bounds: `chunk_pages` from 1 to
    /// [`MAX_CHUNK_PAGES`](Self::MAX_CHUNK_PAGES), `max_chunks` at least 1,
    /// and `chunk_pages * max_chunks` at most [`MAX_PAGES`](Self::MAX_PAGES).
    ///
    /// # Errors
    ///
    /// [`DevmemError::BadConfig`], saying which bound and by how much.
    pub fn validate(&self) -> Result<(), DevmemError> {
        let bad = |reason: String| Err(DevmemError::BadConfig { reason });
        let (cp, mc) = (self.chunk_pages, self.max_chunks);
        if cp == 0 || mc == 0 {
            return bad(format!(
                "chunk_pages ({cp}) and max_chunks ({mc}) must be at least 1"
            ));
        }
        if cp > Self::MAX_CHUNK_PAGES {
            return bad(format!(
                "chunk_pages is {cp} pages ({} bytes each): at most {} pages (a 1 GiB chunk) — was a size in bytes given?",
                PAGE_SIZE,
                Self::MAX_CHUNK_PAGES
            ));
        }
        match cp.checked_mul(mc) {
            Some(total) if total <= Self::MAX_PAGES => Ok(()),
            _ => bad(format!(
                "chunk_pages * max_chunks ({cp} * {mc}) pages: at most {} pages (128 TiB)",
                Self::MAX_PAGES
            )),
        }
    }
}

impl Default for PagemapConfig {
    fn default() -> Self {
        Self {
            chunk_pages: (256 << 20) / PAGE_SIZE,
            max_chunks: 64,
        }
    }
}

/// What a pagemap has counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PagemapStats {
    /// Chunks added.
    pub chunks: usize,
    /// Device pages in use (referenced).
    pub in_use: usize,
    /// Pages allocated, ever.
    pub allocated: u64,
    /// Pages freed (`page_free`), ever.
    pub freed: u64,
    /// Pages brought back by CPU faults and evictions.
    pub faulted_back: u64,
    /// 2 MiB device pages in use and not split
    /// ([`DevicePagemap::alloc_huge`]).
    pub huge_pages: usize,
}

#[derive(Debug, Default)]
struct Pool {
    refs: Vec<u32>,
    /// Free pages, one by one (popped from the end).
    free: Vec<u64>,
    /// First pages of wholly free, aligned blocks of [`HUGE_PAGES`] pages
    /// (in chunks that are a whole number of such blocks), kept whole for
    /// 2 MiB device pages; single pages are cut from them when `free` runs
    /// out.
    free_huge: Vec<u64>,
    /// Per block of [`HUGE_PAGES`] pages: handed out as one 2 MiB device
    /// page and not split since (a partial free splits it, as the kernel
    /// splits a folio).
    huge: Vec<bool>,
    /// Per such huge block: its pages still referenced.
    live: Vec<u32>,
    /// Per block: its pages in `free`.
    nfree: Vec<u32>,
    chunks: usize,
    in_use: usize,
}

/// The pages of a 2 MiB device page (order 9).
pub const HUGE_PAGES: usize = 512;

impl Pool {
    /// Drops one reference to `pfn`: `Some(true)` if it was the last,
    /// `Some(false)` if not, `None` if the page is not in use.
    fn unref(&mut self, pfn: DevicePfn) -> Option<bool> {
        let r = self.refs.get_mut(pfn.0 as usize).filter(|r| **r > 0)?;
        *r -= 1;
        let last = *r == 0;
        if last && let Some(l) = self.live.get_mut(pfn.0 as usize / HUGE_PAGES) {
            *l = l.saturating_sub(1);
        }
        Some(last)
    }

    /// Decides, under the same lock as the references to `last` were
    /// dropped (their last ones), what becomes of the 2 MiB device pages
    /// they belong to: one whose every page lost its last reference in
    /// this very batch is freed whole (returned, to be given back whole);
    /// any other is split now, for good. Deciding later, with the lock let
    /// go for `page_free` meanwhile, would let two threads freeing parts of
    /// one page both see it whole.
    fn settle(&mut self, last: &[DevicePfn]) -> Vec<usize> {
        let mut touched: Vec<(usize, usize)> = Vec::new();
        for pfn in last {
            let b = pfn.0 as usize / HUGE_PAGES;
            if !self.huge.get(b).copied().unwrap_or(false) {
                continue;
            }
            match touched.iter_mut().find(|(tb, _)| *tb == b) {
                Some((_, n)) => *n += 1,
                None => touched.push((b, 1)),
            }
        }
        let mut whole = Vec::new();
        for (b, n) in touched {
            self.huge[b] = false;
            if n == HUGE_PAGES && self.live[b] == 0 {
                whole.push(b);
            }
        }
        whole
    }

    /// Puts `freed` (pages whose last reference went, and whose device let
    /// go of them) back: the blocks `settle` found freed whole go back
    /// whole, unless one of their pages' `page_free` panicked (then their
    /// other pages go back one by one); every other page goes back alone.
    fn give_back(&mut self, freed: &[u64], whole: &[usize]) {
        let complete = |b: usize| {
            freed
                .iter()
                .filter(|&&f| f as usize / HUGE_PAGES == b)
                .count()
                == HUGE_PAGES
        };
        let whole: Vec<usize> = whole.iter().copied().filter(|&b| complete(b)).collect();
        for &b in &whole {
            self.free_huge.push((b * HUGE_PAGES) as u64);
        }
        for &pfn in freed {
            if !whole.contains(&(pfn as usize / HUGE_PAGES)) {
                self.push_free(pfn);
            }
        }
    }

    fn push_free(&mut self, pfn: u64) {
        self.free.push(pfn);
        self.nfree[pfn as usize / HUGE_PAGES] += 1;
    }

    /// Cuts the whole block at `head` into single free pages.
    fn cut(&mut self, head: u64) {
        self.free.extend((head..head + HUGE_PAGES as u64).rev());
        self.nfree[head as usize / HUGE_PAGES] += HUGE_PAGES as u32;
    }

    /// The `n` single free pages at the end of `free`.
    fn take_free(&mut self, n: usize) -> Vec<DevicePfn> {
        let at = self.free.len() - n;
        let pages: Vec<DevicePfn> = self.free.drain(at..).rev().map(DevicePfn).collect();
        for p in &pages {
            self.nfree[p.0 as usize / HUGE_PAGES] -= 1;
        }
        pages
    }

    /// Makes blocks all of whose pages are free single pages whole again
    /// (for 2 MiB device pages): one pass over the free pages. Only where
    /// chunks are made of whole blocks.
    fn coalesce(&mut self, chunk_pages: usize) {
        if chunk_pages % HUGE_PAGES != 0 {
            return;
        }
        let whole: Vec<usize> = (0..self.nfree.len())
            .filter(|&b| self.nfree[b] as usize == HUGE_PAGES)
            .collect();
        if whole.is_empty() {
            return;
        }
        let nfree = &self.nfree;
        self.free
            .retain(|&f| nfree[f as usize / HUGE_PAGES] as usize != HUGE_PAGES);
        for b in whole {
            self.nfree[b] = 0;
            self.free_huge.push((b * HUGE_PAGES) as u64);
        }
    }

    /// Adds a chunk of `pages` pages from `first`: whole blocks for 2 MiB
    /// device pages where the chunk is made of them, single pages
    /// otherwise (popped from the end: lowest page numbers first).
    fn grow(&mut self, first: u64, pages: usize) {
        let total = first as usize + pages;
        // Room for every page to come back alone, reserved now (on the
        // allocating thread): growing the free lists as pages come back
        // would copy them on the fault service, whose puts they are. In
        // `uhmm bench`'s stall case the doubling of `free` at 64 Ki pages
        // kept one fault back on the service for 0.8-0.9 ms.
        self.free
            .reserve_exact(total.saturating_sub(self.free.len()));
        self.free_huge.reserve_exact(
            total
                .div_ceil(HUGE_PAGES)
                .saturating_sub(self.free_huge.len()),
        );
        self.refs.resize(total, 0);
        self.huge.resize(total.div_ceil(HUGE_PAGES), false);
        self.live.resize(total.div_ceil(HUGE_PAGES), 0);
        self.nfree.resize(total.div_ceil(HUGE_PAGES), 0);
        if first as usize % HUGE_PAGES == 0 && pages % HUGE_PAGES == 0 {
            let blocks = pages / HUGE_PAGES;
            self.free_huge
                .extend((0..blocks).rev().map(|k| first + (k * HUGE_PAGES) as u64));
        } else {
            for pfn in (first..first + pages as u64).rev() {
                self.push_free(pfn);
            }
        }
    }
}

/// The shared part, found by the fault service through the owner.
#[derive(Debug)]
pub(crate) struct PagemapInner {
    pub(crate) owner: Owner,
    pub(crate) ops: Arc<dyn DevicePagemapOps>,
    config: PagemapConfig,
    pool: Mutex<Pool>,
    allocated: AtomicU64,
    freed: AtomicU64,
    pub(crate) faulted_back: AtomicU64,
    /// The address space's count of callbacks that panicked.
    pub(crate) panics: Arc<AtomicU64>,
}

impl PagemapInner {
    /// The device's `migrate_to_ram`, contained: a panic is
    /// [`FaultError::Device`].
    pub(crate) fn migrate_to_ram(&self, fault: &DeviceFault<'_>) -> Result<(), FaultError> {
        call(&self.panics, "migrate_to_ram", || {
            self.ops.migrate_to_ram(fault)
        })
        .unwrap_or_else(|_| Err(FaultError::Device("migrate_to_ram panicked".into())))
    }

    /// Drops one reference to `pfn`; the last one frees it: the device's
    /// `page_free` runs first, and only then can the page be handed out
    /// again (a page reused before its device let go of it could carry its
    /// old contents into a new virtual page).
    pub(crate) fn put(&self, pfn: DevicePfn) -> Result<(), DevmemError> {
        let last = {
            let mut p = lock(&self.pool);
            match p.unref(pfn) {
                // (One page alone never frees a 2 MiB page whole: it
                // splits it.)
                Some(true) => {
                    p.settle(&[pfn]);
                    true
                }
                Some(false) => false,
                None => return Err(DevmemError::BadPfn { pfn }),
            }
        };
        if last {
            // A `page_free` that panicked may not have let go of the page:
            // it is never handed out again (the pagemap is a page smaller).
            let freed = call(&self.panics, "page_free", || self.ops.page_free(pfn)).is_ok();
            let mut p = lock(&self.pool);
            if freed {
                p.give_back(&[pfn.0], &[]);
            }
            p.in_use -= 1;
            drop(p);
            self.freed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// [`put`](Self::put) of each of `pfns`, the pool locked twice in all
    /// rather than twice a page; a page not in use is skipped (uhmm drops
    /// only references it holds).
    pub(crate) fn put_many(&self, pfns: &[DevicePfn]) {
        let (last, whole) = {
            let mut p = lock(&self.pool);
            let last: Vec<DevicePfn> = pfns
                .iter()
                .copied()
                .filter(|&pfn| p.unref(pfn) == Some(true))
                .collect();
            let whole = p.settle(&last);
            (last, whole)
        };
        if last.is_empty() {
            return;
        }
        // As in `put`: a page whose `page_free` panicked is not reused.
        let freed: Vec<u64> = last
            .iter()
            .filter(|&&pfn| call(&self.panics, "page_free", || self.ops.page_free(pfn)).is_ok())
            .map(|pfn| pfn.0)
            .collect();
        let mut p = lock(&self.pool);
        p.give_back(&freed, &whole);
        p.in_use -= last.len();
        drop(p);
        self.freed.fetch_add(last.len() as u64, Ordering::Relaxed);
    }

    /// Whether each of `pfns` is an allocated page (one look at the pool).
    pub(crate) fn allocated_all(&self, pfns: &[DevicePfn]) -> Vec<bool> {
        let p = lock(&self.pool);
        pfns.iter()
            .map(|pfn| p.refs.get(pfn.0 as usize).is_some_and(|&r| r > 0))
            .collect()
    }

    /// Whether `pfn` is a page of a 2 MiB device page (not split).
    pub(crate) fn is_huge(&self, pfn: DevicePfn) -> bool {
        lock(&self.pool)
            .huge
            .get(pfn.0 as usize / HUGE_PAGES)
            .copied()
            .unwrap_or(false)
    }

    /// Whether `pfn` is an allocated (referenced) page.
    pub(crate) fn allocated(&self, pfn: DevicePfn) -> bool {
        lock(&self.pool)
            .refs
            .get(pfn.0 as usize)
            .is_some_and(|&r| r > 0)
    }
}

/// Device memory of one owner: device pages, named by [`DevicePfn`],
/// handed out from chunks that are added as they are needed, and
/// reference-counted — a page referenced by a virtual page stays in use
/// until that page is unmapped, discarded or migrated back, and then
/// [`DevicePagemapOps::page_free`] is called.
///
/// The pagemap also makes the owner's device pages reachable for CPU
/// faults: the fault service finds `migrate_to_ram` through the owner
/// stored with each device-resident page. Dropping the pagemap (or
/// [`evict_all`](Self::evict_all)) brings every page home first.
///
/// It belongs to the process that made it, with its [`Mm`]: in a forked
/// child its operations return [`ForkedChild`], and dropping it does
/// nothing (a fork brings every device page home first).
pub struct DevicePagemap {
    inner: Arc<PagemapInner>,
    mm: Mm,
}

impl fmt::Debug for DevicePagemap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevicePagemap")
            .field("owner", &self.inner.owner)
            .field("stats", &self.stats())
            .finish()
    }
}

/// A CPU access (or an eviction) that needs device pages back.
#[derive(Debug)]
pub struct DeviceFault<'a> {
    pub(crate) shared: &'a Shared,
    pub(crate) owner: Owner,
    pub(crate) range: PageRange,
    pub(crate) addr: Option<VirtAddr>,
    pub(crate) blockable: bool,
}

impl<'a> DeviceFault<'a> {
    /// The pages to bring back (those of the owner in it): the faulting
    /// page and the neighbourhood the fault policy chose.
    pub fn range(&self) -> PageRange {
        self.range
    }

    /// The address the CPU touched (`None` for an eviction).
    pub fn addr(&self) -> Option<VirtAddr> {
        self.addr
    }

    /// Whether the caller may block (false on the fault service).
    pub fn blockable(&self) -> bool {
        self.blockable
    }

    /// The owner whose pages come back.
    pub fn owner(&self) -> Owner {
        self.owner
    }

    /// Sets up the migration of this owner's device pages in
    /// [`range`](Self::range) back to system memory.
    ///
    /// # Errors
    ///
    /// As [`MigrateVma::setup`].
    pub fn migrate(&self) -> Result<MigrateVma<'a>, MigrateError> {
        MigrateVma::setup_in(
            self.shared,
            self.range,
            Select::DEVICE_PRIVATE,
            self.owner,
            self.blockable,
        )
    }
}

impl DevicePagemap {
    /// Device memory for `owner` in `mm`'s address space, empty until the
    /// first allocation adds a chunk.
    ///
    /// # Errors
    ///
    /// [`DevmemError::BadConfig`] if `config` is out of bounds
    /// ([`PagemapConfig::validate`]); [`DevmemError::OwnerTaken`] if
    /// `owner` has a pagemap in `mm` already; [`DevmemError::ForkedChild`]
    /// in a forked child, with its parent's `mm`.
    pub fn new(
        mm: &Mm,
        owner: Owner,
        ops: Arc<dyn DevicePagemapOps>,
        config: PagemapConfig,
    ) -> Result<DevicePagemap, DevmemError> {
        mm.check_process()?;
        config.validate()?;
        let inner = Arc::new(PagemapInner {
            owner,
            ops,
            config,
            pool: Mutex::new(Pool::default()),
            allocated: AtomicU64::new(0),
            freed: AtomicU64::new(0),
            faulted_back: AtomicU64::new(0),
            panics: mm.shared().stats.callback_panics.clone(),
        });
        if !mm.shared().add_pagemap(&inner) {
            return Err(DevmemError::OwnerTaken { owner });
        }
        Ok(DevicePagemap {
            inner,
            mm: mm.clone(),
        })
    }

    /// The owner.
    pub fn owner(&self) -> Owner {
        self.inner.owner
    }

    /// Pages the pagemap may ever hand out.
    pub fn capacity(&self) -> usize {
        self.inner.config.chunk_pages * self.inner.config.max_chunks
    }

    /// What it has counted (in a forked child, what it had at the fork;
    /// chunks and pages in use only if no thread of the parent held the
    /// pool then).
    pub fn stats(&self) -> PagemapStats {
        let of = |p: &Pool| (p.chunks, p.in_use, p.huge.iter().filter(|&&h| h).count());
        let (chunks, in_use, huge_pages) = if self.mm.check_process().is_ok() {
            of(&lock(&self.inner.pool))
        } else {
            // A lock a thread of the parent held at the fork stays locked.
            self.inner.pool.try_lock().map_or((0, 0, 0), |p| of(&p))
        };
        PagemapStats {
            chunks,
            in_use,
            allocated: self.inner.allocated.load(Ordering::Relaxed),
            freed: self.inner.freed.load(Ordering::Relaxed),
            faulted_back: self.inner.faulted_back.load(Ordering::Relaxed),
            huge_pages,
        }
    }

    /// `n` free device pages, each with one reference, lowest first: all
    /// of them or none.
    ///
    /// # Errors
    ///
    /// [`DevmemError::Exhausted`] when fewer than `n` can be had;
    /// [`DevmemError::Grow`] when the device cannot back a new chunk;
    /// [`DevmemError::ForkedChild`] in a forked child.
    pub fn alloc(&self, n: usize) -> Result<Vec<DevicePfn>, DevmemError> {
        self.mm.check_process()?;
        let cfg = self.inner.config;
        let mut p = lock(&self.inner.pool);
        while p.free.len() < n {
            // Single pages are cut from whole blocks before the pagemap
            // grows.
            if let Some(head) = p.free_huge.pop() {
                p.cut(head);
                continue;
            }
            if p.chunks >= cfg.max_chunks {
                return Err(DevmemError::Exhausted {
                    in_use: p.in_use,
                    capacity: cfg.chunk_pages * cfg.max_chunks,
                    wanted: n,
                });
            }
            self.add_chunk(&mut p)?;
        }
        let mut pages = p.take_free(n);
        pages.sort_unstable();
        for pfn in &pages {
            p.refs[pfn.0 as usize] = 1;
        }
        p.in_use += n;
        drop(p);
        self.inner.allocated.fetch_add(n as u64, Ordering::Relaxed);
        Ok(pages)
    }

    /// `n` free 2 MiB device pages (order 9, the kernel's device-private
    /// THP): for each, the first of its [`HUGE_PAGES`] consecutive page
    /// numbers, aligned to [`HUGE_PAGES`], each page with one reference
    /// (as [`alloc`](Self::alloc) gives them); all of them or none. A
    /// virtual 2 MiB range whose pages name such a page in order is
    /// reported at PMD order by `range_fault`, and comes back to system
    /// memory as one unit. Freeing part of it (a partial unmap, say)
    /// splits it into single pages for good, as the kernel splits a folio.
    ///
    /// # Errors
    ///
    /// [`DevmemError::Exhausted`] when fewer than `n` whole 2 MiB blocks
    /// can be had — also when chunks are not made of whole blocks
    /// (`chunk_pages` not a multiple of [`HUGE_PAGES`]), or free memory is
    /// only in single pages: fall back to [`alloc`](Self::alloc) then, as
    /// the kernel's drivers fall back to 4 KiB pages;
    /// [`DevmemError::Grow`]; [`DevmemError::ForkedChild`].
    pub fn alloc_huge(&self, n: usize) -> Result<Vec<DevicePfn>, DevmemError> {
        self.mm.check_process()?;
        let cfg = self.inner.config;
        let mut p = lock(&self.inner.pool);
        if p.free_huge.len() < n {
            p.coalesce(cfg.chunk_pages);
        }
        while p.free_huge.len() < n {
            if p.chunks >= cfg.max_chunks || cfg.chunk_pages % HUGE_PAGES != 0 {
                return Err(DevmemError::Exhausted {
                    in_use: p.in_use,
                    capacity: cfg.chunk_pages * cfg.max_chunks,
                    wanted: n * HUGE_PAGES,
                });
            }
            self.add_chunk(&mut p)?;
        }
        let at = p.free_huge.len() - n;
        let mut heads: Vec<DevicePfn> = p.free_huge.drain(at..).rev().map(DevicePfn).collect();
        heads.sort_unstable();
        for head in &heads {
            let b = head.0 as usize / HUGE_PAGES;
            p.refs[b * HUGE_PAGES..(b + 1) * HUGE_PAGES].fill(1);
            p.huge[b] = true;
            p.live[b] = HUGE_PAGES as u32;
        }
        p.in_use += n * HUGE_PAGES;
        drop(p);
        self.inner
            .allocated
            .fetch_add((n * HUGE_PAGES) as u64, Ordering::Relaxed);
        Ok(heads)
    }

    /// Has the device back one more chunk and adds its pages to the pool
    /// `p` (under the pool's lock; `add_chunk` runs under it).
    fn add_chunk(&self, p: &mut Pool) -> Result<(), DevmemError> {
        let cfg = self.inner.config;
        let first = (p.chunks * cfg.chunk_pages) as u64;
        call(&self.inner.panics, "add_chunk", || {
            self.inner.ops.add_chunk(DevicePfn(first), cfg.chunk_pages)
        })
        .unwrap_or_else(|_| {
            Err(DevmemError::Grow {
                reason: "the device's add_chunk panicked".into(),
            })
        })?;
        p.chunks += 1;
        p.grow(first, cfg.chunk_pages);
        Ok(())
    }

    /// One more reference to `pfn`.
    ///
    /// # Errors
    ///
    /// [`DevmemError::BadPfn`] if the page is not in use;
    /// [`DevmemError::ForkedChild`] in a forked child.
    pub fn get(&self, pfn: DevicePfn) -> Result<(), DevmemError> {
        self.mm.check_process()?;
        let mut p = lock(&self.inner.pool);
        match p.refs.get_mut(pfn.0 as usize) {
            Some(r) if *r > 0 => {
                *r += 1;
                Ok(())
            }
            _ => Err(DevmemError::BadPfn { pfn }),
        }
    }

    /// One reference less to `pfn`; the last one frees the page
    /// ([`DevicePagemapOps::page_free`]).
    ///
    /// # Errors
    ///
    /// [`DevmemError::BadPfn`] if the page is not in use (never handed
    /// out, or freed already: a second `put` of its last reference); no
    /// count changes then. [`DevmemError::ForkedChild`] in a forked child.
    pub fn put(&self, pfn: DevicePfn) -> Result<(), DevmemError> {
        self.mm.check_process()?;
        self.inner.put(pfn)
    }

    /// Brings every page of this owner back to system memory (the kernel's
    /// `migrate_device_range` over the whole pagemap): device removal or
    /// shrink loses nothing. Waits for migrations of the owner that are in
    /// flight.
    ///
    /// # Errors
    ///
    /// [`FaultError`] if the device keeps failing to give pages back for
    /// ten seconds (pending layout changes that refuse its pages' way home
    /// on this thread are waited out, and do not count); the pages not
    /// brought back stay on the device.
    /// [`FaultError::ForkedChild`] in a forked child.
    pub fn evict_all(&self) -> Result<(), FaultError> {
        self.mm.check_process()?;
        evict(self.mm.shared(), &self.inner, None, true, true)
    }
}

impl Drop for DevicePagemap {
    fn drop(&mut self) {
        if ForkedChild::check_exact(self.mm.shared().pid).is_err() {
            // A forked child's copy: the pages it could bring home are the
            // parent's business (a fork brought them home already), the
            // service it would wait for runs in the parent only, and a
            // thread of the parent may have held one of its locks at the
            // fork. Nothing to do.
            return;
        }
        let shared = self.mm.shared();
        // Nothing may be lost: keep trying while the device gives pages
        // back; what it cannot is lost with it, as for a device that dies
        // (poisoned: an access gets SIGBUS, never zeros).
        if self.evict_all().is_err() {
            let owner = self.inner.owner;
            let mut regions = lock(&shared.regions);
            let left = regions
                .states
                .select(None, |s| matches!(s, Stored::Device(o, _) if o == owner));
            for &(addr, _) in &left {
                if let Ok(page) = PageRange::new(addr, PAGE_SIZE) {
                    shared.lose_locked(&mut regions, page);
                }
            }
            drop(regions);
            shared.release_states(left.into_iter().map(|(_, s)| s).collect());
        }
        shared.remove_pagemap(self.inner.owner);
        // The fault service may hold a reference for a fault it serves
        // right now; the device's ops and memory must be dropped here, on
        // this thread, never on the service (dropping them may unmap
        // memory registered with the userfaultfd, whose event the service
        // would have to read: DESIGN.md concurrency rule 4).
        if !crate::mm::service::on_service() {
            let mut spins = 0u32;
            while Arc::strong_count(&self.inner) > 1 {
                spins += 1;
                if spins < 100 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }
    }
}

/// Brings the pages of `pm`'s owner in `within` (everywhere if `None`)
/// home, in runs of contiguous pages of at most 2 MiB. With `reclaim`
/// (the device's own eviction), a migration of the owner still in flight
/// after `ABANDONED` is reclaimed; otherwise it is waited for.
pub(crate) fn evict(
    shared: &Shared,
    pm: &PagemapInner,
    within: Option<PageRange>,
    blockable: bool,
    reclaim: bool,
) -> Result<(), FaultError> {
    let owner = pm.owner;
    let started = Instant::now();
    let bound = crate::testing::loss_bound(EVICT_FOR);
    let mut deadline = started + bound;
    let mut refusals = crate::sys::uffd::refusals_here();
    loop {
        let (runs, in_flight) = {
            let regions = lock(&shared.regions);
            let found = regions
                .states
                .select(within, |s| matches!(s, Stored::Device(o, _) if o == owner));
            let pages: Vec<VirtAddr> = found.into_iter().map(|(a, _)| a).collect();
            // An operation of the owner in flight holds device pages until
            // it ends, even once its pages' states have moved on (a fault
            // back commits, then frees what its pages held): eviction is
            // over when those are freed too, as the kernel's eviction waits
            // on the page locks a migration holds until it is finalized.
            let in_flight = regions.ops_of(owner, within);
            // A run never crosses from one managed region into the next (a
            // migration is set up inside one region).
            (region_runs(&regions, &pages), in_flight)
        };
        if runs.is_empty() && !in_flight {
            return Ok(());
        }
        if runs.is_empty() {
            // Only pages in flight: wait for their migrations to end, and
            // reclaim those abandoned (a `MigrateVma` leaked, say: its
            // pages come home, its device pages stay in use).
            if reclaim
                && blockable
                && !crate::mm::service::on_service()
                && Instant::now() >= started + crate::mm::service::ABANDONED
            {
                shared.reclaim_ops(within, Some(owner));
            }
            if Instant::now() > deadline {
                return Err(FaultError::Device(format!(
                    "device pages are still migrating after {bound:?}"
                )));
            }
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        let mut last = Ok(());
        for run in runs {
            let fault = DeviceFault {
                shared,
                owner,
                range: run,
                addr: None,
                blockable,
            };
            if let Err(e) = pm.migrate_to_ram(&fault) {
                last = Err(e);
            }
        }
        // Pages a layout change refused are not the device's failure: their
        // data is intact, and the bound starts again after each refusal of
        // this thread's own work (a device that gives pages back on
        // another thread is bounded as before; other threads' refusals
        // never keep a failing device's eviction going).
        let now = Instant::now();
        let seen = crate::sys::uffd::refusals_here();
        if seen != refusals {
            refusals = seen;
            deadline = now + bound;
        }
        if now > deadline {
            return last.and(Err(FaultError::Device(format!(
                "device pages could not be brought back within {bound:?}"
            ))));
        }
        if last.is_err() {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// How long an eviction may find the device failing before it gives up.
const EVICT_FOR: Duration = Duration::from_secs(10);

/// `pages` (sorted) as runs of at most [`EVICT_RUN`](super::migrate::EVICT_RUN)
/// bytes, each inside one managed region.
fn region_runs(regions: &Regions, pages: &[VirtAddr]) -> Vec<PageRange> {
    let mut out = Vec::new();
    for run in runs(pages, super::migrate::EVICT_RUN) {
        let mut cursor = run.start();
        while cursor < run.end() {
            let end = PageRange::new(cursor, PAGE_SIZE)
                .ok()
                .and_then(|p| regions.containing(p))
                .map_or(cursor.get() + PAGE_SIZE, |r| r.range.end().get())
                .min(run.end().get());
            if let Ok(r) = PageRange::from_bounds(cursor, VirtAddr::new(end)) {
                out.push(r);
            }
            cursor = VirtAddr::new(end);
        }
    }
    out
}

/// Sorted page addresses as runs of contiguous pages, each at most
/// `max` bytes and not crossing a `max`-aligned boundary.
pub(crate) fn runs(pages: &[VirtAddr], max: usize) -> Vec<PageRange> {
    let mut out: Vec<PageRange> = Vec::new();
    for &a in pages {
        if let Some(last) = out.last_mut()
            && last.end() == a
            && last.len() < max
            && !a.is_aligned(max)
            && let Ok(grown) = PageRange::new(last.start(), last.len() + PAGE_SIZE)
        {
            *last = grown;
            continue;
        }
        if let Ok(r) = PageRange::new(a, PAGE_SIZE) {
            out.push(r);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grown_pool_has_room_for_every_page_to_come_back_alone() {
        let mut p = Pool::default();
        for (first, pages) in [(0u64, 1024usize), (1024, 4096), (5120, 100)] {
            p.grow(first, pages);
            let total = first as usize + pages;
            assert!(
                p.free.capacity() >= total,
                "free: {} < {total}",
                p.free.capacity()
            );
            assert!(p.free_huge.capacity() >= total.div_ceil(HUGE_PAGES));
        }
        // Every page handed out and put back alone: no reallocation.
        let cap = p.free.capacity();
        let all: Vec<u64> = p.free_huge.drain(..).collect();
        for head in all {
            for k in 0..HUGE_PAGES as u64 {
                p.push_free(head + k);
            }
        }
        assert_eq!(p.free.capacity(), cap, "the free list grew on the put path");
    }
}
