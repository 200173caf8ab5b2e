//! The C programs: examples/c/mini_device.c (the example device) and
//! tests/c/*.c, compiled with `cc` against the freshly built libuhmm.a (and
//! libuhmm.so) and run; a compile error or a non-zero exit fails the test.
//!
//! Cargo does not build a package's cdylib/staticlib for its integration
//! tests (only an rlib would be a dependency of them), so the first test
//! to need the library runs `cargo build -p uhmm-capi --lib` into the same
//! target directory and profile as this test binary: the library is then
//! always built from the current source, from a clean checkout too.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// What the static library needs from the system (rustc's
/// `--print native-static-libs` for this target).
const NATIVE_LIBS: &[&str] = &[
    "-lgcc_s",
    "-lutil",
    "-lrt",
    "-lpthread",
    "-lm",
    "-ldl",
    "-lc",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds the library (once per test process) and returns the directory
/// holding libuhmm.a and libuhmm.so.
fn lib_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // <target>[/<triple>]/<profile>/deps/<this test>
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test binary is in <profile>/deps")
            .to_path_buf();
        let profile = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("profile directory name")
            .to_string();
        let above = profile_dir.parent().expect("target directory");
        // A target directory holds CACHEDIR.TAG; a <triple> directory in it
        // does not.
        let (target_dir, triple) = if above.join("CACHEDIR.TAG").exists() {
            (above.to_path_buf(), None)
        } else {
            let t = above.parent().expect("target directory").to_path_buf();
            let triple = above.file_name().and_then(|n| n.to_str()).map(String::from);
            (t, triple)
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "uhmm-capi", "--lib", "--target-dir"])
            .arg(&target_dir)
            .current_dir(root());
        match profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            p => {
                cmd.args(["--profile", p]);
            }
        }
        if let Some(t) = triple {
            cmd.args(["--target", &t]);
        }
        let out = cmd.output().expect("run cargo build -p uhmm-capi");
        assert!(
            out.status.success(),
            "cargo build -p uhmm-capi failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for lib in ["libuhmm.a", "libuhmm.so"] {
            assert!(
                profile_dir.join(lib).exists(),
                "{} was not built",
                profile_dir.join(lib).display()
            );
        }
        profile_dir
    })
}

/// Where a test's build outputs go.
fn out_dir(name: &str) -> PathBuf {
    let d = lib_dir().join("c-tests").join(name);
    std::fs::create_dir_all(&d).expect("create the C test directory");
    d
}

enum Link {
    Static,
    Shared,
}

/// Compiles `src` (relative to the repository root) into an executable
/// named for `test` (tests run in parallel: each compiles its own).
fn compile(src: &str, link: Link, test: &str) -> PathBuf {
    let name = Path::new(src)
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("name");
    let kind = match link {
        Link::Static => "static",
        Link::Shared => "shared",
    };
    let exe = out_dir(name).join(format!("{name}-{kind}-{test}"));
    let mut cmd = Command::new("cc");
    cmd.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O2", "-g", "-I"])
        .arg(root().join("include"))
        .arg(root().join(src))
        .arg("-o")
        .arg(&exe);
    match link {
        Link::Static => {
            cmd.arg(lib_dir().join("libuhmm.a")).args(NATIVE_LIBS);
        }
        Link::Shared => {
            cmd.arg("-L")
                .arg(lib_dir())
                .arg(format!("-Wl,-rpath,{}", lib_dir().display()))
                .arg("-luhmm");
        }
    }
    let out = cmd.output().expect("run cc");
    assert!(
        out.status.success(),
        "cc failed on {src}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Runs `exe` with `args` and `env`, killed after a minute (a hang fails
/// the test).
fn run(exe: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(exe)
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!(
                "{} hung (killed after 60 s); its output:\n{}{}",
                exe.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn assert_passes(exe: &Path) -> String {
    assert_passes_with(exe, &[])
}

/// Runs `exe` with `args`; its output, which it must exit 0 with.
fn assert_passes_with(exe: &Path, args: &[&str]) -> String {
    let out = run(exe, args, &[]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{} {args:?} exited with {:?}:\n{text}",
        exe.display(),
        out.status
    );
    println!("{text}");
    text
}

#[test]
fn mini_device_example_static() {
    let text = assert_passes(&compile("examples/c/mini_device.c", Link::Static, "static"));
    assert!(text.contains("mini_device: all 15 checks passed"), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
}

#[test]
fn mini_device_example_shared() {
    let text = assert_passes(&compile("examples/c/mini_device.c", Link::Shared, "shared"));
    assert!(text.contains("checks passed"), "{text}");
}

/// The example's checks can fail: a device that corrupts one byte of its
/// memory makes it exit 1, naming the check.
#[test]
fn mini_device_example_fails_on_corrupt_data() {
    let exe = compile("examples/c/mini_device.c", Link::Static, "corrupt");
    let out = run(&exe, &[], &[("MINI_DEVICE_CORRUPT", "1")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("FAIL the CPU reads back every byte it wrote")
            && text.contains("1 bytes differ"),
        "{text}"
    );
}

#[test]
fn error_paths() {
    let text = assert_passes(&compile(
        "crates/uhmm-capi/tests/c/errors.c",
        Link::Static,
        "test",
    ));
    assert!(text.contains("errors: all"), "{text}");
}

#[test]
fn api_paths() {
    let text = assert_passes(&compile(
        "crates/uhmm-capi/tests/c/paths.c",
        Link::Static,
        "test",
    ));
    assert!(text.contains("paths: all"), "{text}");
}

/// uhmm calls from an atexit handler, a pthread_key destructor and a
/// notifier's callback at exit (`UHMM_EVENT_RELEASE`), where the calling
/// thread's thread-locals are being destroyed, answer as at any other
/// time (they used to abort the process).
#[test]
fn calls_during_thread_and_process_teardown() {
    let exe = compile("crates/uhmm-capi/tests/c/teardown.c", Link::Static, "test");
    for mode in ["atexit", "key", "release"] {
        let text = assert_passes_with(&exe, &[mode]);
        let ok = format!("teardown: {mode} ok");
        assert!(text.contains(&ok), "teardown {mode}:\n{text}");
    }
}

/// The C snippet of README's "Using uhmm from C and C++" compiles, links
/// and runs.
#[test]
fn readme_snippet() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let section = readme
        .split("## Using uhmm from C and C++")
        .nth(1)
        .expect("README has the section");
    let code = section
        .split("```c\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("the section has a C snippet");
    let dir = out_dir("readme");
    std::fs::write(dir.join("readme.c"), code).expect("write the snippet");
    let exe = dir.join("readme");
    let out = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root().join("include"))
        .arg(dir.join("readme.c"))
        .arg(lib_dir().join("libuhmm.a"))
        .args(NATIVE_LIBS)
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("run cc");
    assert!(
        out.status.success(),
        "README's C snippet does not compile:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = assert_passes(&exe);
    assert!(text.contains("page 0: valid"), "{text}");
}
