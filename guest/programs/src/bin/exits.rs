//! `exits`: the probe behind `passthru bench exits`. Between benchmark marks it runs
//! tight loops of one instruction each: a null hypercall (PIO exit), an MMIO write to
//! a null device (MMIO exit), a write to an ioeventfd port (no exit), and an empty
//! loop (the loop's own cost). The VMM times the marks.
#![no_std]
#![no_main]

use rt::abi::{hcall, layout, ports};
use rt::hcall::hcall1;
use rt::{BootInfo, println};

fn mark(tag: u64) -> u64 {
    hcall1(hcall::BENCH_MARK, tag).r[0]
}

fn main(_boot: &BootInfo) -> u8 {
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
