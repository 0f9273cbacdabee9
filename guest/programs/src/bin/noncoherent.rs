//! `noncoherent`: a DMA engine whose domain does not enforce snooping
//! (`--device dma-engine,enforce-snoop=off`): the guest enables PCIe No Snoop on it,
//! which makes it non-coherent; it fills its own BAR-backed buffer by DMA, the CPU
//! reads the bytes back, and the VMM's answer to NONCOHERENT_QUERY shows the count and
//! the buffer's slot flagged, with the guest's WC PAT entry honoured there.
//! Exit: 0 ok, 1 wrong, 2 no engine.
#![no_std]
#![no_main]

use rt::abi::dma_engine::{self as de, Descriptor, completion, op};
use rt::abi::hcall::{self, memtype};
use rt::abi::layout;
use rt::abi::pci::cap;
use rt::dma_engine::Engine;
use rt::fmt::Dec;
use rt::hcall::hcall;
use rt::mmio::read64;
use rt::{BootInfo, println};

const RING: u64 = layout::GUEST_FREE_RAM;
const DONE: u64 = RING + 0x1000;

fn query(gpa: u64) -> (u64, u64, u64) {
    let r = hcall(hcall::NONCOHERENT_QUERY, [gpa, 0, 0, 0, 0]);
    (r.r[0], r.r[1], r.r[2])
}

fn main(_boot: &BootInfo) -> u8 {
    let Some(f) = Engine::find(0) else {
        println!("noncoherent: no DMA engine");
        return 2;
    };
    let Some(mut e) = Engine::new(f, (RING, RING), (DONE, DONE), 16) else { return 1 };
    let Some(bar) = f.bar(de::SCRATCH_BAR) else { return 1 };
    let before = query(bar);
    // Enable No Snoop in the PCIe Device Control register.
    let Some(exp) = f.capability(cap::EXP) else {
        println!("noncoherent: the engine has no PCIe capability");
        return 1;
    };
    let ctl = f.read16(exp + cap::EXP_DEVCTL);
    f.write16(exp + cap::EXP_DEVCTL, ctl | cap::EXP_DEVCTL_NOSNOOP);
    let after = query(bar);
    // The device fills its own BAR-backed buffer (peer-to-peer to itself).
    let pattern = 0x6e6f_736e_6f6f_7021;
    let seq = e.push(Descriptor { op: op::FILL, dst: bar, len: 0x1000, pattern, ..Default::default() });
    e.ring();
    let status = e.wait(seq).map(|r| r.0).unwrap_or(0);
    // SAFETY: the engine's scratch BAR decodes at `bar`.
    let seen = unsafe { read64(bar + 0xff8) };
    println!(
        "noncoherent: before No Snoop: count {} flagged {}; after: count {} flagged {} WC->{}; fill {} read {:#x}",
        Dec(before.0),
        Dec(before.1),
        Dec(after.0),
        Dec(after.1),
        Dec(after.2),
        Dec(u64::from(status)),
        seen
    );
    let ok = before.0 == 0
        && before.1 == 0
        && after.0 == 1
        && after.1 == 1
        && after.2 == memtype::WC
        && status == completion::SUCCESS
        && seen == pattern;
    if ok { 0 } else { 1 }
}

rt::entry!(main);
