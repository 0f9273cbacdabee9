//! `bench tce`: TCE calls' VMM work per entry, translate through a window, table memory.

use super::engine::*;
use super::*;

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

pub(super) fn tce_bench(
    rounds: u64,
    runs: u32,
    json: Option<PathBuf>,
    plot: Option<PathBuf>,
) -> Result<ExitCode, String> {
    let rounds = rounds.max(1);
    let title = format!("passthru bench tce: {rounds} rounds of each call");
    let (_, spreads) = repeat(&title, runs, json, || measure(rounds), figures)?;
    if let Some(path) = plot {
        let series = |call: &str| crate::plot::Series {
            name: call.into(),
            points: BATCHES
                .iter()
                .filter_map(|n| spread::median_of(&spreads, &batch_name(call, *n)).map(|ns| (*n as f64, ns)))
                .collect(),
        };
        plot_to(
            &path,
            &crate::plot::Chart {
                title: "TCE calls: VMM work per entry as batches grow",
                x: "entries per call",
                y: "ns per entry (median of the runs)",
                log_x: true,
            },
            &[series("H_PUT_TCE_INDIRECT"), series("H_STUFF_TCE")],
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Batch sizes the per-entry cost is measured at.
const BATCHES: [u64; 4] = [1, 8, 64, 512];

fn batch_name(call: &str, entries: u64) -> String {
    format!("{call}, batch of {entries}, per entry")
}

fn figures(r: &TceReport) -> Vec<Fig> {
    // Linux builds every INDIRECT list from one physically contiguous buffer
    // (tce_buildmulti_pSeriesLP, tce_setrange_multi_pSeriesLP): the goal is for those.
    let mut v = vec![
        Fig::new("H_PUT_TCE_INDIRECT of 512 contiguous pages, per entry", "ns", r.indirect_ns_per_entry)
            .goal(Goal::AtMost(40.0)),
        Fig::new("H_PUT_TCE_INDIRECT of 512 scattered pages, per entry", "ns", r.indirect_scattered_ns_per_entry),
        Fig::new("H_STUFF_TCE clearing 512 contiguous, per entry", "ns", r.stuff_ns_per_entry),
        Fig::new("H_STUFF_TCE clearing 512 scattered, per entry", "ns", r.stuff_scattered_ns_per_entry),
    ];
    for b in &r.batches {
        v.push(Fig::new(batch_name("H_PUT_TCE_INDIRECT", b.entries), "ns", b.indirect_ns_per_entry));
        v.push(Fig::new(batch_name("H_STUFF_TCE", b.entries), "ns", b.stuff_ns_per_entry));
    }
    v.push(Fig::new("VMM work of one H_PUT_TCE", "ns", r.put_ns));
    if r.null_exit_ns > 0.0 {
        v.push(Fig::new("one H_PUT_TCE / a null exit of the same run", "ratio", r.put_ns / r.null_exit_ns));
    }
    v.push(Fig::new("device translate hit through a TCE window", "ns", r.translate_window_ns));
    v.push(Fig::new("device translate hit through a pvdma domain", "ns", r.translate_pvdma_ns));
    let kib = |b: u64| b as f64 / 1024.0;
    v.push(Fig::new("table of a 64 GiB window, 1 GiB mapped, one group", "KiB", kib(r.table_bytes_one_group)));
    v.push(Fig::new("same, three groups sharing it", "KiB", kib(r.table_bytes_three_groups)));
    v.push(Fig::new("same, as three flat tables", "KiB", kib(r.flat_bytes_three_groups)));
    v
}

fn measure(rounds: u64) -> Result<TceReport, String> {
    use crate::device::DeviceArg;
    use abi::hcall::Args;
    use abi::tce as t;
    use vmm::IommuMode;
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
    for entries in BATCHES {
        let (indirect_ns_per_entry, stuff_ns_per_entry) = put_and_clear(list, entries)?;
        report.batches.push(BatchFigure { entries, indirect_ns_per_entry, stuff_ns_per_entry });
    }
    let t0 = Instant::now();
    for r in 0..rounds {
        call(t::PUT_TCE, [liobn, (r % 512) * 4096, 0x100_0000 | t::READ, 0])?;
        call(t::PUT_TCE, [liobn, (r % 512) * 4096, 0, 0])?;
    }
    report.put_ns = t0.elapsed().as_nanos() as f64 / (2 * rounds) as f64;
    report.null_exit_ns = null_exit_ns()?;
    // Device translate: through a TCE window, and through a pvdma-style domain.
    call(t::PUT_TCE, [liobn, 0, 0x100_0000 | t::READ | t::WRITE, 0])?;
    let ep = vm.devices().first().map(|d| d.endpoint().clone()).ok_or("no device")?;
    let pv = vm.dma().create_domain("bench-pvdma", dma::DomainConfig::default());
    pv.map(dma::Iova(0x1_0000_0000), dma::Gpa(0x100_0000), 4096, dma::Perm::READ_WRITE).map_err(|e| e.to_string())?;
    report.translate_window_ns = translate_hit(&dma::DmaSpace::of(&ep), 0x10);
    report.translate_pvdma_ns = translate_hit(&dma::DmaSpace::new(pv, "bench"), 0x1_0000_0010);
    let (one, three) = table_memory(&vm, &call, group, list)?;
    (report.table_bytes_one_group, report.table_bytes_three_groups) = (one, three);
    report.flat_bytes_three_groups = 3 * ((1u64 << 24) * 8);
    Ok(report)
}

/// A guest's null hypercall-port exit in ns (0 without KVM).
fn null_exit_ns() -> Result<f64, String> {
    if !vmm::kvm_available() {
        return Ok(0.0);
    }
    let elf = guests::load("exits")?;
    let mut c = VmConfig::new(AccelKind::Kvm);
    c.bench_iterations = 5000;
    c.serial_out = Box::new(std::io::sink());
    let kvm = Vm::new(c).map_err(|e| e.to_string())?;
    kvm.run_guest(&elf).map_err(|e| e.to_string())?;
    let marks = kvm.bench().marks();
    let at = |tag: u64| marks.iter().find(|m| m.0 == tag).map(|m| m.2);
    Ok(match (at(0), at(1)) {
        (Some(a), Some(b)) => b.duration_since(a).as_nanos() as f64 / 5000.0,
        _ => 0.0,
    })
}

/// Table memory of a 64 GiB window of 4 KiB pages with 1 GiB mapped (through `list`,
/// the entry list's page): for `group` alone, then shared by the other two devices'
/// groups.
fn table_memory(
    vm: &Vm,
    call: &dyn Fn(u64, [u64; 4]) -> Result<(u64, u64), String>,
    group: u64,
    list: u64,
) -> Result<(u64, u64), String> {
    use abi::tce as t;
    let bdf = |i: usize| vm.devices().get(i).map(|d| u64::from(d.bdf())).unwrap_or(0);
    let (l64, bus) = call(t::CREATE_WINDOW, [group, 12, 36, 0])?;
    let cyc: Vec<u8> = (0..512u64).flat_map(|i| ((0x100_0000 + (i % 64) * 4096) | t::READ).to_le_bytes()).collect();
    vm.phys_write(list, &cyc);
    for b in 0..512u64 {
        call(t::PUT_TCE_INDIRECT, [l64, bus + b * 512 * 4096, list, 512])?;
    }
    let bytes = |l: u64| -> u64 {
        vm.frontends()
            .get("tce")
            .and_then(|f| f.queries()?.query("info", &l.to_string()).ok())
            .and_then(|a| match a.fields.get("bytes") {
                Some(iommu::StatValue::Gauge(b)) => Some(*b),
                _ => None,
            })
            .unwrap_or(0)
    };
    let one = bytes(l64);
    for i in 1..3 {
        let (g, _) = call(t::DEVICE_GROUP, [bdf(i), 0, 0, 0])?;
        call(t::CREATE_WINDOW, [g, 12, 36, l64])?;
    }
    Ok((one, bytes(l64)))
}
