//! The DMA state of one VM: the guest memory devices can reach, its locked-memory
//! account and its dirty log, shared by all of its domains.
//!
//! Guest memory follows the VM's memory map: `VmDma` is a [`vm_api::MemoryListener`].
//! RAM added later and RAM-device regions (a device's mmapped BAR: peer-to-peer) become
//! reachable through domains that map their guest-physical addresses; the dirty log
//! grows over new RAM. When a region goes, every endpoint of the VM is invalidated
//! before the listener returns (cached translations dropped, in-flight accesses waited
//! for): no access reaches memory that has left the map.

use crate::account::LockedMemory;
use crate::dirty::DirtyLog;
use crate::error::MapError;
use crate::tracked::Tracked;
use std::sync::{Arc, Mutex, RwLock, Weak};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// A span of guest-physical memory and where the VMM maps it.
#[derive(Clone)]
struct Span {
    gpa: u64,
    size: u64,
    host: usize,
    /// RAM (pinned by domains, dirty-logged) or device memory.
    ram: bool,
    /// The region from the memory map (keeps its memory alive while reachable; its
    /// file for DMA_MAP).
    region: Option<vm_api::Region>,
}

/// One VM's guest memory, locked-memory account and dirty log.
pub struct VmDma {
    memory: Arc<GuestMemoryMmap>,
    /// Sorted by address, never overlapping.
    spans: RwLock<Vec<Span>>,
    account: LockedMemory,
    dirty: DirtyLog,
    /// Every endpoint of the VM (invalidated when memory leaves).
    endpoints: Mutex<Vec<Weak<dyn Tracked>>>,
    /// Device memory is reachable (some pins must skip it).
    has_device_memory: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for VmDma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let spans = self.spans.read().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("VmDma").field("spans", &spans.len()).field("account", &self.account).finish()
    }
}

impl VmDma {
    /// DMA state over `memory` (the guest RAM of the VM's start), charging `account`.
    /// Register it as a listener of the VM's memory map to follow later changes.
    pub fn new(memory: Arc<GuestMemoryMmap>, account: LockedMemory) -> Arc<VmDma> {
        let regions: Vec<(u64, u64)> = memory.iter().map(|r| (r.start_addr().0, r.len())).collect();
        let spans = memory
            .iter()
            .filter_map(|r| {
                let host = r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok()? as usize;
                Some(Span { gpa: r.start_addr().0, size: r.len(), host, ram: true, region: None })
            })
            .collect();
        Arc::new(VmDma {
            dirty: DirtyLog::new(&regions),
            memory,
            spans: RwLock::new(spans),
            account,
            endpoints: Mutex::new(Vec::new()),
            has_device_memory: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The parts of `ranges` that are not device memory: what a mapping pins. Device
    /// memory (a BAR) is not guest RAM: the device owns it, nothing can swap it out,
    /// and VFIO does not count it against the locked-memory limit either.
    fn pinnable(&self, ranges: &[(u64, u64)]) -> Option<Vec<(u64, u64)>> {
        if !self.has_device_memory.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let device: Vec<(u64, u64)> = {
            let spans = self.spans.read().unwrap_or_else(|e| e.into_inner());
            spans.iter().filter(|s| !s.ram).map(|s| (s.gpa, s.gpa + s.size)).collect()
        };
        let mut out = Vec::with_capacity(ranges.len());
        for &(gpa, size) in ranges {
            let end = gpa.saturating_add(size);
            // The common case: RAM only, kept whole without allocating.
            if !device.iter().any(|&(ds, de)| gpa < de && ds < end) {
                out.push((gpa, size));
                continue;
            }
            let mut pieces = vec![(gpa, end)];
            for &(ds, de) in &device {
                pieces = pieces
                    .into_iter()
                    .flat_map(|(s, e)| {
                        if de <= s || e <= ds {
                            vec![(s, e)]
                        } else {
                            [(s, ds.max(s)), (de.min(e), e)].into_iter().filter(|(a, b)| a < b).collect()
                        }
                    })
                    .collect();
            }
            out.extend(pieces.into_iter().map(|(s, e)| (s, e - s)));
        }
        Some(out)
    }

    /// Pins the guest RAM in `ranges` (device memory is skipped); all or nothing.
    pub(crate) fn pin(&self, ranges: &[(u64, u64)]) -> Result<(), MapError> {
        // Contiguous pages (a TCE batch) become one range before anything looks at them.
        if !self.has_device_memory.load(std::sync::atomic::Ordering::Acquire) {
            return self.account.pin(ranges);
        }
        let ranges = crate::account::coalesce(ranges);
        match self.pinnable(&ranges) {
            None => self.account.pin(&ranges),
            Some(r) => self.account.pin(&r),
        }
    }

    /// Releases what [`VmDma::pin`] pinned for `unpin` and pins `pin`, as one step
    /// ([`LockedMemory::repin`]).
    pub(crate) fn repin(&self, unpin: &[(u64, u64)], pin: &[(u64, u64)]) -> Result<(), MapError> {
        if !self.has_device_memory.load(std::sync::atomic::Ordering::Acquire) {
            return self.account.repin(unpin, pin);
        }
        let (unpin, pin) = (crate::account::coalesce(unpin), crate::account::coalesce(pin));
        let (u, p) = (self.pinnable(&unpin), self.pinnable(&pin));
        self.account.repin(u.as_deref().unwrap_or(&unpin), p.as_deref().unwrap_or(&pin))
    }

    /// Releases what [`VmDma::pin`] pinned for `ranges`.
    pub(crate) fn unpin(&self, ranges: &[(u64, u64)]) {
        if !self.has_device_memory.load(std::sync::atomic::Ordering::Acquire) {
            return self.account.unpin(ranges);
        }
        let ranges = crate::account::coalesce(ranges);
        match self.pinnable(&ranges) {
            None => self.account.unpin(&ranges),
            Some(r) => self.account.unpin(&r),
        }
    }

    /// Faults recorded so far through the endpoints that exist now (refused device
    /// accesses, all devices of the VM).
    pub fn faults_total(&self) -> u64 {
        let eps = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        eps.iter().filter_map(Weak::upgrade).map(|e| e.faults_total()).sum()
    }

    /// Remembers an endpoint (it is invalidated when memory leaves the map).
    pub(crate) fn register_endpoint(&self, ep: Weak<dyn Tracked>) {
        let mut eps = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        eps.retain(|w| w.strong_count() > 0);
        eps.push(ep);
    }

    /// Drops every endpoint's cached translations and waits for their in-flight
    /// accesses.
    fn invalidate_endpoints(&self) {
        let eps: Vec<Arc<dyn Tracked>> =
            self.endpoints.lock().unwrap_or_else(|e| e.into_inner()).iter().filter_map(Weak::upgrade).collect();
        for ep in eps {
            ep.invalidate();
        }
    }

    /// The file behind guest-physical `gpa` (for a device process to map it): the file,
    /// the offset of `gpa` in it, and the bytes of its region from `gpa` on. Resolved
    /// from this table, so it can be asked from inside a memory-map listener.
    pub fn backing_of(&self, gpa: u64) -> Option<(Arc<std::fs::File>, u64, u64)> {
        let spans = self.spans.read().unwrap_or_else(|e| e.into_inner());
        let s = span_at(&spans, gpa)?;
        let b = s.region.as_ref()?.backing.as_ref()?;
        Some((Arc::clone(&b.fd), b.offset + (gpa - s.gpa), s.gpa + s.size - gpa))
    }

    /// The guest-physical spans devices can reach now: (start, size, is RAM).
    pub fn spans(&self) -> Vec<(u64, u64, bool)> {
        self.spans.read().unwrap_or_else(|e| e.into_inner()).iter().map(|s| (s.gpa, s.size, s.ram)).collect()
    }

    /// Guest memory.
    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.memory
    }

    /// The locked-memory account.
    pub fn account(&self) -> &LockedMemory {
        &self.account
    }

    /// Pages written by devices.
    pub fn dirty(&self) -> &DirtyLog {
        &self.dirty
    }

    /// True if every byte of `[gpa, gpa + len)` is guest memory.
    pub fn is_guest_memory(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        let spans = self.spans.read().unwrap_or_else(|e| e.into_inner());
        covered(&spans, gpa, end)
    }

    /// The index of the first of `ranges` (guest-physical start, length) that is not
    /// all guest memory, if any: [`VmDma::is_guest_memory`] for a batch, under one
    /// reading of the memory map.
    pub fn first_not_guest_memory(&self, ranges: impl IntoIterator<Item = (u64, u64)>) -> Option<usize> {
        let spans = self.spans.read().unwrap_or_else(|e| e.into_inner());
        // Consecutive pages mostly fall in the span the previous one did.
        let mut last: Option<&Span> = None;
        ranges.into_iter().position(|(gpa, len)| {
            let Some(end) = gpa.checked_add(len) else { return true };
            if let Some(s) = last
                && gpa >= s.gpa
                && end <= s.gpa + s.size
            {
                return false;
            }
            last = span_at(&spans, gpa).filter(|s| end - s.gpa <= s.size);
            last.is_none() && !covered(&spans, gpa, end)
        })
    }

    /// Host address of `gpa` and the guest-physical bounds of its host-contiguous
    /// region.
    pub(crate) fn host_span(&self, gpa: u64) -> Option<(usize, u64, u64)> {
        let spans = self.spans.read().unwrap_or_else(|e| e.into_inner());
        let s = span_at(&spans, gpa)?;
        Some((s.host + (gpa - s.gpa) as usize, s.gpa, s.gpa + s.size))
    }
}

impl vm_api::MemoryListener for VmDma {
    fn name(&self) -> &str {
        "dma"
    }

    fn region_added(&self, region: &vm_api::Region) -> Result<(), String> {
        let ram = matches!(region.kind, vm_api::RegionKind::Ram);
        let span = Span {
            gpa: region.gpa,
            size: region.size,
            host: region.host() as usize,
            ram,
            region: Some(region.clone()),
        };
        let mut spans = self.spans.write().unwrap_or_else(|e| e.into_inner());
        // The RAM given at start comes back in the map's replay: the same span.
        spans.retain(|s| !(s.gpa == span.gpa && s.size == span.size));
        if spans.iter().any(|s| span.gpa < s.gpa + s.size && s.gpa < span.gpa + span.size) {
            return Err(format!("{:#x}+{:#x} overlaps memory devices already reach", span.gpa, span.size));
        }
        let at = spans.partition_point(|s| s.gpa < span.gpa);
        spans.insert(at, span);
        drop(spans);
        if !ram {
            self.has_device_memory.store(true, std::sync::atomic::Ordering::Release);
        }
        if ram {
            self.dirty.add_range(region.gpa, region.size);
        }
        Ok(())
    }

    fn region_removed(&self, region: &vm_api::Region) {
        let mut spans = self.spans.write().unwrap_or_else(|e| e.into_inner());
        let before = spans.len();
        spans.retain(|s| !(s.gpa == region.gpa && s.size == region.size));
        let removed = spans.len() != before;
        drop(spans);
        if removed {
            // Nobody may still be reading or writing the memory when the map lets go.
            self.invalidate_endpoints();
        }
    }
}

/// The span of the sorted, disjoint `spans` holding `gpa`.
fn span_at(spans: &[Span], gpa: u64) -> Option<&Span> {
    let i = spans.partition_point(|s| s.gpa <= gpa).checked_sub(1)?;
    spans.get(i).filter(|s| gpa - s.gpa < s.size)
}

/// True if the sorted, disjoint `spans` cover every byte of `[gpa, end)`.
fn covered(spans: &[Span], gpa: u64, end: u64) -> bool {
    let mut at = gpa;
    while at < end {
        match span_at(spans, at) {
            Some(s) => at = s.gpa + s.size,
            None => return false,
        }
    }
    true
}
