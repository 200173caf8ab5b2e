//! Signal handlers that touch managed memory, run on a thread while uhmm
//! works there unseen. (A test binary of its own: it sends signals to its
//! thread at a high rate, and a hang ends the whole binary.)

#![allow(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use uhmm::PAGE_SIZE;
use uhmm::mm::Mm;
use uhmm::sys::mem::Backing;
use uhmm_sim::SimDevice;

/// The managed pages the handler reads (0: none).
static PAGES: AtomicUsize = AtomicUsize::new(0);
static NPAGES: AtomicUsize = AtomicUsize::new(0);
static SUM: AtomicU64 = AtomicU64::new(0);
static HANDLED: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    let (base, n) = (
        PAGES.load(Ordering::Relaxed),
        NPAGES.load(Ordering::Relaxed),
    );
    if base == 0 {
        return;
    }
    let mut sum = 0u64;
    for i in 0..n {
        // SAFETY: a managed region the test keeps mapped while PAGES is
        // set; a plain load is what a program's handler does.
        sum += unsafe { std::ptr::read_volatile((base + i * PAGE_SIZE) as *const u8) } as u64;
    }
    SUM.fetch_add(sum, Ordering::Relaxed);
    HANDLED.fetch_add(1, Ordering::Relaxed);
}

/// A fork with pages on a device: uhmm's fork hook brings them home on
/// the forking thread, under its regions lock. A signal handler that ran
/// there and read one of them waited for the fault service, which waited
/// for that lock: the program hung (or, past the service's bounds, the
/// read got SIGBUS). Found by an adversarial review. The hook now blocks
/// asynchronous signals until the fork is done.
#[test]
fn a_signal_handler_reading_device_pages_during_a_fork_neither_hangs_nor_faults() {
    const N: usize = 32;
    const FORKS: usize = 100;
    let mm = Mm::new().unwrap();
    let dev = SimDevice::new(&mm);
    let region = mm.alloc(N * PAGE_SIZE, Backing::AnonPrivate).unwrap();
    let base = region.as_ptr() as usize;
    // SAFETY: installs a handler that only reads memory (async-signal-safe).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
    // A watchdog: a hang fails the test (and ends the binary) after 60 s.
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    std::thread::spawn(move || {
        let start = Instant::now();
        while !d.load(Ordering::Acquire) {
            if start.elapsed() > Duration::from_secs(60) {
                eprintln!("HANG: forks with a signal handler reading device pages");
                // SAFETY: ends the process at once (the forking thread is
                // stuck holding uhmm's lock: exit hooks would wait for it).
                unsafe { libc::_exit(101) };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    // Signals to this thread every 100 µs.
    // SAFETY: pthread_self of the calling thread, valid while it runs.
    let me = unsafe { libc::pthread_self() } as usize;
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let sender = std::thread::spawn(move || {
        while !s.load(Ordering::Acquire) {
            // SAFETY: the test thread, which outlives this loop (joined
            // before it returns).
            unsafe { libc::pthread_kill(me as libc::pthread_t, libc::SIGUSR1) };
            std::thread::sleep(Duration::from_micros(100));
        }
    });
    let mut forks = 0;
    for k in 0..FORKS {
        // The test's own migration runs with the signal blocked (a handler
        // that touches a migration's pages on the thread that runs it is
        // the documented self-deadlock): only the fork hook's meets it.
        PAGES.store(0, Ordering::SeqCst);
        for i in 0..N {
            // SAFETY: the managed region, no reference into it.
            unsafe { ((base + i * PAGE_SIZE) as *mut u8).write_volatile(k as u8 + 1) };
        }
        // SAFETY: local sigset_t values; changes this thread's mask only.
        let old = unsafe {
            let mut usr1: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut usr1);
            libc::sigaddset(&mut usr1, libc::SIGUSR1);
            libc::pthread_sigmask(libc::SIG_BLOCK, &usr1, &mut old);
            old
        };
        let moved = dev.migrate_range_to_device(uhmm::VirtAddr::new(base), N);
        // SAFETY: puts back the mask pthread_sigmask wrote above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
        let moved = moved.unwrap();
        assert_eq!(moved, N as u64);
        NPAGES.store(N, Ordering::SeqCst);
        PAGES.store(base, Ordering::SeqCst);
        // SAFETY: fork; the child only exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: the child ends at once.
            unsafe { libc::_exit(0) };
        }
        assert!(pid > 0, "fork failed");
        let mut status = 0;
        // SAFETY: waits for the child just made.
        while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {}
        forks += 1;
    }
    PAGES.store(0, Ordering::SeqCst);
    stop.store(true, Ordering::Release);
    sender.join().unwrap();
    done.store(true, Ordering::Release);
    let handled = HANDLED.load(Ordering::Relaxed);
    eprintln!("{forks} forks, {handled} signals handled");
    assert!(handled > 0, "no signal was handled");
    // Every page reads what was written last.
    for i in 0..N {
        // SAFETY: the managed region.
        let v = unsafe { ((base + i * PAGE_SIZE) as *const u8).read_volatile() };
        assert_eq!(v, FORKS as u8);
    }
    drop(region);
}
