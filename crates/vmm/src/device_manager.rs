//! The device manager: assigned PCI functions plugged into the root complex, each
//! handed to the DMA front-end its `--device ...,dma=NAME` names.
//!
//! Attaching a device runs its steps in order: an endpoint (blocked), the function
//! (connection, configuration space, regions, interrupts, DMA forwarding), a slot on
//! bus 0 (BARs placed, windows on the buses and in the memory map), the front-end
//! (domain chosen, endpoint attached). A step that fails undoes every step before it
//! ([`Rollback`]): no fd, thread, route, mapping, pin or reference is left. Devices
//! may be attached and detached while the guest runs (hot-plug); the guest learns of
//! them by rescanning the bus.
//!
//! Lock order (see docs/architecture.md): the manager's `devices` lock, then the root's
//! slot table, then a function's state, then the interrupt registry and the DMA
//! domain and endpoint locks. A device's death runs on its connection's reader thread
//! and takes no manager lock: its hooks tell the front-end and the root.

use crate::error::{Error, Result};
use devices::process::DeviceProcess;
use devices::vfio_pci::{AssignedFunction, Backend, Services};
use dma::{DmaSpace, Endpoint, VmDma};
use iommu::{Frontend, Frontends};
use irq::IrqRegistry;
use pci::{BarWindow, PciFunction, PciRoot};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use devices::vfio_pci::dma::IommuMode;

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

/// What runs an assigned device.
pub enum DeviceSpec {
    /// passthru's DMA engine, in the VMM process.
    Inline,
    /// A vfio-user device model in the VMM process.
    Local(Box<dyn vfio_user::server::Device>),
    /// A device process already connected, over vfio-user.
    Remote(RemoteSpec),
}

/// How a device is attached beyond its backend and front-end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachOptions {
    /// The device snoops CPU caches (`coherent=false` declares a device that does not:
    /// non-coherent from the start).
    pub coherent: bool,
    /// Its domain enforces snooping (an IOMMU with snoop control); off, the guest's
    /// PCIe No Snoop makes the device non-coherent (`enforce-snoop=off`).
    pub enforce_snoop: bool,
    /// Options for the device's DMA front-end (`group=2` for tce).
    pub frontend_params: Vec<(String, String)>,
    /// Its name (None: the next `dma<N>`/`vfu<N>`; a restore gives the saved one).
    pub name: Option<String>,
    /// Its slot (None: the first free one; a restore gives the saved one).
    pub slot: Option<u8>,
}

impl Default for AttachOptions {
    fn default() -> AttachOptions {
        AttachOptions { coherent: true, enforce_snoop: true, frontend_params: Vec::new(), name: None, slot: None }
    }
}

/// The VM's count of non-coherent devices, as KVM keeps `noncoherent_dma_count`: a
/// device is counted from the moment it is non-coherent until it leaves the VM
/// (unplug, death). 0 -> 1 and 1 -> 0 are events: on real KVM they change every memory
/// type of the VM.
#[derive(Default)]
pub struct NonCoherent {
    devices: Mutex<std::collections::BTreeSet<String>>,
    transitions: std::sync::atomic::AtomicU64,
}

impl NonCoherent {
    fn add(&self, name: &str) {
        let mut d = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        if d.insert(name.to_string()) && d.len() == 1 {
            self.transitions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            eprintln!("passthru: non-coherent DMA in the VM from now on (device {name})");
        }
    }

    fn remove(&self, name: &str) {
        let mut d = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        if d.remove(name) && d.is_empty() {
            self.transitions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            eprintln!("passthru: no non-coherent DMA in the VM any more (device {name} left)");
        }
    }

    /// Devices counted now.
    pub fn count(&self) -> usize {
        self.devices.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Their names.
    pub fn devices(&self) -> Vec<String> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    /// 0 -> 1 and 1 -> 0 transitions so far.
    pub fn transitions(&self) -> u64 {
        self.transitions.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// One assigned device: its function, its slot, its front-end.
pub struct AssignedDevice {
    name: String,
    slot: u8,
    function: Arc<AssignedFunction>,
    frontend: Arc<dyn Frontend>,
    root: Arc<PciRoot>,
}

impl std::fmt::Debug for AssignedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssignedDevice").field("name", &self.name).field("slot", &self.slot).finish()
    }
}

impl AssignedDevice {
    /// Its name (`dma0`, `vfu1`...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its slot on bus 0.
    pub fn slot(&self) -> u8 {
        self.slot
    }

    /// Its requester id (bus 0, function 0): the id its front-end's calls take.
    pub fn bdf(&self) -> u16 {
        abi::pci::bdf(0, self.slot, 0)
    }

    /// "00:03.0".
    pub fn bdf_string(&self) -> String {
        format!("00:{:02x}.0", self.slot)
    }

    /// The root complex it is plugged into.
    pub(crate) fn root(&self) -> &Arc<PciRoot> {
        &self.root
    }

    /// The PCI function.
    pub fn function(&self) -> &Arc<AssignedFunction> {
        &self.function
    }

    /// The front-end that programs its DMA.
    pub fn frontend(&self) -> &Arc<dyn Frontend> {
        &self.frontend
    }

    /// Its BARs as they decode now.
    pub fn bars(&self) -> Vec<BarWindow> {
        self.root.windows(self.slot)
    }

    /// Guest address of memory BAR `bar`, if it decodes.
    pub fn bar(&self, bar: u8) -> Option<u64> {
        self.bars().into_iter().find(|w| w.bar == bar && !w.io).map(|w| w.addr)
    }

    /// The DMA endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        self.function.endpoint()
    }

    /// The device process passthru spawned for it, if any.
    pub fn process(&self) -> Option<&DeviceProcess> {
        self.function.process()
    }

    /// True once the device is gone (died, or removed).
    pub fn is_dead(&self) -> bool {
        self.function.is_dead()
    }

    /// True once a gone device's interrupts and DMA are all released.
    pub fn is_torn_down(&self) -> bool {
        self.function.is_torn_down()
    }
}

/// The steps of an attach done so far, undone in reverse when dropped armed.
struct Rollback<'a> {
    manager: &'a DeviceManager,
    function: Option<Arc<AssignedFunction>>,
    slot: Option<u8>,
    armed: bool,
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        match (self.slot, &self.function) {
            // Unplugging tells the function it is removed.
            (Some(n), _) => {
                self.manager.root.unplug(n);
            }
            (None, Some(f)) => f.remove(),
            (None, None) => {}
        }
    }
}

/// The VM's assigned devices.
pub struct DeviceManager {
    root: Arc<PciRoot>,
    frontends: Frontends,
    irqs: Arc<IrqRegistry>,
    dma: Arc<VmDma>,
    devices: Mutex<Vec<Arc<AssignedDevice>>>,
    noncoherent: Arc<NonCoherent>,
    /// Numbers device names.
    next: Mutex<u32>,
    /// A step made to fail (rollback tests).
    fail_at: Mutex<Option<AttachStep>>,
    /// Where devices added, removed and gone are told.
    events: Arc<crate::events::Events>,
    /// ACPI PCI hot-plug: told of each plug and unplug (a leaf lock, a non-blocking
    /// eventfd write).
    hotplug: Arc<crate::hotplug::AcpiHotplug>,
}

/// Steps of an attach (for the rollback tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachStep {
    /// After the function is built.
    Function,
    /// After it is plugged.
    Plug,
    /// After its front-end took it.
    Frontend,
}

impl DeviceManager {
    /// A manager plugging into `root`, handing devices to `frontends`.
    pub fn new(
        root: Arc<PciRoot>,
        frontends: Frontends,
        irqs: Arc<IrqRegistry>,
        dma: Arc<VmDma>,
        events: Arc<crate::events::Events>,
        hotplug: Arc<crate::hotplug::AcpiHotplug>,
    ) -> DeviceManager {
        DeviceManager {
            events,
            root,
            frontends,
            irqs,
            dma,
            devices: Mutex::new(Vec::new()),
            noncoherent: Arc::new(NonCoherent::default()),
            next: Mutex::new(0),
            fail_at: Mutex::new(None),
            hotplug,
        }
    }

    /// Where plugs and unplugs are announced to an ACPI guest.
    pub fn hotplug(&self) -> &Arc<crate::hotplug::AcpiHotplug> {
        &self.hotplug
    }

    /// The root complex.
    pub fn root(&self) -> &Arc<PciRoot> {
        &self.root
    }

    /// The VM's DMA front-ends.
    pub fn frontends(&self) -> &Frontends {
        &self.frontends
    }

    /// The VM's non-coherent devices.
    pub fn noncoherent(&self) -> &Arc<NonCoherent> {
        &self.noncoherent
    }

    /// The devices attached now.
    pub fn list(&self) -> Vec<Arc<AssignedDevice>> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The device named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<AssignedDevice>> {
        self.list().into_iter().find(|d| d.name == name)
    }

    /// Attaches a device whose DMA the front-end `frontend` programs; it takes the
    /// first free slot. On failure nothing of it is left.
    pub fn attach(&self, spec: DeviceSpec, frontend: &str) -> Result<Arc<AssignedDevice>> {
        self.attach_with(spec, frontend, AttachOptions::default())
    }

    /// As [`DeviceManager::attach`], with options (coherency).
    pub fn attach_with(&self, spec: DeviceSpec, frontend: &str, options: AttachOptions) -> Result<Arc<AssignedDevice>> {
        let _span = tracing::info_span!("attach", frontend).entered();
        let r = self.attach_inner(spec, frontend, options);
        match &r {
            Ok(d) => tracing::info!(device = %d.name, bdf = %d.bdf_string(), "attached"),
            Err(e) => tracing::info!("refused: {e}"),
        }
        r
    }

    fn attach_inner(&self, spec: DeviceSpec, frontend: &str, options: AttachOptions) -> Result<Arc<AssignedDevice>> {
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        // Built now if this VM has not used it yet.
        let fe = self.frontends.get_or_build(frontend).map_err(|e| Error::Device("-".into(), e.to_string()))?;
        let name = self.name_for(&devices, &spec, options.name.clone())?;
        let fail = |e: String| Error::Device(name.clone(), e);
        let endpoint = Endpoint::new(&self.dma, &name);
        let backend = match spec {
            DeviceSpec::Inline => {
                let memory = Box::new(devices::dma_engine::InProcess(DmaSpace::of(&endpoint)));
                let engine = devices::dma_engine::vfio::EngineServer::new(memory).map_err(Error::Thread)?;
                Backend::Local(Box::new(engine))
            }
            DeviceSpec::Local(d) => Backend::Local(d),
            DeviceSpec::Remote(r) => {
                Backend::Remote { stream: r.stream, mode: r.mode, process: r.process, timeout: r.timeout }
            }
        };
        let services = Services { irqs: Arc::clone(&self.irqs), memory: Arc::clone(&self.dma) };
        let mut rollback = Rollback { manager: self, function: None, slot: None, armed: true };
        let function =
            AssignedFunction::attach(&name, backend, endpoint.clone(), services).map_err(|e| fail(e.to_string()))?;
        rollback.function = Some(Arc::clone(&function));
        self.inject(AttachStep::Function).map_err(fail)?;
        let slot = match options.slot {
            Some(n) => self.root.plug_at(n, Arc::clone(&function) as Arc<dyn PciFunction>).map(|()| n),
            None => self.root.plug(Arc::clone(&function) as Arc<dyn PciFunction>),
        }
        .map_err(|e| fail(e.to_string()))?;
        rollback.slot = Some(slot);
        self.inject(AttachStep::Plug).map_err(fail)?;
        let bdf = abi::pci::bdf(0, slot, 0);
        let weak = Arc::downgrade(&function);
        let fail_device: iommu::FailDevice = Arc::new(move |why: &str| {
            if let Some(f) = weak.upgrade() {
                f.died(why);
            }
        });
        let params = options.frontend_params.clone();
        fe.attach(&iommu::Device { id: bdf, name: name.clone(), endpoint, fail: fail_device, params })
            .map_err(|e| fail(format!("DMA front-end {}: {e}", fe.name())))?;
        let undo_frontend = {
            let fe = Arc::clone(&fe);
            move || fe.detach(bdf)
        };
        if let Err(e) = self.inject(AttachStep::Frontend) {
            undo_frontend();
            return Err(fail(e));
        }
        self.wire_hooks(&function, &name, slot, Box::new(undo_frontend), &options);
        rollback.armed = false;
        let dev = Arc::new(AssignedDevice { name, slot, function, frontend: fe, root: Arc::clone(&self.root) });
        devices.push(Arc::clone(&dev));
        self.hotplug.plugged(dev.slot);
        self.events.publish(crate::events::Event::DeviceAdded {
            name: dev.name.clone(),
            bdf: dev.bdf_string(),
            frontend: dev.frontend.name().to_string(),
        });
        Ok(dev)
    }

    /// The new device's name: the one given (a restore; unique), or the next of its
    /// kind (`dma`, `vfu`, `dev`). Names given move the counter past them, so later
    /// hot-plugs do not reuse them.
    fn name_for(&self, devices: &[Arc<AssignedDevice>], spec: &DeviceSpec, given: Option<String>) -> Result<String> {
        if let Some(n) = &given
            && devices.iter().any(|d| &d.name == n)
        {
            return Err(Error::Device(n.clone(), "a device of that name is attached".into()));
        }
        let name = if let Some(n) = given {
            n
        } else {
            let mut n = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let prefix = match spec {
                DeviceSpec::Remote(RemoteSpec { process: None, .. }) => "vfu",
                DeviceSpec::Local(_) => "dev",
                _ => "dma",
            };
            *n += 1;
            format!("{prefix}{}", *n - 1)
        };
        if let Ok(k) = name.trim_start_matches(|c: char| c.is_ascii_alphabetic()).parse::<u32>() {
            let mut n = self.next.lock().unwrap_or_else(|e| e.into_inner());
            *n = (*n).max(k.saturating_add(1));
        }
        Ok(name)
    }

    /// What happens when the device goes or turns non-coherent. When it goes, its
    /// front-end forgets it (`undo_frontend`), it leaves the non-coherent count, and
    /// its mapped BAR parts leave the memory map (its trapped BARs read all-ones); the
    /// hook runs on whatever thread sees the death and takes no manager lock. It is
    /// non-coherent from now on (declared) or once the guest enables No Snoop on a
    /// domain that does not enforce snooping: counted, and its memory flagged.
    fn wire_hooks(
        &self,
        function: &Arc<AssignedFunction>,
        name: &str,
        slot: u8,
        undo_frontend: Box<dyn Fn() + Send + Sync>,
        options: &AttachOptions,
    ) {
        let name = name.to_string();
        let root = Arc::downgrade(&self.root);
        let (nc, gone_name) = (Arc::downgrade(&self.noncoherent), name.clone());
        let (events, gone_fn) = (Arc::downgrade(&self.events), Arc::downgrade(function));
        function.on_gone(Box::new(move || {
            // A death (not an unplug, which tears down with no reason recorded).
            if let (Some(e), Some(why)) = (events.upgrade(), gone_fn.upgrade().and_then(|f| f.death_reason())) {
                e.publish(crate::events::Event::DeviceGone { name: gone_name.clone(), why });
            }
            undo_frontend();
            if let Some(n) = nc.upgrade() {
                n.remove(&gone_name);
            }
            if let Some(r) = root.upgrade() {
                r.refresh(slot);
            }
        }));
        function.set_enforce_snoop(options.enforce_snoop);
        let (nc, root, nc_name) = (Arc::downgrade(&self.noncoherent), Arc::downgrade(&self.root), name.clone());
        function.on_noncoherent(Box::new(move || {
            if let Some(n) = nc.upgrade() {
                n.add(&nc_name);
            }
            if let Some(r) = root.upgrade() {
                r.refresh(slot);
            }
        }));
        if !options.coherent {
            function.mark_noncoherent();
        }
    }

    /// Detaches device `name` (hot-unplug): its slot empties, its front-end forgets it,
    /// its process is reaped.
    pub fn detach(&self, name: &str) -> Result<()> {
        let _span = tracing::info_span!("detach", device = name).entered();
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        let i = devices
            .iter()
            .position(|d| d.name == name)
            .ok_or_else(|| Error::Device(name.into(), "no such device".into()))?;
        let dev = devices.remove(i);
        drop(devices);
        // Announced while the slot is still ours: a device plugged into it once it is
        // free is announced after, never lost behind this unplug.
        self.hotplug.unplugged(dev.slot);
        self.remove(&dev);
        tracing::info!("detached");
        self.events.publish(crate::events::Event::DeviceRemoved { name: dev.name.clone() });
        Ok(())
    }

    fn remove(&self, dev: &AssignedDevice) {
        self.root.unplug(dev.slot); // tears the function down (its hooks run)
        dev.frontend.detach(dev.bdf());
        self.noncoherent.remove(&dev.name);
    }

    /// Removes every device (the VM ends).
    pub fn shutdown(&self) {
        let all = std::mem::take(&mut *self.devices.lock().unwrap_or_else(|e| e.into_inner()));
        for d in all {
            self.remove(&d);
        }
    }

    /// Makes every later attach fail right after `step` (None: no more failures), so a
    /// test can check that each step is undone.
    pub fn fail_attach_after(&self, step: Option<AttachStep>) {
        *self.fail_at.lock().unwrap_or_else(|e| e.into_inner()) = step;
    }

    fn inject(&self, step: AttachStep) -> std::result::Result<(), String> {
        if *self.fail_at.lock().unwrap_or_else(|e| e.into_inner()) == Some(step) {
            return Err(format!("injected failure after step {step:?}"));
        }
        Ok(())
    }
}
