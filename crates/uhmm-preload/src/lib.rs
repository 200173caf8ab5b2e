//! `libuhmm_preload.so`: the library `uhmm run` loads into an unmodified
//! program with `LD_PRELOAD`. It puts the program's large private
//! anonymous memory under uhmm, with a [`SimDevice`] attached, and can
//! keep moving it to the device and back while the program runs.
//!
//! What it interposes (C symbols this library defines, found before
//! glibc's by the dynamic linker):
//!
//! - `mmap`: a private anonymous read-write mapping of at least the
//!   threshold is managed (`Mm::manage`) right after it is made. Shared,
//!   file, stack (`MAP_STACK`, `MAP_GROWSDOWN`), hugetlb and `PROT_NONE`
//!   (reservation) mappings are left alone, as is every mapping made while
//!   inside this library or by uhmm's own threads (uhmm itself maps through
//!   raw system calls, which no interposition sees).
//! - `munmap`, `mremap`, `madvise`: passed on; uhmm's fault service follows
//!   the kernel's UNMAP / REMAP / REMOVE events of managed memory, so its
//!   own bookkeeping needs nothing here. This library keeps its list of
//!   managed pieces (what `--chaos` picks from) in step, and manages the
//!   grown tail of a managed mapping that `mremap` enlarged.
//! - `malloc`, `calloc`, `realloc`, `reallocarray`, `free`,
//!   `malloc_usable_size`: glibc serves large blocks with its own internal
//!   `mmap`, which no interposition sees. So a block of at least the
//!   threshold is served here instead: mapped inside a reservation of
//!   address space this library holds (so that `free` tells its blocks from
//!   glibc's by one comparison) and managed. The reservation counts against
//!   `RLIMIT_AS`: it is 256 GiB without a limit, a quarter of what the
//!   limit leaves under one (none if that is less than the threshold).
//!   Smaller blocks, and every
//!   block when that fails, are glibc's (`__libc_malloc` and friends). The
//!   aligned allocators (`memalign`, `posix_memalign`, `aligned_alloc`,
//!   `valloc`, `pvalloc`) are passed on, not managed. Where another
//!   malloc follows this library in `LD_PRELOAD` (jemalloc, tcmalloc, an
//!   ASan runtime), every malloc-family call is passed on to it (said once
//!   on stderr): only mappings are managed then.
//! - `setrlimit`, `prlimit` (and their `64` names): passed on; when the
//!   process lowers its own `RLIMIT_AS`, the part of the reservation the
//!   new limit cannot afford is given back (freed blocks kept for reuse
//!   first, then free space off its top). A limit lowered from outside
//!   (`prlimit` by another process) is followed by each call that needs
//!   address space (one `getrlimit` each): `mmap`, the malloc family, and
//!   `pthread_create` (interposed for that alone: glibc maps the stack
//!   itself), each made again if it failed for want of room.
//! - `ioctl`: passed on after one comparison, except `UFFDIO_REGISTER`.
//!   A range can be registered with one userfaultfd only, and uhmm's
//!   holds every managed range: before a program registers a range with a
//!   userfaultfd of its own, what uhmm manages there is handed over (its
//!   pages come home, `Mm::unmanage`) and never managed again (chaos no
//!   longer picks it; a later `mremap` of it is not managed), and a malloc
//!   block with a part of it registered is unmapped when freed, outside
//!   the heap lock, not kept for reuse (its next user would get the
//!   program's registration). The handover stands if the registration
//!   then fails. `UFFDIO_UNREGISTER` is passed on: what the program
//!   unregisters is plain memory of its own from then on. An `ioctl` made
//!   by raw system call is not seen. From a signal handler that
//!   interrupted the allocator or this library, nothing is handed over
//!   (the hand-over allocates and takes locks the interrupted code may
//!   hold): a registration of managed memory then fails with EBUSY.
//!
//! Environment (set by `uhmm run`): `UHMM_RUN_THRESHOLD` (bytes, default
//! 1 MiB), `UHMM_RUN_CHAOS` (migrations per second, default 0: none),
//! `UHMM_RUN_DEVICE_MIB` (the device's memory in MiB, default 16 GiB),
//! `UHMM_RUN_STATS` (a file to append one JSON line per process to; stderr
//! otherwise), `UHMM_RUN_QUIET=1` (no stderr report).
//!
//! Each process gets its own `Mm` and device, made on its first managed
//! mapping: a forked child's inherited `Mm` is dead (uhmm returns
//! `ForkedChild` there, and the child's copies of managed memory are plain
//! memory), so the first interposed call in the child that needs one sees
//! a different process id and makes a new one. If uhmm cannot start (no
//! userfaultfd, say) the process runs unmanaged, with one line on stderr.
//! Nothing here panics into the program or aborts it: every entry point
//! catches a panic and falls back to the plain call, and this library's
//! own allocations come from a pool of address space mapped at load
//! (`pool`), so that a program that fills its `RLIMIT_AS` does not see one
//! fail (Rust aborts on that); with little room left in the pool, no more
//! memory is taken on.
//!
//! Not covered: static programs and programs setuid to another user (the
//! dynamic linker ignores `LD_PRELOAD` for them), mappings
//! glibc makes internally (thread stacks, malloc arenas), the heap below
//! the threshold, and `.bss`.

// An LD_PRELOAD library is unsafe by nature: it defines the C symbols
// mmap, malloc, free, ... that the program and glibc call, calls the real
// ones through pointers from dlsym or glibc's `__libc_*` entry points, and
// hands memory it manages to C code. Each unsafe block says why it holds.
#![allow(unsafe_code)]

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ffi::{c_int, c_void};
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use libc::{off_t, size_t};
use uhmm::devmem::PagemapConfig;
use uhmm::mm::Mm;
use uhmm::sys::uffd::AccessPolicy;
use uhmm::{PageRange, VirtAddr};
use uhmm_sim::SimDevice;

mod pool;

const PAGE: usize = 4096;
/// The most address space reserved for large `malloc` blocks (virtual
/// only: `PROT_NONE`, `MAP_NORESERVE`). It counts against `RLIMIT_AS`,
/// used or not: under a limit the reservation is a quarter of what the
/// limit leaves (`reservation_len`), and a lowered limit takes back what
/// it cannot afford (`fit_reservation`).
const RESERVATION: usize = 256 << 30;

/// Mappings and blocks of at least this many bytes are managed; `usize::MAX`
/// until the constructor has read the environment.
static THRESHOLD: AtomicUsize = AtomicUsize::new(usize::MAX);
static CHAOS_RATE: AtomicU64 = AtomicU64::new(0); // f64 bits
/// The reservation: `[RES_START, RES_END)`, empty if there is none.
/// `RES_END` only ever comes down (`fit_reservation`), before the space
/// above it is given back, so that an address mapped there later is never
/// taken for a block of ours.
static RES_START: AtomicUsize = AtomicUsize::new(0);
static RES_END: AtomicUsize = AtomicUsize::new(0);

static REAL_MMAP: AtomicUsize = AtomicUsize::new(0);
static REAL_MUNMAP: AtomicUsize = AtomicUsize::new(0);
static REAL_MREMAP: AtomicUsize = AtomicUsize::new(0);
static REAL_MADVISE: AtomicUsize = AtomicUsize::new(0);
static REAL_USABLE: AtomicUsize = AtomicUsize::new(0);
static REAL_SETRLIMIT: AtomicUsize = AtomicUsize::new(0);
static REAL_PRLIMIT: AtomicUsize = AtomicUsize::new(0);
static REAL_IOCTL: AtomicUsize = AtomicUsize::new(0);
static REAL_PTHREAD_CREATE: AtomicUsize = AtomicUsize::new(0);

type MmapFn = unsafe extern "C" fn(*mut c_void, size_t, c_int, c_int, c_int, off_t) -> *mut c_void;
type MunmapFn = unsafe extern "C" fn(*mut c_void, size_t) -> c_int;
type MremapFn =
    unsafe extern "C" fn(*mut c_void, size_t, size_t, c_int, *mut c_void) -> *mut c_void;
type MadviseFn = unsafe extern "C" fn(*mut c_void, size_t, c_int) -> c_int;
type UsableFn = unsafe extern "C" fn(*mut c_void) -> size_t;
type SetrlimitFn = unsafe extern "C" fn(c_int, *const libc::rlimit) -> c_int;
type IoctlFn = unsafe extern "C" fn(c_int, libc::c_ulong, *mut c_void) -> c_int;
type PrlimitFn =
    unsafe extern "C" fn(libc::pid_t, c_int, *const libc::rlimit, *mut libc::rlimit) -> c_int;
type MallocFn = unsafe extern "C" fn(size_t) -> *mut c_void;
type CallocFn = unsafe extern "C" fn(size_t, size_t) -> *mut c_void;
type ReallocFn = unsafe extern "C" fn(*mut c_void, size_t) -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void);
type MemalignFn = unsafe extern "C" fn(size_t, size_t) -> *mut c_void;
type PosixMemalignFn = unsafe extern "C" fn(*mut *mut c_void, size_t, size_t) -> c_int;

/// Which malloc the program has: not known yet (0), glibc's (1: large
/// blocks are served here), or another one found after this library
/// (2: jemalloc, tcmalloc, an ASan runtime in `LD_PRELOAD`; every
/// malloc-family call is passed on to it, and only mappings are managed).
static ALLOCATOR: AtomicUsize = AtomicUsize::new(0);
static RESOLVING: AtomicBool = AtomicBool::new(false);
static NEXT_MALLOC: AtomicUsize = AtomicUsize::new(0);
static NEXT_CALLOC: AtomicUsize = AtomicUsize::new(0);
static NEXT_REALLOC: AtomicUsize = AtomicUsize::new(0);
static NEXT_FREE: AtomicUsize = AtomicUsize::new(0);
static NEXT_MEMALIGN: AtomicUsize = AtomicUsize::new(0);
static NEXT_POSIX_MEMALIGN: AtomicUsize = AtomicUsize::new(0);
static NEXT_ALIGNED_ALLOC: AtomicUsize = AtomicUsize::new(0);
static NEXT_VALLOC: AtomicUsize = AtomicUsize::new(0);
static NEXT_PVALLOC: AtomicUsize = AtomicUsize::new(0);

/// Whether another malloc than glibc's serves the program (resolving the
/// malloc family on the first call that asks; a call made meanwhile, by
/// dlsym itself, is glibc's).
fn foreign_malloc() -> bool {
    match ALLOCATOR.load(Ordering::Acquire) {
        0 => {
            if RESOLVING.swap(true, Ordering::AcqRel) {
                return false;
            }
            resolve_malloc();
            ALLOCATOR.load(Ordering::Acquire) == 2
        }
        a => a == 2,
    }
}

fn resolve_malloc() {
    for (name, slot) in [
        (c"malloc", &NEXT_MALLOC),
        (c"calloc", &NEXT_CALLOC),
        (c"realloc", &NEXT_REALLOC),
        (c"free", &NEXT_FREE),
        (c"memalign", &NEXT_MEMALIGN),
        (c"posix_memalign", &NEXT_POSIX_MEMALIGN),
        (c"aligned_alloc", &NEXT_ALIGNED_ALLOC),
        (c"valloc", &NEXT_VALLOC),
        (c"pvalloc", &NEXT_PVALLOC),
    ] {
        resolve(name, slot);
    }
    let next = NEXT_MALLOC.load(Ordering::Acquire);
    let glibc = __libc_malloc as MallocFn as usize;
    let foreign = next != 0
        && next != glibc
        && [&NEXT_CALLOC, &NEXT_REALLOC, &NEXT_FREE]
            .iter()
            .all(|s| s.load(Ordering::Acquire) != 0);
    ALLOCATOR.store(if foreign { 2 } else { 1 }, Ordering::Release);
}

/// Calls the next definition of an allocator function in `slot` (resolved)
/// with `call`, or `fallback` where there is none.
macro_rules! next_call {
    ($slot:expr, $ty:ty, $fallback:expr, |$f:ident| $call:expr) => {
        match $slot.load(Ordering::Acquire) {
            0 => $fallback,
            p => {
                // SAFETY: dlsym's answer for the function of this name,
                // whose C type is `$ty`; the caller's arguments are passed
                // on unchanged.
                let $f = unsafe { std::mem::transmute::<usize, $ty>(p) };
                let _a = InAlloc::enter();
                $call
            }
        }
    };
}

unsafe extern "C" {
    // glibc's own allocator, under the names it exports for replacements
    // of malloc to call (GLIBC_2.2.5).
    fn __libc_malloc(n: size_t) -> *mut c_void;
    fn __libc_calloc(n: size_t, size: size_t) -> *mut c_void;
    fn __libc_realloc(p: *mut c_void, n: size_t) -> *mut c_void;
    fn __libc_free(p: *mut c_void);
}

// ---------------------------------------------------------------------
// Calls into the allocator below.

thread_local! {
    /// How many calls into the allocator below this library (glibc's, or
    /// one that follows it in `LD_PRELOAD`) this thread is in. A signal
    /// handler that interrupts one must not allocate: the interrupted call
    /// may hold the allocator's lock (see `hand_over`).
    static IN_ALLOC: Cell<u32> = const { Cell::new(0) };
}

/// Whether this library's constructor has begun, which proves its
/// thread-local storage usable. Before it, the dynamic linker (or another
/// library's initializer, such as ASan's `dlsym` calls) may call `malloc`
/// while this library's thread-local storage cannot be reached yet (an
/// access jumped to address 0): nothing counts then (no signal handler of
/// the program runs that early).
static TLS_READY: AtomicBool = AtomicBool::new(false);

/// Counts a call into the allocator below while it lives.
struct InAlloc(bool);

impl InAlloc {
    fn enter() -> InAlloc {
        let counted =
            TLS_READY.load(Ordering::Acquire) && IN_ALLOC.try_with(|c| c.set(c.get() + 1)).is_ok();
        InAlloc(counted)
    }
}

impl Drop for InAlloc {
    fn drop(&mut self) {
        if self.0 {
            let _ = IN_ALLOC.try_with(|c| c.set(c.get().saturating_sub(1)));
        }
    }
}

/// Whether this thread is in a call into the allocator below (true if
/// its thread-local storage is gone: assume the worst).
fn in_alloc() -> bool {
    IN_ALLOC.try_with(|c| c.get() > 0).unwrap_or(true)
}

// ---------------------------------------------------------------------
// The reentrancy guard: calls made while inside this library (or by
// uhmm's threads) go straight to the real functions.

thread_local! {
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as inside this library while alive.
struct Inside;

impl Inside {
    /// `None` if the thread is inside already (or its thread-local storage
    /// is gone): the caller must do the plain call.
    fn enter() -> Option<Inside> {
        // (`then`, not `then_some`: a guard made and dropped when the thread
        // is inside already would clear the flag.)
        INSIDE
            .try_with(|c| (!c.replace(true)).then(|| Inside))
            .ok()
            .flatten()
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        let _ = INSIDE.try_with(|c| c.set(false));
    }
}

thread_local! {
    /// Set while uhmm's own fork or exit hooks run on this thread: every
    /// interposed call is then the plain one (as inside the library), kept
    /// apart from `INSIDE` so that no guard dropped meanwhile clears it.
    static IN_UHMM_HOOK: Cell<bool> = const { Cell::new(false) };
}

/// Whether uhmm's fork or exit hooks run on this thread now.
fn in_uhmm_hook() -> bool {
    IN_UHMM_HOOK.try_with(Cell::get).unwrap_or(true)
}

/// Registered (once, after uhmm registered its own) so that it runs just
/// before uhmm's fork preparation: the forking thread counts as inside
/// this library for the whole of uhmm's fork hooks. uhmm brings device
/// pages home there while holding its own locks, allocating as it goes; an
/// allocation served here as a managed block would call `Mm::manage`,
/// which waits for those locks (the program hung), and a cached block
/// unmapped there would raise an UNMAP event the fault service reads only
/// under them.
extern "C" fn uhmm_hooks_enter() {
    let _ = IN_UHMM_HOOK.try_with(|c| c.set(true));
}

/// Runs after uhmm's parent and child hooks. Async-signal-safe (a store
/// to a const-initialized thread-local).
extern "C" fn uhmm_hooks_leave() {
    let _ = IN_UHMM_HOOK.try_with(|c| c.set(false));
}

/// Whether `uhmm_hooks_enter` / `uhmm_hooks_leave` are registered
/// (inherited by a forked child, as the registration is).
static FORK_GUARD: std::sync::Once = std::sync::Once::new();

/// Whether the calling thread is one of uhmm's (its fault service, the
/// chaos thread): they are named `uhmm-…`, and what they map is uhmm's.
fn uhmm_thread() -> bool {
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into the buffer.
    let rc = unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    rc == 0 && name.starts_with(b"uhmm-")
}

/// Runs `f` inside the library, or returns `None` if the thread is inside
/// already, is uhmm's, or `f` panicked (contained: the panic hook printed
/// it; the caller falls back to the plain call).
fn inside<T>(f: impl FnOnce() -> Option<T>) -> Option<T> {
    let _g = Inside::enter()?;
    if in_uhmm_hook() || uhmm_thread() {
        return None;
    }
    // uhmm takes its locks on this (the program's) thread here: a signal
    // handler that ran meanwhile and touched managed memory needing the
    // fault service would wait for a service waiting for those locks.
    // Signals wait until the call is done.
    let _signals = uhmm::sys::AsyncSignalsBlocked::new();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .ok()
        .flatten()
}

// ---------------------------------------------------------------------
// The real calls.

fn real_mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off_t,
) -> *mut c_void {
    match REAL_MMAP.load(Ordering::Acquire) {
        // SAFETY: before the constructor resolved glibc's mmap (another
        // library's constructor mapping memory), the system call itself,
        // with the caller's arguments.
        0 => unsafe {
            libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, off) as *mut c_void
        },
        // SAFETY: REAL_MMAP holds dlsym's answer for "mmap", which has this
        // type; the caller's arguments are passed on unchanged.
        f => unsafe { std::mem::transmute::<usize, MmapFn>(f)(addr, len, prot, flags, fd, off) },
    }
}

fn real_munmap(addr: *mut c_void, len: usize) -> c_int {
    match REAL_MUNMAP.load(Ordering::Acquire) {
        // SAFETY: as in `real_mmap`.
        0 => unsafe { libc::syscall(libc::SYS_munmap, addr, len) as c_int },
        // SAFETY: dlsym's answer for "munmap", of this type.
        f => unsafe { std::mem::transmute::<usize, MunmapFn>(f)(addr, len) },
    }
}

fn real_mremap(
    old: *mut c_void,
    old_len: usize,
    new_len: usize,
    flags: c_int,
    new: *mut c_void,
) -> *mut c_void {
    match REAL_MREMAP.load(Ordering::Acquire) {
        // SAFETY: as in `real_mmap`.
        0 => unsafe {
            libc::syscall(libc::SYS_mremap, old, old_len, new_len, flags, new) as *mut c_void
        },
        // SAFETY: dlsym's answer for "mremap"; passing the fifth argument
        // always is how a variadic call with it looks on this ABI (and
        // glibc reads it only with MREMAP_FIXED).
        f => unsafe {
            std::mem::transmute::<usize, MremapFn>(f)(old, old_len, new_len, flags, new)
        },
    }
}

fn real_madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int {
    match REAL_MADVISE.load(Ordering::Acquire) {
        // SAFETY: as in `real_mmap`.
        0 => unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice) as c_int },
        // SAFETY: dlsym's answer for "madvise", of this type.
        f => unsafe { std::mem::transmute::<usize, MadviseFn>(f)(addr, len, advice) },
    }
}

fn resolve(name: &std::ffi::CStr, slot: &AtomicUsize) {
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
    slot.store(p as usize, Ordering::Release);
}

// ---------------------------------------------------------------------
// Per-process state.

/// Counters of this library (uhmm counts the rest).
#[derive(Default)]
struct Counters {
    mappings_managed: AtomicU64,
    blocks_managed: AtomicU64,
    manage_failures: AtomicU64,
    /// Ranges left unmanaged because the pool had too little room left.
    manage_skipped_no_room: AtomicU64,
    tails_managed: AtomicU64,
    ranges_handed_over: AtomicU64,
    bytes_handed_over: AtomicU64,
    discards: AtomicU64,
    peak_managed: AtomicUsize,
    chaos_to_device: AtomicU64,
    chaos_to_system: AtomicU64,
    chaos_pages_moved: AtomicU64,
    chaos_failed: AtomicU64,
}

/// The managed pieces of this process: start → end.
#[derive(Default)]
struct Live {
    pieces: BTreeMap<usize, usize>,
}

impl Live {
    fn insert(&mut self, start: usize, end: usize) {
        self.remove(start, end);
        self.pieces.insert(start, end);
    }

    /// Removes `[start, end)`; returns the pieces that overlapped it,
    /// clipped to it.
    fn remove(&mut self, start: usize, end: usize) -> Vec<(usize, usize)> {
        let hit: Vec<(usize, usize)> = self
            .pieces
            .range(..end)
            .rev()
            .take_while(|&(_, &e)| e > start)
            .map(|(&s, &e)| (s, e))
            .collect();
        let mut clipped = Vec::new();
        for (s, e) in hit {
            self.pieces.remove(&s);
            if s < start {
                self.pieces.insert(s, start);
            }
            if e > end {
                self.pieces.insert(end, e);
            }
            clipped.push((s.max(start), e.min(end)));
        }
        clipped
    }

    /// Whether the pieces cover `[start, end)` with no gap (one piece or
    /// several that meet end to start: a mapping grown by `mremap` is its
    /// first piece and a piece per grown tail).
    fn covers(&self, start: usize, end: usize) -> bool {
        let mut at = start;
        // The piece holding `start`, then those that follow it.
        let from = self
            .pieces
            .range(..=start)
            .next_back()
            .map_or(start, |(&s, _)| s);
        for (&s, &e) in self.pieces.range(from..end) {
            if s > at {
                return false;
            }
            at = at.max(e);
            if at >= end {
                return true;
            }
        }
        at >= end
    }

    fn overlaps(&self, start: usize, end: usize) -> bool {
        self.pieces
            .range(..end)
            .next_back()
            .is_some_and(|(_, &e)| e > start)
    }

    fn bytes(&self) -> usize {
        self.pieces.iter().map(|(s, e)| e - s).sum()
    }
}

struct Proc {
    pid: i32,
    mm: Mm,
    dev: SimDevice,
    live: Mutex<Live>,
    c: Counters,
    chaos_stop: AtomicBool,
    chaos_done: AtomicBool,
    warned: AtomicBool,
}

static PROC: AtomicPtr<Proc> = AtomicPtr::new(std::ptr::null_mut());
/// The process id whose `Proc` could not be made (it runs unmanaged).
static FAILED_PID: AtomicI32 = AtomicI32::new(0);
/// The process id of the thread making a `Proc` now (0: nobody). Keyed by
/// process so that a child forked in the middle does not wait for it.
static MAKING: AtomicI32 = AtomicI32::new(0);
static REPORTED_PID: AtomicI32 = AtomicI32::new(0);
/// `UHMM_RUN_DEVICE_MIB` (0: the default), `UHMM_RUN_STATS` (a non-empty
/// path) and `UHMM_RUN_QUIET=1`, read by the constructor (single-threaded:
/// the environment may change later, and reading it races with that).
static DEVICE_MIB: AtomicUsize = AtomicUsize::new(0);
static STATS: std::sync::OnceLock<Option<std::ffi::OsString>> = std::sync::OnceLock::new();
static QUIET: AtomicBool = AtomicBool::new(false);
static ATEXIT_PID: AtomicI32 = AtomicI32::new(0);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn getpid() -> i32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() }
}

/// This process's state, made on first use; `None` if uhmm cannot run here.
/// Call inside the library only.
fn proc() -> Option<&'static Proc> {
    let pid = getpid();
    let current = || {
        let p = PROC.load(Ordering::Acquire);
        // SAFETY: a published `Proc` is leaked, never freed.
        (!p.is_null())
            .then(|| unsafe { &*p })
            .filter(|p| p.pid == pid)
    };
    if let Some(p) = current() {
        return Some(p);
    }
    if FAILED_PID.load(Ordering::Relaxed) == pid {
        return None;
    }
    loop {
        let m = MAKING.load(Ordering::Acquire);
        if m == pid {
            std::thread::yield_now();
            continue;
        }
        // Free, or left taken by a thread of the parent we were forked from.
        if MAKING
            .compare_exchange(m, pid, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            break;
        }
    }
    let _making = Making(pid);
    current().or_else(|| {
        if FAILED_PID.load(Ordering::Relaxed) == pid {
            return None;
        }
        match make(pid) {
            Ok(p) => {
                let p: &'static Proc = Box::leak(Box::new(p));
                PROC.store(p as *const Proc as *mut Proc, Ordering::Release);
                // After `Mm::new` registered uhmm's fork hooks: prepare
                // handlers run in reverse order of registration, parent
                // and child handlers in order, so these two enclose uhmm's.
                FORK_GUARD.call_once(|| {
                    // SAFETY: plain functions that never unwind; the child
                    // one is async-signal-safe.
                    unsafe {
                        libc::pthread_atfork(
                            Some(uhmm_hooks_enter),
                            Some(uhmm_hooks_leave),
                            Some(uhmm_hooks_leave),
                        )
                    };
                });
                start_chaos(p);
                // Registered after `Mm::new` registered uhmm's own hook, so
                // that it runs first, with the device still there.
                if ATEXIT_PID.swap(pid, Ordering::AcqRel) != pid {
                    // SAFETY: `at_exit` is a plain function that never unwinds.
                    unsafe { libc::atexit(at_exit) };
                }
                Some(p)
            }
            Err(e) => {
                FAILED_PID.store(pid, Ordering::Relaxed);
                say(&format!("pid {pid} runs unmanaged: {e}"));
                None
            }
        }
    })
}

/// Held by the thread making this process's `Proc`: frees `MAKING` when
/// done, and on a panic (caught further up) marks the process unmanaged,
/// so that no later call waits for a `Proc` that will never come.
struct Making(i32);

impl Drop for Making {
    fn drop(&mut self) {
        if std::thread::panicking() {
            FAILED_PID.store(self.0, Ordering::Relaxed);
        }
        MAKING.store(0, Ordering::Release);
    }
}

fn make(pid: i32) -> Result<Proc, Box<dyn std::error::Error>> {
    if pool::headroom() < OWN_ROOM {
        return Err(format!(
            "{} B left for uhmm's own memory (its pool, sized from RLIMIT_AS)",
            pool::headroom()
        )
        .into());
    }
    // Under chaos pages leave the CPU page table at any time: a system call
    // on one needs a userfaultfd that serves kernel-mode faults (with a
    // user-mode-only one it fails with EFAULT, and the program with it).
    // Without one the process runs unmanaged, and says why.
    let policy = if chaos_rate() > 0.0 {
        AccessPolicy::FullOnly
    } else {
        AccessPolicy::Auto
    };
    let mm = Mm::with_access(policy)?;
    let config = match Some(DEVICE_MIB.load(Ordering::Relaxed)) {
        // 1 MiB chunks.
        Some(mib) if mib > 0 => PagemapConfig {
            chunk_pages: (1 << 20) / PAGE,
            max_chunks: mib,
        },
        _ => PagemapConfig::default(),
    };
    let dev = SimDevice::with_memory(&mm, config)?;
    Ok(Proc {
        pid,
        mm,
        dev,
        live: Mutex::new(Live::default()),
        c: Counters::default(),
        chaos_stop: AtomicBool::new(false),
        chaos_done: AtomicBool::new(true),
        warned: AtomicBool::new(false),
    })
}

/// One line on stderr, prefixed.
fn say(msg: &str) {
    let _ = std::io::stderr().write_all(format!("uhmm run: {msg}\n").as_bytes());
}

impl Proc {
    /// Manages `[start, end)`, just mapped by the program (or for it). Call
    /// with `live` locked.
    fn manage(&self, live: &mut Live, start: usize, end: usize) -> bool {
        let Ok(range) = PageRange::from_bounds(VirtAddr::new(start), VirtAddr::new(end)) else {
            return false;
        };
        if pool::headroom() < OWN_ROOM {
            self.c
                .manage_skipped_no_room
                .fetch_add(1, Ordering::Relaxed);
            if !self.warned.swap(true, Ordering::Relaxed) {
                say(&format!(
                    "pid {}: {:#x}..{:#x} left unmanaged: {} B left for uhmm's own memory (RLIMIT_AS) (said once)",
                    self.pid,
                    start,
                    end,
                    pool::headroom()
                ));
            }
            return false;
        }
        // SAFETY: `Mm::manage`'s contract. No Rust reference points into the
        // range: it is the program's memory (or a block handed to it), which
        // this library reaches by raw pointers only. "Kept mapped until the
        // region is dropped": the region is never dropped (forgotten below),
        // and its drop is the only thing that relies on it; when the program
        // unmaps, remaps or discards the memory, uhmm follows the kernel's
        // UNMAP / REMAP / REMOVE events of it, as it does for any managed
        // memory unmapped behind its back (and the kernel unregisters what
        // is unmapped).
        match unsafe { self.mm.manage(range) } {
            Ok(region) => {
                std::mem::forget(region);
                live.insert(start, end);
                let bytes = live.bytes();
                self.c.peak_managed.fetch_max(bytes, Ordering::Relaxed);
                true
            }
            Err(e) => {
                self.c.manage_failures.fetch_add(1, Ordering::Relaxed);
                if !self.warned.swap(true, Ordering::Relaxed) {
                    say(&format!(
                        "pid {}: {:#x}..{:#x} left unmanaged: {e} (said once)",
                        self.pid, start, end
                    ));
                }
                false
            }
        }
    }
}

// ---------------------------------------------------------------------
// Chaos.

fn chaos_rate() -> f64 {
    f64::from_bits(CHAOS_RATE.load(Ordering::Relaxed))
}

fn start_chaos(p: &'static Proc) {
    let rate = chaos_rate();
    if rate <= 0.0 {
        return;
    }
    p.chaos_done.store(false, Ordering::Release);
    // Every signal blocked: a handler of the program's running here, in
    // the middle of a migration, could wait for that migration.
    let spawned = uhmm::sys::spawn_quiet("uhmm-chaos", move || {
        let _g = Inside::enter();
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| chaos(p, rate)));
        p.chaos_done.store(true, Ordering::Release);
    });
    if let Err(e) = spawned {
        p.chaos_done.store(true, Ordering::Release);
        say(&format!("pid {}: no chaos thread: {e}", p.pid));
    }
}

/// Moves random managed ranges to the device (three in four) and back
/// (one in four), `rate` times a second; CPU touches bring the rest back.
fn chaos(p: &Proc, rate: f64) {
    // (At most a day: a rate too small to write as a duration is no chaos.)
    let interval = Duration::from_secs_f64((1.0 / rate).min(86_400.0));
    let mut seed = (p.pid as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut next = Instant::now();
    while !p.chaos_stop.load(Ordering::Acquire) {
        next += interval;
        let now = Instant::now();
        if next > now {
            // In slices, so that the exit report does not wait for a slow
            // rate's next migration.
            while !p.chaos_stop.load(Ordering::Acquire) {
                let now = Instant::now();
                if now >= next {
                    break;
                }
                std::thread::sleep((next - now).min(Duration::from_millis(100)));
            }
            if p.chaos_stop.load(Ordering::Acquire) {
                break;
            }
        } else if now - next > Duration::from_millis(100) {
            next = now;
        }
        let pick = {
            let live = lock(&p.live);
            let total = live.bytes() / PAGE;
            if total == 0 {
                continue;
            }
            let mut at = (rand() % total as u64) as usize * PAGE;
            live.pieces.iter().find_map(|(&s, &e)| {
                if at < e - s {
                    Some((s + at, e))
                } else {
                    at -= e - s;
                    None
                }
            })
        };
        let Some((addr, end)) = pick else { continue };
        let npages = (1 + (rand() % 256) as usize)
            .min((end - addr) / PAGE)
            .max(1);
        let a = VirtAddr::new(addr);
        if rand() % 4 != 0 {
            match p.dev.migrate_range_to_device(a, npages) {
                Ok(n) => {
                    p.c.chaos_to_device.fetch_add(1, Ordering::Relaxed);
                    p.c.chaos_pages_moved.fetch_add(n, Ordering::Relaxed);
                }
                Err(_) => {
                    p.c.chaos_failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        } else {
            match p.dev.migrate_to_system(a, npages) {
                Ok(r) => {
                    p.c.chaos_to_system.fetch_add(1, Ordering::Relaxed);
                    p.c.chaos_pages_moved.fetch_add(r.cpages, Ordering::Relaxed);
                }
                Err(_) => {
                    p.c.chaos_failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------
// The report at exit.

extern "C" fn at_exit() {
    let _ = inside(|| {
        report();
        Some(())
    });
    // uhmm's own exit hook runs next, on this thread (and the program's
    // older exit hooks after it): what they allocate is glibc's, never a
    // managed block (see `uhmm_hooks_enter`). The process is exiting; the
    // thread stays so.
    let _ = IN_UHMM_HOOK.try_with(|c| c.set(true));
}

fn report() {
    let pid = getpid();
    let p = PROC.load(Ordering::Acquire);
    if p.is_null() || REPORTED_PID.swap(pid, Ordering::AcqRel) == pid {
        return;
    }
    // SAFETY: a published `Proc` is leaked, never freed.
    let p = unsafe { &*p };
    if p.pid != pid {
        return;
    }
    p.chaos_stop.store(true, Ordering::Release);
    let deadline = Instant::now() + Duration::from_secs(2);
    while !p.chaos_done.load(Ordering::Acquire) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let s = p.mm.stats();
    let exe = std::fs::read_link("/proc/self/exe")
        .map(|e| e.display().to_string())
        .unwrap_or_default();
    let c = &p.c;
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let pool = pool::usage();
    let json = serde_json::json!({
        "pid": pid,
        "exe": exe,
        "access": p.mm.access().to_string(),
        "serves_kernel_faults": p.mm.access().serves_kernel_faults(),
        "managed_bytes_at_exit": p.mm.managed_len(),
        "managed_bytes_peak": c.peak_managed.load(Ordering::Relaxed),
        "mappings_managed": ld(&c.mappings_managed),
        "malloc_blocks_managed": ld(&c.blocks_managed),
        "tails_managed": ld(&c.tails_managed),
        "ranges_handed_over": ld(&c.ranges_handed_over),
        "bytes_handed_over": ld(&c.bytes_handed_over),
        "manage_failures": ld(&c.manage_failures),
        "manage_skipped_no_room": ld(&c.manage_skipped_no_room),
        "discards": ld(&c.discards),
        "faults": s.faults,
        "faults_hole": s.faults_hole,
        "faults_device": s.faults_device,
        "faults_exclusive": s.faults_exclusive,
        "faults_wp": s.faults_wp,
        "faults_waited": s.faults_waited,
        "faults_sigbus": s.faults_sigbus,
        "pages_to_device": s.pages_to_device,
        "pages_to_system": s.pages_to_system,
        "pages_lost": s.pages_lost,
        "device_pages_at_exit": p.dev.device_pages(),
        "callback_panics": s.callback_panics,
        "chaos_rate": chaos_rate(),
        "chaos_to_device": ld(&c.chaos_to_device),
        "chaos_to_system": ld(&c.chaos_to_system),
        "chaos_pages_moved": ld(&c.chaos_pages_moved),
        "chaos_failed": ld(&c.chaos_failed),
        "own_pool_bytes": pool.0,
        "own_pool_peak": pool.1,
        "own_pool_fallbacks": pool.2,
    });
    let line = format!("{json}\n");
    match STATS.get().and_then(Option::as_ref) {
        Some(path) => {
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| f.write_all(line.as_bytes()));
            if let Err(e) = written {
                say(&format!(
                    "pid {pid}: cannot write stats to {}: {e}",
                    path.to_string_lossy()
                ));
            }
        }
        _ => {
            if !QUIET.load(Ordering::Relaxed) {
                say(&format!(
                    "pid {pid} ({exe}): managed {} B at exit ({} B peak); faults {} (hole {}, \
                     device {}, exclusive {}, wp {}, waited {}); pages to device {}, to system {}, \
                     lost {}; device pages at exit {}",
                    p.mm.managed_len(),
                    c.peak_managed.load(Ordering::Relaxed),
                    s.faults,
                    s.faults_hole,
                    s.faults_device,
                    s.faults_exclusive,
                    s.faults_wp,
                    s.faults_waited,
                    s.pages_to_device,
                    s.pages_to_system,
                    s.pages_lost,
                    p.dev.device_pages(),
                ));
            }
        }
    }
}

// ---------------------------------------------------------------------
// The heap of large blocks, in the reservation. Inherited by a forked
// child with the memory (the child frees its copies of the blocks), so it
// is not per process; held across fork by the atfork hooks.

#[derive(Default)]
struct Heap {
    /// Free space of the reservation: start → end.
    free: BTreeMap<usize, usize>,
    /// Blocks handed out: start → mapped length.
    blocks: BTreeMap<usize, usize>,
    /// Freed blocks kept mapped (and managed) for the next allocations of
    /// about their size, oldest first, at most `CACHE_BYTES` in all: a
    /// program that allocates and frees large buffers in a loop (`xz`
    /// does, per block) would otherwise pay a map, a registration and an
    /// unmap each time, where glibc reuses its heap. Only the newest
    /// `CACHE_RESIDENT` bytes of them keep their memory (and save first
    /// touches too); the others were discarded.
    cache: Vec<Cached>,
    /// Blocks handed out of which the program registered a part with a
    /// userfaultfd of its own (`ioctl`): never cached when freed, nor
    /// shrunk in place, and unmapped outside the heap lock (an unmap of
    /// memory registered with the program's userfaultfd may wait for the
    /// program's own thread to read the event, and that thread may be in
    /// malloc).
    handed: std::collections::BTreeSet<usize>,
}

/// A freed block in the cache.
#[derive(Clone, Copy)]
struct Cached {
    start: usize,
    len: usize,
    /// Whether its memory is kept; if not, it was discarded
    /// (`MADV_DONTNEED`) and reads as zeros.
    resident: bool,
}

/// The most bytes of freed blocks kept mapped for reuse (address space:
/// their memory is discarded beyond `CACHE_RESIDENT`).
const CACHE_BYTES: usize = 128 << 20;

/// The most bytes of freed blocks whose memory is kept: what a process
/// that freed all its large blocks still holds of them.
const CACHE_RESIDENT: usize = 16 << 20;

static HEAP: Mutex<Heap> = Mutex::new(Heap {
    free: BTreeMap::new(),
    blocks: BTreeMap::new(),
    cache: Vec::new(),
    handed: std::collections::BTreeSet::new(),
});

thread_local! {
    static FORK_HELD: std::cell::RefCell<Option<MutexGuard<'static, Heap>>> =
        const { std::cell::RefCell::new(None) };
}

/// Holds the heap lock across a fork. Registered in the constructor, so
/// run after every prepare hook registered later: after uhmm's, which
/// takes uhmm's fork lock and keeps it until the fork is done. Lock order
/// is therefore uhmm's fork lock, then the heap lock: nothing may wait for
/// uhmm's fork lock while holding the heap lock (making a `Proc` does:
/// `Mm::new` registers under it).
extern "C" fn fork_prepare() {
    let g = lock(&HEAP);
    let _ = FORK_HELD.try_with(|h| *h.borrow_mut() = Some(g));
}

extern "C" fn fork_release() {
    let _ = FORK_HELD.try_with(|h| h.borrow_mut().take());
}

fn ours(p: *mut c_void) -> bool {
    let a = p as usize;
    a >= RES_START.load(Ordering::Acquire) && a < RES_END.load(Ordering::Acquire)
}

fn round_up(n: usize) -> Option<usize> {
    n.checked_add(PAGE - 1).map(|x| x & !(PAGE - 1))
}

const RW: c_int = libc::PROT_READ | libc::PROT_WRITE;
const FIXED_ANON: c_int = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED;

/// A new managed block of at least `n` bytes (zeroed if `zeroed`), or
/// `None` (the caller uses glibc's).
fn big_alloc(n: usize, zeroed: bool) -> Option<*mut c_void> {
    inside(|| {
        let proc = proc()?;
        let len = round_up(n)?;
        let mut heap = lock(&HEAP);
        // A block freed before, still mapped and managed (in this process,
        // or a parent's copy: plain memory then); a zeroed one must have
        // been discarded.
        if let Some(i) = (0..heap.cache.len())
            .filter(|&i| {
                let c = heap.cache[i];
                (len..=len.saturating_mul(2)).contains(&c.len) && !(zeroed && c.resident)
            })
            .min_by_key(|&i| heap.cache[i].len)
        {
            let c = heap.cache.remove(i);
            heap.blocks.insert(c.start, c.len);
            return Some(c.start as *mut c_void);
        }
        let (&s, &e) = heap.free.iter().find(|&(&s, &e)| e - s >= len)?;
        let p = real_mmap(s as *mut c_void, len, RW, FIXED_ANON, -1, 0);
        if p != s as *mut c_void {
            return None;
        }
        heap.free.remove(&s);
        if s + len < e {
            heap.free.insert(s + len, e);
        }
        heap.blocks.insert(s, len);
        let mut live = lock(&proc.live);
        if proc.manage(&mut live, s, s + len) {
            proc.c.blocks_managed.fetch_add(1, Ordering::Relaxed);
        }
        Some(p)
    })
}

/// Gives `[s, s + len)` back to the reservation; whether it could. Heap
/// locked.
fn unmap_block(heap: &mut Heap, s: usize, len: usize) -> bool {
    if !unmap_pages(s, len) {
        return false;
    }
    give_back(heap, s, len);
    true
}

/// Maps the reservation over `[s, s + len)`, which unmaps what was there
/// (uhmm reads the UNMAP event before this returns), and takes it out of
/// the live pieces. Whether it could.
fn unmap_pages(s: usize, len: usize) -> bool {
    let p = real_mmap(
        s as *mut c_void,
        len,
        libc::PROT_NONE,
        FIXED_ANON | libc::MAP_NORESERVE,
        -1,
        0,
    );
    if p != s as *mut c_void {
        return false; // left mapped: a leak, not a fault
    }
    if let Some(p) = current_proc() {
        lock(&p.live).remove(s, s + len);
    }
    true
}

/// Returns `[s, s + len)`, unmapped, to the free space.
fn give_back(heap: &mut Heap, s: usize, len: usize) {
    let (mut start, mut end) = (s, s + len);
    if let Some((&ps, &pe)) = heap.free.range(..start).next_back()
        && pe == start
    {
        heap.free.remove(&ps);
        start = ps;
    }
    if let Some(&ne) = heap.free.get(&end) {
        heap.free.remove(&end);
        end = ne;
    }
    heap.free.insert(start, end);
}

/// Gives the memory of `[s, s + len)` back to the system, keeping the
/// mapping (and its registration): the kernel frees the pages, and uhmm,
/// which follows the REMOVE event of managed memory, drops its device
/// pages. Whether it could. Heap locked (the block is no one's).
fn discard(s: usize, len: usize) -> bool {
    real_madvise(s as *mut c_void, len, libc::MADV_DONTNEED) == 0
}

fn big_free(p: *mut c_void) {
    // Even inside the library (a block can only be ours if a program
    // thread got it).
    let _g = Inside::enter();
    let mut heap = lock(&HEAP);
    let Some(len) = heap.blocks.remove(&(p as usize)) else {
        return;
    };
    if heap.handed.remove(&(p as usize)) {
        // The block's range is neither handed out nor free meanwhile:
        // nobody else can map it.
        drop(heap);
        if unmap_pages(p as usize, len) {
            give_back(&mut lock(&HEAP), p as usize, len);
        }
        return;
    }
    if len <= CACHE_BYTES / 4 {
        let mut cached: usize = heap.cache.iter().map(|c| c.len).sum();
        while cached + len > CACHE_BYTES && !heap.cache.is_empty() {
            let c = heap.cache.remove(0);
            unmap_block(&mut heap, c.start, c.len);
            cached -= c.len;
        }
        // The newest keep their memory (the likeliest to be reused next):
        // older ones are discarded to make room, and a block larger than
        // all the room is discarded itself.
        let resident = len <= CACHE_RESIDENT;
        let mut kept: usize = heap
            .cache
            .iter()
            .filter(|c| c.resident)
            .map(|c| c.len)
            .sum();
        let mut i = 0;
        while resident && kept + len > CACHE_RESIDENT && i < heap.cache.len() {
            let c = heap.cache[i];
            if !c.resident {
                i += 1;
            } else if discard(c.start, c.len) {
                heap.cache[i].resident = false;
                kept -= c.len;
                i += 1;
            } else {
                heap.cache.remove(i);
                unmap_block(&mut heap, c.start, c.len);
                kept -= c.len;
            }
        }
        if resident || discard(p as usize, len) {
            heap.cache.push(Cached {
                start: p as usize,
                len,
                resident,
            });
        } else {
            unmap_block(&mut heap, p as usize, len);
        }
    } else {
        unmap_block(&mut heap, p as usize, len);
    }
}

/// Shrinks the block at `p` to `len` bytes (page-aligned, less than its
/// length), giving the rest back to the reservation: its memory goes back
/// to the system at once, as glibc's `mremap` of a mapped chunk does.
fn shrink_in_place(p: *mut c_void, len: usize) {
    // Even inside the library, as `big_free`.
    let _g = Inside::enter();
    let s = p as usize;
    let mut heap = lock(&HEAP);
    let Some(&old) = heap.blocks.get(&s) else {
        return;
    };
    // (A handed-over block keeps its length: see `Heap::handed`.)
    if len < old && !heap.handed.contains(&s) && unmap_block(&mut heap, s + len, old - len) {
        heap.blocks.insert(s, len);
    }
}

fn block_len(p: *mut c_void) -> Option<usize> {
    // (Inside, as every holder of the heap lock: see `hand_over`.)
    let _g = Inside::enter();
    lock(&HEAP).blocks.get(&(p as usize)).copied()
}

/// Grows the block at `p` in place to `len` bytes if the reservation is
/// free right after it.
fn grow_in_place(p: *mut c_void, len: usize) -> bool {
    inside(|| {
        // The process's `Proc` before the heap lock, never under it (as in
        // `big_alloc`). In a forked child the first grow of an inherited
        // block makes the child's `Proc`, and `Mm::new` waits for uhmm's
        // fork lock; a thread forking meanwhile holds that lock (uhmm's
        // prepare hook) and then waits for the heap lock (`fork_prepare`,
        // which runs after uhmm's): made under the heap lock, neither
        // thread went on.
        let proc = proc();
        let s = p as usize;
        let mut heap = lock(&HEAP);
        let old = *heap.blocks.get(&s)?;
        let (gs, ge) = (s + old, s + len);
        let fe = *heap.free.get(&gs)?;
        if fe < ge {
            return None;
        }
        let q = real_mmap(gs as *mut c_void, ge - gs, RW, FIXED_ANON, -1, 0);
        if q != gs as *mut c_void {
            return None;
        }
        heap.free.remove(&gs);
        if ge < fe {
            heap.free.insert(ge, fe);
        }
        heap.blocks.insert(s, len);
        if let Some(proc) = proc {
            let mut live = lock(&proc.live);
            if live.overlaps(s, gs) {
                proc.manage(&mut live, gs, ge);
            }
        }
        Some(())
    })
    .is_some()
}

// ---------------------------------------------------------------------
// The program's own userfaultfd.

/// `UFFDIO_REGISTER`: `_IOWR(0xAA, 0x00, struct uffdio_register)`, with a
/// 32-byte struct (x86_64 and aarch64 encode it alike). The kernel reads
/// the request as 32 bits: so is it compared.
const UFFDIO_REGISTER: u32 = 0xc020_aa00;

fn real_ioctl(fd: c_int, request: libc::c_ulong, arg: *mut c_void) -> c_int {
    match REAL_IOCTL.load(Ordering::Acquire) {
        // SAFETY: before the constructor resolved glibc's ioctl, the
        // system call itself, with the caller's arguments.
        0 => unsafe { libc::syscall(libc::SYS_ioctl, fd, request, arg) as c_int },
        // SAFETY: dlsym's answer for "ioctl"; the variadic third argument
        // travels in the same register as this fixed one on this ABI, and
        // the caller's arguments are passed on unchanged.
        f => unsafe { std::mem::transmute::<usize, IoctlFn>(f)(fd, request, arg) },
    }
}

/// The range of the `struct uffdio_register` at `arg`, read through the
/// kernel (`process_vm_readv`: a bad pointer is the kernel's EFAULT to
/// report, not a fault here); `None` if unreadable, or a range the kernel
/// refuses anyway.
fn register_range(arg: *mut c_void) -> Option<(usize, usize)> {
    let mut range = [0u64; 2];
    let local = libc::iovec {
        iov_base: range.as_mut_ptr().cast(),
        iov_len: size_of_val(&range),
    };
    let remote = libc::iovec {
        iov_base: arg,
        iov_len: size_of_val(&range),
    };
    // SAFETY: reads 16 bytes of this process at `arg` into `range` through
    // the kernel (an unreadable address is an error, not a fault); both
    // iovecs describe 16 bytes.
    let n = unsafe { libc::process_vm_readv(getpid(), &local, 1, &remote, 1, 0) };
    if n != size_of_val(&range) as isize {
        return None;
    }
    let start = usize::try_from(range[0]).ok()?;
    let len = usize::try_from(range[1]).ok()?;
    let end = start.checked_add(len)?;
    (len > 0 && start % PAGE == 0 && len % PAGE == 0).then_some((start, end))
}

/// Before the program registers the range of the `struct uffdio_register`
/// at `arg` with a userfaultfd of its own: a range can be registered with
/// one userfaultfd only, so what uhmm manages there is handed over (see
/// the module docs). Malloc blocks it touches are marked first, in any
/// process (a forked child's inherited blocks too, which nothing manages
/// there).
///
/// Not from a signal handler that interrupted this library or the
/// allocator below (which may hold a lock the hand-over needs, or that
/// its allocations need): nothing is handed over then, and a managed
/// range's registration fails with EBUSY, as it would without this
/// library's help; the program does not hang.
fn hand_over(arg: *mut c_void) {
    if in_alloc() {
        return;
    }
    let _ = inside(|| {
        let (start, end) = register_range(arg)?;
        {
            let mut heap = lock(&HEAP);
            let hit: Vec<usize> = heap
                .blocks
                .range(..end)
                .filter(|&(&s, &l)| s + l > start)
                .map(|(&s, _)| s)
                .collect();
            heap.handed.extend(hit);
        }
        let p = current_proc()?;
        // Out of the pieces first (chaos picks it no more), then unmanaged
        // with no lock of this library held: `unmanage` waits for
        // migrations in flight, and a fork in progress waits for the heap
        // lock.
        let in_live = !lock(&p.live).remove(start, end).is_empty();
        let range = PageRange::from_bounds(VirtAddr::new(start), VirtAddr::new(end)).ok()?;
        let bytes = p.mm.unmanage(range).ok()?;
        if bytes > 0 || in_live {
            p.c.ranges_handed_over.fetch_add(1, Ordering::Relaxed);
            p.c.bytes_handed_over
                .fetch_add(bytes as u64, Ordering::Relaxed);
        }
        Some(())
    });
}

/// # Safety
///
/// As `ioctl(2)`. Declared with a fixed third argument: on x86_64 and
/// aarch64 a variadic call passes it in the same register. Every request
/// but `UFFDIO_REGISTER` is passed on after one comparison.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ioctl(fd: c_int, request: libc::c_ulong, arg: *mut c_void) -> c_int {
    if request as u32 == UFFDIO_REGISTER {
        let saved = errno();
        hand_over(arg);
        set_errno(saved);
    }
    real_ioctl(fd, request, arg)
}

// ---------------------------------------------------------------------
// The reservation under RLIMIT_AS.

/// The soft `RLIMIT_AS` in bytes, `None` if there is none.
fn as_limit() -> Option<usize> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into `r`.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut r) };
    (rc == 0 && r.rlim_cur != libc::RLIM_INFINITY)
        .then(|| usize::try_from(r.rlim_cur).unwrap_or(usize::MAX))
}

/// The address space this process has mapped (`VmSize`, which
/// `RLIMIT_AS` limits); 0 if it cannot be read.
fn address_space_in_use() -> usize {
    // Read into the stack: called after `setrlimit`, where the program may
    // have left no memory to allocate.
    let mut buf = [0u8; 64];
    // SAFETY: a NUL-terminated path; flags without O_CREAT.
    let fd = unsafe {
        libc::open(
            c"/proc/self/statm".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return 0;
    }
    // SAFETY: reads at most `buf.len()` bytes into `buf`, from our own fd.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    // SAFETY: our own fd, closed once.
    unsafe { libc::close(fd) };
    let text = &buf[..usize::try_from(n).unwrap_or(0)];
    let pages = text
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .fold(0usize, |a, &b| {
            a.saturating_mul(10).saturating_add(usize::from(b - b'0'))
        });
    pages.saturating_mul(PAGE)
}

/// The most address space the reservation may hold, `in_use` bytes being
/// mapped besides it under `limit`: a quarter of what the limit leaves,
/// so that the program keeps the rest for its own mappings, thread stacks
/// and glibc's heap (blocks served from the reservation are the
/// program's too, so little of the quarter is lost to it).
fn affordable(limit: usize, in_use: usize) -> usize {
    (limit.saturating_sub(in_use) / 4) & !(PAGE - 1)
}

/// The most address space the pool of this library's own allocations
/// takes (`pool`; virtual, `MAP_NORESERVE`: memory only as it is used).
const POOL_MAX: usize = 1 << 30;

/// The least room left in the pool for this library to take on more: a
/// `Mm`, or another range to manage. uhmm's tables grow with the pages on
/// the device and in flight: Python sorting 3 million floats under
/// `--chaos 1000` (300 MB managed) used 1.6 MB at most, and `as_full.c`
/// 40 KB; the pool is an eighth of what the limit leaves. Twice the free
/// space a cut of the pool leaves (`pool::fit`), so that after a cut to
/// the bone uhmm goes on with what it manages but takes on nothing new.
const OWN_ROOM: usize = 2 << 20;

/// The pool's size: `POOL_MAX` without a limit, else an eighth of what the
/// limit leaves (the reservation takes a quarter), at most `POOL_MAX`.
fn pool_len(limit: Option<usize>, in_use: usize) -> usize {
    match limit {
        None => POOL_MAX,
        Some(limit) => ((limit.saturating_sub(in_use) / 8) & !(PAGE - 1)).min(POOL_MAX),
    }
}

/// How much address space to reserve at start: all of `RESERVATION`
/// without a limit, what `affordable` allows under one, and none where
/// that is less than a block (`threshold`).
fn reservation_len(limit: Option<usize>, threshold: usize) -> usize {
    let Some(limit) = limit else {
        return RESERVATION;
    };
    let len = affordable(limit, address_space_in_use()).min(RESERVATION);
    if len < threshold { 0 } else { len }
}

/// The reservation's space that no block holds (freed blocks kept for
/// reuse count as held). Call inside the library.
fn reservation_free() -> usize {
    lock(&HEAP).free.iter().map(|(s, e)| e - s).sum()
}

/// After `RLIMIT_AS` was set to `limit`: gives back the reservation's free
/// space the limit cannot afford (the reserved space counts against the
/// limit, used or not: a program that lowered its limit below the whole
/// reservation could map nothing more). Freed blocks kept mapped for
/// reuse go first; then the free space at the top of the reservation,
/// where the least is in use (blocks are taken lowest first), comes off
/// its end. Blocks in use stay where they are. Call inside the library.
fn fit_reservation(limit: usize) -> Option<()> {
    let mut heap = lock(&HEAP);
    for c in std::mem::take(&mut heap.cache) {
        unmap_block(&mut heap, c.start, c.len);
    }
    let free: usize = heap.free.iter().map(|(s, e)| e - s).sum();
    let keep = affordable(limit, address_space_in_use().saturating_sub(free));
    let end = RES_END.load(Ordering::Acquire);
    let (&s, &e) = heap.free.iter().next_back()?;
    if free <= keep || e != end {
        return None;
    }
    let new_end = e - (free - keep).min(e - s);
    // Lowered before the space goes, so that nothing mapped there
    // later counts as a block of ours.
    RES_END.store(new_end, Ordering::Release);
    if real_munmap(new_end as *mut c_void, e - new_end) != 0 {
        // Still reserved: as good as free space, if not given back.
        RES_END.store(end, Ordering::Release);
        return None;
    }
    heap.free.remove(&s);
    if s < new_end {
        heap.free.insert(s, new_end);
    }
    Some(())
}

/// Calls [`fit_reservation`] after a successful change of this process's
/// `RLIMIT_AS` to `new`.
fn after_setrlimit(rc: c_int, resource: c_int, new: *const libc::rlimit) {
    if rc != 0 || resource != libc::RLIMIT_AS as c_int || new.is_null() {
        return;
    }
    // SAFETY: the caller's `rlimit`, which the system call just read.
    let cur = unsafe { (*new).rlim_cur };
    if cur != libc::RLIM_INFINITY {
        let limit = usize::try_from(cur).unwrap_or(usize::MAX);
        let _ = inside(|| {
            cut_for(limit);
            Some(())
        });
    }
}

/// The soft `RLIMIT_AS` the pool and the reservation were last fitted to
/// (`usize::MAX`: none).
static LIMIT_SEEN: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Follows a lower `RLIMIT_AS` set from outside (`prlimit` by another
/// process, which nothing here sees): asked on the calls that need
/// address space (`mmap`, the malloc family, `pthread_create`). Returns
/// whether the caller should try again: a cut for a lower limit was made,
/// by this thread or by another one it waited for. Costs a system call.
fn follow_limit() -> bool {
    let now = as_limit().unwrap_or(usize::MAX);
    let seen = LIMIT_SEEN.load(Ordering::Acquire);
    if now >= seen {
        if now > seen {
            // Raised: nothing to give back (what was given stays given).
            let _ = LIMIT_SEEN.compare_exchange(seen, now, Ordering::AcqRel, Ordering::Acquire);
        }
        return false;
    }
    // Inside the library (not on uhmm's threads, nor nested), where the
    // cuts can run; elsewhere a later call follows it.
    inside(|| {
        cut_for(now);
        Some(())
    })
    .is_some()
}

/// Serializes the cuts for a lower limit; `LIMIT_SEEN` is stored only once
/// a cut is done, so that a thread that sees the lower limit meanwhile
/// waits here for the cut in progress (and then tries its call again)
/// instead of going on while the reservation still takes the room.
static CUTTING: Mutex<()> = Mutex::new(());

/// Cuts the pool and the reservation for `RLIMIT_AS` `limit` (each to its
/// share of what the limit leaves, as at start: the pool an eighth,
/// counting free space of both as left, but never below what is in use;
/// then the reservation a quarter), unless a cut for it or a lower one was
/// made while this thread waited. Call inside the library.
fn cut_for(limit: usize) {
    let _one = lock(&CUTTING);
    if LIMIT_SEEN.load(Ordering::Acquire) <= limit {
        return;
    }
    let free = pool::headroom() + reservation_free();
    pool::fit(pool_len(
        Some(limit),
        address_space_in_use().saturating_sub(free),
    ));
    let _ = fit_reservation(limit);
    LIMIT_SEEN.store(limit, Ordering::Release);
}

/// # Safety
///
/// As `setrlimit(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn setrlimit(resource: c_int, rlim: *const libc::rlimit) -> c_int {
    let rc = match REAL_SETRLIMIT.load(Ordering::Acquire) {
        // SAFETY: before the constructor resolved glibc's, the system call
        // glibc's makes, with the caller's arguments.
        0 => unsafe {
            libc::syscall(
                libc::SYS_prlimit64,
                0,
                resource,
                rlim,
                std::ptr::null_mut::<libc::rlimit>(),
            ) as c_int
        },
        // SAFETY: dlsym's answer for "setrlimit", of this type.
        f => unsafe { std::mem::transmute::<usize, SetrlimitFn>(f)(resource, rlim) },
    };
    after_setrlimit(rc, resource, rlim);
    rc
}

/// # Safety
///
/// As `setrlimit(2)` (glibc's alias of `setrlimit` on 64-bit targets).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn setrlimit64(resource: c_int, rlim: *const libc::rlimit) -> c_int {
    // SAFETY: the caller's contract is setrlimit's.
    unsafe { setrlimit(resource, rlim) }
}

/// # Safety
///
/// As `prlimit(2)`. Only a change of this process's own limit (pid 0 or
/// its own) concerns the reservation.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn prlimit(
    pid: libc::pid_t,
    resource: c_int,
    new: *const libc::rlimit,
    old: *mut libc::rlimit,
) -> c_int {
    let rc = match REAL_PRLIMIT.load(Ordering::Acquire) {
        // SAFETY: as in `setrlimit`.
        0 => unsafe { libc::syscall(libc::SYS_prlimit64, pid, resource, new, old) as c_int },
        // SAFETY: dlsym's answer for "prlimit", of this type.
        f => unsafe { std::mem::transmute::<usize, PrlimitFn>(f)(pid, resource, new, old) },
    };
    if pid == 0 || pid == getpid() {
        after_setrlimit(rc, resource, new);
    }
    rc
}

/// # Safety
///
/// As `prlimit(2)` (glibc's alias of `prlimit` on 64-bit targets).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn prlimit64(
    pid: libc::pid_t,
    resource: c_int,
    new: *const libc::rlimit,
    old: *mut libc::rlimit,
) -> c_int {
    // SAFETY: the caller's contract is prlimit's.
    unsafe { prlimit(pid, resource, new, old) }
}

type PthreadCreateFn = unsafe extern "C" fn(
    *mut libc::pthread_t,
    *const libc::pthread_attr_t,
    extern "C" fn(*mut c_void) -> *mut c_void,
    *mut c_void,
) -> c_int;

/// # Safety
///
/// As `pthread_create(3)`. Passed on; made once more if it failed for want
/// of address space (EAGAIN: glibc maps the stack itself, which no
/// interposition sees) while a lower `RLIMIT_AS` set from outside was
/// followed meanwhile.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_create(
    thread: *mut libc::pthread_t,
    attr: *const libc::pthread_attr_t,
    start: extern "C" fn(*mut c_void) -> *mut c_void,
    arg: *mut c_void,
) -> c_int {
    if REAL_PTHREAD_CREATE.load(Ordering::Acquire) == 0 {
        resolve(c"pthread_create", &REAL_PTHREAD_CREATE);
    }
    let f = REAL_PTHREAD_CREATE.load(Ordering::Acquire);
    if f == 0 {
        return libc::EAGAIN;
    }
    // SAFETY: dlsym's answer for "pthread_create", of this type.
    let f = unsafe { std::mem::transmute::<usize, PthreadCreateFn>(f) };
    retried(
        // SAFETY: the caller's arguments, passed on.
        || unsafe { f(thread, attr, start, arg) },
        |rc| *rc == libc::EAGAIN,
    )
}

// ---------------------------------------------------------------------
// The constructor.

extern "C" fn init() {
    let Some(_g) = Inside::enter() else { return };
    TLS_READY.store(true, Ordering::Release);
    let _ = std::panic::catch_unwind(|| {
        // First: what this library allocates from now on comes from the
        // pool, and its fork handler, registered before the others, runs
        // after them (prepare handlers run in reverse order).
        let limit = as_limit();
        LIMIT_SEEN.store(limit.unwrap_or(usize::MAX), Ordering::Release);
        if pool::init(pool_len(limit, address_space_in_use())) {
            // SAFETY: plain functions that never unwind; the child one is
            // async-signal-safe (a mutex unlock and a thread-local store).
            unsafe {
                libc::pthread_atfork(
                    Some(pool::fork_prepare),
                    Some(pool::fork_release),
                    Some(pool::fork_release),
                )
            };
        }
        resolve(c"mmap", &REAL_MMAP);
        resolve(c"munmap", &REAL_MUNMAP);
        resolve(c"mremap", &REAL_MREMAP);
        resolve(c"madvise", &REAL_MADVISE);
        resolve(c"malloc_usable_size", &REAL_USABLE);
        resolve(c"setrlimit", &REAL_SETRLIMIT);
        resolve(c"prlimit", &REAL_PRLIMIT);
        resolve(c"ioctl", &REAL_IOCTL);
        resolve(c"pthread_create", &REAL_PTHREAD_CREATE);
        if foreign_malloc() {
            say(
                "another malloc than glibc's serves this program (LD_PRELOAD): malloc \
                 blocks are left to it; only large anonymous mappings are managed",
            );
        }
        let threshold = match std::env::var("UHMM_RUN_THRESHOLD") {
            Ok(v) => match v.parse::<usize>() {
                Ok(n) => n.max(PAGE),
                Err(_) => {
                    say(&format!(
                        "UHMM_RUN_THRESHOLD={v:?} is not a byte count: using 1 MiB"
                    ));
                    1 << 20
                }
            },
            Err(_) => 1 << 20,
        };
        if let Some(mib) = std::env::var("UHMM_RUN_DEVICE_MIB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
        {
            DEVICE_MIB.store(mib, Ordering::Relaxed);
        }
        let _ = STATS.set(std::env::var_os("UHMM_RUN_STATS").filter(|p| !p.is_empty()));
        QUIET.store(
            std::env::var_os("UHMM_RUN_QUIET").is_some_and(|q| q == "1"),
            Ordering::Relaxed,
        );
        if let Ok(v) = std::env::var("UHMM_RUN_CHAOS") {
            match v.parse::<f64>() {
                Ok(r) if r.is_finite() && r >= 0.0 => {
                    CHAOS_RATE.store(r.to_bits(), Ordering::Relaxed)
                }
                _ => say(&format!("UHMM_RUN_CHAOS={v:?} is not a rate: no chaos")),
            }
        }
        // SAFETY: the atfork hooks are plain functions that never unwind.
        unsafe { libc::pthread_atfork(Some(fork_prepare), Some(fork_release), Some(fork_release)) };
        let len = reservation_len(limit, threshold);
        let res = if len > 0 {
            real_mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        } else {
            libc::MAP_FAILED
        };
        // Without one, every block is glibc's (`big_alloc` finds no room).
        if res != libc::MAP_FAILED {
            let s = res as usize;
            lock(&HEAP).free.insert(s, s + len);
            RES_START.store(s, Ordering::Release);
            RES_END.store(s + len, Ordering::Release);
        }
        THRESHOLD.store(threshold, Ordering::Release);
    });
}

#[used]
// SAFETY: `.init_array` holds constructors, called once at load with no
// arguments; `init` is such a function and never unwinds.
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = init;

// ---------------------------------------------------------------------
// The interposed calls.

fn threshold() -> usize {
    THRESHOLD.load(Ordering::Relaxed)
}

/// Whether a mapping of this kind and size is to be managed.
fn eligible(len: usize, prot: c_int, flags: c_int, fd: c_int) -> bool {
    len >= threshold()
        && flags & libc::MAP_ANONYMOUS != 0
        && flags & libc::MAP_TYPE == libc::MAP_PRIVATE
        && flags & (libc::MAP_STACK | libc::MAP_GROWSDOWN | libc::MAP_HUGETLB) == 0
        && prot == RW
        && (fd == -1 || fd == 0)
}

/// The live pieces, if this process has a `Proc` already (none is made).
fn current_proc() -> Option<&'static Proc> {
    let p = PROC.load(Ordering::Acquire);
    // SAFETY: a published `Proc` is leaked, never freed.
    (!p.is_null())
        .then(|| unsafe { &*p })
        .filter(|p| p.pid == getpid())
}

/// # Safety
///
/// As `mmap(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off_t,
) -> *mut c_void {
    if threshold() == usize::MAX {
        return real_mmap(addr, len, prot, flags, fd, off);
    }
    if !in_alloc() {
        follow_limit();
    }
    // A limit lowered from outside between that look and the call: the
    // room it lacked may be free once followed.
    retried(
        || map_here(addr, len, prot, flags, fd, off),
        |&r| r == libc::MAP_FAILED && errno() == libc::ENOMEM,
    )
}

/// `mmap`, the program's, once the constructor has run: managed if
/// eligible.
fn map_here(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off_t,
) -> *mut c_void {
    let fixed = flags & (libc::MAP_FIXED | libc::MAP_FIXED_NOREPLACE) != 0;
    if !eligible(len, prot, flags, fd) {
        if fixed && flags & libc::MAP_FIXED_NOREPLACE == 0 {
            // Whatever it replaces leaves the managed pieces.
            let done = inside(|| {
                let p = current_proc()?;
                let mut live = lock(&p.live);
                let r = real_mmap(addr, len, prot, flags, fd, off);
                if r != libc::MAP_FAILED {
                    live.remove(r as usize, r as usize + len);
                }
                Some(r)
            });
            if let Some(r) = done {
                return r;
            }
        }
        return real_mmap(addr, len, prot, flags, fd, off);
    }
    let mut result = None;
    let managed = inside(|| {
        let p = proc()?;
        let mut live = lock(&p.live);
        let r = real_mmap(addr, len, prot, flags, fd, off);
        result = Some(r);
        if r == libc::MAP_FAILED {
            return None;
        }
        let s = r as usize;
        live.remove(s, s + len);
        if p.manage(&mut live, s, s + round_up(len)?) {
            p.c.mappings_managed.fetch_add(1, Ordering::Relaxed);
        }
        Some(r)
    });
    match (managed, result) {
        (Some(r), _) | (None, Some(r)) => r,
        (None, None) => real_mmap(addr, len, prot, flags, fd, off),
    }
}

/// # Safety
///
/// As `mmap(2)` (glibc's alias of `mmap` on 64-bit targets).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off_t,
) -> *mut c_void {
    // SAFETY: the caller's contract is mmap's.
    unsafe { mmap(addr, len, prot, flags, fd, off) }
}

/// # Safety
///
/// As `munmap(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: size_t) -> c_int {
    let done = inside(|| {
        let p = current_proc()?;
        let mut live = lock(&p.live);
        let end = (addr as usize).checked_add(round_up(len)?)?;
        if !live.overlaps(addr as usize, end) {
            return None;
        }
        let r = real_munmap(addr, len);
        if r == 0 {
            live.remove(addr as usize, end);
        }
        Some(r)
    });
    done.unwrap_or_else(|| real_munmap(addr, len))
}

/// # Safety
///
/// As `mremap(2)`; `new` is read only with `MREMAP_FIXED`, as glibc's
/// variadic `mremap` reads it (on x86-64 and aarch64 a fifth argument is
/// passed the same way with or without the `...`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_len: size_t,
    new_len: size_t,
    flags: c_int,
    new: *mut c_void,
) -> *mut c_void {
    let done = inside(|| {
        let p = current_proc()?;
        let mut live = lock(&p.live);
        let (os, oe) = (
            old as usize,
            (old as usize).checked_add(round_up(old_len)?)?,
        );
        if !live.overlaps(os, oe) {
            return None;
        }
        let r = real_mremap(old, old_len, new_len, flags, new);
        if r == libc::MAP_FAILED {
            return Some(r);
        }
        let ns = r as usize;
        let ne = ns + round_up(new_len)?;
        // Whether the old range was managed all through: in one piece, or
        // in several (a mapping grown before is its first piece and a
        // piece per tail; only one piece counted, so from the second
        // growth on no tail was managed).
        let whole = live.covers(os, oe);
        let moved = if flags & libc::MREMAP_DONTUNMAP != 0 {
            // The old range stays, empty; its pieces stay managed.
            live.pieces
                .range(..oe)
                .filter(|&(_, &e)| e > os)
                .map(|(&s, &e)| (s.max(os), e.min(oe)))
                .collect()
        } else {
            live.remove(os, oe)
        };
        // The pages' pieces move with them (uhmm follows REMAP).
        live.remove(ns, ne);
        for (s, e) in moved {
            let (s, e) = (s - os + ns, (e - os + ns).min(ne));
            if s < e {
                live.insert(s, e);
            }
        }
        // A grown tail of a wholly managed mapping is managed too (the
        // kernel registered it with the mapping; uhmm records it now).
        let grown = ns + round_up(old_len)?;
        if whole && ne > grown && p.manage(&mut live, grown, ne) {
            p.c.tails_managed.fetch_add(1, Ordering::Relaxed);
        }
        Some(r)
    });
    done.unwrap_or_else(|| real_mremap(old, old_len, new_len, flags, new))
}

/// # Safety
///
/// As `madvise(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn madvise(addr: *mut c_void, len: size_t, advice: c_int) -> c_int {
    let discard = matches!(
        advice,
        libc::MADV_DONTNEED | libc::MADV_FREE | libc::MADV_REMOVE
    );
    let r = real_madvise(addr, len, advice);
    if r == 0 && discard && len >= PAGE {
        // uhmm follows the discard itself (REMOVE event); counted here.
        let _ = inside(|| {
            let p = current_proc()?;
            let end = (addr as usize).checked_add(len)?;
            lock(&p.live)
                .overlaps(addr as usize, end)
                .then(|| p.c.discards.fetch_add(1, Ordering::Relaxed))
        });
    }
    r
}

/// # Safety
///
/// As `malloc(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn malloc(n: size_t) -> *mut c_void {
    if foreign_malloc() {
        // SAFETY: the other allocator's malloc.
        return next_call!(NEXT_MALLOC, MallocFn, std::ptr::null_mut(), |f| unsafe {
            f(n)
        });
    }
    if n >= threshold() {
        follow_limit();
        if let Some(p) = big_alloc(n, false) {
            return p;
        }
    }
    let p = retried(
        || {
            let _a = InAlloc::enter();
            // SAFETY: glibc's malloc.
            unsafe { __libc_malloc(n) }
        },
        |p| p.is_null(),
    );
    if p.is_null() && own_call() {
        return pool::c_alloc(n);
    }
    p
}

/// Whether the calling thread runs this library's code or uhmm's: its
/// allocations that glibc has no room for are served by the pool
/// (`pool`), so that a program that filled its address space does not see
/// the library abort (Rust's reaction to an allocation that fails). Asked
/// only then: it costs a system call.
fn own_call() -> bool {
    INSIDE.try_with(Cell::get).unwrap_or(true) || in_uhmm_hook() || uhmm_thread()
}

/// Returns `call()` (a call into the allocator below, or another that
/// needs address space), made once more if it `failed` and a lower
/// `RLIMIT_AS` set from outside was followed since it began — just now
/// (`follow_limit`), or by another thread whose cut ended between the call
/// and this look (the call failed for want of the room that cut gave
/// back; CI saw 1 call in a run of `limit_outside.c race` fail so): the
/// room it lacked may be free now.
fn retried<T>(call: impl Fn() -> T, failed: impl Fn(&T) -> bool) -> T {
    let before = LIMIT_SEEN.load(Ordering::Acquire);
    let r = call();
    if failed(&r) && !in_alloc() && (follow_limit() || LIMIT_SEEN.load(Ordering::Acquire) != before)
    {
        return call();
    }
    r
}

/// # Safety
///
/// As `calloc(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn calloc(n: size_t, size: size_t) -> *mut c_void {
    if foreign_malloc() {
        // SAFETY: the other allocator's calloc.
        return next_call!(NEXT_CALLOC, CallocFn, std::ptr::null_mut(), |f| unsafe {
            f(n, size)
        });
    }
    if let Some(total) = n.checked_mul(size)
        && total >= threshold()
    {
        follow_limit();
        if let Some(p) = big_alloc(total, true) {
            return p; // fresh anonymous memory: zeroed
        }
    }
    let p = retried(
        || {
            let _a = InAlloc::enter();
            // SAFETY: glibc's calloc (which checks the product itself).
            unsafe { __libc_calloc(n, size) }
        },
        |p| p.is_null(),
    );
    if p.is_null()
        && let Some(total) = n.checked_mul(size)
        && own_call()
    {
        let q = pool::c_alloc(total);
        if !q.is_null() {
            // SAFETY: a block of `total` bytes (the pool reuses memory).
            unsafe { std::ptr::write_bytes(q.cast::<u8>(), 0, total) };
        }
        return q;
    }
    p
}

/// # Safety
///
/// As `free(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn free(p: *mut c_void) {
    if p.is_null() {
        return;
    }
    if pool::in_pool(p.cast()) {
        return pool::c_free(p);
    }
    if !ours(p) && foreign_malloc() {
        // SAFETY: the other allocator's free, of its block.
        return next_call!(NEXT_FREE, FreeFn, (), |f| unsafe { f(p) });
    }
    if ours(p) {
        // (glibc >= 2.33 keeps errno across free; unmapping may set it.)
        let saved = errno();
        big_free(p);
        set_errno(saved);
    } else {
        let _a = InAlloc::enter();
        // SAFETY: not ours, so glibc's.
        unsafe { __libc_free(p) }
    }
}

fn errno() -> c_int {
    // SAFETY: errno is this thread's.
    unsafe { *libc::__errno_location() }
}

fn set_errno(e: c_int) {
    // SAFETY: errno is this thread's.
    unsafe { *libc::__errno_location() = e };
}

/// # Safety
///
/// As `realloc(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn realloc(p: *mut c_void, n: size_t) -> *mut c_void {
    if !ours(p) && foreign_malloc() {
        // SAFETY: the other allocator's realloc, of its block.
        return next_call!(NEXT_REALLOC, ReallocFn, std::ptr::null_mut(), |f| unsafe {
            f(p, n)
        });
    }
    if p.is_null() {
        // SAFETY: as malloc.
        return unsafe { malloc(n) };
    }
    if pool::in_pool(p.cast()) {
        let old = pool::c_size(p);
        let q = if n == 0 {
            std::ptr::null_mut()
        } else {
            // SAFETY: as malloc (glibc's block, else the pool's).
            unsafe { malloc(n) }
        };
        if !q.is_null() {
            // SAFETY: `p` holds `old` bytes, `q` at least `n`; two blocks.
            unsafe { std::ptr::copy_nonoverlapping(p as *const u8, q as *mut u8, old.min(n)) };
        }
        if n == 0 || !q.is_null() {
            pool::c_free(p);
        }
        return q;
    }
    if ours(p) {
        if n == 0 {
            big_free(p);
            return std::ptr::null_mut();
        }
        let Some(old) = block_len(p) else {
            set_errno(libc::ENOMEM);
            return std::ptr::null_mut(); // not a block: the program's bug
        };
        let Some(len) = round_up(n) else {
            set_errno(libc::ENOMEM);
            return std::ptr::null_mut();
        };
        if len < old {
            shrink_in_place(p, len);
            return p;
        }
        if len == old || grow_in_place(p, len) {
            return p;
        }
        // SAFETY: as malloc.
        let q = unsafe { malloc(n) };
        if !q.is_null() {
            // SAFETY: `p` holds `old` bytes, `q` at least `n` > `old`; two
            // different allocations.
            unsafe { std::ptr::copy_nonoverlapping(p as *const u8, q as *mut u8, old.min(n)) };
            big_free(p);
        } else {
            set_errno(libc::ENOMEM);
        }
        return q;
    }
    if n >= threshold() {
        follow_limit();
        if let usable @ 1.. = REAL_USABLE.load(Ordering::Acquire)
            && let Some(q) = big_alloc(n, false)
        {
            let _a = InAlloc::enter();
            // SAFETY: dlsym's answer for "malloc_usable_size", of this type,
            // asked about a live glibc block.
            let old = unsafe { std::mem::transmute::<usize, UsableFn>(usable)(p) };
            // SAFETY: `p` holds `old` readable bytes, `q` at least `n`.
            unsafe { std::ptr::copy_nonoverlapping(p as *const u8, q as *mut u8, old.min(n)) };
            // SAFETY: glibc's block, no longer used.
            unsafe { __libc_free(p) };
            return q;
        }
    }
    let q = retried(
        || {
            let _a = InAlloc::enter();
            // SAFETY: glibc's block (kept by a failed realloc).
            unsafe { __libc_realloc(p, n) }
        },
        |q| q.is_null() && n > 0,
    );
    if q.is_null()
        && n > 0
        && let usable @ 1.. = REAL_USABLE.load(Ordering::Acquire)
        && own_call()
    {
        let q = pool::c_alloc(n);
        if !q.is_null() {
            let _a = InAlloc::enter();
            // SAFETY: dlsym's answer for "malloc_usable_size", of this
            // type, asked about a live glibc block (a failed realloc keeps
            // it).
            let old = unsafe { std::mem::transmute::<usize, UsableFn>(usable)(p) };
            // SAFETY: `p` holds `old` readable bytes, `q` at least `n`.
            unsafe { std::ptr::copy_nonoverlapping(p as *const u8, q as *mut u8, old.min(n)) };
            // SAFETY: glibc's block, no longer used.
            unsafe { __libc_free(p) };
        }
        return q;
    }
    q
}

/// # Safety
///
/// As `reallocarray(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn reallocarray(p: *mut c_void, n: size_t, size: size_t) -> *mut c_void {
    match n.checked_mul(size) {
        // SAFETY: as realloc.
        Some(total) => unsafe { realloc(p, total) },
        None => {
            // SAFETY: errno is this thread's.
            unsafe { *libc::__errno_location() = libc::ENOMEM };
            std::ptr::null_mut()
        }
    }
}

/// # Safety
///
/// As `malloc_usable_size(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> size_t {
    if p.is_null() {
        return 0;
    }
    if ours(p) {
        return block_len(p).unwrap_or(0);
    }
    if pool::in_pool(p.cast()) {
        return pool::c_size(p);
    }
    match REAL_USABLE.load(Ordering::Acquire) {
        0 => 0,
        // SAFETY: dlsym's answer for "malloc_usable_size", of this type.
        f => unsafe { std::mem::transmute::<usize, UsableFn>(f)(p) },
    }
}

/// Passes `(align, n)` on to the allocator function resolved in `slot`
/// (`memalign`, `aligned_alloc`), made once more if it failed while a
/// lower limit was followed.
///
/// # Safety
///
/// `slot` holds a function of `MemalignFn`'s type (or nothing), and the
/// caller's contract is that function's.
unsafe fn aligned_next(slot: &AtomicUsize, align: size_t, n: size_t) -> *mut c_void {
    foreign_malloc();
    retried(
        || {
            next_call!(
                slot,
                MemalignFn,
                std::ptr::null_mut(),
                // SAFETY: the caller's contract is the function's.
                |f| unsafe { f(align, n) }
            )
        },
        |p| p.is_null(),
    )
}

/// Passes `n` on to the allocator function resolved in `slot` (`valloc`,
/// `pvalloc`), made once more if it failed while a lower limit was
/// followed.
///
/// # Safety
///
/// `slot` holds a function of `MallocFn`'s type (or nothing), and the
/// caller's contract is that function's.
unsafe fn sized_next(slot: &AtomicUsize, n: size_t) -> *mut c_void {
    foreign_malloc();
    retried(
        || {
            // SAFETY: the caller's contract is the function's.
            next_call!(slot, MallocFn, std::ptr::null_mut(), |f| unsafe { f(n) })
        },
        |p| p.is_null(),
    )
}

/// # Safety
///
/// As `posix_memalign(3)`. Passed on (glibc's or another allocator's: the
/// block is then that allocator's, as `free` expects).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: size_t, n: size_t) -> c_int {
    foreign_malloc();
    retried(
        || {
            next_call!(
                NEXT_POSIX_MEMALIGN,
                PosixMemalignFn,
                libc::ENOMEM,
                // SAFETY: the caller's contract is posix_memalign's.
                |f| unsafe { f(out, align, n) }
            )
        },
        |rc| *rc == libc::ENOMEM,
    )
}

/// # Safety
///
/// As `memalign(3)` (passed on, as `posix_memalign`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memalign(align: size_t, n: size_t) -> *mut c_void {
    // SAFETY: `NEXT_MEMALIGN` holds the next `memalign` (of `MemalignFn`'s type);
    // the caller's contract is memalign's.
    unsafe { aligned_next(&NEXT_MEMALIGN, align, n) }
}

/// # Safety
///
/// As `aligned_alloc(3)` (passed on, as `posix_memalign`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aligned_alloc(align: size_t, n: size_t) -> *mut c_void {
    // SAFETY: `NEXT_ALIGNED_ALLOC` holds the next `aligned_alloc` (of `MemalignFn`'s type);
    // the caller's contract is aligned_alloc's.
    unsafe { aligned_next(&NEXT_ALIGNED_ALLOC, align, n) }
}

/// # Safety
///
/// As `valloc(3)` (passed on, as `posix_memalign`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn valloc(n: size_t) -> *mut c_void {
    // SAFETY: `NEXT_VALLOC` holds the next `valloc` (of `MallocFn`'s type);
    // the caller's contract is valloc's.
    unsafe { sized_next(&NEXT_VALLOC, n) }
}

/// # Safety
///
/// As `pvalloc(3)` (passed on, as `posix_memalign`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pvalloc(n: size_t) -> *mut c_void {
    // SAFETY: `NEXT_PVALLOC` holds the next `pvalloc` (of `MallocFn`'s type);
    // the caller's contract is pvalloc's.
    unsafe { sized_next(&NEXT_PVALLOC, n) }
}
