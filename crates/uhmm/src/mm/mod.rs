//! The process address space as devices see it (the kernel's `mm_struct`
//! side of HMM).
//!
//! [`Mm`] is the process's handle: it owns the userfaultfd, the fault
//! service thread and the table of managed regions, and it carries the
//! [`notifier`]s through which a device is told of every change to the
//! ranges it mirrors. [`Owner`] is the identity of a device.
//!
//! ```
//! use uhmm::mm::{Mm, notifier::NotifyEvent};
//! use uhmm::sys::mem::Backing;
//! use uhmm::PAGE_SIZE;
//!
//! let mm = Mm::new()?;
//! let region = mm.alloc(16 * PAGE_SIZE, Backing::AnonPrivate)?;
//! region.write_at(0, b"hello")?; // plain memory: no fault goes through uhmm
//! assert_eq!(mm.managed_len(), 16 * PAGE_SIZE);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! How regions are registered, and why: a managed region is registered with
//! the userfaultfd in write-protect mode only. That is enough for the kernel
//! to report munmap, `MADV_DONTNEED`/`REMOVE`, mremap and fork of it (which
//! become invalidations), while first touches and steady accesses cost what
//! they cost on plain memory — measured on the project's machines: 1304 vs
//! 1331 ns per first-touched 4 KiB page, and THP still backs the region
//! (a MISSING registration would turn every first touch into a fault
//! round trip and limit faults to 4 KiB pages).

pub(crate) mod callback;
mod fault;
mod fork;
pub mod notifier;
pub mod range;
pub(crate) mod regions;
pub(crate) mod service;
pub mod state;

pub(crate) use fork::tid as thread_id;
pub(crate) use service::lock as lock_poisoned;

pub use region::ManagedRegion;
pub use state::{PageState, StateError};

mod region;

use crate::addr::{DevicePfn, PageRange, RangeError, VirtAddr};
use crate::sys::mem::{Backing, Mapping, MappingBuilder, MemError, Prot};
use crate::sys::pagemap::{Categories, PagemapError, ScanQuery};
use crate::sys::uffd::{
    Access, AccessPolicy, Features, OpenError, RegisterError, RegisterMode, Uffd,
};
use notifier::{IntervalNotifier, NotifierOps, NotifierRange, Notifiers, NotifyEvent};
use service::{Shared, lock};
use state::Stored;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Why an [`Mm`] operation failed. Memory is left as it was.
#[derive(Debug, thiserror::Error)]
pub enum MmError {
    /// A fault block that is not a power of two from a page to 2 MiB
    /// ([`Mm::set_fault_block`]).
    #[error(
        "fault block of {bytes} bytes: must be a power of two from 4096 (one page) to 2097152 (2 MiB)"
    )]
    BadFaultBlock {
        /// The size asked for, in bytes.
        bytes: usize,
    },
    /// No userfaultfd could be opened.
    #[error("cannot start uhmm: {0}")]
    Open(#[from] OpenError),
    /// The fault service could not be started.
    #[error("cannot start the fault service thread: {0}")]
    Service(std::io::Error),
    /// Mapping the memory failed.
    #[error(transparent)]
    Map(#[from] MemError),
    /// Registering the memory failed.
    #[error(transparent)]
    Register(#[from] RegisterError),
    /// An invalid range.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// The range is already (partly) managed.
    #[error("{range} overlaps the managed region {existing}")]
    AlreadyManaged {
        /// The range asked for.
        range: PageRange,
        /// The managed region it overlaps.
        existing: PageRange,
    },
    /// The page table could not be read.
    #[error(transparent)]
    Pagemap(#[from] PagemapError),
    /// The mappings could not be read.
    #[error(transparent)]
    Procmap(#[from] crate::sys::procmap::ProcmapError),
    /// A page state could not be recorded.
    #[error(transparent)]
    State(#[from] StateError),
    /// The range is not (entirely) managed.
    #[error("{range} is not (entirely) inside managed regions")]
    NotManaged {
        /// The range asked for.
        range: PageRange,
    },
    /// Called in a forked child on an `Mm` its parent made.
    #[error(transparent)]
    ForkedChild(#[from] ForkedChild),
}

/// Refused: the [`Mm`] (or what was made from it: a [`ManagedRegion`], an
/// [`IntervalNotifier`], a [`DevicePagemap`](crate::devmem::DevicePagemap))
/// belongs to the process that made it, and the caller is a forked child.
///
/// The userfaultfd, the fault service and the registrations of an `Mm` are
/// its maker's: a child that registered memory through its copy would
/// register the *parent's* address space (the kernel ties a userfaultfd to
/// the address space that opened it), and no service thread runs in the
/// child to serve or apply anything. Every operation of an inherited `Mm`
/// that would touch them returns this error instead; reads answer for the
/// child (nothing is managed there); dropping the copies does nothing. A
/// child that wants managed memory makes its own [`Mm::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "this Mm was made by process {made_by}; process {current}, a forked child, must make its own Mm (Mm::new)"
)]
pub struct ForkedChild {
    /// The process that made the `Mm`.
    pub made_by: i32,
    /// The calling process.
    pub current: i32,
}

impl ForkedChild {
    /// `Err` unless the calling process is `made_by` (an atomic load: see
    /// `fork::pid`).
    pub(crate) fn check(made_by: rustix::process::Pid) -> Result<(), ForkedChild> {
        Self::check_against(made_by, fork::pid())
    }

    /// [`check`](Self::check) with the exact process id (`getpid`), for
    /// teardown, which must never act in a child of a fork uhmm did not
    /// see (a raw `clone`).
    pub(crate) fn check_exact(made_by: rustix::process::Pid) -> Result<(), ForkedChild> {
        Self::check_against(made_by, fork::exact_pid())
    }

    fn check_against(
        made_by: rustix::process::Pid,
        current: rustix::process::Pid,
    ) -> Result<(), ForkedChild> {
        if current == made_by {
            Ok(())
        } else {
            Err(ForkedChild {
                made_by: made_by.as_raw_nonzero().get(),
                current: current.as_raw_nonzero().get(),
            })
        }
    }
}

/// What the fault service has counted so far.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MmStats {
    /// Userfaultfd events read.
    pub events: u64,
    /// Page faults served.
    pub faults: u64,
    /// Service turns that retried invalidations a callback could not do
    /// without blocking.
    pub invalidation_retries: u64,
    /// Pages whose state uhmm stores (on a device, migrating, exclusive).
    pub state_pages: usize,
    /// Bytes of per-page state held for them.
    pub state_bytes: usize,
    /// Device owners the page-state table names now (those with pages on
    /// their device or held exclusive, or an operation in flight). A slot
    /// is reused once its owner has none, so at most 65,536 devices use
    /// one address space at a time, however many come and go.
    pub owners: usize,
    /// Faults on holes of armed regions, filled as the kernel would.
    pub faults_hole: u64,
    /// Faults on device-resident pages, served by bringing them back.
    pub faults_device: u64,
    /// Faults that revoked a device's exclusive access.
    pub faults_exclusive: u64,
    /// Write faults on pages write-protected while they were copied.
    pub faults_wp: u64,
    /// Times a fault had to wait (a migration in flight, a busy device).
    pub faults_waited: u64,
    /// Pages migrated into device memory.
    pub pages_to_device: u64,
    /// Pages migrated back to system memory (by faults, commands and
    /// evictions).
    pub pages_to_system: u64,
    /// Pages lost: their data could not be brought back (the device that
    /// held them is gone, or could not give them back); a CPU access to
    /// one gets SIGBUS, as for the kernel's poisoned pages.
    pub pages_lost: u64,
    /// CPU accesses failed with SIGBUS because the device could not bring
    /// their page back (it kept failing, panicking or saying it was busy
    /// past the bounds in [`DevicePagemapOps::migrate_to_ram`](crate::devmem::DevicePagemapOps::migrate_to_ram)).
    pub faults_sigbus: u64,
    /// Device callbacks (`migrate_to_ram`, `page_free`, `add_chunk`,
    /// invalidations) that panicked, and panics while the fault service
    /// served a fault. Each was contained: the panic hook printed it, and
    /// the call counted as failed.
    pub callback_panics: u64,
    /// CPU faults of a thread on a page of a migration that thread set up
    /// and has not finished: it waits for itself (each reported once on
    /// stderr, by migration).
    pub self_deadlocks: u64,
    /// Invalidations started, by event.
    pub invalidations: Vec<(NotifyEvent, u64)>,
}

/// The process's address space as uhmm manages it. Cheap to clone: clones
/// share one userfaultfd, one fault service thread and one table.
///
/// When the last handle (managed regions hold one each) goes away, or the
/// process exits normally with handles still alive (an `atexit` hook), every
/// notifier gets a [`NotifyEvent::Release`] over the whole address space, once,
/// then the service thread stops and the userfaultfd is closed, which
/// unregisters everything; no thread is left blocked.
#[derive(Debug, Clone)]
pub struct Mm {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The largest fault block: 2 MiB.
const MAX_FAULT_BLOCK: usize = 2 << 20;

impl Mm {
    /// Opens a userfaultfd with the event features uhmm uses and starts the
    /// fault service.
    ///
    /// The userfaultfd is the first that can be had of `/dev/userfaultfd`,
    /// the `userfaultfd(2)` system call, and that call with
    /// `UFFD_USER_MODE_ONLY` ([`AccessPolicy::Auto`]). The last is what an
    /// unprivileged process gets where neither `/dev/userfaultfd` (root's
    /// only, by default) nor `vm.unprivileged_userfaultfd=1` allows more;
    /// it is taken silently. [`access`](Self::access) says which it was. In
    /// that *user-mode-only* mode CPU loads and stores, migrations, device
    /// access and fork work as in full mode, but a fault raised inside the
    /// kernel is not delivered to uhmm: a system call (`read(2)` into,
    /// `write(2)` from, `process_vm_readv`, `O_DIRECT`) touching a managed
    /// page that is not in the CPU page table — on a device, held
    /// exclusive, being migrated, or discarded by the program since its
    /// region was first migrated — fails with EFAULT instead of bringing it
    /// back. (Never-touched pages are mapped, to the zero page, when a
    /// region is first migrated, and work.) DESIGN.md, "Unprivileged use",
    /// has the details. Use [`with_access`](Self::with_access) with
    /// [`AccessPolicy::FullOnly`] to refuse that mode.
    ///
    /// Fork is not taken from the kernel's FORK event: glibc's `fork()`
    /// holds every allocator lock while the kernel waits for that event to
    /// be read, so a service thread that allocated at that moment would
    /// deadlock the process. Instead a `pthread_atfork` prepare hook, run in
    /// the forking thread before those locks are taken, sends
    /// [`NotifyEvent::Fork`] for every managed region — before the fork
    /// write-protects private pages, as the kernel orders it.
    ///
    /// A forked child cannot use its copy of an `Mm` (the userfaultfd
    /// belongs to the parent's address space, and no service thread runs
    /// in the child): its operations return [`ForkedChild`] there, and
    /// dropping it does nothing. The child makes its own with `new`.
    pub fn new() -> Result<Mm, MmError> {
        Self::with_access(AccessPolicy::Auto)
    }

    /// [`new`](Self::new), obtaining the userfaultfd only in the ways
    /// `policy` allows: [`AccessPolicy::FullOnly`] requires one that
    /// serves kernel-mode faults (system calls on managed memory work
    /// then); [`AccessPolicy::Only`] with [`Access::UserModeOnly`] runs in
    /// user-mode-only mode even where more is allowed (to try a program
    /// as an unprivileged user would run it).
    ///
    /// ```
    /// use uhmm::mm::{Mm, MmError};
    /// use uhmm::sys::uffd::{AccessPolicy, OpenError};
    ///
    /// match Mm::with_access(AccessPolicy::FullOnly) {
    ///     Ok(mm) => assert!(mm.access().serves_kernel_faults()),
    ///     // Says what to do: root, access to /dev/userfaultfd, or the sysctl.
    ///     Err(MmError::Open(e @ OpenError::KernelFaultsUnavailable { .. })) => eprintln!("{e}"),
    ///     Err(e) => eprintln!("no userfaultfd at all: {e}"),
    /// }
    /// ```
    ///
    /// # Errors
    ///
    /// [`MmError::Open`]: with [`OpenError::KernelFaultsUnavailable`] when
    /// `FullOnly` finds no userfaultfd that serves kernel-mode faults, with
    /// [`OpenError::Unavailable`] when none the policy allows can be
    /// opened. [`MmError::Service`] when the fault service cannot start.
    pub fn with_access(policy: AccessPolicy) -> Result<Mm, MmError> {
        let base = Features::EVENT_REMOVE
            | Features::EVENT_UNMAP
            | Features::EVENT_REMAP
            | Features::PAGEFAULT_FLAG_WP
            | Features::THREAD_ID;
        let optional = Features::WP_HUGETLBFS_SHMEM
            | Features::POISON
            | Features::MISSING_SHMEM
            | Features::MISSING_HUGETLBFS
            | Features::MINOR_SHMEM;
        let uffd = Uffd::builder()
            .access(policy)
            .features(base)
            .optional_features(optional)
            .open()?;
        let shared =
            Arc::new(Shared::new(uffd, Notifiers::new()).map_err(|e| MmError::Service(e.into()))?);
        fork::track(&shared).map_err(|e| MmError::Service(e.into()))?;
        let s = shared.clone();
        let thread = crate::sys::spawn_quiet("uhmm-fault-service", move || service::run(s))
            .map_err(MmError::Service)?;
        Ok(Mm {
            inner: Arc::new(Inner {
                shared,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// `Ok` in the process that made this `Mm`; [`ForkedChild`] in a
    /// forked child, where nothing may be done with it (see
    /// [`ForkedChild`]). uhmm's own operations check it; a device built on
    /// uhmm calls it to refuse its commands in a child early.
    ///
    /// # Errors
    ///
    /// [`ForkedChild`] in a process other than the one that made it.
    pub fn check_process(&self) -> Result<(), ForkedChild> {
        self.inner.shared.check_process()
    }

    /// Whether the calling process is not the one that made this `Mm` (a
    /// forked child).
    fn inherited(&self) -> bool {
        self.check_process().is_err()
    }

    /// Sets how much a CPU fault on a device-resident page brings back:
    /// the aligned block of `bytes` bytes around it, clipped to its region.
    /// `bytes` is a power of two from one page (4096) to 2 MiB. The
    /// default, 2 MiB, makes a sequential CPU scan of device-resident
    /// memory take one fault per 2 MiB; one page suits random access to
    /// scattered pages. (In a forked child it changes the child's copy of
    /// the setting only, which nothing there uses.)
    ///
    /// Whatever the block, a fault right where the previous one's pages
    /// ended is taken for a sequential scan and reads ahead, as the
    /// kernel's page cache does: it brings back a window that doubles with
    /// each such fault, from the block up to 512 KiB (or the block, if
    /// larger), and then the next window while the woken thread reads the
    /// first. Any other fault brings back its block alone.
    ///
    /// # Errors
    ///
    /// [`MmError::BadFaultBlock`] if `bytes` is not such a size; the
    /// setting is unchanged.
    pub fn set_fault_block(&self, bytes: usize) -> Result<(), MmError> {
        if !bytes.is_power_of_two() || !(crate::PAGE_SIZE..=MAX_FAULT_BLOCK).contains(&bytes) {
            return Err(MmError::BadFaultBlock { bytes });
        }
        self.inner
            .shared
            .fault_block
            .store(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// The block a CPU fault on device memory brings back, in bytes.
    pub fn fault_block(&self) -> usize {
        self.inner.shared.fault_block.load(Ordering::Relaxed)
    }

    /// The device page of `owner` holding the managed page at `addr`, if
    /// that is where it lives now (never, in a forked child).
    pub fn device_page(&self, addr: VirtAddr, owner: Owner) -> Option<DevicePfn> {
        if self.inherited() {
            return None;
        }
        match lock(&self.inner.shared.regions)
            .states
            .get(addr.page_down())
        {
            Stored::Device(o, pfn) if o == owner => Some(pfn),
            _ => None,
        }
    }

    /// Registers `map`, a device's memory that is host RAM (private
    /// anonymous, read-write), with this address space's userfaultfd, so
    /// that migrations can move pages between it and managed memory with no
    /// copy ([`MigrateVma::move_to_device`](crate::devmem::MigrateVma::move_to_device)).
    /// It must not be managed memory.
    ///
    /// # Errors
    ///
    /// [`MmError::AlreadyManaged`] if it overlaps a managed region;
    /// [`MmError::Register`] if it cannot be registered;
    /// [`MmError::ForkedChild`] in a forked child.
    pub fn register_device_memory(&self, map: &Mapping) -> Result<(), MmError> {
        self.check_process()?;
        if let Some(existing) = lock(&self.inner.shared.regions).overlapping(map.range()) {
            return Err(MmError::AlreadyManaged {
                range: map.range(),
                existing,
            });
        }
        self.inner
            .shared
            .uffd
            .register(map, map.range(), RegisterMode::WP)?;
        self.inner.shared.add_device_memory(map.range());
        Ok(())
    }

    /// How this address space's userfaultfd was obtained, which decides
    /// whether faults raised inside the kernel are served
    /// ([`Access::serves_kernel_faults`]; see [`new`](Self::new) for what
    /// user-mode-only mode cannot do).
    pub fn access(&self) -> Access {
        self.inner.shared.uffd.access()
    }

    /// The userfaultfd's features (whether EVENT_FORK could be had, say).
    pub fn features(&self) -> Features {
        self.inner.shared.uffd.features()
    }

    /// The interval notifiers of this address space.
    pub fn notifiers(&self) -> &Arc<Notifiers> {
        &self.inner.shared.notifiers
    }

    /// Registers `ops` for invalidations overlapping `range`.
    ///
    /// # Errors
    ///
    /// [`MmError::ForkedChild`] in a forked child.
    pub fn insert_notifier(
        &self,
        range: PageRange,
        ops: Arc<dyn NotifierOps>,
    ) -> Result<IntervalNotifier, MmError> {
        Ok(self.inner.shared.notifiers.insert(range, ops)?)
    }

    /// Maps `len` bytes of new memory of the given kind and manages it.
    ///
    /// # Errors
    ///
    /// [`MmError::Map`] if the memory cannot be mapped (for example no free
    /// huge pages), [`MmError::Register`] if it cannot be registered (shared
    /// memory needs `WP_HUGETLBFS_SHMEM`, Linux 5.19+),
    /// [`MmError::ForkedChild`] in a forked child (nothing is mapped then).
    pub fn alloc(&self, len: usize, backing: Backing) -> Result<ManagedRegion, MmError> {
        self.alloc_mapping(Mapping::builder(len).backing(backing))
    }

    /// Maps new memory as `builder` describes it (backing, protection,
    /// alignment, populated or not) and manages it.
    ///
    /// ```
    /// use uhmm::mm::Mm;
    /// use uhmm::sys::mem::{Mapping, Prot};
    ///
    /// let mm = Mm::new()?;
    /// // 4 MiB, read-only, 2 MiB aligned so that THP can back it.
    /// let region = mm.alloc_mapping(Mapping::builder(4 << 20).prot(Prot::READ).align(2 << 20))?;
    /// assert!(region.range().start().is_aligned(2 << 20));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`alloc`](Self::alloc).
    pub fn alloc_mapping(&self, builder: MappingBuilder) -> Result<ManagedRegion, MmError> {
        self.check_process()?;
        let mapping = builder.build()?;
        let range = mapping.range();
        // Registered and recorded under the regions lock: no event of
        // memory that was here before is read but not yet applied then
        // (the service applies them under this lock), so no operation
        // still in flight on that memory can take the new region for it.
        let mut regions = lock(&self.inner.shared.regions);
        self.inner
            .shared
            .uffd
            .register(&mapping, range, RegisterMode::WP)?;
        let id = regions.insert(range);
        drop(regions);
        Ok(ManagedRegion::new(self.clone(), range, id, Some(mapping)))
    }

    /// Manages a range of a mapping the caller already has.
    ///
    /// # Errors
    ///
    /// [`MmError::AlreadyManaged`] if it overlaps a managed region,
    /// [`MmError::Register`] if part of it is unmapped, or of a kind that
    /// cannot be registered; [`MmError::ForkedChild`] in a forked child.
    ///
    /// # Safety
    ///
    /// No Rust reference may point into `range` while it is managed (devices
    /// and migrations change its contents), and the caller keeps it mapped
    /// until the returned region is dropped.
    #[allow(unsafe_code)] // named place: the caller's contract is registration's
    pub unsafe fn manage(&self, range: PageRange) -> Result<ManagedRegion, MmError> {
        self.check_process()?;
        let mut regions = lock(&self.inner.shared.regions);
        if let Some(existing) = regions.overlapping(range) {
            return Err(MmError::AlreadyManaged { range, existing });
        }
        // SAFETY: the caller's contract covers registration's.
        unsafe {
            self.inner
                .shared
                .uffd
                .register_range(range, RegisterMode::WP)
        }?;
        let id = regions.insert(range);
        drop(regions);
        Ok(ManagedRegion::new(self.clone(), range, id, None))
    }

    /// Stops managing whatever part of `range` is managed, leaving the
    /// memory mapped as it is, and returns how many bytes that was: after
    /// it, that memory is plain memory of the process, which a userfaultfd
    /// of its own may register (a range can be registered with one
    /// userfaultfd only, and uhmm's holds every managed range).
    ///
    /// In order: no new migration selects its system pages, and no
    /// exclusive grab starts there; operations in flight on it end (one
    /// abandoned past a bound is reclaimed); its pages on devices or held
    /// exclusive come home (one no device can give back is lost: an access
    /// gets SIGBUS); devices drop their translations of it (an
    /// [`NotifyEvent::Unmap`]); and its managed pieces are unregistered
    /// from uhmm's userfaultfd, one by one (never a range of which part is
    /// registered with another). While a layout change of the process is
    /// pending (its event not yet read by the fault service) for longer
    /// than it waits (20 ms), an unregister could take the registration of
    /// managed memory the change moved there: the fault service then
    /// unregisters the piece at the next moment with none pending, shortly
    /// after this returns. The rest of a region it cuts stays
    /// managed. A range a [`ManagedRegion`] covers is unmanaged all the
    /// same: that region's drop later lets go of what is left of it only.
    /// Nothing managed in `range` is `Ok(0)`.
    ///
    /// ```
    /// use uhmm::mm::Mm;
    /// use uhmm::sys::mem::Backing;
    /// use uhmm::PageRange;
    ///
    /// let mm = Mm::new()?;
    /// let region = mm.alloc(4 * 4096, Backing::AnonPrivate)?;
    /// region.store::<u64>(4096, 7)?;
    /// let at = region.range().start().checked_add(4096).ok_or("overflow")?;
    /// let second = PageRange::new(at, 4096)?;
    /// assert_eq!(mm.unmanage(second)?, 4096);
    /// assert!(!mm.is_managed(second));
    /// assert!(mm.is_managed(PageRange::new(region.range().start(), 4096)?));
    /// // The data stays; the memory is the process's own now.
    /// assert_eq!(region.load::<u64>(4096)?, 7);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`MmError::ForkedChild`] in a forked child (nothing is managed
    /// there).
    pub fn unmanage(&self, range: PageRange) -> Result<usize, MmError> {
        self.check_process()?;
        Ok(self.let_go(range, None, false))
    }

    /// Whether `range` lies entirely inside managed regions. In a forked
    /// child nothing is: the child's copies of the regions are not
    /// registered (the kernel drops the registrations in a fork).
    pub fn is_managed(&self, range: PageRange) -> bool {
        !self.inherited() && lock(&self.inner.shared.regions).covers(range)
    }

    /// The total length of the managed regions (0 in a forked child).
    pub fn managed_len(&self) -> usize {
        if self.inherited() {
            return 0;
        }
        lock(&self.inner.shared.regions)
            .ranges()
            .map(PageRange::len)
            .sum()
    }

    /// Changes the protection of a managed `range`, notifying the overlapping
    /// notifiers ([`NotifyEvent::Protection`]) before the change is made,
    /// as the kernel does. A protection change made behind uhmm's back
    /// (plain mprotect) is not notified; a device using a stale translation
    /// then fails cleanly at its next access (see `sys::mem::read_process`).
    ///
    /// # Errors
    ///
    /// [`MmError::NotManaged`] if the range is not managed; [`MmError::Map`]
    /// if the kernel refuses; [`MmError::ForkedChild`] in a forked child.
    #[allow(unsafe_code)] // named place: managed memory has no references
    pub fn mprotect(&self, range: PageRange, prot: Prot) -> Result<(), MmError> {
        self.check_process()?;
        if !self.is_managed(range) {
            return Err(MmError::NotManaged { range });
        }
        let notify = NotifierRange::new(range, NotifyEvent::Protection);
        let guard = self
            .inner
            .shared
            .notifiers
            .invalidate_start(&notify)
            .map_err(|_| MmError::NotManaged { range })?;
        // SAFETY: managed memory is reached through raw pointers only (a
        // ManagedRegion hands out no references; `manage` demands none), so
        // no reference is invalidated by the new protection.
        let res = unsafe { crate::sys::mem::mprotect(range, prot) };
        drop(guard);
        Ok(res?)
    }

    /// What the fault service has counted, and the size of the page-state
    /// table. In a forked child: the counts as they were at the fork, and
    /// no page state (nothing is managed there).
    pub fn stats(&self) -> MmStats {
        let s = &self.inner.shared.stats;
        // A forked child does not take the lock: a thread of the parent may
        // have held it at the fork, and then it stays locked in the child.
        let regions = (!self.inherited()).then(|| lock(&self.inner.shared.regions));
        let states = regions.as_ref().map(|r| &r.states);
        MmStats {
            events: s.events.load(Ordering::Relaxed),
            faults: s.faults.load(Ordering::Relaxed),
            invalidation_retries: s.retries.load(Ordering::Relaxed),
            state_pages: states.map_or(0, |t| t.pages()),
            state_bytes: states.map_or(0, |t| t.bytes()),
            owners: states.map_or(0, |t| t.owners()),
            faults_hole: s.faults_hole.load(Ordering::Relaxed),
            faults_device: s.faults_device.load(Ordering::Relaxed),
            faults_exclusive: s.faults_exclusive.load(Ordering::Relaxed),
            faults_wp: s.faults_wp.load(Ordering::Relaxed),
            faults_waited: s.faults_waited.load(Ordering::Relaxed),
            pages_to_device: s.pages_to_device.load(Ordering::Relaxed),
            pages_to_system: s.pages_to_system.load(Ordering::Relaxed),
            pages_lost: s.pages_lost.load(Ordering::Relaxed),
            faults_sigbus: s.faults_sigbus.load(Ordering::Relaxed),
            callback_panics: s.callback_panics.load(Ordering::Relaxed)
                + self.inner.shared.notifiers.callback_panics(),
            self_deadlocks: s.self_deadlocks.load(Ordering::Relaxed),
            invalidations: self.inner.shared.notifiers.counts(),
        }
    }

    /// The state of the managed page at `addr` (see [`PageState`]): what
    /// uhmm recorded for it, or for a page in the CPU's hands, whether the
    /// CPU page table maps it.
    ///
    /// # Errors
    ///
    /// [`MmError::NotManaged`] if the page is not managed;
    /// [`MmError::Pagemap`] if the page table cannot be read;
    /// [`MmError::ForkedChild`] in a forked child.
    pub fn page_state(&self, addr: VirtAddr) -> Result<PageState, MmError> {
        self.check_process()?;
        let page = PageRange::new(addr.page_down(), crate::PAGE_SIZE)?;
        let (stored, op_owner) = {
            let regions = lock(&self.inner.shared.regions);
            if !regions.covers(page) {
                return Err(MmError::NotManaged { range: page });
            }
            let s = regions.states.get(page.start());
            (s, regions.owner_of(s))
        };
        Ok(match stored {
            Stored::Migrating(_) => match op_owner {
                Some(owner) => PageState::Migrating { owner },
                // An operation's pages are never left behind it.
                None => PageState::Empty,
            },
            Stored::Device(owner, pfn) => PageState::Device { owner, pfn },
            Stored::Exclusive(owner, _) => PageState::Exclusive { owner },
            // No page backs it (an access gets SIGBUS), as for a poisoned
            // page, which pagemap shows as not present.
            Stored::Lost => PageState::Empty,
            Stored::Cpu => {
                let mut regions = Vec::new();
                let query = ScanQuery::new().require(Categories::PRESENT);
                self.inner
                    .shared
                    .pagemap()?
                    .scan(page, &query, &mut regions)?;
                if regions.is_empty() {
                    PageState::Empty
                } else {
                    PageState::System
                }
            }
        })
    }

    /// Records a state for a managed page (the device-memory layer's
    /// transitions; tests).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn set_state(&self, addr: VirtAddr, state: Stored) -> Result<Stored, StateError> {
        lock(&self.inner.shared.regions).states.set(addr, state)
    }

    /// Stops managing the pieces inside `range` of region `region` (of
    /// every region there if `None`), and returns their length: devices
    /// drop their translations of them (an Unmap, since no further change
    /// to them will be notified), then they are unregistered. `owned`: uhmm
    /// mapped the range and unmaps it next. (A `ManagedRegion` lets go of
    /// its own region's pieces only: another region managed inside its
    /// range since a part of it was unmanaged is not its to drop.)
    ///
    /// A migration or exclusive grab in flight on the range is not acted
    /// on behind its back (DESIGN.md concurrency rule 1). Memory the caller
    /// keeps mapped (`owned == false`) must read what it held, so this
    /// waits for those operations, then brings device and exclusive pages
    /// home, as an unregister waits on `mmap_lock` in the kernel. Memory
    /// about to be unmapped needs neither: its pages' states are dropped
    /// (device pages freed) and an operation in flight finds its pages gone
    /// and leaves them alone, whatever is mapped there later.
    ///
    /// The range leaves the region table before the invalidation ends, so a
    /// device that faults it in again afterwards finds it unmanaged
    /// ([`is_managed`](Self::is_managed) under its lock after
    /// `read_retry`) instead of mirroring memory that is about to go.
    ///
    /// Does nothing in a forked child: the child's copy of the range was
    /// never registered, and the userfaultfd (which would unregister the
    /// parent's range) and the state are the parent's.
    pub(crate) fn let_go(&self, range: PageRange, region: Option<u64>, owned: bool) -> usize {
        if ForkedChild::check_exact(self.inner.shared.pid).is_err() {
            return 0;
        }
        let shared = &self.inner.shared;
        let (pieces, token) = {
            let mut regions = lock(&shared.regions);
            let pieces = regions.pieces(range, region);
            if pieces.is_empty() {
                return 0;
            }
            // No new migration selects its pages from now on.
            (pieces, regions.close(range, region))
        };
        let mut bytes = 0;
        // (Once per call: a drop of many pieces waits 20 ms at most.)
        let mut waited = false;
        for p in pieces {
            let mut rounds = 0;
            loop {
                rounds += 1;
                if !owned {
                    self.settle(p);
                }
                // Blockable, so it cannot ask for a retry.
                let guard = shared
                    .notifiers
                    .invalidate_start(&NotifierRange::new(p, NotifyEvent::Unmap));
                let mut gone = Vec::new();
                let mut regions = lock(&shared.regions);
                // What is there now: a piece may have been unmapped
                // meanwhile, behind our back, and another region's pages
                // (or this region's, from elsewhere) moved in by an mremap
                // after they were brought home: those come home too, before
                // any state is dropped, unless they keep coming.
                let now = regions.pieces(p, region);
                let unsettled = !owned
                    && rounds < LET_GO_ROUNDS
                    && now.iter().any(|&q| {
                        regions.ops_in(q)
                            || !regions
                                .states
                                .select(Some(q), |s| s != Stored::Cpu)
                                .is_empty()
                    });
                if unsettled {
                    drop(regions);
                    drop(guard);
                    continue;
                }
                // A pending layout change may have moved memory in or out
                // of the piece, which the table shows once its event is
                // applied: waited for (briefly; not by a fault service,
                // which would wait for itself), then looked at again.
                if !waited && !service::on_service() && shared.uffd.layout_changing() {
                    waited = true;
                    drop(regions);
                    drop(guard);
                    shared.await_layout_settled(service::LET_GO_PATIENCE);
                    continue;
                }
                // Each piece alone: the kernel refuses to unregister a
                // range of which a part is registered with another
                // userfaultfd (before Linux 6.17 it unregistered that part
                // from it).
                for q in now {
                    regions.unmapped(q, |_, s| gone.push(s));
                    shared.unregister_checked(&mut regions, q);
                    bytes += q.len();
                }
                drop(regions);
                shared.release_states(gone);
                drop(guard);
                break;
            }
        }
        lock(&shared.regions).reopen(token);
        bytes
    }

    /// For [`let_go`](Self::let_go) of memory the caller keeps mapped: the
    /// operations in flight on `piece` end (a migration that has not
    /// within `ABANDONED`, its `MigrateVma` leaked, say, is reclaimed: its
    /// pages come home), then its pages on devices or held exclusive come
    /// home (a region the program keeps mapped must read what it held),
    /// and lost pages are poisoned (SIGBUS, not zeros, once uhmm lets go).
    fn settle(&self, piece: PageRange) {
        let shared = &self.inner.shared;
        let deadline = std::time::Instant::now() + service::ABANDONED;
        let mut regions = lock(&shared.regions);
        while regions.ops_in(piece) {
            if std::time::Instant::now() >= deadline {
                drop(regions);
                shared.reclaim_ops(Some(piece), None);
                regions = lock(&shared.regions);
            }
            // (Exclusive grabs left end by themselves.)
            regions = shared.wait_op_ended(regions, std::time::Duration::from_millis(20));
        }
        drop(regions);
        shared.bring_home(Some(piece), true);
        shared.poison_lost(Some(piece));
    }
}

/// How many times [`Mm::let_go`] brings a piece's pages home before it lets
/// go of it anyway: pages moved in again and again by mremaps meanwhile
/// (a program racing its own unmanage) lose their device state then.
const LET_GO_ROUNDS: u32 = 16;

impl Drop for Inner {
    fn drop(&mut self) {
        if ForkedChild::check_exact(self.shared.pid).is_err() {
            // A forked child's copy: no service thread runs here, and the
            // child's ranges were never registered. Nothing to release
            // (what the shared state holds is let go of without touching
            // the parent's: see `Drop for Shared`). The handle of the
            // parent's service thread is forgotten, not dropped: dropping
            // it would detach whatever thread of the child now has its
            // descriptor (the child reuses the stacks of the parent's
            // threads), and a later join of that thread would fail.
            let thread = self
                .thread
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            std::mem::forget(thread);
            return;
        }
        // Release first, while everything still stands, so devices stop
        // using the address space before it is unregistered.
        self.shared.release();
        self.shared.stop();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

/// The identity of a device (the kernel's `pgmap_owner`): invalidations
/// carry the owner that caused them, and device-private pages the owner they
/// belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Owner(NonZeroU64);

impl Owner {
    /// A new owner, distinct from every other one made in this process.
    pub fn unique() -> Owner {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        // Starting at 1 and counting up, `id` wraps to 0 only after 2^64
        // owners, which cannot be made.
        Owner(NonZeroU64::new(id).unwrap_or(NonZeroU64::MIN))
    }

    /// The owner's number.
    pub fn get(self) -> u64 {
        self.0.get()
    }
}
