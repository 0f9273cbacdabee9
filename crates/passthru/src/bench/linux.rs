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
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let out = child.stdout.take().ok_or("no standard output")?;
        let mut err = child.stderr.take().ok_or("no standard error")?;
        let err_text = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut err, &mut s);
            s
        });
        // Lines as they come, on a thread of their own: a kernel that stops printing
        // cannot hold the bench past its deadline.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                if line.is_err() || tx.send(Instant::now()).is_err() {
                    break;
                }
            }
        });
        let mut first = None;
        let mut lines = 0u64;
        loop {
            match rx.recv_timeout(DEADLINE.saturating_sub(start.elapsed())) {
                Ok(at) => {
                    first.get_or_insert(at.duration_since(start));
                    lines += 1;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("{}: still running after {DEADLINE:?}, killed", k.display()));
                }
            }
        }
        let status = child.wait().map_err(|e| e.to_string())?;
        let stderr = err_text.join().unwrap_or_default();
        let first = first.ok_or_else(|| format!("{}: the kernel printed nothing: {}", k.display(), stderr.trim()))?;
        // What is timed is the way to the emulation stop; another end is an error.
        if status.code() != Some(1) || !stderr.contains("KVM internal error") {
            return Err(format!("{}: ended otherwise than at an emulation failure: {}", k.display(), stderr.trim()));
        }
        r.kernels.push(KernelFigure {
            kind,
            path: k.display().to_string(),
            first_line_s: first.as_secs_f64(),
            stopped_s: start.elapsed().as_secs_f64(),
            lines,
        });
    }
    // The machine booted: one engine (00:01.0) behind the virtio-iommu.
    let viommu = Some((abi::pci::bdf(0, abi::viommu::SLOT, 0), vec![abi::pci::bdf(0, 1, 0)]));
    r.acpi_bytes = vmm::acpi::build(&vmm::acpi::Machine { viommu }).size() as u64;
    Ok(r)
}
