//! `bench devices`: DMA engine copies in every device mode, guest register reads,
//! peer-to-peer copies and a RAM hot-add.

use super::engine::*;
use super::*;

#[derive(Serialize, Debug)]
struct DeviceFigure {
    backend: &'static str,
    size: u64,
    copies: u64,
    device_ns_per_copy: f64,
    memcpy_ns_per_copy: f64,
    /// memcpy time / device time: throughput as a fraction of a plain memcpy.
    ratio_to_memcpy: f64,
}

#[derive(Serialize, Debug)]
struct ReadFigure {
    what: &'static str,
    ns_per_read: f64,
    /// Ratio to the null MMIO read exit of the same run.
    ratio_to_null_exit: f64,
}

#[derive(Serialize, Debug)]
struct DevicesReport {
    copies: Vec<DeviceFigure>,
    /// Empty when KVM is not available.
    register_reads: Vec<ReadFigure>,
    /// Engine A (a device process) copying from engine B's BAR (another device
    /// process) against the same copy from RAM.
    p2p: Vec<P2pFigure>,
    /// Milliseconds until a 1 GiB RAM hot-add is mapped for two attached devices.
    hot_add_1g_ms: f64,
}

#[derive(Serialize, Debug)]
struct P2pFigure {
    size: u64,
    copies: u64,
    p2p_ns_per_copy: f64,
    ram_ns_per_copy: f64,
    /// RAM copy time / peer-to-peer copy time (1.0 = as fast as from RAM).
    ratio_to_ram: f64,
}

/// Peer-to-peer copies between two device processes (shared fd), and the time the
/// identity listener takes to map a 1 GiB RAM hot-add for both.
fn p2p_bench(bytes: u64) -> Result<(Vec<P2pFigure>, f64), String> {
    use crate::device::DeviceArg;
    use vmm::IommuMode;
    let mut config = VmConfig::new(AccelKind::Qtest);
    config.memory = 64 << 20;
    config.locked_memory = Some(2 << 30);
    config.serial_out = Box::new(std::io::sink());
    let vm = Vm::new(config).map_err(|e| e.to_string())?;
    for _ in 0..2 {
        crate::device::attach(&vm, &DeviceArg::engine(IommuMode::SharedFd, false, "identity"))?;
    }
    let b = vm.devices().get(1).and_then(|d| d.bar(abi::dma_engine::SCRATCH_BAR)).ok_or("engine B's BAR")?;
    let mut figs = Vec::new();
    for size in [64u64 << 10, 1 << 20] {
        let copies = (bytes / size).max(1);
        drive_engine_at(&vm, b, DST, size, copies.min(16))?; // warm up
        let p2p = drive_engine_at(&vm, b, DST, size, copies)?;
        let ram = drive_engine_at(&vm, SRC, DST, size, copies)?;
        figs.push(P2pFigure {
            size,
            copies,
            p2p_ns_per_copy: p2p.as_nanos() as f64 / copies as f64,
            ram_ns_per_copy: ram.as_nanos() as f64 / copies as f64,
            ratio_to_ram: ram.as_secs_f64() / p2p.as_secs_f64(),
        });
    }
    let t = Instant::now();
    vm.add_ram(8 << 30, 1 << 30).map_err(|e| e.to_string())?;
    let hot = t.elapsed().as_secs_f64() * 1e3;
    Ok((figs, hot))
}

/// A guest reads registers of two engines (in the VMM, in a device process) and a
/// mmapped BAR; the figures net of the guest's loop, against a null MMIO read exit.
fn register_reads(reads: u64) -> Result<Vec<ReadFigure>, String> {
    use crate::device::DeviceArg;
    use vmm::IommuMode;
    let elf = guests::load("exits")?;
    let mut config = VmConfig::new(AccelKind::Kvm);
    config.memory = 64 << 20;
    config.locked_memory = Some(64 << 20);
    config.bench_iterations = reads.max(1);
    config.serial_out = Box::new(std::io::sink());
    let vm = Vm::new(config).map_err(|e| e.to_string())?;
    crate::device::attach(&vm, &DeviceArg::engine(IommuMode::SharedFd, true, "identity"))?;
    crate::device::attach(&vm, &DeviceArg::engine(IommuMode::SharedFd, false, "identity"))?;
    let status = vm.run_guest_with_args(&elf, &[1]).map_err(|e| e.to_string())?;
    if status != 0 {
        return Err(format!("the register-read probe failed with status {status}"));
    }
    let marks = vm.bench().marks();
    let t = |tag: u64| marks.iter().find(|(m, _, _)| *m == tag).map(|(_, _, i)| *i);
    let span = |a: u64, b: u64| -> Result<f64, String> {
        let (a, b) = (t(a).ok_or("missing mark")?, t(b).ok_or("missing mark")?);
        Ok(b.duration_since(a).as_nanos() as f64 / reads.max(1) as f64)
    };
    let lp = span(0x14, 0x15)?;
    let net = |x: f64| (x - lp).max(0.0);
    let null = net(span(0x10, 0x11)?);
    let fig = |what, ns: f64| ReadFigure {
        what,
        ns_per_read: ns,
        ratio_to_null_exit: if null > 0.0 { ns / null } else { f64::NAN },
    };
    Ok(vec![
        fig("null MMIO read exit", null),
        fig("register, trapped in the VMM", net(span(0x11, 0x12)?)),
        fig("register, trapped and forwarded", net(span(0x12, 0x13)?)),
        fig("mmapped BAR (no exit)", net(span(0x13, 0x14)?)),
    ])
}

/// The device modes copies are measured in, in table order.
const BACKENDS: [&str; 3] = ["in process", "vfio-user shared fd", "vfio-user messages"];
/// Bytes per copy.
const SIZES: [u64; 3] = [4096, 64 << 10, 1 << 20];

fn copy_name(backend: &str, size: u64) -> String {
    format!("{backend}, {} KiB copies / memcpy", size >> 10)
}

pub(super) fn devices_bench(
    bytes: u64,
    reads: u64,
    runs: u32,
    json: Option<PathBuf>,
    plot: Option<PathBuf>,
) -> Result<ExitCode, String> {
    let kvm = vmm::kvm_available();
    let title = format!(
        "passthru bench devices: DMA engine COPY from a host-side driver (no vCPU), batches of {BATCH}; {reads} guest register reads of each kind{}",
        if kvm { "" } else { " (skipped: KVM is not available)" }
    );
    let (_, spreads) = repeat(&title, runs, json, || measure(bytes, reads, kvm), figures)?;
    if let Some(path) = &plot {
        let series: Vec<crate::plot::Series> = BACKENDS
            .iter()
            .map(|b| crate::plot::Series {
                name: (*b).to_string(),
                points: SIZES
                    .iter()
                    .filter_map(|s| spread::median_of(&spreads, &copy_name(b, *s)).map(|r| (*s as f64, r)))
                    .collect(),
            })
            .collect();
        plot_to(
            path,
            &crate::plot::Chart {
                title: "DMA engine COPY throughput as a fraction of memcpy",
                x: "bytes per copy",
                y: "x memcpy (median of the runs)",
                log_x: true,
            },
            &series,
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn figures(r: &DevicesReport) -> Vec<Fig> {
    let mut v: Vec<Fig> =
        r.copies.iter().map(|f| Fig::new(copy_name(f.backend, f.size), "ratio", f.ratio_to_memcpy)).collect();
    let at = |b: &str| r.copies.iter().find(|f| f.backend == b && f.size == 64 << 10).map(|f| f.ratio_to_memcpy);
    if let (Some(shared), Some(inline)) = (at("vfio-user shared fd"), at("in process")) {
        v.push(Fig::new("shared fd / in process at 64 KiB", "ratio", shared / inline).goal(Goal::AtLeast(0.85)));
    }
    for f in &r.register_reads {
        v.push(Fig::new(format!("guest read: {}", f.what), "ns", f.ns_per_read));
    }
    for f in r.register_reads.iter().skip(1) {
        v.push(Fig::new(format!("guest read: {} / null exit", f.what), "ratio", f.ratio_to_null_exit));
    }
    for f in &r.p2p {
        let size = if f.size >= 1 << 20 { format!("{} MiB", f.size >> 20) } else { format!("{} KiB", f.size >> 10) };
        let fig = Fig::new(format!("peer-to-peer / RAM at {size}"), "ratio", f.ratio_to_ram);
        v.push(if f.size == 1 << 20 { fig.goal(Goal::AtLeast(0.9)) } else { fig });
    }
    v.push(Fig::new("RAM hot-add of 1 GiB mapped for two devices", "ms", r.hot_add_1g_ms));
    v
}

fn measure(bytes: u64, reads: u64, kvm: bool) -> Result<DevicesReport, String> {
    use crate::device::DeviceArg;
    use vmm::IommuMode;
    let backends = [
        (BACKENDS[0], DeviceArg::engine(IommuMode::SharedFd, true, "identity")),
        (BACKENDS[1], DeviceArg::engine(IommuMode::SharedFd, false, "identity")),
        (BACKENDS[2], DeviceArg::engine(IommuMode::Messages, false, "identity")),
    ];
    let mut copies = Vec::new();
    for (backend, arg) in backends {
        let mut config = VmConfig::new(AccelKind::Qtest);
        config.memory = 64 << 20;
        config.locked_memory = Some(64 << 20);
        config.serial_out = Box::new(std::io::sink());
        let vm = Vm::new(config).map_err(|e| e.to_string())?;
        crate::device::attach(&vm, &arg)?;
        for size in SIZES {
            let n = (bytes / size).max(1);
            drive_engine(&vm, size, n.min(64))?; // warm up
            let dev = drive_engine(&vm, size, n)?;
            let mem = memcpy_time(&vm, size, n);
            copies.push(DeviceFigure {
                backend,
                size,
                copies: n,
                device_ns_per_copy: dev.as_nanos() as f64 / n as f64,
                memcpy_ns_per_copy: mem.as_nanos() as f64 / n as f64,
                ratio_to_memcpy: mem.as_secs_f64() / dev.as_secs_f64(),
            });
        }
    }
    let register_reads = if kvm { register_reads(reads)? } else { Vec::new() };
    let (p2p, hot_add_1g_ms) = p2p_bench(bytes)?;
    Ok(DevicesReport { copies, register_reads, p2p, hot_add_1g_ms })
}
