//! `bench noncoherent`: cache flushes against memcpy, and a VMM read of flagged memory.

use super::engine::vm_api_kind;
use super::*;

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

pub(super) fn noncoherent_bench(mib: u64, runs: u32, json: Option<PathBuf>) -> Result<ExitCode, String> {
    let mib = mib.max(1);
    let Some((_, line)) = vmm::flush::cpu() else { return Err("this CPU has no CLFLUSH".into()) };
    let title = format!("passthru bench noncoherent: {mib} MiB per figure, cache line {line} bytes");
    repeat(&title, runs, json, || measure(mib), figures)?;
    Ok(ExitCode::SUCCESS)
}

fn figures(r: &NoncoherentReport) -> Vec<Fig> {
    let mut v: Vec<Fig> =
        r.flush.iter().map(|f| Fig::new(format!("{} per MiB", f.method), "ns", f.ns_per_mib)).collect();
    v.extend(
        r.flush.iter().map(|f| Fig::new(format!("{} / memcpy of the same MiB", f.method), "ratio", f.ratio_to_memcpy)),
    );
    v.push(Fig::new(format!("VMM read of {} MiB of device memory, unflagged", r.mib), "ms", r.read_unflagged_ms));
    v.push(Fig::new("same, flagged non-coherent (flushed first)", "ms", r.read_flagged_ms));
    v
}

fn measure(mib: u64) -> Result<NoncoherentReport, String> {
    use vmm::flush::{Method, cpu, flush_range};
    let len = usize::try_from(mib << 20).map_err(|_| "--mib too large")?;
    let Some((best, _)) = cpu() else { return Err("this CPU has no CLFLUSH".into()) };
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
    Ok(NoncoherentReport { mib, flush, read_unflagged_ms, read_flagged_ms })
}
