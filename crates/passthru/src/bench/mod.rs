//! `passthru bench`: measurements printed as a table, optionally written as JSON; one
//! module per area, the host-side engine driver they share in `engine`.

use clap::{Args, Subcommand};
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;
use vmm::{AccelKind, Vm, VmConfig};

#[derive(Args, Debug)]
/// `passthru bench` arguments.
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(Subcommand, Debug)]
enum BenchWhat {
    /// The physical limits later benchmarks are reported against: a null hypercall-port
    /// exit, an MMIO exit, an ioeventfd write that does not exit.
    Exits {
        /// Iterations of each probe.
        #[arg(long, default_value_t = 20_000)]
        iterations: u64,
        /// Also write the figures as JSON to FILE.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// Interrupt delivery, forwarded (KVM irqfd) against VMM-delivered: the VMM's CPU
    /// time per interrupt and the delivery rate, a guest counting every interrupt.
    Irq {
        /// Interrupts per mode.
        #[arg(long, default_value_t = 20_000)]
        interrupts: u64,
        /// Also write the figures as JSON to FILE.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// DMA engine copy throughput from a host-side driver (no vCPU): in process,
    /// vfio-user with shared fds, vfio-user in message mode, as ratios of memcpy; and
    /// a guest's register reads (mmapped BAR, trapped in the VMM, forwarded to a
    /// device process) as ratios of a null MMIO exit (KVM).
    Devices {
        /// Bytes copied per size and backend.
        #[arg(long, default_value = "32M", value_parser = crate::parse_size)]
        bytes: u64,
        /// Guest register reads per kind.
        #[arg(long, default_value_t = 5_000)]
        reads: u64,
        /// Also write the figures as JSON to FILE.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Also draw copy ratio against size per device mode as an SVG chart to FILE.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
    },
    /// Paravirtual DMA: the VMM's own cost of MAP and UNMAP (no exit, through the qtest
    /// dispatch), per page inside a 512-page MAP_SG, and a guest's MAP hypercall end to
    /// end as a ratio of a null hypercall-port exit.
    Pvdma {
        /// Calls per figure (the guest part uses at most 1024).
        #[arg(long, default_value_t = 1000)]
        iterations: u64,
        /// Also write the figures as JSON to FILE.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// Non-coherent DMA: the cost of flushing CPU caches per MiB (CLFLUSHOPT and CLFLUSH)
    /// as a ratio of a memcpy of the same MiB, and a VMM read of 64 MiB of device memory
    /// (what a snapshot does) flagged against unflagged.
    Noncoherent {
        /// MiB per figure.
        #[arg(long, default_value_t = 64)]
        mib: u64,
        /// Also write the figures as JSON to FILE.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// TCE tables: VMM cost per entry of H_PUT_TCE_INDIRECT of 512 and of H_STUFF_TCE
    /// clearing 512, a single H_PUT_TCE against a null exit, device translate through a
    /// window vs a pvdma domain, and table memory for a 64 GiB window with 1 GiB mapped.
    Tce {
        /// Rounds of each batch.
        #[arg(long, default_value_t = 200)]
        rounds: u64,
        /// Also write the figures as JSON to FILE.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Also draw the cost per entry against batch size as an SVG chart to FILE.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
    },
    /// Snapshots: save and restore of a guest with touched RAM and a DMA engine, as
    /// ratios of writing and reading the same bytes with plain file I/O (one run), and
    /// the pause (vCPU and devices stopped to resumed) of the in-memory part.
    Snapshot {
        /// Guest RAM.
        #[arg(long, default_value = "1G", value_parser = crate::parse_size)]
        memory: u64,
        /// Bytes of it the guest touched.
        #[arg(long, default_value = "256M", value_parser = crate::parse_size)]
        touched: u64,
        /// Where to write (a directory made and removed; default: the temp directory).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Also write the figures as JSON to FILE.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// The DMA remapping core, in process: translate (IOTLB hit and miss), map+unmap,
    /// copy through a DmaSpace as a ratio of memcpy, translate cost as domains grow.
    Dma {
        /// Fewer iterations (a quick look, noisier).
        #[arg(long)]
        quick: bool,
        /// Also write the figures as JSON to FILE.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Also draw translate miss against domain size as an SVG chart to FILE.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
    },
}

/// Runs the benchmarks asked for.
pub fn bench(args: BenchArgs) -> Result<ExitCode, String> {
    match args.what {
        BenchWhat::Exits { iterations, json } => exits(iterations, json),
        BenchWhat::Dma { quick, json, plot } => dma_bench(quick, json, plot),
        BenchWhat::Noncoherent { mib, json } => noncoherent_bench(mib, json),
        BenchWhat::Tce { rounds, json, plot } => tce_bench(rounds, json, plot),
        BenchWhat::Irq { interrupts, json } => irq_bench(interrupts, json),
        BenchWhat::Devices { bytes, reads, json, plot } => devices_bench(bytes, reads, json, plot),
        BenchWhat::Pvdma { iterations, json } => pvdma_bench(iterations, json),
        BenchWhat::Snapshot { memory, touched, dir, json } => snapshot_bench(memory, touched, dir, json),
    }
}

/// A progress bar on standard error when it is a terminal (hidden otherwise, so logs
/// and pipes stay clean).
pub fn progress(steps: u64, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(steps);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

/// Writes `value` as pretty JSON to `path`, if one was given.
fn write_json(path: Option<PathBuf>, value: &impl Serialize) -> Result<(), String> {
    if let Some(path) = path {
        let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
        std::fs::write(&path, text + "\n").map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(())
}

fn goal(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

mod dma_core;
mod engine;
mod engines;
mod exits;
mod interrupts;
mod noncoherent;
mod pvdma;
mod snapshot;
mod tce;

use dma_core::dma_bench;
use engines::devices_bench;
use exits::exits;
use interrupts::irq_bench;
use noncoherent::noncoherent_bench;
use pvdma::pvdma_bench;
use snapshot::snapshot_bench;
use tce::tce_bench;
