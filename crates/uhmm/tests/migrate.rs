//! `MigrateVma` at its edges, on a device of the test's own: a migration
//! dropped after its pages moved into device memory but before its commit,
//! an mremap of pages while they are in flight, and an eviction racing a
//! fault back that has not freed its device page yet. None may lose data,
//! leave a page waiting forever, or end early.
#![allow(unsafe_code)]

mod common;

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use uhmm::devmem::{
    DeviceFault, DevicePagemap, DevicePagemapOps, FaultError, MigrateSrc, MigrateVma,
    PagemapConfig, Select,
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
    let pm = DevicePagemap::new(&mm, owner, Arc::new(Idle), PagemapConfig::default()).unwrap();
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

/// The setup says what each page is: a page with data is `System`, a
/// hole and a zero-page mapping are `Zero` (nothing to copy). When every
/// page the scan before the move saw was present and no zero page, the
/// setup skips its look at the staging slots afterwards; any hole or zero
/// page among them, and it looks.
#[test]
fn setup_selects_holes_and_zero_pages_as_zero_and_data_as_system() {
    let _s = common::serial();
    let Some(mm) = common::mm() else { return };
    let owner = Owner::unique();
    let _pm = DevicePagemap::new(&mm, owner, Arc::new(Idle), PagemapConfig::default()).unwrap();
    let srcs =
        |m: &MigrateVma<'_>| -> Vec<MigrateSrc> { m.selected().map(|(_, _, s)| s).collect() };
    // Every page written: all data.
    let full = mm.alloc(4 * PAGE_SIZE, Backing::AnonPrivate).unwrap();
    for i in 0..4 {
        full.write_at(i * PAGE_SIZE, &[0xC0 + i as u8; 8]).unwrap();
    }
    let m = MigrateVma::setup(&mm, full.range(), Select::SYSTEM, owner).unwrap();
    assert_eq!(srcs(&m), [MigrateSrc::System; 4]);
    drop(m);
    for i in 0..4 {
        assert_eq!(
            read_soon(full.range().start().checked_add(i * PAGE_SIZE).unwrap()),
            Some(0xC0 + i as u8)
        );
    }
    // Data, the zero page (a read of a page never written), a hole, data.
    let mixed = mm.alloc(4 * PAGE_SIZE, Backing::AnonPrivate).unwrap();
    mixed.write_at(0, &[0xD0; 8]).unwrap();
    mixed.write_at(3 * PAGE_SIZE, &[0xD3; 8]).unwrap();
    let at = |i: usize| mixed.range().start().checked_add(i * PAGE_SIZE).unwrap();
    assert_eq!(
        read_soon(at(1)),
        Some(0),
        "a page never written reads zeros"
    );
    let m = MigrateVma::setup(&mm, mixed.range(), Select::SYSTEM, owner).unwrap();
    assert_eq!(
        srcs(&m),
        [
            MigrateSrc::System,
            MigrateSrc::Zero,
            MigrateSrc::Zero,
            MigrateSrc::System
        ]
    );
    drop(m);
    assert_eq!(read_soon(at(0)), Some(0xD0));
    assert_eq!(read_soon(at(1)), Some(0));
    assert_eq!(read_soon(at(2)), Some(0));
    assert_eq!(read_soon(at(3)), Some(0xD3));
}

#[test]
fn an_mremap_of_pages_in_flight_is_followed_by_their_migration() {
    let _s = common::serial();
    let Some(mm) = common::mm() else { return };
    // The test's own mapping, not one the region owns: the mremap vacates
    // its range, which another thread may map meanwhile (the test harness
    // starts the next tests' threads, whose signal stacks land in such
    // holes), so nothing may unmap that range again at the end. (A region
    // from `Mm::alloc` did, on drop: it took a thread's signal stack, and
    // that thread's exit later unmapped pages of another test's region.)
    let own = Mapping::builder(4 * PAGE_SIZE).build().unwrap();
    own.write_at(0, &[0xCD; PAGE_SIZE]).unwrap();
    let own = own.leak();
    // SAFETY: the test's own mapping, no reference into it; moved away
    // below, and the region dropped after its new place is unmapped.
    let region = unsafe { mm.manage(own) }.unwrap();
    let owner = Owner::unique();
    let _pm = DevicePagemap::new(&mm, owner, Arc::new(Idle), PagemapConfig::default()).unwrap();
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
    drop(region);
}

/// A device whose memory is host RAM registered with the `Mm` (pages come
/// home by a move), and whose `page_free` parks once armed until released.
#[derive(Debug)]
struct Parking {
    arena: VirtAddr,
    /// (armed, parked, released)
    st: Mutex<(bool, bool, bool)>,
    cv: Condvar,
}

impl Parking {
    fn at(&self, pfn: DevicePfn) -> VirtAddr {
        VirtAddr::new(self.arena.get() + pfn.0 as usize * PAGE_SIZE)
    }

    fn wait_parked(&self) {
        let g = self.st.lock().unwrap();
        let (g, t) = self
            .cv
            .wait_timeout_while(g, Duration::from_secs(10), |s| !s.1)
            .unwrap();
        assert!(!t.timed_out(), "page_free was never called");
        drop(g);
    }

    fn release(&self) {
        self.st.lock().unwrap().2 = true;
        self.cv.notify_all();
    }
}

impl DevicePagemapOps for Parking {
    fn page_free(&self, _pfn: DevicePfn) {
        let mut g = self.st.lock().unwrap();
        if g.0 {
            g.1 = true;
            self.cv.notify_all();
            while !g.2 {
                g = self.cv.wait(g).unwrap();
            }
        }
    }

    fn migrate_to_ram(&self, f: &DeviceFault<'_>) -> Result<(), FaultError> {
        common::move_back(self.arena, f.migrate()?);
        Ok(())
    }
}

#[test]
fn eviction_waits_for_a_fault_back_to_free_its_device_page() {
    let _s = common::serial();
    let Some(mm) = common::mm() else { return };
    let region = mm.alloc(4 * PAGE_SIZE, Backing::AnonPrivate).unwrap();
    region.write_at(0, &[0x5A; PAGE_SIZE]).unwrap();
    let arena = Mapping::builder(16 * PAGE_SIZE).build().unwrap();
    mm.register_device_memory(&arena).unwrap();
    let owner = Owner::unique();
    let dev = Arc::new(Parking {
        arena: arena.range().start(),
        st: Mutex::default(),
        cv: Condvar::new(),
    });
    let pm = DevicePagemap::new(&mm, owner, dev.clone(), PagemapConfig::default()).unwrap();
    let page = PageRange::new(region.range().start(), PAGE_SIZE).unwrap();
    let mut m = MigrateVma::setup(&mm, page, Select::SYSTEM, owner).unwrap();
    let pfn = pm.alloc(1).unwrap()[0];
    assert_eq!(m.move_to_device(&[(0, pfn, dev.at(pfn))]), [0]);
    m.pages();
    m.finalize();
    assert_eq!(pm.stats().in_use, 1, "the page lives in device memory");

    // A CPU read faults the page back; the fault back commits, then parks
    // in page_free on the fault service, its device page not yet free.
    dev.st.lock().unwrap().0 = true;
    let addr = page.start().get();
    let reader = std::thread::spawn(move || {
        // SAFETY: `addr` lies in the test's managed region, mapped and
        // readable for the whole test.
        unsafe { std::ptr::read_volatile(addr as *const u8) }
    });
    dev.wait_parked();
    std::thread::scope(|s| {
        let evictor = s.spawn(|| pm.evict_all());
        std::thread::sleep(Duration::from_millis(300));
        let early = evictor.is_finished();
        dev.release();
        assert!(
            !early,
            "evict_all returned while a fault back still held a device page"
        );
        evictor.join().unwrap().unwrap();
    });
    assert_eq!(
        pm.stats().in_use,
        0,
        "eviction ended with device memory in use"
    );
    assert_eq!(
        reader.join().unwrap(),
        0x5A,
        "the page came home with its data"
    );
}

/// A device whose memory the CPU reads through a mapping it never
/// registers with the `Mm` (a BAR, say): pages go there by copy and come
/// back by one kernel copy straight into place (`copy_from_device`), for
/// an explicit migration and for a CPU fault alike.
#[derive(Debug)]
struct Visible {
    mem: Mapping,
}

impl Visible {
    fn addr(&self, pfn: DevicePfn) -> VirtAddr {
        VirtAddr::new(self.mem.range().start().get() + pfn.0 as usize * PAGE_SIZE)
    }

    fn bring_back(&self, mut m: MigrateVma<'_>) -> usize {
        let from: Vec<(usize, VirtAddr)> = m
            .selected()
            .filter_map(|(i, _, s)| match s {
                MigrateSrc::Device(pfn) => Some((i, self.addr(pfn))),
                _ => None,
            })
            .collect();
        m.copy_from_device(&from);
        m.pages();
        let n = m.migrated_count();
        m.finalize();
        n
    }
}

impl DevicePagemapOps for Visible {
    fn page_free(&self, _pfn: DevicePfn) {}
    fn migrate_to_ram(&self, f: &DeviceFault<'_>) -> Result<(), FaultError> {
        self.bring_back(f.migrate()?);
        Ok(())
    }
}

#[test]
fn pages_come_back_from_cpu_visible_device_memory_by_one_copy() {
    let _s = common::serial();
    let Some(mm) = common::mm() else { return };
    mm.set_fault_block(PAGE_SIZE).unwrap();
    let n = 8;
    let region = mm.alloc(n * PAGE_SIZE, Backing::AnonPrivate).unwrap();
    let data: Vec<u8> = (0..n * PAGE_SIZE).map(|i| (i % 251) as u8).collect();
    region.write_at(0, &data).unwrap();
    let owner = Owner::unique();
    let dev = Arc::new(Visible {
        mem: Mapping::anon(n * PAGE_SIZE).unwrap(),
    });
    let pm = DevicePagemap::new(&mm, owner, dev.clone(), PagemapConfig::default()).unwrap();
    // Registered, so that its pages could move: they must be copied all
    // the same.
    mm.register_device_memory(&dev.mem).unwrap();
    // To the device: copied into its memory.
    let mut m = MigrateVma::setup(&mm, region.range(), Select::SYSTEM, owner).unwrap();
    let pfns = pm.alloc(n).unwrap();
    for (i, &pfn) in pfns.iter().enumerate() {
        let src = m.src_bytes(i).unwrap().to_vec();
        dev.mem.write_at(pfn.0 as usize * PAGE_SIZE, &src).unwrap();
        m.set_device_dst(i, pfn).unwrap();
    }
    m.pages();
    assert_eq!(m.migrated_count(), n);
    m.finalize();
    // Page 1 by a CPU fault, served through `migrate_to_ram`.
    assert_eq!(
        read_soon(VirtAddr::new(region.range().start().get() + PAGE_SIZE)),
        Some(data[PAGE_SIZE])
    );
    assert_eq!(
        pm.stats().in_use,
        n - 1,
        "the fault brought back its page only"
    );
    // A source the CPU cannot read: that page stays on the device. (Kept
    // mapped, inaccessible: an address unmapped here could be mapped by
    // another thread meanwhile, readable.)
    let hole = Mapping::builder(PAGE_SIZE)
        .prot(uhmm::sys::mem::Prot::empty())
        .build()
        .unwrap();
    let unreadable = hole.range().start();
    let page0 = PageRange::new(region.range().start(), PAGE_SIZE).unwrap();
    let mut m = MigrateVma::setup(&mm, page0, Select::DEVICE_PRIVATE, owner).unwrap();
    m.copy_from_device(&[(0, unreadable)]);
    m.pages();
    assert!(
        !m.migrated(0),
        "a source that cannot be read does not migrate"
    );
    m.finalize();
    assert!(
        mm.device_page(region.range().start(), owner).is_some(),
        "the page is still the device's"
    );
    // The rest by an explicit migration.
    let m = MigrateVma::setup(&mm, region.range(), Select::DEVICE_PRIVATE, owner).unwrap();
    assert_eq!(dev.bring_back(m), n - 1);
    assert_eq!(pm.stats().in_use, 0);
    let mut back = vec![0u8; n * PAGE_SIZE];
    region.read_at(0, &mut back).unwrap();
    assert!(back == data, "every page came back with its data");
    // Copied, not moved: device memory still holds what it held.
    let mut kept = vec![0u8; PAGE_SIZE];
    dev.mem
        .read_at(pfns[3].0 as usize * PAGE_SIZE, &mut kept)
        .unwrap();
    assert!(
        kept[..] == data[3 * PAGE_SIZE..4 * PAGE_SIZE],
        "device memory kept its copy of page 3 (copied back, not moved)"
    );
}

/// 2 MiB device pages: aligned, whole blocks, as many references as
/// pages; freeing part of one splits it; a block all of whose pages are
/// free again is whole again (no new chunk for the next one); chunks that
/// are not whole blocks have none.
#[test]
fn two_mib_device_pages_are_whole_aligned_blocks_that_split_and_come_back() {
    use uhmm::devmem::pagemap::HUGE_PAGES;
    let _s = common::serial();
    let Some(mm) = common::mm() else { return };
    let cfg = PagemapConfig {
        chunk_pages: 2 * HUGE_PAGES,
        max_chunks: 1,
    };
    let pm = DevicePagemap::new(&mm, Owner::unique(), Arc::new(Idle), cfg).unwrap();
    let heads = pm.alloc_huge(2).unwrap();
    assert_eq!(heads.len(), 2);
    assert!(heads.iter().all(|h| h.0 % HUGE_PAGES as u64 == 0));
    assert_ne!(heads[0], heads[1]);
    let st = pm.stats();
    assert_eq!(
        (st.in_use, st.huge_pages, st.chunks),
        (2 * HUGE_PAGES, 2, 1)
    );
    assert!(pm.alloc_huge(1).is_err(), "the only chunk is taken");
    assert!(pm.alloc(1).is_err());
    // Freeing one page splits its 2 MiB page.
    pm.put(heads[0]).unwrap();
    assert_eq!(pm.stats().huge_pages, 1);
    // That page can be had alone now; the others of its block stay used.
    let single = pm.alloc(1).unwrap();
    assert_eq!(single, [heads[0]]);
    pm.put(single[0]).unwrap();
    for k in 0..HUGE_PAGES as u64 {
        let _ = pm.put(DevicePfn(heads[0].0 + k));
    }
    assert_eq!(pm.stats().in_use, HUGE_PAGES);
    // Every page of the split block is free again: whole again.
    let again = pm.alloc_huge(1).unwrap();
    assert_eq!(again, [heads[0]]);
    assert_eq!(pm.stats().chunks, 1);
    // A chunk that is not whole 2 MiB blocks has none.
    let odd = PagemapConfig {
        chunk_pages: HUGE_PAGES + 1,
        max_chunks: 4,
    };
    let pm2 = DevicePagemap::new(&mm, Owner::unique(), Arc::new(Idle), odd).unwrap();
    assert!(pm2.alloc_huge(1).is_err());
    assert_eq!(pm2.alloc(3).unwrap().len(), 3);
}
