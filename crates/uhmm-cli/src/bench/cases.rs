//! The benchmark cases. Each pairs a uhmm operation with the raw kernel
//! primitive or plain-memory operation it builds on, measured alternately
//! in the same run after a warm-up pass.

use super::measure::{Summary, Unit, rate, time};
use super::svg::Series;
use super::{Chart, Progress, Results, Row, Target, cpu};
use std::error::Error;
use std::sync::Arc;
use uhmm::mm::Mm;
use uhmm::mm::notifier::{NotifierOps, NotifierRange, Subscription};
use uhmm::mm::range::HmmRange;
use uhmm::sys::mem::{self, Backing, Mapping, Prot};
use uhmm::sys::pagemap::{Categories, Pagemap, ScanQuery};
use uhmm::{PAGE_SIZE, PageRange};
use uhmm_sim::SimDevice;

type CaseResult = Result<(), Box<dyn Error>>;

/// Sizes and repetitions of a run.
#[derive(Debug)]
pub struct Sizes {
    /// The large region (1 GiB in a full run).
    big: usize,
    /// Memory touched per first-touch repetition.
    touch: usize,
    /// Measured repetitions (after one warm-up).
    reps: usize,
    /// Sizes of the bandwidth curve.
    curve: Vec<usize>,
    /// Samples of the single-page latency case.
    latency_samples: usize,
    /// Sizes of the migration table.
    migrate: Vec<usize>,
}

impl Sizes {
    pub fn full() -> Sizes {
        Sizes {
            big: 1 << 30,
            touch: 256 << 20,
            reps: 7,
            curve: (0..=11).map(|i| (512 << 10) << i).collect(),
            latency_samples: 3000,
            migrate: vec![
                512 << 10,
                1 << 20,
                2 << 20,
                4 << 20,
                8 << 20,
                16 << 20,
                256 << 20,
                1 << 30,
            ],
        }
    }

    pub fn quick() -> Sizes {
        Sizes {
            big: 64 << 20,
            touch: 32 << 20,
            reps: 3,
            curve: (0..=6).map(|i| (512 << 10) << i).collect(),
            latency_samples: 300,
            migrate: vec![512 << 10, 2 << 20, 8 << 20],
        }
    }
}

/// A case: its name (for `--only`), what progress shows, and the code.
#[derive(Debug)]
pub struct Case {
    pub name: &'static str,
    pub title: &'static str,
    pub run: fn(&Sizes, &mut Progress, &mut Results) -> CaseResult,
}

pub const ALL: &[Case] = &[
    Case {
        name: "touch",
        title: "first touch and steady access: managed vs plain memory",
        run: touch,
    },
    Case {
        name: "snapshot",
        title: "range_fault snapshot vs PAGEMAP_SCAN",
        run: snapshot,
    },
    Case {
        name: "sim-read",
        title: "SimDevice read vs process_vm_readv (faulting and warm rounds)",
        run: sim_read,
    },
    Case {
        name: "sim-curve",
        title: "SimDevice read bandwidth by size",
        run: sim_curve,
    },
    Case {
        name: "fault-round",
        title: "SimDevice one-page fault round latency",
        run: fault_round,
    },
    Case {
        name: "copy",
        title: "CPU copy engine vs memcpy",
        run: copy_engine,
    },
    Case {
        name: "fault-back",
        title: "CPU touch of a device-resident page vs a bare MISSING + COPY round trip",
        run: fault_back,
    },
    Case {
        name: "seq-read",
        title: "sequential CPU read of device-resident memory vs memcpy",
        run: seq_read,
    },
    Case {
        name: "migrate",
        title: "migration to the device and back by size, with and without THP, vs memcpy",
        run: migrate_sizes,
    },
    Case {
        name: "metadata",
        title: "metadata per managed page",
        run: metadata,
    },
];

fn mib(bytes: usize) -> String {
    if bytes >= 1 << 30 {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

/// A notifier for benchmarks that only keeps the sequence.
#[derive(Debug)]
struct Quiet;

impl NotifierOps for Quiet {
    fn invalidate(&self, sub: &Subscription, _: &NotifierRange, cur_seq: u64) -> bool {
        sub.set_seq(cur_seq);
        true
    }
}

/// Runs `reps + 1` rounds of `each(round)`; the first is the warm-up and is
/// dropped from every column it returns.
fn rounds<const K: usize>(
    reps: usize,
    mut each: impl FnMut(usize) -> Result<[f64; K], Box<dyn Error>>,
) -> Result<[Vec<f64>; K], Box<dyn Error>> {
    let mut cols: [Vec<f64>; K] = std::array::from_fn(|_| Vec::with_capacity(reps));
    for round in 0..=reps {
        let v = each(round)?;
        if round > 0 {
            for (c, x) in cols.iter_mut().zip(v) {
                c.push(x);
            }
        }
    }
    Ok(cols)
}

fn touch(s: &Sizes, p: &mut Progress, out: &mut Results) -> CaseResult {
    let mm = Mm::new()?;
    let len = s.touch;
    let [plain, managed] = rounds(s.reps, |_| {
        let map = Mapping::anon(len)?;
        let (t_plain, ()) = time(|| cpu::touch_pages(map.range()));
        drop(map);
        let region = mm.alloc(len, Backing::AnonPrivate)?;
        let (t_managed, ()) = time(|| cpu::touch_pages(region.range()));
        drop(region);
        Ok([
            rate(Unit::NsPerPage, t_plain, len),
            rate(Unit::NsPerPage, t_managed, len),
        ])
    })?;
    out.rows.push(Row {
        case: format!("first touch, managed region ({})", mib(len)),
        unit: Unit::NsPerPage,
        subject: Summary::of(managed),
        baseline_name: "plain anon memory",
        baseline: Some(Summary::of(plain)),
        target: Target::AtMost(1.1),
    });
    p.note("steady access");
    let plain_map = Mapping::anon(len)?;
    let region = mm.alloc(len, Backing::AnonPrivate)?;
    cpu::touch_pages(plain_map.range());
    cpu::touch_pages(region.range());
    // A read pass is short: take more of them than of the other cases.
    let [plain, managed] = rounds(5 * s.reps, |_| {
        let (t_plain, a) = time(|| cpu::sum(plain_map.range()));
        let (t_managed, b) = time(|| cpu::sum(region.range()));
        std::hint::black_box((a, b));
        Ok([
            rate(Unit::NsPerPage, t_plain, len),
            rate(Unit::NsPerPage, t_managed, len),
        ])
    })?;
    out.rows.push(Row {
        case: format!("steady read, managed region ({})", mib(len)),
        unit: Unit::NsPerPage,
        subject: Summary::of(managed),
        baseline_name: "plain anon memory",
        baseline: Some(Summary::of(plain)),
        target: Target::AtMost(1.1),
    });
    Ok(())
}

fn snapshot(s: &Sizes, _: &mut Progress, out: &mut Results) -> CaseResult {
    let mm = Mm::new()?;
    let region = mm.alloc(s.big, Backing::AnonPrivate)?;
    cpu::touch_pages(region.range());
    let range = region.range();
    let notifier = mm.insert_notifier(range, Arc::new(Quiet))?;
    let pagemap = Pagemap::open()?;
    let query = ScanQuery::new().require(Categories::PRESENT);
    let mut regions = Vec::new();
    let [raw, uhmm] = rounds(s.reps, |_| {
        let (t_raw, r) = time(|| {
            regions.clear();
            pagemap.scan(range, &query, &mut regions)
        });
        r?;
        let (t_uhmm, r) = time(|| {
            let mut hr = HmmRange::new(&notifier, notifier.read_begin(), range);
            mm.range_fault(&mut hr)
        });
        r?;
        Ok([
            rate(Unit::MPagesPerSec, t_raw, range.len()),
            rate(Unit::MPagesPerSec, t_uhmm, range.len()),
        ])
    })?;
    out.rows.push(Row {
        case: format!("range_fault snapshot, populated ({})", mib(s.big)),
        unit: Unit::MPagesPerSec,
        subject: Summary::of(uhmm),
        baseline_name: "raw PAGEMAP_SCAN",
        baseline: Some(Summary::of(raw)),
        target: Target::AtLeast(0.5),
    });
    Ok(())
}

/// A populated managed region, a device, and a populated buffer as large.
fn mirrored(
    mm: &Mm,
    len: usize,
) -> Result<(uhmm::mm::ManagedRegion, SimDevice, Vec<u8>), Box<dyn Error>> {
    let region = mm.alloc(len, Backing::AnonPrivate)?;
    cpu::touch_pages(region.range());
    let dev = SimDevice::new(mm);
    let buf = vec![1u8; len];
    Ok((region, dev, buf))
}

fn sim_read(s: &Sizes, _: &mut Progress, out: &mut Results) -> CaseResult {
    let mm = Mm::new()?;
    let (region, dev, mut buf) = mirrored(&mm, s.big)?;
    let range = region.range();
    let [raw, faulting, warm] = rounds(s.reps, |_| {
        let (t_raw, r) = time(|| mem::read_process(range.start(), &mut buf));
        r?;
        // Invalidate the device's translations (a protection change to
        // the same protection), then read: one fault round, then copy.
        mm.mprotect(range, Prot::READ | Prot::WRITE)?;
        let (t_fault, r) = time(|| dev.read_into(range.start(), &mut buf));
        if r?.faults != 1 {
            return Err("the faulting round did not fault".into());
        }
        let (t_warm, r) = time(|| dev.read_into(range.start(), &mut buf));
        if r?.faults != 0 {
            return Err("the warm round faulted".into());
        }
        Ok([
            rate(Unit::GBps, t_raw, range.len()),
            rate(Unit::GBps, t_fault, range.len()),
            rate(Unit::GBps, t_warm, range.len()),
        ])
    })?;
    let raw = Summary::of(raw);
    out.rows.push(Row {
        case: format!("SimDevice read, faulting round ({})", mib(s.big)),
        unit: Unit::GBps,
        subject: Summary::of(faulting),
        baseline_name: "process_vm_readv",
        baseline: Some(raw),
        target: Target::None,
    });
    out.rows.push(Row {
        case: format!("SimDevice read, warm round ({})", mib(s.big)),
        unit: Unit::GBps,
        subject: Summary::of(warm),
        baseline_name: "process_vm_readv",
        baseline: Some(raw),
        target: Target::AtLeast(0.5),
    });
    Ok(())
}

fn sim_curve(s: &Sizes, p: &mut Progress, out: &mut Results) -> CaseResult {
    let mm = Mm::new()?;
    let largest = s.curve.iter().copied().max().unwrap_or(PAGE_SIZE);
    let (region, dev, mut buf) = mirrored(&mm, largest)?;
    let start = region.range().start();
    dev.read_into(start, &mut buf)?; // mirror everything once
    let mut raw_pts = Vec::new();
    let mut dev_pts = Vec::new();
    for &size in &s.curve {
        p.note(&format!("{} KiB", size >> 10));
        // Enough repetitions for small sizes to be timed well.
        let reps = (s.reps * (64 << 20) / size).clamp(s.reps, 400);
        let b = &mut buf[..size];
        let [raw, warm] = rounds(reps, |_| {
            let (t_raw, r) = time(|| mem::read_process(start, b));
            r?;
            let (t_dev, r) = time(|| dev.read_into(start, b));
            r?;
            Ok([rate(Unit::GBps, t_raw, size), rate(Unit::GBps, t_dev, size)])
        })?;
        raw_pts.push((size as f64, Summary::of(raw).p50));
        dev_pts.push((size as f64, Summary::of(warm).p50));
    }
    out.charts.push(Chart::Curve {
        file: "sim_read_bandwidth.svg",
        title: "SimDevice warm read vs process_vm_readv".into(),
        y_label: "GB/s",
        series: vec![
            Series {
                name: "SimDevice read (warm)".into(),
                points: dev_pts,
            },
            Series {
                name: "process_vm_readv".into(),
                points: raw_pts,
            },
        ],
    });
    Ok(())
}

fn fault_round(s: &Sizes, _: &mut Progress, out: &mut Results) -> CaseResult {
    let mm = Mm::new()?;
    let (region, dev, mut buf) = mirrored(&mm, 64 * PAGE_SIZE)?;
    let mut raw = Vec::with_capacity(s.latency_samples);
    let mut round = Vec::with_capacity(s.latency_samples);
    for i in 0..=s.latency_samples {
        let page = region
            .range()
            .page(i % 64)
            .ok_or("page index out of the region")?;
        let b = &mut buf[..PAGE_SIZE];
        let (t_raw, r) = time(|| mem::read_process(page.start(), b));
        r?;
        mm.mprotect(page, Prot::READ | Prot::WRITE)?;
        let (t_dev, r) = time(|| dev.read_into(page.start(), b));
        if r?.faults != 1 {
            return Err("the round did not fault".into());
        }
        if i > 0 {
            raw.push(t_raw.as_nanos() as f64);
            round.push(t_dev.as_nanos() as f64);
        }
    }
    out.charts.push(Chart::Histogram {
        file: "sim_fault_round_latency.svg",
        title: "SimDevice one-page read with a fault round (ns)".into(),
        samples_ns: round.clone(),
    });
    out.rows.push(Row {
        case: "SimDevice 1-page read with a fault round".into(),
        unit: Unit::NsPerPage,
        subject: Summary::of(round),
        baseline_name: "process_vm_readv, 1 page",
        baseline: Some(Summary::of(raw)),
        target: Target::None,
    });
    Ok(())
}

fn metadata(s: &Sizes, _: &mut Progress, out: &mut Results) -> CaseResult {
    let mm = Mm::new()?;
    let region = mm.alloc(s.big, Backing::AnonPrivate)?;
    cpu::touch_pages(region.range());
    let dev = SimDevice::new(&mm);
    dev.read(region.range().start(), region.range().npages())?;
    let stats = mm.stats();
    let per_page = stats.state_bytes as f64 / region.range().npages() as f64;
    out.rows.push(Row {
        case: format!(
            "page-state metadata, {} managed, {} pages with a device state",
            mib(s.big),
            stats.state_pages
        ),
        unit: Unit::BytesPerPage,
        subject: Summary::single(per_page),
        baseline_name: "-",
        baseline: None,
        target: Target::None,
    });
    let _: PageRange = region.range();
    Ok(())
}

fn copy_engine(s: &Sizes, _: &mut Progress, out: &mut Results) -> CaseResult {
    use uhmm::devmem::copy::{CopyEngine, CopyJob, CpuCopyEngine};
    let src = vec![3u8; s.big];
    let mut dst = vec![1u8; s.big];
    let engine = CpuCopyEngine::new();
    let granule = 2 << 20;
    let [raw, eng] = rounds(s.reps, |_| {
        let (t_raw, ()) = time(|| memcpy(&mut dst, &src));
        let (t_eng, r) = time(|| {
            let mut jobs: Vec<CopyJob<'_>> = src
                .chunks(granule)
                .zip(dst.chunks_mut(granule))
                .map(|(s, d)| CopyJob { src: s, dst: d })
                .collect();
            engine.copy(&mut jobs)
        });
        r?;
        Ok([
            rate(Unit::GBps, t_raw, s.big),
            rate(Unit::GBps, t_eng, s.big),
        ])
    })?;
    out.rows.push(Row {
        case: format!(
            "CPU copy engine, {} in 2 MiB jobs, {} threads",
            mib(s.big),
            engine.threads()
        ),
        unit: Unit::GBps,
        subject: Summary::of(eng),
        baseline_name: "memcpy, one thread",
        baseline: Some(Summary::of(raw)),
        target: Target::None,
    });
    Ok(())
}

/// A bare userfaultfd server: one thread answering MISSING faults on its
/// own registered mapping with `UFFDIO_COPY` of a page (the baseline of
/// the fault-back case).
fn bare_missing_server(
    map: &Mapping,
) -> Result<
    (
        std::thread::JoinHandle<()>,
        Arc<std::sync::atomic::AtomicBool>,
    ),
    Box<dyn Error>,
> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use uhmm::sys::uffd::{CopyMode, Event, RegisterMode, Uffd};
    let uffd = Uffd::builder().open()?;
    uffd.register(map, map.range(), RegisterMode::MISSING)?;
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let handle = std::thread::spawn(move || {
        let src = vec![7u8; PAGE_SIZE];
        let mut events = Vec::with_capacity(64);
        while !st.load(Ordering::Relaxed) {
            if !uffd
                .wait(Some(std::time::Duration::from_millis(20)))
                .unwrap_or(false)
            {
                continue;
            }
            if uffd.read_events(&mut events).is_err() {
                continue;
            }
            for e in events.drain(..) {
                if let Event::PageFault(f) = e
                    && let Some(page) = f.page()
                {
                    let _ = uffd.copy(
                        page,
                        uhmm::VirtAddr::from_ptr(src.as_ptr()),
                        CopyMode::empty(),
                    );
                }
            }
        }
    });
    Ok((handle, stop))
}

fn fault_back(s: &Sizes, p: &mut Progress, out: &mut Results) -> CaseResult {
    // Both servers (uhmm's fault service, the bare loop) are created by a
    // thread pinned to `server_cpu`, and inherit it; the touching thread
    // runs on `toucher_cpu`. A wake-up across vCPUs costs ~30 us each way
    // on these VMs, so the placement decides the round trip.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut placements = vec![("same vCPU", 0, 0)];
    if cpus > 1 {
        placements.push(("across vCPUs", 1, 0));
    }
    for (placement, server_cpu, toucher_cpu) in placements {
        p.note(placement);
        let samples = s.latency_samples;
        let (back, raw) = std::thread::scope(|sc| {
            sc.spawn(|| {
                fault_back_samples(samples, server_cpu, toucher_cpu).map_err(|e| e.to_string())
            })
            .join()
            .map_err(|_| "the benchmark thread panicked".to_string())?
        })?;
        if placement == "same vCPU" {
            out.charts.push(Chart::Histogram {
                file: "fault_back_latency.svg",
                title: "CPU touch of a device-resident page, same vCPU (ns)".into(),
                samples_ns: back.clone(),
            });
        }
        out.rows.push(Row {
            case: format!("CPU touch of a device-resident 4 KiB page, {placement}"),
            unit: Unit::NsPerPage,
            subject: Summary::of(back),
            baseline_name: "bare MISSING + UFFDIO_COPY",
            baseline: Some(Summary::of(raw)),
            target: Target::AtMost(1.3),
        });
    }
    Ok(())
}

/// (uhmm, bare) latencies in ns of `n` first touches each.
fn fault_back_samples(
    n: usize,
    server_cpu: usize,
    toucher_cpu: usize,
) -> Result<(Vec<f64>, Vec<f64>), Box<dyn Error>> {
    use std::sync::atomic::Ordering;
    cpu::pin_to(server_cpu);
    let mm = Mm::new()?;
    mm.set_fault_block(PAGE_SIZE).unwrap();
    let region = mm.alloc((n + 1) * PAGE_SIZE, Backing::AnonPrivate)?;
    let bare = Mapping::anon((n + 1) * PAGE_SIZE)?;
    let (server, stop) = bare_missing_server(&bare)?;
    cpu::pin_to(toucher_cpu);
    cpu::touch_pages(region.range());
    let dev = SimDevice::new(&mm);
    dev.migrate_range_to_device(region.range().start(), n + 1)?;
    let mut raw = Vec::with_capacity(n);
    let mut back = Vec::with_capacity(n);
    // Alternate, page by page; page 0 of each is the warm-up.
    for i in 0..=n {
        let a = bare.range().page(i).ok_or("page")?.start();
        let (t_raw, v) = time(|| cpu::read_byte(a));
        let b = region.range().page(i).ok_or("page")?.start();
        let (t_back, w) = time(|| cpu::read_byte(b));
        if v != 7 || w != 1 {
            return Err("a faulted page read the wrong byte".into());
        }
        if i > 0 {
            raw.push(t_raw.as_nanos() as f64);
            back.push(t_back.as_nanos() as f64);
        }
    }
    stop.store(true, Ordering::Relaxed);
    server
        .join()
        .map_err(|_| "the bare userfaultfd server thread panicked")?;
    Ok((back, raw))
}

fn seq_read(s: &Sizes, _: &mut Progress, out: &mut Results) -> CaseResult {
    let mm = Mm::new()?;
    let len = s.big;
    let region = mm.alloc_mapping(Mapping::builder(len).align(2 << 20))?;
    cpu::touch_pages(region.range());
    let dev = SimDevice::new(&mm);
    let src = vec![3u8; len];
    let mut dst = vec![1u8; len];
    let npages = region.range().npages();
    let [raw, dev_read] = rounds(s.reps, |_| {
        let (t_raw, ()) = time(|| memcpy(&mut dst, &src));
        dev.migrate_range_to_device(region.range().start(), npages)?;
        let (t_dev, sum) = time(|| cpu::sum(region.range()));
        std::hint::black_box(sum);
        if dev.device_pages() != 0 {
            return Err("pages stayed on the device after a full CPU read".into());
        }
        Ok([rate(Unit::GBps, t_raw, len), rate(Unit::GBps, t_dev, len)])
    })?;
    out.rows.push(Row {
        case: format!(
            "sequential CPU read of device-resident memory ({}, fault block {} KiB)",
            mib(len),
            mm.fault_block() >> 10
        ),
        unit: Unit::GBps,
        subject: Summary::of(dev_read),
        baseline_name: "memcpy",
        baseline: Some(Summary::of(raw)),
        target: Target::AtLeast(0.5),
    });
    Ok(())
}

fn migrate_sizes(s: &Sizes, p: &mut Progress, out: &mut Results) -> CaseResult {
    let mm = Mm::new()?;
    let dev = SimDevice::new(&mm);
    let mut series: Vec<Series> = Vec::new();
    let mut memcpy_pts = Vec::new();
    let mut rows = Vec::new();
    for thp in [true, false] {
        let mut to_dev = Vec::new();
        let mut to_sys = Vec::new();
        for &size in &s.migrate {
            p.note(&format!(
                "{} KiB, THP {}",
                size >> 10,
                if thp { "on" } else { "off" }
            ));
            let reps = (s.reps * (64 << 20) / size).clamp(s.reps, 50);
            let [raw, there, back] = round_trips(&mm, &dev, size, thp, reps)?;
            if thp {
                memcpy_pts.push((size as f64, raw.p50));
            }
            to_dev.push((size as f64, there.p50));
            to_sys.push((size as f64, back.p50));
            let granule = if thp { "2 MiB THP" } else { "4 KiB pages" };
            let target = Target::AtLeast(if thp { 0.7 } else { 0.4 });
            for (dir, sum) in [("to device", there), ("to system", back)] {
                rows.push(Row {
                    case: format!("migrate {dir}, {}, {granule}", kib(size)),
                    unit: Unit::GBps,
                    subject: sum,
                    baseline_name: "memcpy",
                    baseline: Some(raw),
                    target,
                });
            }
        }
        let tag = if thp { "THP" } else { "no THP" };
        series.push(Series {
            name: format!("to device, {tag}"),
            points: to_dev,
        });
        series.push(Series {
            name: format!("to system, {tag}"),
            points: to_sys,
        });
    }
    series.push(Series {
        name: "memcpy".into(),
        points: memcpy_pts,
    });
    // The other path: a device with memory of its own pays a copy through
    // its engine (and an allocation and zeroing on the way back).
    let size = (s.big / 4).max(8 << 20);
    p.note(&format!("{} KiB, THP on, copy engine", size >> 10));
    let copying = SimDevice::new(&mm);
    copying.set_copy_engine(Arc::new(uhmm::devmem::copy::CpuCopyEngine::new()));
    let [raw, there, back] = round_trips(&mm, &copying, size, true, s.reps)?;
    for (dir, sum) in [("to device", there), ("to system", back)] {
        rows.push(Row {
            case: format!(
                "migrate {dir}, {}, 2 MiB THP, copying (own memory)",
                kib(size)
            ),
            unit: Unit::GBps,
            subject: sum,
            baseline_name: "memcpy",
            baseline: Some(raw),
            target: Target::None,
        });
    }
    out.rows.extend(rows);
    out.charts.push(Chart::Curve {
        file: "migration_bandwidth.svg",
        title: "SimDevice migration bandwidth by size".into(),
        y_label: "GB/s",
        series,
    });
    Ok(())
}

/// memcpy, migration to `dev` and back of a fresh `size`-byte region (THP
/// or not), `reps` rounds after a warm-up: their GB/s summaries.
fn round_trips(
    mm: &Mm,
    dev: &SimDevice,
    size: usize,
    thp: bool,
    reps: usize,
) -> Result<[Summary; 3], Box<dyn Error>> {
    use uhmm::sys::mem::Advice;
    let region = mm.alloc_mapping(Mapping::builder(size).align(2 << 20))?;
    let map = region.mapping().ok_or("no mapping")?;
    let advice = if thp {
        Advice::HugePage
    } else {
        Advice::NoHugePage
    };
    map.advise(map.range(), advice)?;
    cpu::touch_pages(region.range());
    let npages = region.range().npages();
    let src = vec![3u8; size];
    let mut dst = vec![1u8; size];
    let cols = rounds(reps, |_| {
        let (t_raw, ()) = time(|| memcpy(&mut dst, &src));
        let (t_there, r) = time(|| dev.migrate_range_to_device(region.range().start(), npages));
        if r? != npages as u64 {
            return Err("not every page migrated to the device".into());
        }
        let (t_back, r) = time(|| dev.migrate_to_system(region.range().start(), npages));
        if r?.cpages != npages as u64 {
            return Err("not every page migrated back".into());
        }
        Ok([
            rate(Unit::GBps, t_raw, size),
            rate(Unit::GBps, t_there, size),
            rate(Unit::GBps, t_back, size),
        ])
    })?;
    Ok(cols.map(Summary::of))
}

fn kib(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        mib(bytes)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// The memcpy baseline: `dst = src`, kept (the copy is otherwise dead
/// code the compiler may drop).
fn memcpy(dst: &mut [u8], src: &[u8]) {
    dst.copy_from_slice(src);
    std::hint::black_box(dst);
}
