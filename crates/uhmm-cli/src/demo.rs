//! `uhmm demo`: both pillars of HMM on real memory, verified.
//!
//! An array of `u64` lives in ordinary (managed) process memory. Each
//! round, the software device takes one chunk of it into its own memory
//! and computes over it there (`x → 3x + 1`, through its mirror), while
//! CPU threads keep incrementing elements all over the rest of the array
//! through plain pointers — touching pages a device holds brings them
//! back. Midway the process forks and the child checks that it sees the
//! parent's data, device-resident pages included. At the end the device is
//! removed (its pages come home) and every element is compared with a
//! plain model of what the program did.

use crate::bench::cpu;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use uhmm::mm::notifier::NotifyEvent;
use uhmm::mm::{ManagedRegion, Mm, PageState};
use uhmm::sys::mem::Mapping;
use uhmm::{PAGE_SIZE, PageRange, VirtAddr};
use uhmm_sim::SimDevice;

/// Arguments of `uhmm demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Size of the array, in MiB (1 to 65536). The demo cuts it into 4
    /// chunks of whole 2 MiB pages, so it rounds a size that is not a
    /// multiple of 8 MiB up, and says so. It needs about twice the size in
    /// memory (the array and its model).
    #[arg(long, default_value_t = 64, value_name = "MIB",
          value_parser = clap::value_parser!(u64).range(1..=65_536))]
    size: u64,
    /// CPU threads updating the array while the device works (1 to 1024).
    #[arg(long, default_value_t = 2, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    threads: u32,
    /// Rounds of device work, each on one chunk of the array (1 to
    /// 100000).
    #[arg(long, default_value_t = 8, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    rounds: u32,
    /// Element updates per CPU thread per round (0 to 1000000000).
    #[arg(long, default_value_t = 20_000, value_name = "N",
          value_parser = clap::value_parser!(u64).range(0..=1_000_000_000))]
    updates: u64,
    /// Do not fork midway.
    #[arg(long)]
    no_fork: bool,
}

/// Chunks the array is cut into; the device works on one per round.
const CHUNKS: usize = 4;
/// What each chunk is a whole number of: 2 MiB pages, so that the chunks
/// can be backed by transparent huge pages.
const CHUNK_GRANULE: usize = 2 << 20;
/// Width of a residency strip.
const STRIP: usize = 64;
/// Debug builds only: the CPU thread with this index (as a decimal number)
/// panics at the start of its first round, so that the tests can check
/// that a panicked worker makes the verdict FAIL.
#[cfg(debug_assertions)]
const PANIC_THREAD_VAR: &str = "UHMM_DEMO_PANIC_THREAD";

pub fn run(args: &Args) -> ExitCode {
    match demo(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("uhmm demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn elem(region: &ManagedRegion, i: usize) -> VirtAddr {
    VirtAddr::new(region.range().start().get() + i * 8)
}

/// A small deterministic generator (xorshift64*), one per thread.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The layout of the array.
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// Elements.
    n: usize,
    /// Elements per chunk.
    per_chunk: usize,
}

/// The elements CPU thread `t` increments in `round`, in order: `updates`
/// random ones outside chunk `c` (the device's this round). Deterministic,
/// so the model replays exactly what the thread did.
fn updates_of(
    layout: Layout,
    round: u32,
    t: u32,
    c: usize,
    updates: u64,
) -> impl Iterator<Item = usize> {
    let Layout { n, per_chunk } = layout;
    // Distinct for every (round, thread): threads are at most 1024.
    let seed = (u64::from(round) << 10) + u64::from(t) + 1;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed);
    (0..updates).map(move |_| {
        let mut i = (rng.next() % n as u64) as usize;
        if i / per_chunk == c {
            i = (i + per_chunk) % n;
        }
        i
    })
}

/// The text of a panic's payload.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// The CPU thread that is to panic (debug builds, for the tests).
fn panic_thread() -> Option<u32> {
    #[cfg(debug_assertions)]
    {
        std::env::var(PANIC_THREAD_VAR)
            .ok()
            .and_then(|v| v.parse().ok())
    }
    #[cfg(not(debug_assertions))]
    {
        None
    }
}

fn demo(args: &Args) -> Result<bool, Box<dyn std::error::Error>> {
    let t0 = Instant::now();
    let granule = CHUNKS * CHUNK_GRANULE;
    let asked = usize::try_from(args.size)
        .ok()
        .and_then(|mib| mib.checked_mul(1 << 20))
        .ok_or_else(|| format!("--size {}: too large for this machine", args.size))?;
    let len = asked
        .checked_next_multiple_of(granule)
        .ok_or_else(|| format!("--size {}: too large for this machine", args.size))?;
    if len != asked {
        println!(
            "size rounded up from {} to {} MiB: the demo needs whole {} MiB pages in each of its {CHUNKS} chunks",
            args.size,
            len >> 20,
            CHUNK_GRANULE >> 20
        );
    }
    let n = len / 8;
    let layout = Layout {
        n,
        per_chunk: n / CHUNKS,
    };
    let per_chunk = layout.per_chunk;
    let fork_round = (!args.no_fork).then_some((args.rounds / 2).max(1));
    let panic_thread = panic_thread();
    let mm = Mm::new()?;
    let region = mm.alloc_mapping(Mapping::builder(len).align(CHUNK_GRANULE))?;
    let dev = SimDevice::new(&mm);
    eprintln!(
        "uhmm demo: {} MiB array of u64 in managed memory, {} CPU threads, {} rounds, {} updates per thread per round; userfaultfd via {}",
        len >> 20,
        args.threads,
        args.rounds,
        args.updates,
        mm.access()
    );
    let mut model: Vec<u64> = (0..n as u64).collect();
    for (i, &v) in model.iter().enumerate() {
        cpu::write_u64(elem(&region, i), v);
    }
    println!("residency (D device, # system, . empty), one strip per round:");
    println!("  start   {}", strip(&mm, region.range()));
    let mut fork_verdict: Option<Result<(), String>> = None;
    for round in 0..args.rounds {
        let c = round as usize % CHUNKS;
        let chunk = PageRange::new(elem(&region, c * per_chunk), per_chunk * 8)?;
        // CPU threads update the other chunks, concurrently with the device.
        let (spawned, device, panicked) = std::thread::scope(|s| {
            let mut workers = Vec::with_capacity(args.threads as usize);
            let mut spawned = Ok(());
            for t in 0..args.threads {
                let region = &region;
                let updates = args.updates;
                let must_panic = round == 0 && panic_thread == Some(t);
                let worker = std::thread::Builder::new()
                    .name(format!("uhmm-demo-cpu-{t}"))
                    .spawn_scoped(s, move || {
                        assert!(!must_panic, "panic injected by the tests");
                        for i in updates_of(layout, round, t, c, updates) {
                            cpu::add_u64(elem(region, i), 1);
                        }
                    });
                match worker {
                    Ok(h) => workers.push((t, h)),
                    Err(e) => {
                        spawned = Err(format!(
                            "cannot start CPU thread {t} ({t} of {} started): {e}",
                            args.threads
                        ));
                        break;
                    }
                }
            }
            // The device works only if every thread could start.
            let device = spawned.is_ok().then(|| device_round(&dev, chunk));
            // Every thread is joined here (a panic is reported, not lost).
            let panicked: Vec<String> = workers
                .into_iter()
                .filter_map(|(t, h)| {
                    h.join()
                        .err()
                        .map(|p| format!("CPU thread {t} panicked ({})", panic_message(&*p)))
                })
                .collect();
            (spawned, device, panicked)
        });
        if !panicked.is_empty() {
            if let Some(Err(e)) = &device {
                eprintln!("uhmm demo: round {}: {e}", round + 1);
            }
            println!();
            println!(
                "verdict: FAILED — round {} did not run to its end: {}",
                round + 1,
                panicked.join("; ")
            );
            return Ok(false);
        }
        spawned?;
        let moved = device.ok_or("the device round did not run")??;
        for t in 0..args.threads {
            for i in updates_of(layout, round, t, c, args.updates) {
                model[i] = model[i].wrapping_add(1);
            }
        }
        for v in &mut model[c * per_chunk..(c + 1) * per_chunk] {
            *v = v.wrapping_mul(3).wrapping_add(1);
        }
        println!("  round {:<2} {}", round + 1, strip(&mm, region.range()));
        eprintln!(
            "round {}/{}: device took {moved} of the {} pages of chunk {c} into its memory and computed over the chunk; {} pages on the device now",
            round + 1,
            args.rounds,
            chunk.npages(),
            dev.device_pages()
        );
        if fork_round == Some(round + 1) {
            let on_device = dev.device_pages();
            let verdict = fork_check(&region, &model);
            println!(
                "  fork    the child read all {} MiB ({on_device} pages were on the device): {}",
                len >> 20,
                match &verdict {
                    Ok(()) => "matches the parent".to_string(),
                    Err(e) => format!("FAILED: {e}"),
                }
            );
            fork_verdict = Some(verdict);
        }
    }
    let before_removal = dev.device_pages();
    let sim = dev.stats();
    let memory = dev.memory_stats();
    drop(dev);
    println!("  removed {}", strip(&mm, region.range()));
    let wrong = (0..n)
        .filter(|&i| cpu::read_u64(elem(&region, i)) != model[i])
        .count();
    let st = mm.stats();
    println!();
    println!("summary ({:.2?} wall)", round_ms(t0.elapsed()));
    let rows: Vec<(String, String)> = vec![
        (
            "CPU faults on device pages (blocks brought back)".into(),
            st.faults_device.to_string(),
        ),
        ("CPU faults on holes".into(), st.faults_hole.to_string()),
        (
            "CPU faults that waited".into(),
            st.faults_waited.to_string(),
        ),
        (
            "pages migrated to the device".into(),
            format!(
                "{} ({} MiB)",
                st.pages_to_device,
                (st.pages_to_device * 4) >> 10
            ),
        ),
        (
            "pages migrated to system memory".into(),
            format!(
                "{} ({} MiB)",
                st.pages_to_system,
                (st.pages_to_system * 4) >> 10
            ),
        ),
        (
            "device fault rounds (mirror)".into(),
            sim.fault_rounds.to_string(),
        ),
        (
            "device pages at removal (evicted)".into(),
            before_removal.to_string(),
        ),
        (
            "device memory: chunks, pages allocated, freed".into(),
            format!(
                "{} x 256 MiB, {}, {}",
                memory.chunks, memory.allocated, memory.freed
            ),
        ),
        (
            "device: pages in / out, translations dropped".into(),
            format!(
                "{} / {}, {}",
                sim.migrated_to_device, sim.migrated_to_system, sim.translations_dropped
            ),
        ),
        (
            "invalidations".into(),
            st.invalidations
                .iter()
                .filter(|(_, c)| *c > 0)
                .map(|(e, c)| format!("{} {c}", event_name(*e)))
                .collect::<Vec<_>>()
                .join(", "),
        ),
    ];
    for (k, v) in rows {
        println!("  {k:<50} {v}");
    }
    println!();
    let mut failures = Vec::new();
    if wrong > 0 {
        failures.push(format!("{wrong} elements differ from the model"));
    }
    if let Some(Err(e)) = &fork_verdict {
        failures.push(format!("the fork check failed: {e}"));
    }
    if failures.is_empty() {
        // At most 100000 rounds x 1024 threads x 10^9 updates: fits a u64.
        let cpu_updates = u64::from(args.rounds) * u64::from(args.threads) * args.updates;
        println!(
            "verdict: OK — all {n} elements match the model (device work, {cpu_updates} CPU updates, {}device removal)",
            if fork_verdict.is_some() {
                "fork, "
            } else {
                "no fork (--no-fork), "
            }
        );
    } else {
        println!("verdict: FAILED — {}", failures.join("; "));
    }
    Ok(failures.is_empty())
}

/// Forks; the child compares all of the array with the model, then writes
/// element 0 of its copy, which the parent must not see.
fn fork_check(region: &ManagedRegion, model: &[u64]) -> Result<(), String> {
    let code = cpu::fork_and_wait(|| {
        let same = (0..model.len()).all(|i| cpu::read_u64(elem(region, i)) == model[i]);
        // The child's writes stay its own.
        cpu::write_u64(elem(region, 0), u64::MAX);
        if same { 0 } else { 1 }
    })?;
    match code {
        0 if cpu::read_u64(elem(region, 0)) == model[0] => Ok(()),
        0 => Err("the child's write showed in the parent".into()),
        1 => Err("the child read data that differs from the parent's".into()),
        c => Err(format!("the child exited with status {c}")),
    }
}

/// One round of device work on `chunk`: take it into device memory, read
/// it there, compute, write it back there. Returns how many of its pages
/// moved into device memory (the device reaches the others through its
/// mirror of system memory).
fn device_round(dev: &SimDevice, chunk: PageRange) -> Result<u64, Box<dyn std::error::Error>> {
    let moved = dev.migrate_range_to_device(chunk.start(), chunk.npages())?;
    let (mut data, _) = dev.read(chunk.start(), chunk.npages())?;
    for w in data.chunks_exact_mut(8) {
        let v = u64::from_ne_bytes(w.try_into().unwrap_or([0; 8]));
        w.copy_from_slice(&v.wrapping_mul(3).wrapping_add(1).to_ne_bytes());
    }
    dev.write(chunk.start(), &data)?;
    Ok(moved)
}

/// Where the pages of `range` are, sampled at `STRIP` points.
fn strip(mm: &Mm, range: PageRange) -> String {
    let step = (range.npages() / STRIP).max(1);
    (0..STRIP.min(range.npages()))
        .map(|k| {
            let a = VirtAddr::new(range.start().get() + k * step * PAGE_SIZE);
            match mm.page_state(a) {
                Ok(PageState::Device { .. }) => 'D',
                Ok(PageState::System) => '#',
                Ok(PageState::Empty) => '.',
                Ok(PageState::Migrating { .. }) => 'm',
                Ok(PageState::Exclusive { .. }) => 'x',
                Err(_) => '?',
            }
        })
        .collect()
}

fn event_name(e: NotifyEvent) -> &'static str {
    match e {
        NotifyEvent::Unmap => "unmap",
        NotifyEvent::Clear => "clear",
        NotifyEvent::Remap => "remap",
        NotifyEvent::Fork => "fork",
        NotifyEvent::Protection => "protection",
        NotifyEvent::Migrate => "migrate",
        NotifyEvent::Exclusive => "exclusive",
        NotifyEvent::Release => "release",
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}
