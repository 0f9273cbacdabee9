//! Shared test fixtures: guest memory in two host mappings that are adjacent in
//! guest-physical space (so one mapping can span two host-contiguous pieces).
#![allow(dead_code, clippy::unwrap_used)]

use dma::{LockedMemory, VmDma};
use std::sync::Arc;
use vm_memory::{GuestAddress, GuestMemoryMmap};

pub const MIB: u64 = 1 << 20;
pub const PAGE: u64 = 4096;

/// 32 MiB of guest memory: [0, 16 MiB) and [16 MiB, 32 MiB) in separate host mappings.
pub fn vm(limit: u64) -> Arc<VmDma> {
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20), (GuestAddress(16 << 20), 16 << 20)]).unwrap();
    VmDma::new(Arc::new(mem), LockedMemory::new(limit))
}
