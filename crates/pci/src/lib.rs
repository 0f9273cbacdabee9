//! PCI for passthru.
//!
//! - [`config`]: a function's configuration space (bytes, write masks, capabilities);
//! - [`bar`]: BAR emulation (sizing, moving, decoding);
//! - [`msi`], [`msix`]: the interrupt capabilities the VMM emulates for assigned functions;
//! - [`root`]: the root complex: the host bridge, configuration access through ECAM
//!   and the legacy ports, BAR placement as firmware does it, and BAR windows kept on
//!   the buses and in the memory map as the guest moves them.
//!
//! A device becomes a PCI function by implementing [`PciFunction`].
#![warn(missing_docs)]

pub mod bar;
pub mod config;
pub mod msi;
pub mod msix;
pub mod root;

pub use bar::{BarKind, BarSpec, Bars};
pub use config::ConfigSpace;
pub use root::{PciError, PciRoot};

/// A BAR of a function as it decodes now.
#[derive(Clone, Debug)]
pub struct BarWindow {
    /// BAR index.
    pub bar: u8,
    /// Port I/O rather than memory.
    pub io: bool,
    /// Guest address (port number for I/O).
    pub addr: u64,
    /// Bytes.
    pub size: u64,
    /// Parts backed by host memory (offset in the BAR, the memory): guest accesses to
    /// them do not exit. The regions' own guest addresses are ignored.
    pub mapped: Vec<(u64, vm_api::Region)>,
}

/// What a PCI function offers the root complex. Accesses never fail: a function that
/// cannot serve one reads all-ones and drops writes, as hardware does.
pub trait PciFunction: Send + Sync {
    /// Name for logs and listings.
    fn name(&self) -> &str;
    /// A configuration read (1, 2 or 4 bytes, naturally aligned, below 4 KiB).
    fn config_read(&self, offset: u16, data: &mut [u8]);
    /// A configuration write (same shape). The root re-reads [`PciFunction::windows`]
    /// after each write.
    fn config_write(&self, offset: u16, data: &[u8]);
    /// The BARs that decode now.
    fn windows(&self) -> Vec<BarWindow>;
    /// A trapped read of BAR `bar` at `offset`.
    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]);
    /// A trapped write of BAR `bar` at `offset`.
    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]);
    /// The function left the bus (unplugged, or the VM ends).
    fn removed(&self) {}
}

/// Reads a 32-bit configuration register of `f`.
pub fn read32(f: &dyn PciFunction, offset: u16) -> u32 {
    let mut b = [0u8; 4];
    f.config_read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// Reads a 16-bit configuration register of `f`.
pub fn read16(f: &dyn PciFunction, offset: u16) -> u16 {
    let mut b = [0u8; 2];
    f.config_read(offset, &mut b);
    u16::from_le_bytes(b)
}

/// Reads a byte of `f`'s configuration space.
pub fn read8(f: &dyn PciFunction, offset: u16) -> u8 {
    let mut b = [0u8; 1];
    f.config_read(offset, &mut b);
    b[0]
}
