//! uhmm's fork preparation blocks the asynchronous signals while it works
//! (see `sys::AsyncSignalsBlocked`) and puts the mask back when it ends,
//! before the fork: a mask change the program's own atfork handlers make
//! after the fork survives.
//! (A test binary of its own: it registers atfork handlers for the whole
//! process, before uhmm registers its own.)

#![allow(unsafe_code)]

extern "C" fn block_usr2() {
    // SAFETY: a local sigset_t; changes only this thread's mask.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        libc::sigaddset(&mut s, libc::SIGUSR2);
        libc::pthread_sigmask(libc::SIG_BLOCK, &s, std::ptr::null_mut());
    }
}

fn usr2_blocked() -> bool {
    // SAFETY: reads this thread's mask into a local sigset_t.
    unsafe {
        let mut cur: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut cur);
        libc::sigismember(&cur, libc::SIGUSR2) == 1
    }
}

/// The program's handlers, registered before uhmm's (glibc runs the
/// parent and child ones in registration order, uhmm's last), block
/// SIGUSR2 in both processes. A first version put the mask back in uhmm's
/// own parent and child hooks, which run after the program's, and undid
/// that (found by an adversarial review).
#[test]
fn a_programs_atfork_mask_change_survives_uhmms_fork_hooks() {
    assert!(!usr2_blocked());
    // SAFETY: registers handlers that only change the calling thread's mask.
    let rc = unsafe { libc::pthread_atfork(None, Some(block_usr2), Some(block_usr2)) };
    assert_eq!(rc, 0);
    let _mm = uhmm::mm::Mm::new().unwrap();
    // SAFETY: fork; the child only looks at its mask and exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code = if usr2_blocked() { 0 } else { 1 };
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(code) };
    }
    assert!(pid > 0, "fork failed");
    let mut status = 0;
    // SAFETY: waits for the child just made.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {}
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "the child's atfork handler's mask change was undone"
    );
    assert!(
        usr2_blocked(),
        "the parent's atfork handler's mask change was undone"
    );
    // And nothing else stays blocked: SIGUSR1, which uhmm blocked for the
    // fork, is open again.
    // SAFETY: reads this thread's mask into a local sigset_t.
    let usr1 = unsafe {
        let mut cur: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut cur);
        libc::sigismember(&cur, libc::SIGUSR1) == 1
    };
    assert!(!usr1, "a signal uhmm blocked for the fork stayed blocked");
}
