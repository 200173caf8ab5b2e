//! The table of live handles. A handle given to C is the address of an
//! object kept alive by this table; it is looked up, never dereferenced,
//! so a NULL, stale or wrong-kind handle is an error, not undefined
//! behaviour.

use crate::error::Error;
use std::any::Any;
use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::thread::LocalKey;
use uhmm::mm::Owner;

type Table = HashMap<usize, Arc<dyn Any + Send + Sync>>;

static HANDLES: LazyLock<Mutex<Table>> = LazyLock::new(|| Mutex::new(HashMap::new()));

fn table() -> MutexGuard<'static, Table> {
    HANDLES.lock().unwrap_or_else(|e| e.into_inner())
}

/// An object C can hold a handle to: its name in messages.
pub(crate) trait Kind: Any + Send + Sync {
    /// The C type's name.
    const NAME: &'static str;
}

/// Makes a handle for `obj`.
pub(crate) fn register<T: Kind, H>(obj: T) -> *mut H {
    let arc = Arc::new(obj);
    let key = Arc::as_ptr(&arc) as usize;
    table().insert(key, arc);
    key as *mut H
}

/// The object behind handle `h`, kept alive while the caller holds it
/// (the table's lock is not held meanwhile).
pub(crate) fn get<T: Kind, H>(h: *const H) -> Result<Arc<T>, Error> {
    if h.is_null() {
        return Err(Error::null(T::NAME));
    }
    let found = table().get(&(h as usize)).cloned();
    found
        .and_then(|a| a.downcast::<T>().ok())
        .ok_or_else(|| not_live::<T>(h as usize))
}

fn not_live<T: Kind>(h: usize) -> Error {
    Error::inval(format!(
        "{h:#x} is not a live {} handle (destroyed already, or another kind of handle)",
        T::NAME
    ))
}

/// Takes handle `h` out of the table (it is invalid from now on) and
/// returns its object; `Ok(None)` for NULL. Refused inside a callback,
/// where dropping the object could wait for the callback itself.
pub(crate) fn take<T: Kind, H>(h: *const H) -> Result<Option<Arc<T>>, Error> {
    if h.is_null() {
        return Ok(None);
    }
    if in_callback() {
        return Err(Error::new(
            libc::EDEADLK,
            format!(
                "a {} may not be destroyed inside a uhmm callback (it could wait for that callback)",
                T::NAME
            ),
        ));
    }
    let mut t = table();
    match t.get(&(h as usize)) {
        Some(a) if a.is::<T>() => {}
        _ => return Err(not_live::<T>(h as usize)),
    }
    let a = t.remove(&(h as usize)).and_then(|a| a.downcast::<T>().ok());
    drop(t);
    Ok(a)
}

/// Takes `h` out of the table whatever it is (used after a callback for
/// what it left behind).
pub(crate) fn forget(h: usize) {
    let a = table().remove(&h);
    drop(a);
}

thread_local! {
    static CALLBACK_DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// A callback running on the calling thread, in a chain of them kept on
/// that thread's stack: a thread-local points at the innermost, each frame
/// at the one it runs inside. (Not a list in a thread-local: that would
/// have a destructor, and uhmm is called while the thread's thread-locals
/// are being destroyed — from an atexit handler, a `pthread_key`
/// destructor, a notifier's callback at exit — where such a thread-local
/// can no longer be read. A pointer in a `Cell` has no destructor and can
/// always be read.)
pub(crate) struct Frame<T> {
    key: usize,
    /// What the callback's calls leave for it.
    pub(crate) data: T,
    outer: *const Frame<T>,
}

/// A chain of [`Frame`]s: the thread-local holding the innermost.
pub(crate) type Chain<T> = LocalKey<Cell<*const Frame<T>>>;

/// Runs `f` with a frame for the callback `key` (holding `data`) innermost
/// on `chain`, and takes it off when `f` returns (or unwinds).
pub(crate) fn with_frame<T: 'static, R>(
    chain: &'static Chain<T>,
    key: usize,
    data: T,
    f: impl FnOnce(&Frame<T>) -> R,
) -> R {
    struct Pop<T: 'static> {
        chain: &'static Chain<T>,
        outer: *const Frame<T>,
    }
    impl<T: 'static> Drop for Pop<T> {
        fn drop(&mut self) {
            self.chain.with(|c| c.set(self.outer));
        }
    }
    let frame = Frame {
        key,
        data,
        outer: chain.with(Cell::get),
    };
    chain.with(|c| c.set(&frame));
    // (Dropped before `frame`: the chain never points at a frame gone.)
    let _pop = Pop {
        chain,
        outer: frame.outer,
    };
    f(&frame)
}

/// `f` of the frame of the callback `key` on `chain` (the innermost if
/// `key` is `None`); `None` if no such callback runs on this thread.
pub(crate) fn in_frame<T: 'static, R>(
    chain: &'static Chain<T>,
    key: Option<usize>,
    f: impl FnOnce(&Frame<T>) -> R,
) -> Option<R> {
    let mut at = chain.with(Cell::get);
    while !at.is_null() {
        // SAFETY: every frame on the chain lives on this thread's stack in
        // a `with_frame` call that is still running: it takes its frame
        // off before its frame goes (`Pop`, also when unwinding).
        let frame = unsafe { &*at };
        if key.is_none_or(|k| k == frame.key) {
            return Some(f(frame));
        }
        at = frame.outer;
    }
    None
}

/// Whether the calling thread is inside a uhmm callback into C.
pub(crate) fn in_callback() -> bool {
    CALLBACK_DEPTH.with(|d| d.get() > 0)
}

/// Runs `f` (a call into C) counted as a callback on this thread.
pub(crate) fn callback<R>(f: impl FnOnce() -> R) -> R {
    struct Depth;
    impl Drop for Depth {
        fn drop(&mut self) {
            CALLBACK_DEPTH.with(|d| d.set(d.get() - 1));
        }
    }
    CALLBACK_DEPTH.with(|d| d.set(d.get() + 1));
    let _depth = Depth;
    f()
}

/// A C context pointer, passed back to C's callbacks on uhmm's threads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx(pub(crate) *mut c_void);

// SAFETY: uhmm only passes the pointer back to the C callbacks it was
// given with, never dereferences it; the C API requires the context to be
// usable from any thread (documented on every function taking one).
unsafe impl Send for Ctx {}
// SAFETY: as for `Send`: the pointer is only handed back to C.
unsafe impl Sync for Ctx {}

static OWNERS: LazyLock<Mutex<HashMap<u64, Owner>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// The C number of `owner` (never 0), remembered so that it can be given
/// back.
pub(crate) fn owner_number(owner: Owner) -> u64 {
    let n = owner.get();
    OWNERS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(n)
        .or_insert(owner);
    n
}

/// The owner C names by `n`.
pub(crate) fn owner_from(n: u64) -> Result<Owner, Error> {
    if n == 0 {
        return Err(Error::inval(
            "owner 0: an owner is made by uhmm_owner_unique",
        ));
    }
    OWNERS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&n)
        .copied()
        .ok_or_else(|| {
            Error::inval(format!(
                "owner {n} was not made by uhmm_owner_unique in this process"
            ))
        })
}

/// The optional owner `n` (0: none).
pub(crate) fn owner_opt(n: u64) -> Result<Option<Owner>, Error> {
    if n == 0 {
        Ok(None)
    } else {
        owner_from(n).map(Some)
    }
}

/// Makes a handle for an object the caller keeps a reference to as well.
pub(crate) fn register_shared<T: Kind, H>(arc: Arc<T>) -> *mut H {
    let key = Arc::as_ptr(&arc) as usize;
    table().insert(key, arc);
    key as *mut H
}

/// [`take`], allowed inside callbacks (for objects whose drop cannot
/// wait for one).
pub(crate) fn take_any<T: Kind, H>(h: *const H) -> Result<Arc<T>, Error> {
    let mut t = table();
    match t.get(&(h as usize)) {
        Some(a) if a.is::<T>() => {}
        _ => return Err(not_live::<T>(h as usize)),
    }
    let a = t.remove(&(h as usize)).and_then(|a| a.downcast::<T>().ok());
    drop(t);
    a.ok_or_else(|| not_live::<T>(h as usize))
}
