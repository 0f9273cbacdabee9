//! `passthru bench`: measurements printed as a table, optionally written as JSON.

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

/// One measured figure.
#[derive(Serialize, Debug)]
struct Figure {
    name: &'static str,
    /// Nanoseconds per operation, the guest loop's own cost subtracted.
    ns_per_op: f64,
    /// Nanoseconds per operation as measured (loop included).
    raw_ns_per_op: f64,
    /// Ratio to the null hypercall-port exit of the same run.
    ratio_to_null_exit: f64,
}

#[derive(Serialize, Debug)]
struct ExitsReport {
    iterations: u64,
    loop_ns_per_iteration: f64,
    figures: Vec<Figure>,
}

fn exits(iterations: u64, json: Option<PathBuf>) -> Result<ExitCode, String> {
    if iterations == 0 {
        return Err("--iterations must be at least 1".into());
    }
    let elf = crate::run::load_guest("exits")?;
    let mut config = VmConfig::new(AccelKind::Kvm);
    config.bench_iterations = iterations;
    config.serial_out = Box::new(std::io::sink());
    let vm = Vm::new(config).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let status = vm.run_guest(&elf).map_err(|e| e.to_string())?;
    if status != 0 {
        return Err(format!("the exits probe guest failed with status {status}"));
    }
    let marks = vm.bench().marks();
    let t = |tag: u64| marks.iter().find(|(m, _, _)| *m == tag).map(|(_, _, i)| *i);
    let span = |a: u64, b: u64| -> Result<f64, String> {
        let (a, b) = (t(a).ok_or("missing mark")?, t(b).ok_or("missing mark")?);
        Ok(b.duration_since(a).as_nanos() as f64 / iterations as f64)
    };
    let (hcall, mmio, ioev, lp) = (span(0, 1)?, span(1, 2)?, span(2, 3)?, span(3, 4)?);
    let net = |x: f64| (x - lp).max(0.0);
    let null = net(hcall);
    let fig = |name, raw: f64| Figure {
        name,
        ns_per_op: net(raw),
        raw_ns_per_op: raw,
        ratio_to_null_exit: if null > 0.0 { net(raw) / null } else { f64::NAN },
    };
    let report = ExitsReport {
        iterations,
        loop_ns_per_iteration: lp,
        figures: vec![
            fig("null hypercall-port exit", hcall),
            fig("MMIO write exit", mmio),
            fig("ioeventfd write (no exit)", ioev),
        ],
    };
    println!(
        "passthru bench exits: {iterations} iterations per probe, one run ({:.2} s)",
        started.elapsed().as_secs_f64()
    );
    println!("{:<28} {:>12} {:>12} {:>10}", "probe", "ns/op", "raw ns/op", "x null");
    for f in &report.figures {
        println!("{:<28} {:>12.0} {:>12.0} {:>10.3}", f.name, f.ns_per_op, f.raw_ns_per_op, f.ratio_to_null_exit);
    }
    println!("{:<28} {:>12.0}   (guest loop, subtracted above)", "empty loop iteration", lp);
    write_json(json, &report)?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize, Debug)]
struct CopyFigure {
    bytes: usize,
    /// Copies per access section (1 = each copy fences on its own).
    per_section: u64,
    dmaspace_ns: f64,
    memcpy_ns: f64,
    /// memcpy time / DmaSpace time: the throughput ratio (1.0 = as fast as memcpy).
    ratio: f64,
}

#[derive(Serialize, Debug)]
struct ScaleFigure {
    mappings: usize,
    translate_miss_ns: f64,
    ratio_to_10: f64,
}

#[derive(Serialize, Debug)]
struct DmaReport {
    translate_hit_ns: f64,
    translate_hit_batched_ns: f64,
    translate_miss_ns: f64,
    map_unmap_4k_ns: f64,
    map_unmap_2m_ns: f64,
    unmap_during_copy: UnmapFigure,
    copy: Vec<CopyFigure>,
    scaling: Vec<ScaleFigure>,
}

/// Unmap latency of an unrelated mapping while a long copy runs in the same domain.
#[derive(Serialize, Debug)]
struct UnmapFigure {
    copy_mib: u64,
    median_ns: f64,
    p99_ns: f64,
    unmaps: usize,
}

fn goal(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

fn dma_bench(quick: bool, json: Option<PathBuf>, plot: Option<PathBuf>) -> Result<ExitCode, String> {
    let k = if quick { 10 } else { 1 };
    let hit = dma::bench::translate_hit(2_000_000 / k);
    let hit_batched = dma::bench::translate_hit_batched(2_000_000 / k);
    let miss = dma::bench::translate_miss(1_000_000 / k, 10);
    let mu4k = dma::bench::map_unmap(500_000 / k, 4096);
    let mu2m = dma::bench::map_unmap(500_000 / k, 2 << 20);
    let copy_mib = if quick { 64 } else { 512 };
    let (unmap_med, unmap_p99, unmap_n) = dma::bench::unmap_during_copy(copy_mib << 20);
    let copy: Vec<CopyFigure> =
        [(4096usize, 200_000u64, 1u64), (4096, 200_000, 8), (64 << 10, 20_000, 1), (1 << 20, 1_000, 1)]
            .into_iter()
            .map(|(bytes, iters, per_section)| {
                let (d, m) = dma::bench::copy(iters / k, bytes, per_section);
                CopyFigure { bytes, per_section, dmaspace_ns: d, memcpy_ns: m, ratio: m / d }
            })
            .collect();
    let mut scaling = Vec::new();
    let mut base = 0.0;
    let sizes = [10usize, 100, 1_000, 10_000, 100_000];
    let bar = progress(sizes.len() as u64, "translate miss as domains grow");
    for n in sizes {
        bar.inc(1);
        let ns = dma::bench::translate_miss(1_000_000 / k, n);
        if n == 10 {
            base = ns;
        }
        scaling.push(ScaleFigure { mappings: n, translate_miss_ns: ns, ratio_to_10: ns / base });
    }
    bar.finish_and_clear();
    let r = DmaReport {
        translate_hit_ns: hit,
        translate_hit_batched_ns: hit_batched,
        translate_miss_ns: miss,
        map_unmap_4k_ns: mu4k,
        map_unmap_2m_ns: mu2m,
        unmap_during_copy: UnmapFigure { copy_mib, median_ns: unmap_med, p99_ns: unmap_p99, unmaps: unmap_n },
        copy,
        scaling,
    };

    println!("passthru bench dma: in process, one run");
    // One row: the operation, its time, and its goal in ns when it has one.
    let row = |name: &str, ns: f64, max_ns: Option<f64>| {
        let g = max_ns.map(|m| format!("<= {m} ns: {}", goal(ns <= m))).unwrap_or_default();
        println!("{name:<44} {ns:>10.1}   {g}");
    };
    println!("{:<44} {:>10}   goal", "operation", "ns");
    row("translate 64 B, IOTLB hit", r.translate_hit_ns, Some(10.0));
    row("translate 64 B, IOTLB hit, inside a batch", r.translate_hit_batched_ns, None);
    row("translate 64 B, IOTLB miss (10 mappings)", r.translate_miss_ns, None);
    row("map + unmap 4 KiB", r.map_unmap_4k_ns, Some(200.0));
    row("map + unmap 2 MiB", r.map_unmap_2m_ns, None);
    let u = &r.unmap_during_copy;
    row(&format!("unmap 4 KiB while a {} MiB copy runs (median)", u.copy_mib), u.median_ns, Some(100_000.0));
    row(&format!("  same, 99th percentile ({} unmaps)", u.unmaps), u.p99_ns, None);
    println!();
    println!("{:<24} {:>12} {:>12} {:>8}   goal", "copy (per section)", "DmaSpace ns", "memcpy ns", "ratio");
    for c in &r.copy {
        let target = match c.bytes {
            4096 => Some(0.90),
            b if b == 1 << 20 => Some(0.98),
            _ => None,
        };
        let g = target.map(|t| format!(">= {t:.2}: {}", goal(c.ratio >= t))).unwrap_or_default();
        let label = format!("{} KiB (x{})", c.bytes >> 10, c.per_section);
        println!("{:<24} {:>12.1} {:>12.1} {:>8.3}   {g}", label, c.dmaspace_ns, c.memcpy_ns, c.ratio);
    }
    println!();
    println!(
        "{:<14} {:>14} {:>12}   (translate miss as the domain grows; log2 of the growth is {:.1})",
        "mappings",
        "ns",
        "x 10",
        (100_000f64 / 10.0).log2()
    );
    for s in &r.scaling {
        println!("{:<14} {:>14.1} {:>12.2}", s.mappings, s.translate_miss_ns, s.ratio_to_10);
    }
    write_json(json, &r)?;
    if let Some(path) = plot {
        let points = r.scaling.iter().map(|s| (s.mappings as f64, s.translate_miss_ns)).collect();
        crate::plot::draw(
            &path,
            &crate::plot::Chart {
                title: "translate, IOTLB miss, as the domain grows",
                x: "mappings in the domain",
                y: "ns per translate",
                log_x: true,
            },
            &[crate::plot::Series { name: "IOTLB miss".into(), points }],
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize, Debug)]
struct IrqFigure {
    mode: String,
    interrupts: u64,
    wall_ms: f64,
    /// Interrupts delivered per second (guest-paced: each acknowledged before the next).
    rate_per_s: f64,
    /// CPU time of the VMM's delivery thread per interrupt.
    vmm_cpu_ns_per_irq: f64,
    /// Interrupts the VMM injected itself.
    vmm_delivered: u64,
}

fn irq_bench(interrupts: u64, json: Option<PathBuf>) -> Result<ExitCode, String> {
    if interrupts == 0 {
        return Err("--interrupts must be at least 1".into());
    }
    let elf = crate::run::load_guest("irqstorm")?;
    let mut figures = Vec::new();
    for mode in [irq::Mode::Forwarded, irq::Mode::Vmm] {
        let mut config = VmConfig::new(AccelKind::Kvm);
        config.irq_mode = mode;
        config.test_sources = true;
        config.serial_out = Box::new(std::io::sink());
        let vm = Vm::new(config).map_err(|e| e.to_string())?;
        let cpu0 = vm.irqs().delivery_cpu_ns();
        let t = Instant::now();
        let status = vm.run_guest_with_args(&elf, &[interrupts, 0]).map_err(|e| e.to_string())?;
        let wall = t.elapsed();
        let cpu = vm.irqs().delivery_cpu_ns().saturating_sub(cpu0);
        let s = vm.test_sources().map(|t| t.msi.summary()).unwrap_or_default();
        if status != 0 || s.guest_counted != Some(interrupts) {
            return Err(format!("the irqstorm guest failed in {mode} mode (status {status}, {s:?})"));
        }
        let vmm_delivered =
            vm.irqs().stats(&devices::test_irq::MsiTestSource::id()).map(|x| x.vmm_delivered).unwrap_or(0);
        figures.push(IrqFigure {
            mode: mode.to_string(),
            interrupts,
            wall_ms: wall.as_secs_f64() * 1e3,
            rate_per_s: interrupts as f64 / wall.as_secs_f64(),
            vmm_cpu_ns_per_irq: cpu as f64 / interrupts as f64,
            vmm_delivered,
        });
    }
    println!("passthru bench irq: {interrupts} MSIs per mode, guest-paced, one run");
    println!("{:<12} {:>10} {:>12} {:>16} {:>14}", "mode", "wall ms", "irq/s", "VMM CPU ns/irq", "VMM-injected");
    for f in &figures {
        println!(
            "{:<12} {:>10.1} {:>12.0} {:>16.0} {:>14}",
            f.mode, f.wall_ms, f.rate_per_s, f.vmm_cpu_ns_per_irq, f.vmm_delivered
        );
    }
    let (fw, vm) = (&figures[0], &figures[1]);
    println!(
        "forwarded / vmm: rate x{:.2}, VMM CPU per interrupt {:.0} ns vs {:.0} ns (goal: forwarded costs the VMM no CPU per interrupt)",
        fw.rate_per_s / vm.rate_per_s,
        fw.vmm_cpu_ns_per_irq,
        vm.vmm_cpu_ns_per_irq
    );
    write_json(json, &figures)?;
    Ok(ExitCode::SUCCESS)
}

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

/// Guest-physical layout of the host-side driver.
const RING: u64 = 0x20_0000;
const COMPLETIONS: u64 = 0x21_0000;
const SRC: u64 = 0x40_0000;
const DST: u64 = 0x80_0000;
const RING_SIZE: u64 = 64;
const BATCH: u64 = 32;

/// Drives the engine of `vm` with COPY descriptors of `size`, `copies` times;
/// returns the wall time.
fn drive_engine(vm: &Vm, size: u64, copies: u64) -> Result<std::time::Duration, String> {
    drive_engine_at(vm, SRC, DST, size, copies)
}

/// As [`drive_engine`], copying from `src` to `dst` (guest-physical, identity domain).
fn drive_engine_at(vm: &Vm, src: u64, dst: u64, size: u64, copies: u64) -> Result<std::time::Duration, String> {
    use abi::dma_engine::{self as de, Descriptor, op, regs};
    use vm_memory_bytes::{read_u32, write_bytes};
    let bar0 = enable_engine(vm)?;
    let w32 = |off: u64, v: u32| vm.mmio_write(bar0 + off, &v.to_le_bytes());
    w32(regs::CONTROL, de::control::RESET);
    vm.mmio_write(bar0 + regs::RING_BASE, &RING.to_le_bytes());
    w32(regs::RING_SIZE, RING_SIZE as u32);
    w32(regs::CONTROL, de::control::ENABLE);
    // The ring is written once, as a driver would: every slot copies SRC to DST and
    // has its own completion record. Per batch only the record waited on is re-armed.
    for slot in 0..RING_SIZE {
        let completion = COMPLETIONS + slot * de::COMPLETION_SIZE;
        let d = Descriptor { op: op::COPY, src, dst, len: size, completion, ..Default::default() };
        write_bytes(vm, RING + slot * de::DESCRIPTOR_SIZE, &d.to_bytes())?;
    }
    let mut tail: u64 = 0;
    let t = Instant::now();
    let mut done = 0;
    while done < copies {
        let n = BATCH.min(copies - done);
        tail += n;
        let last = COMPLETIONS + ((tail - 1) % RING_SIZE) * de::COMPLETION_SIZE;
        write_bytes(vm, last, &[0; 4])?;
        w32(regs::TAIL, tail as u32);
        let waited = Instant::now();
        let mut polls = 0u32;
        while read_u32(vm, last)? == de::completion::PENDING {
            if waited.elapsed() > std::time::Duration::from_secs(30) {
                return Err("the engine stopped completing descriptors".into());
            }
            // Spin briefly, then give the core away: on two cores the device's worker
            // must not wait behind a spinning driver.
            polls += 1;
            if polls < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if read_u32(vm, last)? != de::completion::SUCCESS {
            return Err(format!("a COPY of {size} bytes failed"));
        }
        done += n;
    }
    Ok(t.elapsed())
}

#[derive(Serialize, Debug)]
struct FlushFigure {
    method: &'static str,
    ns_per_mib: f64,
    memcpy_ns_per_mib: f64,
    /// Flush time / memcpy time of the same bytes.
    ratio_to_memcpy: f64,
}

#[derive(Serialize, Debug)]
struct NoncoherentReport {
    mib: u64,
    flush: Vec<FlushFigure>,
    /// A VMM read (dump, snapshot) of `mib` MiB of device memory, unflagged and flagged.
    read_unflagged_ms: f64,
    read_flagged_ms: f64,
}

fn noncoherent_bench(mib: u64, json: Option<PathBuf>) -> Result<ExitCode, String> {
    use vmm::flush::{Method, cpu, flush_range};
    let mib = mib.max(1);
    let len = usize::try_from(mib << 20).map_err(|_| "--mib too large")?;
    let Some((best, line)) = cpu() else { return Err("this CPU has no CLFLUSH".into()) };
    let src = vec![0x5au8; len];
    let mut dst = vec![0u8; len];
    dst.copy_from_slice(&src); // first touch (page faults) outside the timing
    let t = Instant::now();
    dst.copy_from_slice(std::hint::black_box(&src));
    std::hint::black_box(&dst);
    let memcpy = t.elapsed().as_nanos() as f64 / mib as f64;
    let mut flush = Vec::new();
    let methods: &[(Method, &str)] = if best == Method::ClflushOpt {
        &[(Method::ClflushOpt, "clflushopt"), (Method::Clflush, "clflush")]
    } else {
        &[(Method::Clflush, "clflush")]
    };
    for &(m, name) in methods {
        // Dirty the lines first, as device-visible data would be.
        dst.fill(1);
        let t = Instant::now();
        // SAFETY: `dst` is alive and `len` bytes long.
        unsafe { flush_range(dst.as_ptr(), len, Some(m)) };
        let ns = t.elapsed().as_nanos() as f64 / mib as f64;
        flush.push(FlushFigure {
            method: name,
            ns_per_mib: ns,
            memcpy_ns_per_mib: memcpy,
            ratio_to_memcpy: ns / memcpy,
        });
    }
    // A VMM read of device memory, unflagged then flagged non-coherent.
    let mut config = VmConfig::new(AccelKind::Qtest);
    config.memory = 64 << 20;
    config.serial_out = Box::new(std::io::sink());
    let vm = Vm::new(config).map_err(|e| e.to_string())?;
    let gpa = 1u64 << 36;
    let ram = vmm::memory::hot_ram(gpa, mib << 20).map_err(|e| e.to_string())?;
    let region = ram.rebased(gpa, vm_api_kind("bench-device"));
    vm.memory_map().add_region(region).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; len];
    vm.read_memory_for_host(gpa, &mut buf).map_err(|e| e.to_string())?; // first touch
    let t = Instant::now();
    vm.read_memory_for_host(gpa, &mut buf).map_err(|e| e.to_string())?;
    let read_unflagged_ms = t.elapsed().as_secs_f64() * 1e3;
    let flags = vm_api::RegionFlags { noncoherent_dma: true, ..Default::default() };
    vm.memory_map().set_flags(gpa, flags)?;
    let t = Instant::now();
    vm.read_memory_for_host(gpa, &mut buf).map_err(|e| e.to_string())?;
    let read_flagged_ms = t.elapsed().as_secs_f64() * 1e3;
    let report = NoncoherentReport { mib, flush, read_unflagged_ms, read_flagged_ms };
    println!("passthru bench noncoherent: {mib} MiB per figure, cache line {line} bytes, one run");
    println!("{:<12} {:>12} {:>14} {:>10}", "flush", "ns/MiB", "memcpy ns/MiB", "x memcpy");
    for f in &report.flush {
        println!("{:<12} {:>12.0} {:>14.0} {:>10.3}", f.method, f.ns_per_mib, f.memcpy_ns_per_mib, f.ratio_to_memcpy);
    }
    println!(
        "VMM read of {mib} MiB of device memory: {read_unflagged_ms:.1} ms unflagged, {read_flagged_ms:.1} ms flagged (flushed first)"
    );
    write_json(json, &report)?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize, Debug, Default)]
struct TceReport {
    rounds: u64,
    /// 512 entries mapping contiguous guest pages (as Linux maps RAM into a window).
    indirect_ns_per_entry: f64,
    stuff_ns_per_entry: f64,
    /// 512 entries of which no two guest pages are contiguous (the worst case).
    indirect_scattered_ns_per_entry: f64,
    stuff_scattered_ns_per_entry: f64,
    put_ns: f64,
    /// A guest's null hypercall-port exit in the same run (0 without KVM).
    null_exit_ns: f64,
    translate_window_ns: f64,
    translate_pvdma_ns: f64,
    table_bytes_one_group: u64,
    table_bytes_three_groups: u64,
    flat_bytes_three_groups: u64,
    batches: Vec<BatchFigure>,
}

#[derive(Serialize, Debug, Default)]
struct BatchFigure {
    entries: u64,
    indirect_ns_per_entry: f64,
    stuff_ns_per_entry: f64,
}

fn tce_bench(rounds: u64, json: Option<PathBuf>, plot: Option<PathBuf>) -> Result<ExitCode, String> {
    use crate::device::DeviceArg;
    use abi::hcall::Args;
    use abi::tce as t;
    use vmm::IommuMode;
    let rounds = rounds.max(1);
    let mut config = VmConfig::new(AccelKind::Qtest);
    config.memory = 64 << 20;
    config.locked_memory = Some(1 << 30);
    config.serial_out = Box::new(std::io::sink());
    let vm = Vm::new(config).map_err(|e| e.to_string())?;
    for _ in 0..3 {
        crate::device::attach(&vm, &DeviceArg::engine(IommuMode::SharedFd, true, "tce"))?;
    }
    // Bus mastering on, as drivers do: the endpoints translate through their windows.
    for d in vm.devices() {
        let cmd = abi::pci::command::MEMORY | abi::pci::command::MASTER;
        vm.pci().config_write(d.slot(), abi::pci::reg::COMMAND, &cmd.to_le_bytes());
    }
    let call = |nr: u64, a: [u64; 4]| -> Result<(u64, u64), String> {
        let r = vm.hypercall(&Args { nr, a: [a[0], a[1], a[2], a[3], 0] });
        if r.r[0] as i64 != t::H_SUCCESS {
            return Err(format!("TCE call {nr:#x} answered {}", r.r[0] as i64));
        }
        Ok((r.r[1], r.r[2]))
    };
    let bdf = |i: usize| vm.devices().get(i).map(|d| u64::from(d.bdf())).unwrap_or(0);
    let (group, liobn) = call(t::DEVICE_GROUP, [bdf(0), 0, 0, 0])?;
    let list: u64 = 0x30_0000;
    let entries: Vec<u8> =
        (0..512u64).flat_map(|i| ((0x100_0000 + i * 4096) | t::READ | t::WRITE).to_le_bytes()).collect();
    vm.phys_write(list, &entries);
    let mut report = TceReport { rounds, ..TceReport::default() };
    // `rounds` of H_PUT_TCE_INDIRECT of `entries` from `list`, each cleared by
    // H_STUFF_TCE: the VMM's ns per entry of each call.
    let put_and_clear = |list: u64, entries: u64| -> Result<(f64, f64), String> {
        let (mut ind, mut stuff) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
        for r in 0..rounds {
            let ioba = (r % 256) * 512 * 4096;
            let t0 = Instant::now();
            call(t::PUT_TCE_INDIRECT, [liobn, ioba, list, entries])?;
            ind += t0.elapsed();
            let t0 = Instant::now();
            call(t::STUFF_TCE, [liobn, ioba, 0, entries])?;
            stuff += t0.elapsed();
        }
        let per = |d: std::time::Duration| d.as_nanos() as f64 / (rounds * entries) as f64;
        Ok((per(ind), per(stuff)))
    };
    (report.indirect_ns_per_entry, report.stuff_ns_per_entry) = put_and_clear(list, 512)?;
    // The same with every other guest page: each entry is a mapping of its own.
    let scattered_list: u64 = list + 0x1000;
    let scattered: Vec<u8> =
        (0..512u64).flat_map(|i| ((0x100_0000 + i * 2 * 4096) | t::READ | t::WRITE).to_le_bytes()).collect();
    vm.phys_write(scattered_list, &scattered);
    (report.indirect_scattered_ns_per_entry, report.stuff_scattered_ns_per_entry) = put_and_clear(scattered_list, 512)?;
    // The per-entry cost as batches grow (what batching buys).
    for entries in [1u64, 8, 64, 512] {
        let (indirect_ns_per_entry, stuff_ns_per_entry) = put_and_clear(list, entries)?;
        report.batches.push(BatchFigure { entries, indirect_ns_per_entry, stuff_ns_per_entry });
    }
    let t0 = Instant::now();
    for r in 0..rounds {
        call(t::PUT_TCE, [liobn, (r % 512) * 4096, 0x100_0000 | t::READ, 0])?;
        call(t::PUT_TCE, [liobn, (r % 512) * 4096, 0, 0])?;
    }
    report.put_ns = t0.elapsed().as_nanos() as f64 / (2 * rounds) as f64;
    if vmm::kvm_available() {
        let elf = crate::run::load_guest("exits")?;
        let mut c = VmConfig::new(AccelKind::Kvm);
        c.bench_iterations = 5000;
        c.serial_out = Box::new(std::io::sink());
        let kvm = Vm::new(c).map_err(|e| e.to_string())?;
        kvm.run_guest(&elf).map_err(|e| e.to_string())?;
        let marks = kvm.bench().marks();
        let at = |tag: u64| marks.iter().find(|m| m.0 == tag).map(|m| m.2);
        if let (Some(a), Some(b)) = (at(0), at(1)) {
            report.null_exit_ns = b.duration_since(a).as_nanos() as f64 / 5000.0;
        }
    }
    // Device translate: through a TCE window, and through a pvdma-style domain.
    call(t::PUT_TCE, [liobn, 0, 0x100_0000 | t::READ | t::WRITE, 0])?;
    let ep = vm.devices().first().map(|d| d.endpoint().clone()).ok_or("no device")?;
    let pv = vm.dma().create_domain("bench-pvdma", dma::DomainConfig::default());
    pv.map(dma::Iova(0x1_0000_0000), dma::Gpa(0x100_0000), 4096, dma::Perm::READ_WRITE).map_err(|e| e.to_string())?;
    report.translate_window_ns = translate_hit(&dma::DmaSpace::of(&ep), 0x10);
    report.translate_pvdma_ns = translate_hit(&dma::DmaSpace::new(pv, "bench"), 0x1_0000_0010);
    // Table memory: a 64 GiB window of 4 KiB pages with 1 GiB mapped, then shared.
    let (l64, bus) = call(t::CREATE_WINDOW, [group, 12, 36, 0])?;
    let cyc: Vec<u8> = (0..512u64).flat_map(|i| ((0x100_0000 + (i % 64) * 4096) | t::READ).to_le_bytes()).collect();
    vm.phys_write(list, &cyc);
    for b in 0..512u64 {
        call(t::PUT_TCE_INDIRECT, [l64, bus + b * 512 * 4096, list, 512])?;
    }
    let bytes = |l: u64| -> u64 {
        vm.frontends()
            .get("tce")
            .and_then(|f| f.info(&l.to_string()))
            .and_then(|s| s.split_whitespace().find_map(|w| w.strip_prefix("bytes=").and_then(|v| v.parse().ok())))
            .unwrap_or(0)
    };
    report.table_bytes_one_group = bytes(l64);
    for i in 1..3 {
        let (g, _) = call(t::DEVICE_GROUP, [bdf(i), 0, 0, 0])?;
        call(t::CREATE_WINDOW, [g, 12, 36, l64])?;
    }
    report.table_bytes_three_groups = bytes(l64);
    report.flat_bytes_three_groups = 3 * ((1u64 << 24) * 8);
    println!("passthru bench tce: {rounds} rounds, one run");
    // Linux builds every INDIRECT list from one physically contiguous buffer
    // (tce_buildmulti_pSeriesLP, tce_setrange_multi_pSeriesLP): the goal is for those.
    println!(
        "VMM work per entry of H_PUT_TCE_INDIRECT of 512: {:.1} ns for contiguous guest pages as Linux lists them (goal <= 40 ns: {}); {:.1} ns scattered",
        report.indirect_ns_per_entry,
        goal(report.indirect_ns_per_entry <= 40.0),
        report.indirect_scattered_ns_per_entry,
    );
    println!(
        "VMM work per entry of H_STUFF_TCE clearing 512: {:.1} ns contiguous, {:.1} ns scattered",
        report.stuff_ns_per_entry, report.stuff_scattered_ns_per_entry
    );
    for b in &report.batches {
        println!(
            "  batch of {:>3}: H_PUT_TCE_INDIRECT {:.1} ns/entry, H_STUFF_TCE {:.1} ns/entry",
            b.entries, b.indirect_ns_per_entry, b.stuff_ns_per_entry
        );
    }
    if report.null_exit_ns > 0.0 {
        println!(
            "VMM work of one H_PUT_TCE: {:.0} ns = {:.3} of a null exit ({:.0} ns, same run)",
            report.put_ns,
            report.put_ns / report.null_exit_ns,
            report.null_exit_ns
        );
    } else {
        println!("VMM work of one H_PUT_TCE: {:.0} ns (no KVM: no null exit to compare)", report.put_ns);
    }
    println!(
        "device translate hit: {:.1} ns through a TCE window, {:.1} ns through a pvdma domain",
        report.translate_window_ns, report.translate_pvdma_ns
    );
    println!(
        "table memory, 64 GiB window of 4 KiB with 1 GiB mapped: {} KiB for one group, {} KiB for three groups sharing it, {} KiB as three flat tables",
        report.table_bytes_one_group >> 10,
        report.table_bytes_three_groups >> 10,
        report.flat_bytes_three_groups >> 10
    );
    write_json(json, &report)?;
    if let Some(path) = plot {
        let series = |name: &str, f: fn(&BatchFigure) -> f64| crate::plot::Series {
            name: name.into(),
            points: report.batches.iter().map(|b| (b.entries as f64, f(b))).collect(),
        };
        crate::plot::draw(
            &path,
            &crate::plot::Chart {
                title: "TCE calls: VMM work per entry as batches grow",
                x: "entries per call",
                y: "ns per entry",
                log_x: true,
            },
            &[
                series("H_PUT_TCE_INDIRECT", |b| b.indirect_ns_per_entry),
                series("H_STUFF_TCE", |b| b.stuff_ns_per_entry),
            ],
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// ns per IOTLB-hit translate of 64 bytes at `iova`.
fn translate_hit(space: &dma::DmaSpace, iova: u64) -> f64 {
    let n = 200_000u64;
    let t0 = Instant::now();
    for _ in 0..n {
        let _ = std::hint::black_box(space.translate(dma::Iova(iova), 64, dma::Access::Read));
    }
    t0.elapsed().as_nanos() as f64 / n as f64
}

fn vm_api_kind(device: &str) -> vm_api::RegionKind {
    vm_api::RegionKind::RamDevice { device: device.to_string() }
}

/// Enables memory decoding and bus mastering of the VM's first device, as a driver
/// would; returns its register BAR's address.
fn enable_engine(vm: &Vm) -> Result<u64, String> {
    use abi::pci::{command, reg};
    let dev = vm.devices().into_iter().next().ok_or("no device attached")?;
    let cmd = command::MEMORY | command::MASTER;
    vm.pci().config_write(dev.slot(), reg::COMMAND, &cmd.to_le_bytes());
    dev.bar(abi::dma_engine::REGS_BAR).ok_or_else(|| "the engine's register BAR does not decode".to_string())
}

/// Small guest-memory helpers for the host-side driver.
mod vm_memory_bytes {
    use vmm::Vm;

    pub fn write_bytes(vm: &Vm, gpa: u64, data: &[u8]) -> Result<(), String> {
        vm.phys_write(gpa, data).then_some(()).ok_or_else(|| format!("write at {gpa:#x}"))
    }

    pub fn read_u32(vm: &Vm, gpa: u64) -> Result<u32, String> {
        let mut b = [0u8; 4];
        vm.phys_read(gpa, &mut b).then_some(()).ok_or_else(|| format!("read at {gpa:#x}"))?;
        Ok(u32::from_le_bytes(b))
    }
}

/// Plain memcpy of the same bytes, guest RAM to guest RAM, `copies` times.
fn memcpy_time(vm: &Vm, size: u64, copies: u64) -> std::time::Duration {
    use vm_memory::{GuestAddress, GuestMemoryBackend};
    let host = |gpa| vm.memory().get_host_address(GuestAddress(gpa)).unwrap_or(std::ptr::null_mut());
    let (src, dst) = (host(SRC), host(DST));
    let t = Instant::now();
    for _ in 0..copies {
        // SAFETY: both ranges lie in guest RAM (64 MiB) mapped by the VMM for its life.
        unsafe { std::ptr::copy_nonoverlapping(std::hint::black_box(src), dst, size as usize) };
    }
    std::hint::black_box(dst);
    t.elapsed()
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

fn devices_bench(bytes: u64, reads: u64, json: Option<PathBuf>, plot: Option<PathBuf>) -> Result<ExitCode, String> {
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

/// A device whose BAR 0 is `size` bytes of memory it offers for mmap (a GPU frame
/// buffer, as a snapshot sees it), migratable with no state of its own: what the
/// snapshot benchmark flags non-coherent.
struct MemoryDevice {
    memory: devices::dma_engine::Scratch,
    size: u64,
    config: std::sync::Mutex<pci::config::ConfigSpace>,
}

impl MemoryDevice {
    fn new(size: u64) -> Result<MemoryDevice, String> {
        let memory = devices::dma_engine::Scratch::new(size as usize).map_err(|e| e.to_string())?;
        let bar = abi::pci::bar::MEM_TYPE_64 | abi::pci::bar::PREFETCH;
        let mut config = pci::config::Builder::new(0x1b36, 0x11ff, 0x0380, 0).set_u32(abi::pci::reg::BAR0, bar).build();
        config.set_writable(abi::pci::reg::COMMAND, &[0x07, 0x04]);
        Ok(MemoryDevice { memory, size, config: std::sync::Mutex::new(config) })
    }
}

impl vfio_user::server::Device for MemoryDevice {
    fn info(&self) -> vfio_user::proto::DeviceInfo {
        use vfio_user::proto as p;
        p::DeviceInfo {
            flags: p::DEVICE_FLAGS_PCI | p::DEVICE_FLAGS_RESET,
            num_regions: p::PCI_NUM_REGIONS,
            num_irqs: p::PCI_NUM_IRQS,
        }
    }
    fn region_info(&self, index: u32) -> Option<vfio_user::proto::RegionInfo> {
        use vfio_user::proto as p;
        let rw = p::DMA_READ_FLAG | p::DMA_WRITE_FLAG;
        let size = match index {
            0 => self.size,
            p::PCI_CONFIG => 256,
            i if i < p::PCI_NUM_REGIONS => 0,
            _ => return None,
        };
        Some(p::RegionInfo { flags: if size > 0 { rw } else { 0 }, index, cap_offset: 0, size, offset: 0 })
    }
    fn region_mmap(&self, index: u32) -> Option<(std::os::fd::RawFd, Vec<(u64, u64)>)> {
        (index == 0).then(|| (self.memory.fd(), Vec::new()))
    }
    fn irq_info(&self, index: u32) -> Option<vfio_user::proto::IrqInfo> {
        use vfio_user::proto as p;
        (index < p::PCI_NUM_IRQS).then_some(p::IrqInfo { flags: p::IRQ_INFO_EVENTFD, index, count: 0 })
    }
    fn region_read(&mut self, region: u32, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        match region {
            0 => self.memory.read(offset, buf),
            vfio_user::proto::PCI_CONFIG if offset + buf.len() as u64 <= 256 => {
                self.config.lock().unwrap_or_else(|e| e.into_inner()).read(offset as u16, buf)
            }
            _ => return Err(libc::EINVAL),
        }
        Ok(())
    }
    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), i32> {
        match region {
            0 => self.memory.write(offset, data),
            vfio_user::proto::PCI_CONFIG if offset + data.len() as u64 <= 256 => {
                self.config.lock().unwrap_or_else(|e| e.into_inner()).write(offset as u16, data)
            }
            _ => return Err(libc::EINVAL),
        }
        Ok(())
    }
    fn set_irqs(&mut self, irqs: &vfio_user::proto::SetIrqs, fds: Vec<std::fs::File>) -> Result<(), i32> {
        if irqs.count == 0 && fds.is_empty() { Ok(()) } else { Err(libc::EINVAL) }
    }
    fn reset(&mut self) -> Result<(), i32> {
        Ok(())
    }
    fn migration(&mut self) -> Option<&mut dyn vfio_user::migration::Migration> {
        Some(self)
    }
}

/// No state beyond its memory, which the VMM saves as device memory.
impl vfio_user::migration::Migration for MemoryDevice {
    fn transition(&mut self, _from: u32, _to: u32) -> Result<(), i32> {
        Ok(())
    }
    fn read_data(&mut self, _max: usize) -> Result<Vec<u8>, i32> {
        Ok(Vec::new())
    }
    fn write_data(&mut self, data: &[u8]) -> Result<(), i32> {
        if data.is_empty() { Ok(()) } else { Err(libc::EINVAL) }
    }
}

/// Snapshot time of a VM with a device holding `bar` bytes of memory, that device
/// coherent or not (its memory then flushed as it is read): (ms, bytes flushed).
fn snapshot_with_device_memory(base: &std::path::Path, bar: u64, coherent: bool) -> Result<(f64, u64), String> {
    let mut c = VmConfig::new(AccelKind::Qtest);
    c.memory = 64 << 20;
    c.locked_memory = Some(1 << 30);
    c.serial_out = Box::new(std::io::sink());
    let vm = Vm::new(c).map_err(|e| e.to_string())?;
    let options = vmm::device_manager::AttachOptions { coherent, ..Default::default() };
    let dev = vm
        .attach_device_with(vmm::DeviceSpec::Local(Box::new(MemoryDevice::new(bar)?)), "identity", options)
        .map_err(|e| e.to_string())?;
    vm.pci().config_write(dev.slot(), abi::pci::reg::COMMAND, &abi::pci::command::MEMORY.to_le_bytes());
    let addr = dev.bar(0).ok_or("the memory BAR does not decode")?;
    let chunk: Vec<u8> = (0..(1u32 << 20)).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    for off in (0..bar).step_by(chunk.len()) {
        vm.write_memory_for_host(addr + off, &chunk).map_err(|e| e.to_string())?;
    }
    let flushed = vmm::flush::flushed_bytes();
    let t = Instant::now();
    let r = vmm::snapshot::save(&vm, &base.join(if coherent { "snap-mem" } else { "snap-mem-nc" }), &|_| {
        Some("memory".into())
    })
    .map_err(|e| e.to_string())?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if r.device_memory_bytes != bar {
        return Err(format!("the snapshot read {} bytes of device memory, not {bar}", r.device_memory_bytes));
    }
    Ok((ms, vmm::flush::flushed_bytes() - flushed))
}

#[derive(Serialize, Debug, Default)]
struct SnapshotReport {
    memory: u64,
    touched: u64,
    snapshot_bytes: u64,
    save_ms: f64,
    plain_write_ms: f64,
    save_ratio: f64,
    restore_ms: f64,
    plain_read_ms: f64,
    restore_ratio: f64,
    pause_ms: f64,
    /// The same save with the engine non-coherent (its BAR memory flushed as read).
    save_ms_noncoherent: f64,
    noncoherent_bytes_flushed: u64,
    /// A VM (64 MiB RAM) with a device holding 64 MiB of memory: snapshot time with
    /// that memory coherent (0 MiB flagged) and non-coherent (64 MiB flagged).
    save_ms_64m_device_memory_coherent: f64,
    save_ms_64m_device_memory_flagged: f64,
    flushed_bytes_64m: u64,
}

fn snapshot_bench(memory: u64, touched: u64, dir: Option<PathBuf>, json: Option<PathBuf>) -> Result<ExitCode, String> {
    use std::io::{Read, Write};
    if touched > memory {
        return Err("--touched must not exceed --memory".into());
    }
    let base = dir.unwrap_or_else(std::env::temp_dir).join(format!("passthru-bench-snapshot-{}", std::process::id()));
    std::fs::create_dir_all(&base).map_err(|e| format!("{}: {e}", base.display()))?;
    let result = (|| -> Result<SnapshotReport, String> {
        let bar = progress(4, "snapshot");
        let build = || -> Result<Vm, String> {
            let mut c = VmConfig::new(AccelKind::Qtest);
            c.memory = memory;
            c.locked_memory = Some(memory.saturating_mul(2));
            c.serial_out = Box::new(std::io::sink());
            Vm::new(c).map_err(|e| e.to_string())
        };
        let vm = build()?;
        let spec = "dma-engine,process=inline,dma=identity";
        let dev = crate::device::attach(&vm, &crate::device::parse_device(spec)?)?;
        // Decoding on, as a driver would: the engine's BAR memory is in the snapshot.
        let decode = abi::pci::command::MEMORY.to_le_bytes();
        vm.pci().config_write(dev.slot(), abi::pci::reg::COMMAND, &decode);
        // The guest touched `touched` bytes (every page, varied contents).
        let chunk: Vec<u8> = (0..(1u32 << 20)).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let mut at = 0;
        while at < touched {
            let n = (touched - at).min(chunk.len() as u64) as usize;
            vm.phys_write(0x100_0000 + at, &chunk[..n]);
            at += n as u64;
        }
        bar.inc(1);
        let snap_dir = base.join("snap");
        let t = Instant::now();
        let r = vmm::snapshot::save(&vm, &snap_dir, &|_| Some(spec.to_string())).map_err(|e| e.to_string())?;
        let save_ms = t.elapsed().as_secs_f64() * 1e3;
        bar.inc(1);
        // The same bytes with plain file I/O: one write and a sync.
        let plain = base.join("plain.bin");
        let bytes = vec![0x5au8; r.bytes as usize];
        let t = Instant::now();
        let mut f = std::fs::File::create(&plain).map_err(|e| e.to_string())?;
        f.write_all(&bytes).and_then(|()| f.sync_all()).map_err(|e| e.to_string())?;
        let plain_write_ms = t.elapsed().as_secs_f64() * 1e3;
        drop(bytes);
        bar.inc(1);
        drop(vm);
        let t = Instant::now();
        let snap = vmm::snapshot::Snapshot::load(&snap_dir).map_err(|e| e.to_string())?;
        let vm = build()?;
        snap.apply_ram(&vm).map_err(|e| e.to_string())?;
        let restore_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let mut back = Vec::new();
        std::fs::File::open(&plain).and_then(|mut f| f.read_to_end(&mut back)).map_err(|e| e.to_string())?;
        let plain_read_ms = t.elapsed().as_secs_f64() * 1e3;
        std::hint::black_box(&back);
        drop(vm);
        // The same with the engine non-coherent: its BAR memory is flushed as it is read.
        let vm = build()?;
        let nc = "dma-engine,process=inline,dma=identity,coherent=false";
        let dev = crate::device::attach(&vm, &crate::device::parse_device(nc)?)?;
        vm.pci().config_write(dev.slot(), abi::pci::reg::COMMAND, &decode);
        let mut at = 0;
        while at < touched {
            let n = (touched - at).min(chunk.len() as u64) as usize;
            vm.phys_write(0x100_0000 + at, &chunk[..n]);
            at += n as u64;
        }
        let flushed = vmm::flush::flushed_bytes();
        let t = Instant::now();
        vmm::snapshot::save(&vm, &base.join("snap-nc"), &|_| Some(nc.to_string())).map_err(|e| e.to_string())?;
        let save_ms_noncoherent = t.elapsed().as_secs_f64() * 1e3;
        let noncoherent_bytes_flushed = vmm::flush::flushed_bytes() - flushed;
        drop(vm);
        let (save_ms_64m_device_memory_coherent, _) = snapshot_with_device_memory(&base, 64 << 20, true)?;
        let (save_ms_64m_device_memory_flagged, flushed_bytes_64m) =
            snapshot_with_device_memory(&base, 64 << 20, false)?;
        bar.finish_and_clear();
        Ok(SnapshotReport {
            memory,
            touched,
            snapshot_bytes: r.bytes,
            save_ms,
            plain_write_ms,
            save_ratio: save_ms / plain_write_ms,
            restore_ms,
            plain_read_ms,
            restore_ratio: restore_ms / plain_read_ms,
            pause_ms: r.paused.as_secs_f64() * 1e3,
            save_ms_noncoherent,
            noncoherent_bytes_flushed,
            save_ms_64m_device_memory_coherent,
            save_ms_64m_device_memory_flagged,
            flushed_bytes_64m,
        })
    })();
    let _ = std::fs::remove_dir_all(&base);
    let r = result?;
    println!(
        "passthru bench snapshot: {} MiB guest, {} MiB touched, one DMA engine, one run",
        r.memory >> 20,
        r.touched >> 20
    );
    println!("{:<44} {:>10} {:>10} {:>8}", "", "ms", "plain ms", "ratio");
    println!(
        "{:<44} {:>10.1} {:>10.1} {:>8.2}",
        format!("save ({} MiB written)", r.snapshot_bytes >> 20),
        r.save_ms,
        r.plain_write_ms,
        r.save_ratio
    );
    println!(
        "{:<44} {:>10.1} {:>10.1} {:>8.2}",
        "restore (checksums, RAM into a new VM)", r.restore_ms, r.plain_read_ms, r.restore_ratio
    );
    println!("pause, vCPU and devices stopped to resumed (in-memory part): {:.1} ms", r.pause_ms);
    println!(
        "save with the engine non-coherent: {:.1} ms ({} KiB of its memory flushed before the read) vs {:.1} ms coherent",
        r.save_ms_noncoherent,
        r.noncoherent_bytes_flushed >> 10,
        r.save_ms
    );
    println!(
        "snapshot of a 64 MiB-RAM VM with a device holding 64 MiB of memory: {:.1} ms with 0 MiB flagged, {:.1} ms with 64 MiB flagged ({} MiB flushed); ratio {:.2}",
        r.save_ms_64m_device_memory_coherent,
        r.save_ms_64m_device_memory_flagged,
        r.flushed_bytes_64m >> 20,
        r.save_ms_64m_device_memory_flagged / r.save_ms_64m_device_memory_coherent
    );
    write_json(json, &r)?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize, Debug, Default)]
struct PvdmaReport {
    iterations: u64,
    /// VMM work of one MAP of 4 KiB (no exit), device in the VMM.
    map_ns: f64,
    /// VMM work of one UNMAP of 4 KiB (no exit), device in the VMM.
    unmap_ns: f64,
    /// The same with the device in its own process (DMA_MAP / DMA_UNMAP forwarded).
    map_ns_device_process: f64,
    /// The same with the device in its own process.
    unmap_ns_device_process: f64,
    /// Per page inside a 512-page MAP_SG (device in the VMM).
    map_sg_ns_per_page: f64,
    /// Per page inside the matching UNMAP_SG.
    unmap_sg_ns_per_page: f64,
    /// A guest's MAP hypercall, end to end.
    guest_map_ns: f64,
    /// A guest's UNMAP hypercall, end to end.
    guest_unmap_ns: f64,
    /// A guest's null hypercall-port exit, same run.
    guest_null_ns: f64,
}

fn pvdma_vm(accel: AccelKind, device: crate::device::DeviceArg) -> Result<Vm, String> {
    let mut config = VmConfig::new(accel);
    config.memory = 256 << 20;
    config.locked_memory = Some(256 << 20);
    config.serial_out = Box::new(std::io::sink());
    let vm = Vm::new(config).map_err(|e| e.to_string())?;
    crate::device::attach(&vm, &device)?;
    enable_engine(&vm)?; // bus mastering: the device is given what the guest maps
    Ok(vm)
}

/// The first device's requester id: the id of its paravirtual DMA calls.
fn first_bdf(vm: &Vm) -> u64 {
    vm.devices().first().map_or(0, |d| u64::from(d.bdf()))
}

/// Times `n` MAPs of distinct 4 KiB pages, then their UNMAPs, through the hypercall
/// dispatch; returns ns per MAP and per UNMAP.
fn time_map_unmap(vm: &Vm, n: u64) -> Result<(f64, f64), String> {
    use abi::hcall::{Args, Status};
    use abi::pvdma as pv;
    let dev = first_bdf(vm);
    let mut iovas = Vec::with_capacity(n as usize);
    let t = Instant::now();
    for i in 0..n {
        let r = vm.hypercall(&Args {
            nr: pv::MAP,
            a: [dev, 0x100_0000 + (i % 32768) * 4096, 4096, pv::dir::BIDIRECTIONAL, 0],
        });
        if r.status != Status::Success {
            return Err(format!("MAP failed: {}", r.status.name()));
        }
        iovas.push(r.r[0]);
    }
    let map = t.elapsed();
    let t = Instant::now();
    for iova in &iovas {
        let r = vm.hypercall(&Args { nr: pv::UNMAP, a: [dev, *iova, 4096, 0, 0] });
        if r.status != Status::Success {
            return Err(format!("UNMAP failed: {}", r.status.name()));
        }
    }
    let unmap = t.elapsed();
    Ok((map.as_nanos() as f64 / n as f64, unmap.as_nanos() as f64 / n as f64))
}

fn pvdma_bench(iterations: u64, json: Option<PathBuf>) -> Result<ExitCode, String> {
    use crate::device::DeviceArg;
    use abi::hcall::{Args, Status};
    use abi::pvdma as pv;
    use vmm::IommuMode;
    let n = iterations.max(1);
    let inline = DeviceArg::engine(IommuMode::SharedFd, true, "pvdma");
    let remote = DeviceArg::engine(IommuMode::SharedFd, false, "pvdma");
    let mut r = PvdmaReport { iterations: n, ..Default::default() };

    let vm = pvdma_vm(AccelKind::Qtest, inline.clone())?;
    time_map_unmap(&vm, n.min(1000))?; // warm up the allocator's caches
    (r.map_ns, r.unmap_ns) = time_map_unmap(&vm, n)?;
    // A 512-entry list of distinct pages at 64 MiB, list itself at 48 MiB.
    let list: u64 = 0x300_0000;
    let mut bytes = Vec::new();
    for i in 0..pv::MAX_SG {
        bytes.extend_from_slice(&(0x400_0000 + i * 4096).to_le_bytes());
        bytes.extend_from_slice(&4096u64.to_le_bytes());
    }
    let rounds = (n / 10).clamp(10, 200);
    let (mut map_sg, mut unmap_sg) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
    for _ in 0..rounds {
        vm.phys_write(list, &bytes);
        let t = Instant::now();
        let m = vm.hypercall(&Args { nr: pv::MAP_SG, a: [first_bdf(&vm), list, pv::MAX_SG, pv::dir::FROM_DEVICE, 0] });
        map_sg += t.elapsed();
        if m.status != Status::Success {
            return Err(format!("MAP_SG failed: {}", m.status.name()));
        }
        let t = Instant::now();
        let u = vm.hypercall(&Args { nr: pv::UNMAP_SG, a: [first_bdf(&vm), list, pv::MAX_SG, 0, 0] });
        unmap_sg += t.elapsed();
        if u.status != Status::Success {
            return Err(format!("UNMAP_SG failed: {}", u.status.name()));
        }
    }
    r.map_sg_ns_per_page = map_sg.as_nanos() as f64 / (rounds * pv::MAX_SG) as f64;
    r.unmap_sg_ns_per_page = unmap_sg.as_nanos() as f64 / (rounds * pv::MAX_SG) as f64;
    drop(vm);

    let vm = pvdma_vm(AccelKind::Qtest, remote)?;
    (r.map_ns_device_process, r.unmap_ns_device_process) = time_map_unmap(&vm, n.min(2000))?;
    drop(vm);

    let guest_n = n.min(1024);
    let elf = crate::run::load_guest("pvdma")?;
    let vm = pvdma_vm(AccelKind::Kvm, inline)?;
    let status = vm.run_guest_with_args(&elf, &[1, guest_n]).map_err(|e| e.to_string())?;
    if status != 0 {
        return Err(format!("the pvdma guest's benchmark failed with status {status}"));
    }
    let marks = vm.bench().marks();
    let at = |tag: u64| marks.iter().find(|m| m.0 == tag).map(|m| m.2).ok_or("missing benchmark mark");
    let per = |a: u64, b: u64| -> Result<f64, String> {
        Ok(at(b)?.duration_since(at(a)?).as_nanos() as f64 / guest_n as f64)
    };
    r.guest_map_ns = per(0xb0, 0xb1)?;
    r.guest_unmap_ns = per(0xb1, 0xb2)?;
    r.guest_null_ns = per(0xb2, 0xb3)?;

    let null = r.guest_null_ns;
    println!("passthru bench pvdma: one run, {n} calls per figure ({guest_n} from the guest)");
    println!("{:<58} {:>10} {:>10}", "", "ns", "x null");
    let row = |name: &str, ns: f64| println!("{name:<58} {ns:>10.0} {:>10.3}", ns / null);
    row("guest null hypercall-port exit", null);
    row("guest MAP 4 KiB, end to end", r.guest_map_ns);
    row("guest UNMAP 4 KiB, end to end", r.guest_unmap_ns);
    row("VMM work of MAP 4 KiB (no exit), device in the VMM", r.map_ns);
    row("VMM work of UNMAP 4 KiB (no exit), device in the VMM", r.unmap_ns);
    row("VMM work of MAP 4 KiB, device process (DMA_MAP sent)", r.map_ns_device_process);
    row("VMM work of UNMAP 4 KiB, device process (DMA_UNMAP acked)", r.unmap_ns_device_process);
    println!(
        "{:<58} {:>10.1}   goal <= 100 ns: {}",
        "per page inside a 512-page MAP_SG",
        r.map_sg_ns_per_page,
        goal(r.map_sg_ns_per_page <= 100.0)
    );
    println!("{:<58} {:>10.1}", "per page inside a 512-page UNMAP_SG", r.unmap_sg_ns_per_page);
    let own = r.map_ns + r.unmap_ns;
    println!(
        "VMM's own work for MAP+UNMAP: {own:.0} ns = {:.1}% of a null exit (goal <= 5%: {})",
        100.0 * own / null,
        goal(own <= 0.05 * null)
    );
    write_json(json, &r)?;
    Ok(ExitCode::SUCCESS)
}
