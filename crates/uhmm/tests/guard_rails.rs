//! Guard rails at the API boundary: no device bug may hang the process or
//! lose data. Devices here panic in their callbacks, fail to bring pages
//! back, or heal after a while; every CPU access must end — with its data,
//! or with the kernel's SIGBUS (EFAULT for a system call) — and the fault
//! service must go on serving everyone else.
#![allow(unsafe_code)]

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uhmm::devmem::{
    DeviceFault, DevicePagemap, DevicePagemapOps, DevmemError, FaultError, MigrateError,
    MigrateSrc, MigrateVma, PagemapConfig, Select,
};
use uhmm::mm::notifier::{NotifierOps, NotifierRange, Subscription};
use uhmm::mm::{ManagedRegion, Mm, Owner};
use uhmm::sys::mem::{Backing, Mapping};
use uhmm::{DevicePfn, PAGE_SIZE, VirtAddr};

/// What [`Faulty`] does when called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Its job.
    Work,
    /// Panic.
    Panic,
    /// Fail with `FaultError::Device`.
    Fail,
    /// Say it is busy.
    Busy,
}

/// A device whose memory is host RAM (pages come home by a move), whose
/// `migrate_to_ram` and `page_free` misbehave as told, a number of times.
#[derive(Debug)]
struct Faulty {
    arena: VirtAddr,
    /// (mode, calls left in that mode before it works again; u32::MAX:
    /// for ever)
    fault: Mutex<(Mode, u32)>,
    /// `page_free` calls left that panic.
    free_panics: AtomicU32,
    calls: AtomicU32,
}

impl Faulty {
    fn new(arena: &Mapping) -> Arc<Faulty> {
        Arc::new(Faulty {
            arena: arena.range().start(),
            fault: Mutex::new((Mode::Work, 0)),
            free_panics: AtomicU32::new(0),
            calls: AtomicU32::new(0),
        })
    }

    fn at(&self, pfn: DevicePfn) -> VirtAddr {
        VirtAddr::new(self.arena.get() + pfn.0 as usize * PAGE_SIZE)
    }

    fn misbehave(&self, mode: Mode, times: u32) {
        *self.fault.lock().unwrap() = (mode, times);
    }
}

impl DevicePagemapOps for Faulty {
    fn page_free(&self, _pfn: DevicePfn) {
        if self
            .free_panics
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            panic!("test device: page_free panics");
        }
    }

    fn migrate_to_ram(&self, f: &DeviceFault<'_>) -> Result<(), FaultError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mode = {
            let mut g = self.fault.lock().unwrap();
            if g.1 == 0 {
                Mode::Work
            } else {
                if g.1 != u32::MAX {
                    g.1 -= 1;
                }
                g.0
            }
        };
        match mode {
            Mode::Work => {}
            Mode::Panic => panic!("test device: migrate_to_ram panics"),
            Mode::Fail => return Err(FaultError::Device("test device: DMA error".into())),
            Mode::Busy => return Err(FaultError::Retry),
        }
        let mut m = f.migrate()?;
        let from: Vec<(usize, VirtAddr)> = m
            .selected()
            .filter_map(|(i, _, s)| match s {
                MigrateSrc::Device(pfn) => Some((i, self.at(pfn))),
                _ => None,
            })
            .collect();
        m.move_from_device(&from);
        m.pages();
        m.finalize();
        Ok(())
    }
}

/// An address space with `pages` managed pages, each filled with its
/// index + 1, all moved into the memory of a [`Faulty`] device.
struct Rig {
    // Field order: the pagemap goes (bringing its pages home) before the
    // region and the arena.
    pm: DevicePagemap,
    dev: Arc<Faulty>,
    region: ManagedRegion,
    _arena: Mapping,
    mm: Mm,
}

impl Rig {
    fn new(pages: usize) -> Option<Rig> {
        let mm = common::mm()?;
        let region = mm.alloc(pages * PAGE_SIZE, Backing::AnonPrivate).unwrap();
        for i in 0..pages {
            region
                .write_at(i * PAGE_SIZE, &[i as u8 + 1; PAGE_SIZE])
                .unwrap();
        }
        let arena = Mapping::builder(pages * PAGE_SIZE).build().unwrap();
        mm.register_device_memory(&arena).unwrap();
        let dev = Faulty::new(&arena);
        let owner = Owner::unique();
        let pm = DevicePagemap::new(&mm, owner, dev.clone(), PagemapConfig::default()).unwrap();
        // One page per fault: each access is its own fault back.
        mm.set_fault_block(PAGE_SIZE);
        let mut m = MigrateVma::setup(&mm, region.range(), Select::SYSTEM, owner).unwrap();
        let pfns = pm.alloc(pages).unwrap();
        let dsts: Vec<(usize, DevicePfn, VirtAddr)> =
            (0..pages).map(|i| (i, pfns[i], dev.at(pfns[i]))).collect();
        assert_eq!(m.move_to_device(&dsts).len(), pages);
        m.pages();
        m.finalize();
        assert_eq!(pm.stats().in_use, pages, "every page is on the device");
        Some(Rig {
            pm,
            dev,
            region,
            _arena: arena,
            mm,
        })
    }

    fn page(&self, i: usize) -> VirtAddr {
        VirtAddr::new(self.region.range().start().get() + i * PAGE_SIZE)
    }
}

/// Reads page `addr`'s first byte with a plain load on another thread;
/// `None` if that does not end within `secs`.
fn load_soon(addr: VirtAddr, secs: u64) -> Option<u8> {
    let (tx, rx) = std::sync::mpsc::channel();
    let a = addr.get();
    std::thread::spawn(move || {
        // SAFETY: `a` lies in a mapped, readable page of the test's.
        let v = unsafe { std::ptr::read_volatile(a as *const u8) };
        let _ = tx.send(v);
    });
    rx.recv_timeout(Duration::from_secs(secs)).ok()
}

/// Reads page `addr`'s first byte through the kernel (a system call, so
/// that a poisoned page is EFAULT rather than SIGBUS); `None` if that does
/// not end within `secs`.
fn syscall_read_soon(addr: VirtAddr, secs: u64) -> Option<Result<u8, uhmm::sys::mem::AccessError>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        let r = uhmm::sys::mem::read_process(addr, &mut b).map(|()| b[0]);
        let _ = tx.send(r);
    });
    rx.recv_timeout(Duration::from_secs(secs)).ok()
}

#[test]
fn a_migrate_to_ram_that_panics_is_contained_and_the_fault_served_once_it_heals() {
    let _s = common::serial();
    let Some(rig) = Rig::new(4) else { return };
    rig.dev.misbehave(Mode::Panic, 2);
    assert_eq!(
        load_soon(rig.page(0), 10),
        Some(1),
        "a CPU touch hung, or read wrong data, after the device panicked"
    );
    // The service lives on: other pages still come back.
    assert_eq!(load_soon(rig.page(1), 10), Some(2));
    let st = rig.mm.stats();
    assert_eq!(st.callback_panics, 2, "both panics were counted");
    assert_eq!(st.faults_sigbus, 0, "a healed device fails no access");
    assert_eq!(st.pages_lost, 0);
}

#[test]
fn a_device_that_cannot_bring_a_page_back_fails_the_access_with_sigbus() {
    let _s = common::serial();
    let Some(rig) = Rig::new(4) else { return };
    rig.dev.misbehave(Mode::Fail, u32::MAX);
    let t0 = Instant::now();
    let got = syscall_read_soon(rig.page(0), 10).expect("the access waited for ever");
    let took = t0.elapsed();
    assert!(
        matches!(got, Err(ref e) if e.errno == rustix::io::Errno::FAULT),
        "the access must fail (EFAULT, the system call's SIGBUS), not read {got:?}"
    );
    assert!(took < Duration::from_secs(3), "it took {took:?}");
    let calls = rig.dev.calls.load(Ordering::SeqCst);
    assert!(
        (8..=9).contains(&calls),
        "the device was called {calls} times (bound: 8 failures)"
    );
    let st = rig.mm.stats();
    assert_eq!(st.faults_sigbus, 1);
    // Again: the page stays poisoned, never zeros.
    let again = syscall_read_soon(rig.page(0), 10).expect("hung");
    assert!(again.is_err(), "a lost page read {again:?}");
    // The device heals: its other pages come back.
    rig.dev.misbehave(Mode::Work, 0);
    assert_eq!(load_soon(rig.page(1), 10), Some(2));
    assert_eq!(
        rig.pm.stats().in_use,
        2,
        "the lost page's device page was freed"
    );
}

#[test]
fn a_device_that_stays_busy_fails_the_access_after_its_time_bound() {
    let _s = common::serial();
    let Some(rig) = Rig::new(2) else { return };
    rig.dev.misbehave(Mode::Busy, u32::MAX);
    let t0 = Instant::now();
    let got = syscall_read_soon(rig.page(0), 30).expect("the access waited for ever");
    let took = t0.elapsed();
    assert!(got.is_err(), "read {got:?}");
    assert!(
        took >= Duration::from_secs(10) && took < Duration::from_secs(15),
        "busy for {took:?}: the bound is 10 s"
    );
    assert_eq!(rig.mm.stats().faults_sigbus, 1);
}

#[test]
fn a_device_busy_for_a_while_loses_nothing() {
    let _s = common::serial();
    let Some(rig) = Rig::new(2) else { return };
    // Far more calls than the failure bound: busy is not a failure.
    rig.dev.misbehave(Mode::Busy, 200);
    assert_eq!(load_soon(rig.page(0), 10), Some(1));
    assert_eq!(rig.mm.stats().faults_sigbus, 0);
}

#[test]
fn a_page_free_that_panics_is_contained_and_its_page_not_reused() {
    let _s = common::serial();
    let Some(rig) = Rig::new(4) else { return };
    let pfn0 = rig.mm.device_page(rig.page(0), rig.pm.owner()).unwrap();
    rig.dev.free_panics.store(1, Ordering::SeqCst);
    // The fault back frees the device page on the fault service.
    assert_eq!(load_soon(rig.page(0), 10), Some(1));
    assert_eq!(load_soon(rig.page(1), 10), Some(2), "the service died");
    assert_eq!(rig.mm.stats().callback_panics, 1);
    let st = rig.pm.stats();
    assert_eq!(st.in_use, 2);
    let fresh = rig.pm.alloc(4).unwrap();
    assert!(
        !fresh.contains(&pfn0),
        "a page whose page_free panicked was handed out again"
    );
}

/// A notifier whose callback panics while armed.
#[derive(Debug, Default)]
struct PanickingNotifier {
    armed: std::sync::atomic::AtomicBool,
}

impl NotifierOps for PanickingNotifier {
    fn invalidate(&self, sub: &Subscription, _r: &NotifierRange, cur_seq: u64) -> bool {
        if self.armed.swap(false, Ordering::SeqCst) {
            panic!("test device: invalidate panics");
        }
        sub.set_seq(cur_seq);
        true
    }
}

#[test]
fn an_invalidate_callback_that_panics_is_contained() {
    let _s = common::serial();
    let Some(rig) = Rig::new(4) else { return };
    let ops = Arc::new(PanickingNotifier::default());
    let notifier = rig
        .mm
        .insert_notifier(rig.region.range(), ops.clone())
        .unwrap();
    let seq = notifier.read_begin();
    ops.armed.store(true, Ordering::SeqCst);
    // A discard of page 3 is reported to the service, which invalidates.
    // SAFETY: page 3 is the test's managed memory; nothing refers to it.
    unsafe {
        rustix::mm::madvise(
            rig.page(3).as_mut_ptr::<u8>().cast(),
            PAGE_SIZE,
            rustix::mm::Advice::LinuxDontNeed,
        )
    }
    .unwrap();
    assert_eq!(
        load_soon(rig.page(0), 10),
        Some(1),
        "the service died in the callback"
    );
    assert!(
        notifier.read_retry(seq),
        "a device read racing with the panicked invalidation must retry"
    );
    assert_eq!(rig.mm.stats().callback_panics, 1);
    drop(notifier);
}

#[test]
fn a_migration_for_an_owner_without_device_memory_is_refused() {
    let _s = common::serial();
    let Some(mm) = common::mm() else { return };
    let region = mm.alloc(4 * PAGE_SIZE, Backing::AnonPrivate).unwrap();
    region.write_at(0, &[9; PAGE_SIZE]).unwrap();
    let nobody = Owner::unique();
    let err = MigrateVma::setup(&mm, region.range(), Select::SYSTEM, nobody).unwrap_err();
    assert!(
        matches!(err, MigrateError::NoPagemap { owner } if owner == nobody),
        "{err}"
    );
    let mut b = [0u8; 1];
    region.read_at(0, &mut b).unwrap();
    assert_eq!(b, [9], "memory is as it was");
}

#[test]
fn an_owner_has_one_pagemap() {
    let _s = common::serial();
    let Some(rig) = Rig::new(4) else { return };
    let owner = rig.pm.owner();
    let second = DevicePagemap::new(
        &rig.mm,
        owner,
        Faulty::new(&rig._arena),
        PagemapConfig::default(),
    );
    assert!(
        matches!(second, Err(DevmemError::OwnerTaken { owner: o }) if o == owner),
        "{second:?}"
    );
    drop(second);
    // The first pagemap still finds (and serves) its pages.
    for i in 0..4 {
        assert_eq!(load_soon(rig.page(i), 10), Some(i as u8 + 1));
    }
    assert_eq!(rig.pm.stats().in_use, 0);
}

#[test]
fn device_destinations_that_cannot_apply_are_refused() {
    let _s = common::serial();
    let Some(mm) = common::mm() else { return };
    let region = mm.alloc(4 * PAGE_SIZE, Backing::AnonPrivate).unwrap();
    region.write_at(0, &[1; 4 * PAGE_SIZE]).unwrap();
    let arena = Mapping::builder(16 * PAGE_SIZE).build().unwrap();
    mm.register_device_memory(&arena).unwrap();
    let dev = Faulty::new(&arena);
    let owner = Owner::unique();
    let pm = DevicePagemap::new(&mm, owner, dev, PagemapConfig::default()).unwrap();
    let pfns = pm.alloc(2).unwrap();
    let mut m = MigrateVma::setup(&mm, region.range(), Select::SYSTEM, owner).unwrap();
    let bad_entry = |r: Result<(), MigrateError>, index: usize| {
        assert!(
            matches!(r, Err(MigrateError::BadEntry { index: i, .. }) if i == index),
            "{r:?}"
        );
    };
    bad_entry(m.set_device_dst(4, pfns[0]), 4);
    let never = DevicePfn(1000);
    assert!(matches!(
        m.set_device_dst(0, never),
        Err(MigrateError::Devmem(DevmemError::BadPfn { pfn })) if pfn == never
    ));
    // The device copies pages 0 and 1 into its memory.
    for (i, pfn) in [(0, pfns[0]), (1, pfns[1])] {
        let bytes = m.src_bytes(i).unwrap().to_vec();
        arena.write_at(pfn.0 as usize * PAGE_SIZE, &bytes).unwrap();
    }
    m.set_device_dst(0, pfns[0]).unwrap();
    bad_entry(m.set_device_dst(1, pfns[0]), 1);
    m.set_device_dst(1, pfns[1]).unwrap();
    m.pages();
    assert_eq!(m.migrated_count(), 2);
    bad_entry(m.set_device_dst(2, pfns[1]), 2);
    m.finalize();
    assert_eq!(pm.stats().in_use, 2, "one device page for each page moved");
    drop(pm);
    let mut b = [0u8; 4 * PAGE_SIZE];
    region.read_at(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 1), "the data came home");
}

#[test]
fn a_second_put_of_a_page_is_refused() {
    let _s = common::serial();
    let Some(mm) = common::mm() else { return };
    let arena = Mapping::builder(4 * PAGE_SIZE).build().unwrap();
    let pm = DevicePagemap::new(
        &mm,
        Owner::unique(),
        Faulty::new(&arena),
        PagemapConfig::default(),
    )
    .unwrap();
    let p = pm.alloc(1).unwrap()[0];
    pm.put(p).unwrap();
    assert!(matches!(pm.put(p), Err(DevmemError::BadPfn { pfn }) if pfn == p));
    assert!(pm.put(DevicePfn(1 << 40)).is_err());
    let st = pm.stats();
    assert_eq!((st.in_use, st.freed), (0, 1));
}

#[test]
fn pagemap_configs_out_of_bounds_are_refused_at_once() {
    let _s = common::serial();
    let Some(mm) = common::mm() else { return };
    let arena = Mapping::builder(4 * PAGE_SIZE).build().unwrap();
    let dev = Faulty::new(&arena);
    let t0 = Instant::now();
    for (chunk_pages, max_chunks) in [
        (usize::MAX, 64),
        (256 << 20, 64), // 256 MiB given in bytes
        (0, 1),
        (1, 0),
        (PagemapConfig::MAX_CHUNK_PAGES, usize::MAX),
    ] {
        let cfg = PagemapConfig {
            chunk_pages,
            max_chunks,
        };
        let r = DevicePagemap::new(&mm, Owner::unique(), dev.clone(), cfg);
        assert!(
            matches!(r, Err(DevmemError::BadConfig { .. })),
            "{cfg:?}: {r:?}"
        );
    }
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert!(PagemapConfig::from_bytes(256 << 20, 16 << 30).is_ok());
    assert!(PagemapConfig::from_bytes(256 << 20, (16 << 30) + 4096).is_err());
    assert!(PagemapConfig::from_bytes(1000, 1 << 20).is_err());
}
