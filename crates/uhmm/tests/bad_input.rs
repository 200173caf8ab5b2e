//! Bad input gets a typed error that names the range and the reason, and
//! leaves memory as it was.
#![allow(unsafe_code)]

mod common;

use common::{is_root, reserve_hugepages, uffd};
use std::os::fd::{AsFd, AsRawFd};
use uhmm::sys::mem::{self, Advice, Backing, Mapping, MemError, Prot};
use uhmm::sys::uffd::{CopyMode, Features, OpError, RegisterError, RegisterMode, Stop};
use uhmm::{PAGE_SIZE, PageRange, RangeError, VirtAddr};

fn contents(map: &Mapping) -> Vec<u8> {
    let mut v = vec![0; map.len()];
    map.read_at(0, &mut v).unwrap();
    v
}

#[test]
fn unaligned_and_empty_ranges_are_refused_by_construction() {
    let _serial = common::serial();
    let e = PageRange::new(VirtAddr::new(0x10_0010), PAGE_SIZE).unwrap_err();
    assert!(matches!(e, RangeError::UnalignedStart { .. }));
    assert!(e.to_string().contains("0x100010"), "{e}");
    assert!(matches!(
        PageRange::new(VirtAddr::new(0x10_0000), 0),
        Err(RangeError::Empty { .. })
    ));
    assert!(matches!(
        PageRange::new(VirtAddr::new(0x10_0000), 100),
        Err(RangeError::UnalignedLen { .. })
    ));
    assert!(matches!(Mapping::anon(0), Err(MemError::BadLength { .. })));
    assert!(matches!(
        Mapping::anon(PAGE_SIZE + 1),
        Err(MemError::BadLength { .. })
    ));
}

#[test]
fn registering_unmapped_memory_names_the_hole() {
    let _serial = common::serial();
    let Some(u) = uffd(Features::empty()) else {
        return;
    };
    let map = Mapping::anon(3 * PAGE_SIZE).unwrap();
    map.write_at(0, &[7; 3 * PAGE_SIZE]).unwrap();
    let hole = map.range().page(1).unwrap();
    common::unmap_part(hole);
    let e = u
        .register(&map, map.range(), RegisterMode::MISSING)
        .unwrap_err();
    assert!(
        matches!(e, RegisterError::Unmapped { hole: h, .. } if h == hole.start()),
        "{e}"
    );
    assert!(e.to_string().contains(&format!("{}", hole.start())), "{e}");
    // Nothing was registered: the first page can still be registered alone,
    // and its data is intact.
    let first = map.range().page(0).unwrap();
    u.register(&map, first, RegisterMode::MISSING).unwrap();
    let mut b = [0u8; 4];
    mem::read_process(first.start(), &mut b).unwrap();
    assert_eq!(b, [7; 4]);
}

#[test]
fn a_range_registered_with_another_userfaultfd_is_refused() {
    let _serial = common::serial();
    let Some(a) = uffd(Features::empty()) else {
        return;
    };
    let Some(b) = uffd(Features::empty()) else {
        return;
    };
    let map = Mapping::anon(4 * PAGE_SIZE).unwrap();
    a.register(
        &map,
        map.range().subrange(0, 2 * PAGE_SIZE).unwrap(),
        RegisterMode::MISSING,
    )
    .unwrap();
    let e = b
        .register(&map, map.range(), RegisterMode::MISSING)
        .unwrap_err();
    assert!(matches!(e, RegisterError::AlreadyRegistered { .. }), "{e}");
    // The same context may re-register (it updates the mode).
    a.register(
        &map,
        map.range().subrange(0, 2 * PAGE_SIZE).unwrap(),
        RegisterMode::MISSING,
    )
    .unwrap();
    // The other half was not taken by the failed attempt.
    b.register(
        &map,
        map.range().subrange(2 * PAGE_SIZE, 2 * PAGE_SIZE).unwrap(),
        RegisterMode::MISSING,
    )
    .unwrap();
}

#[test]
fn unsupported_mappings_and_modes_say_why() {
    let _serial = common::serial();
    let Some(u) = uffd(Features::MINOR_SHMEM) else {
        return;
    };
    // MINOR on private anonymous memory.
    let anon = Mapping::anon(PAGE_SIZE).unwrap();
    let e = u
        .register(&anon, anon.range(), RegisterMode::MINOR)
        .unwrap_err();
    assert!(
        matches!(&e, RegisterError::Unsupported { reason, .. } if reason.contains("MINOR")),
        "{e}"
    );
    // A regular file on a disk filesystem.
    let dir = env!("CARGO_TARGET_TMPDIR");
    let path = format!("{dir}/regular-file-{}", std::process::id());
    std::fs::write(&path, vec![0u8; PAGE_SIZE]).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let fm = Mapping::builder(PAGE_SIZE)
        .backing(Backing::File {
            fd: file.into(),
            offset: 0,
            shared: true,
        })
        .prot(Prot::READ)
        .build()
        .unwrap();
    let tmpfs = uhmm::sys::procmap::Procmap::open()
        .unwrap()
        .query(fm.range().start())
        .unwrap()
        .unwrap()
        .is_shmem();
    if !tmpfs {
        let e = u
            .register(&fm, fm.range(), RegisterMode::MISSING)
            .unwrap_err();
        assert!(
            matches!(&e, RegisterError::Unsupported { reason, .. } if reason.contains("regular file")),
            "{e}"
        );
    }
    let _ = std::fs::remove_file(&path);
}

#[test]
fn hugetlb_ranges_must_be_huge_page_aligned() {
    let _serial = common::serial();
    require!(
        is_root() && reserve_hugepages(1),
        "hugetlb pages cannot be reserved (needs root)"
    );
    let Some(u) = uffd(Features::MISSING_HUGETLBFS) else {
        return;
    };
    let map = Mapping::builder(2 << 20)
        .backing(Backing::Hugetlb {
            page_size: 2 << 20,
            shared: false,
        })
        .build()
        .unwrap();
    let part = map.range().page(0).unwrap();
    let e = u.register(&map, part, RegisterMode::MISSING).unwrap_err();
    assert!(
        matches!(&e, RegisterError::Unsupported { reason, .. } if reason.contains("hugetlb")),
        "{e}"
    );
    u.register(&map, map.range(), RegisterMode::MISSING)
        .unwrap();
}

#[test]
fn a_closed_userfaultfd_is_a_typed_error() {
    let _serial = common::serial();
    let Some(u) = uffd(Features::empty()) else {
        return;
    };
    let map = Mapping::anon(PAGE_SIZE).unwrap();
    // Close the descriptor behind the Uffd's back, as a bug elsewhere in a
    // program could, then put /dev/null in its place: first EBADF, then a
    // descriptor that is not a userfaultfd.
    let raw = u.as_fd().as_raw_fd();
    // SAFETY: deliberately breaks the Uffd's ownership to simulate a closed
    // fd; the Uffd is forgotten below, so it never closes `raw` again.
    unsafe { libc::close(raw) };
    let e = u
        .register(&map, map.range(), RegisterMode::MISSING)
        .unwrap_err();
    assert!(
        matches!(
            e,
            RegisterError::BadFd {
                errno: rustix::io::Errno::BADF,
                ..
            }
        ),
        "{e}"
    );
    let data = [1u8; PAGE_SIZE];
    let e = u
        .copy(
            map.range(),
            VirtAddr::from_ptr(data.as_ptr()),
            CopyMode::empty(),
        )
        .unwrap_err();
    assert!(matches!(e, OpError::BadFd { .. }), "{e}");
    std::mem::forget(u);
    assert_eq!(contents(&map), vec![0; PAGE_SIZE]);
}

#[test]
fn resolving_an_unregistered_range_stops_with_noentry_and_changes_nothing() {
    let _serial = common::serial();
    let Some(u) = uffd(Features::empty()) else {
        return;
    };
    let map = Mapping::anon(2 * PAGE_SIZE).unwrap();
    map.write_at(0, &[3; PAGE_SIZE]).unwrap();
    let data = [9u8; 2 * PAGE_SIZE];
    // The kernel finds no registered destination: ENOENT, nothing done.
    let p = u
        .copy(
            map.range(),
            VirtAddr::from_ptr(data.as_ptr()),
            CopyMode::empty(),
        )
        .unwrap();
    assert_eq!((p.done, p.stop), (0, Some(Stop::NoEntry)));
    let p = u.zeropage(map.range(), true).unwrap();
    assert_eq!((p.done, p.stop), (0, Some(Stop::NoEntry)));
    let mut want = vec![3; PAGE_SIZE];
    want.extend([0; PAGE_SIZE]);
    assert_eq!(contents(&map), want);
}

#[test]
fn an_unreadable_copy_source_is_a_fault_not_a_crash() {
    let _serial = common::serial();
    let Some(u) = uffd(Features::empty()) else {
        return;
    };
    let map = Mapping::anon(PAGE_SIZE).unwrap();
    let src = Mapping::builder(PAGE_SIZE)
        .prot(Prot::empty())
        .build()
        .unwrap();
    u.register(&map, map.range(), RegisterMode::MISSING)
        .unwrap();
    let e = u
        .copy(map.range(), src.range().start(), CopyMode::empty())
        .unwrap_err();
    assert!(matches!(e, OpError::Fault { .. }), "{e}");
    u.unregister(map.range()).unwrap();
    assert_eq!(contents(&map), vec![0; PAGE_SIZE]);
}

#[test]
fn mapping_operations_check_their_bounds() {
    let _serial = common::serial();
    let map = Mapping::anon(2 * PAGE_SIZE).unwrap();
    map.write_at(0, &[5; 2 * PAGE_SIZE]).unwrap();
    let outside = PageRange::new(map.range().end(), PAGE_SIZE).unwrap();
    assert!(matches!(
        map.advise(outside, Advice::DontNeed),
        Err(MemError::OutOfBounds { .. })
    ));
    assert!(matches!(
        map.protect(outside, Prot::empty()),
        Err(MemError::OutOfBounds { .. })
    ));
    assert!(matches!(
        map.write_at(2 * PAGE_SIZE - 1, &[0, 0]),
        Err(MemError::OutOfBounds { .. })
    ));
    let mut b = [0u8; 2];
    assert!(matches!(
        map.read_at(usize::MAX, &mut b),
        Err(MemError::OutOfBounds { .. })
    ));
    assert!(map.sub(PAGE_SIZE, 2 * PAGE_SIZE).is_err());
    assert_eq!(contents(&map), vec![5; 2 * PAGE_SIZE]);
}

#[test]
fn the_accessors_fail_cleanly_on_bad_memory() {
    let _serial = common::serial();
    let map = Mapping::anon(2 * PAGE_SIZE).unwrap();
    map.write_at(0, &[1; 2 * PAGE_SIZE]).unwrap();
    // Read-only memory is not written through the accessor.
    map.protect(map.range().page(1).unwrap(), Prot::READ)
        .unwrap();
    let e = map.write_at(PAGE_SIZE - 2, &[9; 4]).unwrap_err();
    let MemError::Access(a) = e else {
        panic!("{e}")
    };
    assert_eq!((a.done, a.errno), (2, rustix::io::Errno::FAULT));
    let mut back = vec![0; 2 * PAGE_SIZE];
    map.read_at(0, &mut back).unwrap();
    assert_eq!(
        &back[PAGE_SIZE..PAGE_SIZE + 2],
        &[1, 1],
        "the read-only page is unchanged"
    );
    // An unmapped address reads as EFAULT.
    let gone = map.range().page(1).unwrap();
    common::unmap_part(gone);
    let mut b = [0u8; 8];
    let e = mem::read_process(gone.start(), &mut b).unwrap_err();
    assert_eq!((e.done, e.errno), (0, rustix::io::Errno::FAULT));
    // madvise on an unmapped range is a typed error naming it.
    // SAFETY: nothing is mapped there.
    let e = unsafe { mem::madvise(gone, Advice::DontNeed) }.unwrap_err();
    assert!(
        matches!(e, MemError::Advise { range, .. } if range == gone),
        "{e}"
    );
}

#[test]
fn private_anonymous_memory_has_no_alias() {
    let _serial = common::serial();
    let map = Mapping::anon(PAGE_SIZE).unwrap();
    assert!(matches!(map.alias(), Err(MemError::NoFile { .. })));
}

#[test]
fn register_checks_the_range_lies_in_the_mapping() {
    let _serial = common::serial();
    let Some(u) = uffd(Features::empty()) else {
        return;
    };
    let map = Mapping::anon(2 * PAGE_SIZE).unwrap();
    let beyond = PageRange::new(map.range().start(), 3 * PAGE_SIZE).unwrap();
    let e = u.register(&map, beyond, RegisterMode::MISSING).unwrap_err();
    assert!(matches!(e, RegisterError::OutsideMapping { .. }), "{e}");
}

#[test]
fn a_read_only_shared_mapping_cannot_be_registered() {
    let _serial = common::serial();
    let Some(u) = uffd(Features::MISSING_SHMEM) else {
        return;
    };
    let rw = Mapping::builder(PAGE_SIZE)
        .backing(Backing::Memfd)
        .build()
        .unwrap();
    let fd = rw.fd().unwrap().try_clone_to_owned().unwrap();
    // A read-only open of the memfd: the mapping can never become writable.
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let ro_file = std::fs::File::open(&path).unwrap();
    let ro = Mapping::builder(PAGE_SIZE)
        .backing(Backing::File {
            fd: ro_file.into(),
            offset: 0,
            shared: true,
        })
        .prot(Prot::READ)
        .build()
        .unwrap();
    let e = u
        .register(&ro, ro.range(), RegisterMode::MISSING)
        .unwrap_err();
    assert!(
        matches!(&e, RegisterError::Unsupported { reason, .. } if reason.contains("EPERM")),
        "{e}"
    );
}

#[test]
fn a_huge_page_size_the_kernel_lacks_is_named() {
    let _serial = common::serial();
    for shared in [false, true] {
        let e = Mapping::builder(64 << 10)
            .backing(Backing::Hugetlb {
                page_size: 64 << 10,
                shared,
            })
            .build()
            .unwrap_err();
        assert!(
            matches!(e, MemError::BadHugePageSize { page_size: 0x10000 }),
            "shared={shared}: {e}"
        );
    }
}
