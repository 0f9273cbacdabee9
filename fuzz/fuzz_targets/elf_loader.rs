//! Fuzzes the guest ELF loader: arbitrary bytes as a guest program image, loaded into
//! a small guest memory; it must load or refuse with an error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};

fuzz_target!(|data: &[u8]| {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]) else { return };
    let _ = vmm::boot::load_elf(&mem, data, 4 << 20);
});
