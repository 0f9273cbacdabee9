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

pub(super) fn tce_bench(rounds: u64, json: Option<PathBuf>, plot: Option<PathBuf>) -> Result<ExitCode, String> {
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
