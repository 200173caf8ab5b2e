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

/// The user the unprivileged runs use (`nobody`).
const NOBODY: u32 = 65534;

/// The user and group this test runs as (`/proc/self` belongs to them).
fn ids() -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let me = std::fs::metadata("/proc/self").expect("/proc/self");
    (me.uid(), me.gid())
}

fn is_root() -> bool {
    ids().0 == 0
}

/// Runs `uhmm` as an unprivileged user: as root, as `nobody` (no
/// supplementary groups), from a copy of the binary in a fresh directory
/// anyone may read (the build directory may not be); otherwise as the
/// user running the test.
fn uhmm_unprivileged(args: &[&str]) -> std::process::Output {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    if !is_root() {
        return uhmm(args);
    }
    let dir = std::env::temp_dir().join(format!(
        "uhmm-info-test-{}-{}",
        std::process::id(),
        args.join("-")
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(&dir)
        .expect("make a directory for the binary");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("uhmm");
    std::fs::copy(env!("CARGO_BIN_EXE_uhmm"), &bin).expect("copy the binary");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    // With a uid set, std drops the supplementary groups (setgroups(0))
    // before setgid and setuid. ETXTBSY: a child another test forked
    // meanwhile still has the copy open for writing until it execs.
    let mut tries = 0;
    let out = loop {
        match Command::new(&bin)
            .args(args)
            .current_dir(&dir)
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
        {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => break r.expect("run uhmm as nobody"),
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    out
}

/// Whether an unprivileged user gets only a user-mode-only userfaultfd
/// here: `vm.unprivileged_userfaultfd=0` and `/dev/userfaultfd` not
/// read-write for it (by its mode bits; ACLs aside). As not root, whether
/// this user does.
fn user_mode_only_expected() -> bool {
    use std::os::unix::fs::MetadataExt;
    let sysctl = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    if sysctl != Some(0) {
        return false;
    }
    let Ok(node) = std::fs::metadata("/dev/userfaultfd") else {
        return true;
    };
    let (uid, gid) = if is_root() { (NOBODY, NOBODY) } else { ids() };
    let mode = node.mode();
    let rw = if node.uid() == uid {
        (mode >> 6) & 0o6
    } else if node.gid() == gid {
        (mode >> 3) & 0o6
    } else {
        mode & 0o6
    };
    rw != 0o6
}

/// What `uhmm info --json` says about kernel-mode faults agrees with
/// itself: the mode it reports, the missing item for user-mode-only mode
/// (with the library's impact and fix texts, which README and DESIGN.md
/// repeat), and nothing claiming a forked child cannot see device pages.
fn check_mode_report(v: &serde_json::Value) {
    let serves = v["userfaultfd"]["serves_kernel_faults"]
        .as_bool()
        .expect("serves_kernel_faults");
    let missing = v["missing"].as_array().expect("missing");
    let item = missing
        .iter()
        .find(|m| m["item"] == "userfaultfd for kernel-mode faults");
    if serves {
        assert!(item.is_none(), "full mode, yet {item:?}");
    } else {
        let item = item.expect("user-mode-only mode names what it cannot do");
        assert_eq!(item["impact"], uhmm::sys::probe::USER_MODE_ONLY_IMPACT);
        assert_eq!(item["fix"], uhmm::sys::probe::KERNEL_FAULTS_FIX);
        let impact = item["impact"].as_str().unwrap();
        for what in ["EFAULT", "read(2)", "on a device", "fork work"] {
            assert!(impact.contains(what), "{what:?} missing from {impact}");
        }
    }
    for m in missing {
        let text = m.to_string();
        assert!(
            !text.contains("fork") || !text.contains("cannot"),
            "a missing item says fork does not work: {text}"
        );
    }
}

#[test]
fn info_as_root_reports_full_mode() {
    let out = uhmm(&["info", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    check_mode_report(&v);
    if is_root() {
        assert_eq!(v["userfaultfd"]["serves_kernel_faults"], true);
        let text = String::from_utf8(uhmm(&["info"]).stdout).unwrap();
        assert!(text.contains("(serves kernel-mode faults"), "{text}");
    }
}

/// As an unprivileged user (`nobody`, when the test runs as root): `uhmm
/// info` reports user-mode-only mode, says what works and what fails with
/// EFAULT, and how to get full mode.
#[test]
fn info_as_an_unprivileged_user_says_what_fails() {
    let out = uhmm_unprivileged(&["info", "--json"]);
    assert!(
        out.status.success(),
        "uhmm info as an unprivileged user: {out:?}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    check_mode_report(&v);
    if user_mode_only_expected() {
        assert_eq!(v["userfaultfd"]["serves_kernel_faults"], false);
        assert_eq!(
            v["userfaultfd"]["used"],
            "userfaultfd(2) with UFFD_USER_MODE_ONLY"
        );
        let out = uhmm_unprivileged(&["info"]);
        let text = String::from_utf8(out.stdout).unwrap();
        for what in [
            "user-mode faults only",
            "userfaultfd for kernel-mode faults: CPU loads and stores",
            "EFAULT",
            "vm.unprivileged_userfaultfd=1",
            "/dev/userfaultfd",
        ] {
            assert!(text.contains(what), "{what:?} missing in:\n{text}");
        }
    }
}

/// The demo works for an unprivileged user as `uhmm info` says: its
/// forked child sees the parent's data, device-resident pages included.
#[test]
fn demo_runs_as_an_unprivileged_user() {
    let out = uhmm_unprivileged(&["demo", "--size", "8", "--rounds", "2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo as an unprivileged user failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("matches the parent") && stdout.contains("verdict: OK"),
        "{stdout}"
    );
    if user_mode_only_expected() {
        assert!(stderr.contains("UFFD_USER_MODE_ONLY"), "{stderr}");
    }
}
