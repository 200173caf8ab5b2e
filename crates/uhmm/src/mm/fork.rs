//! Process-wide hooks over every live `Mm`: fork notifications from a
//! `pthread_atfork` prepare hook (see [`super::Mm::new`] for why not from the
//! kernel's FORK event), and Release at process exit.

use super::notifier::{NotifierRange, NotifyEvent};
use super::service::{Shared, lock};
use std::sync::{Arc, Mutex, Once, Weak};

/// Every live `Mm` of the process (normally one).
static LIVE: Mutex<Vec<Weak<Shared>>> = Mutex::new(Vec::new());
static HOOKS: Once = Once::new();

/// Adds `shared` to the set notified at fork and at exit, installing the
/// hooks once.
pub(super) fn track(shared: &Arc<Shared>) -> Result<(), rustix::io::Errno> {
    let mut result = Ok(());
    HOOKS.call_once(|| {
        result =
            crate::sys::on_fork(prepare, after, after).and_then(|()| crate::sys::on_exit(at_exit));
    });
    result?;
    let mut live = lock(&LIVE);
    live.retain(|w| w.strong_count() > 0);
    live.push(Arc::downgrade(shared));
    Ok(())
}

/// The live `Mm`s made by this process (a forked child's copies are not
/// its own).
fn live() -> Vec<Arc<Shared>> {
    let pid = rustix::process::getpid();
    lock(&LIVE)
        .iter()
        .filter_map(Weak::upgrade)
        .filter(|s| s.pid == pid)
        .collect()
}

/// Runs in the forking thread before the fork: every managed region of
/// every live `Mm` is about to become copy-on-write. Migrations are held
/// off, and every page on a device or held exclusive comes home first: the
/// child gets the parent's data in its own copy-on-write pages and never
/// depends on the parent's fault service (which it does not have).
extern "C" fn prepare() {
    for shared in live() {
        shared.gate.close();
        shared.bring_home(None);
        let ranges: Vec<_> = lock(&shared.regions).ranges().collect();
        for range in ranges {
            // Blockable: this is the forking thread, not the service.
            let _ = shared
                .notifiers
                .invalidate(&NotifierRange::new(range, NotifyEvent::Fork));
        }
    }
}

/// Runs after the fork, in the parent and in the child: migrations may go
/// on.
extern "C" fn after() {
    for shared in lock(&LIVE).iter().filter_map(Weak::upgrade) {
        shared.gate.open();
    }
}

/// Runs at process exit: every notifier of every `Mm` still alive gets
/// Release, so devices stop using the address space before it goes. The
/// service keeps running (other exit hooks may still touch managed memory);
/// the kernel ends it with the process.
extern "C" fn at_exit() {
    for shared in live() {
        shared.release();
    }
}
