//! The services a passthru VM offers to its devices and DMA front-ends, below `vmm`:
//! front-ends and devices depend on this crate, never on `vmm`.
//!
//! - [`bus`]: port I/O and MMIO buses of address ranges;
//! - [`component`]: what pauses and saves itself, and the sections a snapshot holds;
//! - [`hypercall`]: blocks of hypercall numbers and the registry that dispatches them;
//! - [`memory`]: the guest memory map (RAM and RAM-device regions) and its listeners;
//! - [`io`]: ioeventfd registration.
#![warn(missing_docs)]

pub mod bus;
pub mod component;
pub mod hypercall;
pub mod io;
pub mod memory;

pub use bus::{Bus, BusDevice, BusError, SharedDevice};
pub use component::{ComponentError, Pausable, Section, Snapshottable};
pub use hypercall::{BlockError, HypercallHandler, HypercallRegistry};
pub use io::{IoAddr, IoEvents, NoIoEvents};
pub use memory::{Backing, MemoryListener, MemoryMap, Region, RegionFlags, RegionKind};
