//! Trace points: `tracing` events for migrations, invalidations and device
//! faults, with the `tracing` feature; nothing at all without it.
//!
//! Events are rate limited (at most [`PER_SECOND`] a second, the rest are
//! counted and reported with the next event that passes), because a
//! workload can fault or invalidate hundreds of thousands of times a
//! second. None is emitted from the path between a fault and the wake-up
//! of the faulting thread.

#[cfg(feature = "tracing")]
use std::sync::atomic::{AtomicU64, Ordering};

/// Events let through per second.
pub const PER_SECOND: u64 = 200;

#[cfg(feature = "tracing")]
static WINDOW: AtomicU64 = AtomicU64::new(0);
#[cfg(feature = "tracing")]
static IN_WINDOW: AtomicU64 = AtomicU64::new(0);
#[cfg(feature = "tracing")]
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Whether an event may go out now; `Some(n)`: yes, and `n` were dropped
/// since the last one that went out.
#[cfg(feature = "tracing")]
pub(crate) fn allow() -> Option<u64> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if WINDOW.swap(now, Ordering::Relaxed) != now {
        IN_WINDOW.store(0, Ordering::Relaxed);
    }
    if IN_WINDOW.fetch_add(1, Ordering::Relaxed) < PER_SECOND {
        Some(DROPPED.swap(0, Ordering::Relaxed))
    } else {
        DROPPED.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// A rate-limited `tracing::debug!` event (nothing without the feature).
macro_rules! event {
    (target: $target:expr, $($arg:tt)*) => {
        #[cfg(feature = "tracing")]
        {
            if tracing::enabled!(target: $target, tracing::Level::DEBUG)
                && let Some(dropped) = $crate::trace::allow()
            {
                tracing::debug!(target: $target, dropped, $($arg)*);
            }
        }
    };
}
pub(crate) use event;
