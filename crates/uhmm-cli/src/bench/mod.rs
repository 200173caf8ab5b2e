//! `uhmm bench`: uhmm's costs as ratios to the raw kernel primitive (or
//! plain memory) measured in the same run.
//!
//! Each case runs a warm-up pass first (the VMs this runs on back guest RAM
//! lazily, so first touches of fresh memory are slow), then alternates the
//! case and its baseline so that drift hits both alike. Figures are medians
//! with the 99th percentile; the ratio compares medians.

mod cases;
pub(crate) mod cpu;
mod faults;
mod measure;
mod svg;

use measure::{Summary, Unit};
use serde_json::json;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

/// Arguments of `uhmm bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Small sizes and few repetitions: the whole run stays under a minute
    /// (for CI smoke runs). Ratios are noisier.
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON to this file (created, or emptied,
    /// before any case runs, to check that it can be written).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write the charts (SVG) into this directory (created, and checked
    /// writable, before any case runs).
    #[arg(long, value_name = "DIR")]
    plot: Option<PathBuf>,
    /// Run only the cases whose name contains this: touch, snapshot,
    /// sim-read, sim-curve, fault-round, copy, fault-back, stalls,
    /// seq-read, seq-read-copying, migrate, metadata. It must match at
    /// least one.
    #[arg(long, value_name = "TEXT")]
    only: Option<String>,
}

/// What a row's ratio must reach.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// Informational: no target.
    None,
    /// ratio ≤ this (time-like units).
    AtMost(f64),
    /// ratio ≥ this (rate-like units).
    AtLeast(f64),
}

impl Target {
    fn text(self) -> String {
        match self {
            Target::None => "-".into(),
            Target::AtMost(x) => format!("<= {x:.2}x"),
            Target::AtLeast(x) => format!(">= {x:.2}x"),
        }
    }

    fn met(self, ratio: Option<f64>) -> Option<bool> {
        match (self, ratio) {
            (Target::AtMost(t), Some(r)) => Some(r <= t),
            (Target::AtLeast(t), Some(r)) => Some(r >= t),
            _ => None,
        }
    }
}

/// One line of the results table.
#[derive(Debug, Clone)]
pub struct Row {
    pub case: String,
    pub unit: Unit,
    pub subject: Summary,
    pub baseline_name: &'static str,
    pub baseline: Option<Summary>,
    pub target: Target,
}

impl Row {
    /// subject / baseline on medians (for both kinds of unit: the target
    /// says which way is good).
    fn ratio(&self) -> Option<f64> {
        self.baseline
            .map(|b| self.subject.p50 / b.p50)
            .filter(|r| r.is_finite())
    }
}

/// A chart to draw.
#[derive(Debug)]
pub enum Chart {
    Curve {
        file: &'static str,
        title: String,
        y_label: &'static str,
        series: Vec<svg::Series>,
    },
    Histogram {
        file: &'static str,
        title: String,
        samples_ns: Vec<f64>,
    },
}

/// Results of the cases run so far.
#[derive(Debug, Default)]
pub struct Results {
    pub rows: Vec<Row>,
    pub charts: Vec<Chart>,
    /// Lines printed after the table (and kept in the JSON).
    pub notes: Vec<String>,
}

/// Progress lines on stderr, with the time since start.
#[derive(Debug)]
pub struct Progress {
    start: Instant,
    total: usize,
    done: usize,
}

impl Progress {
    pub fn step(&mut self, what: &str) {
        self.done += 1;
        let _ = writeln!(
            std::io::stderr(),
            "[{:>2}/{}] {:>6.1}s  {what}",
            self.done,
            self.total,
            self.start.elapsed().as_secs_f64()
        );
    }

    pub fn note(&self, what: &str) {
        let _ = writeln!(std::io::stderr(), "              {what}");
    }
}

/// Runs `uhmm bench`. Exits 2 if the arguments are wrong (an `--only`
/// that matches no case, a `--json` or `--plot` destination that cannot be
/// written: all checked before any case runs), 1 if a case could not run
/// or the results could not be written (the error is printed), 0 otherwise
/// — a missed target is reported, not a failure.
pub fn run(args: &Args) -> ExitCode {
    let sizes = if args.quick {
        cases::Sizes::quick()
    } else {
        cases::Sizes::full()
    };
    let selected: Vec<&cases::Case> = cases::ALL
        .iter()
        .filter(|c| {
            args.only
                .as_ref()
                .is_none_or(|o| c.name.contains(o.as_str()))
        })
        .collect();
    if selected.is_empty() {
        let names: Vec<&str> = cases::ALL.iter().map(|c| c.name).collect();
        let _ = writeln!(
            std::io::stderr(),
            "uhmm bench: --only {:?} matches no case; the cases are: {}",
            args.only.as_deref().unwrap_or_default(),
            names.join(", ")
        );
        return ExitCode::from(2);
    }
    // Where the results go must be writable before an hour of cases runs.
    let json_file = match args.json.as_deref().map(open_json).transpose() {
        Ok(f) => f,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "uhmm bench: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(dir) = &args.plot
        && let Err(e) = check_plot_dir(dir)
    {
        let _ = writeln!(std::io::stderr(), "uhmm bench: {e}");
        return ExitCode::from(2);
    }
    let mut progress = Progress {
        start: Instant::now(),
        total: selected.len(),
        done: 0,
    };
    let mut results = Results::default();
    for case in selected {
        progress.step(case.title);
        if let Err(e) = (case.run)(&sizes, &mut progress, &mut results) {
            let _ = writeln!(std::io::stderr(), "uhmm bench: {}: {e}", case.name);
            return ExitCode::FAILURE;
        }
    }
    let machine = machine();
    let _ = std::io::stdout().write_all(table(&results, &machine, args.quick).as_bytes());
    if let (Some(path), Some(mut file)) = (&args.json, json_file) {
        let text = format!("{:#}\n", to_json(&results, &machine, args.quick));
        if let Err(e) = file.write_all(text.as_bytes()) {
            let _ = writeln!(std::io::stderr(), "uhmm bench: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if let Some(dir) = &args.plot
        && let Err(e) = plot(&results, dir)
    {
        let _ = writeln!(std::io::stderr(), "uhmm bench: {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Creates (or empties) the `--json` file, to be written at the end.
fn open_json(path: &Path) -> Result<std::fs::File, String> {
    std::fs::File::create(path).map_err(|e| format!("cannot write --json {}: {e}", path.display()))
}

/// Creates the `--plot` directory and checks that a file can be made in
/// it (and removes that file).
fn check_plot_dir(dir: &Path) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("cannot write --plot {}: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(fail)?;
    let probe = dir.join(format!(".uhmm-bench-{}", std::process::id()));
    std::fs::File::create(&probe).map_err(fail)?;
    std::fs::remove_file(&probe).map_err(fail)
}

fn plot(results: &Results, dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for chart in &results.charts {
        let (file, text) = match chart {
            Chart::Curve {
                file,
                title,
                y_label,
                series,
            } => (file, svg::curve(title, y_label, series)),
            Chart::Histogram {
                file,
                title,
                samples_ns,
            } => (file, svg::histogram(title, samples_ns, 40)),
        };
        std::fs::write(dir.join(file), text)?;
    }
    Ok(())
}

/// The machine, in words: kernel, CPUs, memory.
fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / (1024.0 * 1024.0));
    format!(
        "Linux {}, {cpus} CPUs ({model}), {mem_gib:.0} GiB",
        kernel.trim()
    )
}

fn fmt_value(unit: Unit, v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    match unit {
        Unit::NsPerPage if v >= 10_000.0 => format!("{:.1} us", v / 1000.0),
        Unit::NsPerPage => format!("{v:.0} ns"),
        Unit::GBps => format!("{v:.2} GB/s"),
        Unit::MPagesPerSec => format!("{v:.1} Mp/s"),
        Unit::BytesPerPage => format!("{v:.2} B"),
        Unit::PerFault => format!("{v:.2}"),
    }
}

fn table(results: &Results, machine: &str, quick: bool) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nuhmm bench{} on {machine}\n",
        if quick { " --quick" } else { "" }
    );
    let head = [
        "case", "uhmm p50", "p99", "baseline", "p50", "ratio", "target", "",
    ];
    let mut lines: Vec<[String; 8]> = vec![head.map(String::from)];
    for r in &results.rows {
        let ratio = r.ratio();
        let verdict = match r.target.met(ratio) {
            Some(true) => "ok",
            Some(false) => "MISSED",
            None => "",
        };
        lines.push([
            r.case.clone(),
            fmt_value(r.unit, r.subject.p50),
            fmt_value(r.unit, r.subject.p99),
            r.baseline_name.to_owned(),
            r.baseline.map_or("-".into(), |b| fmt_value(r.unit, b.p50)),
            ratio.map_or("-".into(), |x| format!("{x:.2}x")),
            r.target.text(),
            verdict.into(),
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|c| {
            lines
                .iter()
                .map(|l| l[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for (i, l) in lines.iter().enumerate() {
        let cells: Vec<String> = l
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (s, w))| {
                if c == 0 || c == 3 {
                    format!("{s:<w$}")
                } else {
                    format!("{s:>w$}")
                }
            })
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
        if i == 0 {
            let _ = writeln!(out, "{}", "-".repeat(widths.iter().sum::<usize>() + 14));
        }
    }
    let _ = writeln!(
        out,
        "\nratio = uhmm / baseline, medians of the same run (time: lower is better; rates: higher is better)."
    );
    for note in &results.notes {
        let _ = writeln!(out, "{note}");
    }
    out
}

fn to_json(results: &Results, machine: &str, quick: bool) -> serde_json::Value {
    let rows: Vec<_> = results
        .rows
        .iter()
        .map(|r| {
            json!({
                "case": r.case,
                "unit": r.unit.name(),
                "uhmm": {"p50": r.subject.p50, "p99": r.subject.p99, "samples": r.subject.n},
                "baseline_name": r.baseline_name,
                "baseline": r.baseline.map(|b| json!({"p50": b.p50, "p99": b.p99, "samples": b.n})),
                "ratio": r.ratio(),
                "target": r.target.text(),
                "met": r.target.met(r.ratio()),
            })
        })
        .collect();
    let curves: Vec<_> = results
        .charts
        .iter()
        .filter_map(|c| match c {
            Chart::Curve {
                file,
                title,
                y_label,
                series,
            } => Some(json!({
                "file": file,
                "title": title,
                "y": y_label,
                "series": series.iter().map(|s| json!({"name": s.name, "points": s.points})).collect::<Vec<_>>(),
            })),
            Chart::Histogram { .. } => None,
        })
        .collect();
    json!({ "machine": machine, "quick": quick, "rows": rows, "curves": curves, "notes": results.notes })
}
