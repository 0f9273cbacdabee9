//! The KVM-facing side: operations that take a host eventfd and a guest IRQ, nothing
//! device-specific (`<operation>(vm, host_irq, guest_irq)`, as the kvm-vfio thread put it).

use std::io;
use vmm_sys_util::eventfd::EventFd;

/// An MSI message: what a device writes to raise a message-signalled interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MsiMessage {
    /// Address (in [`abi::layout::MSI_ADDR_BASE`].. for x86 local APICs).
    pub address: u64,
    /// Data (vector and delivery mode).
    pub data: u32,
}

impl MsiMessage {
    /// A fixed, edge-triggered MSI of `vector` to APIC `dest` (physical mode).
    pub fn fixed(dest: u8, vector: u8) -> MsiMessage {
        MsiMessage { address: abi::layout::msi_address(dest), data: u32::from(vector) }
    }
}

/// Where a source's interrupts go in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GuestIrq {
    /// An MSI or MSI-X message.
    Msi(MsiMessage),
    /// An edge-triggered irqchip pin (GSI).
    Edge(u32),
    /// A level-triggered irqchip pin (INTx), re-armed after the guest's EOI.
    Level(u32),
}

/// What the registry needs from the hypervisor. Implemented by the VMM's accelerators.
pub trait IrqChip: Send + Sync {
    /// Makes KVM raise `gsi` whenever `fd` is written; with `resample`, the GSI is
    /// level-triggered: KVM lowers it at the guest's EOI and writes `resample`.
    fn assign_irqfd(&self, fd: &EventFd, gsi: u32, resample: Option<&EventFd>) -> io::Result<()>;
    /// Undoes `assign_irqfd`; afterwards KVM delivers nothing more through `fd`.
    fn deassign_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()>;
    /// Routes `gsi` to an MSI.
    fn set_msi_route(&self, gsi: u32, msi: MsiMessage) -> io::Result<()>;
    /// Removes the MSI route of `gsi`.
    fn remove_msi_route(&self, gsi: u32) -> io::Result<()>;
    /// Injects an MSI now.
    fn signal_msi(&self, msi: MsiMessage) -> io::Result<()>;
    /// Sets the level of an irqchip pin.
    fn set_irq_line(&self, gsi: u32, level: bool) -> io::Result<()>;
    /// First GSI free for MSI routes (above the irqchip pins).
    fn first_msi_gsi(&self) -> u32 {
        abi::layout::IOAPIC_PINS
    }
    /// Number of GSIs the routing table takes.
    fn gsi_count(&self) -> u32 {
        1024
    }
}

/// An irqchip with no guest behind it: every operation succeeds and delivers nothing.
/// For registries used without a VM (a front-end or device exercised on its own).
#[derive(Clone, Copy, Debug, Default)]
pub struct NullChip;

impl IrqChip for NullChip {
    fn assign_irqfd(&self, _fd: &EventFd, _gsi: u32, _resample: Option<&EventFd>) -> io::Result<()> {
        Ok(())
    }
    fn deassign_irqfd(&self, _fd: &EventFd, _gsi: u32) -> io::Result<()> {
        Ok(())
    }
    fn set_msi_route(&self, _gsi: u32, _msi: MsiMessage) -> io::Result<()> {
        Ok(())
    }
    fn remove_msi_route(&self, _gsi: u32) -> io::Result<()> {
        Ok(())
    }
    fn signal_msi(&self, _msi: MsiMessage) -> io::Result<()> {
        Ok(())
    }
    fn set_irq_line(&self, _gsi: u32, _level: bool) -> io::Result<()> {
        Ok(())
    }
}
