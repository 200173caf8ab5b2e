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
}

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

/// Removes this thread's test points.
#[cfg(feature = "test-hooks")]
pub fn clear() {
    set(&COW_BREAK, None);
    set(&ARM, None);
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
