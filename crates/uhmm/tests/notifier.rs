//! Interval notifiers: delivery exactly to overlapping ranges, and the
//! read_begin / read_retry / set_seq protocol under real threads.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uhmm::mm::Owner;
use uhmm::mm::notifier::{NotifierOps, NotifierRange, Notifiers, NotifyEvent, Retry, Subscription};
use uhmm::{PAGE_SIZE, PageRange, VirtAddr};

const BASE: usize = 0x7000_0000_0000;

fn pages(first: usize, n: usize) -> PageRange {
    PageRange::new(VirtAddr::new(BASE + first * PAGE_SIZE), n * PAGE_SIZE).unwrap()
}

/// Records every invalidation it sees; optionally slow, optionally refusing
/// to block.
#[derive(Debug, Default)]
struct Recorder {
    update_lock: Mutex<()>,
    log: Mutex<Vec<NotifierRange>>,
    delay: Option<Duration>,
    started: AtomicBool,
    finished: AtomicUsize,
}

impl NotifierOps for Recorder {
    fn invalidate(&self, sub: &Subscription, r: &NotifierRange, cur_seq: u64) -> bool {
        assert!(
            r.range.overlaps(sub.range()),
            "called for a range it does not overlap"
        );
        assert_eq!(cur_seq & 1, 1, "cur_seq is always odd");
        let _g = if r.blockable {
            self.update_lock.lock().unwrap()
        } else {
            match self.update_lock.try_lock() {
                Ok(g) => g,
                Err(_) => return false,
            }
        };
        sub.set_seq(cur_seq);
        self.started.store(true, Ordering::SeqCst);
        if let Some(d) = self.delay {
            std::thread::sleep(d);
        }
        self.log.lock().unwrap().push(*r);
        self.finished.fetch_add(1, Ordering::SeqCst);
        true
    }
}

impl Recorder {
    fn seen(&self) -> Vec<NotifierRange> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

#[test]
fn each_event_reaches_exactly_the_overlapping_notifiers() {
    let tree = Notifiers::new();
    let recs: Vec<Arc<Recorder>> = (0..3).map(|_| Arc::new(Recorder::default())).collect();
    let _subs: Vec<_> = recs
        .iter()
        .enumerate()
        .map(|(i, r)| tree.insert(pages(4 * i, 4), r.clone()).unwrap())
        .collect();
    let owner = Owner::unique();
    for event in [
        NotifyEvent::Unmap,
        NotifyEvent::Clear,
        NotifyEvent::Remap,
        NotifyEvent::Fork,
        NotifyEvent::Protection,
        NotifyEvent::Migrate,
        NotifyEvent::Exclusive,
    ] {
        // Pages 3..5 touch the first two ranges only; page 8 is the third's.
        let r = NotifierRange::new(pages(3, 2), event).with_owner(owner);
        tree.invalidate(&r).unwrap();
        assert_eq!(recs[0].seen(), [r], "{event:?}");
        assert_eq!(recs[1].seen(), [r], "{event:?}");
        assert!(
            recs[2].seen().is_empty(),
            "{event:?} reached a range it does not overlap"
        );
        // Adjacent but not overlapping: nobody.
        tree.invalidate(&NotifierRange::new(pages(12, 4), event))
            .unwrap();
        assert!(recs.iter().all(|r| r.seen().is_empty()));
    }
    let all = PageRange::new(VirtAddr::new(0), usize::MAX - PAGE_SIZE + 1).unwrap();
    tree.invalidate(&NotifierRange::new(all, NotifyEvent::Release))
        .unwrap();
    assert!(
        recs.iter().all(|r| r.seen().len() == 1),
        "Release reaches every notifier"
    );
}

#[test]
fn read_retry_reports_a_racing_invalidation() {
    let tree = Notifiers::new();
    let rec = Arc::new(Recorder::default());
    let n = tree.insert(pages(0, 4), rec.clone()).unwrap();
    let seq = n.read_begin();
    assert!(!n.read_retry(seq));
    tree.invalidate(&NotifierRange::new(pages(8, 1), NotifyEvent::Clear))
        .unwrap();
    assert!(
        !n.read_retry(seq),
        "an invalidation elsewhere is no collision"
    );
    tree.invalidate(&NotifierRange::new(pages(2, 1), NotifyEvent::Clear))
        .unwrap();
    assert!(
        n.read_retry(seq),
        "an overlapping invalidation must be reported"
    );
    let again = n.read_begin();
    assert_ne!(again, seq);
    assert!(!n.read_retry(again));
}

#[test]
fn read_begin_waits_for_a_running_invalidation() {
    let tree = Notifiers::new();
    let n = Arc::new(
        tree.insert(pages(0, 4), Arc::new(Recorder::default()))
            .unwrap(),
    );
    let guard = tree
        .invalidate_start(&NotifierRange::new(pages(0, 1), NotifyEvent::Clear))
        .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let (n2, d2) = (n.clone(), done.clone());
    let t = std::thread::spawn(move || {
        let seq = n2.read_begin();
        d2.store(true, Ordering::SeqCst);
        seq
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !done.load(Ordering::SeqCst),
        "read_begin returned inside an invalidation"
    );
    drop(guard);
    let seq = t.join().unwrap();
    assert!(
        !n.read_retry(seq),
        "the sequence read after the end is current"
    );
}

#[test]
fn an_insert_during_an_invalidation_takes_effect_at_its_end() {
    let tree = Notifiers::new();
    let _first = tree
        .insert(pages(0, 4), Arc::new(Recorder::default()))
        .unwrap();
    let guard = tree
        .invalidate_start(&NotifierRange::new(pages(0, 4), NotifyEvent::Clear))
        .unwrap();
    let late = Arc::new(Recorder::default());
    let n = Arc::new(tree.insert(pages(0, 4), late.clone()).unwrap());
    assert!(
        late.seen().is_empty(),
        "the running invalidation started before the insert"
    );
    let done = Arc::new(AtomicBool::new(false));
    let (n2, d2) = (n.clone(), done.clone());
    let t = std::thread::spawn(move || {
        n2.read_begin();
        d2.store(true, Ordering::SeqCst);
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !done.load(Ordering::SeqCst),
        "a deferred notifier must wait for the invalidation"
    );
    drop(guard);
    t.join().unwrap();
    tree.invalidate(&NotifierRange::new(pages(1, 1), NotifyEvent::Unmap))
        .unwrap();
    assert_eq!(late.seen().len(), 1, "once in, it sees later invalidations");
}

#[test]
fn remove_waits_for_a_running_callback_and_ends_them() {
    let tree = Notifiers::new();
    let slow = Arc::new(Recorder {
        delay: Some(Duration::from_millis(200)),
        ..Recorder::default()
    });
    let n = tree.insert(pages(0, 4), slow.clone()).unwrap();
    let t2 = tree.clone();
    let t = std::thread::spawn(move || {
        t2.invalidate(&NotifierRange::new(pages(0, 1), NotifyEvent::Clear))
            .unwrap()
    });
    while !slow.started.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    n.remove();
    assert_eq!(
        slow.finished.load(Ordering::SeqCst),
        1,
        "remove returned while its callback ran"
    );
    t.join().unwrap();
    tree.invalidate(&NotifierRange::new(pages(0, 4), NotifyEvent::Clear))
        .unwrap();
    assert_eq!(
        slow.finished.load(Ordering::SeqCst),
        1,
        "a callback ran after remove"
    );
    assert!(tree.is_empty());
}

#[test]
fn a_callback_that_cannot_block_asks_for_a_retry() {
    let tree = Notifiers::new();
    let rec = Arc::new(Recorder::default());
    let n = tree.insert(pages(0, 4), rec.clone()).unwrap();
    let seq = n.read_begin();
    let held = rec.update_lock.lock().unwrap();
    let r = NotifierRange::new(pages(0, 1), NotifyEvent::Clear).non_blocking();
    assert_eq!(
        tree.invalidate(&r).unwrap_err(),
        Retry { range: pages(0, 1) }
    );
    drop(held);
    // Nothing is left running, and the retried invalidation goes through.
    let fresh = n.read_begin();
    tree.invalidate(&r).unwrap();
    assert!(n.read_retry(seq) && n.read_retry(fresh));
    assert_eq!(rec.seen(), [r]);
}

#[test]
fn dropping_the_handle_unregisters() {
    let tree = Notifiers::new();
    let rec = Arc::new(Recorder::default());
    drop(tree.insert(pages(0, 4), rec.clone()).unwrap());
    tree.invalidate(&NotifierRange::new(pages(0, 4), NotifyEvent::Clear))
        .unwrap();
    assert!(rec.seen().is_empty() && tree.is_empty());
    assert_ne!(Owner::unique(), Owner::unique());
}
