//! The passthru machine.
//!
//! A [`Vm`] runs on an accelerator ([`accel`]): KVM with one long-mode vCPU, or qtest,
//! where no vCPU exists and the [`qtest`] driver port reaches every device, memory and
//! hypercall. Guest RAM is memfd-backed so it can be shared with device processes, and
//! the [`memory`] map tells listeners about RAM and RAM-device regions.
#![warn(missing_docs)]

pub mod accel;
pub mod assigned;
pub mod boot;
pub mod core_calls;
pub mod error;
pub mod hypercall;
pub mod irq_watch;
pub mod memory;
pub mod qtest;
pub mod test_irq;
pub mod vcpu;
pub mod vm;

pub use accel::AccelKind;
pub use error::{Error, Result};
pub use vm::{DeviceSpec, Vm, VmConfig};

/// True when the KVM device can be opened (tests that need it skip otherwise).
pub fn kvm_available() -> bool {
    std::fs::OpenOptions::new().read(true).write(true).open(accel::kvm_path()).is_ok()
}

/// Skips the calling test, with the reason printed, when KVM is not available.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !$crate::kvm_available() {
            eprintln!("skipped: {} cannot be opened on this machine (the test needs KVM)", $crate::accel::kvm_path());
            return;
        }
    };
}
