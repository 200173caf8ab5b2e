//! A forked child and its parent's `SimDevice` (issue 12, item 5): every
//! command of a device the parent made refuses with `SimError::ForkedChild`
//! (EINVAL) in the child — no hang, no panic, nothing done to the parent —
//! dropping it there does nothing to the parent, the child migrates with a
//! device and `Mm` of its own, and the parent migrates on afterwards.
#![allow(unsafe_code)]

#[path = "../../uhmm/tests/common/mod.rs"]
mod common;

use common::{ChildEnd, ends_within, fork_lock, fork_within, serial, take_in_child};
use rustix::io::Errno;
use std::time::Duration;
use uhmm::PAGE_SIZE;
use uhmm::devmem::PagemapConfig;
use uhmm::mm::{ForkedChild, Mm, PageState};
use uhmm::sys::mem::Backing;
use uhmm_sim::{SimDevice, SimError};

const NPAGES: usize = 64;
const LEN: usize = NPAGES * PAGE_SIZE;

/// A child still running after this is killed, and the test fails.
const CHILD_LIMIT: Duration = Duration::from_secs(20);

fn pid() -> i32 {
    rustix::process::getpid().as_raw_nonzero().get()
}

/// `res` must be `SimError::ForkedChild` naming `parent` and this process,
/// with dmirror's EINVAL.
fn refused<T>(what: &str, res: Result<T, SimError>, parent: i32) -> Result<(), String> {
    match res {
        Err(e @ SimError::ForkedChild(ForkedChild { made_by, current }))
            if made_by == parent && current == pid() && e.errno() == Errno::INVAL =>
        {
            Ok(())
        }
        Err(e) => Err(format!("{what}: expected ForkedChild, got {e:?}")),
        Ok(_) => Err(format!("{what}: expected ForkedChild, got Ok")),
    }
}

fn ensure(cond: bool, what: &str) -> Result<(), String> {
    if cond { Ok(()) } else { Err(what.to_owned()) }
}

fn pattern(seed: u8) -> Vec<u8> {
    common::pattern(seed, LEN)
}

/// A migration round trip: to the device, read there, the CPU reads it
/// back (faulting it home), to the device again and back by command.
fn round_trip(mm: &Mm, dev: &SimDevice, seed: u8) -> Result<(), String> {
    let region = mm
        .alloc(LEN, Backing::AnonPrivate)
        .map_err(|e| e.to_string())?;
    let start = region.range().start();
    region
        .write_at(0, &pattern(seed))
        .map_err(|e| e.to_string())?;
    let (data, res) = dev
        .migrate_to_device(start, NPAGES)
        .map_err(|e| e.to_string())?;
    ensure(res.cpages == NPAGES as u64, "every page migrated")?;
    ensure(data == pattern(seed), "the device reads the data")?;
    ensure(
        matches!(mm.page_state(start), Ok(PageState::Device { .. })),
        "page 0 is on the device",
    )?;
    let mut cpu = vec![0u8; LEN];
    region.read_at(0, &mut cpu).map_err(|e| e.to_string())?;
    ensure(cpu == pattern(seed), "the CPU reads the data back")?;
    dev.migrate_to_device(start, NPAGES)
        .map_err(|e| e.to_string())?;
    let res = dev
        .migrate_to_system(start, NPAGES)
        .map_err(|e| e.to_string())?;
    ensure(res.cpages == NPAGES as u64, "every page migrated back")?;
    region.read_at(0, &mut cpu).map_err(|e| e.to_string())?;
    ensure(cpu == pattern(seed), "the data survived the round trip")?;
    Ok(())
}

#[test]
fn an_inherited_sim_device_refuses_every_command_and_the_parent_goes_on() {
    let _s = serial();
    let _f = fork_lock();
    let Some(mm) = common::mm() else { return };
    let parent = pid();
    let region = mm.alloc(LEN, Backing::AnonPrivate).unwrap();
    region.write_at(0, &pattern(1)).unwrap();
    let start = region.range().start();
    let dev = SimDevice::new(&mm);
    // On the device at the fork (which brings the pages home first).
    let (_, res) = dev.migrate_to_device(start, NPAGES).unwrap();
    assert_eq!(res.cpages, NPAGES as u64);
    // A second device, which the child drops.
    let other = SimDevice::new(&mm);

    let end = fork_within(CHILD_LIMIT, || {
        let checks = || -> Result<(), String> {
            let mut failed = Vec::new();
            let mut note = |r: Result<(), String>| {
                if let Err(e) = r {
                    failed.push(e);
                }
            };
            let mut buf = vec![0u8; PAGE_SIZE];
            note(refused("read", dev.read(start, 1), parent));
            note(refused("read_into", dev.read_into(start, &mut buf), parent));
            note(refused("write", dev.write(start, &buf), parent));
            note(refused("snapshot", dev.snapshot(start, 1), parent));
            note(refused(
                "migrate_to_device",
                dev.migrate_to_device(start, 1),
                parent,
            ));
            note(refused(
                "migrate_range_to_device",
                dev.migrate_range_to_device(start, 1),
                parent,
            ));
            note(refused(
                "migrate_to_system",
                dev.migrate_to_system(start, 1),
                parent,
            ));
            note(refused("release", dev.release(), parent));
            note(refused("exclusive", dev.exclusive(start, 1), parent));
            note(refused(
                "check_exclusive",
                dev.check_exclusive(start, 1),
                parent,
            ));
            note(refused(
                "with_memory",
                SimDevice::with_memory(&mm, PagemapConfig::default()),
                parent,
            ));
            // The child's copy of the memory holds the parent's data.
            let mut cpu = vec![0u8; LEN];
            note(region.read_at(0, &mut cpu).map_err(|e| e.to_string()));
            note(ensure(
                cpu == pattern(1),
                "the child reads the parent's data",
            ));
            // A device of the parent's, dropped here: it must not evict
            // through the parent's service, nor wait for it.
            // SAFETY: the child's copy of the parent's device, never used
            // again here (the child `_exit`s).
            drop(unsafe { take_in_child(&other) });
            // The child's own `Mm` and device migrate as in any process.
            let own = Mm::new().map_err(|e| e.to_string())?;
            let own_dev = SimDevice::new(&own);
            note(round_trip(&own, &own_dev, 2));
            drop(own_dev);
            drop(own);
            if failed.is_empty() {
                Ok(())
            } else {
                Err(failed.join("\n       "))
            }
        };
        match checks() {
            Ok(()) => 0,
            Err(e) => {
                let _ = std::io::Write::write_all(
                    &mut std::io::stderr(),
                    format!("child: {e}\n").as_bytes(),
                );
                1
            }
        }
    });
    assert_eq!(end, ChildEnd::Exited(0));

    // The parent: its data came home at the fork, and its devices migrate
    // on; its memory unmaps without a hang.
    let mut cpu = vec![0u8; LEN];
    region.read_at(0, &mut cpu).unwrap();
    assert_eq!(cpu, pattern(1));
    assert_eq!(dev.device_pages(), 0, "the fork brought every page home");
    let (data, _) = dev.migrate_to_device(start, NPAGES).unwrap();
    assert_eq!(data, pattern(1));
    round_trip(&mm, &dev, 3).unwrap();
    round_trip(&mm, &other, 4).unwrap();
    let ok = ends_within(Duration::from_secs(10), move || {
        drop(region);
        drop(other);
        drop(dev);
        drop(mm);
    });
    assert!(ok, "the parent's munmaps and teardown ended without a hang");
}

/// A device holding the last handle of its `Mm`, dropped while a forked
/// child (which never touches uhmm) lives: the `Mm` goes first, and the
/// child's copy of the userfaultfd keeps its context alive, so the device
/// memory, still registered, made its munmap wait for an UNMAP event
/// nobody reads until the child exited.
#[test]
fn a_device_outliving_its_mm_goes_while_a_forked_child_lives() {
    let _s = serial();
    let _f = fork_lock();
    let Some(mm) = common::mm() else { return };
    let dev = SimDevice::new(&mm);
    // Migrations register the device's memory (moves with no copy).
    round_trip(&mm, &dev, 5).unwrap();
    drop(mm);
    let child = common::fork_blocked();
    let ok = ends_within(Duration::from_secs(5), move || drop(dev));
    assert_eq!(child.release(), ChildEnd::Exited(0));
    assert!(ok, "dropping the device hung while a child lived");
}
