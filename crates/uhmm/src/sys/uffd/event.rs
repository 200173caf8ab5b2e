//! userfaultfd events: read in batches from the non-blocking fd and decoded
//! into [`Event`].
//!
//! A `struct uffd_msg` is 32 bytes: the event kind in byte 0, then (from
//! byte 8) a union whose layout depends on the kind. It is decoded here
//! field by field from the bytes, so no union is ever read as the wrong
//! variant.

use super::{EventError, Uffd};
use crate::addr::{PageRange, VirtAddr};
use bitflags::bitflags;
use linux_raw_sys::general as uapi;
use rustix::io::Errno;
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};

const MSG_SIZE: usize = 32;
const _: () = assert!(std::mem::size_of::<uapi::uffd_msg>() == MSG_SIZE);

/// How many messages one `read(2)` takes at most.
pub const BATCH: usize = 64;

bitflags! {
    /// `UFFD_PAGEFAULT_FLAG_*`: what kind of access faulted.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct FaultFlags: u64 {
        /// A write (otherwise a read).
        const WRITE = uapi::UFFD_PAGEFAULT_FLAG_WRITE as u64;
        /// A write to a write-protected page (WP mode).
        const WP = uapi::UFFD_PAGEFAULT_FLAG_WP as u64;
        /// A minor fault: the page is in the page cache but not mapped.
        const MINOR = uapi::UFFD_PAGEFAULT_FLAG_MINOR as u64;
    }
}

/// A page fault waiting to be resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFault {
    /// The faulting address: page-aligned unless the context has
    /// `EXACT_ADDRESS`.
    pub addr: VirtAddr,
    /// The kind of access.
    pub flags: FaultFlags,
    /// The faulting thread's id, if the context has `THREAD_ID`.
    pub thread: Option<u32>,
}

impl PageFault {
    /// The page that faulted. `None` only for an address in the last page of
    /// the address space, where no user memory lies.
    pub fn page(&self) -> Option<PageRange> {
        PageRange::new(self.addr.page_down(), crate::PAGE_SIZE).ok()
    }

    /// Whether the access was a write.
    pub fn is_write(&self) -> bool {
        self.flags.contains(FaultFlags::WRITE)
    }
}

/// An event read from a userfaultfd.
#[derive(Debug)]
pub enum Event {
    /// A thread faulted on a registered range and waits for a resolve.
    PageFault(PageFault),
    /// The process forked and the child's registered ranges were handed to
    /// `child` (needs `EVENT_FORK`). The forking thread waited until this
    /// message was read.
    Fork {
        /// The userfaultfd of the child's copy of the ranges.
        child: Uffd,
    },
    /// A registered range was moved by mremap (needs `EVENT_REMAP`).
    Remap {
        /// Where it was.
        from: VirtAddr,
        /// Where it is now.
        to: VirtAddr,
        /// Its length before the move, in bytes (the kernel reports the old
        /// length; an mremap that grows the range moves this much).
        old_len: usize,
    },
    /// Pages of a registered range were discarded by `MADV_DONTNEED` or
    /// `MADV_REMOVE` (needs `EVENT_REMOVE`).
    Remove {
        /// The discarded pages.
        range: PageRange,
    },
    /// Part of a registered range was unmapped (needs `EVENT_UNMAP`).
    Unmap {
        /// The unmapped pages.
        range: PageRange,
    },
    /// A message this version does not know, or one whose fields make no
    /// sense (kept rather than dropped, so nothing goes unnoticed).
    Unknown {
        /// The raw event kind.
        kind: u8,
    },
}

fn u64_at(msg: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&msg[off..off + 8]);
    u64::from_ne_bytes(b)
}

fn u32_at(msg: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&msg[off..off + 4]);
    u32::from_ne_bytes(b)
}

fn range_at(msg: &[u8]) -> Option<PageRange> {
    let start = VirtAddr::new(usize::try_from(u64_at(msg, 8)).ok()?);
    let end = VirtAddr::new(usize::try_from(u64_at(msg, 16)).ok()?);
    PageRange::from_bounds(start, end).ok()
}

/// Decodes one 32-byte message. `thread_id` says whether fault messages
/// carry a thread id; `on_fork` wraps the child fd a FORK message carries.
fn decode(msg: &[u8], thread_id: bool, on_fork: impl FnOnce(OwnedFd) -> Event) -> Event {
    let kind = msg[0];
    match u32::from(kind) {
        uapi::UFFD_EVENT_PAGEFAULT => Event::PageFault(PageFault {
            addr: VirtAddr::new(u64_at(msg, 16) as usize),
            flags: FaultFlags::from_bits_retain(u64_at(msg, 8)),
            thread: thread_id.then(|| u32_at(msg, 24)),
        }),
        uapi::UFFD_EVENT_FORK => {
            let raw = u32_at(msg, 8) as RawFd;
            // SAFETY: the kernel installed a new fd in this process for the
            // child's context when it queued the message; reading the
            // message transfers it to us, and nothing else refers to it.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            on_fork(fd)
        }
        uapi::UFFD_EVENT_REMAP => Event::Remap {
            from: VirtAddr::new(u64_at(msg, 8) as usize),
            to: VirtAddr::new(u64_at(msg, 16) as usize),
            old_len: u64_at(msg, 24) as usize,
        },
        uapi::UFFD_EVENT_REMOVE => match range_at(msg) {
            Some(range) => Event::Remove { range },
            None => Event::Unknown { kind },
        },
        uapi::UFFD_EVENT_UNMAP => match range_at(msg) {
            Some(range) => Event::Unmap { range },
            None => Event::Unknown { kind },
        },
        _ => Event::Unknown { kind },
    }
}

/// Notes `event` in the flight recorder (`crate::record`).
fn recorded(event: &Event) {
    use crate::record::{What, note};
    match *event {
        Event::PageFault(f) => note(
            What::Fault,
            f.addr.get(),
            f.flags.bits() as usize,
            crate::PAGE_SIZE,
            0,
            f.thread.map_or(0, i64::from),
        ),
        Event::Remap { from, to, old_len } => {
            note(What::Remap, to.get(), from.get(), old_len, 0, 0)
        }
        Event::Remove { range } => note(What::Remove, range.start().get(), 0, range.len(), 0, 0),
        Event::Unmap { range } => note(What::Unmap, range.start().get(), 0, range.len(), 0, 0),
        Event::Fork { .. } | Event::Unknown { .. } => {}
    }
}

/// One non-blocking read of up to [`BATCH`] messages, decoded into `out`.
pub(super) fn read_batch(uffd: &Uffd, out: &mut Vec<Event>) -> Result<usize, EventError> {
    let mut buf = [0u8; BATCH * MSG_SIZE];
    let n = match crate::sys::retry_eintr(|| rustix::io::read(uffd.as_fd(), &mut buf)) {
        Ok(n) => n,
        // Nothing pending (a fault may have been resolved, and its message
        // withdrawn, after poll said readable).
        Err(Errno::AGAIN) => return Ok(0),
        Err(e) => return Err(EventError::Read(e)),
    };
    let msgs = buf[..n].chunks_exact(MSG_SIZE);
    let count = msgs.len();
    let thread_id = uffd.features().contains(super::Features::THREAD_ID);
    out.extend(msgs.map(|m| {
        let event = decode(m, thread_id, |fd| Event::Fork {
            child: uffd.child_of_fork(fd),
        });
        recorded(&event);
        event
    }));
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u32, words: [u64; 3]) -> [u8; MSG_SIZE] {
        let mut m = [0u8; MSG_SIZE];
        m[0] = kind as u8;
        for (i, w) in words.iter().enumerate() {
            m[8 + 8 * i..16 + 8 * i].copy_from_slice(&w.to_ne_bytes());
        }
        m
    }

    fn d(m: &[u8]) -> Event {
        decode(m, false, |_| unreachable!("no FORK message in these tests"))
    }

    #[test]
    fn decodes_each_kind() {
        let pf = d(&msg(uapi::UFFD_EVENT_PAGEFAULT, [3, 0x7000, 0]));
        assert!(
            matches!(pf, Event::PageFault(PageFault { addr, flags, thread: None })
            if addr == VirtAddr::new(0x7000) && flags == FaultFlags::WRITE | FaultFlags::WP)
        );
        let rm = d(&msg(uapi::UFFD_EVENT_REMAP, [0x1000, 0x9000, 0x2000]));
        assert!(matches!(rm, Event::Remap { from, to, old_len: 0x2000 }
            if from == VirtAddr::new(0x1000) && to == VirtAddr::new(0x9000)));
        let rv = d(&msg(uapi::UFFD_EVENT_REMOVE, [0x1000, 0x3000, 0]));
        assert!(matches!(rv, Event::Remove { range } if range.npages() == 2));
        let un = d(&msg(uapi::UFFD_EVENT_UNMAP, [0x4000, 0x5000, 0]));
        assert!(matches!(un, Event::Unmap { range } if range.npages() == 1));
        // Nonsense ranges and unknown kinds are kept as Unknown.
        let bad = d(&msg(uapi::UFFD_EVENT_UNMAP, [0x5000, 0x4000, 0]));
        assert!(
            matches!(bad, Event::Unknown { kind } if u32::from(kind) == uapi::UFFD_EVENT_UNMAP)
        );
        assert!(matches!(
            d(&msg(0x7f, [0; 3])),
            Event::Unknown { kind: 0x7f }
        ));
    }
}
