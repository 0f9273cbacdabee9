//! PCI as a passthru guest sees it: where configuration space is, where BARs are
//! placed, how INTx pins reach the IOAPIC, and the standard register layout both the
//! VMM's emulation and the guest runtime read and write.
//!
//! One bus (0). The host bridge is 00:00.0; devices take slots 1..31, function 0.
//! Configuration space is reached through ECAM at [`ECAM_BASE`] (4 KiB per function:
//! `ECAM_BASE + (device << 15 | function << 12 | register)`) or through the legacy
//! ports [`CONFIG_ADDRESS`] / [`CONFIG_DATA`] (256 bytes per function). The VMM places
//! BARs at start as firmware would: naturally aligned, memory BARs in [`MMIO32_BASE`],
//! 64-bit BARs that do not fit there above RAM in [`MMIO64_BASE`], I/O BARs in
//! [`IO_BASE`]; memory and I/O decoding enabled, bus mastering left to the driver.

/// ECAM window: bus 0 only (32 devices x 8 functions x 4 KiB).
pub const ECAM_BASE: u64 = 0xe000_0000;
/// Size of the ECAM window.
pub const ECAM_SIZE: u64 = 1 << 20;
/// Legacy configuration address port (32-bit writes latch it).
pub const CONFIG_ADDRESS: u16 = 0xcf8;
/// Legacy configuration data ports (0xcfc..0xcff).
pub const CONFIG_DATA: u16 = 0xcfc;
/// Enable bit of [`CONFIG_ADDRESS`].
pub const CONFIG_ENABLE: u32 = 1 << 31;

/// 32-bit memory window for BARs (in the MMIO hole, below the ECAM window).
pub const MMIO32_BASE: u64 = 0xc000_0000;
/// Size of the 32-bit memory window.
pub const MMIO32_SIZE: u64 = 0x2000_0000;
/// 64-bit memory window for BARs that do not fit below 4 GiB (above the largest RAM).
pub const MMIO64_BASE: u64 = 0x100_0000_0000;
/// Size of the 64-bit memory window.
pub const MMIO64_SIZE: u64 = 0x100_0000_0000;
/// I/O port window for I/O BARs.
pub const IO_BASE: u64 = 0xc000;
/// Size of the I/O window.
pub const IO_SIZE: u64 = 0x4000;

/// Slots on bus 0 (slot 0 is the host bridge).
pub const SLOTS: u8 = 32;
/// IOAPIC pins PCI INTx lines use: slot `s`, pin `p` (1 = INTA) goes to
/// `INTX_GSI_BASE + (s + p - 1) % 4` (the usual swizzle). The VMM also writes the GSI to
/// each function's INTERRUPT_LINE register. The lines are level-triggered, active high.
pub const INTX_GSI_BASE: u32 = 16;

/// The GSI of `pin` (1..=4) of the device in `slot`.
pub const fn intx_gsi(slot: u8, pin: u8) -> u32 {
    INTX_GSI_BASE + ((slot as u32 + pin as u32 + 3) % 4)
}

/// Host bridge identity (the vendor id QEMU uses for its own emulated devices).
pub const HOST_BRIDGE_VENDOR: u16 = 0x1b36;
/// Host bridge device id.
pub const HOST_BRIDGE_DEVICE: u16 = 0x0008;

/// Bus/device/function as one number: `bus << 8 | device << 3 | function`.
pub const fn bdf(bus: u8, device: u8, function: u8) -> u16 {
    (bus as u16) << 8 | (device as u16) << 3 | function as u16
}

/// Standard configuration registers (PCI Local Bus / PCIe base specifications).
pub mod reg {
    /// Vendor id (16 bits).
    pub const VENDOR_ID: u16 = 0x00;
    /// Device id (16 bits).
    pub const DEVICE_ID: u16 = 0x02;
    /// Command (16 bits).
    pub const COMMAND: u16 = 0x04;
    /// Status (16 bits).
    pub const STATUS: u16 = 0x06;
    /// Revision id (8 bits).
    pub const REVISION: u16 = 0x08;
    /// Programming interface, subclass, class (3 bytes from 0x09).
    pub const CLASS_PROG: u16 = 0x09;
    /// Header type (8 bits; bit 7: multi-function).
    pub const HEADER_TYPE: u16 = 0x0e;
    /// First BAR (six 32-bit BARs follow).
    pub const BAR0: u16 = 0x10;
    /// Subsystem vendor id.
    pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
    /// Subsystem id.
    pub const SUBSYSTEM_ID: u16 = 0x2e;
    /// Expansion ROM base address.
    pub const ROM: u16 = 0x30;
    /// Capabilities pointer (8 bits).
    pub const CAPABILITIES: u16 = 0x34;
    /// Interrupt line (8 bits, written by firmware).
    pub const INTERRUPT_LINE: u16 = 0x3c;
    /// Interrupt pin (8 bits: 0 none, 1..4 INTA..INTD).
    pub const INTERRUPT_PIN: u16 = 0x3d;
    /// First extended capability (PCIe).
    pub const EXT_CAPABILITIES: u16 = 0x100;
}

/// Bits of the command register.
pub mod command {
    /// I/O space decoding.
    pub const IO: u16 = 1 << 0;
    /// Memory space decoding.
    pub const MEMORY: u16 = 1 << 1;
    /// Bus mastering (DMA).
    pub const MASTER: u16 = 1 << 2;
    /// INTx emission disabled.
    pub const INTX_DISABLE: u16 = 1 << 10;
}

/// Bits of the status register.
pub mod status {
    /// An INTx is pending.
    pub const INTERRUPT: u16 = 1 << 3;
    /// The capability list is valid.
    pub const CAP_LIST: u16 = 1 << 4;
}

/// BAR register bits.
pub mod bar {
    /// I/O BAR.
    pub const IO: u32 = 1 << 0;
    /// Memory BAR type mask (bits 2:1).
    pub const MEM_TYPE_MASK: u32 = 0x6;
    /// 64-bit memory BAR (the next BAR holds the upper half).
    pub const MEM_TYPE_64: u32 = 0x4;
    /// Prefetchable memory.
    pub const PREFETCH: u32 = 1 << 3;
    /// Address bits of a memory BAR.
    pub const MEM_MASK: u32 = !0xf;
    /// Address bits of an I/O BAR.
    pub const IO_MASK: u32 = !0x3;
}

/// Capability ids and layouts.
pub mod cap {
    /// Power management.
    pub const PM: u8 = 0x01;
    /// MSI.
    pub const MSI: u8 = 0x05;
    /// Vendor specific.
    pub const VENDOR: u8 = 0x09;
    /// PCI Express.
    pub const EXP: u8 = 0x10;
    /// MSI-X.
    pub const MSIX: u8 = 0x11;

    /// MSI control (16 bits at +2): enable.
    pub const MSI_ENABLE: u16 = 1 << 0;
    /// MSI control: log2 of vectors supported (bits 3:1).
    pub const MSI_QMASK: u16 = 0x7 << 1;
    /// MSI control: log2 of vectors enabled (bits 6:4).
    pub const MSI_QSIZE: u16 = 0x7 << 4;
    /// MSI control: 64-bit address.
    pub const MSI_64BIT: u16 = 1 << 7;
    /// MSI control: per-vector masking.
    pub const MSI_MASKBIT: u16 = 1 << 8;

    /// MSI-X control (16 bits at +2): table size minus one (bits 10:0).
    pub const MSIX_QSIZE: u16 = 0x7ff;
    /// MSI-X control: all vectors masked.
    pub const MSIX_MASKALL: u16 = 1 << 14;
    /// MSI-X control: enable.
    pub const MSIX_ENABLE: u16 = 1 << 15;
    /// MSI-X table / PBA register (32 bits at +4 / +8): BAR indicator (bits 2:0).
    pub const MSIX_BIR: u32 = 0x7;
    /// Size of one MSI-X table entry (address lo, address hi, data, vector control).
    pub const MSIX_ENTRY_SIZE: u64 = 16;
    /// MSI-X vector control: masked.
    pub const MSIX_ENTRY_MASKED: u32 = 1 << 0;

    /// PCIe capability: device capabilities (32 bits at +4): function-level reset.
    pub const EXP_DEVCAP_FLR: u32 = 1 << 28;
    /// PCIe device control (16 bits at +8).
    pub const EXP_DEVCTL: u16 = 0x08;
    /// PCIe device control: enable no snoop.
    pub const EXP_DEVCTL_NOSNOOP: u16 = 1 << 11;
    /// PCIe device control: initiate function-level reset.
    pub const EXP_DEVCTL_FLR: u16 = 1 << 15;
}
