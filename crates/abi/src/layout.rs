//! Guest-physical memory layout of a passthru machine.
//!
//! ```text
//! 0x0000_0000  unused (null page)
//! 0x0000_0500  GDT                               (VMM)
//! 0x0000_1000  boot information [`BootInfo`]     (VMM -> guest)
//! 0x0000_9000  PML4, PDPT, 4 page directories     (VMM, identity map of 0..4 GiB, 2 MiB pages)
//! 0x0001_0000  stack, grows down from STACK_TOP
//! 0x0010_0000  guest program image (ELF, linked here)
//! 0x0100_0000  free RAM for guest buffers (GUEST_FREE_RAM .. end of low RAM)
//! 0xc000_0000  MMIO hole: PCI BARs (pci::MMIO32_BASE, 512 MiB)
//! 0xe000_0000  PCI ECAM (pci::ECAM_BASE, bus 0)
//! 0xe010_0000  null MMIO device of the exit benchmark
//! 0xfec0_0000  IOAPIC;  0xfee0_0000  LAPIC (and the MSI address window)
//! 0x1_0000_0000 RAM above 4 GiB when the machine has more than 3 GiB
//! 0x100_0000_0000 64-bit PCI BARs (pci::MMIO64_BASE)
//! ```

/// Where the GDT is placed.
pub const GDT_ADDR: u64 = 0x500;
/// Where the boot information block is placed.
pub const BOOT_INFO_ADDR: u64 = 0x1000;
/// Level-4 page table; the PDPT and four page directories follow at 4 KiB steps.
pub const PML4_ADDR: u64 = 0x9000;
/// Initial stack pointer + 8 (the guest starts as if just called: rsp = STACK_TOP - 8).
pub const STACK_TOP: u64 = 0x10_0000 - 0x1000;
/// Lowest address of the guest program image.
pub const IMAGE_ADDR: u64 = 0x10_0000;
/// First byte of RAM free for guest buffers.
pub const GUEST_FREE_RAM: u64 = 0x100_0000;
/// Start of the MMIO hole below 4 GiB (low RAM ends here at most).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the MMIO hole (RAM resumes here for machines above 3 GiB).
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Pins of the IOAPIC (GSIs 0..24); MSI routes take the GSIs above.
pub const IOAPIC_PINS: u32 = 24;
/// Guest-physical address of the IOAPIC.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Guest-physical address of the local APIC (xAPIC MMIO window).
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// Base of the MSI address window (x86: writes here are interrupt messages, not
/// memory; a DMA domain never maps it).
pub const MSI_ADDR_BASE: u64 = 0xfee0_0000;
/// End (exclusive) of the MSI address window.
pub const MSI_ADDR_END: u64 = 0xfef0_0000;

/// True if `address` lies in the MSI address window.
pub const fn is_msi_address(address: u64) -> bool {
    address >= MSI_ADDR_BASE && address < MSI_ADDR_END
}

/// The MSI address of a fixed, physical-destination interrupt to APIC `dest`.
pub const fn msi_address(dest: u8) -> u64 {
    MSI_ADDR_BASE | (dest as u64) << 12
}

/// A null MMIO device for the exit benchmark (reads 0, writes ignored).
pub const BENCH_MMIO_ADDR: u64 = 0xe010_0000;

/// The ACPI PCI hot-plug registers a Linux guest's DSDT reads (`\_SB.PHPR`), each
/// 32 bits, one bit per slot: slots plugged since the last read (read clears them),
/// slots unplugged since the last read (read clears), and the eject register the
/// guest's `_EJ0` writes (acknowledged; passthru has removed the device already).
pub mod acpi_hotplug {
    /// Base of the registers.
    pub const ADDR: u64 = 0xfeb0_0000;
    /// Bytes they take.
    pub const LEN: u64 = 0x10;
    /// PCIU: slots plugged.
    pub const UP: u64 = 0x0;
    /// PCID: slots unplugged.
    pub const DOWN: u64 = 0x4;
    /// B0EJ: slots the guest ejected.
    pub const EJECT: u64 = 0x8;
    /// The GSI the Generic Event Device (ACPI0013) raises, edge-triggered, active high.
    pub const GSI: u32 = 22;
}
/// Bytes the guest identity-maps (its page tables cover 0..4 GiB).
pub const IDENTITY_MAPPED: u64 = 0x1_0000_0000;

/// Magic number of [`BootInfo`] ("PASSTHRU" in ASCII, little-endian).
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"PASSTHRU");

/// What the VMM tells a guest program at start (at [`BOOT_INFO_ADDR`], also in `rdi`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// Bytes of RAM below the MMIO hole.
    pub low_ram_size: u64,
    /// Bytes of RAM above 4 GiB (0 if none).
    pub high_ram_size: u64,
    /// APIC id of the boot vCPU.
    pub apic_id: u64,
    /// Number of program arguments given (`passthru run --guest-arg`).
    pub arg_count: u64,
    /// Program arguments.
    pub args: [u64; MAX_GUEST_ARGS],
}

/// Most arguments a guest program takes.
pub const MAX_GUEST_ARGS: usize = 4;

impl BootInfo {
    /// Argument `i`, or `default` when fewer were given.
    pub fn arg(&self, i: usize, default: u64) -> u64 {
        if (i as u64) < self.arg_count && i < MAX_GUEST_ARGS { self.args[i] } else { default }
    }
}
