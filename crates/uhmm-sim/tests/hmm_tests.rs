//! The kernel's `hmm-tests` (tools/testing/selftests/mm/hmm-tests.c), mirror
//! half, ported to SimDevice: same setup, same asserted values and counts,
//! one test per kernel test and named after it. `N` is 1024 pages (the
//! kernel's 4 MiB `HMM_BUFFER_SIZE`); buffers hold `i32` indices, as the
//! kernel fills `ptr[i] = i`.
//!
//! Every test takes one lock, as the kernel runs its tests one after the
//! other: a fork notifies every address space of the process, which would
//! add fault rounds to a test running beside it.
#![allow(unsafe_code)]

#[path = "../../uhmm/tests/common/mod.rs"]
mod common;

use common::{ChildEnd, serial};
use rustix::io::Errno;
use std::os::fd::{AsFd, OwnedFd};
use uhmm::mm::{ManagedRegion, Mm};
use uhmm::sys::mem::{Advice, Backing, Mapping, Prot};
use uhmm::{PAGE_SIZE, PageRange, VirtAddr};
use uhmm_sim::{SimDevice, SimError, prot};

const N: usize = 1024;
const SIZE: usize = N * PAGE_SIZE;
const TWOMEG: usize = 2 << 20;
const NTIMES: i32 = 10;

/// `len` bytes holding `f(i)` as the `i`-th `i32`.
fn ints(len: usize, f: impl Fn(i32) -> i32) -> Vec<u8> {
    (0..(len / 4) as i32)
        .flat_map(|i| f(i).to_ne_bytes())
        .collect()
}

fn as_ints(bytes: &[u8]) -> Vec<i32> {
    bytes
        .chunks_exact(4)
        .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn contents(region: &ManagedRegion) -> Vec<i32> {
    let mut b = vec![0u8; region.range().len()];
    region.read_at(0, &mut b).unwrap();
    as_ints(&b)
}

/// Whether `v[i] == f(i)` for every `i`.
fn holds(v: &[i32], f: impl Fn(i32) -> i32) -> bool {
    v.iter().enumerate().all(|(i, &x)| x == f(i as i32))
}

/// The body of the kernel's write tests: a new device writes `i` over the
/// whole region in one fault round (cpages == npages, faults == 1), and the
/// CPU then reads `i`.
fn device_writes_indices_in_one_round(mm: &Mm, region: &ManagedRegion) {
    let dev = SimDevice::new(mm);
    let res = dev
        .write(start(region), &ints(region.range().len(), |i| i))
        .unwrap();
    assert_eq!(
        (res.cpages, res.faults),
        (region.range().npages() as u64, 1)
    );
    assert!(holds(&contents(region), |i| i));
}

fn fill(region: &ManagedRegion, f: impl Fn(i32) -> i32) {
    region.write_at(0, &ints(region.range().len(), f)).unwrap();
}

fn start(region: &ManagedRegion) -> VirtAddr {
    region.range().start()
}

/// Runs `checks` in a forked child and returns how the child ended; the
/// child reports a failed check on stderr and exits 1. The child may
/// allocate and start threads: every test here holds `serial()`, so no
/// other test thread holds a lock at the fork.
fn in_child(checks: impl FnOnce() -> Result<(), String>) -> ChildEnd {
    common::fork_and_wait(|| match checks() {
        Ok(()) => 0,
        Err(e) => {
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                format!("child: {e}\n").as_bytes(),
            );
            1
        }
    })
}

fn ensure(cond: bool, what: &str) -> Result<(), String> {
    if cond { Ok(()) } else { Err(what.to_owned()) }
}

/// An O_TMPFILE on tmpfs (`/dev/shm`), `len` bytes long. The kernel test
/// uses /tmp; uhmm manages shared file memory on tmpfs (userfaultfd's
/// write-protection covers anonymous, shmem and hugetlb memory only).
fn tmpfile(len: usize) -> Option<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    match rustix::fs::open(
        "/dev/shm",
        OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::from_bits_truncate(0o600),
    ) {
        Ok(fd) => {
            rustix::fs::ftruncate(&fd, len as u64).unwrap();
            Some(fd)
        }
        Err(e) => {
            common::skip(&format!("no O_TMPFILE on /dev/shm: {e}"));
            None
        }
    }
}

/// The whole of file `fd` (`SIZE` bytes) mapped and managed.
fn file_region(mm: &Mm, fd: OwnedFd, shared: bool, prot: Prot) -> ManagedRegion {
    let backing = Backing::File {
        fd,
        offset: 0,
        shared,
    };
    mm.alloc_mapping(Mapping::builder(SIZE).backing(backing).prot(prot))
        .unwrap()
}

#[test]
fn open_close() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let before = mm.notifiers().len();
    let dev = SimDevice::new(&mm);
    assert_eq!(mm.notifiers().len(), before + 1, "open inserts a notifier");
    drop(dev);
    assert_eq!(mm.notifiers().len(), before, "close removes it");
}

#[test]
fn anon_read() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let region = mm.alloc(SIZE, Backing::AnonPrivate).unwrap();
    // Fill with i, but leave pages 0 and 1 untouched.
    let skip = 2 * PAGE_SIZE;
    region.write_at(skip, &ints(SIZE, |i| i)[skip..]).unwrap();
    mm.mprotect(region.range(), Prot::READ).unwrap();
    // A CPU read maps the zero page at page 1; page 0 stays unmapped.
    assert_eq!(common::touch_read(start(&region).get() + PAGE_SIZE), 0);
    let dev = SimDevice::new(&mm);
    let (data, res) = dev.read(start(&region), N).unwrap();
    assert_eq!((res.cpages, res.faults), (N as u64, 1));
    let got = as_ints(&data);
    let per_page = PAGE_SIZE / 4;
    assert!(got[..2 * per_page].iter().all(|&v| v == 0));
    assert!((2 * per_page..got.len()).all(|i| got[i] == i as i32));
}

#[test]
fn anon_read_prot() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let region = mm.alloc(SIZE, Backing::AnonPrivate).unwrap();
    fill(&region, |i| i);
    let mut mirror = ints(SIZE, |i| -i);
    mm.mprotect(region.range(), Prot::empty()).unwrap();
    let dev = SimDevice::new(&mm);
    let e = dev.read_into(start(&region), &mut mirror).unwrap_err();
    assert_eq!(e.errno(), Errno::FAULT, "{e}");
    mm.mprotect(region.range(), Prot::READ).unwrap();
    let cpu = contents(&region);
    assert!(holds(&cpu, |i| i));
    let m = as_ints(&mirror);
    assert!(holds(&m, |i| -i), "the mirror is untouched");
}

#[test]
fn anon_write() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let region = mm.alloc(SIZE, Backing::AnonPrivate).unwrap();
    device_writes_indices_in_one_round(&mm, &region);
}

#[test]
fn anon_write_prot() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let region = mm
        .alloc_mapping(Mapping::builder(SIZE).prot(Prot::READ))
        .unwrap();
    let dev = SimDevice::new(&mm);
    let (_, res) = dev.read(start(&region), 1).unwrap();
    assert_eq!((res.cpages, res.faults), (1, 1));
    let e = dev.write(start(&region), &ints(SIZE, |i| i)).unwrap_err();
    assert_eq!(e.errno(), Errno::PERM, "{e}");
    assert!(contents(&region).iter().all(|&v| v == 0), "nothing written");
    mm.mprotect(region.range(), Prot::READ | Prot::WRITE)
        .unwrap();
    let res = dev.write(start(&region), &ints(SIZE, |i| i)).unwrap();
    assert_eq!((res.cpages, res.faults), (N as u64, 1));
    let cpu = contents(&region);
    assert!(holds(&cpu, |i| i));
}

/// `anon_write_child`: with and without migration to the device before the
/// fork, with and without THP. The child gets the parent's data, device
/// pages included, and never needs the parent's fault service.
#[test]
fn anon_write_child() {
    let _s = serial();
    let _f = common::fork_lock();
    let Some(mm) = common::mm() else { return };
    for (migrate, use_thp) in [(false, false), (false, true), (true, false), (true, true)] {
        let region = if use_thp {
            let r = mm
                .alloc_mapping(Mapping::builder(TWOMEG).align(TWOMEG))
                .unwrap();
            let map = r.mapping().unwrap();
            map.advise(map.range(), Advice::HugePage).unwrap();
            r
        } else {
            mm.alloc(SIZE, Backing::AnonPrivate).unwrap()
        };
        let range = region.range();
        let npages = range.npages();
        fill(&region, |i| i);
        let mirror = ints(range.len(), |i| -i);
        let dev = SimDevice::new(&mm);
        if migrate {
            let (_, res) = dev.migrate_to_device(range.start(), npages).unwrap();
            assert_eq!(res.cpages, npages as u64);
        } else {
            dev.read(range.start(), npages).unwrap();
        }
        assert_eq!(dev.mirrored_pages(), npages);

        let child = in_child(|| {
            let cpu = contents(&region);
            ensure(holds(&cpu, |i| i), "child sees i")?;
            // The child mirrors its own address space with its own device.
            let mm = Mm::new().map_err(|e| e.to_string())?;
            // SAFETY: the child's copy of the region; nothing refers into it.
            let mine = unsafe { mm.manage(range) }.map_err(|e| e.to_string())?;
            let dev = SimDevice::new(&mm);
            let res = dev
                .write(range.start(), &mirror)
                .map_err(|e| e.to_string())?;
            ensure(res.cpages == npages as u64, "child cpages == N")?;
            ensure(res.faults == 1, "child faults == 1")?;
            if !migrate {
                let cpu = contents(&region);
                ensure(holds(&cpu, |i| -i), "child buffer is -i")?;
            }
            drop(mine);
            Ok(())
        });
        assert_eq!(
            child,
            ChildEnd::Exited(0),
            "migrate: {migrate}, thp: {use_thp}"
        );
        // The fork invalidated the parent's mirror (private pages became
        // copy-on-write), and the child's writes stayed in the child.
        assert_eq!(dev.mirrored_pages(), 0, "fork is an invalidation");
        let cpu = contents(&region);
        assert!(holds(&cpu, |i| i), "parent still i");
    }
}

#[test]
fn anon_write_child_shared() {
    let _s = serial();
    let _f = common::fork_lock();
    let Some(mm) = common::mm() else { return };
    let region = mm.alloc(SIZE, Backing::AnonShared).unwrap();
    let range = region.range();
    fill(&region, |i| i);
    let mirror = ints(SIZE, |i| -i);
    let child = in_child(|| {
        let cpu = contents(&region);
        ensure(holds(&cpu, |i| i), "child sees i")?;
        let mm = Mm::new().map_err(|e| e.to_string())?;
        // SAFETY: the shared region; nothing refers into it.
        let mine = unsafe { mm.manage(range) }.map_err(|e| e.to_string())?;
        let dev = SimDevice::new(&mm);
        let res = dev
            .write(range.start(), &mirror)
            .map_err(|e| e.to_string())?;
        ensure(
            res.cpages == N as u64 && res.faults == 1,
            "child cpages == N, faults == 1",
        )?;
        let cpu = contents(&region);
        ensure(holds(&cpu, |i| -i), "child buffer is -i")?;
        drop(mine);
        Ok(())
    });
    assert_eq!(child, ChildEnd::Exited(0));
    let cpu = contents(&region);
    assert!(
        holds(&cpu, |i| -i),
        "shared memory: the parent sees the child's device write"
    );
}

#[test]
fn anon_write_huge() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let region = mm
        .alloc_mapping(Mapping::builder(TWOMEG).align(TWOMEG))
        .unwrap();
    let map = region.mapping().unwrap();
    map.advise(map.range(), Advice::HugePage).unwrap();
    device_writes_indices_in_one_round(&mm, &region);
}

#[test]
fn anon_write_hugetlbfs() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let Some(region) = common::hugetlb_region(&mm) else {
        return;
    };
    device_writes_indices_in_one_round(&mm, &region);
}

#[test]
fn file_read() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let Some(fd) = tmpfile(SIZE) else { return };
    let data = ints(SIZE, |i| i);
    assert_eq!(rustix::io::pwrite(&fd, &data, 0).unwrap(), SIZE);
    let region = file_region(&mm, fd, true, Prot::READ);
    let dev = SimDevice::new(&mm);
    let (mirror, res) = dev.read(start(&region), N).unwrap();
    assert_eq!((res.cpages, res.faults), (N as u64, 1));
    assert!(mirror == data);
}

#[test]
fn file_write() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let Some(fd) = tmpfile(SIZE) else { return };
    let region = file_region(&mm, fd, true, Prot::READ | Prot::WRITE);
    device_writes_indices_in_one_round(&mm, &region);
    let data = ints(SIZE, |i| i);
    let mut file = vec![0u8; SIZE];
    let fd = region.mapping().unwrap().fd().unwrap();
    assert_eq!(rustix::io::pread(fd.as_fd(), &mut file, 0).unwrap(), SIZE);
    assert!(file == data, "the device's write reached the file");
}

#[test]
fn anon_read_multiple() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let dev = SimDevice::new(&mm);
    for c in 0..NTIMES {
        let region = mm.alloc(SIZE, Backing::AnonPrivate).unwrap();
        fill(&region, |i| i + c);
        let (data, res) = dev.read(start(&region), N).unwrap();
        assert_eq!((res.cpages, res.faults), (N as u64, 1), "round {c}");
        let got = as_ints(&data);
        assert!(holds(&got, |i| i + c), "round {c}");
    }
}

/// The kernel maps the dmirror fd itself (pages put in with
/// `vm_insert_page`); SimDevice's `mmap` makes the userspace analogue, a
/// private mapping of device-provided pages that are present but read-only,
/// which uhmm does not manage.
#[test]
fn mixedmap() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let dev = SimDevice::new(&mm);
    let map = dev.mmap(1).unwrap();
    assert!(!mm.is_managed(map.range()));
    let (m, res) = dev.snapshot(map.range().start(), 1).unwrap();
    assert_eq!(res.cpages, 1);
    assert_eq!(m[0], prot::READ);
}

#[test]
fn compound() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let Some(region) = common::hugetlb_region(&mm) else {
        return;
    };
    let npages = TWOMEG / PAGE_SIZE;
    fill(&region, |i| i);
    let dev = SimDevice::new(&mm);
    let (m, res) = dev.snapshot(start(&region), npages).unwrap();
    assert_eq!(res.cpages, npages as u64);
    let level = m[0] & (prot::PMD | prot::PUD);
    assert!(level == prot::PMD || level == prot::PUD, "{:#x}", m[0]);
    assert!(m.iter().all(|&b| b == prot::WRITE | level));
    mm.mprotect(region.range(), Prot::READ).unwrap();
    let (m, res) = dev.snapshot(start(&region), npages).unwrap();
    assert_eq!(res.cpages, npages as u64);
    assert!(m.iter().all(|&b| b == prot::READ | level));
}

// ---- Beyond the kernel list: the mirror-coherence tests. ----

/// Two devices mirror the same memory; each invalidation reaches both, and
/// a device's write is seen by the other.
#[test]
fn two_devices_mirror_the_same_memory() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let region = mm.alloc(SIZE, Backing::AnonPrivate).unwrap();
    let (a, b) = (SimDevice::new(&mm), SimDevice::new(&mm));
    assert_ne!(a.owner(), b.owner());
    let res = a.write(start(&region), &ints(SIZE, |i| i)).unwrap();
    assert_eq!((res.cpages, res.faults), (N as u64, 1));
    let (data, res) = b.read(start(&region), N).unwrap();
    assert_eq!((res.cpages, res.faults), (N as u64, 1));
    assert!(holds(&as_ints(&data), |i| i));
    // A discard of the first half reaches both mirrors.
    let map = region.mapping().unwrap();
    map.advise(map.sub(0, SIZE / 2).unwrap(), Advice::DontNeed)
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while a.mirrored_pages() > N / 2 || b.mirrored_pages() > N / 2 {
        assert!(std::time::Instant::now() < deadline, "discard not seen");
        std::thread::yield_now();
    }
    assert_eq!((a.mirrored_pages(), b.mirrored_pages()), (N / 2, N / 2));
    let (data, res) = b.read(start(&region), N).unwrap();
    assert_eq!(res.faults, 1, "the discarded half is faulted back");
    let got = as_ints(&data);
    assert!(got[..got.len() / 2].iter().all(|&v| v == 0));
    assert!((got.len() / 2..got.len()).all(|i| got[i] == i as i32));
}

/// DESIGN.md invariant 3: a protection change made behind uhmm's back (a
/// plain mprotect, which no event reports) leaves the device a stale
/// translation; using it fails cleanly and re-faults, and the command
/// reports the kernel's error.
#[test]
fn stale_translation_fails_cleanly() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let region = mm.alloc(SIZE, Backing::AnonPrivate).unwrap();
    fill(&region, |i| i);
    let dev = SimDevice::new(&mm);
    dev.write(start(&region), &ints(SIZE, |i| i)).unwrap();
    assert_eq!(dev.mirrored_pages(), N);
    let map = region.mapping().unwrap();
    // Behind uhmm's back: Mapping::protect is a plain mprotect.
    map.protect(map.range(), Prot::empty()).unwrap();
    assert_eq!(dev.mirrored_pages(), N, "nothing told the device");
    let e = dev.read(start(&region), N).unwrap_err();
    assert_eq!(e.errno(), Errno::FAULT, "{e}");
    map.protect(map.range(), Prot::READ).unwrap();
    let (data, res) = dev.read(start(&region), N).unwrap();
    assert_eq!(res.cpages, N as u64);
    assert!(holds(&as_ints(&data), |i| i));

    // A write through writable translations made stale by a change to
    // read-only behind uhmm's back: the access fails, and nothing is
    // written.
    map.protect(map.range(), Prot::READ | Prot::WRITE).unwrap();
    dev.write(start(&region), &ints(SIZE, |i| i)).unwrap();
    assert_eq!(dev.mirrored_pages(), N);
    map.protect(map.range(), Prot::READ).unwrap();
    let e = dev.write(start(&region), &ints(SIZE, |i| -i)).unwrap_err();
    assert_eq!(e.errno(), Errno::PERM, "{e}");
    let cpu = contents(&region);
    assert!(holds(&cpu, |i| i), "nothing written");
}

/// A device write racing the drop of its region never reaches memory
/// mapped at the same address afterwards: the region leaves the managed set
/// inside its Unmap invalidation, and a device fault checks it under its
/// lock.
#[test]
fn device_write_never_outlives_its_region() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let dev = std::sync::Arc::new(SimDevice::new(&mm));
    let len = 256 * PAGE_SIZE;
    let mut reused = 0;
    for _ in 0..200 {
        let region = mm.alloc(len, Backing::AnonPrivate).unwrap();
        let range = region.range();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (d, st) = (dev.clone(), stop.clone());
        let writer = std::thread::spawn(move || {
            let data = vec![0xaau8; len];
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                match d.write(range.start(), &data) {
                    Ok(_) | Err(SimError::NotManaged { .. } | SimError::Fault { .. }) => {}
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
        });
        std::thread::sleep(std::time::Duration::from_micros(200));
        drop(region);
        // New memory at the same address, filled by the CPU.
        // SAFETY: maps only where nothing is mapped (NOREPLACE).
        let fresh = unsafe {
            rustix::mm::mmap_anonymous(
                range.start().as_mut_ptr(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::FIXED_NOREPLACE,
            )
        };
        if let Ok(p) = fresh {
            reused += 1;
            // SAFETY: our new mapping, `len` bytes.
            unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0x55, len) };
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        common::join_soon(writer);
        if let Ok(p) = fresh {
            // SAFETY: our new mapping; nothing else refers into it.
            let bytes = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) };
            assert!(
                bytes.iter().all(|&b| b == 0x55),
                "a device write outlived its region"
            );
            // SAFETY: unmaps our new mapping.
            unsafe { rustix::mm::munmap(p, len) }.unwrap();
        }
    }
    assert!(
        reused > 100,
        "the address was reused in only {reused} rounds"
    );
}

/// A device read racing a munmap of the same range returns either the
/// right data or a clean error, never other memory and never a crash.
#[test]
fn device_read_races_munmap() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let dev = std::sync::Arc::new(SimDevice::new(&mm));
    let pages = 64;
    let (mut ok, mut failed) = (0, 0);
    for round in 0..40u8 {
        let expect = common::pattern(round, pages * PAGE_SIZE);
        let map = Mapping::anon(pages * PAGE_SIZE).unwrap();
        map.write_at(0, &expect).unwrap();
        // The munmap below is the mapping's end: it must not be unmapped
        // again later (its address may be reused by then).
        let range = map.leak();
        // SAFETY: nothing refers into the leaked mapping.
        let region = unsafe { mm.manage(range) }.unwrap();
        let go = std::sync::Arc::new(std::sync::Barrier::new(2));
        let (d, g, e) = (dev.clone(), go.clone(), expect.clone());
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; e.len()];
            let mut outcomes = Vec::with_capacity(4096);
            g.wait();
            loop {
                match d.read_into(range.start(), &mut buf) {
                    Ok(_) => {
                        assert!(buf == e, "a read that succeeds returns the right data");
                        outcomes.push(true);
                    }
                    Err(SimError::Fault { .. } | SimError::NotManaged { .. }) => {
                        outcomes.push(false);
                        return outcomes;
                    }
                    Err(other) => panic!("unclean error: {other}"),
                }
                if outcomes.len() == outcomes.capacity() {
                    return outcomes;
                }
            }
        });
        go.wait();
        // Let some reads through, then unmap under them.
        std::thread::sleep(std::time::Duration::from_micros(50 * u64::from(round % 8)));
        // SAFETY: the leaked mapping is this test's; the reader only reads
        // it through the device's fault-tolerant accessor.
        unsafe { rustix::mm::munmap(range.start().as_mut_ptr(), range.len()) }.unwrap();
        let outcomes = common::join_soon(reader);
        ok += outcomes.iter().filter(|&&o| o).count();
        failed += outcomes.iter().filter(|&&o| !o).count();
        drop(region);
        // After the munmap, a read fails cleanly.
        let e = dev.read(range.start(), pages).unwrap_err();
        assert!(matches!(e.errno(), Errno::FAULT | Errno::INVAL), "{e}");
    }
    assert!(
        ok > 0 && failed > 0,
        "both outcomes exercised: {ok} ok, {failed} failed"
    );
}

#[test]
fn bad_commands_are_typed_errors_and_change_nothing() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let region = mm.alloc(4 * PAGE_SIZE, Backing::AnonPrivate).unwrap();
    fill(&region, |i| i);
    let before = contents(&region);
    let dev = SimDevice::new(&mm);
    let base = start(&region);
    let inval = |r: Result<_, SimError>| match r {
        Err(e) => assert_eq!(e.errno(), Errno::INVAL, "{e}"),
        Ok(_) => panic!("accepted"),
    };
    // Unaligned, zero length, overflowing, partial pages.
    inval(dev.read(VirtAddr::new(base.get() + 1), 1).map(|_| ()));
    inval(dev.read(base, 0).map(|_| ()));
    inval(dev.snapshot(base, usize::MAX / 2).map(|_| ()));
    inval(dev.write(base, &[1u8; 100]).map(|_| ()));
    inval(dev.write(base, &[]).map(|_| ()));
    // Partly managed: the region plus the page after it.
    let beyond = PageRange::new(base, 5 * PAGE_SIZE).unwrap();
    match dev.write(base, &vec![9u8; beyond.len()]) {
        Err(SimError::NotManaged { range }) => assert_eq!(range, beyond),
        other => panic!("{other:?}"),
    }
    // Not managed at all.
    let plain = Mapping::anon(PAGE_SIZE).unwrap();
    inval(dev.read(plain.range().start(), 1).map(|_| ()));
    // Read-only and PROT_NONE memory.
    mm.mprotect(region.range(), Prot::READ).unwrap();
    let e = dev.write(base, &vec![9u8; 4 * PAGE_SIZE]).unwrap_err();
    assert!(matches!(e, SimError::PermissionDenied { .. }), "{e}");
    mm.mprotect(region.range(), Prot::empty()).unwrap();
    let e = dev.read(base, 4).unwrap_err();
    assert!(matches!(e, SimError::Fault { .. }), "{e}");
    mm.mprotect(region.range(), Prot::READ).unwrap();
    assert_eq!(contents(&region), before, "memory is as it was");
    assert_eq!(dev.stats().pages_copied, 0);
}

// ---------------------------------------------------------------------
// Migration half: device memory, migration, CPU fault-back, exclusive.
// ---------------------------------------------------------------------

/// CPU reads of every `i32` of the region through a plain pointer (the
/// program's view: device-resident pages fault back transparently).
fn cpu_ints(region: &ManagedRegion) -> Vec<i32> {
    let n = region.range().len() / 4;
    let p = region.as_ptr() as *const i32;
    // SAFETY: the region is mapped and readable for its whole length, and
    // the test holds no reference into it.
    (0..n)
        .map(|i| unsafe { p.add(i).read_volatile() })
        .collect()
}

fn cpu_int(region: &ManagedRegion, i: usize) -> i32 {
    // SAFETY: as in `cpu_ints`, for one index inside the region.
    unsafe { (region.as_ptr() as *const i32).add(i).read_volatile() }
}

/// The device migrates `npages` of the region to its memory; every page
/// gets there (cpages == npages) and reads back `i` through the device.
fn migrates_holding_indices(dev: &SimDevice, region: &ManagedRegion, npages: usize) {
    let (data, res) = dev.migrate_to_device(start(region), npages).unwrap();
    assert_eq!(res.cpages, npages as u64);
    assert!(holds(&as_ints(&data), |i| i));
}

fn anon(mm: &Mm, len: usize) -> ManagedRegion {
    mm.alloc(len, Backing::AnonPrivate).unwrap()
}

#[test]
fn migrate() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let region = anon(&mm, SIZE);
    fill(&region, |i| i);
    let dev = SimDevice::new(&mm);
    migrates_holding_indices(&dev, &region, N);
    assert_eq!(dev.device_pages(), N);
    assert!(matches!(
        mm.page_state(start(&region)).unwrap(),
        uhmm::mm::PageState::Device { .. }
    ));
    // The CPU touches it through a plain pointer: it comes back.
    assert!(holds(&cpu_ints(&region), |i| i));
    assert_eq!(dev.device_pages(), 0);
}

#[test]
fn migrate_file_private() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let Some(fd) = tmpfile(SIZE) else { return };
    let region = file_region(&mm, fd, false, Prot::READ | Prot::WRITE);
    // The CPU fills it: copy-on-write anonymous pages in a file mapping.
    fill(&region, |i| i);
    let dev = SimDevice::new(&mm);
    migrates_holding_indices(&dev, &region, N);
    // Beyond the kernel test: the CPU gets them back, not the file's zeros.
    assert!(holds(&cpu_ints(&region), |i| i));
}

#[test]
fn migrate_fault() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let region = anon(&mm, SIZE);
    fill(&region, |i| i);
    let dev = SimDevice::new(&mm);
    migrates_holding_indices(&dev, &region, N);
    // The CPU reads the first half: it faults back.
    let half = SIZE / 8;
    for i in 0..half {
        assert_eq!(cpu_int(&region, i), i as i32);
    }
    // Migrate again: a mix of system pages and the device's own pages.
    migrates_holding_indices(&dev, &region, N);
}

/// Beyond the kernel tests: a sequential CPU scan of device-resident
/// memory reads ahead at every fault block, 4 KiB included — a window that
/// doubles with each fault of the scan — so it takes far fewer faults than
/// pages; a touch that is not sequential brings back its block only.
#[test]
fn a_sequential_scan_reads_ahead_at_every_fault_block() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    for block in [PAGE_SIZE, 16 * PAGE_SIZE] {
        mm.set_fault_block(block).unwrap();
        let region = anon(&mm, SIZE);
        fill(&region, |i| i);
        let dev = SimDevice::new(&mm);
        migrates_holding_indices(&dev, &region, N);
        // Scattered touches, none right after the last: one block each.
        let per_page = PAGE_SIZE / 4;
        let blocks = N / (block / PAGE_SIZE);
        for (k, b) in [blocks / 2, blocks / 8, blocks - 1].into_iter().enumerate() {
            let i = b * (block / PAGE_SIZE) * per_page;
            assert_eq!(cpu_int(&region, i), i as i32);
            assert_eq!(
                dev.device_pages(),
                N - (k + 1) * (block / PAGE_SIZE),
                "a touch that is not sequential brings back its block, {block} B blocks"
            );
        }
        // A scan from the start: every value right, few faults.
        let before = mm.stats().faults_device;
        for i in 0..N * per_page {
            assert_eq!(cpu_int(&region, i), i as i32);
        }
        let faults = mm.stats().faults_device - before;
        assert!(
            faults <= (blocks as u64 / 8).max(16),
            "{faults} faults for a sequential scan of {N} pages in {blocks} blocks of {block} B"
        );
        assert_eq!(dev.device_pages(), 0);
    }
}

/// Beyond the kernel tests: a device whose memory the CPU can read
/// (`set_cpu_visible_memory`) takes pages through its copy engine and
/// gives them back by one kernel copy, without the engine: an engine that
/// fails its next call fails no fault back and no migration back.
#[test]
fn cpu_visible_device_memory_comes_back_without_the_engine() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    mm.set_fault_block(PAGE_SIZE).unwrap();
    let region = anon(&mm, SIZE);
    fill(&region, |i| i);
    let dev = SimDevice::new(&mm);
    let engine = std::sync::Arc::new(uhmm::devmem::copy::FailingEngine::new(
        uhmm::devmem::copy::CpuCopyEngine::new(),
    ));
    dev.set_copy_engine(engine.clone());
    dev.set_cpu_visible_memory(true);
    migrates_holding_indices(&dev, &region, N);
    engine.fail_after(0);
    // Page 3 by a CPU fault, the rest by a migration back.
    let per_page = PAGE_SIZE / 4;
    assert_eq!(cpu_int(&region, 3 * per_page), (3 * per_page) as i32);
    assert_eq!(dev.device_pages(), N - 1);
    let res = dev.migrate_to_system(start(&region), N).unwrap();
    assert_eq!(res.cpages, N as u64 - 1);
    assert_eq!(engine.failures(), 0, "the way back never used the engine");
    assert!(holds(&cpu_ints(&region), |i| i));
}

#[test]
fn migrate_release() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let region = anon(&mm, SIZE);
    fill(&region, |i| i);
    let dev = SimDevice::new(&mm);
    migrates_holding_indices(&dev, &region, N);
    dev.release().unwrap();
    assert_eq!(dev.device_pages(), 0, "release evicts every page");
    let faults = mm.stats().faults;
    for i in 0..SIZE / 8 {
        assert_eq!(cpu_int(&region, i), i as i32);
    }
    assert_eq!(mm.stats().faults, faults, "the pages were home already");
}

#[test]
fn migrate_shared() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let region = mm.alloc(SIZE, Backing::AnonShared).unwrap();
    let dev = SimDevice::new(&mm);
    let e = dev.migrate_to_device(start(&region), N).unwrap_err();
    assert_eq!(e.errno(), Errno::NOENT, "{e}");
}

#[test]
fn migrate_multiple() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let dev = SimDevice::new(&mm);
    for _ in 0..NTIMES {
        let region = anon(&mm, SIZE);
        fill(&region, |i| i);
        migrates_holding_indices(&dev, &region, N);
        assert!(holds(&cpu_ints(&region), |i| i));
    }
}

#[test]
fn exclusive() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let region = anon(&mm, SIZE);
    fill(&region, |i| i);
    let dev = SimDevice::new(&mm);
    let (data, res) = dev.exclusive(start(&region), N).unwrap();
    assert_eq!(res.cpages, N as u64);
    assert!(holds(&as_ints(&data), |i| i));
    // The CPU increments every entry: it sees i, then i + 1.
    let p = region.as_ptr() as *mut i32;
    for i in 0..SIZE / 4 {
        // SAFETY: inside the mapped, writable region; no reference into it.
        unsafe {
            let v = p.add(i).read_volatile();
            assert_eq!(v, i as i32);
            p.add(i).write_volatile(v + 1);
            assert_eq!(p.add(i).read_volatile(), i as i32 + 1);
        }
    }
    // The CPU's access revoked the device's exclusive access.
    dev.check_exclusive(start(&region), N).unwrap();
}

#[test]
fn exclusive_mprotect() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let region = anon(&mm, SIZE);
    fill(&region, |i| i);
    let dev = SimDevice::new(&mm);
    let (data, res) = dev.exclusive(start(&region), N).unwrap();
    assert_eq!(res.cpages, N as u64);
    assert!(holds(&as_ints(&data), |i| i));
    mm.mprotect(region.range(), Prot::READ).unwrap();
    let e = dev.write(start(&region), &ints(SIZE, |i| i)).unwrap_err();
    assert_eq!(e.errno(), Errno::PERM, "{e}");
}

/// A 2 * PMD mapping with its PMD-aligned half advised HUGEPAGE, as the
/// kernel's THP tests make it; returns the region (the aligned half).
fn thp_region(mm: &Mm, prot: Prot) -> ManagedRegion {
    let r = mm
        .alloc_mapping(Mapping::builder(TWOMEG).align(TWOMEG).prot(prot))
        .unwrap();
    let map = r.mapping().unwrap();
    map.advise(map.range(), Advice::HugePage).unwrap();
    r
}

const THP_PAGES: usize = TWOMEG / PAGE_SIZE;

#[test]
fn migrate_anon_huge_empty() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let region = thp_region(&mm, Prot::READ);
    let dev = SimDevice::new(&mm);
    let (data, res) = dev.migrate_to_device(start(&region), THP_PAGES).unwrap();
    assert_eq!(res.cpages, THP_PAGES as u64);
    assert!(data.iter().all(|&b| b == 0));
}

#[test]
fn migrate_anon_huge_zero() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let region = thp_region(&mm, Prot::READ);
    // A CPU read installs the (huge) zero page.
    assert_eq!(cpu_int(&region, 0), 0);
    let dev = SimDevice::new(&mm);
    let (data, res) = dev.migrate_to_device(start(&region), THP_PAGES).unwrap();
    assert_eq!(res.cpages, THP_PAGES as u64);
    assert!(data.iter().all(|&b| b == 0));
    assert!(cpu_ints(&region).iter().all(|&v| v == 0));
}

#[test]
fn migrate_anon_huge_free() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let region = thp_region(&mm, Prot::READ | Prot::WRITE);
    fill(&region, |i| i);
    let dev = SimDevice::new(&mm);
    migrates_holding_indices(&dev, &region, THP_PAGES);
    // SAFETY: MADV_FREE of the managed region; no reference into it.
    unsafe {
        rustix::mm::madvise(
            region.as_ptr().cast(),
            TWOMEG,
            rustix::mm::Advice::LinuxFree,
        )
    }
    .unwrap();
}

#[test]
fn migrate_anon_huge_fault() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let region = thp_region(&mm, Prot::READ | Prot::WRITE);
    fill(&region, |i| i);
    // MADV_COLLAPSE (25) makes it one THP.
    // SAFETY: collapsing keeps contents; no reference into the region.
    let rc = unsafe { libc::madvise(region.as_ptr().cast(), TWOMEG, 25) };
    assert_eq!(rc, 0, "MADV_COLLAPSE");
    let dev = SimDevice::new(&mm);
    migrates_holding_indices(&dev, &region, THP_PAGES);
    // The THP went to the device as one 2 MiB device page: the snapshot
    // sees device-private pages of this device, writable, at PMD order
    // (the kernel's 0x26).
    assert_eq!(dev.memory_stats().huge_pages, 1);
    let (snap, res) = dev.snapshot(start(&region), THP_PAGES).unwrap();
    assert_eq!(res.cpages, THP_PAGES as u64);
    assert!(
        snap.iter()
            .all(|&b| b == prot::DEV_PRIVATE_LOCAL | prot::WRITE | prot::PMD),
        "{:#x}",
        snap[0]
    );
    // The CPU page table has none of them present.
    let mut present = Vec::new();
    uhmm::sys::pagemap::Pagemap::open()
        .unwrap()
        .scan(
            region.range(),
            &uhmm::sys::pagemap::ScanQuery::new().require(uhmm::sys::pagemap::Categories::PRESENT),
            &mut present,
        )
        .unwrap();
    assert!(present.is_empty());
    assert!(holds(&cpu_ints(&region), |i| i));
}

/// MADV_COLLAPSE (25): makes the 2 MiB region one THP.
fn collapse(region: &ManagedRegion) {
    // SAFETY: collapsing keeps contents; no reference into the region.
    let rc = unsafe { libc::madvise(region.as_ptr().cast(), TWOMEG, 25) };
    assert_eq!(rc, 0, "MADV_COLLAPSE");
}

/// Whether the 2 MiB at `at` are mapped by a PMD (a THP) in the CPU page
/// table.
fn is_thp(at: VirtAddr) -> bool {
    use uhmm::sys::pagemap::{Categories, Pagemap, ScanQuery};
    let mut found = Vec::new();
    Pagemap::open()
        .unwrap()
        .scan(
            PageRange::new(at, TWOMEG).unwrap(),
            &ScanQuery::new()
                .require(Categories::PRESENT)
                .report(Categories::HUGE),
            &mut found,
        )
        .unwrap();
    found.len() == 1
        && found[0].range.len() == TWOMEG
        && found[0].categories.contains(Categories::HUGE)
}

/// Beyond the kernel tests: a 2 MiB device page comes back whole, as one
/// unit, on a CPU touch of any of its pages — as a THP again.
#[test]
fn a_2m_device_page_comes_back_whole_on_a_cpu_touch() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    mm.set_fault_block(PAGE_SIZE).unwrap();
    let region = thp_region(&mm, Prot::READ | Prot::WRITE);
    fill(&region, |i| i);
    collapse(&region);
    assert!(is_thp(start(&region)), "MADV_COLLAPSE made a THP");
    let dev = SimDevice::new(&mm);
    migrates_holding_indices(&dev, &region, THP_PAGES);
    assert_eq!(dev.memory_stats().huge_pages, 1);
    // One page touched, with a 4 KiB fault block: all 512 come back.
    let i = 300 * (PAGE_SIZE / 4);
    assert_eq!(cpu_int(&region, i), i as i32);
    assert_eq!(
        dev.device_pages(),
        0,
        "the 2 MiB device page came back whole"
    );
    assert_eq!(dev.memory_stats().huge_pages, 0);
    assert!(is_thp(start(&region)), "it is a THP again");
    assert!(holds(&cpu_ints(&region), |i| i));
    // And the block it left is whole for the next one; eviction brings it
    // back whole too.
    migrates_holding_indices(&dev, &region, THP_PAGES);
    assert_eq!(dev.memory_stats().huge_pages, 1);
    dev.release().unwrap();
    assert_eq!(dev.device_pages(), 0);
    assert!(is_thp(start(&region)), "evicted as a THP");
    assert!(holds(&cpu_ints(&region), |i| i));
}

/// Beyond the kernel tests: with a device that copies into memory of its
/// own, a THP also goes to a 2 MiB device page and comes back as a THP
/// (its block filled in a THP in staging and moved into place whole) —
/// also after 4 KiB pages passed through staging, leaving a block with a
/// page table, where a THP moved in would be split. Before, the block came
/// back as 512 pages copied into place one by one, and the THP was lost.
#[test]
fn a_thp_on_a_copying_device_comes_back_as_a_thp() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let dev = SimDevice::new(&mm);
    dev.set_copy_engine(std::sync::Arc::new(
        uhmm::devmem::copy::CpuCopyEngine::with_threads(1),
    ));
    // 4 KiB pages through staging: to the device, and back in one block.
    let small = mm
        .alloc_mapping(Mapping::builder(TWOMEG).align(TWOMEG))
        .unwrap();
    let map = small.mapping().unwrap();
    map.advise(map.range(), Advice::NoHugePage).unwrap();
    fill(&small, |i| i);
    migrates_holding_indices(&dev, &small, THP_PAGES);
    assert!(holds(&cpu_ints(&small), |i| i));
    // The THP, there and back, twice.
    let region = thp_region(&mm, Prot::READ | Prot::WRITE);
    fill(&region, |i| i);
    collapse(&region);
    assert!(is_thp(start(&region)), "MADV_COLLAPSE made a THP");
    for round in 0..2 {
        migrates_holding_indices(&dev, &region, THP_PAGES);
        assert_eq!(dev.memory_stats().huge_pages, 1, "round {round}");
        let i = 300 * (PAGE_SIZE / 4);
        assert_eq!(cpu_int(&region, i), i as i32);
        assert_eq!(dev.device_pages(), 0, "round {round}: not back whole");
        assert!(is_thp(start(&region)), "round {round}: not a THP again");
        assert!(holds(&cpu_ints(&region), |i| i));
    }
    assert!(holds(&cpu_ints(&small), |i| i));
}

/// Beyond the kernel tests: a sequential scan's read-ahead never takes a
/// 2 MiB device page in part (which would split it): it takes it whole, or
/// stops before it.
#[test]
fn read_ahead_takes_a_2m_device_page_whole_or_not_at_all() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    mm.set_fault_block(PAGE_SIZE).unwrap();
    let region = mm
        .alloc_mapping(Mapping::builder(2 * TWOMEG).align(TWOMEG))
        .unwrap();
    let map = region.mapping().unwrap();
    let (first, second) = (
        PageRange::new(start(&region), TWOMEG).unwrap(),
        PageRange::new(VirtAddr::new(start(&region).get() + TWOMEG), TWOMEG).unwrap(),
    );
    map.advise(first, Advice::NoHugePage).unwrap();
    map.advise(second, Advice::HugePage).unwrap();
    fill(&region, |i| i);
    // SAFETY: collapsing keeps contents; no reference into the region.
    let rc = unsafe { libc::madvise(second.start().as_mut_ptr(), TWOMEG, 25) };
    assert_eq!(rc, 0, "MADV_COLLAPSE");
    let dev = SimDevice::new(&mm);
    migrates_holding_indices(&dev, &region, 2 * THP_PAGES);
    assert_eq!(
        dev.memory_stats().huge_pages,
        1,
        "the second 2 MiB is one page"
    );
    // A scan of the first 2 MiB, page by page.
    let per_page = PAGE_SIZE / 4;
    for i in 0..THP_PAGES * per_page {
        assert_eq!(cpu_int(&region, i), i as i32);
        let st = dev.memory_stats();
        assert!(
            st.in_use == 0 || (st.huge_pages == 1 && st.in_use >= THP_PAGES),
            "the 2 MiB device page was taken in part: {st:?}"
        );
    }
    assert!(holds(&cpu_ints(&region), |i| i));
}

/// Beyond the kernel tests: unmapping part of a 2 MiB device page splits
/// it (as the kernel splits the folio): the rest is reported at order 0,
/// comes back page by page, and loses nothing.
#[test]
fn a_partial_unmap_splits_a_2m_device_page() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    mm.set_fault_block(PAGE_SIZE).unwrap();
    let region = thp_region(&mm, Prot::READ | Prot::WRITE);
    fill(&region, |i| i);
    collapse(&region);
    let dev = SimDevice::new(&mm);
    migrates_holding_indices(&dev, &region, THP_PAGES);
    assert_eq!(dev.memory_stats().huge_pages, 1);
    // The last page goes.
    let last = VirtAddr::new(start(&region).get() + TWOMEG - PAGE_SIZE);
    // SAFETY: the region's last page, which nothing refers into.
    unsafe { rustix::mm::munmap(last.as_mut_ptr(), PAGE_SIZE) }.unwrap();
    let rest = THP_PAGES - 1;
    let (snap, res) = dev.snapshot(start(&region), rest).unwrap();
    assert_eq!(res.cpages, rest as u64);
    assert!(
        snap.iter()
            .all(|&b| b == prot::DEV_PRIVATE_LOCAL | prot::WRITE),
        "split: order 0 ({:#x})",
        snap[0]
    );
    assert_eq!(dev.memory_stats().huge_pages, 0, "split");
    assert_eq!(dev.device_pages(), rest);
    // A touch brings back its page alone now.
    let per_page = PAGE_SIZE / 4;
    assert_eq!(cpu_int(&region, 5 * per_page), (5 * per_page) as i32);
    assert_eq!(dev.device_pages(), rest - 1);
    // (The last page is gone: read the rest only.)
    assert!((0..rest * per_page).all(|i| cpu_int(&region, i) == i as i32));
}

/// Beyond the kernel tests: pages not from a THP (or a THP whose 2 MiB
/// device page cannot be had: FAIL_ALLOC) go to 4 KiB device pages,
/// reported at order 0.
#[test]
fn without_a_thp_or_a_2m_device_page_pages_go_one_by_one() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let dev = SimDevice::new(&mm);
    for fail in [false, true] {
        let region = thp_region(&mm, Prot::READ | Prot::WRITE);
        if fail {
            fill(&region, |i| i);
            collapse(&region);
            dev.fail_next_alloc();
        } else {
            // 4 KiB pages from the start.
            let map = region.mapping().unwrap();
            map.advise(map.range(), Advice::NoHugePage).unwrap();
            fill(&region, |i| i);
            assert!(!is_thp(start(&region)));
        }
        let before = dev.stats().alloc_fallbacks;
        let (_, res) = dev.migrate_to_device(start(&region), THP_PAGES).unwrap();
        assert_eq!(res.cpages, THP_PAGES as u64);
        if fail {
            assert_eq!(dev.stats().alloc_fallbacks, before + 1);
        }
        assert_eq!(dev.memory_stats().huge_pages, 0, "fail = {fail}");
        let (snap, _) = dev.snapshot(start(&region), THP_PAGES).unwrap();
        assert!(
            snap.iter()
                .all(|&b| b == prot::DEV_PRIVATE_LOCAL | prot::WRITE),
            "order 0 ({:#x}), fail = {fail}",
            snap[0]
        );
        dev.migrate_to_system(start(&region), THP_PAGES).unwrap();
    }
}

#[test]
fn migrate_anon_huge_err() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let region = thp_region(&mm, Prot::READ | Prot::WRITE);
    fill(&region, |i| i);
    let dev = SimDevice::new(&mm);
    dev.fail_next_alloc();
    migrates_holding_indices(&dev, &region, THP_PAGES);
    assert_eq!(
        dev.stats().alloc_fallbacks,
        1,
        "the bulk allocation failed once"
    );
    assert_eq!(cpu_int(&region, 2048), 2048);
    drop(region);

    let region = thp_region(&mm, Prot::READ | Prot::WRITE);
    fill(&region, |i| i);
    migrates_holding_indices(&dev, &region, THP_PAGES);
    dev.fail_next_alloc();
    dev.migrate_to_system(start(&region), THP_PAGES).unwrap();
    assert_eq!(cpu_int(&region, 2048), 2048);
    assert!(holds(&cpu_ints(&region), |i| i));
}

#[test]
fn migrate_anon_huge_zero_err() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let region = thp_region(&mm, Prot::READ);
    let dev = SimDevice::new(&mm);
    dev.fail_next_alloc();
    let (data, res) = dev.migrate_to_device(start(&region), THP_PAGES).unwrap();
    assert_eq!(res.cpages, THP_PAGES as u64);
    assert!(data.iter().all(|&b| b == 0));
    assert_eq!(cpu_int(&region, 2048), 0);
    drop(region);

    let region = thp_region(&mm, Prot::READ);
    assert_eq!(cpu_int(&region, 0), 0);
    dev.fail_next_alloc();
    let (_, res) = dev.migrate_to_device(start(&region), THP_PAGES).unwrap();
    assert_eq!(res.cpages, THP_PAGES as u64);
    assert!(cpu_ints(&region).iter().all(|&v| v == 0));
}

/// Bad migrations: typed errors with dmirror's errno, and memory as it was.
#[test]
fn bad_migrations_are_typed_errors_and_change_nothing() {
    let _s = serial();
    let Some(mm) = common::mm() else { return };
    let dev = SimDevice::new(&mm);
    // Unmanaged memory: EINVAL.
    let plain = Mapping::anon(4 * PAGE_SIZE).unwrap();
    let e = dev.migrate_to_device(plain.range().start(), 4).unwrap_err();
    assert_eq!(e.errno(), Errno::INVAL, "{e}");
    // PROT_NONE: EINVAL, and the data is still there afterwards.
    let region = anon(&mm, 8 * PAGE_SIZE);
    fill(&region, |i| i);
    mm.mprotect(region.range(), Prot::empty()).unwrap();
    let e = dev.migrate_to_device(start(&region), 8).unwrap_err();
    assert_eq!(e.errno(), Errno::INVAL, "{e}");
    mm.mprotect(region.range(), Prot::READ | Prot::WRITE)
        .unwrap();
    assert!(holds(&cpu_ints(&region), |i| i));
    // A range that spans beyond its region (a gap after it): EINVAL.
    let e = dev.migrate_to_device(start(&region), 9).unwrap_err();
    assert_eq!(e.errno(), Errno::INVAL, "{e}");
    // Pages already on another device: not migrated (ENOENT), and they
    // stay where they are.
    let other = SimDevice::new(&mm);
    other.migrate_to_device(start(&region), 8).unwrap();
    let e = dev.migrate_to_device(start(&region), 8).unwrap_err();
    assert_eq!(e.errno(), Errno::NOENT, "{e}");
    assert_eq!(other.device_pages(), 8);
    assert!(holds(&cpu_ints(&region), |i| i));
    // Device memory exhausted: ENOMEM, nothing left half-migrated.
    let small = SimDevice::with_memory(
        &mm,
        uhmm::devmem::PagemapConfig {
            chunk_pages: 4,
            max_chunks: 1,
        },
    )
    .unwrap();
    let e = small.migrate_to_device(start(&region), 8).unwrap_err();
    assert_eq!(e.errno(), Errno::NOMEM, "{e}");
    assert_eq!(small.device_pages(), 0);
    for a in region.range().pages() {
        assert!(
            !matches!(
                mm.page_state(a).unwrap(),
                uhmm::mm::PageState::Device { owner, .. } | uhmm::mm::PageState::Migrating { owner }
                    if owner == small.owner()
            ),
            "nothing of it on the small device"
        );
    }
    assert!(holds(&cpu_ints(&region), |i| i));
    // Exclusive access to shared memory: EINVAL.
    let shared = mm.alloc(4 * PAGE_SIZE, Backing::AnonShared).unwrap();
    let e = dev.exclusive(start(&shared), 4).unwrap_err();
    assert_eq!(e.errno(), Errno::INVAL, "{e}");
}
