//! Translation domains: IOVA ranges mapped to guest-physical ranges with permissions.
//!
//! Map and unmap follow VFIO type1 v2, which users already rely on: addresses and sizes
//! aligned to the granule; zero size or no permission is invalid; any overlap with an
//! existing mapping is `Exists`; unmap may cover several whole mappings but never split
//! one; unmap reports the bytes it removed (zero when nothing was mapped).

use crate::addr::{Gpa, Iova, Perm};
use crate::error::MapError;
use crate::faults::{Fault, FaultHandler, FaultLog, FaultReports};
use crate::mapping::{MapObserver, Mapping};
use crate::pagesize::PageSizes;
use crate::store::Store;
use crate::tracked::Tracked;
use crate::vmdma::VmDma;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};

/// The x86 MSI window: device writes here are interrupts, never memory.
pub const MSI_WINDOW: Range<u64> = abi::layout::MSI_ADDR_BASE..abi::layout::MSI_ADDR_END;

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

/// A translation domain of one VM.
///
/// Locks: `ops` (the update lock) serialises every change and its notification to
/// observers, and may be held across an observer's I/O; `tree` is held only briefly
/// (device accessors take it for reading on an IOTLB miss, so it is never held across
/// I/O); `observers` is taken inside `ops`. Order: ops -> tree, ops -> observers.
pub struct Domain {
    name: String,
    config: DomainConfig,
    pub(crate) vm: Arc<VmDma>,
    ops: Mutex<()>,
    /// The mappings (runs of contiguous ones share an entry, see [`crate::store`]).
    tree: RwLock<Store>,
    /// The endpoints translating through this domain: an unmap invalidates each one
    /// (IOTLBs dropped, in-flight accesses waited for).
    endpoints: RwLock<Vec<Weak<dyn Tracked>>>,
    pub(crate) faults: FaultLog,
    reports: FaultReports,
    maps: AtomicU64,
    unmaps: AtomicU64,
    observers: RwLock<Vec<Arc<dyn MapObserver>>>,
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
            ops: Mutex::new(()),
            tree: RwLock::new(Store::default()),
            endpoints: RwLock::new(Vec::new()),
            faults: FaultLog::default(),
            reports: FaultReports::default(),
            maps: AtomicU64::new(0),
            unmaps: AtomicU64::new(0),
            observers: RwLock::new(Vec::new()),
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

    /// Sets (or with None clears) who is told of this domain's faults: its owner (a
    /// front-end). At most [`crate::FAULT_REPORTS_PER_SECOND`] reach it; the rest are
    /// only logged and counted ([`Domain::faults_unreported`]).
    pub fn on_fault(&self, handler: Option<Arc<dyn FaultHandler>>) {
        self.reports.set(handler);
    }

    /// Faults the rate limit kept from the handler.
    pub fn faults_unreported(&self) -> u64 {
        self.reports.unreported()
    }

    /// Logs a refused access and tells the handler.
    pub(crate) fn fault(&self, f: &Fault) {
        self.faults.record(f.clone());
        self.reports.report(f);
    }

    /// Takes the update lock (see the type's documentation).
    fn update(&self) -> MutexGuard<'_, ()> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tree_mut(&self) -> std::sync::RwLockWriteGuard<'_, Store> {
        self.tree.write().unwrap_or_else(|e| e.into_inner())
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
        self.check_map(iova, gpa, size, perm)?;
        let mapping = Mapping { iova, gpa, size, perm };
        self.publish(std::slice::from_ref(&mapping)).map_err(|(_, e)| e)
    }

    /// Maps several ranges at once, all or nothing: one lock, one locked-memory charge,
    /// one batch to observers. On failure returns the index of the mapping that failed
    /// (0 for a charge over the limit or a refusing observer) and nothing stays mapped.
    pub fn map_many(&self, maps: &[Mapping]) -> Result<(), (usize, MapError)> {
        self.check_batch(maps)?;
        self.publish(maps)
    }

    /// The first mapping of a batch that fails on its own, as checking each in turn
    /// would find it: its shape, then its guest memory (read for the batch under one
    /// reading of the map).
    fn check_batch(&self, maps: &[Mapping]) -> Result<(), (usize, MapError)> {
        let shape = maps
            .iter()
            .enumerate()
            .find_map(|(i, m)| self.check_shape(m.iova, m.gpa, m.size, m.perm).err().map(|e| (i, e)));
        let checked = shape.as_ref().map_or(maps.len(), |(i, _)| *i);
        if let Some(i) = self.vm.first_not_guest_memory(maps[..checked].iter().map(|m| (m.gpa.0, m.size)))
            && let Some(m) = maps.get(i)
        {
            return Err((i, MapError::BadAddress { gpa: m.gpa.0, size: m.size }));
        }
        shape.map_or(Ok(()), Err)
    }

    /// Inserts checked mappings, pins them and tells observers, all or nothing.
    fn publish(&self, maps: &[Mapping]) -> Result<(), (usize, MapError)> {
        if maps.is_empty() {
            return Ok(());
        }
        let _update = self.update();
        {
            let mut tree = self.tree_mut();
            self.insert_checked(&mut tree, maps)?;
            let pinned = if let [m] = maps { self.vm.pin(&[(m.gpa.0, m.size)]) } else { self.vm.pin(&ranges_of(maps)) };
            if let Err(e) = pinned {
                tree.remove(&iovas_of(maps));
                return Err((0, e));
            }
        }
        self.notify_mapped(maps).map_err(|e| (0, e))?;
        self.maps.fetch_add(maps.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Puts checked mappings in the tree if none overlaps a mapping there and they fit
    /// under the domain's limit; otherwise changes nothing and names the first that
    /// does not go in.
    fn insert_checked(&self, tree: &mut Store, maps: &[Mapping]) -> Result<(), (usize, MapError)> {
        let max = self.config.max_mappings;
        // A batch in IOVA order over a range nothing is mapped in (a TCE put after its
        // old entries left) needs one look at the tree, not one per mapping.
        let ordered = maps.windows(2).all(|w| w[0].end() <= w[1].iova.0);
        match maps {
            [] => Ok(()),
            [m] => match tree.insert_one(m, tree.len() >= max) {
                Ok(()) => Ok(()),
                Err(true) => Err((0, MapError::Exists { iova: m.iova })),
                Err(false) => Err((0, MapError::NoSpace { max })),
            },
            [first, .., last] if ordered && !tree.overlaps(first.iova.0, last.end()) => {
                let room = max.saturating_sub(tree.len());
                if maps.len() > room {
                    return Err((room, MapError::NoSpace { max }));
                }
                tree.insert(maps);
                Ok(())
            }
            _ => {
                for (i, m) in maps.iter().enumerate() {
                    let clash = tree.overlaps(m.iova.0, m.end());
                    if clash || tree.len() >= max {
                        tree.remove(&iovas_of(&maps[..i]));
                        let e = if clash { MapError::Exists { iova: m.iova } } else { MapError::NoSpace { max } };
                        return Err((i, e));
                    }
                    tree.insert(std::slice::from_ref(m));
                }
                Ok(())
            }
        }
    }

    /// Replaces the mappings starting at each of `old` (unknown IOVAs are skipped) by
    /// `new`, as one change: the new ones are checked as [`Domain::map_many`] checks
    /// them, beside what stays, and the pins the old ones release count toward the new
    /// ones (a TCE entry rewritten in place never needs room for both pages). A refusal
    /// (a new mapping that does not fit, the locked-memory limit) changes nothing, and
    /// devices never see the old mappings missing meanwhile. Only an observer refusing
    /// the new mappings, after the old ones left, leaves neither
    /// ([`ReplaceError::lost_old`]).
    pub fn replace(&self, old: &[Iova], new: &[Mapping]) -> Result<(), ReplaceError> {
        let refused = |(index, error): (usize, MapError)| ReplaceError { index, error, lost_old: false };
        if new.is_empty() {
            self.unmap_exact(old);
            return Ok(());
        }
        self.check_batch(new).map_err(refused)?;
        let _update = self.update();
        let removed = {
            // Under the tree's write lock throughout: an accessor missing its IOTLB
            // waits, and never finds an old mapping gone before a refusal puts it back.
            let mut tree = self.tree_mut();
            let removed = tree.remove(old);
            if let Err(e) = self.insert_checked(&mut tree, new) {
                tree.insert(&removed);
                return Err(refused(e));
            }
            if let Err(e) = self.vm.repin(&ranges_of(&removed), &ranges_of(new)) {
                tree.remove(&iovas_of(new));
                tree.insert(&removed);
                return Err(refused((0, e)));
            }
            removed
        };
        if !removed.is_empty() {
            self.invalidate_endpoints();
            let observers = self.observers.read().unwrap_or_else(|e| e.into_inner()).clone();
            for o in observers.iter().rev() {
                o.unmapped(&removed);
            }
            self.unmaps.fetch_add(1, Ordering::Relaxed);
        }
        self.notify_mapped(new).map_err(|error| ReplaceError { index: 0, error, lost_old: !removed.is_empty() })?;
        self.maps.fetch_add(new.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Tells observers about a batch of new mappings (update lock held); if one refuses,
    /// exactly this batch is undone (observers that took it told, tree cleared, IOTLBs
    /// invalidated, pins released) and the map fails.
    fn notify_mapped(&self, maps: &[Mapping]) -> Result<(), MapError> {
        let observers = self.observers.read().unwrap_or_else(|e| e.into_inner()).clone();
        for (oi, o) in observers.iter().enumerate() {
            if let Err(reason) = o.mapped(maps) {
                self.tree_mut().remove(&iovas_of(maps));
                self.invalidate_endpoints();
                for done in observers[..oi].iter().rev() {
                    done.unmapped(maps);
                }
                self.vm.unpin(&ranges_of(maps));
                return Err(MapError::Rejected(reason));
            }
        }
        Ok(())
    }

    /// Checks a map request on its own (alignment, permission, aperture, reserved
    /// regions, guest memory); returns the end IOVA.
    fn check_map(&self, iova: Iova, gpa: Gpa, size: u64, perm: Perm) -> Result<u64, MapError> {
        let end = self.check_shape(iova, gpa, size, perm)?;
        if !self.vm.is_guest_memory(gpa.0, size) {
            return Err(MapError::BadAddress { gpa: gpa.0, size });
        }
        Ok(end)
    }

    /// [`Domain::check_map`] but for guest memory.
    fn check_shape(&self, iova: Iova, gpa: Gpa, size: u64, perm: Perm) -> Result<u64, MapError> {
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
        Ok(end)
    }

    /// Removes the mappings inside `[iova, iova + size)`; returns the bytes removed.
    /// Refuses (changing nothing) if a mapping straddles either end. When it returns,
    /// no access to the removed range can succeed and none is still in flight.
    pub fn unmap(&self, iova: Iova, size: u64) -> Result<u64, MapError> {
        let end = self.check_range(iova.0, size)?;
        let _update = self.update();
        let removed = {
            let mut tree = self.tree_mut();
            // Fast path: the range is exactly one mapping (the common unmap).
            if let Some(m) = tree.remove_one(iova.0, Some(size)) {
                drop(tree);
                return Ok(self.retire(&[m]));
            }
            if tree.lookup(iova.0).is_some_and(|m| m.iova.0 < iova.0) {
                return Err(MapError::InvalidArgument("unmap would split a mapping"));
            }
            if tree.lookup(end - 1).is_some_and(|m| m.end() > end) {
                return Err(MapError::InvalidArgument("unmap would split a mapping"));
            }
            let starts: Vec<Iova> = tree.starting_in(iova.0, end).iter().map(|m| m.iova).collect();
            tree.remove(&starts)
        };
        Ok(self.retire(&removed))
    }

    /// Removes exactly the mappings starting at each of `iovas`, as one batch: one
    /// invalidation, one wait for in-flight accesses, one notification, one release of
    /// pins. Unknown IOVAs are skipped. Returns the bytes removed.
    pub fn unmap_exact(&self, iovas: &[Iova]) -> u64 {
        let _update = self.update();
        let removed = self.tree_mut().remove(iovas);
        self.retire(&removed)
    }

    /// Removes every mapping; returns the bytes removed.
    pub fn unmap_all(&self) -> u64 {
        let _update = self.update();
        let removed = self.tree_mut().take_all();
        self.retire(&removed)
    }

    /// After mappings left the tree (update lock held): invalidate IOTLBs, wait for
    /// in-flight accesses, tell observers (they let go), release the pins.
    fn retire(&self, removed: &[Mapping]) -> u64 {
        if removed.is_empty() {
            return 0;
        }
        self.invalidate_endpoints();
        let observers = self.observers.read().unwrap_or_else(|e| e.into_inner()).clone();
        for o in observers.iter().rev() {
            o.unmapped(removed);
        }
        if let [m] = removed {
            self.vm.unpin(&[(m.gpa.0, m.size)]);
        } else {
            self.vm.unpin(&ranges_of(removed));
        }
        self.unmaps.fetch_add(1, Ordering::Relaxed);
        removed.iter().map(|m| m.size).sum()
    }

    /// Adds an observer; it is told about every existing mapping first, as one batch.
    /// If it refuses, it is not added.
    pub fn add_observer(&self, observer: Arc<dyn MapObserver>) -> Result<(), MapError> {
        let _update = self.update();
        let existing = self.mappings();
        if !existing.is_empty() {
            observer.mapped(&existing).map_err(MapError::Rejected)?;
        }
        self.observers.write().unwrap_or_else(|e| e.into_inner()).push(observer);
        Ok(())
    }

    /// Removes an observer; it is told every mapping is gone.
    pub fn remove_observer(&self, observer: &Arc<dyn MapObserver>) {
        let _update = self.update();
        let removed = {
            let mut observers = self.observers.write().unwrap_or_else(|e| e.into_inner());
            observers.iter().position(|o| Arc::ptr_eq(o, observer)).map(|pos| observers.remove(pos))
        };
        if let Some(o) = removed {
            let all = self.mappings();
            if !all.is_empty() {
                o.unmapped(&all);
            }
        }
    }

    /// The mapping covering `iova`, if any.
    pub fn lookup(&self, iova: Iova) -> Option<Mapping> {
        self.tree.read().unwrap_or_else(|e| e.into_inner()).lookup(iova.0)
    }

    /// The mappings that start in `[start, end)`, by IOVA.
    pub fn mappings_in(&self, start: Iova, end: Iova) -> Vec<Mapping> {
        self.tree.read().unwrap_or_else(|e| e.into_inner()).starting_in(start.0, end.0)
    }

    /// Under one reading of the tree: appends to `out` the IOVAs of the mappings that
    /// start in `[start, last]` (inclusive; one reaching past `last` among them), and
    /// returns the mappings covering `start` and `last` that reach past the range
    /// (those a removal of it would split).
    pub fn whole_mappings_in(&self, start: Iova, last: Iova, out: &mut Vec<Iova>) -> [Option<Mapping>; 2] {
        let tree = self.tree.read().unwrap_or_else(|e| e.into_inner());
        let before = tree.lookup(start.0).filter(|m| m.iova.0 < start.0);
        let after = tree.lookup(last.0).filter(|m| m.end() - 1 > last.0);
        tree.iovas_starting_in(start.0, last.0.saturating_add(1), out);
        [before, after]
    }

    /// All mappings, by IOVA.
    pub fn mappings(&self) -> Vec<Mapping> {
        self.tree.read().unwrap_or_else(|e| e.into_inner()).iter().collect()
    }

    /// The first `max` mappings, by IOVA (the tree's lock held for those only).
    pub fn mappings_upto(&self, max: usize) -> Vec<Mapping> {
        self.tree.read().unwrap_or_else(|e| e.into_inner()).iter().take(max).collect()
    }

    /// Number of mappings.
    pub fn mapping_count(&self) -> usize {
        self.tree.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Entries the mappings take in the domain's tree: contiguous mappings of one size
    /// and permission share one (see the `store` module).
    pub fn stored_runs(&self) -> usize {
        self.tree.read().unwrap_or_else(|e| e.into_inner()).runs()
    }

    /// Page-table entries the mappings take with the domain's page sizes (large pages
    /// where alignment allows): what a hardware IOMMU would hold.
    pub fn page_entries(&self) -> u64 {
        let ps = self.config.page_sizes;
        self.tree
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|m| ps.count_pages(m.iova.0, m.gpa.0, m.size))
            .sum()
    }

    /// Successful map and unmap calls so far.
    pub fn counters(&self) -> (u64, u64) {
        (self.maps.load(Ordering::Relaxed), self.unmaps.load(Ordering::Relaxed))
    }

    /// Accessors (DMA spaces) of the endpoints attached.
    pub fn accessor_count(&self) -> usize {
        self.live_endpoints().iter().map(|e| e.accessors()).sum()
    }

    /// Endpoints attached now.
    pub fn endpoint_count(&self) -> usize {
        self.live_endpoints().len()
    }

    fn live_endpoints(&self) -> Vec<Arc<dyn Tracked>> {
        self.endpoints.read().unwrap_or_else(|e| e.into_inner()).iter().filter_map(Weak::upgrade).collect()
    }

    /// After mappings left the tree: every endpoint drops its IOTLBs and waits for the
    /// accesses it has in flight.
    fn invalidate_endpoints(&self) {
        for ep in self.live_endpoints() {
            ep.invalidate();
        }
    }

    pub(crate) fn attach_endpoint(&self, ep: Weak<dyn Tracked>) {
        let mut eps = self.endpoints.write().unwrap_or_else(|e| e.into_inner());
        eps.retain(|w| w.strong_count() > 0);
        eps.push(ep);
    }

    pub(crate) fn detach_endpoint(&self, ep: &Weak<dyn Tracked>) {
        let mut eps = self.endpoints.write().unwrap_or_else(|e| e.into_inner());
        eps.retain(|w| w.strong_count() > 0 && !Weak::ptr_eq(w, ep));
    }

    pub(crate) fn forget_dead_endpoints(&self) {
        self.endpoints.write().unwrap_or_else(|e| e.into_inner()).retain(|w| w.strong_count() > 0);
    }

    /// Runs `f` with the current mappings under the update lock: no map or unmap can
    /// happen meanwhile (endpoints register their observers this way).
    pub(crate) fn with_update<R>(&self, f: impl FnOnce(&[Mapping]) -> R) -> R {
        let _update = self.update();
        f(&self.mappings())
    }
}

/// The guest-physical ranges of `maps`.
fn ranges_of(maps: &[Mapping]) -> Vec<(u64, u64)> {
    maps.iter().map(|m| (m.gpa.0, m.size)).collect()
}

/// The first IOVAs of `maps`.
fn iovas_of(maps: &[Mapping]) -> Vec<Iova> {
    maps.iter().map(|m| m.iova).collect()
}

/// Why [`Domain::replace`] did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct ReplaceError {
    /// The new mapping that failed, as [`Domain::map_many`] reports it (0 for the
    /// locked-memory limit or an observer).
    pub index: usize,
    /// Why.
    pub error: MapError,
    /// The old mappings are gone and the new ones were not made (an observer refused
    /// them); otherwise nothing changed.
    pub lost_old: bool,
}

impl Drop for Domain {
    fn drop(&mut self) {
        // Pins die with the domain: nothing can access it any more.
        let all = self.tree.get_mut().unwrap_or_else(|e| e.into_inner()).take_all();
        let ranges: Vec<(u64, u64)> = all.iter().map(|m| (m.gpa.0, m.size)).collect();
        self.vm.unpin(&ranges);
    }
}

/// Domains are made by the VM's DMA state (here, beside the domain they build, so the
/// VM's state does not depend on the domain's file).
impl VmDma {
    /// A new, empty domain.
    pub fn create_domain(self: &Arc<Self>, name: &str, config: DomainConfig) -> Arc<Domain> {
        Arc::new(Domain::new(Arc::clone(self), name, config))
    }

    /// A domain mapping all guest RAM read-write at IOVA = guest-physical (for devices
    /// with no guest-visible IOMMU). Pins all of guest RAM: the locked-memory limit must
    /// cover it.
    pub fn identity_domain(self: &Arc<Self>, name: &str) -> Result<Arc<Domain>, MapError> {
        let d = self.create_domain(name, DomainConfig::default());
        let ram: Vec<(u64, u64)> = self.spans().into_iter().filter(|s| s.2).map(|s| (s.0, s.1)).collect();
        for (gpa, size) in ram {
            let (start, end) = (gpa, gpa + size);
            // Map around reserved windows that RAM may overlap.
            let mut pieces = vec![(start, end)];
            for res in &d.config().reserved {
                pieces = pieces
                    .into_iter()
                    .flat_map(|(s, e)| {
                        if res.end <= s || e <= res.start {
                            vec![(s, e)]
                        } else {
                            [(s, res.start.max(s)), (res.end.min(e), e)].into_iter().filter(|(a, b)| a < b).collect()
                        }
                    })
                    .collect();
            }
            for (s, e) in pieces {
                d.map(Iova(s), Gpa(s), e - s, Perm::READ_WRITE)?;
            }
        }
        Ok(d)
    }
}
