//! The host-side driver of a DMA engine the benchmarks share (no vCPU: the VMM writes
//! its registers and ring as a guest driver would), and small helpers.

use super::*;

/// Guest-physical layout of the host-side driver.
pub(super) const RING: u64 = 0x20_0000;
pub(super) const COMPLETIONS: u64 = 0x21_0000;
pub(super) const SRC: u64 = 0x40_0000;
pub(super) const DST: u64 = 0x80_0000;
pub(super) const RING_SIZE: u64 = 64;
pub(super) const BATCH: u64 = 32;

/// Drives the engine of `vm` with COPY descriptors of `size`, `copies` times;
/// returns the wall time.
pub(super) fn drive_engine(vm: &Vm, size: u64, copies: u64) -> Result<std::time::Duration, String> {
    drive_engine_at(vm, SRC, DST, size, copies)
}

/// As [`drive_engine`], copying from `src` to `dst` (guest-physical, identity domain).
pub(super) fn drive_engine_at(
    vm: &Vm,
    src: u64,
    dst: u64,
    size: u64,
    copies: u64,
) -> Result<std::time::Duration, String> {
    use abi::dma_engine::{self as de, Descriptor, op, regs};
    use vm_memory_bytes::write_bytes;
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
        if wait_completion(vm, last)? != de::completion::SUCCESS {
            return Err(format!("a COPY of {size} bytes failed"));
        }
        done += n;
    }
    Ok(t.elapsed())
}

/// Waits for the completion record at `gpa` to leave PENDING (30 s at most); its
/// status. Spins briefly, then gives the core away: on two cores the device's worker
/// must not wait behind a spinning driver.
pub(super) fn wait_completion(vm: &Vm, gpa: u64) -> Result<u32, String> {
    use vm_memory_bytes::read_u32;
    let t = Instant::now();
    let mut polls = 0u32;
    loop {
        let s = read_u32(vm, gpa)?;
        if s != abi::dma_engine::completion::PENDING {
            return Ok(s);
        }
        if t.elapsed() > std::time::Duration::from_secs(30) {
            return Err("the engine stopped completing descriptors".into());
        }
        polls += 1;
        if polls < 64 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// ns per IOTLB-hit translate of 64 bytes at `iova`.
pub(super) fn translate_hit(space: &dma::DmaSpace, iova: u64) -> f64 {
    let n = 200_000u64;
    let t0 = Instant::now();
    for _ in 0..n {
        let _ = std::hint::black_box(space.translate(dma::Iova(iova), 64, dma::Access::Read));
    }
    t0.elapsed().as_nanos() as f64 / n as f64
}

pub(super) fn vm_api_kind(device: &str) -> vm_api::RegionKind {
    vm_api::RegionKind::RamDevice { device: device.to_string() }
}

/// Enables memory decoding and bus mastering of the VM's first device, as a driver
/// would; returns its register BAR's address.
pub(super) fn enable_engine(vm: &Vm) -> Result<u64, String> {
    use abi::pci::{command, reg};
    let dev = vm.devices().into_iter().next().ok_or("no device attached")?;
    let cmd = command::MEMORY | command::MASTER;
    vm.pci().config_write(dev.slot(), reg::COMMAND, &cmd.to_le_bytes());
    dev.bar(abi::dma_engine::REGS_BAR).ok_or_else(|| "the engine's register BAR does not decode".to_string())
}

/// Small guest-memory helpers for the host-side driver.
pub(super) mod vm_memory_bytes {
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
pub(super) fn memcpy_time(vm: &Vm, size: u64, copies: u64) -> std::time::Duration {
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
