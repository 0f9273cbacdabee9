//! `hello`: prints one line and exits 0. The smallest end-to-end check of a machine.
#![no_std]
#![no_main]

use rt::fmt::Dec;
use rt::{BootInfo, println};

fn main(boot: &BootInfo) -> u8 {
    println!(
        "Hello from a passthru guest ({} MiB of RAM, APIC id {})",
        Dec((boot.low_ram_size + boot.high_ram_size) >> 20),
        Dec(boot.apic_id)
    );
    0
}

rt::entry!(main);
