//! `exits`: the probe behind `passthru bench exits` and `passthru bench devices`.
//! Between benchmark marks it runs tight loops of one instruction each.
//! Mode 0 (default): a null hypercall (PIO exit), an MMIO write to a null device (MMIO
//! exit), a write to an ioeventfd port (no exit), and an empty loop (the loop's own
//! cost). Mode 1 (argument 1): register reads of the first two DMA engines on the PCI
//! bus: a read of the null MMIO device (a null MMIO exit), engine 0's ID register
//! (trapped), engine 1's ID register (trapped, and forwarded when it runs in a device
//! process), a word of engine 1's scratch BAR (memory the device offers for mmap: no
//! exit), and the empty loop. The VMM times the marks.
#![no_std]
#![no_main]

use rt::abi::{dma_engine as de, hcall, layout, pci, ports};
use rt::dma_engine::Engine;
use rt::hcall::hcall1;
use rt::{BootInfo, println};

fn mark(tag: u64) -> u64 {
    hcall1(hcall::BENCH_MARK, tag).r[0]
}

/// `n` 32-bit reads at `addr`.
fn reads(addr: u64, n: u64) {
    // SAFETY: `addr` is device memory or MMIO the caller found decoding; reads only.
    unsafe {
        core::arch::asm!("2:", "mov eax, dword ptr [rdi]", "dec rcx", "jnz 2b",
            inout("rcx") n => _, in("rdi") addr, out("eax") _, options(nostack, readonly));
    }
}

fn register_reads() -> u8 {
    let (Some(a), Some(b)) = (Engine::find(0), Engine::find(1)) else {
        println!("exits: register reads need two DMA engines on the bus");
        return 1;
    };
    a.enable(pci::command::MEMORY);
    b.enable(pci::command::MEMORY);
    let (Some(regs_a), Some(regs_b), Some(scratch_b)) =
        (a.bar(de::REGS_BAR), b.bar(de::REGS_BAR), b.bar(de::SCRATCH_BAR))
    else {
        println!("exits: the engines' BARs do not decode");
        return 1;
    };
    let n = mark(0x10).max(1);
    reads(layout::BENCH_MMIO_ADDR, n);
    mark(0x11);
    reads(regs_a + de::regs::ID, n);
    mark(0x12);
    reads(regs_b + de::regs::ID, n);
    mark(0x13);
    reads(scratch_b, n);
    mark(0x14);
    // SAFETY: registers only.
    unsafe {
        core::arch::asm!("2:", "nop", "dec rcx", "jnz 2b", inout("rcx") n => _, options(nomem, nostack));
    }
    mark(0x15);
    println!("exits: {} register reads of each kind done", rt::fmt::Dec(n));
    0
}

fn main(boot: &BootInfo) -> u8 {
    if boot.arg(0, 0) == 1 {
        return register_reads();
    }
    let n = mark(0).max(1);
    // SAFETY: registers only; the hypercall port is a PIO exit the VMM defines.
    unsafe {
        core::arch::asm!("2:", "out {p}, eax", "dec rcx", "jnz 2b", p = const ports::HCALL,
            inout("rcx") n => _, inout("rax") hcall::NULL => _,
            out("rdi") _, out("rsi") _, out("rdx") _, options(nostack));
    }
    mark(1);
    // SAFETY: BENCH_MMIO_ADDR is a null MMIO device, not RAM; nothing Rust owns changes.
    unsafe {
        core::arch::asm!("2:", "mov dword ptr [rdi], eax", "dec rcx", "jnz 2b",
            inout("rcx") n => _, in("rdi") layout::BENCH_MMIO_ADDR, in("eax") 0u32, options(nostack));
    }
    mark(2);
    // SAFETY: a port write caught by an ioeventfd; registers only.
    unsafe {
        core::arch::asm!("2:", "out {p}, al", "dec rcx", "jnz 2b", p = const ports::BENCH_IOEVENTFD,
            inout("rcx") n => _, in("al") 0u8, options(nomem, nostack));
    }
    mark(3);
    // SAFETY: registers only.
    unsafe {
        core::arch::asm!("2:", "nop", "dec rcx", "jnz 2b", inout("rcx") n => _, options(nomem, nostack));
    }
    mark(4);
    println!("exits: {} iterations of each probe done", rt::fmt::Dec(n));
    0
}

rt::entry!(main);
