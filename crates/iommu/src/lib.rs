//! Front-ends that program DMA domains on the guest's behalf.
//!
//! - [`pvdma`]: paravirtual DMA, the guest maps its own DMA through hypercalls.
//! - [`iova`]: the IOVA allocator those mappings take their addresses from.
#![warn(missing_docs)]

pub mod iova;
pub mod pvdma;
