//! The configuration space of an assigned function, virtualized as QEMU's vfio-pci
//! does: read from the device at attach, then the registers a VMM must own are
//! emulated (BARs, ROM, capability pointer, interrupt line and pin, the MSI and MSI-X
//! capabilities, the decode/bus-master/INTx-disable bits of COMMAND), everything else
//! passes through to the device. Writes to read-only bits are dropped.

use abi::pci::{cap, command, reg, status};
use pci::bar::{BarKind, BarSpec, Bars};
use pci::config::{CONFIG_SIZE, ConfigSpace};
use pci::msi::{MsiCap, MsiState};
use pci::msix::MsixCap;

/// Why a device's configuration space or regions cannot be assigned.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration region is missing or too small for a header.
    #[error("its configuration region is {0} bytes (a PCI header needs 64)")]
    TooSmall(u64),
    /// No device answers (vendor id 0 or all-ones).
    #[error("its configuration space has no vendor id ({0:#06x})")]
    NoVendor(u16),
    /// Not a type-0 (endpoint) header.
    #[error("header type {0:#x} is not an endpoint (type 0)")]
    HeaderType(u8),
    /// A BAR the device describes cannot exist.
    #[error(transparent)]
    Bar(#[from] pci::bar::BarError),
    /// A BAR whose type says 64-bit has a region behind its upper half too.
    #[error("BAR {0} is 64-bit but region {next} has a size too", next = .0 + 1)]
    UpperHalf(u8),
    /// The device does not answer.
    #[error("reading its configuration space: {0}")]
    Read(String),
    /// Its MSI-X capability names a table or pending-bit array that cannot exist.
    #[error("its MSI-X capability is impossible: {0}")]
    Msix(String),
}

/// An MSI-X table and pending-bit array must each lie whole in a memory BAR the device
/// has.
fn check_msix(m: &MsixCap, bars: &[BarSpec]) -> Result<(), ConfigError> {
    let pba_size = u64::from(m.vectors).div_ceil(64) * 8;
    for (what, (bar, offset), size) in [("table", m.table, m.table_size()), ("pending-bit array", m.pba, pba_size)] {
        let Some(b) = bars.iter().find(|b| b.index == bar && !matches!(b.kind, BarKind::Io)) else {
            return Err(ConfigError::Msix(format!(
                "its {what} ({} vectors) lies in BAR {bar}, which is not a memory BAR of the device",
                m.vectors
            )));
        };
        if offset.checked_add(size).is_none_or(|end| end > b.size) {
            return Err(ConfigError::Msix(format!(
                "its {what} ({} vectors, {size} bytes at offset {offset:#x}) does not fit in BAR {bar} ({} bytes)",
                m.vectors, b.size
            )));
        }
    }
    Ok(())
}

/// The virtualized configuration space.
#[derive(Debug)]
pub struct VirtConfig {
    /// The VMM's copy (emulated bytes are authoritative here).
    pub space: ConfigSpace,
    /// Bits read from `space` rather than from the device.
    emulated: Box<[u8; CONFIG_SIZE]>,
    /// Bytes the device's configuration region has.
    pub size: u16,
    /// The BAR registers.
    pub bars: Bars,
    /// The MSI capability, if any.
    pub msi: Option<MsiCap>,
    /// The MSI-X capability, if any.
    pub msix: Option<MsixCap>,
    /// The PCI Express capability's offset, if any.
    pub exp: Option<u16>,
    /// INTx pin (0: none).
    pub pin: u8,
}

/// What a configuration write changed that the VMM acts on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// COMMAND before and after (bus mastering, INTx disable, decoding).
    pub command: Option<(u16, u16)>,
    /// The MSI capability's registers were written.
    pub msi: bool,
    /// The MSI-X control register was written (enable, mask-all).
    pub msix: bool,
    /// A function-level reset was requested.
    pub flr: bool,
    /// PCIe Device Control's Enable No Snoop, when its byte was written.
    pub no_snoop: Option<bool>,
}

/// The BARs: sizes from the device's regions, type bits from its own registers. A
/// 64-bit BAR whose upper half is a region of its own is refused.
fn bar_specs(space: &ConfigSpace, region_size: &impl Fn(u8) -> u64) -> Result<Vec<BarSpec>, ConfigError> {
    let mut specs = Vec::new();
    let mut i = 0u8;
    while i < 6 {
        let size = region_size(i);
        let v = space.u32(reg::BAR0 + 4 * u16::from(i));
        if size == 0 {
            i += 1;
            continue;
        }
        let prefetch = v & abi::pci::bar::PREFETCH != 0;
        let kind = if v & abi::pci::bar::IO != 0 {
            BarKind::Io
        } else if v & abi::pci::bar::MEM_TYPE_MASK == abi::pci::bar::MEM_TYPE_64 {
            BarKind::Mem64 { prefetch }
        } else {
            BarKind::Mem32 { prefetch }
        };
        specs.push(BarSpec { index: i, kind, size });
        if matches!(kind, BarKind::Mem64 { .. }) {
            if i < 5 && region_size(i + 1) != 0 {
                return Err(ConfigError::UpperHalf(i));
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    Ok(specs)
}

/// The VMM's copy of the space after reset: BARs at 0, ROM absent, nothing enabled;
/// which bits the guest may write (the command bits the VMM emulates, the interrupt
/// line, the MSI and MSI-X controls and MSI's address, data and mask).
fn reset_copy(space: &mut ConfigSpace, cmd_bits: u16, msi: Option<&MsiCap>, msix: Option<&MsixCap>) {
    space.set_u32(reg::ROM, 0);
    let cmd = space.u16(reg::COMMAND) & !cmd_bits;
    space.set_u16(reg::COMMAND, cmd);
    space.set_writable(reg::COMMAND, &[cmd_bits as u8, (cmd_bits >> 8) as u8]);
    space.set_writable(reg::INTERRUPT_LINE, &[0xff]);
    if let Some(m) = msi {
        let ctl = space.u16(m.offset + 2) & !(cap::MSI_ENABLE | cap::MSI_QSIZE);
        space.set_u16(m.offset + 2, ctl);
        space.set_writable(m.offset + 2, &[(cap::MSI_ENABLE | cap::MSI_QSIZE) as u8, 0]);
        space.set_writable(m.offset + 4, &[0xfc, 0xff, 0xff, 0xff]);
        if m.wide {
            space.set_writable(m.offset + 8, &[0xff; 4]);
        }
        space.set_writable(m.offset + m.data_at(), &[0xff; 2]);
        if let Some(mask) = m.mask_at() {
            space.set_writable(m.offset + mask, &[0xff; 4]);
        }
    }
    if let Some(m) = msix {
        let ctl = space.u16(m.offset + 2) & !(cap::MSIX_ENABLE | cap::MSIX_MASKALL);
        space.set_u16(m.offset + 2, ctl);
        space.set_writable(m.offset + 2, &[0, ((cap::MSIX_ENABLE | cap::MSIX_MASKALL) >> 8) as u8]);
    }
}

impl VirtConfig {
    /// Builds the virtualized space from the device's own bytes and its BAR regions'
    /// sizes (`region_size(i)` for i in 0..6).
    pub fn new(raw: &[u8], region_size: impl Fn(u8) -> u64) -> Result<VirtConfig, ConfigError> {
        if raw.len() < 64 {
            return Err(ConfigError::TooSmall(raw.len() as u64));
        }
        let mut space = ConfigSpace::from_bytes(raw);
        let vendor = space.u16(reg::VENDOR_ID);
        if vendor == 0 || vendor == 0xffff {
            return Err(ConfigError::NoVendor(vendor));
        }
        let header = space.u8(reg::HEADER_TYPE) & 0x7f;
        if header != 0 {
            return Err(ConfigError::HeaderType(header));
        }
        let specs = bar_specs(&space, &region_size)?;
        let bars = Bars::new(&specs)?;
        let mut emulated = Box::new([0u8; CONFIG_SIZE]);
        fn emulate(e: &mut [u8; CONFIG_SIZE], from: u16, len: u16) {
            for b in &mut e[usize::from(from)..usize::from(from + len).min(CONFIG_SIZE)] {
                *b = 0xff;
            }
        }
        // Identity (cached: it does not change), BARs, subsystem ids, ROM, cap pointer,
        // interrupt line and pin; the decode, bus-master and INTx-disable bits of COMMAND.
        emulate(&mut emulated, 0x00, 4);
        emulate(&mut emulated, 0x08, 8);
        emulate(&mut emulated, reg::BAR0, 24);
        emulate(&mut emulated, reg::SUBSYSTEM_VENDOR_ID, 4);
        emulate(&mut emulated, reg::ROM, 4);
        emulate(&mut emulated, reg::CAPABILITIES, 1);
        emulate(&mut emulated, reg::INTERRUPT_LINE, 2);
        let cmd_bits = command::IO | command::MEMORY | command::MASTER | command::INTX_DISABLE;
        emulated[usize::from(reg::COMMAND)] = cmd_bits as u8;
        emulated[usize::from(reg::COMMAND) + 1] = (cmd_bits >> 8) as u8;
        emulated[usize::from(reg::STATUS)] = status::CAP_LIST as u8;
        let msi = space.find_capability(cap::MSI).map(|o| MsiCap::decode(o, space.u16(o + 2)));
        let msix = space
            .find_capability(cap::MSIX)
            .map(|o| MsixCap::decode(o, space.u16(o + 2), space.u32(o + 4), space.u32(o + 8)));
        if let Some(m) = &msix {
            check_msix(m, &specs)?;
        }
        let exp = space.find_capability(cap::EXP);
        if let Some(m) = &msi {
            emulate(&mut emulated, m.offset, m.size());
        }
        if let Some(m) = &msix {
            emulate(&mut emulated, m.offset, 12);
        }
        if let Some(e) = exp {
            // DEVCTL's FLR bit is the VMM's to act on (it reads back as 0).
            emulated[usize::from(e + cap::EXP_DEVCTL) + 1] |= (cap::EXP_DEVCTL_FLR >> 8) as u8;
        }
        reset_copy(&mut space, cmd_bits, msi.as_ref(), msix.as_ref());
        let pin = space.u8(reg::INTERRUPT_PIN).min(4);
        space.set_u8(reg::INTERRUPT_PIN, pin);
        let size = u16::try_from(raw.len().min(CONFIG_SIZE)).unwrap_or(CONFIG_SIZE as u16);
        Ok(VirtConfig { space, emulated, size, bars, msi, msix, exp, pin })
    }

    /// True if every byte of the access is emulated (no need to ask the device).
    pub fn all_emulated(&self, offset: u16, len: usize) -> bool {
        (0..len).all(|i| self.emulated.get(usize::from(offset) + i).is_some_and(|m| *m == 0xff))
    }

    /// True if any bit of the access passes through to the device.
    pub fn any_passthrough(&self, offset: u16, len: usize) -> bool {
        (0..len).any(|i| self.emulated.get(usize::from(offset) + i).is_some_and(|m| *m != 0xff))
    }

    /// Merges the device's bytes with the emulated ones for a read at `offset`.
    pub fn merge(&self, offset: u16, device: &[u8], out: &mut [u8]) {
        for (i, o) in out.iter_mut().enumerate() {
            let at = usize::from(offset) + i;
            let m = self.emulated.get(at).copied().unwrap_or(0);
            let mine = self.read_emulated(at);
            let theirs = device.get(i).copied().unwrap_or(0xff);
            *o = (mine & m) | (theirs & !m);
        }
    }

    fn read_emulated(&self, at: usize) -> u8 {
        let bar_regs = usize::from(reg::BAR0)..usize::from(reg::BAR0) + 24;
        if bar_regs.contains(&at) {
            let r = (at - usize::from(reg::BAR0)) / 4;
            return self.bars.read(r).to_le_bytes()[(at - usize::from(reg::BAR0)) % 4];
        }
        self.space.bytes().get(at).copied().unwrap_or(0xff)
    }

    /// Applies a guest write to the emulated bits; returns what changed. The caller
    /// forwards the write to the device when [`VirtConfig::any_passthrough`] says so.
    pub fn write(&mut self, offset: u16, data: &[u8]) -> Effects {
        let mut fx = Effects::default();
        let cmd_before = self.space.u16(reg::COMMAND);
        let bar_regs = reg::BAR0..reg::BAR0 + 24;
        if bar_regs.contains(&offset) {
            if let Ok(b) = <[u8; 4]>::try_from(data) {
                self.bars.write(usize::from((offset - reg::BAR0) / 4), u32::from_le_bytes(b));
            }
            return fx;
        }
        self.space.write(offset, data);
        let end = offset + data.len() as u16;
        let touches = |from: u16, len: u16| offset < from + len && from < end;
        let cmd_after = self.space.u16(reg::COMMAND);
        if cmd_after != cmd_before {
            fx.command = Some((cmd_before, cmd_after));
        }
        if let Some(m) = &self.msi {
            fx.msi = touches(m.offset, m.size());
        }
        if let Some(m) = &self.msix {
            fx.msix = touches(m.offset + 2, 2);
        }
        if let Some(e) = self.exp {
            let at = e + cap::EXP_DEVCTL;
            if touches(at, 2) {
                let mut v = [0u8; 2];
                for (i, b) in v.iter_mut().enumerate() {
                    let a = at + i as u16;
                    if a >= offset && a < end {
                        *b = data[usize::from(a - offset)];
                    }
                }
                fx.flr = u16::from_le_bytes(v) & cap::EXP_DEVCTL_FLR != 0;
                if touches(at + 1, 1) {
                    fx.no_snoop = Some(u16::from_le_bytes(v) & cap::EXP_DEVCTL_NOSNOOP != 0);
                }
            }
        }
        fx
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.space.u16(reg::COMMAND)
    }

    /// The MSI registers now.
    pub fn msi_state(&self) -> Option<MsiState> {
        let m = self.msi?;
        let s = &self.space;
        let o = m.offset;
        let hi = if m.wide { s.u32(o + 8) } else { 0 };
        let mask = m.mask_at().map_or(0, |a| s.u32(o + a));
        Some(MsiState::from_regs(&m, s.u16(o + 2), s.u32(o + 4), hi, s.u16(o + m.data_at()), mask))
    }

    /// MSI-X control: (enabled, all masked).
    pub fn msix_control(&self) -> (bool, bool) {
        self.msix.map_or((false, false), |m| {
            let c = self.space.u16(m.offset + 2);
            (c & cap::MSIX_ENABLE != 0, c & cap::MSIX_MASKALL != 0)
        })
    }

    /// Back to the state after a function-level reset: decoding, bus mastering and
    /// interrupts off (the BAR addresses are kept; a driver restores them anyway).
    pub fn reset(&mut self) {
        let cmd = self.command() & !(command::IO | command::MEMORY | command::MASTER | command::INTX_DISABLE);
        self.space.set_u16(reg::COMMAND, cmd);
        if let Some(m) = self.msi {
            let c = self.space.u16(m.offset + 2) & !(cap::MSI_ENABLE | cap::MSI_QSIZE);
            self.space.set_u16(m.offset + 2, c);
        }
        if let Some(m) = self.msix {
            let c = self.space.u16(m.offset + 2) & !(cap::MSIX_ENABLE | cap::MSIX_MASKALL);
            self.space.set_u16(m.offset + 2, c);
        }
    }
}
