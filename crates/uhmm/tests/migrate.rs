//! `MigrateVma` at its edges, on a device of the test's own: a migration
//! dropped after its pages moved into device memory but before its commit,
//! and an mremap of pages while they are in flight. Neither may lose data
//! or leave a page waiting forever. (Found by an independent review.)
#![allow(unsafe_code)]

mod common;

use std::sync::Arc;
use std::time::Duration;
use uhmm::devmem::{
    DeviceFault, DevicePagemap, DevicePagemapOps, FaultError, MigrateVma, PagemapConfig, Select,
};
use uhmm::mm::Owner;
use uhmm::sys::mem::{Backing, Mapping};
use uhmm::{DevicePfn, PAGE_SIZE, PageRange, VirtAddr};

/// A device that never needs its pages back in these tests.
#[derive(Debug)]
struct Idle;

impl DevicePagemapOps for Idle {
    fn page_free(&self, _pfn: DevicePfn) {}
    fn migrate_to_ram(&self, _f: &DeviceFault<'_>) -> Result<(), FaultError> {
        Err(FaultError::Retry)
    }
}

/// Reads the byte at `addr` on another thread; `None` if that hangs.
fn read_soon(addr: VirtAddr) -> Option<u8> {
    let (tx, rx) = std::sync::mpsc::channel();
    let a = addr.get();
    std::thread::spawn(move || {
        // SAFETY: `a` lies in a mapped, readable page of the test's.
        let v = unsafe { std::ptr::read_volatile(a as *const u8) };
        let _ = tx.send(v);
    });
    rx.recv_timeout(Duration::from_secs(2)).ok()
}

#[test]
fn a_migration_dropped_after_moving_to_device_memory_puts_the_data_back() {
    let _s = common::serial();
    let Some(mm) = common::mm() else { return };
    let region = mm.alloc(4 * PAGE_SIZE, Backing::AnonPrivate).unwrap();
    region.write_at(0, &[0xAB; PAGE_SIZE]).unwrap();
    let owner = Owner::unique();
    let pm = DevicePagemap::new(&mm, owner, Arc::new(Idle), PagemapConfig::default());
    let arena = Mapping::builder(16 * PAGE_SIZE).build().unwrap();
    mm.register_device_memory(&arena).unwrap();
    let page = PageRange::new(region.range().start(), PAGE_SIZE).unwrap();
    let mut m = MigrateVma::setup(&mm, page, Select::SYSTEM, owner).unwrap();
    let pfns = pm.alloc(1).unwrap();
    let done = m.move_to_device(&[(0, pfns[0], arena.range().start())]);
    assert_eq!(done, [0], "the page moved into device memory");
    // The device gives up before committing (another page's copy failed).
    drop(m);
    let mut b = [0u8; 4];
    region.read_at(0, &mut b).unwrap();
    assert_eq!(b, [0xAB; 4], "the page's data came back from device memory");
    assert_eq!(pm.stats().in_use, 0, "its device page is free again");
}

#[test]
fn an_mremap_of_pages_in_flight_is_followed_by_their_migration() {
    let _s = common::serial();
    let Some(mm) = common::mm() else { return };
    let region = mm.alloc(4 * PAGE_SIZE, Backing::AnonPrivate).unwrap();
    region.write_at(0, &[0xCD; PAGE_SIZE]).unwrap();
    let owner = Owner::unique();
    let _pm = DevicePagemap::new(&mm, owner, Arc::new(Idle), PagemapConfig::default());
    // Where the pages go: a mapping of the test's, replaced by the mremap.
    let dest = Mapping::builder(4 * PAGE_SIZE).build().unwrap().leak();
    let page = PageRange::new(region.range().start(), PAGE_SIZE).unwrap();
    let m = MigrateVma::setup(&mm, page, Select::SYSTEM, owner).unwrap();
    // SAFETY: moves the test's own managed region onto the test's own
    // mapping; no reference points into either.
    let moved = unsafe {
        libc::mremap(
            region.as_ptr().cast(),
            4 * PAGE_SIZE,
            4 * PAGE_SIZE,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            dest.start().as_mut_ptr::<libc::c_void>(),
        )
    };
    assert_ne!(moved, libc::MAP_FAILED);
    // Nothing migrates: the page goes back — to where it is now.
    drop(m);
    assert_eq!(
        read_soon(dest.start()),
        Some(0xCD),
        "the page is back, at its new address"
    );
    common::unmap_part(dest);
}
