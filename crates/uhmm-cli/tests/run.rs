//! `uhmm run` on programs no one here wrote: each runs plain and under
//! `uhmm run --chaos`, and the outputs (and exit statuses) must be the same
//! byte for byte, while the chaos run reports CPU faults served from device
//! memory (`faults_device` summed over its processes) and loses nothing.
//!
//! A program the machine lacks is a skip (`SKIPPED` on stderr), and a
//! failure under CI (`CI=true` or `UHMM_REQUIRE_ALL=1`), as the other
//! tests' missing capabilities are.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Migrations a second of the chaos runs.
const CHAOS: &str = "1000";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The uhmm binary's directory (`target/<profile>`).
fn profile_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_uhmm"))
        .parent()
        .expect("the binary's directory")
        .to_path_buf()
}

/// Builds libuhmm_preload.so (once per test process) into the uhmm
/// binary's directory, where `uhmm run` looks for it, and returns its path.
fn preload() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let dir = profile_dir();
        let profile = dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("profile directory name")
            .to_string();
        let above = dir.parent().expect("target directory");
        let (target_dir, triple) = if above.join("CACHEDIR.TAG").exists() {
            (above.to_path_buf(), None)
        } else {
            let t = above.parent().expect("target directory").to_path_buf();
            (
                t,
                above.file_name().and_then(|n| n.to_str()).map(String::from),
            )
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "uhmm-preload", "--lib", "--target-dir"])
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
        let out = cmd.output().expect("run cargo build -p uhmm-preload");
        assert!(
            out.status.success(),
            "cargo build -p uhmm-preload failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lib = dir.join("libuhmm_preload.so");
        assert!(lib.exists(), "{} was not built", lib.display());
        lib
    })
}

/// A scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let d = profile_dir().join("run-tests").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch directory");
    d
}

/// Whether `program` is on PATH; a skip (a failure under CI) if not.
fn have(program: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        let required = std::env::var("UHMM_REQUIRE_ALL").is_ok_and(|v| v == "1")
            || std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        if required {
            panic!("{program} is not installed (CI must not skip: see .ci/run)");
        }
        let name = std::thread::current().name().unwrap_or("?").to_owned();
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!("SKIPPED {name}: {program} is not installed\n").as_bytes(),
        );
    }
    found
}

/// The statistics of a run: one JSON object per process.
#[derive(Debug)]
struct Stats(Vec<serde_json::Value>);

impl Stats {
    fn sum(&self, key: &str) -> u64 {
        self.0.iter().map(|v| v[key].as_u64().unwrap_or(0)).sum()
    }
}

/// Runs `cmd` to its end, with its output, or kills it (and panics)
/// after `secs` seconds: a program that hangs under `uhmm run` fails its
/// test instead of hanging it.
fn output_within(mut cmd: Command, secs: u64) -> Output {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the program");
    let mut o = child.stdout.take().expect("stdout");
    let mut e = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = o.read_to_end(&mut b);
        b
    });
    let err = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = e.read_to_end(&mut b);
        b
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for the program") {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err.join().unwrap_or_default();
            panic!(
                "{cmd:?} still ran after {secs} s (hung): killed; stderr:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// `uhmm run`'s binary with `lib` as the library to preload, in `dir`.
fn uhmm_command(lib: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uhmm"));
    cmd.env("UHMM_PRELOAD", lib).current_dir(dir);
    cmd
}

/// Runs `argv` under `uhmm run` with `opts`, in `dir` (at most 120 s).
fn under_uhmm(dir: &Path, opts: &[&str], argv: &[&str]) -> (Output, Stats) {
    let stats = dir.join(format!("stats-{}.jsonl", std::process::id()));
    let mut cmd = uhmm_command(preload(), dir);
    cmd.arg("run")
        .args(opts)
        .arg("--stats")
        .arg(&stats)
        .arg("--")
        .args(argv);
    let out = output_within(cmd, 120);
    let text = std::fs::read_to_string(&stats).unwrap_or_default();
    let v = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad stats line {l:?}: {e}")))
        .collect();
    (out, Stats(v))
}

fn plain(dir: &Path, argv: &[&str]) -> Output {
    Command::new(argv[0])
        .args(&argv[1..])
        .current_dir(dir)
        .output()
        .expect("run the program")
}

/// Runs `argv` plain and under `uhmm run --chaos`: same stdout, same exit
/// status, device faults served, nothing lost. Returns the chaos run's
/// statistics.
fn same_under_chaos(dir: &Path, argv: &[&str]) -> Stats {
    let reference = plain(dir, argv);
    assert!(
        reference.status.success(),
        "{argv:?} failed when run plain: {}",
        String::from_utf8_lossy(&reference.stderr)
    );
    assert!(!reference.stdout.is_empty(), "{argv:?} printed nothing");
    let (out, stats) = under_uhmm(dir, &["--chaos", CHAOS], argv);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        reference.status.code(),
        "exit status under uhmm run --chaos; stderr:\n{stderr}"
    );
    assert!(
        out.stdout == reference.stdout,
        "{argv:?}: the output under uhmm run --chaos differs from the plain run's \
         ({} bytes against {}); stderr:\n{stderr}",
        out.stdout.len(),
        reference.stdout.len()
    );
    assert!(
        !stats.0.is_empty(),
        "no process reported statistics; stderr:\n{stderr}"
    );
    for key in [
        "pages_lost",
        "faults_sigbus",
        "callback_panics",
        "manage_failures",
    ] {
        assert_eq!(stats.sum(key), 0, "{key} under chaos: {stats:?}");
    }
    assert!(
        !stderr.contains("runs unmanaged") && !stderr.contains("left unmanaged"),
        "a process ran unmanaged: {stderr}"
    );
    assert!(
        stats
            .0
            .iter()
            .all(|v| v["serves_kernel_faults"] == serde_json::Value::Bool(true)),
        "chaos runs with a userfaultfd that serves kernel-mode faults: {stats:?}"
    );
    assert!(
        stats.sum("faults_device") > 0,
        "{argv:?}: no CPU fault was served from device memory under chaos: {stats:?}"
    );
    assert!(stats.sum("pages_to_device") > 0, "{stats:?}");
    stats
}

/// Deterministic text: `n` lines of pseudo-random words.
fn text(n: usize) -> String {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut s = String::with_capacity(n * 24);
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(&format!("{:016x} {} {}\n", x, i % 977, x % 1_000_003));
    }
    s
}

#[test]
fn python_sorts_a_large_list() {
    if !have("python3") {
        return;
    }
    let dir = scratch("python");
    let script = "import hashlib, random\n\
        random.seed(7)\n\
        a = [(random.random(), str(i)) for i in range(600000)]\n\
        a.sort()\n\
        d = {k: v for v, k in a[:200000]}\n\
        print(len(a), len(d), hashlib.sha256(repr(a[::97]).encode()).hexdigest())\n";
    same_under_chaos(&dir, &["python3", "-c", script]);
}

#[test]
fn python_threads() {
    if !have("python3") {
        return;
    }
    let dir = scratch("python-threads");
    let script = "import hashlib, threading\n\
        out = [None] * 4\n\
        def work(k):\n    \
            a = [(i * 2654435761 + k) % 1000003 for i in range(250000)]\n    \
            a.sort()\n    \
            out[k] = hashlib.sha256(repr(a).encode()).hexdigest()\n\
        ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]\n\
        [t.start() for t in ts]\n\
        [t.join() for t in ts]\n\
        print(out)\n";
    same_under_chaos(&dir, &["python3", "-c", script]);
}

#[test]
fn sort_of_a_large_file() {
    if !have("sort") {
        return;
    }
    let dir = scratch("sort");
    std::fs::write(dir.join("in.txt"), text(300_000)).expect("input");
    // Two threads, one in-memory buffer (no temporary files).
    same_under_chaos(&dir, &["sort", "--parallel=2", "-S", "64M", "in.txt"]);
}

#[test]
fn xz_round_trip_with_two_threads() {
    if !have("xz") || !have("sha256sum") {
        return;
    }
    let dir = scratch("xz");
    std::fs::write(dir.join("in.txt"), text(200_000)).expect("input");
    same_under_chaos(
        &dir,
        &[
            "sh",
            "-c",
            "xz -1 -T2 -c in.txt > in.txt.xz && xz -dc in.txt.xz | sha256sum && \
             xz -l in.txt.xz | tail -n 1",
        ],
    );
}

#[test]
fn shell_pipeline_forks_and_execs() {
    if !have("sort") || !have("gzip") || !have("sha256sum") {
        return;
    }
    let dir = scratch("pipeline");
    std::fs::write(dir.join("in.txt"), text(200_000)).expect("input");
    let stats = same_under_chaos(
        &dir,
        &[
            "sh",
            "-c",
            "sort -S 32M in.txt | gzip -c | gunzip -c | sort -r -S 32M | sha256sum; \
             (sort -k3 -n -S 32M in.txt | tail -c 1000000 | wc -c) & wait",
        ],
    );
    let pids: std::collections::BTreeSet<u64> =
        stats.0.iter().filter_map(|v| v["pid"].as_u64()).collect();
    assert!(
        pids.len() >= 3,
        "each sort reports for its own process: {stats:?}"
    );
}

#[test]
fn sqlite3_loads_and_queries() {
    if !have("sqlite3") {
        return;
    }
    let dir = scratch("sqlite3");
    let sql = "create table t(a integer, b text);\
        with recursive c(x) as (select 1 union all select x+1 from c where x<300000)\
        insert into t select (x*7919)%300007, hex((x*2654435761)%4294967296) from c;\
        select count(*), sum(a), max(b) from t;\
        create index i on t(b);\
        select a from t order by b limit 5;\
        select sum(length(b)), min(b) from (select b from t order by a);\
        select a%100, count(*) from t group by a%100 order by 2 desc, 1 limit 3;";
    same_under_chaos(&dir, &["sqlite3", ":memory:", sql]);
}

/// A process that forks with managed memory (device pages included): the
/// child reads its copy of the parent's data, makes large allocations of
/// its own (its own `Mm`), and both report.
#[test]
fn python_forks_with_managed_memory() {
    if !have("python3") {
        return;
    }
    let dir = scratch("python-fork");
    let script = "import hashlib, os, sys\n\
        a = [i * 7 % 1000003 for i in range(1500000)]\n\
        for r in range(3):\n    \
            sys.stdout.flush()\n    \
            pid = os.fork()\n    \
            if pid == 0:\n        \
                b = sorted(a)\n        \
                c = [x + r for x in b]\n        \
                print('child', r, hashlib.sha256(repr(c[::11]).encode()).hexdigest())\n        \
                sys.stdout.flush()\n        \
                sys.exit(0)\n    \
            os.waitpid(pid, 0)\n    \
            a = [x + 1 for x in a]\n\
        print('parent', hashlib.sha256(repr(a).encode()).hexdigest())\n";
    let stats = same_under_chaos(&dir, &["python3", "-c", script]);
    let pids: std::collections::BTreeSet<u64> =
        stats.0.iter().filter_map(|v| v["pid"].as_u64()).collect();
    assert_eq!(
        pids.len(),
        4,
        "the parent and three children report: {stats:?}"
    );
}

/// Without chaos nothing moves: the same output, no page on the device,
/// memory managed.
#[test]
fn without_chaos_memory_is_managed_and_stays_home() {
    if !have("python3") {
        return;
    }
    let dir = scratch("no-chaos");
    let argv = [
        "python3",
        "-c",
        "a = list(range(3000000)); a.reverse(); print(sum(a[::3]))",
    ];
    let reference = plain(&dir, &argv);
    let (out, stats) = under_uhmm(&dir, &[], &argv);
    assert_eq!(out.stdout, reference.stdout);
    assert!(out.status.success());
    assert_eq!(stats.0.len(), 1, "{stats:?}");
    assert!(stats.sum("managed_bytes_peak") >= 24 << 20, "{stats:?}");
    assert!(stats.sum("malloc_blocks_managed") > 0, "{stats:?}");
    assert_eq!(stats.sum("pages_to_device"), 0, "{stats:?}");
    assert_eq!(stats.sum("faults_device"), 0, "{stats:?}");
}

/// The exit status of the program is `uhmm run`'s, and a missing program
/// is 127, as in a shell.
#[test]
fn exit_status_is_the_programs() {
    let dir = scratch("status");
    let (out, _) = under_uhmm(&dir, &[], &["sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    let (out, _) = under_uhmm(&dir, &[], &["/nonexistent/program"]);
    assert_eq!(out.status.code(), Some(127));
    let (out, _) = under_uhmm(&dir, &["--chaos", "0"], &["true"]);
    assert_eq!(out.status.code(), Some(2), "a rate of 0 is refused");
}

/// tests/run/bad_input.c, compiled with `cc`: half a managed mapping
/// unmapped, the rest grown by mremap, a discard, a fork with pages on the
/// device, malloc blocks grown and shrunk, more memory than the device
/// (32 MiB here) holds, and an exit from a signal handler. The same output
/// plain and under chaos, and no process left behind.
#[test]
fn bad_input_program() {
    if !have("cc") {
        return;
    }
    let dir = scratch("bad-input");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/run/bad_input.c");
    let exe = dir.join("bad_input");
    let cc = Command::new("cc")
        .args(["-O1", "-Wall", "-Werror", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("run cc");
    assert!(
        cc.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let exe = exe.to_str().expect("a UTF-8 path");
    let reference = plain(&dir, &[exe]);
    assert!(
        reference.status.success(),
        "bad_input fails plain:\n{}",
        String::from_utf8_lossy(&reference.stdout)
    );
    let (out, stats) = under_uhmm(&dir, &["--chaos", CHAOS, "--device-memory", "32"], &[exe]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "under chaos: {stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&reference.stdout),
        "stderr:\n{stderr}"
    );
    assert_eq!(
        stats.0.len(),
        2,
        "the parent and the child report: {stats:?}"
    );
    assert!(stats.sum("faults_device") > 0, "{stats:?}");
    assert!(stats.sum("tails_managed") > 0, "the mremap tail: {stats:?}");
    assert!(stats.sum("discards") > 0, "{stats:?}");
    assert!(
        stats.sum("chaos_failed") > 0,
        "a 32 MiB device runs out: {stats:?}"
    );
    for key in ["pages_lost", "faults_sigbus", "callback_panics"] {
        assert_eq!(stats.sum(key), 0, "{key}: {stats:?}");
    }
    // No process is left: nothing still runs the program.
    let left = running(exe);
    assert!(left.is_empty(), "processes left: {left:?}");
}

/// The processes whose command line starts with `exe` (read from /proc:
/// no `pgrep` needed).
fn running(exe: &str) -> Vec<u32> {
    let procs = std::fs::read_dir("/proc").expect("read /proc");
    let found: Vec<u32> = procs
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|&b| b == 0).next() == Some(exe.as_bytes()))
        })
        .collect();
    found
}

/// Compiles tests/run/NAME.c with `cc` into `dir`; the executable's path.
fn compile(dir: &Path, name: &str) -> String {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/run/{name}.c"));
    let exe = dir.join(name);
    let cc = Command::new("cc")
        .args(["-O1", "-Wall", "-Werror", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("run cc");
    assert!(
        cc.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    exe.to_str().expect("a UTF-8 path").to_owned()
}

/// tests/run/fork_device.c: a fork with more than 20,000 managed pages on
/// the device. uhmm's fork hook brings them home on the forking thread,
/// growing a list of them past the threshold through the interposed
/// `malloc`; that allocation must be glibc's, not a managed block (whose
/// `Mm::manage` waits for the lock the hook holds: the program hung).
#[test]
fn fork_with_many_device_pages() {
    if !have("cc") {
        return;
    }
    let dir = scratch("fork-device");
    let exe = compile(&dir, "fork_device");
    let argv = [exe.as_str(), "20000"];
    let reference = plain(&dir, &argv);
    assert!(reference.status.success(), "fork_device fails plain");
    let (out, stats) = under_uhmm(&dir, &["--chaos", "2000", "--threshold", "65536"], &argv);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "under chaos: {stderr}");
    assert_eq!(out.stdout, reference.stdout, "stderr:\n{stderr}");
    assert_eq!(
        stats.0.len(),
        2,
        "the parent and the child report: {stats:?}"
    );
    assert!(stats.sum("pages_to_system") >= 20000, "{stats:?}");
    for key in ["pages_lost", "faults_sigbus", "callback_panics"] {
        assert_eq!(stats.sum(key), 0, "{key}: {stats:?}");
    }
}

/// A chaos rate below one a second is honoured (it was taken as one), and
/// the exit does not wait for the next migration (10 s away: the bound
/// leaves a loaded machine 4.5 s to start python).
#[test]
fn slow_chaos_rate() {
    if !have("python3") {
        return;
    }
    let dir = scratch("slow-chaos");
    let started = std::time::Instant::now();
    let (out, stats) = under_uhmm(
        &dir,
        &["--chaos", "0.1"],
        &[
            "python3",
            "-c",
            "import time; a = bytearray(32 << 20); time.sleep(1.5); print(len(a))",
        ],
    );
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stats.0.len(), 1, "{stats:?}");
    assert_eq!(
        stats.sum("chaos_to_device") + stats.sum("chaos_to_system") + stats.sum("chaos_failed"),
        0,
        "one migration in 10 s, none in the first 1.5 s: {stats:?}"
    );
    assert!(took.as_secs_f64() < 6.0, "took {took:?}");
}

/// Without a userfaultfd that serves kernel-mode faults (an unprivileged
/// user, `vm.unprivileged_userfaultfd=0`), `uhmm run --chaos` refuses with
/// exit status 2 and says how to enable it, and the library asked for
/// chaos runs the program unmanaged, saying why (chaos would make its
/// system calls on device pages fail with EFAULT). Needs root (to become
/// `nobody` with `setpriv`) and the sysctl off; a skip otherwise.
#[test]
fn chaos_needs_kernel_mode_faults() {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    let sysctl = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .is_ok_and(|v| v.trim() == "0");
    if !root || !sysctl || !have("setpriv") || !have("python3") {
        eprintln!("SKIPPED chaos_needs_kernel_mode_faults: needs root and the sysctl at 0");
        return;
    }
    let nobody = |argv: &[&std::ffi::OsStr]| {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .args(argv)
            .current_dir("/");
        output_within(cmd, 60)
    };
    let uhmm = std::ffi::OsStr::new(env!("CARGO_BIN_EXE_uhmm"));
    let lib = preload().as_os_str();
    let mut preload_env = std::ffi::OsString::from("UHMM_PRELOAD=");
    preload_env.push(lib);
    let out = nobody(&[
        "env".as_ref(),
        &preload_env,
        uhmm,
        "run".as_ref(),
        "--chaos".as_ref(),
        "10".as_ref(),
        "--".as_ref(),
        "true".as_ref(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "refused: {stderr}");
    assert!(stderr.contains("kernel-mode faults"), "{stderr}");
    let mut ld = std::ffi::OsString::from("LD_PRELOAD=");
    ld.push(lib);
    let out = nobody(&[
        "env".as_ref(),
        &ld,
        "UHMM_RUN_CHAOS=100".as_ref(),
        "python3".as_ref(),
        "-c".as_ref(),
        "a = bytearray(8 << 20); print(len(a))".as_ref(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(out.stdout, b"8388608\n");
    assert!(
        stderr.contains("runs unmanaged") && stderr.contains("kernel-mode faults"),
        "{stderr}"
    );
}

/// tests/run/aligned.c with another malloc (the ASan runtime) in
/// `LD_PRELOAD` after uhmm's library: every malloc-family call, the
/// aligned allocators included, goes to that allocator (a block of its
/// freed as glibc's aborted the program), and the library says so once.
/// A skip where no ASan runtime is found.
#[test]
fn another_malloc_in_ld_preload() {
    if !have("cc") {
        return;
    }
    let asan = Command::new("cc")
        .arg("-print-file-name=libasan.so")
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|p| p.is_absolute() && p.exists());
    let Some(asan) = asan else {
        eprintln!("SKIPPED another_malloc_in_ld_preload: no ASan runtime");
        return;
    };
    let dir = scratch("aligned");
    let exe = compile(&dir, "aligned");
    let reference = plain(&dir, &[&exe]);
    assert!(reference.status.success());
    let mut cmd = uhmm_command(preload(), &dir);
    cmd.env("LD_PRELOAD", &asan)
        .env("ASAN_OPTIONS", "detect_leaks=0:verify_asan_link_order=0")
        .args(["run", "--threshold", "65536", "--", &exe]);
    let out = output_within(cmd, 60);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(out.stdout, reference.stdout, "{stderr}");
    assert!(stderr.contains("another malloc"), "{stderr}");
    // And with glibc's: the same output.
    let (out, _) = under_uhmm(&dir, &["--threshold", "65536"], &[&exe]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, reference.stdout);
}

/// Compiles tests/run/NAME.c with `cc` into `dir` as a shared library
/// (NAME.so); its path.
fn compile_lib(dir: &Path, name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/run/{name}.c"));
    let lib = dir.join(format!("{name}.so"));
    let cc = Command::new("cc")
        .args(["-O1", "-Wall", "-Werror", "-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .output()
        .expect("run cc");
    assert!(
        cc.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    lib
}

/// The dynamic linker splits `LD_PRELOAD` at every space and colon, with
/// no escape: a library whose path has one was not loaded (the program
/// ran unmanaged, with ld.so's "cannot be preloaded" on stderr, and
/// `uhmm run` exited 0). `uhmm run` refuses such a path with exit status
/// 2, saying why and what to do; a symlink with such a path to a file
/// whose own path is fine is followed and used.
#[test]
fn preload_path_with_space_or_colon() {
    let dir = scratch("preload-path");
    for name in ["with space", "with:colon"] {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).expect("directory");
        let lib = d.join("libuhmm_preload.so");
        std::fs::copy(preload(), &lib).expect("copy the library");
        let mut cmd = uhmm_command(&lib, &dir);
        cmd.args(["run", "--", "true"]);
        let out = output_within(cmd, 60);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name:?} refused: {stderr}");
        assert!(
            stderr.contains("LD_PRELOAD") && stderr.contains("UHMM_PRELOAD"),
            "says why and what to do: {stderr}"
        );
        assert!(!stderr.contains("cannot be preloaded"), "{stderr}");
    }
    // A link whose path has a space, to the library's own file: the
    // file's path goes in LD_PRELOAD, and the library is loaded.
    let link = dir.join("with space").join("link.so");
    std::os::unix::fs::symlink(preload(), &link).expect("symlink");
    let mut cmd = uhmm_command(&link, &dir);
    cmd.args(["run", "--", "cat", "/proc/self/maps"]);
    let out = output_within(cmd, 60);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let real = std::fs::canonicalize(preload()).expect("the library's path");
    let maps = String::from_utf8_lossy(&out.stdout);
    assert_mapped(&maps, &real, &stderr);
}

/// Asserts that the library file `lib` is mapped in the process whose
/// `/proc/self/maps` is `maps` (`stderr`: the run's, for the message).
fn assert_mapped(maps: &str, lib: &Path, stderr: &str) {
    assert!(
        maps.contains(lib.to_str().expect("a UTF-8 path")),
        "{} is not mapped: {maps}\n{stderr}",
        lib.display()
    );
}

/// An `LD_PRELOAD` already in the environment is kept, after uhmm's
/// library (so that uhmm's `malloc` and `mmap` come first): both are
/// loaded into the program.
#[test]
fn existing_ld_preload_is_kept() {
    if !have("cc") {
        return;
    }
    let dir = scratch("existing-preload");
    let other = compile_lib(&dir, "slow_mmap");
    let ours = std::fs::canonicalize(preload()).expect("the library's path");
    let mut cmd = uhmm_command(preload(), &dir);
    cmd.env("LD_PRELOAD", &other).args([
        "run",
        "--",
        "sh",
        "-c",
        "printf '%s\\n' \"$LD_PRELOAD\"; cat /proc/self/maps",
    ]);
    let out = output_within(cmd, 60);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let text = String::from_utf8_lossy(&out.stdout);
    let (ld_preload, maps) = text.split_once('\n').expect("two parts");
    assert_eq!(
        ld_preload,
        format!("{}:{}", ours.display(), other.display()),
        "{stderr}"
    );
    for lib in [&ours, &other] {
        assert_mapped(maps, lib, &stderr);
    }
}

/// tests/run/fork_grow.c: a forked child grows (realloc) a malloc block
/// it inherited, in place, on one thread, while another thread of the
/// child forks. The grow took the heap lock and then made the child's
/// `Mm`, whose registration waits for uhmm's fork lock; the forking
/// thread held that lock (uhmm's prepare hook) and waited for the heap
/// lock (this library's prepare hook, which runs after uhmm's): the child
/// hung. tests/run/slow_mmap.c, in `LD_PRELOAD` after uhmm's library,
/// holds the growing thread inside the library for 300 ms (in the
/// mapping of the grown part) and the program forks meanwhile, so that
/// the interleaving happens every run. A hung child is ended by SIGALRM
/// after 10 s.
#[test]
fn fork_while_a_child_grows_a_block() {
    if !have("cc") {
        return;
    }
    let dir = scratch("fork-grow");
    let slow = compile_lib(&dir, "slow_mmap");
    let exe = compile(&dir, "fork_grow");
    let stats = dir.join("stats.jsonl");
    let mut cmd = uhmm_command(preload(), &dir);
    cmd.env("LD_PRELOAD", &slow)
        .arg("run")
        .arg("--stats")
        .arg(&stats)
        .args(["--", &exe]);
    let out = output_within(cmd, 60);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(
        stdout, "held 1, forked 1, grown in place, data ok\n",
        "{stderr}"
    );
    // The child made its own `Mm` (in the grow) and reported.
    let lines = std::fs::read_to_string(&stats).unwrap_or_default();
    assert!(lines.lines().count() >= 2, "{lines}");
}

/// tests/run/mremap_pieces.c: a managed mapping grown by `mremap` is two
/// pieces (the mapping and its grown tail), and more after a partial
/// munmap and an mprotect split; each is grown again. The kernel
/// registers a grown tail with its mapping, so each tail must be managed
/// too; a tail was managed only when one piece covered the whole old
/// range, so after the first growth no tail was (chaos never moved them,
/// and the library's pieces and uhmm's regions disagreed). The same
/// output plain and under chaos; every tail managed.
#[test]
fn mremap_of_a_mapping_in_several_pieces() {
    if !have("cc") {
        return;
    }
    let dir = scratch("mremap-pieces");
    let exe = compile(&dir, "mremap_pieces");
    let reference = plain(&dir, &[&exe]);
    assert!(reference.status.success(), "mremap_pieces fails plain");
    let (out, stats) = under_uhmm(&dir, &["--chaos", CHAOS], &[&exe]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "under chaos: {stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&reference.stdout),
        "stderr:\n{stderr}"
    );
    assert_eq!(stats.0.len(), 1, "{stats:?}");
    assert_eq!(stats.sum("tails_managed"), 4, "four growths: {stats:?}");
    assert_eq!(
        stats.sum("managed_bytes_peak"),
        40 << 20,
        "the whole 40 MiB mapping: {stats:?}"
    );
    assert_eq!(
        stats.sum("managed_bytes_at_exit"),
        26 << 20,
        "uhmm manages the 26 MiB left: {stats:?}"
    );
    for key in ["pages_lost", "faults_sigbus", "callback_panics"] {
        assert_eq!(stats.sum(key), 0, "{key}: {stats:?}");
    }
}

/// tests/run/rlimit_as.c under a 1 GiB `RLIMIT_AS`, set by the program
/// after it started, by a child of it on its parent's pid (`prlimit`
/// from outside: before the library followed that, the program's
/// reservation stayed, and it could allocate nothing more: "small 7",
/// every block and the mapping "failed"), and by the shell before
/// (`ulimit -v`): the same
/// output as plain, and large malloc blocks still managed. The library
/// reserved 256 GiB of address space for its blocks, which counts
/// against the limit: a program that lowered its limit could map nothing
/// more (it aborted in its first allocation after), and one started under
/// a limit had no reservation, so no block was managed.
#[test]
fn low_address_space_limit() {
    if !have("cc") {
        return;
    }
    let dir = scratch("rlimit-as");
    let exe = compile(&dir, "rlimit_as");
    let lowered = [exe.as_str(), "lower"];
    let from_outside = [exe.as_str(), "other"];
    let ulimit = ["sh", "-c", "ulimit -v 1048576 && exec ./rlimit_as"];
    for argv in [&lowered[..], &from_outside[..], &ulimit[..]] {
        let reference = plain(&dir, argv);
        assert!(reference.status.success(), "{argv:?} fails plain");
        let (out, stats) = under_uhmm(&dir, &[], argv);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{argv:?}: {stderr}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&reference.stdout),
            "{argv:?}: {stderr}"
        );
        assert_eq!(stats.0.len(), 1, "{argv:?}: {stats:?}");
        assert!(
            stats.sum("malloc_blocks_managed") > 0,
            "{argv:?}: {stats:?}"
        );
        assert_eq!(stats.sum("manage_failures"), 0, "{argv:?}: {stats:?}");
    }
}

/// tests/run/limit_outside.c: `RLIMIT_AS` lowered by another process
/// (a child prlimits its parent), which no call of the program sees.
/// Each call that needs address space follows it: before, a thread, a
/// large calloc, realloc or posix_memalign as the first call after it
/// failed (glibc maps those itself; only mmap and malloc looked), and
/// while eight threads mapped in a loop, the ones that saw the new limit
/// while another thread was cutting the reservation failed (in 5 of 6
/// runs). The same output as plain; the race three times.
#[test]
fn a_limit_lowered_from_outside_is_followed() {
    if !have("cc") {
        return;
    }
    let dir = scratch("limit-outside");
    let exe = compile(&dir, "limit_outside");
    for mode in [
        "thread", "calloc", "realloc", "memalign", "race", "race", "race",
    ] {
        let argv = [exe.as_str(), mode];
        let reference = plain(&dir, &argv);
        assert_eq!(
            String::from_utf8_lossy(&reference.stdout),
            format!("{mode} ok\n"),
            "plain"
        );
        let (out, _) = under_uhmm(&dir, &[], &argv);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&reference.stdout),
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// tests/run/as_full.c: a program that lowers its `RLIMIT_AS`, fills it
/// with large and then small malloc blocks until malloc says no, and then
/// frees and allocates large blocks again. uhmm's own allocations (a new
/// `Mm`, a new managed block, the chaos thread's lists) come from a pool
/// of its own, not the program's heap: before it, the first one after the
/// limit was full aborted the program, every run ("memory allocation of
/// 96 bytes failed", exit 134). Same output plain and under `uhmm run`,
/// with and without chaos, at a limit where uhmm manages blocks and at one
/// too low for uhmm to run at all (it says so and stays out). Then
/// tests/run/as_below.c: the limit lowered below what is mapped, after
/// uhmm manages 64 MiB: the pool, cut for the new limit, keeps room for
/// what uhmm does for that memory (cut to what it held, it aborted).
#[test]
fn a_program_that_fills_its_address_space() {
    if !have("cc") {
        return;
    }
    let dir = scratch("as-full");
    let exe = compile(&dir, "as_full");
    for (limit_mib, size, managed) in [
        ("300", "1048576", true),
        ("64", "4194304", true),
        ("40", "1048576", false),
    ] {
        let argv = [exe.as_str(), limit_mib, size];
        for (opts, stats, stderr) in same_with_and_without_chaos(&dir, &argv) {
            if managed {
                assert_eq!(stats.0.len(), 1, "{opts:?} {argv:?}: {stats:?}");
                assert!(
                    stats.sum("malloc_blocks_managed") > 0,
                    "{opts:?} {argv:?}: {stats:?}"
                );
                assert_eq!(stats.sum("pages_lost"), 0, "{opts:?} {argv:?}: {stats:?}");
            } else {
                assert!(
                    stderr.contains("left for uhmm's own memory"),
                    "{opts:?} {argv:?}: uhmm should say why it stays out: {stderr}"
                );
            }
        }
    }
    let exe = compile(&dir, "as_below");
    for limit_mib in ["16", "1"] {
        let argv = [exe.as_str(), limit_mib];
        for (opts, stats, _) in same_with_and_without_chaos(&dir, &argv) {
            assert!(
                stats.sum("malloc_blocks_managed") > 0,
                "{opts:?} {argv:?}: {stats:?}"
            );
            assert_eq!(stats.sum("pages_lost"), 0, "{opts:?} {argv:?}: {stats:?}");
        }
    }
}

/// Runs `argv` plain, then under `uhmm run` without and with chaos: each
/// succeeds with the plain run's output. Returns each managed run's
/// options, stats and stderr.
fn same_with_and_without_chaos(
    dir: &Path,
    argv: &[&str],
) -> Vec<(&'static [&'static str], Stats, String)> {
    let reference = plain(dir, argv);
    assert!(
        reference.status.success(),
        "{argv:?} fails plain: {}",
        String::from_utf8_lossy(&reference.stderr)
    );
    let mut runs = Vec::new();
    for opts in [&[][..], &["--chaos", "500"][..]] {
        let (out, stats) = under_uhmm(dir, opts, argv);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "{opts:?} {argv:?}: {:?} {stderr}",
            out.status
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&reference.stdout),
            "{opts:?} {argv:?}: {stderr}"
        );
        runs.push((opts, stats, stderr));
    }
    runs
}

/// tests/run/free_rss.c: large blocks allocated, written and freed in a
/// loop, and large blocks shrunk by realloc, with the program's resident
/// memory read after each round: at most 32 MiB may stay resident beyond
/// what it holds. Freed blocks kept for reuse kept their memory (up to
/// 128 MiB), and a shrunk block all of its old length. Then under chaos
/// (no bound: the device's memory is the process's too) blocks freed,
/// discarded and reused by calloc read as zeros. The same output plain.
#[test]
fn freed_memory_is_given_back() {
    if !have("cc") {
        return;
    }
    let dir = scratch("free-rss");
    let exe = compile(&dir, "free_rss");
    let reference = plain(&dir, &[&exe]);
    assert!(
        reference.status.success(),
        "free_rss fails plain: {}",
        String::from_utf8_lossy(&reference.stderr)
    );
    for (opts, argv) in [
        (&[][..], &[exe.as_str()][..]),
        (&["--chaos", "200"][..], &[exe.as_str(), "any"][..]),
    ] {
        let (out, stats) = under_uhmm(&dir, opts, argv);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{opts:?}: {stderr}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&reference.stdout),
            "{opts:?}: {stderr}"
        );
        assert!(stats.sum("malloc_blocks_managed") > 0, "{stats:?}");
        for key in ["pages_lost", "faults_sigbus", "callback_panics"] {
            assert_eq!(stats.sum(key), 0, "{key}: {stats:?}");
        }
    }
}

/// A skip for `reason` (`SKIPPED` on stderr), or a failure where every
/// test must run (`UHMM_REQUIRE_ALL=1`, CI), as `have`'s.
fn skip(reason: &str) {
    let required = std::env::var("UHMM_REQUIRE_ALL").is_ok_and(|v| v == "1")
        || std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let name = std::thread::current().name().unwrap_or("?").to_owned();
    if required {
        panic!("{name} cannot run: {reason} (CI must not skip)");
    }
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("SKIPPED {name}: {reason}\n").as_bytes(),
    );
}

/// The notices `uhmm run` gives for a program the dynamic linker runs
/// without `LD_PRELOAD`.
fn unmanaged_notices(stderr: &str) -> usize {
    stderr
        .lines()
        .filter(|l| l.contains("ignores LD_PRELOAD"))
        .count()
}

/// A statically linked program, and setuid copies of a small dynamic one
/// (tests/run/small.c): the same output as plain. The static one and the
/// one setuid to another user (`nobody`: the dynamic linker runs it in
/// secure mode and ignores `LD_PRELOAD`) run unmanaged, and `uhmm run`
/// says so on stderr exactly once. One setuid to the user running it is
/// not secure mode: the library is loaded and manages its memory, so no
/// notice (`uhmm run` said it ran unmanaged, which was false).
#[test]
fn static_and_setuid_programs() {
    if !have("cc") {
        return;
    }
    let dir = scratch("static-setuid");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/run/small.c");
    let dynamic = compile(&dir, "small");
    let reference = plain(&dir, &[&dynamic]);
    assert!(reference.status.success(), "small fails plain");

    let check_unmanaged = |exe: &str, what: &str| {
        let plain_out = plain(&dir, &[exe]);
        assert!(plain_out.status.success(), "{what} fails plain");
        assert_eq!(plain_out.stdout, reference.stdout, "{what}");
        let (out, stats) = under_uhmm(&dir, &[], &[exe]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{what}: {stderr}");
        assert_eq!(out.stdout, reference.stdout, "{what}: {stderr}");
        assert_eq!(
            unmanaged_notices(&stderr),
            1,
            "{what}: one notice: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{what}: nothing else: {stderr}");
        assert!(stats.0.is_empty(), "{what}: nothing managed: {stats:?}");
    };

    let stat = dir.join("small-static");
    let cc = Command::new("cc")
        .args(["-O1", "-Wall", "-Werror", "-static", "-o"])
        .arg(&stat)
        .arg(&src)
        .output()
        .expect("run cc");
    if cc.status.success() {
        check_unmanaged(stat.to_str().expect("a UTF-8 path"), "static");
    } else {
        skip(&format!(
            "cc -static fails (no static C library?): {}",
            String::from_utf8_lossy(&cc.stderr)
        ));
    }

    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    if !root {
        skip("setuid copies need root (to give one to another user)");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let setuid_copy = |name: &str, uid: u32| {
        let p = dir.join(name);
        std::fs::copy(&dynamic, &p).expect("copy");
        std::os::unix::fs::chown(&p, Some(uid), None).expect("chown");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o4755)).expect("chmod");
        p.to_str().expect("a UTF-8 path").to_owned()
    };
    // Setuid to nobody, run by root: secure mode.
    let nobody = setuid_copy("small-setuid-nobody", 65534);
    check_unmanaged(&nobody, "setuid nobody");
    // Setuid to root, run by root: not secure mode, managed.
    let own = setuid_copy("small-setuid-root", 0);
    let (out, stats) = under_uhmm(&dir, &[], &[&own]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(out.stdout, reference.stdout, "{stderr}");
    assert_eq!(unmanaged_notices(&stderr), 0, "no notice: {stderr}");
    assert_eq!(stats.0.len(), 1, "the library ran: {stats:?}");
    assert!(stats.sum("malloc_blocks_managed") >= 1, "{stats:?}");
}

/// tests/run/own_uffd.c: a program that opens its own userfaultfd,
/// registers an 8 MiB mapping and an 8 MiB malloc block for MISSING
/// faults and serves them from a thread (UFFDIO_COPY), grows the mapping
/// with mremap, and checks that a block malloc'd after its registered
/// block was freed is plain memory, and so in a forked child that
/// registers an inherited block. Both ranges are large, so uhmm
/// manages them first, and a range can be registered with one
/// userfaultfd only: the program's UFFDIO_REGISTER failed with EBUSY.
/// The library interposes `ioctl` and hands the range over before the
/// registration (pages on the device come home first: under chaos the
/// program waits before registering). The same output and exit status
/// plain, under `uhmm run` and under chaos.
#[test]
fn program_with_its_own_userfaultfd() {
    if !have("cc") {
        return;
    }
    let dir = scratch("own-uffd");
    let exe = compile(&dir, "own_uffd");
    let reference = plain(&dir, &[&exe]);
    let ref_out = String::from_utf8_lossy(&reference.stdout);
    if ref_out.contains("FAIL userfaultfd") {
        skip(&format!("no userfaultfd for the program: {ref_out}"));
        return;
    }
    assert!(
        reference.status.success(),
        "own_uffd fails plain: {ref_out}"
    );
    // Under chaos, 300 ms between each mmap / malloc and its registration:
    // pages are on the device when the range is handed over.
    let waiting = [exe.as_str(), "wait"];
    for (opts, argv) in [
        (&[][..], &[exe.as_str()][..]),
        (&["--chaos", CHAOS][..], &waiting[..]),
    ] {
        let (out, stats) = under_uhmm(&dir, opts, argv);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            ref_out,
            "{opts:?}: stderr:\n{stderr}"
        );
        assert_eq!(
            out.status.code(),
            reference.status.code(),
            "{opts:?}: {stderr}"
        );
        assert_eq!(stats.0.len(), 1, "{opts:?}: {stats:?}");
        // Both were managed first, then handed over.
        assert!(stats.sum("mappings_managed") >= 1, "{opts:?}: {stats:?}");
        assert!(
            stats.sum("malloc_blocks_managed") >= 1,
            "{opts:?}: {stats:?}"
        );
        assert_eq!(stats.sum("ranges_handed_over"), 2, "{opts:?}: {stats:?}");
        assert_eq!(
            stats.sum("bytes_handed_over"),
            16 << 20,
            "{opts:?}: {stats:?}"
        );
        if !opts.is_empty() {
            assert!(stats.sum("pages_to_device") > 0, "{stats:?}");
        }
        for key in ["pages_lost", "faults_sigbus", "callback_panics"] {
            assert_eq!(stats.sum(key), 0, "{key}: {opts:?}: {stats:?}");
        }
    }
}

/// tests/run/profiler.c, under `--chaos`: a profiler's SIGALRM handler
/// writes untouched pages of a managed block every 50 µs while the program
/// maps and unmaps large buffers (each managed on its thread, under uhmm's
/// lock; under chaos the handler's pages may be on the device). Before,
/// a handler that interrupted the program inside uhmm waited for the fault
/// service, which waited for that lock: the program hung every time (found
/// by an adversarial review). The library now blocks asynchronous signals
/// while it works on a program's thread.
#[test]
fn a_signal_handler_touching_managed_memory_while_the_program_maps() {
    if !have("cc") {
        return;
    }
    let dir = scratch("profiler");
    let exe = compile(&dir, "profiler");
    let reference = plain(&dir, &[&exe]);
    assert!(reference.status.success(), "plain: {reference:?}");
    let (out, stats) = under_uhmm(&dir, &["--chaos", CHAOS], &[&exe]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\nstderr:\n{stderr}");
    assert_eq!(stdout, "done: samples taken\n", "stderr:\n{stderr}");
    assert!(stats.sum("mappings_managed") + stats.sum("malloc_blocks_managed") >= 1);
}

/// tests/run/sig_register.c: a SIGALRM handler registers a page of a large
/// block with the program's own userfaultfd (and unregisters it) every
/// 200 µs, while the main thread allocates small blocks, or only large
/// ones. The library's hand-over takes locks and allocates: from a handler
/// that interrupted the allocator or the library it must not (the program
/// hung: the handler waited for the heap lock or glibc's arena lock that
/// the interrupted code held). It ends, and each register succeeds or
/// fails with EBUSY (not handed over) or EINVAL.
#[test]
fn userfaultfd_register_from_a_signal_handler() {
    if !have("cc") {
        return;
    }
    let dir = scratch("sig-register");
    let exe = compile(&dir, "sig_register");
    let reference = plain(&dir, &[&exe, "2"]);
    let ref_out = String::from_utf8_lossy(&reference.stdout);
    assert!(reference.status.success(), "plain: {ref_out}");
    for mode in [&[][..], &["big"][..]] {
        let mut argv = vec![exe.as_str(), "2"];
        argv.extend_from_slice(mode);
        let (out, stats) = under_uhmm(&dir, &[], &argv);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{mode:?}: {stdout}\nstderr:\n{stderr}"
        );
        let registered: u64 = stdout
            .split_whitespace()
            .skip_while(|w| *w != "registered")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{mode:?}: no count in {stdout:?}"));
        assert!(registered > 0, "{mode:?}: nothing handed over: {stdout}");
        assert!(stats.sum("mappings_managed") + stats.sum("malloc_blocks_managed") >= 1);
    }
}
