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
    let elf = crate::run::load_guest("exits")?;
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

pub(super) fn devices_bench(
    bytes: u64,
    reads: u64,
    json: Option<PathBuf>,
    plot: Option<PathBuf>,
) -> Result<ExitCode, String> {
    use crate::device::DeviceArg;
    use vmm::IommuMode;
    let backends = [
        ("in process", DeviceArg::engine(IommuMode::SharedFd, true, "identity")),
        ("vfio-user shared fd", DeviceArg::engine(IommuMode::SharedFd, false, "identity")),
        ("vfio-user messages", DeviceArg::engine(IommuMode::Messages, false, "identity")),
    ];
    let mut figures = Vec::new();
    let bar = progress(backends.len() as u64 * 3, "DMA engine copies");
    for (backend, arg) in backends {
        let mut config = VmConfig::new(AccelKind::Qtest);
        config.memory = 64 << 20;
        config.locked_memory = Some(64 << 20);
        config.serial_out = Box::new(std::io::sink());
        let vm = Vm::new(config).map_err(|e| e.to_string())?;
        crate::device::attach(&vm, &arg)?;
        for size in [4096u64, 64 << 10, 1 << 20] {
            bar.inc(1);
            let copies = (bytes / size).max(1);
            drive_engine(&vm, size, copies.min(64))?; // warm up
            let dev = drive_engine(&vm, size, copies)?;
            let mem = memcpy_time(&vm, size, copies);
            figures.push(DeviceFigure {
                backend,
                size,
                copies,
                device_ns_per_copy: dev.as_nanos() as f64 / copies as f64,
                memcpy_ns_per_copy: mem.as_nanos() as f64 / copies as f64,
                ratio_to_memcpy: mem.as_secs_f64() / dev.as_secs_f64(),
            });
        }
        drop(vm);
    }
    bar.finish_and_clear();
    println!("passthru bench devices: DMA engine COPY from a host-side driver (no vCPU), batches of {BATCH}, one run");
    println!(
        "{:<22} {:>9} {:>8} {:>14} {:>12} {:>10}",
        "backend", "size", "copies", "device ns/op", "memcpy ns", "x memcpy"
    );
    for f in &figures {
        println!(
            "{:<22} {:>9} {:>8} {:>14.0} {:>12.0} {:>10.3}",
            f.backend,
            format!("{} KiB", f.size >> 10),
            f.copies,
            f.device_ns_per_copy,
            f.memcpy_ns_per_copy,
            f.ratio_to_memcpy
        );
    }
    let at = |b: &str| figures.iter().find(|f| f.backend == b && f.size == 64 << 10).map(|f| f.ratio_to_memcpy);
    if let (Some(shared), Some(inline)) = (at("vfio-user shared fd"), at("in process")) {
        let r = shared / inline;
        println!("shared fd / in process at 64 KiB: {r:.3} (goal >= 0.85: {})", goal(r >= 0.85));
    }
    let register_reads = if vmm::kvm_available() {
        register_reads(reads)?
    } else {
        println!("register reads: skipped, KVM is not available");
        Vec::new()
    };
    if !register_reads.is_empty() {
        println!("guest register reads, {reads} of each, one run:");
        println!("{:<34} {:>10} {:>10}", "read", "ns", "x null exit");
        for f in &register_reads {
            println!("{:<34} {:>10.0} {:>10.3}", f.what, f.ns_per_read, f.ratio_to_null_exit);
        }
    }
    let (p2p, hot_add_1g_ms) = p2p_bench(bytes)?;
    println!("peer-to-peer: engine A copies from engine B's BAR (both device processes), one run:");
    println!("{:<10} {:>8} {:>12} {:>12} {:>10}", "size", "copies", "p2p ns/op", "RAM ns/op", "x RAM");
    for f in &p2p {
        println!(
            "{:<10} {:>8} {:>12.0} {:>12.0} {:>10.3}",
            format!("{} KiB", f.size >> 10),
            f.copies,
            f.p2p_ns_per_copy,
            f.ram_ns_per_copy,
            f.ratio_to_ram
        );
    }
    if let Some(f) = p2p.iter().find(|f| f.size == 1 << 20) {
        println!("peer-to-peer / RAM at 1 MiB: {:.3} (goal >= 0.9: {})", f.ratio_to_ram, goal(f.ratio_to_ram >= 0.9));
    }
    println!("RAM hot-add of 1 GiB mapped for two devices in {hot_add_1g_ms:.1} ms");
    if let Some(path) = &plot {
        let series: Vec<crate::plot::Series> = ["in process", "vfio-user shared fd", "vfio-user messages"]
            .iter()
            .map(|b| crate::plot::Series {
                name: (*b).to_string(),
                points: figures
                    .iter()
                    .filter(|f| f.backend == *b)
                    .map(|f| (f.size as f64, f.ratio_to_memcpy))
                    .collect(),
            })
            .collect();
        crate::plot::draw(
            path,
            &crate::plot::Chart {
                title: "DMA engine COPY throughput as a fraction of memcpy",
                x: "bytes per copy",
                y: "x memcpy",
                log_x: true,
            },
            &series,
        )?;
    }
    write_json(json, &DevicesReport { copies: figures, register_reads, p2p, hot_add_1g_ms })?;
    Ok(ExitCode::SUCCESS)
}
