//! Fuzzes the qtest driver port: arbitrary command lines against a qtest machine with
//! a paravirtual-DMA engine in the VMM (memory, port, MMIO, hypercall, interrupt and
//! device commands all reachable); nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, Mutex, OnceLock};
use vmm::qtest::{self, SharedOut};
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
        vm
    })
}

fuzz_target!(|data: &[u8]| {
    let out: SharedOut = Arc::new(Mutex::new(Box::new(std::io::sink())));
    let _ = qtest::serve(vm(), std::io::Cursor::new(data), out);
    vm().clear_exit(); // a session that wrote the exit port does not end the next one
});
