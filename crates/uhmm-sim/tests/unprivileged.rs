//! Unprivileged use: an `Mm` whose userfaultfd is user-mode-only (what a
//! process gets without root, read-write access to `/dev/userfaultfd` or
//! `vm.unprivileged_userfaultfd=1`) does what DESIGN.md, "Unprivileged
//! use", says: it reports its mode, the constructor that requires
//! kernel-mode faults refuses with a typed error, CPU loads and stores,
//! migrations, device access and exclusive grabs work, system calls work
//! on never-touched pages of armed regions, and fail with EFAULT exactly
//! on pages not in the CPU page table (on a device, held exclusive, or
//! discarded since the region was armed).
//!
//! `unprivileged_user_gets_user_mode_only` runs the checks as a real
//! unprivileged user: as root (CI) it forks and drops to `nobody` in the
//! child; it never skips.
#![allow(unsafe_code)]

#[path = "../../uhmm/tests/common/mod.rs"]
mod common;

use common::serial;
use rustix::io::Errno;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use uhmm::mm::{Mm, MmError, PageState};
use uhmm::sys::mem::{Advice, Backing};
use uhmm::sys::uffd::{Access, AccessPolicy, OpenError};
use uhmm::{PAGE_SIZE, VirtAddr};
use uhmm_sim::SimDevice;

/// The user the unprivileged checks run as (`nobody`).
const NOBODY: u32 = 65534;

/// Pages of the test region.
const PAGES: usize = 10;

/// Fails the enclosing check with a message.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// The byte at offset `i` of page `p` in the pattern the CPU writes.
fn byte(p: usize, i: usize) -> u8 {
    (i as u8).wrapping_mul(13).wrapping_add(p as u8 * 29) | 1
}

/// The byte at offset `i` of what a pipe delivers into page `p`.
fn piped(p: usize, i: usize) -> u8 {
    byte(p, i) ^ 0xa5
}

fn page_ptr(base: *mut u8, p: usize) -> *mut u8 {
    base.wrapping_add(p * PAGE_SIZE)
}

fn page_addr(base: *mut u8, p: usize) -> VirtAddr {
    VirtAddr::from_ptr(page_ptr(base, p))
}

/// Writes page `p` with its pattern through plain stores.
fn cpu_fill(base: *mut u8, p: usize) {
    for i in 0..PAGE_SIZE {
        // SAFETY: page `p` lies in the test's mapped, writable region, to
        // which no Rust reference points.
        unsafe { page_ptr(base, p).add(i).write_volatile(byte(p, i)) };
    }
}

/// Whether page `p` reads `f(p, i)` through plain loads (the first
/// mismatch otherwise).
fn cpu_check(base: *mut u8, p: usize, f: impl Fn(usize, usize) -> u8) -> Result<(), String> {
    for i in 0..PAGE_SIZE {
        // SAFETY: as for `cpu_fill`.
        let got = unsafe { page_ptr(base, p).add(i).read_volatile() };
        ensure!(
            got == f(p, i),
            "page {p} byte {i} reads {got:#x} through a CPU load, expected {:#x}",
            f(p, i)
        );
    }
    Ok(())
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2");
    // SAFETY: pipe2 returned two new descriptors that nothing else owns.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn errno() -> Errno {
    Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

/// `read(2)` of one page from a pipe into page `p` (the kernel writes it):
/// the errno if the call fails.
fn read_syscall_into(base: *mut u8, p: usize) -> Result<(), Errno> {
    let (rx, tx) = pipe();
    let data: Vec<u8> = (0..PAGE_SIZE).map(|i| piped(p, i)).collect();
    // SAFETY: writes a page from `data` into the pipe (which holds 64 KiB).
    let n = unsafe { libc::write(tx.as_raw_fd(), data.as_ptr().cast(), PAGE_SIZE) };
    assert_eq!(n, PAGE_SIZE as isize, "filling the pipe");
    // SAFETY: page `p` lies in the test's mapped, writable region, to
    // which no Rust reference points.
    let n = unsafe { libc::read(rx.as_raw_fd(), page_ptr(base, p).cast(), PAGE_SIZE) };
    match n {
        n if n == PAGE_SIZE as isize => Ok(()),
        n if n < 0 => Err(errno()),
        _ => Err(Errno::IO),
    }
}

/// `write(2)` of page `p` into a pipe (the kernel reads it): what the pipe
/// received, or the errno if the call fails.
fn write_syscall_from(base: *mut u8, p: usize) -> Result<Vec<u8>, Errno> {
    let (rx, tx) = pipe();
    // SAFETY: page `p` lies in the test's mapped region.
    let n = unsafe { libc::write(tx.as_raw_fd(), page_ptr(base, p).cast(), PAGE_SIZE) };
    if n < 0 {
        return Err(errno());
    }
    let mut buf = vec![0u8; n as usize];
    // SAFETY: reads what the pipe holds into `buf`.
    let m = unsafe { libc::read(rx.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!(m, n, "draining the pipe");
    Ok(buf)
}

/// `process_vm_readv` of page `p` of the own process.
fn vm_read(base: *mut u8, p: usize) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; PAGE_SIZE];
    uhmm::sys::mem::read_process(page_addr(base, p), &mut buf)
        .map(|()| buf)
        .map_err(|e| e.errno)
}

fn is_device(mm: &Mm, base: *mut u8, p: usize) -> bool {
    matches!(
        mm.page_state(page_addr(base, p)),
        Ok(PageState::Device { .. })
    )
}

/// Every check of user-mode-only mode, on `mm` (which must be in it).
fn user_mode_only_checks(mm: &Mm) -> Result<(), String> {
    ensure!(
        mm.access() == Access::UserModeOnly && !mm.access().serves_kernel_faults(),
        "the Mm reports {:?}, not user-mode-only",
        mm.access()
    );
    let region = mm
        .alloc(PAGES * PAGE_SIZE, Backing::AnonPrivate)
        .map_err(|e| format!("alloc: {e}"))?;
    let base = region.as_ptr();
    // Pages 0..4 hold data; 4.. are never touched before the region is
    // armed (by the first migration).
    for p in 0..4 {
        cpu_fill(base, p);
    }
    let dev = SimDevice::new(mm);

    // A migration round trip, with plain CPU loads and stores.
    dev.migrate_to_device(page_addr(base, 0), 4)
        .map_err(|e| format!("migrate to the device: {e}"))?;
    ensure!(
        (0..4).all(|p| is_device(mm, base, p)),
        "pages 0..4 are not on the device after the migration"
    );
    cpu_check(base, 0, byte)?; // a load brings page 0 back
    cpu_fill(base, 1); // a store brings page 1 back (and rewrites it)
    ensure!(
        !is_device(mm, base, 0) && !is_device(mm, base, 1),
        "CPU accesses left pages 0 and 1 on the device"
    );
    dev.migrate_to_system(page_addr(base, 2), 2)
        .map_err(|e| format!("migrate back to system memory: {e}"))?;
    for p in 0..4 {
        cpu_check(base, p, byte)?;
    }

    // System calls on never-touched pages of the (now armed) region work:
    // uhmm mapped them before it registered the region's holes.
    read_syscall_into(base, 4)
        .map_err(|e| format!("read(2) into a never-touched page of an armed region failed: {e}"))?;
    cpu_check(base, 4, piped)?;
    let sent = write_syscall_from(base, 5).map_err(|e| {
        format!("write(2) from a never-touched page of an armed region failed: {e}")
    })?;
    ensure!(
        sent.iter().all(|&b| b == 0),
        "write(2) from a never-touched page sent non-zero bytes"
    );
    let got = vm_read(base, 6).map_err(|e| {
        format!("process_vm_readv of a never-touched page of an armed region failed: {e}")
    })?;
    ensure!(
        got.iter().all(|&b| b == 0),
        "a never-touched page reads non-zero"
    );

    // A device-resident page: system calls fail with EFAULT (the kernel
    // does not tell a user-mode-only userfaultfd of their faults), and the
    // page stays on the device, its data intact.
    dev.migrate_to_device(page_addr(base, 2), 1)
        .map_err(|e| format!("migrate page 2: {e}"))?;
    ensure!(is_device(mm, base, 2), "page 2 is not on the device");
    let r = read_syscall_into(base, 2);
    ensure!(
        r == Err(Errno::FAULT),
        "read(2) into a device-resident page: {r:?}, expected EFAULT"
    );
    let r = write_syscall_from(base, 2).map(|_| ());
    ensure!(
        r == Err(Errno::FAULT),
        "write(2) from a device-resident page: {r:?}, expected EFAULT"
    );
    let r = vm_read(base, 2).map(|_| ());
    ensure!(
        r == Err(Errno::FAULT),
        "process_vm_readv of a device-resident page: {r:?}, expected EFAULT"
    );
    ensure!(is_device(mm, base, 2), "a failed system call moved page 2");
    // A CPU touch brings it back; then system calls work again.
    cpu_check(base, 2, byte)?;
    read_syscall_into(base, 2)
        .map_err(|e| format!("read(2) into page 2 once the CPU brought it back: {e}"))?;
    cpu_check(base, 2, piped)?;

    // A page the program discards after the region was armed is a hole
    // again: EFAULT for system calls until the CPU touches it.
    let map = region.mapping().ok_or("the region has no mapping")?;
    let page7 = uhmm::PageRange::new(page_addr(base, 7), PAGE_SIZE).map_err(|e| e.to_string())?;
    cpu_fill(base, 7);
    map.advise(page7, Advice::DontNeed)
        .map_err(|e| format!("MADV_DONTNEED: {e}"))?;
    let r = read_syscall_into(base, 7);
    ensure!(
        r == Err(Errno::FAULT),
        "read(2) into a page discarded after arming: {r:?}, expected EFAULT"
    );
    cpu_check(base, 7, |_, _| 0)?;
    read_syscall_into(base, 7)
        .map_err(|e| format!("read(2) into page 7 once the CPU touched it: {e}"))?;

    // An exclusive grab takes a device-resident page, and another device
    // reads a page that is on the first one: their fault-ins bring the
    // pages home themselves, as the kernel's faults would.
    let other = SimDevice::new(mm);
    dev.migrate_to_device(page_addr(base, 0), 1)
        .map_err(|e| format!("migrate page 0: {e}"))?;
    let (data, _) = other
        .exclusive(page_addr(base, 0), 1)
        .map_err(|e| format!("an exclusive grab of a device-resident page: {e}"))?;
    ensure!(
        data.iter().enumerate().all(|(i, &b)| b == byte(0, i)),
        "the exclusive grab read wrong data"
    );
    let r = write_syscall_from(base, 0).map(|_| ());
    ensure!(
        r == Err(Errno::FAULT),
        "write(2) from a page held exclusive: {r:?}, expected EFAULT"
    );
    ensure!(
        other.check_exclusive(page_addr(base, 0), 1).is_err(),
        "a failed system call revoked the exclusive hold"
    );
    cpu_check(base, 0, byte)?; // revokes
    other
        .check_exclusive(page_addr(base, 0), 1)
        .map_err(|e| format!("a CPU load did not revoke the exclusive hold: {e}"))?;
    // ...and a page discarded since the region was armed (a hole).
    let page8 = uhmm::PageRange::new(page_addr(base, 8), PAGE_SIZE).map_err(|e| e.to_string())?;
    cpu_fill(base, 8);
    map.advise(page8, Advice::DontNeed)
        .map_err(|e| format!("MADV_DONTNEED: {e}"))?;
    let (data, _) = other
        .exclusive(page_addr(base, 8), 1)
        .map_err(|e| format!("an exclusive grab of a discarded page: {e}"))?;
    ensure!(
        data.iter().all(|&b| b == 0),
        "the exclusive grab of a discarded page read non-zero"
    );
    cpu_check(base, 8, |_, _| 0)?; // revokes
    dev.migrate_to_device(page_addr(base, 3), 1)
        .map_err(|e| format!("migrate page 3: {e}"))?;
    let (data, _) = other
        .read(page_addr(base, 3), 1)
        .map_err(|e| format!("a second device reading a page on the first: {e}"))?;
    ensure!(
        data.iter().enumerate().all(|(i, &b)| b == byte(3, i)),
        "a second device read wrong data from a page on the first"
    );

    // Everything still reads what it should.
    for (p, f) in [(0, byte as fn(usize, usize) -> u8), (1, byte), (3, byte)] {
        cpu_check(base, p, f)?;
    }
    Ok(())
}

/// The checks a process that runs as an unprivileged user makes: its mode
/// is what the machine allows such a user, the constructor that requires
/// kernel-mode faults says what is missing, and user-mode-only mode
/// behaves (forced, where the machine allows this user more).
fn unprivileged_checks() -> Result<(), String> {
    let sysctl = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let node = c"/dev/userfaultfd";
    // SAFETY: a NUL-terminated path.
    let node_ok = unsafe { libc::access(node.as_ptr(), libc::R_OK | libc::W_OK) } == 0;
    let user_only_expected = sysctl == Some(0) && !node_ok;

    let mm = Mm::new().map_err(|e| format!("Mm::new as an unprivileged user: {e}"))?;
    let required = Mm::with_access(AccessPolicy::FullOnly);
    if user_only_expected {
        ensure!(
            mm.access() == Access::UserModeOnly,
            "Mm::new as an unprivileged user (vm.unprivileged_userfaultfd=0, no access to \
             /dev/userfaultfd) reports {:?}, not user-mode-only",
            mm.access()
        );
        match required {
            Err(MmError::Open(e @ OpenError::KernelFaultsUnavailable { .. })) => {
                let text = e.to_string();
                for hint in ["root", "/dev/userfaultfd", "vm.unprivileged_userfaultfd=1"] {
                    ensure!(
                        text.contains(hint),
                        "the error does not say {hint:?}: {text}"
                    );
                }
            }
            Err(e) => return Err(format!("requiring kernel faults failed otherwise: {e}")),
            Ok(m) => {
                return Err(format!(
                    "requiring kernel faults succeeded ({:?}) for an unprivileged user",
                    m.access()
                ));
            }
        }
        user_mode_only_checks(&mm)
    } else {
        // This machine gives unprivileged users kernel-mode faults.
        ensure!(
            mm.access().serves_kernel_faults(),
            "Mm::new reports {:?} where vm.unprivileged_userfaultfd={sysctl:?} and \
             /dev/userfaultfd accessible={node_ok}",
            mm.access()
        );
        ensure!(
            required.is_ok(),
            "requiring kernel faults failed: {:?}",
            required.err()
        );
        drop(mm);
        let forced = Mm::with_access(AccessPolicy::Only(Access::UserModeOnly))
            .map_err(|e| format!("user-mode-only mode: {e}"))?;
        user_mode_only_checks(&forced)
    }
}

/// Drops to `nobody` (supplementary groups first, then the group, then
/// the user) and makes the process dumpable again, so that it can read
/// its own `/proc/self` files as any unprivileged process can.
fn drop_privileges() -> Result<(), String> {
    // SAFETY: plain system calls on the calling (single-threaded) process.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(format!("setgroups(0): {}", errno()));
        }
        if libc::setgid(NOBODY) != 0 {
            return Err(format!("setgid({NOBODY}): {}", errno()));
        }
        if libc::setuid(NOBODY) != 0 {
            return Err(format!("setuid({NOBODY}): {}", errno()));
        }
        if libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) != 0 {
            return Err(format!("PR_SET_DUMPABLE: {}", errno()));
        }
        if libc::geteuid() != NOBODY || libc::getuid() != NOBODY || libc::getegid() != NOBODY {
            return Err("still privileged after setuid".into());
        }
    }
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(str::trim);
    ensure!(
        cap_eff == Some("0000000000000000"),
        "capabilities left after setuid: {cap_eff:?}"
    );
    Ok(())
}

/// The user-mode-only behaviour, in this process, with the mode forced
/// (whatever privilege the test has).
#[test]
fn user_mode_only_behaviour() {
    let _s = serial();
    let mm = match Mm::with_access(AccessPolicy::Only(Access::UserModeOnly)) {
        Ok(mm) => mm,
        Err(e) => return common::skip(&format!("no user-mode-only userfaultfd: {e}")),
    };
    if let Err(e) = user_mode_only_checks(&mm) {
        panic!("{e}");
    }
}

/// As an unprivileged user for real: as root, in a forked child that drops
/// to `nobody`; otherwise right here. It never skips: a root that cannot
/// drop its privileges fails it.
#[test]
fn unprivileged_user_gets_user_mode_only() {
    let _s = serial();
    if !common::is_root() {
        if let Err(e) = unprivileged_checks() {
            panic!("{e}");
        }
        return;
    }
    // The child reports through a pipe. The parent holds `serial`: no other
    // test of this binary runs (or holds a lock) while it forks, so the
    // child, single-threaded, may allocate and start threads.
    let (rx, tx) = pipe();
    // SAFETY: see above; the child ends with `_exit`, never unwinding.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", errno());
    if pid == 0 {
        drop(rx);
        let result =
            std::panic::catch_unwind(|| drop_privileges().and_then(|()| unprivileged_checks()))
                .unwrap_or_else(|_| Err("the unprivileged checks panicked".into()));
        let (code, msg) = match result {
            Ok(()) => (0, String::new()),
            Err(m) => (1, m),
        };
        // SAFETY: writes the message to the pipe, then ends the child
        // without running the parent's destructors.
        unsafe {
            libc::write(tx.as_raw_fd(), msg.as_ptr().cast(), msg.len());
            libc::_exit(code);
        }
    }
    drop(tx);
    let mut msg = String::new();
    std::io::Read::read_to_string(&mut std::fs::File::from(rx), &mut msg).unwrap();
    let end = common::wait_child(pid);
    assert_eq!(
        end,
        common::ChildEnd::Exited(0),
        "the checks as user {NOBODY} failed: {msg}"
    );
}
