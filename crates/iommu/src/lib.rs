//! Front-ends that program DMA domains on the guest's behalf.
//!
//! - [`frontend`]: the seam every front-end plugs into (typed statistics, errors,
//!   state and queries);
//! - [`registry`]: front-ends by name, and the ones a VM has built;
//! - [`identity`]: no guest-visible IOMMU, IOVA = guest-physical;
//! - [`pvdma`]: paravirtual DMA, the guest maps its own DMA through hypercalls;
//! - [`tce`]: PAPR TCE tables: per-group DMA windows, multi-level, shared tables;
//! - [`viommu`]: virtio-iommu, the paravirtual IOMMU device a stock guest's driver
//!   programs;
//! - [`iova`]: the IOVA allocator those mappings take their addresses from.
#![warn(missing_docs)]

pub mod frontend;
pub mod identity;
pub mod iova;
pub mod pvdma;
pub mod registry;
pub mod tce;
pub mod viommu;

pub use frontend::{Answer, Context, Device, FailDevice, Frontend, FrontendError, Queries, Query, StatValue, Stats};
pub use frontend::{Registration, Tool};
pub use registry::Frontends;
