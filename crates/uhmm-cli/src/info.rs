//! `uhmm info`: what the running kernel offers uhmm, as a table (or JSON),
//! with one line per missing item saying what will not work and how to
//! enable it. Run as the user who will run the program: without root,
//! read-write access to `/dev/userfaultfd` or
//! `vm.unprivileged_userfaultfd=1`, uhmm runs in user-mode-only mode, and
//! the report says what that mode cannot do.

use serde_json::json;
use std::process::ExitCode;
use uhmm::sys::probe::{Report, feature_name};
use uhmm::sys::uffd::Features;

/// Arguments of `uhmm info`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs `uhmm info`. Exits 0 when uhmm can work (a userfaultfd can be
/// opened), 1 otherwise.
pub fn run(args: &Args) -> ExitCode {
    let report = Report::probe();
    let text = if args.json {
        format!("{:#}\n", to_json(&report))
    } else {
        table(&report)
    };
    // A closed pipe (`uhmm info | head`) is not an error worth a panic.
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
    if report.uffd_chosen.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn table(r: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let mut rows: Vec<(String, String)> = vec![
        ("kernel".into(), r.kernel.release.clone()),
        ("running as root".into(), yes_no(r.root).into()),
    ];
    for a in &r.uffd_access {
        let status = match a.result {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("unavailable ({e})"),
        };
        rows.push((format!("userfaultfd via {}", a.access), status));
    }
    rows.push((
        "userfaultfd used".into(),
        match r.uffd_chosen {
            Some(a) if a.serves_kernel_faults() => {
                format!("{a} (serves kernel-mode faults: system calls on managed memory work)")
            }
            Some(a) => format!(
                "{a} (user-mode faults only: system calls on pages uhmm took out of the page table fail; see below)"
            ),
            None => "none".into(),
        },
    ));
    rows.push((
        "vm.unprivileged_userfaultfd".into(),
        r.unprivileged_userfaultfd
            .map_or("unreadable".into(), |v| v.to_string()),
    ));
    for (name, f) in Features::all().iter_names() {
        rows.push((
            format!("  feature {name}"),
            yes_no(r.uffd_features.contains(f)).into(),
        ));
    }
    rows.push((
        "  EVENT_FORK permitted (not needed)".into(),
        yes_no(r.event_fork_permitted).into(),
    ));
    rows.push(("PAGEMAP_SCAN".into(), yes_no(r.pagemap_scan).into()));
    rows.push(("PROCMAP_QUERY".into(), yes_no(r.procmap_query).into()));
    rows.push((
        "THP mode".into(),
        r.thp.clone().unwrap_or_else(|| "unknown".into()),
    ));
    for p in &r.hugetlb {
        rows.push((
            format!("hugetlb {} pages", human(p.page_size)),
            format!("{} free of {} reserved", p.free, p.total),
        ));
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in &rows {
        let _ = writeln!(out, "{k:<width$}  {v}");
    }
    let missing = r.missing();
    if missing.is_empty() {
        let _ = writeln!(out, "\nEverything uhmm uses is available.");
    } else {
        let _ = writeln!(out, "\nMissing ({}):", missing.len());
        for m in &missing {
            let _ = writeln!(out, "- {}: {}. Fix: {}", m.item, m.impact, m.fix);
        }
    }
    out
}

fn human(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b => format!("{} KiB", b >> 10),
    }
}

fn to_json(r: &Report) -> serde_json::Value {
    let features: serde_json::Map<String, serde_json::Value> = Features::all()
        .iter_names()
        .map(|(name, f)| (name.to_string(), json!(r.uffd_features.contains(f))))
        .collect();
    json!({
        "kernel": { "release": r.kernel.release, "version": [r.kernel.version.0, r.kernel.version.1, r.kernel.version.2] },
        "root": r.root,
        "userfaultfd": {
            "access": r.uffd_access.iter().map(|a| json!({
                "way": a.access.to_string(),
                "ok": a.result.is_ok(),
                "error": a.result.err().map(|e| e.to_string()),
            })).collect::<Vec<_>>(),
            "used": r.uffd_chosen.map(|a| a.to_string()),
            "serves_kernel_faults": r.uffd_chosen.is_some_and(|a| a.serves_kernel_faults()),
            "unprivileged_userfaultfd": r.unprivileged_userfaultfd,
            "features": features,
            "missing_features": feature_name(r.missing_features()),
            "event_fork_permitted": r.event_fork_permitted,
        },
        "pagemap_scan": r.pagemap_scan,
        "procmap_query": r.procmap_query,
        "thp": r.thp,
        "hugetlb": r.hugetlb.iter().map(|p| json!({ "page_size": p.page_size, "total": p.total, "free": p.free })).collect::<Vec<_>>(),
        "missing": r.missing().iter().map(|m| json!({ "item": m.item, "impact": m.impact, "fix": m.fix })).collect::<Vec<_>>(),
    })
}
