//! `passthru`: the command-line program. `passthru run` runs a machine (a guest program
//! on KVM, or the qtest driver port), `passthru guests` lists the built-in guest
//! programs, `passthru bench` measures.

use passthru::{bench, ctl, device, run};

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// A KVM virtual machine monitor built around device assignment.
#[derive(Parser, Debug)]
#[command(name = "passthru", version, about)]
struct Cli {
    /// Write the log to PATH (appended) instead of standard error, at level info
    /// unless PASSTHRU_LOG says otherwise (e.g. PASSTHRU_LOG=debug: every control
    /// request, with its status and duration).
    #[arg(long, global = true, value_name = "PATH")]
    log_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a machine: a guest program on KVM, or the qtest driver port.
    Run(run::RunArgs),
    /// List the built-in guest programs.
    Guests,
    /// Measure the machine (results as a table, optionally JSON).
    Bench(bench::BenchArgs),
    /// Run a device process (vfio-user server).
    Device(device::DeviceArgs),
    /// Drive a running VM through its control API (`run --api-socket PATH`).
    Ctl(ctl::CtlArgs),
    /// Live statistics of a running VM, refreshed every second (as kvm_stat).
    Stat(ctl::StatArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = |default: &str| {
        tracing_subscriber::EnvFilter::try_from_env("PASSTHRU_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default))
    };
    match &cli.log_file {
        Some(path) => match std::fs::OpenOptions::new().create(true).append(true).open(path) {
            Ok(file) => tracing_subscriber::fmt()
                .with_env_filter(filter("info"))
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .init(),
            Err(e) => {
                eprintln!("passthru: error: --log-file {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        },
        None => tracing_subscriber::fmt().with_env_filter(filter("warn")).with_writer(std::io::stderr).init(),
    }
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Guests => {
            for p in guests::all() {
                println!("{:<12} {}", p.name, p.description);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => bench::bench(args),
        Command::Device(args) => device::device(args),
        Command::Ctl(args) => ctl::ctl(args),
        Command::Stat(args) => ctl::stat(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("passthru: error: {e}");
            ExitCode::FAILURE
        }
    }
}
