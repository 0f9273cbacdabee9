//! `passthru`: the command-line program. `passthru run` runs a machine (a guest program
//! on KVM, or the qtest driver port), `passthru guests` lists the built-in guest
//! programs, `passthru bench` measures, `passthru replay` feeds a recorded trace
//! through a device.

use passthru::{bench, ctl, device, run};

use clap::{Parser, Subcommand};
use std::process::ExitCode;

const EXAMPLES: &str = "Examples:
  passthru run                                   the default demo: paravirtual DMA to an engine in its own process
  passthru run --guest dma --device dma-engine   a guest driving a DMA engine through identity DMA
  passthru run --guest idle --api-socket /tmp/vm.sock   then: passthru ctl /tmp/vm.sock info
  passthru bench exits                           the cost of a VM exit on this machine
  passthru completions bash > /etc/bash_completion.d/passthru";

const RUN_EXAMPLES: &str = "Examples:
  passthru run                                              the default demo (pvdma guest, engine in a process)
  passthru run --guest dma --device dma-engine --locked-memory 1G
  passthru run --guest tce --device dma-engine,dma=tce --device dma-engine,dma=tce
  passthru run --guest idle --api-socket /tmp/vm.sock --event-monitor /tmp/vm.events
  passthru run --accel qtest --device dma-engine            drive the machine from standard input (docs/qtest.md)
  passthru run --restore /tmp/snap                           go on from a snapshot
  passthru run --kernel bzImage --memory 1G                  boot Linux (README: Running Linux)
  passthru run --device help                                 every device kind and option";

const CTL_EXAMPLES: &str = "Examples:
  passthru ctl /tmp/vm.sock info
  passthru ctl /tmp/vm.sock add-device dma-engine,dma=pvdma
  passthru ctl /tmp/vm.sock irq-set-mode dma0/2/0 vmm
  passthru ctl /tmp/vm.sock snapshot /tmp/snap
  passthru ctl /tmp/vm.sock events
  passthru ctl --json /tmp/vm.sock counters";

const STAT_EXAMPLES: &str = "Examples:
  passthru stat /tmp/vm.sock                      live, sorted by rate (keys r, t, n, q)
  passthru stat /tmp/vm.sock --filter dma0 --sort total
  passthru stat /tmp/vm.sock --once --json";

const BENCH_EXAMPLES: &str = "Examples:
  passthru bench exits --json exits.json
  passthru bench dma --quick
  passthru bench devices --plot devices.svg
  passthru bench tce --runs 3";

const ACPI_DUMP_EXAMPLES: &str = "Examples:
  passthru acpi-dump /tmp/acpi && iasl -d /tmp/acpi/*.dat
  passthru acpi-dump /tmp/acpi --device dma-engine,dma=virtio-iommu --device dma-engine";

const REPLAY_EXAMPLES: &str = "Examples:
  passthru run --guest viommu --device dma-engine,dma=virtio-iommu --record /tmp/viommu.trace
  passthru replay virtio-iommu /tmp/viommu.trace
  passthru replay virtio-iommu linux-boot.trace --memory 2G --device dma-engine,dma=virtio-iommu --json out.json";

const DEVICE_EXAMPLES: &str = "Examples:
  passthru device dma-engine --socket /tmp/engine.sock
  passthru run --guest dma --device vfio-user,socket=/tmp/engine.sock --locked-memory 1G";

/// A KVM virtual machine monitor built around device assignment.
#[derive(Parser, Debug)]
#[command(name = "passthru", version, about, after_help = EXAMPLES)]
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
    #[command(after_help = RUN_EXAMPLES)]
    Run(run::RunArgs),
    /// List the built-in guest programs.
    #[command(after_help = "Example:\n  passthru guests")]
    Guests,
    /// Measure the machine (results as a table, optionally JSON).
    #[command(after_help = BENCH_EXAMPLES)]
    Bench(bench::BenchArgs),
    /// Feed a recorded request trace through a device as a driver would, and report
    /// how it answered (exit status 1 when a status differs from the trace's).
    #[command(after_help = REPLAY_EXAMPLES)]
    Replay(passthru::replay::ReplayArgs),
    /// Write the ACPI tables passthru builds for a VM with the devices given, one file
    /// per table (for `iasl -d`).
    #[command(after_help = ACPI_DUMP_EXAMPLES)]
    AcpiDump(passthru::acpi_dump::AcpiDumpArgs),
    /// Run a device process (vfio-user server).
    #[command(after_help = DEVICE_EXAMPLES)]
    Device(device::DeviceArgs),
    /// Drive a running VM through its control API (`run --api-socket PATH`).
    #[command(after_help = CTL_EXAMPLES)]
    Ctl(ctl::CtlArgs),
    /// Live statistics of a running VM, refreshed every second (as kvm_stat).
    #[command(after_help = STAT_EXAMPLES)]
    Stat(ctl::StatArgs),
    /// Print a completion script for SHELL (bash, zsh, fish, elvish, powershell).
    #[command(after_help = "Example:\n  passthru completions bash > /etc/bash_completion.d/passthru")]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), generated from these definitions.
    #[command(after_help = "Example:\n  passthru man | man -l -")]
    Man,
}

/// Writes `text` to standard output; a reader that stops early (`| head`) is not an
/// error.
fn print_out(text: &[u8]) -> Result<ExitCode, String> {
    use std::io::Write;
    match std::io::stdout().write_all(text) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        Err(e) => Err(format!("writing to standard output: {e}")),
    }
}

/// `--device help` anywhere on a run's command line: the device kinds and options.
fn device_help_asked(args: &[String]) -> bool {
    args.iter().any(|a| a == "--device=help") || args.windows(2).any(|w| w[0] == "--device" && w[1] == "help")
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).is_some_and(|a| a == "run") && device_help_asked(&args) {
        print!("{}", device::help());
        return ExitCode::SUCCESS;
    }
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
        Command::Replay(args) => passthru::replay::run(args),
        Command::AcpiDump(args) => passthru::acpi_dump::run(args),
        Command::Device(args) => device::device(args),
        Command::Ctl(args) => ctl::ctl(args),
        Command::Stat(args) => ctl::stat(args),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut text = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "passthru", &mut text);
            print_out(&text)
        }
        Command::Man => {
            use clap::CommandFactory;
            let mut text = Vec::new();
            match clap_mangen::Man::new(Cli::command()).render(&mut text) {
                Ok(()) => print_out(&text),
                Err(e) => Err(format!("rendering the manual page: {e}")),
            }
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("passthru: error: {e}");
            ExitCode::FAILURE
        }
    }
}
