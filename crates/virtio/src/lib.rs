//! Virtio devices over PCI (virtio 1.x, modern) for passthru.
//!
//! - [`device`]: what a virtio device implements ([`VirtioDevice`]): its type,
//!   features, configuration, and the processing of its queues;
//! - [`transport`]: [`VirtioPci`], the PCI function that carries any such device:
//!   the vendor-specific capabilities (common, notify, ISR, device configuration) in
//!   one memory BAR with the MSI-X table and pending bits, feature negotiation and
//!   device status per the spec, split virtqueues (rust-vmm `virtio-queue`), queue
//!   notifications through ioeventfds (no exit) and interrupts through the VM's
//!   interrupt registry like any other source;
//! - [`interrupts`]: the MSI-X vectors as registry sources;
//! - [`worker`]: the thread that waits for notifications and runs the device's queues;
//! - [`driver`]: a driver in the VMM's own process (tests, replay, benchmarks) that
//!   reaches a function exactly as a guest's driver does.
#![warn(missing_docs)]

pub mod device;
pub mod driver;
pub mod interrupts;
pub mod transport;
pub mod worker;

pub use device::{QueueAccess, VirtioDevice};
pub use transport::{TransportState, VirtioPci};

#[cfg(test)]
mod tests {
    /// The guest contract's virtio constants (`abi::virtio`, which the guest runtime
    /// uses) are the spec's, as `virtio-bindings` has them.
    #[test]
    fn the_abi_constants_are_the_specs() {
        use virtio_bindings::virtio_config as c;
        let s = |v: u32| v as u8;
        assert_eq!(abi::virtio::status::ACKNOWLEDGE, s(c::VIRTIO_CONFIG_S_ACKNOWLEDGE));
        assert_eq!(abi::virtio::status::DRIVER, s(c::VIRTIO_CONFIG_S_DRIVER));
        assert_eq!(abi::virtio::status::DRIVER_OK, s(c::VIRTIO_CONFIG_S_DRIVER_OK));
        assert_eq!(abi::virtio::status::FEATURES_OK, s(c::VIRTIO_CONFIG_S_FEATURES_OK));
        assert_eq!(abi::virtio::status::NEEDS_RESET, s(c::VIRTIO_CONFIG_S_NEEDS_RESET));
        assert_eq!(abi::virtio::status::FAILED, s(c::VIRTIO_CONFIG_S_FAILED));
        assert_eq!(abi::virtio::F_VERSION_1, c::VIRTIO_F_VERSION_1);
        assert_eq!(u32::from(abi::viommu::DEVICE_TYPE), virtio_bindings::virtio_ids::VIRTIO_ID_IOMMU);
        assert_eq!(u32::from(abi::virtio::ring::DESC_F_NEXT), virtio_bindings::virtio_ring::VRING_DESC_F_NEXT);
        assert_eq!(u32::from(abi::virtio::ring::DESC_F_WRITE), virtio_bindings::virtio_ring::VRING_DESC_F_WRITE);
    }
}
