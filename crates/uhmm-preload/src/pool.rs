//! The allocator of this library's own Rust code (uhmm's tables, the
//! software device, the chaos thread's lists): a pool of address space
//! mapped once, at load, apart from the program's heap.
//!
//! Rust aborts the process when an allocation fails. Served by glibc, this
//! library's allocations shared the program's heap and its `RLIMIT_AS`: a
//! program that filled its limit (and handled malloc's NULL, as it
//! should) was aborted by the next allocation uhmm made on its behalf, in
//! a fault or a chaos migration. The pool is mapped at load
//! (`MAP_NORESERVE`: address space, no memory until touched), so the limit
//! counts it from the start and nothing the program does later takes it
//! away. Allocations are glibc's before the pool exists and when it is
//! full; [`headroom`] lets the library stop taking on more memory to manage
//! well before that.
//!
//! The pool's lock is never waited for by a thread that holds it: a
//! thread that allocates while holding it (a signal handler that
//! interrupted it, or a fork handler that runs after [`fork_prepare`]
//! took it) is served by glibc instead.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, UnsafeCell};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use talc::{ErrOnOom, Span, Talc};

/// The allocator: a [`Talc`] heap over the pool, behind a pthread mutex
/// (which never allocates and can be taken across `fork`), with glibc's
/// allocator behind it.
pub(crate) struct Pool {
    lock: UnsafeCell<libc::pthread_mutex_t>,
    heap: UnsafeCell<Talc<ErrOnOom>>,
    /// The heap's extent as the heap last gave it (`claim`, `truncate`),
    /// which its later changes need; under `lock` too. The mapping may
    /// reach a little beyond it, to `end`.
    span: UnsafeCell<Span>,
    /// `[start, end)`: the pool, empty until [`init`].
    start: AtomicUsize,
    end: AtomicUsize,
    /// Bytes the pool serves now, and the most it served at once.
    used: AtomicUsize,
    peak: AtomicUsize,
    /// Allocations glibc served because the pool had no room.
    fallbacks: AtomicU64,
}

// SAFETY: `heap` is only reached with `lock` held (`Held`), and the
// pthread mutex is made to be shared between threads.
unsafe impl Sync for Pool {}

#[global_allocator]
static POOL: Pool = Pool {
    lock: UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER),
    heap: UnsafeCell::new(Talc::new(ErrOnOom)),
    span: UnsafeCell::new(Span::empty()),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    used: AtomicUsize::new(0),
    peak: AtomicUsize::new(0),
    fallbacks: AtomicU64::new(0),
};

thread_local! {
    /// Whether this thread holds the pool's lock.
    static HOLDING: Cell<bool> = const { Cell::new(false) };
    /// Whether it holds it for `fork` (taken by [`fork_prepare`]).
    static FORK_HELD: Cell<bool> = const { Cell::new(false) };
    /// Whether it is in a call of the global allocator into `System`
    /// (malloc), which must not serve a C block (`c_alloc`): the global
    /// allocator would take it for one of its own.
    static IN_SYSTEM: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, a call into `System`, marked as such (`IN_SYSTEM`).
fn system<T>(f: impl FnOnce() -> T) -> T {
    let outer = IN_SYSTEM.try_with(|s| s.replace(true)).unwrap_or(true);
    let r = f();
    if !outer {
        let _ = IN_SYSTEM.try_with(|s| s.set(false));
    }
    r
}

/// The pool's lock, held while alive.
struct Held;

impl Held {
    /// Takes the lock, or `None` if this thread holds it already (or its
    /// thread-local storage is gone).
    fn take() -> Option<Held> {
        if HOLDING.try_with(|h| h.replace(true)) != Ok(false) {
            return None;
        }
        // SAFETY: a mutex initialized statically; this thread does not hold
        // it (checked above).
        unsafe { libc::pthread_mutex_lock(POOL.lock.get()) };
        Some(Held)
    }

    fn heap(&mut self) -> &mut Talc<ErrOnOom> {
        // SAFETY: the lock is held, so no other reference to the heap is
        // live; the `&mut self` borrow keeps this one unique on this thread.
        unsafe { &mut *POOL.heap.get() }
    }

    fn span(&mut self) -> &mut Span {
        // SAFETY: as for `heap`.
        unsafe { &mut *POOL.span.get() }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // SAFETY: this thread took the lock in `take`.
        unsafe { libc::pthread_mutex_unlock(POOL.lock.get()) };
        let _ = HOLDING.try_with(|h| h.set(false));
    }
}

/// Maps the pool, `len` bytes, and hands it to the heap; from then on the
/// library's allocations are served from it. Once per process (a forked
/// child keeps its copy), before any thread of the library starts.
/// Returns whether there is a pool.
pub(crate) fn init(len: usize) -> bool {
    if POOL.end.load(Ordering::Acquire) != 0 {
        return true;
    }
    // SAFETY: a new private anonymous mapping; the kernel picks the place.
    let p = unsafe {
        libc::syscall(
            libc::SYS_mmap,
            0usize,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1i32,
            0usize,
        )
    };
    if p < 0 || len == 0 {
        return false;
    }
    let base = p as usize;
    let Some(mut held) = Held::take() else {
        // SAFETY: the mapping just made, which nothing uses.
        unsafe { libc::syscall(libc::SYS_munmap, base, len) };
        return false;
    };
    // SAFETY: the mapping just made, read-write, used by nothing else; it
    // stays mapped for the life of the process.
    match unsafe {
        held.heap()
            .claim(Span::from_base_size(base as *mut u8, len))
    } {
        Ok(span) => {
            *held.span() = span;
            POOL.start.store(base, Ordering::Release);
            POOL.end.store(base + len, Ordering::Release);
            true
        }
        Err(()) => false,
    }
}

/// Free space that [`fit`] always leaves above the highest block in use:
/// what the library goes on allocating for the memory it manages already
/// (uhmm's tables, the chaos thread, a freed block's bookkeeping) while a
/// limit below what is mapped leaves glibc nothing.
const FIT_MARGIN: usize = 1 << 20;

/// Gives back the pool's address space above `keep` bytes (after a lower
/// `RLIMIT_AS`, which counts it): its top is cut down to `keep`, but never
/// below [`FIT_MARGIN`] above the highest block in use.
pub(crate) fn fit(keep: usize) {
    let (start, end) = (
        POOL.start.load(Ordering::Acquire),
        POOL.end.load(Ordering::Acquire),
    );
    if end - start <= keep {
        return;
    }
    let Some(mut held) = Held::take() else { return };
    let old = *held.span();
    let Some((base, acme)) = old.get_base_acme() else {
        return;
    };
    // SAFETY: `old` is the heap's extent as it last gave it, and the lock
    // is held from here to the cut.
    let used = unsafe { held.heap().get_allocated_span(old) };
    let used_top = used
        .get_base_acme()
        .map_or(base as usize, |(_, a)| a as usize);
    let want_top = (start + keep).max(used_top.saturating_add(FIT_MARGIN));
    if want_top >= acme as usize {
        return;
    }
    // SAFETY: as above; the new extent is inside the old one and holds
    // every block in use.
    let cut = unsafe {
        held.heap()
            .truncate(old, Span::new(base, want_top as *mut u8).fit_over(used))
    };
    *held.span() = cut;
    let new_end = cut
        .get_base_acme()
        .map_or(start, |(_, a)| (a as usize).next_multiple_of(4096));
    if new_end >= end {
        return;
    }
    // Lowered before the space goes, so that nothing mapped there later
    // counts as the pool's.
    POOL.end.store(new_end, Ordering::Release);
    // SAFETY: the pool's mapping above the heap's new extent, which holds
    // nothing.
    unsafe { libc::syscall(libc::SYS_munmap, new_end, end - new_end) };
}

/// Whether `p` was served by the pool.
pub(crate) fn in_pool(p: *mut u8) -> bool {
    let a = p as usize;
    a >= POOL.start.load(Ordering::Acquire) && a < POOL.end.load(Ordering::Acquire)
}

/// Bytes the pool can still serve (0 without a pool).
pub(crate) fn headroom() -> usize {
    let len = POOL.end.load(Ordering::Acquire) - POOL.start.load(Ordering::Acquire);
    len.saturating_sub(POOL.used.load(Ordering::Relaxed))
}

/// (bytes of the pool, the most it served at once, allocations that
/// glibc served because it had no room).
pub(crate) fn usage() -> (usize, usize, u64) {
    (
        POOL.end.load(Ordering::Acquire) - POOL.start.load(Ordering::Acquire),
        POOL.peak.load(Ordering::Relaxed),
        POOL.fallbacks.load(Ordering::Relaxed),
    )
}

fn served(bytes: usize) {
    let now = POOL.used.fetch_add(bytes, Ordering::Relaxed) + bytes;
    POOL.peak.fetch_max(now, Ordering::Relaxed);
}

fn returned(bytes: usize) {
    POOL.used.fetch_sub(bytes, Ordering::Relaxed);
}

/// An allocation from the pool, or `None` (no pool, no room, or this
/// thread holds the lock).
fn pool_alloc(layout: Layout) -> Option<*mut u8> {
    if POOL.end.load(Ordering::Acquire) == 0 {
        return None;
    }
    let mut held = Held::take()?;
    // SAFETY: `GlobalAlloc` callers never pass a size of zero.
    match unsafe { held.heap().malloc(layout) } {
        Ok(p) => {
            served(layout.size());
            Some(p.as_ptr())
        }
        Err(()) => {
            POOL.fallbacks.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

// ---------------------------------------------------------------------
// Blocks for the C allocator functions.
//
// Not all of this library's Rust allocations reach the global allocator:
// the standard library takes some from `System` (malloc) by name, such as
// each new thread's handle. Where glibc has no room for one made by this
// library, `malloc` serves it here, with its size in a header.

/// The header before a C block: its size.
const HEADER: usize = 16;

/// A block of `n` bytes from the pool for `malloc`, or null.
pub(crate) fn c_alloc(n: usize) -> *mut libc::c_void {
    if IN_SYSTEM.try_with(Cell::get).unwrap_or(true) {
        return std::ptr::null_mut();
    }
    let Some(layout) = n
        .checked_add(HEADER)
        .and_then(|total| Layout::from_size_align(total, HEADER).ok())
    else {
        return std::ptr::null_mut();
    };
    match pool_alloc(layout) {
        Some(p) => {
            // SAFETY: the block holds `HEADER + n` bytes, aligned to 16.
            unsafe {
                p.cast::<usize>().write(n);
                p.add(HEADER).cast()
            }
        }
        None => std::ptr::null_mut(),
    }
}

/// The size asked for the C block at `p` (from [`c_alloc`]).
pub(crate) fn c_size(p: *mut libc::c_void) -> usize {
    // SAFETY: `p` is a C block of the pool: its header is right before it.
    unsafe { p.cast::<u8>().sub(HEADER).cast::<usize>().read() }
}

/// Frees the C block at `p` (from [`c_alloc`]).
pub(crate) fn c_free(p: *mut libc::c_void) {
    let n = c_size(p);
    // SAFETY: the block starts `HEADER` bytes before `p`, of this layout,
    // which `c_alloc` made.
    unsafe {
        POOL.dealloc(
            p.cast::<u8>().sub(HEADER),
            Layout::from_size_align_unchecked(n + HEADER, HEADER),
        )
    };
}

// SAFETY: every pointer is served either by the pool's heap, in the pool's
// range, or by `System`, outside it, and goes back to the one that served
// it; the heap is only used under its lock.
unsafe impl GlobalAlloc for Pool {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match pool_alloc(layout) {
            Some(p) => p,
            // SAFETY: the caller's layout, as `GlobalAlloc::alloc` requires.
            None => system(|| unsafe { System.alloc(layout) }),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !in_pool(ptr) {
            // SAFETY: served by `System` (outside the pool) with `layout`.
            return unsafe { System.dealloc(ptr, layout) };
        }
        // A pool block is freed under the lock; a thread already holding it
        // (a signal handler that interrupted it) cannot free one, and leaks
        // it instead of deadlocking.
        if let Some(mut held) = Held::take() {
            // SAFETY: served by the pool's heap with `layout`, and non-null.
            unsafe { held.heap().free(NonNull::new_unchecked(ptr), layout) };
            returned(layout.size());
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if in_pool(ptr) {
            if let Some(mut held) = Held::take() {
                // SAFETY: `ptr` was served by the pool's heap with `layout`.
                let p = unsafe { NonNull::new_unchecked(ptr) };
                if new_size <= layout.size() {
                    // SAFETY: as above; the new size is not larger.
                    unsafe { held.heap().shrink(p, layout, new_size) };
                    returned(layout.size() - new_size);
                    return ptr;
                }
                // SAFETY: as above; the new size is larger.
                if let Ok(q) = unsafe { held.heap().grow(p, layout, new_size) } {
                    served(new_size - layout.size());
                    return q.as_ptr();
                }
            }
        } else {
            // SAFETY: served by `System` with `layout`; the caller's size.
            let q = system(|| unsafe { System.realloc(ptr, layout, new_size) });
            if !q.is_null() {
                return q;
            }
        }
        // Elsewhere: a new block (the pool, else glibc), the bytes copied.
        // SAFETY: the caller guarantees `new_size`, rounded up to the
        // alignment, does not overflow.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: `new` has a non-zero size, as the caller's does.
        let q = unsafe { self.alloc(new) };
        if !q.is_null() {
            // SAFETY: both blocks hold at least the smaller size, and are
            // different blocks.
            unsafe { std::ptr::copy_nonoverlapping(ptr, q, layout.size().min(new_size)) };
            // SAFETY: the old block, served with `layout`.
            unsafe { self.dealloc(ptr, layout) };
        }
        q
    }
}

/// Fork preparation, registered before every other fork handler of this
/// library and uhmm (so that it runs after them, as prepare handlers run
/// in reverse order): holds the pool's lock across `fork`, so that the
/// child's copy of the heap is not caught in the middle of a change. The
/// forking thread's own allocations meanwhile (later prepare handlers) are
/// glibc's.
pub(crate) extern "C" fn fork_prepare() {
    if let Some(held) = Held::take() {
        std::mem::forget(held);
        let _ = FORK_HELD.try_with(|f| f.set(true));
    }
}

/// Releases what [`fork_prepare`] took, in the parent and in the child
/// (whose only thread is the one that forked).
pub(crate) extern "C" fn fork_release() {
    if FORK_HELD.try_with(|f| f.replace(false)) == Ok(true) {
        drop(Held);
    }
}
