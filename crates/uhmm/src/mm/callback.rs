//! Device callbacks, contained.
//!
//! uhmm calls device code from its own threads: `migrate_to_ram` and
//! invalidations on the fault service, `page_free` wherever a device page
//! loses its last reference, `add_chunk` inside an allocation. A panic in
//! one must not take uhmm down with it — a dead fault service would leave
//! every later CPU touch of managed memory waiting for ever. Every such
//! call goes through [`call`]: a panic is caught, reported (the panic hook
//! has printed it; a trace event names the callback), counted in
//! [`MmStats::callback_panics`](super::MmStats::callback_panics), and the
//! call is treated as failed in the way that call site documents (a
//! fault-back that failed, a page not handed out again, and so on).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};

/// A device callback panicked (its message went to the panic hook).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Panicked;

/// Runs the device callback `what` as `f`, counting a panic in `panics`.
///
/// Unwind safety: uhmm holds no lock of its own across a device callback
/// but the pagemap's pool lock around `add_chunk` (which is taken through
/// `lock_poisoned` everywhere, and whose state is changed only after the
/// callback returns), so nothing uhmm relies on is left half-changed.
pub(crate) fn call<R>(
    panics: &AtomicU64,
    what: &'static str,
    f: impl FnOnce() -> R,
) -> Result<R, Panicked> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|_| {
        panics.fetch_add(1, Ordering::Relaxed);
        crate::trace::event!(
            target: "uhmm::device",
            callback = what,
            "a device callback panicked; uhmm goes on without it"
        );
        let _ = what;
        Panicked
    })
}
