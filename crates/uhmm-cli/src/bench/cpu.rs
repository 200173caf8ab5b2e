//! The CPU side of the benchmarks and the demo: touching, reading and
//! updating memory through plain pointers, as a program would, and forking.
//! The one named place with `unsafe` in the CLI: the pointers are to
//! mappings the benchmark or demo made and owns, which nothing else refers
//! into.
#![allow(unsafe_code)]

use uhmm::PAGE_SIZE;
use uhmm::PageRange;

/// Writes one byte in every page of `range` (a first touch faults each in).
pub fn touch_pages(range: PageRange) {
    let base = range.start().as_mut_ptr::<u8>();
    for i in 0..range.npages() {
        // SAFETY: `range` is a writable mapping owned by the benchmark; no
        // reference points into it.
        unsafe { base.add(i * PAGE_SIZE).write_volatile(1) };
    }
}

/// Writes `v` into the first byte of every page of `range`.
pub fn mark_pages(range: PageRange, v: u8) {
    let base = range.start().as_mut_ptr::<u8>();
    for i in 0..range.npages() {
        // SAFETY: as in `touch_pages`.
        unsafe { base.add(i * PAGE_SIZE).write_volatile(v) };
    }
}

/// `UFFDIO_MOVE` of one page from `src` to the hole `dst`, not waking the
/// faulting thread (the bare moving server's answer, as uhmm's).
pub fn move_page(
    uffd: &uhmm::sys::uffd::Uffd,
    dst: PageRange,
    src: uhmm::VirtAddr,
) -> Result<uhmm::sys::uffd::Progress, uhmm::sys::uffd::OpError> {
    // SAFETY: `src` is a page of the bare server's own source mapping,
    // which nothing refers into.
    unsafe { uffd.move_pages(dst, src, uhmm::sys::uffd::MoveMode::DONTWAKE) }
}

/// Reads every 8-byte word of `range` and returns their wrapping sum.
pub fn sum(range: PageRange) -> u64 {
    let base = range.start().as_ptr::<u64>();
    let mut acc = 0u64;
    for i in 0..range.len() / 8 {
        // SAFETY: `range` is a readable mapping owned by the benchmark,
        // 8-byte aligned (page aligned), and nothing writes it meanwhile.
        acc = acc.wrapping_add(unsafe { base.add(i).read() });
    }
    acc
}

/// Reads the byte at `addr` (a first touch of a page).
pub fn read_byte(addr: uhmm::VirtAddr) -> u8 {
    // SAFETY: `addr` lies in a readable mapping owned by the benchmark.
    unsafe { addr.as_ptr::<u8>().read_volatile() }
}

/// Pins the calling thread to `cpu` (threads it creates afterwards inherit
/// that); returns whether the kernel agreed.
pub fn pin_to(cpu: usize) -> bool {
    // SAFETY: `set` is a local cpu_set_t initialised by CPU_ZERO; CPU_SET
    // writes inside it; sched_setaffinity(0) changes the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Adds `v` to the `u64` at `addr` atomically (as a program's threads
/// would update shared memory); returns the old value.
pub fn add_u64(addr: uhmm::VirtAddr, v: u64) -> u64 {
    // SAFETY: `addr` is 8-byte aligned inside a writable mapping owned by
    // the caller, which is only ever accessed atomically or through the
    // kernel while threads run.
    let a = unsafe { std::sync::atomic::AtomicU64::from_ptr(addr.as_mut_ptr::<u64>()) };
    a.fetch_add(v, std::sync::atomic::Ordering::Relaxed)
}

/// Reads the `u64` at `addr`.
pub fn read_u64(addr: uhmm::VirtAddr) -> u64 {
    // SAFETY: `addr` is 8-byte aligned inside a readable mapping owned by
    // the caller.
    unsafe { addr.as_ptr::<u64>().read_volatile() }
}

/// Writes the `u64` at `addr`.
pub fn write_u64(addr: uhmm::VirtAddr, v: u64) {
    // SAFETY: `addr` is 8-byte aligned inside a writable mapping owned by
    // the caller; no reference points into it.
    unsafe { addr.as_mut_ptr::<u64>().write_volatile(v) }
}

/// Forks; the child runs `child` and exits with its result (without
/// unwinding or running exit hooks; 101 if `child` panics), the parent
/// waits and returns the child's exit status, or why it has none (the
/// fork failed, the child was killed by a signal).
pub fn fork_and_wait(child: impl FnOnce() -> i32) -> Result<i32, String> {
    // SAFETY: fork; in the child only `child` runs, then _exit. The demo
    // forks while no other thread of its own holds a lock it needs in the
    // child (its worker threads have been joined).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // A panic must not unwind into the parent's code in the child.
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).unwrap_or(101);
        // SAFETY: leaves the child at once, as a forked child must.
        unsafe { libc::_exit(code) }
    }
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    let mut status = 0;
    loop {
        // SAFETY: waits for the child just made; `status` is a local.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("waitpid: {e}"));
        }
    }
    if libc::WIFEXITED(status) {
        Ok(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Err(format!(
            "the child was killed by signal {}",
            libc::WTERMSIG(status)
        ))
    } else {
        Err(format!("the child ended with wait status {status:#x}"))
    }
}

/// The calling thread's id.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// The ids of this process's threads whose name starts with `prefix`.
pub fn threads_named(prefix: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let tid: i32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        comm.starts_with(prefix).then_some(tid)
    })
    .collect()
}

/// The CPU time of one thread of this process and its time spent waiting
/// for a CPU (`/proc/self/task/TID/schedstat`), read without reopening.
#[derive(Debug)]
pub struct ThreadClock {
    file: std::fs::File,
}

impl ThreadClock {
    pub fn open(tid: i32) -> Result<ThreadClock, String> {
        let path = format!("/proc/self/task/{tid}/schedstat");
        std::fs::File::open(&path)
            .map(|file| ThreadClock { file })
            .map_err(|e| format!("{path}: {e}"))
    }

    /// (ns on a CPU, ns waiting on a run queue) so far; `None` if they
    /// cannot be read (the thread is gone, say).
    pub fn read(&self) -> Option<(u64, u64)> {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 96];
        let n = self.file.read_at(&mut buf, 0).ok()?;
        let text = std::str::from_utf8(&buf[..n]).ok()?;
        let mut f = text.split_whitespace().map(|x| x.parse::<u64>().ok());
        Some((f.next()??, f.next()??))
    }
}

/// Counts the system calls one thread makes: the `raw_syscalls:sys_enter`
/// tracepoint, through `perf_event_open`. Needs tracefs mounted (for the
/// tracepoint's id) and the privilege to open tracepoints (root).
#[derive(Debug)]
pub struct SyscallCounter {
    fd: std::fs::File,
}

/// `struct perf_event_attr` up to `config1` (`PERF_ATTR_SIZE_VER0`, which
/// every kernel since 2.6.31 takes).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;

impl SyscallCounter {
    pub fn open(tid: i32) -> Result<SyscallCounter, String> {
        let id = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .iter()
            .find_map(|root| {
                std::fs::read_to_string(format!("{root}/events/raw_syscalls/sys_enter/id")).ok()
            })
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or("tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing)")?;
        let attr = PerfEventAttr {
            kind: PERF_TYPE_TRACEPOINT,
            size: std::mem::size_of::<PerfEventAttr>() as u32,
            config: id,
            ..Default::default()
        };
        // SAFETY: perf_event_open reads `attr` (a valid, initialised
        // struct of the size it says) and returns a new descriptor or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                &attr as *const PerfEventAttr,
                tid,
                -1i32,
                -1i32,
                PERF_FLAG_FD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(format!(
                "perf_event_open of raw_syscalls:sys_enter: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: `fd` is a descriptor perf_event_open just returned, owned
        // by nothing else.
        let fd = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
        Ok(SyscallCounter { fd })
    }

    /// System calls counted so far; `None` if the count cannot be read.
    pub fn read(&self) -> Option<u64> {
        use std::io::Read;
        let mut buf = [0u8; 8];
        match (&self.fd).read(&mut buf) {
            Ok(8) => Some(u64::from_ne_bytes(buf)),
            _ => None,
        }
    }
}
