//! The passthru machine.
//!
//! A [`Vm`] runs on an accelerator ([`accel`]): KVM with one long-mode vCPU, or qtest,
//! where no vCPU exists and the [`qtest`] driver port reaches every device, memory and
//! hypercall. Guest RAM is memfd-backed so it can be shared with device processes, and
//! the [`memory`] map tells listeners about RAM and RAM-device regions. Assigned
//! devices are PCI functions on bus 0 ([`device_manager`]), their DMA programmed by the
//! front-end each names.
#![warn(missing_docs)]

pub mod accel;
pub mod acpi;
pub mod boot;
pub mod config;
pub mod core_calls;
pub mod device_manager;
pub mod device_state;
pub mod dirty;
pub mod error;
pub mod events;
pub mod flush;
pub mod guest;
pub mod guest_memory;
pub mod hotplug;
pub mod irq_watch;
pub mod irqchip_state;
pub mod linux;
pub mod memory;
pub mod memtype;
pub mod pausing;
pub mod qtest;
pub mod run_control;
pub mod snapshot;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;

pub use accel::AccelKind;
pub use device_manager::{AssignedDevice, DeviceSpec, IommuMode, RemoteSpec};
pub use error::{Error, Result};
pub use vm::{NonCoherentReads, Vm, VmConfig};

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

/// The VMM process's descriptors and threads, for leak checks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    /// Open descriptors.
    pub fds: usize,
    /// Of which eventfds.
    pub eventfds: usize,
    /// Threads by name.
    pub threads: std::collections::BTreeMap<String, usize>,
}

impl Resources {
    /// What the process holds now (from /proc/self).
    pub fn now() -> Resources {
        let links: Vec<String> = std::fs::read_dir("/proc/self/fd")
            .map(|d| {
                d.filter_map(|e| e.ok().and_then(|e| std::fs::read_link(e.path()).ok()))
                    .map(|l| l.to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let mut threads = std::collections::BTreeMap::<String, usize>::new();
        if let Ok(d) = std::fs::read_dir("/proc/self/task") {
            for t in d.flatten() {
                if let Ok(c) = std::fs::read_to_string(t.path().join("comm")) {
                    *threads.entry(c.trim().to_string()).or_default() += 1;
                }
            }
        }
        Resources { fds: links.len(), eventfds: links.iter().filter(|l| l.contains("eventfd")).count(), threads }
    }
}

/// The VMM process's open eventfds and its threads by name, for leak checks:
/// `eventfds=N threads=name:count,...` (names sorted).
pub fn resources() -> String {
    let r = Resources::now();
    let list: Vec<String> = r.threads.iter().map(|(k, v)| format!("{k}:{v}")).collect();
    format!("eventfds={} threads={}", r.eventfds, list.join(","))
}
