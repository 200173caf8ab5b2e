//! Mapping helpers on the real kernel: each backing, each madvise advice
//! uhmm uses, mprotect, and populate through a userfaultfd.

mod common;

use common::{ChildEnd, fork_and_wait, is_root, next_event, reserve_hugepages, touch_read, uffd};
use uhmm::sys::mem::{self, Advice, Backing, Mapping, Prot};
use uhmm::sys::pagemap::{Categories, Pagemap, ScanQuery};
use uhmm::sys::uffd::{CopyMode, Event, Features, RegisterMode};
use uhmm::{PAGE_SIZE, PageRange, VirtAddr};

fn present_pages(range: PageRange) -> usize {
    let mut out = Vec::new();
    Pagemap::open()
        .unwrap()
        .scan(
            range,
            &ScanQuery::new().require(Categories::PRESENT),
            &mut out,
        )
        .unwrap();
    out.iter().map(|r| r.range.npages()).sum()
}

fn byte(map: &Mapping, off: usize) -> u8 {
    let mut b = [0u8; 1];
    map.read_at(off, &mut b).unwrap();
    b[0]
}

#[test]
fn every_backing_maps_and_holds_data() {
    let mut backings = vec![Backing::AnonPrivate, Backing::AnonShared, Backing::Memfd];
    if is_root() && reserve_hugepages(2) {
        backings.push(Backing::Hugetlb {
            page_size: 2 << 20,
            shared: false,
        });
        backings.push(Backing::Hugetlb {
            page_size: 2 << 20,
            shared: true,
        });
    } else {
        common::skip("hugetlb backings need reserved huge pages (root)");
    }
    for b in backings {
        let len = match b {
            Backing::Hugetlb { page_size, .. } => page_size,
            _ => 4 * PAGE_SIZE,
        };
        let name = format!("{b:?}");
        let map = Mapping::builder(len)
            .backing(b)
            .build()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        map.write_at(len - 3, b"abc").unwrap();
        assert_eq!(byte(&map, len - 1), b'c', "{name}");
    }
}

#[test]
fn populate_and_discard() {
    let map = Mapping::anon(8 * PAGE_SIZE).unwrap();
    map.advise(map.range(), Advice::NoHugePage).unwrap();
    mem::populate(map.range(), false).unwrap();
    assert_eq!(
        present_pages(map.range()),
        8,
        "POPULATE_READ maps (zero) pages"
    );
    map.write_at(0, &[9; 8 * PAGE_SIZE]).unwrap();
    map.advise(
        map.range().subrange(0, 4 * PAGE_SIZE).unwrap(),
        Advice::DontNeed,
    )
    .unwrap();
    assert_eq!(present_pages(map.range()), 4);
    assert_eq!((byte(&map, 0), byte(&map, 4 * PAGE_SIZE)), (0, 9));
}

#[test]
fn remove_punches_shared_memory() {
    let map = Mapping::builder(2 * PAGE_SIZE)
        .backing(Backing::Memfd)
        .build()
        .unwrap();
    let other = map.alias().unwrap();
    map.write_at(0, &[4; 2 * PAGE_SIZE]).unwrap();
    assert_eq!(
        byte(&other, PAGE_SIZE),
        4,
        "both mappings see the same memory"
    );
    // DONTNEED only drops this mapping's view; REMOVE frees the memory.
    map.advise(map.range(), Advice::DontNeed).unwrap();
    assert_eq!(byte(&map, PAGE_SIZE), 4);
    map.advise(map.range(), Advice::Remove).unwrap();
    assert_eq!((byte(&map, PAGE_SIZE), byte(&other, PAGE_SIZE)), (0, 0));
}

#[test]
fn dontfork_hides_a_range_from_the_child() {
    let _g = common::fork_lock();
    let map = Mapping::anon(PAGE_SIZE).unwrap();
    map.write_at(0, &[1]).unwrap();
    let addr = map.range().start().get();
    assert_eq!(
        fork_and_wait(|| touch_read(addr) as i32),
        ChildEnd::Exited(1)
    );
    map.advise(map.range(), Advice::DontFork).unwrap();
    assert_eq!(
        fork_and_wait(|| touch_read(addr) as i32),
        ChildEnd::Signaled(libc::SIGSEGV)
    );
    map.advise(map.range(), Advice::DoFork).unwrap();
    assert_eq!(
        fork_and_wait(|| touch_read(addr) as i32),
        ChildEnd::Exited(1)
    );
}

#[test]
fn protect_changes_access() {
    let _g = common::fork_lock();
    let map = Mapping::anon(PAGE_SIZE).unwrap();
    map.write_at(0, &[6]).unwrap();
    map.protect(map.range(), Prot::empty()).unwrap();
    let addr = map.range().start().get();
    assert_eq!(
        fork_and_wait(|| touch_read(addr) as i32),
        ChildEnd::Signaled(libc::SIGSEGV)
    );
    let mut b = [0u8; 1];
    assert!(mem::read_process(VirtAddr::new(addr), &mut b).is_err());
    map.protect(map.range(), Prot::READ).unwrap();
    assert_eq!(byte(&map, 0), 6);
    assert!(
        map.write_at(0, &[7]).is_err(),
        "read-only memory refuses the accessor's write"
    );
}

#[test]
fn populate_of_a_registered_range_goes_through_the_fault_service() {
    // Kernel-mode faults (MADV_POPULATE_WRITE here) reach a userfaultfd that
    // serves them: one fault per page, and the call returns once they are
    // resolved.
    let map = Mapping::anon(4 * PAGE_SIZE).unwrap();
    let Some(u) = uffd(Features::empty()) else {
        return;
    };
    u.register(&map, map.range(), RegisterMode::MISSING)
        .unwrap();
    let range = map.range();
    let t = std::thread::spawn(move || mem::populate(range, true));
    let data = [8u8; PAGE_SIZE];
    for _ in 0..4 {
        let Event::PageFault(f) = next_event(&u) else {
            panic!("expected a page fault")
        };
        assert!(f.is_write());
        let p = u
            .copy(
                f.page().unwrap(),
                VirtAddr::from_ptr(data.as_ptr()),
                CopyMode::empty(),
            )
            .unwrap();
        assert!(p.is_complete());
    }
    t.join().unwrap().unwrap();
    assert_eq!(present_pages(map.range()), 4);
    assert_eq!(byte(&map, 3 * PAGE_SIZE), 8);
}
