//! Process-wide hooks over every live `Mm`: fork notifications from a
//! `pthread_atfork` prepare hook (see [`super::Mm::new`] for why not from the
//! kernel's FORK event), and Release at process exit.
//!
//! Forks are serialised by [`HOOKS_HELD`], a lock taken in the prepare hook
//! and released in the parent and child hooks, so two threads forking at
//! once never interleave their preparations (glibc runs the handlers of
//! concurrent forks without a lock of its own). The child's hook records
//! the child's process id (`getpid`, one atomic store: see [`pid`]) and
//! releases the hook lock, nothing else: a child of a multi-threaded
//! process may only do async-signal-safe work before it execs, and any
//! mutex another parent thread held at the fork stays locked in it for
//! ever. `LIVE` is only ever locked by a thread that holds the hook lock,
//! so no fork can copy it locked.

use super::notifier::{NotifierRange, NotifyEvent};
use super::service::{Shared, lock};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, Once, Weak};
use std::time::Duration;

/// Every live `Mm` of the process (normally one). Locked only under
/// [`HOOKS_HELD`].
static LIVE: Mutex<Vec<Weak<Shared>>> = Mutex::new(Vec::new());
static HOOKS: Once = Once::new();
/// The hook lock: held from a fork's prepare hook to its parent or child
/// hook, and around every use of `LIVE`.
static HOOKS_HELD: AtomicBool = AtomicBool::new(false);

/// The id of this process, kept while the hooks are installed: recorded
/// when they are, and anew by the child hook after every fork.
static PID: AtomicI32 = AtomicI32::new(0);

/// This process's id, without a system call once the hooks are installed
/// (every entry point of an `Mm` checks it against its maker's, and
/// `getpid` costs a few hundred ns). A child of a fork that runs no
/// `pthread_atfork` handlers (a raw `clone`) has its parent's id here, as
/// uhmm does not see such forks (DESIGN.md, "Fork"); teardown in `Drop`
/// checks the exact id instead ([`exact_pid`]).
pub(crate) fn pid() -> rustix::process::Pid {
    if HOOKS.is_completed() {
        if let Some(p) = rustix::process::Pid::from_raw(PID.load(Ordering::Relaxed)) {
            return p;
        }
    }
    exact_pid()
}

thread_local! {
    /// This thread's id, once asked (0 before): reset by the child hook,
    /// the one thread of a forked child having a new id.
    static TID: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// The calling thread's id, with one `gettid` per thread (operations record
/// the thread that set them up, and the fault service sets one up per
/// fault back).
pub(crate) fn tid() -> u32 {
    TID.with(|t| {
        if t.get() == 0 {
            t.set(rustix::thread::gettid().as_raw_nonzero().get() as u32);
        }
        t.get()
    })
}

/// This process's id (`getpid`).
pub(crate) fn exact_pid() -> rustix::process::Pid {
    rustix::process::getpid()
}

fn hooks_lock() {
    let mut spins = 0u32;
    while HOOKS_HELD
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        spins += 1;
        if spins < 100 {
            std::thread::yield_now();
        } else {
            // Another fork is being prepared (it may bring device pages
            // home): wait without burning the CPU it needs.
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

/// Async-signal-safe: one atomic store.
fn hooks_unlock() {
    HOOKS_HELD.store(false, Ordering::Release);
}

/// Adds `shared` to the set notified at fork and at exit, installing the
/// hooks once.
pub(super) fn track(shared: &Arc<Shared>) -> Result<(), rustix::io::Errno> {
    let mut result = Ok(());
    HOOKS.call_once(|| {
        PID.store(exact_pid().as_raw_nonzero().get(), Ordering::Relaxed);
        result = crate::sys::on_fork(prepare, after_parent, after_child)
            .and_then(|()| crate::sys::on_exit(at_exit));
    });
    result?;
    hooks_lock();
    {
        let mut live = lock(&LIVE);
        live.retain(|w| w.strong_count() > 0);
        live.push(Arc::downgrade(shared));
    }
    hooks_unlock();
    Ok(())
}

/// The live `Mm`s made by this process (a forked child's copies are not
/// its own). The caller holds the hook lock.
fn live() -> Vec<Arc<Shared>> {
    let pid = pid();
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
/// depends on the parent's fault service (which it does not have). A page
/// a device cannot give back is lost (SIGBUS on access, in parent and child
/// alike) rather than copied as a hole that would read as zeros.
extern "C" fn prepare() {
    // Pages come home below under the regions lock, on this (the program's)
    // thread: a signal handler touching one of them there would wait for
    // the fault service, which waits for that lock. Signals wait until this
    // hook is done. (Not until after the fork: glibc runs the program's own
    // parent and child hooks before uhmm's, and a mask they set would be
    // undone.)
    let _signals = crate::sys::AsyncSignalsBlocked::new();
    hooks_lock();
    for shared in live() {
        shared.gate.close();
        shared.settle_migrations();
        shared.bring_home(None, true);
        shared.poison_lost(None);
        let ranges: Vec<_> = lock(&shared.regions).ranges().collect();
        for range in ranges {
            // Blockable: this is the forking thread, not the service.
            let _ = shared
                .notifiers
                .invalidate(&NotifierRange::new(range, NotifyEvent::Fork));
        }
        // The forking thread's own migrations (bringing pages home) let
        // the fault service's in meanwhile.
        shared.settle_migrations();
    }
}

/// Runs in the parent after the fork: migrations may go on, and the next
/// fork may be prepared.
extern "C" fn after_parent() {
    for shared in live() {
        shared.gate.open();
    }
    hooks_unlock();
}

/// Runs in the child after the fork: only async-signal-safe work (a
/// system call, two atomic stores and a store to a const-initialized
/// thread-local). The child's copies of the parent's
/// `Mm`s are dead (no service thread runs there; their entry points see
/// the new process id and refuse); the hook lock is released so that the
/// child may make its own.
extern "C" fn after_child() {
    PID.store(exact_pid().as_raw_nonzero().get(), Ordering::Relaxed);
    TID.with(|t| t.set(0));
    hooks_unlock();
}

/// Runs at process exit: every notifier of every `Mm` still alive gets
/// Release, so devices stop using the address space before it goes. The
/// service keeps running (other exit hooks may still touch managed memory);
/// the kernel ends it with the process.
extern "C" fn at_exit() {
    hooks_lock();
    let all = live();
    hooks_unlock();
    for shared in all {
        shared.release();
    }
}
