//! Page-table snapshots on the real kernel: each category on real memory,
//! the resume loop over many regions, and agreement between PAGEMAP_SCAN
//! and the /proc/self/pagemap fallback.

mod common;

use common::{is_root, reserve_hugepages, touch_read};
use uhmm::sys::mem::{Advice, Backing, Mapping};
use uhmm::sys::pagemap::ScanFlags;
use uhmm::sys::pagemap::{
    Categories, PageRegion, Pagemap, PagemapBackend, PagemapError, ScanQuery,
};
use uhmm::sys::uffd::{Features, RegisterMode};
use uhmm::{PAGE_SIZE, PageRange};

const HUGE: usize = 2 << 20;

fn scan(backend: PagemapBackend, range: PageRange, q: &ScanQuery) -> Vec<PageRegion> {
    let mut out = Vec::new();
    Pagemap::with_backend(backend)
        .unwrap()
        .scan(range, q, &mut out)
        .unwrap();
    out
}

/// Scans with PAGEMAP_SCAN and, where the fallback can answer the query
/// (PFNZERO needs root; HUGE it refuses), checks that it says exactly the
/// same.
fn scan_both(range: PageRange, q: &ScanQuery) -> Vec<PageRegion> {
    let a = scan(PagemapBackend::Scan, range, q);
    let mut b = Vec::new();
    match Pagemap::with_backend(PagemapBackend::ProcPagemap)
        .unwrap()
        .scan(range, q, &mut b)
    {
        Ok(_) => assert_eq!(a, b, "PAGEMAP_SCAN and /proc/self/pagemap disagree"),
        Err(PagemapError::Unsupported { .. }) => {}
        Err(PagemapError::NeedsPrivilege { .. }) if !is_root() => {}
        Err(e) => panic!("fallback failed: {e}"),
    }
    a
}

fn region(range: PageRange, first: usize, n: usize, c: Categories) -> PageRegion {
    PageRegion {
        range: range.subrange(first * PAGE_SIZE, n * PAGE_SIZE).unwrap(),
        categories: c,
    }
}

#[test]
fn present_zero_and_absent_pages() {
    let _serial = common::serial();
    let map = Mapping::anon(8 * PAGE_SIZE).unwrap();
    map.advise(map.range(), Advice::NoHugePage).unwrap();
    map.write_at(0, &[1; 2 * PAGE_SIZE]).unwrap(); // pages 0-1: present
    touch_read(map.range().page(4).unwrap().start().get()); // page 4: zero page
    let q = ScanQuery::new().report(Categories::PRESENT | Categories::PFNZERO | Categories::FILE);
    let r = scan_both(map.range(), &q);
    let p = Categories::PRESENT;
    assert_eq!(
        r,
        [
            region(map.range(), 0, 2, p),
            region(map.range(), 2, 2, Categories::empty()),
            region(map.range(), 4, 1, p | Categories::PFNZERO),
            region(map.range(), 5, 3, Categories::empty()),
        ]
    );
    let only = scan_both(
        map.range(),
        &ScanQuery::new().require(p).exclude(Categories::PFNZERO),
    );
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].range.npages(), 2);
}

#[test]
fn shared_memory_pages_are_file_pages() {
    let _serial = common::serial();
    let map = Mapping::builder(2 * PAGE_SIZE)
        .backing(Backing::Memfd)
        .build()
        .unwrap();
    map.write_at(0, &[1; PAGE_SIZE]).unwrap();
    let r = scan_both(map.range(), &ScanQuery::new().require(Categories::PRESENT));
    assert_eq!(r.len(), 1);
    assert!(
        r[0].categories
            .contains(Categories::FILE | Categories::WRITTEN),
        "{:?}",
        r[0]
    );
}

#[test]
fn transparent_huge_pages_are_huge() {
    let _serial = common::serial();
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    require!(!thp.contains("[never]"), "THP is disabled");
    let map = Mapping::builder(2 * HUGE).align(HUGE).build().unwrap();
    map.advise(map.range(), Advice::HugePage).unwrap();
    map.write_at(0, &[5; 2 * HUGE]).unwrap();
    let q = ScanQuery::new()
        .require(Categories::PRESENT)
        .report(Categories::HUGE);
    let r = scan_both(map.range(), &q);
    let huge: usize = r
        .iter()
        .filter(|x| x.categories.contains(Categories::HUGE))
        .map(|x| x.range.npages())
        .sum();
    assert!(
        huge >= 512,
        "expected at least one PMD-mapped THP, got {r:?}"
    );
}

#[test]
fn hugetlb_pages_are_huge() {
    let _serial = common::serial();
    require!(
        is_root() && reserve_hugepages(2),
        "hugetlb pages cannot be reserved (needs root)"
    );
    let map = Mapping::builder(HUGE)
        .backing(Backing::Hugetlb {
            page_size: HUGE,
            shared: false,
        })
        .build()
        .unwrap();
    map.write_at(0, &[1; 16]).unwrap();
    let r = scan_both(
        map.range(),
        &ScanQuery::new().report(Categories::PRESENT | Categories::HUGE),
    );
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].range, map.range());
    assert!(
        r[0].categories
            .contains(Categories::PRESENT | Categories::HUGE),
        "{r:?}"
    );
}

#[test]
fn many_regions_are_returned_completely_and_once() {
    let _serial = common::serial();
    // 2048 alternating present/absent pages are 2048 regions: eight times
    // the per-call buffer, so the scan must resume (and dodge the walk_end
    // quirk) seven times.
    let n = 2048;
    let map = Mapping::anon(n * PAGE_SIZE).unwrap();
    map.advise(map.range(), Advice::NoHugePage).unwrap();
    for i in (0..n).step_by(2) {
        map.write_at(i * PAGE_SIZE, &[1]).unwrap();
    }
    let all = scan_both(map.range(), &ScanQuery::new().report(Categories::PRESENT));
    assert_eq!(all.len(), n);
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r.range, map.range().page(i).unwrap());
        assert_eq!(r.categories.contains(Categories::PRESENT), i % 2 == 0);
    }
    let present = scan_both(map.range(), &ScanQuery::new().require(Categories::PRESENT));
    assert_eq!(present.len(), n / 2);
    // max_pages stops early and says where.
    let mut out = Vec::new();
    let s = Pagemap::open()
        .unwrap()
        .scan(
            map.range(),
            &ScanQuery::new().require(Categories::PRESENT).max_pages(300),
            &mut out,
        )
        .unwrap();
    assert_eq!((s.pages, out.len()), (300, 300));
    assert!(s.walk_end < map.range().end() && s.walk_end >= out[299].range.end());
}

#[test]
fn gaps_between_mappings_are_skipped() {
    let _serial = common::serial();
    let map = Mapping::anon(3 * PAGE_SIZE).unwrap();
    map.write_at(0, &[1; 3 * PAGE_SIZE]).unwrap();
    let middle = map.range().page(1).unwrap();
    common::unmap_part(middle);
    let r = scan_both(map.range(), &ScanQuery::new().report(Categories::PRESENT));
    assert_eq!(
        r,
        [
            region(map.range(), 0, 1, Categories::PRESENT),
            region(map.range(), 2, 1, Categories::PRESENT)
        ]
    );
}

#[test]
fn the_fallback_refuses_what_it_cannot_tell() {
    let _serial = common::serial();
    let map = Mapping::anon(PAGE_SIZE).unwrap();
    let pm = Pagemap::with_backend(PagemapBackend::ProcPagemap).unwrap();
    let mut out = Vec::new();
    let e = pm
        .scan(
            map.range(),
            &ScanQuery::new().report(Categories::SOFT_DIRTY),
            &mut out,
        )
        .unwrap_err();
    assert!(matches!(e, PagemapError::Unsupported { .. }), "{e}");
    let e = pm
        .scan(
            map.range(),
            &ScanQuery::new().report(Categories::empty()),
            &mut out,
        )
        .unwrap_err();
    assert!(matches!(e, PagemapError::EmptyReport), "{e}");
    assert!(out.is_empty());
}

#[test]
fn a_failing_write_protect_scan_still_returns_what_it_protected() {
    let _serial = common::serial();
    let Some(u) = common::uffd(Features::WP_ASYNC) else {
        return;
    };
    // Pages 0-1 under async write-protect, pages 2-3 not.
    let map = Mapping::anon(4 * PAGE_SIZE).unwrap();
    map.advise(map.range(), Advice::NoHugePage).unwrap();
    let tracked = map.range().subrange(0, 2 * PAGE_SIZE).unwrap();
    u.register(&map, tracked, RegisterMode::WP).unwrap();
    map.write_at(0, &[1; 4 * PAGE_SIZE]).unwrap();
    let pm = Pagemap::open().unwrap();
    let q = ScanQuery::new()
        .require(Categories::WRITTEN)
        .report(Categories::WRITTEN)
        .flags(ScanFlags::WP_MATCHING | ScanFlags::CHECK_WPASYNC);
    let mut out = Vec::new();
    let e = pm.scan(map.range(), &q, &mut out).unwrap_err();
    assert!(matches!(e, PagemapError::Scan { .. }), "{e}");
    // The tracked pages were written, reported and re-protected before the
    // scan met the untracked ones: they must come back despite the error.
    assert_eq!(
        out,
        [PageRegion {
            range: tracked,
            categories: Categories::WRITTEN
        }]
    );
    let mut again = Vec::new();
    pm.scan(
        tracked,
        &ScanQuery::new().require(Categories::WRITTEN),
        &mut again,
    )
    .unwrap();
    assert!(again.is_empty(), "the failed scan did protect them");
}
