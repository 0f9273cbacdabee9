//! `p2p`: peer-to-peer DMA between two DMA engines with no guest IOMMU (identity
//! domain): engine A fills engine B's scratch BAR, the CPU and engine B itself (a
//! CRC32C of its own BAR, by DMA) see the bytes, A copies them back to RAM and its CRC
//! matches B's; then the guest moves B's BAR: A reaches it at the new address and
//! faults at the old one; DMA to B's MSI-X page (trapped, never memory) faults too.
//! Exit: 0 ok, 1 wrong result, 2 engines missing, 4 timeout.
#![no_std]
#![no_main]

use rt::abi::dma_engine::{self as de, Descriptor, completion, op};
use rt::abi::layout;
use rt::abi::pci::{command, reg};
use rt::dma_engine::{Engine, WaitError};
use rt::fmt::Dec;
use rt::mmio::read64;
use rt::{BootInfo, println};

const RING_A: u64 = layout::GUEST_FREE_RAM;
const DONE_A: u64 = RING_A + 0x1000;
const RING_B: u64 = RING_A + 0x2000;
const DONE_B: u64 = RING_A + 0x3000;
const COPY: u64 = RING_A + 0x10_0000;
const LEN: u64 = 0x1_0000;
/// Where the guest moves B's scratch BAR (2 MiB-aligned, free in the 32-bit window).
const MOVED: u64 = 0xd000_0000;

fn run(e: &mut Engine, d: Descriptor) -> Result<(u32, u64), u8> {
    let seq = e.push(d);
    e.ring();
    match e.wait(seq) {
        Ok((status, _, result)) => Ok((status, result)),
        Err(WaitError::Timeout) => Err(4),
        Err(WaitError::DeviceGone) => Err(1),
    }
}

fn main(_boot: &BootInfo) -> u8 {
    let (Some(fa), Some(fb)) = (Engine::find(0), Engine::find(1)) else {
        println!("p2p: needs two DMA engines");
        return 2;
    };
    let (Some(mut a), Some(mut b)) = (
        Engine::new(fa, (RING_A, RING_A), (DONE_A, DONE_A), 16),
        Engine::new(fb, (RING_B, RING_B), (DONE_B, DONE_B), 16),
    ) else {
        println!("p2p: the engines' registers do not decode");
        return 1;
    };
    let Some(bar) = fb.bar(de::SCRATCH_BAR) else { return 1 };
    let pattern = 0x5a5a_1234_a5a5_4321u64;
    let mut steps = || -> Result<u8, u8> {
        // A fills B's memory; the CPU sees it through B's BAR.
        let (s, _) = run(&mut a, Descriptor { op: op::FILL, dst: bar, len: LEN, pattern, ..Default::default() })?;
        // SAFETY: B's scratch BAR decodes at `bar` (read back from its BAR register).
        let seen = unsafe { read64(bar + LEN - 8) };
        if s != completion::SUCCESS || seen != pattern {
            println!("p2p: A's fill of B's BAR: status {}, CPU reads {:#x}", Dec(u64::from(s)), seen);
            return Ok(1);
        }
        // B checksums its own BAR by DMA; A copies it to RAM and checksums the copy.
        let (s1, crc_b) = run(&mut b, Descriptor { op: op::CRC32C, src: bar, len: LEN, ..Default::default() })?;
        let (s2, _) = run(&mut a, Descriptor { op: op::COPY, src: bar, dst: COPY, len: LEN, ..Default::default() })?;
        let (s3, crc_a) = run(&mut a, Descriptor { op: op::CRC32C, src: COPY, len: LEN, ..Default::default() })?;
        if [s1, s2, s3] != [completion::SUCCESS; 3] || crc_a != crc_b {
            println!("p2p: checksums: B {:#x}, A's copy {:#x}", crc_b, crc_a);
            return Ok(1);
        }
        println!("p2p: A filled B's BAR at {:#x}; B's own CRC32C {:#x} = A's copy's", bar, crc_b);
        // The guest moves B's BAR; A reaches it there, and faults at the old address.
        let at = reg::BAR0 + 4 * u16::from(de::SCRATCH_BAR);
        fb.disable(command::MEMORY);
        fb.write32(at, MOVED as u32);
        fb.write32(at + 4, (MOVED >> 32) as u32);
        fb.enable(command::MEMORY);
        let moved = fb.bar(de::SCRATCH_BAR).unwrap_or(0);
        let (s, _) =
            run(&mut a, Descriptor { op: op::FILL, dst: moved, len: LEN, pattern: !pattern, ..Default::default() })?;
        // SAFETY: B's BAR decodes at its new address now.
        let seen = unsafe { read64(moved + 8) };
        let (old, _) = run(&mut a, Descriptor { op: op::FILL, dst: bar, len: 8, pattern, ..Default::default() })?;
        if moved != MOVED || s != completion::SUCCESS || seen != !pattern || old != completion::DMA_FAULT {
            println!(
                "p2p: after the move to {:#x}: fill status {}, CPU reads {:#x}, old address status {}",
                moved,
                Dec(u64::from(s)),
                seen,
                Dec(u64::from(old))
            );
            return Ok(1);
        }
        println!("p2p: B's BAR moved to {:#x}: A reaches it there, the old address faults", moved);
        // B's MSI-X table page is trapped by the VMM, never memory: DMA there faults.
        let msix = moved + de::MSIX_TABLE_OFFSET;
        let (s, _) = run(&mut a, Descriptor { op: op::FILL, dst: msix, len: 16, pattern, ..Default::default() })?;
        if s != completion::DMA_FAULT {
            println!("p2p: DMA to B's MSI-X page completed with {}", Dec(u64::from(s)));
            return Ok(1);
        }
        println!(
            "p2p: DMA to B's MSI-X page at {:#x} faulted cleanly; {} faults seen by A",
            msix,
            Dec(u64::from(a.reg(de::regs::FAULTS)))
        );
        Ok(0)
    };
    match steps() {
        Ok(c) | Err(c) => c,
    }
}

rt::entry!(main);
