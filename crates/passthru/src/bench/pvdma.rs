//! `bench pvdma`: the VMM's own cost of MAP and UNMAP, per page in MAP_SG, a guest's MAP
//! end to end.

use super::engine::*;
use super::*;

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

pub(super) fn pvdma_bench(iterations: u64, runs: u32, json: Option<PathBuf>) -> Result<ExitCode, String> {
    let n = iterations.max(1);
    let title = format!("passthru bench pvdma: {n} calls per figure ({} from the guest)", n.min(1024));
    repeat(&title, runs, json, || measure(n), figures)?;
    Ok(ExitCode::SUCCESS)
}

fn figures(r: &PvdmaReport) -> Vec<Fig> {
    let null = r.guest_null_ns;
    let own = r.map_ns + r.unmap_ns;
    vec![
        Fig::new("guest null hypercall-port exit", "ns", null),
        Fig::new("guest MAP 4 KiB, end to end", "ns", r.guest_map_ns),
        Fig::new("guest UNMAP 4 KiB, end to end", "ns", r.guest_unmap_ns),
        Fig::new("guest MAP / null exit", "ratio", r.guest_map_ns / null),
        Fig::new("VMM work of MAP 4 KiB (no exit), device in the VMM", "ns", r.map_ns),
        Fig::new("VMM work of UNMAP 4 KiB (no exit), device in the VMM", "ns", r.unmap_ns),
        Fig::new("VMM work of MAP 4 KiB, device process (DMA_MAP sent)", "ns", r.map_ns_device_process),
        Fig::new("VMM work of UNMAP 4 KiB, device process (DMA_UNMAP acked)", "ns", r.unmap_ns_device_process),
        Fig::new("per page inside a 512-page MAP_SG", "ns", r.map_sg_ns_per_page).goal(Goal::AtMost(100.0)),
        Fig::new("per page inside a 512-page UNMAP_SG", "ns", r.unmap_sg_ns_per_page),
        Fig::new("VMM's own MAP+UNMAP / null exit", "%", 100.0 * own / null).goal(Goal::AtMost(5.0)),
    ]
}

fn measure(n: u64) -> Result<PvdmaReport, String> {
    use crate::device::DeviceArg;
    use abi::hcall::{Args, Status};
    use abi::pvdma as pv;
    use vmm::IommuMode;
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
    let elf = guests::load("pvdma")?;
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

    Ok(r)
}
