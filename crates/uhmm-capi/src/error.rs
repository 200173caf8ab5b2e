//! Errors: negative errno values, a thread-local message, and the guard
//! that keeps panics inside.

use std::cell::{Cell, RefCell};
use std::ffi::{CStr, CString, c_char, c_int};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use uhmm::devmem::{DevmemError, FaultError, MigrateError, StagingError};
use uhmm::mm::range::RangeFaultError;
use uhmm::mm::{MmError, StateError};
use uhmm::sys::mem::MemError;
use uhmm::sys::uffd::OpenError;

/// A failure on its way to C: a positive errno and what happened.
#[derive(Debug)]
pub(crate) struct Error {
    pub(crate) errno: c_int,
    pub(crate) msg: String,
}

impl Error {
    pub(crate) fn new(errno: c_int, msg: impl Into<String>) -> Self {
        Self {
            errno,
            msg: msg.into(),
        }
    }

    /// Bad input (`EINVAL`).
    pub(crate) fn inval(msg: impl Into<String>) -> Self {
        Self::new(libc::EINVAL, msg)
    }

    /// A NULL pointer where one was needed.
    pub(crate) fn null(what: &str) -> Self {
        Self::inval(format!("{what} is NULL"))
    }
}

/// The errno that fits each uhmm error.
pub(crate) trait Errno: fmt::Display {
    fn errno(&self) -> c_int;
}

impl<E: Errno> From<E> for Error {
    fn from(e: E) -> Self {
        Error::new(e.errno(), e.to_string())
    }
}

impl Errno for MemError {
    fn errno(&self) -> c_int {
        match self {
            MemError::BadLength { .. }
            | MemError::BadHugePageSize { .. }
            | MemError::OutOfBounds { .. }
            | MemError::Misaligned { .. } => libc::EINVAL,
            MemError::NoHugePages { .. } => libc::ENOMEM,
            MemError::OnFaultService => libc::EDEADLK,
            MemError::Map { errno, .. }
            | MemError::Memfd { errno, .. }
            | MemError::Advise { errno, .. }
            | MemError::Protect { errno, .. } => errno.raw_os_error(),
            _ => libc::EIO,
        }
    }
}

impl Errno for OpenError {
    fn errno(&self) -> c_int {
        match self {
            OpenError::Unavailable { .. } | OpenError::KernelFaultsUnavailable { .. } => {
                libc::EPERM
            }
            _ => libc::ENOSYS,
        }
    }
}

impl Errno for StateError {
    fn errno(&self) -> c_int {
        match self {
            StateError::TooManyOwners { .. } => libc::EUSERS,
            _ => libc::EINVAL,
        }
    }
}

impl Errno for MmError {
    fn errno(&self) -> c_int {
        match self {
            MmError::BadFaultBlock { .. } | MmError::Range(_) => libc::EINVAL,
            MmError::Open(e) => e.errno(),
            MmError::Service(_) => libc::EAGAIN,
            MmError::Map(e) => e.errno(),
            MmError::AlreadyManaged { .. } => libc::EEXIST,
            MmError::State(e) => e.errno(),
            MmError::NotManaged { .. } => libc::EFAULT,
            MmError::ForkedChild(_) => libc::ECHILD,
            _ => libc::EIO,
        }
    }
}

impl Errno for RangeFaultError {
    fn errno(&self) -> c_int {
        // The kernel's hmm_range_fault: EBUSY to retry, EFAULT for a page
        // that cannot be faulted, EPERM for a write to read-only memory.
        match self {
            RangeFaultError::Busy { .. } => libc::EBUSY,
            RangeFaultError::Fault { .. } => libc::EFAULT,
            RangeFaultError::PermissionDenied { .. } => libc::EPERM,
            RangeFaultError::BadLength { .. } | RangeFaultError::OutsideNotifier { .. } => {
                libc::EINVAL
            }
            RangeFaultError::NoMemory { .. } => libc::ENOMEM,
            RangeFaultError::ForkedChild(_) => libc::ECHILD,
            _ => libc::EIO,
        }
    }
}

impl Errno for StagingError {
    fn errno(&self) -> c_int {
        match self {
            StagingError::Full { .. } => libc::ENOSPC,
            StagingError::Map(e) | StagingError::Empty(e) => e.errno(),
            _ => libc::EIO,
        }
    }
}

impl Errno for DevmemError {
    fn errno(&self) -> c_int {
        match self {
            DevmemError::Exhausted { .. } | DevmemError::Grow { .. } => libc::ENOMEM,
            DevmemError::BadPfn { .. } | DevmemError::BadConfig { .. } => libc::EINVAL,
            DevmemError::OwnerTaken { .. } => libc::EEXIST,
            DevmemError::ForkedChild(_) => libc::ECHILD,
        }
    }
}

impl Errno for MigrateError {
    fn errno(&self) -> c_int {
        match self {
            MigrateError::InvalidRange { .. } | MigrateError::BadEntry { .. } => libc::EINVAL,
            MigrateError::Retry { .. } => libc::EAGAIN,
            MigrateError::Staging(e) => e.errno(),
            MigrateError::Devmem(e) => e.errno(),
            MigrateError::Mm(e) => e.errno(),
            MigrateError::NoPagemap { .. } => libc::ENODEV,
        }
    }
}

impl Errno for FaultError {
    fn errno(&self) -> c_int {
        match self {
            FaultError::Retry => libc::EAGAIN,
            FaultError::NoMemory => libc::ENOMEM,
            FaultError::Device(_) => libc::EIO,
            FaultError::ForkedChild(_) => libc::ECHILD,
        }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
    /// Whether the last call failed. Unlike `LAST_ERROR` (which has a
    /// destructor) it can be read while the thread's thread-locals are
    /// being destroyed: uhmm is called then from atexit handlers and
    /// `pthread_key` destructors, and must neither panic nor lie.
    static LAST_FAILED: Cell<bool> = const { Cell::new(false) };
}

/// `uhmm_last_error` after a failed call whose message could not be kept.
const UNKEPT: &CStr = c"uhmm: the call failed (its message cannot be kept while the thread exits)";

fn set_error(msg: &str) {
    // A message with a NUL in it is cut there.
    let msg = msg.split('\0').next().unwrap_or_default();
    let c = CString::new(msg).unwrap_or_default();
    LAST_FAILED.with(|f| f.set(true));
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = Some(c));
}

fn clear_error() {
    LAST_FAILED.with(|f| f.set(false));
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = None);
}

/// The message of the failed uhmm call made last on the calling thread,
/// or an empty string if it succeeded. Every uhmm call (but this one)
/// clears it first.
///
/// The string is owned by uhmm and valid until the next uhmm call on this
/// thread; never NULL.
#[unsafe(no_mangle)]
pub extern "C" fn uhmm_last_error() -> *const c_char {
    if !LAST_FAILED.with(Cell::get) {
        return c"".as_ptr();
    }
    LAST_ERROR
        .try_with(|e| e.borrow().as_ref().map(|c| c.as_ptr()))
        .ok()
        .flatten()
        .unwrap_or(UNKEPT.as_ptr())
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

/// Runs one entry point: clears the message, catches panics, and turns the
/// result into 0 or a negative errno.
pub(crate) fn call(f: impl FnOnce() -> Result<(), Error>) -> c_int {
    call_value(-libc::EIO, |e| -e.errno, || f().map(|()| 0))
}

/// Runs an entry point that returns a value, `on_error(e)` when it fails
/// (`on_panic` when it panics).
pub(crate) fn call_value<T>(
    on_panic: T,
    on_error: impl FnOnce(&Error) -> T,
    f: impl FnOnce() -> Result<T, Error>,
) -> T {
    clear_error();
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            set_error(&e.msg);
            on_error(&e)
        }
        Err(p) => {
            set_error(&format!(
                "uhmm panicked (a bug in uhmm): {}",
                panic_message(&*p)
            ));
            on_panic
        }
    }
}

/// Writes `value` through the out-pointer `out`.
///
/// # Safety
///
/// `out` is NULL (an error) or valid for a write of a `T`.
pub(crate) unsafe fn write_out<T>(out: *mut T, what: &str, value: T) -> Result<(), Error> {
    if out.is_null() {
        return Err(Error::null(what));
    }
    // SAFETY: not NULL, and the caller vouches that it is valid for a write.
    unsafe { out.write(value) };
    Ok(())
}
