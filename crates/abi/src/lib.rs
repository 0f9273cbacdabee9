//! The contract between passthru and its guest programs, written once.
//!
//! Both sides compile this crate: the VMM (std) and the guest runtime (`no_std`,
//! built for a bare long-mode x86-64 guest). Everything a guest and the VMM must
//! agree on lives here: the guest-physical memory layout, I/O port numbers, the
//! hypercall register convention, call numbers and status codes.
#![no_std]

pub mod dma_engine;
pub mod hcall;
pub mod layout;
pub mod pci;
pub mod ports;
pub mod pvdma;
pub mod tce;
pub mod test_device;
pub mod viommu;
pub mod virtio;

/// Exit status a guest program reports through [`ports::EXIT`] when it panics
/// (the same code a panicking Rust process exits with).
pub const EXIT_PANIC: u8 = 101;

/// Exit status of a VM ended by the DMA misuse policy (`--dma-kill-on-misuse`).
pub const EXIT_KILLED_BY_POLICY: u8 = 125;

/// Exit status a guest program reports when an exception it did not expect
/// (page fault, general protection, ...) stops it.
pub const EXIT_EXCEPTION: u8 = 102;
