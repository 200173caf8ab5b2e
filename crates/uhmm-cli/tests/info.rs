//! `uhmm info` runs, prints its table, and its JSON parses and agrees with
//! the library's probe.

use std::process::Command;

fn uhmm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_uhmm"))
        .args(args)
        .output()
        .expect("run uhmm")
}

#[test]
fn info_json_describes_the_kernel() {
    let out = uhmm(&["info", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let report = uhmm::sys::probe::Report::probe();
    assert_eq!(v["kernel"]["release"], report.kernel.release);
    assert_eq!(v["pagemap_scan"], report.pagemap_scan);
    assert_eq!(v["procmap_query"], report.procmap_query);
    let features = v["userfaultfd"]["features"].as_object().expect("features");
    assert_eq!(features.len(), 17, "one entry per UFFD_FEATURE_* bit");
    assert_eq!(
        features["MOVE"],
        report
            .uffd_features
            .contains(uhmm::sys::uffd::Features::MOVE)
    );
    assert_eq!(
        v["missing"].as_array().unwrap().len(),
        report.missing().len()
    );
    assert_eq!(out.status.success(), report.uffd_chosen.is_some());
}

#[test]
fn info_table_lists_each_item() {
    let out = uhmm(&["info"]);
    let text = String::from_utf8(out.stdout).unwrap();
    for item in [
        "kernel",
        "userfaultfd via /dev/userfaultfd",
        "feature MOVE",
        "PAGEMAP_SCAN",
        "PROCMAP_QUERY",
        "THP mode",
    ] {
        assert!(text.contains(item), "missing {item:?} in:\n{text}");
    }
}
