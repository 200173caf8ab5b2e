//! A flight recorder: the last [`CAPACITY`] things uhmm asked of the
//! kernel, heard from it, or recorded about a page, each with its
//! addresses and the kernel's answer, for finding a race after the fact.
//!
//! It is off unless switched on ([`set_recording`], which also makes the
//! ring: about 14 MiB), and then costs a clock read and a few atomic
//! operations per record; off, one relaxed load.
//! Nothing is allocated on the way in (the fault service records too, and
//! must not allocate: see [`Uffd::read_events`](crate::sys::uffd::Uffd::read_events)).
//! What is recorded:
//!
//! - every resolve ioctl (`UFFDIO_MOVE`, `COPY`, `ZEROPAGE`, `CONTINUE`,
//!   `POISON`, `WRITEPROTECT`, `WAKE`) with the kernel's own answer (a test
//!   point that rewrites answers does not change what is recorded);
//! - every userfaultfd message read (faults, remaps, removes, unmaps);
//! - every page-table scan (`PAGEMAP_SCAN`) and what it found;
//! - every discard uhmm makes (`MADV_DONTNEED` / `MADV_REMOVE`);
//! - every page state uhmm records or forgets.
//!
//! [`records_for`] gives those touching a range, oldest first. `uhmm stress
//! --record` prints them for a page whose data is wrong.
//!
//! ```
//! use uhmm::{PageRange, VirtAddr, record};
//!
//! record::set_recording(true);
//! // ... run the workload; when something looks wrong at `page`:
//! let page = PageRange::new(VirtAddr::new(0x7f00_0000_0000), 4096)?;
//! for r in record::records_for(page) {
//!     eprintln!("{r}");
//! }
//! record::set_recording(false);
//! # Ok::<(), uhmm::RangeError>(())
//! ```

use crate::addr::PageRange;
use std::fmt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::time::Instant;

/// How many records the ring keeps (the oldest are overwritten).
pub const CAPACITY: usize = 1 << 18;

/// What a record is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum What {
    /// `UFFDIO_MOVE` of `len` bytes from `src` to `dst`.
    Move,
    /// `UFFDIO_COPY` of `len` bytes from `src` into `dst`.
    Copy,
    /// `UFFDIO_ZEROPAGE` of `dst`.
    ZeroPage,
    /// `UFFDIO_CONTINUE` of `dst`.
    Continue,
    /// `UFFDIO_POISON` of `dst`.
    Poison,
    /// `UFFDIO_WRITEPROTECT` of `dst`.
    WriteProtect,
    /// `UFFDIO_WAKE` of `dst`.
    Wake,
    /// A fault message: `dst` faulted (`src`: the fault flags; `count`:
    /// the faulting thread's id, 0 if not reported).
    Fault,
    /// A remap message: `len` bytes moved from `src` to `dst`.
    Remap,
    /// A remove message: `dst` was discarded.
    Remove,
    /// An unmap message: `dst` was unmapped.
    Unmap,
    /// A page-table scan of `dst`; `count`: the pages found.
    Scan,
    /// A region the scan before found (`src`: its categories).
    Found,
    /// A discard uhmm made of `dst` (`MADV_DONTNEED` or `MADV_REMOVE`).
    Discard,
    /// A page state uhmm recorded for `dst` (`src`: its kind, `count`: its
    /// operation, device page or staging slot), or forgot.
    State,
}

impl What {
    const ALL: [What; 15] = [
        What::Move,
        What::Copy,
        What::ZeroPage,
        What::Continue,
        What::Poison,
        What::WriteProtect,
        What::Wake,
        What::Fault,
        What::Remap,
        What::Remove,
        What::Unmap,
        What::Scan,
        What::Found,
        What::Discard,
        What::State,
    ];

    fn code(self) -> u64 {
        What::ALL.iter().position(|&w| w == self).unwrap_or(0) as u64 + 1
    }

    fn from_code(code: u64) -> Option<What> {
        What::ALL
            .get(usize::try_from(code).ok()?.checked_sub(1)?)
            .copied()
    }

    fn name(self) -> &'static str {
        match self {
            What::Move => "MOVE",
            What::Copy => "COPY",
            What::ZeroPage => "ZEROPAGE",
            What::Continue => "CONTINUE",
            What::Poison => "POISON",
            What::WriteProtect => "WRITEPROTECT",
            What::Wake => "WAKE",
            What::Fault => "fault",
            What::Remap => "remap event",
            What::Remove => "remove event",
            What::Unmap => "unmap event",
            What::Scan => "scan",
            What::Found => "  found",
            What::Discard => "discard",
            What::State => "state",
        }
    }
}

/// One record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Its place in the order of all records (from 1).
    pub seq: u64,
    /// When, in nanoseconds since recording was first switched on.
    pub nanos: u64,
    /// The thread that made it.
    pub thread: u32,
    /// What it is of.
    pub what: What,
    /// The first address it concerns (the destination of a move or copy).
    pub dst: usize,
    /// The other address (the source of a move or copy), or what `what`
    /// says.
    pub src: usize,
    /// Bytes it concerns from `dst` (and from `src`, for a move or copy).
    pub len: usize,
    /// The kernel's errno (0: none).
    pub errno: u16,
    /// For an ioctl, the kernel's count (bytes done, or a negated errno);
    /// otherwise what `what` says.
    pub count: i64,
}

impl Record {
    /// Whether it concerns any byte of `range` (at either end).
    pub fn touches(&self, range: PageRange) -> bool {
        let hits = |a: usize| {
            let end = a.saturating_add(self.len.max(1));
            a < range.end().get() && range.start().get() < end
        };
        hits(self.dst) || (self.has_src() && hits(self.src))
    }

    /// Whether `src` is an address.
    pub fn has_src(&self) -> bool {
        matches!(self.what, What::Move | What::Copy | What::Remap)
    }
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>6}.{:06} s  tid {:<7} {:<13} {:#x}+{:#x}",
            self.nanos / 1_000_000_000,
            self.nanos % 1_000_000_000 / 1000,
            self.thread,
            self.what.name(),
            self.dst,
            self.len
        )?;
        match self.what {
            What::Move | What::Copy => write!(f, " <- {:#x}", self.src)?,
            What::Remap => write!(f, " <- {:#x} (moved there)", self.src)?,
            What::Fault => write!(f, " flags {:#x} thread {}", self.src, self.count)?,
            What::Scan => write!(f, ": {} pages found", self.count)?,
            What::Found => write!(f, " (categories {:#x})", self.src)?,
            What::State => write!(f, " = {}", state_name(self.src, self.count))?,
            _ => {}
        }
        if is_ioctl(self.what) {
            match (self.errno, self.count) {
                (0, _) => f.write_str(": done")?,
                (e, n) => write!(f, ": errno {e} ({}), count {n}", errno_name(e))?,
            }
        } else if self.errno != 0 {
            write!(f, ": errno {} ({})", self.errno, errno_name(self.errno))?;
        }
        Ok(())
    }
}

fn is_ioctl(what: What) -> bool {
    matches!(
        what,
        What::Move
            | What::Copy
            | What::ZeroPage
            | What::Continue
            | What::Poison
            | What::WriteProtect
            | What::Wake
    )
}

fn errno_name(e: u16) -> &'static str {
    use rustix::io::Errno;
    match Errno::from_raw_os_error(i32::from(e)) {
        Errno::AGAIN => "EAGAIN",
        Errno::EXIST => "EEXIST",
        Errno::NOENT => "ENOENT",
        Errno::BUSY => "EBUSY",
        Errno::INVAL => "EINVAL",
        Errno::FAULT => "EFAULT",
        Errno::NOMEM => "ENOMEM",
        Errno::SRCH => "ESRCH",
        _ => "?",
    }
}

/// State kinds as [`state`] records them.
pub(crate) mod kind {
    pub const CPU: usize = 0;
    pub const MIGRATING: usize = 1;
    pub const DEVICE: usize = 2;
    pub const EXCLUSIVE: usize = 3;
    pub const LOST: usize = 4;
    /// Forgotten: its page was unmapped or discarded, or its state moved
    /// with an mremap (recorded again where it went).
    pub const CLEARED: usize = 5;
}

fn state_name(kind: usize, value: i64) -> String {
    match kind {
        kind::CPU => "Cpu".into(),
        kind::MIGRATING => format!("Migrating(op {value})"),
        kind::DEVICE => format!("Device(pfn {value:#x})"),
        kind::EXCLUSIVE => format!("Exclusive(slot {value:#x})"),
        kind::LOST => "Lost".into(),
        kind::CLEARED => "cleared (unmapped, discarded, or moved by an mremap)".into(),
        k => format!("kind {k}"),
    }
}

/// A slot of the ring: `seq` is 0 while empty, [`WRITING`] while a writer
/// holds it, else the sequence number of the record it holds (a seqlock:
/// a writer claims the slot before writing it, so one writes at a time).
#[derive(Default)]
struct Slot {
    seq: AtomicU64,
    nanos: AtomicU64,
    /// What (8 bits), errno (16 bits), thread (32 bits).
    head: AtomicU64,
    dst: AtomicU64,
    src: AtomicU64,
    len: AtomicU64,
    count: AtomicU64,
}

const WRITING: u64 = u64::MAX;

/// Made when recording is first switched on (about 14 MiB), never on the
/// recording path.
static RING: OnceLock<Box<[Slot]>> = OnceLock::new();
static NEXT: AtomicU64 = AtomicU64::new(0);
static ON: AtomicBool = AtomicBool::new(false);
static START: OnceLock<Instant> = OnceLock::new();

/// Switches recording on or off (for the whole process). Records made
/// before stay until overwritten.
pub fn set_recording(on: bool) {
    START.get_or_init(Instant::now);
    if on {
        RING.get_or_init(|| (0..CAPACITY).map(|_| Slot::default()).collect());
    }
    ON.store(on, Ordering::Relaxed);
}

/// Whether recording is on.
#[inline]
pub fn recording() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Records one entry, if recording is on.
#[inline]
pub(crate) fn note(what: What, dst: usize, src: usize, len: usize, errno: u16, count: i64) {
    if recording() {
        write(what, dst, src, len, errno, count);
    }
}

#[cold]
fn write(what: What, dst: usize, src: usize, len: usize, errno: u16, count: i64) {
    let Some(ring) = RING.get() else {
        return;
    };
    let start = START.get_or_init(Instant::now);
    let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let thread = crate::mm::thread_id();
    let seq = NEXT.fetch_add(1, Ordering::Relaxed) + 1;
    let slot = &ring[(seq % CAPACITY as u64) as usize];
    if !claim(slot, seq) {
        return;
    }
    fence(Ordering::Release);
    slot.nanos.store(nanos, Ordering::Relaxed);
    slot.head.store(
        what.code() | u64::from(errno) << 8 | u64::from(thread) << 24,
        Ordering::Relaxed,
    );
    slot.dst.store(dst as u64, Ordering::Relaxed);
    slot.src.store(src as u64, Ordering::Relaxed);
    slot.len.store(len as u64, Ordering::Relaxed);
    slot.count.store(count as u64, Ordering::Relaxed);
    slot.seq.store(seq, Ordering::Release);
}

/// Claims `slot` for record `seq`: from an older record or none, or not at
/// all (`false`) where a writer a lap away (preempted for a whole lap)
/// holds it, or has written a newer record there.
fn claim(slot: &Slot, seq: u64) -> bool {
    let mut held = slot.seq.load(Ordering::Relaxed);
    loop {
        if held == WRITING || held >= seq {
            return false;
        }
        match slot
            .seq
            .compare_exchange_weak(held, WRITING, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => return true,
            Err(now) => held = now,
        }
    }
}

/// The record in `slot`, unless it is empty or being written.
fn read(slot: &Slot) -> Option<Record> {
    let seq = slot.seq.load(Ordering::Acquire);
    if seq == 0 || seq == WRITING {
        return None;
    }
    let nanos = slot.nanos.load(Ordering::Relaxed);
    let head = slot.head.load(Ordering::Relaxed);
    let dst = slot.dst.load(Ordering::Relaxed);
    let src = slot.src.load(Ordering::Relaxed);
    let len = slot.len.load(Ordering::Relaxed);
    let count = slot.count.load(Ordering::Relaxed);
    fence(Ordering::Acquire);
    if slot.seq.load(Ordering::Relaxed) != seq {
        return None;
    }
    Some(Record {
        seq,
        nanos,
        thread: (head >> 24) as u32,
        what: What::from_code(head & 0xff)?,
        dst: dst as usize,
        src: src as usize,
        len: len as usize,
        errno: (head >> 8) as u16,
        count: count as i64,
    })
}

/// The records kept that touch `range` (at either end of a move, copy or
/// remap), oldest first. A record overwritten while this reads is left
/// out, and so is one whose writer found its slot held by a writer a
/// whole lap away.
pub fn records_for(range: PageRange) -> Vec<Record> {
    let Some(ring) = RING.get() else {
        return Vec::new();
    };
    let mut out: Vec<Record> = ring
        .iter()
        .filter_map(read)
        .filter(|r| r.touches(range))
        .collect();
    out.sort_unstable_by_key(|r| r.seq);
    out
}

/// How many records were made since the process started (those beyond the
/// last [`CAPACITY`] are gone).
pub fn recorded() -> u64 {
    NEXT.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PAGE_SIZE, VirtAddr};

    fn page(a: usize) -> PageRange {
        PageRange::new(VirtAddr::new(a), PAGE_SIZE).unwrap()
    }

    /// One writer at a time in a slot: a writer a lap ahead of one that
    /// still holds the slot, or behind one that wrote it, drops its record
    /// rather than mix its fields with the other's; a reader skips a slot
    /// being written.
    #[test]
    fn a_slot_is_written_by_one_writer_at_a_time() {
        let slot = Slot::default();
        let lap = CAPACITY as u64;
        assert!(claim(&slot, 5), "an empty slot");
        assert!(read(&slot).is_none(), "read while being written");
        assert!(!claim(&slot, 5 + lap), "held by the writer a lap behind");
        slot.seq.store(5, Ordering::Release);
        assert!(!claim(&slot, 5), "its own record again");
        assert!(claim(&slot, 5 + lap), "the record a lap older");
        slot.seq.store(5 + 2 * lap, Ordering::Release);
        assert!(!claim(&slot, 5 + lap), "a newer record there");
        slot.head.store(What::Wake.code(), Ordering::Relaxed);
        assert_eq!(read(&slot).map(|r| r.seq), Some(5 + 2 * lap));
    }

    // One test: the recorder is process-wide, and tests run in parallel.
    #[test]
    fn records_by_address_in_order_and_wraps() {
        let base = 0x5a5a_0000_0000usize;
        let other = base + 0x100_0000;
        note(What::Move, base, other, PAGE_SIZE, 0, 0);
        assert!(records_for(page(base)).is_empty(), "recorded while off");
        set_recording(true);
        note(What::Move, base, other, PAGE_SIZE, 11, 0);
        note(What::Scan, base, 0, 4 * PAGE_SIZE, 0, 0);
        note(
            What::State,
            base + PAGE_SIZE,
            kind::MIGRATING,
            PAGE_SIZE,
            0,
            7,
        );
        note(
            What::Remap,
            other + 8 * PAGE_SIZE,
            base,
            2 * PAGE_SIZE,
            0,
            0,
        );
        let at_base = records_for(page(base));
        assert_eq!(
            at_base.iter().map(|r| r.what).collect::<Vec<_>>(),
            [What::Move, What::Scan, What::Remap]
        );
        assert!(at_base.windows(2).all(|w| w[0].seq < w[1].seq));
        let mv = at_base[0];
        assert_eq!(
            (mv.dst, mv.src, mv.len, mv.errno),
            (base, other, PAGE_SIZE, 11)
        );
        assert_ne!(mv.thread, 0);
        let text = mv.to_string();
        assert!(text.contains("MOVE") && text.contains("EAGAIN"), "{text}");
        // The move's source end.
        assert_eq!(records_for(page(other)).len(), 1);
        let state = records_for(page(base + PAGE_SIZE));
        assert_eq!(state.len(), 3, "{state:?}");
        assert!(state[1].to_string().contains("Migrating(op 7)"));
        // Wrapped: the oldest go.
        let far = base + 0x1000_0000;
        for i in 0..CAPACITY {
            note(What::Wake, far + (i % 4) * PAGE_SIZE, 0, PAGE_SIZE, 0, 0);
        }
        set_recording(false);
        assert!(records_for(page(base)).is_empty(), "not overwritten");
        assert!(!records_for(page(far)).is_empty());
        assert!(recorded() >= CAPACITY as u64 + 4);
    }
}
