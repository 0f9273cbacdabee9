//! The DMA remapping core: every device access to guest memory goes through it.
//!
//! A [`Domain`] maps IOVA ranges to guest-physical ranges with permissions, following
//! VFIO type1 v2 semantics. Pinned guest pages are charged once to the VM's
//! [`LockedMemory`] account however many domains map them. A device reaches memory only
//! through a [`DmaSpace`]: `read`, `write` and `translate` check every byte against
//! the domain, record faults in the domain's [`FaultLog`], mark written pages in the
//! VM's [`DirtyLog`], and keep a per-accessor IOTLB. When `unmap` returns, no access
//! to the range can still succeed and none that began before is still touching it.
//!
//! No KVM and no threads of its own: the VMM and device processes drive it.
#![warn(missing_docs)]

mod account;
mod addr;
pub mod bench;
mod dirty;
mod domain;
mod endpoint;
mod error;
mod faults;
mod mapping;
mod pagesize;
mod readers;
mod space;
mod store;
mod tracked;
mod vmdma;

pub use account::LockedMemory;
pub use addr::{Access, Gpa, Iova, Perm};
pub use dirty::{DirtyLog, pages_of_bits};
pub use domain::{Domain, DomainConfig, MSI_WINDOW, ReplaceError};
pub use endpoint::Endpoint;
pub use error::{FaultReason, MapError};
pub use faults::{FAULT_REPORTS_PER_SECOND, Fault, FaultHandler, FaultLog};
pub use mapping::{MapObserver, Mapping};
pub use pagesize::PageSizes;
pub use space::{Batch, DmaSpace, MAX_SECTION_BYTES, Translation};
pub use vmdma::VmDma;
