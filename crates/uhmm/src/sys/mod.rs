//! The kernel-interface layer: the only place in uhmm with raw syscalls and
//! ioctls.
//!
//! Each submodule wraps one kernel interface exactly, with typed requests
//! (computed opcodes, typed flags, [`PageRange`](crate::PageRange) instead of
//! raw integers) and typed errors that say what went wrong and what to do:
//!
//! - [`uffd`]: userfaultfd — open, the API handshake, register, every
//!   resolve ioctl with its partial-progress encoding, and event decoding.
//! - [`pagemap`]: `PAGEMAP_SCAN` with `/proc/self/pagemap` as fallback.
//! - [`procmap`]: `PROCMAP_QUERY` with `/proc/self/smaps` as fallback.
//! - [`mem`]: mappings (anon, shared, memfd, hugetlb, file), madvise,
//!   mprotect, and the fault-tolerant accessors on the own process.
//! - [`probe`]: what the running kernel offers, for `uhmm info`.
//!
//! # Safety
//!
//! This module is where `unsafe` is allowed. Every unsafe block carries a
//! `// SAFETY:` comment. The invariants it relies on are of three kinds:
//! an ioctl's opcode matches the struct passed with it (checked by the opcode
//! tests against `linux-raw-sys`); a pointer handed to the kernel points to a
//! live, correctly sized value for the duration of the call; and an operation
//! that changes memory contents behind the program's back (discard, move,
//! unmap, protect) is only done on memory no Rust reference points into —
//! which is either proven locally ([`mem::Mapping`] hands out no references)
//! or stated as the contract of an `unsafe fn`.
#![allow(unsafe_code)]

pub mod mem;
pub mod pagemap;
pub mod probe;
pub mod procmap;
pub mod uffd;

use rustix::io::Errno;
use rustix::ioctl::{Ioctl, IoctlOutput, Opcode, Updater};
use std::ffi::c_void;
use std::marker::PhantomData;
use std::os::fd::BorrowedFd;

/// Retries a syscall that returned `EINTR`.
pub(crate) fn retry_eintr<T>(
    mut f: impl FnMut() -> rustix::io::Result<T>,
) -> rustix::io::Result<T> {
    loop {
        match f() {
            Err(Errno::INTR) => continue,
            r => return r,
        }
    }
}

/// Issues an ioctl whose argument is a struct the kernel reads and may
/// update in place.
///
/// # Safety
///
/// `OP` must be an ioctl that takes a pointer to exactly a `T`, and any
/// pointers inside `*arg` must be valid for what the kernel does with them
/// during the call.
pub(crate) unsafe fn ioctl_update<const OP: Opcode, T>(
    fd: BorrowedFd<'_>,
    arg: &mut T,
) -> rustix::io::Result<()> {
    // SAFETY: the caller guarantees that `OP` takes a `T` and that the
    // pointers it carries are valid; `arg` is a live exclusive borrow for the
    // whole call.
    unsafe { rustix::ioctl::ioctl(fd, Updater::<OP, T>::new(arg)) }
}

/// Like [`ioctl_update`], and returns the ioctl's non-negative return value
/// (`PAGEMAP_SCAN` returns the number of regions it wrote).
///
/// # Safety
///
/// As for [`ioctl_update`].
pub(crate) unsafe fn ioctl_ret<const OP: Opcode, T>(
    fd: BorrowedFd<'_>,
    arg: &mut T,
) -> rustix::io::Result<IoctlOutput> {
    // SAFETY: as above; `UpdaterRet` only differs from `Updater` in keeping
    // the return value.
    unsafe { rustix::ioctl::ioctl(fd, UpdaterRet::<OP, T>(arg, PhantomData)) }
}

struct UpdaterRet<'a, const OP: Opcode, T>(&'a mut T, PhantomData<T>);

// SAFETY: the opcode/type agreement is the contract of `ioctl_ret`'s caller;
// the pointer is to a live `T`; the kernel may write to it (mutating).
unsafe impl<const OP: Opcode, T> Ioctl for UpdaterRet<'_, OP, T> {
    type Output = IoctlOutput;
    const IS_MUTATING: bool = true;

    fn opcode(&self) -> Opcode {
        OP
    }

    fn as_ptr(&mut self) -> *mut c_void {
        (self.0 as *mut T).cast()
    }

    unsafe fn output_from_ptr(out: IoctlOutput, _: *mut c_void) -> rustix::io::Result<IoctlOutput> {
        Ok(out)
    }
}

/// Spawns `f` on a new thread named `name` with every signal blocked from
/// its first instruction: uhmm's threads (the fault service, a device's
/// worker) must never run a signal handler of the program's, which could
/// touch managed memory and wait on the very thread it runs on. A new
/// thread inherits its creator's mask, so the calling thread's is filled
/// for the spawn and restored after it; blocking them in the new thread
/// itself left its first instructions open (a handler that unmapped
/// managed memory there hung the program).
pub fn spawn_quiet<F, T>(name: &str, f: F) -> std::io::Result<std::thread::JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    // SAFETY: `all` and `old` are local sigset_t values, the first filled
    // by sigfillset; pthread_sigmask changes only this thread's mask and
    // writes the old one into `old`, which the second call puts back.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let spawned = std::thread::Builder::new().name(name.to_owned()).spawn(f);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        spawned
    }
}

/// The signals a program may handle asynchronously: all but the
/// synchronous faults (`SIGSEGV`, `SIGBUS`, `SIGILL`, `SIGFPE`, `SIGTRAP`,
/// `SIGSYS`), which the kernel delivers even when blocked, by killing the
/// process.
fn async_signals() -> libc::sigset_t {
    // SAFETY: a local sigset_t, filled by sigfillset, then emptied of a
    // few valid signal numbers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        for sig in [
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGILL,
            libc::SIGFPE,
            libc::SIGTRAP,
            libc::SIGSYS,
        ] {
            libc::sigdelset(&mut set, sig);
        }
        set
    }
}

/// Blocks the asynchronous signals (see `async_signals`) on the calling
/// thread; returns the mask it had, for `restore_signal_mask`.
fn block_async_signals() -> libc::sigset_t {
    let set = async_signals();
    // SAFETY: `set` and `old` are local sigset_t values; pthread_sigmask
    // changes only this thread's mask and writes the old one into `old`.
    unsafe {
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        old
    }
}

/// Puts back a mask `block_async_signals` returned.
fn restore_signal_mask(old: &libc::sigset_t) {
    // SAFETY: `old` is a sigset_t pthread_sigmask wrote; it changes only
    // this thread's mask.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut());
    }
}

/// The asynchronous signals (all but the synchronous faults) blocked on
/// the calling thread while alive; the mask before comes back when dropped.
///
/// uhmm holds its locks on the caller's thread in places the program does
/// not see (the fork hook brings device pages home under them). A signal
/// handler that ran there and touched managed memory needing the fault
/// service would wait for a service that waits for those locks: a
/// deadlock. Signals wait instead, and are handled when the mask comes
/// back.
#[derive(Debug)]
pub struct AsyncSignalsBlocked {
    old: libc::sigset_t,
}

impl AsyncSignalsBlocked {
    /// Blocks them now.
    pub fn new() -> Self {
        Self {
            old: block_async_signals(),
        }
    }
}

impl Default for AsyncSignalsBlocked {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for AsyncSignalsBlocked {
    fn drop(&mut self) {
        restore_signal_mask(&self.old);
    }
}

/// Runs `prepare` in the forking thread before every `fork()` of the
/// process, and `parent` / `child` after it in the parent and the child
/// (glibc's `pthread_atfork` hooks; prepare runs before glibc takes its
/// allocator locks, so it may allocate and lock). Each call adds hooks.
pub fn on_fork(
    prepare: extern "C" fn(),
    parent: extern "C" fn(),
    child: extern "C" fn(),
) -> Result<(), Errno> {
    // SAFETY: pthread_atfork stores the function pointers; each is a plain
    // `extern "C" fn()` valid for the life of the process.
    let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Errno::from_raw_os_error(rc))
    }
}

/// Runs `hook` when the process exits normally (`exit(3)`, or returning
/// from `main`), before the C library's own teardown. Each call adds
/// another hook.
pub fn on_exit(hook: extern "C" fn()) -> Result<(), Errno> {
    // SAFETY: atexit stores the function pointer; `hook` is a plain
    // `extern "C" fn()` valid for the life of the process.
    let rc = unsafe { libc::atexit(hook) };
    if rc == 0 { Ok(()) } else { Err(Errno::NOMEM) }
}
