//! `panic`: panics on purpose, to check that a guest panic ends the run with
//! `abi::EXIT_PANIC` and its message on the VMM's standard error.
#![no_std]
#![no_main]

use rt::BootInfo;

fn main(boot: &BootInfo) -> u8 {
    let answer = boot.apic_id + 42;
    panic!("deliberate guest panic (answer {answer})");
}

rt::entry!(main);
