//! The DMA state of one VM: its guest memory, its locked-memory account and its dirty
//! log, shared by all of its domains.

use crate::account::LockedMemory;
use crate::addr::{Gpa, Iova, Perm};
use crate::dirty::DirtyLog;
use crate::domain::{Domain, DomainConfig};
use crate::error::MapError;
use std::sync::Arc;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// One VM's guest memory, locked-memory account and dirty log.
#[derive(Debug)]
pub struct VmDma {
    memory: Arc<GuestMemoryMmap>,
    account: LockedMemory,
    dirty: DirtyLog,
}

impl VmDma {
    /// DMA state over `memory`, charging `account`.
    pub fn new(memory: Arc<GuestMemoryMmap>, account: LockedMemory) -> Arc<VmDma> {
        let regions: Vec<(u64, u64)> = memory.iter().map(|r| (r.start_addr().0, r.len())).collect();
        Arc::new(VmDma { dirty: DirtyLog::new(&regions), memory, account })
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

    /// A new, empty domain.
    pub fn create_domain(self: &Arc<Self>, name: &str, config: DomainConfig) -> Arc<Domain> {
        Arc::new(Domain::new(Arc::clone(self), name, config))
    }

    /// A domain mapping all guest RAM read-write at IOVA = guest-physical (for devices
    /// with no guest-visible IOMMU). Pins all of guest RAM: the locked-memory limit must
    /// cover it.
    pub fn identity_domain(self: &Arc<Self>, name: &str) -> Result<Arc<Domain>, MapError> {
        let d = self.create_domain(name, DomainConfig::default());
        for r in self.memory.iter() {
            let (start, end) = (r.start_addr().0, r.start_addr().0 + r.len());
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

    /// True if every byte of `[gpa, gpa + len)` is guest memory.
    pub fn is_guest_memory(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        let mut at = gpa;
        while at < end {
            match self.memory.find_region(GuestAddress(at)) {
                Some(r) => at = r.start_addr().0 + r.len(),
                None => return false,
            }
        }
        true
    }

    /// Host address of `gpa` and the guest-physical bounds of its host-contiguous
    /// region.
    pub(crate) fn host_span(&self, gpa: u64) -> Option<(usize, u64, u64)> {
        let r = self.memory.find_region(GuestAddress(gpa))?;
        let off = gpa - r.start_addr().0;
        let host = r.get_host_address(vm_memory::MemoryRegionAddress(off)).ok()?;
        Some((host as usize, r.start_addr().0, r.start_addr().0 + r.len()))
    }
}
