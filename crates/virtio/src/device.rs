//! What a virtio device implements, whatever carries it.

use std::sync::Arc;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

/// A virtio device: its identity, features and configuration, and the work its
/// queues carry. The transport negotiates features, keeps the queues and the
/// interrupts, and calls [`VirtioDevice::process`] on the worker thread whenever a
/// queue may have work.
pub trait VirtioDevice: Send + Sync + 'static {
    /// Its virtio device type (23: IOMMU).
    fn device_type(&self) -> u16;

    /// The features it offers (the transport adds VERSION_1).
    fn features(&self) -> u64;

    /// Each queue's largest size.
    fn queue_sizes(&self) -> &'static [u16];

    /// A read of its configuration at `offset` (bytes past its end read as zero).
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// A write of its configuration (the device decides what the driver may write).
    fn write_config(&self, offset: u64, data: &[u8]);

    /// The driver accepted `features` (FEATURES_OK): false refuses the combination
    /// (the transport then leaves FEATURES_OK clear).
    fn accept_features(&self, _features: u64) -> bool {
        true
    }

    /// The driver set DRIVER_OK: its queues are live.
    fn activate(&self, _features: u64) {}

    /// The driver reset the device (status 0): forget what a driver set up.
    fn reset(&self);

    /// Whether queue `index` runs on the thread that notifies it (the guest's write
    /// exits to the VMM, and the vCPU answers before it returns) rather than on the
    /// worker thread woken by an ioeventfd. For requests a driver waits for
    /// synchronously, one exit costs less than waking another thread.
    fn runs_on_notify(&self, _index: u16) -> bool {
        false
    }

    /// Queue `index` may have work: take what is available and return it used.
    fn process(&self, index: u16, q: &mut QueueAccess<'_>);
}

/// A queue as a device processes it: its chains in guest memory, and the used ring.
/// Whatever is used is signalled to the driver once processing returns (if the
/// driver asked to be told).
pub struct QueueAccess<'a> {
    pub(crate) queue: &'a mut Queue,
    pub(crate) memory: &'a Arc<GuestMemoryMmap>,
    pub(crate) used: u32,
    pub(crate) failed: bool,
}

impl<'a> QueueAccess<'a> {
    /// A queue to process (for a driver of the device outside a VM: tests, benches).
    pub fn new(queue: &'a mut Queue, memory: &'a Arc<GuestMemoryMmap>) -> QueueAccess<'a> {
        QueueAccess { queue, memory, used: 0, failed: false }
    }

    /// Guest memory (the device's own DMA: a virtio-iommu is not translated by itself).
    pub fn memory(&self) -> &'a GuestMemoryMmap {
        self.memory
    }

    /// The next available chain, if any (a malformed ring stops the queue: the
    /// transport then asks the driver to reset the device).
    pub fn pop(&mut self) -> Option<DescriptorChain<&'a GuestMemoryMmap>> {
        if self.failed {
            return None;
        }
        // The chain refers to guest memory for the access's lifetime; the queue is
        // not borrowed past this call.
        let mem: &'a GuestMemoryMmap = self.memory;
        match self.queue.iter(mem) {
            Ok(mut it) => it.next(),
            Err(e) => {
                tracing::warn!("virtio: a malformed available ring: {e}");
                self.failed = true;
                None
            }
        }
    }

    /// Returns chain `head` to the driver with `len` bytes written.
    pub fn add_used(&mut self, head: u16, len: u32) {
        if let Err(e) = self.queue.add_used(self.memory.as_ref(), head, len) {
            tracing::warn!("virtio: returning a buffer: {e}");
            self.failed = true;
            return;
        }
        self.used += 1;
    }

    /// Chains returned so far.
    pub fn used(&self) -> u32 {
        self.used
    }
}
