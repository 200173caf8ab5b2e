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
    pub(super) big: usize,
    /// Memory touched per first-touch repetition.
    pub(super) touch: usize,
    /// Measured repetitions (after one warm-up).
    pub(super) reps: usize,
    /// Sizes of the bandwidth curve.
    pub(super) curve: Vec<usize>,
    /// Samples of the single-page latency case.
    pub(super) latency_samples: usize,
    /// Sizes of the migration table.
    pub(super) migrate: Vec<usize>,
}

impl Sizes {
    pub fn full() -> Sizes {
        Sizes {
            big: 1 << 30,
            touch: 256 << 20,
            reps: 7,
            curve: (0..=11).map(|i| (512 << 10) << i).collect(),
            latency_samples: 3000,
            // The kernel's benchmark_thp_migration sizes (a quarter THP
            // to 128 THPs), and 1 GiB.
            migrate: (0..10).map(|i| (512 << 10) << i).chain([1 << 30]).collect(),
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
        title: "CPU touch of a device-resident page (zero-copy and copying) vs a bare MISSING + COPY server: latency, CPU and system calls per fault",
        run: super::faults::fault_back,
    },
    Case {
        name: "stalls",
        title: "random 4 KiB fault back over the large region: every stall over 1 ms, with its cause",
        run: super::faults::stalls,
    },
    Case {
        name: "seq-read",
        title: "sequential CPU read of device-resident memory vs memcpy",
        run: seq_read,
    },
    Case {
        name: "seq-read-copying",
        title: "sequential CPU read of device-resident memory, copying device: 4 KiB blocks vs a bare server, default block (4 KiB pages, THP) vs memcpy",
        run: super::faults::seq_read_copying,
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

pub(super) fn mib(bytes: usize) -> String {
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
    let mut thp_table = vec![
        "Migration by size (the layout of the kernel's benchmark_thp_migration): ms per direction, and GB/s; medians".to_string(),
        format!(
            "  {:>10}  {:>4}  {:>13}  {:>9}  {:>13}  {:>9}",
            "size", "THP", "to device ms", "GB/s", "to system ms", "GB/s"
        ),
    ];
    p.note("one 4 KiB page (the fixed cost)");
    rows.extend(fixed_cost(&mm, &dev, s.latency_samples)?);
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
            let ms = |gbps: f64| size as f64 / (gbps * 1e9) * 1e3;
            thp_table.push(format!(
                "  {:>10}  {:>4}  {:>13.3}  {:>9.2}  {:>13.3}  {:>9.2}",
                kib(size),
                if thp { "on" } else { "off" },
                ms(there.p50),
                there.p50,
                ms(back.p50),
                back.p50
            ));
            let granule = if thp { "2 MiB THP" } else { "4 KiB pages" };
            // The targets: a THP's worth and more at 0.7x, less
            // than one THP (no THP can back it) and 4 KiB pages at 0.4x.
            let target = Target::AtLeast(if thp && size >= 2 << 20 { 0.7 } else { 0.4 });
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
    out.notes.extend(thp_table);
    out.charts.push(Chart::Curve {
        file: "migration_bandwidth.svg",
        title: "SimDevice migration bandwidth by size".into(),
        y_label: "GB/s",
        series,
    });
    Ok(())
}

/// The fixed cost of a migration: one 4 KiB page to `dev` and back,
/// `reps` rounds after a warm-up, against the kernel calls a zero-copy
/// device's migration of a page is made of (out of the process into
/// staging and on into device memory; one move back).
fn fixed_cost(mm: &Mm, dev: &SimDevice, reps: usize) -> Result<Vec<Row>, Box<dyn Error>> {
    use uhmm::sys::uffd::{Features, RegisterMode, Uffd};
    let region = mm.alloc(PAGE_SIZE, Backing::AnonPrivate)?;
    cpu::touch_pages(region.range());
    let at = region.range().start();
    let uffd = Uffd::builder().features(Features::MOVE).open()?;
    let maps = [
        Mapping::anon(PAGE_SIZE)?,
        Mapping::anon(PAGE_SIZE)?,
        Mapping::anon(PAGE_SIZE)?,
    ];
    for m in &maps {
        uffd.register(m, m.range(), RegisterMode::WP)?;
    }
    cpu::touch_pages(maps[0].range());
    let [a, b, c] = [0, 1, 2].map(|i| maps[i].range());
    let moved = |dst: PageRange, src: PageRange| -> Result<(), Box<dyn Error>> {
        match cpu::move_page(&uffd, dst, src.start()) {
            Ok(p) if p.is_complete() => Ok(()),
            Ok(p) => Err(format!("a bare UFFDIO_MOVE stopped: {:?}", p.stop).into()),
            Err(e) => Err(e.into()),
        }
    };
    let ns = |d: std::time::Duration| d.as_nanos() as f64;
    let [raw_there, raw_back, there, back] = rounds(reps, |_| {
        let (t_raw_there, r) = time(|| moved(b, a).and_then(|()| moved(c, b)));
        r?;
        let (t_raw_back, r) = time(|| moved(a, c));
        r?;
        let (t_there, r) = time(|| dev.migrate_range_to_device(at, 1));
        if r? != 1 {
            return Err("the page did not migrate to the device".into());
        }
        let (t_back, r) = time(|| dev.migrate_to_system(at, 1));
        if r?.cpages != 1 {
            return Err("the page did not migrate back".into());
        }
        Ok([ns(t_raw_there), ns(t_raw_back), ns(t_there), ns(t_back)])
    })?;
    let row = |dir: &str, subject: Vec<f64>, baseline_name, baseline: Vec<f64>| Row {
        case: format!("migrate one 4 KiB page {dir} (a migration's fixed cost)"),
        unit: Unit::NsPerPage,
        subject: Summary::of(subject),
        baseline_name,
        baseline: Some(Summary::of(baseline)),
        target: Target::None,
    };
    Ok(vec![
        row("to device", there, "its kernel calls: 2 MOVEs", raw_there),
        row("to system", back, "its kernel call: 1 MOVE", raw_back),
    ])
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
pub(super) fn memcpy(dst: &mut [u8], src: &[u8]) {
    dst.copy_from_slice(src);
    std::hint::black_box(dst);
}
