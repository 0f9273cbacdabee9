//! What a domain holds and tells: mappings, and the observers told of every change.

use crate::addr::{Gpa, Iova, Perm};

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

/// Told about every change of a domain, in the domain's own order and in batches: how
/// a device process learns what it may touch (a vfio-user client turns these into
/// DMA_MAP / DMA_UNMAP). Calls are serialised by the domain's update lock, so an
/// observer sees exactly the domain's history: never an unmap before its map, never a
/// mapping twice, and (on registration) every mapping that exists.
pub trait MapObserver: Send + Sync {
    /// Mappings were made (one call per map or map_many). An error undoes the whole
    /// batch and fails the call; observers that accepted it are told it is gone.
    fn mapped(&self, maps: &[Mapping]) -> Result<(), String>;
    /// Mappings are gone from the domain and no in-process access touches them any
    /// more; return only when the observer's side has let go of them too (or can no
    /// longer reach them: a device that does not answer is cut off before this returns).
    fn unmapped(&self, maps: &[Mapping]);
}
