//! Interval notifiers with C callbacks, and `range_fault` with the
//! `HmmPfn` encoding or the driver's own.

use crate::error::{Error, call, write_out};
use crate::handle::{
    Ctx, Frame, Kind, callback, get, in_frame, owner_number, owner_opt, register, take, with_frame,
};
use crate::mm::{CMm, event_code, page_range, uhmm_mm};
use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use uhmm::DevicePfn;
use uhmm::mm::notifier::{IntervalNotifier, NotifierOps, NotifierRange, Subscription};
use uhmm::mm::range::{HmmPfn, HmmRange, PfnEncoding};

/// `range_fault` output: the page is mapped and at least readable.
pub const UHMM_PFN_VALID: u64 = 0x8000_0000_0000_0000;
/// Output: the page is writable (with `VALID`).
pub const UHMM_PFN_WRITE: u64 = 0x4000_0000_0000_0000;
/// Output: the page cannot be accessed; the device must fail the access.
pub const UHMM_PFN_ERROR: u64 = 0x2000_0000_0000_0000;
/// Output: the page is the shared zero page (read-only).
pub const UHMM_PFN_ZERO: u64 = 0x1000_0000_0000_0000;
/// Output: the page is in device memory of the range's
/// `dev_private_owner` (with `VALID`), at the device page
/// `entry & UHMM_PFN_PFN_MASK`.
pub const UHMM_PFN_DEVICE_PRIVATE: u64 = 0x0800_0000_0000_0000;
/// Input: fault the page in if it is not valid (the same bit as `VALID`).
pub const UHMM_PFN_REQ_FAULT: u64 = UHMM_PFN_VALID;
/// Input: fault the page in writable (the same bit as `WRITE`; only with
/// `REQ_FAULT`).
pub const UHMM_PFN_REQ_WRITE: u64 = UHMM_PFN_WRITE;
/// No flag: on output, "not present, but faultable".
pub const UHMM_PFN_NONE: u64 = 0;
/// The mapping order (log2 of the CPU mapping's size in pages: 0 for
/// 4 KiB, 9 for 2 MiB) is `(entry >> UHMM_PFN_ORDER_SHIFT) &
/// UHMM_PFN_ORDER_MASK`.
pub const UHMM_PFN_ORDER_SHIFT: u32 = 53;
/// See [`UHMM_PFN_ORDER_SHIFT`].
pub const UHMM_PFN_ORDER_MASK: u64 = 0x1f;
/// The device page of a `DEVICE_PRIVATE` entry is `entry &
/// UHMM_PFN_PFN_MASK`.
pub const UHMM_PFN_PFN_MASK: u64 = 0x0000_3fff_ffff_ffff;

// The encoding is uhmm's: checked against its public constants at compile
// time.
const _: () = {
    assert!(UHMM_PFN_VALID == HmmPfn::VALID.bits());
    assert!(UHMM_PFN_WRITE == HmmPfn::WRITE.bits());
    assert!(UHMM_PFN_ERROR == HmmPfn::ERROR.bits());
    assert!(UHMM_PFN_ZERO == HmmPfn::ZERO.bits());
    assert!(UHMM_PFN_DEVICE_PRIVATE == HmmPfn::DEVICE_PRIVATE.bits());
    assert!(UHMM_PFN_REQ_FAULT == HmmPfn::REQ_FAULT.bits());
    assert!(UHMM_PFN_REQ_WRITE == HmmPfn::REQ_WRITE.bits());
    assert!(UHMM_PFN_NONE == HmmPfn::NONE.bits());
    assert!(
        HmmPfn::NONE.with_order(UHMM_PFN_ORDER_MASK as u32).bits()
            == UHMM_PFN_ORDER_MASK << UHMM_PFN_ORDER_SHIFT
    );
    assert!(
        HmmPfn::device_private(DevicePfn(u64::MAX), false).bits()
            == UHMM_PFN_VALID | UHMM_PFN_DEVICE_PRIVATE | UHMM_PFN_PFN_MASK
    );
};

/// The request flags of `bits` as uhmm's type (only `REQ_FAULT` and
/// `REQ_WRITE` mean anything on input).
fn request(bits: u64) -> HmmPfn {
    let mut r = HmmPfn::NONE;
    if bits & UHMM_PFN_REQ_FAULT != 0 {
        r = r | HmmPfn::REQ_FAULT;
    }
    if bits & UHMM_PFN_REQ_WRITE != 0 {
        r = r | HmmPfn::REQ_WRITE;
    }
    r
}

/// An interval notifier: a device's registration over a range, whose
/// callback is told of every change there. Opaque.
#[derive(Debug)]
pub struct uhmm_notifier {
    _opaque: [u8; 0],
}

/// One registered notifier as its callback sees it: passed to the
/// invalidate callback for [`uhmm_subscription_set_seq`]. Opaque; valid
/// only during that callback, on its thread.
#[derive(Debug)]
pub struct uhmm_subscription {
    _opaque: [u8; 0],
}

/// One invalidation: which pages, why, on whose behalf.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct uhmm_notifier_range {
    /// The first page invalidated.
    pub start: usize,
    /// Bytes invalidated (whole pages).
    pub len: usize,
    /// Why: `UHMM_EVENT_*`.
    pub event: u32,
    /// Whether the callback may block. When false, a callback that would
    /// have to wait for a lock returns false, and the invalidation is
    /// retried later.
    pub blockable: bool,
    /// The device that caused it (for `MIGRATE`, `EXCLUSIVE`), so that a
    /// device can skip its own; 0 for none.
    pub owner: u64,
}

/// A device's reaction to invalidations (the kernel's
/// `mmu_interval_notifier_ops.invalidate`): stop all device use of
/// `range` (its part inside the notifier) before returning, and call
/// [`uhmm_subscription_set_seq`]`(sub, cur_seq)` under the lock the
/// device's mirror path holds around [`uhmm_notifier_read_retry`]. Return
/// false only when `range->blockable` is false and the work would have to
/// block (a false for a blockable range is taken as true: the sequence is
/// set on the callback's behalf, and a warning printed once). Runs on any
/// thread, the fault service included; must not insert or destroy
/// notifiers, nor unwind.
pub type uhmm_invalidate_fn = Option<
    unsafe extern "C" fn(
        ctx: *mut c_void,
        sub: *const uhmm_subscription,
        range: *const uhmm_notifier_range,
        cur_seq: u64,
    ) -> bool,
>;

thread_local! {
    /// The subscriptions whose callback runs on this thread.
    static ACTIVE_SUBS: Cell<*const Frame<()>> = const { Cell::new(std::ptr::null()) };
}

struct COps {
    invalidate: unsafe extern "C" fn(
        *mut c_void,
        *const uhmm_subscription,
        *const uhmm_notifier_range,
        u64,
    ) -> bool,
    ctx: Ctx,
    warned: AtomicBool,
}

impl fmt::Debug for COps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("COps").field("ctx", &self.ctx).finish()
    }
}

impl NotifierOps for COps {
    fn invalidate(&self, sub: &Subscription, r: &NotifierRange, cur_seq: u64) -> bool {
        let range = uhmm_notifier_range {
            start: r.range.start().get(),
            len: r.range.len(),
            event: event_code(r.event),
            blockable: r.blockable,
            owner: r.owner.map_or(0, owner_number),
        };
        let key = sub as *const Subscription as usize;
        let done = with_frame(&ACTIVE_SUBS, key, (), |_| {
            callback(|| {
                // SAFETY: a C function pointer given to uhmm_notifier_insert
                // with this signature; `range` and the subscription outlive
                // the call, and the context is the caller's.
                unsafe {
                    (self.invalidate)(self.ctx.0, key as *const uhmm_subscription, &range, cur_seq)
                }
            })
        });
        if !done && r.blockable {
            if !self.warned.swap(true, Ordering::Relaxed) {
                eprintln!(
                    "uhmm: an invalidate callback returned false for a blockable range ({}); taken as true",
                    r.range
                );
            }
            sub.set_seq(cur_seq);
            return true;
        }
        done
    }
}

#[derive(Debug)]
pub(crate) struct CNotifier {
    pub(crate) notifier: IntervalNotifier,
}

impl Kind for CNotifier {
    const NAME: &'static str = "uhmm_notifier";
}

/// Registers `invalidate` (with `ctx`) for invalidations overlapping the
/// `len` bytes at `addr` (page-aligned). `*out` receives the notifier;
/// destroy it with [`uhmm_notifier_destroy`]. The callback may run before
/// this function returns.
///
/// Returns 0, `-EINVAL` for a bad range or a NULL callback, `-ECHILD` in
/// a forked child.
///
/// # Safety
///
/// `out` is NULL or valid for a write; `invalidate` is a function of the
/// type's signature that keeps its contract, and `ctx` is usable by it
/// from any thread until the notifier is destroyed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_notifier_insert(
    mm: *const uhmm_mm,
    addr: usize,
    len: usize,
    invalidate: uhmm_invalidate_fn,
    ctx: *mut c_void,
    out: *mut *mut uhmm_notifier,
) -> c_int {
    call(|| {
        if out.is_null() {
            return Err(Error::null("out"));
        }
        let invalidate = invalidate.ok_or_else(|| Error::null("invalidate"))?;
        let m = get::<CMm, _>(mm)?;
        let ops = Arc::new(COps {
            invalidate,
            ctx: Ctx(ctx),
            warned: AtomicBool::new(false),
        });
        let notifier = m.mm.insert_notifier(page_range(addr, len)?, ops)?;
        let h = register(CNotifier { notifier });
        // SAFETY: `out` is not NULL and the caller vouches for it.
        unsafe { write_out(out, "out", h) }
    })
}

/// Records that an invalidation with sequence `cur_seq` hit this
/// subscription. Call it from the invalidate callback, on its thread,
/// under the device's mirror lock.
///
/// Returns 0, or `-EINVAL` if `sub` is not the subscription of a callback
/// running on this thread.
#[unsafe(no_mangle)]
pub extern "C" fn uhmm_subscription_set_seq(sub: *const uhmm_subscription, cur_seq: u64) -> c_int {
    call(|| {
        if sub.is_null() {
            return Err(Error::null("sub"));
        }
        let key = sub as usize;
        if in_frame(&ACTIVE_SUBS, Some(key), |_| ()).is_none() {
            return Err(Error::inval(
                "not the subscription of an invalidate callback running on this thread",
            ));
        }
        // SAFETY: `key` is on this thread's list of running callbacks'
        // subscriptions: `COps::invalidate` put it there from a
        // `&Subscription` that lives until it takes it off, after the
        // callback returned.
        let s = unsafe { &*(key as *const Subscription) };
        s.set_seq(cur_seq);
        Ok(())
    })
}

/// Begins a read of the CPU page table (the kernel's
/// `mmu_interval_read_begin`): waits while an invalidation of this
/// notifier runs, then `*seq` receives the sequence to give
/// [`uhmm_range_fault`] and [`uhmm_notifier_read_retry`].
///
/// Returns 0, `-EINVAL` for a bad argument, `-EDEADLK` from this
/// notifier's own invalidate callback (it would wait for that callback to
/// return, for ever).
///
/// # Safety
///
/// `seq` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_notifier_read_begin(n: *const uhmm_notifier, seq: *mut u64) -> c_int {
    call(|| {
        if seq.is_null() {
            return Err(Error::null("seq"));
        }
        let cn = get::<CNotifier, _>(n)?;
        let own = cn.notifier.subscription() as *const Subscription as usize;
        if in_frame(&ACTIVE_SUBS, Some(own), |_| ()).is_some() {
            return Err(Error::new(
                libc::EDEADLK,
                "uhmm_notifier_read_begin in the notifier's own invalidate callback would wait \
                 for that callback to return",
            ));
        }
        let s = cn.notifier.read_begin();
        // SAFETY: not NULL, and the caller vouches for it.
        unsafe { write_out(seq, "seq", s) }
    })
}

/// Whether an invalidation hit the notifier since
/// [`uhmm_notifier_read_begin`] gave `seq` (the kernel's
/// `mmu_interval_read_retry`): 1 if so (start again), 0 if not, a negative
/// errno for a bad handle. Reliable only under the lock the invalidate
/// callback holds around [`uhmm_subscription_set_seq`].
#[unsafe(no_mangle)]
pub extern "C" fn uhmm_notifier_read_retry(n: *const uhmm_notifier, seq: u64) -> c_int {
    crate::error::call_value(
        -libc::EIO,
        |e| -e.errno,
        || {
            Ok(c_int::from(
                get::<CNotifier, _>(n)?.notifier.read_retry(seq),
            ))
        },
    )
}

/// Unregisters the notifier, waiting for running invalidations to end; no
/// callback runs after it returns. NULL does nothing.
///
/// Returns 0, `-EINVAL` for a handle that is not a live notifier,
/// `-EDEADLK` inside a uhmm callback (nothing is done).
#[unsafe(no_mangle)]
pub extern "C" fn uhmm_notifier_destroy(n: *mut uhmm_notifier) -> c_int {
    call(|| take::<CNotifier, _>(n).map(drop))
}

/// A `range_fault` request (the kernel's `struct hmm_range`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct uhmm_range {
    /// The notifier the device mirrors the range under.
    pub notifier: *const uhmm_notifier,
    /// What [`uhmm_notifier_read_begin`] gave.
    pub notifier_seq: u64,
    /// The first page (page-aligned).
    pub start: usize,
    /// Bytes (a non-zero multiple of the page size).
    pub len: usize,
    /// Request flags for every page (`UHMM_PFN_REQ_FAULT`,
    /// `UHMM_PFN_REQ_WRITE`).
    pub default_flags: u64,
    /// Which per-entry request bits of `pfns` are honoured: the request
    /// for page i is `(pfns[i] & pfn_flags_mask) | default_flags`.
    pub pfn_flags_mask: u64,
    /// Device-private pages of this owner are reported
    /// (`UHMM_PFN_DEVICE_PRIVATE`) instead of faulted back; 0 for none.
    pub dev_private_owner: u64,
    /// One entry per page: requests in, states out (`UHMM_PFN_*`, written
    /// only on success).
    pub pfns: *mut u64,
    /// Entries in `pfns`: `len / UHMM_PAGE_SIZE`.
    pub npfns: usize,
}

/// Checks `r` and runs `f` with uhmm's request built from it; `f` gets the
/// entries as uhmm filled them.
///
/// # Safety
///
/// `r` is NULL or valid for reads; its `pfns` NULL or valid for reads of
/// `npfns` entries.
unsafe fn with_range(
    mm: *const uhmm_mm,
    r: *const uhmm_range,
    f: impl FnOnce(&CMm, &mut HmmRange<'_>) -> Result<(), Error>,
) -> Result<(), Error> {
    if r.is_null() {
        return Err(Error::null("range"));
    }
    // SAFETY: not NULL, and the caller vouches for it.
    let r = unsafe { r.read() };
    let m = get::<CMm, _>(mm)?;
    let n = get::<CNotifier, _>(r.notifier)?;
    // (A notifier of another address space is refused by range_fault.)
    let range = page_range(r.start, r.len)?;
    if r.pfns.is_null() {
        return Err(Error::null("range->pfns"));
    }
    if r.npfns != range.npages() {
        return Err(Error::inval(format!(
            "range->npfns is {} but the range has {} pages",
            r.npfns,
            range.npages()
        )));
    }
    // SAFETY: not NULL, and the caller vouches for `npfns` entries.
    let pfns = unsafe { std::slice::from_raw_parts(r.pfns, r.npfns) };
    let mut h = HmmRange::new(&n.notifier, r.notifier_seq, range);
    h.default_flags = request(r.default_flags);
    h.pfn_flags_mask = request(r.pfn_flags_mask);
    h.dev_private_owner = owner_opt(r.dev_private_owner)?;
    for (d, &s) in h.pfns.iter_mut().zip(pfns) {
        *d = request(s);
    }
    f(&m, &mut h)
}

/// Snapshots the CPU page table over `r->start .. +len` into `r->pfns`,
/// faulting in the pages the request flags ask for, on the calling thread
/// (the kernel's `hmm_range_fault`). Use the result under the device's
/// lock after [`uhmm_notifier_read_retry`] said 0.
///
/// Returns 0; `-EBUSY` if an invalidation raced (read_begin again and
/// retry); `-EFAULT` if a requested page cannot be made valid; `-EPERM`
/// for a write to read-only memory; `-EINVAL` for a bad request (a range
/// outside the notifier, a wrong `npfns`, NULL pointers, an owner not
/// made by [`uhmm_owner_unique`]); `-ENOMEM`; `-ECHILD` in a forked child.
///
/// # Safety
///
/// `r` is NULL or valid for reads; its `pfns` NULL or valid for reads and
/// writes of `npfns` entries.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_range_fault(mm: *const uhmm_mm, r: *mut uhmm_range) -> c_int {
    call(|| {
        // SAFETY: the caller vouches for `r` and its entries.
        unsafe {
            with_range(mm, r, |m, h| {
                m.mm.range_fault(h)?;
                let out = std::slice::from_raw_parts_mut((*r).pfns, h.pfns.len());
                for (d, s) in out.iter_mut().zip(&h.pfns) {
                    *d = s.bits();
                }
                Ok(())
            })
        }
    })
}

/// A driver's own page-table entry format: called once per page with its
/// address and `UHMM_PFN_*` entry, it returns the device's entry. Runs on
/// the calling thread, before `uhmm_range_fault_encoded` returns; must not
/// unwind.
pub type uhmm_encode_fn =
    Option<unsafe extern "C" fn(ctx: *mut c_void, addr: usize, pfn: u64) -> u64>;

struct CEncoding {
    encode: unsafe extern "C" fn(*mut c_void, usize, u64) -> u64,
    ctx: *mut c_void,
}

impl PfnEncoding for CEncoding {
    type Entry = u64;
    fn encode(&self, addr: uhmm::VirtAddr, pfn: HmmPfn) -> u64 {
        // SAFETY: a C function pointer of this signature given to
        // uhmm_range_fault_encoded, called on its thread before it returns.
        callback(|| unsafe { (self.encode)(self.ctx, addr.get(), pfn.bits()) })
    }
}

/// [`uhmm_range_fault`], then each page's entry in the driver's encoding:
/// `out[i] = encode(ctx, address of page i, entry i)` (the seed series'
/// "use device driver encoding for HMM pfn"). `r->pfns` receives uhmm's
/// entries as with `uhmm_range_fault`; `out` is written only on success.
///
/// # Safety
///
/// As [`uhmm_range_fault`]; `out` is NULL or valid for writes of
/// `r->npfns` entries; `encode` keeps its contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_range_fault_encoded(
    mm: *const uhmm_mm,
    r: *mut uhmm_range,
    encode: uhmm_encode_fn,
    ctx: *mut c_void,
    out: *mut u64,
) -> c_int {
    call(|| {
        let encode = encode.ok_or_else(|| Error::null("encode"))?;
        if out.is_null() {
            return Err(Error::null("out"));
        }
        let enc = CEncoding { encode, ctx };
        // SAFETY: the caller vouches for `r`, its entries and `out`.
        unsafe {
            with_range(mm, r, |m, h| {
                let mut entries = Vec::with_capacity(h.pfns.len());
                m.mm.range_fault_encoded(h, &enc, &mut entries)?;
                let pfns = std::slice::from_raw_parts_mut((*r).pfns, h.pfns.len());
                for (d, s) in pfns.iter_mut().zip(&h.pfns) {
                    *d = s.bits();
                }
                std::slice::from_raw_parts_mut(out, entries.len()).copy_from_slice(&entries);
                Ok(())
            })
        }
    })
}

/// The mapping order of a `range_fault` entry (0 for a 4 KiB page, 9 for a
/// slot of a 2 MiB one).
#[unsafe(no_mangle)]
pub extern "C" fn uhmm_pfn_order(entry: u64) -> u32 {
    ((entry >> UHMM_PFN_ORDER_SHIFT) & UHMM_PFN_ORDER_MASK) as u32
}

/// The device page of a `range_fault` entry with `UHMM_PFN_DEVICE_PRIVATE`
/// (`*pfn`); returns 0, or `-ENOENT` for another entry.
///
/// # Safety
///
/// `pfn` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_pfn_device_pfn(entry: u64, pfn: *mut u64) -> c_int {
    call(|| {
        if entry & UHMM_PFN_DEVICE_PRIVATE == 0 {
            return Err(Error::new(libc::ENOENT, "not a device-private entry"));
        }
        // SAFETY: the caller vouches for `pfn`.
        unsafe { write_out(pfn, "pfn", entry & UHMM_PFN_PFN_MASK) }
    })
}
