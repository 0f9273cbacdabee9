//! MSI as the VMM emulates it for an assigned function: the capability's registers
//! (kept by the VMM) and the messages of the enabled vectors.

use abi::pci::cap;

/// The layout of an MSI capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiCap {
    /// Offset of the capability.
    pub offset: u16,
    /// 64-bit message address.
    pub wide: bool,
    /// Per-vector masking.
    pub maskable: bool,
    /// Vectors supported (1..=32).
    pub supported: u8,
}

impl MsiCap {
    /// Decodes the capability at `offset` from its control register.
    pub fn decode(offset: u16, control: u16) -> MsiCap {
        let log2 = ((control & cap::MSI_QMASK) >> 1).min(5);
        MsiCap {
            offset,
            wide: control & cap::MSI_64BIT != 0,
            maskable: control & cap::MSI_MASKBIT != 0,
            supported: 1 << log2,
        }
    }

    /// Bytes of the capability.
    pub fn size(&self) -> u16 {
        10 + if self.wide { 4 } else { 0 } + if self.maskable { 10 } else { 0 }
    }

    /// Offset of the data register (relative to the capability).
    pub fn data_at(&self) -> u16 {
        if self.wide { 12 } else { 8 }
    }

    /// Offset of the mask register, when maskable.
    pub fn mask_at(&self) -> Option<u16> {
        self.maskable.then_some(if self.wide { 16 } else { 12 })
    }
}

/// What the capability's registers say now (read from the VMM's copy).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiState {
    /// Enabled.
    pub enabled: bool,
    /// Vectors enabled (a power of two).
    pub vectors: u8,
    /// Message address.
    pub address: u64,
    /// Message data of vector 0 (vector n sets the low bits to n).
    pub data: u16,
    /// Mask bits.
    pub mask: u32,
}

impl MsiState {
    /// From the capability's registers: control, address (lo, hi), data, mask.
    pub fn from_regs(cap: &MsiCap, control: u16, lo: u32, hi: u32, data: u16, mask: u32) -> MsiState {
        let log2 = ((control & cap::MSI_QSIZE) >> 4).min(5);
        MsiState {
            enabled: control & cap::MSI_ENABLE != 0,
            vectors: (1u8 << log2).min(cap.supported),
            address: (u64::from(if cap.wide { hi } else { 0 }) << 32) | u64::from(lo),
            data,
            mask: if cap.maskable { mask } else { 0 },
        }
    }

    /// The data of vector `n`: the low bits of the data replaced by the vector number.
    pub fn data_of(&self, n: u8) -> u32 {
        let low = u16::from(self.vectors.max(1)) - 1;
        u32::from((self.data & !low) | (u16::from(n) & low))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_and_vector_data() {
        let c = MsiCap::decode(0x50, cap::MSI_64BIT | cap::MSI_MASKBIT | (2 << 1));
        assert_eq!((c.supported, c.size(), c.data_at(), c.mask_at()), (4, 24, 12, Some(16)));
        let s = MsiState::from_regs(&c, cap::MSI_ENABLE | (2 << 4), 0xfee0_0000, 0, 0x4040, 0b10);
        assert_eq!((s.enabled, s.vectors, s.mask), (true, 4, 0b10));
        assert_eq!(s.data_of(3), 0x4043);
        let small = MsiCap::decode(0x50, 0);
        assert_eq!((small.supported, small.size(), small.mask_at()), (1, 10, None));
    }
}
