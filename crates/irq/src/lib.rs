//! Interrupt forwarding: how a device interrupt reaches the guest.
//!
//! A device owns IRQ *sources* (eventfds), named `(device, index, sub-index)` as VFIO
//! names them. The VM's [`IrqRegistry`] attaches each source to a guest IRQ and delivers
//! it in one of two modes:
//!
//! - **forwarded**: KVM delivers it (an irqfd on a GSI; an MSI route for MSI/MSI-X; a
//!   resample eventfd for level-triggered INTx), the VMM does nothing per interrupt;
//! - **VMM**: the registry's delivery thread reads the eventfd and injects the interrupt
//!   itself (`KVM_SIGNAL_MSI`, or an irqchip pulse), so the VMM sees every one.
//!
//! The mode can change while the source fires without losing an interrupt. The layering
//! follows the kvm-vfio review: device-specific decoding of index and sub-index stays
//! with the device; the KVM-facing [`IrqChip`] takes only (host eventfd, guest IRQ).
//! A source holds a reference to its device exactly while it is attached. Teardown
//! (detach, registry drop) cannot fail: it returns nothing and runs in `Drop`.
#![warn(missing_docs)]

mod chip;
mod delivery;
mod registry;
mod source;
mod state;

pub use chip::{GuestIrq, IrqChip, MsiMessage, NullChip};
pub use registry::{IrqCounts, IrqError, IrqRegistry, STATE_VERSION, SavedModes, SourceStats, SwitchHook};
pub use source::{IrqSource, SourceId, Trigger};
pub use state::Mode;

/// A non-blocking, close-on-exec eventfd: every eventfd of the VMM is created this way,
/// so none leaks into a device process it spawns.
pub fn eventfd() -> std::io::Result<vmm_sys_util::eventfd::EventFd> {
    vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
}
