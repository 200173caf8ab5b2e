//! Fork notifications from a `pthread_atfork` prepare hook (see
//! [`super::Mm::new`] for why not from the kernel's FORK event).

use super::notifier::{NotifierRange, NotifyEvent};
use super::service::{Shared, lock};
use std::sync::{Arc, Mutex, Once, Weak};

/// Every live `Mm` of the process (normally one).
static LIVE: Mutex<Vec<Weak<Shared>>> = Mutex::new(Vec::new());
static HOOK: Once = Once::new();

/// Adds `shared` to the set notified at fork, installing the hook once.
pub(super) fn track(shared: &Arc<Shared>) -> Result<(), rustix::io::Errno> {
    let mut result = Ok(());
    HOOK.call_once(|| result = crate::sys::on_fork_prepare(prepare));
    result?;
    let mut live = lock(&LIVE);
    live.retain(|w| w.strong_count() > 0);
    live.push(Arc::downgrade(shared));
    Ok(())
}

/// Runs in the forking thread before the fork: every managed region of
/// every live `Mm` is about to become copy-on-write.
extern "C" fn prepare() {
    let live: Vec<Arc<Shared>> = lock(&LIVE).iter().filter_map(Weak::upgrade).collect();
    for shared in live {
        let ranges: Vec<_> = lock(&shared.regions).ranges().collect();
        for range in ranges {
            // Blockable: this is the forking thread, not the service.
            let _ = shared
                .notifiers
                .invalidate(&NotifierRange::new(range, NotifyEvent::Fork));
        }
    }
}
