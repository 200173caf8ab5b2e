//! The committed header, include/uhmm.h, is what cbindgen makes of this
//! crate now; and it compiles as C and as C++ with every warning an error.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn generate() -> String {
    let crate_dir = env!("CARGO_MANIFEST_DIR");
    let config = cbindgen::Config::from_file(Path::new(crate_dir).join("cbindgen.toml"))
        .expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen could not generate the header");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("the header is UTF-8")
}

#[test]
fn header_is_up_to_date() {
    let path = root().join("include/uhmm.h");
    let fresh = generate();
    if std::env::var_os("UHMM_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &fresh).expect("write include/uhmm.h");
        eprintln!("wrote {}", path.display());
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != fresh {
        let line = committed
            .lines()
            .zip(fresh.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || committed.lines().count().min(fresh.lines().count()) + 1,
                |i| i + 1,
            );
        panic!(
            "include/uhmm.h is stale: it differs from what cbindgen generates from crates/uhmm-capi \
             (first at line {line}).\nRegenerate it with: UHMM_BLESS=1 cargo test -p uhmm-capi --test header"
        );
    }
}

/// Whether `compiler` runs; if not, the test is skipped (a failure where
/// every capability is required: CI, or `UHMM_REQUIRE_ALL=1`).
fn have(compiler: &str) -> bool {
    if Command::new(compiler).arg("--version").output().is_ok() {
        return true;
    }
    let required = std::env::var("UHMM_REQUIRE_ALL").is_ok_and(|v| v == "1")
        || std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !required,
        "required capability missing (CI must not skip): {compiler}"
    );
    eprintln!("SKIPPED: no {compiler} to compile include/uhmm.h with");
    false
}

fn compile(compiler: &str, args: &[&str], src: &str, ext: &str) {
    if !have(compiler) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("uhmm-header-{}-{ext}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join(format!("use_header.{ext}"));
    std::fs::write(&file, src).expect("write source");
    let out = Command::new(compiler)
        .args(args)
        .arg("-I")
        .arg(root().join("include"))
        .arg("-c")
        .arg(&file)
        .arg("-o")
        .arg(dir.join("use_header.o"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {compiler}: {e}"));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{compiler} {args:?} failed on include/uhmm.h:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Uses a little of everything, so that the compiler sees the types.
const USE: &str = r#"
#include <uhmm.h>
static bool inv(void *ctx, const uhmm_subscription *sub, const uhmm_notifier_range *r, uint64_t seq) {
    (void)ctx; (void)r;
    return uhmm_subscription_set_seq(sub, seq) == 0;
}
static int to_ram(void *ctx, uhmm_fault *f) { (void)ctx; (void)f; return 0; }
int use_header(void);
int use_header(void) {
    uhmm_mm *mm = NULL;
    uhmm_notifier *n = NULL;
    uhmm_pagemap_ops ops = { NULL, to_ram, NULL };
    uhmm_mm_stats st;
    uint64_t pfns[4] = { UHMM_PFN_REQ_FAULT | UHMM_PFN_REQ_WRITE, 0, 0, 0 };
    uhmm_range r = { NULL, 0, 0, 4 * UHMM_PAGE_SIZE, UHMM_PFN_REQ_FAULT, UHMM_PFN_REQ_WRITE, 0, pfns, 4 };
    (void)ops; (void)r;
    if (uhmm_mm_create(&mm) != 0) return 1;
    (void)uhmm_notifier_insert(mm, 0, UHMM_PAGE_SIZE, inv, NULL, &n);
    (void)uhmm_mm_get_stats(mm, &st);
    return uhmm_mm_destroy(mm) + (int)uhmm_last_error()[0] + (int)st.invalidations[UHMM_EVENT_RELEASE];
}
"#;

#[test]
fn header_compiles_as_c() {
    compile(
        "cc",
        &["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic"],
        USE,
        "c",
    );
}

#[test]
fn header_compiles_as_cpp() {
    compile(
        "c++",
        &["-std=c++17", "-Wall", "-Wextra", "-Werror"],
        USE,
        "cpp",
    );
}
