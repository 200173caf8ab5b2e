//! A forked child and its parent's `Mm` (issue 12, item 5): every entry
//! point of an inherited `Mm`, and of what was made from it, refuses with
//! `ForkedChild` in the child — no hang, no panic, no effect on the parent —
//! dropping the copies there does nothing to the parent, and the child can
//! make and use an `Mm` of its own.
//!
//! Every child runs under a time limit (a hang is a failure, not a hung
//! test run) and reports a failed check on stderr with a non-zero status;
//! a panic in it never unwinds into the harness. Every test holds
//! `serial()` and `fork_lock()`: no other test thread of this binary holds
//! a lock at a fork, so a child may allocate and start threads.
#![allow(unsafe_code)]

mod common;

use common::{ChildEnd, ends_within, fork_lock, fork_within, serial, take_in_child};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uhmm::devmem::{
    DeviceFault, DevicePagemap, DevicePagemapOps, DevmemError, FaultError, MigrateError,
    MigrateVma, PagemapConfig, Select,
};
use uhmm::mm::notifier::NotifyEvent;
use uhmm::mm::range::{HmmPfn, HmmRange, RangeFaultError};
use uhmm::mm::{ForkedChild, Mm, MmError, Owner};
use uhmm::sys::mem::{Advice, Backing, Mapping, Prot};
use uhmm::{DevicePfn, PAGE_SIZE, PageRange};

/// A child still running after this is killed, and the test fails.
const CHILD_LIMIT: Duration = Duration::from_secs(20);

/// Runs `checks` in a forked child within [`CHILD_LIMIT`]; the child
/// reports a failed check on stderr and exits 1.
fn in_child(checks: impl FnOnce() -> Result<(), String>) -> ChildEnd {
    fork_within(CHILD_LIMIT, || match checks() {
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

fn pid() -> i32 {
    rustix::process::getpid().as_raw_nonzero().get()
}

/// `res` must be the error `is_forked` recognises, naming `parent` as the
/// maker and this process as the caller.
fn refused<T, E: Debug>(
    what: &str,
    res: Result<T, E>,
    parent: i32,
    is_forked: impl FnOnce(&E) -> Option<ForkedChild>,
) -> Result<(), String> {
    match res {
        Err(e) => match is_forked(&e) {
            Some(f) if f.made_by == parent && f.current == pid() => Ok(()),
            _ => Err(format!("{what}: expected ForkedChild, got {e:?}")),
        },
        Ok(_) => Err(format!("{what}: expected ForkedChild, got Ok")),
    }
}

fn mm_forked(e: &MmError) -> Option<ForkedChild> {
    match e {
        MmError::ForkedChild(f) => Some(*f),
        _ => None,
    }
}

fn migrate_forked(e: &MigrateError) -> Option<ForkedChild> {
    match e {
        MigrateError::Mm(e) => mm_forked(e),
        _ => None,
    }
}

fn devmem_forked(e: &DevmemError) -> Option<ForkedChild> {
    match e {
        DevmemError::ForkedChild(f) => Some(*f),
        _ => None,
    }
}

use common::Recorder;

impl Recorder {
    /// Waits (up to 5 s) for an invalidation with `event`, skipping others.
    fn wait_for(&self, event: NotifyEvent) -> Option<PageRange> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            {
                let mut l = self.log.lock().unwrap();
                if let Some(i) = l.iter().position(|(e, _)| *e == event) {
                    return Some(l.remove(i).1);
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }
}

/// Device memory that is never used (its pages have nowhere to go).
#[derive(Debug)]
struct Idle;

impl DevicePagemapOps for Idle {
    fn page_free(&self, _: DevicePfn) {}
    fn migrate_to_ram(&self, _: &DeviceFault<'_>) -> Result<(), FaultError> {
        Ok(())
    }
}

/// The parent, after a child did whatever it did: allocating, writing,
/// discarding and unmapping managed memory all work and are all notified.
fn parent_still_works(mm: &Mm) {
    let mm = mm.clone();
    let ok = ends_within(Duration::from_secs(10), move || {
        for i in 0..32 {
            let r = mm
                .alloc((i % 4 + 1) * 4 * PAGE_SIZE, Backing::AnonPrivate)
                .unwrap();
            let rec = Arc::new(Recorder::default());
            let _n = mm.insert_notifier(r.range(), rec.clone()).unwrap();
            r.write_at(0, &[i as u8; 64]).unwrap();
            let first = r.range().page(0).unwrap();
            r.mapping()
                .unwrap()
                .advise(first, Advice::DontNeed)
                .unwrap();
            assert_eq!(rec.wait_for(NotifyEvent::Clear), Some(first));
            let range = r.range();
            drop(r);
            assert_eq!(rec.wait_for(NotifyEvent::Unmap), Some(range));
        }
    });
    assert!(
        ok,
        "the parent's managed memory still works, without a hang"
    );
}

#[test]
fn every_entry_point_of_an_inherited_mm_refuses_in_the_child() {
    let _s = serial();
    let _f = fork_lock();
    let Some(mm) = common::mm() else { return };
    let parent = pid();
    let region = mm.alloc(16 * PAGE_SIZE, Backing::AnonPrivate).unwrap();
    region.write_at(0, b"parent").unwrap();
    let range = region.range();
    let rec = Arc::new(Recorder::default());
    let notifier = mm.insert_notifier(range, rec.clone()).unwrap();
    let owner = Owner::unique();
    let pagemap = DevicePagemap::new(&mm, owner, Arc::new(Idle), PagemapConfig::default()).unwrap();
    let pfn = pagemap.alloc(1).unwrap()[0];
    // Plain memory the child might try to manage or register.
    let plain = Mapping::anon(4 * PAGE_SIZE).unwrap();

    let end = in_child(|| {
        // Every check runs, and every failure is reported.
        let mut failed = Vec::new();
        let mut note = |r: Result<(), String>| {
            if let Err(e) = r {
                failed.push(e);
            }
        };
        // The `Mm` itself.
        note(ensure(mm.check_process().is_err(), "check_process"));
        note(refused(
            "alloc",
            mm.alloc(4 * PAGE_SIZE, Backing::AnonPrivate),
            parent,
            mm_forked,
        ));
        note(refused(
            "alloc_mapping",
            mm.alloc_mapping(Mapping::builder(4 * PAGE_SIZE).prot(Prot::READ)),
            parent,
            mm_forked,
        ));
        // SAFETY: nothing refers into `plain`; it stays mapped.
        note(refused(
            "manage",
            unsafe { mm.manage(plain.range()) },
            parent,
            mm_forked,
        ));
        note(refused(
            "register_device_memory",
            mm.register_device_memory(&plain),
            parent,
            mm_forked,
        ));
        note(refused(
            "mprotect",
            mm.mprotect(range, Prot::READ),
            parent,
            mm_forked,
        ));
        note(refused(
            "page_state",
            mm.page_state(range.start()),
            parent,
            mm_forked,
        ));
        note(refused(
            "insert_notifier",
            mm.insert_notifier(range, Arc::new(Recorder::default())),
            parent,
            mm_forked,
        ));
        note(refused(
            "Notifiers::insert",
            mm.notifiers().insert(range, Arc::new(Recorder::default())),
            parent,
            |f| Some(*f),
        ));
        note(refused(
            "make_device_exclusive",
            mm.make_device_exclusive(range, owner),
            parent,
            migrate_forked,
        ));
        note(refused(
            "MigrateVma::setup",
            MigrateVma::setup(&mm, range, Select::SYSTEM, owner),
            parent,
            migrate_forked,
        ));
        note(refused(
            "MigrateVma::setup (device pages)",
            MigrateVma::setup(&mm, range, Select::DEVICE_PRIVATE, owner),
            parent,
            migrate_forked,
        ));
        // range_fault, under the inherited notifier (whose read_begin must
        // not wait).
        let seq = notifier.read_begin();
        let mut r = HmmRange::new(&notifier, seq, range);
        r.default_flags = HmmPfn::REQ_FAULT;
        note(refused(
            "range_fault",
            mm.range_fault(&mut r),
            parent,
            |e| match e {
                RangeFaultError::ForkedChild(f) => Some(*f),
                _ => None,
            },
        ));
        // Device memory: a new pagemap, and the inherited one.
        note(refused(
            "DevicePagemap::new",
            DevicePagemap::new(
                &mm,
                Owner::unique(),
                Arc::new(Idle),
                PagemapConfig::default(),
            ),
            parent,
            devmem_forked,
        ));
        note(refused(
            "DevicePagemap::alloc",
            pagemap.alloc(1),
            parent,
            devmem_forked,
        ));
        note(refused(
            "DevicePagemap::get",
            pagemap.get(pfn),
            parent,
            devmem_forked,
        ));
        note(refused(
            "DevicePagemap::put",
            pagemap.put(pfn),
            parent,
            devmem_forked,
        ));
        note(refused(
            "DevicePagemap::evict_all",
            pagemap.evict_all(),
            parent,
            |e| match e {
                FaultError::ForkedChild(f) => Some(*f),
                _ => None,
            },
        ));
        // Reads answer for the child: nothing is managed here.
        note(ensure(
            !mm.is_managed(range),
            "is_managed is false in the child",
        ));
        note(ensure(
            mm.managed_len() == 0,
            "managed_len is 0 in the child",
        ));
        note(ensure(
            mm.stats().state_pages == 0,
            "stats has no page state",
        ));
        note(ensure(
            mm.device_page(range.start(), owner).is_none(),
            "device_page",
        ));
        note(ensure(
            mm.exclusive_page(range.start(), owner).is_none(),
            "exclusive_page",
        ));
        let _ = pagemap.stats();
        // The child's copy of the memory is its own: it reads the
        // parent's data and writes its own.
        let mut b = [0u8; 6];
        note(
            region
                .read_at(0, &mut b)
                .map_err(|e| format!("read_at: {e}")),
        );
        note(ensure(&b == b"parent", "the child reads the parent's data"));
        note(
            region
                .write_at(0, b"child!")
                .map_err(|e| format!("write_at: {e}")),
        );
        // The message says what to do.
        let msg = mm
            .alloc(PAGE_SIZE, Backing::AnonPrivate)
            .unwrap_err()
            .to_string();
        note(ensure(
            msg.contains(&format!("made by process {parent}")) && msg.contains("Mm::new"),
            &format!("the error names the maker and Mm::new: {msg}"),
        ));
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("\n       "))
        }
    });
    assert_eq!(end, ChildEnd::Exited(0));
    // Nothing the child tried reached the parent.
    assert!(mm.check_process().is_ok());
    assert!(mm.is_managed(range));
    assert!(!mm.is_managed(plain.range()));
    let mut b = [0u8; 6];
    region.read_at(0, &mut b).unwrap();
    assert_eq!(&b, b"parent", "the child's write stayed in the child");
    assert_eq!(pagemap.stats().in_use, 1);
    pagemap.put(pfn).unwrap();
    drop(notifier);
    drop(region);
    parent_still_works(&mm);
}

#[test]
fn dropping_inherited_handles_in_the_child_leaves_the_parent_alone() {
    let _s = serial();
    let _f = fork_lock();
    let Some(mm) = common::mm() else { return };
    let region = mm.alloc(8 * PAGE_SIZE, Backing::AnonPrivate).unwrap();
    region.write_at(0, &[7; 8 * PAGE_SIZE]).unwrap();
    let plain = Mapping::anon(4 * PAGE_SIZE).unwrap();
    // SAFETY: nothing refers into `plain`, which outlives the region.
    let managed = unsafe { mm.manage(plain.range()) }.unwrap();
    let rec = Arc::new(Recorder::default());
    let notifier = mm.insert_notifier(region.range(), rec.clone()).unwrap();
    let plain_rec = Arc::new(Recorder::default());
    let plain_notifier = mm
        .insert_notifier(plain.range(), plain_rec.clone())
        .unwrap();
    let pagemap = DevicePagemap::new(
        &mm,
        Owner::unique(),
        Arc::new(Idle),
        PagemapConfig::default(),
    )
    .unwrap();
    let end = in_child(|| {
        // Each drop would unregister, invalidate, evict or wait on the
        // parent's behalf: none may, and none may hang. (The `Mm` goes
        // last: the child drops every handle it has.)
        // SAFETY: the child's copies of the parent's handles, never used
        // again here (the child `_exit`s).
        unsafe {
            drop(take_in_child(&region));
            drop(take_in_child(&managed));
            drop(take_in_child(&notifier));
            drop(take_in_child(&plain_notifier));
            drop(take_in_child(&pagemap));
            drop(take_in_child(&mm));
        }
        Ok(())
    });
    assert_eq!(end, ChildEnd::Exited(0));
    // The parent's ranges are still managed, and still registered with its
    // userfaultfd: a discard of each is reported, and so is the unmap.
    assert!(mm.is_managed(region.range()) && mm.is_managed(plain.range()));
    let page = plain.range().page(1).unwrap();
    plain.advise(page, Advice::DontNeed).unwrap();
    assert_eq!(
        plain_rec.wait_for(NotifyEvent::Clear),
        Some(page),
        "the child's drop left the parent's registration alone"
    );
    let page = region.range().page(2).unwrap();
    region
        .mapping()
        .unwrap()
        .advise(page, Advice::DontNeed)
        .unwrap();
    assert_eq!(rec.wait_for(NotifyEvent::Clear), Some(page));
    let range = region.range();
    drop(region);
    assert_eq!(rec.wait_for(NotifyEvent::Unmap), Some(range));
    drop((managed, notifier, plain_notifier, pagemap));
    parent_still_works(&mm);
}

#[test]
fn a_child_makes_and_uses_its_own_mm() {
    let _s = serial();
    let _f = fork_lock();
    let Some(mm) = common::mm() else { return };
    let region = mm.alloc(16 * PAGE_SIZE, Backing::AnonPrivate).unwrap();
    region.write_at(0, &[1; 16 * PAGE_SIZE]).unwrap();
    let inherited_range = region.range();
    // A second `Mm` whose only handle goes to the child, with its staging
    // area in use (an exclusive grab): dropping it in the child must not
    // unmap what the child's own `Mm` mapped where that area was (the area
    // is not inherited).
    let extra = Mm::new().unwrap();
    {
        let r = extra.alloc(4 * PAGE_SIZE, Backing::AnonPrivate).unwrap();
        r.write_at(0, &[2; 4 * PAGE_SIZE]).unwrap();
        assert_eq!(
            extra
                .make_device_exclusive(r.range(), Owner::unique())
                .unwrap(),
            4
        );
    }
    let end = in_child(|| {
        let err = |e: &dyn std::fmt::Display| e.to_string();
        let own = Mm::new().map_err(|e| err(&e))?;
        ensure(own.check_process().is_ok(), "the child's own Mm is its own")?;
        let mine = own
            .alloc(16 * PAGE_SIZE, Backing::AnonPrivate)
            .map_err(|e| err(&e))?;
        mine.write_at(0, &[9; 16 * PAGE_SIZE])
            .map_err(|e| err(&e))?;
        let rec = Arc::new(Recorder::default());
        let notifier = own
            .insert_notifier(mine.range(), rec.clone())
            .map_err(|e| err(&e))?;
        // Exclusive grabs use the child's own staging area.
        let owner = Owner::unique();
        let grabbed = own
            .make_device_exclusive(mine.range(), owner)
            .map_err(|e| err(&e))?;
        ensure(grabbed == 16, "all 16 pages made exclusive")?;
        // The inherited `Mm` goes (its last handle here).
        // SAFETY: the child's copy of the parent's handle, never used again
        // here (the child `_exit`s).
        drop(unsafe { take_in_child(&extra) });
        // The child's `Mm` still works: the CPU takes its pages back.
        let mut buf = vec![0u8; 16 * PAGE_SIZE];
        mine.read_at(0, &mut buf).map_err(|e| err(&e))?;
        ensure(buf.iter().all(|&b| b == 9), "the child reads its data back")?;
        ensure(
            own.make_device_exclusive(mine.range(), owner)
                .map_err(|e| err(&e))?
                == 16,
            "grabbed again",
        )?;
        mine.write_at(PAGE_SIZE, &[3; 8]).map_err(|e| err(&e))?;
        ensure(
            own.page_state(mine.range().start()).map_err(|e| err(&e))?
                == uhmm::mm::PageState::Exclusive { owner },
            "page 0 is still exclusive",
        )?;
        // range_fault under its own notifier (faulting the exclusive page
        // back is an invalidation: read_begin again and retry).
        let mut attempts = 0;
        let r = loop {
            let mut r = HmmRange::new(&notifier, notifier.read_begin(), mine.range());
            r.default_flags = HmmPfn::REQ_FAULT;
            attempts += 1;
            match own.range_fault(&mut r) {
                Ok(()) => break r,
                Err(RangeFaultError::Busy { .. }) if attempts < 100 => {}
                Err(e) => return Err(err(&e)),
            }
        };
        ensure(
            r.pfns.iter().all(|p| p.contains(HmmPfn::VALID)),
            "range_fault faulted every page in",
        )?;
        let range = mine.range();
        drop(mine);
        ensure(
            rec.wait_for(NotifyEvent::Unmap) == Some(range),
            "the child's unmap is notified by its own service",
        )?;
        drop(notifier);
        // A second region, and the inherited memory made the child's own.
        let again = own
            .alloc(4 * PAGE_SIZE, Backing::AnonPrivate)
            .map_err(|e| err(&e))?;
        again.write_at(0, b"again").map_err(|e| err(&e))?;
        // SAFETY: the child's copy of the parent's region; nothing refers
        // into it, and it stays mapped (never dropped in the child).
        let inherited = unsafe { own.manage(inherited_range) }.map_err(|e| err(&e))?;
        ensure(
            own.is_managed(inherited_range),
            "the child manages its copy",
        )?;
        drop(inherited);
        drop(again);
        drop(own);
        Ok(())
    });
    assert_eq!(end, ChildEnd::Exited(0));
    parent_still_works(&mm);
}

/// The failure the issue reports: a child allocates (and manages) through
/// the inherited `Mm` while it lives on. Had that registered the parent's
/// memory with the parent's userfaultfd — the kernel ties the descriptor to
/// the address space that opened it — the parent's munmap of that memory
/// would wait for an event nobody reads once its `Mm` is gone (the child
/// still holds the descriptor).
#[test]
fn a_child_using_the_inherited_mm_does_not_hang_the_parent() {
    let _s = serial();
    let _f = fork_lock();
    let Some(mm) = common::mm() else { return };
    const LEN: usize = 8 * PAGE_SIZE;
    // Plain memory the child asks to manage (the parent's copy of it is
    // where a registration would land).
    let plain = Mapping::anon(LEN).unwrap();
    let mut to_child = [0i32; 2];
    let mut from_child = [0i32; 2];
    // SAFETY: each array has room for two descriptors.
    unsafe {
        assert_eq!(libc::pipe(to_child.as_mut_ptr()), 0);
        assert_eq!(libc::pipe(from_child.as_mut_ptr()), 0);
    }
    // SAFETY: the child uses uhmm under `serial()` (no other test thread
    // holds a lock), reports one byte, and `_exit`s once released.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: closes the child's copies of the parent's ends (the
        // final read sees EOF once the parent closes its write end).
        unsafe {
            libc::close(to_child[1]);
            libc::close(from_child[0]);
        }
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // Where the parent mapped memory since the fork (a child's new
            // mapping lands there too: both start from one layout).
            let mut at = [0u8; 8];
            // SAFETY: reads into `at`.
            unsafe { libc::read(to_child[0], at.as_mut_ptr().cast(), 8) };
            let parent_map = usize::from_ne_bytes(at);
            let mut refused = 0;
            let mut same_place = false;
            match mm.alloc(LEN, Backing::AnonPrivate) {
                Err(MmError::ForkedChild(_)) => refused += 1,
                Err(_) => {}
                Ok(r) => {
                    same_place = r.range().start().get() == parent_map;
                    std::mem::forget(r);
                }
            }
            // SAFETY: nothing refers into `plain`, which stays mapped.
            match unsafe { mm.manage(plain.range()) } {
                Err(MmError::ForkedChild(_)) => refused += 1,
                Err(_) => {}
                Ok(r) => std::mem::forget(r),
            }
            let report = [refused as u8 | (same_place as u8) << 4];
            // SAFETY: writes one byte, then waits for the parent (EOF).
            unsafe {
                libc::write(from_child[1], report.as_ptr().cast(), 1);
                let mut b = 0u8;
                libc::read(to_child[0], (&mut b as *mut u8).cast(), 1);
            }
            0
        }))
        .unwrap_or(101);
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    // SAFETY: closes the ends the parent does not use.
    unsafe {
        libc::close(to_child[0]);
        libc::close(from_child[1]);
    }
    // Memory the parent maps after the fork, where the child's `alloc`
    // maps its own.
    let after = Mapping::anon(LEN).unwrap();
    let at = after.range().start().get().to_ne_bytes();
    let mut report = [0u8; 1];
    // SAFETY: one write and one read of our own pipes.
    let got = unsafe {
        libc::write(to_child[1], at.as_ptr().cast(), 8);
        let mut p = libc::pollfd {
            fd: from_child[0],
            events: libc::POLLIN,
            revents: 0,
        };
        if libc::poll(&mut p, 1, 20_000) == 1 {
            libc::read(from_child[0], report.as_mut_ptr().cast(), 1)
        } else {
            -1
        }
    };
    // The parent's `Mm` goes, then the memory the child tried to register
    // is unmapped: neither may wait on the child.
    let ends = ends_within(Duration::from_secs(5), move || {
        drop(mm);
        drop(after);
        drop(plain);
    });
    // Let the child go whatever happened (its exit closes its copy of the
    // userfaultfd, which would release a blocked munmap).
    // SAFETY: closes our descriptors; the child's read returns.
    unsafe {
        libc::close(to_child[1]);
        libc::close(from_child[0]);
    }
    let end = common::wait_child(pid);
    assert_eq!(got, 1, "the child reported");
    assert_eq!(end, ChildEnd::Exited(0));
    eprintln!(
        "child: {} of 2 refused; its alloc landed where the parent mapped: {}",
        report[0] & 0xf,
        report[0] >> 4 != 0
    );
    assert!(ends, "the parent's munmap hung on the child's registration");
    assert_eq!(report[0] & 0xf, 2, "alloc and manage refused in the child");
    // A new `Mm` in the parent works as ever.
    let Some(mm) = common::mm() else { return };
    parent_still_works(&mm);
}

/// A parent whose `Mm` goes while a forked child (which never touches
/// uhmm) lives: the child's copy of the userfaultfd keeps its context
/// alive, so the staging area, still registered, made its munmap wait for
/// an UNMAP event nobody reads until the child exited.
#[test]
fn the_parent_drops_its_mm_while_a_forked_child_lives() {
    let _s = serial();
    let _f = fork_lock();
    let Some(mm) = common::mm() else { return };
    {
        // An exclusive grab puts the staging area to use.
        let r = mm.alloc(4 * PAGE_SIZE, Backing::AnonPrivate).unwrap();
        r.write_at(0, &[2; 4 * PAGE_SIZE]).unwrap();
        assert_eq!(
            mm.make_device_exclusive(r.range(), Owner::unique())
                .unwrap(),
            4
        );
    }
    let child = common::fork_blocked();
    let ok = ends_within(Duration::from_secs(5), move || drop(mm));
    assert_eq!(child.release(), ChildEnd::Exited(0));
    assert!(ok, "dropping the Mm hung while a child lived");
}

/// A device that never needs its pages back here.
#[derive(Debug)]
struct Still;

impl uhmm::devmem::DevicePagemapOps for Still {
    fn page_free(&self, _pfn: uhmm::DevicePfn) {}
    fn migrate_to_ram(
        &self,
        _f: &uhmm::devmem::DeviceFault<'_>,
    ) -> Result<(), uhmm::devmem::FaultError> {
        Err(uhmm::devmem::FaultError::Retry)
    }
}

#[test]
fn a_migration_held_across_a_fork_is_inert_in_the_child_and_reclaimed_in_the_parent() {
    use uhmm::devmem::{DevicePagemap, MigrateVma, PageOutcome, PagemapConfig, Select};
    let _s = serial();
    let _f = fork_lock();
    let Some(mm) = common::mm() else { return };
    let region = mm.alloc(2 * PAGE_SIZE, Backing::AnonPrivate).unwrap();
    region.write_at(0, &[0x3C; 2 * PAGE_SIZE]).unwrap();
    let owner = uhmm::mm::Owner::unique();
    let pm = DevicePagemap::new(
        &mm,
        owner,
        std::sync::Arc::new(Still),
        PagemapConfig::default(),
    )
    .unwrap();
    let mut m = MigrateVma::setup(&mm, region.range(), Select::SYSTEM, owner).unwrap();
    assert_eq!(m.cpages(), 2);
    // The fork waits for the migration this thread holds, then reclaims
    // it; the child's copy of it must do nothing (staging is not
    // inherited), its drop included.
    let end = common::fork_within(Duration::from_secs(20), || {
        // SAFETY: the child's copy; the parent's `m` is not touched here.
        let mut mine = unsafe { common::take_in_child(&m) };
        let inert = mine.src_bytes(0).is_none() && mine.system_dsts().is_err();
        mine.pages();
        drop(mine);
        if inert { 0 } else { 1 }
    });
    assert!(
        matches!(end, common::ChildEnd::Exited(0)),
        "the child's copy of a migration: {end:?}"
    );
    // The parent's is reclaimed: it commits nothing, and the data is home.
    let pfn = pm.alloc(1).unwrap()[0];
    m.set_device_dst(0, pfn).unwrap();
    m.pages();
    assert_eq!(m.outcome(0), Some(PageOutcome::Gone));
    assert_eq!(m.outcome(1), Some(PageOutcome::NoDestination));
    m.finalize();
    assert_eq!(pm.stats().in_use, 0, "the unused destination was freed");
    let mut b = [0u8; 2 * PAGE_SIZE];
    region.read_at(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0x3C));
}
