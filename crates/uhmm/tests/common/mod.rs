//! Helpers shared by the integration tests: the skip policy, a userfaultfd
//! event monitor, fork, and hugetlb reservation.
#![allow(dead_code, unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use uhmm::sys::uffd::{Event, Features, Uffd};

/// Reports a test as skipped, with the reason. Where every capability is
/// required (CI, or `UHMM_REQUIRE_ALL=1`), a skip is a failure instead.
pub fn skip(reason: &str) {
    let required = std::env::var("UHMM_REQUIRE_ALL").is_ok_and(|v| v == "1")
        || std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if required {
        panic!("required capability missing (CI must not skip): {reason}");
    }
    // Straight to the stderr handle: libtest captures `eprintln!` of a
    // passing test, and a skip must be seen.
    let name = std::thread::current().name().unwrap_or("?").to_owned();
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("SKIPPED {name}: {reason}\n").as_bytes(),
    );
}

/// Returns from the test (as skipped) unless `$cond` holds.
#[macro_export]
macro_rules! require {
    ($cond:expr, $reason:expr) => {
        if !$cond {
            $crate::common::skip($reason);
            return;
        }
    };
}

/// A userfaultfd with `features` that serves kernel-mode faults, or `None`
/// (after reporting the skip).
pub fn uffd(features: Features) -> Option<Uffd> {
    match Uffd::builder()
        .features(features)
        .access(uhmm::sys::uffd::AccessPolicy::FullOnly)
        .open()
    {
        Ok(u) => Some(u),
        Err(e) => {
            skip(&format!("userfaultfd unavailable: {e}"));
            None
        }
    }
}

/// A new `Mm`, or `None` (after reporting the skip).
pub fn mm() -> Option<uhmm::mm::Mm> {
    uhmm::mm::Mm::new()
        .map_err(|e| skip(&format!("no Mm: {e}")))
        .ok()
}

/// A managed private hugetlb region of one 2 MiB page, or `None` (after
/// reporting the skip) when no huge page can be reserved.
pub fn hugetlb_region(mm: &uhmm::mm::Mm) -> Option<uhmm::mm::ManagedRegion> {
    if !reserve_hugepages(1) {
        skip("no free 2 MiB huge page (reserve one as root)");
        return None;
    }
    let backing = uhmm::sys::mem::Backing::Hugetlb {
        page_size: 2 << 20,
        shared: false,
    };
    Some(
        mm.alloc(2 << 20, backing)
            .expect("a reserved huge page maps"),
    )
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Tests that fork, or that enable EVENT_FORK, take this lock: a fork makes
/// every EVENT_FORK context of the process queue an event and waits until it
/// is read, so the two must not overlap across tests.
pub fn fork_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a child ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ChildEnd {
    Exited(i32),
    Signaled(i32),
    /// Still running at the deadline of [`fork_within`] (killed then).
    Hung,
}

/// Forks; the child runs `f` (which must only touch memory and make raw
/// syscalls: the parent is multi-threaded) and exits with its result. Waits
/// for the child.
pub fn fork_and_wait(f: impl FnOnce() -> i32) -> ChildEnd {
    // SAFETY: the child only runs `f`, which by contract takes no lock and
    // does not allocate, then `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = f();
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    wait_child(pid)
}

/// Forks; the child runs `f` and `_exit`s with its result (101 if it
/// panicked: a panic never unwinds into the test harness). Waits up to
/// `limit` for the child; one still running then is killed and reported as
/// [`ChildEnd::Hung`]. For children that use uhmm (they allocate and take
/// locks): the caller holds `serial()` and `fork_lock()`, so no other test
/// thread of the binary holds a lock at the fork.
pub fn fork_within(limit: Duration, f: impl FnOnce() -> i32) -> ChildEnd {
    // SAFETY: the child runs `f` under the contract above, then `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let deadline = std::time::Instant::now() + limit;
    loop {
        let mut status = 0;
        // SAFETY: polls our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        assert!(r == 0 || r == pid, "waitpid");
        if r == pid {
            return if libc::WIFSIGNALED(status) {
                ChildEnd::Signaled(libc::WTERMSIG(status))
            } else {
                ChildEnd::Exited(libc::WEXITSTATUS(status))
            };
        }
        if std::time::Instant::now() > deadline {
            // SAFETY: kills and reaps our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return ChildEnd::Hung;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// In a forked child: an owned copy of a value of the parent's, to drop
/// there (the parent's own is untouched).
///
/// # Safety
///
/// Only in a forked child, and `v` is never used again there (the child
/// `_exit`s without dropping it), so the copy is dropped once.
pub unsafe fn take_in_child<T>(v: &T) -> T {
    // SAFETY: the caller's contract: `v` is not used or dropped again.
    unsafe { std::ptr::read(v) }
}

/// Runs `f` on a thread; `true` if it ended (without a panic) within
/// `limit`. A thread still blocked then is left behind.
pub fn ends_within(limit: Duration, f: impl FnOnce() + Send + 'static) -> bool {
    let t = std::thread::spawn(f);
    let deadline = std::time::Instant::now() + limit;
    while !t.is_finished() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    t.join().is_ok()
}

pub fn wait_child(pid: i32) -> ChildEnd {
    let mut status = 0;
    // SAFETY: waits for our own child.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid, "waitpid");
    if libc::WIFSIGNALED(status) {
        ChildEnd::Signaled(libc::WTERMSIG(status))
    } else {
        ChildEnd::Exited(libc::WEXITSTATUS(status))
    }
}

/// Reads events of a userfaultfd on a thread of its own and forwards them.
///
/// The thread never allocates once started: a thread that forks holds the
/// allocator's locks (glibc's fork handlers) while the kernel waits for the
/// FORK event to be read, so a reader that allocated could deadlock.
pub struct Monitor {
    pub events: Receiver<Event>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Monitor {
    pub fn start(uffd: Arc<Uffd>) -> Monitor {
        let (tx, events) = sync_channel(256);
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let ready = Arc::new(std::sync::Barrier::new(2));
        let r = ready.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = Vec::with_capacity(uhmm::sys::uffd::event::BATCH);
            // Thread start-up allocates; be past it before anyone forks.
            r.wait();
            while !s.load(Ordering::Relaxed) {
                if !uffd.wait(Some(Duration::from_millis(20))).unwrap() {
                    continue;
                }
                uffd.read_events(&mut buf).unwrap();
                for e in buf.drain(..) {
                    if tx.send(e).is_err() {
                        return;
                    }
                }
            }
        });
        ready.wait();
        Monitor {
            events,
            stop,
            thread: Some(thread),
        }
    }

    /// The next event, within 5 s.
    pub fn next(&self) -> Event {
        self.events
            .recv_timeout(Duration::from_secs(5))
            .expect("no userfaultfd event within 5 s")
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits up to 5 s for one event and returns it (for tests that read on the
/// test thread).
pub fn next_event(uffd: &Uffd) -> Event {
    let mut buf = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while buf.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no userfaultfd event within 5 s"
        );
        if uffd.wait(Some(Duration::from_millis(50))).unwrap() {
            uffd.read_events(&mut buf).unwrap();
        }
    }
    assert_eq!(buf.len(), 1, "expected one event, got {buf:?}");
    buf.pop().unwrap()
}

/// Makes sure at least `n` free 2 MiB huge pages exist, reserving more if
/// needed (root). Returns whether they exist.
pub fn reserve_hugepages(n: u64) -> bool {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = "/sys/kernel/mm/hugepages/hugepages-2048kB";
    let read = |f: &str| -> Option<u64> {
        std::fs::read_to_string(format!("{dir}/{f}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let (Some(total), Some(free)) = (read("nr_hugepages"), read("free_hugepages")) else {
        return false;
    };
    if free >= n {
        return true;
    }
    let _ = std::fs::write(
        format!("{dir}/nr_hugepages"),
        (total + n - free).to_string(),
    );
    read("free_hugepages").is_some_and(|f| f >= n)
}

/// A byte pattern unique to page `i` of a test.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Reads one byte through a raw pointer, as a program would (this faults on
/// a registered hole and blocks until the fault is served).
pub fn touch_read(addr: usize) -> u8 {
    // SAFETY: tests only pass addresses of live mappings they own.
    unsafe { std::ptr::read_volatile(addr as *const u8) }
}

/// Writes one byte through a raw pointer.
pub fn touch_write(addr: usize, v: u8) {
    // SAFETY: as for `touch_read`.
    unsafe { std::ptr::write_volatile(addr as *mut u8, v) }
}

/// Unmaps part of a test's mapping, leaving a gap (the mapping's own drop
/// later finds nothing there).
pub fn unmap_part(range: uhmm::PageRange) {
    // SAFETY: tests pass pages of their own mappings, which nothing refers
    // into.
    unsafe { rustix::mm::munmap(range.start().as_mut_ptr(), range.len()) }.unwrap();
}

/// Serializes the tests of one binary that map and unmap: a gap a test
/// leaves on purpose is otherwise filled by another test's mmap at once.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Joins a thread that should end soon; fails (instead of hanging) if it is
/// still blocked after 5 s.
pub fn join_soon<T>(t: JoinHandle<T>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !t.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "a thread is still blocked after 5 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    t.join().unwrap()
}

/// Moves `from` over `to` with mremap (both the same length).
pub fn remap(from: uhmm::PageRange, to: uhmm::PageRange) {
    // SAFETY: tests pass ranges of their own mappings that nothing refers
    // into; `to`'s old pages are replaced.
    let moved = unsafe {
        rustix::mm::mremap_fixed(
            from.start().as_mut_ptr(),
            from.len(),
            to.len(),
            rustix::mm::MremapFlags::MAYMOVE,
            to.start().as_mut_ptr(),
        )
    }
    .unwrap();
    assert_eq!(moved as usize, to.start().get());
}

/// A forked child blocked on a pipe until [`BlockedChild::release`].
pub struct BlockedChild {
    pid: i32,
    write_end: i32,
}

/// Forks a child that waits (reading a pipe) and then exits 0.
pub fn fork_blocked() -> BlockedChild {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the child only makes raw syscalls (read, _exit).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let mut b = 0u8;
        // SAFETY: reads one byte into `b`; returns at EOF when the parent
        // closes the write end.
        unsafe {
            libc::close(fds[1]);
            libc::read(fds[0], (&mut b as *mut u8).cast(), 1);
            libc::_exit(0);
        }
    }
    // SAFETY: the parent does not read.
    unsafe { libc::close(fds[0]) };
    BlockedChild {
        pid,
        write_end: fds[1],
    }
}

impl BlockedChild {
    /// Lets the child exit and waits for it.
    pub fn release(self) -> ChildEnd {
        // SAFETY: closes our write end; the child's read returns.
        unsafe { libc::close(self.write_end) };
        wait_child(self.pid)
    }
}

/// A notifier that records every invalidation it gets (event and range).
#[derive(Debug, Default)]
pub struct Recorder {
    pub log: Mutex<Vec<(uhmm::mm::notifier::NotifyEvent, uhmm::PageRange)>>,
}

impl uhmm::mm::notifier::NotifierOps for Recorder {
    fn invalidate(
        &self,
        sub: &uhmm::mm::notifier::Subscription,
        r: &uhmm::mm::notifier::NotifierRange,
        cur_seq: u64,
    ) -> bool {
        sub.set_seq(cur_seq);
        self.log.lock().unwrap().push((r.event, r.range));
        true
    }
}

/// Brings the device pages of `m` home from host-RAM device memory at
/// `arena` (page `pfn` at `arena + pfn * PAGE_SIZE`) with no copy, and
/// commits: the `migrate_to_ram` of a test device whose memory is
/// registered with the `Mm`.
pub fn move_back(arena: uhmm::VirtAddr, mut m: uhmm::devmem::MigrateVma<'_>) {
    let from: Vec<(usize, uhmm::VirtAddr)> = m
        .selected()
        .filter_map(|(i, _, s)| match s {
            uhmm::devmem::MigrateSrc::Device(pfn) => Some((
                i,
                uhmm::VirtAddr::new(arena.get() + pfn.0 as usize * uhmm::PAGE_SIZE),
            )),
            _ => None,
        })
        .collect();
    m.move_from_device(&from);
    m.pages();
    m.finalize();
}

/// A notifier that holds the first invalidation of kind `event` in its
/// range until the test says go (or 10 s pass), having told the test it
/// is there: the thread sending it (the fault service, an unmanaging
/// thread) stops at that point.
#[derive(Debug)]
pub struct HoldFirst {
    event: uhmm::mm::notifier::NotifyEvent,
    armed: AtomicBool,
    entered: Mutex<std::sync::mpsc::Sender<()>>,
    go: Mutex<Receiver<()>>,
}

impl HoldFirst {
    /// The notifier, the receiver told when it holds, and the sender that
    /// lets it go.
    pub fn new(
        event: uhmm::mm::notifier::NotifyEvent,
    ) -> (Arc<HoldFirst>, Receiver<()>, std::sync::mpsc::Sender<()>) {
        let (entered, is_entered) = std::sync::mpsc::channel();
        let (go, wait_go) = std::sync::mpsc::channel();
        let hold = Arc::new(HoldFirst {
            event,
            armed: AtomicBool::new(true),
            entered: Mutex::new(entered),
            go: Mutex::new(wait_go),
        });
        (hold, is_entered, go)
    }
}

impl uhmm::mm::notifier::NotifierOps for HoldFirst {
    fn invalidate(
        &self,
        sub: &uhmm::mm::notifier::Subscription,
        r: &uhmm::mm::notifier::NotifierRange,
        cur_seq: u64,
    ) -> bool {
        if r.event == self.event && self.armed.swap(false, Ordering::SeqCst) {
            let _ = self.entered.lock().unwrap().send(());
            let _ = self
                .go
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(10));
        }
        sub.set_seq(cur_seq);
        true
    }
}
