//! How the fault service resolves a page fault on managed memory.
//!
//! A fault reaches the service only in an armed region (one that device
//! memory or exclusive access has been used in), or on a page uhmm
//! write-protected while it copies it. What the page's state says:
//!
//! - *Migrating*: the fault waits (is parked) until the migration ends;
//! - *Device*: the owner's `migrate_to_ram` brings back the block of pages
//!   around it that the fault policy chooses, installing them atomically
//!   and waking every thread waiting on them;
//! - *Exclusive*: the device loses its exclusive access (an Exclusive
//!   invalidation) and the page comes back;
//! - otherwise it is a plain hole (or a page whose write protection was
//!   lifted): it is filled as the kernel would (the zero page for a read,
//!   a zeroed page for a write, the page-cache page for a minor fault).
//!
//! Nothing here blocks on a lock a faulting thread can hold: callbacks run
//! in non-blocking mode and a fault that cannot be served now is parked and
//! served again on the next turn of the service loop.

use super::notifier::{NotifierRange, NotifyEvent};
use super::service::{Shared, lock};
use super::state::{Stored, WatchId};
use crate::addr::{PAGE_SIZE, PageRange, VirtAddr};
use crate::devmem::pagemap::{DeviceFault, FaultError};
use crate::sys::uffd::{ContinueMode, CopyMode, FaultFlags, OpError, PageFault, Progress, Stop};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// What became of a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Served {
    /// Resolved (or found resolved); the thread was woken.
    Done,
    /// Not now: serve it again later.
    Park,
    /// The page's device could not bring it back this time: serve it
    /// again later, within the bounds of [`Attempts`]. With the page's
    /// state then.
    Failed(Failure, Stored),
}

/// How a device failed a fault back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// It asked to be called again ([`FaultError::Retry`](crate::devmem::FaultError::Retry)),
    /// or said it was done while the page stayed on it.
    Busy,
    /// It failed, or panicked.
    Device,
    /// The page stayed on it because the kernel refused its install for a
    /// pending layout change (EAGAIN: a discard, unmap or mremap whose
    /// thread has not run again since its event was read). Not the
    /// device's doing, and not bounded: the data is intact, and an install
    /// gets in between two changes (`uhmm::mm::service::LayoutWait`).
    /// Bounding it lost pages: another thread's mremap loop kept a fault
    /// back refused for 10 s. Only a refusal seen in the call counts: a
    /// device that keeps asking to be called again while another thread
    /// discards in a loop is still bounded.
    Layout,
}

/// Failed calls in a row of a device's `migrate_to_ram` for one fault
/// after which the access fails with SIGBUS (the kernel's
/// `VM_FAULT_SIGBUS`)...
pub(crate) const FAULT_FAILURES: u32 = 8;
/// ...or the time it has failed every call for after which it does. A
/// call that does not fail (the device asked to be called again, or its
/// page stayed for a pending layout change) ends the run of failures: a
/// device whose failures are spread out is flaky, not gone, and losing
/// its page for them would lose data a later call gives back.
pub(crate) const FAULT_FAILING_FOR: Duration = Duration::from_secs(1);
/// The time a device may keep asking to be called again for one fault
/// before the access fails with SIGBUS all the same.
pub(crate) const FAULT_BUSY_FOR: Duration = Duration::from_secs(10);

/// A fault message the service holds, with the number of the read that
/// brought it ([`Shared::batches_read`] once that read was counted).
///
/// A held message can be stale: its thread is woken by any wake of its
/// page (a migration putting the page back, a fault block filled for
/// another fault), and then goes on, while the service still holds the
/// message and serves it later. Serving a stale fault brings the page back
/// as it is now, which costs a copy and no data; but what the message says
/// about its thread — that it waits — may no longer be true, so nothing
/// that would be wrong without a waiting access (losing the page, a
/// self-deadlock report) rests on a message alone: the page is woken
/// first, and only a fault read after that wake counts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Held {
    pub(crate) fault: PageFault,
    pub(crate) read: u64,
}

/// How a parked fault's device has failed it so far.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Attempts {
    failures: u32,
    failing_since: Option<Instant>,
    busy_since: Option<Instant>,
    /// The fault was read after its page was woken, once these attempts
    /// had passed the bounds: an access waits for the page, as long as
    /// this watch on it (taken at the wake) reads unchanged.
    pub(crate) waits: Option<WatchId>,
}

impl Attempts {
    /// Ends a run of failures: the page left its device meanwhile (the
    /// fault waited for something else), or the device answered a call
    /// without failing.
    pub(crate) fn clear_failures(&mut self) {
        self.failures = 0;
        self.failing_since = None;
    }

    /// Records `failure`; true once the fault has failed past the bounds.
    pub(crate) fn exhausted(&mut self, failure: Failure) -> bool {
        let now = Instant::now();
        match failure {
            Failure::Busy => {
                self.clear_failures();
                let since = *self.busy_since.get_or_insert(now);
                now.duration_since(since) >= crate::testing::loss_bound(FAULT_BUSY_FOR)
            }
            Failure::Layout => {
                self.clear_failures();
                self.busy_since = None;
                false
            }
            Failure::Device => {
                self.failures += 1;
                let since = *self.failing_since.get_or_insert(now);
                self.failures >= FAULT_FAILURES || now.duration_since(since) >= FAULT_FAILING_FOR
            }
        }
    }
}

/// Fails the access `f` made with SIGBUS: its page, if still in the state
/// `seen` its device failed it in, is poisoned (the kernel's answer to a
/// device that cannot give a page back; a read(2) into it gets EFAULT)
/// and counted. Devices are told first (a `Clear` invalidation: the device
/// page is freed), and the thread is woken last. `Park` if the page moved
/// on meanwhile (to be served afresh) — also if `watch`, the fault's proof
/// that its access waits, reads changed at the last look (the page went
/// home, which woke the thread, and came back while the devices were
/// told) — `Failed` if an invalidation callback could not run now (to be
/// tried again).
pub(crate) fn sigbus(
    shared: &Shared,
    f: PageFault,
    seen: Stored,
    watch: Option<WatchId>,
) -> Served {
    let Some(page) = f.page() else {
        return Served::Done;
    };
    if lock(&shared.regions).states.get(page.start()) != seen {
        return Served::Park;
    }
    let notify = NotifierRange::new(page, NotifyEvent::Clear).non_blocking();
    let Ok(guard) = shared.notifiers.invalidate_start(&notify) else {
        return Served::Failed(Failure::Busy, seen);
    };
    let regions = lock(&shared.regions);
    if regions.states.get(page.start()) != seen || watch.is_some_and(|w| regions.states.changed(w))
    {
        return Served::Park;
    }
    shared.stats.faults_sigbus.fetch_add(1, Ordering::Relaxed);
    let served = lose_page(shared, regions, page, seen);
    drop(guard);
    crate::trace::event!(
        target: "uhmm::fault",
        addr = %f.addr,
        thread = ?f.thread,
        "the device could not bring the page back: the access gets SIGBUS"
    );
    served
}

/// Loses the faulting `page`, whose state (found under `regions`) is the
/// device page `held`: poisons it, frees what the state held, and only
/// then wakes the thread (bookkeeping first: it might look at the pagemap
/// at once). `Park` while the poison waits for a pending layout change
/// (the `Lost` arm finishes it), `Done` otherwise.
fn lose_page(
    shared: &Shared,
    mut regions: std::sync::MutexGuard<'_, super::regions::Regions>,
    page: PageRange,
    held: Stored,
) -> Served {
    shared.lose_locked_woken(&mut regions, page, false);
    let pending = regions.states.get(page.start()) == Stored::Lost;
    drop(regions);
    shared.release_states(vec![held]);
    if pending {
        return Served::Park;
    }
    let _ = shared.uffd.wake(page);
    Served::Done
}

/// The bytes of a 2 MiB device page.
const HUGE: usize = crate::devmem::pagemap::HUGE_PAGES * PAGE_SIZE;

/// Whether the page at `addr` is a page of a 2 MiB device page of `owner`
/// (states read under the regions lock, the pool asked with it let go:
/// DESIGN.md's lock order).
fn in_huge_page(
    shared: &Shared,
    pm: &crate::devmem::pagemap::PagemapInner,
    owner: super::Owner,
    addr: crate::VirtAddr,
) -> bool {
    let st = lock(&shared.regions).states.get(addr);
    matches!(st, Stored::Device(o, pfn) if o == owner && pm.is_huge(pfn))
}

/// `range` (a fault's, around `page`) without the part of a 2 MiB device
/// page it would take only in part (which would split it): cut at that
/// page's block.
fn whole_huge_pages(
    shared: &Shared,
    pm: &crate::devmem::pagemap::PagemapInner,
    owner: super::Owner,
    range: PageRange,
    page: PageRange,
) -> PageRange {
    let last = VirtAddr::new(range.end().get() - PAGE_SIZE);
    let block = last.align_down(HUGE);
    if block > page.start()
        && block.get() + HUGE > range.end().get()
        && in_huge_page(shared, pm, owner, last)
    {
        return PageRange::from_bounds(range.start(), block).unwrap_or(range);
    }
    range
}

/// The read-ahead range `next` made of whole 2 MiB device pages: one it
/// starts in is taken whole (if inside `region`), one it ends in part of
/// is left out; `None` if nothing is left.
fn read_ahead_range(
    shared: &Shared,
    pm: &crate::devmem::pagemap::PagemapInner,
    owner: super::Owner,
    next: PageRange,
    region: PageRange,
) -> Option<PageRange> {
    let first = next.start().align_down(HUGE);
    if first != next.start() && in_huge_page(shared, pm, owner, next.start()) {
        let block = PageRange::new(first, HUGE).ok()?;
        return region.contains_range(block).then_some(block);
    }
    let last = VirtAddr::new(next.end().get() - PAGE_SIZE);
    let block = last.align_down(HUGE);
    if block.get() + HUGE > next.end().get() && in_huge_page(shared, pm, owner, last) {
        return PageRange::from_bounds(next.start(), block).ok();
    }
    Some(next)
}

/// The largest read-ahead window of a sequential scan with a fault block
/// smaller than this.
pub(crate) const READ_AHEAD_MAX: usize = 512 << 10;

/// A zeroed page, the source for write faults on holes.
pub(crate) static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

pub(crate) fn serve(shared: &Shared, held: Held) -> Served {
    let f = held.fault;
    let Some(page) = f.page() else {
        return Served::Done;
    };
    // Served under the regions lock against the state the page has now
    // (a parked fault is served again the same way): an operation changes
    // a page's entry and its state together under this lock, so a hole is
    // never filled behind its back, and a page it holds is waited for.
    let mut regions = lock(&shared.regions);
    let region = regions.containing(page).map(|r| r.range);
    match regions.states.get(page.start()) {
        Stored::Migrating(op) => {
            let mut report = None;
            if let Some(o) = regions.op_mut(op)
                && f.thread == Some(o.thread)
                && !o.deadlock_reported
            {
                // Faults carry the thread id: this thread set the
                // operation up. If it waits now for it to end, then unless
                // it handed the migration to another thread, it never will.
                // But the message may be stale (see `Held`): the thread
                // may have been woken before it set the operation up. So
                // it is first woken here, and the message dropped: a
                // thread that does wait faults again at once, and that
                // fault, read after the wake, is reported.
                match o.probed {
                    Some(woken) if held.read > woken => {
                        o.deadlock_reported = true;
                        shared.stats.self_deadlocks.fetch_add(1, Ordering::Relaxed);
                        report = Some((o.thread, o.range));
                    }
                    probed => {
                        if probed.is_none() {
                            o.probed = Some(shared.batches_read());
                        }
                        let _ = shared.uffd.wake(page);
                        return Served::Done;
                    }
                }
            }
            drop(regions);
            if let Some((thread, range)) = report {
                // Not under the lock (it reads the thread's name), and a
                // closed stderr is no panic.
                let name = std::fs::read_to_string(format!("/proc/self/task/{thread}/comm"))
                    .map(|n| format!(" ({})", n.trim_end()))
                    .unwrap_or_default();
                let text = format!(
                    "uhmm: thread {thread}{name} touched {}, a page of the migration of \
                     {range} it set up itself, and waits for that migration to end: unless \
                     another thread finishes it, this is a deadlock. Call pages() and \
                     finalize() (or drop the MigrateVma) before touching its pages.\n",
                    f.addr
                );
                let _ = std::io::Write::write_all(&mut std::io::stderr(), text.as_bytes());
            }
            Served::Park
        }
        // Lost while its poison was refused: poison it now (the access
        // gets SIGBUS), or once the pending layout change is applied.
        Stored::Lost => match shared.uffd.poison(page, true) {
            Ok(p) if p.stop == Some(Stop::LayoutChanging) => Served::Park,
            // Poisoned, and the thread woken.
            Ok(p) if p.is_complete() => {
                let _ = regions.states.set(page.start(), Stored::Cpu);
                Served::Done
            }
            // Filled meanwhile, or not to be poisoned here: served as the
            // hole it is for the CPU (which wakes the thread).
            _ => {
                let _ = regions.states.set(page.start(), Stored::Cpu);
                let (served, _) = fill_hole(shared, page, f.flags);
                drop(regions);
                served
            }
        },
        Stored::Cpu if f.flags.contains(FaultFlags::WP) => {
            shared.stats.faults_wp.fetch_add(1, Ordering::Relaxed);
            // Under the lock: the fault may be stale (parked through a
            // migration's copy window), and an operation that takes the
            // page meanwhile write-protects it on purpose, under this
            // lock; lifted after, its copy would miss a CPU write.
            let _ = shared.uffd.write_protect(page, false, true);
            drop(regions);
            Served::Done
        }
        // A hole — of a managed region, or of memory that left the table
        // (unregistered or unmapped meanwhile; a fault there is filled as
        // the kernel would, never left to retry for ever).
        Stored::Cpu => {
            shared.stats.faults_hole.fetch_add(1, Ordering::Relaxed);
            if region.is_none() {
                // Registered here, and nothing manages it: its
                // registration is to go.
                shared.note_stale(&mut regions, page, true);
            }
            let (served, filled) = fill_hole(shared, page, f.flags);
            if filled {
                // It was a hole: any discard of it in progress is done. (A
                // page found present instead means a stale fault, parked
                // while the page was in flight, say: a discard whose zap
                // is still to come may have fenced it.)
                regions.unfence(page);
            }
            drop(regions);
            served
        }
        Stored::Device(owner, pfn) => {
            drop(regions);
            let region = region.unwrap_or(page);
            let block = shared.fault_block.load(Ordering::Relaxed).max(PAGE_SIZE);
            // A fault right where the last one's pages (and read-ahead)
            // ended is a sequential scan: it brings back a window that
            // doubles with each such fault, up to `READ_AHEAD_MAX`
            // (the fault block where that is larger); any other fault
            // brings back its block. (A failure ends the scan: see below.)
            let aligned = page.start().align_down(block);
            let sequential = shared.last_block_end.load(Ordering::Relaxed) == aligned.get();
            let window = if sequential {
                (shared.window.load(Ordering::Relaxed) * 2).clamp(block, block.max(READ_AHEAD_MAX))
            } else {
                block
            };
            let start = aligned.max(region.start());
            let end = aligned
                .checked_add(window)
                .map_or(region.end(), |e| e.min(region.end()));
            let Ok(range) = PageRange::from_bounds(start, end) else {
                return Served::Park;
            };
            let Some(pm) = shared.device_pagemap(owner) else {
                // Its device memory is gone without giving the page back:
                // the data is lost with the device. The access gets SIGBUS
                // (as the kernel's VM_FAULT_SIGBUS), never zeros, never a
                // wait.
                let regions = lock(&shared.regions);
                return match regions.states.get(page.start()) {
                    s @ Stored::Device(o, _) if o == owner => lose_page(shared, regions, page, s),
                    _ => Served::Done,
                };
            };
            // A 2 MiB device page comes back whole, as one unit (the
            // kernel migrates a device-private THP's folio back whole) —
            // unless that failed for this block last time: then the
            // fault's own range, which splits it (the kernel's fallback).
            // A range never takes part of another 2 MiB device page.
            let huge_block = PageRange::new(page.start().align_down(HUGE), HUGE)
                .ok()
                .filter(|b| {
                    pm.is_huge(pfn)
                        && region.contains_range(*b)
                        && shared.huge_failed.load(Ordering::Relaxed) != b.start().get()
                });
            let range = match huge_block {
                Some(block) => block,
                None => whole_huge_pages(shared, &pm, owner, range, page),
            };
            let fault = DeviceFault {
                shared,
                owner,
                range,
                addr: Some(f.addr),
                blockable: false,
            };
            // Events the service reads during the call (to install what
            // they refused: `Shared::read_events_here`) may take the page
            // itself away — discarded, unmapped, moved — which leaves it
            // `Cpu` too, but neither installed nor its thread woken.
            let batches = shared.batches_read();
            lock(&shared.regions).serving = Some(super::regions::Serving::new(page.start()));
            let called = pm.migrate_to_ram(&fault);
            let events_read = shared.batches_read() != batches;
            if called.is_ok() {
                pm.faulted_back.fetch_add(1, Ordering::Relaxed);
            }
            // Served once the page is back; otherwise (the device asked to
            // retry, or failed) look again on the next turn.
            crate::trace::event!(
                target: "uhmm::fault",
                owner = owner.get(),
                addr = %f.addr,
                block_pages = range.npages(),
                "CPU fault on device memory served"
            );
            // Put in place meanwhile (by this call or any other install):
            // served, whatever the page holds now (its thread may have moved
            // it back to the device since; if it touches it again, it faults
            // again).
            let (now, installed, refused) = {
                let mut regions = lock(&shared.regions);
                let serving = regions.serving.take();
                let installed = serving.is_some_and(|s| s.installed);
                let refused = serving.is_some_and(|s| s.refused);
                (regions.states.get(page.start()), installed, refused)
            };
            let served = match now {
                // Served again as the hole it may be (which wakes the
                // thread: a page installed meanwhile says EEXIST).
                Stored::Cpu if events_read => {
                    shared.last_block_end.store(0, Ordering::Relaxed);
                    return Served::Park;
                }
                Stored::Cpu => {
                    shared.stats.faults_device.fetch_add(1, Ordering::Relaxed);
                    shared.window.store(window, Ordering::Relaxed);
                    let _ = shared.huge_failed.compare_exchange(
                        range.start().get(),
                        0,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    Served::Done
                }
                _ if installed => {
                    shared.last_block_end.store(0, Ordering::Relaxed);
                    return Served::Done;
                }
                // Still on this device: it failed, asked to be called
                // again, or said it was done without bringing the page back
                // (a pending layout change refused the install, say): only
                // a failure counts towards the failure bound; the rest is
                // bounded by time.
                s @ Stored::Device(o, _) if o == owner => {
                    // The scan ends here: the fault is served again with
                    // its block alone (a page the device can give back is
                    // never failed for a neighbour it cannot); a 2 MiB
                    // device page, with the fault's own range.
                    shared.last_block_end.store(0, Ordering::Relaxed);
                    if let Some(b) = huge_block {
                        shared.huge_failed.store(b.start().get(), Ordering::Relaxed);
                    }
                    let why = match called {
                        Err(
                            FaultError::Device(_)
                            | FaultError::NoMemory
                            | FaultError::ForkedChild(_),
                        ) => Failure::Device,
                        // An install of it refused: the data waits for its
                        // window (see `LayoutWait`).
                        Err(FaultError::Retry) | Ok(()) if refused => Failure::Layout,
                        Err(FaultError::Retry) | Ok(()) => Failure::Busy,
                    };
                    return Served::Failed(why, s);
                }
                _ => {
                    shared.last_block_end.store(0, Ordering::Relaxed);
                    return Served::Park;
                }
            };
            // In a sequential scan, bring the next window back now, while
            // the thread reads this one (it was woken when its pages were
            // installed).
            shared
                .last_block_end
                .store(range.end().get(), Ordering::Relaxed);
            if sequential
                && window > PAGE_SIZE
                && let Ok(next) = PageRange::new(range.end(), window)
                && let Some(next) = next.intersection(region)
                && let Some(next) = read_ahead_range(shared, &pm, owner, next, region)
            {
                let ahead = DeviceFault {
                    shared,
                    owner,
                    range: next,
                    addr: None,
                    blockable: false,
                };
                if pm.migrate_to_ram(&ahead).is_ok() {
                    shared
                        .last_block_end
                        .store(next.end().get(), Ordering::Relaxed);
                }
            }
            served
        }
        Stored::Exclusive(owner, hold) => {
            drop(regions);
            match crate::devmem::exclusive::revoke(shared, page, owner, hold, false) {
                Ok(()) => {
                    shared
                        .stats
                        .faults_exclusive
                        .fetch_add(1, Ordering::Relaxed);
                    Served::Done
                }
                Err(()) => Served::Park,
            }
        }
    }
}

/// Fills a hole the CPU touched, as the kernel would have without uhmm;
/// also says whether it filled one (the page may be present already).
fn fill_hole(shared: &Shared, page: PageRange, flags: FaultFlags) -> (Served, bool) {
    let res: Result<Progress, OpError> = if flags.contains(FaultFlags::MINOR) {
        shared.uffd.continue_range(page, ContinueMode::empty())
    } else if flags.contains(FaultFlags::WRITE) {
        shared.uffd.copy(
            page,
            crate::VirtAddr::from_ptr(ZERO_PAGE.as_ptr()),
            CopyMode::empty(),
        )
    } else {
        match shared.uffd.zeropage(page, true) {
            // Not on this memory (shmem): a zeroed copy then.
            Err(OpError::Invalid { .. }) => shared.uffd.copy(
                page,
                crate::VirtAddr::from_ptr(ZERO_PAGE.as_ptr()),
                CopyMode::empty(),
            ),
            r => r,
        }
    };
    match res {
        Ok(p) => match p.stop {
            None => (Served::Done, true),
            // The layout is changing: read those events first.
            Some(Stop::LayoutChanging) => (Served::Park, false),
            Some(_) => {
                let _ = shared.uffd.wake(page);
                (Served::Done, false)
            }
        },
        Err(_) => {
            let _ = shared.uffd.wake(page);
            (Served::Done, false)
        }
    }
}
