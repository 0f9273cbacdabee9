//! `hello`: prints one line and exits 0. The smallest end-to-end check of a machine.
//! With an argument N it first writes N KiB of text to the error console with string
//! I/O (`rep outsb`, many bytes per exit): the probe of a VMM whose port handler is
//! slow (its standard error a full pipe) while a pause comes and goes.
#![no_std]
#![no_main]

use rt::abi::{layout, ports};
use rt::fmt::Dec;
use rt::{BootInfo, println};

/// Bytes of the text written at a time (one `rep outsb`).
const CHUNK: u64 = 64 << 10;

fn main(boot: &BootInfo) -> u8 {
    if boot.arg_count > 0 && boot.args[0] > 0 {
        let buf = layout::GUEST_FREE_RAM;
        for i in 0..CHUNK {
            let b = if i % 64 == 63 { b'\n' } else { b'.' };
            // SAFETY: free guest RAM owned by this program.
            unsafe { rt::mmio::write8(buf + i, b) };
        }
        for _ in 0..(boot.args[0] * 1024).div_ceil(CHUNK) {
            // SAFETY: reads CHUNK bytes of the buffer above and writes them to a port.
            unsafe {
                core::arch::asm!("rep outsb", inout("rcx") CHUNK => _, inout("rsi") buf => _,
                    in("dx") ports::ERR_CONSOLE, options(nostack, readonly));
            }
        }
        println!("hello: {} KiB written to the error console", Dec(boot.args[0]));
    }
    println!(
        "Hello from a passthru guest ({} MiB of RAM, APIC id {})",
        Dec((boot.low_ram_size + boot.high_ram_size) >> 20),
        Dec(boot.apic_id)
    );
    0
}

rt::entry!(main);
