//! The guest's DMA-mapping API over paravirtual DMA (calls in `abi::pvdma`).
//!
//! Whether a device is behind paravirtual DMA is asked once per device and cached, as
//! the 2008 guest patch did. Failures come back as statuses: `NoIovaSpace`,
//! `OverLockedLimit` and `Busy` are transient (retry after unmapping something).

use crate::hcall::hcall;
use abi::hcall::Status;
use abi::pvdma::{self as pv, SgEntry};

/// Devices whose QUERY answer is cached.
pub const MAX_DEVICES: usize = 16;

/// The mapping API with its per-device QUERY cache.
pub struct DmaApi {
    cache: [u8; MAX_DEVICES],
    queries: u64,
}

impl Default for DmaApi {
    fn default() -> Self {
        Self::new()
    }
}

fn status(r: abi::hcall::Ret) -> Result<abi::hcall::Ret, Status> {
    if r.status == Status::Success { Ok(r) } else { Err(r.status) }
}

impl DmaApi {
    /// An empty cache.
    pub const fn new() -> DmaApi {
        DmaApi { cache: [0; MAX_DEVICES], queries: 0 }
    }

    /// True if `device` is assigned and behind paravirtual DMA (asked once, cached).
    pub fn is_paravirtual(&mut self, device: u64) -> bool {
        let slot = usize::try_from(device).ok().filter(|d| *d < MAX_DEVICES);
        if let Some(s) = slot
            && self.cache[s] != 0
        {
            return self.cache[s] == 2;
        }
        self.queries += 1;
        let yes = matches!(status(hcall(pv::QUERY, [device, 0, 0, 0, 0])), Ok(r) if r.r[0] == 1);
        if let Some(s) = slot {
            self.cache[s] = if yes { 2 } else { 1 };
        }
        yes
    }

    /// QUERY hypercalls made so far (the cache keeps this at one per device).
    pub fn queries(&self) -> u64 {
        self.queries
    }

    /// Maps `[gpa, gpa + len)` for `device` in direction `dir`; returns its IOVA.
    pub fn map(&self, device: u64, gpa: u64, len: u64, dir: u64) -> Result<u64, Status> {
        status(hcall(pv::MAP, [device, gpa, len, dir, 0])).map(|r| r.r[0])
    }

    /// Undoes one [`DmaApi::map`].
    pub fn unmap(&self, device: u64, iova: u64, len: u64) -> Result<(), Status> {
        status(hcall(pv::UNMAP, [device, iova, len, 0, 0])).map(|_| ())
    }

    /// Maps every entry in one exit; on success each entry's `addr` is its IOVA. The
    /// list must be in guest RAM (this runtime identity-maps it).
    pub fn map_sg(&self, device: u64, list: &mut [SgEntry], dir: u64) -> Result<(), Status> {
        let r = hcall(pv::MAP_SG, [device, list.as_mut_ptr() as u64, list.len() as u64, dir, 0]);
        // The VMM wrote the IOVAs into the list behind the compiler's back.
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
        status(r).map(|_| ())
    }

    /// Unmaps every entry (`addr` = IOVA) in one exit.
    pub fn unmap_sg(&self, device: u64, list: &[SgEntry]) -> Result<u64, Status> {
        status(hcall(pv::UNMAP_SG, [device, list.as_ptr() as u64, list.len() as u64, 0, 0])).map(|r| r.r[0])
    }
}
