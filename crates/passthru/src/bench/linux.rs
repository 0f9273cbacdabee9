//! `bench linux`: how long a kernel takes from `passthru run --kernel` to its first
//! console line and to where this machine's KVM stops it, per kernel given (a bzImage,
//! a PVH vmlinux), each booted in a `passthru run` of its own; and the ACPI tables'
//! size.

use super::*;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

#[derive(Serialize, Debug, Default)]
struct LinuxReport {
    kernels: Vec<KernelFigure>,
    acpi_bytes: u64,
}

#[derive(Serialize, Debug, Default)]
struct KernelFigure {
    kind: &'static str,
    path: String,
    first_line_s: f64,
    stopped_s: f64,
    lines: u64,
}

/// Longest a boot may take here.
const DEADLINE: Duration = Duration::from_secs(600);

pub(super) fn linux_bench(kernels: Vec<PathBuf>, runs: u32, json: Option<PathBuf>) -> Result<ExitCode, String> {
    if kernels.is_empty() {
        return Err("pass --kernel FILE (a bzImage, or an ELF vmlinux with a PVH entry), once or more".into());
    }
    let title =
        format!("passthru bench linux: {} kernel(s), 512 MiB, one engine behind the virtio-iommu", kernels.len());
    repeat(&title, runs, json, || measure(&kernels), figures)?;
    Ok(ExitCode::SUCCESS)
}

fn figures(r: &LinuxReport) -> Vec<Fig> {
    let mut v = Vec::new();
    for k in &r.kernels {
        v.push(Fig::new(format!("{}: run to first console line", k.kind), "s", k.first_line_s));
        v.push(Fig::new(format!("{}: run to the emulation stop", k.kind), "s", k.stopped_s));
    }
    v.push(Fig::new("ACPI tables (RSDP, XSDT, FADT, DSDT, MADT, MCFG, VIOT)", "bytes", r.acpi_bytes as f64));
    v
}

fn measure(kernels: &[PathBuf]) -> Result<LinuxReport, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut r = LinuxReport::default();
    for k in kernels {
        let head = std::fs::read(k).map_err(|e| format!("{}: {e}", k.display()))?;
        let kind = if head.starts_with(b"\x7fELF") { "PVH vmlinux" } else { "bzImage" };
        let start = Instant::now();
        let mut child = std::process::Command::new(&exe)
            .args(["run", "--kernel"])
            .arg(k)
            .args([
                "--memory",
                "512M",
                "--locked-memory",
                "1G",
                "--device",
                "dma-engine,dma=virtio-iommu,process=inline",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        let out = child.stdout.take().ok_or("no standard output")?;
        let mut first = None;
        let mut lines = 0u64;
        for line in BufReader::new(out).lines() {
            if line.is_err() || start.elapsed() > DEADLINE {
                break;
            }
            first.get_or_insert(start.elapsed());
            lines += 1;
        }
        let _ = child.kill();
        let _ = child.wait();
        let first = first.ok_or_else(|| format!("{}: the kernel printed nothing", k.display()))?;
        r.kernels.push(KernelFigure {
            kind,
            path: k.display().to_string(),
            first_line_s: first.as_secs_f64(),
            stopped_s: start.elapsed().as_secs_f64(),
            lines,
        });
    }
    r.acpi_bytes = vmm::acpi::build(&vmm::acpi::Machine { viommu: Some((0xf8, vec![0x08])) }).size() as u64;
    Ok(r)
}
