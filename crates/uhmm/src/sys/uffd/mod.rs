//! userfaultfd: open, the API handshake, register/unregister, the resolve
//! ioctls ([`ops`]) and events ([`event`]).
//!
//! A [`Uffd`] is one userfaultfd context: a file descriptor, opened
//! non-blocking and close-on-exec, through which the kernel reports faults on
//! the ranges registered with it, and through which those faults are
//! resolved.
//!
//! ```no_run
//! use uhmm::sys::uffd::{Features, RegisterMode, Uffd};
//! use uhmm::sys::mem::Mapping;
//! use uhmm::PAGE_SIZE;
//!
//! let uffd = Uffd::builder().features(Features::EVENT_REMOVE | Features::EVENT_UNMAP).open()?;
//! let map = Mapping::anon(16 * PAGE_SIZE)?;
//! let allowed = uffd.register(&map, map.range(), RegisterMode::MISSING)?;
//! println!("resolve ioctls allowed on {}: {allowed:?}", map.range());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Kernel facts this module is built on (see `reference/userspace-notes.md`):
//! the `UFFDIO_API` handshake may be done once per fd, so features are probed
//! on a throwaway fd first; `/dev/userfaultfd` (5.11+) is reachable by file
//! permission, the syscall needs `CAP_SYS_PTRACE` or
//! `vm.unprivileged_userfaultfd=1`, and `UFFD_USER_MODE_ONLY` is the
//! unprivileged fallback that cannot serve faults raised inside the kernel
//! (`read(2)` into a registered hole returns EFAULT instead).

pub mod event;
pub(crate) mod ioctl;
pub mod ops;

use crate::addr::PageRange;
use crate::sys::mem::Mapping;
use crate::sys::procmap::{Procmap, VmaKind};
use bitflags::bitflags;
use linux_raw_sys::general as uapi;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::mm::UserfaultfdFlags;
use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

pub use event::{Event, FaultFlags, PageFault};
pub use ops::{ContinueMode, CopyMode, MoveMode, Op, OpError, Progress, Stop, refusals_here};

bitflags! {
    /// `UFFD_FEATURE_*`: what a userfaultfd context can do, negotiated once
    /// at open.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct Features: u64 {
        /// Fault messages carry the WP flag for write-protect faults.
        const PAGEFAULT_FLAG_WP = uapi::UFFD_FEATURE_PAGEFAULT_FLAG_WP as u64;
        /// A FORK event hands over the child's userfaultfd (needs `CAP_SYS_PTRACE`).
        const EVENT_FORK = uapi::UFFD_FEATURE_EVENT_FORK as u64;
        /// mremap of a registered range is reported.
        const EVENT_REMAP = uapi::UFFD_FEATURE_EVENT_REMAP as u64;
        /// `MADV_DONTNEED`/`MADV_REMOVE` of a registered range is reported.
        const EVENT_REMOVE = uapi::UFFD_FEATURE_EVENT_REMOVE as u64;
        /// MISSING mode works on hugetlbfs.
        const MISSING_HUGETLBFS = uapi::UFFD_FEATURE_MISSING_HUGETLBFS as u64;
        /// MISSING mode works on shmem (shared anon, memfd, tmpfs).
        const MISSING_SHMEM = uapi::UFFD_FEATURE_MISSING_SHMEM as u64;
        /// munmap of a registered range is reported.
        const EVENT_UNMAP = uapi::UFFD_FEATURE_EVENT_UNMAP as u64;
        /// Faults raise SIGBUS instead of a message.
        const SIGBUS = uapi::UFFD_FEATURE_SIGBUS as u64;
        /// Fault messages carry the faulting thread's id.
        const THREAD_ID = uapi::UFFD_FEATURE_THREAD_ID as u64;
        /// MINOR mode on hugetlbfs.
        const MINOR_HUGETLBFS = uapi::UFFD_FEATURE_MINOR_HUGETLBFS as u64;
        /// MINOR mode on shmem.
        const MINOR_SHMEM = uapi::UFFD_FEATURE_MINOR_SHMEM as u64;
        /// Fault addresses are reported exactly, not rounded to the page.
        const EXACT_ADDRESS = uapi::UFFD_FEATURE_EXACT_ADDRESS as u64;
        /// WP mode on hugetlbfs and shmem.
        const WP_HUGETLBFS_SHMEM = uapi::UFFD_FEATURE_WP_HUGETLBFS_SHMEM as u64;
        /// WP also traps pages that were never populated.
        const WP_UNPOPULATED = uapi::UFFD_FEATURE_WP_UNPOPULATED as u64;
        /// `UFFDIO_POISON`.
        const POISON = uapi::UFFD_FEATURE_POISON as u64;
        /// Write-protect faults resolved by the kernel (dirty tracking).
        const WP_ASYNC = uapi::UFFD_FEATURE_WP_ASYNC as u64;
        /// `UFFDIO_MOVE` (6.8+).
        const MOVE = uapi::UFFD_FEATURE_MOVE as u64;
    }
}

impl Features {
    /// What uhmm uses the feature for, and what is lost without it.
    pub fn purpose(self) -> &'static str {
        match self {
            Self::PAGEFAULT_FLAG_WP => {
                "tell write-protect faults apart (exclusive access, migration)"
            }
            Self::EVENT_FORK => {
                "FORK events (not used: device pages come home before a fork, so a child sees them)"
            }
            Self::EVENT_REMAP => "mremap moves device-resident pages with the range",
            Self::EVENT_REMOVE => "MADV_DONTNEED/REMOVE frees device pages and notifies mirrors",
            Self::MISSING_HUGETLBFS => "manage hugetlb memory",
            Self::MISSING_SHMEM => "manage shared anonymous, memfd and tmpfs memory",
            Self::EVENT_UNMAP => "munmap frees device pages and notifies mirrors",
            Self::SIGBUS => "SIGBUS mode (not used by uhmm)",
            Self::THREAD_ID => "fault statistics per thread",
            Self::MINOR_HUGETLBFS => "minor faults on hugetlb (file mirroring)",
            Self::MINOR_SHMEM => "minor faults on shmem (file mirroring)",
            Self::EXACT_ADDRESS => "exact fault addresses (diagnostics)",
            Self::WP_HUGETLBFS_SHMEM => "write-protect shared and hugetlb memory",
            Self::WP_UNPOPULATED => "write-protect pages never populated",
            Self::POISON => "report lost pages as SIGBUS instead of a hang",
            Self::WP_ASYNC => "cheap dirty tracking",
            Self::MOVE => "zero-copy migration of anonymous pages",
            _ => "",
        }
    }
}

bitflags! {
    /// `UFFDIO_REGISTER_MODE_*`: which faults of a range are reported.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct RegisterMode: u64 {
        /// Faults on pages with no page-table entry (holes).
        const MISSING = uapi::UFFDIO_REGISTER_MODE_MISSING as u64;
        /// Writes to write-protected pages.
        const WP = uapi::UFFDIO_REGISTER_MODE_WP as u64;
        /// Faults on pages present in the page cache but not mapped.
        const MINOR = uapi::UFFDIO_REGISTER_MODE_MINOR as u64;
    }
}

bitflags! {
    /// The ioctls the kernel allows: on the fd after the handshake, or on a
    /// range after it was registered (bit `n` is ioctl number `n`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Ioctls: u64 {
        /// `UFFDIO_REGISTER`
        const REGISTER = 1 << uapi::_UFFDIO_REGISTER;
        /// `UFFDIO_UNREGISTER`
        const UNREGISTER = 1 << uapi::_UFFDIO_UNREGISTER;
        /// `UFFDIO_WAKE`
        const WAKE = 1 << uapi::_UFFDIO_WAKE;
        /// `UFFDIO_COPY`
        const COPY = 1 << uapi::_UFFDIO_COPY;
        /// `UFFDIO_ZEROPAGE`
        const ZEROPAGE = 1 << uapi::_UFFDIO_ZEROPAGE;
        /// `UFFDIO_MOVE`
        const MOVE = 1 << uapi::_UFFDIO_MOVE;
        /// `UFFDIO_WRITEPROTECT`
        const WRITEPROTECT = 1 << uapi::_UFFDIO_WRITEPROTECT;
        /// `UFFDIO_CONTINUE`
        const CONTINUE = 1 << uapi::_UFFDIO_CONTINUE;
        /// `UFFDIO_POISON`
        const POISON = 1 << uapi::_UFFDIO_POISON;
        /// `UFFDIO_API`
        const API = 1 << uapi::_UFFDIO_API;
    }
}

/// How a userfaultfd was obtained; this decides which faults it can serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// Through `/dev/userfaultfd` (allowed by the node's file permissions).
    DevNode,
    /// Through the `userfaultfd(2)` syscall with full privilege.
    Syscall,
    /// Through the syscall with `UFFD_USER_MODE_ONLY`: only faults raised by
    /// user-mode accesses are reported; a system call (`read(2)`,
    /// `process_vm_readv`, `MADV_POPULATE_*`) touching a registered hole gets
    /// EFAULT instead.
    UserModeOnly,
}

impl Access {
    /// Whether faults raised inside the kernel on the program's behalf (a
    /// `read(2)` into managed memory, say) are reported and served.
    pub fn serves_kernel_faults(self) -> bool {
        !matches!(self, Access::UserModeOnly)
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::DevNode => "/dev/userfaultfd",
            Access::Syscall => "userfaultfd(2)",
            Access::UserModeOnly => "userfaultfd(2) with UFFD_USER_MODE_ONLY",
        })
    }
}

/// Which ways of obtaining a userfaultfd [`UffdBuilder::open`] may try.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AccessPolicy {
    /// `/dev/userfaultfd`, then the syscall, then the syscall in user-mode-only
    /// mode: the first that works.
    #[default]
    Auto,
    /// Like `Auto`, but never user-mode-only: fail
    /// ([`OpenError::KernelFaultsUnavailable`]) rather than lose the
    /// ability to serve faults raised by system calls.
    FullOnly,
    /// Exactly this way.
    Only(Access),
}

/// Why a userfaultfd could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Every allowed way to obtain a userfaultfd failed.
    #[error("no userfaultfd could be opened ({}); {hint}", attempts_to_string(.attempts))]
    Unavailable {
        /// Each way tried, with the error it gave.
        attempts: Vec<(Access, Errno)>,
        /// What to do about it.
        hint: &'static str,
    },
    /// [`AccessPolicy::FullOnly`] was asked for, and this process may not
    /// open a userfaultfd that serves kernel-mode faults (at most a
    /// user-mode-only one, which cannot serve a system call touching a
    /// page uhmm took out of the page table).
    #[error(
        "no userfaultfd that serves kernel-mode faults could be opened ({}); {KERNEL_FAULTS_HINT}",
        attempts_to_string(.attempts)
    )]
    KernelFaultsUnavailable {
        /// Each way tried, with the error it gave.
        attempts: Vec<(Access, Errno)>,
    },
    /// The `UFFDIO_API` handshake failed.
    #[error("the UFFDIO_API handshake failed on {access}: {errno}")]
    Handshake {
        /// How the fd was obtained.
        access: Access,
        /// The kernel's error.
        errno: Errno,
    },
    /// Some requested features are not offered by this kernel.
    #[error(
        "this kernel's userfaultfd lacks {missing:?} (it offers {supported:?}); upgrade the kernel or do without them"
    )]
    UnsupportedFeatures {
        /// The requested features the kernel lacks.
        missing: Features,
        /// What the kernel offers.
        supported: Features,
    },
    /// A feature needs more privilege than the process has (EVENT_FORK needs
    /// `CAP_SYS_PTRACE`).
    #[error(
        "userfaultfd features {requested:?} need CAP_SYS_PTRACE (EVENT_FORK) or root; run with more privilege or drop them"
    )]
    FeaturePermission {
        /// The features that were requested.
        requested: Features,
    },
}

fn attempts_to_string(attempts: &[(Access, Errno)]) -> String {
    attempts
        .iter()
        .map(|(a, e)| format!("{a}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why a range could not be registered or unregistered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The range does not lie inside the mapping it was given with.
    #[error("cannot register {range}: it is not inside the mapping {mapping}")]
    OutsideMapping {
        /// The range asked for.
        range: PageRange,
        /// The mapping.
        mapping: PageRange,
    },
    /// Part of the range has no mapping.
    #[error("cannot register {range}: nothing is mapped at {hole}")]
    Unmapped {
        /// The range asked for.
        range: PageRange,
        /// The first address in it with no mapping.
        hole: crate::VirtAddr,
    },
    /// Part of the range is already registered with another userfaultfd.
    #[error("cannot register {range}: part of it is already registered with another userfaultfd")]
    AlreadyRegistered {
        /// The range asked for.
        range: PageRange,
    },
    /// The mapping cannot be registered (in this mode).
    #[error("userfaultfd cannot take {range} (mode {mode:?}): {reason}")]
    Unsupported {
        /// The range asked for.
        range: PageRange,
        /// The mode asked for.
        mode: RegisterMode,
        /// Why, as far as it could be told.
        reason: String,
    },
    /// The file descriptor is closed or is not a userfaultfd.
    #[error(
        "cannot (un)register {range}: the userfaultfd is closed or is not a userfaultfd ({errno})"
    )]
    BadFd {
        /// The range asked for.
        range: PageRange,
        /// EBADF or ENOTTY.
        errno: Errno,
    },
    /// Any other kernel error.
    #[error("cannot (un)register {range}: {errno}")]
    Kernel {
        /// The range asked for.
        range: PageRange,
        /// The kernel's error.
        errno: Errno,
    },
}

/// Why reading or waiting for events failed.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// `read(2)` or `poll(2)` on the userfaultfd failed.
    #[error("reading userfaultfd events failed: {0}")]
    Read(#[source] Errno),
}

/// Builds a [`Uffd`]: which features to enable and how to obtain it.
#[derive(Debug, Clone, Copy, Default)]
pub struct UffdBuilder {
    features: Option<Features>,
    optional: Features,
    policy: AccessPolicy,
}

impl UffdBuilder {
    /// Features to enable; the open fails if the kernel lacks any of them.
    pub fn features(mut self, features: Features) -> Self {
        self.features = Some(features);
        self
    }

    /// Features to enable where the kernel offers them, and do without
    /// where it does not ([`Uffd::features`] says which were enabled).
    pub fn optional_features(mut self, features: Features) -> Self {
        self.optional = features;
        self
    }

    /// Which ways of obtaining the fd may be tried.
    pub fn access(mut self, policy: AccessPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Opens the userfaultfd and performs the handshake.
    ///
    /// # Errors
    ///
    /// [`OpenError::Unavailable`] when no allowed way works (the hint says
    /// which privilege or sysctl to change),
    /// [`OpenError::KernelFaultsUnavailable`] when none does under
    /// [`AccessPolicy::FullOnly`] (and the kernel has userfaultfd),
    /// [`OpenError::UnsupportedFeatures`]
    /// when the kernel lacks a requested feature,
    /// [`OpenError::FeaturePermission`] for EVENT_FORK without
    /// `CAP_SYS_PTRACE`.
    pub fn open(self) -> Result<Uffd, OpenError> {
        let features = self.features.unwrap_or(Features::empty());
        let (probe_fd, access) = create_any(self.policy)?;
        // The handshake may be done once per fd, and an unsupported request
        // leaves the fd unusable: learn what is offered on a throwaway fd.
        let (supported, _) = handshake(probe_fd.as_fd(), Features::empty())
            .map_err(|errno| OpenError::Handshake { access, errno })?;
        drop(probe_fd);
        let missing = features - supported;
        if !missing.is_empty() {
            return Err(OpenError::UnsupportedFeatures { missing, supported });
        }
        let features = features | (self.optional & supported);
        let fd = create(access).map_err(|e| OpenError::Unavailable {
            attempts: vec![(access, e)],
            hint: HINT,
        })?;
        let (_, ioctls) = handshake(fd.as_fd(), features).map_err(|errno| match errno {
            Errno::PERM => OpenError::FeaturePermission {
                requested: features,
            },
            errno => OpenError::Handshake { access, errno },
        })?;
        Ok(Uffd {
            fd,
            features,
            supported,
            ioctls,
            access,
        })
    }
}

const HINT: &str = "run as root, or give this user read-write access to /dev/userfaultfd, \
                    or set vm.unprivileged_userfaultfd=1";

/// How to get a userfaultfd that serves kernel-mode faults.
pub const KERNEL_FAULTS_HINT: &str = "to serve faults raised inside the kernel (a read(2) into \
    managed memory, say), run as root, or give this user read-write access to /dev/userfaultfd, \
    or set vm.unprivileged_userfaultfd=1";

fn create_any(policy: AccessPolicy) -> Result<(OwnedFd, Access), OpenError> {
    let order: &[Access] = match policy {
        AccessPolicy::Auto => &[Access::DevNode, Access::Syscall, Access::UserModeOnly],
        AccessPolicy::FullOnly => &[Access::DevNode, Access::Syscall],
        AccessPolicy::Only(Access::DevNode) => &[Access::DevNode],
        AccessPolicy::Only(Access::Syscall) => &[Access::Syscall],
        AccessPolicy::Only(Access::UserModeOnly) => &[Access::UserModeOnly],
    };
    let mut attempts = Vec::new();
    for &access in order {
        match create(access) {
            Ok(fd) => return Ok((fd, access)),
            Err(e) => attempts.push((access, e)),
        }
    }
    let absent = attempts
        .iter()
        .all(|(_, e)| *e == Errno::NOSYS || *e == Errno::NOENT);
    if absent {
        let hint = "this kernel has no userfaultfd (CONFIG_USERFAULTFD is off)";
        return Err(OpenError::Unavailable { attempts, hint });
    }
    if policy == AccessPolicy::FullOnly {
        return Err(OpenError::KernelFaultsUnavailable { attempts });
    }
    Err(OpenError::Unavailable {
        attempts,
        hint: HINT,
    })
}

/// Obtains a new userfaultfd (non-blocking, close-on-exec) in one way.
fn create(access: Access) -> Result<OwnedFd, Errno> {
    let flags = UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK;
    match access {
        Access::DevNode => {
            let node = rustix::fs::open(
                "/dev/userfaultfd",
                OFlags::RDWR | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let req = ioctl::NewUffd {
                flags: flags.bits() as usize,
            };
            // SAFETY: USERFAULTFD_IOC_NEW on /dev/userfaultfd takes integer
            // flags and returns a new fd (see `NewUffd`).
            let raw = unsafe { rustix::ioctl::ioctl(&node, req) }?;
            // SAFETY: on success the ioctl returned a new descriptor that
            // nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(raw) })
        }
        Access::Syscall => {
            // SAFETY: userfaultfd(2) creates a new fd; the flags are valid.
            unsafe { rustix::mm::userfaultfd(flags) }
        }
        Access::UserModeOnly => {
            let flags = flags | UserfaultfdFlags::from_bits_retain(uapi::UFFD_USER_MODE_ONLY);
            // SAFETY: as above; UFFD_USER_MODE_ONLY is a valid flag (5.11+).
            unsafe { rustix::mm::userfaultfd(flags) }
        }
    }
}

/// `UFFDIO_API`: requests `features`; returns what the kernel offers and
/// which ioctls the fd accepts.
fn handshake(fd: BorrowedFd<'_>, features: Features) -> Result<(Features, Ioctls), Errno> {
    let mut api = uapi::uffdio_api {
        api: uapi::UFFD_API as u64,
        features: features.bits(),
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API takes a `struct uffdio_api`, which `api` is.
    unsafe { ioctl::update::<{ ioctl::UFFDIO_API }, _>(fd, &mut api) }?;
    Ok((
        Features::from_bits_retain(api.features),
        Ioctls::from_bits_retain(api.ioctls),
    ))
}

/// One userfaultfd context.
///
/// Closing it (dropping the last handle) unregisters every range registered
/// with it and wakes every thread waiting on one of its faults, which then
/// retries the access as if the range had never been registered.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: Features,
    supported: Features,
    ioctls: Ioctls,
    access: Access,
}

impl Uffd {
    /// A builder: choose features and access policy, then
    /// [`open`](UffdBuilder::open).
    pub fn builder() -> UffdBuilder {
        UffdBuilder::default()
    }

    /// The features enabled on this context.
    pub fn features(&self) -> Features {
        self.features
    }

    /// The features the kernel offers (a superset of [`features`](Self::features)).
    pub fn supported_features(&self) -> Features {
        self.supported
    }

    /// The ioctls the fd accepts, as reported by the handshake.
    pub fn ioctls(&self) -> Ioctls {
        self.ioctls
    }

    /// How the fd was obtained.
    pub fn access(&self) -> Access {
        self.access
    }

    /// Registers `range`, which lies in `map`, for the faults of `mode`;
    /// returns the resolve ioctls the kernel allows on it (no ZEROPAGE on
    /// hugetlb, MOVE only on private anonymous memory, and so on).
    ///
    /// Safe because a [`Mapping`] hands out no references into its memory:
    /// the resolve ioctls fill holes of a registered range with data, which
    /// would change what a `&[u8]` over a never-touched page reads. See
    /// [`register_range`](Self::register_range) for other memory.
    ///
    /// Registering a range already registered with this same context is
    /// allowed and updates its mode. The kernel would register the mapped
    /// parts of a range with holes; this refuses such a range instead, after
    /// a look at the mappings (a mapping created or removed concurrently can
    /// still slip past that look).
    ///
    /// # Errors
    ///
    /// [`RegisterError::Unmapped`] if part of the range has no mapping,
    /// [`RegisterError::AlreadyRegistered`] if another userfaultfd has part
    /// of it, [`RegisterError::Unsupported`] if the mapping cannot be
    /// registered in this mode (with the reason), [`RegisterError::BadFd`] if
    /// the fd is no longer a userfaultfd. On error nothing is registered.
    pub fn register(
        &self,
        map: &Mapping,
        range: PageRange,
        mode: RegisterMode,
    ) -> Result<Ioctls, RegisterError> {
        if !map.range().contains_range(range) {
            return Err(RegisterError::OutsideMapping {
                range,
                mapping: map.range(),
            });
        }
        // SAFETY: `range` lies in `map`, into which no reference exists.
        unsafe { self.register_range(range, mode) }
    }

    /// Registers any `range` of the process, like [`register`](Self::register).
    ///
    /// # Safety
    ///
    /// While the range stays registered, resolving its faults puts data into
    /// pages that read as zeros before (a never-touched page): no Rust
    /// reference may point into `range` until it is unregistered.
    pub unsafe fn register_range(
        &self,
        range: PageRange,
        mode: RegisterMode,
    ) -> Result<Ioctls, RegisterError> {
        if let Some(hole) = first_hole(range) {
            return Err(RegisterError::Unmapped { range, hole });
        }
        let mut reg = uapi::uffdio_register {
            range: uapi::uffdio_range {
                start: range.start().get() as u64,
                len: range.len() as u64,
            },
            mode: mode.bits(),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register`.
        let res =
            unsafe { ioctl::update::<{ ioctl::UFFDIO_REGISTER }, _>(self.fd.as_fd(), &mut reg) };
        match res {
            Ok(()) => Ok(Ioctls::from_bits_retain(reg.ioctls)),
            Err(errno) => Err(diagnose(range, mode, errno)),
        }
    }

    /// Unregisters `range`; pages stay as they are. Threads blocked on a
    /// fault in the range are woken and retry.
    ///
    /// # Errors
    ///
    /// As for [`register`](Self::register): `Unmapped` when part of the
    /// range has no mapping, `BadFd` when the fd is not a userfaultfd.
    pub fn unregister(&self, range: PageRange) -> Result<(), RegisterError> {
        let mut r = uapi::uffdio_range {
            start: range.start().get() as u64,
            len: range.len() as u64,
        };
        // SAFETY: UFFDIO_UNREGISTER takes a `struct uffdio_range`.
        unsafe { ioctl::update::<{ ioctl::UFFDIO_UNREGISTER }, _>(self.fd.as_fd(), &mut r) }
            .map_err(|errno| diagnose(range, RegisterMode::empty(), errno))
    }

    /// Waits until an event can be read, up to `timeout` (`None`: forever).
    /// Returns whether one can. A `true` may still be followed by a read that
    /// finds nothing: a fault can be resolved (and its message withdrawn)
    /// between the two.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<bool, EventError> {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let ts = timeout.map(|t| Timespec {
            tv_sec: t.as_secs().min(i64::MAX as u64) as i64,
            tv_nsec: i64::from(t.subsec_nanos()),
        });
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        let n =
            crate::sys::retry_eintr(|| poll(&mut fds, ts.as_ref())).map_err(EventError::Read)?;
        Ok(n > 0)
    }

    /// Reads the pending events (up to 64 per call, without blocking) and
    /// appends them to `out`; returns how many were read, 0 when none is
    /// pending.
    ///
    /// It allocates only if `out` lacks room for [`event::BATCH`] more
    /// events, so reserve that once and drain `out` between calls. A thread
    /// that serves events must not allocate: a thread in `fork` holds the
    /// allocator's locks (glibc's fork handlers take them) while the kernel
    /// waits for the FORK event to be read, and a serving thread blocked on
    /// them would deadlock the fork.
    pub fn read_events(&self, out: &mut Vec<Event>) -> Result<usize, EventError> {
        event::read_batch(self, out)
    }

    /// The child context handed over by a FORK event.
    fn child_of_fork(&self, fd: OwnedFd) -> Uffd {
        Uffd {
            fd,
            features: self.features,
            supported: self.supported,
            ioctls: self.ioctls,
            access: self.access,
        }
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The first address of `range` that no mapping covers, if any (and if the
/// mappings can be read at all).
fn first_hole(range: PageRange) -> Option<crate::VirtAddr> {
    let vmas = Procmap::open().and_then(|m| m.covering(range)).ok()?;
    hole_in(range, &vmas)
}

fn hole_in(range: PageRange, vmas: &[crate::sys::procmap::Vma]) -> Option<crate::VirtAddr> {
    let mut cursor = range.start();
    for vma in vmas {
        if vma.range.start() > cursor {
            break;
        }
        cursor = cursor.max(vma.range.end());
    }
    (cursor < range.end()).then_some(cursor)
}

/// Turns a register/unregister errno into an error that says why, by
/// looking at the mappings under the range.
fn diagnose(range: PageRange, mode: RegisterMode, errno: Errno) -> RegisterError {
    match errno {
        Errno::BUSY => return RegisterError::AlreadyRegistered { range },
        Errno::BADF | Errno::NOTTY => return RegisterError::BadFd { range, errno },
        Errno::PERM => {
            return RegisterError::Unsupported {
                range,
                mode,
                reason: "the kernel refused it (EPERM): a shared mapping must be writable, neither read-only nor write-sealed".into(),
            };
        }
        Errno::INVAL | Errno::NOMEM => {}
        errno => return RegisterError::Kernel { range, errno },
    }
    let Ok(maps) = Procmap::open() else {
        return RegisterError::Kernel { range, errno };
    };
    let vmas = match maps.covering(range) {
        Ok(v) => v,
        Err(_) => return RegisterError::Kernel { range, errno },
    };
    // The first address of the range that no mapping covers.
    let mut cursor = range.start();
    for vma in &vmas {
        if vma.range.start() > cursor {
            break;
        }
        cursor = cursor.max(vma.range.end());
    }
    if cursor < range.end() {
        return RegisterError::Unmapped {
            range,
            hole: cursor,
        };
    }
    for vma in &vmas {
        let kind = vma.kind();
        let reason = match kind {
            VmaKind::Hugetlb { page_size }
                if !range.start().is_aligned(page_size) || range.len() % page_size != 0 =>
            {
                format!("the hugetlb mapping {} needs ranges aligned to its {page_size}-byte pages", vma.range)
            }
            VmaKind::AnonPrivate if mode.contains(RegisterMode::MINOR) => {
                "MINOR faults need shared memory (shmem, memfd, tmpfs) or hugetlb, not private anonymous memory".into()
            }
            VmaKind::File if !vma.is_shmem() => format!(
                "{} maps a regular file ({}); only anonymous, shmem (memfd, tmpfs) and hugetlb mappings can be registered",
                vma.range,
                vma.name.as_deref().unwrap_or("?")
            ),
            VmaKind::Special => format!(
                "{} is a special mapping ({}) that userfaultfd cannot handle",
                vma.range,
                vma.name.as_deref().unwrap_or("pfn/io map")
            ),
            _ => continue,
        };
        return RegisterError::Unsupported {
            range,
            mode,
            reason,
        };
    }
    RegisterError::Unsupported {
        range,
        mode,
        reason: format!(
            "the kernel refused it ({errno}); check that the features this mode needs were enabled"
        ),
    }
}
