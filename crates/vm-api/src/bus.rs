//! An address-range bus: maps `[base, base + len)` ranges to devices.
//!
//! Lookups take a read lock on the range table and then the device's own lock; the
//! table lock is never held while a device runs, so a device may insert or remove
//! ranges (BAR moves) from its handlers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device that answers reads and writes on a bus range.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and its owner.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors of bus range management (VMM configuration errors, never guest-caused).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps around the address space.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Start of the range.
        base: u64,
        /// Length of the range.
        len: u64,
    },
    /// The range overlaps a range already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device at {existing:#x}")]
    Overlap {
        /// Start of the range.
        base: u64,
        /// Length of the range.
        len: u64,
        /// Start of the range it overlaps.
        existing: u64,
    },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A bus of address ranges (one for port I/O, one for MMIO).
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        f.debug_list().entries(ranges.iter().map(|(b, e)| (*b, e.len))).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Bus {
        Bus::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(&self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusError::InvalidRange { base, len })?;
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        if let Some((&b, e)) = ranges.range(..end).next_back()
            && b + e.len > base
        {
            return Err(BusError::Overlap { base, len, existing: b });
        }
        ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// Removes the device whose range starts at `base`; returns it.
    pub fn remove(&self, base: u64) -> Option<SharedDevice> {
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        ranges.remove(&base).map(|e| e.device)
    }

    /// The device covering `addr` and the offset of `addr` in its range.
    fn resolve(&self, addr: u64, size: usize) -> Option<(SharedDevice, u64)> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        let (&base, e) = ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(size as u64)? <= e.len).then(|| (Arc::clone(&e.device), offset))
    }

    /// Dispatches a read; returns false (and leaves `data` alone) if no device covers
    /// the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((dev, offset)) => {
                dev.lock().unwrap_or_else(|e| e.into_inner()).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false if no device covers the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((dev, offset)) => {
                dev.lock().unwrap_or_else(|e| e.into_inner()).write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_offset() {
        let bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x100, 0x10, a.clone()).unwrap();
        assert!(bus.write(0x104, &[1, 2]));
        let mut buf = [0u8; 4];
        assert!(bus.read(0x10c, &mut buf));
        assert_eq!(buf, [0xc; 4]);
        assert_eq!(a.lock().unwrap().writes, vec![(4, vec![1, 2])]);
    }

    #[test]
    fn access_outside_or_straddling_a_range_is_unassigned() {
        let bus = Bus::new();
        bus.insert(0x100, 0x10, Arc::new(Mutex::new(Recorder::default()))).unwrap();
        let mut buf = [0xaau8; 4];
        assert!(!bus.read(0xff, &mut buf[..1]));
        assert!(!bus.read(0x10e, &mut buf), "a 4-byte read at 0x10e straddles the end");
        assert!(!bus.write(0x110, &[0]));
        assert_eq!(buf, [0xaa; 4], "a failed read leaves the buffer alone");
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let bus = Bus::new();
        let d = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x100, 0x10, d()).unwrap();
        assert_eq!(bus.insert(0x10f, 1, d()), Err(BusError::Overlap { base: 0x10f, len: 1, existing: 0x100 }));
        assert_eq!(bus.insert(0xf0, 0x11, d()), Err(BusError::Overlap { base: 0xf0, len: 0x11, existing: 0x100 }));
        assert!(bus.insert(0xf0, 0x10, d()).is_ok(), "adjacent below is fine");
        assert!(bus.insert(0x110, 0x10, d()).is_ok(), "adjacent above is fine");
        assert_eq!(bus.insert(0x200, 0, d()), Err(BusError::InvalidRange { base: 0x200, len: 0 }));
        assert_eq!(bus.insert(u64::MAX, 2, d()), Err(BusError::InvalidRange { base: u64::MAX, len: 2 }));
        assert!(bus.remove(0x100).is_some());
        assert!(!bus.write(0x100, &[0]));
        assert!(bus.insert(0x100, 0x10, d()).is_ok());
    }
}
