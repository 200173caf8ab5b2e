//! Mapping look-ups on the real kernel: gaps, PROT_NONE, file, shared and
//! hugetlb mappings, with PROCMAP_QUERY and the smaps fallback agreeing.

mod common;

use common::{is_root, reserve_hugepages};
use uhmm::sys::mem::{Backing, Mapping, Prot};
use uhmm::sys::procmap::{Procmap, ProcmapBackend, Vma, VmaKind};
use uhmm::{PAGE_SIZE, VirtAddr};

/// Queries with both backends and checks they agree.
fn query(addr: VirtAddr) -> Option<Vma> {
    let a = Procmap::with_backend(ProcmapBackend::Query)
        .unwrap()
        .query(addr)
        .unwrap();
    let b = Procmap::with_backend(ProcmapBackend::Smaps)
        .unwrap()
        .query(addr)
        .unwrap();
    assert_eq!(a, b, "PROCMAP_QUERY and smaps disagree at {addr}");
    a
}

#[test]
fn the_kernel_has_procmap_query() {
    let _serial = common::serial();
    assert_eq!(Procmap::open().unwrap().backend(), ProcmapBackend::Query);
}

#[test]
fn private_anonymous_and_gaps() {
    let _serial = common::serial();
    let map = Mapping::anon(3 * PAGE_SIZE).unwrap();
    let middle = map.range().page(1).unwrap();
    common::unmap_part(middle);
    let first = query(map.range().start()).unwrap();
    assert_eq!(first.range, map.range().page(0).unwrap());
    assert_eq!(
        (first.kind(), first.perms, first.shared),
        (VmaKind::AnonPrivate, Prot::READ | Prot::WRITE, false)
    );
    assert_eq!(query(middle.start()), None, "a gap has no mapping");
    for backend in [ProcmapBackend::Query, ProcmapBackend::Smaps] {
        let next = Procmap::with_backend(backend)
            .unwrap()
            .query_next(middle.start())
            .unwrap()
            .unwrap();
        assert_eq!(next.range, map.range().page(2).unwrap(), "{backend:?}");
        let all = Procmap::with_backend(backend)
            .unwrap()
            .covering(map.range())
            .unwrap();
        assert_eq!(all.len(), 2, "{backend:?}");
    }
}

#[test]
fn prot_none_has_no_permissions() {
    let _serial = common::serial();
    let map = Mapping::builder(PAGE_SIZE)
        .prot(Prot::empty())
        .build()
        .unwrap();
    let v = query(map.range().start()).unwrap();
    assert_eq!(v.perms, Prot::empty());
    assert_eq!(v.range, map.range());
}

#[test]
fn file_mappings_report_inode_offset_and_name() {
    let _serial = common::serial();
    let backing = Mapping::builder(4 * PAGE_SIZE)
        .backing(Backing::Memfd)
        .build()
        .unwrap();
    let fd = backing.fd().unwrap().try_clone_to_owned().unwrap();
    let map = Mapping::builder(2 * PAGE_SIZE)
        .backing(Backing::File {
            fd,
            offset: 2 * PAGE_SIZE as u64,
            shared: false,
        })
        .prot(Prot::READ)
        .build()
        .unwrap();
    let v = query(map.range().start()).unwrap();
    assert_eq!(v.kind(), VmaKind::File);
    assert!(v.is_shmem());
    assert_eq!(
        (v.offset, v.shared, v.perms),
        (2 * PAGE_SIZE as u64, false, Prot::READ)
    );
    assert!(v.inode != 0);
    assert!(
        v.name.as_deref().unwrap().starts_with("/memfd:uhmm"),
        "{:?}",
        v.name
    );
}

#[test]
fn shared_anonymous_memory() {
    let _serial = common::serial();
    let map = Mapping::builder(PAGE_SIZE)
        .backing(Backing::AnonShared)
        .build()
        .unwrap();
    let v = query(map.range().start()).unwrap();
    assert!(v.shared);
    assert_eq!(v.kind(), VmaKind::AnonShared);
    assert!(v.is_shmem());
}

#[test]
fn hugetlb_mappings_report_their_page_size() {
    let _serial = common::serial();
    require!(
        is_root() && reserve_hugepages(1),
        "hugetlb pages cannot be reserved (needs root)"
    );
    let map = Mapping::builder(2 << 20)
        .backing(Backing::Hugetlb {
            page_size: 2 << 20,
            shared: true,
        })
        .build()
        .unwrap();
    let v = query(map.range().start()).unwrap();
    assert_eq!(v.kind(), VmaKind::Hugetlb { page_size: 2 << 20 });
}

#[test]
fn special_mappings() {
    let _serial = common::serial();
    let maps = Procmap::open().unwrap();
    let mut cursor = VirtAddr::new(0);
    let mut vdso = None;
    while let Some(v) = maps.query_next(cursor).unwrap() {
        cursor = v.range.end();
        if v.name.as_deref() == Some("[vdso]") {
            vdso = Some(v);
        }
    }
    let vdso = vdso.expect("every process has a vdso");
    assert_eq!(vdso.kind(), VmaKind::Special);
    assert_eq!(query(vdso.range.start()), Some(vdso));
}
