//! `passthru bench`: measurements printed as a table, optionally written as JSON; one
//! module per area, the host-side engine driver they share in `engine`.

use clap::{Args, Subcommand};
use serde::Serialize;
use spread::{Fig, Goal};
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
        /// Runs (each figure: median and spread; a goal's verdict only when every run agrees).
        #[arg(long, value_name = "N", default_value_t = 5)]
        runs: u32,
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
        /// Runs (each figure: median and spread; a goal's verdict only when every run agrees).
        #[arg(long, value_name = "N", default_value_t = 3)]
        runs: u32,
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
        /// Runs (each figure: median and spread; a goal's verdict only when every run agrees).
        #[arg(long, value_name = "N", default_value_t = 1)]
        runs: u32,
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
        /// Runs (each figure: median and spread; a goal's verdict only when every run agrees).
        #[arg(long, value_name = "N", default_value_t = 5)]
        runs: u32,
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
        /// Runs (each figure: median and spread; a goal's verdict only when every run agrees).
        #[arg(long, value_name = "N", default_value_t = 5)]
        runs: u32,
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
        /// Runs (each figure: median and spread; a goal's verdict only when every run agrees).
        #[arg(long, value_name = "N", default_value_t = 5)]
        runs: u32,
        /// Also draw the cost per entry against batch size as an SVG chart to FILE.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
    },
    /// virtio-iommu: the VMM's work per MAP and UNMAP request (one per kick and kicks of
    /// 256; the device's own clock, no exit), a device's translate through a virtio-iommu
    /// domain, and strict-mode DMA (map, copy, unmap per I/O, as Linux does) as a ratio of
    /// the same copies with identity DMA, device in the VMM and in its own process.
    Viommu {
        /// Requests per figure (the device-process one-per-kick figure uses at most 1000).
        #[arg(long, default_value_t = 2560)]
        requests: u64,
        /// Strict-mode I/Os per size and mode.
        #[arg(long, default_value_t = 500)]
        ios: u64,
        /// Also write the figures as JSON to FILE.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Runs (each figure: median and spread; a goal's verdict only when every run agrees).
        #[arg(long, value_name = "N", default_value_t = 3)]
        runs: u32,
        /// Also draw the strict-mode ratio against I/O size per device mode as an SVG chart to FILE.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
    },
    /// Linux: time from `run --kernel` to the kernel's first console line and to where
    /// this machine's KVM stops it, per kernel (a bzImage or a PVH vmlinux), each in a
    /// `passthru run` of its own; the ACPI tables' size.
    Linux {
        /// A kernel to boot (repeat to compare, e.g. the bzImage and its vmlinux).
        #[arg(long = "kernel", value_name = "FILE")]
        kernels: Vec<PathBuf>,
        /// Also write the figures as JSON to FILE.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Runs (each figure: median and spread).
        #[arg(long, value_name = "N", default_value_t = 1)]
        runs: u32,
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
        /// Runs (each figure: median and spread; a goal's verdict only when every run agrees).
        #[arg(long, value_name = "N", default_value_t = 1)]
        runs: u32,
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
        /// Runs (each figure: median and spread; a goal's verdict only when every run agrees).
        #[arg(long, value_name = "N", default_value_t = 3)]
        runs: u32,
        /// Also draw translate miss against domain size as an SVG chart to FILE.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
    },
}

/// Runs the benchmarks asked for.
pub fn bench(args: BenchArgs) -> Result<ExitCode, String> {
    match args.what {
        BenchWhat::Exits { iterations, json, runs } => exits(iterations, runs, json),
        BenchWhat::Dma { quick, json, runs, plot } => dma_bench(quick, runs, json, plot),
        BenchWhat::Noncoherent { mib, json, runs } => noncoherent_bench(mib, runs, json),
        BenchWhat::Tce { rounds, json, runs, plot } => tce_bench(rounds, runs, json, plot),
        BenchWhat::Irq { interrupts, json, runs } => irq_bench(interrupts, runs, json),
        BenchWhat::Devices { bytes, reads, json, runs, plot } => devices_bench(bytes, reads, runs, json, plot),
        BenchWhat::Pvdma { iterations, json, runs } => pvdma_bench(iterations, runs, json),
        BenchWhat::Linux { kernels, json, runs } => linux_bench(kernels, runs, json),
        BenchWhat::Viommu { requests, ios, json, runs, plot } => viommu_bench(requests, ios, runs, json, plot),
        BenchWhat::Snapshot { memory, touched, dir, json, runs } => snapshot_bench(memory, touched, dir, runs, json),
    }
}

/// Runs `measure` `runs` times (a progress bar on a terminal), prints `title` and each
/// figure's median, spread and goal verdict, and with `json` writes the last run's
/// report with `runs` and `spread` (every figure over the runs) added, saying where.
/// Returns the reports and the spreads.
fn repeat<R: Serialize>(
    title: &str,
    runs: u32,
    json: Option<PathBuf>,
    mut measure: impl FnMut() -> Result<R, String>,
    figures: impl Fn(&R) -> Vec<spread::Fig>,
) -> Result<(Vec<R>, Vec<spread::Spread>), String> {
    let runs = runs.max(1);
    let bar = crate::progress::bar(u64::from(runs), "runs");
    let mut reports = Vec::new();
    for _ in 0..runs {
        reports.push(measure()?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let figs: Vec<Vec<spread::Fig>> = reports.iter().map(&figures).collect();
    let spreads = spread::spreads(&figs);
    let of = if runs > 1 { format!("median of {runs} runs") } else { "one run".to_string() };
    println!("{title}, {of}");
    print!("{}", spread::table(&spreads, reports.len()));
    if let (Some(path), Some(last)) = (json, reports.last()) {
        let mut v = serde_json::to_value(last).map_err(|e| e.to_string())?;
        if !v.is_object() {
            v = serde_json::json!({ "figures": v });
        }
        if let Some(o) = v.as_object_mut() {
            o.insert("runs".into(), runs.into());
            o.insert("spread".into(), serde_json::to_value(&spreads).map_err(|e| e.to_string())?);
        }
        let text = serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?;
        std::fs::write(&path, text + "\n").map_err(|e| format!("writing {}: {e}", path.display()))?;
        println!("figures written to {}", path.display());
    }
    Ok((reports, spreads))
}

/// Draws a chart and says where it went.
fn plot_to(
    path: &std::path::Path,
    chart: &crate::plot::Chart<'_>,
    series: &[crate::plot::Series],
) -> Result<(), String> {
    crate::plot::draw(path, chart, series)?;
    println!("chart drawn to {}", path.display());
    Ok(())
}

mod dma_core;
mod engine;
mod engines;
mod exits;
mod interrupts;
mod linux;
mod noncoherent;
mod pvdma;
mod snapshot;
mod spread;
mod tce;
mod viommu;

use dma_core::dma_bench;
use engines::devices_bench;
use exits::exits;
use interrupts::irq_bench;
use linux::linux_bench;
use noncoherent::noncoherent_bench;
use pvdma::pvdma_bench;
use snapshot::snapshot_bench;
use tce::tce_bench;
use viommu::viommu_bench;
