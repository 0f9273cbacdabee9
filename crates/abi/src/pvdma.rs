//! Paravirtual DMA: the guest maps its own DMA through hypercalls (block [`BASE`]).
//!
//! The guest asks once per device whether it is assigned and behind paravirtual DMA
//! ([`QUERY`], the answer is worth caching), maps buffers before the device may touch
//! them ([`MAP`], [`MAP_SG`]: one exit for up to [`MAX_SG`] buffers) and unmaps them
//! afterwards ([`UNMAP`], [`UNMAP_SG`]). Every call returns a
//! [`Status`](crate::hcall::Status); `NoIovaSpace`, `OverLockedLimit` and `Busy` are
//! transient: retry after unmapping, or quiesce the device.

/// First call number of the block.
pub const BASE: u64 = 0x100;
/// `QUERY(device)`: result 0 = 1 if the device is assigned and behind paravirtual DMA
/// (0 otherwise, status success), result 1 = the mapping granule, result 2 = [`MAX_SG`].
pub const QUERY: u64 = BASE;
/// `MAP(device, gpa, len, direction)`: result 0 = the IOVA of `gpa`. Pins and accounts
/// the pages covering `[gpa, gpa + len)`.
pub const MAP: u64 = BASE + 1;
/// `MAP_SG(device, list, count, direction)`: maps each [`SgEntry`] of the list at
/// guest-physical `list`; on success every entry's `addr` holds its IOVA. All or
/// nothing: on failure nothing stays mapped. Result 0 = count.
pub const MAP_SG: u64 = BASE + 2;
/// `UNMAP(device, iova, len)`: undoes one MAP (same IOVA and length). Nothing mapped
/// at `iova` (never, or already unmapped) answers `NotFound`; a mapping there with
/// another extent answers `InvalidArgument`.
pub const UNMAP: u64 = BASE + 3;
/// `UNMAP_SG(device, list, count)`: undoes each entry (`addr` = IOVA). Result 0 =
/// entries unmapped. A malformed entry makes the status `InvalidArgument`, else an
/// entry naming nothing mapped makes it `NotFound`; the good entries are unmapped all
/// the same.
pub const UNMAP_SG: u64 = BASE + 4;

/// Most entries of one MAP_SG / UNMAP_SG.
pub const MAX_SG: u64 = 512;
/// Longest buffer one MAP or one SG entry may cover.
pub const MAX_MAP_LEN: u64 = 1 << 30;

/// Directions (what the device does with the buffer).
pub mod dir {
    /// The device reads it (memory -> device).
    pub const TO_DEVICE: u64 = 1;
    /// The device writes it (device -> memory).
    pub const FROM_DEVICE: u64 = 2;
    /// Both.
    pub const BIDIRECTIONAL: u64 = 3;
}

/// One scatter-gather entry (16 bytes, little-endian, in guest memory).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SgEntry {
    /// In: guest-physical address; out (after MAP_SG): its IOVA.
    pub addr: u64,
    /// Bytes.
    pub len: u64,
}

/// Size of an [`SgEntry`].
pub const SG_ENTRY_SIZE: u64 = 16;
