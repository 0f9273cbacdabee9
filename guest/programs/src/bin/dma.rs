//! `dma`: finds the first DMA engine on the PCI bus and drives it through its identity DMA domain (IOVA = guest-physical):
//! FILL, COPY and CRC32C of several buffer sizes, every result checked: the CRC of the
//! copy equals the CRC of the source, sampled bytes hold the pattern, the guard bytes
//! around the destination are untouched; then a descriptor reaching past guest RAM
//! must fault and change nothing. One MSI-X interrupt per batch is counted.
//! Argument: rounds (default 1). Exit: 0 ok, 1 wrong result, 3 device gone, 4 timeout.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};
use rt::abi::dma_engine::{self as de, Descriptor, completion, op};
use rt::abi::{hcall, layout};
use rt::dma_engine::{Engine, WaitError};
use rt::fmt::Dec;
use rt::hcall::hcall;
use rt::mmio::{read64, write64};
use rt::{BootInfo, apic, idt, println};

const VECTOR: u8 = 0x60;
const RING: u64 = layout::GUEST_FREE_RAM;
const COMPLETIONS: u64 = RING + 0x1000;
const SRC: u64 = RING + 0x10_0000;
const DST: u64 = RING + 0x30_0000;
const GUARD: u64 = 0x6a6a_6a6a_6a6a_6a6a;
const SIZES: [u64; 3] = [4096, 64 << 10, 1 << 20];

static IRQS: AtomicU64 = AtomicU64::new(0);

fn on_msi(_v: u8) {
    IRQS.fetch_add(1, Ordering::Relaxed);
    apic::eoi();
}

fn fail(what: &str, e: WaitError) -> u8 {
    match e {
        WaitError::DeviceGone => {
            println!("dma: device gone during {} (surprise removal: registers read all-ones)", what);
            3
        }
        WaitError::Timeout => {
            println!("dma: timeout during {}", what);
            4
        }
    }
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

fn peek(addr: u64) -> u64 {
    // SAFETY: addresses below are in guest RAM this program owns.
    unsafe { read64(addr) }
}

fn poke(addr: u64, v: u64) {
    // SAFETY: as for `peek`.
    unsafe { write64(addr, v) }
}

/// One batch of round `round` at `size` bytes: FILL a source, COPY it, CRC32C both
/// (the last with an interrupt); every status, the copy's samples, its guards and the
/// two checksums checked. Err: the program's exit status.
fn batch(e: &mut Engine, round: u64, i: usize, size: u64) -> Result<(), u8> {
    let pattern = 0x0101_0101_0101_0101u64.wrapping_mul(round.wrapping_add(i as u64 + 1) & 0xff);
    poke(DST - 8, GUARD);
    poke(DST + size, GUARD);
    let fill = e.push(Descriptor { op: op::FILL, dst: SRC, len: size, pattern, ..Default::default() });
    let copy = e.push(Descriptor { op: op::COPY, src: SRC, dst: DST, len: size, ..Default::default() });
    let crc_src = e.push(Descriptor { op: op::CRC32C, src: SRC, len: size, ..Default::default() });
    let crc_dst =
        e.push(Descriptor { op: op::CRC32C, src: DST, len: size, flags: de::FLAG_INTERRUPT, ..Default::default() });
    e.ring();
    let mut crcs = [0u64; 2];
    for (k, seq) in [fill, copy, crc_src, crc_dst].into_iter().enumerate() {
        let (status, done, result) = match e.wait(seq) {
            Ok(r) => r,
            Err(err) => return Err(fail("a copy batch", err)),
        };
        if status != completion::SUCCESS || done != size {
            println!(
                "dma: descriptor {} of size {} completed with status {}",
                Dec(k as u64),
                Dec(size),
                Dec(u64::from(status))
            );
            return Err(1);
        }
        if k >= 2 {
            crcs[k - 2] = result;
        }
    }
    let samples = [0, 8, size / 2, size - 8];
    let copied = samples.iter().all(|&o| peek(DST + o) == pattern);
    if crcs[0] != crcs[1] || !copied || peek(DST - 8) != GUARD || peek(DST + size) != GUARD {
        println!("dma: size {} wrong: crc {:#x} vs {:#x}, samples {}", Dec(size), crcs[0], crcs[1], copied);
        return Err(1);
    }
    if round == 0 {
        println!("dma: size {} pattern {:#x} crc32c {:#x} ok", Dec(size), pattern, crcs[0]);
    }
    Ok(())
}

fn main(boot: &BootInfo) -> u8 {
    let rounds = boot.arg(0, 1);
    let ram_end = boot.low_ram_size;
    if DST + (2 << 20) > ram_end {
        println!("dma: needs at least {} MiB of RAM", Dec((DST + (2 << 20)) >> 20));
        return 1;
    }
    apic::enable_x2apic();
    idt::set_handler(VECTOR, on_msi);
    idt::enable();
    let Some(f) = Engine::find(0) else {
        println!("dma: no DMA engine on the PCI bus");
        return 1;
    };
    let Some(mut e) = Engine::new(f, (RING, RING), (COMPLETIONS, COMPLETIONS), 64) else {
        println!("dma: the DMA engine's register BAR does not decode");
        return 1;
    };
    if e.gone() || e.reg(de::regs::ID) != de::ID_VALUE {
        println!("dma: no DMA engine answers at {:#x}", e.bar0());
        return 1;
    }
    if !e.enable_msix(apic::id() as u8, VECTOR) {
        println!("dma: the DMA engine has no MSI-X");
        return 1;
    }
    hcall(hcall::BENCH_MARK, [0xd0, 0, 0, 0, 0]);
    let (mut bytes, mut descriptors) = (0u64, 0u64);
    for round in 0..rounds {
        for (i, &size) in SIZES.iter().enumerate() {
            if let Err(code) = batch(&mut e, round, i, size) {
                return code;
            }
            descriptors += 4;
            bytes += 4 * size;
            // Take this batch's MSI before the next batch can raise one: two MSIs of
            // one vector pending at once are one interrupt (the LAPIC's IRR bit), and
            // the device writes a completion before its MSI.
            let want = round * 3 + i as u64 + 1;
            if !wait_irqs(want) {
                println!("dma: the MSI of batch {} did not arrive", Dec(want));
                return 1;
            }
        }
    }
    hcall(hcall::BENCH_MARK, [0xd1, bytes, 0, 0, 0]);
    hcall(hcall::BENCH_MARK, [0xd2, descriptors, 0, 0, 0]);
    // A copy reaching past the end of guest RAM faults and writes nothing.
    let edge = ram_end - 0x800;
    poke(edge, GUARD);
    let bad = e.push(Descriptor { op: op::COPY, src: SRC, dst: edge, len: 0x1000, ..Default::default() });
    e.ring();
    let status = match e.wait(bad) {
        Ok((s, _, _)) => s,
        Err(err) => return fail("the fault check", err),
    };
    let faults = e.reg(de::regs::FAULTS);
    if status != completion::DMA_FAULT || peek(edge) != GUARD || faults == 0 {
        println!(
            "dma: a copy past RAM completed with {} (fault count {})",
            Dec(u64::from(status)),
            Dec(u64::from(faults))
        );
        return 1;
    }
    let irqs = IRQS.load(Ordering::Relaxed);
    println!(
        "dma: {} rounds, {} descriptors, {} bytes moved, {} MSIs, fault check ok (last fault {:#x})",
        Dec(rounds),
        Dec(descriptors),
        Dec(bytes),
        Dec(irqs),
        e.reg64(de::regs::LAST_FAULT)
    );
    if irqs == rounds * 3 { 0 } else { 1 }
}

rt::entry!(main);
