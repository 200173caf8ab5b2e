//! `Mm::unmanage` while the program moves memory into the range: an
//! interleaving forced by a notifier that holds the unmanage's Unmap
//! invalidation until the test has moved another region in.
#![allow(unsafe_code)]

mod common;

use std::sync::Arc;
use std::time::Duration;
use uhmm::devmem::{
    DeviceFault, DevicePagemap, DevicePagemapOps, FaultError, MigrateVma, PagemapConfig, Select,
};
use uhmm::mm::notifier::NotifyEvent;
use uhmm::mm::{ManagedRegion, Mm, Owner};
use uhmm::sys::mem::Mapping;
use uhmm::{DevicePfn, PAGE_SIZE, PageRange, VirtAddr};

/// A device whose memory is host RAM (an arena); pages come home by a move.
#[derive(Debug)]
struct Dev {
    arena: VirtAddr,
}

impl Dev {
    fn at(&self, pfn: DevicePfn) -> VirtAddr {
        VirtAddr::new(self.arena.get() + pfn.0 as usize * PAGE_SIZE)
    }
}

impl DevicePagemapOps for Dev {
    fn page_free(&self, _pfn: DevicePfn) {}
    fn migrate_to_ram(&self, f: &DeviceFault<'_>) -> Result<(), FaultError> {
        common::move_back(self.arena, f.migrate()?);
        Ok(())
    }
}

fn own_managed(mm: &Mm, n: usize, fill: u8) -> (Mapping, ManagedRegion) {
    let map = Mapping::builder(n * PAGE_SIZE).build().unwrap();
    for i in 0..n {
        map.write_at(i * PAGE_SIZE, &[fill + i as u8; PAGE_SIZE])
            .unwrap();
    }
    // SAFETY: no reference points into the mapping.
    let region = unsafe { mm.manage(map.range()) }.unwrap();
    (map, region)
}

/// Region B, whose pages are on the device, is moved (mremap) into range R
/// while R is being unmanaged, after R's pages were brought home and before
/// R's pieces are unregistered. B's pages come home too before anything
/// there is let go of. (Found by review: `let_go` dropped "what is there
/// now" — B's device pages — and B read zeros.)
#[test]
fn a_region_moved_into_a_range_being_unmanaged_keeps_its_device_data() {
    let _s = common::serial();
    let Some(mm) = common::mm() else { return };
    let arena = Mapping::builder(4 * PAGE_SIZE).build().unwrap();
    mm.register_device_memory(&arena).unwrap();
    let dev = Arc::new(Dev {
        arena: arena.range().start(),
    });
    let owner = Owner::unique();
    let pm = DevicePagemap::new(&mm, owner, dev.clone(), PagemapConfig::default()).unwrap();

    // R: 4 pages (0x11..0x14), to be unmanaged. B: 2 pages (0xB1, 0xB2),
    // moved to the device.
    let (map_r, _region_r) = own_managed(&mm, 4, 0x11);
    let (map_b, region_b) = own_managed(&mm, 2, 0xB1);
    let mut m = MigrateVma::setup(&mm, map_b.range(), Select::SYSTEM, owner).unwrap();
    let pfns = pm.alloc(2).unwrap();
    let dsts: Vec<_> = (0..2).map(|i| (i, pfns[i], dev.at(pfns[i]))).collect();
    assert_eq!(m.move_to_device(&dsts).len(), 2);
    m.pages();
    m.finalize();
    assert_eq!(pm.stats().in_use, 2, "B is on the device");

    // The first Unmap invalidation: the unmanaging thread's, sent per
    // piece right before the piece is unregistered.
    let (hold, entered_rx, go_tx) = common::HoldFirst::new(NotifyEvent::Unmap);
    let notifier = mm.insert_notifier(map_r.range(), hold.clone()).unwrap();
    let r = map_r.range();
    let dest = VirtAddr::new(r.start().get() + PAGE_SIZE);
    let unmanaged = std::thread::scope(|s| {
        let mm2 = &mm;
        let t = s.spawn(move || mm2.unmanage(r));
        entered_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("unmanage reached its Unmap invalidation");
        // B moves over pages 1..3 of R (the program's mremap).
        // SAFETY: both mappings are the test's; B's `Mapping` is forgotten
        // below (its old address is gone).
        let p = unsafe {
            rustix::mm::mremap_fixed(
                map_b.range().start().as_mut_ptr::<u8>().cast(),
                2 * PAGE_SIZE,
                2 * PAGE_SIZE,
                rustix::mm::MremapFlags::MAYMOVE,
                dest.as_mut_ptr::<u8>().cast(),
            )
        }
        .expect("mremap");
        assert_eq!(p as usize, dest.get());
        go_tx.send(()).unwrap();
        t.join().unwrap()
    });
    drop(notifier);
    // R's four pages, B's two among them now.
    assert_eq!(unmanaged.unwrap(), 4 * PAGE_SIZE);
    assert_eq!(pm.stats().in_use, 0, "B's pages came home");
    assert!(!mm.is_managed(PageRange::new(dest, 2 * PAGE_SIZE).unwrap()));
    // B's data, wherever it is now, must be intact.
    let got: Vec<u8> = (0..2)
        .map(|i| {
            let a = VirtAddr::new(dest.get() + i * PAGE_SIZE);
            // SAFETY: mapped (B moved there); a plain load.
            unsafe { std::ptr::read_volatile(a.as_ptr::<u8>()) }
        })
        .collect();
    std::mem::forget(map_b);
    std::mem::forget(region_b);
    assert_eq!(got, [0xB1, 0xB2], "B's device data was lost by unmanage");
    // And R's own pages around it.
    let mut b = [0u8; 1];
    map_r.read_at(0, &mut b).unwrap();
    assert_eq!(b[0], 0x11);
    map_r.read_at(3 * PAGE_SIZE, &mut b).unwrap();
    assert_eq!(b[0], 0x14);
}
