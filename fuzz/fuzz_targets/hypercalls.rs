//! Fuzzes the whole hypercall dispatcher, every block (core, paravirtual DMA, and any
//! block added later): arbitrary call numbers and registers, as a guest can make them,
//! against a machine with a paravirtual-DMA engine and a TCE engine; nothing may panic.
#![no_main]

use abi::hcall::Args;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use vmm::{AccelKind, DeviceSpec, Vm, VmConfig};

fn vm() -> &'static Vm {
    static VM: OnceLock<Vm> = OnceLock::new();
    VM.get_or_init(|| {
        let mut c = VmConfig::new(AccelKind::Qtest);
        c.memory = 32 << 20;
        c.locked_memory = Some(64 << 20);
        c.serial_out = Box::new(std::io::sink());
        c.err_out = Box::new(std::io::sink());
        let vm = Vm::new(c).expect("qtest machine");
        vm.attach_device(DeviceSpec::Inline, "pvdma").expect("engine");
        vm.attach_device(DeviceSpec::Inline, "tce").expect("engine on TCE");
        vm
    })
}

fuzz_target!(|data: &[u8]| {
    for call in data.chunks(48) {
        let mut regs = [0u64; 6];
        for (i, r) in regs.iter_mut().enumerate() {
            let b = call.get(i * 8..i * 8 + 8).unwrap_or(&[]);
            let mut x = [0u8; 8];
            x[..b.len()].copy_from_slice(b);
            *r = u64::from_le_bytes(x);
        }
        // Call numbers near the blocks' starts, so calls reach their handlers.
        let nr = (regs[0] >> 8 & 0x3) * abi::hcall::BLOCK_SIZE + (regs[0] & 0x1f);
        // Device ids near the engines' requester ids (8, 16), TCE liobns near the first
        // (0x1000), so calls reach them.
        let dev = if nr >= abi::tce::BASE { 0x1000 + regs[1] % 4 } else { regs[1] % 32 };
        let _ = vm().hypercall(&Args { nr, a: [dev, regs[2], regs[3], regs[4], regs[5]] });
    }
});
