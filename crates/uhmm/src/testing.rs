//! Test points: places inside an operation where a test parks the thread
//! running it, to force an interleaving that no device callback reaches.
//! Compiled only with the `test-hooks` feature; without it each point is
//! an empty inline function.
//!
//! A point is set per thread: only operations the setting thread runs stop
//! there.

#[cfg(feature = "test-hooks")]
use std::cell::RefCell;

/// What a test runs at one point, on this thread.
#[cfg(feature = "test-hooks")]
type Point = RefCell<Option<Box<dyn FnMut()>>>;

#[cfg(feature = "test-hooks")]
thread_local! {
    static COW_BREAK: Point = const { RefCell::new(None) };
    static ARM: Point = const { RefCell::new(None) };
    static BRING_HOME_ROUND: Point = const { RefCell::new(None) };
    static REVOKE_COPY: Point = const { RefCell::new(None) };
    static UNREGISTER: Point = const { RefCell::new(None) };
    static MOVE: RefCell<Option<Answer>> = const { RefCell::new(None) };
}

/// What a test does with the kernel's answer to a move.
#[cfg(feature = "test-hooks")]
type Answer = Box<dyn FnMut(&mut Result<crate::sys::uffd::Progress, crate::sys::uffd::OpError>)>;

/// Sets `point` to `f` on this thread (`None`: unsets it).
#[cfg(feature = "test-hooks")]
fn set(point: &'static std::thread::LocalKey<Point>, f: Option<Box<dyn FnMut()>>) {
    point.with(|h| *h.borrow_mut() = f);
}

/// Runs what this thread set at `point`, if anything.
#[cfg(feature = "test-hooks")]
fn pass(point: &'static std::thread::LocalKey<Point>) {
    point.with(|h| {
        if let Some(f) = h.borrow_mut().as_mut() {
            f();
        }
    });
}

/// Calls `f` each time a migration run by this thread is about to make
/// pages shared copy-on-write the process's own (a write fault on each,
/// outside the regions lock), after it has kept them from other
/// operations. `f` may block: the migration waits with it.
#[cfg(feature = "test-hooks")]
pub fn on_cow_break(f: impl FnMut() + 'static) {
    set(&COW_BREAK, Some(Box::new(f)));
}

/// Calls `f` each time an operation run by this thread (a migration, an
/// exclusive grab) is about to arm a region for its first device use:
/// under the regions lock, before it reads the region's mappings. `f` may
/// block: the operation waits with it, holding the lock (the fault
/// service does not read events meanwhile).
#[cfg(feature = "test-hooks")]
pub fn on_arm(f: impl FnMut() + 'static) {
    set(&ARM, Some(Box::new(f)));
}

/// Calls `f` each time this thread, bringing pages home before uhmm lets
/// go of them (an unmanage, a fork), has tried every page once in a round
/// and is about to look at what is left: after the devices' evictions and
/// the exclusive revokes, before it decides whether to lose what stayed
/// out. `f` may block: no uhmm lock is held.
#[cfg(feature = "test-hooks")]
pub fn on_bring_home_round(f: impl FnMut() + 'static) {
    set(&BRING_HOME_ROUND, Some(Box::new(f)));
}

/// Calls `f` each time this thread, taking an exclusive page back for the
/// CPU, is about to copy it into place because the mapping refused the
/// move (made read-only since, say): under the regions lock, after the
/// move. `f` may block: the revoke waits with it, holding the lock (the
/// fault service does not read events meanwhile).
#[cfg(feature = "test-hooks")]
pub fn on_revoke_copy(f: impl FnMut() + 'static) {
    set(&REVOKE_COPY, Some(Box::new(f)));
}

/// Calls `f` each time this thread, letting go of memory no region
/// manages (a region's drop, an unmanage), is about to unregister a range,
/// having seen no layout change pending: under the regions lock (the fault
/// service does not read events meanwhile). `f` may start such a change
/// on another thread and wait until it waits for its event.
#[cfg(feature = "test-hooks")]
pub fn on_unregister(f: impl FnMut() + 'static) {
    set(&UNREGISTER, Some(Box::new(f)));
}

/// Calls `f` with the kernel's answer to each move of pages uhmm makes on
/// this thread (a migration taking pages out of managed memory into
/// staging and on into device memory, an exclusive grab, a put-back),
/// before uhmm reads it; `f` may change it into an answer the kernel gives
/// at times but a test cannot make it give at will (on Linux 6.18, EAGAIN
/// with nothing counted for a page it did move: see `MOVE_QUIRK` in
/// `devmem::migrate`). It may run under the regions lock: `f` must not
/// wait for a layout change to end (a munmap or mremap it starts on
/// another thread stays pending until the lock is let go).
#[cfg(feature = "test-hooks")]
pub fn on_move(
    f: impl FnMut(&mut Result<crate::sys::uffd::Progress, crate::sys::uffd::OpError>) + 'static,
) {
    MOVE.with(|h| *h.borrow_mut() = Some(Box::new(f)));
}

/// A move-answer test point of every thread: see [`on_move_anywhere`].
#[cfg(feature = "test-hooks")]
pub type AnyMove = Box<
    dyn FnMut(crate::PageRange, &mut Result<crate::sys::uffd::Progress, crate::sys::uffd::OpError>)
        + Send,
>;

#[cfg(feature = "test-hooks")]
static ANY_MOVE: std::sync::Mutex<Option<AnyMove>> = std::sync::Mutex::new(None);

/// As [`on_move`], for the moves of every thread (the fault service's
/// too), with each move's destination; `None` ends it, and a second call
/// replaces the first (one test of a process at a time may use it). It
/// runs under a lock of its own, after the regions lock where uhmm holds
/// that: `f` must not take uhmm's locks (no `Mm` calls).
#[cfg(feature = "test-hooks")]
pub fn on_move_anywhere(f: Option<AnyMove>) {
    *ANY_MOVE.lock().unwrap_or_else(|e| e.into_inner()) = f;
}

/// An events-read test point: see [`on_events_read`].
#[cfg(feature = "test-hooks")]
pub type EventsRead = Box<dyn FnMut(&[crate::sys::uffd::Event]) + Send>;

#[cfg(feature = "test-hooks")]
static EVENTS_READ: std::sync::Mutex<Option<EventsRead>> = std::sync::Mutex::new(None);

/// Calls `f` with each batch of events a fault service reads (any `Mm`'s),
/// after the read and before they are applied to its table: the threads
/// whose changes they report are released already, and may change the
/// layout again before the table shows the first change. `None` ends it;
/// one test of a process at a time may use it. It runs on the service
/// thread under the regions lock: `f` may wait, bounded, for another
/// thread (no event is read meanwhile), but must not take uhmm's locks.
#[cfg(feature = "test-hooks")]
pub fn on_events_read(f: Option<EventsRead>) {
    *EVENTS_READ.lock().unwrap_or_else(|e| e.into_inner()) = f;
}

/// A service-round test point: see [`on_service_round`].
#[cfg(feature = "test-hooks")]
pub type ServiceRound = Box<dyn FnMut() + Send>;

/// What the service-round point runs.
#[cfg(feature = "test-hooks")]
static SERVICE_ROUND: std::sync::Mutex<Option<ServiceRound>> = std::sync::Mutex::new(None);

/// The service it is for (its `Shared`'s address; 0: none), read before
/// the lock: other services never take it.
#[cfg(feature = "test-hooks")]
static SERVICE_ROUND_FOR: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Calls `f` on `mm`'s fault service at the start of each of its rounds,
/// before it waits for events, with no lock of uhmm's held: `f` may park
/// the service until the test has set up what its next round reads (a
/// fault the service parked is served again once a round, after the
/// round's events). Setting it wakes the service, so that its next round
/// starts at once (an idle service waits for events without a timeout).
/// `None` ends it, once `f` has returned; one test of a process at a time
/// may use it. Other `Mm`s' services never wait for it. `f` runs under a
/// lock of its own and must not take uhmm's locks.
#[cfg(feature = "test-hooks")]
pub fn on_service_round(mm: &crate::mm::Mm, f: Option<ServiceRound>) {
    use std::sync::atomic::Ordering;
    let key = std::ptr::from_ref(mm.shared()) as usize;
    let armed = f.is_some();
    SERVICE_ROUND_FOR.store(0, Ordering::SeqCst);
    *SERVICE_ROUND.lock().unwrap_or_else(|e| e.into_inner()) = f;
    if armed {
        SERVICE_ROUND_FOR.store(key, Ordering::SeqCst);
        mm.shared().wake_service();
    }
}

/// Cuts the bounds on waits that end with pages lost, in every `Mm` of
/// the process, until called again with `None`: how long a device may
/// keep a fault back waiting (normally 10 s) before the access fails with
/// SIGBUS, and how long a put-back may be refused with no layout change
/// pending (normally 10 s) before its pages are lost, and how long an
/// eviction may find the device failing (normally 10 s) before it gives up
/// (a dropped device then loses what is left). A test that holds
/// an operation for a second shows what the bounds apply to.
#[cfg(feature = "test-hooks")]
pub fn set_loss_bound(bound: Option<std::time::Duration>) {
    let nanos = bound.map_or(0, |d| d.as_nanos().clamp(1, u64::MAX as u128) as u64);
    LOSS_BOUND.store(nanos, std::sync::atomic::Ordering::Relaxed);
}

#[cfg(feature = "test-hooks")]
static LOSS_BOUND: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// `bound`, or what [`set_loss_bound`] set instead.
#[inline]
pub(crate) fn loss_bound(bound: std::time::Duration) -> std::time::Duration {
    #[cfg(feature = "test-hooks")]
    {
        let nanos = LOSS_BOUND.load(std::sync::atomic::Ordering::Relaxed);
        if nanos != 0 {
            return std::time::Duration::from_nanos(nanos);
        }
    }
    bound
}

/// Removes this thread's test points.
#[cfg(feature = "test-hooks")]
pub fn clear() {
    set(&COW_BREAK, None);
    set(&ARM, None);
    set(&BRING_HOME_ROUND, None);
    set(&REVOKE_COPY, None);
    set(&UNREGISTER, None);
    MOVE.with(|h| *h.borrow_mut() = None);
}

#[inline]
pub(crate) fn cow_break() {
    #[cfg(feature = "test-hooks")]
    pass(&COW_BREAK);
}

#[inline]
pub(crate) fn arm() {
    #[cfg(feature = "test-hooks")]
    pass(&ARM);
}

#[inline]
pub(crate) fn bring_home_round() {
    #[cfg(feature = "test-hooks")]
    pass(&BRING_HOME_ROUND);
}

#[inline]
pub(crate) fn revoke_copy() {
    #[cfg(feature = "test-hooks")]
    pass(&REVOKE_COPY);
}

#[inline]
pub(crate) fn unregister() {
    #[cfg(feature = "test-hooks")]
    pass(&UNREGISTER);
}

#[inline]
pub(crate) fn move_answer(
    _dst: crate::PageRange,
    _answer: &mut Result<crate::sys::uffd::Progress, crate::sys::uffd::OpError>,
) {
    #[cfg(feature = "test-hooks")]
    {
        MOVE.with(|h| {
            if let Some(f) = h.borrow_mut().as_mut() {
                f(_answer);
            }
        });
        if let Some(f) = ANY_MOVE.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            f(_dst, _answer);
        }
    }
}

#[inline]
pub(crate) fn events_read(_events: &[crate::sys::uffd::Event]) {
    #[cfg(feature = "test-hooks")]
    if !_events.is_empty()
        && let Some(f) = EVENTS_READ
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
    {
        f(_events);
    }
}

#[inline]
pub(crate) fn service_round(_shared: usize) {
    #[cfg(feature = "test-hooks")]
    if SERVICE_ROUND_FOR.load(std::sync::atomic::Ordering::SeqCst) == _shared
        && let Some(f) = SERVICE_ROUND
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
    {
        f();
    }
}
