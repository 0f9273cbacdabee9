//! MSI-X as the VMM emulates it for an assigned function: the table (address, data and
//! mask of each vector) and the pending bits, kept by the VMM and never by the device.

use abi::pci::cap;

/// Most vectors of one function (the capability's 11-bit table size).
pub const MAX_VECTORS: usize = 2048;

/// One table entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// Message address (low and high halves).
    pub address: u64,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub control: u32,
}

impl Entry {
    /// True if the vector is masked.
    pub fn masked(&self) -> bool {
        self.control & cap::MSIX_ENTRY_MASKED != 0
    }
}

/// The capability as found in the device's configuration space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixCap {
    /// Offset of the capability.
    pub offset: u16,
    /// Vectors.
    pub vectors: u16,
    /// BAR and offset of the table.
    pub table: (u8, u64),
    /// BAR and offset of the pending-bit array.
    pub pba: (u8, u64),
}

impl MsixCap {
    /// Decodes the capability at `offset` from its control, table and PBA registers.
    pub fn decode(offset: u16, control: u16, table: u32, pba: u32) -> MsixCap {
        MsixCap {
            offset,
            vectors: (control & cap::MSIX_QSIZE) + 1,
            table: ((table & cap::MSIX_BIR) as u8, u64::from(table & !cap::MSIX_BIR)),
            pba: ((pba & cap::MSIX_BIR) as u8, u64::from(pba & !cap::MSIX_BIR)),
        }
    }

    /// Bytes of the table.
    pub fn table_size(&self) -> u64 {
        u64::from(self.vectors) * cap::MSIX_ENTRY_SIZE
    }

    /// Bytes of the pending-bit array.
    pub fn pba_size(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }
}

/// What a guest write to the table changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableChange {
    /// Nothing.
    None,
    /// Vector `n`'s message or mask changed.
    Vector(u16),
}

/// The table and pending bits.
#[derive(Clone, Debug)]
pub struct MsixTable {
    entries: Vec<Entry>,
    pending: Vec<u64>,
}

impl MsixTable {
    /// `vectors` entries, all masked (the state after reset).
    pub fn new(vectors: u16) -> MsixTable {
        let n = usize::from(vectors).min(MAX_VECTORS);
        MsixTable {
            entries: vec![Entry { control: cap::MSIX_ENTRY_MASKED, ..Default::default() }; n],
            pending: vec![0; n.div_ceil(64)],
        }
    }

    /// Entry `n`.
    pub fn entry(&self, n: u16) -> Option<Entry> {
        self.entries.get(usize::from(n)).copied()
    }

    /// Number of vectors.
    pub fn len(&self) -> u16 {
        self.entries.len() as u16
    }

    /// True with no vectors.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A guest read of the table at `offset` (4 or 8 bytes, aligned; else all-ones).
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(data.len() as u64) {
            return;
        }
        for (k, chunk) in data.chunks_mut(4).enumerate() {
            let at = offset + 4 * k as u64;
            let Some(e) = self.entries.get((at / cap::MSIX_ENTRY_SIZE) as usize) else { return };
            let v = match at % cap::MSIX_ENTRY_SIZE {
                0 => e.address as u32,
                4 => (e.address >> 32) as u32,
                8 => e.data,
                _ => e.control,
            };
            chunk.copy_from_slice(&v.to_le_bytes());
        }
    }

    /// A guest write of the table (4 or 8 bytes, aligned; else dropped).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> TableChange {
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(data.len() as u64) {
            return TableChange::None;
        }
        let mut changed = None;
        for (k, chunk) in data.chunks(4).enumerate() {
            let at = offset + 4 * k as u64;
            let n = (at / cap::MSIX_ENTRY_SIZE) as usize;
            let Some(e) = self.entries.get_mut(n) else { break };
            let v = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let before = *e;
            match at % cap::MSIX_ENTRY_SIZE {
                0 => e.address = (e.address & !0xffff_ffff) | u64::from(v),
                4 => e.address = (e.address & 0xffff_ffff) | (u64::from(v) << 32),
                8 => e.data = v,
                _ => e.control = v & cap::MSIX_ENTRY_MASKED,
            }
            if *e != before {
                changed = Some(n as u16);
            }
        }
        changed.map_or(TableChange::None, TableChange::Vector)
    }

    /// Marks vector `n` pending (it fired while masked).
    pub fn set_pending(&mut self, n: u16, pending: bool) {
        if let Some(w) = self.pending.get_mut(usize::from(n) / 64) {
            let bit = 1u64 << (n % 64);
            if pending {
                *w |= bit;
            } else {
                *w &= !bit;
            }
        }
    }

    /// True if vector `n` is pending.
    pub fn is_pending(&self, n: u16) -> bool {
        self.pending.get(usize::from(n) / 64).is_some_and(|w| w & (1 << (n % 64)) != 0)
    }

    /// A guest read of the pending-bit array.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let at = offset as usize + i;
            *d = self.pending.get(at / 8).map_or(0, |w| (w >> (8 * (at % 8))) as u8);
        }
    }

    /// Back to the reset state: every vector masked, nothing pending.
    pub fn reset(&mut self) {
        for e in &mut self.entries {
            *e = Entry { control: cap::MSIX_ENTRY_MASKED, ..Default::default() };
        }
        self.pending.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_writes_reads_masks_and_pending_bits() {
        let mut t = MsixTable::new(3);
        assert!(t.entry(0).unwrap().masked(), "masked after reset");
        assert_eq!(t.write(16, &0xfee0_1000u32.to_le_bytes()), TableChange::Vector(1));
        assert_eq!(t.write(16 + 8, &0x4041u32.to_le_bytes()), TableChange::Vector(1));
        assert_eq!(t.write(16 + 12, &0u32.to_le_bytes()), TableChange::Vector(1), "unmasked");
        assert_eq!(t.write(16 + 12, &0u32.to_le_bytes()), TableChange::None, "no change");
        let e = t.entry(1).unwrap();
        assert_eq!((e.address, e.data, e.masked()), (0xfee0_1000, 0x4041, false));
        let mut q = [0u8; 8];
        t.read(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_1000);
        assert_eq!(t.write(3 * 16, &[0; 4]), TableChange::None, "past the table: dropped");
        assert_eq!(t.write(17, &[0; 4]), TableChange::None, "misaligned: dropped");
        t.set_pending(2, true);
        let mut p = [0u8; 8];
        t.read_pba(0, &mut p);
        assert_eq!(p[0], 0b100);
        let c = MsixCap::decode(0x40, 2, 0xe001, 0xf001);
        assert_eq!((c.vectors, c.table, c.pba, c.table_size(), c.pba_size()), (3, (1, 0xe000), (1, 0xf000), 48, 8));
    }
}
