//! The modern virtio-pci transport: a PCI function carrying one [`VirtioDevice`].
//!
//! BAR 0 (32 KiB, memory) holds, at the offsets the capabilities give: the common
//! configuration (0x0000), the ISR status (0x1000), the device configuration
//! (0x2000), the queue notifications (0x3000, 4 bytes apart) and the MSI-X table
//! (0x4000) and pending bits (0x5000). A notification is a guest write caught by an
//! ioeventfd (no exit; re-registered when the BAR moves) or, if it reaches the
//! function, passed to the same eventfd; a queue the device runs on notification
//! ([`VirtioDevice::runs_on_notify`]) has no ioeventfd, and the notifying thread runs
//! it. There is no INTx: drivers use MSI-X.
//!
//! Status follows the spec: FEATURES_OK only for features the device offers (with
//! VERSION_1) that it accepts; DRIVER_OK starts the queues (a malformed queue sets
//! DEVICE_NEEDS_RESET instead, and notifies a configuration change); writing 0 resets the device (queues, vectors, the
//! device's own state) and reads back 0 once done.
//!
//! Locks: `regs` (configuration space, common registers) -> `vectors` (MSI-X) and
//! `regs` -> a queue; the worker takes a queue, lets it go, then `vectors`.

use crate::device::{QueueAccess, VirtioDevice};
use crate::interrupts::Vectors;
use crate::worker::{Runner, Worker};
use abi::pci::{cap as pcicap, command, reg};
use abi::virtio::{cap, common, status};
use pci::bar::{BarKind, BarSpec, Bars};
use pci::{BarWindow, ConfigSpace, PciFunction};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use virtio_queue::{Queue, QueueT};
use vm_api::{IoAddr, IoEvents};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// ISR status bit of a configuration change.
const ISR_CONFIG: u8 = 2;
/// ISR status bit of a queue interrupt.
const ISR_QUEUE: u8 = 1;

/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
/// Offsets in BAR 0.
pub const COMMON_AT: u64 = 0x0000;
/// See [`COMMON_AT`].
pub const ISR_AT: u64 = 0x1000;
/// See [`COMMON_AT`].
pub const DEVICE_AT: u64 = 0x2000;
/// Bytes of the device configuration window.
pub const DEVICE_LEN: u64 = 0x1000;
/// See [`COMMON_AT`].
pub const NOTIFY_AT: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// See [`COMMON_AT`].
pub const MSIX_TABLE_AT: u64 = 0x4000;
/// See [`COMMON_AT`].
pub const MSIX_PBA_AT: u64 = 0x5000;

/// One queue's registers as the driver programs them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueRegs {
    /// Its size.
    pub size: u16,
    /// Its MSI-X vector.
    pub vector: u16,
    /// Enabled.
    pub enabled: bool,
    /// Descriptor table, available ring, used ring.
    pub desc: u64,
    /// See `desc`.
    pub driver: u64,
    /// See `desc`.
    pub device: u64,
    /// The next available entry the device takes, and the next used one it writes
    /// (live queues; saved by a snapshot).
    pub next_avail: u16,
    /// See `next_avail`.
    pub next_used: u16,
}

/// The transport's state, as a snapshot holds it (the device's is its own).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportState {
    /// Configuration space bytes (the first 256).
    pub config: Vec<u8>,
    /// BAR 0's address.
    pub bar: u64,
    /// Device status.
    pub status: u8,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// MSI-X vector of configuration changes.
    pub config_vector: u16,
    /// The queues.
    pub queues: Vec<QueueRegs>,
    /// MSI-X enabled, all masked.
    pub msix: (bool, bool),
    /// MSI-X table entries: address, data, control.
    pub msix_table: Vec<(u64, u32, u32)>,
}

struct Regs {
    config: ConfigSpace,
    bars: Bars,
    /// Where BAR 0's notifications are registered (its address), if they are.
    registered: Option<u64>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    config_vector: u16,
    queue_select: u16,
    queues: Vec<QueueRegs>,
    worker: Option<Worker>,
    msix_cap: u16,
}

/// What the worker shares with the function.
struct Shared {
    name: String,
    device: Arc<dyn VirtioDevice>,
    memory: Arc<GuestMemoryMmap>,
    queues: Vec<Mutex<Option<Queue>>>,
    queue_vectors: Vec<AtomicU16>,
    vectors: Mutex<Vectors>,
    notifiers: Vec<EventFd>,
    /// Queues run by the thread that notifies them.
    on_notify: Vec<bool>,
    wake: EventFd,
    isr: AtomicU8,
    needs_reset: AtomicBool,
    /// The configuration-change vector (the driver's `config_msix_vector`).
    config_vector: AtomicU16,
    /// Paused: the worker takes no work (and `run_lock` waits for what it has).
    paused: AtomicBool,
    /// Work that came while paused: run at resume.
    missed: AtomicBool,
    run_lock: Mutex<()>,
}

/// A virtio device on the PCI bus.
pub struct VirtioPci {
    shared: Arc<Shared>,
    regs: Mutex<Regs>,
    io: Arc<dyn IoEvents>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A virtio PCI capability's body (after id and next): `cfg_type` in BAR 0 at
/// `offset` for `length` bytes, `extra` appended (the notify multiplier).
fn vcap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let mut b = vec![cap::LEN + extra.len() as u8, cfg_type, 0, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(length as u32).to_le_bytes());
    b.extend_from_slice(extra);
    b
}

impl VirtioPci {
    /// A function named `name` carrying `device`, its interrupts in `irqs`, its
    /// notifications through `io`, its queues in `memory`.
    pub fn new(
        name: &str,
        device: Arc<dyn VirtioDevice>,
        memory: Arc<GuestMemoryMmap>,
        irqs: Arc<irq::IrqRegistry>,
        io: Arc<dyn IoEvents>,
        class: u16,
    ) -> std::io::Result<Arc<VirtioPci>> {
        let nq = device.queue_sizes().len();
        let on_notify: Vec<bool> = (0..nq as u16).map(|i| device.runs_on_notify(i)).collect();
        let vectors = (nq + 1) as u16;
        let dt = device.device_type();
        let mut b = pci::config::Builder::new(abi::virtio::VENDOR_ID, abi::virtio::device_id(dt), class, 0)
            .set_u8(reg::REVISION, abi::virtio::REVISION)
            .set_u32(
                reg::SUBSYSTEM_VENDOR_ID,
                u32::from(abi::virtio::VENDOR_ID) | (u32::from(abi::virtio::SUBSYSTEM_ID) << 16),
            );
        let msix_cap;
        (b, _) = b.capability(cap::ID, &vcap(cap::COMMON, COMMON_AT, common::SIZE, &[]));
        (b, _) = b.capability(cap::ID, &vcap(cap::ISR, ISR_AT, 4, &[]));
        (b, _) = b.capability(cap::ID, &vcap(cap::DEVICE, DEVICE_AT, DEVICE_LEN, &[]));
        let notify_len = nq as u64 * u64::from(NOTIFY_MULTIPLIER);
        (b, _) = b.capability(cap::ID, &vcap(cap::NOTIFY, NOTIFY_AT, notify_len, &NOTIFY_MULTIPLIER.to_le_bytes()));
        let mut body = Vec::new();
        body.extend_from_slice(&(vectors - 1).to_le_bytes());
        body.extend_from_slice(&(MSIX_TABLE_AT as u32).to_le_bytes());
        body.extend_from_slice(&(MSIX_PBA_AT as u32).to_le_bytes());
        (b, msix_cap) = b.capability(pcicap::MSIX, &body);
        let mut config = b.build();
        config.set_writable(reg::COMMAND, &[(command::MEMORY | command::MASTER) as u8, 0]);
        config.set_writable(msix_cap + 2, &[0, ((pcicap::MSIX_ENABLE | pcicap::MSIX_MASKALL) >> 8) as u8]);
        let bars = Bars::new(&[BarSpec { index: 0, kind: BarKind::Mem32 { prefetch: false }, size: BAR_SIZE }])
            .map_err(std::io::Error::other)?;
        let notifiers = (0..nq).map(|_| irq::eventfd()).collect::<std::io::Result<Vec<_>>>()?;
        let queues = (0..nq).map(|_| Mutex::new(None)).collect();
        let sizes = device.queue_sizes();
        // The registry holds this while the vectors are attached (the function itself
        // owns the registry's sources, and detaches them when it goes).
        let owner: Arc<dyn std::any::Any + Send + Sync> = Arc::new(name.to_string());
        let vectors = Vectors::new(name, irqs, owner, vectors)?;
        Ok(Arc::new(VirtioPci {
            shared: Arc::new(Shared {
                name: name.to_string(),
                device,
                memory,
                queues,
                queue_vectors: (0..nq).map(|_| AtomicU16::new(abi::virtio::NO_VECTOR)).collect(),
                vectors: Mutex::new(vectors),
                notifiers,
                on_notify,
                wake: irq::eventfd()?,
                isr: AtomicU8::new(0),
                needs_reset: AtomicBool::new(false),
                config_vector: AtomicU16::new(abi::virtio::NO_VECTOR),
                paused: AtomicBool::new(false),
                missed: AtomicBool::new(false),
                run_lock: Mutex::new(()),
            }),
            regs: Mutex::new(Regs {
                config,
                bars,
                registered: None,
                device_feature_select: 0,
                driver_feature_select: 0,
                driver_features: 0,
                status: 0,
                config_generation: 0,
                config_vector: abi::virtio::NO_VECTOR,
                queue_select: 0,
                queues: sizes
                    .iter()
                    .map(|s| QueueRegs { size: *s, vector: abi::virtio::NO_VECTOR, ..QueueRegs::default() })
                    .collect(),
                worker: None,
                msix_cap,
            }),
            io,
        }))
    }
}

fn le(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

fn put(data: &mut [u8], v: u64) {
    let b = v.to_le_bytes();
    let n = data.len().min(8);
    data[..n].copy_from_slice(&b[..n]);
}

impl VirtioPci {
    /// The device it carries.
    pub fn device(&self) -> &Arc<dyn VirtioDevice> {
        &self.shared.device
    }

    /// Asks the worker to run the queues (the device has work of its own, e.g. an
    /// event to report).
    pub fn wake(&self) {
        let _ = self.shared.wake.write(1);
    }

    /// A wake-up handle for the device (it may hold it; the function holds the device).
    pub fn waker(&self) -> std::io::Result<EventFd> {
        self.shared.wake.try_clone()
    }

    /// The features the device offers, VERSION_1 included.
    fn offered(&self) -> u64 {
        self.shared.device.features() | (1 << abi::virtio::F_VERSION_1)
    }

    /// The device status as the driver reads it.
    fn status(&self, r: &Regs) -> u8 {
        r.status | if self.shared.needs_reset.load(Ordering::Acquire) { status::NEEDS_RESET } else { 0 }
    }

    fn common_read(&self, r: &Regs, offset: u64, data: &mut [u8]) {
        let q = r.queues.get(usize::from(r.queue_select));
        let v: u64 = match offset {
            common::DEVICE_FEATURE_SELECT => u64::from(r.device_feature_select),
            common::DEVICE_FEATURE => match r.device_feature_select {
                0 => self.offered() & 0xffff_ffff,
                1 => self.offered() >> 32,
                _ => 0,
            },
            common::DRIVER_FEATURE_SELECT => u64::from(r.driver_feature_select),
            common::DRIVER_FEATURE => match r.driver_feature_select {
                0 => r.driver_features & 0xffff_ffff,
                1 => r.driver_features >> 32,
                _ => 0,
            },
            common::CONFIG_MSIX_VECTOR => u64::from(r.config_vector),
            common::NUM_QUEUES => r.queues.len() as u64,
            common::DEVICE_STATUS => u64::from(self.status(r)),
            common::CONFIG_GENERATION => u64::from(r.config_generation),
            common::QUEUE_SELECT => u64::from(r.queue_select),
            common::QUEUE_SIZE => q.map_or(0, |q| u64::from(q.size)),
            common::QUEUE_MSIX_VECTOR => q.map_or(u64::from(abi::virtio::NO_VECTOR), |q| u64::from(q.vector)),
            common::QUEUE_ENABLE => q.map_or(0, |q| u64::from(q.enabled)),
            common::QUEUE_NOTIFY_OFF => u64::from(r.queue_select),
            common::QUEUE_DESC => q.map_or(0, |q| q.desc),
            0x24 => q.map_or(0, |q| q.desc >> 32),
            common::QUEUE_DRIVER => q.map_or(0, |q| q.driver),
            0x2c => q.map_or(0, |q| q.driver >> 32),
            common::QUEUE_DEVICE => q.map_or(0, |q| q.device),
            0x34 => q.map_or(0, |q| q.device >> 32),
            _ => 0,
        };
        put(data, v);
    }

    fn common_write(&self, r: &mut Regs, offset: u64, data: &[u8]) {
        let v = le(data);
        let live = r.status & status::DRIVER_OK != 0;
        let sel = usize::from(r.queue_select);
        // 64-bit registers may be written as two 32-bit halves.
        let set64 = |old: u64, at: u64, base: u64| -> u64 {
            match (at - base, data.len()) {
                (0, 8) => v,
                (0, _) => (old & !0xffff_ffff) | (v & 0xffff_ffff),
                (4, _) => (old & 0xffff_ffff) | (v << 32),
                _ => old,
            }
        };
        match offset {
            common::DEVICE_FEATURE_SELECT => r.device_feature_select = v as u32,
            common::DRIVER_FEATURE_SELECT => r.driver_feature_select = v as u32,
            // Features are fixed once FEATURES_OK is set.
            common::DRIVER_FEATURE if r.status & status::FEATURES_OK == 0 => match r.driver_feature_select {
                0 => r.driver_features = (r.driver_features & !0xffff_ffff) | (v & 0xffff_ffff),
                1 => r.driver_features = (r.driver_features & 0xffff_ffff) | ((v & 0xffff_ffff) << 32),
                _ => {}
            },
            common::CONFIG_MSIX_VECTOR => {
                r.config_vector = v as u16;
                self.shared.config_vector.store(v as u16, Ordering::Release);
            }
            common::DEVICE_STATUS => self.set_status(r, v as u8),
            common::QUEUE_SELECT => r.queue_select = v as u16,
            common::QUEUE_MSIX_VECTOR => {
                if let Some(q) = r.queues.get_mut(sel) {
                    q.vector = v as u16;
                    if let Some(a) = self.shared.queue_vectors.get(sel) {
                        a.store(q.vector, Ordering::Release);
                    }
                }
            }
            // A queue's layout is the driver's until the device is live.
            _ if live => {}
            common::QUEUE_SIZE => {
                if let Some(q) = r.queues.get_mut(sel) {
                    // A size the device cannot take is kept and refused at DRIVER_OK.
                    q.size = v as u16;
                }
            }
            common::QUEUE_ENABLE => {
                if let Some(q) = r.queues.get_mut(sel) {
                    q.enabled = v & 1 != 0;
                }
            }
            a @ (common::QUEUE_DESC | 0x24) => {
                if let Some(q) = r.queues.get_mut(sel) {
                    q.desc = set64(q.desc, a, common::QUEUE_DESC);
                }
            }
            a @ (common::QUEUE_DRIVER | 0x2c) => {
                if let Some(q) = r.queues.get_mut(sel) {
                    q.driver = set64(q.driver, a, common::QUEUE_DRIVER);
                }
            }
            a @ (common::QUEUE_DEVICE | 0x34) => {
                if let Some(q) = r.queues.get_mut(sel) {
                    q.device = set64(q.device, a, common::QUEUE_DEVICE);
                }
            }
            _ => {}
        }
    }

    /// A write of `device_status`: 0 resets; FEATURES_OK is kept only for features
    /// the device offers and accepts (VERSION_1 among them); DRIVER_OK starts the
    /// queues.
    fn set_status(&self, r: &mut Regs, v: u8) {
        if v == 0 {
            self.reset(r);
            return;
        }
        // The driver never clears a bit but by writing 0 (a reset); a write that would
        // is ignored, or DRIVER_OK set again would rebuild live queues from index 0.
        if v & r.status != r.status {
            return;
        }
        let newly = v & !r.status;
        r.status = v;
        if newly & status::FEATURES_OK != 0 {
            let f = r.driver_features;
            let ok = f & !self.offered() == 0
                && f & (1 << abi::virtio::F_VERSION_1) != 0
                && self.shared.device.accept_features(f);
            if !ok {
                r.status &= !status::FEATURES_OK;
            }
        }
        if newly & status::DRIVER_OK != 0 && r.status & status::FEATURES_OK != 0 {
            self.start(r);
        }
    }

    /// DRIVER_OK: each enabled queue built from its registers and checked, the
    /// worker started. A queue the device cannot use sets DEVICE_NEEDS_RESET.
    fn start(&self, r: &mut Regs) {
        let sizes = self.shared.device.queue_sizes();
        for (i, q) in r.queues.iter().enumerate() {
            if !q.enabled {
                continue;
            }
            let max = sizes.get(i).copied().unwrap_or(0);
            match build_queue(max, q, &self.shared.memory) {
                Some(queue) => *lock(&self.shared.queues[i]) = Some(queue),
                None => {
                    tracing::warn!(
                        "{}: queue {i} is not usable (size {}, rings {:#x}/{:#x}/{:#x})",
                        self.shared.name,
                        q.size,
                        q.desc,
                        q.driver,
                        q.device
                    );
                    self.shared.needs_reset.store(true, Ordering::Release);
                }
            }
        }
        self.shared.device.activate(r.driver_features);
        match Worker::start(&format!("{}-queues", self.shared.name), Arc::clone(&self.shared) as Arc<dyn Runner>) {
            Ok(w) => r.worker = Some(w),
            Err(e) => {
                tracing::error!("{}: cannot start its queue worker: {e}", self.shared.name);
                self.shared.fail();
            }
        }
        // Work the driver queued before DRIVER_OK.
        self.wake();
    }

    /// Device reset: the worker stopped, queues and vectors forgotten, the device's
    /// own state reset; the status reads 0 when this returns.
    fn reset(&self, r: &mut Regs) {
        r.worker = None;
        for q in &self.shared.queues {
            *lock(q) = None;
        }
        let sizes = self.shared.device.queue_sizes();
        for (q, s) in r.queues.iter_mut().zip(sizes) {
            *q = QueueRegs { size: *s, vector: abi::virtio::NO_VECTOR, ..QueueRegs::default() };
        }
        for v in &self.shared.queue_vectors {
            v.store(abi::virtio::NO_VECTOR, Ordering::Release);
        }
        r.status = 0;
        r.driver_features = 0;
        r.device_feature_select = 0;
        r.driver_feature_select = 0;
        r.config_vector = abi::virtio::NO_VECTOR;
        self.shared.config_vector.store(abi::virtio::NO_VECTOR, Ordering::Release);
        r.queue_select = 0;
        self.shared.isr.store(0, Ordering::Release);
        self.shared.needs_reset.store(false, Ordering::Release);
        self.shared.device.reset();
    }

    /// Registers the notification ioeventfds at BAR 0's address (or moves them when
    /// the guest moved it, or drops them when it stops decoding).
    fn sync_notify(&self, r: &mut Regs) {
        let decoding = r.config.u16(reg::COMMAND) & command::MEMORY != 0;
        let want = decoding.then(|| r.bars.address(0)).filter(|a| *a != 0);
        if want == r.registered {
            return;
        }
        if let Some(old) = r.registered.take() {
            for (i, fd) in self.shared.notifiers.iter().enumerate() {
                if self.shared.on_notify[i] {
                    continue;
                }
                let _ = self
                    .io
                    .unregister_ioevent(fd, IoAddr::Mmio(old + NOTIFY_AT + i as u64 * u64::from(NOTIFY_MULTIPLIER)));
            }
        }
        if let Some(base) = want {
            for (i, fd) in self.shared.notifiers.iter().enumerate() {
                if self.shared.on_notify[i] {
                    continue;
                }
                let at = base + NOTIFY_AT + i as u64 * u64::from(NOTIFY_MULTIPLIER);
                if let Err(e) = self.io.register_ioevent(fd, IoAddr::Mmio(at)) {
                    tracing::debug!("{}: queue {i} notifications trapped ({e})", self.shared.name);
                }
            }
            r.registered = Some(base);
        }
    }

    /// Applies the MSI-X capability's control to the vectors.
    fn sync_msix(&self, r: &Regs) {
        let ctl = r.config.u16(r.msix_cap + 2);
        lock(&self.shared.vectors).set_control(ctl & pcicap::MSIX_ENABLE != 0, ctl & pcicap::MSIX_MASKALL != 0);
    }

    /// Its state for a snapshot (taken while paused).
    pub fn save_state(&self) -> TransportState {
        let r = lock(&self.regs);
        let mut queues = r.queues.clone();
        for (i, q) in queues.iter_mut().enumerate() {
            if let Some(live) = lock(&self.shared.queues[i]).as_ref() {
                q.next_avail = live.next_avail();
                q.next_used = live.next_used();
            }
        }
        let v = lock(&self.shared.vectors);
        TransportState {
            config: r.config.bytes()[..256].to_vec(),
            bar: r.bars.address(0),
            status: self.status(&r),
            driver_features: r.driver_features,
            config_vector: r.config_vector,
            queues,
            msix: (v.enabled(), r.config.u16(r.msix_cap + 2) & pcicap::MSIX_MASKALL != 0),
            msix_table: (0..v.table.len())
                .filter_map(|i| v.table.entry(i))
                .map(|e| (e.address, e.data, e.control))
                .collect(),
        }
    }

    /// Puts a saved state back (the device's own state is restored by its owner): the
    /// configuration, the queues where they were, the vectors; the queues run once
    /// the function is resumed.
    pub fn restore_state(&self, s: &TransportState) -> Result<(), String> {
        let mut r = lock(&self.regs);
        if s.queues.len() != r.queues.len() || s.config.len() != 256 {
            return Err("a virtio transport state of another device".into());
        }
        for off in (0..256u16).step_by(4) {
            let b = &s.config[usize::from(off)..usize::from(off) + 4];
            r.config.set(off, b);
        }
        r.bars.set_address(0, s.bar);
        {
            let mut v = lock(&self.shared.vectors);
            for (i, (address, data, control)) in s.msix_table.iter().enumerate() {
                let off = i as u64 * pcicap::MSIX_ENTRY_SIZE;
                let mut b = [0u8; 16];
                b[..8].copy_from_slice(&address.to_le_bytes());
                b[8..12].copy_from_slice(&data.to_le_bytes());
                b[12..].copy_from_slice(&control.to_le_bytes());
                v.table.write(off, &b[..8]);
                v.table.write(off + 8, &b[8..]);
            }
        }
        self.sync_msix(&r);
        self.sync_notify(&mut r);
        r.queues = s.queues.clone();
        for (i, q) in r.queues.iter().enumerate() {
            if let Some(a) = self.shared.queue_vectors.get(i) {
                a.store(q.vector, Ordering::Release);
            }
        }
        r.driver_features = s.driver_features;
        r.config_vector = s.config_vector;
        self.shared.config_vector.store(s.config_vector, Ordering::Release);
        r.status = s.status & !status::NEEDS_RESET;
        if r.status & status::DRIVER_OK != 0 {
            self.shared.paused.store(true, Ordering::Release);
            let sizes = self.shared.device.queue_sizes();
            for (i, q) in r.queues.iter().enumerate() {
                if q.enabled {
                    let mut queue = build_queue(sizes.get(i).copied().unwrap_or(0), q, &self.shared.memory)
                        .ok_or_else(|| format!("queue {i} of the snapshot is not usable"))?;
                    queue.set_next_avail(q.next_avail);
                    queue.set_next_used(q.next_used);
                    *lock(&self.shared.queues[i]) = Some(queue);
                }
            }
            let w = Worker::start(&format!("{}-queues", self.shared.name), Arc::clone(&self.shared) as Arc<dyn Runner>)
                .map_err(|e| e.to_string())?;
            r.worker = Some(w);
        }
        Ok(())
    }
}

/// A queue from its registers, if the device can use it: a power-of-two size no
/// larger than `max`, rings inside guest memory and aligned.
fn build_queue(max: u16, q: &QueueRegs, memory: &GuestMemoryMmap) -> Option<Queue> {
    let mut queue = Queue::new(max).ok()?;
    queue.try_set_size(q.size).ok()?;
    queue.try_set_desc_table_address(vm_memory::GuestAddress(q.desc)).ok()?;
    queue.try_set_avail_ring_address(vm_memory::GuestAddress(q.driver)).ok()?;
    queue.try_set_used_ring_address(vm_memory::GuestAddress(q.device)).ok()?;
    queue.set_ready(true);
    queue.is_valid(memory).then_some(queue)
}

impl Runner for Shared {
    fn notifiers(&self) -> &[EventFd] {
        &self.notifiers
    }

    fn wake(&self) -> &EventFd {
        &self.wake
    }

    fn run(&self, index: Option<u16>) {
        let _running = lock(&self.run_lock);
        if self.paused.load(Ordering::Acquire) {
            self.missed.store(true, Ordering::Release);
            return;
        }
        match index {
            Some(i) => self.run_queue(i),
            None => (0..self.queues.len() as u16).for_each(|i| self.run_queue(i)),
        }
    }
}

impl Shared {
    /// The device cannot go on: DEVICE_NEEDS_RESET, and (the first time) a
    /// configuration-change notification, as the spec asks of a live device.
    fn fail(&self) {
        if self.needs_reset.swap(true, Ordering::AcqRel) {
            return;
        }
        self.isr.fetch_or(ISR_CONFIG, Ordering::AcqRel);
        lock(&self.vectors).signal(self.config_vector.load(Ordering::Acquire));
    }

    /// Runs queue `i` and tells the driver what was used (if it asked to be told).
    fn run_queue(&self, i: u16) {
        let Some(slot) = self.queues.get(usize::from(i)) else { return };
        let (notify, failed) = {
            let mut q = lock(slot);
            let Some(queue) = q.as_mut() else { return };
            let mut access = QueueAccess::new(queue, &self.memory);
            self.device.process(i, &mut access);
            let (used, failed) = (access.used(), access.failed);
            let notify = used > 0 && queue.needs_notification(self.memory.as_ref()).unwrap_or(true);
            (notify, failed)
        };
        if failed {
            self.fail();
        }
        if notify {
            self.isr.fetch_or(ISR_QUEUE, Ordering::AcqRel);
            let v =
                self.queue_vectors.get(usize::from(i)).map_or(abi::virtio::NO_VECTOR, |a| a.load(Ordering::Acquire));
            lock(&self.vectors).signal(v);
        }
    }
}

impl vm_api::Pausable for VirtioPci {
    /// The worker takes no more work; what it is doing finishes first.
    fn pause(&self) -> Result<(), vm_api::ComponentError> {
        self.shared.paused.store(true, Ordering::Release);
        drop(lock(&self.shared.run_lock));
        Ok(())
    }

    /// The worker runs again, and runs every queue (work may have come meanwhile).
    fn resume(&self) -> Result<(), vm_api::ComponentError> {
        self.shared.paused.store(false, Ordering::Release);
        self.shared.missed.store(false, Ordering::Release);
        self.wake();
        Ok(())
    }
}

impl PciFunction for VirtioPci {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn config_read(&self, offset: u16, data: &mut [u8]) {
        let r = lock(&self.regs);
        if (reg::BAR0..reg::BAR0 + 24).contains(&offset) && data.len() == 4 {
            data.copy_from_slice(&r.bars.read(usize::from((offset - reg::BAR0) / 4)).to_le_bytes());
        } else {
            r.config.read(offset, data);
        }
    }

    fn config_write(&self, offset: u16, data: &[u8]) {
        let mut r = lock(&self.regs);
        if (reg::BAR0..reg::BAR0 + 24).contains(&offset) && data.len() == 4 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            r.bars.write(usize::from((offset - reg::BAR0) / 4), v);
        } else {
            r.config.write(offset, data);
        }
        self.sync_notify(&mut r);
        self.sync_msix(&r);
    }

    fn windows(&self) -> Vec<BarWindow> {
        let r = lock(&self.regs);
        r.bars
            .decoded(r.config.u16(reg::COMMAND))
            .into_iter()
            .map(|(s, addr)| BarWindow { bar: s.index, io: false, addr, size: s.size, mapped: Vec::new() })
            .collect()
    }

    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_AT + common::SIZE => self.common_read(&lock(&self.regs), o, data),
            o if (ISR_AT..ISR_AT + 4).contains(&o) => {
                // Reading the ISR clears it.
                put(data, u64::from(self.shared.isr.swap(0, Ordering::AcqRel)));
            }
            o if (DEVICE_AT..DEVICE_AT + DEVICE_LEN).contains(&o) => {
                self.shared.device.read_config(o - DEVICE_AT, data)
            }
            o if (MSIX_TABLE_AT..MSIX_PBA_AT).contains(&o) => {
                lock(&self.shared.vectors).table.read(o - MSIX_TABLE_AT, data)
            }
            o if (MSIX_PBA_AT..BAR_SIZE).contains(&o) => lock(&self.shared.vectors).read_pba(o - MSIX_PBA_AT, data),
            _ => {}
        }
    }

    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_AT + common::SIZE => {
                let mut r = lock(&self.regs);
                self.common_write(&mut r, o, data);
            }
            o if (DEVICE_AT..DEVICE_AT + DEVICE_LEN).contains(&o) => {
                self.shared.device.write_config(o - DEVICE_AT, data)
            }
            o if (NOTIFY_AT..MSIX_TABLE_AT).contains(&o) => {
                // A queue run on notification, or a notification the ioeventfd did
                // not catch (not yet registered).
                let i = ((o - NOTIFY_AT) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if self.shared.on_notify.get(i) == Some(&true) {
                    self.shared.run(u16::try_from(i).ok());
                } else if let Some(fd) = self.shared.notifiers.get(i) {
                    let _ = fd.write(1);
                }
            }
            o if (MSIX_TABLE_AT..MSIX_PBA_AT).contains(&o) => {
                let mut v = lock(&self.shared.vectors);
                if let pci::msix::TableChange::Vector(n) = v.table.write(o - MSIX_TABLE_AT, data) {
                    v.sync(n);
                }
            }
            _ => {}
        }
    }

    fn removed(&self) {
        let mut r = lock(&self.regs);
        r.worker = None;
        r.config.set_u16(reg::COMMAND, 0);
        self.sync_notify(&mut r);
        lock(&self.shared.vectors).reset();
    }
}
