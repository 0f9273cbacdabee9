//! Base address registers: their emulation (sizing with all-ones, the guest moving
//! them) and when a BAR decodes (COMMAND enables it and its address is usable).

use abi::pci::{bar, command};

/// What a BAR is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// Port I/O.
    Io,
    /// Memory below 4 GiB (one register).
    Mem32 {
        /// Prefetchable.
        prefetch: bool,
    },
    /// Memory anywhere (two registers: this one and the next).
    Mem64 {
        /// Prefetchable.
        prefetch: bool,
    },
}

impl BarKind {
    /// True for memory BARs.
    pub fn is_memory(self) -> bool {
        !matches!(self, BarKind::Io)
    }

    /// The type bits of the BAR register.
    pub fn type_bits(self) -> u32 {
        match self {
            BarKind::Io => bar::IO,
            BarKind::Mem32 { prefetch } => {
                if prefetch {
                    bar::PREFETCH
                } else {
                    0
                }
            }
            BarKind::Mem64 { prefetch } => bar::MEM_TYPE_64 | if prefetch { bar::PREFETCH } else { 0 },
        }
    }
}

/// One BAR of a function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarSpec {
    /// BAR index (0..=5; a 64-bit BAR also takes index + 1).
    pub index: u8,
    /// Kind.
    pub kind: BarKind,
    /// Bytes (a power of two).
    pub size: u64,
}

/// Why a set of BARs cannot be emulated (a malformed device).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BarError {
    /// Index above 5, or a 64-bit BAR at index 5.
    #[error("BAR {0}: no such BAR register (a 64-bit BAR needs the next register too)")]
    Index(u8),
    /// Two BARs claim one register.
    #[error("BAR {0}: its register is taken by another BAR")]
    Overlap(u8),
    /// Size not a power of two, or below the minimum (16 bytes memory, 4 I/O), or too large.
    #[error("BAR {index}: size {size:#x} is not a power of two of at least {min} bytes (and at most {max:#x})")]
    Size {
        /// The BAR.
        index: u8,
        /// Its size.
        size: u64,
        /// Smallest allowed.
        min: u64,
        /// Largest allowed.
        max: u64,
    },
}

/// The six BAR registers of a function.
#[derive(Clone, Debug, Default)]
pub struct Bars {
    specs: [Option<BarSpec>; 6],
    addrs: [u64; 6],
}

/// Largest memory BAR (and 32-bit memory BAR) passthru places.
pub const MAX_MEM_BAR: u64 = 1 << 40;
/// Largest 32-bit memory BAR.
pub const MAX_MEM32_BAR: u64 = 1 << 31;
/// Largest I/O BAR.
pub const MAX_IO_BAR: u64 = 1 << 8;

impl Bars {
    /// BARs of these specs, all at address 0 (not decoding).
    pub fn new(specs: &[BarSpec]) -> Result<Bars, BarError> {
        let mut b = Bars::default();
        for s in specs {
            let i = s.index as usize;
            let wide = matches!(s.kind, BarKind::Mem64 { .. });
            if i > 5 || (wide && i > 4) {
                return Err(BarError::Index(s.index));
            }
            let (min, max) = match s.kind {
                BarKind::Io => (4, MAX_IO_BAR),
                BarKind::Mem32 { .. } => (16, MAX_MEM32_BAR),
                BarKind::Mem64 { .. } => (16, MAX_MEM_BAR),
            };
            if !s.size.is_power_of_two() || s.size < min || s.size > max {
                return Err(BarError::Size { index: s.index, size: s.size, min, max });
            }
            if b.specs[i].is_some() || (i > 0 && b.is_upper_half(i)) || (wide && b.specs[i + 1].is_some()) {
                return Err(BarError::Overlap(s.index));
            }
            b.specs[i] = Some(*s);
        }
        Ok(b)
    }

    fn is_upper_half(&self, i: usize) -> bool {
        i > 0 && matches!(self.specs[i - 1], Some(BarSpec { kind: BarKind::Mem64 { .. }, .. }))
    }

    /// The BARs, by index.
    pub fn specs(&self) -> impl Iterator<Item = &BarSpec> {
        self.specs.iter().flatten()
    }

    /// The spec of BAR `index`.
    pub fn spec(&self, index: u8) -> Option<BarSpec> {
        self.specs.get(index as usize).copied().flatten()
    }

    /// The programmed address of BAR `index`.
    pub fn address(&self, index: u8) -> u64 {
        self.addrs.get(index as usize).copied().unwrap_or(0)
    }

    /// Sets an address directly (the VMM as firmware; also what a guest write does).
    pub fn set_address(&mut self, index: u8, addr: u64) {
        if let Some(s) = self.spec(index) {
            self.addrs[index as usize] = addr & !(s.size - 1);
        }
    }

    /// The value of BAR register `reg` (0..=5): address bits masked by the size (so
    /// writing all-ones reads back the size mask) and the type bits.
    pub fn read(&self, reg: usize) -> u32 {
        if reg > 5 {
            return 0;
        }
        if self.is_upper_half(reg) {
            let s = self.specs[reg - 1].map_or(0, |s| s.size);
            let a = self.addrs[reg - 1] & !(s.wrapping_sub(1));
            return (a >> 32) as u32;
        }
        match self.specs[reg] {
            None => 0,
            Some(s) => {
                let a = self.addrs[reg] & !(s.size - 1);
                (a as u32 & if s.kind == BarKind::Io { bar::IO_MASK } else { bar::MEM_MASK }) | s.kind.type_bits()
            }
        }
    }

    /// A guest write of BAR register `reg`: the address bits the size allows change.
    pub fn write(&mut self, reg: usize, value: u32) {
        if reg > 5 {
            return;
        }
        if self.is_upper_half(reg) {
            let i = reg - 1;
            let size = self.specs[i].map_or(0, |s| s.size);
            let a = (self.addrs[i] & 0xffff_ffff) | (u64::from(value) << 32);
            self.addrs[i] = a & !(size.wrapping_sub(1));
            return;
        }
        if let Some(s) = self.specs[reg] {
            let keep_high = if matches!(s.kind, BarKind::Mem64 { .. }) { self.addrs[reg] & !0xffff_ffff } else { 0 };
            self.addrs[reg] = (keep_high | u64::from(value)) & !(s.size - 1);
        }
    }

    /// The BARs that decode under `command`: (spec, address). A BAR decodes when its
    /// space is enabled and its address is usable: not 0, not wrapping, a 32-bit BAR
    /// ending below 4 GiB (so the all-ones sizing pattern never decodes), an I/O BAR
    /// inside the 64 KiB port space.
    pub fn decoded(&self, command: u16) -> Vec<(BarSpec, u64)> {
        self.specs()
            .filter_map(|s| {
                let a = self.addrs[s.index as usize];
                let enabled =
                    if s.kind.is_memory() { command & command::MEMORY != 0 } else { command & command::IO != 0 };
                let end = a.checked_add(s.size)?;
                let usable = a != 0
                    && match s.kind {
                        BarKind::Io => end <= 0x1_0000,
                        BarKind::Mem32 { .. } => end < 0x1_0000_0000,
                        BarKind::Mem64 { .. } => end < 1 << 52,
                    };
                (enabled && usable).then_some((*s, a))
            })
            .collect()
    }
}

/// Sizes a BAR the way firmware does from register values read back after writing
/// all-ones (`lo`, and `hi` for the upper half of a 64-bit BAR): `None` if the register
/// is unused.
pub fn size_from_probe(lo: u32, hi: u32) -> Option<(BarKind, u64)> {
    if lo == 0 {
        return None;
    }
    if lo & bar::IO != 0 {
        let mask = lo & bar::IO_MASK & 0xffff;
        return (mask != 0).then(|| (BarKind::Io, u64::from(!mask & 0xffff) + 1));
    }
    let prefetch = lo & bar::PREFETCH != 0;
    if lo & bar::MEM_TYPE_MASK == bar::MEM_TYPE_64 {
        let mask = (u64::from(hi) << 32) | u64::from(lo & bar::MEM_MASK);
        return (mask != 0).then(|| (BarKind::Mem64 { prefetch }, (!mask).wrapping_add(1)));
    }
    let mask = lo & bar::MEM_MASK;
    (mask != 0).then(|| (BarKind::Mem32 { prefetch }, u64::from(!mask) + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(index: u8, kind: BarKind, size: u64) -> BarSpec {
        BarSpec { index, kind, size }
    }

    #[test]
    fn all_ones_reads_back_the_size_and_type_and_never_decodes() {
        let mut b = Bars::new(&[
            spec(0, BarKind::Mem64 { prefetch: true }, 16 << 10),
            spec(2, BarKind::Mem32 { prefetch: false }, 4096),
            spec(4, BarKind::Io, 256),
        ])
        .unwrap();
        for r in 0..6 {
            b.write(r, 0xffff_ffff);
        }
        assert_eq!(b.read(0), 0xffff_c00c, "16 KiB, 64-bit, prefetchable (as libvfio-user answers)");
        assert_eq!(b.read(1), 0xffff_ffff);
        assert_eq!(b.read(2), 0xffff_f000);
        assert_eq!(b.read(4), 0xffff_ff01);
        assert_eq!(b.read(3), 0, "unused");
        assert_eq!(size_from_probe(b.read(0), b.read(1)), Some((BarKind::Mem64 { prefetch: true }, 16 << 10)));
        assert_eq!(size_from_probe(b.read(2), 0), Some((BarKind::Mem32 { prefetch: false }, 4096)));
        assert_eq!(size_from_probe(b.read(4), 0), Some((BarKind::Io, 256)));
        let all = command::MEMORY | command::IO;
        assert!(
            b.decoded(all).iter().all(|(s, _)| s.index == 0),
            "only the 64-bit BAR could decode at its probe address"
        );
        b.write(0, 0xc000_0000);
        b.write(1, 0);
        b.write(2, 0xc010_0123);
        b.write(4, 0xc000);
        let d = b.decoded(all);
        assert_eq!(
            d.iter().map(|(s, a)| (s.index, *a)).collect::<Vec<_>>(),
            vec![(0, 0xc000_0000), (2, 0xc010_0000), (4, 0xc000)]
        );
        assert_eq!(b.decoded(command::IO).len(), 1, "memory decode off");
    }

    #[test]
    fn malformed_bars_are_refused() {
        assert_eq!(
            Bars::new(&[spec(0, BarKind::Mem32 { prefetch: false }, 3000)]).unwrap_err(),
            BarError::Size { index: 0, size: 3000, min: 16, max: MAX_MEM32_BAR }
        );
        assert!(matches!(Bars::new(&[spec(5, BarKind::Mem64 { prefetch: false }, 4096)]), Err(BarError::Index(5))));
        let two = [spec(0, BarKind::Mem64 { prefetch: false }, 4096), spec(1, BarKind::Io, 16)];
        assert!(matches!(Bars::new(&two), Err(BarError::Overlap(1))));
        assert!(Bars::new(&[spec(4, BarKind::Io, 2)]).is_err(), "I/O BARs are at least 4 bytes");
    }
}
