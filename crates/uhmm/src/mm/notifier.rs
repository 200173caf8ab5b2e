//! Interval notifiers: how a device learns of every change to a range of the
//! address space it mirrors, with the kernel's `mmu_interval_notifier`
//! sequence protocol.
//!
//! A device [inserts](Notifiers::insert) a notifier over the range it
//! mirrors. Every change to that range (an unmap, a discard, a migration...)
//! runs its [`NotifierOps::invalidate`] between an *invalidate start* and
//! *end*; the callback must stop all device use of the range before it
//! returns, and call [`Subscription::set_seq`] under the device's own lock.
//!
//! The device populates its page table with the read-begin / retry loop
//! (`Documentation/mm/hmm.rst`):
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use uhmm::mm::notifier::{NotifierOps, NotifierRange, Notifiers, NotifyEvent, Subscription};
//! use uhmm::{PageRange, VirtAddr, PAGE_SIZE};
//!
//! #[derive(Debug, Default)]
//! struct Device { table: Mutex<Vec<u64>> } // the device page table, under its update lock
//!
//! impl NotifierOps for Device {
//!     fn invalidate(&self, sub: &Subscription, _r: &NotifierRange, cur_seq: u64) -> bool {
//!         let mut table = self.table.lock().unwrap();
//!         sub.set_seq(cur_seq);
//!         table.clear(); // stop using the range
//!         true
//!     }
//! }
//!
//! let tree = Notifiers::new();
//! let range = PageRange::new(VirtAddr::new(0x10_0000), 4 * PAGE_SIZE)?;
//! let dev = Arc::new(Device::default());
//! let notifier = tree.insert(range, dev.clone())?;
//! loop {
//!     let seq = notifier.read_begin();
//!     let entries = vec![1, 2, 3, 4]; // snapshot the CPU page table (range_fault)
//!     let mut table = dev.table.lock().unwrap();
//!     if notifier.read_retry(seq) {
//!         continue; // an invalidation raced with the snapshot
//!     }
//!     *table = entries; // program the device page table
//!     break;
//! }
//! tree.invalidate(&NotifierRange::new(range, NotifyEvent::Clear))?;
//! assert!(dev.table.lock().unwrap().is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Sequence rules, as in the kernel: the tree's sequence starts at 2 and is
//! even when no invalidation touching a notifier is running; while one runs
//! it is odd, and the notifiers it hits get that odd value from `set_seq`.
//! An idle notifier's sequence is the tree's minus one. [`read_begin`]
//! waits while the notifier's sequence equals the tree's (an invalidation of
//! it is running), so a snapshot never starts inside one; [`read_retry`]
//! says whether one ran since. An insert during an invalidation takes effect
//! when the last running invalidation ends (and its `read_begin` waits until
//! then); a remove during one waits for it, after which no callback runs.
//!
//! [`read_begin`]: IntervalNotifier::read_begin
//! [`read_retry`]: IntervalNotifier::read_retry

use super::{ForkedChild, Owner};
use crate::addr::PageRange;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Why a range is being invalidated (the kernel's `mmu_notifier_event`,
/// with uhmm's userspace sources).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NotifyEvent {
    /// The range was unmapped (munmap).
    Unmap,
    /// Its pages were discarded (`MADV_DONTNEED`, `MADV_REMOVE`).
    Clear,
    /// The range was moved by mremap; it is gone from its old address.
    Remap,
    /// The process forked: private pages became copy-on-write.
    Fork,
    /// Its protection changed (`Mm::mprotect`, write-protection).
    Protection,
    /// Its pages are being migrated by the [`NotifierRange::owner`] device.
    Migrate,
    /// Its pages are being made exclusive to the [`NotifierRange::owner`] device.
    Exclusive,
    /// The address space is going away: stop all use, for good.
    Release,
}

impl NotifyEvent {
    /// Every event, in a fixed order.
    pub const ALL: [NotifyEvent; 8] = [
        NotifyEvent::Unmap,
        NotifyEvent::Clear,
        NotifyEvent::Remap,
        NotifyEvent::Fork,
        NotifyEvent::Protection,
        NotifyEvent::Migrate,
        NotifyEvent::Exclusive,
        NotifyEvent::Release,
    ];

    fn index(self) -> usize {
        Self::ALL.iter().position(|&e| e == self).unwrap_or(0)
    }
}

/// One invalidation: which pages, why, on whose behalf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotifierRange {
    /// The pages invalidated.
    pub range: PageRange,
    /// Why.
    pub event: NotifyEvent,
    /// The device that caused it (for `Migrate`, `Exclusive`), so a device
    /// can skip invalidations caused by its own operations.
    pub owner: Option<Owner>,
    /// Whether the callback may block. When `false` a callback that would
    /// have to wait for a lock returns `false`, and the invalidation is
    /// reported as [`Retry`] to be done again later.
    pub blockable: bool,
}

impl NotifierRange {
    /// A blockable invalidation with no owner.
    pub fn new(range: PageRange, event: NotifyEvent) -> Self {
        Self {
            range,
            event,
            owner: None,
            blockable: true,
        }
    }

    /// The same, caused by `owner`.
    pub fn with_owner(mut self, owner: Owner) -> Self {
        self.owner = Some(owner);
        self
    }

    /// The same, in a context that must not block.
    pub fn non_blocking(mut self) -> Self {
        self.blockable = false;
        self
    }
}

/// A device's reaction to invalidations.
pub trait NotifierOps: Send + Sync + fmt::Debug {
    /// Stop all device use of `range.range ∩ sub.range()` before returning,
    /// and call `sub.set_seq(cur_seq)` under the lock the device's populate
    /// path holds around [`IntervalNotifier::read_retry`].
    ///
    /// Return `false` only when `range.blockable` is false and the work
    /// would have to block; the invalidation is then retried by its caller.
    /// Must not insert or remove notifiers of the same tree and wait for it.
    fn invalidate(&self, sub: &Subscription, range: &NotifierRange, cur_seq: u64) -> bool;
}

/// An invalidation could not run without blocking; do it again later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an interval notifier could not invalidate {range} without blocking; retry")]
pub struct Retry {
    /// The range to invalidate again.
    pub range: PageRange,
}

/// One registered notifier, as its callback sees it.
#[derive(Debug)]
pub struct Subscription {
    range: PageRange,
    seq: AtomicU64,
    ops: Arc<dyn NotifierOps>,
}

impl Subscription {
    /// The range the notifier covers.
    pub fn range(&self) -> PageRange {
        self.range
    }

    /// Records that an invalidation with sequence `cur_seq` hit this
    /// notifier. Call it from [`NotifierOps::invalidate`], under the
    /// device's update lock.
    pub fn set_seq(&self, cur_seq: u64) {
        self.seq.store(cur_seq, Ordering::Release);
    }
}

#[derive(Debug)]
struct State {
    /// Even when idle, odd while an invalidation that hit a notifier runs.
    seq: u64,
    /// Invalidations between start and end.
    active: usize,
    subs: Vec<Arc<Subscription>>,
    /// Inserts made while invalidating, applied when the last one ends.
    deferred: Vec<Arc<Subscription>>,
    /// Threads waiting on `idle`: an end that nobody waits for signals
    /// nobody (a condvar's notify is a system call, waiters or not).
    waiting: usize,
}

/// The notifiers of one address space.
///
/// A tree belongs to the process that made it (with its [`Mm`](super::Mm)):
/// in a forked child, [`insert`](Self::insert) returns [`ForkedChild`], and
/// the inherited [`IntervalNotifier`]s neither wait nor unregister (the
/// threads that ran the parent's invalidations do not exist there).
#[derive(Debug)]
pub struct Notifiers {
    state: Mutex<State>,
    /// Signalled whenever the last running invalidation ends.
    idle: Condvar,
    /// Invalidations started, by event (in [`NotifyEvent::ALL`] order).
    counts: [AtomicU64; 8],
    /// Callbacks that panicked.
    panics: AtomicU64,
    /// The process that made it.
    pid: rustix::process::Pid,
}

impl Default for Notifiers {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                seq: 2,
                active: 0,
                subs: Vec::new(),
                deferred: Vec::new(),
                waiting: 0,
            }),
            idle: Condvar::new(),
            counts: Default::default(),
            panics: AtomicU64::new(0),
            pid: super::fork::pid(),
        }
    }
}

impl Notifiers {
    /// An empty tree.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    // A callback that panicked poisons nothing we rely on: the state is
    // updated only outside callbacks.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `ops` for invalidations overlapping `range`. Removed when
    /// the returned handle is dropped (or [`IntervalNotifier::remove`]d).
    ///
    /// # Errors
    ///
    /// [`ForkedChild`] in a forked child (the tree is its parent's).
    pub fn insert(
        self: &Arc<Self>,
        range: PageRange,
        ops: Arc<dyn NotifierOps>,
    ) -> Result<IntervalNotifier, ForkedChild> {
        ForkedChild::check(self.pid)?;
        let mut st = self.lock();
        let invalidating = st.seq & 1 == 1;
        let sub = Arc::new(Subscription {
            range,
            // Deferred: equal to the running odd sequence, so that
            // read_begin waits for the invalidation to end.
            seq: AtomicU64::new(if invalidating { st.seq } else { st.seq - 1 }),
            ops,
        });
        if invalidating {
            st.deferred.push(sub.clone());
        } else {
            st.subs.push(sub.clone());
        }
        Ok(IntervalNotifier {
            sub: Some(sub),
            tree: self.clone(),
        })
    }

    /// Whether the calling process is not the one that made the tree (a
    /// forked child): then no lock of it is taken and nothing waits, since
    /// a thread of the parent may have held its lock, or run an
    /// invalidation, at the fork, and never will end it in the child.
    fn inherited(&self) -> bool {
        ForkedChild::check(self.pid).is_err()
    }

    /// How many notifiers are registered (deferred inserts included).
    pub fn len(&self) -> usize {
        let st = self.lock();
        st.subs.len() + st.deferred.len()
    }

    /// Invalidations started so far, by event (retries count again).
    pub fn counts(&self) -> Vec<(NotifyEvent, u64)> {
        NotifyEvent::ALL
            .iter()
            .map(|&e| (e, self.counts[e.index()].load(Ordering::Relaxed)))
            .collect()
    }

    /// Callbacks that panicked so far (each was contained, and counted as
    /// done).
    pub fn callback_panics(&self) -> u64 {
        self.panics.load(Ordering::Relaxed)
    }

    /// Whether no notifier is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts invalidating `range`: calls every overlapping notifier's
    /// callback, and keeps their `read_begin` waiting until the returned
    /// guard is dropped. Make the change to the address space while holding
    /// the guard.
    ///
    /// # Errors
    ///
    /// [`Retry`] if a callback could not proceed without blocking (only for
    /// non-blockable ranges); nothing is held then, and the caller must
    /// invalidate again later before (or instead of) making the change.
    pub fn invalidate_start(&self, range: &NotifierRange) -> Result<InvalidateGuard<'_>, Retry> {
        self.counts[range.event.index()].fetch_add(1, Ordering::Relaxed);
        let (cur_seq, hits) = {
            let mut st = self.lock();
            st.active += 1;
            let hits: Vec<Arc<Subscription>> = st
                .subs
                .iter()
                .filter(|s| s.range.overlaps(range.range))
                .cloned()
                .collect();
            if !hits.is_empty() {
                st.seq |= 1;
            }
            (st.seq, hits)
        };
        let guard = InvalidateGuard { tree: self };
        // Removals wait for `active` to drop to zero, so every notifier in
        // `hits` stays registered while its callback runs.
        // A callback that panics is contained (`callback::call`) and
        // counts as done: the change goes ahead, as the kernel's would, and
        // the notifier's sequence is advanced on its behalf so that a
        // device read racing with it retries.
        let done = hits.iter().all(|sub| {
            super::callback::call(&self.panics, "invalidate", || {
                sub.ops.invalidate(sub, range, cur_seq)
            })
            .unwrap_or_else(|_| {
                sub.set_seq(cur_seq);
                true
            })
        });
        // Our references to the notifiers go before `active` drops: a
        // removal waiting for it then holds the last one, and the device's
        // callbacks (and whatever they own, its memory say) are dropped by
        // the thread that removes them — never by the fault service, which
        // could not read the events that dropping memory raises.
        drop(hits);
        if done {
            Ok(guard)
        } else {
            drop(guard);
            Err(Retry { range: range.range })
        }
    }

    /// [`invalidate_start`](Self::invalidate_start) and end at once, for a
    /// change already made (an event the kernel reports after the fact).
    pub fn invalidate(&self, range: &NotifierRange) -> Result<(), Retry> {
        self.invalidate_start(range).map(drop)
    }

    fn invalidate_end(&self) {
        let mut st = self.lock();
        st.active -= 1;
        if st.active > 0 {
            return;
        }
        if st.seq & 1 == 1 {
            st.seq += 1;
        }
        let deferred = std::mem::take(&mut st.deferred);
        st.subs.extend(deferred);
        let waiting = st.waiting > 0;
        drop(st);
        if waiting {
            self.idle.notify_all();
        }
    }

    /// Waits on `idle` once (counted as waiting meanwhile).
    fn wait_idle<'a>(&self, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        st.waiting += 1;
        let mut st = self.idle.wait(st).unwrap_or_else(|e| e.into_inner());
        st.waiting -= 1;
        st
    }

    /// Waits until no invalidation of a notifier whose sequence is `seq` is
    /// running.
    fn wait_while_invalidating(&self, seq: u64) {
        if self.inherited() {
            return;
        }
        let mut st = self.lock();
        while st.seq == seq {
            st = self.wait_idle(st);
        }
    }

    fn remove(&self, sub: &Arc<Subscription>) {
        if ForkedChild::check_exact(self.pid).is_err() {
            // The parent's registration, in the child's copy of the tree:
            // nothing in the child invalidates through it.
            return;
        }
        let mut st = self.lock();
        // Wait out running invalidations: after this returns no callback of
        // `sub` runs, now or later.
        while st.active > 0 {
            st = self.wait_idle(st);
        }
        st.subs.retain(|s| !Arc::ptr_eq(s, sub));
        st.deferred.retain(|s| !Arc::ptr_eq(s, sub));
    }
}

/// Ends an invalidation when dropped.
#[derive(Debug)]
#[must_use = "dropping the guard ends the invalidation at once"]
pub struct InvalidateGuard<'a> {
    tree: &'a Notifiers,
}

impl Drop for InvalidateGuard<'_> {
    fn drop(&mut self) {
        self.tree.invalidate_end();
    }
}

/// A device's registration over a range; unregistered on drop.
#[derive(Debug)]
pub struct IntervalNotifier {
    sub: Option<Arc<Subscription>>,
    tree: Arc<Notifiers>,
}

impl IntervalNotifier {
    fn sub(&self) -> &Subscription {
        // Only `remove`/`drop` take it, and both consume the handle.
        self.sub.as_deref().unwrap_or_else(|| unreachable!())
    }

    /// Whether it is registered in `tree`.
    pub(crate) fn is_in(&self, tree: &Arc<Notifiers>) -> bool {
        Arc::ptr_eq(&self.tree, tree)
    }

    /// The range covered.
    pub fn range(&self) -> PageRange {
        self.sub().range
    }

    /// The subscription its callbacks are given (to tell, in a callback,
    /// which notifier it runs for).
    pub fn subscription(&self) -> &Subscription {
        self.sub()
    }

    /// Begins a read of the CPU page table: waits while an invalidation of
    /// this notifier runs, then returns the sequence to check with
    /// [`read_retry`](Self::read_retry). It does not loop: an invalidation
    /// may already have started when it returns. (In a forked child it does
    /// not wait; `range_fault` refuses there.) Not from this notifier's own
    /// callback: it would wait for that callback to return, for ever (as
    /// the kernel's `mmu_interval_read_begin`).
    pub fn read_begin(&self) -> u64 {
        let seq = self.sub().seq.load(Ordering::Acquire);
        self.tree.wait_while_invalidating(seq);
        seq
    }

    /// Whether an invalidation hit this notifier since
    /// [`read_begin`](Self::read_begin) returned `seq`. Reliable only under
    /// the lock that the callback holds around `set_seq`.
    pub fn read_retry(&self, seq: u64) -> bool {
        self.sub().seq.load(Ordering::Acquire) != seq
    }

    /// Unregisters, waiting for running invalidations to end; no callback
    /// runs after it returns. Must not be called from a callback. (In a
    /// forked child, on the parent's tree, it does nothing.)
    pub fn remove(mut self) {
        if let Some(sub) = self.sub.take() {
            self.tree.remove(&sub);
        }
    }
}

impl Drop for IntervalNotifier {
    fn drop(&mut self) {
        if let Some(sub) = self.sub.take() {
            self.tree.remove(&sub);
        }
    }
}
