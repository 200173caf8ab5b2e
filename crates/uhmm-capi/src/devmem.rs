//! Device memory: pagemaps with C ops (`uhmm_pagemap`), the fault handle
//! their `migrate_to_ram` gets (`uhmm_fault`), migrations
//! (`uhmm_migrate`), and host-RAM device memory for moves with no copy
//! (`uhmm_devmem`).

use crate::error::{Errno, Error, call, call_value, write_out};
use crate::handle::{
    Ctx, Frame, Kind, callback, forget, get, in_frame, owner_from, owner_number, register, take,
    with_frame,
};
use crate::mm::{CMm, page_range, uhmm_mm};
use std::cell::{Cell, RefCell};
use std::ffi::{c_int, c_void};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use uhmm::devmem::{
    DeviceFault, DevicePagemap, DevicePagemapOps, DevmemError, FaultError, MigrateError,
    MigrateSrc, MigrateVma, PageOutcome, PagemapConfig, Select,
};
use uhmm::mm::Mm;
use uhmm::sys::mem::Mapping;
use uhmm::{DevicePfn, VirtAddr};

/// [`uhmm_migrate_setup`] selects pages in system memory (and holes of
/// private memory).
pub const UHMM_SELECT_SYSTEM: u32 = 1;
/// [`uhmm_migrate_setup`] selects device pages of the migrating owner.
pub const UHMM_SELECT_DEVICE_PRIVATE: u32 = 2;
const _: () = {
    assert!(UHMM_SELECT_SYSTEM == Select::SYSTEM.bits());
    assert!(UHMM_SELECT_DEVICE_PRIVATE == Select::DEVICE_PRIVATE.bits());
};

/// A selected page's source ([`uhmm_migrate_page::src`]): not selected.
pub const UHMM_SRC_NONE: u32 = 0;
/// A hole or the zero page: allocate and clear the destination; nothing
/// to copy.
pub const UHMM_SRC_ZERO: u32 = 1;
/// A system page; its bytes are [`uhmm_migrate_src_bytes`].
pub const UHMM_SRC_SYSTEM: u32 = 2;
/// A device page of the owner, at `device_pfn`.
pub const UHMM_SRC_DEVICE: u32 = 3;

/// What became of a page at the commit ([`uhmm_migrate_outcome`]): not
/// committed yet.
pub const UHMM_OUTCOME_PENDING: u32 = 0;
/// It migrated.
pub const UHMM_OUTCOME_MIGRATED: u32 = 1;
/// It was not selected (pinned, shared, another owner's, ...).
pub const UHMM_OUTCOME_NOT_SELECTED: u32 = 2;
/// The device gave it no destination (or skipped it).
pub const UHMM_OUTCOME_NO_DESTINATION: u32 = 3;
/// The program discarded, unmapped or moved it away meanwhile.
pub const UHMM_OUTCOME_GONE: u32 = 4;
/// A passing condition refused it; trying again shortly succeeds.
pub const UHMM_OUTCOME_BUSY: u32 = 5;
/// The page table refused it.
pub const UHMM_OUTCOME_FAILED: u32 = 6;

/// The device memory of one owner (the kernel's `dev_pagemap`): device
/// pages named by number, reference-counted, with the device's ops.
/// Opaque.
#[derive(Debug)]
pub struct uhmm_pagemap {
    _opaque: [u8; 0],
}

/// A CPU access (or an eviction) that needs device pages back, as
/// `migrate_to_ram` gets it. Opaque; valid only during that callback, on
/// its thread.
#[derive(Debug)]
pub struct uhmm_fault {
    _opaque: [u8; 0],
}

/// One migration of a range between system memory and one owner's device
/// memory (the kernel's `struct migrate_vma`). Opaque; ended and freed by
/// [`uhmm_migrate_finalize`].
#[derive(Debug)]
pub struct uhmm_migrate {
    _opaque: [u8; 0],
}

/// Device memory that is host RAM, registered with an address space so
/// that pages move between it and managed memory with no copy
/// ([`uhmm_migrate_move_to_device`]). Opaque.
#[derive(Debug)]
pub struct uhmm_devmem {
    _opaque: [u8; 0],
}

/// What a device does for its device memory (the kernel's
/// `dev_pagemap_ops`). Each runs on any thread, the fault service
/// included, with the context given to [`uhmm_pagemap_create`]; none may
/// unwind.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct uhmm_pagemap_ops {
    /// The last reference to device page `pfn` went (its virtual page was
    /// unmapped, discarded or migrated back): the device may reuse it. Must
    /// not block on the device's own migration paths. May be NULL.
    pub page_free: Option<unsafe extern "C" fn(ctx: *mut c_void, pfn: u64)>,
    /// A CPU access touched device-resident pages (or an eviction runs):
    /// migrate this owner's pages in the fault's range back to system
    /// memory — [`uhmm_fault_migrate`], [`uhmm_migrate_system_dsts`] (copy
    /// each device page there), [`uhmm_migrate_pages`],
    /// [`uhmm_migrate_finalize`] — before returning. When
    /// [`uhmm_fault_blockable`] says 0 (on the fault service) do not wait
    /// for locks a faulting thread may hold: return `-EAGAIN` to be called
    /// again. Returns 0, `-EAGAIN` (or `-EBUSY`) to be called again,
    /// `-ENOMEM`, or another negative errno when the pages cannot come
    /// back (after repeated failures the access fails with SIGBUS, never
    /// zeros). An error that [`uhmm_fault_migrate`] or
    /// [`uhmm_migrate_system_dsts`] gave, returned as it is, keeps its
    /// meaning: a passing condition is retried. Any other value counts as
    /// a device failure. A migration left unfinalized is finalized when
    /// the callback returns. Required.
    pub migrate_to_ram:
        Option<unsafe extern "C" fn(ctx: *mut c_void, fault: *mut uhmm_fault) -> c_int>,
    /// Device pages `first .. first + npages` are about to be handed out
    /// for the first time (the pagemap grows by a chunk): make their
    /// backing ready. Returns 0, or a negative errno to fail the
    /// allocation that needed them. May be NULL.
    pub add_chunk:
        Option<unsafe extern "C" fn(ctx: *mut c_void, first: u64, npages: usize) -> c_int>,
}

struct COps {
    ops: uhmm_pagemap_ops,
    migrate_to_ram: unsafe extern "C" fn(*mut c_void, *mut uhmm_fault) -> c_int,
    ctx: Ctx,
}

impl fmt::Debug for COps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("COps").field("ctx", &self.ctx).finish()
    }
}

/// What `migrate_to_ram`'s fault handle points to.
struct FaultCtx<'f, 'a> {
    fault: &'f DeviceFault<'a>,
    /// Migrations made from it (their handles), finalized when the
    /// callback returns if C did not.
    migrations: RefCell<Vec<(usize, Arc<CMigrate>)>>,
}

/// The last migration error a uhmm call gave inside a `migrate_to_ram`
/// callback: its errno, and what it means for the fault.
type Passed = RefCell<Option<(c_int, FaultError)>>;

thread_local! {
    /// The fault handles whose callback runs on this thread, each with
    /// what its calls passed.
    static ACTIVE_FAULTS: Cell<*const Frame<Passed>> = const { Cell::new(std::ptr::null()) };
}

/// A migration error for C. Inside `migrate_to_ram` its meaning for the
/// fault is kept, so that a callback that returns the errno as it got it
/// passes that meaning on: a passing condition (a busy device, staging
/// full for now, a range split meanwhile) is retried, as Rust's
/// `From<MigrateError> for FaultError` makes it.
fn migrate_error(e: MigrateError) -> Error {
    let err = Error::new(e.errno(), e.to_string());
    in_frame(&ACTIVE_FAULTS, None, |f| {
        *f.data.borrow_mut() = Some((err.errno, FaultError::from(e)));
    });
    err
}

fn strerror(errno: c_int) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}

impl DevicePagemapOps for COps {
    fn page_free(&self, pfn: DevicePfn) {
        if let Some(f) = self.ops.page_free {
            // SAFETY: a C function pointer of this signature given in the
            // ops; the context is the caller's.
            callback(|| unsafe { f(self.ctx.0, pfn.0) });
        }
    }

    fn migrate_to_ram(&self, fault: &DeviceFault<'_>) -> Result<(), FaultError> {
        let fc = FaultCtx {
            fault,
            migrations: RefCell::new(Vec::new()),
        };
        let key = &fc as *const FaultCtx<'_, '_> as usize;
        let (rc, passed) = with_frame(&ACTIVE_FAULTS, key, RefCell::new(None), |frame| {
            // SAFETY: a C function pointer of this signature given in the
            // ops; the fault handle is `fc`, alive until after the call.
            let rc =
                callback(|| unsafe { (self.migrate_to_ram)(self.ctx.0, key as *mut uhmm_fault) });
            (rc, frame.data.take())
        });
        // A migration the callback left open borrows the fault: end it now.
        for (h, m) in fc.migrations.take() {
            let left = m.lock().take();
            forget(h);
            if let Some(st) = left {
                eprintln!("uhmm: migrate_to_ram returned without uhmm_migrate_finalize; finalized");
                st.finalize();
            }
        }
        match rc {
            0 => Ok(()),
            // The error a uhmm call gave it, returned as it was.
            rc if passed.as_ref().is_some_and(|(errno, _)| -errno == rc) => {
                Err(passed.map_or(FaultError::Retry, |(_, meaning)| meaning))
            }
            rc if rc == -libc::EAGAIN || rc == -libc::EBUSY => Err(FaultError::Retry),
            rc if rc == -libc::ENOMEM => Err(FaultError::NoMemory),
            rc if rc < 0 && rc > -4096 => Err(FaultError::Device(format!(
                "migrate_to_ram failed: {}",
                strerror(-rc)
            ))),
            rc => Err(FaultError::Device(format!(
                "migrate_to_ram returned {rc}, not 0 or a negative errno"
            ))),
        }
    }

    fn add_chunk(&self, first: DevicePfn, npages: usize) -> Result<(), DevmemError> {
        let Some(f) = self.ops.add_chunk else {
            return Ok(());
        };
        // SAFETY: a C function pointer of this signature given in the ops.
        match callback(|| unsafe { f(self.ctx.0, first.0, npages) }) {
            0 => Ok(()),
            rc if rc < 0 && rc > -4096 => Err(DevmemError::Grow {
                reason: format!("add_chunk failed: {}", strerror(-rc)),
            }),
            rc => Err(DevmemError::Grow {
                reason: format!("add_chunk returned {rc}, not 0 or a negative errno"),
            }),
        }
    }
}

#[derive(Debug)]
struct CPagemap {
    pagemap: DevicePagemap,
}

impl Kind for CPagemap {
    const NAME: &'static str = "uhmm_pagemap";
}

/// Gives device memory to `owner` (from [`uhmm_owner_unique`]) in `mm`'s
/// address space: up to `max_chunks` chunks of `chunk_pages` pages of
/// [`crate::UHMM_PAGE_SIZE`] bytes each, added as allocations need them
/// (both 0: uhmm's default, 64 chunks of 256 MiB). `ops` is copied;
/// `ctx` is passed to each op. Destroy it with [`uhmm_pagemap_destroy`].
///
/// Returns 0, `-EINVAL` for a bad size, owner or ops (`migrate_to_ram` is
/// required), `-EEXIST` if `owner` has a pagemap in `mm` already,
/// `-ECHILD` in a forked child.
///
/// # Safety
///
/// `ops` is NULL or valid for a read, its functions keep their contracts;
/// `ctx` is usable by them from any thread until the pagemap is
/// destroyed; `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_pagemap_create(
    mm: *const uhmm_mm,
    owner: u64,
    ops: *const uhmm_pagemap_ops,
    ctx: *mut c_void,
    chunk_pages: usize,
    max_chunks: usize,
    out: *mut *mut uhmm_pagemap,
) -> c_int {
    call(|| {
        if out.is_null() {
            return Err(Error::null("out"));
        }
        if ops.is_null() {
            return Err(Error::null("ops"));
        }
        // SAFETY: not NULL, and the caller vouches for it.
        let ops = unsafe { ops.read() };
        let migrate_to_ram = ops
            .migrate_to_ram
            .ok_or_else(|| Error::null("ops->migrate_to_ram"))?;
        let m = get::<CMm, _>(mm)?;
        let config = if chunk_pages == 0 && max_chunks == 0 {
            PagemapConfig::default()
        } else {
            PagemapConfig {
                chunk_pages,
                max_chunks,
            }
        };
        let c = Arc::new(COps {
            ops,
            migrate_to_ram,
            ctx: Ctx(ctx),
        });
        let pagemap = DevicePagemap::new(&m.mm, owner_from(owner)?, c, config)?;
        let h = register(CPagemap { pagemap });
        // SAFETY: `out` is not NULL and the caller vouches for it.
        unsafe { write_out(out, "out", h) }
    })
}

/// Destroys the pagemap: every page of its owner is brought back to
/// system memory first (through `migrate_to_ram`); what the device cannot
/// give back is lost (an access gets SIGBUS). NULL does nothing.
///
/// Returns 0, `-EINVAL` for a handle that is not a live pagemap,
/// `-EDEADLK` inside a uhmm callback (nothing is done).
#[unsafe(no_mangle)]
pub extern "C" fn uhmm_pagemap_destroy(pm: *mut uhmm_pagemap) -> c_int {
    call(|| take::<CPagemap, _>(pm).map(drop))
}

/// Allocates `n` free device pages, each with one reference, lowest
/// first, into `pfns[0..n]`: all of them or none.
///
/// Returns 0, `-ENOMEM` when fewer than `n` can be had (or `add_chunk`
/// failed), `-ECHILD` in a forked child.
///
/// # Safety
///
/// `pfns` is NULL or valid for writes of `n` entries.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_pagemap_alloc(
    pm: *const uhmm_pagemap,
    n: usize,
    pfns: *mut u64,
) -> c_int {
    call(|| {
        if pfns.is_null() && n > 0 {
            return Err(Error::null("pfns"));
        }
        let p = get::<CPagemap, _>(pm)?;
        let got = p.pagemap.alloc(n)?;
        for (i, pfn) in got.iter().enumerate() {
            // SAFETY: the caller vouches for `n` entries; i < n.
            unsafe { pfns.add(i).write(pfn.0) };
        }
        Ok(())
    })
}

/// One more reference to device page `pfn`. Returns 0, or `-EINVAL` if
/// the page is not in use.
#[unsafe(no_mangle)]
pub extern "C" fn uhmm_pagemap_get(pm: *const uhmm_pagemap, pfn: u64) -> c_int {
    call(|| Ok(get::<CPagemap, _>(pm)?.pagemap.get(DevicePfn(pfn))?))
}

/// One reference less to device page `pfn`; the last one frees it
/// (`page_free`). Returns 0, or `-EINVAL` if the page is not in use (a
/// second put of its last reference, say; nothing changes then).
#[unsafe(no_mangle)]
pub extern "C" fn uhmm_pagemap_put(pm: *const uhmm_pagemap, pfn: u64) -> c_int {
    call(|| Ok(get::<CPagemap, _>(pm)?.pagemap.put(DevicePfn(pfn))?))
}

/// Brings every page of the pagemap's owner back to system memory (the
/// kernel's `migrate_device_range` over the whole pagemap), waiting for
/// its migrations in flight.
///
/// Returns 0, or the error the device kept returning for ten seconds
/// (`-EAGAIN`, `-ENOMEM`, `-EIO`); `-ECHILD` in a forked child;
/// `-EDEADLK` inside a uhmm callback.
#[unsafe(no_mangle)]
pub extern "C" fn uhmm_pagemap_evict_all(pm: *const uhmm_pagemap) -> c_int {
    call(|| {
        if crate::handle::in_callback() {
            return Err(Error::new(
                libc::EDEADLK,
                "uhmm_pagemap_evict_all may not be called inside a uhmm callback",
            ));
        }
        Ok(get::<CPagemap, _>(pm)?.pagemap.evict_all()?)
    })
}

/// What a pagemap has counted ([`uhmm_pagemap_get_stats`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct uhmm_pagemap_stats {
    /// Chunks added.
    pub chunks: u64,
    /// Device pages in use (referenced).
    pub in_use: u64,
    /// Pages the pagemap may ever hand out.
    pub capacity: u64,
    /// Pages allocated, ever.
    pub allocated: u64,
    /// Pages freed (`page_free`), ever.
    pub freed: u64,
    /// Pages brought back by CPU faults and evictions.
    pub faulted_back: u64,
    /// The owner.
    pub owner: u64,
}

/// Fills `*out` with what the pagemap has counted.
///
/// # Safety
///
/// `out` is NULL or valid for a write of a `uhmm_pagemap_stats`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_pagemap_get_stats(
    pm: *const uhmm_pagemap,
    out: *mut uhmm_pagemap_stats,
) -> c_int {
    call(|| {
        let p = get::<CPagemap, _>(pm)?;
        let s = p.pagemap.stats();
        let c = uhmm_pagemap_stats {
            chunks: s.chunks as u64,
            in_use: s.in_use as u64,
            capacity: p.pagemap.capacity() as u64,
            allocated: s.allocated,
            freed: s.freed,
            faulted_back: s.faulted_back,
            owner: owner_number(p.pagemap.owner()),
        };
        // SAFETY: the caller vouches for `out`.
        unsafe { write_out(out, "out", c) }
    })
}

/// Runs `f` on the fault behind handle `f`, if it is a callback's running
/// on this thread.
fn with_fault<R>(
    h: *const uhmm_fault,
    f: impl FnOnce(&FaultCtx<'_, '_>) -> Result<R, Error>,
) -> Result<R, Error> {
    if h.is_null() {
        return Err(Error::null("fault"));
    }
    let key = h as usize;
    if in_frame(&ACTIVE_FAULTS, Some(key), |_| ()).is_none() {
        return Err(Error::inval(
            "not the fault of a migrate_to_ram callback running on this thread",
        ));
    }
    // SAFETY: `key` is on this thread's list of running callbacks' faults:
    // `COps::migrate_to_ram` put it there from a `FaultCtx` on its stack,
    // which lives until it takes it off after the callback returned.
    let fc = unsafe { &*(key as *const FaultCtx<'_, '_>) };
    f(fc)
}

/// `*start` and `*len` receive the pages to bring back: the faulting page
/// and the neighbourhood the fault policy chose (those of the owner in it
/// come back).
///
/// # Safety
///
/// `start` and `len` are NULL or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_fault_range(
    f: *const uhmm_fault,
    start: *mut usize,
    len: *mut usize,
) -> c_int {
    call(|| {
        let r = with_fault(f, |fc| Ok(fc.fault.range()))?;
        // SAFETY: the caller vouches for both.
        unsafe {
            write_out(start, "start", r.start().get())?;
            write_out(len, "len", r.len())
        }
    })
}

/// `*addr` receives the address the CPU touched; `-ENOENT` for an
/// eviction (no CPU access).
///
/// # Safety
///
/// `addr` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_fault_addr(f: *const uhmm_fault, addr: *mut usize) -> c_int {
    call(|| {
        let a = with_fault(f, |fc| Ok(fc.fault.addr()))?;
        match a {
            // SAFETY: the caller vouches for `addr`.
            Some(a) => unsafe { write_out(addr, "addr", a.get()) },
            None => Err(Error::new(libc::ENOENT, "an eviction: no CPU access")),
        }
    })
}

/// Whether the callback may block: 1 (an eviction or a fork), 0 (the
/// fault service: do not wait for locks, return `-EAGAIN` instead), or a
/// negative errno for a bad handle.
#[unsafe(no_mangle)]
pub extern "C" fn uhmm_fault_blockable(f: *const uhmm_fault) -> c_int {
    call_value(
        -libc::EIO,
        |e| -e.errno,
        || with_fault(f, |fc| Ok(c_int::from(fc.fault.blockable()))),
    )
}

/// The owner whose pages come back (0 for a bad handle).
#[unsafe(no_mangle)]
pub extern "C" fn uhmm_fault_owner(f: *const uhmm_fault) -> u64 {
    call_value(
        0,
        |_| 0,
        || with_fault(f, |fc| Ok(owner_number(fc.fault.owner()))),
    )
}

/// Sets up the migration of this owner's device pages in the fault's range
/// back to system memory. `*out` receives it; it must be finalized
/// ([`uhmm_migrate_finalize`]) before the callback returns (if it is not,
/// it is finalized then, and its handle is invalid).
///
/// Returns 0, `-EAGAIN` to be retried (return `-EAGAIN` from the
/// callback), or another negative errno.
///
/// # Safety
///
/// `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_fault_migrate(
    f: *const uhmm_fault,
    out: *mut *mut uhmm_migrate,
) -> c_int {
    call(|| {
        if out.is_null() {
            return Err(Error::null("out"));
        }
        with_fault(f, |fc| {
            let vma = fc.fault.migrate().map_err(migrate_error)?;
            // SAFETY: the migration borrows the address space the fault
            // service runs for, which outlives this callback; it is
            // finalized before the callback's `migrate_to_ram` returns (by
            // C, or after the callback), so it never outlives the borrow.
            let vma: MigrateVma<'static> = unsafe { std::mem::transmute(vma) };
            let m = Arc::new(CMigrate {
                state: Mutex::new(Some(MigState { vma, _mm: None })),
            });
            let h: *mut uhmm_migrate = register_arc(m.clone());
            fc.migrations.borrow_mut().push((h as usize, m));
            // SAFETY: `out` is not NULL and the caller vouches for it.
            unsafe { write_out(out, "out", h) }
        })
    })
}

/// A migration and what it borrows.
struct MigState {
    /// Declared first: dropped (finalized) before the address space it
    /// borrows.
    vma: MigrateVma<'static>,
    /// The address space `vma` borrows, for a migration set up by C
    /// (`None` for one made from a fault: the fault service's outlives it).
    _mm: Option<Arc<CMm>>,
}

impl MigState {
    fn finalize(self) {
        let MigState { vma, _mm } = self;
        vma.finalize();
        drop(_mm);
    }
}

impl fmt::Debug for MigState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.vma.fmt(f)
    }
}

#[derive(Debug)]
struct CMigrate {
    state: Mutex<Option<MigState>>,
}

impl CMigrate {
    fn lock(&self) -> MutexGuard<'_, Option<MigState>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Kind for CMigrate {
    const NAME: &'static str = "uhmm_migrate";
}

fn register_arc(m: Arc<CMigrate>) -> *mut uhmm_migrate {
    crate::handle::register_shared(m)
}

/// Runs `f` on the live migration behind `h`.
fn with_mig<R>(
    h: *const uhmm_migrate,
    f: impl FnOnce(&mut MigrateVma<'static>) -> Result<R, Error>,
) -> Result<R, Error> {
    let m = get::<CMigrate, _>(h)?;
    let mut st = m.lock();
    match st.as_mut() {
        Some(s) => f(&mut s.vma),
        None => Err(Error::inval("the migration has ended")),
    }
}

/// Sets up a migration of the `len` bytes at `addr` (page-aligned, in one
/// managed region) for `owner`: selects the pages `select` names
/// (`UHMM_SELECT_*`; device pages only if they are `owner`'s) and takes
/// them out of the CPU's hands (a CPU access waits until the migration
/// ends). Then: [`uhmm_migrate_selected`], copy with
/// [`uhmm_migrate_src_bytes`] and [`uhmm_migrate_set_device_dst`] (or
/// [`uhmm_migrate_move_to_device`]), [`uhmm_migrate_pages`], update the
/// device's page table for [`uhmm_migrate_migrated`] pages,
/// [`uhmm_migrate_finalize`]. Do not touch the range from the CPU on the
/// same thread meanwhile (it would wait for itself).
///
/// Returns 0; `-EINVAL` if the range cannot be migrated; `-EAGAIN` to set
/// up again later; `-ENOSPC` if it is too large to migrate at once;
/// `-ENODEV` if `owner` has no pagemap (for system pages); `-ECHILD` in a
/// forked child.
///
/// # Safety
///
/// `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_migrate_setup(
    mm: *const uhmm_mm,
    addr: usize,
    len: usize,
    select: u32,
    owner: u64,
    out: *mut *mut uhmm_migrate,
) -> c_int {
    call(|| {
        if out.is_null() {
            return Err(Error::null("out"));
        }
        let m = get::<CMm, _>(mm)?;
        let range = page_range(addr, len)?;
        let sel = Select::from_bits(select)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Error::inval(format!("select {select:#x}: not UHMM_SELECT_* bits")))?;
        let owner = owner_from(owner)?;
        let mm_ref: &Mm = &m.mm;
        let vma = MigrateVma::setup(mm_ref, range, sel, owner)?;
        // SAFETY: `vma` borrows `m.mm`, which lives in the `Arc<CMm>` `m`
        // (a stable heap address); `m` is stored with it and dropped after
        // it (`MigState`'s field order, and `MigState::finalize`).
        let vma: MigrateVma<'static> = unsafe { std::mem::transmute(vma) };
        let c = Arc::new(CMigrate {
            state: Mutex::new(Some(MigState { vma, _mm: Some(m) })),
        });
        let h = register_arc(c);
        // SAFETY: `out` is not NULL and the caller vouches for it.
        unsafe { write_out(out, "out", h) }
    })
}

/// Ends the migration and frees its handle: what did not migrate is put
/// back as it was, and CPU accesses that waited go on. NULL does nothing.
///
/// Returns 0, or `-EINVAL` for a handle that is not a live migration.
#[unsafe(no_mangle)]
pub extern "C" fn uhmm_migrate_finalize(m: *mut uhmm_migrate) -> c_int {
    call(|| {
        if m.is_null() {
            return Ok(());
        }
        // (Allowed inside callbacks: migrate_to_ram finalizes its own.)
        let c = crate::handle::take_any::<CMigrate, _>(m)?;
        let st = c.lock().take();
        if let Some(st) = st {
            st.finalize();
        }
        Ok(())
    })
}

/// `*n` receives the number of pages in the migration's range (the index
/// bound for the per-page functions), `*cpages` (if not NULL) the number
/// selected.
///
/// # Safety
///
/// `n` is NULL or valid for a write; `cpages` too.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_migrate_npages(
    m: *const uhmm_migrate,
    n: *mut usize,
    cpages: *mut usize,
) -> c_int {
    call(|| {
        let (np, cp) = with_mig(m, |v| Ok((v.range().npages(), v.cpages())))?;
        // SAFETY: the caller vouches for both.
        unsafe {
            write_out(n, "n", np)?;
            if !cpages.is_null() {
                write_out(cpages, "cpages", cp)?;
            }
        }
        Ok(())
    })
}

/// A selected page ([`uhmm_migrate_selected`]).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct uhmm_migrate_page {
    /// Its index in the range.
    pub index: usize,
    /// Its address.
    pub addr: usize,
    /// `UHMM_SRC_*`.
    pub src: u32,
    /// Whether it was writable (the kernel's `MIGRATE_PFN_WRITE`).
    pub writable: bool,
    /// The device page, for `UHMM_SRC_DEVICE`; else 0.
    pub device_pfn: u64,
}

/// The selected pages: `*n` receives how many there are, and the first
/// `min(n, cap)` are written to `out` (which may be NULL when `cap` is 0).
/// Returns 0, or `-ERANGE` if `cap` is too small (`*n` says how large).
///
/// # Safety
///
/// `out` is NULL or valid for writes of `cap` entries; `n` is NULL or
/// valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_migrate_selected(
    m: *const uhmm_migrate,
    out: *mut uhmm_migrate_page,
    cap: usize,
    n: *mut usize,
) -> c_int {
    call(|| {
        if out.is_null() && cap > 0 {
            return Err(Error::null("out"));
        }
        let pages: Vec<uhmm_migrate_page> = with_mig(m, |v| {
            Ok(v.selected()
                .map(|(i, a, s)| {
                    let (src, device_pfn) = match s {
                        MigrateSrc::None => (UHMM_SRC_NONE, 0),
                        MigrateSrc::Zero => (UHMM_SRC_ZERO, 0),
                        MigrateSrc::System => (UHMM_SRC_SYSTEM, 0),
                        MigrateSrc::Device(p) => (UHMM_SRC_DEVICE, p.0),
                    };
                    uhmm_migrate_page {
                        index: i,
                        addr: a.get(),
                        src,
                        writable: v.writable(i),
                        device_pfn,
                    }
                })
                .collect())
        })?;
        // SAFETY: the caller vouches for `n`.
        unsafe { write_out(n, "n", pages.len())? };
        for (i, p) in pages.iter().take(cap).enumerate() {
            // SAFETY: i < cap, and the caller vouches for `cap` entries.
            unsafe { out.add(i).write(*p) };
        }
        if pages.len() > cap {
            return Err(Error::new(
                libc::ERANGE,
                format!("{} pages selected, room for {cap}", pages.len()),
            ));
        }
        Ok(())
    })
}

/// `*bytes` receives the [`crate::UHMM_PAGE_SIZE`] bytes of selected
/// system page `i` (held by uhmm while it migrates): copy them into the
/// device page. Valid until [`uhmm_migrate_pages`] or
/// [`uhmm_migrate_finalize`]. Returns 0, or `-ENOENT` for a page that is
/// not a selected system page (a hole: clear the device page instead).
///
/// # Safety
///
/// `bytes` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_migrate_src_bytes(
    m: *const uhmm_migrate,
    i: usize,
    bytes: *mut *const u8,
) -> c_int {
    call(|| {
        let p = with_mig(m, |v| Ok(v.src_bytes(i).map(<[u8]>::as_ptr)))?;
        match p {
            // SAFETY: the caller vouches for `bytes`.
            Some(p) => unsafe { write_out(bytes, "bytes", p) },
            None => Err(Error::new(
                libc::ENOENT,
                format!("page {i} is not a selected page of system memory"),
            )),
        }
    })
}

/// Page `i` goes to device page `pfn` (allocated from the owner's pagemap
/// with [`uhmm_pagemap_alloc`]), whose reference the migration takes: it
/// is freed through the pagemap if the page does not migrate. A
/// destination set before is replaced.
///
/// Returns 0, or `-EINVAL` if page `i` is not a selected page of system
/// memory, the migration has committed, another page goes to `pfn`, or
/// `pfn` is not an allocated page of the owner (the reference stays the
/// caller's then).
#[unsafe(no_mangle)]
pub extern "C" fn uhmm_migrate_set_device_dst(m: *const uhmm_migrate, i: usize, pfn: u64) -> c_int {
    call(|| with_mig(m, |v| Ok(v.set_device_dst(i, DevicePfn(pfn))?)))
}

/// Page `i` does not migrate after all (its destination is dropped). Not
/// for a page [`uhmm_migrate_move_to_device`] moved already.
#[unsafe(no_mangle)]
pub extern "C" fn uhmm_migrate_skip(m: *const uhmm_migrate, i: usize) -> c_int {
    call(|| {
        with_mig(m, |v| {
            v.skip(i);
            Ok(())
        })
    })
}

/// A system page to fill on the way back ([`uhmm_migrate_system_dsts`]).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct uhmm_migrate_dst {
    /// The page's index in the range.
    pub index: usize,
    /// [`crate::UHMM_PAGE_SIZE`] bytes to fill with the device page's data.
    pub bytes: *mut u8,
}

/// For the way back: a system page for every selected device page, as
/// (index, bytes to fill); each such page's destination becomes system
/// memory ([`uhmm_migrate_skip`] one whose copy failed). `*n` receives
/// how many, the first `min(n, cap)` are written to `out`. The bytes are
/// valid until [`uhmm_migrate_pages`] or [`uhmm_migrate_finalize`].
///
/// Returns 0, `-ERANGE` if `cap` is too small, `-ENOSPC` if uhmm's
/// staging cannot take the range now.
///
/// # Safety
///
/// `out` is NULL or valid for writes of `cap` entries; `n` is NULL or
/// valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_migrate_system_dsts(
    m: *const uhmm_migrate,
    out: *mut uhmm_migrate_dst,
    cap: usize,
    n: *mut usize,
) -> c_int {
    call(|| {
        if out.is_null() && cap > 0 {
            return Err(Error::null("out"));
        }
        let dsts: Vec<uhmm_migrate_dst> = with_mig(m, |v| {
            Ok(v.system_dsts()
                .map_err(migrate_error)?
                .into_iter()
                .map(|(index, b)| uhmm_migrate_dst {
                    index,
                    bytes: b.as_mut_ptr(),
                })
                .collect())
        })?;
        // SAFETY: the caller vouches for `n`.
        unsafe { write_out(n, "n", dsts.len())? };
        for (i, d) in dsts.iter().take(cap).enumerate() {
            // SAFETY: i < cap, and the caller vouches for `cap` entries.
            unsafe { out.add(i).write(*d) };
        }
        if dsts.len() > cap {
            return Err(Error::new(
                libc::ERANGE,
                format!("{} system pages, room for {cap}", dsts.len()),
            ));
        }
        Ok(())
    })
}

/// A page to move into host-RAM device memory
/// ([`uhmm_migrate_move_to_device`]).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct uhmm_move_page {
    /// The page's index in the range.
    pub index: usize,
    /// Its device page (allocated, its reference passes to the
    /// migration).
    pub pfn: u64,
    /// Where that device page lives: an address in a [`uhmm_devmem`] that
    /// holds no page now (never written, or discarded since).
    pub dev_addr: usize,
}

/// For device memory that is host RAM ([`uhmm_devmem_create`]): moves each
/// selected system page into the hole at its `dev_addr`, with no copy,
/// and makes `pfn` its destination. `done[0..*ndone]` receives the indices
/// moved; the others (pages that could not move) are left for the caller
/// to copy ([`uhmm_migrate_src_bytes`] and [`uhmm_migrate_set_device_dst`])
/// or skip.
///
/// # Safety
///
/// `pages` is NULL or valid for reads of `n` entries; `done` NULL or
/// valid for writes of `n` entries; `ndone` NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_migrate_move_to_device(
    m: *const uhmm_migrate,
    pages: *const uhmm_move_page,
    n: usize,
    done: *mut usize,
    ndone: *mut usize,
) -> c_int {
    call(|| {
        if n > 0 && (pages.is_null() || done.is_null()) {
            return Err(Error::null("pages or done"));
        }
        if ndone.is_null() {
            return Err(Error::null("ndone"));
        }
        let list: Vec<(usize, DevicePfn, VirtAddr)> = if n == 0 {
            Vec::new()
        } else {
            // SAFETY: not NULL, and the caller vouches for `n` entries.
            unsafe { std::slice::from_raw_parts(pages, n) }
                .iter()
                .map(|p| (p.index, DevicePfn(p.pfn), VirtAddr::new(p.dev_addr)))
                .collect()
        };
        let moved = with_mig(m, |v| Ok(v.move_to_device(&list)))?;
        for (k, i) in moved.iter().take(n).enumerate() {
            // SAFETY: k < n, and the caller vouches for `n` entries.
            unsafe { done.add(k).write(*i) };
        }
        // SAFETY: not NULL, and the caller vouches for it.
        unsafe { write_out(ndone, "ndone", moved.len().min(n)) }
    })
}

/// A device page to bring back from host-RAM device memory
/// ([`uhmm_migrate_move_from_device`]) or CPU-readable device memory
/// ([`uhmm_migrate_copy_from_device`]).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct uhmm_move_back {
    /// The page's index in the range.
    pub index: usize,
    /// Where its device page lives in a [`uhmm_devmem`].
    pub dev_addr: usize,
}

/// For device memory that is host RAM: each selected device page comes
/// back by moving its page at `dev_addr` into place, with no copy (in
/// place of [`uhmm_migrate_system_dsts`] for those pages).
///
/// # Safety
///
/// `pages` is NULL or valid for reads of `n` entries.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_migrate_move_from_device(
    m: *const uhmm_migrate,
    pages: *const uhmm_move_back,
    n: usize,
) -> c_int {
    // SAFETY: the caller's contract, passed on.
    unsafe { bring_back(m, pages, n, MigrateVma::move_from_device) }
}

/// For device memory this process can read through a mapping (a BAR,
/// coherent or host-visible memory): each selected device page comes back
/// by one copy the kernel makes from `dev_addr` straight into place, with
/// no staging page (in place of [`uhmm_migrate_system_dsts`] for those
/// pages). The source must stay readable and unchanged until
/// [`uhmm_migrate_pages`] returns; a page whose source cannot be read does
/// not migrate (it stays on the device).
///
/// # Safety
///
/// `pages` is NULL or valid for reads of `n` entries.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_migrate_copy_from_device(
    m: *const uhmm_migrate,
    pages: *const uhmm_move_back,
    n: usize,
) -> c_int {
    // SAFETY: the caller's contract, passed on.
    unsafe { bring_back(m, pages, n, MigrateVma::copy_from_device) }
}

/// `how` (`move_from_device` or `copy_from_device`) of the `n` pages at
/// `pages` for migration `m`.
///
/// # Safety
///
/// `pages` is NULL or valid for reads of `n` entries.
unsafe fn bring_back(
    m: *const uhmm_migrate,
    pages: *const uhmm_move_back,
    n: usize,
    how: fn(&mut MigrateVma<'static>, &[(usize, VirtAddr)]),
) -> c_int {
    call(|| {
        if n > 0 && pages.is_null() {
            return Err(Error::null("pages"));
        }
        let list: Vec<(usize, VirtAddr)> = if n == 0 {
            Vec::new()
        } else {
            // SAFETY: not NULL, and the caller vouches for `n` entries.
            unsafe { std::slice::from_raw_parts(pages, n) }
                .iter()
                .map(|p| (p.index, VirtAddr::new(p.dev_addr)))
                .collect()
        };
        with_mig(m, |v| {
            how(v, &list);
            Ok(())
        })
    })
}

/// Commits (the kernel's `migrate_vma_pages`): pages with a destination
/// migrate. Afterwards [`uhmm_migrate_migrated`] and
/// [`uhmm_migrate_outcome`] say which did.
#[unsafe(no_mangle)]
pub extern "C" fn uhmm_migrate_pages(m: *const uhmm_migrate) -> c_int {
    call(|| {
        with_mig(m, |v| {
            v.pages();
            Ok(())
        })
    })
}

/// Whether page `i` migrated (after [`uhmm_migrate_pages`]): 1 or 0, or a
/// negative errno for a bad handle.
#[unsafe(no_mangle)]
pub extern "C" fn uhmm_migrate_migrated(m: *const uhmm_migrate, i: usize) -> c_int {
    call_value(
        -libc::EIO,
        |e| -e.errno,
        || with_mig(m, |v| Ok(c_int::from(v.migrated(i)))),
    )
}

/// `*n` receives how many pages migrated (0 before
/// [`uhmm_migrate_pages`]).
///
/// # Safety
///
/// `n` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_migrate_migrated_count(
    m: *const uhmm_migrate,
    n: *mut usize,
) -> c_int {
    call(|| {
        let c = with_mig(m, |v| Ok(v.migrated_count()))?;
        // SAFETY: the caller vouches for `n`.
        unsafe { write_out(n, "n", c) }
    })
}

/// `*outcome` receives what became of page `i` at the commit
/// (`UHMM_OUTCOME_*`; `PENDING` before [`uhmm_migrate_pages`]). Returns 0,
/// or `-EINVAL` for an index outside the range.
///
/// # Safety
///
/// `outcome` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_migrate_outcome(
    m: *const uhmm_migrate,
    i: usize,
    outcome: *mut u32,
) -> c_int {
    call(|| {
        let o = with_mig(m, |v| {
            if i >= v.range().npages() {
                return Err(Error::inval(format!(
                    "page {i}: the range has {} pages",
                    v.range().npages()
                )));
            }
            Ok(match v.outcome(i) {
                None => UHMM_OUTCOME_PENDING,
                Some(PageOutcome::Migrated) => UHMM_OUTCOME_MIGRATED,
                Some(PageOutcome::NotSelected) => UHMM_OUTCOME_NOT_SELECTED,
                Some(PageOutcome::NoDestination) => UHMM_OUTCOME_NO_DESTINATION,
                Some(PageOutcome::Gone) => UHMM_OUTCOME_GONE,
                Some(PageOutcome::Busy) => UHMM_OUTCOME_BUSY,
                Some(PageOutcome::Failed) => UHMM_OUTCOME_FAILED,
            })
        })?;
        // SAFETY: the caller vouches for `outcome`.
        unsafe { write_out(outcome, "outcome", o) }
    })
}

#[derive(Debug)]
struct CDevmem {
    map: Mapping,
}

impl Kind for CDevmem {
    const NAME: &'static str = "uhmm_devmem";
}

/// Maps `len` bytes (a non-zero multiple of the page size) of private
/// anonymous host RAM for a device's memory and registers it with `mm`,
/// so that migrations can move pages between it and managed memory with
/// no copy ([`uhmm_migrate_move_to_device`],
/// [`uhmm_migrate_move_from_device`]). Free it with
/// [`uhmm_devmem_free`] after the pagemap whose pages live in it.
///
/// # Safety
///
/// `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_devmem_create(
    mm: *const uhmm_mm,
    len: usize,
    out: *mut *mut uhmm_devmem,
) -> c_int {
    call(|| {
        if out.is_null() {
            return Err(Error::null("out"));
        }
        let m = get::<CMm, _>(mm)?;
        let map = Mapping::anon(len)?;
        m.mm.register_device_memory(&map)?;
        let h = register(CDevmem { map });
        // SAFETY: `out` is not NULL and the caller vouches for it.
        unsafe { write_out(out, "out", h) }
    })
}

/// The first byte of the device memory (NULL for a bad handle).
#[unsafe(no_mangle)]
pub extern "C" fn uhmm_devmem_addr(d: *const uhmm_devmem) -> *mut c_void {
    call_value(
        std::ptr::null_mut(),
        |_| std::ptr::null_mut(),
        || Ok(get::<CDevmem, _>(d)?.map.as_ptr().cast()),
    )
}

/// Unmaps the device memory. NULL does nothing. Returns 0, `-EINVAL` for
/// a handle that is not a live `uhmm_devmem`, `-EDEADLK` inside a uhmm
/// callback.
#[unsafe(no_mangle)]
pub extern "C" fn uhmm_devmem_free(d: *mut uhmm_devmem) -> c_int {
    call(|| take::<CDevmem, _>(d).map(drop))
}
