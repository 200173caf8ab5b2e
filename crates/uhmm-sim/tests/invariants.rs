//! DESIGN.md "Invariants", one test each, through SimDevice and plain
//! pointers, as a program would use managed memory:
//!
//! - no lost data under concurrent CPU writes and migration in both
//!   directions (`concurrent_cpu_increments_survive_migration_loops`);
//! - transparency for system calls (`write_syscall_from_device_resident_buffer`);
//! - munmap, MADV_DONTNEED, mremap and fork keep anonymous private memory's
//!   semantics (`munmap_mremap_fork_of_device_pages`);
//! - copy-engine and allocation failures lose nothing and leave nothing
//!   half-migrated (`injected_copy_and_alloc_failures_lose_nothing`);
//! - device removal loses nothing (`device_removal_with_resident_pages_loses_nothing`);
//! - random sequences of CPU, device, migration, discard and eviction
//!   operations agree with a plain byte-array model (`proptest_model`).
//!
//! Each test asserts the data itself, word by word: every page holds values
//! unique to its page and word, so a page that went missing, came back
//! stale, or landed at the wrong address is seen.
#![allow(unsafe_code)]

#[path = "../../uhmm/tests/common/mod.rs"]
mod common;

use common::{ChildEnd, serial};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use rustix::io::Errno;
use std::io::{Read, Write};
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use uhmm::devmem::PagemapConfig;
use uhmm::devmem::copy::{CopyEngine, CopyError, CopyJob, CpuCopyEngine, FailingEngine};
use uhmm::mm::{ManagedRegion, Mm, PageState};
use uhmm::sys::mem::{Advice, Backing, Mapping};
use uhmm::{PAGE_SIZE, PageRange, VirtAddr};
use uhmm_sim::{SimDevice, SimError};

/// `u64` words per page.
const WORDS: usize = PAGE_SIZE / 8;

// ---------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------

/// The value word `w` of page `p` holds in a test using `seed`: distinct
/// for every (seed, page, word), and never zero.
fn word(seed: u64, p: usize, w: usize) -> u64 {
    (seed << 48) ^ ((p as u64) << 20) ^ (w as u64) ^ 0x8000_0000_0000_0000
}

/// The address of word `w` of page `p` from `base`.
fn wptr(base: *mut u8, p: usize, w: usize) -> *mut u64 {
    base.wrapping_add(p * PAGE_SIZE + w * 8).cast()
}

/// Reads word `w` of page `p` through a plain pointer.
fn rd(base: *mut u8, p: usize, w: usize) -> u64 {
    // SAFETY: tests pass the base of a mapped, readable region they own
    // and pages inside it; no Rust reference points into managed memory.
    unsafe { wptr(base, p, w).read_volatile() }
}

/// Writes word `w` of page `p` through a plain pointer.
fn wr(base: *mut u8, p: usize, w: usize, v: u64) {
    // SAFETY: as for `rd`, and the region is writable.
    unsafe { wptr(base, p, w).write_volatile(v) }
}

/// Fills `pages` with `f(page, word)` through plain pointers (no
/// allocation: usable in a forked child).
fn fill_with(base: *mut u8, pages: Range<usize>, f: impl Fn(usize, usize) -> u64) {
    for p in pages {
        for w in 0..WORDS {
            wr(base, p, w, f(p, w));
        }
    }
}

fn fill(base: *mut u8, pages: Range<usize>, seed: u64) {
    fill_with(base, pages, |p, w| word(seed, p, w));
}

/// The first word of `pages` that does not hold `f(page, word)`, as
/// (page, word, found, expected). Allocates nothing.
fn mismatch(
    base: *mut u8,
    pages: Range<usize>,
    f: impl Fn(usize, usize) -> u64,
) -> Option<(usize, usize, u64, u64)> {
    for p in pages {
        for w in 0..WORDS {
            let (got, want) = (rd(base, p, w), f(p, w));
            if got != want {
                return Some((p, w, got, want));
            }
        }
    }
    None
}

/// Asserts, through plain CPU reads, that `pages` hold `f(page, word)`.
#[track_caller]
fn assert_cpu(base: *mut u8, pages: Range<usize>, f: impl Fn(usize, usize) -> u64, what: &str) {
    if let Some((p, w, got, want)) = mismatch(base, pages, f) {
        panic!("{what}: page {p} word {w} reads {got:#x}, expected {want:#x}");
    }
}

/// Asserts that `data` (pages `pages` of a region, as a device returned
/// them) holds `f(page, word)`.
#[track_caller]
fn assert_bytes(data: &[u8], pages: Range<usize>, f: impl Fn(usize, usize) -> u64, what: &str) {
    assert_eq!(data.len(), pages.len() * PAGE_SIZE, "{what}: length");
    for (k, p) in pages.enumerate() {
        for w in 0..WORDS {
            let at = k * PAGE_SIZE + w * 8;
            let got = u64::from_ne_bytes(data[at..at + 8].try_into().unwrap());
            let want = f(p, w);
            assert_eq!(got, want, "{what}: page {p} word {w}");
        }
    }
}

/// The bytes `f(page, word)` describes for `pages`.
fn bytes_of(pages: Range<usize>, f: impl Fn(usize, usize) -> u64) -> Vec<u8> {
    pages
        .flat_map(|p| (0..WORDS).map(move |w| (p, w)))
        .flat_map(|(p, w)| f(p, w).to_ne_bytes())
        .collect()
}

/// `len` bytes from `base + off`, read through plain pointers.
fn cpu_bytes(base: *mut u8, off: usize, len: usize) -> Vec<u8> {
    (off..off + len)
        // SAFETY: inside a mapped, readable region the test owns.
        .map(|i| unsafe { base.add(i).read_volatile() })
        .collect()
}

fn addr(base: *mut u8, page: usize) -> VirtAddr {
    VirtAddr::new(base as usize + page * PAGE_SIZE)
}

fn pages_range(base: *mut u8, first: usize, n: usize) -> PageRange {
    PageRange::new(addr(base, first), n * PAGE_SIZE).unwrap()
}

fn state(mm: &Mm, base: *mut u8, page: usize) -> PageState {
    mm.page_state(addr(base, page)).unwrap()
}

fn is_device(s: PageState) -> bool {
    matches!(s, PageState::Device { .. })
}

/// Asserts every page of `pages` is in system memory or empty: not on a
/// device, not in flight, not held exclusive.
#[track_caller]
fn assert_cpu_owned(mm: &Mm, base: *mut u8, pages: Range<usize>, what: &str) {
    for p in pages {
        let s = state(mm, base, p);
        assert!(
            matches!(s, PageState::System | PageState::Empty),
            "{what}: page {p} is {s:?}"
        );
    }
}

/// As [`assert_cpu_owned`], after CPU accesses: a thread that faulted a
/// page back may run on just before uhmm records the page as the CPU's.
#[track_caller]
fn wait_cpu_owned(mm: &Mm, base: *mut u8, pages: Range<usize>, what: &str) {
    wait_until(what, || {
        pages
            .clone()
            .all(|p| matches!(state(mm, base, p), PageState::System | PageState::Empty))
    });
}

/// Asserts every page of `pages` is in `dev`'s memory.
#[track_caller]
fn assert_on(mm: &Mm, dev: &SimDevice, base: *mut u8, pages: Range<usize>, what: &str) {
    for p in pages {
        let s = state(mm, base, p);
        assert!(
            matches!(s, PageState::Device { owner, .. } if owner == dev.owner()),
            "{what}: page {p} is {s:?}, not on device {:?}",
            dev.owner()
        );
    }
}

/// Waits (up to 5 s) for `cond`: uhmm learns of munmap, madvise and
/// mremap through userfaultfd events that its service thread handles
/// after the system call returned.
#[track_caller]
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A pipe: (read end, write end).
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2");
    // SAFETY: both descriptors were just returned to us and nothing else
    // owns them.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A tiny xorshift generator (the tests' schedules need no more).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// CPU threads that run until told to stop. Dropping them (a failed
/// assertion unwinding) stops and joins them too, before the memory they
/// touch is unmapped.
struct Workers<T> {
    stop: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<T>>,
}

impl<T: Send + 'static> Workers<T> {
    /// Starts `n` threads running `f(index, stop)`.
    fn start(n: usize, f: impl Fn(usize, &AtomicBool) -> T + Send + Sync + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let f = Arc::new(f);
        let handles = (0..n)
            .map(|i| {
                let (stop, f) = (stop.clone(), f.clone());
                std::thread::spawn(move || f(i, &stop))
            })
            .collect();
        Workers { stop, handles }
    }

    /// Stops the threads and returns what each returned.
    fn finish(mut self) -> Vec<T> {
        self.stop.store(true, Ordering::Relaxed);
        self.handles.drain(..).map(common::join_soon).collect()
    }
}

impl<T> Drop for Workers<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// A copy engine that always fails (a device whose DMA is down).
#[derive(Debug, Default)]
struct BrokenEngine {
    calls: AtomicU64,
}

impl CopyEngine for BrokenEngine {
    fn copy(&self, _jobs: &mut [CopyJob<'_>]) -> Result<(), CopyError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err(CopyError::Failed {
            reason: "the test's engine is broken".into(),
        })
    }
}

// ---------------------------------------------------------------------
// Invariant 1: concurrent CPU writes during migration are never lost.
// ---------------------------------------------------------------------

/// Two CPU threads increment counters (each its own word of every page,
/// so both threads write every page) while the main thread migrates
/// random ranges to the device and back, and leaves some there for the
/// threads' faults to bring back. Every increment must be there at the
/// end, and every other word of every page must be intact.
#[test]
fn concurrent_cpu_increments_survive_migration_loops() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    const PAGES: usize = 256;
    const THREADS: usize = 2;
    const SEED: u64 = 0xA1;
    // Thread t's counter: word 8 * t (its own cache line) of every page.
    let counter = |t: usize| 8 * t;
    let is_counter = |w: usize| (0..THREADS).any(|t| counter(t) == w);
    let expect_other = |p: usize, w: usize| word(SEED, p, w);

    let region = mm.alloc(PAGES * PAGE_SIZE, Backing::AnonPrivate).unwrap();
    let base = region.as_ptr();
    fill_with(base, 0..PAGES, |p, w| {
        if is_counter(w) { 0 } else { word(SEED, p, w) }
    });
    // Small fault blocks: CPU faults bring back parts of what the device
    // holds, so migrations meet every mix of device and system pages.
    mm.set_fault_block(8 * PAGE_SIZE).unwrap();
    let dev = SimDevice::new(&mm);

    let start = Arc::new(Barrier::new(THREADS + 1));
    let base_addr = base as usize;
    let go = start.clone();
    let workers = Workers::start(THREADS, move |t, stop| {
        let base = base_addr as *mut u8;
        let mut counts = vec![0u64; PAGES];
        go.wait();
        while !stop.load(Ordering::Relaxed) {
            for (p, count) in counts.iter_mut().enumerate() {
                // SAFETY: the word is 8-aligned and inside the region, which
                // outlives this thread (joined before the region is
                // dropped); only this thread accesses it while the threads
                // run, and only atomically.
                let c = unsafe { AtomicU64::from_ptr(wptr(base, p, counter(t))) };
                c.fetch_add(1, Ordering::Relaxed);
                *count += 1;
            }
        }
        counts
    });

    start.wait();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let deadline = Instant::now() + Duration::from_secs(2);
    let (mut iters, mut migrated_ok, mut not_migrated) = (0u32, 0u32, 0u32);
    while iters < 200 && Instant::now() < deadline {
        iters += 1;
        let (first, n) = if iters % 4 == 0 {
            (0, PAGES)
        } else {
            let first = rng.below(PAGES);
            (first, 1 + rng.below(PAGES - first))
        };
        match dev.migrate_to_device(addr(base, first), n) {
            Ok((data, res)) => {
                migrated_ok += 1;
                assert_eq!(res.cpages, n as u64);
                // The counters race; every other word is what it was.
                for k in 0..n {
                    for w in (0..WORDS).filter(|&w| !is_counter(w)) {
                        let at = k * PAGE_SIZE + w * 8;
                        let got = u64::from_ne_bytes(data[at..at + 8].try_into().unwrap());
                        assert_eq!(
                            got,
                            expect_other(first + k, w),
                            "device read, page {}",
                            first + k
                        );
                    }
                }
            }
            // A page a CPU thread faulted back before the command checked.
            Err(e) if e.errno() == Errno::NOENT => not_migrated += 1,
            Err(e) => panic!("migrate_to_device({first}, {n}): {e}"),
        }
        match rng.below(3) {
            0 => {
                dev.migrate_to_system(addr(base, 0), PAGES).unwrap();
            }
            1 => {
                let first = rng.below(PAGES);
                let n = 1 + rng.below(PAGES - first);
                dev.migrate_to_system(addr(base, first), n).unwrap();
            }
            // Left on the device: the threads' faults bring it back.
            _ => {}
        }
    }
    let counts: Vec<Vec<u64>> = workers.finish();

    for (t, counts) in counts.iter().enumerate() {
        assert!(counts.iter().all(|&c| c > 0), "thread {t} ran");
        for (p, &c) in counts.iter().enumerate() {
            assert_eq!(
                rd(base, p, counter(t)),
                c,
                "thread {t}'s counter in page {p}: increments lost or invented"
            );
        }
    }
    assert_cpu(
        base,
        0..PAGES,
        |p, w| match (0..THREADS).find(|&t| counter(t) == w) {
            Some(t) => counts[t][p],
            None => expect_other(p, w),
        },
        "after the migration loop",
    );
    let st = dev.stats();
    assert!(
        st.migrated_to_device > 0,
        "pages reached the device: {st:?}"
    );
    assert!(st.faulted_back > 0, "CPU faults brought pages back: {st:?}");
    let _ = std::io::stderr().write_all(
        format!(
            "concurrent increments: {iters} iterations, {migrated_ok} complete migrations, \
             {not_migrated} ENOENT, {} pages to device, {} faulted back\n",
            st.migrated_to_device, st.faulted_back
        )
        .as_bytes(),
    );
}

// ---------------------------------------------------------------------
// Invariant 2: system calls see device-resident pages as the CPU does.
// ---------------------------------------------------------------------

fn write_all_raw(fd: &OwnedFd, ptr: *const u8, len: usize) {
    let mut done = 0;
    while done < len {
        // SAFETY: `ptr .. ptr + len` lies in a mapped region the test owns;
        // the kernel reads it (faulting device pages back through uhmm).
        let n = unsafe { libc::write(fd.as_raw_fd(), ptr.add(done).cast(), len - done) };
        assert!(
            n > 0,
            "write(2) from managed memory: {}",
            std::io::Error::last_os_error()
        );
        done += n as usize;
    }
}

fn read_all_raw(fd: &OwnedFd, ptr: *mut u8, len: usize) {
    let mut done = 0;
    while done < len {
        // SAFETY: `ptr .. ptr + len` lies in a mapped, writable region the
        // test owns and no reference points into it.
        let n = unsafe { libc::read(fd.as_raw_fd(), ptr.add(done).cast(), len - done) };
        assert!(
            n > 0,
            "read(2) into managed memory: {}",
            std::io::Error::last_os_error()
        );
        done += n as usize;
    }
}

/// write(2) from a device-resident buffer sends the buffer's data; read(2)
/// into one (at an unaligned offset, so pages are partly overwritten)
/// lands the new bytes and keeps the rest of each page; write(2) from
/// pages held exclusive by the device sends what the device wrote.
#[test]
fn write_syscall_from_device_resident_buffer() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    const PAGES: usize = 64;
    const LEN: usize = PAGES * PAGE_SIZE;
    let region = mm.alloc(LEN, Backing::AnonPrivate).unwrap();
    let base = region.as_ptr();
    fill(base, 0..PAGES, 1);
    let dev = SimDevice::new(&mm);

    // write(2) from device memory.
    dev.migrate_to_device(addr(base, 0), PAGES).unwrap();
    assert_on(&mm, &dev, base, 0..PAGES, "before write(2)");
    let faulted = dev.stats().faulted_back;
    let (rx, tx) = pipe();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; LEN];
        std::fs::File::from(rx).read_exact(&mut buf).unwrap();
        buf
    });
    write_all_raw(&tx, base, LEN);
    drop(tx);
    let sent = common::join_soon(reader);
    assert!(
        sent == bytes_of(0..PAGES, |p, w| word(1, p, w)),
        "write(2) sent the buffer's data"
    );
    assert!(
        dev.stats().faulted_back > faulted,
        "the kernel's access faulted the pages back"
    );
    // Every page was read, so every page came back (the faulting thread
    // may run on before the device page is freed).
    wait_until("every page to come back", || dev.device_pages() == 0);

    // read(2) into device memory, leaving OFF bytes untouched at each end.
    const OFF: usize = 100;
    dev.migrate_to_device(addr(base, 0), PAGES).unwrap();
    assert_on(&mm, &dev, base, 0..PAGES, "before read(2)");
    let incoming: Vec<u8> = (0..LEN - 2 * OFF)
        .map(|i| {
            (i as u8)
                .wrapping_mul(7)
                .wrapping_add((i / PAGE_SIZE) as u8)
                ^ 0x5a
        })
        .collect();
    let (rx, tx) = pipe();
    let data = incoming.clone();
    let writer = std::thread::spawn(move || {
        std::fs::File::from(tx).write_all(&data).unwrap();
    });
    // SAFETY: OFF is inside the region.
    read_all_raw(&rx, unsafe { base.add(OFF) }, LEN - 2 * OFF);
    common::join_soon(writer);
    let old = bytes_of(0..PAGES, |p, w| word(1, p, w));
    let now = cpu_bytes(base, 0, LEN);
    assert!(now[..OFF] == old[..OFF], "bytes before the read(2) kept");
    assert!(
        now[OFF..LEN - OFF] == incoming[..],
        "read(2) landed its bytes"
    );
    assert!(
        now[LEN - OFF..] == old[LEN - OFF..],
        "bytes after the read(2) kept"
    );

    // write(2) from pages the device holds exclusive and wrote.
    dev.exclusive(addr(base, 0), PAGES).unwrap();
    let device_data = bytes_of(0..PAGES, |p, w| word(2, p, w));
    dev.write(addr(base, 0), &device_data).unwrap();
    let (rx, tx) = pipe();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; LEN];
        std::fs::File::from(rx).read_exact(&mut buf).unwrap();
        buf
    });
    write_all_raw(&tx, base, LEN);
    drop(tx);
    let sent = common::join_soon(reader);
    assert!(sent == device_data, "write(2) sent what the device wrote");
    dev.check_exclusive(addr(base, 0), PAGES)
        .expect("the kernel's access revoked the exclusive hold");
}

// ---------------------------------------------------------------------
// Invariants 1 and 5: munmap, MADV_DONTNEED, mremap, fork.
// ---------------------------------------------------------------------

/// munmap of part of a device-resident range frees exactly those device
/// pages and keeps the rest; MADV_DONTNEED frees device pages and the
/// pages read zero; mremap moves device-resident pages with the mapping;
/// fork gives the child the parent's data (device-resident and exclusive
/// pages included) with writes private to each side, also while the
/// parent migrates pages still shared copy-on-write with the child.
#[test]
fn munmap_mremap_fork_of_device_pages() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    const PAGES: usize = 16;
    let dev = SimDevice::new(&mm);

    // --- munmap of part of the range.
    {
        let region = mm.alloc(PAGES * PAGE_SIZE, Backing::AnonPrivate).unwrap();
        let base = region.as_ptr();
        fill(base, 0..PAGES, 3);
        dev.migrate_to_device(addr(base, 0), PAGES).unwrap();
        assert_eq!(dev.device_pages(), PAGES);
        let freed = dev.stats().pages_freed;
        common::unmap_part(pages_range(base, 4, 4));
        // (page_free is told just after the page leaves the pool.)
        wait_until("munmap to free 4 device pages", || {
            dev.device_pages() == PAGES - 4 && dev.stats().pages_freed >= freed + 4
        });
        assert_eq!(
            dev.stats().pages_freed,
            freed + 4,
            "exactly the unmapped pages freed"
        );
        assert!(!mm.is_managed(pages_range(base, 4, 4)));
        assert_on(&mm, &dev, base, 0..4, "head after munmap");
        assert_on(&mm, &dev, base, 8..PAGES, "tail after munmap");
        assert_cpu(base, 0..4, |p, w| word(3, p, w), "head after munmap");
        assert_cpu(base, 8..PAGES, |p, w| word(3, p, w), "tail after munmap");
        // The faulting thread may run on before the device page is freed.
        wait_until("the CPU reads to bring every page back", || {
            dev.device_pages() == 0
        });
        drop(region);
    }

    // --- mremap (MAYMOVE to a new address) of device-resident pages.
    {
        let len = PAGES * PAGE_SIZE;
        let old = Mapping::anon(len).unwrap().leak();
        // SAFETY: the leaked mapping is this test's and nothing refers
        // into it; it stays mapped (at the old address, then at the new
        // one) until the test unmaps it itself, just before the region is
        // dropped.
        let region = unsafe { mm.manage(old) }.unwrap();
        let base = old.start().as_mut_ptr::<u8>();
        fill(base, 0..PAGES, 5);
        mm.set_fault_block(PAGE_SIZE).unwrap();
        dev.migrate_to_device(addr(base, 0), PAGES).unwrap();
        // Pages 0 and 7 come back before the move: a mix moves.
        assert_eq!(rd(base, 0, 0), word(5, 0, 0));
        assert_eq!(rd(base, 7, 9), word(5, 7, 9));
        // The faulting thread may run on before the device page is freed.
        wait_until("the CPU reads to bring pages 0 and 7 back", || {
            dev.device_pages() == PAGES - 2
        });
        let target = Mapping::anon(len).unwrap().leak();
        // SAFETY: both ranges are this test's own mappings with no
        // reference into them; the target's pages are replaced.
        let moved = unsafe {
            libc::mremap(
                old.start().as_mut_ptr(),
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                target.start().as_mut_ptr::<libc::c_void>(),
            )
        };
        assert_eq!(moved as usize, target.start().get(), "mremap moved it");
        wait_until("the managed range to follow mremap", || {
            mm.is_managed(target) && !mm.is_managed(old)
        });
        let nb = target.start().as_mut_ptr::<u8>();
        assert_eq!(
            dev.device_pages(),
            PAGES - 2,
            "the device pages moved, not freed"
        );
        for p in (0..PAGES).filter(|&p| p != 0 && p != 7) {
            assert!(
                is_device(state(&mm, nb, p)),
                "page {p} is on the device at the new address"
            );
        }
        let (data, _) = dev.read(addr(nb, 0), PAGES).unwrap();
        assert_bytes(
            &data,
            0..PAGES,
            |p, w| word(5, p, w),
            "device read at the new address",
        );
        assert_cpu(
            nb,
            0..PAGES,
            |p, w| word(5, p, w),
            "CPU read at the new address",
        );
        // The faulting thread may run on before the device page is freed.
        wait_until("the CPU reads to bring every page back", || {
            dev.device_pages() == 0
        });
        // It still migrates and comes back at the new address.
        fill(nb, 0..PAGES, 6);
        let (data, _) = dev.migrate_to_device(addr(nb, 0), PAGES).unwrap();
        assert_bytes(
            &data,
            0..PAGES,
            |p, w| word(6, p, w),
            "migrated after mremap",
        );
        assert_cpu(nb, 0..PAGES, |p, w| word(6, p, w), "back after mremap");
        mm.set_fault_block(2 << 20).unwrap();
        // SAFETY: the moved mapping is this test's; unmapping it ends it.
        assert_eq!(unsafe { libc::munmap(nb.cast(), len) }, 0);
        wait_until("the moved range to be unmanaged", || !mm.is_managed(target));
        // Its range was the old one, which is gone: nothing left to do.
        drop(region);
    }

    // --- fork with device-resident and exclusive pages.
    let _f = common::fork_lock();
    let region = mm.alloc(PAGES * PAGE_SIZE, Backing::AnonPrivate).unwrap();
    let base = region.as_ptr();
    fill(base, 0..PAGES, 7);
    // Pages 0..8 on the device, 8..12 exclusive and written by the
    // device, 12..16 in system memory.
    dev.migrate_to_device(addr(base, 0), 8).unwrap();
    dev.exclusive(addr(base, 8), 4).unwrap();
    dev.write(addr(base, 8), &bytes_of(8..12, |p, w| word(8, p, w)))
        .unwrap();
    let expect = |p: usize, w: usize| {
        if (8..12).contains(&p) {
            word(8, p, w)
        } else {
            word(7, p, w)
        }
    };
    let base_addr = base as usize;
    let end = common::fork_and_wait(|| {
        let base = base_addr as *mut u8;
        if mismatch(base, 0..PAGES, expect).is_some() {
            return 1;
        }
        fill_with(base, 0..PAGES, |p, w| !expect(p, w));
        if mismatch(base, 0..PAGES, |p, w| !expect(p, w)).is_some() {
            return 2;
        }
        0
    });
    assert_eq!(
        end,
        ChildEnd::Exited(0),
        "the child saw the parent's data (1) and its own writes (2)"
    );
    assert_cpu(base, 0..PAGES, expect, "the parent after the child wrote");
    let (data, _) = dev.migrate_to_device(addr(base, 0), PAGES).unwrap();
    assert_bytes(&data, 0..PAGES, expect, "the parent migrates after fork");

    // A child alive while the parent migrates its copy-on-write pages and
    // writes them: the child keeps the old data.
    dev.migrate_to_system(addr(base, 0), PAGES).unwrap();
    let (go_rx, go_tx) = pipe();
    // SAFETY: the child only reads a pipe, reads memory and `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        let mut b = 0u8;
        // SAFETY: closes the child's copy of the write end (so that the
        // parent's close is EOF), reads one byte into `b`, then makes plain
        // reads of the child's own copy of the region.
        unsafe {
            libc::close(go_tx.as_raw_fd());
            libc::read(go_rx.as_raw_fd(), (&mut b as *mut u8).cast(), 1);
            let code = i32::from(mismatch(base_addr as *mut u8, 0..PAGES, expect).is_some());
            libc::_exit(code);
        }
    }
    drop(go_rx);
    // The pages are shared with the child: they cannot be moved, so the
    // migration copies them.
    let (data, _) = dev.migrate_to_device(addr(base, 0), PAGES).unwrap();
    assert_bytes(
        &data,
        0..PAGES,
        expect,
        "migrated while shared with a child",
    );
    fill(base, 0..4, 9);
    drop(go_tx);
    assert_eq!(
        common::wait_child(pid),
        ChildEnd::Exited(0),
        "the child kept its data"
    );
    let after = |p: usize, w: usize| if p < 4 { word(9, p, w) } else { expect(p, w) };
    assert_cpu(base, 0..PAGES, after, "the parent after writing");

    // --- MADV_DONTNEED over device pages and a system page (in an address
    // space of its own, so that what ran above does not decide which of
    // uhmm's staging slots it uses).
    {
        let mm = Mm::new().unwrap();
        let dev = SimDevice::new(&mm);
        let region = mm.alloc(PAGES * PAGE_SIZE, Backing::AnonPrivate).unwrap();
        let base = region.as_ptr();
        fill(base, 0..PAGES, 4);
        dev.migrate_to_device(addr(base, 0), PAGES).unwrap();
        dev.migrate_to_system(addr(base, 5), 1).unwrap();
        assert_eq!(dev.device_pages(), PAGES - 1);
        let freed = dev.stats().pages_freed;
        region
            .mapping()
            .unwrap()
            .advise(pages_range(base, 2, 4), Advice::DontNeed)
            .unwrap();
        // Pages 2, 3, 4 were on the device, 5 in system memory.
        wait_until("MADV_DONTNEED to free 3 device pages", || {
            dev.device_pages() == PAGES - 4 && dev.stats().pages_freed >= freed + 3
        });
        assert_eq!(dev.stats().pages_freed, freed + 3);
        for p in 2..6 {
            assert_eq!(state(&mm, base, p), PageState::Empty, "discarded page {p}");
        }
        let expect = |p: usize, w: usize| {
            if (2..6).contains(&p) {
                0
            } else {
                word(4, p, w)
            }
        };
        let (data, _) = dev.read(addr(base, 0), PAGES).unwrap();
        assert_bytes(&data, 0..PAGES, expect, "device read after MADV_DONTNEED");
        // Two more ways a discarded page could come back are each recorded
        // (not asserted at once), so that one failing does not hide the
        // other.
        let mut violations = Vec::new();
        // Migrated again, the discarded pages are still zeros.
        let (data, _) = dev.migrate_to_device(addr(base, 0), PAGES).unwrap();
        if bytes_of(0..PAGES, expect) != data {
            let bad: Vec<usize> = (0..PAGES)
                .filter(|&p| {
                    data[p * PAGE_SIZE..(p + 1) * PAGE_SIZE] != bytes_of(p..p + 1, expect)[..]
                })
                .collect();
            violations.push(format!(
                "migrated after MADV_DONTNEED, pages {bad:?} do not hold what they should \
                 (discarded pages 2..6 must be zeros)"
            ));
        }
        if let Some((p, w, got, want)) = mismatch(base, 0..PAGES, expect) {
            violations.push(format!(
                "CPU read after MADV_DONTNEED: page {p} word {w} is {got:#x}, expected {want:#x}"
            ));
        }
        // The discard is in effect once madvise returns, for devices too:
        // a migration back right after it brings no old data back.
        let small = mm.alloc(4 * PAGE_SIZE, Backing::AnonPrivate).unwrap();
        let sb = small.as_ptr();
        let (mut stale, rounds) = (0, 2000);
        for round in 0..rounds {
            fill(sb, 0..4, 100 + round);
            dev.migrate_to_device(addr(sb, 0), 4).unwrap();
            small
                .mapping()
                .unwrap()
                .advise(pages_range(sb, 0, 4), Advice::DontNeed)
                .unwrap();
            dev.migrate_to_system(addr(sb, 0), 4).unwrap();
            if mismatch(sb, 0..4, |_, _| 0).is_some() {
                stale += 1;
            }
        }
        if stale > 0 {
            violations.push(format!(
                "in {stale} of {rounds} rounds, migrate_to_system right after MADV_DONTNEED \
                 returned brought the discarded data back"
            ));
        }
        assert!(violations.is_empty(), "{}", violations.join("\n"));
    }
}

// ---------------------------------------------------------------------
// Invariants 1 and 6: injected copy and allocation failures.
// ---------------------------------------------------------------------

#[test]
fn injected_copy_and_alloc_failures_lose_nothing() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    const PAGES: usize = 16;

    // --- The copy to the device fails: nothing migrates.
    {
        let region = mm.alloc(PAGES * PAGE_SIZE, Backing::AnonPrivate).unwrap();
        let base = region.as_ptr();
        fill(base, 0..PAGES, 10);
        let dev = SimDevice::new(&mm);
        let engine = Arc::new(FailingEngine::new(CpuCopyEngine::new()));
        dev.set_copy_engine(engine.clone());
        engine.fail_after(0);
        let e = dev.migrate_to_device(addr(base, 0), PAGES).unwrap_err();
        assert_eq!(e.errno(), Errno::NOENT, "{e}");
        assert!(matches!(e, SimError::NotMigrated { .. }), "{e}");
        assert_eq!(engine.failures(), 1);
        assert_eq!(dev.stats().copy_failures, 1);
        assert_eq!(
            dev.device_pages(),
            0,
            "the device pages of the failed copy were freed"
        );
        assert_cpu_owned(&mm, base, 0..PAGES, "after a failed copy");
        assert_cpu(base, 0..PAGES, |p, w| word(10, p, w), "after a failed copy");

        // Half already on the device; the copy of the other half fails.
        dev.migrate_to_device(addr(base, 0), 8).unwrap();
        engine.fail_after(0);
        let e = dev.migrate_to_device(addr(base, 0), PAGES).unwrap_err();
        assert_eq!(e.errno(), Errno::NOENT, "{e}");
        assert_on(&mm, &dev, base, 0..8, "the half migrated before");
        assert_cpu_owned(&mm, base, 8..PAGES, "the half whose copy failed");
        assert_eq!(dev.device_pages(), 8);
        let (data, _) = dev.read(addr(base, 0), PAGES).unwrap();
        assert_bytes(&data, 0..PAGES, |p, w| word(10, p, w), "device read");
        assert_cpu(base, 0..PAGES, |p, w| word(10, p, w), "CPU read");
    }

    // --- Device memory runs out: ENOMEM, nothing half-migrated.
    {
        let region = mm.alloc(PAGES * PAGE_SIZE, Backing::AnonPrivate).unwrap();
        let base = region.as_ptr();
        fill(base, 0..PAGES, 11);
        let dev = SimDevice::with_memory(
            &mm,
            PagemapConfig {
                chunk_pages: 8,
                max_chunks: 1,
            },
        )
        .unwrap();
        let e = dev.migrate_to_device(addr(base, 0), PAGES).unwrap_err();
        assert_eq!(e.errno(), Errno::NOMEM, "{e}");
        assert!(matches!(e, SimError::DeviceMemory(_)), "{e}");
        assert_eq!(dev.device_pages(), 0);
        assert_cpu_owned(&mm, base, 0..PAGES, "after ENOMEM");
        assert_cpu(base, 0..PAGES, |p, w| word(11, p, w), "after ENOMEM");

        dev.migrate_to_device(addr(base, 0), 6).unwrap();
        let e = dev.migrate_to_device(addr(base, 6), 6).unwrap_err();
        assert_eq!(e.errno(), Errno::NOMEM, "{e}");
        assert_eq!(dev.device_pages(), 6);
        assert_on(&mm, &dev, base, 0..6, "migrated before ENOMEM");
        assert_cpu_owned(&mm, base, 6..PAGES, "not migrated (ENOMEM)");

        // The bulk allocation fails and the page-by-page fallback runs out.
        dev.fail_next_alloc();
        let e = dev.migrate_to_device(addr(base, 8), 8).unwrap_err();
        assert_eq!(e.errno(), Errno::NOMEM, "{e}");
        assert_eq!(dev.stats().alloc_fallbacks, 1);
        assert_eq!(
            dev.device_pages(),
            6,
            "the fallback's pages were given back"
        );
        assert_cpu_owned(&mm, base, 6..PAGES, "not migrated (fallback ENOMEM)");
        let (data, _) = dev.read(addr(base, 0), PAGES).unwrap();
        assert_bytes(&data, 0..PAGES, |p, w| word(11, p, w), "device read");
        assert_cpu(base, 0..PAGES, |p, w| word(11, p, w), "CPU read");
        wait_cpu_owned(
            &mm,
            base,
            0..PAGES,
            "every page to be the CPU's after the CPU read",
        );
    }

    // --- The copy back fails: the data stays on the device.
    {
        let region = mm.alloc(PAGES * PAGE_SIZE, Backing::AnonPrivate).unwrap();
        let base = region.as_ptr();
        fill(base, 0..PAGES, 12);
        let dev = SimDevice::new(&mm);
        let engine = Arc::new(FailingEngine::new(CpuCopyEngine::new()));
        dev.set_copy_engine(engine.clone());
        dev.migrate_to_device(addr(base, 0), PAGES).unwrap();
        engine.fail_after(0);
        let e = dev.migrate_to_system(addr(base, 0), PAGES).unwrap_err();
        assert_eq!(e.errno(), Errno::FAULT, "{e}");
        assert_eq!(engine.failures(), 1);
        assert_eq!(dev.device_pages(), PAGES, "still on the device");
        assert_on(&mm, &dev, base, 0..PAGES, "after a failed copy back");
        let (data, _) = dev.read(addr(base, 0), PAGES).unwrap();
        assert_bytes(&data, 0..PAGES, |p, w| word(12, p, w), "device read");

        // A CPU fault whose copy fails once is retried: the read is right.
        engine.fail_after(0);
        assert_cpu(
            base,
            3..4,
            |p, w| word(12, p, w),
            "CPU read, first copy failing",
        );
        assert_eq!(engine.failures(), 2, "the fault path's copy failed once");
        assert_cpu(base, 0..PAGES, |p, w| word(12, p, w), "CPU read");

        // A device whose copies all fail: a CPU access fails as the
        // kernel's VM_FAULT_SIGBUS makes it fail — once the device has
        // failed it 8 times (or for 1 s) — never waiting for ever. That
        // page is lost (poisoned: SIGBUS for the CPU, EFAULT for a system
        // call), the others stay on the device, and come back once it
        // copies again.
        dev.migrate_to_device(addr(base, 0), PAGES).unwrap();
        let broken = Arc::new(BrokenEngine::default());
        dev.set_copy_engine(broken.clone());
        let e = dev.migrate_to_system(addr(base, 0), PAGES).unwrap_err();
        assert_eq!(e.errno(), Errno::FAULT, "{e}");
        let t0 = std::time::Instant::now();
        let mut b = [0u8; 8];
        let got = uhmm::sys::mem::read_process(addr(base, 5), &mut b);
        assert!(
            matches!(got, Err(ref e) if e.errno == Errno::FAULT),
            "a read of a page the device cannot give back: {got:?}"
        );
        assert!(t0.elapsed() < std::time::Duration::from_secs(3));
        assert!(broken.calls.load(Ordering::SeqCst) >= 8);
        assert_eq!(mm.stats().faults_sigbus, 1);
        assert_eq!(
            dev.device_pages(),
            PAGES - 1,
            "the lost page's device page was freed, no other"
        );
        for p in (0..PAGES).filter(|&p| p != 5) {
            let s = state(&mm, base, p);
            assert!(
                matches!(s, PageState::Device { owner, .. } if owner == dev.owner()),
                "page {p} is {s:?} while the engine is broken"
            );
        }
        dev.set_copy_engine(Arc::new(CpuCopyEngine::new()));
        assert_cpu(base, 0..5, |p, w| word(12, p, w), "CPU read after repair");
        assert_cpu(
            base,
            6..PAGES,
            |p, w| word(12, p, w),
            "CPU read after repair",
        );
        let again = uhmm::sys::mem::read_process(addr(base, 5), &mut b);
        assert!(again.is_err(), "a lost page read {again:?}");
    }
}

// ---------------------------------------------------------------------
// Invariant 1: device removal.
// ---------------------------------------------------------------------

#[test]
fn device_removal_with_resident_pages_loses_nothing() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    const PAGES: usize = 32;
    let region = mm.alloc(PAGES * PAGE_SIZE, Backing::AnonPrivate).unwrap();
    let base = region.as_ptr();
    fill(base, 0..PAGES, 20);
    // Device a: pages 0..16 in its memory, 24..28 exclusive and written;
    // device b: pages 16..24; 28..32 stay in system memory.
    let a = SimDevice::new(&mm);
    let b = SimDevice::new(&mm);
    a.migrate_to_device(addr(base, 0), 16).unwrap();
    b.migrate_to_device(addr(base, 16), 8).unwrap();
    a.exclusive(addr(base, 24), 4).unwrap();
    a.write(addr(base, 24), &bytes_of(24..28, |p, w| word(21, p, w)))
        .unwrap();
    let expect = |p: usize, w: usize| {
        if (24..28).contains(&p) {
            word(21, p, w)
        } else {
            word(20, p, w)
        }
    };
    let a_owner = a.owner();
    drop(a);
    for p in 0..PAGES {
        let s = state(&mm, base, p);
        assert!(
            !matches!(s, PageState::Device { owner, .. } | PageState::Migrating { owner } if owner == a_owner),
            "page {p} is {s:?} after its device was removed"
        );
    }
    assert_on(&mm, &b, base, 16..24, "the other device's pages");
    let (data, _) = b.read(addr(base, 0), PAGES).unwrap();
    assert_bytes(&data, 0..PAGES, expect, "the other device reads everything");

    // Release (HMM_DMIRROR_RELEASE) of device b.
    b.migrate_to_device(addr(base, 0), 16).unwrap();
    b.release().unwrap();
    assert_eq!(b.device_pages(), 0);
    assert_cpu_owned(&mm, base, 0..24, "after release");
    let faults = mm.stats().faults;
    assert_cpu(base, 0..PAGES, expect, "after removal and release");
    wait_cpu_owned(
        &mm,
        base,
        0..PAGES,
        "every page to be the CPU's after the CPU read",
    );
    assert!(
        mm.stats().faults - faults <= 4,
        "released pages were home already (only the 4 exclusive pages fault)"
    );

    // Removal whose first copy back fails: removal retries.
    let c = SimDevice::new(&mm);
    let engine = Arc::new(FailingEngine::new(CpuCopyEngine::new()));
    c.set_copy_engine(engine.clone());
    c.migrate_to_device(addr(base, 0), PAGES).unwrap();
    engine.fail_after(0);
    drop(c);
    assert_eq!(engine.failures(), 1, "the eviction's first copy failed");
    assert_cpu_owned(&mm, base, 0..PAGES, "after removal with a failing copy");
    assert_cpu(base, 0..PAGES, expect, "after removal with a failing copy");

    // Removal and release while a CPU thread writes: no write lost.
    let base_addr = base as usize;
    let writer = Workers::start(1, move |_, stop| {
        let base = base_addr as *mut u8;
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            for p in 0..PAGES {
                wr(base, p, 0, n);
            }
        }
        n
    });
    for i in 0..30 {
        let d = SimDevice::new(&mm);
        match d.migrate_to_device(addr(base, 0), PAGES) {
            Ok(_) => {}
            Err(e) if e.errno() == Errno::NOENT => {}
            Err(e) => panic!("{e}"),
        }
        if i % 2 == 0 {
            d.release().unwrap();
            assert_eq!(d.device_pages(), 0);
        }
        drop(d);
    }
    let n = writer.finish()[0];
    assert_cpu_owned(&mm, base, 0..PAGES, "after the removal loop");
    assert_cpu(
        base,
        0..PAGES,
        |p, w| if w == 0 { n } else { expect(p, w) },
        "after the removal loop",
    );
}

// ---------------------------------------------------------------------
// All of it: a model check.
// ---------------------------------------------------------------------

const MODEL_PAGES: usize = 16;
const DEVICES: usize = 2;

#[derive(Debug, Clone)]
enum Op {
    CpuWrite {
        page: usize,
        word: usize,
        value: u64,
    },
    CpuRead {
        page: usize,
    },
    DevWrite {
        dev: usize,
        first: usize,
        n: usize,
        seed: u8,
    },
    DevRead {
        dev: usize,
        first: usize,
        n: usize,
    },
    MigrateToDevice {
        dev: usize,
        first: usize,
        n: usize,
    },
    MigrateToSystem {
        dev: usize,
        first: usize,
        n: usize,
    },
    Exclusive {
        dev: usize,
        first: usize,
        n: usize,
    },
    Discard {
        first: usize,
        n: usize,
    },
    Evict {
        dev: usize,
    },
    Replace {
        dev: usize,
    },
}

fn span() -> impl Strategy<Value = (usize, usize)> {
    (0..MODEL_PAGES).prop_flat_map(|first| (Just(first), 1..=MODEL_PAGES - first))
}

fn op() -> impl Strategy<Value = Op> {
    let dev = 0..DEVICES;
    prop_oneof![
        3 => (0..MODEL_PAGES, 0..WORDS, any::<u64>())
            .prop_map(|(page, word, value)| Op::CpuWrite { page, word, value }),
        2 => (0..MODEL_PAGES).prop_map(|page| Op::CpuRead { page }),
        2 => (dev.clone(), span(), any::<u8>())
            .prop_map(|(dev, (first, n), seed)| Op::DevWrite { dev, first, n, seed }),
        2 => (dev.clone(), span()).prop_map(|(dev, (first, n))| Op::DevRead { dev, first, n }),
        4 => (dev.clone(), span())
            .prop_map(|(dev, (first, n))| Op::MigrateToDevice { dev, first, n }),
        2 => (dev.clone(), span())
            .prop_map(|(dev, (first, n))| Op::MigrateToSystem { dev, first, n }),
        2 => (dev.clone(), span()).prop_map(|(dev, (first, n))| Op::Exclusive { dev, first, n }),
        2 => span().prop_map(|(first, n)| Op::Discard { first, n }),
        1 => dev.clone().prop_map(|dev| Op::Evict { dev }),
        1 => dev.prop_map(|dev| Op::Replace { dev }),
    ]
}

/// Checks the model's bookkeeping: no page in flight, every device page
/// belongs to a live device, and each device's count of pages in use is
/// the number of pages it holds (nothing leaked, nothing double-counted).
/// Polled: discards reach uhmm after madvise returned.
fn check_accounting(mm: &Mm, base: *mut u8, devs: &[SimDevice]) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let mut held = [0usize; DEVICES];
        let mut problem = None;
        for p in 0..MODEL_PAGES {
            match state(mm, base, p) {
                PageState::Device { owner, .. } => {
                    match devs.iter().position(|d| d.owner() == owner) {
                        Some(i) => held[i] += 1,
                        None => problem = Some(format!("page {p} is on a removed device")),
                    }
                }
                PageState::Migrating { .. } => problem = Some(format!("page {p} is in flight")),
                _ => {}
            }
        }
        for (i, d) in devs.iter().enumerate() {
            if d.device_pages() != held[i] {
                problem = Some(format!(
                    "device {i} has {} pages in use but holds {}",
                    d.device_pages(),
                    held[i]
                ));
            }
        }
        match problem {
            None => return Ok(()),
            Some(p) if Instant::now() > deadline => return Err(p),
            Some(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// `Ok` if `got` (pages from `first`) equals `want`; otherwise where the
/// first difference is.
fn same(got: &[u8], want: &[u8], first: usize) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{} bytes, expected {}", got.len(), want.len()));
    }
    match got.iter().zip(want).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(format!(
            "page {} byte {:#x} is {:#04x}, expected {:#04x} ({} bytes differ)",
            first + i / PAGE_SIZE,
            i % PAGE_SIZE,
            got[i],
            want[i],
            got.iter().zip(want).filter(|(a, b)| a != b).count()
        )),
    }
}

/// Runs `ops` on a fresh region and two devices of `mm`, checking each
/// result against a plain byte-array model.
fn run_model(mm: &Mm, ops: &[Op]) -> Result<(), TestCaseError> {
    const LEN: usize = MODEL_PAGES * PAGE_SIZE;
    let region: ManagedRegion = mm.alloc(LEN, Backing::AnonPrivate).unwrap();
    let base = region.as_ptr();
    let mut devs: Vec<SimDevice> = (0..DEVICES).map(|_| SimDevice::new(mm)).collect();
    let mut model = vec![0u8; LEN];
    let bytes = |first: usize, n: usize| first * PAGE_SIZE..(first + n) * PAGE_SIZE;
    for (step, op) in ops.iter().enumerate() {
        let fail = |what: String| {
            let st = mm.stats();
            TestCaseError::fail(format!(
                "step {step} {op:?}: {what} (SIGBUS'd faults {}, callback panics {}, pages lost {}, self-deadlocks {})",
                st.faults_sigbus, st.callback_panics, st.pages_lost, st.self_deadlocks
            ))
        };
        let at = |first: usize| addr(base, first);
        match *op {
            Op::CpuWrite { page, word, value } => {
                wr(base, page, word, value);
                let o = page * PAGE_SIZE + word * 8;
                model[o..o + 8].copy_from_slice(&value.to_ne_bytes());
            }
            Op::CpuRead { page } => {
                let got = cpu_bytes(base, page * PAGE_SIZE, PAGE_SIZE);
                same(&got, &model[bytes(page, 1)], page)
                    .map_err(|e| fail(format!("CPU read: {e}")))?;
            }
            Op::DevWrite {
                dev,
                first,
                n,
                seed,
            } => {
                let data: Vec<u8> = (0..n * PAGE_SIZE)
                    .map(|j| {
                        seed.wrapping_add((j / 8) as u8).wrapping_mul(3) ^ (j / PAGE_SIZE) as u8
                    })
                    .collect();
                devs[dev]
                    .write(at(first), &data)
                    .map_err(|e| fail(e.to_string()))?;
                model[bytes(first, n)].copy_from_slice(&data);
            }
            Op::DevRead { dev, first, n } => {
                let (data, _) = devs[dev]
                    .read(at(first), n)
                    .map_err(|e| fail(e.to_string()))?;
                same(&data, &model[bytes(first, n)], first)
                    .map_err(|e| fail(format!("device read: {e}")))?;
            }
            Op::MigrateToDevice { dev, first, n } => {
                match devs[dev].migrate_to_device(at(first), n) {
                    Ok((data, res)) => {
                        prop_assert_eq!(res.cpages, n as u64);
                        same(&data, &model[bytes(first, n)], first)
                            .map_err(|e| fail(format!("data read back: {e}")))?;
                        for p in first..first + n {
                            let s = state(mm, base, p);
                            if !matches!(s, PageState::Device { owner, .. } if owner == devs[dev].owner())
                            {
                                return Err(fail(format!("page {p} is {s:?}")));
                            }
                        }
                    }
                    // Pages on the other device or held exclusive stay put.
                    Err(e) if e.errno() == Errno::NOENT => {}
                    Err(e) => return Err(fail(e.to_string())),
                }
            }
            Op::MigrateToSystem { dev, first, n } => {
                devs[dev]
                    .migrate_to_system(at(first), n)
                    .map_err(|e| fail(e.to_string()))?;
                for p in first..first + n {
                    let s = state(mm, base, p);
                    if matches!(s, PageState::Device { owner, .. } if owner == devs[dev].owner()) {
                        return Err(fail(format!("page {p} is {s:?}")));
                    }
                }
            }
            Op::Exclusive { dev, first, n } => match devs[dev].exclusive(at(first), n) {
                Ok((data, _)) => same(&data, &model[bytes(first, n)], first)
                    .map_err(|e| fail(format!("data read back: {e}")))?,
                Err(e) => {
                    let states: Vec<String> = (first..first + n)
                        .map(|p| format!("{p}: {:?}", mm.page_state(addr(base, p))))
                        .collect();
                    return Err(fail(format!("{e}; pages: {}", states.join(", "))));
                }
            },
            Op::Discard { first, n } => {
                region
                    .mapping()
                    .unwrap()
                    .advise(pages_range(base, first, n), Advice::DontNeed)
                    .unwrap();
                model[bytes(first, n)].fill(0);
            }
            Op::Evict { dev } => {
                devs[dev].release().map_err(|e| fail(e.to_string()))?;
                prop_assert_eq!(devs[dev].device_pages(), 0, "step {} {:?}", step, op);
            }
            Op::Replace { dev } => devs[dev] = SimDevice::new(mm),
        }
        check_accounting(mm, base, &devs).map_err(fail)?;
    }
    for (i, d) in devs.iter().enumerate() {
        let (data, _) = d
            .read(addr(base, 0), MODEL_PAGES)
            .map_err(|e| TestCaseError::fail(format!("final read by device {i}: {e}")))?;
        same(&data, &model, 0)
            .map_err(|e| TestCaseError::fail(format!("final read by device {i}: {e}")))?;
    }
    same(&cpu_bytes(base, 0, LEN), &model, 0)
        .map_err(|e| TestCaseError::fail(format!("final CPU read: {e}")))?;
    // Nothing of it survives into new memory: a fresh region (likely at
    // the same address) is zeros, on a device and for the CPU.
    drop(devs);
    drop(region);
    let region = mm.alloc(LEN, Backing::AnonPrivate).unwrap();
    let base = region.as_ptr();
    let dev = SimDevice::new(mm);
    let (data, _) = dev
        .migrate_to_device(addr(base, 0), MODEL_PAGES)
        .map_err(|e| TestCaseError::fail(format!("fresh region: {e}")))?;
    let zeros = vec![0u8; LEN];
    same(&data, &zeros, 0)
        .map_err(|e| TestCaseError::fail(format!("fresh region, migrated: {e}")))?;
    same(&cpu_bytes(base, 0, LEN), &zeros, 0)
        .map_err(|e| TestCaseError::fail(format!("fresh region, CPU read: {e}")))?;
    Ok(())
}

#[test]
fn proptest_model() {
    let _s = serial();
    if common::mm().is_none() {
        return;
    }
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        // A failure shrinks for at most 5 s (each step reruns a case).
        max_shrink_time: 5000,
        ..ProptestConfig::default()
    });
    // A fresh address-space handle per case: cases (and shrinking) are
    // independent of one another.
    let result = runner.run(&proptest::collection::vec(op(), 1..30), |ops| {
        let mm = Mm::new().unwrap();
        // One page per CPU fault: device, exclusive and system pages stay
        // mixed after CPU accesses.
        mm.set_fault_block(PAGE_SIZE).unwrap();
        run_model(&mm, &ops)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
