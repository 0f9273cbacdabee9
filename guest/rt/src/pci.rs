//! PCI enumeration through ECAM (layout in `abi::pci`): find functions by vendor and
//! device id, read and size BARs, enable decoding and bus mastering, walk the
//! capability list, program MSI-X vectors.

use crate::mmio::{read8, read16, read32, write16, write32};
use abi::pci::{self as p, cap, command, reg};

/// One function on bus 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    /// Its slot (device number).
    pub slot: u8,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Class code (base class << 8 | subclass).
    pub class: u16,
}

fn cfg(slot: u8, offset: u16) -> u64 {
    p::ECAM_BASE + (u64::from(slot) << 15) + u64::from(offset)
}

impl Function {
    /// The function in `slot`, if one answers.
    pub fn at(slot: u8) -> Option<Function> {
        if slot >= p::SLOTS {
            return None;
        }
        // SAFETY: ECAM is MMIO the VMM decodes; an empty slot reads all-ones.
        let id = unsafe { read32(cfg(slot, reg::VENDOR_ID)) };
        if id & 0xffff == 0xffff {
            return None;
        }
        let f = Function { slot, vendor: id as u16, device: (id >> 16) as u16, class: 0 };
        Some(Function { class: (f.read32(reg::REVISION) >> 16) as u16, ..f })
    }

    /// Its requester id (bus 0, function 0): the id DMA front-ends' calls take.
    pub fn bdf(&self) -> u16 {
        p::bdf(0, self.slot, 0)
    }

    /// A 32-bit configuration read.
    pub fn read32(&self, offset: u16) -> u32 {
        // SAFETY: ECAM MMIO of this function.
        unsafe { read32(cfg(self.slot, offset)) }
    }

    /// A 16-bit configuration read.
    pub fn read16(&self, offset: u16) -> u16 {
        // SAFETY: ECAM MMIO of this function.
        unsafe { read16(cfg(self.slot, offset)) }
    }

    /// An 8-bit configuration read.
    pub fn read8(&self, offset: u16) -> u8 {
        // SAFETY: ECAM MMIO of this function.
        unsafe { read8(cfg(self.slot, offset)) }
    }

    /// A 32-bit configuration write.
    pub fn write32(&self, offset: u16, v: u32) {
        // SAFETY: ECAM MMIO of this function.
        unsafe { write32(cfg(self.slot, offset), v) }
    }

    /// A 16-bit configuration write.
    pub fn write16(&self, offset: u16, v: u16) {
        // SAFETY: ECAM MMIO of this function.
        unsafe { write16(cfg(self.slot, offset), v) }
    }

    /// The address memory BAR `i` decodes at (64-bit BARs read whole), or None for an
    /// I/O BAR, an unimplemented one or an upper half.
    pub fn bar(&self, i: u8) -> Option<u64> {
        if i >= 6 {
            return None;
        }
        let at = reg::BAR0 + 4 * u16::from(i);
        let lo = self.read32(at);
        if lo & p::bar::IO != 0 {
            return None;
        }
        let mut addr = u64::from(lo & p::bar::MEM_MASK);
        if lo & p::bar::MEM_TYPE_MASK == p::bar::MEM_TYPE_64 && i < 5 {
            addr |= u64::from(self.read32(at + 4)) << 32;
        }
        (addr != 0).then_some(addr)
    }

    /// The size of BAR `i`, probed as firmware does (all-ones, read back, restore).
    /// Decoding is turned off during the probe.
    pub fn bar_size(&self, i: u8) -> u64 {
        if i >= 6 {
            return 0;
        }
        let at = reg::BAR0 + 4 * u16::from(i);
        let cmd = self.read16(reg::COMMAND);
        self.write16(reg::COMMAND, cmd & !(command::MEMORY | command::IO));
        let orig = self.read32(at);
        self.write32(at, u32::MAX);
        let lo = self.read32(at);
        self.write32(at, orig);
        let wide = lo & p::bar::IO == 0 && lo & p::bar::MEM_TYPE_MASK == p::bar::MEM_TYPE_64 && i < 5;
        let hi = if wide {
            let orig_hi = self.read32(at + 4);
            self.write32(at + 4, u32::MAX);
            let h = self.read32(at + 4);
            self.write32(at + 4, orig_hi);
            h
        } else {
            u32::MAX
        };
        self.write16(reg::COMMAND, cmd);
        let mask = if lo & p::bar::IO != 0 { lo & p::bar::IO_MASK } else { lo & p::bar::MEM_MASK };
        if mask == 0 {
            return 0;
        }
        let full = (u64::from(hi) << 32) | u64::from(mask);
        (!full).wrapping_add(1)
    }

    /// Sets COMMAND bits (memory decoding, bus mastering...).
    pub fn enable(&self, bits: u16) {
        let cmd = self.read16(reg::COMMAND);
        self.write16(reg::COMMAND, cmd | bits);
    }

    /// Clears COMMAND bits.
    pub fn disable(&self, bits: u16) {
        let cmd = self.read16(reg::COMMAND);
        self.write16(reg::COMMAND, cmd & !bits);
    }

    /// The offset of capability `id`, if the function has it.
    pub fn capability(&self, id: u8) -> Option<u16> {
        if self.read16(reg::STATUS) & p::status::CAP_LIST == 0 {
            return None;
        }
        let mut at = u16::from(self.read8(reg::CAPABILITIES) & !3);
        let mut hops = 0;
        while at >= 0x40 && hops < 48 {
            if self.read8(at) == id {
                return Some(at);
            }
            at = u16::from(self.read8(at + 1) & !3);
            hops += 1;
        }
        None
    }

    /// Its interrupt pin (0 none, 1..4 INTA..INTD) and the GSI firmware wrote for it.
    pub fn intx(&self) -> (u8, u8) {
        (self.read8(reg::INTERRUPT_PIN), self.read8(reg::INTERRUPT_LINE))
    }

    /// Programs MSI-X vector `v` to `vector` on APIC `dest`, unmasked, and enables
    /// MSI-X (INTx off). False if the function has no MSI-X or no such vector.
    pub fn msix_vector(&self, v: u16, dest: u8, vector: u8) -> bool {
        let Some(c) = self.capability(cap::MSIX) else { return false };
        let control = self.read16(c + 2);
        if v > control & cap::MSIX_QSIZE {
            return false;
        }
        let table = self.read32(c + 4);
        let Some(base) = self.bar((table & cap::MSIX_BIR) as u8) else { return false };
        let entry = base + u64::from(table & !cap::MSIX_BIR) + u64::from(v) * cap::MSIX_ENTRY_SIZE;
        // SAFETY: the MSI-X table entry in the function's BAR (trapped by the VMM).
        unsafe {
            write32(entry, abi::layout::msi_address(dest) as u32);
            write32(entry + 4, (abi::layout::msi_address(dest) >> 32) as u32);
            write32(entry + 8, u32::from(vector));
            write32(entry + 12, 0);
        }
        self.write16(c + 2, (control | cap::MSIX_ENABLE) & !cap::MSIX_MASKALL);
        self.enable(command::INTX_DISABLE);
        true
    }

    /// Requests a function-level reset (PCIe FLR). False if the function has none.
    pub fn flr(&self) -> bool {
        let Some(c) = self.capability(cap::EXP) else { return false };
        if self.read32(c + 4) & cap::EXP_DEVCAP_FLR == 0 {
            return false;
        }
        let ctl = self.read16(c + cap::EXP_DEVCTL);
        self.write16(c + cap::EXP_DEVCTL, ctl | cap::EXP_DEVCTL_FLR);
        true
    }
}

/// Every function on bus 0, in slot order.
pub fn scan() -> impl Iterator<Item = Function> {
    (0..p::SLOTS).filter_map(Function::at)
}

/// The `n`th function (from 0) with this vendor and device id.
pub fn find(vendor: u16, device: u16, n: usize) -> Option<Function> {
    scan().filter(|f| f.vendor == vendor && f.device == device).nth(n)
}
