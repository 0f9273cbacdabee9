//! Fuzzes the paravirtual DMA hypercall path: arbitrary registers and arbitrary guest
//! scatter-gather lists, executed against a small VM; nothing may panic.
#![no_main]

use abi::hcall::Args;
use dma::{DomainConfig, LockedMemory, VmDma};
use iommu::pvdma::PvDma;
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fuzz_target!(|data: &[u8]| {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]) else { return };
    let mem = Arc::new(mem);
    let vm = VmDma::new(Arc::clone(&mem), LockedMemory::new(256 << 10));
    let pv = PvDma::new(Arc::clone(&mem), None);
    pv.add_device(0, "dma0", vm.create_domain("dma0", DomainConfig::default()), true);
    for chunk in data.chunks(48 + 64) {
        let mut regs = [0u64; 6];
        for (i, r) in regs.iter_mut().enumerate() {
            let b = chunk.get(i * 8..i * 8 + 8).unwrap_or(&[0; 8]);
            let mut x = [0u8; 8];
            x[..b.len()].copy_from_slice(b);
            *r = u64::from_le_bytes(x);
        }
        let list = chunk.get(48..).unwrap_or(&[]);
        let _ = mem.write_slice(list, GuestAddress(0x8_0000));
        let nr = abi::pvdma::BASE + regs[0] % 8;
        let _ = pv.call(&Args { nr, a: [regs[1] % 4, regs[2], regs[3], regs[4], regs[5]] });
    }
});
