//! The INTx test device: a PCI function the tests build on a third-party vfio-user
//! server (the rust-vmm `vfio_user` crate), so that passthru's PCI path is checked
//! against a device it did not write. Registers in BAR [`REGS_BAR`], INTx only (pin
//! A), PCI Express function-level reset; a guest program (`pci`) and qtest scripts
//! drive it.
//!
//! The line is level-triggered: writing [`regs::DOORBELL`] asserts it, writing 0 to
//! [`regs::IRQ_STATUS`] deasserts it; while it stays asserted the device raises it
//! again each time the VMM unmasks (after the guest's EOI).

/// PCI vendor id (Red Hat / QEMU test devices).
pub const VENDOR_ID: u16 = 0x1b36;
/// PCI device id.
pub const DEVICE_ID: u16 = 0x11f0;
/// PCI class code: system peripheral, other.
pub const CLASS: u16 = 0x0880;
/// The registers' BAR (32-bit memory, not offered for mmap: every access is trapped).
pub const REGS_BAR: u8 = 2;
/// Size of that BAR (not the DMA engine's).
pub const REGS_SIZE: u64 = 0x100;

/// Register offsets (32-bit, little-endian).
pub mod regs {
    /// Read-only identification ([`super::ID_VALUE`]).
    pub const ID: u64 = 0x00;
    /// Read-write scratch; zero after reset.
    pub const SCRATCH: u64 = 0x04;
    /// Write anything: assert the INTx line.
    pub const DOORBELL: u64 = 0x08;
    /// 1 while the line is asserted; write 0 to deassert.
    pub const IRQ_STATUS: u64 = 0x0c;
    /// Resets seen (DEVICE_RESET), read-only.
    pub const RESETS: u64 = 0x10;
    /// Assertions so far, read-only; zero after reset.
    pub const ASSERTIONS: u64 = 0x14;
}

/// Value of [`regs::ID`] ("INTX").
pub const ID_VALUE: u32 = 0x5854_4e49;
