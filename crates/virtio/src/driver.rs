//! A virtio-pci driver that runs in the VMM's process, for what drives a device
//! without a guest: tests, `passthru replay`, benchmarks. It does what a guest's
//! driver does — finds the structures through the capabilities, negotiates
//! features, lays out split virtqueues in guest memory, publishes chains and
//! notifies — through a [`Bus`] (guest-physical MMIO) and guest memory, so the
//! device sees exactly a guest's accesses.

use abi::pci::{reg, status as pcistatus};
use abi::virtio::{NO_VECTOR, cap, common, ring, status};
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest-physical MMIO as a driver reaches it.
pub trait Bus {
    /// A read of `data.len()` bytes at `addr`.
    fn read(&self, addr: u64, data: &mut [u8]);
    /// A write at `addr`.
    fn write(&self, addr: u64, data: &[u8]);
}

impl<T: Bus + ?Sized> Bus for &T {
    fn read(&self, addr: u64, data: &mut [u8]) {
        (**self).read(addr, data);
    }
    fn write(&self, addr: u64, data: &[u8]) {
        (**self).write(addr, data);
    }
}

impl<T: Bus + ?Sized> Bus for Arc<T> {
    fn read(&self, addr: u64, data: &mut [u8]) {
        (**self).read(addr, data);
    }
    fn write(&self, addr: u64, data: &[u8]) {
        (**self).write(addr, data);
    }
}

/// One buffer of a chain: guest-physical address, length, written by the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    /// Its guest-physical address.
    pub addr: u64,
    /// Its length.
    pub len: u32,
    /// The device writes it (else reads it).
    pub write: bool,
}

/// Bytes a split virtqueue of `size` entries takes at its base: descriptors, the
/// available ring, then the used ring (4-byte aligned).
pub fn ring_bytes(size: u16) -> u64 {
    let n = u64::from(size);
    let used_at = (n * ring::DESC_SIZE + 6 + 2 * n).next_multiple_of(4);
    used_at + 6 + 8 * n
}

/// A split virtqueue as the driver keeps it.
pub struct DriverQueue {
    /// Its size.
    pub size: u16,
    /// Descriptor table, available ring, used ring.
    pub desc: u64,
    /// See `desc`.
    pub avail: u64,
    /// See `desc`.
    pub used: u64,
    free: Vec<u16>,
    /// Descriptors of each chain in flight, by head.
    chains: Vec<Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
    /// Where its notifications go (read once at set-up, as Linux's driver does).
    notify_at: Option<u64>,
}

/// A chain the device returned: its head and the bytes it wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// The chain's head.
    pub head: u16,
    /// Used length.
    pub len: u32,
}

impl DriverQueue {
    /// A queue of `size` entries laid out at `base` (zeroed here).
    pub fn new(memory: &GuestMemoryMmap, size: u16, base: u64) -> Result<DriverQueue, String> {
        let n = u64::from(size);
        let desc = base;
        let avail = desc + n * ring::DESC_SIZE;
        let used = (avail + 6 + 2 * n).next_multiple_of(4);
        let zeros = vec![0u8; usize::try_from(ring_bytes(size)).map_err(|e| e.to_string())?];
        memory.write_slice(&zeros, GuestAddress(base)).map_err(|e| format!("queue at {base:#x}: {e}"))?;
        Ok(DriverQueue {
            size,
            desc,
            avail,
            used,
            free: (0..size).rev().collect(),
            chains: vec![Vec::new(); usize::from(size)],
            avail_idx: 0,
            last_used: 0,
            notify_at: None,
        })
    }

    /// Free descriptors.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Writes descriptor `i` as given (hostile drivers: loops, bad lengths).
    pub fn write_desc(&self, memory: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        let at = self.desc + u64::from(i % self.size) * ring::DESC_SIZE;
        let _ = memory.write_slice(&d, GuestAddress(at));
    }

    /// Puts `head` in the next available slot (not yet visible: see [`Self::publish`]).
    pub fn push_avail(&mut self, memory: &GuestMemoryMmap, head: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        let _ = memory.write_obj(head, GuestAddress(at));
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Chains `bufs` on free descriptors and makes them available (not yet visible).
    /// Returns the head, or None if there are not enough free descriptors.
    pub fn add(&mut self, memory: &GuestMemoryMmap, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > self.free.len() {
            return None;
        }
        let ids: Vec<u16> = (0..bufs.len()).filter_map(|_| self.free.pop()).collect();
        for (k, (b, id)) in bufs.iter().zip(&ids).enumerate() {
            let next = ids.get(k + 1).copied();
            let flags =
                if b.write { ring::DESC_F_WRITE } else { 0 } | if next.is_some() { ring::DESC_F_NEXT } else { 0 };
            self.write_desc(memory, *id, b.addr, b.len, flags, next.unwrap_or(0));
        }
        let head = ids[0];
        self.chains[usize::from(head)] = ids;
        self.push_avail(memory, head);
        Some(head)
    }

    /// Makes what was added visible to the device (the available index, after a
    /// barrier).
    pub fn publish(&self, memory: &GuestMemoryMmap) {
        fence(Ordering::SeqCst);
        let _ = memory.store(self.avail_idx, GuestAddress(self.avail + 2), Ordering::Release);
        fence(Ordering::SeqCst);
    }

    /// The next chain the device returned, if any (its descriptors freed).
    pub fn take_used(&mut self, memory: &GuestMemoryMmap) -> Option<Used> {
        let idx: u16 = memory.load(GuestAddress(self.used + 2), Ordering::Acquire).ok()?;
        if idx == self.last_used {
            return None;
        }
        let at = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        let id: u32 = memory.read_obj(GuestAddress(at)).ok()?;
        let len: u32 = memory.read_obj(GuestAddress(at + 4)).ok()?;
        self.last_used = self.last_used.wrapping_add(1);
        let head = u16::try_from(id).ok().filter(|h| *h < self.size)?;
        let ids = std::mem::take(&mut self.chains[usize::from(head)]);
        self.free.extend(ids);
        Some(Used { head, len })
    }

    /// Waits (polling) for the next returned chain until `deadline`.
    pub fn wait_used(&mut self, memory: &GuestMemoryMmap, deadline: Instant) -> Option<Used> {
        let mut spins = 0u32;
        loop {
            if let Some(u) = self.take_used(memory) {
                return Some(u);
            }
            if Instant::now() >= deadline {
                return None;
            }
            // Spin, then give the core away (on two cores the device's thread must not
            // wait behind a spinning driver), then sleep: a quick answer is seen at
            // once, a slow one costs no CPU.
            spins = spins.saturating_add(1);
            if spins < 1000 {
                std::hint::spin_loop();
            } else if spins < 20_000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }
}

/// A virtio-pci function found and driven through its capabilities.
pub struct Driver<B: Bus> {
    bus: B,
    memory: Arc<GuestMemoryMmap>,
    /// Its configuration space (ECAM).
    config: u64,
    common: u64,
    isr: u64,
    device: u64,
    notify: u64,
    notify_multiplier: u32,
    msix: Option<(u16, u64)>,
    /// Its queues, once set up.
    pub queues: Vec<Option<DriverQueue>>,
}

impl<B: Bus> Driver<B> {
    /// The function whose configuration space is at `config` (its ECAM address):
    /// memory decoding and bus mastering on, its structures located.
    pub fn new(bus: B, memory: Arc<GuestMemoryMmap>, config: u64) -> Result<Driver<B>, String> {
        let mut d = Driver {
            bus,
            memory,
            config,
            common: 0,
            isr: 0,
            device: 0,
            notify: 0,
            notify_multiplier: 0,
            msix: None,
            queues: Vec::new(),
        };
        if d.cfg16(reg::VENDOR_ID) != abi::virtio::VENDOR_ID {
            return Err(format!("no virtio function at {config:#x}"));
        }
        let cmd = d.cfg16(reg::COMMAND) | abi::pci::command::MEMORY | abi::pci::command::MASTER;
        d.bus.write(config + u64::from(reg::COMMAND), &cmd.to_le_bytes());
        if d.cfg16(reg::STATUS) & pcistatus::CAP_LIST == 0 {
            return Err("no capability list".into());
        }
        let mut at = u16::from(d.cfg8(reg::CAPABILITIES)) & !3;
        let mut found = 0u8;
        let mut hops = 0;
        while at != 0 && hops < 48 {
            hops += 1;
            let id = d.cfg8(at);
            if id == cap::ID {
                let bar = d.bar_address(d.cfg8(at + cap::BAR))?;
                let where_ = bar + u64::from(d.cfg32(at + cap::OFFSET));
                match d.cfg8(at + cap::CFG_TYPE) {
                    cap::COMMON => d.common = where_,
                    cap::ISR => d.isr = where_,
                    cap::DEVICE => d.device = where_,
                    cap::NOTIFY => {
                        d.notify = where_;
                        d.notify_multiplier = d.cfg32(at + cap::NOTIFY_MULTIPLIER);
                    }
                    _ => {}
                }
                found |= 1 << d.cfg8(at + cap::CFG_TYPE).min(7);
            } else if id == abi::pci::cap::MSIX {
                let table = d.cfg32(at + 4);
                let bar = d.bar_address((table & 7) as u8)?;
                d.msix = Some((at, bar + u64::from(table & !7)));
            }
            at = u16::from(d.cfg8(at + 1)) & !3;
        }
        let all = (1 << cap::COMMON) | (1 << cap::ISR) | (1 << cap::DEVICE) | (1 << cap::NOTIFY);
        if found & all != all {
            return Err(format!("capabilities missing (found {found:#x})"));
        }
        let n = d.common16(common::NUM_QUEUES);
        d.queues = (0..n).map(|_| None).collect();
        Ok(d)
    }

    fn cfg8(&self, off: u16) -> u8 {
        let mut b = [0u8; 1];
        self.bus.read(self.config + u64::from(off), &mut b);
        b[0]
    }

    fn cfg16(&self, off: u16) -> u16 {
        let mut b = [0u8; 2];
        self.bus.read(self.config + u64::from(off), &mut b);
        u16::from_le_bytes(b)
    }

    fn cfg32(&self, off: u16) -> u32 {
        let mut b = [0u8; 4];
        self.bus.read(self.config + u64::from(off), &mut b);
        u32::from_le_bytes(b)
    }

    fn bar_address(&self, bar: u8) -> Result<u64, String> {
        if bar > 5 {
            return Err(format!("BAR {bar} does not exist"));
        }
        let lo = self.cfg32(reg::BAR0 + 4 * u16::from(bar));
        let mut a = u64::from(lo & abi::pci::bar::MEM_MASK);
        if lo & abi::pci::bar::MEM_TYPE_MASK == abi::pci::bar::MEM_TYPE_64 {
            a |= u64::from(self.cfg32(reg::BAR0 + 4 * u16::from(bar) + 4)) << 32;
        }
        if a == 0 {
            return Err(format!("BAR {bar} is not placed"));
        }
        Ok(a)
    }

    /// The same driver, its device now reached through `bus` and `memory` (a VM
    /// restored from a snapshot of this one: the same addresses, the same queues).
    pub fn moved_to<B2: Bus>(self, bus: B2, memory: Arc<GuestMemoryMmap>) -> Driver<B2> {
        Driver {
            bus,
            memory,
            config: self.config,
            common: self.common,
            isr: self.isr,
            device: self.device,
            notify: self.notify,
            notify_multiplier: self.notify_multiplier,
            msix: self.msix,
            queues: self.queues,
        }
    }

    /// The bus it is driven through.
    pub fn bus(&self) -> &B {
        &self.bus
    }

    /// Guest memory.
    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.memory
    }

    /// A common-configuration read of `N` bytes at `off`.
    pub fn common_read<const N: usize>(&self, off: u64) -> [u8; N] {
        let mut b = [0u8; N];
        self.bus.read(self.common + off, &mut b);
        b
    }

    fn common16(&self, off: u64) -> u16 {
        u16::from_le_bytes(self.common_read::<2>(off))
    }

    fn common32(&self, off: u64) -> u32 {
        u32::from_le_bytes(self.common_read::<4>(off))
    }

    /// A common-configuration write.
    pub fn common_write(&self, off: u64, data: &[u8]) {
        self.bus.write(self.common + off, data);
    }

    /// The device status.
    pub fn status(&self) -> u8 {
        self.common_read::<1>(common::DEVICE_STATUS)[0]
    }

    /// Writes the device status.
    pub fn set_status(&self, s: u8) {
        self.common_write(common::DEVICE_STATUS, &[s]);
    }

    /// Resets the device and waits for the status to read 0 (the spec's driver
    /// requirement), up to `timeout`.
    pub fn reset(&mut self, timeout: Duration) -> Result<(), String> {
        self.set_status(0);
        let deadline = Instant::now() + timeout;
        while self.status() != 0 {
            if Instant::now() >= deadline {
                return Err("the device did not finish its reset".into());
            }
            std::thread::yield_now();
        }
        self.queues.iter_mut().for_each(|q| *q = None);
        Ok(())
    }

    /// The features the device offers.
    pub fn device_features(&self) -> u64 {
        self.common_write(common::DEVICE_FEATURE_SELECT, &0u32.to_le_bytes());
        let lo = self.common32(common::DEVICE_FEATURE);
        self.common_write(common::DEVICE_FEATURE_SELECT, &1u32.to_le_bytes());
        let hi = self.common32(common::DEVICE_FEATURE);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// Reset, ACKNOWLEDGE, DRIVER, the features `want` (those offered of them), and
    /// FEATURES_OK. Returns the features accepted, or why the device refused them.
    pub fn negotiate(&mut self, want: u64) -> Result<u64, String> {
        self.reset(Duration::from_secs(5))?;
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        let f = self.device_features() & want;
        self.write_features(f);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        if self.status() & status::FEATURES_OK == 0 {
            return Err(format!("the device refused features {f:#x}"));
        }
        Ok(f)
    }

    /// Writes the driver's features (both halves).
    pub fn write_features(&self, f: u64) {
        for (sel, half) in [(0u32, f as u32), (1, (f >> 32) as u32)] {
            self.common_write(common::DRIVER_FEATURE_SELECT, &sel.to_le_bytes());
            self.common_write(common::DRIVER_FEATURE, &half.to_le_bytes());
        }
    }

    /// The maximum size of queue `index` (0: it does not exist).
    pub fn queue_max(&self, index: u16) -> u16 {
        self.common_write(common::QUEUE_SELECT, &index.to_le_bytes());
        self.common16(common::QUEUE_SIZE)
    }

    /// Sets up queue `index` with `size` entries at `base` in guest memory, signalled
    /// on MSI-X `vector` (or none), and enables it.
    pub fn setup_queue(&mut self, index: u16, size: u16, base: u64, vector: Option<u16>) -> Result<(), String> {
        let max = self.queue_max(index);
        if max == 0 || size > max || !size.is_power_of_two() {
            return Err(format!("queue {index}: size {size} (its maximum is {max})"));
        }
        let q = DriverQueue::new(&self.memory, size, base)?;
        self.common_write(common::QUEUE_SIZE, &size.to_le_bytes());
        self.common_write(common::QUEUE_DESC, &q.desc.to_le_bytes());
        self.common_write(common::QUEUE_DRIVER, &q.avail.to_le_bytes());
        self.common_write(common::QUEUE_DEVICE, &q.used.to_le_bytes());
        self.common_write(common::QUEUE_MSIX_VECTOR, &vector.unwrap_or(NO_VECTOR).to_le_bytes());
        self.common_write(common::QUEUE_ENABLE, &1u16.to_le_bytes());
        let off = self.common16(common::QUEUE_NOTIFY_OFF);
        let q = DriverQueue { notify_at: Some(self.notify + u64::from(off) * u64::from(self.notify_multiplier)), ..q };
        let slot = self.queues.get_mut(usize::from(index)).ok_or_else(|| format!("no queue {index}"))?;
        *slot = Some(q);
        Ok(())
    }

    /// DRIVER_OK: the device is live.
    pub fn driver_ok(&self) {
        let s = self.status();
        self.set_status(s | status::DRIVER_OK);
    }

    /// Notifies queue `index`.
    pub fn notify(&self, index: u16) {
        if let Some(at) = self.queues.get(usize::from(index)).and_then(|q| q.as_ref()).and_then(|q| q.notify_at) {
            self.bus.write(at, &index.to_le_bytes());
            return;
        }
        self.common_write(common::QUEUE_SELECT, &index.to_le_bytes());
        let off = self.common16(common::QUEUE_NOTIFY_OFF);
        let at = self.notify + u64::from(off) * u64::from(self.notify_multiplier);
        self.bus.write(at, &index.to_le_bytes());
    }

    /// Queue `index`, set up.
    pub fn queue(&mut self, index: u16) -> Option<&mut DriverQueue> {
        self.queues.get_mut(usize::from(index))?.as_mut()
    }

    /// Reads the device configuration at `off`.
    pub fn config_read(&self, off: u64, data: &mut [u8]) {
        self.bus.read(self.device + off, data);
    }

    /// Writes the device configuration at `off`.
    pub fn config_write(&self, off: u64, data: &[u8]) {
        self.bus.write(self.device + off, data);
    }

    /// Reads (and so clears) the ISR status.
    pub fn isr(&self) -> u8 {
        let mut b = [0u8; 1];
        self.bus.read(self.isr, &mut b);
        b[0]
    }

    /// Enables MSI-X with `entries` (address, data) as its first vectors, unmasked.
    pub fn enable_msix(&self, entries: &[(u64, u32)]) -> Result<(), String> {
        let (cap_at, table) = self.msix.ok_or("no MSI-X capability")?;
        for (i, (addr, data)) in entries.iter().enumerate() {
            let e = table + 16 * i as u64;
            self.bus.write(e, &(*addr as u32).to_le_bytes());
            self.bus.write(e + 4, &((*addr >> 32) as u32).to_le_bytes());
            self.bus.write(e + 8, &data.to_le_bytes());
            self.bus.write(e + 12, &0u32.to_le_bytes());
        }
        let ctl = self.cfg16(cap_at + 2) | abi::pci::cap::MSIX_ENABLE;
        self.bus.write(self.config + u64::from(cap_at + 2), &ctl.to_le_bytes());
        Ok(())
    }

    /// Sets the configuration-change vector.
    pub fn set_config_vector(&self, v: u16) {
        self.common_write(common::CONFIG_MSIX_VECTOR, &v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_takes_what_the_spec_lays_out() {
        // 16 bytes a descriptor; avail: flags, idx, ring, used_event; used (4-aligned):
        // flags, idx, ring of 8-byte elements, avail_event.
        assert_eq!(ring_bytes(256), 4096 + (6 + 512) + 2 + 6 + 2048);
        assert_eq!(ring_bytes(1), 16 + 8 + 6 + 8);
    }
}
