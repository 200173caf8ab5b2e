//! Test points: places inside an operation where a test parks the thread
//! running it, to force an interleaving that no device callback reaches.
//! Compiled only with the `test-hooks` feature; without it each point is
//! an empty inline function.
//!
//! A point is set per thread: only operations the setting thread runs stop
//! there.

#[cfg(feature = "test-hooks")]
use std::cell::RefCell;

#[cfg(feature = "test-hooks")]
thread_local! {
    static COW_BREAK: RefCell<Option<Box<dyn FnMut()>>> = const { RefCell::new(None) };
    static ARM: RefCell<Option<Box<dyn FnMut()>>> = const { RefCell::new(None) };
}

/// Calls `f` each time a migration run by this thread is about to make
/// pages shared copy-on-write the process's own (a write fault on each,
/// outside the regions lock), after it has kept them from other
/// operations. `f` may block: the migration waits with it.
#[cfg(feature = "test-hooks")]
pub fn on_cow_break(f: impl FnMut() + 'static) {
    COW_BREAK.with(|h| *h.borrow_mut() = Some(Box::new(f)));
}

/// Calls `f` each time an operation run by this thread (a migration, an
/// exclusive grab) is about to arm a region for its first device use,
/// after the operation has checked the region's mappings and before the
/// arming reads them. `f` may block: the operation waits with it.
#[cfg(feature = "test-hooks")]
pub fn on_arm(f: impl FnMut() + 'static) {
    ARM.with(|h| *h.borrow_mut() = Some(Box::new(f)));
}

/// Removes this thread's test points.
#[cfg(feature = "test-hooks")]
pub fn clear() {
    COW_BREAK.with(|h| *h.borrow_mut() = None);
    ARM.with(|h| *h.borrow_mut() = None);
}

#[inline]
pub(crate) fn cow_break() {
    #[cfg(feature = "test-hooks")]
    COW_BREAK.with(|h| {
        if let Some(f) = h.borrow_mut().as_mut() {
            f();
        }
    });
}

#[inline]
pub(crate) fn arm() {
    #[cfg(feature = "test-hooks")]
    ARM.with(|h| {
        if let Some(f) = h.borrow_mut().as_mut() {
            f();
        }
    });
}
