//! Devices of a passthru machine and the buses that route guest accesses to them.
//!
//! A device implements [`BusDevice`] and is inserted on the PIO or MMIO [`Bus`] of
//! the machine for an address range. The VMM's vCPU loop and the qtest driver port
//! dispatch through the same buses.
#![warn(missing_docs)]

pub mod dma_engine;
pub mod intx_test;
pub mod legacy;
pub mod memory_device;
pub mod process;
pub mod serial;
#[cfg(feature = "test-sources")]
pub mod test_irq;
pub mod test_irq_state;
pub mod vfio_pci;

pub use vm_api::bus::{Bus, BusDevice, BusError, SharedDevice};
