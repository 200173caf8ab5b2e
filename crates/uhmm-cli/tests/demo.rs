//! `uhmm demo` tells the truth: flags out of range are refused up front
//! (exit 2, the bound in the message), a CPU thread that panics or cannot
//! start fails the run (exit 1) instead of passing it, a size it rounds up
//! is said, and the verdict names only the checks that ran.

use std::process::{Command, Output};

/// A small, fast demo: one 8 MiB array, few updates.
const SMALL: &[&str] = &["--size", "8", "--updates", "100"];

fn uhmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_uhmm"))
        .args(args)
        .output()
        .expect("run uhmm")
}

fn demo(args: &[&str]) -> Output {
    let mut all = vec!["demo"];
    all.extend_from_slice(args);
    uhmm(&all)
}

/// `uhmm demo` with `args` and the `SMALL` ones.
fn small_demo(args: &[&str]) -> Output {
    let mut all = args.to_vec();
    all.extend_from_slice(SMALL);
    demo(&all)
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `uhmm demo args`, checks that clap refused it (exit 2, nothing
/// run) with `bound` in the message.
fn refused(args: &[&str], bound: &str) {
    let out = demo(args);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stdout}\n{stderr}");
    assert!(
        stderr.contains(bound),
        "{args:?}: the error should say the bound {bound}:\n{stderr}"
    );
    assert!(!stdout.contains("verdict"), "{args:?} ran:\n{stdout}");
}

#[test]
fn updates_that_would_overflow_are_refused() {
    // Used to panic every worker (capacity overflow), swallow the panics
    // and print `verdict: OK` with exit 0.
    refused(
        &[
            "--size",
            "8",
            "--rounds",
            "1",
            "--updates",
            "18446744073709551615",
        ],
        "0..=1000000000",
    );
}

#[test]
fn thread_counts_out_of_range_are_refused() {
    refused(&["--threads", "100000"], "1..=1024");
    refused(&["--threads", "0"], "1..=1024");
}

#[test]
fn sizes_out_of_range_are_refused() {
    // 2^44 MiB is 2^64 bytes: `size << 20` wrapped to 0.
    refused(&["--size", "17592186044416"], "1..=65536");
    refused(&["--size", "18446744073709551615"], "1..=65536");
    refused(&["--size", "0"], "1..=65536");
    refused(&["--rounds", "0"], "1..=100000");
}

#[test]
fn a_panicked_worker_fails_the_verdict() {
    if !cfg!(debug_assertions) {
        eprintln!("skipped: the demo injects the panic in debug builds only");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_uhmm"))
        .args(["demo", "--threads", "3", "--rounds", "2"])
        .args(SMALL)
        .env("UHMM_DEMO_PANIC_THREAD", "1")
        .output()
        .expect("run uhmm");
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(!stdout.contains("verdict: OK"), "{stdout}");
    assert!(
        stdout.contains("verdict: FAILED") && stdout.contains("CPU thread 1 panicked"),
        "the verdict must fail and name the thread:\n{stdout}"
    );
}

#[test]
fn a_thread_that_cannot_start_is_an_error() {
    // Under an address-space limit too small for 1024 thread stacks the
    // spawn fails partway (it used to panic: exit 101).
    let cmd = format!(
        "ulimit -v 800000 && exec '{}' demo --threads 1024 --size 8 --rounds 1 --updates 10",
        env!("CARGO_BIN_EXE_uhmm")
    );
    let out = Command::new("/bin/sh")
        .args(["-c", &cmd])
        .output()
        .expect("run sh");
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("uhmm demo: cannot start CPU thread"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stdout.contains("verdict: OK"), "{stdout}");
}

#[test]
fn a_size_rounded_up_is_said() {
    let out = demo(&["--size", "1", "--rounds", "1", "--updates", "10"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("size rounded up from 1 to 8 MiB") && stdout.contains("whole 2 MiB pages"),
        "{stdout}"
    );
    // A size that needs no rounding gets no such line.
    let out = small_demo(&["--rounds", "1"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(!stdout.contains("rounded"), "{stdout}");
}

#[test]
fn the_verdict_names_only_the_checks_that_ran() {
    // One round: the fork used to be skipped (it ran after round
    // rounds/2 = 0, never) while the verdict claimed it.
    let out = small_demo(&["--rounds", "1"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("  fork    the child read all 8 MiB"),
        "no fork ran:\n{stdout}"
    );
    assert!(
        stdout.contains("verdict: OK") && stdout.contains("fork, "),
        "{stdout}"
    );
    let out = small_demo(&["--rounds", "2", "--no-fork"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(!stdout.contains("  fork "), "{stdout}");
    let verdict = stdout
        .lines()
        .find(|l| l.starts_with("verdict: OK"))
        .unwrap_or_else(|| panic!("no OK verdict:\n{stdout}"));
    assert!(
        verdict.contains("no fork") && !verdict.contains(" fork,"),
        "{verdict}"
    );
}
