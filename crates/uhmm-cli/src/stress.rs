//! `uhmm stress`: a model-checked soak of the uhmm core.
//!
//! # The model
//!
//! Managed memory is a few regions of pages, and every page has exactly one
//! *owner* at any time: a CPU writer thread, or nobody.
//!
//! - In the striped regions (`--regions`, allocated back to back so that
//!   some are adjacent), page `g` (its global index) belongs to writer
//!   `g % threads` — except every 16th page, a *spare* page that belongs to
//!   nobody: it is written once at the start and only read afterwards
//!   (`split` changes its protection).
//! - The `mremap` region belongs to writer 0 whole, which moves it back and
//!   forth between two reserved places; the `realloc` region belongs to
//!   writer `1 % threads` whole, which drops it and allocates a new one.
//!
//! Only a page's owner writes it or discards it, so the owner knows exactly
//! what the page holds: its model is one counter per page, and the page's
//! whole content is a function of (counter, page id) — [`page_word`]: the
//! counter in the first `u64`, counter ^ id in the last, a mix in between,
//! and all zeros for counter 0 (fresh or discarded memory). Writers change
//! pages through plain stores, `read(2)` of a file into the page (buffered
//! and `O_DIRECT`) and device writes; they check pages through plain loads
//! and `write(2)` of the page to a file or a pipe.
//!
//! Every other thread only *moves* pages: migrations to and from one or two
//! devices, exclusive grabs, device reads, forks, device removal, injected
//! copy and allocation failures, protection splits. None of that may change
//! what a page reads, so every read anywhere is checked against the model.
//! A thread that does not own a page brackets its read with the page's
//! *sequence number*, a seqlock that the owner makes odd before it changes
//! the page and even again after it published the new counter (and the
//! region's *layout* number, odd while the owner moves or replaces the
//! region): a read bracketed by one even sequence saw the published
//! counter's content exactly, other reads are not compared. A forked child
//! sees a per-thread prefix of what the parent did (a store either landed
//! before the fork copied its page, or its thread waits in a fault until
//! the fork is over), so the same rule applies to its copy — except for
//! writes through a pinned page (`O_DIRECT`, device writes), which the
//! kernel lets land in the parent's page after copying it for the child:
//! those never overlap a fork.
//!
//! Every `--duration / 10` seconds all threads stop at a gate and the main
//! thread checks every page three ways: its state (none may be left
//! `Migrating` with no operation in flight), each device's read of it, and
//! a plain load. A watchdog reports (kernel stacks, `Mm::stats`) and ends
//! the run when a thread makes no progress for `--watchdog` seconds; a
//! SIGBUS or SIGSEGV (a lost page, a vanished region) ends it too.

use crate::bench::cpu;
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};
use uhmm::devmem::PagemapStats;
use uhmm::devmem::copy::{CpuCopyEngine, FailingEngine};
use uhmm::mm::{ManagedRegion, Mm, MmStats, PageState};
use uhmm::sys::mem::{Backing, Prot};
use uhmm::{PAGE_SIZE, PageRange, VirtAddr};
use uhmm_sim::{SimDevice, SimError, SimStats};

/// Arguments of `uhmm stress`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=604_800))]
    duration: u64,
    /// CPU writer threads (each owns its share of the pages).
    #[arg(long, default_value_t = 2, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=64))]
    threads: u32,
    /// Pages per region.
    #[arg(long, default_value_t = 64, value_name = "N",
          value_parser = clap::value_parser!(u32).range(16..=65_536))]
    pages: u32,
    /// Striped regions, allocated back to back.
    #[arg(long, default_value_t = 2, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=16))]
    regions: u32,
    /// Software devices sharing the memory.
    #[arg(long, default_value_t = 2, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=2))]
    devices: u32,
    /// Seed of the random choices (printed; random if not given).
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Run only these operation kinds, comma separated: cpu (always on),
    /// fileio, pipe, odirect, devwrite, dontneed, mremap, realloc (done by
    /// the writers on their own pages), migrate, exclusive, mirror, fork,
    /// devices, faults, split (a thread each).
    #[arg(long, value_name = "LIST", value_parser = parse_kinds)]
    only: Option<KindList>,
    /// Do not run these operation kinds (comma separated).
    #[arg(long, value_name = "LIST", value_parser = parse_kinds)]
    skip: Option<KindList>,
    /// Write the final figures to FILE as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Seconds without progress in a thread after which the run is
    /// declared hung.
    #[arg(long, default_value_t = 20, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    watchdog: u64,
    /// Keep uhmm's flight recorder on (`uhmm::record`: its last kernel
    /// calls, events, scans and page states, by address) and print what it
    /// holds for the page of the first wrong read. Costs some speed.
    #[arg(long)]
    record: bool,
}

/// `u64` words per page.
const WORDS: usize = PAGE_SIZE / 8;
/// One page in `SPARE_EVERY` of a striped region (the last of each group)
/// belongs to no writer.
const SPARE_EVERY: usize = 16;
/// The counter of spare pages; writers' counters never get there.
const SPARE_COUNTER: u64 = 0x5EED_0000_0000_0000;
/// What a forked child writes into its copy of a page: the parent must
/// never read it.
const CHILD_MARK: u64 = 0xC41D_C41D_C41D_C41D;
/// How long a forked child may take before it is killed (a FAIL).
const CHILD_TIMEOUT: Duration = Duration::from_secs(10);
/// Pages a forked child compares with the model.
const CHILD_SAMPLE: usize = 64;
/// Where the mremap region's two places are tried: far below where the
/// kernel maps anything unasked.
const MREMAP_WINDOWS: [usize; 4] = [
    0x2000_0000_0000,
    0x2100_0000_0000,
    0x2200_0000_0000,
    0x2300_0000_0000,
];
/// Flight-recorder records printed with a wrong read (`--record`).
const RECORDS_SHOWN: usize = 80;

/// The last `max` records of `page` and of the places its data passed
/// through (its staging slot, device memory, its place before an mremap,
/// and on from there), oldest first. A place's records are taken only for
/// the time it held the page's data: from the move that brought the data
/// there to the first move that took it on (whose destination is followed
/// in turn), since staging slots and device pages hold other pages' data
/// at other times. A place whose data came from nowhere recorded (a
/// buffer: the zero page, an engine's) adds nothing. The page's own
/// records are kept first, whatever the places hold.
fn related_records(page: PageRange, max: usize) -> Vec<uhmm::record::Record> {
    use uhmm::record::Record;
    /// Where `page`'s data is at the other end of move `r` (`Some(true)`
    /// with the destination if it went out of `page`, `Some(false)` with
    /// the source if it came in), if `r` moved `page`'s bytes.
    fn other_end(r: &Record, page: PageRange) -> Option<(bool, PageRange)> {
        let a = page.start().get();
        let (out, off) = if a.wrapping_sub(r.src) < r.len {
            (true, a - r.src)
        } else if a.wrapping_sub(r.dst) < r.len {
            (false, a - r.dst)
        } else {
            return None;
        };
        let there = if out { r.dst } else { r.src }.checked_add(off)?;
        let place = PageRange::new(VirtAddr::new(there), PAGE_SIZE).ok()?;
        (place != page).then_some((out, place))
    }
    let moved = |r: &Record| r.has_src() && (r.errno == 0 || r.count > 0);
    let mut own = uhmm::record::records_for(page);
    own = own.split_off(own.len().saturating_sub(max));
    let own_moves: Vec<&Record> = own.iter().filter(|r| r.has_src()).collect();
    // (place, window start, window end, forward): forward, the data went
    // into the place at the start; backward, it came out at the end.
    let mut work: Vec<(PageRange, u64, u64, bool, usize)> = Vec::new();
    for (k, r) in own_moves.iter().enumerate() {
        let Some((out, place)) = other_end(r, page) else {
            continue;
        };
        if out {
            let end = own_moves.get(k + 1).map_or(u64::MAX, |n| n.seq);
            work.push((place, r.seq, end, true, 0));
        } else {
            let start = k.checked_sub(1).map_or(0, |p| own_moves[p].seq);
            work.push((place, start, r.seq, false, 0));
        }
    }
    let mut seen_places = std::collections::HashSet::new();
    let mut related: Vec<Record> = Vec::new();
    while let Some((place, start, end, forward, depth)) = work.pop() {
        if depth > 8 || !seen_places.insert((place, start, end)) {
            continue;
        }
        let recs: Vec<Record> = uhmm::record::records_for(place)
            .into_iter()
            .filter(|x| x.seq > start && x.seq < end && !x.touches(page))
            .collect();
        if forward {
            // Until the first move that took the data on.
            let left = recs.iter().find_map(|x| match other_end(x, place) {
                Some((true, next)) if moved(x) => Some((x.seq, next)),
                _ => None,
            });
            let until = left.map_or(end, |(seq, _)| seq);
            if let Some((_, next)) = left {
                work.push((next, until, end, true, depth + 1));
            }
            related.extend(recs.into_iter().filter(|x| x.seq <= until));
        } else {
            // Since the last move that brought the data; none: a buffer.
            let Some((since, prev)) = recs.iter().rev().find_map(|x| match other_end(x, place) {
                Some((false, prev)) if moved(x) => Some((x.seq, prev)),
                _ => None,
            }) else {
                continue;
            };
            work.push((prev, start, since, false, depth + 1));
            related.extend(recs.into_iter().filter(|x| x.seq >= since));
        }
    }
    related.sort_unstable_by_key(|r| r.seq);
    related.dedup_by_key(|r| r.seq);
    let room = max - own.len();
    let mut all = related.split_off(related.len().saturating_sub(room));
    all.extend(own);
    all.sort_unstable_by_key(|r| r.seq);
    all
}

/// The names of the threads `tids` of this process, in order (`?` for one
/// that is gone).
fn thread_names(tids: impl Iterator<Item = u32>) -> Vec<(u32, String)> {
    let mut tids: Vec<u32> = tids.collect();
    tids.sort_unstable();
    tids.dedup();
    tids.into_iter()
        .map(|t| {
            let name = std::fs::read_to_string(format!("/proc/self/task/{t}/comm"))
                .map_or_else(|_| "?".to_string(), |n| n.trim().to_string());
            (t, name)
        })
        .collect()
}

/// Failures kept in full (all are counted).
const KEEP_FAILURES: usize = 64;
/// Pages per device read in a phase check.
const PHASE_READ_PAGES: usize = 256;

// ---------------------------------------------------------------------
// Operation kinds and the configuration
// ---------------------------------------------------------------------

/// What a thread does, one call (or one page) at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// Plain loads (checked) and stores of a whole page (the model's base;
    /// always on).
    Cpu,
    /// `read(2)` of a file into the page, `write(2)` of it to a file.
    Fileio,
    /// `write(2)` of the page to a pipe, read back and checked.
    Pipe,
    /// `O_DIRECT` `pread` into the page (the kernel pins it).
    Odirect,
    /// `SimDevice::write` of the page by its owner.
    Devwrite,
    /// `MADV_DONTNEED` by the owner; the page reads zero afterwards.
    Dontneed,
    /// The owner moves its region with mremap.
    Mremap,
    /// The owner drops its region and allocates a new one.
    Realloc,
    /// Migrations of random ranges to a device and back.
    Migrate,
    /// Exclusive grabs, then `check_exclusive`.
    Exclusive,
    /// Device reads, compared with the model.
    Mirror,
    /// fork; the child compares its copy with the model.
    Fork,
    /// A new device takes pages, then is dropped.
    Devices,
    /// Injected copy and allocation failures.
    Faults,
    /// `Mm::mprotect` of a spare page to read-only and back.
    Split,
}

impl Kind {
    const ALL: [Kind; 15] = [
        Kind::Cpu,
        Kind::Fileio,
        Kind::Pipe,
        Kind::Odirect,
        Kind::Devwrite,
        Kind::Dontneed,
        Kind::Mremap,
        Kind::Realloc,
        Kind::Migrate,
        Kind::Exclusive,
        Kind::Mirror,
        Kind::Fork,
        Kind::Devices,
        Kind::Faults,
        Kind::Split,
    ];
    const COUNT: usize = Kind::ALL.len();

    fn name(self) -> &'static str {
        match self {
            Kind::Cpu => "cpu",
            Kind::Fileio => "fileio",
            Kind::Pipe => "pipe",
            Kind::Odirect => "odirect",
            Kind::Devwrite => "devwrite",
            Kind::Dontneed => "dontneed",
            Kind::Mremap => "mremap",
            Kind::Realloc => "realloc",
            Kind::Migrate => "migrate",
            Kind::Exclusive => "exclusive",
            Kind::Mirror => "mirror",
            Kind::Fork => "fork",
            Kind::Devices => "devices",
            Kind::Faults => "faults",
            Kind::Split => "split",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn from_index(i: usize) -> Option<Kind> {
        Kind::ALL.get(i).copied()
    }

    /// Done by the writer threads on their own pages (the others each
    /// have a thread of their own).
    fn by_writers(self) -> bool {
        self <= Kind::Realloc
    }

    /// How often a writer picks it, relative to the others.
    fn weight(self) -> u32 {
        match self {
            Kind::Cpu => 400,
            Kind::Fileio | Kind::Pipe => 100,
            Kind::Odirect | Kind::Devwrite | Kind::Dontneed => 60,
            Kind::Mremap => 30,
            Kind::Realloc => 5,
            _ => 0,
        }
    }
}

/// A `--only` / `--skip` list.
#[derive(Debug, Clone)]
struct KindList(Vec<Kind>);

fn parse_kinds(s: &str) -> Result<KindList, String> {
    let valid = || {
        Kind::ALL
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let kinds = s
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            Kind::ALL
                .iter()
                .copied()
                .find(|k| k.name() == t)
                .ok_or_else(|| format!("unknown operation kind '{t}'; valid kinds: {}", valid()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if kinds.is_empty() {
        return Err(format!("an empty list; valid kinds: {}", valid()));
    }
    Ok(KindList(kinds))
}

/// The validated configuration.
#[derive(Debug)]
struct Config {
    duration: Duration,
    phase: Duration,
    threads: usize,
    pages: usize,
    regions: usize,
    devices: usize,
    seed: u64,
    enabled: [bool; Kind::COUNT],
    /// Kinds switched off because the machine cannot run them, and why.
    unavailable: Vec<(Kind, String)>,
    watchdog: Duration,
    json: Option<PathBuf>,
    /// What a CPU fault on a device page brings back (chosen by the seed).
    fault_block: usize,
    /// Whether the flight recorder is on.
    record: bool,
}

impl Config {
    fn from_args(args: &Args) -> Result<Config, String> {
        let mut enabled = [true; Kind::COUNT];
        if let Some(KindList(only)) = &args.only {
            for k in Kind::ALL {
                enabled[k.index()] = k == Kind::Cpu || only.contains(&k);
            }
        }
        if let Some(KindList(skip)) = &args.skip {
            if skip.contains(&Kind::Cpu) {
                return Err(
                    "--skip cpu: plain loads and stores are what the model checks; they always run"
                        .into(),
                );
            }
            for k in skip {
                enabled[k.index()] = false;
            }
        }
        if let Some(path) = &args.json {
            File::create(path)
                .map_err(|e| format!("cannot write --json {}: {e}", path.display()))?;
        }
        let seed = args.seed.unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            nanos ^ u64::from(std::process::id()).rotate_left(32)
        });
        let duration = Duration::from_secs(args.duration);
        Ok(Config {
            duration,
            phase: (duration / 10).max(Duration::from_secs(1)),
            threads: args.threads as usize,
            pages: args.pages as usize,
            regions: args.regions as usize,
            devices: args.devices as usize,
            seed,
            enabled,
            unavailable: Vec::new(),
            watchdog: Duration::from_secs(args.watchdog),
            json: args.json.clone(),
            fault_block: [PAGE_SIZE, 64 << 10, 2 << 20][(seed % 3) as usize],
            record: args.record,
        })
    }

    fn on(&self, k: Kind) -> bool {
        self.enabled[k.index()]
    }
}

pub fn run(args: &Args) -> ExitCode {
    let cfg = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("uhmm stress: {e}");
            return ExitCode::from(2);
        }
    };
    match stress(cfg) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("uhmm stress: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------
// Page contents and the model
// ---------------------------------------------------------------------

/// Word `w` of a page with counter `v` and id `id`.
fn page_word(v: u64, id: u64, w: usize) -> u64 {
    if v == 0 {
        0
    } else if w == 0 {
        v
    } else if w == WORDS - 1 {
        v ^ id
    } else {
        (v.rotate_left(w as u32 % 64) ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .wrapping_add(w as u64)
    }
}

/// A word that differs: (word index, expected, got).
type Diff = (usize, u64, u64);

/// The first word of the page at `addr` that is not what counter `v`
/// makes it (plain loads).
fn diff_page(addr: VirtAddr, v: u64, id: u64) -> Option<Diff> {
    (0..WORDS).find_map(|w| {
        let got = cpu::read_u64(VirtAddr::new(addr.get() + w * 8));
        let want = page_word(v, id, w);
        (got != want).then_some((w, want, got))
    })
}

/// The same for a copy of the page in `bytes`.
fn diff_bytes(bytes: &[u8], v: u64, id: u64) -> Option<Diff> {
    bytes.chunks_exact(8).enumerate().find_map(|(w, b)| {
        let got = u64::from_ne_bytes(b.try_into().unwrap_or([0; 8]));
        let want = page_word(v, id, w);
        (got != want).then_some((w, want, got))
    })
}

/// Stores the content of counter `v` in the page at `addr`.
fn write_page(addr: VirtAddr, v: u64, id: u64) {
    for w in 0..WORDS {
        cpu::write_u64(VirtAddr::new(addr.get() + w * 8), page_word(v, id, w));
    }
}

/// The content of counter `v` in `buf` (one page).
fn fill_page(buf: &mut [u8], v: u64, id: u64) {
    for (w, b) in buf.chunks_exact_mut(8).enumerate() {
        b.copy_from_slice(&page_word(v, id, w).to_ne_bytes());
    }
}

/// The model of one page: its counter, published under a seqlock.
#[derive(Debug, Default)]
struct PageCell {
    /// Odd while the owner changes the page.
    seq: AtomicU64,
    counter: AtomicU64,
    /// The kind (index) that last wrote the page.
    last_write: AtomicU8,
    /// The kind (index + 1) of the last operation that targeted it; 0: none.
    last_move: AtomicU8,
    /// The last operations that targeted it, their starts and ends (see
    /// [`Step`]), in a ring; `hist_next` counts the entries written.
    hist: [AtomicU64; HISTORY],
    hist_next: AtomicUsize,
}

/// Steps of a page's history kept for a mismatch report.
const HISTORY: usize = 12;

/// One step of a page's history, packed in a word: the kind (index + 1)
/// in bits 0-7, what it did in bits 8-15, microseconds since the start
/// above.
#[derive(Debug, Clone, Copy)]
struct Step(u64);

impl Step {
    /// Bits of `what`.
    const TO_SYSTEM: u8 = 1;
    const COPY_FAILS: u8 = 2;
    const ALLOC_FAILS: u8 = 4;
    const END: u8 = 0x40;
    const ERR: u8 = 0x80;

    fn new(kind: Kind, what: u8, us: u64) -> Step {
        Step((kind.index() as u64 + 1) | (u64::from(what) << 8) | (us << 16))
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = ((self.0 & 0xff) as usize)
            .checked_sub(1)
            .and_then(Kind::from_index)
            .map_or("?", Kind::name);
        let what = (self.0 >> 8) as u8;
        write!(f, "{:.6} s {kind}", (self.0 >> 16) as f64 / 1e6)?;
        if matches!(kind, "migrate" | "faults" | "devices") {
            let dir = if what & Step::TO_SYSTEM != 0 {
                " to system"
            } else {
                " to device"
            };
            f.write_str(dir)?;
        }
        if what & Step::COPY_FAILS != 0 {
            f.write_str(", a copy fails")?;
        }
        if what & Step::ALLOC_FAILS != 0 {
            f.write_str(", an allocation fails")?;
        }
        f.write_str(match (what & Step::END != 0, what & Step::ERR != 0) {
            (false, _) => ": begins",
            (true, false) => ": ends",
            (true, true) => ": ends with an error",
        })
    }
}

impl PageCell {
    /// The owner is about to change the page.
    fn begin(&self) {
        self.seq.fetch_add(1, Ordering::SeqCst);
        // No store to the page moves above the odd sequence.
        fence(Ordering::SeqCst);
    }

    /// The owner changed the page to counter `v`, by `kind`.
    fn end(&self, v: u64, kind: Kind) {
        self.counter.store(v, Ordering::SeqCst);
        self.last_write.store(kind.index() as u8, Ordering::Relaxed);
        self.seq.fetch_add(1, Ordering::SeqCst);
    }
}

/// Who a region's pages belong to, and what happens to the region.
#[derive(Debug, Clone, Copy)]
enum Role {
    /// Page `g` belongs to writer `g % threads`, spare pages to nobody.
    Striped,
    /// Writer 0's; it moves between these two places.
    Mremap { places: [usize; 2] },
    /// Writer `1 % threads`'s; it is dropped and allocated again.
    Realloc,
}

/// A region of the model.
#[derive(Debug)]
struct Slot {
    role: Role,
    npages: usize,
    /// Global index of its page 0 (page ids are global indices).
    first: usize,
    /// Where it is now; 0: it has no memory.
    base: AtomicUsize,
    /// Odd while the owner moves or replaces it.
    layout: AtomicU64,
    region: Mutex<Option<ManagedRegion>>,
}

impl Slot {
    fn base(&self) -> Option<usize> {
        Some(self.base.load(Ordering::SeqCst)).filter(|&b| b != 0)
    }

    fn is_spare(&self, p: usize) -> bool {
        matches!(self.role, Role::Striped) && p % SPARE_EVERY == SPARE_EVERY - 1
    }

    fn len(&self) -> usize {
        self.npages * PAGE_SIZE
    }
}

// ---------------------------------------------------------------------
// Threads, the pause gate, counters and failures
// ---------------------------------------------------------------------

/// What the main thread does, in `ThreadInfo::doing` (after the kinds).
const DOING_PHASE: u8 = 100;
const DOING_JOIN: u8 = 101;
const DOING_TEARDOWN: u8 = 102;

fn doing_name(d: u8) -> &'static str {
    match d {
        0 => "between operations",
        DOING_PHASE => "phase check",
        DOING_JOIN => "joining threads",
        DOING_TEARDOWN => "teardown",
        k => Kind::from_index(k as usize - 1).map_or("?", Kind::name),
    }
}

/// What the watchdog knows of a thread.
#[derive(Debug)]
struct ThreadInfo {
    name: String,
    /// Milliseconds since the start at its last progress.
    last_ms: AtomicU64,
    /// Waiting where waiting is no hang (the gate, a sleep, a join).
    parked: AtomicBool,
    exited: AtomicBool,
    doing: AtomicU8,
}

impl ThreadInfo {
    fn new(name: String) -> ThreadInfo {
        ThreadInfo {
            name,
            last_ms: AtomicU64::new(0),
            parked: AtomicBool::new(false),
            exited: AtomicBool::new(false),
            doing: AtomicU8::new(0),
        }
    }

    fn doing(&self, k: Kind) {
        self.doing.store(k.index() as u8 + 1, Ordering::Relaxed);
    }
}

/// Where all threads stop for a phase check.
#[derive(Debug, Default)]
struct Gate {
    requested: AtomicBool,
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    generation: u64,
    arrived: usize,
    members: usize,
}

/// A thread's membership of the gate; it leaves when dropped (at the
/// thread's end, a panic included), so a pause never waits for it again.
#[derive(Debug)]
struct Member<'w> {
    gate: &'w Gate,
    info: &'w ThreadInfo,
}

impl Drop for Member<'_> {
    fn drop(&mut self) {
        self.info.exited.store(true, Ordering::SeqCst);
        let mut s = lock(&self.gate.state);
        s.members -= 1;
        self.gate.cv.notify_all();
    }
}

impl Gate {
    fn member<'w>(&'w self, info: &'w ThreadInfo) -> Member<'w> {
        lock(&self.state).members += 1;
        Member { gate: self, info }
    }

    /// Stops here while a pause is on.
    fn checkpoint(&self, me: &ThreadInfo) {
        if !self.requested.load(Ordering::Acquire) {
            return;
        }
        let mut s = lock(&self.state);
        if !self.requested.load(Ordering::Acquire) {
            return;
        }
        me.parked.store(true, Ordering::SeqCst);
        s.arrived += 1;
        self.cv.notify_all();
        let generation = s.generation;
        while s.generation == generation {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        drop(s);
        me.parked.store(false, Ordering::SeqCst);
    }

    /// Returns when every member stopped.
    fn pause(&self) {
        let mut s = lock(&self.state);
        self.requested.store(true, Ordering::Release);
        while s.arrived < s.members {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn resume(&self) {
        let mut s = lock(&self.state);
        s.arrived = 0;
        s.generation += 1;
        self.requested.store(false, Ordering::Release);
        self.cv.notify_all();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the threads have counted.
#[derive(Debug, Default)]
struct Tally {
    ops: [AtomicU64; Kind::COUNT],
    /// Pages compared with the model, by the kind that compared them.
    checked: [AtomicU64; Kind::COUNT],
    /// Typed errors (expected values), by kind and name.
    errors: Mutex<BTreeMap<(Kind, String), ErrorTally>>,
    phases: AtomicU64,
    phase_pages: AtomicU64,
    realloc_same_place: AtomicU64,
}

/// How often a typed error came, and the first one in full.
#[derive(Debug, Clone)]
struct ErrorTally {
    count: u64,
    example: String,
}

/// A read that did not match the model.
#[derive(Debug, Clone)]
struct Mismatch {
    at_s: f64,
    check: &'static str,
    thread: String,
    region: usize,
    page: usize,
    addr: usize,
    owner: String,
    counter: u64,
    diff: Diff,
    last_write: Option<Kind>,
    last_move: Option<Kind>,
    /// `Mm::page_state` of the page right after the read.
    state: String,
    /// The operations that targeted the page last, oldest first.
    history: Vec<Step>,
    /// What the flight recorder holds for the page (`--record`; the first
    /// wrong read only), oldest first.
    recorded: Vec<uhmm::record::Record>,
    /// The names of the threads in `recorded`, as the read found them.
    recorded_threads: Vec<(u32, String)>,
}

/// Why the run fails.
#[derive(Debug, Clone)]
enum Failure {
    Mismatch(Box<Mismatch>),
    Event {
        at_s: f64,
        thread: String,
        what: String,
    },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Mismatch(m) => {
                let (w, want, got) = m.diff;
                write!(
                    f,
                    "[{:.1} s] {} ({}): region {} page {} at {:#x} (owner {}): word {w} reads {got:#x}, expected {want:#x} (counter {:#x}); last written by {}, last targeted by {}; state now {}",
                    m.at_s,
                    m.check,
                    m.thread,
                    m.region,
                    m.page,
                    m.addr,
                    m.owner,
                    m.counter,
                    m.last_write.map_or("-", Kind::name),
                    m.last_move.map_or("-", Kind::name),
                    m.state,
                )?;
                if !m.history.is_empty() {
                    f.write_str("; its last operations:")?;
                    for step in &m.history {
                        write!(f, "\n      {step}")?;
                    }
                }
                if !m.recorded.is_empty() {
                    write!(
                        f,
                        "\n    the flight recorder's last {} records of the page and of the places its data went through (times since the run began):",
                        m.recorded.len()
                    )?;
                    for r in &m.recorded {
                        write!(f, "\n      {r}")?;
                    }
                    f.write_str("\n    threads:")?;
                    for (tid, name) in &m.recorded_threads {
                        write!(f, " {tid} {name};")?;
                    }
                }
                Ok(())
            }
            Failure::Event { at_s, thread, what } => write!(f, "[{at_s:.1} s] {thread}: {what}"),
        }
    }
}

/// The names of typed errors: the errno and the variant, from `Debug`
/// ("EBUSY Busy", "EINVAL Migrate(InvalidRange)").
fn error_name(errno: Option<i32>, debug: &str) -> String {
    fn ident(s: &str) -> &str {
        let end = s
            .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
            .unwrap_or(s.len());
        &s[..end]
    }
    let head = ident(debug);
    let mut name = match debug[head.len()..].strip_prefix('(') {
        Some(rest) if !ident(rest).is_empty() => format!("{head}({})", ident(rest)),
        _ => head.to_string(),
    };
    if let Some(n) = errno {
        let e = match n {
            libc::EINVAL => "EINVAL",
            libc::EFAULT => "EFAULT",
            libc::EPERM => "EPERM",
            libc::ENOMEM => "ENOMEM",
            libc::EBUSY => "EBUSY",
            libc::ENOENT => "ENOENT",
            libc::EIO => "EIO",
            libc::EAGAIN => "EAGAIN",
            libc::EEXIST => "EEXIST",
            _ => "",
        };
        name = if e.is_empty() {
            format!("errno {n} {name}")
        } else {
            format!("{e} {name}")
        };
    }
    name
}

fn sim_error_name(e: &SimError) -> String {
    error_name(Some(e.errno().raw_os_error()), &format!("{e:?}"))
}

// ---------------------------------------------------------------------
// The world all threads share
// ---------------------------------------------------------------------

/// Everything the threads share.
#[derive(Debug)]
struct World {
    cfg: Config,
    t0: Instant,
    mm: Mm,
    /// Written only at teardown, once every other thread has ended.
    devices: RwLock<Vec<SimDevice>>,
    /// The device with the failing copy engine, and the engine.
    faulty: Option<(usize, Arc<FailingEngine<CpuCopyEngine>>)>,
    slots: Vec<Slot>,
    cells: Vec<PageCell>,
    /// Adjacent striped regions: (lower, upper).
    boundaries: Vec<(usize, usize)>,
    mremap_slot: Option<usize>,
    realloc_slot: Option<usize>,
    mremap_broken: AtomicBool,
    /// Held (shared) by writes into a page through a pin — `O_DIRECT`
    /// reads, device writes (`process_vm_writev`) — and (exclusive) by a
    /// fork: the kernel copies a pinned page into the child at once while
    /// the write goes on in the parent's, so a child could see the new
    /// counter with the old content. Not a uhmm matter; kept out of the
    /// model.
    pin_vs_fork: RwLock<()>,
    /// Thread 0 is the main thread, then the writers, then the others.
    threads: Vec<ThreadInfo>,
    stop: AtomicBool,
    /// Milliseconds from the start to the stop (0 before): rates are per
    /// second of running, not of joining or of a hang.
    stopped_ms: AtomicU64,
    /// The watchdog's end.
    done: AtomicBool,
    gate: Gate,
    tally: Tally,
    failure_count: AtomicU64,
    failures: Mutex<Vec<Failure>>,
    /// (page id, counter) of the mismatches reported: every checker that
    /// reads a lost page finds it, and one line says it.
    reported: Mutex<std::collections::HashSet<(u64, u64)>>,
}

impl World {
    fn now_s(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    /// How long the operations ran: until the stop, or (a hang) until the
    /// last progress any thread made.
    fn ran_ms(&self) -> u64 {
        match self.stopped_ms.load(Ordering::SeqCst) {
            0 => self
                .threads
                .iter()
                .map(|t| t.last_ms.load(Ordering::Relaxed))
                .max()
                .unwrap_or(0),
            ms => ms,
        }
    }

    fn touch(&self, me: &ThreadInfo) {
        me.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn cell(&self, slot: usize, p: usize) -> &PageCell {
        &self.cells[self.slots[slot].first + p]
    }

    fn id(&self, slot: usize, p: usize) -> u64 {
        (self.slots[slot].first + p) as u64
    }

    fn addr(&self, slot: usize, p: usize) -> Option<VirtAddr> {
        self.slots[slot]
            .base()
            .map(|b| VirtAddr::new(b + p * PAGE_SIZE))
    }

    /// The writer that owns a page, if any.
    fn owner(&self, slot: usize, p: usize) -> Option<usize> {
        let s = &self.slots[slot];
        match s.role {
            _ if s.is_spare(p) => None,
            Role::Striped => Some((s.first + p) % self.cfg.threads),
            Role::Mremap { .. } => Some(0),
            Role::Realloc => Some(1 % self.cfg.threads),
        }
    }

    fn count(&self, k: Kind) {
        self.tally.ops[k.index()].fetch_add(1, Ordering::Relaxed);
    }

    fn checked(&self, k: Kind, pages: u64) {
        self.tally.checked[k.index()].fetch_add(pages, Ordering::Relaxed);
    }

    fn count_error(&self, k: Kind, name: String, example: &dyn fmt::Display) {
        lock(&self.tally.errors)
            .entry((k, name))
            .or_insert_with(|| ErrorTally {
                count: 0,
                example: example.to_string(),
            })
            .count += 1;
    }

    fn count_sim_error(&self, k: Kind, e: &SimError) {
        self.count_error(k, sim_error_name(e), e);
    }

    fn count_mm_error(&self, k: Kind, e: &uhmm::mm::MmError) {
        self.count_error(k, error_name(None, &format!("{e:?}")), e);
    }

    fn fail(&self, f: Failure) {
        eprintln!("uhmm stress: FAIL {f}");
        self.failure_count.fetch_add(1, Ordering::SeqCst);
        let mut kept = lock(&self.failures);
        if kept.len() < KEEP_FAILURES {
            kept.push(f);
        }
    }

    fn event(&self, thread: &str, what: String) {
        self.fail(Failure::Event {
            at_s: self.now_s(),
            thread: thread.to_string(),
            what,
        });
    }

    /// Records a read of page `p` of region `slot` that differs from
    /// counter `counter` (in full the first time that page is found wrong
    /// at that counter; counted every time).
    fn mismatch(
        &self,
        thread: &str,
        check: &'static str,
        (slot, p, addr): (usize, usize, usize),
        counter: u64,
        diff: Diff,
    ) {
        if !lock(&self.reported).insert((self.id(slot, p), counter)) {
            self.failure_count.fetch_add(1, Ordering::SeqCst);
            return;
        }
        let cell = self.cell(slot, p);
        let last_move = cell.last_move.load(Ordering::Relaxed) as usize;
        let recorded = self.recorded(addr);
        let recorded_threads = thread_names(recorded.iter().map(|r| r.thread));
        self.fail(Failure::Mismatch(Box::new(Mismatch {
            at_s: self.now_s(),
            check,
            thread: thread.to_string(),
            region: slot,
            page: p,
            addr,
            owner: self
                .owner(slot, p)
                .map_or("none (spare)".into(), |t| format!("w{t}")),
            counter,
            diff,
            last_write: Kind::from_index(cell.last_write.load(Ordering::Relaxed) as usize),
            last_move: last_move.checked_sub(1).and_then(Kind::from_index),
            history: cell.history(),
            recorded,
            recorded_threads,
            state: match self.mm.page_state(VirtAddr::new(addr)) {
                Ok(st) => format!("{st:?}"),
                Err(e) => format!("({e})"),
            },
        })));
    }

    /// What the flight recorder holds for the page at `addr`, if it is on:
    /// it is switched off first, so that the records of the first wrong
    /// read are kept (later ones get none).
    fn recorded(&self, addr: usize) -> Vec<uhmm::record::Record> {
        if !self.cfg.record || !uhmm::record::recording() {
            return Vec::new();
        }
        uhmm::record::set_recording(false);
        PageRange::new(VirtAddr::new(addr), PAGE_SIZE)
            .map(|page| related_records(page, RECORDS_SHOWN))
            .unwrap_or_default()
    }

    /// Checks page `p` of region `slot` (plain loads) against `counter`;
    /// returns whether it matched.
    fn check_page(
        &self,
        thread: &str,
        check: &'static str,
        slot: usize,
        p: usize,
        counter: u64,
    ) -> bool {
        let Some(addr) = self.addr(slot, p) else {
            return true;
        };
        match diff_page(addr, counter, self.id(slot, p)) {
            None => true,
            Some(d) => {
                self.mismatch(thread, check, (slot, p, addr.get()), counter, d);
                false
            }
        }
    }

    fn ndevices(&self) -> usize {
        self.cfg.devices
    }

    /// Runs `f` on device `i`.
    fn with_device<T>(&self, i: usize, f: impl FnOnce(&SimDevice) -> T) -> Option<T> {
        let devices = self.devices.read().unwrap_or_else(|e| e.into_inner());
        devices.get(i).map(f)
    }

    /// A random run of up to `max` pages for an operation thread: in one
    /// region, or (`across`, now and then) across the boundary of two
    /// adjacent striped regions.
    fn pick_target(&self, rng: &mut Rng, max: usize, across: bool) -> Option<Target> {
        if across && max >= 2 && !self.boundaries.is_empty() && rng.one_in(8) {
            let (lo, hi) = self.boundaries[rng.below(self.boundaries.len())];
            let (l, h) = (&self.slots[lo], &self.slots[hi]);
            let before = 1 + rng.below((max / 2).min(l.npages));
            let after = 1 + rng.below((max / 2).min(h.npages));
            let lbase = l.base()?;
            let hbase = h.base()?;
            let mut pages: Vec<TargetPage> = (l.npages - before..l.npages)
                .map(|page| TargetPage {
                    slot: lo,
                    page,
                    base: lbase,
                })
                .collect();
            pages.extend((0..after).map(|page| TargetPage {
                slot: hi,
                page,
                base: hbase,
            }));
            return Some(Target {
                addr: VirtAddr::new(lbase + (l.npages - before) * PAGE_SIZE),
                pages,
            });
        }
        let slot = rng.below(self.slots.len());
        let s = &self.slots[slot];
        let base = s.base()?;
        let n = 1 + rng.below(max.min(s.npages));
        let first = rng.below(s.npages - n + 1);
        Some(Target {
            addr: VirtAddr::new(base + first * PAGE_SIZE),
            pages: (first..first + n)
                .map(|page| TargetPage { slot, page, base })
                .collect(),
        })
    }

    /// Notes that `kind` is about to target these pages (for mismatch
    /// reports).
    fn mark(&self, t: &Target, kind: Kind) {
        self.mark_what(t, kind, 0);
    }

    /// [`mark`](Self::mark), with what it is about to do (`Step`'s bits).
    fn mark_what(&self, t: &Target, kind: Kind, what: u8) {
        let step = Step::new(kind, what, self.t0.elapsed().as_micros() as u64);
        for tp in &t.pages {
            let cell = self.cell(tp.slot, tp.page);
            cell.last_move
                .store(kind.index() as u8 + 1, Ordering::Relaxed);
            cell.note(step);
        }
    }

    /// Notes that `kind`, begun with `what`, is done with these pages.
    fn unmark<T, E>(&self, t: &Target, kind: Kind, what: u8, r: &Result<T, E>) {
        let what = what | Step::END | if r.is_err() { Step::ERR } else { 0 };
        let step = Step::new(kind, what, self.t0.elapsed().as_micros() as u64);
        for tp in &t.pages {
            self.cell(tp.slot, tp.page).note(step);
        }
    }
}

/// A run of pages an operation thread works on.
#[derive(Debug)]
struct Target {
    addr: VirtAddr,
    pages: Vec<TargetPage>,
}

#[derive(Debug, Clone, Copy)]
struct TargetPage {
    slot: usize,
    page: usize,
    /// The region's base the target was computed from.
    base: usize,
}

/// A non-owner's bracket around a read it does not control: the layout
/// and page sequence numbers before, compared after.
#[derive(Debug)]
struct Bracket {
    before: Vec<(u64, usize, u64, u64)>,
}

impl Bracket {
    fn open(w: &World, t: &Target) -> Bracket {
        let before = t
            .pages
            .iter()
            .map(|tp| {
                let s = &w.slots[tp.slot];
                let layout = s.layout.load(Ordering::SeqCst);
                let base = s.base.load(Ordering::SeqCst);
                let cell = w.cell(tp.slot, tp.page);
                let seq = cell.seq.load(Ordering::SeqCst);
                (layout, base, seq, cell.counter.load(Ordering::SeqCst))
            })
            .collect();
        Bracket { before }
    }

    /// Compares the pages read (`data`, one page per target page) that
    /// nobody changed meanwhile with the model; returns how many were
    /// compared.
    fn compare(
        &self,
        w: &World,
        who: &ThreadInfo,
        check: &'static str,
        t: &Target,
        data: &[u8],
    ) -> u64 {
        let mut compared = 0;
        for (i, (tp, &(layout, base, seq, counter))) in t.pages.iter().zip(&self.before).enumerate()
        {
            let s = &w.slots[tp.slot];
            let cell = w.cell(tp.slot, tp.page);
            let stable = layout % 2 == 0
                && seq % 2 == 0
                && base == tp.base
                && cell.seq.load(Ordering::SeqCst) == seq
                && s.base.load(Ordering::SeqCst) == base
                && s.layout.load(Ordering::SeqCst) == layout;
            let Some(bytes) = data.get(i * PAGE_SIZE..(i + 1) * PAGE_SIZE) else {
                break;
            };
            if !stable {
                continue;
            }
            compared += 1;
            if let Some(d) = diff_bytes(bytes, counter, w.id(tp.slot, tp.page)) {
                let addr = tp.base + tp.page * PAGE_SIZE;
                w.mismatch(&who.name, check, (tp.slot, tp.page, addr), counter, d);
            }
        }
        compared
    }
}

/// A small deterministic generator (xorshift64*), one per thread.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Rng {
        // splitmix64 of the pair, never zero.
        let mut z = seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (0 if `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
}

// ---------------------------------------------------------------------
// Setting up
// ---------------------------------------------------------------------

type BoxError = Box<dyn std::error::Error>;

impl World {
    fn build(mut cfg: Config) -> Result<World, BoxError> {
        let mm = Mm::new()?;
        mm.set_fault_block(cfg.fault_block)?;
        let len = cfg.pages * PAGE_SIZE;
        let mut slots = Vec::new();
        let mut first = 0;
        let mut add = |role, npages: usize, region: ManagedRegion| {
            let base = region.range().start().get();
            slots.push(Slot {
                role,
                npages,
                first,
                base: AtomicUsize::new(base),
                layout: AtomicU64::new(0),
                region: Mutex::new(Some(region)),
            });
            first += npages;
        };
        // Back to back: the kernel usually places them side by side.
        for _ in 0..cfg.regions {
            add(
                Role::Striped,
                cfg.pages,
                mm.alloc(len, Backing::AnonPrivate)?,
            );
        }
        let mut mremap_slot = None;
        if cfg.on(Kind::Mremap) {
            match mremap_region(&mm, len) {
                Ok((region, places)) => {
                    mremap_slot = Some(cfg.regions);
                    add(Role::Mremap { places }, cfg.pages, region);
                }
                Err(e) => cfg
                    .unavailable
                    .push((Kind::Mremap, format!("no place for the mremap region: {e}"))),
            }
        }
        let mut realloc_slot = None;
        if cfg.on(Kind::Realloc) {
            realloc_slot = Some(cfg.regions + usize::from(mremap_slot.is_some()));
            add(
                Role::Realloc,
                cfg.pages,
                mm.alloc(len, Backing::AnonPrivate)?,
            );
        }
        for (k, why) in &cfg.unavailable {
            cfg.enabled[k.index()] = false;
            eprintln!("uhmm stress: note: {} skipped: {why}", k.name());
        }
        let devices: Vec<SimDevice> = (0..cfg.devices).map(|_| SimDevice::new(&mm)).collect();
        // The last device copies through an engine that fails on demand;
        // the others move pages with no copy.
        let faulty = cfg.on(Kind::Faults).then(|| {
            let engine = Arc::new(FailingEngine::new(CpuCopyEngine::new()));
            devices[cfg.devices - 1].set_copy_engine(engine.clone());
            (cfg.devices - 1, engine)
        });
        let mut boundaries = Vec::new();
        for (i, a) in slots.iter().enumerate().take(cfg.regions) {
            for (j, b) in slots.iter().enumerate().take(cfg.regions) {
                if a.base.load(Ordering::Relaxed) + a.len() == b.base.load(Ordering::Relaxed) {
                    boundaries.push((i, j));
                }
            }
        }
        let mut threads = vec![ThreadInfo::new("main".into())];
        threads.extend((0..cfg.threads).map(|i| ThreadInfo::new(format!("uhmm-w{i}"))));
        threads.extend(op_kinds(&cfg).map(|k| ThreadInfo::new(format!("uhmm-{}", k.name()))));
        // The recorder's clock starts with the run's.
        uhmm::record::set_recording(cfg.record);
        let world = World {
            t0: Instant::now(),
            mm,
            devices: RwLock::new(devices),
            faulty,
            cells: (0..first).map(|_| PageCell::default()).collect(),
            slots,
            boundaries,
            mremap_slot,
            realloc_slot,
            mremap_broken: AtomicBool::new(false),
            pin_vs_fork: RwLock::new(()),
            threads,
            stop: AtomicBool::new(false),
            stopped_ms: AtomicU64::new(0),
            done: AtomicBool::new(false),
            gate: Gate::default(),
            tally: Tally::default(),
            failure_count: AtomicU64::new(0),
            failures: Mutex::new(Vec::new()),
            reported: Mutex::new(std::collections::HashSet::new()),
            cfg,
        };
        world.fill();
        Ok(world)
    }

    /// The starting content: counter 1 in every writer's page (so that a
    /// page lost to zeros shows at once), the spare counter in the spares.
    fn fill(&self) {
        for (si, s) in self.slots.iter().enumerate() {
            for p in 0..s.npages {
                let v = if s.is_spare(p) { SPARE_COUNTER } else { 1 };
                if let Some(addr) = self.addr(si, p) {
                    write_page(addr, v, self.id(si, p));
                }
                self.cell(si, p).counter.store(v, Ordering::SeqCst);
            }
        }
    }

    fn describe(&self) {
        let c = &self.cfg;
        eprintln!(
            "uhmm stress: seed {}, {} s (phase every {} s), {} writers, {} striped regions of {} pages ({} adjacent pairs), {} devices, fault block {} KiB",
            c.seed,
            c.duration.as_secs(),
            c.phase.as_secs(),
            c.threads,
            c.regions,
            c.pages,
            self.boundaries.len(),
            c.devices,
            c.fault_block >> 10
        );
        for (i, s) in self.slots.iter().enumerate() {
            eprintln!(
                "  region {i}: {:#x}..{:#x} {}",
                s.base.load(Ordering::Relaxed),
                s.base.load(Ordering::Relaxed) + s.len(),
                match s.role {
                    Role::Striped => "striped".to_string(),
                    Role::Mremap { places } => format!(
                        "mremap (writer 0; places {:#x} and {:#x})",
                        places[0], places[1]
                    ),
                    Role::Realloc => format!("realloc (writer {})", 1 % c.threads),
                }
            );
        }
        if let Some((d, _)) = &self.faulty {
            eprintln!(
                "  device {d} copies through a failing engine; the others move pages with no copy"
            );
        }
        let kinds: Vec<&str> = Kind::ALL
            .iter()
            .filter(|k| c.on(**k))
            .map(|k| k.name())
            .collect();
        eprintln!("  kinds: {}", kinds.join(", "));
        if c.record {
            eprintln!(
                "  flight recorder on: the first wrong read prints its last {RECORDS_SHOWN} records"
            );
        }
    }
}

/// The kinds that run in a thread of their own.
fn op_kinds(cfg: &Config) -> impl Iterator<Item = Kind> + '_ {
    Kind::ALL
        .into_iter()
        .filter(move |k| !k.by_writers() && cfg.on(*k))
}

/// The mremap region: `len` bytes at the first of two places in a window
/// reserved at a fixed address (the second place holds a `PROT_NONE`
/// placeholder), managed.
fn mremap_region(mm: &Mm, len: usize) -> Result<(ManagedRegion, [usize; 2]), BoxError> {
    let mut last = None;
    for at in MREMAP_WINDOWS {
        match raw::reserve(at, 2 * len) {
            Ok(()) => {
                raw::map_fixed_rw(at, len)?;
                let region = raw::manage(mm, PageRange::new(VirtAddr::new(at), len)?)?;
                return Ok((region, [at, at + len]));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.map_or_else(|| "no window".into(), |e| e.into()))
}

// ---------------------------------------------------------------------
// Writer threads
// ---------------------------------------------------------------------

/// A page-aligned page buffer (for `O_DIRECT`).
#[repr(C, align(4096))]
#[derive(Debug)]
struct AlignedPage([u8; PAGE_SIZE]);

/// A writer's files: a memfd, a pipe, an `O_DIRECT` file.
#[derive(Debug)]
struct WriterIo {
    memfd: File,
    pipe: (File, File),
    direct: Option<File>,
    buf: Box<AlignedPage>,
    back: Box<AlignedPage>,
}

impl WriterIo {
    fn new(cfg: &Config) -> Result<WriterIo, BoxError> {
        Ok(WriterIo {
            memfd: raw::memfd("uhmm-stress")?,
            pipe: raw::pipe()?,
            direct: if cfg.on(Kind::Odirect) {
                Some(open_direct()?)
            } else {
                None
            },
            buf: Box::new(AlignedPage([0; PAGE_SIZE])),
            back: Box::new(AlignedPage([0; PAGE_SIZE])),
        })
    }
}

/// An unnamed `O_DIRECT` file in /tmp.
fn open_direct() -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | libc::O_DIRECT)
        .open("/tmp")
}

/// Whether `O_DIRECT` reads and writes work in /tmp (`Err`: why not).
fn probe_direct() -> Result<(), String> {
    let f = open_direct().map_err(|e| format!("O_DIRECT open in /tmp: {e}"))?;
    let mut page = Box::new(AlignedPage([7; PAGE_SIZE]));
    f.write_all_at(&page.0, 0)
        .map_err(|e| format!("O_DIRECT write in /tmp: {e}"))?;
    page.0.fill(0);
    f.read_exact_at(&mut page.0, 0)
        .map_err(|e| format!("O_DIRECT read in /tmp: {e}"))?;
    if page.0.iter().all(|&b| b == 7) {
        Ok(())
    } else {
        Err("O_DIRECT in /tmp read back wrong data".into())
    }
}

/// A page a writer works on, with what the model says of it.
#[derive(Debug, Clone, Copy)]
struct Owned {
    slot: usize,
    page: usize,
    addr: VirtAddr,
    id: u64,
    counter: u64,
}

/// A CPU writer thread: the only one that changes its pages.
struct Writer<'w> {
    w: &'w World,
    me: &'w ThreadInfo,
    index: usize,
    rng: Rng,
    /// Its pages of the striped regions.
    striped: Vec<(usize, usize)>,
    /// The regions it owns whole (mremap, realloc).
    whole: Vec<usize>,
    kinds: Vec<Kind>,
    io: WriterIo,
}

impl<'w> Writer<'w> {
    fn new(w: &'w World, index: usize, io: WriterIo) -> Writer<'w> {
        let mut striped = Vec::new();
        let mut whole = Vec::new();
        for (si, s) in w.slots.iter().enumerate() {
            match s.role {
                Role::Striped => striped.extend(
                    (0..s.npages)
                        .filter(|&p| w.owner(si, p) == Some(index))
                        .map(|p| (si, p)),
                ),
                _ if w.owner(si, 0) == Some(index) => whole.push(si),
                _ => {}
            }
        }
        let kinds = Kind::ALL
            .into_iter()
            .filter(|&k| k.by_writers() && w.cfg.on(k))
            .filter(|&k| match k {
                Kind::Mremap => w.mremap_slot.is_some_and(|s| whole.contains(&s)),
                Kind::Realloc => w.realloc_slot.is_some_and(|s| whole.contains(&s)),
                _ => true,
            })
            .collect();
        Writer {
            w,
            me: &w.threads[1 + index],
            index,
            rng: Rng::new(w.cfg.seed, 1 + index as u64),
            striped,
            whole,
            kinds,
            io,
        }
    }

    fn run(mut self, member: Member<'_>) {
        let total: u32 = self.kinds.iter().map(|k| k.weight()).sum();
        while !self.w.stop.load(Ordering::Relaxed) {
            self.w.gate.checkpoint(self.me);
            self.w.touch(self.me);
            let mut pick = self.rng.below(total as usize) as u32;
            let kind = *self
                .kinds
                .iter()
                .find(|k| {
                    let hit = pick < k.weight();
                    pick = pick.saturating_sub(k.weight());
                    hit
                })
                .unwrap_or(&Kind::Cpu);
            self.me.doing(kind);
            let did = match kind {
                Kind::Cpu => self.cpu(),
                Kind::Fileio => self.fileio(),
                Kind::Pipe => self.pipe(),
                Kind::Odirect => self.odirect(),
                Kind::Devwrite => self.devwrite(),
                Kind::Dontneed => self.dontneed(),
                Kind::Mremap => self.mremap(),
                Kind::Realloc => self.realloc(),
                _ => false,
            };
            if did {
                self.w.count(kind);
            } else {
                // Nothing of its own to work on right now.
                std::thread::sleep(Duration::from_micros(100));
            }
            self.me.doing.store(0, Ordering::Relaxed);
            self.w.touch(self.me);
        }
        drop(member);
    }

    /// A random page of its own that has memory now.
    fn pick(&mut self) -> Option<Owned> {
        let whole_pages: usize = self.whole.iter().map(|&s| self.w.slots[s].npages).sum();
        let mut i = self.rng.below(self.striped.len() + whole_pages);
        let (slot, page) = if i < self.striped.len() {
            self.striped[i]
        } else {
            i -= self.striped.len();
            let mut found = None;
            for &s in &self.whole {
                let n = self.w.slots[s].npages;
                if i < n {
                    found = Some((s, i));
                    break;
                }
                i -= n;
            }
            found?
        };
        Some(Owned {
            slot,
            page,
            addr: self.w.addr(slot, page)?,
            id: self.w.id(slot, page),
            counter: self.w.cell(slot, page).counter.load(Ordering::Relaxed),
        })
    }

    fn check(&self, check: &'static str, kind: Kind, pg: &Owned, counter: u64) {
        self.w.checked(kind, 1);
        self.w
            .check_page(&self.me.name, check, pg.slot, pg.page, counter);
    }

    fn check_bytes(&self, check: &'static str, kind: Kind, pg: &Owned, counter: u64, bytes: &[u8]) {
        self.w.checked(kind, 1);
        if let Some(d) = diff_bytes(bytes, counter, pg.id) {
            self.w.mismatch(
                &self.me.name,
                check,
                (pg.slot, pg.page, pg.addr.get()),
                counter,
                d,
            );
        }
    }

    /// Rewrites a page whose content is unknown after a failure, so that
    /// the model holds again.
    fn resync(&self, pg: &Owned, counter: u64) {
        write_page(pg.addr, counter, pg.id);
    }

    /// Plain loads (checked), then plain stores of the next counter.
    fn cpu(&mut self) -> bool {
        let Some(pg) = self.pick() else { return false };
        self.check("plain read", Kind::Cpu, &pg, pg.counter);
        let cell = self.w.cell(pg.slot, pg.page);
        cell.begin();
        write_page(pg.addr, pg.counter + 1, pg.id);
        cell.end(pg.counter + 1, Kind::Cpu);
        true
    }

    /// `read(2)` of a file into the page, then `write(2)` of the page to
    /// the file, read back and checked.
    fn fileio(&mut self) -> bool {
        let Some(pg) = self.pick() else { return false };
        let v = pg.counter + 1;
        fill_page(&mut self.io.buf.0, v, pg.id);
        if let Err(e) = self.io.memfd.write_all_at(&self.io.buf.0, 0) {
            self.w
                .event(&self.me.name, format!("pwrite to a memfd: {e}"));
            return true;
        }
        self.read_into(&pg, v, Kind::Fileio, |addr| {
            raw::pread_into(&self.io.memfd, addr, 0)
        });
        let out = PAGE_SIZE as u64;
        match raw::pwrite_from(&self.io.memfd, pg.addr, out) {
            Ok(PAGE_SIZE) => {}
            r => {
                self.w.event(
                    &self.me.name,
                    format!(
                        "write(2) of the managed page {} to a memfd returned {r:?}",
                        pg.addr
                    ),
                );
                return true;
            }
        }
        match self.io.memfd.read_exact_at(&mut self.io.back.0, out) {
            Ok(()) => self.check_bytes(
                "write(2) of the page to a file",
                Kind::Fileio,
                &pg,
                v,
                &self.io.back.0,
            ),
            Err(e) => self
                .w
                .event(&self.me.name, format!("pread from a memfd: {e}")),
        }
        true
    }

    /// The page becomes counter `v` through `read`, a system call that
    /// writes the whole page; a failure is recorded and the page rewritten.
    fn read_into(
        &self,
        pg: &Owned,
        v: u64,
        kind: Kind,
        read: impl FnOnce(VirtAddr) -> std::io::Result<usize>,
    ) {
        let cell = self.w.cell(pg.slot, pg.page);
        cell.begin();
        let r = read(pg.addr);
        if !matches!(r, Ok(PAGE_SIZE)) {
            self.w.event(
                &self.me.name,
                format!(
                    "{} into the managed page {} returned {r:?}",
                    kind.name(),
                    pg.addr
                ),
            );
            self.resync(pg, v);
        }
        cell.end(v, kind);
    }

    /// `write(2)` of the page to a pipe, read back and checked.
    fn pipe(&mut self) -> bool {
        let Some(pg) = self.pick() else { return false };
        match raw::write_from(&self.io.pipe.1, pg.addr) {
            Ok(PAGE_SIZE) => {}
            r => {
                self.w.event(
                    &self.me.name,
                    format!(
                        "write(2) of the managed page {} to a pipe returned {r:?}",
                        pg.addr
                    ),
                );
                return true;
            }
        }
        match (&self.io.pipe.0).read_exact(&mut self.io.back.0) {
            Ok(()) => self.check_bytes(
                "write(2) of the page to a pipe",
                Kind::Pipe,
                &pg,
                pg.counter,
                &self.io.back.0,
            ),
            Err(e) => self
                .w
                .event(&self.me.name, format!("read from a pipe: {e}")),
        }
        true
    }

    /// `O_DIRECT` `pread` into the page.
    fn odirect(&mut self) -> bool {
        let Some(pg) = self.pick() else { return false };
        let Some(f) = &self.io.direct else {
            return false;
        };
        let v = pg.counter + 1;
        fill_page(&mut self.io.buf.0, v, pg.id);
        if let Err(e) = f.write_all_at(&self.io.buf.0, 0) {
            self.w
                .event(&self.me.name, format!("O_DIRECT write to /tmp: {e}"));
            return true;
        }
        let _pin = self.w.pin_vs_fork.read().unwrap_or_else(|e| e.into_inner());
        self.read_into(&pg, v, Kind::Odirect, |addr| raw::pread_into(f, addr, 0));
        true
    }

    /// A device writes the page's next content.
    fn devwrite(&mut self) -> bool {
        let Some(pg) = self.pick() else { return false };
        let v = pg.counter + 1;
        fill_page(&mut self.io.buf.0, v, pg.id);
        let d = self.rng.below(self.w.ndevices());
        let cell = self.w.cell(pg.slot, pg.page);
        let _pin = self.w.pin_vs_fork.read().unwrap_or_else(|e| e.into_inner());
        cell.begin();
        let r = self
            .w
            .with_device(d, |dev| dev.write(pg.addr, &self.io.buf.0).map(|_| ()));
        let now = match r {
            Some(Ok(())) | None => v,
            Some(Err(e)) => {
                self.w.count_sim_error(Kind::Devwrite, &e);
                // A failed one-page write wrote all of the page or none.
                if diff_page(pg.addr, v, pg.id).is_none() {
                    v
                } else if diff_page(pg.addr, pg.counter, pg.id).is_none() {
                    pg.counter
                } else {
                    self.check(
                        "page after a failed device write",
                        Kind::Devwrite,
                        &pg,
                        pg.counter,
                    );
                    self.resync(&pg, v);
                    v
                }
            }
        };
        cell.end(now, Kind::Devwrite);
        true
    }

    /// `MADV_DONTNEED` of a run of its pages (in a region it owns whole)
    /// or of one page (striped); they must read zero afterwards.
    fn dontneed(&mut self) -> bool {
        let (slot, first, n) = if !self.whole.is_empty() && self.rng.one_in(2) {
            let slot = self.whole[self.rng.below(self.whole.len())];
            let npages = self.w.slots[slot].npages;
            let n = 1 + self.rng.below(8.min(npages));
            (slot, self.rng.below(npages - n + 1), n)
        } else if let Some(pg) = self.pick() {
            (pg.slot, pg.page, 1)
        } else {
            return false;
        };
        let Some(addr) = self.w.addr(slot, first) else {
            return false;
        };
        let Ok(range) = PageRange::new(addr, n * PAGE_SIZE) else {
            return false;
        };
        for p in first..first + n {
            self.w.cell(slot, p).begin();
        }
        if let Err(e) = raw::dontneed(range) {
            self.w
                .event(&self.me.name, format!("MADV_DONTNEED of {range}: {e}"));
            write_pages_zero(range);
        }
        for p in first..first + n {
            self.w.cell(slot, p).end(0, Kind::Dontneed);
        }
        for p in first..first + n {
            self.w.checked(Kind::Dontneed, 1);
            if !self
                .w
                .check_page(&self.me.name, "read after MADV_DONTNEED", slot, p, 0)
                && let Some(a) = self.w.addr(slot, p)
            {
                write_page(a, 0, self.w.id(slot, p));
            }
        }
        true
    }

    /// Moves its mremap region to its other place, then checks it whole.
    fn mremap(&mut self) -> bool {
        let Some(si) = self.w.mremap_slot else {
            return false;
        };
        if self.w.mremap_broken.load(Ordering::Relaxed) {
            return false;
        }
        let s = &self.w.slots[si];
        let Role::Mremap { places } = s.role else {
            return false;
        };
        let from = s.base.load(Ordering::SeqCst);
        let to = if from == places[0] {
            places[1]
        } else {
            places[0]
        };
        s.layout.fetch_add(1, Ordering::SeqCst);
        let moved = raw::mremap_fixed(from, s.len(), to);
        if let Err(e) = &moved {
            self.w
                .event(&self.me.name, format!("mremap {from:#x} -> {to:#x}: {e}"));
            self.w.mremap_broken.store(true, Ordering::Relaxed);
        } else {
            s.base.store(to, Ordering::SeqCst);
            if let Err(e) = raw::reserve(from, s.len()) {
                self.w.event(
                    &self.me.name,
                    format!("cannot reserve the vacated place {from:#x} again: {e}"),
                );
                self.w.mremap_broken.store(true, Ordering::Relaxed);
            }
        }
        s.layout.fetch_add(1, Ordering::SeqCst);
        self.check_whole(si, "read after mremap", Kind::Mremap);
        true
    }

    /// Drops its realloc region and allocates a new one (often at the same
    /// address); the new memory must read zero.
    fn realloc(&mut self) -> bool {
        let Some(si) = self.w.realloc_slot else {
            return false;
        };
        let s = &self.w.slots[si];
        self.check_whole(si, "read before realloc", Kind::Realloc);
        s.layout.fetch_add(1, Ordering::SeqCst);
        let old = s.base.load(Ordering::SeqCst);
        let mut region = lock(&s.region);
        drop(region.take());
        match self.w.mm.alloc(s.len(), Backing::AnonPrivate) {
            Ok(r) => {
                s.base.store(r.range().start().get(), Ordering::SeqCst);
                *region = Some(r);
            }
            Err(e) => {
                self.w.count_mm_error(Kind::Realloc, &e);
                s.base.store(0, Ordering::SeqCst);
            }
        }
        drop(region);
        for p in 0..s.npages {
            self.w.cell(si, p).end_whole(0, Kind::Realloc);
        }
        s.layout.fetch_add(1, Ordering::SeqCst);
        if s.base.load(Ordering::SeqCst) == old {
            self.w
                .tally
                .realloc_same_place
                .fetch_add(1, Ordering::Relaxed);
        }
        self.check_whole(si, "fresh region after realloc", Kind::Realloc);
        true
    }

    /// Checks every page of a region it owns whole.
    fn check_whole(&self, si: usize, check: &'static str, kind: Kind) {
        for p in 0..self.w.slots[si].npages {
            let counter = self.w.cell(si, p).counter.load(Ordering::Relaxed);
            self.w.checked(kind, 1);
            if !self.w.check_page(&self.me.name, check, si, p, counter)
                && let Some(a) = self.w.addr(si, p)
            {
                write_page(a, counter, self.w.id(si, p));
            }
        }
    }
}

impl fmt::Debug for Writer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writer")
            .field("index", &self.index)
            .finish()
    }
}

impl PageCell {
    fn note(&self, step: Step) {
        let k = self.hist_next.fetch_add(1, Ordering::Relaxed);
        self.hist[k % HISTORY].store(step.0, Ordering::Relaxed);
    }

    /// The steps noted last, oldest first.
    fn history(&self) -> Vec<Step> {
        let n = self.hist_next.load(Ordering::Relaxed);
        (n.saturating_sub(HISTORY)..n)
            .map(|k| Step(self.hist[k % HISTORY].load(Ordering::Relaxed)))
            .collect()
    }

    /// The owner replaced the page while its region's layout number was
    /// odd (that covers the change; the page's own sequence stays).
    fn end_whole(&self, v: u64, kind: Kind) {
        self.counter.store(v, Ordering::SeqCst);
        self.last_write.store(kind.index() as u8, Ordering::Relaxed);
    }
}

/// Zeroes pages a failed discard may have left as they were.
fn write_pages_zero(range: PageRange) {
    for a in range.pages() {
        write_page(a, 0, 0);
    }
}

// ---------------------------------------------------------------------
// Operation threads
// ---------------------------------------------------------------------

/// A thread that runs one operation kind over everybody's pages.
struct Operator<'w> {
    w: &'w World,
    me: &'w ThreadInfo,
    kind: Kind,
    rng: Rng,
}

impl fmt::Debug for Operator<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Operator")
            .field("kind", &self.kind)
            .finish()
    }
}

impl<'w> Operator<'w> {
    fn new(w: &'w World, me: &'w ThreadInfo, kind: Kind) -> Operator<'w> {
        Operator {
            w,
            me,
            kind,
            rng: Rng::new(w.cfg.seed, 100 + kind.index() as u64),
        }
    }

    fn run(mut self, member: Member<'_>) {
        while !self.w.stop.load(Ordering::Relaxed) {
            self.w.gate.checkpoint(self.me);
            self.w.touch(self.me);
            self.me.doing(self.kind);
            match self.kind {
                Kind::Migrate => self.migrate(),
                Kind::Exclusive => self.exclusive(),
                Kind::Mirror => self.mirror(),
                Kind::Fork => self.fork(),
                Kind::Devices => self.devices(),
                Kind::Faults => self.faults(),
                Kind::Split => self.split(),
                _ => {}
            }
            self.w.count(self.kind);
            self.me.doing.store(0, Ordering::Relaxed);
            self.w.touch(self.me);
        }
        drop(member);
    }

    fn error(&self, e: &SimError) {
        self.w.count_sim_error(self.kind, e);
    }

    /// A random range to a random device, or back to system memory; now
    /// and then a device brings all its pages home.
    fn migrate(&mut self) {
        let d = self.rng.below(self.w.ndevices());
        let Some(t) = self.w.pick_target(&mut self.rng, 32, true) else {
            return;
        };
        let back = self.rng.one_in(3);
        let release = self.rng.one_in(500);
        let what = if back { Step::TO_SYSTEM } else { 0 };
        self.w.mark_what(&t, Kind::Migrate, what);
        self.w.with_device(d, |dev| {
            let r = if back {
                dev.migrate_to_system(t.addr, t.pages.len()).map(|_| ())
            } else {
                dev.migrate_range_to_device(t.addr, t.pages.len())
                    .map(|_| ())
            };
            self.w.unmark(&t, Kind::Migrate, what, &r);
            if let Err(e) = r {
                self.error(&e);
            }
            if release && let Err(e) = dev.release() {
                self.error(&e);
            }
        });
    }

    /// An exclusive grab of a few pages (its read-back compared), then
    /// `check_exclusive`.
    fn exclusive(&mut self) {
        let d = self.rng.below(self.w.ndevices());
        let Some(t) = self.w.pick_target(&mut self.rng, 4, false) else {
            return;
        };
        self.w.mark(&t, Kind::Exclusive);
        let bracket = Bracket::open(self.w, &t);
        self.w
            .with_device(d, |dev| match dev.exclusive(t.addr, t.pages.len()) {
                r @ Err(_) => {
                    self.w.unmark(&t, Kind::Exclusive, 0, &r);
                    if let Err(e) = r {
                        self.error(&e);
                    }
                }
                Ok((data, _)) => {
                    self.w.unmark(&t, Kind::Exclusive, 0, &Ok::<(), ()>(()));
                    let n = bracket.compare(
                        self.w,
                        self.me,
                        "device read after an exclusive grab",
                        &t,
                        &data,
                    );
                    self.w.checked(Kind::Exclusive, n);
                    if let Err(e) = dev.check_exclusive(t.addr, t.pages.len()) {
                        self.error(&e);
                    }
                }
            });
    }

    /// A device read of a random range, compared with the model.
    fn mirror(&mut self) {
        let d = self.rng.below(self.w.ndevices());
        let Some(t) = self.w.pick_target(&mut self.rng, 32, true) else {
            return;
        };
        self.w.mark(&t, Kind::Mirror);
        let bracket = Bracket::open(self.w, &t);
        self.w
            .with_device(d, |dev| match dev.read(t.addr, t.pages.len()) {
                Ok((data, _)) => {
                    let n = bracket.compare(self.w, self.me, "device read", &t, &data);
                    self.w.checked(Kind::Mirror, n);
                }
                Err(e) => self.error(&e),
            });
    }

    /// A new device takes a few ranges, the writers touch them for a
    /// moment, and the device is dropped: none of its pages may stay
    /// behind.
    fn devices(&mut self) {
        let dev = SimDevice::new(&self.w.mm);
        let owner = dev.owner();
        let mut taken = Vec::new();
        for _ in 0..1 + self.rng.below(3) {
            let Some(t) = self.w.pick_target(&mut self.rng, 16, true) else {
                continue;
            };
            self.w.mark(&t, Kind::Devices);
            let r = dev.migrate_range_to_device(t.addr, t.pages.len());
            self.w.unmark(&t, Kind::Devices, 0, &r);
            match r {
                Ok(_) => taken.push(t),
                Err(e) => self.error(&e),
            }
        }
        std::thread::sleep(Duration::from_micros(self.rng.below(2000) as u64));
        drop(dev);
        for t in &taken {
            // (Its drop: the pages' way home.)
            self.w
                .unmark(t, Kind::Devices, Step::TO_SYSTEM, &Ok::<(), ()>(()));
        }
        for t in &taken {
            for a in PageRange::new(t.addr, t.pages.len() * PAGE_SIZE)
                .into_iter()
                .flat_map(PageRange::pages)
            {
                if let Ok(PageState::Device { owner: o, .. }) = self.w.mm.page_state(a)
                    && o == owner
                {
                    self.w.event(
                        &self.me.name,
                        format!(
                            "page {a} is still on device {} after the device was dropped",
                            owner.get()
                        ),
                    );
                }
            }
        }
    }

    /// Arms an injected copy failure and/or allocation failure on the
    /// failing device, then migrates a random range with it.
    fn faults(&mut self) {
        let Some((d, engine)) = &self.w.faulty else {
            return;
        };
        let what = self.rng.below(3);
        let back = self.rng.one_in(3);
        let after = self.rng.below(3) as u64;
        let Some(t) = self.w.pick_target(&mut self.rng, 32, true) else {
            return;
        };
        let step = if back { Step::TO_SYSTEM } else { 0 }
            | if what != 1 { Step::COPY_FAILS } else { 0 }
            | if what != 0 { Step::ALLOC_FAILS } else { 0 };
        self.w.mark_what(&t, Kind::Faults, step);
        self.w.with_device(*d, |dev| {
            if what != 1 {
                engine.fail_after(after);
            }
            if what != 0 {
                dev.fail_next_alloc();
            }
            let r = if back {
                dev.migrate_to_system(t.addr, t.pages.len()).map(|_| ())
            } else {
                dev.migrate_range_to_device(t.addr, t.pages.len())
                    .map(|_| ())
            };
            self.w.unmark(&t, Kind::Faults, step, &r);
            if let Err(e) = r {
                self.error(&e);
            }
        });
    }

    /// A spare page (no writer uses it) made read-only with
    /// `Mm::mprotect`, read, and made writable again: its region's VMA is
    /// split and merged under the migrations.
    fn split(&mut self) {
        let striped: Vec<usize> = (0..self.w.slots.len())
            .filter(|&s| matches!(self.w.slots[s].role, Role::Striped))
            .collect();
        let slot = striped[self.rng.below(striped.len())];
        let spares = self.w.slots[slot].npages / SPARE_EVERY;
        let p = self.rng.below(spares) * SPARE_EVERY + SPARE_EVERY - 1;
        let Some(addr) = self.w.addr(slot, p) else {
            return;
        };
        let Ok(range) = PageRange::new(addr, PAGE_SIZE) else {
            return;
        };
        self.w.mark(
            &Target {
                addr,
                pages: vec![TargetPage {
                    slot,
                    page: p,
                    base: 0,
                }],
            },
            Kind::Split,
        );
        if let Err(e) = self.w.mm.mprotect(range, Prot::READ) {
            self.w.count_mm_error(Kind::Split, &e);
            return;
        }
        std::thread::sleep(Duration::from_micros(self.rng.below(300) as u64));
        self.w.checked(Kind::Split, 1);
        self.w.check_page(
            &self.me.name,
            "read of a read-only spare page",
            slot,
            p,
            SPARE_COUNTER,
        );
        if let Err(e) = self.w.mm.mprotect(range, Prot::RW) {
            self.w.event(
                &self.me.name,
                format!("could not make the spare page {addr} writable again: {e}"),
            );
        }
    }

    /// Forks; the child compares a sample of pages with its copy of the
    /// model and writes its own copy of one page; the parent checks that
    /// the child's write stayed the child's.
    fn fork(&mut self) {
        let sample: Vec<(usize, usize)> = (0..CHILD_SAMPLE)
            .map(|_| {
                let s = self.rng.below(self.w.slots.len());
                (s, self.rng.below(self.w.slots[s].npages))
            })
            .collect();
        // The page the child writes: a writer's page of a striped region.
        let mark = (0..8).find_map(|_| {
            let s = self.rng.below(self.w.cfg.regions);
            let p = self.rng.below(self.w.slots[s].npages);
            self.w.owner(s, p).is_some().then_some((s, p))
        });
        let (rd, wr) = match raw::pipe() {
            Ok(p) => p,
            Err(e) => {
                self.w.count_error(Kind::Fork, "pipe".into(), &e);
                return;
            }
        };
        let w = self.w;
        let pins = w.pin_vs_fork.write().unwrap_or_else(|e| e.into_inner());
        let end = raw::fork_with_timeout(CHILD_TIMEOUT, || child_check(w, &sample, mark, &wr));
        drop(pins);
        drop(wr);
        let mut report = Vec::new();
        let _ = (&rd).read_to_end(&mut report);
        self.fork_outcome(end, &report);
        if let Some((s, p)) = mark
            && let Some(a) = self.w.addr(s, p)
            && cpu::read_u64(a) == CHILD_MARK
        {
            self.w.event(
                &self.me.name,
                format!("the parent reads the forked child's write at {a} (region {s} page {p}): copy-on-write broken"),
            );
        }
        // A fork brings every device page home: leave the devices time to
        // take some again (a phase check comes right after this).
        std::thread::sleep(Duration::from_millis(20));
    }

    fn fork_outcome(&self, end: raw::ChildEnd, report: &[u8]) {
        let name = &self.me.name;
        let words: Vec<u64> = report
            .chunks_exact(8)
            .map(|b| u64::from_ne_bytes(b.try_into().unwrap_or([0; 8])))
            .collect();
        for rec in words.chunks_exact(CHILD_RECORD) {
            match rec[0] {
                CHILD_MISMATCH => {
                    let (s, p) = (rec[1] as usize, rec[2] as usize);
                    let addr = rec[3] as usize;
                    let counter = rec[4];
                    let diff = (rec[5] as usize, rec[6], rec[7]);
                    if s < self.w.slots.len() && p < self.w.slots[s].npages {
                        self.w.mismatch(
                            "fork child",
                            "forked child's read",
                            (s, p, addr),
                            counter,
                            diff,
                        );
                    }
                }
                CHILD_SUMMARY => self.w.checked(Kind::Fork, rec[1]),
                _ => {}
            }
        }
        match end {
            raw::ChildEnd::Exited(0) | raw::ChildEnd::Exited(CHILD_EXIT_MISMATCH) => {}
            raw::ChildEnd::Exited(CHILD_EXIT_OWN_WRITE) => self.w.event(
                name,
                "the forked child did not read back its own write".into(),
            ),
            raw::ChildEnd::Exited(c) => self
                .w
                .event(name, format!("the forked child exited with status {c}")),
            raw::ChildEnd::Signaled(sig) => self
                .w
                .event(name, format!("the forked child was killed by signal {sig}")),
            raw::ChildEnd::TimedOut => self.w.event(
                name,
                format!(
                    "the forked child did not exit within {} s (killed)",
                    CHILD_TIMEOUT.as_secs()
                ),
            ),
            raw::ChildEnd::ForkFailed(e) => self.w.count_error(Kind::Fork, "fork".into(), &e),
        }
    }
}

/// Words per record a forked child sends back.
const CHILD_RECORD: usize = 8;
const CHILD_MISMATCH: u64 = 1;
const CHILD_SUMMARY: u64 = 2;
const CHILD_EXIT_MISMATCH: i32 = 1;
const CHILD_EXIT_OWN_WRITE: i32 = 2;

/// In a forked child: compares the sampled pages of its copy with its copy
/// of the model (pages not being changed at the fork), sends the
/// mismatches and a summary on `out`, writes `mark` and reads it back.
/// Allocates nothing and takes no lock (the parent's other threads may
/// have held any at the fork).
fn child_check(
    w: &World,
    sample: &[(usize, usize)],
    mark: Option<(usize, usize)>,
    out: &File,
) -> i32 {
    let mut bad = 0u64;
    let mut checked = 0u64;
    for &(s, p) in sample {
        let Some(slot) = w.slots.get(s) else { continue };
        let Some(cell) = w.cells.get(slot.first + p) else {
            continue;
        };
        let base = slot.base.load(Ordering::SeqCst);
        let stable = slot.layout.load(Ordering::SeqCst) % 2 == 0
            && cell.seq.load(Ordering::SeqCst) % 2 == 0
            && base != 0;
        if !stable {
            continue;
        }
        checked += 1;
        let counter = cell.counter.load(Ordering::SeqCst);
        let addr = base + p * PAGE_SIZE;
        if let Some((word, want, got)) =
            diff_page(VirtAddr::new(addr), counter, (slot.first + p) as u64)
        {
            bad += 1;
            let rec = [
                CHILD_MISMATCH,
                s as u64,
                p as u64,
                addr as u64,
                counter,
                word as u64,
                want,
                got,
            ];
            raw::write_words(out, &rec);
        }
    }
    raw::write_words(out, &[CHILD_SUMMARY, checked, bad, 0, 0, 0, 0, 0]);
    if let Some((s, p)) = mark
        && let Some(slot) = w.slots.get(s)
    {
        let a = VirtAddr::new(slot.base.load(Ordering::SeqCst) + p * PAGE_SIZE);
        cpu::write_u64(a, CHILD_MARK);
        if cpu::read_u64(a) != CHILD_MARK {
            return CHILD_EXIT_OWN_WRITE;
        }
    }
    if bad > 0 { CHILD_EXIT_MISMATCH } else { 0 }
}

// ---------------------------------------------------------------------
// Phase checks
// ---------------------------------------------------------------------

/// Where the pages were at a phase check.
#[derive(Debug, Default, Clone, Copy)]
struct Census {
    device: usize,
    exclusive: usize,
    system: usize,
    empty: usize,
    migrating: usize,
}

impl fmt::Display for Census {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} device, {} exclusive, {} system, {} empty",
            self.device, self.exclusive, self.system, self.empty
        )?;
        if self.migrating > 0 {
            write!(f, ", {} MIGRATING", self.migrating)?;
        }
        Ok(())
    }
}

/// With every other thread stopped: each page's state (none may be
/// `Migrating`), each device's read of it, and a plain load, all compared
/// with the model.
fn phase_check(w: &World, label: &'static str) -> Census {
    let me = &w.threads[0];
    me.doing.store(DOING_PHASE, Ordering::Relaxed);
    let census = take_census(w, label);
    let checked = device_reads(w, label) + plain_reads(w, "plain read at a phase check");
    w.tally.phases.fetch_add(1, Ordering::Relaxed);
    w.tally.phase_pages.fetch_add(checked, Ordering::Relaxed);
    me.doing.store(0, Ordering::Relaxed);
    census
}

/// Counts where the pages are; a page `Migrating` while nothing runs is a
/// failure (an operation left it behind).
fn take_census(w: &World, label: &str) -> Census {
    let mut census = Census::default();
    for (si, s) in w.slots.iter().enumerate() {
        let Some(base) = s.base() else { continue };
        for p in 0..s.npages {
            let a = VirtAddr::new(base + p * PAGE_SIZE);
            match w.mm.page_state(a) {
                Ok(PageState::Device { .. }) => census.device += 1,
                Ok(PageState::Exclusive { .. }) => census.exclusive += 1,
                Ok(PageState::System) => census.system += 1,
                Ok(PageState::Empty) => census.empty += 1,
                Ok(PageState::Migrating { owner }) => {
                    census.migrating += 1;
                    w.event(
                        "main",
                        format!(
                            "{label}: region {si} page {p} ({a}) is Migrating (owner {}) with no operation in flight",
                            owner.get()
                        ),
                    );
                }
                Err(e) => w.event("main", format!("{label}: page_state({a}): {e}")),
            }
        }
        w.touch(&w.threads[0]);
    }
    census
}

/// Every device reads every page (nothing else runs: all must match);
/// returns the pages compared.
fn device_reads(w: &World, label: &str) -> u64 {
    let mut checked = 0;
    for d in 0..w.ndevices() {
        for (si, s) in w.slots.iter().enumerate() {
            let Some(base) = s.base() else { continue };
            for first in (0..s.npages).step_by(PHASE_READ_PAGES) {
                let n = PHASE_READ_PAGES.min(s.npages - first);
                let a = VirtAddr::new(base + first * PAGE_SIZE);
                let data = match w.with_device(d, |dev| dev.read(a, n)) {
                    Some(Ok((data, _))) => data,
                    Some(Err(e)) => {
                        w.event(
                            "main",
                            format!(
                                "{label}: device {d} could not read {n} quiescent pages at {a}: {e}"
                            ),
                        );
                        continue;
                    }
                    None => continue,
                };
                for (i, bytes) in data.chunks_exact(PAGE_SIZE).enumerate() {
                    let p = first + i;
                    let counter = w.cell(si, p).counter.load(Ordering::SeqCst);
                    checked += 1;
                    if let Some(diff) = diff_bytes(bytes, counter, w.id(si, p)) {
                        let addr = base + p * PAGE_SIZE;
                        let check = "device read at a phase check";
                        w.mismatch("main", check, (si, p, addr), counter, diff);
                    }
                }
            }
            w.touch(&w.threads[0]);
        }
    }
    checked
}

/// Plain loads of every page (nothing else runs); returns the pages
/// compared.
fn plain_reads(w: &World, check: &'static str) -> u64 {
    let mut checked = 0;
    for (si, s) in w.slots.iter().enumerate() {
        for p in 0..s.npages {
            let counter = w.cell(si, p).counter.load(Ordering::SeqCst);
            checked += 1;
            w.check_page("main", check, si, p, counter);
        }
        w.touch(&w.threads[0]);
    }
    checked
}

/// One line on stderr: time, rates so far, residency, failures.
fn progress(w: &World, phase: u64, census: &Census) {
    let secs = w.now_s().max(1e-3);
    let rates: Vec<String> = Kind::ALL
        .iter()
        .filter(|k| w.cfg.on(**k))
        .map(|k| {
            let n = w.tally.ops[k.index()].load(Ordering::Relaxed) as f64;
            format!("{} {}", k.name(), rate(n / secs))
        })
        .collect();
    eprintln!(
        "[{secs:6.1} s] phase {phase}: ops/s {}; pages: {census}; failures {}",
        rates.join(", "),
        w.failure_count.load(Ordering::SeqCst)
    );
}

fn rate(x: f64) -> String {
    if x >= 10_000.0 {
        format!("{:.0}k", x / 1000.0)
    } else if x >= 1000.0 {
        format!("{:.1}k", x / 1000.0)
    } else {
        format!("{x:.0}")
    }
}

// ---------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------

fn stress(mut cfg: Config) -> Result<bool, BoxError> {
    raw::install_crash_handler();
    if cfg.on(Kind::Odirect)
        && let Err(why) = probe_direct()
    {
        cfg.unavailable.push((Kind::Odirect, why));
    }
    let world = World::build(cfg)?;
    world.describe();
    let ios = (0..world.cfg.threads)
        .map(|_| WriterIo::new(&world.cfg))
        .collect::<Result<Vec<_>, _>>()?;
    let teardown = std::thread::scope(|s| -> Result<Teardown, BoxError> {
        let w = &world;
        let watchdog = std::thread::Builder::new()
            .name("uhmm-watchdog".into())
            .spawn_scoped(s, move || watch(w))?;
        let mut handles = Vec::new();
        let mut spawned = Ok(());
        for (i, io) in ios.into_iter().enumerate() {
            let info = &w.threads[1 + i];
            let member = w.gate.member(info);
            w.touch(info);
            let r = std::thread::Builder::new()
                .name(info.name.clone())
                .spawn_scoped(s, move || Writer::new(w, i, io).run(member));
            match r {
                Ok(h) => handles.push((info, h)),
                Err(e) => spawned = Err(e),
            }
        }
        for (k, kind) in op_kinds(&w.cfg).enumerate() {
            let info = &w.threads[1 + w.cfg.threads + k];
            let member = w.gate.member(info);
            w.touch(info);
            let r = std::thread::Builder::new()
                .name(info.name.clone())
                .spawn_scoped(s, move || Operator::new(w, info, kind).run(member));
            match r {
                Ok(h) => handles.push((info, h)),
                Err(e) => spawned = Err(e),
            }
        }
        if spawned.is_ok() {
            run_phases(w);
        }
        w.stopped_ms.store(w.now_ms(), Ordering::SeqCst);
        w.stop.store(true, Ordering::SeqCst);
        let main = &w.threads[0];
        main.parked.store(true, Ordering::SeqCst);
        main.doing.store(DOING_JOIN, Ordering::Relaxed);
        for (info, h) in handles {
            if let Err(panic) = h.join() {
                w.event(
                    &info.name,
                    format!("the thread panicked: {}", panic_message(&*panic)),
                );
            }
        }
        main.parked.store(false, Ordering::SeqCst);
        w.touch(main);
        let teardown = spawned.map(|()| finish(w));
        w.done.store(true, Ordering::SeqCst);
        // A watchdog that died watched nothing: the run is not a pass.
        if let Err(panic) = watchdog.join() {
            w.event(
                "uhmm-watchdog",
                format!("the thread panicked: {}", panic_message(&*panic)),
            );
        }
        Ok(teardown?)
    })?;
    let stats = world.mm.stats();
    if stats.pages_lost > 0 {
        world.event(
            "main",
            format!("{} pages lost (mm.stats().pages_lost)", stats.pages_lost),
        );
    }
    let fig = Figures::collect(&world, Some(stats), teardown, None);
    print_report(&fig);
    // Results asked for and not written: not a pass.
    let written = write_json(&world, &fig);
    let ok = fig.ok && written;
    // Dropping the last handle releases the address space; a hang there is
    // reported too.
    let limit = world.cfg.watchdog;
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!(
            "uhmm stress: WATCHDOG: dropping the Mm did not return within {} s",
            limit.as_secs()
        );
        raw::exit_now(1);
    });
    drop(world);
    Ok(ok)
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// The main thread's part while the others run: a phase check every
/// `phase`, until the duration is over.
fn run_phases(w: &World) {
    let main = &w.threads[0];
    let mut phase = 0u64;
    loop {
        let next = w.cfg.phase * (phase as u32 + 1);
        if next >= w.cfg.duration {
            break;
        }
        main.parked.store(true, Ordering::SeqCst);
        sleep_until(w, next);
        w.gate.pause();
        main.parked.store(false, Ordering::SeqCst);
        w.touch(main);
        phase += 1;
        let census = phase_check(w, "phase check");
        progress(w, phase, &census);
        w.gate.resume();
    }
    main.parked.store(true, Ordering::SeqCst);
    sleep_until(w, w.cfg.duration);
    main.parked.store(false, Ordering::SeqCst);
    w.touch(main);
}

fn sleep_until(w: &World, t: Duration) {
    while let Some(left) = t.checked_sub(w.t0.elapsed()) {
        if left.is_zero() || w.stop.load(Ordering::Relaxed) {
            break;
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

/// What the devices were like when they were removed.
#[derive(Debug, Default)]
struct Teardown {
    devices: Vec<DeviceFigures>,
    /// Where the pages were at the final check (none after a hang).
    census: Option<Census>,
}

#[derive(Debug)]
struct DeviceFigures {
    path: &'static str,
    stats: SimStats,
    memory: PagemapStats,
    pages_at_removal: usize,
    removal_ms: f64,
}

/// After the threads ended: a last phase check, the devices removed (their
/// pages must come home), every page checked again, the regions dropped.
fn finish(w: &World) -> Teardown {
    let census = phase_check(w, "final check");
    progress(w, w.tally.phases.load(Ordering::Relaxed), &census);
    w.threads[0].doing.store(DOING_TEARDOWN, Ordering::Relaxed);
    let devices = remove_devices(w);
    plain_reads(w, "plain read after the devices were removed");
    drop_regions(w);
    Teardown {
        devices,
        census: Some(census),
    }
}

/// Drops every device (each brings its pages home), with its figures.
fn remove_devices(w: &World) -> Vec<DeviceFigures> {
    let removed: Vec<SimDevice> =
        std::mem::take(&mut *w.devices.write().unwrap_or_else(|e| e.into_inner()));
    let mut figures = Vec::new();
    for (d, dev) in removed.into_iter().enumerate() {
        let pages_at_removal = dev.device_pages();
        let stats = dev.stats();
        let memory = dev.memory_stats();
        let t = Instant::now();
        drop(dev);
        figures.push(DeviceFigures {
            path: if w.faulty.as_ref().is_some_and(|(f, _)| *f == d) {
                "copying, failing engine"
            } else {
                "zero-copy (UFFDIO_MOVE)"
            },
            stats,
            memory,
            pages_at_removal,
            removal_ms: t.elapsed().as_secs_f64() * 1e3,
        });
        w.touch(&w.threads[0]);
    }
    figures
}

/// Drops the regions; the mremap region goes back to its first place
/// first (where it was managed) and its window is unmapped.
fn drop_regions(w: &World) {
    if let Some(si) = w.mremap_slot
        && let Role::Mremap { places } = w.slots[si].role
    {
        let s = &w.slots[si];
        let at = s.base.load(Ordering::SeqCst);
        if at != places[0] && !w.mremap_broken.load(Ordering::Relaxed) {
            match raw::mremap_fixed(at, s.len(), places[0]) {
                Ok(()) => s.base.store(places[0], Ordering::SeqCst),
                Err(e) => w.event("main", format!("moving the mremap region home: {e}")),
            }
        }
        drop(lock(&s.region).take());
        raw::unmap(places[0], 2 * s.len());
    }
    for s in &w.slots {
        drop(lock(&s.region).take());
    }
    w.touch(&w.threads[0]);
}

// ---------------------------------------------------------------------
// The watchdog
// ---------------------------------------------------------------------

/// Ends the run with a report when a thread makes no progress for
/// `--watchdog` seconds (waiting at the gate, sleeping or joining does
/// not count).
fn watch(w: &World) {
    let limit = w.cfg.watchdog.as_millis() as u64;
    while !w.done.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
        let now = w.now_ms();
        let stalled: Vec<&ThreadInfo> = w
            .threads
            .iter()
            .filter(|t| !t.parked.load(Ordering::SeqCst) && !t.exited.load(Ordering::SeqCst))
            .filter(|t| now.saturating_sub(t.last_ms.load(Ordering::Relaxed)) > limit)
            .collect();
        if !stalled.is_empty() {
            hang_report(w, &stalled);
        }
    }
}

/// Prints what every thread was doing, its kernel stack and `Mm::stats`,
/// the verdict, and leaves at once (the stuck threads cannot be joined, and
/// exit hooks could hang on them).
fn hang_report(w: &World, stalled: &[&ThreadInfo]) -> ! {
    let now = w.now_ms();
    let names: Vec<String> = stalled
        .iter()
        .map(|t| {
            format!(
                "{} (in {}, {:.1} s since its last progress)",
                t.name,
                doing_name(t.doing.load(Ordering::Relaxed)),
                now.saturating_sub(t.last_ms.load(Ordering::Relaxed)) as f64 / 1e3
            )
        })
        .collect();
    let what = format!(
        "WATCHDOG: no progress for {} s: {}",
        w.cfg.watchdog.as_secs(),
        names.join("; ")
    );
    eprintln!("\nuhmm stress: {what}");
    eprintln!("threads:");
    for t in &w.threads {
        eprintln!(
            "  {:<16} {:<20} last progress {:.1} s ago{}{}",
            t.name,
            doing_name(t.doing.load(Ordering::Relaxed)),
            now.saturating_sub(t.last_ms.load(Ordering::Relaxed)) as f64 / 1e3,
            if t.parked.load(Ordering::SeqCst) {
                ", parked"
            } else {
                ""
            },
            if t.exited.load(Ordering::SeqCst) {
                ", exited"
            } else {
                ""
            },
        );
    }
    eprintln!("kernel stacks (/proc/self/task/*/stack):");
    eprint!("{}", kernel_stacks());
    if let Some(stacks) = user_stacks() {
        eprintln!("user stacks (eu-stack):");
        eprint!("{stacks}");
    }
    // The core may hold its locks for ever: ask from a thread of its own
    // and do not wait long.
    let mm = w.mm.clone();
    let pages: Vec<(usize, usize)> = w
        .slots
        .iter()
        .filter_map(|s| s.base().map(|b| (b, s.npages)))
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let stats = mm.stats();
        let _ = tx.send(Ok(stats.clone()));
        let mut states: BTreeMap<String, usize> = BTreeMap::new();
        for (base, n) in pages {
            for p in 0..n {
                let s = match mm.page_state(VirtAddr::new(base + p * PAGE_SIZE)) {
                    Ok(PageState::Migrating { owner }) => {
                        format!("Migrating(owner {})", owner.get())
                    }
                    Ok(PageState::Device { owner, .. }) => format!("Device(owner {})", owner.get()),
                    Ok(PageState::Exclusive { owner }) => {
                        format!("Exclusive(owner {})", owner.get())
                    }
                    Ok(other) => format!("{other:?}"),
                    Err(e) => format!("error: {e}"),
                };
                *states.entry(s).or_insert(0) += 1;
            }
        }
        let _ = tx.send(Err(states));
    });
    let wait = Duration::from_secs(3);
    let stats = match rx.recv_timeout(wait) {
        Ok(Ok(stats)) => {
            eprintln!("mm.stats(): {stats:?}");
            Some(stats)
        }
        _ => {
            eprintln!(
                "mm.stats() did not answer within {} s (a lock held for ever)",
                wait.as_secs()
            );
            None
        }
    };
    match rx.recv_timeout(wait) {
        Ok(Err(states)) => eprintln!("page states: {states:?}"),
        _ => eprintln!("page states: no answer within {} s", wait.as_secs()),
    }
    w.fail(Failure::Event {
        at_s: w.now_s(),
        thread: "watchdog".into(),
        what: what.clone(),
    });
    let fig = Figures::collect(w, stats, Teardown::default(), Some(what));
    print_report(&fig);
    write_json(w, &fig);
    raw::exit_now(1)
}

/// Every thread's user-space stack, from `eu-stack` if it is installed
/// (spawned without fork hooks, and given 10 s).
fn user_stacks() -> Option<String> {
    let child = std::process::Command::new("eu-stack")
        .arg("-p")
        .arg(std::process::id().to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(out)) => Some(String::from_utf8_lossy(&out.stdout).into_owned()),
        Ok(Err(_)) => None,
        Err(_) => Some(
            "  (eu-stack did not finish within 10 s: a thread in an uninterruptible wait cannot be stopped)\n"
                .into(),
        ),
    }
}

fn kernel_stacks() -> String {
    let mut out = String::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return "  (cannot read /proc/self/task)\n".into();
    };
    let mut tids: Vec<_> = dir.flatten().map(|e| e.path()).collect();
    tids.sort();
    for t in tids {
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        let stack = std::fs::read_to_string(t.join("stack"))
            .unwrap_or_else(|e| format!("(stack unreadable: {e})\n"));
        let tid = t
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.push_str(&format!("  tid {tid} ({}):\n", comm.trim()));
        for line in stack.lines() {
            out.push_str(&format!("    {line}\n"));
        }
    }
    out
}

// ---------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------

/// The final figures (printed and written as JSON).
#[derive(Debug)]
struct Figures {
    /// Seconds the operations ran.
    elapsed_s: f64,
    kinds: Vec<KindFigures>,
    phases: u64,
    phase_pages: u64,
    realloc_same_place: u64,
    injected_copy_failures: Option<u64>,
    mm: Option<MmStats>,
    teardown: Teardown,
    failure_count: u64,
    failures: Vec<Failure>,
    /// Checks that should have run and did not.
    missing: Vec<String>,
    hang: Option<String>,
    ok: bool,
}

#[derive(Debug)]
struct KindFigures {
    kind: Kind,
    enabled: bool,
    note: Option<String>,
    ops: u64,
    checked: u64,
    /// (name, count, first example).
    errors: Vec<(String, u64, String)>,
}

impl Figures {
    fn collect(
        w: &World,
        mm: Option<MmStats>,
        teardown: Teardown,
        hang: Option<String>,
    ) -> Figures {
        let errors = lock(&w.tally.errors).clone();
        let kinds: Vec<KindFigures> = Kind::ALL
            .iter()
            .map(|&k| KindFigures {
                kind: k,
                enabled: w.cfg.on(k),
                note: w
                    .cfg
                    .unavailable
                    .iter()
                    .find(|(u, _)| *u == k)
                    .map(|(_, why)| why.clone()),
                ops: w.tally.ops[k.index()].load(Ordering::Relaxed),
                checked: w.tally.checked[k.index()].load(Ordering::Relaxed),
                errors: errors
                    .iter()
                    .filter(|((ek, _), _)| *ek == k)
                    .map(|((_, name), t)| (name.clone(), t.count, t.example.clone()))
                    .collect(),
            })
            .collect();
        let phases = w.tally.phases.load(Ordering::Relaxed);
        let mut missing = Vec::new();
        for k in &kinds {
            if k.enabled && k.ops == 0 {
                missing.push(format!("{} never ran", k.kind.name()));
            }
            let checks = matches!(k.kind, Kind::Cpu | Kind::Mirror | Kind::Fork);
            if k.enabled && checks && k.checked == 0 {
                missing.push(format!("{} compared no page with the model", k.kind.name()));
            }
        }
        if phases == 0 {
            missing.push("no phase check ran".into());
        }
        let failure_count = w.failure_count.load(Ordering::SeqCst);
        let ok = failure_count == 0 && missing.is_empty() && hang.is_none();
        Figures {
            elapsed_s: w.ran_ms() as f64 / 1e3,
            kinds,
            phases,
            phase_pages: w.tally.phase_pages.load(Ordering::Relaxed),
            realloc_same_place: w.tally.realloc_same_place.load(Ordering::Relaxed),
            injected_copy_failures: w.faulty.as_ref().map(|(_, e)| e.failures()),
            mm,
            teardown,
            failure_count,
            failures: lock(&w.failures).clone(),
            missing,
            hang,
            ok,
        }
    }
}

fn print_report(fig: &Figures) {
    let secs = fig.elapsed_s.max(1e-3);
    println!();
    println!("operations ({secs:.1} s):");
    println!(
        "  {:<10} {:>10} {:>10} {:>14}  typed errors (expected values)",
        "kind", "ops", "ops/s", "pages checked"
    );
    for k in &fig.kinds {
        if !k.enabled {
            let why = k.note.as_deref().unwrap_or("not selected");
            println!("  {:<10} {:>10}  ({why})", k.kind.name(), "off");
            continue;
        }
        let errors: Vec<String> = k
            .errors
            .iter()
            .map(|(n, c, _)| format!("{n} {c}"))
            .collect();
        println!(
            "  {:<10} {:>10} {:>10} {:>14}  {}",
            k.kind.name(),
            k.ops,
            rate(k.ops as f64 / secs),
            k.checked,
            if errors.is_empty() {
                "-".into()
            } else {
                errors.join(", ")
            }
        );
    }
    let examples: Vec<String> = fig
        .kinds
        .iter()
        .flat_map(|k| {
            k.errors
                .iter()
                .map(move |(n, _, ex)| format!("    {} {n}: {ex}", k.kind.name()))
        })
        .collect();
    if !examples.is_empty() {
        println!("  first error of each kind:");
        for e in examples {
            println!("{}", e.chars().take(220).collect::<String>());
        }
    }
    println!(
        "  phase checks: {} ({} page reads compared); realloc at the same address: {}{}",
        fig.phases,
        fig.phase_pages,
        fig.realloc_same_place,
        fig.injected_copy_failures
            .map_or(String::new(), |n| format!("; injected copy failures: {n}"))
    );
    if let Some(c) = &fig.teardown.census {
        println!("  pages at the final check: {c}");
    }
    if let Some(st) = &fig.mm {
        println!("uhmm (mm.stats()):");
        println!(
            "  faults {} (hole {}, device {}, exclusive {}, write-protect {}, waited {}); events {}; invalidation retries {}",
            st.faults,
            st.faults_hole,
            st.faults_device,
            st.faults_exclusive,
            st.faults_wp,
            st.faults_waited,
            st.events,
            st.invalidation_retries
        );
        println!(
            "  pages migrated to devices {}, to system memory {}; pages lost {}; page states held {} ({} B)",
            st.pages_to_device, st.pages_to_system, st.pages_lost, st.state_pages, st.state_bytes
        );
        let inv: Vec<String> = st
            .invalidations
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(e, n)| format!("{} {n}", format!("{e:?}").to_lowercase()))
            .collect();
        println!("  invalidations: {}", inv.join(", "));
    }
    for (d, dev) in fig.teardown.devices.iter().enumerate() {
        let s = &dev.stats;
        println!(
            "device {d} ({}): to device {}, to system {} (by CPU faults and eviction {}), reads {}, writes {}, fault rounds {}, copy failures {}, alloc fallbacks {}; {} pages at removal, removed in {:.1} ms",
            dev.path,
            s.migrated_to_device,
            s.migrated_to_system,
            s.faulted_back,
            s.reads,
            s.writes,
            s.fault_rounds,
            s.copy_failures,
            s.alloc_fallbacks,
            dev.pages_at_removal,
            dev.removal_ms
        );
    }
    if !fig.missing.is_empty() {
        println!("checks that did not run: {}", fig.missing.join("; "));
    }
    if fig.ok {
        println!("verdict: OK");
    } else {
        let why = match (&fig.hang, fig.failure_count) {
            (Some(h), _) => h.clone(),
            (None, 0) => "not every check ran".into(),
            (None, n) => format!("{n} failures"),
        };
        println!("verdict: FAIL ({why})");
        for f in fig.failures.iter().take(10) {
            println!("  {f}");
        }
    }
}

/// Writes the figures to `--json`'s file, if one was asked for; false if
/// that failed (the error is printed).
fn write_json(w: &World, fig: &Figures) -> bool {
    let Some(path) = &w.cfg.json else { return true };
    let c = &w.cfg;
    let kinds: serde_json::Map<String, serde_json::Value> = fig
        .kinds
        .iter()
        .map(|k| {
            let errors: serde_json::Map<String, serde_json::Value> = k
                .errors
                .iter()
                .map(|(n, c, ex)| (n.clone(), json!({"count": c, "example": ex})))
                .collect();
            (
                k.kind.name().to_string(),
                json!({
                    "enabled": k.enabled,
                    "note": k.note,
                    "ops": k.ops,
                    "ops_per_s": k.ops as f64 / fig.elapsed_s.max(1e-3),
                    "pages_checked": k.checked,
                    "errors": errors,
                }),
            )
        })
        .collect();
    let mm = fig.mm.as_ref().map(|st| {
        let inv: serde_json::Map<String, serde_json::Value> = st
            .invalidations
            .iter()
            .map(|(e, n)| (format!("{e:?}").to_lowercase(), json!(n)))
            .collect();
        json!({
            "events": st.events, "faults": st.faults, "faults_hole": st.faults_hole,
            "faults_device": st.faults_device, "faults_exclusive": st.faults_exclusive,
            "faults_wp": st.faults_wp, "faults_waited": st.faults_waited,
            "invalidation_retries": st.invalidation_retries,
            "pages_to_device": st.pages_to_device, "pages_to_system": st.pages_to_system,
            "pages_lost": st.pages_lost, "state_pages": st.state_pages, "state_bytes": st.state_bytes,
            "invalidations": inv,
        })
    });
    let devices: Vec<serde_json::Value> = fig
        .teardown
        .devices
        .iter()
        .map(|d| {
            let s = &d.stats;
            json!({
                "path": d.path, "migrated_to_device": s.migrated_to_device,
                "migrated_to_system": s.migrated_to_system, "faulted_back": s.faulted_back,
                "reads": s.reads, "writes": s.writes, "fault_rounds": s.fault_rounds,
                "copy_failures": s.copy_failures, "alloc_fallbacks": s.alloc_fallbacks,
                "invalidations": s.invalidations, "chunks": d.memory.chunks,
                "pages_allocated": d.memory.allocated, "pages_freed": d.memory.freed,
                "pages_at_removal": d.pages_at_removal, "removal_ms": d.removal_ms,
            })
        })
        .collect();
    let value = json!({
        "config": {
            "seed": c.seed, "duration_s": c.duration.as_secs(), "threads": c.threads,
            "pages": c.pages, "regions": c.regions, "devices": c.devices,
            "fault_block": c.fault_block, "watchdog_s": c.watchdog.as_secs(),
        },
        "elapsed_s": fig.elapsed_s,
        "kinds": kinds,
        "phases": fig.phases,
        "phase_pages_checked": fig.phase_pages,
        "final_census": fig.teardown.census.map(|c| json!({
            "device": c.device, "exclusive": c.exclusive, "system": c.system,
            "empty": c.empty, "migrating": c.migrating,
        })),
        "realloc_same_place": fig.realloc_same_place,
        "injected_copy_failures": fig.injected_copy_failures,
        "mm": mm,
        "devices": devices,
        "failure_count": fig.failure_count,
        "failures": fig.failures.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "missing_checks": fig.missing,
        "hang": fig.hang,
        "verdict": if fig.ok { "OK" } else { "FAIL" },
    });
    if let Err(e) = std::fs::write(path, format!("{value:#}\n")) {
        eprintln!("uhmm stress: cannot write {}: {e}", path.display());
        return false;
    }
    true
}

// ---------------------------------------------------------------------
// Raw pointers and system calls
// ---------------------------------------------------------------------

/// The one place in this module with `unsafe`: system calls on managed
/// memory through raw addresses, the mremap region's own mappings, fork,
/// and the fatal-signal handler.
///
/// The addresses handed in are pages of managed memory that the calling
/// thread owns in the model (or, for the mremap and placeholder mappings,
/// places this module reserved); managed memory is reached through raw
/// pointers only, so no Rust reference points into what these calls
/// change.
mod raw {
    #![allow(unsafe_code)]

    use std::ffi::c_void;
    use std::fs::File;
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::{Duration, Instant};
    use uhmm::mm::{ManagedRegion, Mm, MmError};
    use uhmm::sys::mem::{Advice, MemError};
    use uhmm::{PAGE_SIZE, PageRange, VirtAddr};

    fn check(n: isize) -> io::Result<usize> {
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// `pread(2)` of one page of `file` at `offset` into the managed page
    /// at `addr` (which the caller owns).
    pub fn pread_into(file: &File, addr: VirtAddr, offset: u64) -> io::Result<usize> {
        // SAFETY: `addr` is a whole page of managed memory that only the
        // calling writer changes, reached through raw pointers only; the
        // kernel checks the address.
        check(unsafe {
            libc::pread(
                file.as_raw_fd(),
                addr.as_mut_ptr::<c_void>(),
                PAGE_SIZE,
                offset as libc::off_t,
            )
        })
    }

    /// `pwrite(2)` of the managed page at `addr` to `file` at `offset`.
    pub fn pwrite_from(file: &File, addr: VirtAddr, offset: u64) -> io::Result<usize> {
        // SAFETY: the kernel only reads the page (the caller owns it, so it
        // does not change meanwhile) and checks the address.
        check(unsafe {
            libc::pwrite(
                file.as_raw_fd(),
                addr.as_ptr::<c_void>(),
                PAGE_SIZE,
                offset as libc::off_t,
            )
        })
    }

    /// `write(2)` of the managed page at `addr` to `file` (a pipe).
    pub fn write_from(file: &File, addr: VirtAddr) -> io::Result<usize> {
        // SAFETY: as `pwrite_from`.
        check(unsafe { libc::write(file.as_raw_fd(), addr.as_ptr::<c_void>(), PAGE_SIZE) })
    }

    /// `write(2)` of `words` to `file`, for a forked child (no allocation,
    /// no lock; a short or failed write is lost).
    pub fn write_words(file: &File, words: &[u64]) {
        // SAFETY: `words` is a live slice of that many bytes.
        let _ = unsafe {
            libc::write(
                file.as_raw_fd(),
                words.as_ptr().cast::<c_void>(),
                std::mem::size_of_val(words),
            )
        };
    }

    /// `MADV_DONTNEED` of managed pages the caller owns.
    pub fn dontneed(range: PageRange) -> Result<(), MemError> {
        // SAFETY: destructive, but no reference points into managed memory
        // and the caller owns these pages in the model.
        unsafe { uhmm::sys::mem::madvise(range, Advice::DontNeed) }
    }

    /// Manages `range` of a mapping this module made at a fixed place.
    pub fn manage(mm: &Mm, range: PageRange) -> Result<ManagedRegion, MmError> {
        // SAFETY: the range is our own mapping, reached through raw
        // pointers only, and it stays mapped (at one of its two places)
        // until the region is dropped at teardown.
        unsafe { mm.manage(range) }
    }

    /// Reserves `len` bytes at `at` with a `PROT_NONE` placeholder, never
    /// replacing a mapping (EEXIST if something is there).
    pub fn reserve(at: usize, len: usize) -> io::Result<()> {
        map(
            at,
            len,
            libc::PROT_NONE,
            libc::MAP_FIXED_NOREPLACE | libc::MAP_NORESERVE,
        )
    }

    /// Maps read-write memory over our own reservation at `at`.
    pub fn map_fixed_rw(at: usize, len: usize) -> io::Result<()> {
        map(at, len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_FIXED)
    }

    fn map(at: usize, len: usize, prot: i32, flags: i32) -> io::Result<()> {
        // SAFETY: MAP_FIXED_NOREPLACE replaces nothing; MAP_FIXED is used
        // only over this module's own reservation, which nothing refers
        // into.
        let p = unsafe {
            libc::mmap(
                at as *mut c_void,
                len,
                prot,
                flags | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            Err(io::Error::last_os_error())
        } else if p as usize != at {
            // An old kernel ignoring MAP_FIXED_NOREPLACE: not ours to keep.
            unmap(p as usize, len);
            Err(io::Error::from_raw_os_error(libc::EEXIST))
        } else {
            Ok(())
        }
    }

    /// Unmaps this module's own mapping.
    pub fn unmap(at: usize, len: usize) {
        // SAFETY: our own mapping (the mremap window), no references into it.
        unsafe { libc::munmap(at as *mut c_void, len) };
    }

    /// Moves the mremap region from `from` onto our placeholder at `to`.
    pub fn mremap_fixed(from: usize, len: usize, to: usize) -> io::Result<()> {
        // SAFETY: `from` is the mremap region (managed, reached through raw
        // pointers only, moved only by its owner, the caller); `to` is our
        // own placeholder, which MREMAP_FIXED replaces.
        let p = unsafe {
            libc::mremap(
                from as *mut c_void,
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                to as *mut c_void,
            )
        };
        if p == libc::MAP_FAILED {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// A new memfd.
    pub fn memfd(name: &str) -> io::Result<File> {
        let name = std::ffi::CString::new(name).map_err(io::Error::other)?;
        // SAFETY: `name` is a valid C string.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// A pipe: (read end, write end).
    pub fn pipe() -> io::Result<(File, File)> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: two fresh descriptors that nothing else owns.
        let ends = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((File::from(ends.0), File::from(ends.1)))
    }

    /// How a forked child ended.
    #[derive(Debug)]
    pub enum ChildEnd {
        Exited(i32),
        Signaled(i32),
        /// It did not exit in time and was killed.
        TimedOut,
        ForkFailed(io::Error),
    }

    /// Forks; the child runs `child` and leaves with its result, the
    /// parent waits up to `timeout` for it (then kills it).
    pub fn fork_with_timeout(timeout: Duration, child: impl FnOnce() -> i32) -> ChildEnd {
        // SAFETY: in the child only `child` runs — which allocates nothing
        // and takes no lock, as other threads of the parent may have held
        // any at the fork — then _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: async-signal-safe calls; the child must die of a fatal
            // signal, not report it as the parent would.
            unsafe {
                libc::signal(libc::SIGBUS, libc::SIG_DFL);
                libc::signal(libc::SIGSEGV, libc::SIG_DFL);
            }
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).unwrap_or(3);
            exit_now(code);
        }
        if pid < 0 {
            return ChildEnd::ForkFailed(io::Error::last_os_error());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let mut status = 0;
            // SAFETY: waits for our own child; `status` is a local.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if r == pid {
                return if libc::WIFEXITED(status) {
                    ChildEnd::Exited(libc::WEXITSTATUS(status))
                } else {
                    ChildEnd::Signaled(libc::WTERMSIG(status))
                };
            }
            if r < 0 {
                return ChildEnd::ForkFailed(io::Error::last_os_error());
            }
            if Instant::now() >= deadline {
                // SAFETY: our own child, which has not been reaped.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, &mut status, 0);
                }
                return ChildEnd::TimedOut;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// Leaves the process at once: no exit hooks, no destructors (the
    /// state may be wedged), after flushing what was printed.
    pub fn exit_now(code: i32) -> ! {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // SAFETY: _exit ends the process; nothing runs after it.
        unsafe { libc::_exit(code) }
    }

    /// Reports a SIGBUS (a page uhmm lost reads as one) or SIGSEGV (a
    /// managed page that vanished or lost its access) with the address and
    /// the thread, and fails the run.
    pub fn install_crash_handler() {
        // SAFETY: a zeroed sigaction is valid; the handler calls only
        // async-signal-safe functions (prctl, write, _exit).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_fatal_signal as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
            libc::sigaction(libc::SIGSEGV, &sa, std::ptr::null_mut());
        }
    }

    extern "C" fn on_fatal_signal(sig: i32, info: *mut libc::siginfo_t, _: *mut c_void) {
        let mut msg = Line::default();
        msg.push(b"\nuhmm stress: FAIL: ");
        msg.push(if sig == libc::SIGBUS {
            b"SIGBUS"
        } else {
            b"SIGSEGV"
        });
        msg.push(b" at 0x");
        // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
        msg.hex(unsafe { (*info).si_addr() } as usize);
        msg.push(b" in thread ");
        let mut name = [0u8; 16];
        // SAFETY: PR_GET_NAME writes at most 16 bytes into `name`.
        unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
        let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        msg.push(&name[..len]);
        msg.push(b" (SIGBUS: a page uhmm lost; SIGSEGV: a managed page unmapped or protected)\n");
        // SAFETY: writes of a local buffer, then _exit: async-signal-safe.
        unsafe {
            libc::write(2, msg.buf.as_ptr().cast(), msg.len);
            let verdict = b"verdict: FAIL (fatal signal)\n";
            libc::write(1, verdict.as_ptr().cast(), verdict.len());
            libc::_exit(1);
        }
    }

    /// A fixed buffer for the signal handler's message.
    struct Line {
        buf: [u8; 256],
        len: usize,
    }

    impl Default for Line {
        fn default() -> Self {
            Line {
                buf: [0; 256],
                len: 0,
            }
        }
    }

    impl Line {
        fn push(&mut self, s: &[u8]) {
            for &b in s {
                if self.len < self.buf.len() {
                    self.buf[self.len] = b;
                    self.len += 1;
                }
            }
        }

        fn hex(&mut self, v: usize) {
            let digits = b"0123456789abcdef";
            for i in (0..usize::BITS / 4).rev() {
                self.push(&[digits[(v >> (i * 4)) & 0xf]]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wrong read's records take in the places the page's data went
    /// through: a page migrated to a device and back shows its move on
    /// from its staging slot into device memory, a record that does not
    /// name the page itself. And they keep all of the page's own: a page
    /// 2 MiB further on, which shares its staging slot and may share its
    /// device page, going back and forth 60 times after it does not push
    /// them out (found by review: it did).
    #[test]
    fn the_records_of_a_page_follow_it_through_its_staging_slot() {
        use uhmm::record::What;
        let mm = Mm::new().expect("userfaultfd (uhmm stress needs it)");
        let region = mm
            .alloc((2 << 20) + PAGE_SIZE, Backing::AnonPrivate)
            .unwrap();
        let page = PageRange::new(region.range().start(), PAGE_SIZE).unwrap();
        let other = VirtAddr::new(page.start().get() + (2 << 20));
        region.write_at(0, &[0xA5; PAGE_SIZE]).unwrap();
        region.write_at(2 << 20, &[0x5A; PAGE_SIZE]).unwrap();
        let dev = SimDevice::new(&mm);
        uhmm::record::set_recording(true);
        let moved = dev.migrate_range_to_device(page.start(), 1);
        // While the page is on the device, and after it is back.
        let mut others = 0;
        for _ in 0..30 {
            others += dev.migrate_range_to_device(other, 1).unwrap_or(0);
            let _ = dev.migrate_to_system(other, 1);
        }
        let back = dev.migrate_to_system(page.start(), 1);
        for _ in 0..30 {
            others += dev.migrate_range_to_device(other, 1).unwrap_or(0);
            let _ = dev.migrate_to_system(other, 1);
        }
        uhmm::record::set_recording(false);
        assert_eq!(moved.unwrap(), 1);
        assert_eq!(back.unwrap().cpages, 1);
        assert_eq!(others, 60);
        let own = uhmm::record::records_for(page);
        let seen = related_records(page, RECORDS_SHOWN);
        let text: Vec<String> = seen.iter().map(ToString::to_string).collect();
        assert!(seen.windows(2).all(|w| w[0].seq < w[1].seq));
        assert!(
            own.iter().all(|r| seen.contains(r)),
            "not every record of the page itself is kept:\n{}",
            text.join("\n")
        );
        // The page's data moving on from its staging slot into device
        // memory (named by neither end of the page's own records), and
        // coming back from there.
        let out = own
            .iter()
            .find(|r| r.what == What::Move && r.src == page.start().get())
            .expect("the page's move out");
        let home = own
            .iter()
            .find(|r| r.what == What::Move && r.dst == page.start().get())
            .expect("the page's move home");
        assert!(
            seen.iter().any(|r| r.what == What::Move
                && r.src == out.dst
                && r.dst == home.src
                && r.seq > out.seq
                && r.seq < home.seq),
            "no move from the staging slot {:#x} into device memory {:#x}:\n{}",
            out.dst,
            home.src,
            text.join("\n")
        );
        // Nothing of the other page's trips while the page was on the
        // device except what touched its places while they held its data.
        assert!(
            seen.iter().filter(|r| !r.touches(page)).count() < 20,
            "the other page's trips flood the records:\n{}",
            text.join("\n")
        );
        assert!(
            seen.iter().all(|r| r.seq <= own.last().unwrap().seq),
            "records of the other page's later trips:\n{}",
            text.join("\n")
        );
        assert_eq!(related_records(page, 3).len(), 3);
        // This thread made the moves, and lives.
        let names = thread_names(seen.iter().map(|r| r.thread));
        assert!(names.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(names.iter().any(|(_, n)| n != "?"), "{names:?}");
    }

    #[test]
    fn a_history_step_reads_back_as_it_was_noted() {
        let cell = PageCell::default();
        assert!(cell.history().is_empty());
        let what = Step::TO_SYSTEM | Step::COPY_FAILS;
        cell.note(Step::new(Kind::Faults, what, 1_500_000));
        cell.note(Step::new(
            Kind::Faults,
            what | Step::END | Step::ERR,
            1_502_000,
        ));
        let steps: Vec<String> = cell.history().iter().map(|s| s.to_string()).collect();
        assert_eq!(
            steps,
            [
                "1.500000 s faults to system, a copy fails: begins",
                "1.502000 s faults to system, a copy fails: ends with an error",
            ]
        );
        // The ring keeps the last HISTORY steps, oldest first.
        for k in 0..HISTORY as u64 + 3 {
            cell.note(Step::new(Kind::Mirror, Step::END, k));
        }
        let h = cell.history();
        assert_eq!(h.len(), HISTORY);
        assert_eq!(h[0].0 >> 16, 3);
        assert_eq!(h[HISTORY - 1].0 >> 16, HISTORY as u64 + 2);
        assert_eq!(h[0].to_string(), "0.000003 s mirror: ends");
    }
}
