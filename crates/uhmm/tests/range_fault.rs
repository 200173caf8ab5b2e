//! `Mm::range_fault`: snapshot and fault with the kernel's request/output
//! semantics, on real memory.

mod common;

use common::{ChildEnd, fork_lock};
use std::sync::Arc;
use uhmm::mm::notifier::{NotifierOps, NotifierRange, Subscription};
use uhmm::mm::range::{HmmPfn, HmmRange, PfnEncoding, RangeFaultError};
use uhmm::mm::{ManagedRegion, Mm};
use uhmm::sys::mem::{Advice, Backing, Prot};
use uhmm::{PAGE_SIZE, VirtAddr};

#[derive(Debug, Default)]
struct Seq;

impl NotifierOps for Seq {
    fn invalidate(&self, sub: &Subscription, _: &NotifierRange, cur_seq: u64) -> bool {
        sub.set_seq(cur_seq);
        true
    }
}

const V: HmmPfn = HmmPfn::VALID;
const W: HmmPfn = HmmPfn::WRITE;

/// Runs range_fault over the whole region with the given request.
fn fault(
    mm: &Mm,
    region: &ManagedRegion,
    default: HmmPfn,
    mask: HmmPfn,
    pfns: Option<Vec<HmmPfn>>,
) -> Result<Vec<HmmPfn>, RangeFaultError> {
    let n = mm.insert_notifier(region.range(), Arc::new(Seq)).unwrap();
    let mut r = HmmRange::new(&n, n.read_begin(), region.range());
    r.default_flags = default;
    r.pfn_flags_mask = mask;
    if let Some(p) = pfns {
        r.pfns = p;
    }
    mm.range_fault(&mut r)?;
    Ok(r.pfns)
}

/// `pages` pages of 4 KiB-mapped private memory: page 0 written, page 1
/// read (the zero page), the rest untouched.
fn sample(mm: &Mm, pages: usize) -> ManagedRegion {
    let region = mm.alloc(pages * PAGE_SIZE, Backing::AnonPrivate).unwrap();
    let map = region.mapping().unwrap();
    map.advise(region.range(), Advice::NoHugePage).unwrap();
    region.write_at(0, &[1]).unwrap();
    common::touch_read(region.range().page(1).unwrap().start().get());
    region
}

#[test]
fn snapshot_reports_without_faulting() {
    let _serial = common::serial();
    let Some(mm) = common::mm() else { return };
    let region = sample(&mm, 4);
    let got = fault(&mm, &region, HmmPfn::NONE, HmmPfn::NONE, None).unwrap();
    assert_eq!(got, [V | W, V | HmmPfn::ZERO, HmmPfn::NONE, HmmPfn::NONE]);
}

#[test]
fn faulting_everything_readable_and_some_pages_writable() {
    let _serial = common::serial();
    let Some(mm) = common::mm() else { return };
    let region = mm.alloc(4 * PAGE_SIZE, Backing::AnonPrivate).unwrap();
    region
        .mapping()
        .unwrap()
        .advise(region.range(), Advice::NoHugePage)
        .unwrap();
    let got = fault(&mm, &region, HmmPfn::REQ_FAULT, HmmPfn::NONE, None).unwrap();
    assert!(
        got.iter().all(|p| p.contains(V) && !p.contains(W)),
        "{got:?}"
    );
    let mut pfns = vec![HmmPfn::NONE; 4];
    pfns[2] = HmmPfn::REQ_WRITE;
    pfns[3] = HmmPfn::REQ_WRITE | HmmPfn::ERROR; // bits outside the mask are ignored
    let got = fault(
        &mm,
        &region,
        HmmPfn::REQ_FAULT,
        HmmPfn::REQ_WRITE,
        Some(pfns),
    )
    .unwrap();
    assert_eq!(got[2], V | W);
    assert_eq!(got[3], V | W);
    assert!(got[0].contains(V) && !got[0].contains(W), "{got:?}");
    let mut b = [9u8; 1];
    region.read_at(2 * PAGE_SIZE, &mut b).unwrap();
    assert_eq!(b, [0], "faulting does not change contents");
}

#[test]
fn inaccessible_pages_are_errors_or_fail_the_fault() {
    let _serial = common::serial();
    let Some(mm) = common::mm() else { return };
    let region = mm.alloc(2 * PAGE_SIZE, Backing::AnonPrivate).unwrap();
    region.write_at(0, &[7; 2 * PAGE_SIZE]).unwrap();
    mm.mprotect(region.range().page(1).unwrap(), Prot::empty())
        .unwrap();
    let got = fault(&mm, &region, HmmPfn::NONE, HmmPfn::NONE, None).unwrap();
    assert_eq!(got[1], HmmPfn::ERROR);
    let e = fault(&mm, &region, HmmPfn::REQ_FAULT, HmmPfn::NONE, None).unwrap_err();
    assert!(
        matches!(e, RangeFaultError::Fault { addr, .. } if addr == region.range().page(1).unwrap().start()),
        "{e}"
    );
    // Read-only memory: a write request is refused, and nothing changes.
    mm.mprotect(region.range(), Prot::READ).unwrap();
    let e = fault(
        &mm,
        &region,
        HmmPfn::REQ_FAULT | HmmPfn::REQ_WRITE,
        HmmPfn::NONE,
        None,
    )
    .unwrap_err();
    assert!(matches!(e, RangeFaultError::PermissionDenied { .. }), "{e}");
    let got = fault(&mm, &region, HmmPfn::REQ_FAULT, HmmPfn::NONE, None).unwrap();
    assert!(got.iter().all(|p| *p == V), "{got:?}");
    let mut b = [0u8; 2];
    region.read_at(PAGE_SIZE - 1, &mut b).unwrap();
    assert_eq!(b, [7, 7]);
}

#[test]
fn a_racing_invalidation_makes_it_busy() {
    let _serial = common::serial();
    let Some(mm) = common::mm() else { return };
    let region = mm.alloc(2 * PAGE_SIZE, Backing::AnonPrivate).unwrap();
    let n = mm.insert_notifier(region.range(), Arc::new(Seq)).unwrap();
    let seq = n.read_begin();
    mm.mprotect(region.range(), Prot::READ).unwrap(); // notifies Protection
    let mut r = HmmRange::new(&n, seq, region.range());
    assert!(matches!(
        mm.range_fault(&mut r),
        Err(RangeFaultError::Busy { .. })
    ));
    let mut r = HmmRange::new(&n, n.read_begin(), region.range());
    mm.range_fault(&mut r).unwrap();
    let mut short = HmmRange::new(&n, n.read_begin(), region.range());
    short.pfns.pop();
    assert!(matches!(
        mm.range_fault(&mut short),
        Err(RangeFaultError::BadLength { .. })
    ));
}

#[test]
fn huge_mappings_report_their_order_in_every_slot() {
    let _serial = common::serial();
    let Some(mm) = common::mm() else { return };
    let Some(region) = common::hugetlb_region(&mm) else {
        return;
    };
    let got = fault(
        &mm,
        &region,
        HmmPfn::REQ_FAULT | HmmPfn::REQ_WRITE,
        HmmPfn::NONE,
        None,
    )
    .unwrap();
    assert_eq!(got.len(), 512);
    assert!(
        got.iter().all(|p| *p == (V | W).with_order(9)),
        "{:?}",
        got[0]
    );
}

#[test]
fn after_fork_private_pages_need_a_write_fault() {
    let _g = fork_lock();
    let _serial = common::serial();
    let Some(mm) = common::mm() else { return };
    let region = mm.alloc(PAGE_SIZE, Backing::AnonPrivate).unwrap();
    region.write_at(0, &[3]).unwrap();
    assert_eq!(
        fault(&mm, &region, HmmPfn::NONE, HmmPfn::NONE, None).unwrap(),
        [V | W]
    );
    // A child that stays alive (blocked on a pipe) while the parent looks.
    let child = common::fork_blocked();
    // Copy-on-write shared with the child now: readable only, and a write
    // request breaks the sharing.
    let ro = fault(&mm, &region, HmmPfn::NONE, HmmPfn::NONE, None).unwrap();
    assert_eq!(ro, [V]);
    let req = HmmPfn::REQ_FAULT | HmmPfn::REQ_WRITE;
    assert_eq!(
        fault(&mm, &region, req, HmmPfn::NONE, None).unwrap(),
        [V | W]
    );
    assert_eq!(child.release(), ChildEnd::Exited(0));
    let mut b = [0u8; 1];
    region.read_at(0, &mut b).unwrap();
    assert_eq!(b, [3], "breaking copy-on-write keeps the data");
}

/// A device format: one byte per page in the dmirror protection encoding.
struct DmirrorBytes;

impl PfnEncoding for DmirrorBytes {
    type Entry = u8;
    fn encode(&self, _: VirtAddr, p: HmmPfn) -> u8 {
        if p.contains(HmmPfn::ERROR) {
            return 0xff;
        }
        if !p.contains(V) {
            return 0;
        }
        let base = if p.contains(HmmPfn::ZERO) { 0x10 } else { 0 };
        let rw = if p.contains(W) { 0x02 } else { 0x01 };
        base | rw | if p.order() == 9 { 0x04 } else { 0 }
    }
}

#[test]
fn entries_arrive_in_the_device_encoding() {
    let _serial = common::serial();
    let Some(mm) = common::mm() else { return };
    let region = sample(&mm, 3);
    let n = mm.insert_notifier(region.range(), Arc::new(Seq)).unwrap();
    let mut r = HmmRange::new(&n, n.read_begin(), region.range());
    let mut bytes = Vec::new();
    mm.range_fault_encoded(&mut r, &DmirrorBytes, &mut bytes)
        .unwrap();
    assert_eq!(bytes, [0x02, 0x11, 0x00]);
}
