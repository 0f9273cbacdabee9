//! `bench snapshot`: save and restore against plain file I/O, the pause, and the cost of
//! flagged device memory.

use super::*;

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
        .attach_device_with(
            vmm::DeviceSpec::Local(Box::new(devices::memory_device::MemoryDevice::new(bar)?)),
            "identity",
            options,
        )
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

pub(super) fn snapshot_bench(
    memory: u64,
    touched: u64,
    dir: Option<PathBuf>,
    runs: u32,
    json: Option<PathBuf>,
) -> Result<ExitCode, String> {
    if touched > memory {
        return Err("--touched must not exceed --memory".into());
    }
    let title =
        format!("passthru bench snapshot: {} MiB guest, {} MiB touched, one DMA engine", memory >> 20, touched >> 20);
    repeat(&title, runs, json, || measure(memory, touched, &dir), figures)?;
    Ok(ExitCode::SUCCESS)
}

fn figures(r: &SnapshotReport) -> Vec<Fig> {
    vec![
        Fig::new(format!("save ({} MiB written)", r.snapshot_bytes >> 20), "ms", r.save_ms),
        Fig::new("same bytes, plain write + sync", "ms", r.plain_write_ms),
        Fig::new("save / plain write", "ratio", r.save_ratio),
        Fig::new("restore (checksums, RAM into a new VM)", "ms", r.restore_ms),
        Fig::new("same bytes, plain read", "ms", r.plain_read_ms),
        Fig::new("restore / plain read", "ratio", r.restore_ratio),
        Fig::new("pause, vCPU and devices stopped to resumed", "ms", r.pause_ms),
        Fig::new("save with the engine non-coherent", "ms", r.save_ms_noncoherent),
        Fig::new("  its memory flushed before the read", "KiB", r.noncoherent_bytes_flushed as f64 / 1024.0),
        Fig::new("save, device with 64 MiB of memory, 0 MiB flagged", "ms", r.save_ms_64m_device_memory_coherent),
        Fig::new("same, 64 MiB flagged non-coherent", "ms", r.save_ms_64m_device_memory_flagged),
        Fig::new(
            "flagged / unflagged",
            "ratio",
            r.save_ms_64m_device_memory_flagged / r.save_ms_64m_device_memory_coherent,
        ),
    ]
}

fn measure(memory: u64, touched: u64, dir: &Option<PathBuf>) -> Result<SnapshotReport, String> {
    use std::io::{Read, Write};
    let base =
        dir.clone().unwrap_or_else(std::env::temp_dir).join(format!("passthru-bench-snapshot-{}", std::process::id()));
    std::fs::create_dir_all(&base).map_err(|e| format!("{}: {e}", base.display()))?;
    let result = (|| -> Result<SnapshotReport, String> {
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
        let snap_dir = base.join("snap");
        let t = Instant::now();
        let r = vmm::snapshot::save(&vm, &snap_dir, &|_| Some(spec.to_string())).map_err(|e| e.to_string())?;
        let save_ms = t.elapsed().as_secs_f64() * 1e3;
        // The same bytes with plain file I/O: one write and a sync.
        let plain = base.join("plain.bin");
        let bytes = vec![0x5au8; r.bytes as usize];
        let t = Instant::now();
        let mut f = std::fs::File::create(&plain).map_err(|e| e.to_string())?;
        f.write_all(&bytes).and_then(|()| f.sync_all()).map_err(|e| e.to_string())?;
        let plain_write_ms = t.elapsed().as_secs_f64() * 1e3;
        drop(bytes);
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
    result
}
