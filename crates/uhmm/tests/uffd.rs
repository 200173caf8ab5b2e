//! userfaultfd on the real kernel: every resolve ioctl on real memory with
//! its error paths, and every event kind.
#![allow(unsafe_code)]

mod common;

use common::{
    ChildEnd, Monitor, fork_and_wait, fork_lock, next_event, pattern, touch_read, touch_write, uffd,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use uhmm::sys::mem::{self, Advice, Backing, Mapping};
use uhmm::sys::pagemap::{Categories, Pagemap, ScanQuery};
use uhmm::sys::uffd::{
    Access, AccessPolicy, ContinueMode, CopyMode, Event, FaultFlags, Features, Ioctls, MoveMode,
    RegisterMode, Stop, Uffd,
};
use uhmm::{PAGE_SIZE, PageRange};

/// The categories of every page of `range`, one entry per page.
fn page_cats(range: PageRange) -> Vec<Categories> {
    let mut regions = Vec::new();
    Pagemap::open()
        .unwrap()
        .scan(range, &ScanQuery::new(), &mut regions)
        .unwrap();
    let mut out = Vec::new();
    for r in regions {
        out.extend(std::iter::repeat_n(r.categories, r.range.npages()));
    }
    assert_eq!(
        out.len(),
        range.npages(),
        "every page of a mapped range is reported"
    );
    out
}

fn present(range: PageRange) -> Vec<bool> {
    page_cats(range)
        .iter()
        .map(|c| c.contains(Categories::PRESENT))
        .collect()
}

#[test]
fn opens_each_way_and_negotiates_features() {
    require!(common::is_root(), "opening every way needs root");
    for access in [Access::DevNode, Access::Syscall, Access::UserModeOnly] {
        let u = Uffd::builder()
            .access(AccessPolicy::Only(access))
            .features(Features::EVENT_REMOVE | Features::MOVE)
            .open()
            .unwrap_or_else(|e| panic!("{access}: {e}"));
        assert_eq!(u.access(), access);
        assert_eq!(u.features(), Features::EVENT_REMOVE | Features::MOVE);
        assert!(
            u.supported_features()
                .contains(Features::MOVE | Features::POISON)
        );
        assert!(
            u.ioctls()
                .contains(Ioctls::API | Ioctls::REGISTER | Ioctls::UNREGISTER)
        );
    }
}

#[test]
fn copy_resolves_a_read_fault_and_wakes_the_thread() {
    let Some(u) = uffd(Features::THREAD_ID) else {
        return;
    };
    let map = Mapping::anon(4 * PAGE_SIZE).unwrap();
    let allowed = u
        .register(&map, map.range(), RegisterMode::MISSING)
        .unwrap();
    assert!(allowed.contains(Ioctls::COPY | Ioctls::ZEROPAGE | Ioctls::WAKE | Ioctls::MOVE));
    let page = map.range().page(1).unwrap();
    let addr = page.start().get() + 5;
    let t = std::thread::spawn(move || {
        (
            rustix::thread::gettid().as_raw_nonzero().get() as u32,
            touch_read(addr),
        )
    });
    let Event::PageFault(f) = next_event(&u) else {
        panic!("expected a page fault")
    };
    assert_eq!(f.page(), Some(page));
    assert!(!f.is_write());
    let data = pattern(9, PAGE_SIZE);
    let p = u
        .copy(
            page,
            uhmm::VirtAddr::from_ptr(data.as_ptr()),
            CopyMode::empty(),
        )
        .unwrap();
    assert!(p.is_complete() && p.done == PAGE_SIZE);
    let (tid, byte) = t.join().unwrap();
    assert_eq!(byte, data[5]);
    assert_eq!(f.thread, Some(tid), "THREAD_ID reports the faulting thread");
    assert_eq!(present(map.range()), [false, true, false, false]);
}

#[test]
fn eexist_on_a_present_page_leaves_a_wake_owed() {
    let Some(u) = uffd(Features::empty()) else {
        return;
    };
    let map = Mapping::anon(2 * PAGE_SIZE).unwrap();
    u.register(&map, map.range(), RegisterMode::MISSING)
        .unwrap();
    let page = map.range().page(0).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let (d, addr) = (done.clone(), page.start().get());
    let t = std::thread::spawn(move || {
        let v = touch_read(addr);
        d.store(true, Ordering::SeqCst);
        v
    });
    let Event::PageFault(_) = next_event(&u) else {
        panic!("expected a page fault")
    };
    let data = pattern(3, PAGE_SIZE);
    let src = uhmm::VirtAddr::from_ptr(data.as_ptr());
    // Resolve without waking: the thread stays asleep.
    assert!(u.copy(page, src, CopyMode::DONTWAKE).unwrap().is_complete());
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !done.load(Ordering::SeqCst),
        "a DONTWAKE copy must not wake the faulting thread"
    );
    // A second resolver finds the page present: EEXIST, nothing done.
    let other = pattern(200, PAGE_SIZE);
    let p = u
        .copy(
            page,
            uhmm::VirtAddr::from_ptr(other.as_ptr()),
            CopyMode::empty(),
        )
        .unwrap();
    assert_eq!((p.done, p.stop), (0, Some(Stop::Exists)));
    // The wake it owes releases the thread, which sees the first copy.
    u.wake(page).unwrap();
    assert_eq!(t.join().unwrap(), data[0]);
    let mut back = vec![0; PAGE_SIZE];
    map.read_at(0, &mut back).unwrap();
    assert_eq!(back, data, "EEXIST must not overwrite the present page");
}

#[test]
fn a_copy_stopped_midway_reports_the_bytes_done() {
    let Some(u) = uffd(Features::empty()) else {
        return;
    };
    let map = Mapping::anon(4 * PAGE_SIZE).unwrap();
    u.register(&map, map.range(), RegisterMode::MISSING)
        .unwrap();
    let data = pattern(1, 4 * PAGE_SIZE);
    let src = uhmm::VirtAddr::from_ptr(data.as_ptr());
    let third = map.range().page(2).unwrap();
    assert!(u.copy(third, src, CopyMode::empty()).unwrap().is_complete());
    let p = u.copy(map.range(), src, CopyMode::empty()).unwrap();
    assert_eq!((p.done, p.stop), (2 * PAGE_SIZE, Some(Stop::Partial)));
    let rest = p.remainder(map.range()).unwrap();
    assert_eq!(rest.start(), third.start());
    let q = u.copy(rest, src, CopyMode::empty()).unwrap();
    assert_eq!((q.done, q.stop), (0, Some(Stop::Exists)));
    assert_eq!(present(map.range()), [true, true, true, false]);
}

#[test]
fn copy_with_wp_maps_the_page_write_protected() {
    let Some(u) = uffd(Features::PAGEFAULT_FLAG_WP) else {
        return;
    };
    let map = Mapping::anon(PAGE_SIZE).unwrap();
    u.register(&map, map.range(), RegisterMode::MISSING | RegisterMode::WP)
        .unwrap();
    let data = pattern(5, PAGE_SIZE);
    assert!(
        u.copy(
            map.range(),
            uhmm::VirtAddr::from_ptr(data.as_ptr()),
            CopyMode::WP
        )
        .unwrap()
        .is_complete()
    );
    let c = page_cats(map.range())[0];
    assert!(
        c.contains(Categories::PRESENT) && !c.contains(Categories::WRITTEN),
        "{c:?}"
    );
}

#[test]
fn write_protect_traps_writes_until_released() {
    let Some(u) = uffd(Features::PAGEFAULT_FLAG_WP) else {
        return;
    };
    let map = Mapping::anon(2 * PAGE_SIZE).unwrap();
    map.write_at(0, &[1; 2 * PAGE_SIZE]).unwrap();
    u.register(&map, map.range(), RegisterMode::WP).unwrap();
    assert!(
        u.write_protect(map.range(), true, false)
            .unwrap()
            .is_complete()
    );
    assert!(
        page_cats(map.range())
            .iter()
            .all(|c| !c.contains(Categories::WRITTEN))
    );
    let addr = map.range().page(1).unwrap().start().get();
    let t = std::thread::spawn(move || touch_write(addr, 42));
    let Event::PageFault(f) = next_event(&u) else {
        panic!("expected a page fault")
    };
    assert_eq!(f.flags, FaultFlags::WRITE | FaultFlags::WP);
    assert_eq!(f.page(), map.range().page(1));
    assert!(
        u.write_protect(f.page().unwrap(), false, true)
            .unwrap()
            .is_complete()
    );
    t.join().unwrap();
    let mut b = [0u8; 1];
    map.read_at(PAGE_SIZE, &mut b).unwrap();
    assert_eq!(b[0], 42);
    let cats = page_cats(map.range());
    assert!(!cats[0].contains(Categories::WRITTEN) && cats[1].contains(Categories::WRITTEN));
}

#[test]
fn zeropage_maps_the_zero_page() {
    let Some(u) = uffd(Features::empty()) else {
        return;
    };
    let map = Mapping::anon(2 * PAGE_SIZE).unwrap();
    u.register(&map, map.range(), RegisterMode::MISSING)
        .unwrap();
    let p = u.zeropage(map.range(), true).unwrap();
    assert!(p.is_complete());
    assert!(
        page_cats(map.range())
            .iter()
            .all(|c| c.contains(Categories::PRESENT | Categories::PFNZERO))
    );
    let q = u.zeropage(map.range(), true).unwrap();
    assert_eq!(q.stop, Some(Stop::Exists));
}

#[test]
fn move_moves_pages_without_copying_and_leaves_holes() {
    let Some(u) = uffd(Features::MOVE) else {
        return;
    };
    let src = Mapping::anon(4 * PAGE_SIZE).unwrap();
    let dst = Mapping::anon(4 * PAGE_SIZE).unwrap();
    let data = pattern(11, 4 * PAGE_SIZE);
    src.write_at(0, &data).unwrap();
    u.register(&src, src.range(), RegisterMode::MISSING)
        .unwrap();
    u.register(&dst, dst.range(), RegisterMode::MISSING)
        .unwrap();
    // SAFETY: no reference points into `src`.
    let p = unsafe { u.move_pages(dst.range(), src.range().start(), MoveMode::empty()) }.unwrap();
    assert!(p.is_complete() && p.done == 4 * PAGE_SIZE, "{p:?}");
    // The pages moved away: holes at the source, present at the destination.
    assert_eq!(present(src.range()), [false; 4]);
    assert_eq!(present(dst.range()), [true; 4]);
    let mut back = vec![0; 4 * PAGE_SIZE];
    dst.read_at(0, &mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
fn move_stops_at_a_source_hole_unless_holes_are_allowed() {
    let Some(u) = uffd(Features::MOVE) else {
        return;
    };
    let src = Mapping::anon(2 * PAGE_SIZE).unwrap();
    let dst = Mapping::anon(2 * PAGE_SIZE).unwrap();
    src.write_at(PAGE_SIZE, &[7; PAGE_SIZE]).unwrap();
    u.register(&src, src.range(), RegisterMode::MISSING)
        .unwrap();
    u.register(&dst, dst.range(), RegisterMode::MISSING)
        .unwrap();
    // SAFETY: no reference points into `src`.
    let p = unsafe { u.move_pages(dst.range(), src.range().start(), MoveMode::empty()) }.unwrap();
    assert_eq!((p.done, p.stop), (0, Some(Stop::NoEntry)));
    // SAFETY: as above.
    let q = unsafe { u.move_pages(dst.range(), src.range().start(), MoveMode::ALLOW_SRC_HOLES) }
        .unwrap();
    assert!(q.is_complete(), "{q:?}");
    assert_eq!(present(dst.range()), [false, true]);
    assert_eq!(present(src.range()), [false, false]);
}

#[test]
fn move_is_busy_on_a_page_shared_by_fork() {
    let _g = fork_lock();
    let Some(u) = uffd(Features::MOVE) else {
        return;
    };
    let src = Mapping::anon(PAGE_SIZE).unwrap();
    let dst = Mapping::anon(PAGE_SIZE).unwrap();
    src.write_at(0, &[3; PAGE_SIZE]).unwrap();
    u.register(&src, src.range(), RegisterMode::MISSING)
        .unwrap();
    u.register(&dst, dst.range(), RegisterMode::MISSING)
        .unwrap();
    assert_eq!(fork_and_wait(|| 0), ChildEnd::Exited(0));
    // The child has exited, yet the page still counts as shared.
    // SAFETY: no reference points into `src`.
    let p = unsafe { u.move_pages(dst.range(), src.range().start(), MoveMode::empty()) }.unwrap();
    assert_eq!((p.done, p.stop), (0, Some(Stop::Busy)));
    assert_eq!(
        present(src.range()),
        [true],
        "a refused move leaves the source in place"
    );
    // Writing the page makes it exclusive again; then it moves.
    touch_write(src.range().start().get(), 4);
    // SAFETY: as above.
    let q = unsafe { u.move_pages(dst.range(), src.range().start(), MoveMode::empty()) }.unwrap();
    assert!(q.is_complete(), "{q:?}");
    let mut b = [0u8; 2];
    dst.read_at(0, &mut b).unwrap();
    assert_eq!(b, [4, 3]);
}

#[test]
fn continue_maps_a_page_cache_page_on_a_minor_fault() {
    let Some(u) = uffd(Features::MINOR_SHMEM) else {
        return;
    };
    let a = Mapping::builder(2 * PAGE_SIZE)
        .backing(Backing::Memfd)
        .build()
        .unwrap();
    let b = a.alias().unwrap();
    // Fill the page cache through the second, unregistered mapping.
    let data = pattern(21, PAGE_SIZE);
    b.write_at(PAGE_SIZE, &data).unwrap();
    let allowed = u.register(&a, a.range(), RegisterMode::MINOR).unwrap();
    assert!(allowed.contains(Ioctls::CONTINUE));
    let addr = a.range().page(1).unwrap().start().get() + 1;
    let t = std::thread::spawn(move || touch_read(addr));
    let Event::PageFault(f) = next_event(&u) else {
        panic!("expected a page fault")
    };
    assert!(f.flags.contains(FaultFlags::MINOR), "{f:?}");
    let p = u
        .continue_range(f.page().unwrap(), ContinueMode::empty())
        .unwrap();
    assert!(p.is_complete());
    assert_eq!(t.join().unwrap(), data[1]);
}

#[test]
fn poison_makes_access_fail_instead_of_hang() {
    let _g = fork_lock();
    let Some(u) = uffd(Features::POISON) else {
        return;
    };
    let map = Mapping::anon(2 * PAGE_SIZE).unwrap();
    u.register(&map, map.range(), RegisterMode::MISSING)
        .unwrap();
    let page = map.range().page(0).unwrap();
    let p = u.poison(page, true).unwrap();
    assert!(p.is_complete() && p.done == PAGE_SIZE);
    // A system call touching it gets EFAULT...
    let mut b = [0u8; 1];
    let e = mem::read_process(page.start(), &mut b).unwrap_err();
    assert_eq!(e.errno, rustix::io::Errno::FAULT);
    // ...and a program touching it gets SIGBUS (in a child, which inherits
    // the poison marker).
    let addr = page.start().get();
    assert_eq!(
        fork_and_wait(|| touch_read(addr) as i32),
        ChildEnd::Signaled(libc::SIGBUS)
    );
    // Poison only fills holes.
    assert_eq!(u.poison(page, true).unwrap().stop, Some(Stop::Exists));
}

#[test]
fn resolves_fail_with_eagain_while_a_remove_event_is_unread() {
    let Some(u) = uffd(Features::EVENT_REMOVE) else {
        return;
    };
    let u = Arc::new(u);
    let map = Mapping::anon(4 * PAGE_SIZE).unwrap();
    map.write_at(0, &[1; 4 * PAGE_SIZE]).unwrap();
    u.register(&map, map.range(), RegisterMode::MISSING)
        .unwrap();
    let discard = map.range().subrange(0, 2 * PAGE_SIZE).unwrap();
    // The thread that discards blocks until the monitor reads the event.
    let t = std::thread::spawn(move || {
        // SAFETY: no reference points into the mapping.
        unsafe { mem::madvise(discard, Advice::DontNeed) }.unwrap()
    });
    assert!(
        u.wait(Some(Duration::from_secs(5))).unwrap(),
        "REMOVE event expected"
    );
    let data = [9u8; PAGE_SIZE];
    let hole = map.range().page(0).unwrap();
    // Give the discard time to zap the page (it happens after the event is queued).
    std::thread::sleep(Duration::from_millis(50));
    let p = u
        .copy(
            hole,
            uhmm::VirtAddr::from_ptr(data.as_ptr()),
            CopyMode::empty(),
        )
        .unwrap();
    assert_eq!((p.done, p.stop), (0, Some(Stop::LayoutChanging)));
    let Event::Remove { range } = next_event(&u) else {
        panic!("expected REMOVE")
    };
    assert_eq!(range, discard);
    t.join().unwrap();
    // Once the event is read, the same copy goes through.
    assert!(
        u.copy(
            hole,
            uhmm::VirtAddr::from_ptr(data.as_ptr()),
            CopyMode::empty()
        )
        .unwrap()
        .is_complete()
    );
}

#[test]
fn resolves_fail_with_eagain_while_an_unmap_event_is_unread() {
    // The mapping is made first so that it is dropped last: its munmap
    // raises an UNMAP event nobody would read while `u` is still open.
    let map = Mapping::anon(4 * PAGE_SIZE).unwrap();
    let Some(u) = uffd(Features::EVENT_UNMAP) else {
        return;
    };
    u.register(&map, map.range(), RegisterMode::MISSING)
        .unwrap();
    let tail = map.range().subrange(2 * PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
    let t = std::thread::spawn(move || {
        // SAFETY: the tail of the mapping is unmapped while nothing refers
        // to it; the Mapping's own munmap of it later finds nothing.
        unsafe { rustix::mm::munmap(tail.start().as_mut_ptr(), tail.len()) }.unwrap()
    });
    assert!(
        u.wait(Some(Duration::from_secs(5))).unwrap(),
        "UNMAP event expected"
    );
    let data = [9u8; PAGE_SIZE];
    let head = map.range().page(0).unwrap();
    let p = u
        .copy(
            head,
            uhmm::VirtAddr::from_ptr(data.as_ptr()),
            CopyMode::empty(),
        )
        .unwrap();
    assert_eq!((p.done, p.stop), (0, Some(Stop::LayoutChanging)));
    let Event::Unmap { range } = next_event(&u) else {
        panic!("expected UNMAP")
    };
    assert_eq!(range, tail);
    t.join().unwrap();
    assert!(
        u.copy(
            head,
            uhmm::VirtAddr::from_ptr(data.as_ptr()),
            CopyMode::empty()
        )
        .unwrap()
        .is_complete()
    );
}

#[test]
fn remap_event_reports_old_and_new_address() {
    let Some(u) = uffd(Features::EVENT_REMAP) else {
        return;
    };
    let u = Arc::new(u);
    let map = Mapping::anon(2 * PAGE_SIZE).unwrap();
    let target = Mapping::anon(2 * PAGE_SIZE).unwrap();
    u.register(&map, map.range(), RegisterMode::MISSING)
        .unwrap();
    let mon = Monitor::start(u.clone());
    let (from, to) = (map.range().start(), target.range().start());
    // SAFETY: moves the registered range over `target`'s pages; nothing
    // refers to either. `map`'s own munmap later finds nothing.
    let moved = unsafe {
        rustix::mm::mremap_fixed(
            from.as_mut_ptr(),
            2 * PAGE_SIZE,
            2 * PAGE_SIZE,
            rustix::mm::MremapFlags::MAYMOVE,
            to.as_mut_ptr(),
        )
    }
    .unwrap();
    assert_eq!(moved as usize, to.get());
    let Event::Remap {
        from: f,
        to: t,
        old_len,
    } = mon.next()
    else {
        panic!("expected REMAP")
    };
    assert_eq!((f, t, old_len), (from, to, 2 * PAGE_SIZE));
}

#[test]
fn fork_event_hands_over_the_childs_userfaultfd() {
    let _g = fork_lock();
    let Some(u) = uffd(Features::EVENT_FORK) else {
        return;
    };
    let u = Arc::new(u);
    let map = Mapping::anon(PAGE_SIZE).unwrap();
    u.register(&map, map.range(), RegisterMode::MISSING)
        .unwrap();
    let mon = Monitor::start(u.clone());
    // The child exits at once; the fork returns once the monitor has read
    // the FORK event.
    assert_eq!(fork_and_wait(|| 0), ChildEnd::Exited(0));
    let Event::Fork { child } = mon.next() else {
        panic!("expected FORK")
    };
    assert_eq!(child.features(), u.features());
    // The child has exited: resolving on its userfaultfd says so.
    let data = [1u8; PAGE_SIZE];
    let p = child
        .copy(
            map.range(),
            uhmm::VirtAddr::from_ptr(data.as_ptr()),
            CopyMode::empty(),
        )
        .unwrap();
    assert_eq!((p.done, p.stop), (0, Some(Stop::ProcessExited)));
}

#[test]
fn move_and_poison_need_no_feature_enabled_at_open() {
    let Some(u) = uffd(Features::empty()) else {
        return;
    };
    let src = Mapping::anon(PAGE_SIZE).unwrap();
    let dst = Mapping::anon(2 * PAGE_SIZE).unwrap();
    src.write_at(0, &[2]).unwrap();
    u.register(&src, src.range(), RegisterMode::MISSING)
        .unwrap();
    u.register(&dst, dst.range(), RegisterMode::MISSING)
        .unwrap();
    let first = dst.range().page(0).unwrap();
    // SAFETY: no reference points into `src`.
    let p = unsafe { u.move_pages(first, src.range().start(), MoveMode::empty()) }.unwrap();
    assert!(p.is_complete(), "{p:?}");
    assert!(
        u.poison(dst.range().page(1).unwrap(), true)
            .unwrap()
            .is_complete()
    );
    assert_eq!(present(dst.range()), [true, false]);
}

#[test]
fn a_failed_unprotect_still_wakes_the_pages_it_released() {
    // Two mappings, only the first WP-registered: un-protecting both stops
    // at the second, after the first was un-protected; its waiter must wake.
    let _serial = common::serial();
    let Some(u) = uffd(Features::PAGEFAULT_FLAG_WP) else {
        return;
    };
    let both = Mapping::anon(2 * PAGE_SIZE).unwrap();
    both.write_at(0, &[1; 2 * PAGE_SIZE]).unwrap();
    let first = both.range().page(0).unwrap();
    let second = both.range().page(1).unwrap();
    u.register(&both, first, RegisterMode::WP).unwrap();
    u.register(&both, second, RegisterMode::MISSING).unwrap();
    assert!(u.write_protect(first, true, true).unwrap().is_complete());
    let addr = first.start().get();
    let t = std::thread::spawn(move || touch_write(addr, 9));
    let Event::PageFault(f) = next_event(&u) else {
        panic!("expected a page fault")
    };
    assert!(f.flags.contains(FaultFlags::WP));
    let p = u.write_protect(both.range(), false, true).unwrap();
    assert_eq!(p.done, 0);
    assert!(
        p.stop.is_some(),
        "the second page is not WP-registered: {p:?}"
    );
    common::join_soon(t);
    let mut b = [0u8; 1];
    both.read_at(0, &mut b).unwrap();
    assert_eq!(b[0], 9);
}

#[test]
fn closing_the_userfaultfd_releases_waiting_threads() {
    let Some(u) = uffd(Features::empty()) else {
        return;
    };
    let map = Mapping::anon(PAGE_SIZE).unwrap();
    u.register(&map, map.range(), RegisterMode::MISSING)
        .unwrap();
    let addr = map.range().start().get();
    let t = std::thread::spawn(move || touch_read(addr));
    let Event::PageFault(_) = next_event(&u) else {
        panic!("expected a page fault")
    };
    drop(u);
    // Unregistered by the close, the retried access maps a zero page.
    assert_eq!(t.join().unwrap(), 0);
}
