//! Races and orders around device memory found by a review of the 2 MiB
//! device pages and the staging-run bookkeeping: each test forces the
//! interleaving (a callback that parks until told) and failed before its
//! fix.
#![allow(unsafe_code)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use uhmm::devmem::pagemap::HUGE_PAGES;
use uhmm::devmem::{
    DeviceFault, DevicePagemap, DevicePagemapOps, DevmemError, FaultError, MigrateVma,
    PagemapConfig, Select,
};
use uhmm::mm::Owner;
use uhmm::mm::notifier::{NotifierOps, NotifierRange, Subscription};
use uhmm::mm::range::HmmRange;
use uhmm::sys::mem::{Backing, Prot};
use uhmm::{DevicePfn, PAGE_SIZE, PageRange, VirtAddr};

#[derive(Debug)]
struct Idle;

impl DevicePagemapOps for Idle {
    fn page_free(&self, _pfn: DevicePfn) {}
    fn migrate_to_ram(&self, _f: &DeviceFault<'_>) -> Result<(), FaultError> {
        Err(FaultError::Retry)
    }
}

/// A hole that a migration took, put back by UFFDIO_COPY (the MOVE is
/// refused with EINVAL after an mprotect), faults the zero page into its
/// staging slot: the run must not be called clean, or the next migration
/// through that slot cannot take its page (EEXIST).
#[test]
fn a_hole_put_back_by_copy_does_not_leave_its_staging_slot_marked_clean() {
    let _s = common::serial();
    let Some(mm) = common::mm() else { return };
    let region = mm.alloc(4 * PAGE_SIZE, Backing::AnonPrivate).unwrap();
    let owner = Owner::unique();
    let _pm = DevicePagemap::new(&mm, owner, Arc::new(Idle), PagemapConfig::default()).unwrap();
    let page = PageRange::new(region.range().start(), PAGE_SIZE).unwrap();
    // Page 0 is a hole: taken as it is (Moved, Zero, its slot a hole).
    let m = MigrateVma::setup(&mm, page, Select::SYSTEM, owner).unwrap();
    assert_eq!(m.cpages(), 1);
    // The program makes the page read-only while it is in flight: the
    // put-back's MOVE is refused (EINVAL: the two mappings' protections
    // differ) and falls back to COPY from the slot, a hole, which faults
    // the zero page into the staging slot.
    mm.mprotect(page, Prot::READ).unwrap();
    drop(m);
    mm.mprotect(page, Prot::READ | Prot::WRITE).unwrap();
    region.write_at(0, &[0x5A; PAGE_SIZE]).unwrap();
    // The same page again, now with data: same slot (the run's block is
    // the clean block freed last).
    let m = MigrateVma::setup(&mm, page, Select::SYSTEM, owner).unwrap();
    assert_eq!(
        m.cpages(),
        1,
        "a page with data could not be taken: its staging slot still holds the zero page \
         the put-back's COPY faulted in, and the run was freed as clean"
    );
    drop(m);
    let mut b = [0u8; 4];
    region.read_at(0, &mut b).unwrap();
    assert_eq!(b, [0x5A; 4]);
}

/// A device whose `page_free` of one chosen page blocks until released.
#[derive(Debug, Default)]
struct SlowFree {
    block: Mutex<Option<DevicePfn>>,
    entered: Mutex<Option<Sender<()>>>,
    release: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl DevicePagemapOps for SlowFree {
    fn page_free(&self, pfn: DevicePfn) {
        if *self.block.lock().unwrap() == Some(pfn) {
            if let Some(tx) = self.entered.lock().unwrap().take() {
                let _ = tx.send(());
            }
            if let Some(rx) = self.release.lock().unwrap().take() {
                let _ = rx.recv_timeout(Duration::from_secs(10));
            }
        }
    }
    fn migrate_to_ram(&self, _f: &DeviceFault<'_>) -> Result<(), FaultError> {
        Err(FaultError::Retry)
    }
}

/// Two threads freeing pages of one 2 MiB device page (a single `put`
/// whose `page_free` is still running, and a batch that frees all the
/// others) must not give the block back whole *and* its page one by one
/// (which hands it out as a 2 MiB page while a page of it is still in
/// `page_free`, and that page twice).
#[test]
fn a_2m_device_page_freed_by_two_threads_is_never_handed_out_twice() {
    let _s = common::serial();
    let Some(mm) = common::mm() else { return };
    let ops = Arc::new(SlowFree::default());
    let cfg = PagemapConfig {
        chunk_pages: HUGE_PAGES,
        max_chunks: 1,
    };
    let owner = Owner::unique();
    let pm = Arc::new(DevicePagemap::new(&mm, owner, ops.clone(), cfg).unwrap());
    let head = pm.alloc_huge(1).unwrap()[0];
    // Pages 1..512 of the 2 MiB page become the device homes of 511
    // virtual pages (holes); page 0 stays the device's own.
    let region = mm
        .alloc((HUGE_PAGES - 1) * PAGE_SIZE, Backing::AnonPrivate)
        .unwrap();
    let mut m = MigrateVma::setup(&mm, region.range(), Select::SYSTEM, owner).unwrap();
    assert_eq!(m.cpages(), HUGE_PAGES - 1);
    for i in 0..HUGE_PAGES - 1 {
        m.set_device_dst(i, DevicePfn(head.0 + 1 + i as u64))
            .unwrap();
    }
    m.pages();
    assert_eq!(m.migrated_count(), HUGE_PAGES - 1);
    m.finalize();
    assert_eq!(pm.stats().huge_pages, 1);
    // Thread A drops the device's own reference to page 0: its page_free
    // is slow.
    let (etx, erx) = channel();
    let (rtx, rrx) = channel();
    *ops.block.lock().unwrap() = Some(head);
    *ops.entered.lock().unwrap() = Some(etx);
    *ops.release.lock().unwrap() = Some(rrx);
    let pm2 = pm.clone();
    let a = std::thread::spawn(move || pm2.put(head).unwrap());
    erx.recv_timeout(Duration::from_secs(5)).unwrap();
    // Meanwhile the region goes: its 511 pages are freed in one batch.
    drop(region);
    // Page 0's page_free has not returned: the block must not be handed
    // out as a whole 2 MiB page yet.
    let early = pm.alloc_huge(1);
    rtx.send(()).unwrap();
    a.join().unwrap();
    let single = pm.alloc(1);
    let early_ok = early.is_ok();
    let twice = matches!((&early, &single), (Ok(h), Ok(s)) if h[0] == head && s[0] == head);
    assert!(
        !early_ok && !twice,
        "alloc_huge while page 0's page_free ran: {early:?}; then alloc(1): {single:?} \
         (page {head:?} handed out twice: {twice})"
    );
}

/// A device whose `add_chunk` (run under the pagemap's pool lock) asks
/// uhmm a read-only question, as DESIGN.md allows: `Mm::device_page`.
#[derive(Debug, Default)]
struct AskingDevice {
    mm: OnceLock<uhmm::mm::Mm>,
    armed: AtomicBool,
    entered: Mutex<Option<Sender<()>>>,
    at: OnceLock<(VirtAddr, Owner)>,
}

impl DevicePagemapOps for AskingDevice {
    fn page_free(&self, _pfn: DevicePfn) {}
    fn migrate_to_ram(&self, _f: &DeviceFault<'_>) -> Result<(), FaultError> {
        Err(FaultError::Retry)
    }
    fn add_chunk(&self, _first: DevicePfn, _npages: usize) -> Result<(), DevmemError> {
        if self.armed.swap(false, Ordering::AcqRel) {
            if let Some(tx) = self.entered.lock().unwrap().take() {
                let _ = tx.send(());
            }
            std::thread::sleep(Duration::from_millis(300));
            let (addr, owner) = *self.at.get().unwrap();
            let _ = self.mm.get().unwrap().device_page(addr, owner);
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Seq;
impl NotifierOps for Seq {
    fn invalidate(&self, sub: &Subscription, _r: &NotifierRange, cur_seq: u64) -> bool {
        sub.set_seq(cur_seq);
        true
    }
}

/// `range_fault` must not ask the pagemap's pool (is a device page a 2 MiB
/// one?) under the regions lock: `add_chunk` runs under the pool lock and
/// may call `Mm::device_page` (regions lock).
#[test]
fn range_fault_and_an_add_chunk_that_asks_uhmm_do_not_deadlock() {
    let _s = common::serial();
    let Some(mm) = common::mm() else { return };
    let ops = Arc::new(AskingDevice::default());
    ops.mm.set(mm.clone()).unwrap();
    let owner = Owner::unique();
    let cfg = PagemapConfig {
        chunk_pages: 16,
        max_chunks: 4,
    };
    let pm = Arc::new(DevicePagemap::new(&mm, owner, ops.clone(), cfg).unwrap());
    let region = mm.alloc(4 << 20, Backing::AnonPrivate).unwrap();
    let aligned = VirtAddr::new((region.range().start().get() + (2 << 20) - 1) & !((2 << 20) - 1));
    let page = PageRange::new(aligned, PAGE_SIZE).unwrap();
    let _ = ops.at.set((aligned, owner));
    // Page pfn 0 (a multiple of 512) on the device at a 2 MiB-aligned address.
    let mut m = MigrateVma::setup(&mm, page, Select::SYSTEM, owner).unwrap();
    let pfn = pm.alloc(1).unwrap()[0];
    assert_eq!(pfn.0 % HUGE_PAGES as u64, 0);
    m.set_device_dst(0, pfn).unwrap();
    m.pages();
    m.finalize();
    let (etx, erx) = channel();
    *ops.entered.lock().unwrap() = Some(etx);
    ops.armed.store(true, Ordering::Release);
    let (done_tx, done_rx) = channel();
    let pm2 = pm.clone();
    let d1 = done_tx.clone();
    // The device grows its pagemap (add_chunk under the pool lock)...
    std::thread::spawn(move || {
        let _ = pm2.alloc(16);
        let _ = d1.send("alloc");
    });
    erx.recv_timeout(Duration::from_secs(5)).unwrap();
    // ... while another of its threads mirrors the range.
    let mm2 = mm.clone();
    let range = PageRange::new(aligned, 2 << 20).unwrap();
    std::thread::spawn(move || {
        let n = mm2.insert_notifier(range, Arc::new(Seq)).unwrap();
        let mut r = HmmRange::new(&n, n.read_begin(), range);
        r.dev_private_owner = Some(owner);
        let _ = mm2.range_fault(&mut r);
        let _ = done_tx.send("range_fault");
    });
    let first = done_rx.recv_timeout(Duration::from_secs(5));
    let second = done_rx.recv_timeout(Duration::from_secs(5));
    if first.is_err() || second.is_err() {
        // Deadlocked: nothing can be dropped (every drop takes a lock).
        std::mem::forget(region);
        std::mem::forget(pm);
        std::mem::forget(mm);
        panic!("deadlock: range_fault and add_chunk ({first:?}, {second:?})");
    }
}
