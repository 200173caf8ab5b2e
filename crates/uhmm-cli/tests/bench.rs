//! `uhmm bench` checks its arguments before it runs a case: an `--only`
//! that matches nothing, a `--json` file or `--plot` directory that cannot
//! be written are errors (exit 2) at once, not an empty table with exit 0
//! or a failure after the whole run.

use std::path::PathBuf;
use std::process::{Command, Output};

fn uhmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_uhmm"))
        .args(args)
        .output()
        .expect("run uhmm")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A scratch path of this test's own under the target directory, removed
/// first.
fn scratch(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-{name}"));
    let _ = std::fs::remove_dir_all(&p);
    let _ = std::fs::remove_file(&p);
    p
}

/// A path under a regular file: nothing can be created there, even by root.
fn unwritable(name: &str) -> PathBuf {
    let file = scratch(name);
    std::fs::write(&file, "a file, not a directory\n").expect("write scratch file");
    file.join("inside")
}

/// The case names from the error of an `--only` that matches none.
fn case_names(stderr: &str) -> Vec<String> {
    stderr
        .split_once("the cases are: ")
        .map(|(_, list)| list.trim().split(", ").map(String::from).collect())
        .unwrap_or_default()
}

#[test]
fn an_only_that_matches_no_case_is_an_error() {
    let out = uhmm(&["bench", "--quick", "--only", "nomatch"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("uhmm bench: --only \"nomatch\" matches no case"),
        "{stderr}"
    );
    let names = case_names(&stderr);
    for name in ["touch", "fault-back", "migrate", "metadata"] {
        assert!(
            names.iter().any(|n| n == name),
            "{name} not listed: {stderr}"
        );
    }
    assert!(!stdout.contains("ratio"), "a table was printed:\n{stdout}");
}

#[test]
fn the_help_of_only_lists_every_case() {
    let stderr = text(&uhmm(&["bench", "--only", "nomatch"])).1;
    let names = case_names(&stderr);
    assert!(names.len() >= 10, "{stderr}");
    let help = text(&uhmm(&["bench", "--help"])).0;
    for name in names {
        assert!(
            help.contains(&name),
            "--help does not name case {name}:\n{help}"
        );
    }
}

#[test]
fn an_unwritable_json_file_is_refused_before_any_case_runs() {
    let json = unwritable("json-file");
    let json = json.to_str().expect("utf-8 path");
    let out = uhmm(&["bench", "--quick", "--only", "metadata", "--json", json]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("uhmm bench: cannot write --json"),
        "{stderr}"
    );
    assert!(!stderr.contains("[ 1/1]"), "a case ran first:\n{stderr}");
}

#[test]
fn an_unwritable_plot_directory_is_refused_before_any_case_runs() {
    let dir = unwritable("plot-file");
    let dir = dir.to_str().expect("utf-8 path");
    let out = uhmm(&["bench", "--quick", "--only", "metadata", "--plot", dir]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("uhmm bench: cannot write --plot"),
        "{stderr}"
    );
    assert!(!stderr.contains("[ 1/1]"), "a case ran first:\n{stderr}");
}

#[test]
fn json_and_plot_are_written_after_the_early_checks() {
    // The fast case; the early checks must not get in the way of the
    // writes at the end.
    let json = scratch("ok.json");
    let dir = scratch("ok-plots");
    let out = uhmm(&[
        "bench",
        "--quick",
        "--only",
        "metadata",
        "--json",
        json.to_str().expect("utf-8 path"),
        "--plot",
        dir.to_str().expect("utf-8 path"),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("read --json")).expect("JSON");
    assert_eq!(v["rows"].as_array().map(Vec::len), Some(1), "{v:#}");
    assert!(dir.is_dir());
    // The probe file of the writability check is gone.
    assert_eq!(std::fs::read_dir(&dir).expect("read --plot").count(), 0);
}
