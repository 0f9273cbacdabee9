//! Assigned devices: devices that reach guest memory only through their DMA domain.
//!
//! Each device gets a slot of MMIO space for its BARs (`abi::dma_engine` layout), a
//! DMA domain, and its MSI through the interrupt forwarding registry. The MSI
//! address/data registers are trapped by the VMM, as VFIO traps the MSI-X table: the
//! device only ever writes its eventfd.
//!
//! The device runs in the VMM (`Backend::Inline`) or in a process of its own over
//! vfio-user (`Backend::Remote`). For a remote device the VMM sends DMA_MAP / DMA_UNMAP
//! for exactly the domain's mappings, in the domain's order and in its batches: with
//! the guest-RAM memfd and offset (the device maps them and copies at memory speed),
//! or, in message mode, without an fd (every access is a DMA_READ / DMA_WRITE the VMM
//! checks against the domain).
//!
//! Every exchange with a device process is bounded by the device's timeout. A device
//! that does not take a message or answer in time is declared dead; so is one whose
//! process dies. Death is a surprise removal: logged once, its interrupts and mappings
//! torn down, its BARs read all-ones, its front-ends forget it.
//!
//! Unmap means gone, across processes: a DMA_UNMAP the device does not acknowledge is
//! not taken on trust. If passthru spawned the device, the process is killed and
//! reaped before the unmap returns; an external device (`vfio-user,socket=`) is
//! disconnected and declared dead. The guarantee is complete for devices passthru
//! spawned and for message mode (a device without the memfd touches nothing the VMM
//! does not check); an external server given the memfd keeps whatever mapping it made
//! until it exits, which passthru cannot force: use message mode for servers you do
//! not trust.

use crate::error::{Error, Result};
use crate::memory::GuestRam;
use crate::process::DeviceProcess;
use abi::dma_engine as de;
use devices::BusDevice;
use devices::dma_engine::{DmaEngine, InProcess};
use dma::{Access, DmaSpace, Domain, Iova, MapObserver, Mapping};
use irq::{GuestIrq, IrqRegistry, IrqSource, MsiMessage, SourceId, Trigger};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use vfio_user::client::{Client, DmaHandler};
use vfio_user::proto::{self, DmaMap};

/// How a remote device reaches guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IommuMode {
    /// DMA_MAP with the guest-RAM memfd: the device maps what the domain maps.
    SharedFd,
    /// No fd is shared: every access is a DMA_READ / DMA_WRITE message.
    Messages,
}

impl std::str::FromStr for IommuMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<IommuMode, String> {
        match s {
            "shared" | "shared-fd" => Ok(IommuMode::SharedFd),
            "messages" => Ok(IommuMode::Messages),
            _ => Err(format!("'{s}' is not an IOMMU mode; use shared or messages")),
        }
    }
}

/// How long a device process may take to accept a message or answer a request before
/// it is declared dead (`--device ...,timeout=`).
pub const DEFAULT_DEVICE_TIMEOUT: Duration = vfio_user::endpoint::DEFAULT_TIMEOUT;

/// A device process to attach.
pub struct RemoteSpec {
    /// The connection.
    pub stream: UnixStream,
    /// Shared fds or messages.
    pub mode: IommuMode,
    /// The process, when passthru spawned it (it is killed if it stops answering).
    pub process: Option<DeviceProcess>,
    /// Deadline of every exchange with it.
    pub timeout: Duration,
}

/// What runs the device.
pub enum Backend {
    /// The device model in the VMM process.
    Inline(DmaEngine),
    /// A device process over vfio-user (shared: calls go out without the lock held).
    Remote(Arc<Client>),
}

/// Interrupt index and vector of the device's MSI.
const MSI_SUB: u32 = 0;

/// The VMM's view of one assigned device.
pub struct AssignedDevice {
    name: String,
    slot: u64,
    domain: Arc<Domain>,
    irqs: Arc<IrqRegistry>,
    backend: Mutex<Option<Backend>>,
    process: Option<DeviceProcess>,
    /// Set once attach completed: only a device that came up can be "gone".
    up: AtomicBool,
    /// Set first when the device goes (death, cut-off, removal): BAR accesses stop
    /// reaching it.
    gone: AtomicBool,
    /// Guards the teardown (runs once).
    tearing_down: AtomicBool,
    /// Set by a deliberate removal: the closing connection is not a death.
    removing: AtomicBool,
    /// Set last, once its interrupts and mappings are all gone.
    torn_down: AtomicBool,
    /// The VMM's copy of the trapped MSI registers.
    msi: Mutex<(u64, u32)>,
    observer: Mutex<Option<Arc<dyn MapObserver>>>,
    /// Run once when the device is gone (front-ends forget it).
    gone_hooks: Mutex<Vec<Box<dyn FnOnce() + Send>>>,
}

impl std::fmt::Debug for AssignedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssignedDevice").field("name", &self.name).field("slot", &self.slot).finish()
    }
}

/// Answers a remote device's DMA_READ / DMA_WRITE: every access checked by the domain.
struct DomainDma(Mutex<DmaSpace>);

impl DmaHandler for DomainDma {
    fn dma_read(&self, address: u64, buf: &mut [u8]) -> std::result::Result<(), i32> {
        let space = self.0.lock().unwrap_or_else(|e| e.into_inner());
        space.read(Iova(address), buf).map_err(|_| libc::EFAULT)
    }

    fn dma_write(&self, address: u64, data: &[u8]) -> std::result::Result<(), i32> {
        let space = self.0.lock().unwrap_or_else(|e| e.into_inner());
        space.write(Iova(address), data).map_err(|_| libc::EFAULT)
    }
}

/// "exited with 3", "killed by signal 31 (SIGSYS)".
fn describe(s: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exited with {c}"),
        (None, Some(sig)) => {
            let name = match sig {
                libc::SIGKILL => " (SIGKILL)",
                libc::SIGSYS => " (SIGSYS: its seccomp filter stopped a forbidden system call)",
                libc::SIGSEGV => " (SIGSEGV)",
                libc::SIGBUS => " (SIGBUS)",
                libc::SIGABRT => " (SIGABRT)",
                _ => "",
            };
            format!("killed by signal {sig}{name}")
        }
        _ => "ended".to_string(),
    }
}

/// Turns the domain's mappings into DMA_MAP / DMA_UNMAP windows for the device process.
struct ForwardMaps {
    device: Weak<AssignedDevice>,
    ram: Arc<std::fs::File>,
    layout: Box<dyn Fn(u64) -> Option<(u64, u64)> + Send + Sync>,
    mode: IommuMode,
    /// Windows the device holds now, against the limit it announced (max_dma_maps).
    windows: AtomicU64,
}

fn dma_flags(m: &Mapping) -> u32 {
    let mut f = 0;
    if m.perm.allows(Access::Read) {
        f |= proto::DMA_READ_FLAG;
    }
    if m.perm.allows(Access::Write) {
        f |= proto::DMA_WRITE_FLAG;
    }
    f
}

impl ForwardMaps {
    /// The DMA_MAP windows of a mapping: one per host-contiguous piece of the memfd
    /// (shared mode), or the whole mapping without an fd (message mode).
    fn windows_of(&self, m: &Mapping) -> std::result::Result<Vec<(DmaMap, Option<RawFd>)>, String> {
        let flags = dma_flags(m);
        if self.mode == IommuMode::Messages {
            return Ok(vec![(DmaMap { flags, offset: 0, address: m.iova.0, size: m.size }, None)]);
        }
        let mut out = Vec::new();
        let mut done = 0;
        while done < m.size {
            let (offset, avail) = (self.layout)(m.gpa.0 + done)
                .ok_or_else(|| format!("guest-physical {:#x} is not in the guest-RAM memfd", m.gpa.0 + done))?;
            let size = avail.min(m.size - done);
            out.push((DmaMap { flags, offset, address: m.iova.0 + done, size }, Some(self.ram.as_raw_fd())));
            done += size;
        }
        Ok(out)
    }

    fn unmap_windows(&self, client: &Client, dev: &AssignedDevice, windows: &[(u64, u64)]) {
        if windows.is_empty() {
            return;
        }
        if let Err(e) = client.dma_unmap_batch(windows) {
            dev.cut_off(&format!("it did not acknowledge DMA_UNMAP: {e}"));
        }
        self.windows.fetch_sub(windows.len() as u64, Ordering::Relaxed);
    }
}

impl MapObserver for ForwardMaps {
    fn mapped(&self, maps: &[Mapping]) -> std::result::Result<(), String> {
        let dev = self.device.upgrade().ok_or("the device is gone")?;
        let client = dev.client().ok_or("the device is gone")?;
        let mut windows = Vec::new();
        for m in maps {
            windows.extend(self.windows_of(m)?);
        }
        let max = client.limits().max_dma_maps;
        let held = self.windows.fetch_add(windows.len() as u64, Ordering::Relaxed);
        if held + windows.len() as u64 > max {
            self.windows.fetch_sub(windows.len() as u64, Ordering::Relaxed);
            return Err(format!("the device holds {held} DMA windows of the {max} it accepts"));
        }
        let results = client.dma_map_batch(&windows);
        if let Some(e) = results.iter().find_map(|r| r.as_ref().err()) {
            // Take back what the device did map: the domain undoes the whole batch.
            let made: Vec<(u64, u64)> = windows
                .iter()
                .zip(&results)
                .filter(|(_, r)| r.is_ok())
                .map(|((m, _), _)| (m.address, m.size))
                .collect();
            let why = format!("the device refused DMA_MAP: {e}");
            self.windows.fetch_sub((windows.len() - made.len()) as u64, Ordering::Relaxed);
            self.unmap_windows(&client, &dev, &made);
            return Err(why);
        }
        Ok(())
    }

    fn unmapped(&self, maps: &[Mapping]) {
        let Some(dev) = self.device.upgrade() else { return };
        let Some(client) = dev.client() else { return };
        let mut windows = Vec::new();
        for m in maps {
            match self.windows_of(m) {
                Ok(w) => windows.extend(w.into_iter().map(|(d, _)| (d.address, d.size))),
                Err(e) => tracing::error!("device {}: unmapping {:#x}: {e}", dev.name, m.iova.0),
            }
        }
        self.unmap_windows(&client, &dev, &windows);
    }
}

/// Undoes a partly done attach when dropped (unless disarmed): nothing of a device
/// that never came up stays behind (no interrupt source holding it, no observer, no
/// connection, no process).
struct AttachGuard {
    dev: Arc<AssignedDevice>,
    armed: bool,
}

impl Drop for AttachGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let d = &self.dev;
        d.gone.store(true, Ordering::Release);
        if let Some(o) = d.observer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            d.domain.remove_observer(&o);
        }
        d.irqs.detach_device(&d.name);
        let backend = d.backend.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(backend);
        if let Some(p) = &d.process {
            p.kill_and_reap(Duration::from_secs(5));
        }
    }
}

impl AssignedDevice {
    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Guest-physical address of BAR 0.
    pub fn bar0(&self) -> u64 {
        de::DEVICE_MMIO_BASE + self.slot * de::DEVICE_MMIO_STRIDE
    }

    /// Guest-physical address of BAR 1.
    pub fn bar1(&self) -> u64 {
        self.bar0() + de::BAR1_OFFSET
    }

    /// The device's DMA domain.
    pub fn domain(&self) -> &Arc<Domain> {
        &self.domain
    }

    /// The device process passthru spawned for it, if any.
    pub fn process(&self) -> Option<&DeviceProcess> {
        self.process.as_ref()
    }

    /// True once the device is gone (its process died or stopped answering, or it was
    /// removed); its teardown may still be running.
    pub fn is_dead(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    /// True once a gone device's interrupts, observer and mappings are all removed.
    pub fn is_torn_down(&self) -> bool {
        self.torn_down.load(Ordering::Acquire)
    }

    /// The MSI's source name in the interrupt registry.
    pub fn msi_source(&self) -> SourceId {
        SourceId::new(&self.name, proto::PCI_MSI, MSI_SUB)
    }

    /// The connection to the device process, if it has one and it is open.
    fn client(&self) -> Option<Arc<Client>> {
        match self.backend.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(Backend::Remote(c)) if !c.is_closed() && !self.is_dead() => Some(Arc::clone(c)),
            _ => None,
        }
    }

    /// Attaches a device in slot `slot`: in the VMM, or the device process on `remote`.
    /// On failure nothing of it is left behind.
    pub(crate) fn attach(
        name: &str,
        slot: u64,
        domain: Arc<Domain>,
        irqs: Arc<IrqRegistry>,
        ram: &GuestRam,
        remote: Option<RemoteSpec>,
    ) -> Result<Arc<AssignedDevice>> {
        let (remote, process) = match remote {
            Some(r) => (Some((r.stream, r.mode, r.timeout)), r.process),
            None => (None, None),
        };
        let dev = Arc::new(AssignedDevice {
            name: name.to_string(),
            slot,
            domain: Arc::clone(&domain),
            irqs: Arc::clone(&irqs),
            backend: Mutex::new(None),
            process,
            up: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            tearing_down: AtomicBool::new(false),
            removing: AtomicBool::new(false),
            torn_down: AtomicBool::new(false),
            msi: Mutex::new((0, 0)),
            observer: Mutex::new(None),
            gone_hooks: Mutex::new(Vec::new()),
        });
        let mut guard = AttachGuard { dev: Arc::clone(&dev), armed: true };
        let fail = |e: String| Error::Device(name.into(), e);
        let irq = irq::eventfd().map_err(Error::EventFd)?;
        let source =
            IrqSource { id: dev.msi_source(), trigger: Trigger::Edge(irq.try_clone().map_err(Error::EventFd)?) };
        // Until the guest programs the MSI registers, the route points at vector 0x20.
        irqs.attach(source, GuestIrq::Msi(MsiMessage::fixed(0, 0x20)), dev.clone())
            .map_err(|e| Error::Irq(e.to_string()))?;
        match remote {
            None => {
                let engine = DmaEngine::new(Box::new(InProcess(DmaSpace::new(Arc::clone(&domain), name))))
                    .map_err(Error::Thread)?;
                engine.set_irq(Some(irq));
                *dev.backend.lock().unwrap_or_else(|e| e.into_inner()) = Some(Backend::Inline(engine));
            }
            Some((stream, mode, timeout)) => {
                let handler = Arc::new(DomainDma(Mutex::new(DmaSpace::new(Arc::clone(&domain), name))));
                let weak = Arc::downgrade(&dev);
                let on_close: vfio_user::client::OnClose = Box::new(move |why| {
                    if let Some(d) = weak.upgrade() {
                        d.died(&why.to_string());
                    }
                });
                let client = Client::connect_with_timeout(stream, handler, on_close, timeout)
                    .map_err(|e| fail(format!("the device did not come up: {e}")))?;
                client
                    .set_irqs(proto::PCI_MSI, 0, &[irq.as_raw_fd()])
                    .map_err(|e| fail(format!("setting up its MSI: {e}")))?;
                *dev.backend.lock().unwrap_or_else(|e| e.into_inner()) = Some(Backend::Remote(Arc::new(client)));
                let memfd = Arc::clone(ram.memfd());
                let size = ram.size();
                let layout = Box::new(move |gpa: u64| crate::memory::memfd_offset(size, gpa));
                let observer: Arc<dyn MapObserver> = Arc::new(ForwardMaps {
                    device: Arc::downgrade(&dev),
                    ram: memfd,
                    layout,
                    mode,
                    windows: AtomicU64::new(0),
                });
                domain
                    .add_observer(Arc::clone(&observer))
                    .map_err(|e| fail(format!("giving it the DMA domain's mappings: {e}")))?;
                *dev.observer.lock().unwrap_or_else(|e| e.into_inner()) = Some(observer);
            }
        }
        guard.armed = false;
        drop(guard);
        dev.up.store(true, Ordering::Release);
        // The connection may have died while we set up: the death was quiet then.
        if dev.client().is_none()
            && matches!(*dev.backend.lock().unwrap_or_else(|e| e.into_inner()), Some(Backend::Remote(_)))
        {
            dev.died("the connection closed while the device was attached");
        }
        Ok(dev)
    }

    /// The device is gone (its process died or stopped answering): its interrupts and
    /// mappings are torn down, its BARs read as all-ones from now on. Safe to call more
    /// than once; says so (once) only for a device that had come up.
    pub fn died(&self, why: &str) {
        if !self.up.load(Ordering::Acquire) || self.removing.load(Ordering::Acquire) {
            self.gone.store(true, Ordering::Release);
            return;
        }
        if let Some(p) = &self.process {
            // A device whose connection is gone may still hold guest memory: end it.
            p.kill_and_reap(Duration::from_secs(5));
        }
        if self.teardown() {
            let how = self.process.as_ref().and_then(|p| p.status()).map(|s| format!("; process {}", describe(s)));
            eprintln!(
                "passthru: device {} is gone ({why}{}); its BARs now read all-ones",
                self.name,
                how.unwrap_or_default()
            );
        }
    }

    /// Cuts the device off now (it failed to let go of memory, or to answer): a spawned
    /// process is killed and reaped before this returns, an external one disconnected.
    /// The full teardown follows on the connection's reader thread ([`Self::died`]).
    fn cut_off(&self, why: &str) {
        tracing::error!("device {}: {why}; cutting it off", self.name);
        self.gone.store(true, Ordering::Release);
        if let Some(p) = &self.process {
            p.kill_and_reap(Duration::from_secs(5));
        }
        if let Some(Backend::Remote(c)) = self.backend.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            c.endpoint().declare_dead(why);
        }
    }

    /// Tears the device's interrupts and mappings down once; true the first time.
    fn teardown(&self) -> bool {
        self.gone.store(true, Ordering::Release);
        if self.tearing_down.swap(true, Ordering::AcqRel) {
            return false;
        }
        let hooks = std::mem::take(&mut *self.gone_hooks.lock().unwrap_or_else(|e| e.into_inner()));
        for hook in hooks {
            hook();
        }
        self.irqs.detach_device(&self.name);
        if let Some(o) = self.observer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            self.domain.remove_observer(&o);
        }
        self.domain.unmap_all();
        self.torn_down.store(true, Ordering::Release);
        true
    }

    /// Runs `hook` when the device is gone (or now, if it already is). The check is
    /// made under the hooks' lock, so a hook added while the device dies still runs.
    pub fn on_gone(&self, hook: Box<dyn FnOnce() + Send>) {
        let mut hooks = self.gone_hooks.lock().unwrap_or_else(|e| e.into_inner());
        if self.tearing_down.load(Ordering::Acquire) {
            drop(hooks);
            hook();
        } else {
            hooks.push(hook);
        }
    }

    /// Removes the device (VM shutdown, unplug): torn down as a death, quietly, then
    /// its backend is stopped (a device process sees the connection close and exits;
    /// it is reaped, or killed if it lingers).
    pub fn remove(&self) {
        // A connection that died before the removal is a death, and says so.
        let dead_peer = match self.backend.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(Backend::Remote(c)) if c.is_closed() => {
                Some(c.endpoint().death().unwrap_or_else(|| "the vfio-user connection is closed".into()))
            }
            _ => None,
        };
        if let Some(why) = dead_peer {
            self.died(&why);
        }
        self.removing.store(true, Ordering::Release);
        self.teardown();
        let backend = self.backend.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(backend);
        if let Some(p) = &self.process {
            p.reap(Duration::from_secs(5));
        }
    }

    fn bar_read(&self, bar: u32, offset: u64, data: &mut [u8]) {
        if self.is_dead() {
            data.fill(0xff);
            return;
        }
        let client = {
            let backend = self.backend.lock().unwrap_or_else(|e| e.into_inner());
            match backend.as_ref() {
                Some(Backend::Inline(e)) if bar == 0 => return e.read_reg(offset, data),
                Some(Backend::Inline(e)) => return e.read_scratch(offset, data),
                Some(Backend::Remote(c)) => Arc::clone(c),
                None => return data.fill(0xff),
            }
        };
        // No lock held across the exchange: a slow device delays only this access.
        if client.region_read(bar, offset, data).is_err() {
            data.fill(0xff);
        }
    }

    fn bar_write(&self, bar: u32, offset: u64, data: &[u8]) {
        if self.is_dead() {
            return;
        }
        if bar == 0 && (de::regs::MSI_ADDR..de::regs::MSI_DATA + 4).contains(&offset) {
            self.trap_msi(offset, data);
        }
        let client = {
            let backend = self.backend.lock().unwrap_or_else(|e| e.into_inner());
            match backend.as_ref() {
                Some(Backend::Inline(e)) if bar == 0 => return e.write_reg(offset, data),
                Some(Backend::Inline(e)) => return e.write_scratch(offset, data),
                Some(Backend::Remote(c)) => Arc::clone(c),
                None => return,
            }
        };
        // MMIO writes are posted: the vCPU does not wait for the device.
        if let Err(e) = client.region_write_posted(bar, offset, data) {
            tracing::debug!("device {}: BAR {bar} write at {offset:#x}: {e}", self.name);
        }
    }

    /// The guest programmed its MSI: the VMM updates the route, not the device.
    fn trap_msi(&self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(b);
        let mut msi = self.msi.lock().unwrap_or_else(|e| e.into_inner());
        match offset {
            de::regs::MSI_ADDR if n >= 8 => msi.0 = v,
            de::regs::MSI_ADDR => msi.0 = (msi.0 & !0xffff_ffff) | (v & 0xffff_ffff),
            0x3c => msi.0 = (msi.0 & 0xffff_ffff) | ((v & 0xffff_ffff) << 32),
            de::regs::MSI_DATA => msi.1 = v as u32,
            _ => return,
        }
        if msi.0 & 0xfff0_0000 == 0xfee0_0000 {
            let m = MsiMessage { address: msi.0, data: msi.1 };
            if let Err(e) = self.irqs.set_msi(&self.msi_source(), m) {
                tracing::warn!("device {}: MSI update: {e}", self.name);
            }
        }
    }

    /// The bus devices for BAR 0 and BAR 1.
    pub(crate) fn bars(self: &Arc<Self>) -> [(u64, u64, devices::SharedDevice); 2] {
        [
            (self.bar0(), de::BAR0_SIZE, Arc::new(Mutex::new(Bar { dev: Arc::clone(self), bar: 0 }))),
            (self.bar1(), de::BAR1_SIZE, Arc::new(Mutex::new(Bar { dev: Arc::clone(self), bar: 1 }))),
        ]
    }
}

/// One BAR of an assigned device on the MMIO bus.
struct Bar {
    dev: Arc<AssignedDevice>,
    bar: u32,
}

impl BusDevice for Bar {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.dev.bar_read(self.bar, offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.dev.bar_write(self.bar, offset, data);
    }
}
