//! Assigned devices: devices that reach guest memory only through their DMA domain.
//!
//! Each device gets a slot of MMIO space for its BARs (`abi::dma_engine` layout), a
//! DMA domain (the identity domain: no guest-visible IOMMU yet), and its MSI through
//! the interrupt forwarding registry. The MSI address/data registers are trapped by the
//! VMM, as VFIO traps the MSI-X table: the device only ever writes its eventfd.
//!
//! The device runs in the VMM (`Backend::Inline`) or in a process of its own over
//! vfio-user (`Backend::Remote`). For a remote device the VMM sends DMA_MAP / DMA_UNMAP
//! for exactly the domain's mappings: with the guest-RAM memfd and offset (the device
//! maps them and copies at memory speed), or, in message mode, without an fd (every
//! access is a DMA_READ / DMA_WRITE the VMM checks against the domain). If the device
//! process dies, the VMM logs it, tears down the device's interrupts and mappings,
//! and the guest reads all-ones from its BARs, like a surprise-removed PCI device.

use crate::error::{Error, Result};
use crate::memory::GuestRam;
use abi::dma_engine as de;
use devices::BusDevice;
use devices::dma_engine::{DmaEngine, InProcess};
use dma::{Access, DmaSpace, Domain, Iova, MapObserver, Mapping};
use irq::{GuestIrq, IrqRegistry, IrqSource, MsiMessage, SourceId, Trigger};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use vfio_user::client::{Client, DmaHandler};
use vfio_user::proto::{self, DmaMap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

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

/// What runs the device.
pub enum Backend {
    /// The device model in the VMM process.
    Inline(DmaEngine),
    /// A device process over vfio-user.
    Remote(Client),
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
    /// Set first when the device goes: BAR accesses stop reaching it.
    dead: AtomicBool,
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

/// Turns the domain's mappings into DMA_MAP / DMA_UNMAP for the device process.
struct ForwardMaps {
    device: Weak<AssignedDevice>,
    ram: Arc<std::fs::File>,
    layout: Box<dyn Fn(u64) -> Option<(u64, u64)> + Send + Sync>,
    mode: IommuMode,
}

impl ForwardMaps {
    fn with_client<T>(&self, f: impl FnOnce(&Client) -> T) -> Option<T> {
        let dev = self.device.upgrade()?;
        let backend = dev.backend.lock().unwrap_or_else(|e| e.into_inner());
        match backend.as_ref() {
            Some(Backend::Remote(c)) if !c.is_closed() => Some(f(c)),
            _ => None,
        }
    }
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

impl MapObserver for ForwardMaps {
    fn mapped(&self, m: &Mapping) -> std::result::Result<(), String> {
        let flags = dma_flags(m);
        let r = self.with_client(|c| match self.mode {
            // Posted: ordered before every later request on the connection (see
            // Client::dma_map_posted); the guest's MAP does not wait for the device.
            IommuMode::Messages => c.dma_map_posted(DmaMap { flags, offset: 0, address: m.iova.0, size: m.size }, None),
            IommuMode::SharedFd => {
                // One DMA_MAP per host-contiguous piece of the memfd.
                let mut done = 0;
                while done < m.size {
                    let Some((offset, avail)) = (self.layout)(m.gpa.0 + done) else {
                        return Err(vfio_user::Error::Remote { command: proto::Command::DmaMap, errno: libc::EFAULT });
                    };
                    let size = avail.min(m.size - done);
                    let map = DmaMap { flags, offset, address: m.iova.0 + done, size };
                    c.dma_map_posted(map, Some(self.ram.as_raw_fd()))?;
                    done += size;
                }
                Ok(())
            }
        });
        match r {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(e.to_string()),
            None => Err("the device is gone".into()),
        }
    }

    fn unmapped(&self, m: &Mapping) {
        if let Some(Err(e)) = self.with_client(|c| c.dma_unmap(m.iova.0, m.size)) {
            tracing::warn!("DMA_UNMAP of {:#x}+{:#x}: {e}", m.iova.0, m.size);
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

    /// True once the device is gone (its process died, or it was removed); its
    /// teardown may still be running.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// True once a gone device's interrupts, observer and mappings are all removed.
    pub fn is_torn_down(&self) -> bool {
        self.torn_down.load(Ordering::Acquire)
    }

    /// The MSI's source name in the interrupt registry.
    pub fn msi_source(&self) -> SourceId {
        SourceId::new(&self.name, proto::PCI_MSI, MSI_SUB)
    }

    /// Attaches a device in slot `slot`, run by what `connect` builds.
    pub(crate) fn attach(
        name: &str,
        slot: u64,
        domain: Arc<Domain>,
        irqs: Arc<IrqRegistry>,
        ram: &GuestRam,
        remote: Option<(UnixStream, IommuMode)>,
    ) -> Result<Arc<AssignedDevice>> {
        let dev = Arc::new(AssignedDevice {
            name: name.to_string(),
            slot,
            domain: Arc::clone(&domain),
            irqs: Arc::clone(&irqs),
            backend: Mutex::new(None),
            dead: AtomicBool::new(false),
            torn_down: AtomicBool::new(false),
            msi: Mutex::new((0, 0)),
            observer: Mutex::new(None),
            gone_hooks: Mutex::new(Vec::new()),
        });
        let irq = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        let source =
            IrqSource { id: dev.msi_source(), trigger: Trigger::Edge(irq.try_clone().map_err(Error::EventFd)?) };
        // Until the guest programs the MSI registers, the route points at vector 0x20.
        irqs.attach(source, GuestIrq::Msi(MsiMessage::fixed(0, 0x20)), dev.clone())
            .map_err(|e| Error::Irq(e.to_string()))?;
        let backend = match remote {
            None => {
                let engine = DmaEngine::new(Box::new(InProcess(DmaSpace::new(Arc::clone(&domain), name))))
                    .map_err(Error::Thread)?;
                engine.set_irq(Some(irq));
                Backend::Inline(engine)
            }
            Some((stream, mode)) => {
                let handler = Arc::new(DomainDma(Mutex::new(DmaSpace::new(Arc::clone(&domain), name))));
                let weak = Arc::downgrade(&dev);
                let on_close: vfio_user::client::OnClose = Box::new(move |why| {
                    if let Some(d) = weak.upgrade() {
                        d.died(&why.to_string());
                    }
                });
                let client = Client::connect(stream, handler, on_close)
                    .map_err(|e| Error::Device(name.into(), e.to_string()))?;
                client
                    .set_irqs(proto::PCI_MSI, 0, &[irq.as_raw_fd()])
                    .map_err(|e| Error::Device(name.into(), e.to_string()))?;
                *dev.backend.lock().unwrap_or_else(|e| e.into_inner()) = Some(Backend::Remote(client));
                let memfd = Arc::clone(ram.memfd());
                let size = ram.size();
                let layout = Box::new(move |gpa: u64| crate::memory::memfd_offset(size, gpa));
                let observer: Arc<dyn MapObserver> =
                    Arc::new(ForwardMaps { device: Arc::downgrade(&dev), ram: memfd, layout, mode });
                domain.add_observer(Arc::clone(&observer)).map_err(|e| Error::Device(name.into(), e.to_string()))?;
                *dev.observer.lock().unwrap_or_else(|e| e.into_inner()) = Some(observer);
                return Ok(dev);
            }
        };
        *dev.backend.lock().unwrap_or_else(|e| e.into_inner()) = Some(backend);
        Ok(dev)
    }

    /// The device is gone: its interrupts and mappings are torn down, its BARs read as
    /// all-ones from now on. Safe to call more than once.
    pub fn died(&self, why: &str) {
        if self.teardown() {
            eprintln!("passthru: device {} is gone ({why}); its BARs now read all-ones", self.name);
        }
    }

    /// Tears the device's interrupts and mappings down once; true the first time.
    fn teardown(&self) -> bool {
        if self.dead.swap(true, Ordering::AcqRel) {
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
        if self.is_dead() {
            drop(hooks);
            hook();
        } else {
            hooks.push(hook);
        }
    }

    /// Removes the device (VM shutdown, unplug): torn down as a death, quietly, then
    /// its backend is stopped (a device process sees the connection close and exits).
    pub fn remove(&self) {
        self.teardown();
        let backend = self.backend.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(backend);
    }

    fn bar_read(&self, bar: u32, offset: u64, data: &mut [u8]) {
        if self.is_dead() {
            data.fill(0xff);
            return;
        }
        let backend = self.backend.lock().unwrap_or_else(|e| e.into_inner());
        match backend.as_ref() {
            Some(Backend::Inline(e)) if bar == 0 => e.read_reg(offset, data),
            Some(Backend::Inline(e)) => e.read_scratch(offset, data),
            Some(Backend::Remote(c)) => {
                if c.region_read(bar, offset, data).is_err() {
                    data.fill(0xff);
                }
            }
            None => data.fill(0xff),
        }
    }

    fn bar_write(&self, bar: u32, offset: u64, data: &[u8]) {
        if self.is_dead() {
            return;
        }
        if bar == 0 && (de::regs::MSI_ADDR..de::regs::MSI_DATA + 4).contains(&offset) {
            self.trap_msi(offset, data);
        }
        let backend = self.backend.lock().unwrap_or_else(|e| e.into_inner());
        match backend.as_ref() {
            Some(Backend::Inline(e)) if bar == 0 => e.write_reg(offset, data),
            Some(Backend::Inline(e)) => e.write_scratch(offset, data),
            Some(Backend::Remote(c)) => {
                // MMIO writes are posted: the vCPU does not wait for the device.
                if let Err(e) = c.region_write_posted(bar, offset, data) {
                    tracing::warn!("device {}: BAR {bar} write at {offset:#x}: {e}", self.name);
                }
            }
            None => {}
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
    pub(crate) fn bars(self: &Arc<Self>) -> [(u64, u64, devices::bus::SharedDevice); 2] {
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
