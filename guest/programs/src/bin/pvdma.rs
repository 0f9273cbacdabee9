//! `pvdma`: the paravirtual DMA demo (the default of `passthru run`). The guest maps
//! every buffer through hypercalls before the first DMA engine on the PCI bus may
//! touch it (its requester id is the calls' device id), drives copies,
//! fills and CRCs with the IOVAs it got, checks every result, unmaps, and checks that
//! the device is held to what was mapped: a write into a to-device buffer faults, a
//! reuse of an unmapped IOVA faults, and both leave memory untouched.
//! Arguments: mode (0 demo, 1 benchmark), iterations for the benchmark (default 1000).
//! Exit: 0 ok, 1 wrong result, 3 device gone, 4 timeout.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};
use rt::abi::dma_engine::{self as de, Descriptor, completion, op};
use rt::abi::hcall::{self, Status};
use rt::abi::layout;
use rt::abi::pvdma::{SgEntry, dir};
use rt::dma_engine::{Engine, WaitError};
use rt::fmt::Dec;
use rt::hcall::hcall;
use rt::mmio::{read64, write64};
use rt::pvdma::DmaApi;
use rt::{BootInfo, apic, idt, println};

const VECTOR: u8 = 0x60;
const RING: u64 = layout::GUEST_FREE_RAM;
const COMPLETIONS: u64 = RING + 0x1000;
const SRC: u64 = RING + 0x10_0000;
const DST: u64 = RING + 0x30_0000;
const TO_DEV_BUF: u64 = RING + 0x50_0000;
const SG_AREA: u64 = RING + 0x60_0000;
const PAGE: u64 = 4096;
const SIZES: [u64; 3] = [4096, 64 << 10, 1 << 20];
const BENCH_MAX: usize = 1024;

static IRQS: AtomicU64 = AtomicU64::new(0);
static mut SG: [SgEntry; 8] = [SgEntry { addr: 0, len: 0 }; 8];
static mut BENCH_IOVAS: [u64; BENCH_MAX] = [0; BENCH_MAX];

fn on_msi(_v: u8) {
    IRQS.fetch_add(1, Ordering::Relaxed);
    apic::eoi();
}

/// Waits (bounded) until `n` MSIs were counted.
fn wait_irqs(n: u64) -> bool {
    let mut spins = 0u64;
    while IRQS.load(Ordering::Relaxed) < n {
        spins += 1;
        if spins > 20_000_000 {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

fn peek(a: u64) -> u64 {
    // SAFETY: guest RAM owned by this program.
    unsafe { read64(a) }
}

fn poke(a: u64, v: u64) {
    // SAFETY: guest RAM owned by this program.
    unsafe { write64(a, v) }
}

fn fill_cpu(a: u64, len: u64, byte: u8) {
    // SAFETY: guest RAM owned by this program; memset is `rep stosb`.
    unsafe { core::ptr::write_bytes(a as *mut u8, byte, len as usize) };
}

struct Demo {
    /// The engine's requester id: the device id of paravirtual DMA calls.
    dev: u64,
    api: DmaApi,
    e: Engine,
    maps: u64,
    unmaps: u64,
    bytes: u64,
    descriptors: u64,
    faults_seen: u64,
}

impl Demo {
    fn map(&mut self, gpa: u64, len: u64, d: u64) -> Result<u64, u8> {
        match self.api.map(self.dev, gpa, len, d) {
            Ok(iova) => {
                self.maps += 1;
                Ok(iova)
            }
            Err(s) => {
                println!("pvdma: MAP of {} bytes at {:#x} failed: {}", Dec(len), gpa, s.name());
                Err(1)
            }
        }
    }

    fn unmap(&mut self, iova: u64, len: u64) -> Result<(), u8> {
        self.api.unmap(self.dev, iova, len).map_err(|s| {
            println!("pvdma: UNMAP of {:#x} failed: {}", iova, s.name());
            1
        })?;
        self.unmaps += 1;
        Ok(())
    }

    /// Runs descriptors; returns each one's (status, result).
    fn run(&mut self, ds: &[Descriptor]) -> Result<[(u32, u64); 4], u8> {
        let mut seqs = [0u32; 4];
        for (i, d) in ds.iter().enumerate() {
            seqs[i] = self.e.push(*d);
        }
        self.e.ring();
        let mut out = [(0u32, 0u64); 4];
        for (i, seq) in seqs[..ds.len()].iter().enumerate() {
            match self.e.wait(*seq) {
                Ok((status, bytes, result)) => {
                    out[i] = (status, result);
                    if status == completion::SUCCESS {
                        self.bytes += bytes;
                        self.descriptors += 1;
                    } else {
                        self.faults_seen += 1;
                    }
                }
                Err(WaitError::DeviceGone) => {
                    println!("pvdma: the device is gone (surprise removal)");
                    return Err(3);
                }
                Err(WaitError::Timeout) => {
                    println!("pvdma: timeout waiting for the device");
                    return Err(4);
                }
            }
        }
        Ok(out)
    }
}

fn copies(d: &mut Demo) -> Result<u64, u8> {
    let mut last_dst = 0;
    for (i, &size) in SIZES.iter().enumerate() {
        let pattern = 0x0101_0101_0101_0101u64.wrapping_mul(i as u64 + 1);
        let src = d.map(SRC, size, dir::BIDIRECTIONAL)?;
        let dst = d.map(DST, size, dir::BIDIRECTIONAL)?;
        let r = d.run(&[
            Descriptor { op: op::FILL, dst: src, len: size, pattern, ..Default::default() },
            Descriptor { op: op::COPY, src, dst, len: size, ..Default::default() },
            Descriptor { op: op::CRC32C, src, len: size, ..Default::default() },
            Descriptor { op: op::CRC32C, src: dst, len: size, flags: de::FLAG_INTERRUPT, ..Default::default() },
        ])?;
        let ok = r.iter().all(|(s, _)| *s == completion::SUCCESS)
            && r[2].1 == r[3].1
            && [0, size / 2, size - 8].iter().all(|&o| peek(DST + o) == pattern);
        if !ok {
            println!(
                "pvdma: size {} wrong (statuses {} {} {} {})",
                Dec(size),
                Dec(r[0].0.into()),
                Dec(r[1].0.into()),
                Dec(r[2].0.into()),
                Dec(r[3].0.into())
            );
            return Err(1);
        }
        println!("pvdma: size {} via IOVAs {:#x} -> {:#x}: crc32c {:#x} ok", Dec(size), src, dst, r[2].1);
        // Take this batch's MSI before the next batch can raise one (two pending MSIs of
        // one vector are one interrupt; the device writes a completion before its MSI).
        if !wait_irqs(i as u64 + 1) {
            println!("pvdma: the MSI of batch {} did not arrive", Dec(i as u64 + 1));
            return Err(1);
        }
        d.unmap(src, size)?;
        d.unmap(dst, size)?;
        last_dst = dst;
    }
    Ok(last_dst)
}

fn directions(d: &mut Demo) -> Result<(), u8> {
    fill_cpu(TO_DEV_BUF, PAGE, 0x77);
    let ro = d.map(TO_DEV_BUF, PAGE, dir::TO_DEVICE)?;
    let wo = d.map(DST, PAGE, dir::FROM_DEVICE)?;
    let r = d.run(&[Descriptor { op: op::COPY, src: ro, dst: wo, len: PAGE, ..Default::default() }])?;
    if r[0].0 != completion::SUCCESS || peek(DST) != 0x7777_7777_7777_7777 {
        println!("pvdma: copy from a to-device into a from-device buffer failed");
        return Err(1);
    }
    // The device may not write what was mapped for it to read.
    let r = d.run(&[Descriptor { op: op::FILL, dst: ro, len: PAGE, pattern: 0x1111, ..Default::default() }])?;
    if r[0].0 != completion::DMA_FAULT || peek(TO_DEV_BUF) != 0x7777_7777_7777_7777 {
        println!("pvdma: a device write into a to-device buffer was not refused");
        return Err(1);
    }
    println!("pvdma: directions enforced (a write into a to-device buffer faulted, memory untouched)");
    d.unmap(ro, PAGE)?;
    d.unmap(wo, PAGE)
}

fn scatter_gather(d: &mut Demo) -> Result<(), u8> {
    // SAFETY: SG is only touched here, single-threaded.
    let list = unsafe { &mut *core::ptr::addr_of_mut!(SG) };
    for (i, e) in list.iter_mut().enumerate() {
        *e = SgEntry { addr: SG_AREA + 2 * i as u64 * PAGE, len: PAGE };
    }
    if let Err(s) = d.api.map_sg(d.dev, list, dir::FROM_DEVICE) {
        println!("pvdma: MAP_SG failed: {}", s.name());
        return Err(1);
    }
    d.maps += list.len() as u64;
    for (i, e) in list.iter().enumerate() {
        let pattern = 0xa0a0_a0a0_a0a0_a0a0 | i as u64;
        d.run(&[Descriptor { op: op::FILL, dst: e.addr, len: PAGE, pattern, ..Default::default() }])?;
        if peek(SG_AREA + 2 * i as u64 * PAGE + 8) != pattern || peek(SG_AREA + (2 * i as u64 + 1) * PAGE) == pattern {
            println!("pvdma: scatter-gather entry {} wrong", Dec(i as u64));
            return Err(1);
        }
    }
    match d.api.unmap_sg(d.dev, list) {
        Ok(n) if n == list.len() as u64 => d.unmaps += n,
        other => {
            println!("pvdma: UNMAP_SG failed: {:?}", other.map_err(|s| s.name()));
            return Err(1);
        }
    }
    println!("pvdma: MAP_SG of {} pages in one exit, each filled through its IOVA, unmapped", Dec(list.len() as u64));
    Ok(())
}

fn demo() -> u8 {
    let mut api = DmaApi::new();
    let Some(f) = Engine::find(0) else {
        println!("pvdma: no DMA engine on the PCI bus");
        return 1;
    };
    let dev = u64::from(f.bdf());
    if !api.is_paravirtual(dev) || !api.is_paravirtual(dev) || api.queries() != 1 {
        println!("pvdma: the DMA engine is not behind paravirtual DMA (queries {})", Dec(api.queries()));
        return 1;
    }
    apic::enable_x2apic();
    idt::set_handler(VECTOR, on_msi);
    idt::enable();
    let (ring, comp) =
        match (api.map(dev, RING, PAGE, dir::TO_DEVICE), api.map(dev, COMPLETIONS, PAGE, dir::FROM_DEVICE)) {
            (Ok(r), Ok(c)) => (r, c),
            other => {
                println!(
                    "pvdma: mapping the ring failed: {:?}",
                    (other.0.err().map(|s| s.name()), other.1.err().map(|s| s.name()))
                );
                return 1;
            }
        };
    let Some(e) = Engine::new(f, (RING, ring), (COMPLETIONS, comp), 64) else {
        println!("pvdma: the DMA engine's register BAR does not decode");
        return 1;
    };
    if e.gone() || e.reg(de::regs::ID) != de::ID_VALUE {
        println!("pvdma: no DMA engine answers at {:#x}", e.bar0());
        return 1;
    }
    if !e.enable_msix(apic::id() as u8, VECTOR) {
        println!("pvdma: the DMA engine has no MSI-X");
        return 1;
    }
    let mut d = Demo { dev, api, e, maps: 2, unmaps: 0, bytes: 0, descriptors: 0, faults_seen: 0 };
    hcall(hcall::BENCH_MARK, [0xd0, 0, 0, 0, 0]);
    let last_dst = match copies(&mut d) {
        Ok(x) => x,
        Err(c) => return c,
    };
    hcall(hcall::BENCH_MARK, [0xd1, d.bytes, 0, 0, 0]);
    hcall(hcall::BENCH_MARK, [0xd2, d.descriptors, 0, 0, 0]);
    if let Err(c) = directions(&mut d).and_then(|()| scatter_gather(&mut d)) {
        return c;
    }
    // Unmap means gone: the last destination's IOVA is no longer the device's.
    poke(DST, 0x5555);
    let r = match d.run(&[Descriptor { op: op::FILL, dst: last_dst, len: PAGE, pattern: 0x99, ..Default::default() }]) {
        Ok(r) => r,
        Err(c) => return c,
    };
    if r[0].0 != completion::DMA_FAULT || peek(DST) != 0x5555 {
        println!("pvdma: DMA to an unmapped IOVA was not refused");
        return 1;
    }
    println!("pvdma: DMA to the unmapped IOVA {:#x} faulted, memory untouched", last_dst);
    if d.unmap(ring, PAGE).and_then(|()| d.unmap(comp, PAGE)).is_err() {
        return 1;
    }
    println!(
        "pvdma: {} bytes moved in {} descriptors, {} maps, {} unmaps, {} DMA faults (all expected), {} MSIs",
        Dec(d.bytes),
        Dec(d.descriptors),
        Dec(d.maps),
        Dec(d.unmaps),
        Dec(d.faults_seen),
        Dec(IRQS.load(Ordering::Relaxed))
    );
    if d.maps == d.unmaps && d.faults_seen == 2 && IRQS.load(Ordering::Relaxed) == 3 { 0 } else { 1 }
}

/// MAP of distinct 4 KiB pages, then their UNMAPs, then null hypercalls, between marks.
fn bench(n: u64) -> u8 {
    let n = (n as usize).clamp(1, BENCH_MAX);
    let api = DmaApi::new();
    let Some(dev) = Engine::find(0).map(|f| u64::from(f.bdf())) else {
        println!("pvdma bench: no DMA engine on the PCI bus");
        return 1;
    };
    // SAFETY: only this function touches BENCH_IOVAS.
    let iovas = unsafe { &mut *core::ptr::addr_of_mut!(BENCH_IOVAS) };
    hcall(hcall::BENCH_MARK, [0xb0, n as u64, 0, 0, 0]);
    for (i, slot) in iovas[..n].iter_mut().enumerate() {
        match api.map(dev, SRC + i as u64 * PAGE, PAGE, dir::BIDIRECTIONAL) {
            Ok(iova) => *slot = iova,
            Err(s) => {
                println!("pvdma bench: MAP {} failed: {}", Dec(i as u64), s.name());
                return 1;
            }
        }
    }
    hcall(hcall::BENCH_MARK, [0xb1, 0, 0, 0, 0]);
    for iova in iovas[..n].iter() {
        if api.unmap(dev, *iova, PAGE).is_err() {
            return 1;
        }
    }
    hcall(hcall::BENCH_MARK, [0xb2, 0, 0, 0, 0]);
    for _ in 0..n {
        if hcall(hcall::NULL, [0; 5]).status != Status::Success {
            return 1;
        }
    }
    hcall(hcall::BENCH_MARK, [0xb3, 0, 0, 0, 0]);
    println!("pvdma bench: {} maps, unmaps and null calls done", Dec(n as u64));
    0
}

fn main(boot: &BootInfo) -> u8 {
    match boot.arg(0, 0) {
        1 => bench(boot.arg(1, 1000)),
        _ => demo(),
    }
}

rt::entry!(main);
