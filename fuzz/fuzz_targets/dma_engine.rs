//! Fuzzes the DMA engine as a guest drives it: arbitrary guest memory (rings,
//! descriptors, completion addresses) and arbitrary register writes and reads, against
//! the engine in the VMM behind a small identity domain; nothing may panic or hang.
#![no_main]

use devices::dma_engine::{DmaEngine, InProcess};
use dma::{DmaSpace, LockedMemory, VmDma};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const RAM: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]) else { return };
    let mem = Arc::new(mem);
    let vm = VmDma::new(Arc::clone(&mem), LockedMemory::new(u64::MAX));
    let Ok(domain) = vm.identity_domain("fuzz") else { return };
    let (memory, regs) = data.split_at(data.len().min(4096));
    let _ = mem.write_slice(memory, GuestAddress(0));
    let Ok(engine) = DmaEngine::new(Box::new(InProcess(DmaSpace::new(domain, "fuzz")))) else { return };
    for w in regs.chunks(10) {
        let offset = u64::from(w[0] & 0x7f);
        let len = [1usize, 2, 4, 8][usize::from(w.get(1).copied().unwrap_or(0) & 3)];
        let value = w.get(2..).unwrap_or(&[]);
        if w[0] & 0x80 != 0 {
            let mut buf = [0u8; 8];
            engine.read_reg(offset, &mut buf[..len]);
        } else {
            let mut buf = [0u8; 8];
            let n = value.len().min(len);
            buf[..n].copy_from_slice(&value[..n]);
            engine.write_reg(offset, &buf[..len]);
        }
    }
    drop(engine); // stops the worker: must not hang
});
