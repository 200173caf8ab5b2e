//! The fault-back cases: a CPU touch of a device-resident page against a
//! bare userfaultfd server, in latency, in the serving thread's CPU time
//! and in system calls per fault; the stalls of a long random run; and the
//! sequential read of device-resident memory by a device that copies.

use super::measure::{Summary, Unit, rate, time};
use super::{Progress, Results, Row, Target, cpu};
use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use uhmm::mm::Mm;
use uhmm::sys::mem::{Advice, Backing, Mapping};
use uhmm::sys::uffd::{CopyMode, Event, Features, RegisterMode, Uffd};
use uhmm::{PAGE_SIZE, PageRange, VirtAddr};
use uhmm_sim::SimDevice;

type CaseResult = Result<(), Box<dyn Error>>;

/// The byte every page the bare server serves holds.
const BARE_BYTE: u8 = 7;

/// How a bare server answers a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// `UFFDIO_COPY` of a page from one hot buffer (waking).
    Copy,
    /// `UFFDIO_MOVE` of the page at the same offset of a populated source
    /// mapping, then `UFFDIO_WAKE`: the kernel calls a zero-copy fault
    /// back makes, and nothing of uhmm's.
    Move,
}

/// A bare userfaultfd server: one thread answering MISSING faults on a
/// mapping of its own with `UFFDIO_COPY` of a page (or a move: [`Answer`])
/// — the kernel interface uhmm's fault back builds on, with nothing else
/// (the baseline).
pub struct BareServer {
    pub map: Mapping,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
    /// The serving thread's id.
    pub tid: i32,
}

impl BareServer {
    pub fn start(len: usize) -> Result<BareServer, Box<dyn Error>> {
        Self::answering(len, Answer::Copy, PAGE_SIZE)
    }

    /// A server that answers as `answer` says, `block` bytes per fault
    /// (the aligned block around it; a power of two, for copies).
    pub fn answering(
        len: usize,
        answer: Answer,
        block: usize,
    ) -> Result<BareServer, Box<dyn Error>> {
        let map = Mapping::anon(len)?;
        let features = match answer {
            Answer::Copy => Features::empty(),
            Answer::Move => Features::MOVE,
        };
        let uffd = Uffd::builder().features(features).open()?;
        uffd.register(&map, map.range(), RegisterMode::MISSING)?;
        // The pages to move in: populated, and registered (MOVE takes
        // pages only between ranges of one userfaultfd).
        let source = match answer {
            Answer::Copy => None,
            Answer::Move => {
                let s = Mapping::anon(len)?;
                s.advise(s.range(), Advice::NoHugePage)?;
                cpu::mark_pages(s.range(), BARE_BYTE);
                uffd.register(&s, s.range(), RegisterMode::WP)?;
                Some(s)
            }
        };
        let base = map.range().start();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("bare-uffd-server".into())
            .spawn(move || {
                let _ = tx.send(cpu::gettid());
                let src = vec![BARE_BYTE; block];
                let mut events = Vec::with_capacity(64);
                while !st.load(Ordering::Relaxed) {
                    if !uffd.wait(Some(Duration::from_millis(20))).unwrap_or(false) {
                        continue;
                    }
                    if uffd.read_events(&mut events).is_err() {
                        continue;
                    }
                    for e in events.drain(..) {
                        let Event::PageFault(f) = e else { continue };
                        let Some(page) = f.page() else { continue };
                        match &source {
                            None => {
                                let start = page.start().align_down(block).max(base);
                                let end = (start.get() + block).min(base.get() + len);
                                let from = VirtAddr::from_ptr(src.as_ptr());
                                let whole = PageRange::from_bounds(start, VirtAddr::new(end))
                                    .ok()
                                    .and_then(|r| uffd.copy(r, from, CopyMode::empty()).ok());
                                if !whole.is_some_and(|p| p.is_complete()) {
                                    // Part of the block was there already:
                                    // the faulting page alone, and a wake.
                                    let _ = uffd.copy(page, from, CopyMode::empty());
                                    let _ = uffd.wake(page);
                                }
                            }
                            Some(s) => {
                                let at =
                                    s.range().start().get() + (page.start().get() - base.get());
                                let _ = cpu::move_page(&uffd, page, VirtAddr::new(at));
                                let _ = uffd.wake(page);
                            }
                        }
                    }
                }
            })?;
        let tid = rx.recv().map_err(|_| "the bare server did not start")?;
        Ok(BareServer {
            map,
            stop,
            handle: Some(handle),
            tid,
        })
    }

    pub fn finish(mut self) -> Result<(), Box<dyn Error>> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take().map(|h| h.join()) {
            Some(Err(_)) => Err("the bare userfaultfd server thread panicked".into()),
            _ => Ok(()),
        }
    }
}

impl Drop for BareServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// What a thread spent over a stretch: CPU time (`None` where a reading
/// failed: reported as not measured, never as zero).
struct Meter {
    clock: cpu::ThreadClock,
    start: Option<u64>,
}

impl Meter {
    fn open(tid: i32) -> Result<Meter, Box<dyn Error>> {
        let clock = cpu::ThreadClock::open(tid)?;
        let mut m = Meter { clock, start: None };
        m.restart();
        Ok(m)
    }

    fn restart(&mut self) {
        self.start = self.clock.read().map(|c| c.0);
    }

    /// CPU ns per `n` faults since the start; NaN (shown as not measured)
    /// if it could not be read.
    fn per(&self, n: usize) -> f64 {
        per(self.start, self.clock.read().map(|c| c.0), n)
    }
}

/// `(end - start) / n`, or NaN where a reading is missing.
fn per(start: Option<u64>, end: Option<u64>, n: usize) -> f64 {
    match (start, end) {
        (Some(s), Some(e)) if e >= s => (e - s) as f64 / n as f64,
        _ => f64::NAN,
    }
}

/// The system calls a thread makes over a stretch. Counting attaches a
/// tracepoint to the thread, which makes each of its system calls cost
/// more: it is open only for a pass of its own, never while latency or
/// CPU time is measured (where it would charge a design with more system
/// calls for the tracing).
struct Calls {
    counter: cpu::SyscallCounter,
    start: Option<u64>,
}

impl Calls {
    fn open(tid: i32) -> Result<Calls, String> {
        let counter = cpu::SyscallCounter::open(tid)?;
        let start = counter.read();
        Ok(Calls { counter, start })
    }

    fn per(&self, n: usize) -> f64 {
        per(self.start, self.counter.read(), n)
    }
}

/// The fault service thread of an `Mm` made by the caller just now.
/// (The thread names itself once it runs: look again for a while.)
fn service_tid(before: &[i32]) -> Result<i32, Box<dyn Error>> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if let Some(t) = cpu::threads_named("uhmm-fault")
            .into_iter()
            .find(|t| !before.contains(t))
        {
            return Ok(t);
        }
        if Instant::now() > deadline {
            return Err("cannot find the fault service thread".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// How a device's pages come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Moved with no copy (device memory is host RAM).
    ZeroCopy,
    /// Copied by the device's engine into staging, then moved into place.
    Engine,
    /// Copied once by the kernel from device memory the CPU can read
    /// (`MigrateVma::copy_from_device`).
    Mapped,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::ZeroCopy, Kind::Engine, Kind::Mapped];

    fn name(self) -> &'static str {
        match self {
            Kind::ZeroCopy => "zero-copy",
            Kind::Engine => "copying (engine)",
            Kind::Mapped => "copying (CPU-visible memory)",
        }
    }

    fn target(self) -> f64 {
        match self {
            Kind::ZeroCopy => 1.0,
            Kind::Engine | Kind::Mapped => 1.2,
        }
    }
}

/// An `Mm` with a 4 KiB fault block, a device whose pages come back as
/// `kind` says (copies through a one-thread CPU engine), and `n` pages
/// holding 1 in their first byte, all on the device.
struct Subject {
    mm: Mm,
    region: uhmm::mm::ManagedRegion,
    dev: SimDevice,
    /// Its fault service thread.
    tid: i32,
    meter: Meter,
}

fn subject(n: usize, kind: Kind) -> Result<Subject, Box<dyn Error>> {
    let before = cpu::threads_named("uhmm-fault");
    let mm = Mm::new()?;
    let tid = service_tid(&before)?;
    mm.set_fault_block(PAGE_SIZE)?;
    let region = mm.alloc(n * PAGE_SIZE, Backing::AnonPrivate)?;
    cpu::touch_pages(region.range());
    let dev = SimDevice::new(&mm);
    if kind != Kind::ZeroCopy {
        dev.set_copy_engine(Arc::new(uhmm::devmem::copy::CpuCopyEngine::with_threads(1)));
        dev.set_cpu_visible_memory(kind == Kind::Mapped);
    }
    dev.migrate_range_to_device(region.range().start(), n)?;
    let meter = Meter::open(tid)?;
    Ok(Subject {
        mm,
        region,
        dev,
        tid,
        meter,
    })
}

/// A random permutation of `0..n` (xorshift; the same every run) in
/// which no page comes right after the page before it: a touch of page
/// `i + 1` after page `i` is a sequential scan, which reads ahead (later
/// touches of those pages would be no faults at all).
fn shuffled(n: usize) -> Vec<usize> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, (next() % (i as u64 + 1)) as usize);
    }
    // About one such step in a random permutation: move each to a place
    // where it makes none (a random one, looked for a few times; n > 3).
    let sequential = |o: &[usize], k: usize| k + 1 < o.len() && o[k + 1] == o[k] + 1;
    for k in 0..n.saturating_sub(1) {
        let mut tries = 0;
        while sequential(&order, k) && n > 3 && tries < 64 {
            let j = (next() % n as u64) as usize;
            order.swap(k + 1, j);
            let around =
                |o: &[usize], p: usize| (p > 0 && sequential(o, p - 1)) || sequential(o, p);
            if around(&order, k + 1) || around(&order, j) {
                order.swap(k + 1, j);
            }
            tries += 1;
        }
    }
    order
}

fn page(range: PageRange, i: usize) -> Result<VirtAddr, Box<dyn Error>> {
    Ok(range.page(i).ok_or("page out of range")?.start())
}

/// Per placement, in random page order, in turns of [`TURN`] pages: touches
/// served by uhmm for each [`Kind`] of device, and by the bare servers.
/// Latency, serving-thread CPU and system calls per fault.
pub fn fault_back(s: &super::cases::Sizes, p: &mut Progress, out: &mut Results) -> CaseResult {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut placements = vec![("same vCPU", 0, 0)];
    if cpus > 1 {
        placements.push(("across vCPUs", 1, 0));
    }
    let n = s.latency_samples;
    for (placement, server_cpu, toucher_cpu) in placements {
        p.note(placement);
        // Servers are made by a thread pinned to `server_cpu` (and inherit
        // it); the touching thread runs on `toucher_cpu`.
        let m = std::thread::scope(|sc| {
            sc.spawn(|| measure_fault_back(n, server_cpu, toucher_cpu).map_err(|e| e.to_string()))
                .join()
                .map_err(|_| "the benchmark thread panicked".to_string())?
        })?;
        if let Some(why) = &m.no_syscalls {
            p.note(&format!("system calls not counted: {why}"));
        }
        if placement == "same vCPU" {
            out.charts.push(super::Chart::Histogram {
                file: "fault_back_latency.svg",
                title: "CPU touch of a device-resident page, zero-copy, same vCPU (ns)".into(),
                samples_ns: m.kinds[0].0.clone(),
            });
        }
        let [copying, moving] = m.bare;
        let (bare, moving) = (Summary::of(copying), Summary::of(moving));
        let [bare_use, moving_use] = m.bare_use;
        for (kind, (lat, (cpu_ns, calls))) in Kind::ALL.into_iter().zip(m.kinds) {
            let zero_copy = kind == Kind::ZeroCopy;
            let (target, kind) = (kind.target(), kind.name());
            let touch = Summary::of(lat);
            out.rows.push(Row {
                case: format!(
                    "CPU touch of a device-resident 4 KiB page, random, {kind}, {placement}"
                ),
                unit: Unit::NsPerPage,
                subject: touch,
                baseline_name: "bare MISSING + UFFDIO_COPY",
                baseline: Some(bare),
                target: Target::AtMost(target),
            });
            if zero_copy {
                // The same against the kernel calls it is made of: what
                // uhmm itself adds.
                out.rows.push(Row {
                    case: format!(
                        "CPU touch of a device-resident 4 KiB page, random, {kind}, {placement}, against its kernel calls"
                    ),
                    unit: Unit::NsPerPage,
                    subject: touch,
                    baseline_name: "bare MISSING + MOVE, WAKE",
                    baseline: Some(moving),
                    target: Target::None,
                });
            }
            out.rows.push(Row {
                case: format!("fault-service CPU per 4 KiB fault, {kind}, {placement}"),
                unit: Unit::NsPerPage,
                subject: Summary::single(cpu_ns),
                baseline_name: "bare server's CPU per fault",
                baseline: Some(Summary::single(bare_use.0)),
                target: Target::AtMost(1.2),
            });
            if zero_copy {
                out.rows.push(Row {
                    case: format!(
                        "fault-service CPU per 4 KiB fault, {kind}, {placement}, against its kernel calls"
                    ),
                    unit: Unit::NsPerPage,
                    subject: Summary::single(cpu_ns),
                    baseline_name: "bare MOVE, WAKE server's CPU",
                    baseline: Some(Summary::single(moving_use.0)),
                    target: Target::None,
                });
            }
            out.rows.push(Row {
                case: format!("system calls per 4 KiB fault (serving thread), {kind}, {placement}"),
                unit: Unit::PerFault,
                subject: Summary::single(calls),
                baseline_name: "bare server's per fault",
                baseline: Some(Summary::single(bare_use.1)),
                target: Target::None,
            });
        }
    }
    Ok(())
}

struct FaultBack {
    /// Per kind (in `Kind::ALL` order): latencies in ns, and (CPU ns,
    /// system calls) per fault of its serving thread.
    kinds: Vec<(Vec<f64>, (f64, f64))>,
    /// The bare copying server's latencies, and the bare moving one's.
    bare: [Vec<f64>; 2],
    /// (CPU ns, system calls) per fault of each bare server.
    bare_use: [(f64, f64); 2],
    no_syscalls: Option<String>,
}

fn measure_fault_back(
    n: usize,
    server_cpu: usize,
    toucher_cpu: usize,
) -> Result<FaultBack, Box<dyn Error>> {
    if !cpu::pin_to(server_cpu) {
        return Err(format!("cannot pin a thread to vCPU {server_cpu}").into());
    }
    // Pages for the pass that counts system calls, then a warm-up page and
    // `n` for latency and CPU time.
    let counted = (n / 4).clamp(1, 1000);
    let total = counted + 1 + n;
    let mut subjects = Vec::new();
    for kind in Kind::ALL {
        subjects.push(subject(total, kind)?);
    }
    let bare = BareServer::start(total * PAGE_SIZE)?;
    let moving = BareServer::answering(total * PAGE_SIZE, Answer::Move, PAGE_SIZE)?;
    let bares = [&bare, &moving];
    let mut bare_meters = [Meter::open(bare.tid)?, Meter::open(moving.tid)?];
    if !cpu::pin_to(toucher_cpu) {
        return Err(format!("cannot pin a thread to vCPU {toucher_cpu}").into());
    }
    let order = shuffled(total);
    // System calls, in a pass of their own (see `Calls`).
    let mut why = None;
    let mut calls: Vec<Option<Calls>> = Vec::new();
    for tid in bares
        .iter()
        .map(|b| b.tid)
        .chain(subjects.iter().map(|s| s.tid))
    {
        match Calls::open(tid) {
            Ok(c) => calls.push(Some(c)),
            Err(e) => {
                why = Some(e);
                calls.push(None);
            }
        }
    }
    let (mut bare_lat, mut lat): (Vec<Vec<f64>>, Vec<Vec<f64>>) = (
        vec![Vec::with_capacity(n); bares.len()],
        vec![Vec::with_capacity(n); subjects.len()],
    );
    touch_turns(
        &bares,
        &subjects,
        &order[..counted],
        &mut bare_lat,
        &mut lat,
    )?;
    // (The last fault's serving thread may still be finishing it.)
    std::thread::sleep(Duration::from_millis(5));
    let per_fault: Vec<f64> = calls
        .iter()
        .map(|c| c.as_ref().map_or(f64::NAN, |c| c.per(counted)))
        .collect();
    drop(calls);
    // Latency and CPU time: the first page is the warm-up.
    touch_turns(
        &bares,
        &subjects,
        &order[counted..=counted],
        &mut bare_lat,
        &mut lat,
    )?;
    bare_lat
        .iter_mut()
        .chain(lat.iter_mut())
        .for_each(Vec::clear);
    for m in &mut bare_meters {
        m.restart();
    }
    for sub in &mut subjects {
        sub.meter.restart();
    }
    touch_turns(
        &bares,
        &subjects,
        &order[counted + 1..],
        &mut bare_lat,
        &mut lat,
    )?;
    std::thread::sleep(Duration::from_millis(5));
    for sub in &subjects {
        if sub.dev.device_pages() != 0 || sub.mm.stats().faults_device < total as u64 {
            return Err("a touched page did not come back through a fault".into());
        }
    }
    let m = FaultBack {
        kinds: lat
            .into_iter()
            .zip(&subjects)
            .zip(&per_fault[2..])
            .map(|((l, sub), &calls)| (l, (sub.meter.per(n), calls)))
            .collect(),
        bare: bare_lat
            .try_into()
            .map_err(|_| "a latency list per bare server")?,
        bare_use: [
            (bare_meters[0].per(n), per_fault[0]),
            (bare_meters[1].per(n), per_fault[1]),
        ],
        no_syscalls: why,
    };
    bare.finish()?;
    moving.finish()?;
    Ok(m)
}

/// How many faults a server takes in a row before the next one's turn.
/// Page by page, each fault would run after four other servers' and find
/// the caches and TLB filled with their data: every path, the bare ones
/// included, took about twice its time in a loop of its own (`uhmm bench`,
/// 2026-12-03), and the path with more data (uhmm's) more so. A turn of 32
/// faults (under a millisecond) lets each path run warm, as a program's
/// faults do, and still alternates often enough that a change in the
/// host's speed reaches every path alike.
const TURN: usize = 32;

/// Touches of `pages` in turns of [`TURN`]: each bare server takes a turn
/// with the same pages of its own, then each subject. Each touch's ns is
/// added to its server's list (bare servers', then subjects').
fn touch_turns(
    bares: &[&BareServer],
    subjects: &[Subject],
    pages: &[usize],
    bare_ns: &mut [Vec<f64>],
    took_ns: &mut [Vec<f64>],
) -> CaseResult {
    for turn in pages.chunks(TURN) {
        for (bare, ns) in bares.iter().zip(bare_ns.iter_mut()) {
            for &i in turn {
                let a = page(bare.map.range(), i)?;
                let (t, v) = time(|| cpu::read_byte(a));
                if v != BARE_BYTE {
                    return Err("a page a bare server served read the wrong byte".into());
                }
                ns.push(t.as_nanos() as f64);
            }
        }
        for (sub, ns) in subjects.iter().zip(took_ns.iter_mut()) {
            for &i in turn {
                let b = page(sub.region.range(), i)?;
                let (t, w) = time(|| cpu::read_byte(b));
                if w != 1 {
                    return Err("a faulted page read the wrong byte".into());
                }
                ns.push(t.as_nanos() as f64);
            }
        }
    }
    Ok(())
}

/// A random 4 KiB fault back over the whole large region, every fault
/// timed; each one over 1 ms is listed with what the two threads did
/// meanwhile (the fault service on a CPU: uhmm's own work; either waiting
/// for a CPU: the scheduler or the host).
pub fn stalls(s: &super::cases::Sizes, p: &mut Progress, out: &mut Results) -> CaseResult {
    let n = s.big / PAGE_SIZE;
    p.note(&format!("{n} random 4 KiB faults"));
    let sub = subject(n, Kind::ZeroCopy)?;
    let me = cpu::ThreadClock::open(cpu::gettid())?;
    let order = shuffled(n);
    let mut stalls = Vec::new();
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    let unread = || "cannot read a thread's schedstat".to_string();
    let mut before = (
        sub.meter.clock.read().ok_or_else(unread)?,
        me.read().ok_or_else(unread)?,
    );
    for (k, &i) in order.iter().enumerate() {
        let a = page(sub.region.range(), i)?;
        let (t, v) = time(|| cpu::read_byte(a));
        if v != 1 {
            return Err("a faulted page read the wrong byte".into());
        }
        let after = (
            sub.meter.clock.read().ok_or_else(unread)?,
            me.read().ok_or_else(unread)?,
        );
        if t > Duration::from_millis(1) {
            stalls.push(Stall {
                at: start.elapsed().saturating_sub(t),
                fault: k,
                took: t,
                service_cpu: after.0.0.saturating_sub(before.0.0),
                service_wait: after.0.1.saturating_sub(before.0.1),
                toucher_wait: after.1.1.saturating_sub(before.1.1),
            });
        }
        lat.push(t.as_nanos() as f64);
        before = after;
        if k % (1 << 16) == 0 && k > 0 {
            p.note(&format!("{k} faults"));
        }
    }
    let by_uhmm = stalls
        .iter()
        .filter(|s| s.cause() == Cause::Service)
        .count();
    out.notes.push(format!(
        "Stalls over 1 ms in {n} random 4 KiB faults (zero-copy, fault block 4 KiB): {} ({by_uhmm} with the fault service on a CPU for most of it)",
        stalls.len()
    ));
    for st in &stalls {
        out.notes.push(format!("  {st}"));
    }
    out.rows.push(Row {
        case: format!(
            "random 4 KiB fault back over {}, zero-copy",
            super::cases::mib(s.big)
        ),
        unit: Unit::NsPerPage,
        subject: Summary::of(lat),
        baseline_name: "-",
        baseline: None,
        target: Target::None,
    });
    out.rows.push(Row {
        case: "stalls over 1 ms in it with the fault service busy".into(),
        unit: Unit::PerFault,
        subject: Summary::single(by_uhmm as f64),
        baseline_name: "-",
        baseline: None,
        target: Target::None,
    });
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum Cause {
    Service,
    RunQueue,
    Unexplained,
}

struct Stall {
    at: Duration,
    fault: usize,
    took: Duration,
    service_cpu: u64,
    service_wait: u64,
    toucher_wait: u64,
}

impl Stall {
    fn cause(&self) -> Cause {
        let half = self.took.as_nanos() as u64 / 2;
        if self.service_cpu >= half {
            Cause::Service
        } else if self.service_wait + self.toucher_wait >= half {
            Cause::RunQueue
        } else {
            Cause::Unexplained
        }
    }
}

impl std::fmt::Display for Stall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |ns: u64| ns as f64 / 1e6;
        let cause = match self.cause() {
            Cause::Service => "the fault service was on a CPU (uhmm's own work)",
            Cause::RunQueue => "a thread waited for a CPU (scheduler or host)",
            Cause::Unexplained => "neither thread ran nor waited for a CPU (host preemption?)",
        };
        write!(
            f,
            "fault {} at {:.3} s: {:.2} ms; service on CPU {:.2} ms, service waiting for a CPU {:.2} ms, toucher waiting for a CPU {:.2} ms: {cause}",
            self.fault,
            self.at.as_secs_f64(),
            self.took.as_secs_f64() * 1e3,
            ms(self.service_cpu),
            ms(self.service_wait),
            ms(self.toucher_wait),
        )
    }
}

/// Sequential CPU reads of device-resident memory through a device that
/// copies (its own memory): 4 KiB blocks against the bare server reading
/// the same size sequentially, and the default block against memcpy.
pub fn seq_read_copying(
    s: &super::cases::Sizes,
    p: &mut Progress,
    out: &mut Results,
) -> CaseResult {
    let len = s.big;
    let npages = len / PAGE_SIZE;
    let reps = s.reps.min(3);
    let mm = Mm::new()?;
    let region = mm.alloc_mapping(Mapping::builder(len).align(2 << 20))?;
    cpu::touch_pages(region.range());
    // The same read where the region is backed by THPs: a fault block of a
    // whole 2 MiB block then comes home as one (a THP moved into place).
    // Where 4 KiB pages were, the kernel keeps the emptied page table, and
    // the block comes home as 512 pages.
    let huge = mm.alloc_mapping(Mapping::builder(len).align(2 << 20))?;
    huge.mapping()
        .ok_or("no mapping")?
        .advise(huge.range(), Advice::HugePage)?;
    cpu::touch_pages(huge.range());
    let dev = SimDevice::new(&mm);
    dev.set_copy_engine(Arc::new(uhmm::devmem::copy::CpuCopyEngine::new()));
    let default_fault_block = mm.fault_block();
    let mut bare_rates = Vec::new();
    let mut bare_block_rates = Vec::new();
    let mut small = Vec::new();
    let mut memcpy_rates = Vec::new();
    let mut default_block = Vec::new();
    let mut thp_block = Vec::new();
    let src = vec![3u8; len];
    let mut dst = vec![1u8; len];
    // One warm-up round, then `reps` measured, each case after its
    // baseline.
    for round in 0..=reps {
        p.note(&format!("round {round} of {reps}"));
        let bare = BareServer::start(len)?;
        let (t_bare, sum) = time(|| cpu::sum(bare.map.range()));
        std::hint::black_box(sum);
        bare.finish()?;
        let bare = BareServer::answering(len, Answer::Copy, default_fault_block)?;
        let (t_bare_block, sum) = time(|| cpu::sum(bare.map.range()));
        std::hint::black_box(sum);
        bare.finish()?;
        mm.set_fault_block(PAGE_SIZE)?;
        dev.migrate_range_to_device(region.range().start(), npages)?;
        let (t_small, sum) = time(|| cpu::sum(region.range()));
        std::hint::black_box(sum);
        let (t_raw, ()) = time(|| super::cases::memcpy(&mut dst, &src));
        mm.set_fault_block(default_fault_block)?;
        dev.migrate_range_to_device(region.range().start(), npages)?;
        let (t_default, sum) = time(|| cpu::sum(region.range()));
        std::hint::black_box(sum);
        dev.migrate_range_to_device(huge.range().start(), npages)?;
        let (t_thp, sum) = time(|| cpu::sum(huge.range()));
        std::hint::black_box(sum);
        if dev.device_pages() != 0 {
            return Err("pages stayed on the device after a full CPU read".into());
        }
        if round > 0 {
            bare_rates.push(rate(Unit::GBps, t_bare, len));
            bare_block_rates.push(rate(Unit::GBps, t_bare_block, len));
            small.push(rate(Unit::GBps, t_small, len));
            memcpy_rates.push(rate(Unit::GBps, t_raw, len));
            default_block.push(rate(Unit::GBps, t_default, len));
            thp_block.push(rate(Unit::GBps, t_thp, len));
        }
    }
    let size = super::cases::mib(len);
    out.rows.push(Row {
        case: format!(
            "sequential CPU read of device-resident memory ({size}, 4 KiB fault block), copying"
        ),
        unit: Unit::GBps,
        subject: Summary::of(small),
        baseline_name: "bare server, 4 KiB, sequential",
        baseline: Some(Summary::of(bare_rates)),
        target: Target::AtLeast(1.5),
    });
    out.rows.push(Row {
        case: format!(
            "sequential CPU read of device-resident memory ({size}, fault block {} KiB), copying",
            default_fault_block >> 10
        ),
        unit: Unit::GBps,
        subject: Summary::of(default_block.clone()),
        baseline_name: "memcpy",
        baseline: Some(Summary::of(memcpy_rates.clone())),
        target: Target::AtLeast(0.3),
    });
    // The same read against the fastest kernel call that can bring a
    // block of 4 KiB pages home: one `UFFDIO_COPY` of the block from a hot
    // buffer per fault (no device, no engine copy).
    out.rows.push(Row {
        case: format!(
            "sequential CPU read of device-resident memory ({size}, fault block {} KiB), copying, against its kernel ceiling",
            default_fault_block >> 10
        ),
        unit: Unit::GBps,
        subject: Summary::of(default_block),
        baseline_name: "bare server, one COPY per block",
        baseline: Some(Summary::of(bare_block_rates)),
        target: Target::None,
    });
    out.rows.push(Row {
        case: format!(
            "sequential CPU read of device-resident memory ({size} THP, fault block {} KiB), copying",
            default_fault_block >> 10
        ),
        unit: Unit::GBps,
        subject: Summary::of(thp_block),
        baseline_name: "memcpy",
        baseline: Some(Summary::of(memcpy_rates)),
        target: Target::AtLeast(0.3),
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::shuffled;

    #[test]
    fn the_touch_order_is_a_permutation_with_no_sequential_step() {
        for n in [4, 5, 17, 301, 3001, 1 << 16] {
            let order = shuffled(n);
            let mut seen = vec![false; n];
            for &i in &order {
                assert!(!std::mem::replace(&mut seen[i], true), "{i} twice");
            }
            assert!(seen.iter().all(|&s| s), "not every page, n = {n}");
            assert!(
                order.windows(2).all(|w| w[1] != w[0] + 1),
                "a sequential step, n = {n}"
            );
        }
    }
}
