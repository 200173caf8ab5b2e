//! `Mm`: managed regions, events from the kernel turned into notifier
//! invalidations for exactly the overlapping ranges, Release at teardown.
#![allow(unsafe_code)]

mod common;

use common::{ChildEnd, fork_and_wait, fork_lock, is_root, reserve_hugepages};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uhmm::mm::notifier::{NotifierOps, NotifierRange, NotifyEvent, Subscription};
use uhmm::mm::{Mm, MmError};
use uhmm::sys::mem::{Advice, Backing, Prot};
use uhmm::sys::uffd::{Features, RegisterError};
use uhmm::{PAGE_SIZE, PageRange};

use common::Recorder;

impl Recorder {
    /// Waits (up to 5 s) for the next invalidation; the service delivers
    /// them after the kernel's event is read, on its own thread.
    fn next(&self) -> (NotifyEvent, PageRange) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(e) = {
                let mut l = self.log.lock().unwrap();
                (!l.is_empty()).then(|| l.remove(0))
            } {
                return e;
            }
            assert!(Instant::now() < deadline, "no invalidation within 5 s");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn quiet(&self) -> bool {
        std::thread::sleep(Duration::from_millis(50));
        self.log.lock().unwrap().is_empty()
    }
}

/// As root, an `Mm` that requires kernel-mode faults starts and reports
/// a mode that serves them, as plain `Mm::new` does; user-mode-only mode
/// can be asked for, and reports itself. (The unprivileged side, where
/// requiring them fails: uhmm-sim's `tests/unprivileged.rs`.)
#[test]
fn kernel_faults_can_be_required_and_the_mode_queried() {
    use uhmm::sys::uffd::{Access, AccessPolicy};
    require!(
        is_root(),
        "needs root for a userfaultfd that serves kernel-mode faults"
    );
    let full = Mm::with_access(AccessPolicy::FullOnly).expect("root gets kernel-mode faults");
    assert!(full.access().serves_kernel_faults(), "{:?}", full.access());
    assert_ne!(full.access(), Access::UserModeOnly);
    let auto = Mm::new().unwrap();
    assert_eq!(auto.access(), full.access(), "Mm::new picks the same way");
    let user = Mm::with_access(AccessPolicy::Only(Access::UserModeOnly)).unwrap();
    assert_eq!(user.access(), Access::UserModeOnly);
    assert!(!user.access().serves_kernel_faults());
}

#[test]
fn alloc_manages_every_backing() {
    let _serial = common::serial();
    let Some(mm) = common::mm() else { return };
    let mut backings = vec![
        (Backing::AnonPrivate, 4 * PAGE_SIZE),
        (Backing::AnonShared, 4 * PAGE_SIZE),
        (Backing::Memfd, 4 * PAGE_SIZE),
    ];
    if is_root() && reserve_hugepages(1) {
        backings.push((
            Backing::Hugetlb {
                page_size: 2 << 20,
                shared: false,
            },
            2 << 20,
        ));
    } else {
        common::skip("hugetlb needs reserved huge pages (root)");
    }
    let mut total = 0;
    let mut regions = Vec::new();
    for (b, len) in backings {
        let name = format!("{b:?}");
        let r = mm.alloc(len, b).unwrap_or_else(|e| panic!("{name}: {e}"));
        r.write_at(len - 2, b"ok").unwrap();
        let mut back = [0u8; 2];
        r.read_at(len - 2, &mut back).unwrap();
        assert_eq!(&back, b"ok", "{name}");
        total += len;
        assert!(mm.is_managed(r.range()));
        regions.push(r);
    }
    assert_eq!(mm.managed_len(), total);
    drop(regions);
    assert_eq!(mm.managed_len(), 0);
    assert_eq!(
        mm.stats().faults,
        0,
        "plain accesses to managed memory raise no fault"
    );
}

#[test]
fn kernel_events_reach_exactly_the_overlapping_notifiers() {
    let _serial = common::serial();
    let Some(mm) = common::mm() else { return };
    let region = mm.alloc(8 * PAGE_SIZE, Backing::AnonPrivate).unwrap();
    region.write_at(0, &[1; 8 * PAGE_SIZE]).unwrap();
    let r = region.range();
    let low = Arc::new(Recorder::default());
    let high = Arc::new(Recorder::default());
    let _n1 = mm
        .insert_notifier(r.subrange(0, 4 * PAGE_SIZE).unwrap(), low.clone())
        .unwrap();
    let _n2 = mm
        .insert_notifier(
            r.subrange(4 * PAGE_SIZE, 4 * PAGE_SIZE).unwrap(),
            high.clone(),
        )
        .unwrap();

    // MADV_DONTNEED of pages 1-2: Clear, for the low notifier only.
    let discard = r.subrange(PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
    region
        .mapping()
        .unwrap()
        .advise(discard, Advice::DontNeed)
        .unwrap();
    assert_eq!(low.next(), (NotifyEvent::Clear, discard));
    assert!(high.quiet());

    // Mm::mprotect of pages 4-5: Protection, for the high notifier only,
    // delivered before mprotect returns.
    let prot = r.subrange(4 * PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
    mm.mprotect(prot, Prot::READ).unwrap();
    assert_eq!(
        high.log.lock().unwrap().remove(0),
        (NotifyEvent::Protection, prot)
    );
    assert!(low.quiet());

    // munmap of page 7: Unmap, high only; the page leaves the managed set.
    let last = r.page(7).unwrap();
    common::unmap_part(last);
    assert_eq!(high.next(), (NotifyEvent::Unmap, last));
    assert!(low.quiet());
    assert!(!mm.is_managed(last) && mm.is_managed(r.subrange(0, 7 * PAGE_SIZE).unwrap()));
    assert!(mm.stats().events >= 2);
}

#[test]
fn mremap_is_a_remap_of_the_old_range() {
    let _serial = common::serial();
    let Some(mm) = common::mm() else { return };
    let region = mm.alloc(2 * PAGE_SIZE, Backing::AnonPrivate).unwrap();
    let target = uhmm::sys::mem::Mapping::anon(2 * PAGE_SIZE).unwrap();
    let rec = Arc::new(Recorder::default());
    let _n = mm.insert_notifier(region.range(), rec.clone()).unwrap();
    let (from, to) = (region.range(), target.range());
    common::remap(from, to);
    assert_eq!(rec.next(), (NotifyEvent::Remap, from));
    assert!(mm.is_managed(to), "the managed range moves with mremap");
    assert!(!mm.is_managed(from));
    // The region's drop would unmap `from`, vacated by the move, where
    // another thread may have mapped something since: forgotten. Its pages
    // are at `to` now, which the target's drop unmaps (uhmm follows).
    std::mem::forget(region);
    drop(target);
}

#[test]
fn fork_is_notified_before_it_happens() {
    let _serial = common::serial();
    let _g = fork_lock();
    let Some(mm) = common::mm() else { return };
    // The kernel's FORK event is not used (it deadlocks with glibc's fork).
    assert!(!mm.features().contains(Features::EVENT_FORK));
    let region = mm.alloc(PAGE_SIZE, Backing::AnonPrivate).unwrap();
    region.write_at(0, &[5]).unwrap();
    let rec = Arc::new(Recorder::default());
    let _n = mm.insert_notifier(region.range(), rec.clone()).unwrap();
    let addr = region.range().start().get();
    // The child sees the parent's data.
    assert_eq!(
        fork_and_wait(|| common::touch_read(addr) as i32),
        ChildEnd::Exited(5)
    );
    assert_eq!(rec.next(), (NotifyEvent::Fork, region.range()));
}

#[test]
fn release_reaches_every_notifier_before_teardown() {
    let _serial = common::serial();
    let Some(mm) = common::mm() else { return };
    let region = mm.alloc(4 * PAGE_SIZE, Backing::AnonPrivate).unwrap();
    let recs: Vec<Arc<Recorder>> = (0..3).map(|_| Arc::new(Recorder::default())).collect();
    let notifiers: Vec<_> = recs
        .iter()
        .map(|r| mm.insert_notifier(region.range(), r.clone()).unwrap())
        .collect();
    let tree = mm.notifiers().clone();
    let range = region.range();
    drop(region);
    // A region that stops being managed is gone for the devices.
    for r in &recs {
        assert_eq!(r.next(), (NotifyEvent::Unmap, range));
    }
    assert!(recs.iter().all(|r| r.quiet()));
    drop(mm);
    for r in &recs {
        let (event, range) = r.next();
        assert_eq!(event, NotifyEvent::Release);
        assert_eq!(
            range.start().get(),
            0,
            "Release covers the whole address space"
        );
    }
    drop(notifiers);
    assert!(tree.is_empty());
}

#[test]
fn bad_ranges_are_refused() {
    let _serial = common::serial();
    let Some(mm) = common::mm() else { return };
    let region = mm.alloc(4 * PAGE_SIZE, Backing::AnonPrivate).unwrap();
    // Overlapping a managed region.
    let inner = region.range().page(1).unwrap();
    // SAFETY: nothing refers into the region.
    let e = unsafe { mm.manage(inner) }.unwrap_err();
    assert!(
        matches!(e, MmError::AlreadyManaged { existing, .. } if existing == region.range()),
        "{e}"
    );
    // Unmapped memory: a one-page hole between two mapped pages (too small
    // for the thread stacks and signal stacks other tests' threads map).
    let around = uhmm::sys::mem::Mapping::anon(3 * PAGE_SIZE).unwrap();
    let hole = around.range().page(1).unwrap();
    common::unmap_part(hole);
    // SAFETY: nothing is mapped there, so nothing refers into it.
    let e = unsafe { mm.manage(hole) }.unwrap_err();
    assert!(
        matches!(e, MmError::Register(RegisterError::Unmapped { .. })),
        "{e}"
    );
    // mprotect of memory that is not managed.
    let plain = uhmm::sys::mem::Mapping::anon(PAGE_SIZE).unwrap();
    assert!(matches!(
        mm.mprotect(plain.range(), Prot::READ),
        Err(MmError::NotManaged { .. })
    ));
    assert_eq!(mm.managed_len(), 4 * PAGE_SIZE);
    // A mapping the caller has can be managed, and stops being on drop.
    // SAFETY: nothing refers into `plain`, which outlives the region.
    let managed = unsafe { mm.manage(plain.range()) }.unwrap();
    assert!(mm.is_managed(plain.range()));
    drop(managed);
    assert!(!mm.is_managed(plain.range()));
}

/// Writes the event's first letter to a pipe (the test's child reports what
/// its notifier saw as the process exits).
#[derive(Debug)]
struct PipeReporter(i32);

impl NotifierOps for PipeReporter {
    fn invalidate(&self, sub: &Subscription, r: &NotifierRange, cur_seq: u64) -> bool {
        sub.set_seq(cur_seq);
        let b = format!("{:?}", r.event).as_bytes()[0];
        // SAFETY: writes one byte from a local to the pipe's write end.
        unsafe { libc::write(self.0, (&b as *const u8).cast(), 1) };
        true
    }
}

#[test]
fn release_reaches_every_notifier_at_process_exit() {
    // A fork is an invalidation of every region: keep it away from the
    // tests that count invalidations.
    let _serial = common::serial();
    let _fork = fork_lock();
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the child sets up its own Mm and leaves through exit(3).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let code = match Mm::new() {
            Ok(mm) => {
                let range = PageRange::new(uhmm::VirtAddr::new(0x1000_0000), PAGE_SIZE).unwrap();
                for _ in 0..2 {
                    std::mem::forget(
                        mm.insert_notifier(range, Arc::new(PipeReporter(fds[1])))
                            .unwrap(),
                    );
                }
                // The handle stays alive: only the exit hook can release.
                std::mem::forget(mm);
                0
            }
            Err(_) => 3,
        };
        // SAFETY: a normal exit, running the atexit hooks.
        unsafe { libc::exit(code) };
    }
    // SAFETY: the parent only reads.
    unsafe { libc::close(fds[1]) };
    assert_eq!(common::wait_child(pid), ChildEnd::Exited(0));
    let mut seen = [0u8; 8];
    // SAFETY: reads into `seen`; the write end is closed, so this ends.
    let n = unsafe { libc::read(fds[0], seen.as_mut_ptr().cast(), seen.len()) };
    // SAFETY: our descriptor.
    unsafe { libc::close(fds[0]) };
    assert_eq!(
        &seen[..n.max(0) as usize],
        b"RR",
        "each notifier saw one Release"
    );
}

/// `Mm::unmanage` of a sub-range: its pages keep their data and leave
/// uhmm (an Unmap to the notifiers, no longer managed, unregistered, so
/// another userfaultfd may register it: EBUSY before), the rest of the
/// region stays managed; dropping the region afterwards unregisters its
/// rest even though the middle is another userfaultfd's now (the kernel
/// refuses an unregister across both as a whole). Unmanaging memory that
/// is not managed does nothing.
#[test]
fn unmanage_hands_a_sub_range_over() {
    use uhmm::sys::mem::Mapping;
    use uhmm::sys::uffd::RegisterMode;
    let _serial = common::serial();
    let Some(mm) = common::mm() else { return };
    let Some(other) = common::uffd(Features::empty()) else {
        return;
    };
    let map = Mapping::anon(16 * PAGE_SIZE).unwrap();
    map.write_at(0, &[7; 16 * PAGE_SIZE]).unwrap();
    // SAFETY: no reference points into the mapping, which outlives the
    // region (dropped below, before it).
    let region = unsafe { mm.manage(map.range()) }.unwrap();
    let rec = Arc::new(Recorder::default());
    let _sub = mm.insert_notifier(map.range(), rec.clone()).unwrap();
    let at = |pages: usize| map.range().start().checked_add(pages * PAGE_SIZE).unwrap();
    let middle = PageRange::new(at(4), 4 * PAGE_SIZE).unwrap();
    let e = other
        .register(&map, middle, RegisterMode::MISSING)
        .unwrap_err();
    assert!(matches!(e, RegisterError::AlreadyRegistered { .. }), "{e}");

    assert_eq!(mm.unmanage(middle).unwrap(), 4 * PAGE_SIZE);
    assert_eq!(rec.next(), (NotifyEvent::Unmap, middle));
    assert!(!mm.is_managed(middle));
    let head = PageRange::new(map.range().start(), 4 * PAGE_SIZE).unwrap();
    let tail = PageRange::new(middle.end(), 8 * PAGE_SIZE).unwrap();
    assert!(mm.is_managed(head) && mm.is_managed(tail));
    assert_eq!(mm.managed_len(), 12 * PAGE_SIZE);
    other
        .register(&map, middle, RegisterMode::MISSING)
        .expect("the middle is no longer uhmm's");
    let mut b = [0u8; 4 * PAGE_SIZE];
    map.read_at(4 * PAGE_SIZE, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 7), "the data stayed");
    // Nothing managed there: nothing done.
    assert_eq!(mm.unmanage(middle).unwrap(), 0);
    assert!(rec.quiet());

    drop(region);
    assert_eq!(mm.managed_len(), 0);
    // The head and tail left uhmm's userfaultfd too.
    other
        .register(&map, head, RegisterMode::MISSING)
        .expect("the head is unregistered");
    other
        .register(&map, tail, RegisterMode::MISSING)
        .expect("the tail is unregistered");
}

/// uhmm's threads start with every signal blocked (`sys::spawn_quiet`, as
/// the fault service is spawned): a program's signal handler must never
/// run on one, not even before its first instruction of uhmm's. Blocked
/// by the thread itself at its start, a handler that unmapped managed
/// memory could run there first, and the unmap waited for the thread it
/// ran on (a program under `uhmm run` hung, about 1 run in 20).
#[test]
fn uhmm_threads_start_with_every_signal_blocked() {
    fn blocked_mask() -> u64 {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix("SigBlk:"))
            .expect("a SigBlk line");
        u64::from_str_radix(line.trim(), 16).unwrap()
    }
    let before = blocked_mask();
    let at_start = uhmm::sys::spawn_quiet("uhmm-test", blocked_mask)
        .unwrap()
        .join()
        .unwrap();
    for sig in [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGALRM,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGCHLD,
        libc::SIGPIPE,
        libc::SIGIO,
        libc::SIGSEGV,
        libc::SIGRTMIN(),
    ] {
        assert_ne!(
            at_start & (1 << (sig - 1)),
            0,
            "signal {sig} open at the thread's start (mask {at_start:#x})"
        );
    }
    assert_eq!(blocked_mask(), before, "the caller's mask is not restored");
}
