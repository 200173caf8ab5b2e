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
    /// Size of the array, in MiB.
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    size: usize,
    /// CPU threads updating the array while the device works.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Rounds of device work (each takes one chunk of the array).
    #[arg(long, default_value_t = 8)]
    rounds: usize,
    /// Element updates per CPU thread per round.
    #[arg(long, default_value_t = 20_000)]
    updates: usize,
    /// Do not fork midway.
    #[arg(long)]
    no_fork: bool,
}

/// Chunks the array is cut into; the device works on one per round.
const CHUNKS: usize = 4;
/// Width of a residency strip.
const STRIP: usize = 64;

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

fn demo(args: &Args) -> Result<bool, Box<dyn std::error::Error>> {
    if args.size == 0 || args.rounds == 0 || args.threads == 0 {
        return Err("--size, --rounds and --threads must be at least 1".into());
    }
    let t0 = Instant::now();
    let len = (args.size << 20).next_multiple_of(CHUNKS * (2 << 20));
    let n = len / 8;
    let per_chunk = n / CHUNKS;
    let mm = Mm::new()?;
    let region = mm.alloc_mapping(Mapping::builder(len).align(2 << 20))?;
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
    let mut fork_verdict = None;
    for round in 0..args.rounds {
        let c = round % CHUNKS;
        let chunk = PageRange::new(elem(&region, c * per_chunk), per_chunk * 8)?;
        // CPU threads update the other chunks, concurrently with the device.
        let increments: Vec<Vec<usize>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..args.threads)
                .map(|t| {
                    let region = &region;
                    s.spawn(move || {
                        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((round * 64 + t + 1) as u64));
                        let mut touched = Vec::with_capacity(args.updates);
                        for _ in 0..args.updates {
                            let mut i = (rng.next() % n as u64) as usize;
                            if i / per_chunk == c {
                                i = (i + per_chunk) % n;
                            }
                            cpu::add_u64(elem(region, i), 1);
                            touched.push(i);
                        }
                        touched
                    })
                })
                .collect();
            let device = device_round(&dev, chunk);
            let touched = workers
                .into_iter()
                .map(|w| w.join().unwrap_or_default())
                .collect();
            device.map(|()| touched)
        })?;
        for i in increments.into_iter().flatten() {
            model[i] = model[i].wrapping_add(1);
        }
        for v in &mut model[c * per_chunk..(c + 1) * per_chunk] {
            *v = v.wrapping_mul(3).wrapping_add(1);
        }
        println!("  round {:<2} {}", round + 1, strip(&mm, region.range()));
        eprintln!(
            "round {}/{}: device computed over chunk {c} in its memory; {} pages on the device",
            round + 1,
            args.rounds,
            dev.device_pages()
        );
        if !args.no_fork && round + 1 == args.rounds / 2 {
            let on_device = dev.device_pages();
            let model = &model;
            let region = &region;
            let code = cpu::fork_and_wait(|| {
                let same = (0..n).all(|i| cpu::read_u64(elem(region, i)) == model[i]);
                // The child's writes stay its own.
                cpu::write_u64(elem(region, 0), u64::MAX);
                if same { 0 } else { 1 }
            });
            let ok = code == Some(0) && cpu::read_u64(elem(region, 0)) == model[0];
            println!(
                "  fork    the child read all {} MiB ({on_device} pages were on the device): {}",
                len >> 20,
                if ok { "matches the parent" } else { "MISMATCH" }
            );
            fork_verdict = Some(ok);
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
    let ok = wrong == 0 && fork_verdict.unwrap_or(true);
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
    if ok {
        println!(
            "verdict: OK — all {n} elements match the model (device work, {} CPU updates, fork, device removal)",
            args.rounds * args.threads * args.updates
        );
    } else {
        println!("verdict: FAILED — {wrong} elements differ from the model");
    }
    Ok(ok)
}

/// One round of device work on `chunk`: take it into device memory, read
/// it there, compute, write it back there.
fn device_round(dev: &SimDevice, chunk: PageRange) -> Result<(), Box<dyn std::error::Error>> {
    dev.migrate_range_to_device(chunk.start(), chunk.npages())?;
    let (mut data, _) = dev.read(chunk.start(), chunk.npages())?;
    for w in data.chunks_exact_mut(8) {
        let v = u64::from_ne_bytes(w.try_into().unwrap_or([0; 8]));
        w.copy_from_slice(&v.wrapping_mul(3).wrapping_add(1).to_ne_bytes());
    }
    dev.write(chunk.start(), &data)?;
    Ok(())
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
