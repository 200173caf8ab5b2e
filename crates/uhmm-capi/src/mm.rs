//! The address space (`uhmm_mm`), managed regions (`uhmm_region`),
//! owners, statistics, page states and exclusive access.

use crate::error::{Error, call, call_value, write_out};
use crate::handle::{Kind, get, owner_from, owner_number, register, take};
use std::ffi::{c_int, c_void};
use uhmm::mm::notifier::NotifyEvent;
use uhmm::mm::{ManagedRegion, Mm, Owner, PageState};
use uhmm::sys::mem::Backing;
use uhmm::sys::uffd::{Access, AccessPolicy};
use uhmm::{PageRange, VirtAddr};

/// The size of a page, in bytes: every address and length given to uhmm
/// is a multiple of it.
pub const UHMM_PAGE_SIZE: usize = 4096;
const _: () = assert!(UHMM_PAGE_SIZE == uhmm::PAGE_SIZE);

/// Access policy for [`uhmm_mm_create_with_access`]: `/dev/userfaultfd`,
/// then the `userfaultfd(2)` system call, then that call in user-mode-only
/// mode — the first that works (what [`uhmm_mm_create`] does).
pub const UHMM_ACCESS_AUTO: u32 = 0;
/// Access policy: like [`UHMM_ACCESS_AUTO`] but never user-mode-only:
/// fail with `-EPERM` rather than lose the ability to serve faults raised
/// by system calls.
pub const UHMM_ACCESS_FULL_ONLY: u32 = 1;

/// How the userfaultfd was obtained ([`uhmm_mm_access`]): through
/// `/dev/userfaultfd`.
pub const UHMM_ACCESS_DEV_NODE: u32 = 0;
/// Through the `userfaultfd(2)` system call, with full privilege.
pub const UHMM_ACCESS_SYSCALL: u32 = 1;
/// Through the system call in user-mode-only mode: a system call touching
/// a managed page that is not in the CPU page table fails with EFAULT
/// instead of bringing it back.
pub const UHMM_ACCESS_USER_MODE_ONLY: u32 = 2;

/// Backing for [`uhmm_region_alloc`]: private anonymous memory.
pub const UHMM_BACKING_ANON_PRIVATE: u32 = 0;
/// Backing: shared anonymous memory (shmem).
pub const UHMM_BACKING_ANON_SHARED: u32 = 1;
/// Backing: a new memfd, mapped shared.
pub const UHMM_BACKING_MEMFD: u32 = 2;

/// Invalidation event ([`uhmm_notifier_range::event`]): the range was
/// unmapped.
pub const UHMM_EVENT_UNMAP: u32 = 0;
/// Its pages were discarded (`MADV_DONTNEED`, `MADV_REMOVE`).
pub const UHMM_EVENT_CLEAR: u32 = 1;
/// The range was moved by mremap; it is gone from its old address.
pub const UHMM_EVENT_REMAP: u32 = 2;
/// The process forked: private pages became copy-on-write.
pub const UHMM_EVENT_FORK: u32 = 3;
/// Its protection changed.
pub const UHMM_EVENT_PROTECTION: u32 = 4;
/// Its pages are being migrated by the range's owner.
pub const UHMM_EVENT_MIGRATE: u32 = 5;
/// Its pages are being made exclusive to the range's owner.
pub const UHMM_EVENT_EXCLUSIVE: u32 = 6;
/// The address space is going away: stop all use, for good.
pub const UHMM_EVENT_RELEASE: u32 = 7;
/// The number of events (the length of
/// [`uhmm_mm_stats::invalidations`]).
pub const UHMM_EVENT_COUNT: usize = 8;
const _: () = assert!(NotifyEvent::ALL.len() == UHMM_EVENT_COUNT);

/// The `UHMM_EVENT_*` code of `e`.
pub(crate) fn event_code(e: NotifyEvent) -> u32 {
    match e {
        NotifyEvent::Unmap => UHMM_EVENT_UNMAP,
        NotifyEvent::Clear => UHMM_EVENT_CLEAR,
        NotifyEvent::Remap => UHMM_EVENT_REMAP,
        NotifyEvent::Fork => UHMM_EVENT_FORK,
        NotifyEvent::Protection => UHMM_EVENT_PROTECTION,
        NotifyEvent::Migrate => UHMM_EVENT_MIGRATE,
        NotifyEvent::Exclusive => UHMM_EVENT_EXCLUSIVE,
        NotifyEvent::Release => UHMM_EVENT_RELEASE,
    }
}

/// Page state ([`uhmm_page_state::kind`]): never touched, or discarded.
pub const UHMM_PAGE_EMPTY: u32 = 0;
/// In system memory, mapped for the CPU.
pub const UHMM_PAGE_SYSTEM: u32 = 1;
/// Being migrated by `owner`: a CPU access waits.
pub const UHMM_PAGE_MIGRATING: u32 = 2;
/// In the device memory of `owner`, at `pfn`.
pub const UHMM_PAGE_DEVICE: u32 = 3;
/// In system memory but reserved to `owner` for device atomics.
pub const UHMM_PAGE_EXCLUSIVE: u32 = 4;

/// A process's address space as uhmm manages it: a userfaultfd, its fault
/// service thread, managed regions and their page states. Opaque.
#[derive(Debug)]
pub struct uhmm_mm {
    _opaque: [u8; 0],
}

/// Managed memory: a region mapped by [`uhmm_region_alloc`], or memory the
/// program had, managed with [`uhmm_mm_manage`]. Opaque.
#[derive(Debug)]
pub struct uhmm_region {
    _opaque: [u8; 0],
}

#[derive(Debug)]
pub(crate) struct CMm {
    pub(crate) mm: Mm,
}

impl Kind for CMm {
    const NAME: &'static str = "uhmm_mm";
}

#[derive(Debug)]
pub(crate) struct CRegion {
    region: ManagedRegion,
}

impl Kind for CRegion {
    const NAME: &'static str = "uhmm_region";
}

/// The range of `len` bytes at `addr`, both page-aligned, `len` non-zero.
pub(crate) fn page_range(addr: usize, len: usize) -> Result<PageRange, Error> {
    PageRange::new(VirtAddr::new(addr), len).map_err(|e| Error::inval(e.to_string()))
}

/// Makes an address space: opens a userfaultfd (the first way that works,
/// user-mode-only mode included: see [`uhmm_mm_access`]) and starts the
/// fault service. `*out` receives the handle; destroy it with
/// [`uhmm_mm_destroy`].
///
/// Returns 0, or `-EPERM` if no userfaultfd can be opened (the message
/// says how to allow it), `-ENOSYS` if the kernel lacks what uhmm needs,
/// `-EINVAL` if `out` is NULL.
///
/// # Safety
///
/// `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_mm_create(out: *mut *mut uhmm_mm) -> c_int {
    // SAFETY: the caller's contract is this function's.
    unsafe { uhmm_mm_create_with_access(UHMM_ACCESS_AUTO, out) }
}

/// [`uhmm_mm_create`] with an access policy: [`UHMM_ACCESS_AUTO`] or
/// [`UHMM_ACCESS_FULL_ONLY`] (fail with `-EPERM` rather than fall back to
/// user-mode-only mode).
///
/// # Safety
///
/// `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_mm_create_with_access(policy: u32, out: *mut *mut uhmm_mm) -> c_int {
    call(|| {
        if out.is_null() {
            return Err(Error::null("out"));
        }
        let policy = match policy {
            UHMM_ACCESS_AUTO => AccessPolicy::Auto,
            UHMM_ACCESS_FULL_ONLY => AccessPolicy::FullOnly,
            p => {
                return Err(Error::inval(format!(
                    "access policy {p}: not UHMM_ACCESS_*"
                )));
            }
        };
        let mm = Mm::with_access(policy)?;
        let h = register(CMm { mm });
        // SAFETY: `out` is not NULL and valid for a write (the contract).
        unsafe { write_out(out, "out", h) }
    })
}

/// Destroys the handle. The address space itself goes away when the last
/// of its regions, notifiers, pagemaps and migrations is gone too (each
/// holds it); then every notifier gets a [`UHMM_EVENT_RELEASE`] and the
/// fault service stops. NULL does nothing.
///
/// Returns 0, `-EINVAL` for a handle that is not a live `uhmm_mm`,
/// `-EDEADLK` inside a uhmm callback (nothing is done).
#[unsafe(no_mangle)]
pub extern "C" fn uhmm_mm_destroy(mm: *mut uhmm_mm) -> c_int {
    call(|| take::<CMm, _>(mm).map(drop))
}

/// How the address space's userfaultfd was obtained: `*out` receives
/// [`UHMM_ACCESS_DEV_NODE`], [`UHMM_ACCESS_SYSCALL`] or
/// [`UHMM_ACCESS_USER_MODE_ONLY`].
///
/// # Safety
///
/// `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_mm_access(mm: *const uhmm_mm, out: *mut u32) -> c_int {
    call(|| {
        let m = get::<CMm, _>(mm)?;
        let a = match m.mm.access() {
            Access::DevNode => UHMM_ACCESS_DEV_NODE,
            Access::Syscall => UHMM_ACCESS_SYSCALL,
            Access::UserModeOnly => UHMM_ACCESS_USER_MODE_ONLY,
        };
        // SAFETY: the caller vouches for `out`.
        unsafe { write_out(out, "out", a) }
    })
}

/// A new device owner (the kernel's `pgmap_owner`), distinct from every
/// other one in the process; never 0. Invalidations carry the owner that
/// caused them, device-private pages the owner they belong to.
#[unsafe(no_mangle)]
pub extern "C" fn uhmm_owner_unique() -> u64 {
    call_value(0, |_| 0, || Ok(owner_number(Owner::unique())))
}

/// What the fault service has counted ([`uhmm_mm_get_stats`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct uhmm_mm_stats {
    /// Userfaultfd events read.
    pub events: u64,
    /// Page faults served.
    pub faults: u64,
    /// Service turns that retried invalidations a callback could not do
    /// without blocking.
    pub invalidation_retries: u64,
    /// Pages whose state uhmm stores (on a device, migrating, exclusive).
    pub state_pages: u64,
    /// Bytes of per-page state held for them.
    pub state_bytes: u64,
    /// Device owners the page-state table names now.
    pub owners: u64,
    /// Faults on holes of armed regions.
    pub faults_hole: u64,
    /// Faults on device-resident pages, served by bringing them back.
    pub faults_device: u64,
    /// Faults that revoked a device's exclusive access.
    pub faults_exclusive: u64,
    /// Write faults on pages write-protected while they were copied.
    pub faults_wp: u64,
    /// Times a fault had to wait.
    pub faults_waited: u64,
    /// Pages migrated into device memory.
    pub pages_to_device: u64,
    /// Pages migrated back to system memory.
    pub pages_to_system: u64,
    /// Pages lost: their data could not be brought back (an access gets
    /// SIGBUS).
    pub pages_lost: u64,
    /// CPU accesses failed with SIGBUS because the device could not bring
    /// their page back.
    pub faults_sigbus: u64,
    /// Device callbacks that panicked or failed in a way that was
    /// contained.
    pub callback_panics: u64,
    /// CPU faults of a thread on a page of a migration it has not
    /// finished.
    pub self_deadlocks: u64,
    /// Invalidations started, by event (`UHMM_EVENT_*` is the index).
    pub invalidations: [u64; UHMM_EVENT_COUNT],
}

/// Fills `*out` with what the fault service has counted.
///
/// # Safety
///
/// `out` is NULL or valid for a write of a `uhmm_mm_stats`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_mm_get_stats(mm: *const uhmm_mm, out: *mut uhmm_mm_stats) -> c_int {
    call(|| {
        let m = get::<CMm, _>(mm)?;
        let s = m.mm.stats();
        let mut invalidations = [0u64; UHMM_EVENT_COUNT];
        for (e, n) in &s.invalidations {
            invalidations[event_code(*e) as usize] = *n;
        }
        let c = uhmm_mm_stats {
            events: s.events,
            faults: s.faults,
            invalidation_retries: s.invalidation_retries,
            state_pages: s.state_pages as u64,
            state_bytes: s.state_bytes as u64,
            owners: s.owners as u64,
            faults_hole: s.faults_hole,
            faults_device: s.faults_device,
            faults_exclusive: s.faults_exclusive,
            faults_wp: s.faults_wp,
            faults_waited: s.faults_waited,
            pages_to_device: s.pages_to_device,
            pages_to_system: s.pages_to_system,
            pages_lost: s.pages_lost,
            faults_sigbus: s.faults_sigbus,
            callback_panics: s.callback_panics,
            self_deadlocks: s.self_deadlocks,
            invalidations,
        };
        // SAFETY: the caller vouches for `out`.
        unsafe { write_out(out, "out", c) }
    })
}

/// Sets the fault block: how many bytes around a faulting device page
/// (aligned) one CPU fault brings back — a power of two from one page to
/// 2 MiB (`-EINVAL` otherwise).
#[unsafe(no_mangle)]
pub extern "C" fn uhmm_mm_set_fault_block(mm: *const uhmm_mm, bytes: usize) -> c_int {
    call(|| Ok(get::<CMm, _>(mm)?.mm.set_fault_block(bytes)?))
}

/// `*out` receives the fault block, in bytes.
///
/// # Safety
///
/// `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_mm_fault_block(mm: *const uhmm_mm, out: *mut usize) -> c_int {
    call(|| {
        let b = get::<CMm, _>(mm)?.mm.fault_block();
        // SAFETY: the caller vouches for `out`.
        unsafe { write_out(out, "out", b) }
    })
}

/// Where a managed page lives ([`uhmm_mm_page_state`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct uhmm_page_state {
    /// `UHMM_PAGE_*`.
    pub kind: u32,
    /// The device owner for `MIGRATING`, `DEVICE`, `EXCLUSIVE`; else 0.
    pub owner: u64,
    /// The device page for `DEVICE`; else 0.
    pub pfn: u64,
}

/// Fills `*out` with the state of the managed page holding `addr`.
///
/// Returns 0, `-EFAULT` if the page is not managed, `-ECHILD` in a forked
/// child.
///
/// # Safety
///
/// `out` is NULL or valid for a write of a `uhmm_page_state`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_mm_page_state(
    mm: *const uhmm_mm,
    addr: usize,
    out: *mut uhmm_page_state,
) -> c_int {
    call(|| {
        let m = get::<CMm, _>(mm)?;
        let s = match m.mm.page_state(VirtAddr::new(addr))? {
            PageState::Empty => uhmm_page_state {
                kind: UHMM_PAGE_EMPTY,
                ..Default::default()
            },
            PageState::System => uhmm_page_state {
                kind: UHMM_PAGE_SYSTEM,
                ..Default::default()
            },
            PageState::Migrating { owner } => uhmm_page_state {
                kind: UHMM_PAGE_MIGRATING,
                owner: owner_number(owner),
                pfn: 0,
            },
            PageState::Device { owner, pfn } => uhmm_page_state {
                kind: UHMM_PAGE_DEVICE,
                owner: owner_number(owner),
                pfn: pfn.0,
            },
            PageState::Exclusive { owner } => uhmm_page_state {
                kind: UHMM_PAGE_EXCLUSIVE,
                owner: owner_number(owner),
                pfn: 0,
            },
        };
        // SAFETY: the caller vouches for `out`.
        unsafe { write_out(out, "out", s) }
    })
}

/// `*pfn` receives the device page of `owner` holding the page at `addr`.
/// Returns 0, or `-ENOENT` if that page is not in `owner`'s device memory.
///
/// # Safety
///
/// `pfn` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_mm_device_page(
    mm: *const uhmm_mm,
    addr: usize,
    owner: u64,
    pfn: *mut u64,
) -> c_int {
    call(|| {
        let m = get::<CMm, _>(mm)?;
        let owner = owner_from(owner)?;
        match m.mm.device_page(VirtAddr::new(addr), owner) {
            // SAFETY: the caller vouches for `pfn`.
            Some(p) => unsafe { write_out(pfn, "pfn", p.0) },
            None => Err(Error::new(
                libc::ENOENT,
                format!(
                    "the page at {addr:#x} is not in the device memory of owner {}",
                    owner.get()
                ),
            )),
        }
    })
}

/// Makes the `len` bytes at `addr` (page-aligned, in one managed region of
/// private anonymous read-write memory) exclusive to `owner` for device
/// atomics: the CPU loses access until it touches them, and then gets them
/// back with the device's writes. The invalidation carries
/// [`UHMM_EVENT_EXCLUSIVE`] and `owner`. `*count` (if not NULL) receives
/// how many pages are exclusive now; find each with
/// [`uhmm_mm_exclusive_page`].
///
/// Returns 0, `-EINVAL` for a range that cannot be made exclusive,
/// `-EAGAIN` to try again, `-ECHILD` in a forked child.
///
/// # Safety
///
/// `count` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_mm_make_device_exclusive(
    mm: *const uhmm_mm,
    addr: usize,
    len: usize,
    owner: u64,
    count: *mut usize,
) -> c_int {
    call(|| {
        let m = get::<CMm, _>(mm)?;
        let n =
            m.mm.make_device_exclusive(page_range(addr, len)?, owner_from(owner)?)?;
        if !count.is_null() {
            // SAFETY: not NULL, and the caller vouches for it.
            unsafe { write_out(count, "count", n)? };
        }
        Ok(())
    })
}

/// `*page` receives where the device holding `addr`'s page exclusive for
/// `owner` finds it (valid until the page's next invalidation). Returns 0,
/// or `-ENOENT` if the page is not exclusive to `owner`.
///
/// # Safety
///
/// `page` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_mm_exclusive_page(
    mm: *const uhmm_mm,
    addr: usize,
    owner: u64,
    page: *mut *mut c_void,
) -> c_int {
    call(|| {
        let m = get::<CMm, _>(mm)?;
        match m.mm.exclusive_page(VirtAddr::new(addr), owner_from(owner)?) {
            // SAFETY: the caller vouches for `page`.
            Some(a) => unsafe { write_out(page, "page", a.as_mut_ptr::<c_void>()) },
            None => Err(Error::new(
                libc::ENOENT,
                format!("the page at {addr:#x} is not exclusive to owner {owner}"),
            )),
        }
    })
}

/// Maps `len` bytes (a non-zero multiple of [`UHMM_PAGE_SIZE`]) of new
/// memory of kind `backing` (`UHMM_BACKING_*`) and manages it. `*out`
/// receives the region; [`uhmm_region_addr`] gives its first byte. Free it
/// with [`uhmm_region_free`] (which unmaps it).
///
/// Returns 0, `-EINVAL` for a bad length or backing, `-ENOMEM` (or the
/// errno of mmap) if it cannot be mapped, `-ECHILD` in a forked child.
///
/// # Safety
///
/// `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_region_alloc(
    mm: *const uhmm_mm,
    len: usize,
    backing: u32,
    out: *mut *mut uhmm_region,
) -> c_int {
    call(|| {
        if out.is_null() {
            return Err(Error::null("out"));
        }
        let m = get::<CMm, _>(mm)?;
        let backing = match backing {
            UHMM_BACKING_ANON_PRIVATE => Backing::AnonPrivate,
            UHMM_BACKING_ANON_SHARED => Backing::AnonShared,
            UHMM_BACKING_MEMFD => Backing::Memfd,
            b => return Err(Error::inval(format!("backing {b}: not UHMM_BACKING_*"))),
        };
        let region = m.mm.alloc(len, backing)?;
        let h = register(CRegion { region });
        // SAFETY: `out` is not NULL and the caller vouches for it.
        unsafe { write_out(out, "out", h) }
    })
}

/// Manages memory the program already has: the `len` bytes at `addr`
/// (page-aligned, mapped, not managed yet). Freeing the region stops
/// managing it (the memory stays mapped).
///
/// Returns 0, `-EINVAL` for a bad range, `-EEXIST` if it overlaps a
/// managed region, `-ECHILD` in a forked child.
///
/// # Safety
///
/// `out` is NULL or valid for a write. While managed, the memory is
/// reached through pointers only: uhmm moves pages in and out of it behind
/// the program's back (a compiler-visible object there must be accessed
/// as `volatile` or through pointers the compiler cannot see through, as
/// for memory shared with a device).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_mm_manage(
    mm: *const uhmm_mm,
    addr: *mut c_void,
    len: usize,
    out: *mut *mut uhmm_region,
) -> c_int {
    call(|| {
        if out.is_null() {
            return Err(Error::null("out"));
        }
        let m = get::<CMm, _>(mm)?;
        let range = page_range(addr as usize, len)?;
        // SAFETY: the caller vouches for the memory (this function's
        // contract is `Mm::manage`'s).
        let region = unsafe { m.mm.manage(range) }?;
        let h = register(CRegion { region });
        // SAFETY: `out` is not NULL and the caller vouches for it.
        unsafe { write_out(out, "out", h) }
    })
}

/// Stops managing whatever part of the `len` bytes at `addr` (page-aligned)
/// is managed, leaving the memory mapped with its data, so that a
/// userfaultfd of the program's own may register it (`Mm::unmanage`:
/// migrations in flight there end, pages on devices come home, devices get
/// an unmap invalidation). `*out` (if not NULL) receives how many bytes
/// that was: 0 if nothing there was managed. The rest of a region it cuts
/// stays managed; a region handle covering it stays valid, and freeing it
/// later lets go of what is left.
///
/// Returns 0, `-EINVAL` for a bad range, `-ECHILD` in a forked child.
///
/// # Safety
///
/// `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn uhmm_mm_unmanage(
    mm: *const uhmm_mm,
    addr: *mut c_void,
    len: usize,
    out: *mut usize,
) -> c_int {
    call(|| {
        let m = get::<CMm, _>(mm)?;
        let range = page_range(addr as usize, len)?;
        let bytes = m.mm.unmanage(range)?;
        if out.is_null() {
            return Ok(());
        }
        // SAFETY: `out` is not NULL and the caller vouches for it.
        unsafe { write_out(out, "out", bytes) }
    })
}

/// The first byte of the region (NULL for a bad handle, with the message
/// set).
#[unsafe(no_mangle)]
pub extern "C" fn uhmm_region_addr(region: *const uhmm_region) -> *mut c_void {
    call_value(
        std::ptr::null_mut(),
        |_| std::ptr::null_mut(),
        || Ok(get::<CRegion, _>(region)?.region.as_ptr().cast()),
    )
}

/// The region's length in bytes (0 for a bad handle, with the message
/// set).
#[unsafe(no_mangle)]
pub extern "C" fn uhmm_region_len(region: *const uhmm_region) -> usize {
    call_value(
        0,
        |_| 0,
        || Ok(get::<CRegion, _>(region)?.region.range().len()),
    )
}

/// Frees the region: device-resident pages are dropped (their device pages
/// freed), and memory uhmm mapped is unmapped. NULL does nothing.
///
/// Returns 0, `-EINVAL` for a handle that is not a live region,
/// `-EDEADLK` inside a uhmm callback.
#[unsafe(no_mangle)]
pub extern "C" fn uhmm_region_free(region: *mut uhmm_region) -> c_int {
    call(|| take::<CRegion, _>(region).map(drop))
}
