//! The flight recorder (`uhmm::record`) tells a page's way: a page migrated
//! to a device and faulted back shows the scan that found it, its move out
//! of the process, the states it was given, the fault, and its move home,
//! in that order and with the kernel's answers.
#![allow(unsafe_code)]

#[path = "../../uhmm/tests/common/mod.rs"]
mod common;

use uhmm::record::{self, What};
use uhmm::sys::mem::Backing;
use uhmm::{PAGE_SIZE, PageRange, VirtAddr};
use uhmm_sim::SimDevice;

#[test]
fn a_migrated_page_s_way_is_recorded() {
    let Some(mm) = common::mm() else { return };
    let region = mm.alloc(2 * PAGE_SIZE, Backing::AnonPrivate).unwrap();
    let b = region.as_ptr() as usize;
    // SAFETY: our own managed region; no reference into it.
    unsafe { (b as *mut u64).write_volatile(0xAB) };
    let page = PageRange::new(VirtAddr::new(b), PAGE_SIZE).unwrap();
    let dev = SimDevice::new(&mm);
    record::set_recording(true);
    assert_eq!(dev.migrate_range_to_device(page.start(), 1).unwrap(), 1);
    // SAFETY: as above; the read faults the page back.
    let back = unsafe { (b as *const u64).read_volatile() };
    record::set_recording(false);
    assert_eq!(back, 0xAB);
    let seen = record::records_for(page);
    let text: Vec<String> = seen.iter().map(ToString::to_string).collect();
    let text = text.join("\n");
    let pos = |what: What, f: &dyn Fn(&record::Record) -> bool| {
        seen.iter()
            .position(|r| r.what == what && f(r))
            .unwrap_or_else(|| panic!("no {what:?} record for the page in:\n{text}"))
    };
    let scan = pos(What::Scan, &|r| r.count >= 1);
    let out = pos(What::Move, &|r| r.src == b && r.errno == 0);
    let migrating = pos(What::State, &|r| r.to_string().contains("Migrating"));
    let on_device = pos(What::State, &|r| r.to_string().contains("Device"));
    let fault = pos(What::Fault, &|r| r.dst & !(PAGE_SIZE - 1) == b);
    let home = pos(What::Move, &|r| r.dst == b && r.errno == 0);
    let cpu = seen
        .iter()
        .rposition(|r| r.what == What::State && r.to_string().contains("Cpu"))
        .unwrap_or_else(|| panic!("no Cpu state for the page in:\n{text}"));
    assert!(
        scan < out && out < migrating && migrating < on_device && on_device < fault,
        "out of order:\n{text}"
    );
    assert!(fault < home && fault < cpu, "out of order:\n{text}");
    assert!(seen.windows(2).all(|w| w[0].seq < w[1].seq));
    eprintln!("{text}");
    // The move out names the page's staging slot, whose records show the
    // page moving on into device memory.
    let slot = PageRange::new(VirtAddr::new(seen[out].dst), PAGE_SIZE).unwrap();
    assert!(
        record::records_for(slot)
            .iter()
            .any(|r| r.what == What::Move && r.src == slot.start().get() && r.seq > seen[out].seq),
        "no move out of the staging slot {slot}"
    );
    // Off: nothing more is recorded. (After a pause: the fault service
    // may still be finishing the fault back, whose records were begun.)
    std::thread::sleep(std::time::Duration::from_millis(100));
    let before = record::recorded();
    // SAFETY: as above.
    unsafe { (b as *mut u64).write_volatile(0xAC) };
    assert_eq!(dev.migrate_range_to_device(page.start(), 1).unwrap(), 1);
    assert_eq!(record::recorded(), before);
}
