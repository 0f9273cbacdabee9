//! Front-ends that program DMA domains on the guest's behalf.
//!
//! - [`frontend`]: the seam every front-end plugs into, and the registry by name;
//! - [`identity`]: no guest-visible IOMMU, IOVA = guest-physical;
//! - [`pvdma`]: paravirtual DMA, the guest maps its own DMA through hypercalls;
//! - [`tce`]: PAPR TCE tables: per-group DMA windows, multi-level, shared tables;
//! - [`iova`]: the IOVA allocator those mappings take their addresses from.
#![warn(missing_docs)]

pub mod frontend;
pub mod identity;
pub mod iova;
pub mod pvdma;
pub mod tce;

pub use frontend::{Context, Device, FailDevice, Frontend, Frontends, Registration};
