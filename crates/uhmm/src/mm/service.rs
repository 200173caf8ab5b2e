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
use crate::addr::PageRange;
use crate::sys::pagemap::{Pagemap, PagemapError};
use crate::sys::procmap::{Procmap, ProcmapError};
use crate::sys::uffd::{Event, Uffd, event::BATCH};
use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec, poll};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// What the service counts (cheap atomics, read as a snapshot).
#[derive(Debug, Default)]
pub(crate) struct ServiceStats {
    pub(crate) events: AtomicU64,
    pub(crate) faults: AtomicU64,
    pub(crate) retries: AtomicU64,
}

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
        })
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

/// The service loop; returns when [`Shared::stop`] is called.
pub(crate) fn run(shared: Arc<Shared>) {
    crate::sys::block_all_signals();
    let mut events: Vec<Event> = Vec::with_capacity(BATCH);
    let mut pending: Vec<NotifierRange> = Vec::with_capacity(BATCH);
    loop {
        // Wait for events; while invalidations are pending, come back soon
        // to retry them.
        let timeout = (!pending.is_empty()).then_some(Timespec {
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
        if shared.uffd.read_events(&mut events).is_err() {
            std::thread::sleep(Duration::from_millis(1));
        }
        shared
            .stats
            .events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        for event in events.drain(..) {
            handle(&shared, event, &mut pending);
        }
        retry_pending(&shared, &mut pending);
    }
}

fn handle(shared: &Shared, event: Event, pending: &mut Vec<NotifierRange>) {
    let invalidate = |range: PageRange, kind: NotifyEvent, pending: &mut Vec<NotifierRange>| {
        let r = NotifierRange::new(range, kind).non_blocking();
        if shared.notifiers.invalidate(&r).is_err() {
            pending.push(r);
        }
    };
    match event {
        Event::PageFault(f) => {
            // Managed regions are registered for write-protect faults only,
            // and nothing in this layer write-protects yet: a fault here is
            // stray. Never leave the thread blocked: un-protect and wake.
            shared.stats.faults.fetch_add(1, Ordering::Relaxed);
            if let Some(page) = f.page() {
                let _ = shared.uffd.write_protect(page, false, true);
            }
        }
        Event::Remove { range } => {
            invalidate(range, NotifyEvent::Clear, pending);
            lock(&shared.regions).states.clear(range, |_, _| {});
        }
        Event::Unmap { range } => {
            invalidate(range, NotifyEvent::Unmap, pending);
            lock(&shared.regions).unmapped(range);
        }
        Event::Remap { from, to, old_len } => {
            if let Ok(old) = PageRange::new(from, old_len) {
                invalidate(old, NotifyEvent::Remap, pending);
                lock(&shared.regions).moved(old, to);
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
