//! The fault service: the thread that reads the userfaultfd's events and
//! turns them into invalidations of the interval notifiers.
//!
//! Rules it keeps (DESIGN.md invariant 4, and `reference/userspace-notes.md`
//! §4): it never touches managed memory; it reads events in batches from the
//! non-blocking fd into a buffer reserved up front; it never asks for FORK
//! events (a thread in glibc's `fork` holds every allocator lock until its
//! FORK event is read, so a service that allocated would deadlock it); it
//! runs with every signal blocked; and it invalidates in
//! non-blocking mode, so a callback that would wait on a device lock asks to
//! be retried instead of stalling the service — pending invalidations are
//! retried on the next turn of the loop.

use super::notifier::{NotifierRange, Notifiers, NotifyEvent};
use super::regions::Regions;
use super::state::Stored;
use super::{MmError, Owner, fault};
use crate::addr::{DevicePfn, PageRange};
use crate::devmem::pagemap::PagemapInner;
use crate::devmem::staging::{Staging, StagingError};
use crate::sys::mem::{self, Advice, MemError};
use crate::sys::pagemap::{Pagemap, PagemapError};
use crate::sys::procmap::{Procmap, ProcmapError};
use crate::sys::procmap::{Vma, VmaKind};
use crate::sys::uffd::{Event, Uffd, event::BATCH};
use crate::sys::uffd::{Features, MoveMode, OpError, PageFault, Progress, RegisterMode};
use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec, poll};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::Duration;

/// What the service counts (cheap atomics, read as a snapshot).
#[derive(Debug, Default)]
pub(crate) struct ServiceStats {
    pub(crate) events: AtomicU64,
    pub(crate) faults: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) faults_hole: AtomicU64,
    pub(crate) faults_device: AtomicU64,
    pub(crate) faults_exclusive: AtomicU64,
    pub(crate) faults_wp: AtomicU64,
    pub(crate) faults_waited: AtomicU64,
    pub(crate) pages_to_device: AtomicU64,
    pub(crate) pages_to_system: AtomicU64,
}

/// mremaps of pages in flight: the next number, and (number, old range,
/// new start) for each.
type RemapLog = (u64, Vec<(u64, PageRange, crate::VirtAddr)>);

/// The state the service thread shares with [`super::Mm`].
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) uffd: Uffd,
    pub(crate) notifiers: Arc<Notifiers>,
    pub(crate) regions: Mutex<Regions>,
    pub(crate) stats: ServiceStats,
    /// `/proc/self/maps` and `/proc/self/pagemap`, opened on first use and
    /// kept (each open costs more than a small `range_fault`).
    pub(crate) procmap: OnceLock<Procmap>,
    pub(crate) pagemap: OnceLock<Pagemap>,
    /// The process that made it (a forked child's copy is not live there).
    pub(crate) pid: rustix::process::Pid,
    released: AtomicBool,
    stop: AtomicBool,
    wake: OwnedFd,
    /// Device memory by owner, for CPU faults and freed pages.
    pagemaps: Mutex<Vec<(Owner, Weak<PagemapInner>)>>,
    /// Where pages in transit wait (made on first use).
    staging: OnceLock<Staging>,
    /// Migrations in flight, held off while a fork is being prepared.
    pub(crate) gate: Gate,
    /// Discards uhmm made itself, whose REMOVE events must not drop states.
    own_removes: Mutex<Vec<PageRange>>,
    /// Bytes a CPU fault on a device page brings back (a power of two).
    pub(crate) fault_block: AtomicUsize,
    /// Faults the service holds for later.
    parked: AtomicUsize,
    /// mremaps of pages in flight, numbered, for their migrations to follow.
    remaps: Mutex<RemapLog>,
    /// Set while the service reads and handles a batch of events (see
    /// `sync_events`).
    busy: AtomicBool,
    /// Where the block the last device fault brought back ended (to see a
    /// sequential scan).
    pub(crate) last_block_end: AtomicUsize,
}

impl Shared {
    pub(crate) fn new(uffd: Uffd, notifiers: Arc<Notifiers>) -> rustix::io::Result<Self> {
        Ok(Self {
            uffd,
            notifiers,
            regions: Mutex::new(Regions::default()),
            stats: ServiceStats::default(),
            procmap: OnceLock::new(),
            pagemap: OnceLock::new(),
            pid: rustix::process::getpid(),
            released: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            wake: rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?,
            pagemaps: Mutex::new(Vec::new()),
            staging: OnceLock::new(),
            gate: Gate::default(),
            own_removes: Mutex::new(Vec::new()),
            fault_block: AtomicUsize::new(DEFAULT_FAULT_BLOCK),
            parked: AtomicUsize::new(0),
            remaps: Mutex::new((0, Vec::new())),
            busy: AtomicBool::new(false),
            last_block_end: AtomicUsize::new(0),
        })
    }

    pub(crate) fn add_pagemap(&self, pm: &Arc<PagemapInner>) {
        let mut p = lock(&self.pagemaps);
        p.retain(|(_, w)| w.strong_count() > 0);
        p.push((pm.owner, Arc::downgrade(pm)));
    }

    pub(crate) fn remove_pagemap(&self, owner: Owner) {
        lock(&self.pagemaps).retain(|(o, w)| *o != owner && w.strong_count() > 0);
    }

    pub(crate) fn device_pagemap(&self, owner: Owner) -> Option<Arc<PagemapInner>> {
        lock(&self.pagemaps)
            .iter()
            .find(|(o, _)| *o == owner)
            .and_then(|(_, w)| w.upgrade())
    }

    fn all_pagemaps(&self) -> Vec<Arc<PagemapInner>> {
        lock(&self.pagemaps)
            .iter()
            .filter_map(|(_, w)| w.upgrade())
            .collect()
    }

    /// Drops the reference a virtual page held on a device page.
    pub(crate) fn put_device_page(&self, owner: Owner, pfn: DevicePfn) {
        if let Some(pm) = self.device_pagemap(owner) {
            pm.put(pfn);
        }
    }

    /// Lets go of what dropped states held: device pages, exclusive holds.
    pub(crate) fn release_states(&self, gone: Vec<Stored>) {
        for s in gone {
            match s {
                Stored::Device(owner, pfn) => self.put_device_page(owner, pfn),
                Stored::Exclusive(_, hold) => {
                    if let Some(st) = self.staging.get() {
                        st.unhold(hold, true);
                    }
                }
                Stored::Migrating(_) | Stored::Cpu => {}
            }
        }
    }

    /// The staging area, made on first use.
    pub(crate) fn staging(&self) -> Result<&Staging, StagingError> {
        open_once(&self.staging, || Staging::new(&self.uffd))
    }

    /// Arms the managed `region`: registers it for MISSING faults too (and
    /// MINOR ones for private shmem file mappings, whose dropped pages the
    /// page cache would otherwise fill), so that a CPU access to a page
    /// taken out of the page table reaches the service.
    #[allow(unsafe_code)] // named place: uhmm's own changes to managed memory
    pub(crate) fn arm(&self, region: PageRange, vmas: &[Vma]) -> Result<(), MmError> {
        let minor = self.uffd.features().contains(Features::MINOR_SHMEM)
            && vmas
                .iter()
                .any(|v| v.kind() == VmaKind::File && v.is_shmem());
        let mut mode = RegisterMode::MISSING | RegisterMode::WP;
        if minor {
            mode |= RegisterMode::MINOR;
        }
        // SAFETY: a managed region already has no references into it (the
        // contract under which it was registered); the mode changes only.
        unsafe { self.uffd.register_range(region, mode) }?;
        lock(&self.regions).arm(region.start());
        Ok(())
    }

    /// Discards `range` of managed memory for uhmm's own purposes (a page
    /// that migrated by copy): its REMOVE event is not a user's discard.
    /// Never called on the service thread (the event waits for it).
    pub(crate) fn discard_own(&self, range: PageRange) -> Result<(), MemError> {
        lock(&self.own_removes).push(range);
        let res = self.discard(range);
        // Whatever of it no event took off the record (a failure, a part
        // that had no mapping) must not swallow a later discard of the user.
        self.sync_events();
        lock(&self.own_removes).retain(|r| !r.overlaps(range));
        res
    }

    /// `MADV_DONTNEED` on managed memory or staging (uhmm's own memory).
    #[allow(unsafe_code)] // named place: uhmm's own changes to managed memory
    pub(crate) fn discard(&self, range: PageRange) -> Result<(), MemError> {
        // SAFETY: managed memory has no references into it (the contract of
        // managed regions); staging slots are referenced only by the
        // migration that holds them, which is the caller.
        unsafe { mem::madvise(range, Advice::DontNeed) }
    }

    /// `UFFDIO_MOVE` of pages between managed memory and staging.
    #[allow(unsafe_code)] // named place: uhmm's own changes to managed memory
    pub(crate) fn move_pages(
        &self,
        dst: PageRange,
        src: crate::VirtAddr,
        mode: MoveMode,
    ) -> Result<Progress, OpError> {
        // SAFETY: both ends are managed memory (no references into it, by
        // the contract of managed regions) or staging slots held by the
        // caller, who has no slice over them alive while it moves pages.
        unsafe { self.uffd.move_pages(dst, src, mode) }
    }

    /// Whether `range` is (part of) a discard uhmm made itself; the part
    /// is taken off the record (the kernel sends one event per mapping).
    fn is_own_remove(&self, range: PageRange) -> bool {
        let mut own = lock(&self.own_removes);
        let Some(i) = own.iter().position(|r| r.contains_range(range)) else {
            return false;
        };
        let r = own.remove(i);
        if let Ok(head) = PageRange::from_bounds(r.start(), range.start()) {
            own.push(head);
        }
        if let Ok(tail) = PageRange::from_bounds(range.end(), r.end()) {
            own.push(tail);
        }
        true
    }

    /// Waits until the service has handled every event it has read.
    ///
    /// A thread that discards or unmaps managed memory returns from the
    /// system call once the service has *read* the event, not once it has
    /// invalidated the devices and dropped the pages' states; a device
    /// command right after must wait for that. Never call it on the service
    /// thread.
    pub(crate) fn sync_events(&self) {
        let mut spins = 0u32;
        while self.busy.load(Ordering::Acquire) {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// The number the next mremap of pages in flight will get.
    pub(crate) fn remap_mark(&self) -> u64 {
        lock(&self.remaps).0
    }

    /// The mremaps of pages in flight since `mark`, in order.
    pub(crate) fn remaps_since(&self, mark: u64) -> Vec<(PageRange, crate::VirtAddr)> {
        lock(&self.remaps)
            .1
            .iter()
            .filter(|&&(n, _, _)| n >= mark)
            .map(|&(_, old, to)| (old, to))
            .collect()
    }

    /// Has the service look at the faults waiting for pages in flight (if
    /// any wait).
    pub(crate) fn poke(&self) {
        if self.parked.load(Ordering::Acquire) > 0 {
            let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
        }
    }

    /// Brings every device page and exclusive page in `within` (everywhere
    /// if `None`) back to system memory, blocking.
    pub(crate) fn bring_home(&self, within: Option<PageRange>) {
        for pm in self.all_pagemaps() {
            let _ = crate::devmem::pagemap::evict(self, &pm, within, true);
        }
        let held: Vec<(crate::VirtAddr, Stored)> = {
            let pick = |s: Stored| matches!(s, Stored::Exclusive(..));
            lock(&self.regions).states.select(within, pick)
        };
        for (addr, s) in held {
            if let (Stored::Exclusive(owner, hold), Ok(page)) =
                (s, PageRange::new(addr, crate::PAGE_SIZE))
            {
                let _ = crate::devmem::exclusive::revoke(self, page, owner, hold, true);
            }
        }
    }

    /// Sends [`NotifyEvent::Release`] over the whole address space to every
    /// notifier, once: devices stop using the address space for good.
    pub(crate) fn release(&self) {
        if self.released.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Ok(all) = PageRange::new(crate::VirtAddr::new(0), usize::MAX - crate::PAGE_SIZE + 1)
        {
            let _ = self
                .notifiers
                .invalidate(&NotifierRange::new(all, NotifyEvent::Release));
        }
    }

    /// The process's maps, opened once.
    pub(crate) fn procmap(&self) -> Result<&Procmap, ProcmapError> {
        open_once(&self.procmap, Procmap::open)
    }

    /// The process's page table, opened once.
    pub(crate) fn pagemap(&self) -> Result<&Pagemap, PagemapError> {
        open_once(&self.pagemap, Pagemap::open)
    }

    /// Asks the service thread to finish its current batch and exit.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }
}

/// The value in `cell`, made by `open` on first use. (Racing first uses may
/// both open; one result is kept.)
fn open_once<T, E>(cell: &OnceLock<T>, open: impl FnOnce() -> Result<T, E>) -> Result<&T, E> {
    if let Some(v) = cell.get() {
        return Ok(v);
    }
    let opened = open()?;
    Ok(cell.get_or_init(|| opened))
}

/// Bytes a CPU fault on device memory brings back by default: the 2 MiB
/// block around the page (see `Mm::set_fault_block`).
pub(crate) const DEFAULT_FAULT_BLOCK: usize = 2 << 20;

/// The service loop; returns when [`Shared::stop`] is called.
pub(crate) fn run(shared: Arc<Shared>) {
    crate::sys::block_all_signals();
    let mut events: Vec<Event> = Vec::with_capacity(BATCH);
    let mut pending: Vec<NotifierRange> = Vec::with_capacity(BATCH);
    let mut parked: Vec<PageFault> = Vec::with_capacity(BATCH);
    loop {
        // Wait for events; while invalidations are pending or faults wait,
        // come back soon to retry them.
        let timeout = (!pending.is_empty() || !parked.is_empty()).then_some(Timespec {
            tv_sec: 0,
            tv_nsec: Duration::from_micros(200).as_nanos() as i64,
        });
        let mut fds = [
            PollFd::new(&shared.uffd, PollFlags::IN),
            PollFd::new(&shared.wake, PollFlags::IN),
        ];
        if let Err(e) = crate::sys::retry_eintr(|| poll(&mut fds, timeout.as_ref())) {
            // poll on two valid fds cannot fail but for EINTR/ENOMEM; back
            // off rather than spin.
            let _ = e;
            std::thread::sleep(Duration::from_millis(1));
        }
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let mut drain = [0u8; 8];
        let _ = rustix::io::read(&shared.wake, &mut drain);
        // Busy from before the read: a thread whose event this read
        // releases sees it set until the event is handled.
        shared.busy.store(true, Ordering::Release);
        if shared.uffd.read_events(&mut events).is_err() {
            std::thread::sleep(Duration::from_millis(1));
        }
        shared
            .stats
            .events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        for event in events.drain(..) {
            handle(&shared, event, &mut pending, &mut parked);
        }
        shared.busy.store(false, Ordering::Release);
        retry_pending(&shared, &mut pending);
        shared.parked.store(parked.len(), Ordering::Release);
        if !parked.is_empty() {
            let waiting = std::mem::take(&mut parked);
            for f in waiting {
                if fault::serve(&shared, f) == fault::Served::Park {
                    parked.push(f);
                }
            }
            shared.parked.store(parked.len(), Ordering::Release);
        }
    }
}

fn handle(
    shared: &Shared,
    event: Event,
    pending: &mut Vec<NotifierRange>,
    parked: &mut Vec<PageFault>,
) {
    let invalidate = |range: PageRange, kind: NotifyEvent, pending: &mut Vec<NotifierRange>| {
        // Only managed memory is mirrored: the staging area's own events
        // (and any other registered memory) concern no device.
        if lock(&shared.regions).overlapping(range).is_none() {
            return;
        }
        let r = NotifierRange::new(range, kind).non_blocking();
        crate::trace::event!(
            target: "uhmm::invalidate",
            event = ?kind,
            start = %range.start(),
            pages = range.npages(),
            "invalidation from a userfaultfd event"
        );
        if shared.notifiers.invalidate(&r).is_err() {
            pending.push(r);
        }
    };
    match event {
        Event::PageFault(f) => {
            shared.stats.faults.fetch_add(1, Ordering::Relaxed);
            if fault::serve(shared, f) == fault::Served::Park {
                shared.stats.faults_waited.fetch_add(1, Ordering::Relaxed);
                parked.push(f);
            }
        }
        Event::Remove { range } => {
            if shared.is_own_remove(range) {
                return;
            }
            invalidate(range, NotifyEvent::Clear, pending);
            // Discarded pages lose their device pages and exclusive holds.
            // A page in flight keeps its state: its migration decides.
            let gone = {
                let mut regions = lock(&shared.regions);
                let mut gone = Vec::new();
                for (addr, st) in regions.states.entries(range) {
                    if !matches!(st, Stored::Migrating(_)) {
                        let _ = regions.states.set(addr, Stored::Cpu);
                        gone.push(st);
                    }
                }
                gone
            };
            shared.release_states(gone);
        }
        Event::Unmap { range } => {
            invalidate(range, NotifyEvent::Unmap, pending);
            let mut gone = Vec::new();
            lock(&shared.regions).unmapped(range, |_, s| gone.push(s));
            shared.release_states(gone);
        }
        Event::Remap { from, to, old_len } => {
            if let Ok(old) = PageRange::new(from, old_len) {
                invalidate(old, NotifyEvent::Remap, pending);
                let mut gone = Vec::new();
                let mut regions = lock(&shared.regions);
                // Pages in flight move with their state; their migrations
                // follow them through this log when they finish.
                if regions
                    .states
                    .entries(old)
                    .iter()
                    .any(|(_, s)| matches!(s, Stored::Migrating(_)))
                {
                    let mut log = lock(&shared.remaps);
                    let n = log.0;
                    log.0 += 1;
                    log.1.push((n, old, to));
                }
                regions.moved(old, to, |_, s| gone.push(s));
                drop(regions);
                shared.release_states(gone);
            }
        }
        // Not requested (see `Mm::new`); should one come, closing the
        // child's context unregisters the child's copies.
        Event::Fork { child } => drop(child),
        Event::Unknown { .. } => {}
    }
}

fn retry_pending(shared: &Shared, pending: &mut Vec<NotifierRange>) {
    if pending.is_empty() {
        return;
    }
    shared.stats.retries.fetch_add(1, Ordering::Relaxed);
    pending.retain(|r| shared.notifiers.invalidate(r).is_err());
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Holds migrations off while a fork is prepared: a fork must not copy a
/// page table with pages in flight. The forking thread itself passes.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    st: Mutex<(usize, bool)>,
    cv: Condvar,
}

thread_local! {
    static FORKING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Gate {
    /// One more migration; `false` if it must not start now (a fork is
    /// being prepared and the caller cannot wait).
    pub(crate) fn enter(&self, blockable: bool) -> bool {
        let mut st = lock(&self.st);
        if !FORKING.with(|f| f.get()) {
            while st.1 {
                if !blockable {
                    return false;
                }
                st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
        st.0 += 1;
        true
    }

    pub(crate) fn leave(&self) {
        let mut st = lock(&self.st);
        st.0 = st.0.saturating_sub(1);
        drop(st);
        self.cv.notify_all();
    }

    /// Closes the gate and waits for migrations in flight (fork prepare).
    pub(crate) fn close(&self) {
        FORKING.with(|f| f.set(true));
        let mut st = lock(&self.st);
        st.1 = true;
        while st.0 > 0 {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Opens it again (after the fork, in parent and child).
    pub(crate) fn open(&self) {
        FORKING.with(|f| f.set(false));
        let mut st = lock(&self.st);
        st.1 = false;
        drop(st);
        self.cv.notify_all();
    }
}
