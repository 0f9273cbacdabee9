//! Translation domains: IOVA ranges mapped to guest-physical ranges with permissions.
//!
//! Map and unmap follow VFIO type1 v2, which users already rely on: addresses and sizes
//! aligned to the granule; zero size or no permission is invalid; any overlap with an
//! existing mapping is `Exists`; unmap may cover several whole mappings but never split
//! one; unmap reports the bytes it removed (zero when nothing was mapped).

use crate::addr::{Gpa, Iova, Perm};
use crate::error::MapError;
use crate::faults::FaultLog;
use crate::pagesize::PageSizes;
use crate::readers::Readers;
use crate::vmdma::VmDma;
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// The x86 MSI window: device writes here are interrupts, never memory.
pub const MSI_WINDOW: Range<u64> = 0xfee0_0000..0xfef0_0000;

/// Shape and limits of a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainConfig {
    /// Supported page sizes; the smallest is the granule.
    pub page_sizes: PageSizes,
    /// IOVA width in bits: IOVAs are below `1 << aperture_bits`.
    pub aperture_bits: u32,
    /// IOVA ranges that can never be mapped.
    pub reserved: Vec<Range<u64>>,
    /// Most mappings the domain holds (VFIO's `dma_entry_limit`, 65535 by default).
    pub max_mappings: usize,
}

impl Default for DomainConfig {
    fn default() -> Self {
        DomainConfig {
            page_sizes: PageSizes::x86(),
            aperture_bits: 48,
            reserved: vec![MSI_WINDOW],
            max_mappings: 65535,
        }
    }
}

/// One mapping: `[iova, iova + size)` -> `[gpa, gpa + size)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First IOVA.
    pub iova: Iova,
    /// First guest-physical address.
    pub gpa: Gpa,
    /// Bytes.
    pub size: u64,
    /// What devices may do.
    pub perm: Perm,
}

impl Mapping {
    /// One past the last IOVA.
    pub fn end(&self) -> u64 {
        self.iova.0 + self.size
    }
}

/// Told about every mapping of a domain: how a device process learns what it may
/// touch (a vfio-user client turns these into DMA_MAP / DMA_UNMAP).
pub trait MapObserver: Send + Sync {
    /// A mapping was made. An error undoes it and fails the map.
    fn mapped(&self, mapping: &Mapping) -> Result<(), String>;
    /// A mapping is gone from the domain and no in-process access touches it any
    /// more; return only when the observer's side has let go of it too.
    fn unmapped(&self, mapping: &Mapping);
}

/// A translation domain of one VM.
pub struct Domain {
    name: String,
    config: DomainConfig,
    pub(crate) vm: Arc<VmDma>,
    pub(crate) tree: RwLock<BTreeMap<u64, Mapping>>,
    /// Incremented by every unmap; accessors drop their IOTLB when it moves.
    pub(crate) generation: AtomicU64,
    pub(crate) readers: Readers,
    pub(crate) faults: FaultLog,
    maps: AtomicU64,
    unmaps: AtomicU64,
    observers: RwLock<Vec<Arc<dyn MapObserver>>>,
    /// Number of observers, read without the lock: maps and unmaps of a domain nobody
    /// observes skip it.
    observed: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Domain").field("name", &self.name).field("mappings", &self.mapping_count()).finish()
    }
}

impl Domain {
    pub(crate) fn new(vm: Arc<VmDma>, name: &str, config: DomainConfig) -> Domain {
        Domain {
            name: name.to_string(),
            config,
            vm,
            tree: RwLock::new(BTreeMap::new()),
            generation: AtomicU64::new(0),
            readers: Readers::default(),
            faults: FaultLog::default(),
            maps: AtomicU64::new(0),
            unmaps: AtomicU64::new(0),
            observers: RwLock::new(Vec::new()),
            observed: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The domain's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its configuration.
    pub fn config(&self) -> &DomainConfig {
        &self.config
    }

    /// The smallest page size.
    pub fn granule(&self) -> u64 {
        self.config.page_sizes.granule()
    }

    /// The VM's DMA state this domain belongs to.
    pub fn vm(&self) -> &Arc<VmDma> {
        &self.vm
    }

    /// Accesses this domain refused.
    pub fn faults(&self) -> &FaultLog {
        &self.faults
    }

    fn check_range(&self, start: u64, size: u64) -> Result<u64, MapError> {
        if size == 0 {
            return Err(MapError::InvalidArgument("size is zero"));
        }
        let g = self.granule();
        if !start.is_multiple_of(g) || !size.is_multiple_of(g) {
            return Err(MapError::InvalidArgument("not aligned to the domain's granule"));
        }
        start.checked_add(size).ok_or(MapError::InvalidArgument("range wraps around"))
    }

    /// Maps `[iova, iova + size)` to `[gpa, gpa + size)` and pins the guest pages.
    pub fn map(&self, iova: Iova, gpa: Gpa, size: u64, perm: Perm) -> Result<(), MapError> {
        let end = self.check_map(iova, gpa, size, perm)?;
        let mut tree = self.tree.write().unwrap_or_else(|e| e.into_inner());
        if let Some((_, m)) = tree.range(..end).next_back()
            && m.end() > iova.0
        {
            return Err(MapError::Exists { iova });
        }
        if tree.len() >= self.config.max_mappings {
            return Err(MapError::NoSpace { max: self.config.max_mappings });
        }
        self.vm.account().pin(&[(gpa.0, size)])?;
        let mapping = Mapping { iova, gpa, size, perm };
        tree.insert(iova.0, mapping);
        drop(tree);
        self.notify_mapped(std::slice::from_ref(&mapping))?;
        self.maps.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Maps several ranges at once, all or nothing: one lock, one locked-memory charge.
    /// On failure returns the index of the mapping that failed (0 for a charge over the
    /// limit) and nothing stays mapped.
    pub fn map_many(&self, maps: &[Mapping]) -> Result<(), (usize, MapError)> {
        for (i, m) in maps.iter().enumerate() {
            self.check_map(m.iova, m.gpa, m.size, m.perm).map_err(|e| (i, e))?;
        }
        let mut tree = self.tree.write().unwrap_or_else(|e| e.into_inner());
        let undo = |tree: &mut BTreeMap<u64, Mapping>, n: usize| {
            for m in &maps[..n] {
                tree.remove(&m.iova.0);
            }
        };
        for (i, m) in maps.iter().enumerate() {
            let clash = tree.range(..m.end()).next_back().is_some_and(|(_, x)| x.end() > m.iova.0);
            let full = tree.len() >= self.config.max_mappings;
            if clash || full {
                undo(&mut tree, i);
                let e = if clash {
                    MapError::Exists { iova: m.iova }
                } else {
                    MapError::NoSpace { max: self.config.max_mappings }
                };
                return Err((i, e));
            }
            tree.insert(m.iova.0, *m);
        }
        let ranges: Vec<(u64, u64)> = maps.iter().map(|m| (m.gpa.0, m.size)).collect();
        if let Err(e) = self.vm.account().pin(&ranges) {
            undo(&mut tree, maps.len());
            return Err((0, e));
        }
        drop(tree);
        self.notify_mapped(maps).map_err(|e| (0, e))?;
        self.maps.fetch_add(maps.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Tells observers about new mappings; if one refuses, every mapping of the batch
    /// is undone (observers told, tree cleared, pins released) and the map fails.
    fn notify_mapped(&self, maps: &[Mapping]) -> Result<(), MapError> {
        let observers = self.observers();
        for (mi, m) in maps.iter().enumerate() {
            for (oi, o) in observers.iter().enumerate() {
                if let Err(reason) = o.mapped(m) {
                    for done in &observers[..oi] {
                        done.unmapped(m);
                    }
                    for earlier in &maps[..mi] {
                        for o in observers.iter().rev() {
                            o.unmapped(earlier);
                        }
                    }
                    let mut tree = self.tree.write().unwrap_or_else(|e| e.into_inner());
                    let gone: Vec<(u64, u64)> =
                        maps.iter().filter_map(|x| tree.remove(&x.iova.0)).map(|x| (x.gpa.0, x.size)).collect();
                    drop(tree);
                    self.generation.fetch_add(1, Ordering::SeqCst);
                    self.readers.wait_for_inflight();
                    self.vm.account().unpin(&gone);
                    return Err(MapError::Rejected(reason));
                }
            }
        }
        Ok(())
    }

    /// Checks a map request on its own (alignment, permission, aperture, reserved
    /// regions, guest memory); returns the end IOVA.
    fn check_map(&self, iova: Iova, gpa: Gpa, size: u64, perm: Perm) -> Result<u64, MapError> {
        let end = self.check_range(iova.0, size)?;
        if perm.is_none() {
            return Err(MapError::InvalidArgument("no permission"));
        }
        if !gpa.0.is_multiple_of(self.granule()) {
            return Err(MapError::InvalidArgument("guest address not aligned to the domain's granule"));
        }
        if self.config.aperture_bits < 64 && end > 1u64 << self.config.aperture_bits {
            return Err(MapError::InvalidArgument("outside the domain's aperture"));
        }
        if self.config.reserved.iter().any(|r| iova.0 < r.end && r.start < end) {
            return Err(MapError::InvalidArgument("overlaps a reserved IOVA region"));
        }
        if !self.vm.is_guest_memory(gpa.0, size) {
            return Err(MapError::BadAddress { gpa: gpa.0, size });
        }
        Ok(end)
    }

    /// Removes the mappings inside `[iova, iova + size)`; returns the bytes removed.
    /// Refuses (changing nothing) if a mapping straddles either end. When it returns,
    /// no access to the removed range can succeed and none is still in flight.
    pub fn unmap(&self, iova: Iova, size: u64) -> Result<u64, MapError> {
        let end = self.check_range(iova.0, size)?;
        let removed = {
            let mut tree = self.tree.write().unwrap_or_else(|e| e.into_inner());
            // Fast path: the range is exactly one mapping (the common unmap).
            if let Some(m) = tree.get(&iova.0).copied()
                && m.end() == end
            {
                tree.remove(&iova.0);
                drop(tree);
                return Ok(self.retire(&[m]));
            }
            if let Some((_, m)) = tree.range(..iova.0).next_back()
                && m.end() > iova.0
            {
                return Err(MapError::InvalidArgument("unmap would split a mapping"));
            }
            if let Some((_, m)) = tree.range(..end).next_back()
                && m.end() > end
            {
                return Err(MapError::InvalidArgument("unmap would split a mapping"));
            }
            let keys: Vec<u64> = tree.range(iova.0..end).map(|(k, _)| *k).collect();
            keys.iter().filter_map(|k| tree.remove(k)).collect::<Vec<_>>()
        };
        Ok(self.retire(&removed))
    }

    /// Removes exactly the mappings starting at each of `iovas` (each must exist), with
    /// one lock, one invalidation, one wait for in-flight accesses and one release of
    /// pins. Unknown IOVAs are skipped. Returns the bytes removed.
    pub fn unmap_exact(&self, iovas: &[Iova]) -> u64 {
        let removed: Vec<Mapping> = {
            let mut tree = self.tree.write().unwrap_or_else(|e| e.into_inner());
            iovas.iter().filter_map(|i| tree.remove(&i.0)).collect()
        };
        self.retire(&removed)
    }

    /// Removes every mapping; returns the bytes removed.
    pub fn unmap_all(&self) -> u64 {
        let removed: Vec<Mapping> = {
            let mut tree = self.tree.write().unwrap_or_else(|e| e.into_inner());
            std::mem::take(&mut *tree).into_values().collect()
        };
        self.retire(&removed)
    }

    /// After mappings left the tree: invalidate IOTLBs, wait for in-flight accesses,
    /// release the pins.
    fn retire(&self, removed: &[Mapping]) -> u64 {
        if removed.is_empty() {
            return 0;
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.readers.wait_for_inflight();
        let observers = self.observers();
        for m in removed {
            for o in observers.iter().rev() {
                o.unmapped(m);
            }
        }
        if let [m] = removed {
            self.vm.account().unpin(&[(m.gpa.0, m.size)]);
        } else {
            let ranges: Vec<(u64, u64)> = removed.iter().map(|m| (m.gpa.0, m.size)).collect();
            self.vm.account().unpin(&ranges);
        }
        self.unmaps.fetch_add(1, Ordering::Relaxed);
        removed.iter().map(|m| m.size).sum()
    }

    /// Adds an observer; it is told about every existing mapping first. If it refuses
    /// one, it is told the accepted ones are gone and is not added.
    pub fn add_observer(&self, observer: Arc<dyn MapObserver>) -> Result<(), MapError> {
        let mut observers = self.observers.write().unwrap_or_else(|e| e.into_inner());
        let existing = self.mappings();
        for (i, m) in existing.iter().enumerate() {
            if let Err(reason) = observer.mapped(m) {
                for done in &existing[..i] {
                    observer.unmapped(done);
                }
                return Err(MapError::Rejected(reason));
            }
        }
        observers.push(observer);
        self.observed.store(observers.len(), Ordering::Release);
        Ok(())
    }

    /// A snapshot of the observers (no lock, no allocation when there are none).
    fn observers(&self) -> Vec<Arc<dyn MapObserver>> {
        if self.observed.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        self.observers.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Removes an observer; it is told every mapping is gone.
    pub fn remove_observer(&self, observer: &Arc<dyn MapObserver>) {
        let mut observers = self.observers.write().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = observers.iter().position(|o| Arc::ptr_eq(o, observer)) {
            let o = observers.remove(pos);
            self.observed.store(observers.len(), Ordering::Release);
            for m in self.mappings() {
                o.unmapped(&m);
            }
        }
    }

    /// The mapping covering `iova`, if any.
    pub fn lookup(&self, iova: Iova) -> Option<Mapping> {
        let tree = self.tree.read().unwrap_or_else(|e| e.into_inner());
        tree.range(..=iova.0).next_back().map(|(_, m)| *m).filter(|m| m.end() > iova.0)
    }

    /// All mappings, by IOVA.
    pub fn mappings(&self) -> Vec<Mapping> {
        self.tree.read().unwrap_or_else(|e| e.into_inner()).values().copied().collect()
    }

    /// Number of mappings.
    pub fn mapping_count(&self) -> usize {
        self.tree.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Page-table entries the mappings take with the domain's page sizes (large pages
    /// where alignment allows): what a hardware IOMMU would hold.
    pub fn page_entries(&self) -> u64 {
        let ps = self.config.page_sizes;
        self.tree
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|m| ps.count_pages(m.iova.0, m.gpa.0, m.size))
            .sum()
    }

    /// Successful map and unmap calls so far.
    pub fn counters(&self) -> (u64, u64) {
        (self.maps.load(Ordering::Relaxed), self.unmaps.load(Ordering::Relaxed))
    }

    /// Accessors (DMA spaces) attached.
    pub fn accessor_count(&self) -> usize {
        self.readers.count()
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        // Pins die with the domain: nothing can access it any more.
        let tree = std::mem::take(self.tree.get_mut().unwrap_or_else(|e| e.into_inner()));
        let ranges: Vec<(u64, u64)> = tree.values().map(|m| (m.gpa.0, m.size)).collect();
        self.vm.account().unpin(&ranges);
    }
}
