//! `uhmm run`: runs an unmodified program with its large private anonymous
//! memory managed by uhmm, through `libuhmm_preload.so` (crate
//! `uhmm-preload`) in `LD_PRELOAD`.
//!
//! The library is looked for, in order: `$UHMM_PRELOAD` (a path to it),
//! next to the `uhmm` binary (`target/<profile>/`, where `cargo build`
//! puts both), in `deps/` below it, and in `../lib/` beside it (an
//! installed layout: `bin/uhmm`, `lib/libuhmm_preload.so`). Its path
//! goes first in `LD_PRELOAD`, before any the environment has (kept). A
//! path with a space or a colon, which `LD_PRELOAD` cannot hold, is
//! replaced by the file's canonical path if that has neither, and refused
//! (exit status 2) otherwise.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The file name of the preload library.
const LIB: &str = "libuhmm_preload.so";

/// `uhmm run [--chaos RATE] [--threshold BYTES] [--stats FILE] -- PROGRAM [ARGS...]`
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Keep moving random managed ranges to the software device and back,
    /// RATE migrations a second (per process), while the program runs.
    #[arg(long, value_name = "RATE")]
    chaos: Option<f64>,
    /// Manage private anonymous mappings and malloc blocks of at least
    /// this many bytes (at least 4096).
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20)]
    threshold: usize,
    /// The software device's memory in MiB (default 16 GiB): with less
    /// than the program's, migrations past it fail (and are counted).
    #[arg(long, value_name = "MIB")]
    device_memory: Option<usize>,
    /// Append each process's statistics to FILE as one JSON object a line
    /// (the file is emptied first), instead of a line on stderr.
    #[arg(long, value_name = "FILE")]
    stats: Option<PathBuf>,
    /// The program and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<OsString>,
}

/// Finds the preload library (see the module documentation).
fn find_lib() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("UHMM_PRELOAD").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(std::path::absolute(&p).unwrap_or(p))
        } else {
            Err(format!("UHMM_PRELOAD={} is not a file", p.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the uhmm binary: {e}"))?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let candidates = [
        dir.join(LIB),
        dir.join("deps").join(LIB),
        dir.join("..").join("lib").join(LIB),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            format!(
                "{LIB} not found next to {} (build it: `cargo build -p uhmm-preload`, \
             or set UHMM_PRELOAD to its path)",
                exe.display()
            )
        })
}

/// Why `path` cannot be an entry of `LD_PRELOAD`, if it cannot. The
/// dynamic linker splits the variable at every space and colon, with no
/// way to escape one, and skips an entry of `PATH_MAX` (4096) bytes or
/// more: such a library is not loaded, and the program runs unmanaged.
fn not_preload_safe(path: &Path) -> Option<&'static str> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    if bytes.contains(&b' ') {
        Some("a space")
    } else if bytes.contains(&b':') {
        Some("a colon")
    } else if bytes.len() >= 4096 {
        Some("4096 bytes or more")
    } else {
        None
    }
}

/// `lib`, or the same file by its canonical path (symlinks resolved), as
/// it can go in `LD_PRELOAD`; an error saying why and what to do if
/// neither can.
///
/// A copy or a link at a path of our choosing is not made: the library
/// is loaded again by every program the program execs, after `uhmm run`
/// itself is gone (it execs the program), so nothing could remove it; and
/// a directory every user may write (`/tmp`) would let another user put
/// a library of theirs in its place, to run inside the program. Where to
/// put a copy is the user's choice, so it is the user's step.
fn preload_path(lib: PathBuf) -> Result<PathBuf, String> {
    let Some(why) = not_preload_safe(&lib) else {
        return Ok(lib);
    };
    if let Ok(real) = std::fs::canonicalize(&lib)
        && not_preload_safe(&real).is_none()
    {
        return Ok(real);
    }
    Err(format!(
        "the library's path {} has {why}, which LD_PRELOAD cannot hold (the dynamic \
         linker splits it at spaces and colons, with no escape, and ignores entries of \
         4096 bytes or more): copy {LIB} to a directory whose path has neither and set \
         UHMM_PRELOAD to the copy",
        lib.display()
    ))
}

/// `program` as `execvp` would find it.
fn resolve(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return Some(program.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// This process's real user and group ids (`/proc/self/status`), if
/// they can be read.
fn real_ids() -> Option<(u32, u32)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let real = |key: &str| -> Option<u32> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line[key.len()..].split_whitespace().next()?.parse().ok()
    };
    Some((real("Uid:")?, real("Gid:")?))
}

/// Why the dynamic linker will ignore `LD_PRELOAD` for this file, if it
/// will: a static ELF executable (no `PT_INTERP`), or one that runs in
/// secure mode (`AT_SECURE`): setuid to another user than the real one,
/// or setgid to another group. A setuid file owned by the user running it
/// (root running a setuid-root program) changes no id: the library is
/// loaded then, and nothing is said.
fn not_preloadable(path: &Path) -> Option<&'static str> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    let mode = meta.permissions().mode();
    if mode & 0o6000 != 0 {
        // (Ids that cannot be read: taken as secure mode.)
        let (uid, gid) = real_ids().unwrap_or((u32::MAX, u32::MAX));
        if mode & 0o4000 != 0 && meta.uid() != uid {
            return Some("setuid to another user");
        }
        if mode & 0o2000 != 0 && meta.gid() != gid {
            return Some("setgid to another group");
        }
    }
    let bytes = std::fs::read(path).ok()?;
    // An ELF64 little-endian file; anything else (a script) is run by an
    // interpreter, which is then what gets the library.
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return None;
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let phoff = u64_at(32)? as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    const PT_INTERP: u32 = 3;
    let has_interp = (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        bytes
            .get(o..o + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            == Some(PT_INTERP)
    });
    (!has_interp).then_some("statically linked")
}

/// Whether this process may open a userfaultfd that serves kernel-mode
/// faults (the library, run by the program as this user, needs one under
/// `--chaos`); the error says what to do if not.
fn kernel_faults() -> Result<(), uhmm::sys::uffd::OpenError> {
    use uhmm::sys::uffd::{AccessPolicy, Uffd};
    Uffd::builder()
        .access(AccessPolicy::FullOnly)
        .open()
        .map(drop)
}

pub fn run(args: &Args) -> ExitCode {
    let lib = match find_lib().and_then(preload_path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("uhmm run: {e}");
            return ExitCode::from(2);
        }
    };
    if args.threshold < 4096 {
        eprintln!("uhmm run: --threshold must be at least 4096 (a page)");
        return ExitCode::from(2);
    }
    if let Some(r) = args.chaos
        && !(r.is_finite() && r > 0.0)
    {
        eprintln!("uhmm run: --chaos must be a positive rate (migrations a second)");
        return ExitCode::from(2);
    }
    if args.chaos.is_some()
        && let Err(e) = kernel_faults()
    {
        eprintln!(
            "uhmm run: --chaos needs a userfaultfd that serves kernel-mode faults (system \
             calls on pages chaos moved to the device fail with EFAULT otherwise): {e}"
        );
        return ExitCode::from(2);
    }
    let program = Path::new(&args.command[0]);
    if let Some(why) = resolve(program).as_deref().and_then(not_preloadable) {
        eprintln!(
            "uhmm run: {} is {why}: the dynamic linker ignores LD_PRELOAD for it, so it \
             runs unmanaged",
            program.display()
        );
    }
    let mut cmd = std::process::Command::new(program);
    cmd.args(&args.command[1..]);
    let preload = match std::env::var_os("LD_PRELOAD").filter(|p| !p.is_empty()) {
        Some(old) => {
            let mut p = lib.into_os_string();
            p.push(":");
            p.push(old);
            p
        }
        None => lib.into_os_string(),
    };
    cmd.env("LD_PRELOAD", preload);
    cmd.env("UHMM_RUN_THRESHOLD", args.threshold.to_string());
    match args.chaos {
        Some(r) => cmd.env("UHMM_RUN_CHAOS", r.to_string()),
        None => cmd.env_remove("UHMM_RUN_CHAOS"),
    };
    match args.device_memory {
        Some(m) if m > 0 => cmd.env("UHMM_RUN_DEVICE_MIB", m.to_string()),
        Some(_) => {
            eprintln!("uhmm run: --device-memory must be at least 1 (MiB)");
            return ExitCode::from(2);
        }
        None => cmd.env_remove("UHMM_RUN_DEVICE_MIB"),
    };
    match &args.stats {
        Some(f) => {
            if let Err(e) = std::fs::write(f, b"") {
                eprintln!("uhmm run: cannot write {}: {e}", f.display());
                return ExitCode::from(2);
            }
            cmd.env(
                "UHMM_RUN_STATS",
                std::path::absolute(f).unwrap_or(f.clone()),
            );
        }
        None => {
            cmd.env_remove("UHMM_RUN_STATS");
        }
    }
    // Replaces this process: the program's exit status (or signal) is
    // the status of `uhmm run`.
    let e = cmd.exec();
    eprintln!("uhmm run: cannot run {}: {e}", program.display());
    ExitCode::from(if e.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}
