//! The device's own memory and the commands that use it: migration to the
//! device and back, eviction, exclusive access (dmirror's
//! `MIGRATE_TO_DEV`, `MIGRATE_TO_SYS`, `RELEASE`, `EXCLUSIVE`,
//! `CHECK_EXCLUSIVE`, and the `FAIL_ALLOC` flag).
//!
//! Device memory is a host arena of anonymous mappings, one per chunk of
//! the device's [`DevicePagemap`], outside every managed region: a device
//! page is a page of the arena. Data moves between the staging pages of a
//! [`MigrateVma`] and the arena through the device's [`CopyEngine`].

use crate::device::{Mirror, SimDevice, SimError, bump, command_range};
use crate::table::{ATOMIC, DEV, READ, WRITE};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock, TryLockError};
use uhmm::devmem::copy::{CopyEngine, CopyJob};
use uhmm::devmem::pagemap::HUGE_PAGES;
use uhmm::devmem::{
    DeviceFault, DevicePagemapOps, DevmemError, FaultError, MigrateSrc, MigrateVma, Select,
};
use uhmm::sys::mem::Mapping;
use uhmm::sys::pagemap::{Categories, Pagemap, ScanQuery};
use uhmm::{DevicePfn, PAGE_SIZE, PageRange, VirtAddr};

/// The most a migration command moves in one `MigrateVma` (it needs as
/// much staging at once).
const PART: usize = 64 << 20;

/// The device's memory: arena chunks, the copy engine, injected failures.
#[derive(Debug)]
pub(crate) struct Arena {
    chunks: RwLock<Vec<Mapping>>,
    pub(crate) chunk_pages: usize,
    pub(crate) engine: RwLock<Arc<dyn CopyEngine>>,
    /// dmirror's FAIL_ALLOC: the next bulk allocation fails (one-shot).
    pub(crate) fail_alloc: std::sync::atomic::AtomicBool,
    /// Pages move between the arena and managed memory with no copy
    /// (`UFFDIO_MOVE`); off once a copy engine is set.
    pub(crate) zero_copy: std::sync::atomic::AtomicBool,
    /// With a copy engine: pages come back by one kernel copy from the
    /// arena straight into place (the CPU can read device memory through
    /// a mapping), not through the engine.
    pub(crate) cpu_visible: std::sync::atomic::AtomicBool,
    /// Chunks registered with the address space (for moves).
    registered: std::sync::Mutex<usize>,
    /// Freed device pages whose arena page may still hold data (a moved-in
    /// page needs a hole): emptied before they are used again.
    dirty: std::sync::Mutex<Vec<bool>>,
    /// The page table, to see which of those still hold a page.
    pagemap: std::sync::OnceLock<Option<Pagemap>>,
}

impl Arena {
    /// How many of the `n` pages from `at` are in the CPU page table
    /// (present or swapped), counted from the first; all of them if the
    /// page table cannot be read.
    pub(crate) fn present_prefix(&self, at: VirtAddr, n: usize) -> usize {
        let Ok(range) = PageRange::new(at, n * PAGE_SIZE) else {
            return 0;
        };
        let query = ScanQuery::new().any_of(Categories::PRESENT | Categories::SWAPPED);
        let mut found = Vec::new();
        match self
            .pagemap
            .get_or_init(|| Pagemap::open().ok())
            .as_ref()
            .map(|pm| pm.scan(range, &query, &mut found))
        {
            Some(Ok(_)) => found
                .first()
                .filter(|r| r.range.start() == at)
                .map_or(0, |r| r.range.npages()),
            _ => n,
        }
    }

    pub(crate) fn new(chunk_pages: usize, engine: Arc<dyn CopyEngine>) -> Arena {
        Arena {
            chunks: RwLock::new(Vec::new()),
            chunk_pages,
            engine: RwLock::new(engine),
            fail_alloc: std::sync::atomic::AtomicBool::new(false),
            zero_copy: std::sync::atomic::AtomicBool::new(true),
            cpu_visible: std::sync::atomic::AtomicBool::new(false),
            registered: std::sync::Mutex::new(0),
            dirty: std::sync::Mutex::new(Vec::new()),
            pagemap: std::sync::OnceLock::new(),
        }
    }

    /// Registers new chunks with `mm` (so pages can move in and out), and
    /// empties the arena pages of `pfns` that may hold data. Not on the
    /// fault service (an emptied page raises a userfaultfd event).
    fn prepare_moves(&self, mm: &uhmm::mm::Mm, pfns: &[DevicePfn]) -> bool {
        let chunks = self.chunks.read().unwrap_or_else(|e| e.into_inner());
        let mut reg = self.registered.lock().unwrap_or_else(|e| e.into_inner());
        while *reg < chunks.len() {
            if mm.register_device_memory(&chunks[*reg]).is_err() {
                return false;
            }
            *reg += 1;
        }
        drop(reg);
        let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        let mut emptied: Vec<VirtAddr> = Vec::new();
        for pfn in pfns {
            if let Some(d) = dirty.get_mut(pfn.0 as usize)
                && std::mem::take(d)
            {
                let c = pfn.0 as usize / self.chunk_pages;
                if let Some(a) = chunks[c]
                    .range()
                    .start()
                    .checked_add((pfn.0 as usize % self.chunk_pages) * PAGE_SIZE)
                {
                    emptied.push(a);
                }
            }
        }
        drop(dirty);
        emptied.sort_unstable();
        let mut to_empty: Vec<PageRange> = Vec::new();
        let mut k = 0;
        while k < emptied.len() {
            let mut n = 1;
            while emptied.get(k + n).map(|a| a.get()) == Some(emptied[k].get() + n * PAGE_SIZE) {
                n += 1;
            }
            if let Ok(r) = PageRange::new(emptied[k], n * PAGE_SIZE) {
                // Only pages still there need emptying (most were moved out
                // and are holes already): emptying raises an event the
                // caller waits for, a look at the page table does not.
                let mut present = Vec::new();
                let query = ScanQuery::new().any_of(Categories::PRESENT | Categories::SWAPPED);
                let looked = self
                    .pagemap
                    .get_or_init(|| Pagemap::open().ok())
                    .as_ref()
                    .map(|pm| pm.scan(r, &query, &mut present));
                match looked {
                    Some(Ok(_)) => to_empty.extend(present.into_iter().map(|p| p.range)),
                    _ => to_empty.push(r),
                }
            }
            k += n;
        }
        // Emptied with no lock held: the event it raises waits for the
        // fault service, which may need the chunk table meanwhile.
        drop(chunks);
        for r in to_empty {
            self.empty(r);
        }
        true
    }

    /// Drops the arena pages of `range` (free device pages).
    #[allow(unsafe_code)] // named place: the device's own memory
    fn empty(&self, range: PageRange) {
        // SAFETY: `range` lies in an arena chunk (device memory, never
        // managed) and holds only free device pages, which no translation
        // names and no copy reads; no Rust reference points into the arena.
        let _ = unsafe { uhmm::sys::mem::madvise(range, uhmm::sys::mem::Advice::DontNeed) };
    }

    /// The arena addresses of device pages `pfns` (one look at the chunk
    /// table).
    pub(crate) fn addrs(&self, pfns: impl Iterator<Item = DevicePfn>) -> Vec<Option<VirtAddr>> {
        let chunks = self.chunks.read().unwrap_or_else(|e| e.into_inner());
        pfns.map(|pfn| {
            let c = chunks.get(pfn.0 as usize / self.chunk_pages)?;
            c.range()
                .start()
                .checked_add((pfn.0 as usize % self.chunk_pages) * PAGE_SIZE)
        })
        .collect()
    }

    /// The arena address of device page `pfn`.
    pub(crate) fn addr(&self, pfn: DevicePfn) -> Option<VirtAddr> {
        let chunks = self.chunks.read().unwrap_or_else(|e| e.into_inner());
        let c = chunks.get(pfn.0 as usize / self.chunk_pages)?;
        c.range()
            .start()
            .checked_add((pfn.0 as usize % self.chunk_pages) * PAGE_SIZE)
    }

    fn engine(&self) -> Arc<dyn CopyEngine> {
        self.engine
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The device pages `pfns` as mutable bytes (distinct pages).
    #[allow(unsafe_code)] // named place: the device's DMA into its own memory
    #[allow(clippy::mut_from_ref)] // distinct pages of the arena, held by the caller
    fn pages_mut(&self, pfns: &[DevicePfn]) -> Option<Vec<&mut [u8]>> {
        let mut out = Vec::with_capacity(pfns.len());
        for &pfn in pfns {
            let a = self.addr(pfn)?;
            // SAFETY: the arena chunk mapping lives as long as the device
            // (chunks are never removed); each pfn is a distinct page that
            // the caller's migration holds (freshly allocated, or selected
            // and invalidated under the device lock), so nothing else
            // reads or writes it while the slice lives.
            out.push(unsafe { std::slice::from_raw_parts_mut(a.as_mut_ptr::<u8>(), PAGE_SIZE) });
        }
        Some(out)
    }
}

impl DevicePagemapOps for Mirror {
    fn page_free(&self, pfn: DevicePfn) {
        let mut dirty = self.arena.dirty.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = dirty.get_mut(pfn.0 as usize) {
            *d = true;
        }
        drop(dirty);
        bump(&self.counters.pages_freed, 1);
    }

    fn migrate_to_ram(&self, fault: &DeviceFault<'_>) -> Result<(), FaultError> {
        let m = fault.migrate()?;
        let n = self.migrate_back(m, fault.blockable())?;
        bump(&self.counters.faulted_back, n as u64);
        Ok(())
    }

    fn add_chunk(&self, first: DevicePfn, npages: usize) -> Result<(), DevmemError> {
        let grow = |e: uhmm::sys::mem::MemError| DevmemError::Grow {
            reason: e.to_string(),
        };
        // Chunks of whole 2 MiB blocks are 2 MiB aligned, so that a THP
        // moved into a 2 MiB device page stays one (a move of a whole PMD)
        // and moves out whole. (Not MADV_HUGEPAGE: a device that copies
        // into its pages would then back each written 4 KiB with 2 MiB.)
        let whole = npages % HUGE_PAGES == 0;
        let map = Mapping::builder(npages * PAGE_SIZE)
            .noreserve(true)
            .align(if whole {
                HUGE_PAGES * PAGE_SIZE
            } else {
                PAGE_SIZE
            })
            .build()
            .map_err(grow)?;
        let mut chunks = self.arena.chunks.write().unwrap_or_else(|e| e.into_inner());
        debug_assert_eq!(chunks.len() * self.arena.chunk_pages, first.0 as usize);
        chunks.push(map);
        self.arena
            .dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .resize(first.0 as usize + npages, false);
        Ok(())
    }
}

impl Mirror {
    /// Copies the selected device pages of `m` back into system pages and
    /// commits; returns the pages that came back.
    pub(crate) fn migrate_back(
        &self,
        mut m: MigrateVma<'_>,
        blockable: bool,
    ) -> Result<usize, FaultError> {
        let srcs: Vec<(usize, DevicePfn)> = m
            .selected()
            .filter_map(|(i, _, s)| match s {
                MigrateSrc::Device(pfn) => Some((i, pfn)),
                _ => None,
            })
            .collect();
        if srcs.is_empty() {
            return Ok(0);
        }
        // The device lock keeps device commands off these pages while they
        // move (the notifier already dropped their translations).
        let mut table = if blockable {
            self.lock()
        } else {
            match self.table.try_lock() {
                Ok(t) => t,
                Err(TryLockError::Poisoned(e)) => e.into_inner(),
                Err(TryLockError::WouldBlock) => return Err(FaultError::Retry),
            }
        };
        if self.arena.fail_alloc.swap(false, Ordering::AcqRel) {
            // dmirror: the large system allocation fails once and the
            // migration falls back to single pages — the same outcome here.
            bump(&self.counters.alloc_fallbacks, 1);
        }
        let engine = self.arena.engine();
        let pfns: Vec<DevicePfn> = srcs.iter().map(|&(_, p)| p).collect();
        if self.arena.zero_copy.load(Ordering::Acquire) {
            // The arena is host RAM registered with the address space: the
            // pages move home with no copy.
            let at = self.arena.addrs(srcs.iter().map(|&(_, pfn)| pfn));
            let from: Vec<(usize, VirtAddr)> = srcs
                .iter()
                .zip(at)
                .filter_map(|(&(i, _), a)| Some((i, a?)))
                .collect();
            m.move_from_device(&from);
        }
        let cpu_visible = self.arena.cpu_visible.load(Ordering::Acquire);
        if !self.arena.zero_copy.load(Ordering::Acquire) && cpu_visible {
            // One copy, by the kernel, from the arena straight into place.
            let at = self.arena.addrs(srcs.iter().map(|&(_, pfn)| pfn));
            let from: Vec<(usize, VirtAddr)> = srcs
                .iter()
                .zip(at)
                .filter_map(|(&(i, _), a)| Some((i, a?)))
                .collect();
            m.copy_from_device(&from);
        }
        let copied = if self.arena.zero_copy.load(Ordering::Acquire) || cpu_visible {
            Ok(())
        } else {
            let dsts = m.system_dsts().map_err(FaultError::from)?;
            let Some(srcs_mem) = self.arena.pages_mut(&pfns) else {
                return Err(FaultError::Device("a device page outside the arena".into()));
            };
            let mut jobs: Vec<CopyJob<'_>> = srcs_mem
                .into_iter()
                .zip(dsts)
                .map(|(src, (_, dst))| CopyJob { src: &*src, dst })
                .collect();
            engine.copy(&mut jobs)
        };
        if let Err(e) = copied {
            bump(&self.counters.copy_failures, 1);
            for &(i, _) in &srcs {
                m.skip(i);
            }
            return Err(FaultError::Device(e.to_string()));
        }
        m.pages();
        for (i, a, _) in m.selected() {
            if m.migrated(i) {
                table.set(a, 0);
            }
        }
        let n = m.migrated_count();
        m.finalize();
        drop(table);
        bump(&self.counters.migrated_to_system, n as u64);
        Ok(n)
    }
}

impl SimDevice {
    /// Migrates `npages` pages from `addr` into device memory
    /// (`HMM_DMIRROR_MIGRATE_TO_DEV`) and reads them back through the
    /// device, as dmirror does.
    ///
    /// # Errors
    ///
    /// [`SimError::NotMigrated`] (dmirror's ENOENT) if a page of the range
    /// did not end up in this device's memory (shared memory, a page pinned
    /// or on another device, an injected copy failure);
    /// [`SimError::Migrate`] for a range that cannot migrate (EINVAL:
    /// unmanaged, a gap, `PROT_NONE`); [`SimError::DeviceMemory`] when
    /// device memory is exhausted (ENOMEM; nothing is left half-migrated).
    pub fn migrate_to_device(
        &self,
        addr: VirtAddr,
        npages: usize,
    ) -> Result<(Vec<u8>, crate::CmdResult), SimError> {
        let range = command_range(addr, npages)?;
        self.migrate_range_to_device(addr, npages)?;
        {
            let table = self.mirror.lock();
            if let Some(a) = range.pages().find(|&a| table.get(a) & DEV == 0) {
                return Err(SimError::NotMigrated { addr: a });
            }
        }
        let (data, mut res) = self.read(addr, npages)?;
        res.faults = 0;
        Ok((data, res))
    }

    /// The migration half of [`migrate_to_device`](Self::migrate_to_device),
    /// without the read-back: returns the pages that moved into device
    /// memory.
    ///
    /// # Errors
    ///
    /// As `migrate_to_device`, but for `NotMigrated`.
    pub fn migrate_range_to_device(&self, addr: VirtAddr, npages: usize) -> Result<u64, SimError> {
        let range = command_range(addr, npages)?;
        self.mm.check_process()?;
        self.check_released()?;
        let before = self
            .mirror
            .counters
            .migrated_to_device
            .load(Ordering::Relaxed);
        for part in parts(range) {
            self.migrate_part_to_device(part)?;
        }
        Ok(self
            .mirror
            .counters
            .migrated_to_device
            .load(Ordering::Relaxed)
            - before)
    }

    fn migrate_part_to_device(&self, part: PageRange) -> Result<(), SimError> {
        let mut m = MigrateVma::setup(&self.mm, part, Select::SYSTEM, self.owner())?;
        let sel: Vec<(usize, MigrateSrc)> = m
            .selected()
            .filter(|(_, _, s)| matches!(s, MigrateSrc::System | MigrateSrc::Zero))
            .map(|(i, _, s)| (i, s))
            .collect();
        if sel.is_empty() {
            return Ok(());
        }
        let pfns = self.alloc_for(&m, &sel)?;
        let engine = self.mirror.arena.engine();
        let arena = &self.mirror.arena;
        // Host RAM: move the pages into the arena (no copy); what cannot
        // move (pages that were copied out) is copied below.
        let moved: Vec<usize> =
            if arena.zero_copy.load(Ordering::Acquire) && arena.prepare_moves(&self.mm, &pfns) {
                let at = arena.addrs(pfns.iter().copied());
                let to: Vec<(usize, DevicePfn, VirtAddr)> = sel
                    .iter()
                    .zip(&pfns)
                    .zip(at)
                    .filter_map(|((&(i, _), &pfn), a)| Some((i, pfn, a?)))
                    .collect();
                m.move_to_device(&to)
            } else {
                Vec::new()
            };
        let copied = if moved.len() == sel.len() {
            // Every page moved: nothing to copy or clear.
            Ok(())
        } else {
            let Some(dsts) = self.mirror.arena.pages_mut(&pfns) else {
                return Err(SimError::DeviceMemory(DevmemError::BadPfn { pfn: pfns[0] }));
            };
            let mut jobs = Vec::with_capacity(sel.len());
            for ((i, src), dst) in sel.iter().zip(dsts) {
                if moved.binary_search(i).is_ok() {
                    continue;
                }
                match (src, m.src_bytes(*i)) {
                    (MigrateSrc::System, Some(bytes)) => jobs.push(CopyJob { src: bytes, dst }),
                    // A hole or the zero page: allocate and clear.
                    _ => dst.fill(0),
                }
            }
            engine.copy(&mut jobs)
        };
        if copied.is_err() {
            bump(&self.mirror.counters.copy_failures, 1);
            for (&(i, _), &pfn) in sel.iter().zip(&pfns) {
                if moved.binary_search(&i).is_err() {
                    // Allocated above: the reference is the device's.
                    let _ = self.pagemap.put(pfn);
                }
            }
            // What was moved still migrates; the rest is put back.
            if moved.is_empty() {
                return Ok(());
            }
        } else {
            for (&(i, _), &pfn) in sel.iter().zip(&pfns) {
                if moved.binary_search(&i).is_err() && m.set_device_dst(i, pfn).is_err() {
                    // (A page selected above, a page allocated above: not
                    // refused; were it, the reference is still ours.)
                    let _ = self.pagemap.put(pfn);
                }
            }
        }
        m.pages();
        {
            let mut table = self.mirror.lock();
            for (i, a, _) in m.selected() {
                if m.migrated(i) {
                    let w = if m.writable(i) { WRITE } else { 0 };
                    table.set(a, READ | w | DEV);
                }
            }
        }
        bump(
            &self.mirror.counters.migrated_to_device,
            m.migrated_count() as u64,
        );
        m.finalize();
        Ok(())
    }

    /// Device pages for the selected pages `sel` (in order): a 2 MiB device
    /// page for each 2 MiB-aligned run of them taken from a THP (the
    /// kernel's compound migration), single pages for the rest — and for
    /// those runs too when 2 MiB device pages cannot be had, or FAIL_ALLOC
    /// is armed (dmirror's fallback to 4 KiB pages).
    fn alloc_for(
        &self,
        m: &MigrateVma<'_>,
        sel: &[(usize, MigrateSrc)],
    ) -> Result<Vec<DevicePfn>, SimError> {
        let start = m.range().start().get();
        let mut pfns: Vec<Option<DevicePfn>> = vec![None; sel.len()];
        let mut k = 0;
        while k + HUGE_PAGES <= sel.len() {
            let i = sel[k].0;
            let whole = (start + i * PAGE_SIZE) % (HUGE_PAGES * PAGE_SIZE) == 0
                && sel[k + HUGE_PAGES - 1].0 == i + HUGE_PAGES - 1
                && sel[k..k + HUGE_PAGES].iter().all(|&(j, _)| m.src_huge(j));
            if !whole {
                k += 1;
                continue;
            }
            if self.mirror.arena.fail_alloc.swap(false, Ordering::AcqRel) {
                bump(&self.mirror.counters.alloc_fallbacks, 1);
                break;
            }
            let Ok(head) = self.pagemap.alloc_huge(1) else {
                break;
            };
            for (d, p) in pfns[k..k + HUGE_PAGES].iter_mut().enumerate() {
                *p = Some(DevicePfn(head[0].0 + d as u64));
            }
            k += HUGE_PAGES;
        }
        let rest = pfns.iter().filter(|p| p.is_none()).count();
        let singles = match self.alloc_device_pages(rest) {
            Ok(s) => s,
            Err(e) => {
                for pfn in pfns.into_iter().flatten() {
                    let _ = self.pagemap.put(pfn);
                }
                return Err(e);
            }
        };
        // (As many singles as holes: every hole is filled.)
        let mut singles = singles.into_iter();
        Ok(pfns
            .into_iter()
            .filter_map(|p| p.or_else(|| singles.next()))
            .collect())
    }

    /// `n` device pages; FAIL_ALLOC makes the bulk allocation fail once
    /// and the device falls back to page-by-page allocation (dmirror's THP
    /// split fallback).
    fn alloc_device_pages(&self, n: usize) -> Result<Vec<DevicePfn>, SimError> {
        if n > 1 && self.mirror.arena.fail_alloc.swap(false, Ordering::AcqRel) {
            bump(&self.mirror.counters.alloc_fallbacks, 1);
            let mut pages = Vec::with_capacity(n);
            for _ in 0..n {
                match self.pagemap.alloc(1) {
                    Ok(p) => pages.extend(p),
                    Err(e) => {
                        for p in pages {
                            let _ = self.pagemap.put(p);
                        }
                        return Err(SimError::DeviceMemory(e));
                    }
                }
            }
            return Ok(pages);
        }
        self.pagemap.alloc(n).map_err(SimError::DeviceMemory)
    }

    /// Migrates this device's pages in `npages` pages from `addr` back to
    /// system memory (`HMM_DMIRROR_MIGRATE_TO_SYS`); `cpages` is the number
    /// that moved.
    ///
    /// # Errors
    ///
    /// [`SimError::Migrate`] for a range that cannot migrate;
    /// [`SimError::Fault`] if the copy engine failed (the pages stay on the
    /// device).
    pub fn migrate_to_system(
        &self,
        addr: VirtAddr,
        npages: usize,
    ) -> Result<crate::CmdResult, SimError> {
        let range = command_range(addr, npages)?;
        self.mm.check_process()?;
        self.check_released()?;
        let mut res = crate::CmdResult::default();
        for part in parts(range) {
            let m = MigrateVma::setup(&self.mm, part, Select::DEVICE_PRIVATE, self.owner())?;
            let n = self
                .mirror
                .migrate_back(m, true)
                .map_err(|e| SimError::Fault {
                    addr: part.start(),
                    reason: match e {
                        FaultError::NoMemory => "out of memory",
                        _ => "the copy to system memory failed",
                    },
                })?;
            res.cpages += n as u64;
        }
        Ok(res)
    }

    /// Brings every page of this device's memory home
    /// (`HMM_DMIRROR_RELEASE`, the kernel's `migrate_device_range`).
    ///
    /// # Errors
    ///
    /// [`SimError::Evict`] if pages could not be brought back.
    pub fn release(&self) -> Result<(), SimError> {
        self.mm.check_process()?;
        self.pagemap.evict_all().map_err(SimError::Evict)
    }

    /// Makes `npages` pages from `addr` exclusive to this device for its
    /// atomics (`HMM_DMIRROR_EXCLUSIVE`) and reads them back through it.
    ///
    /// # Errors
    ///
    /// [`SimError::Migrate`] for memory that cannot be made exclusive
    /// (not private anonymous read-write); [`SimError::Busy`] if some page
    /// could not be taken.
    pub fn exclusive(
        &self,
        addr: VirtAddr,
        npages: usize,
    ) -> Result<(Vec<u8>, crate::CmdResult), SimError> {
        let range = self.command(addr, npages.saturating_mul(PAGE_SIZE))?;
        for round in 0..100 {
            // Its own translations of the range go first: they name pages
            // that are about to leave the page table. Until the grab has
            // programmed its own, none is made there (its own grab does not
            // move the notifier sequence, so a concurrent device fault
            // would not see it otherwise, and would reach a page in
            // flight through its old address under the table lock).
            {
                let mut table = self.mirror.lock();
                table.clear(range);
                table.grabbing.push(range);
            }
            let seq = self.notifier.read_begin();
            let grabbed = self.mm.make_device_exclusive(range, self.owner());
            let mut table = self.mirror.lock();
            if let Some(i) = table.grabbing.iter().position(|&g| g == range) {
                table.grabbing.swap_remove(i);
            }
            let n = grabbed?;
            if self.notifier.read_retry(seq) {
                continue;
            }
            if n < npages {
                return Err(SimError::Busy {
                    range,
                    rounds: round,
                });
            }
            for a in range.pages() {
                table.set(a, READ | WRITE | ATOMIC);
            }
            drop(table);
            let (data, mut res) = self.read(addr, npages)?;
            res.faults = 0;
            return Ok((data, res));
        }
        Err(SimError::Busy { range, rounds: 100 })
    }

    /// `HMM_DMIRROR_CHECK_EXCLUSIVE`: fails with
    /// [`SimError::StillExclusive`] (EPERM) if the device still holds a page
    /// of the range exclusive.
    ///
    /// # Errors
    ///
    /// As said, and [`SimError::Range`] for a bad command.
    pub fn check_exclusive(&self, addr: VirtAddr, npages: usize) -> Result<(), SimError> {
        let range = command_range(addr, npages)?;
        self.mm.check_process()?;
        let table = self.mirror.lock();
        match range.pages().find(|&a| table.get(a) & ATOMIC != 0) {
            Some(a) => Err(SimError::StillExclusive { addr: a }),
            None => Ok(()),
        }
    }

    /// dmirror's `FAIL_ALLOC` flag: the next bulk allocation of device or
    /// system pages fails once, and the migration falls back to single
    /// pages.
    pub fn fail_next_alloc(&self) {
        self.mirror.arena.fail_alloc.store(true, Ordering::Release);
    }

    /// Replaces the copy engine (for injected copy failures, say). From
    /// then on pages are copied between the arena and system memory
    /// through it, as for a device with memory of its own; by default they
    /// are moved with no copy (the arena is host RAM).
    pub fn set_copy_engine(&self, engine: Arc<dyn CopyEngine>) {
        self.mirror.arena.zero_copy.store(false, Ordering::Release);
        *self
            .mirror
            .arena
            .engine
            .write()
            .unwrap_or_else(|e| e.into_inner()) = engine;
    }

    /// With a copy engine set: whether the CPU can read the device's
    /// memory through a mapping (as a GPU's BAR or coherent memory). Then
    /// pages still reach the device through the engine, but a page coming
    /// back is copied once, by the kernel, from device memory straight
    /// into place ([`MigrateVma::copy_from_device`]) rather than through
    /// the engine into a staging page that is then moved. Off by default.
    pub fn set_cpu_visible_memory(&self, on: bool) {
        self.mirror.arena.cpu_visible.store(on, Ordering::Release);
    }

    /// Device pages in use.
    pub fn device_pages(&self) -> usize {
        self.pagemap.stats().in_use
    }

    /// What the device's memory (its `DevicePagemap`) has counted.
    pub fn memory_stats(&self) -> uhmm::devmem::PagemapStats {
        self.pagemap.stats()
    }
}

/// `range` in parts of at most [`PART`] bytes, aligned to it.
fn parts(range: PageRange) -> Vec<PageRange> {
    let mut out = Vec::new();
    let mut at = range.start();
    while at < range.end() {
        let next = at
            .align_down(PART)
            .checked_add(PART)
            .map_or(range.end(), |n| n.min(range.end()));
        if let Ok(p) = PageRange::from_bounds(at, next) {
            out.push(p);
        }
        at = next;
    }
    out
}
