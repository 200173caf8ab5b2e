//! The resolve ioctls: COPY, ZEROPAGE, MOVE, CONTINUE, POISON, WRITEPROTECT
//! and WAKE.
//!
//! Each returns a [`Progress`]: how many bytes were done, and if it stopped
//! early, why ([`Stop`]). The stop reasons are the outcomes a fault handler
//! must expect and act on; the errors ([`OpError`]) are misuse or kernel
//! failures that retrying will not fix.
//!
//! The kernel encodes progress in an output field (`copy`, `zeropage`,
//! `move`, `mapped`, `updated`): bytes done if positive, else a negated
//! errno, and the ioctl fails with EAGAIN whenever it did only part of the
//! range. "Nothing done because the address-space layout is changing" comes
//! in two encodings across kernels — EAGAIN with the field 0, or with the
//! field -EAGAIN (6.18 gives the latter) — and both decode to
//! [`Stop::LayoutChanging`] here. The field is zeroed before each call, so a
//! failure before the kernel wrote it reads as "nothing done".

use super::{Features, Uffd, ioctl};
use crate::addr::{PageRange, VirtAddr};
use bitflags::bitflags;
use linux_raw_sys::general as uapi;
use rustix::io::Errno;
use std::cell::Cell;
use std::fmt;
use std::os::fd::AsFd;

/// How far a resolve ioctl got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a resolve ioctl may stop early; check `stop`"]
pub struct Progress {
    /// Bytes done from the start of the range (a multiple of the page size).
    pub done: usize,
    /// `None` if the whole range was done; otherwise why it stopped at
    /// `start + done`.
    pub stop: Option<Stop>,
}

impl Progress {
    /// Whether the whole range was done.
    pub fn is_complete(&self) -> bool {
        self.stop.is_none()
    }

    /// The part of `range` not done, if any.
    pub fn remainder(&self, range: PageRange) -> Option<PageRange> {
        range.tail_from(range.start().checked_add(self.done)?)
    }
}

/// Why a resolve ioctl stopped before the end of its range. Each is an
/// expected outcome for a fault handler, with a prescribed reaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stop {
    /// EAGAIN with nothing done: the address-space layout is changing (an
    /// UNMAP, REMOVE or REMAP event is still unread). Read the pending events
    /// first, then retry the remainder if it is still mapped.
    LayoutChanging,
    /// EAGAIN after part of the range was done: the kernel stopped at the
    /// first page it could not do. Retry the remainder to learn why.
    Partial,
    /// EEXIST: the page at `start + done` is already present (someone else
    /// resolved it). A thread may still be waiting on it: a wake is owed
    /// ([`Uffd::wake`]).
    Exists,
    /// ENOENT: the destination is not (or no longer) a range registered
    /// with this userfaultfd — never registered, unregistered, or unmapped
    /// under the call; for MOVE, also a hole in the source (see
    /// [`MoveMode::ALLOW_SRC_HOLES`]). Re-check the layout; nothing was
    /// changed.
    NoEntry,
    /// ESRCH (ENOSPC on 4.11–4.13): the process that owns the address space
    /// has exited. Stop serving this userfaultfd.
    ProcessExited,
    /// EBUSY: for MOVE, a source page is not exclusive to this process
    /// (shared copy-on-write after fork, KSM, pinned). Copy it instead.
    Busy,
}

impl Stop {
    fn from_errno(errno: Errno, done: usize) -> Option<Stop> {
        Some(match errno {
            Errno::AGAIN if done > 0 => Stop::Partial,
            Errno::AGAIN => Stop::LayoutChanging,
            Errno::EXIST => Stop::Exists,
            Errno::NOENT => Stop::NoEntry,
            Errno::SRCH | Errno::NOSPC => Stop::ProcessExited,
            Errno::BUSY => Stop::Busy,
            _ => return None,
        })
    }
}

thread_local! {
    /// Refusals met by this thread (see [`refusals_here`]).
    static REFUSED_HERE: Cell<u64> = const { Cell::new(0) };
}

/// How many resolve ioctls the calling thread has had refused by a pending
/// layout change so far ([`Stop::LayoutChanging`], on any userfaultfd),
/// with the refusals uhmm inferred on it from other answers. Read before
/// and after a piece of work the thread does itself, it says whether a
/// change refused anything in that work (whose data is then intact,
/// waiting for its window) — and nothing of what other threads meet.
pub fn refusals_here() -> u64 {
    REFUSED_HERE.with(Cell::get)
}

/// Counts a refusal by a layout change in [`refusals_here`] that uhmm
/// inferred from another answer (an ENOENT while a mapping moves).
pub(crate) fn note_refusal_here() {
    REFUSED_HERE.with(|c| c.set(c.get() + 1));
}

/// A resolve ioctl, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `UFFDIO_COPY`
    Copy,
    /// `UFFDIO_ZEROPAGE`
    ZeroPage,
    /// `UFFDIO_MOVE`
    Move,
    /// `UFFDIO_CONTINUE`
    Continue,
    /// `UFFDIO_POISON`
    Poison,
    /// `UFFDIO_WRITEPROTECT`
    WriteProtect,
    /// `UFFDIO_WAKE`
    Wake,
}

impl Op {
    fn recorded(self) -> crate::record::What {
        use crate::record::What;
        match self {
            Op::Copy => What::Copy,
            Op::ZeroPage => What::ZeroPage,
            Op::Move => What::Move,
            Op::Continue => What::Continue,
            Op::Poison => What::Poison,
            Op::WriteProtect => What::WriteProtect,
            Op::Wake => What::Wake,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Copy => "UFFDIO_COPY",
            Op::ZeroPage => "UFFDIO_ZEROPAGE",
            Op::Move => "UFFDIO_MOVE",
            Op::Continue => "UFFDIO_CONTINUE",
            Op::Poison => "UFFDIO_POISON",
            Op::WriteProtect => "UFFDIO_WRITEPROTECT",
            Op::Wake => "UFFDIO_WAKE",
        })
    }
}

/// A resolve ioctl failed in a way that retrying will not fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// EINVAL: the range is not registered with this userfaultfd, not in a
    /// mode that allows the operation, or the operation's mode bits are not
    /// valid for it.
    #[error(
        "{op} on {range}: the range is not registered with this userfaultfd in a mode that allows it (EINVAL)"
    )]
    Invalid {
        /// The operation.
        op: Op,
        /// The destination range.
        range: PageRange,
    },
    /// The running kernel lacks the operation.
    #[error(
        "{op} on {range}: this kernel's userfaultfd lacks {feature:?} (MOVE needs Linux 6.8, POISON 6.6)"
    )]
    FeatureUnsupported {
        /// The operation.
        op: Op,
        /// The destination range.
        range: PageRange,
        /// The missing feature.
        feature: Features,
    },
    /// EFAULT: the source memory could not be read.
    #[error("{op} on {range}: the source at {src} could not be read (EFAULT)")]
    Fault {
        /// The operation.
        op: Op,
        /// The destination range.
        range: PageRange,
        /// The source address.
        src: VirtAddr,
    },
    /// ENOMEM: the kernel could not allocate a page or page table (for
    /// shmem also: the tmpfs or the memory cgroup is full).
    #[error(
        "{op} on {range}: out of memory (ENOMEM; for shared memory also a full tmpfs or memory cgroup)"
    )]
    NoMemory {
        /// The operation.
        op: Op,
        /// The destination range.
        range: PageRange,
    },
    /// EBADF or ENOTTY: the fd is closed or not a userfaultfd.
    #[error("{op} on {range}: the userfaultfd is closed or is not a userfaultfd ({errno})")]
    BadFd {
        /// The operation.
        op: Op,
        /// The destination range.
        range: PageRange,
        /// EBADF or ENOTTY.
        errno: Errno,
    },
    /// Any other kernel error.
    #[error("{op} on {range}: {errno}")]
    Kernel {
        /// The operation.
        op: Op,
        /// The destination range.
        range: PageRange,
        /// The kernel's error.
        errno: Errno,
    },
}

bitflags! {
    /// `UFFDIO_COPY_MODE_*`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct CopyMode: u64 {
        /// Do not wake the threads waiting on the range.
        const DONTWAKE = uapi::UFFDIO_COPY_MODE_DONTWAKE as u64;
        /// Map the new pages write-protected (needs WP registration).
        const WP = uapi::UFFDIO_COPY_MODE_WP as u64;
    }
}

bitflags! {
    /// `UFFDIO_MOVE_MODE_*` (not in the installed headers; values from the
    /// 6.8 uapi).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct MoveMode: u64 {
        /// Do not wake the threads waiting on the destination.
        const DONTWAKE = 1 << 0;
        /// Skip holes in the source instead of stopping with ENOENT.
        const ALLOW_SRC_HOLES = 1 << 1;
    }
}

bitflags! {
    /// `UFFDIO_CONTINUE_MODE_*`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct ContinueMode: u64 {
        /// Do not wake the threads waiting on the range.
        const DONTWAKE = 1 << 0;
        /// Map the pages write-protected.
        const WP = 1 << 1;
    }
}

const ZEROPAGE_DONTWAKE: u64 = uapi::UFFDIO_ZEROPAGE_MODE_DONTWAKE as u64;
const POISON_DONTWAKE: u64 = 1 << 0;
const WRITEPROTECT_WP: u64 = 1 << 0;
const WRITEPROTECT_DONTWAKE: u64 = 1 << 1;

fn urange(range: PageRange) -> uapi::uffdio_range {
    uapi::uffdio_range {
        start: range.start().get() as u64,
        len: range.len() as u64,
    }
}

/// Decodes the result of a resolve ioctl that reports progress in `out`.
fn progress(
    op: Op,
    range: PageRange,
    src: VirtAddr,
    res: rustix::io::Result<()>,
    out: i64,
) -> Result<Progress, OpError> {
    crate::record::note(
        op.recorded(),
        range.start().get(),
        src.get(),
        range.len(),
        res.err().map_or(0, |e| e.raw_os_error() as u16),
        out,
    );
    let Err(errno) = res else {
        return Ok(Progress {
            done: range.len(),
            stop: None,
        });
    };
    // A positive count is bytes done before the kernel stopped; anything
    // else (0 as we left it, or -errno) means nothing was done.
    let done = usize::try_from(out).unwrap_or(0).min(range.len());
    if let Some(stop) = Stop::from_errno(errno, done) {
        return Ok(Progress {
            done,
            stop: Some(stop),
        });
    }
    Err(match errno {
        Errno::INVAL => OpError::Invalid { op, range },
        Errno::FAULT => OpError::Fault { op, range, src },
        Errno::NOMEM => OpError::NoMemory { op, range },
        Errno::BADF | Errno::NOTTY => OpError::BadFd { op, range, errno },
        errno => OpError::Kernel { op, range, errno },
    })
}

impl Uffd {
    /// MOVE and POISON need no feature enabled at open, only a kernel that
    /// has them; refuse up front where it does not, with a clear error.
    fn require(&self, op: Op, range: PageRange, feature: Features) -> Result<(), OpError> {
        if self.supported_features().contains(feature) {
            Ok(())
        } else {
            Err(OpError::FeatureUnsupported { op, range, feature })
        }
    }

    /// `UFFDIO_COPY`: fills the holes of `dst` with a copy of the bytes at
    /// `src` (`dst.len()` of them) and, unless `DONTWAKE`, wakes the threads
    /// waiting on the pages done.
    ///
    /// The kernel reads the source itself, so an unreadable `src` is an
    /// [`OpError::Fault`], never a crash. A page of `dst` that is already
    /// present stops the copy there with [`Stop::Exists`] (nothing of that
    /// page is overwritten).
    pub fn copy(&self, dst: PageRange, src: VirtAddr, mode: CopyMode) -> Result<Progress, OpError> {
        let mut arg = uapi::uffdio_copy {
            dst: dst.start().get() as u64,
            src: src.get() as u64,
            len: dst.len() as u64,
            mode: mode.bits(),
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY takes a `struct uffdio_copy`. The kernel reads
        // `src` with copy_from_user (a bad pointer is EFAULT) and fills only
        // holes of a registered `dst`, into which registration's contract
        // (`Uffd::register`) guarantees no reference points.
        let res = unsafe { ioctl::update::<{ ioctl::UFFDIO_COPY }, _>(self.as_fd(), &mut arg) };
        self.counted(progress(Op::Copy, dst, src, res, arg.copy))
    }

    /// Whether a change of the address space's layout is pending: an
    /// UNMAP, REMAP, REMOVE or FORK event queued and not yet read (the
    /// kernel's `mmap_changing`, raised under the same `mmap_lock` hold
    /// that makes the change (for an mremap, right after it moves the page
    /// tables) and lowered once its event is read). Every resolving ioctl answers
    /// EAGAIN then; this asks with a `UFFDIO_COPY` of no bytes, which the
    /// kernel checks for a pending change before anything else and then
    /// refuses (EINVAL): it touches nothing. `false` where it cannot tell.
    pub fn layout_changing(&self) -> bool {
        let mut arg = uapi::uffdio_copy {
            dst: 0,
            src: 0,
            len: 0,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY takes a `struct uffdio_copy`; a length of 0
        // is refused before any page is looked at (`validate_range`).
        let res = unsafe { ioctl::update::<{ ioctl::UFFDIO_COPY }, _>(self.as_fd(), &mut arg) };
        matches!(res, Err(rustix::io::Errno::AGAIN))
    }

    /// `UFFDIO_ZEROPAGE`: maps the shared zero page into the holes of
    /// `range`. Use it for read faults only: a later write costs a second
    /// fault (COPY from a zeroed buffer is cheaper for write faults).
    pub fn zeropage(&self, range: PageRange, wake: bool) -> Result<Progress, OpError> {
        let mut arg = uapi::uffdio_zeropage {
            range: urange(range),
            mode: if wake { 0 } else { ZEROPAGE_DONTWAKE },
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE takes a `struct uffdio_zeropage`; it fills
        // holes of a registered range (no reference there, see `copy`).
        let res = unsafe { ioctl::update::<{ ioctl::UFFDIO_ZEROPAGE }, _>(self.as_fd(), &mut arg) };
        self.counted(progress(
            Op::ZeroPage,
            range,
            range.start(),
            res,
            arg.zeropage,
        ))
    }

    /// `UFFDIO_MOVE`: moves the pages at `src` (`dst.len()` bytes) to the
    /// holes of `dst` without copying, leaving holes at `src`. Both ranges
    /// must be private anonymous memory registered with this same
    /// userfaultfd. A source page shared with another process stops the move
    /// with [`Stop::Busy`]; a source hole with [`Stop::NoEntry`] unless
    /// `ALLOW_SRC_HOLES`.
    ///
    /// # Safety
    ///
    /// The source pages disappear from under any reference to them: no Rust
    /// reference may point into `src .. src + dst.len()` for the duration of
    /// the call.
    pub unsafe fn move_pages(
        &self,
        dst: PageRange,
        src: VirtAddr,
        mode: MoveMode,
    ) -> Result<Progress, OpError> {
        self.require(Op::Move, dst, Features::MOVE)?;
        let mut arg = uapi::uffdio_move {
            dst: dst.start().get() as u64,
            src: src.get() as u64,
            len: dst.len() as u64,
            mode: mode.bits(),
            move_: 0,
        };
        // SAFETY: UFFDIO_MOVE takes a `struct uffdio_move`; the caller
        // guarantees that no reference points into the source.
        let res = unsafe { ioctl::update::<{ ioctl::UFFDIO_MOVE }, _>(self.as_fd(), &mut arg) };
        self.counted(progress(Op::Move, dst, src, res, arg.move_))
    }

    /// `UFFDIO_CONTINUE`: maps the page-cache pages already present behind
    /// `range` (a MINOR-registered shmem or hugetlb range).
    pub fn continue_range(
        &self,
        range: PageRange,
        mode: ContinueMode,
    ) -> Result<Progress, OpError> {
        let mut arg = uapi::uffdio_continue {
            range: urange(range),
            mode: mode.bits(),
            mapped: 0,
        };
        // SAFETY: UFFDIO_CONTINUE takes a `struct uffdio_continue`; it maps
        // existing page-cache pages into holes of a registered range.
        let res = unsafe { ioctl::update::<{ ioctl::UFFDIO_CONTINUE }, _>(self.as_fd(), &mut arg) };
        self.counted(progress(
            Op::Continue,
            range,
            range.start(),
            res,
            arg.mapped,
        ))
    }

    /// `UFFDIO_POISON`: marks the holes of `range` so that any later access
    /// raises SIGBUS (and a system call touching them gets EFAULT), instead
    /// of blocking on a fault nobody will resolve.
    pub fn poison(&self, range: PageRange, wake: bool) -> Result<Progress, OpError> {
        self.require(Op::Poison, range, Features::POISON)?;
        let mut arg = uapi::uffdio_poison {
            range: urange(range),
            mode: if wake { 0 } else { POISON_DONTWAKE },
            updated: 0,
        };
        // SAFETY: UFFDIO_POISON takes a `struct uffdio_poison`; it marks
        // holes of a registered range (no reference there, see `copy`).
        let res = unsafe { ioctl::update::<{ ioctl::UFFDIO_POISON }, _>(self.as_fd(), &mut arg) };
        self.counted(progress(Op::Poison, range, range.start(), res, arg.updated))
    }

    /// `UFFDIO_WRITEPROTECT`: write-protects (`protect`) or un-protects the
    /// pages of a WP-registered `range`. Un-protecting wakes the threads
    /// waiting on a write-protect fault in the range unless `wake` is false;
    /// `wake` has no meaning when protecting (the kernel refuses
    /// DONTWAKE with WP, so it is not sent).
    ///
    /// The kernel does not report partial progress, and it works through
    /// the mappings of the range one by one: on a stop (`done` is 0) an
    /// unknown prefix may already have changed. The operation is
    /// idempotent, so fix the cause and issue it again over the whole range.
    /// A failed un-protect skips the kernel's wake; this sends it, so that
    /// no thread stays blocked on a page that was un-protected.
    pub fn write_protect(
        &self,
        range: PageRange,
        protect: bool,
        wake: bool,
    ) -> Result<Progress, OpError> {
        let mut mode = if protect { WRITEPROTECT_WP } else { 0 };
        if !protect && !wake {
            mode |= WRITEPROTECT_DONTWAKE;
        }
        let mut arg = uapi::uffdio_writeprotect {
            range: urange(range),
            mode,
        };
        // SAFETY: UFFDIO_WRITEPROTECT takes a `struct uffdio_writeprotect`;
        // it changes only page permissions, not contents.
        let res =
            unsafe { ioctl::update::<{ ioctl::UFFDIO_WRITEPROTECT }, _>(self.as_fd(), &mut arg) };
        if res.is_err() && !protect && wake {
            // Best effort: a wake cannot make anything worse (a waiter on a
            // page still protected faults again).
            let _ = self.wake(range);
        }
        self.counted(progress(Op::WriteProtect, range, range.start(), res, 0))
    }

    /// `res`, counted in [`refusals_here`] if a layout change refused it.
    fn counted(&self, res: Result<Progress, OpError>) -> Result<Progress, OpError> {
        if matches!(
            res,
            Ok(Progress {
                stop: Some(Stop::LayoutChanging),
                ..
            })
        ) {
            note_refusal_here();
        }
        res
    }

    /// `UFFDIO_WAKE`: wakes the threads waiting on a fault in `range`, which
    /// then retry their access. Owed after [`Stop::Exists`] and after a
    /// DONTWAKE resolve. A wake without a resolve makes the fault come back.
    pub fn wake(&self, range: PageRange) -> Result<(), OpError> {
        let mut arg = urange(range);
        // SAFETY: UFFDIO_WAKE takes a `struct uffdio_range`.
        let res = unsafe { ioctl::update::<{ ioctl::UFFDIO_WAKE }, _>(self.as_fd(), &mut arg) };
        progress(Op::Wake, range, range.start(), res, 0).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PAGE_SIZE;

    fn r() -> PageRange {
        PageRange::new(VirtAddr::new(0x10_0000), 4 * PAGE_SIZE).unwrap()
    }

    #[test]
    fn decodes_complete() {
        let p = progress(Op::Copy, r(), r().start(), Ok(()), 0).unwrap();
        assert_eq!(
            p,
            Progress {
                done: 4 * PAGE_SIZE,
                stop: None
            }
        );
        assert!(p.remainder(r()).is_none());
    }

    #[test]
    fn decodes_both_encodings_of_layout_changing() {
        for out in [0, -i64::from(Errno::AGAIN.raw_os_error())] {
            let p = progress(Op::Copy, r(), r().start(), Err(Errno::AGAIN), out).unwrap();
            assert_eq!(
                p,
                Progress {
                    done: 0,
                    stop: Some(Stop::LayoutChanging)
                },
                "out={out}"
            );
            assert_eq!(p.remainder(r()), Some(r()));
        }
    }

    #[test]
    fn decodes_partial_progress() {
        let out = 2 * PAGE_SIZE as i64;
        let p = progress(Op::Move, r(), r().start(), Err(Errno::AGAIN), out).unwrap();
        assert_eq!(
            p,
            Progress {
                done: 2 * PAGE_SIZE,
                stop: Some(Stop::Partial)
            }
        );
        assert_eq!(p.remainder(r()).unwrap().npages(), 2);
    }

    #[test]
    fn decodes_stop_reasons() {
        for (errno, stop) in [
            (Errno::EXIST, Stop::Exists),
            (Errno::NOENT, Stop::NoEntry),
            (Errno::SRCH, Stop::ProcessExited),
            (Errno::NOSPC, Stop::ProcessExited),
            (Errno::BUSY, Stop::Busy),
        ] {
            let out = -i64::from(errno.raw_os_error());
            let p = progress(Op::Copy, r(), r().start(), Err(errno), out).unwrap();
            assert_eq!(
                p,
                Progress {
                    done: 0,
                    stop: Some(stop)
                }
            );
        }
    }

    #[test]
    fn decodes_errors() {
        let e = |errno| progress(Op::Copy, r(), r().start(), Err(errno), 0).unwrap_err();
        assert!(matches!(
            e(Errno::INVAL),
            OpError::Invalid { op: Op::Copy, .. }
        ));
        assert!(matches!(e(Errno::FAULT), OpError::Fault { .. }));
        assert!(matches!(e(Errno::NOMEM), OpError::NoMemory { .. }));
        assert!(matches!(e(Errno::BADF), OpError::BadFd { .. }));
        assert!(matches!(e(Errno::PERM), OpError::Kernel { .. }));
        assert!(e(Errno::INVAL).to_string().contains("0x100000"));
    }

    #[test]
    fn a_count_larger_than_the_range_is_clamped() {
        let p = progress(Op::Copy, r(), r().start(), Err(Errno::AGAIN), i64::MAX).unwrap();
        assert_eq!(p.done, r().len());
    }
}
