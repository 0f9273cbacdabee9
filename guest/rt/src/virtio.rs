//! A modern virtio-pci driver (virtio 1.x, layout in `abi::virtio`): the structures
//! found through the vendor capabilities, reset, feature negotiation, split
//! virtqueues in guest memory, notifications, used buffers polled.

use crate::mmio::{read8, read16, read32, write8, write16, write32};
use crate::pci::Function;
use abi::pci::command;
use abi::virtio::{cap, common, ring, status};
use core::sync::atomic::{Ordering, compiler_fence};

/// Polls of a status or used ring before a wait gives up.
const SPIN_BUDGET: u64 = 20_000_000;

/// A virtio function.
pub struct VirtioPci {
    common: u64,
    isr: u64,
    device: u64,
    notify: u64,
    multiplier: u32,
}

/// A split virtqueue this driver owns.
pub struct Queue {
    /// Its index.
    pub index: u16,
    /// Its size.
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    notify: u64,
    avail_idx: u16,
    last_used: u16,
}

/// Bytes a queue of `size` takes (descriptors, available ring, used ring 4-aligned).
pub const fn ring_bytes(size: u16) -> u64 {
    let n = size as u64;
    let used_at = (n * ring::DESC_SIZE + 6 + 2 * n + 3) & !3;
    used_at + 6 + 8 * n
}

impl VirtioPci {
    /// Drives `f`: memory decoding and bus mastering on, its structures located.
    /// None if it lacks one of them.
    pub fn new(f: Function) -> Option<VirtioPci> {
        f.enable(command::MEMORY | command::MASTER);
        let (mut common_at, mut isr, mut device, mut notify, mut multiplier) = (None, None, None, None, 0);
        let mut at = u16::from(f.read8(abi::pci::reg::CAPABILITIES) & !3);
        let mut hops = 0;
        while at >= 0x40 && hops < 48 {
            if f.read8(at) == cap::ID {
                let base = f.bar(f.read8(at + cap::BAR))?;
                let addr = base + u64::from(f.read32(at + cap::OFFSET));
                match f.read8(at + cap::CFG_TYPE) {
                    cap::COMMON => common_at = Some(addr),
                    cap::ISR => isr = Some(addr),
                    cap::DEVICE => device = Some(addr),
                    cap::NOTIFY => {
                        notify = Some(addr);
                        multiplier = f.read32(at + cap::NOTIFY_MULTIPLIER);
                    }
                    _ => {}
                }
            }
            at = u16::from(f.read8(at + 1) & !3);
            hops += 1;
        }
        Some(VirtioPci { common: common_at?, isr: isr?, device: device?, notify: notify?, multiplier })
    }

    fn r16(&self, off: u64) -> u16 {
        // SAFETY: the common configuration structure in the function's BAR.
        unsafe { read16(self.common + off) }
    }

    fn r32(&self, off: u64) -> u32 {
        // SAFETY: as above.
        unsafe { read32(self.common + off) }
    }

    fn w16(&self, off: u64, v: u16) {
        // SAFETY: as above.
        unsafe { write16(self.common + off, v) }
    }

    fn w32(&self, off: u64, v: u32) {
        // SAFETY: as above.
        unsafe { write32(self.common + off, v) }
    }

    fn w64(&self, off: u64, v: u64) {
        self.w32(off, v as u32);
        self.w32(off + 4, (v >> 32) as u32);
    }

    /// The device status.
    pub fn status(&self) -> u8 {
        // SAFETY: as above.
        unsafe { read8(self.common + common::DEVICE_STATUS) }
    }

    /// Writes the device status.
    pub fn set_status(&self, s: u8) {
        // SAFETY: as above.
        unsafe { write8(self.common + common::DEVICE_STATUS, s) }
    }

    /// Resets the device and waits until the status reads 0.
    pub fn reset(&self) -> bool {
        self.set_status(0);
        (0..SPIN_BUDGET).any(|_| self.status() == 0)
    }

    /// Reset, ACKNOWLEDGE, DRIVER, the features of `want` the device offers,
    /// FEATURES_OK. Returns the features, or None if the device refused them.
    pub fn negotiate(&self, want: u64) -> Option<u64> {
        if !self.reset() {
            return None;
        }
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        self.w32(common::DEVICE_FEATURE_SELECT, 0);
        let lo = self.r32(common::DEVICE_FEATURE);
        self.w32(common::DEVICE_FEATURE_SELECT, 1);
        let hi = self.r32(common::DEVICE_FEATURE);
        let f = ((u64::from(hi) << 32) | u64::from(lo)) & want;
        self.w32(common::DRIVER_FEATURE_SELECT, 0);
        self.w32(common::DRIVER_FEATURE, f as u32);
        self.w32(common::DRIVER_FEATURE_SELECT, 1);
        self.w32(common::DRIVER_FEATURE, (f >> 32) as u32);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        (self.status() & status::FEATURES_OK != 0).then_some(f)
    }

    /// Sets up queue `index` with `size` entries at `base` (zeroed here), no MSI-X
    /// vector (this driver polls), enabled.
    pub fn queue(&self, index: u16, size: u16, base: u64) -> Option<Queue> {
        self.w16(common::QUEUE_SELECT, index);
        let max = self.r16(common::QUEUE_SIZE);
        if max == 0 || size > max || !size.is_power_of_two() {
            return None;
        }
        // SAFETY: guest RAM the caller gives this queue.
        unsafe { core::ptr::write_bytes(base as *mut u8, 0, ring_bytes(size) as usize) };
        let desc = base;
        let avail = desc + u64::from(size) * ring::DESC_SIZE;
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        self.w16(common::QUEUE_SIZE, size);
        self.w64(common::QUEUE_DESC, desc);
        self.w64(common::QUEUE_DRIVER, avail);
        self.w64(common::QUEUE_DEVICE, used);
        self.w16(common::QUEUE_MSIX_VECTOR, abi::virtio::NO_VECTOR);
        self.w16(common::QUEUE_ENABLE, 1);
        let off = u64::from(self.r16(common::QUEUE_NOTIFY_OFF));
        let notify = self.notify + off * u64::from(self.multiplier);
        Some(Queue { index, size, desc, avail, used, notify, avail_idx: 0, last_used: 0 })
    }

    /// DRIVER_OK.
    pub fn driver_ok(&self) {
        self.set_status(self.status() | status::DRIVER_OK);
    }

    /// A 32-bit read of the device configuration.
    pub fn config32(&self, off: u64) -> u32 {
        // SAFETY: the device configuration structure in the function's BAR.
        unsafe { read32(self.device + off) }
    }

    /// A 64-bit read of the device configuration (two halves).
    pub fn config64(&self, off: u64) -> u64 {
        u64::from(self.config32(off)) | (u64::from(self.config32(off + 4)) << 32)
    }

    /// A byte write of the device configuration.
    pub fn config_write8(&self, off: u64, v: u8) {
        // SAFETY: as above.
        unsafe { write8(self.device + off, v) }
    }

    /// Reads and clears the ISR status.
    pub fn isr(&self) -> u8 {
        // SAFETY: the ISR status in the function's BAR.
        unsafe { read8(self.isr) }
    }
}

impl Queue {
    /// Writes descriptor `i`.
    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc + u64::from(i) * ring::DESC_SIZE;
        // SAFETY: the descriptor table this queue owns.
        unsafe {
            crate::mmio::write64(at, addr);
            write32(at + 8, len);
            write16(at + 12, flags);
            write16(at + 14, next);
        }
    }

    /// Makes chain `head` available (visible at [`Queue::publish`]).
    fn offer(&mut self, head: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        // SAFETY: the available ring this queue owns.
        unsafe { write16(at, head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// A request in slot `slot` (descriptors 2·slot, 2·slot+1): `readable` bytes the
    /// device reads, then `writable` bytes it writes.
    pub fn push_request(&mut self, slot: u16, readable: (u64, u32), writable: (u64, u32)) {
        let d = 2 * slot;
        self.desc(d, readable.0, readable.1, ring::DESC_F_NEXT, d + 1);
        self.desc(d + 1, writable.0, writable.1, ring::DESC_F_WRITE, 0);
        self.offer(d);
    }

    /// A device-writable buffer alone, in descriptor `i`.
    pub fn push_writable(&mut self, i: u16, addr: u64, len: u32) {
        self.desc(i, addr, len, ring::DESC_F_WRITE, 0);
        self.offer(i);
    }

    /// Makes what was pushed visible to the device.
    pub fn publish(&self) {
        compiler_fence(Ordering::SeqCst);
        // SAFETY: the available ring's index.
        unsafe { write16(self.avail + 2, self.avail_idx) };
        compiler_fence(Ordering::SeqCst);
    }

    /// Tells the device (a write to the queue's notify address).
    pub fn notify(&self) {
        // SAFETY: the notification address of this queue in the function's BAR.
        unsafe { write16(self.notify, self.index) };
    }

    /// The next used buffer (head, length), if the device returned one.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        // SAFETY: the used ring this queue owns.
        let idx = unsafe { read16(self.used + 2) };
        if idx == self.last_used {
            return None;
        }
        compiler_fence(Ordering::SeqCst);
        let at = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        // SAFETY: as above.
        let (id, len) = unsafe { (read32(at), read32(at + 4)) };
        self.last_used = self.last_used.wrapping_add(1);
        Some((id as u16, len))
    }

    /// Waits (bounded) for the next used buffer.
    pub fn wait_used(&mut self) -> Option<(u16, u32)> {
        for _ in 0..SPIN_BUDGET {
            if let Some(u) = self.pop_used() {
                return Some(u);
            }
            core::hint::spin_loop();
        }
        None
    }
}
