//! `uhmm`: the command-line tool. One module per subcommand; this file only
//! parses the command line and dispatches.

mod bench;
mod demo;
mod info;
mod run;
mod stress;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Heterogeneous Memory Management for Linux userspace.
#[derive(Debug, Parser)]
#[command(name = "uhmm", version, about)]
struct Cli {
    /// Print uhmm's trace events (migrations, invalidations, device
    /// faults; rate limited) on stderr.
    #[arg(long, global = true)]
    trace: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The main job: a device computing over process memory while CPU
    /// threads update it, with migrations, faults, a fork and device
    /// removal, verified against a model.
    Demo(demo::Args),
    /// Probe the running kernel and show what uhmm can use.
    Info(info::Args),
    /// Measure uhmm against the raw kernel primitives, in the same run.
    Bench(bench::Args),
    /// A model-checked soak: CPU threads, system calls, migrations,
    /// device reads, forks, mremap and failures on the same pages, every
    /// read checked against a model.
    Stress(stress::Args),
    /// Run an unmodified program with its large anonymous memory managed
    /// by uhmm and the software device attached (LD_PRELOAD).
    Run(run::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.trace {
        tracing_subscriber::fmt()
            .with_max_level(tracing_subscriber::filter::LevelFilter::DEBUG)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    match cli.command {
        Command::Demo(args) => demo::run(&args),
        Command::Info(args) => info::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Stress(args) => stress::run(&args),
        Command::Run(args) => run::run(&args),
    }
}
