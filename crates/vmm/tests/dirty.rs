//! Dirty tracking of the vCPU's writes (KVM's dirty log on RAM slots).
#![allow(clippy::unwrap_used)]

use vmm::{AccelKind, Vm, VmConfig};

#[test]
fn the_pages_a_guest_writes_are_in_the_dirty_list_and_a_take_clears_them() {
    vmm::require_kvm!();
    let mut c = VmConfig::new(AccelKind::Kvm);
    c.memory = 64 << 20;
    c.serial_out = Box::new(std::io::sink());
    let vm = Vm::new(c).unwrap();
    vm.dirty_start().unwrap();
    assert!(vm.memory_map().regions().iter().all(|r| r.flags.log_dirty), "RAM slots log dirty pages");
    // The VMM's own writes (loading the program) are not the guest's.
    let _ = vm.run_guest(guests::get("hello").unwrap().elf).unwrap();
    let pages = vm.dirty_take().unwrap();
    let stack = (abi::layout::STACK_TOP - 8) & !0xfff;
    assert!(pages.contains(&stack), "the stack page the guest pushed to: {pages:x?}");
    assert!(pages.len() < 64, "only what the guest touched: {} pages", pages.len());
    assert!(vm.dirty_take().unwrap().is_empty(), "a take clears");
    vm.dirty_stop().unwrap();
    assert!(vm.memory_map().regions().iter().all(|r| !r.flags.log_dirty));
}
