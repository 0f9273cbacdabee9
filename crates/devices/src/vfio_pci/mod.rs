//! Any vfio-user device as a PCI function of the guest.
//!
//! The VMM reads the device's configuration region and virtualizes it
//! ([`config`]); BAR sizes come from the device's regions, and the regions it offers
//! for mmap become guest memory that never exits ([`bars`]), the MSI-X table and
//! pending bits excepted; everything else is trapped and forwarded (REGION_READ,
//! posted REGION_WRITE). Interrupts are emulated by the VMM ([`irqs`]): INTx through
//! the registry's level path, MSI and MSI-X vectors as registry sources. Bus mastering
//! gates DMA: with it clear the device's endpoint is attached to no domain, and every
//! access faults (counted). A function-level reset (PCIe FLR) is a DEVICE_RESET.
//!
//! The same path serves a device process ([`vfio_user::client::Client`]) and a device
//! model in the VMM ([`backend::LocalDevice`]). Every exchange with a device process is
//! bounded by its timeout; a device that misses it, or whose process dies, is gone:
//! logged once, interrupts and DMA torn down, BARs and configuration space reading
//! all-ones (a surprise removal).
//!
//! Unmap means gone across processes: a DMA_UNMAP the device does not acknowledge is
//! not taken on trust. A device process passthru spawned is killed (pidfd) and reaped
//! before the unmap returns; an external server is disconnected and declared dead. For
//! an external server given guest memory's file the guarantee stops there (it keeps
//! what it mapped until it exits): run servers you do not trust in message mode.
//!
//! Locks: a function's `state` (configuration, interrupts) is held across the
//! SET_IRQS and DEVICE_RESET exchanges a configuration write causes (bounded by the
//! timeout), never across BAR accesses; BAR accesses take no lock of the function but
//! for the MSI-X table.

pub mod backend;
pub mod bars;
pub mod config;
pub mod dma;
pub mod irqs;
pub mod migrate;
pub mod notify;

use crate::process::DeviceProcess;
use ::dma::{DmaSpace, Endpoint, MapObserver};
use abi::pci::{command, reg};
use backend::VfioDevice;
use bars::BarMemory;
use config::VirtConfig;
use dma::{EndpointDma, ForwardMaps, Forwarding, IommuMode};
use irq::IrqRegistry;
use irqs::{Interrupts, IrqMode};
use pci::{BarKind, BarWindow, PciFunction};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use vfio_user::client::Client;
use vfio_user::proto;

/// Why a device cannot be assigned.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The device did not come up (handshake, region or interrupt queries).
    #[error("the device did not come up: {0}")]
    Connect(String),
    /// Not a PCI device.
    #[error("it is not a PCI device (vfio-user device flags {0:#x})")]
    NotPci(u32),
    /// Its configuration space or regions are malformed.
    #[error("{0}")]
    Config(#[from] config::ConfigError),
    /// Absurd interrupt counts.
    #[error("it offers {count} vectors of IRQ index {index} (at most {max})")]
    Irqs {
        /// The index.
        index: u32,
        /// Its count.
        count: u32,
        /// The limit.
        max: u32,
    },
    /// Setting it up failed.
    #[error("{0}")]
    Setup(String),
}

/// Replies breaking the protocol a device may send before it is declared gone.
pub const MAX_VIOLATIONS: u64 = 16;

/// Most vectors accepted per IRQ index: INTx, MSI (the capability's limit), MSI-X,
/// ERR, REQ.
const MAX_VECTORS: [u32; 5] = [1, 32, 2048, 1, 1];

/// The VM's services a function needs.
pub struct Services {
    /// Interrupt forwarding.
    pub irqs: Arc<IrqRegistry>,
    /// Guest memory devices reach (files behind it, for DMA_MAP). Not the memory map
    /// itself: its windows change inside the map's listeners.
    pub memory: Arc<::dma::VmDma>,
}

/// How to run the device.
pub enum Backend {
    /// A vfio-user device model in the VMM process.
    Local(Box<dyn vfio_user::server::Device>),
    /// A device process on this connection.
    Remote {
        /// The connection.
        stream: std::os::unix::net::UnixStream,
        /// Shared file or messages.
        mode: IommuMode,
        /// The process, when passthru spawned it.
        process: Option<DeviceProcess>,
        /// Deadline of every exchange.
        timeout: Duration,
    },
}

struct State {
    config: VirtConfig,
    irqs: Interrupts,
    /// The slot's INTx GSI (from the interrupt line firmware wrote).
    intx_gsi: Option<u32>,
}

/// An assigned PCI function.
pub struct AssignedFunction {
    name: String,
    backend: Arc<dyn VfioDevice>,
    client: Option<Arc<Client>>,
    process: Option<DeviceProcess>,
    endpoint: Endpoint,
    state: Mutex<State>,
    /// The host-memory parts of each BAR (index 0..6).
    memory: Vec<BarMemory>,
    msix: Option<pci::msix::MsixCap>,
    observer: Mutex<Option<Arc<dyn MapObserver>>>,
    up: AtomicBool,
    gone: AtomicBool,
    tearing_down: AtomicBool,
    /// Held while the teardown runs: a second caller waits for the first to finish.
    teardown_lock: Mutex<()>,
    /// Set once the death was reported (one line, before the teardown runs).
    reported: AtomicBool,
    torn_down: AtomicBool,
    removing: AtomicBool,
    gone_hooks: Mutex<Vec<Box<dyn FnOnce() + Send>>>,
    /// Trapped BAR accesses and device accesses refused while bus mastering was off.
    bar_accesses: AtomicU64,
    /// Replies that broke the protocol (a region read of the wrong size, a malformed
    /// reply): past [`MAX_VIOLATIONS`] the device is declared gone.
    violations: AtomicU64,
    /// Why the device was declared gone (the first reason).
    death: Mutex<Option<String>>,
    /// The device's ERR and REQ notifications (dropped, so stopped, at teardown).
    notifications: Mutex<Option<notify::Notifications>>,
    /// The domain does not enforce snooping (an IOMMU without snoop control): the
    /// guest's No Snoop makes the device non-coherent.
    enforce_snoop: AtomicBool,
    /// The device is non-coherent (declared, or No Snoop without enforcement). Sticky.
    noncoherent: AtomicBool,
    /// Told once when the device becomes non-coherent (the device manager counts it
    /// and flags its memory).
    on_noncoherent: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    /// The device logs its own writes for the VM's dirty bitmap (DMA dirty logging).
    dirty_logging: AtomicBool,
    me: Weak<AssignedFunction>,
}

impl std::fmt::Debug for AssignedFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssignedFunction").field("name", &self.name).finish_non_exhaustive()
    }
}

/// "exited with 3", "killed by signal 31 (SIGSYS...)".
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

impl Forwarding for AssignedFunction {
    fn client(&self) -> Option<Arc<Client>> {
        self.client.as_ref().filter(|c| !c.is_closed() && !self.is_dead()).cloned()
    }

    fn cut_off(&self, why: &str) {
        tracing::error!("device {}: {why}; cutting it off", self.name);
        self.gone.store(true, Ordering::Release);
        if let Some(p) = &self.process {
            p.kill_and_reap(Duration::from_secs(5));
        }
        if let Some(c) = &self.client {
            c.endpoint().declare_dead(why);
        }
    }
}

impl AssignedFunction {
    /// Assigns a device: connects (for a device process), reads and checks its
    /// configuration space, regions and interrupts, maps its mappable BARs, wires its
    /// DMA through `endpoint` (its front-end chooses the domain; bus mastering gates
    /// it). Nothing of it is left behind on failure.
    pub fn attach(
        name: &str,
        backend: Backend,
        endpoint: Endpoint,
        services: Services,
    ) -> Result<Arc<AssignedFunction>, AttachError> {
        let (dev, client, process, mode): (Arc<dyn VfioDevice>, _, _, _) = match backend {
            Backend::Local(d) => {
                let local = backend::LocalDevice::new(d).map_err(|e| AttachError::Setup(e.to_string()))?;
                (Arc::new(local), None, None, None)
            }
            Backend::Remote { stream, mode, process, timeout } => {
                // The connection's death runs the function's death handling, once it exists.
                let cell: Arc<Mutex<Weak<AssignedFunction>>> = Arc::new(Mutex::new(Weak::new()));
                let c = Arc::clone(&cell);
                let on_close: vfio_user::client::OnClose = Box::new(move |why| {
                    if let Some(f) = c.lock().unwrap_or_else(|e| e.into_inner()).upgrade() {
                        f.died(&why.to_string());
                    }
                });
                let handler = Arc::new(EndpointDma(Mutex::new(DmaSpace::of(&endpoint))));
                let client = match Client::connect_with_timeout(stream, handler, on_close, timeout) {
                    Ok(c) => Arc::new(c),
                    Err(e) => {
                        if let Some(p) = process {
                            p.kill_and_reap(Duration::from_secs(5));
                        }
                        return Err(AttachError::Connect(e.to_string()));
                    }
                };
                let f = Self::build(
                    name,
                    Arc::clone(&client) as Arc<dyn VfioDevice>,
                    Some(client.clone()),
                    process,
                    endpoint,
                    &services,
                    Some(mode),
                );
                if let Ok(f) = &f {
                    *cell.lock().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(f);
                    if client.is_closed() {
                        f.died("the connection closed while the device was attached");
                    }
                } else {
                    client.close();
                }
                return f;
            }
        };
        Self::build(name, dev, client, process, endpoint, &services, mode)
    }

    /// What the device says it is, checked: a PCI device, its configuration space
    /// (at least a header) virtualized, its interrupt counts within reason.
    fn probe(dev: &dyn VfioDevice) -> Result<(VirtConfig, [u32; 3]), AttachError> {
        let info = dev.info();
        if info.flags & proto::DEVICE_FLAGS_PCI == 0 {
            return Err(AttachError::NotPci(info.flags));
        }
        let cfg_size = dev.region(proto::PCI_CONFIG).map_or(0, |r| r.size).min(pci::config::CONFIG_SIZE as u64);
        if cfg_size < 64 {
            return Err(AttachError::Config(config::ConfigError::TooSmall(cfg_size)));
        }
        let mut raw = vec![0u8; cfg_size as usize];
        dev.region_read(proto::PCI_CONFIG, 0, &mut raw)
            .map_err(|e| AttachError::Config(config::ConfigError::Read(e.to_string())))?;
        let vconfig = VirtConfig::new(&raw, |i: u8| dev.region(u32::from(i)).map_or(0, |r| r.size))?;
        let mut counts = [0u32; 3];
        for (i, max) in MAX_VECTORS.iter().enumerate() {
            let n = dev.irq(i as u32).map_or(0, |x| x.count);
            if n > *max {
                return Err(AttachError::Irqs { index: i as u32, count: n, max: *max });
            }
            if let Some(c) = counts.get_mut(i) {
                *c = n;
            }
        }
        Ok((vconfig, counts))
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        name: &str,
        dev: Arc<dyn VfioDevice>,
        client: Option<Arc<Client>>,
        process: Option<DeviceProcess>,
        endpoint: Endpoint,
        services: &Services,
        mode: Option<IommuMode>,
    ) -> Result<Arc<AssignedFunction>, AttachError> {
        let fail = |e: AttachError, p: &Option<DeviceProcess>| {
            if let Some(p) = p {
                p.kill_and_reap(Duration::from_secs(5));
            }
            e
        };
        // Bus mastering is off at reset: no DMA until the driver enables it.
        if let Err(e) = endpoint.set_gated(true) {
            return Err(fail(AttachError::Setup(format!("blocking its DMA: {e}")), &process));
        }
        let (vconfig, counts) = match Self::probe(dev.as_ref()) {
            Ok(p) => p,
            Err(e) => return Err(fail(e, &process)),
        };
        let notifications = match notify::Notifications::start(name, dev.as_ref()) {
            Ok(n) => n,
            Err(e) => return Err(fail(AttachError::Setup(e), &process)),
        };
        let msix = vconfig.msix;
        let memory: Vec<BarMemory> = (0..6u8)
            .map(|b| match vconfig.bars.spec(b) {
                Some(s) if s.kind != BarKind::Io => bars::map_bar(dev.as_ref(), name, b, msix.as_ref()),
                _ => BarMemory::default(),
            })
            .collect();
        let f = Arc::new_cyclic(|me: &Weak<AssignedFunction>| {
            let owner: Arc<dyn std::any::Any + Send + Sync> = Arc::new(me.clone());
            AssignedFunction {
                name: name.to_string(),
                backend: dev,
                client,
                process,
                endpoint,
                state: Mutex::new(State {
                    config: vconfig,
                    irqs: Interrupts::new(name, Arc::clone(&services.irqs), owner, msix, counts),
                    intx_gsi: None,
                }),
                memory,
                msix,
                observer: Mutex::new(None),
                up: AtomicBool::new(false),
                gone: AtomicBool::new(false),
                tearing_down: AtomicBool::new(false),
                teardown_lock: Mutex::new(()),
                reported: AtomicBool::new(false),
                torn_down: AtomicBool::new(false),
                removing: AtomicBool::new(false),
                gone_hooks: Mutex::new(Vec::new()),
                bar_accesses: AtomicU64::new(0),
                violations: AtomicU64::new(0),
                death: Mutex::new(None),
                notifications: Mutex::new(Some(notifications)),
                enforce_snoop: AtomicBool::new(true),
                noncoherent: AtomicBool::new(false),
                on_noncoherent: Mutex::new(None),
                dirty_logging: AtomicBool::new(false),
                me: me.clone(),
            }
        });
        if let Some(mode) = mode {
            let owner: Weak<dyn Forwarding> = f.me.clone();
            let observer: Arc<dyn MapObserver> =
                Arc::new(ForwardMaps { owner, memory: Arc::clone(&services.memory), mode, windows: AtomicU64::new(0) });
            // The endpoint is blocked until the guest enables bus mastering: no window yet.
            if let Err(e) = f.endpoint.add_observer(Arc::clone(&observer)) {
                f.teardown();
                return Err(AttachError::Setup(format!("giving it its DMA mappings: {e}")));
            }
            *f.observer.lock().unwrap_or_else(|e| e.into_inner()) = Some(observer);
        }
        f.up.store(true, Ordering::Release);
        Ok(f)
    }

    /// The function's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its DMA endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The domain its front-end chose (reached while bus mastering is on).
    pub fn domain(&self) -> Option<Arc<::dma::Domain>> {
        self.endpoint.chosen_domain()
    }

    /// The device process passthru spawned for it, if any.
    pub fn process(&self) -> Option<&DeviceProcess> {
        self.process.as_ref()
    }

    /// The interrupt mode the guest enabled.
    pub fn irq_mode(&self) -> IrqMode {
        self.lock().irqs.mode
    }

    /// True once the device is gone; its teardown may still be running.
    pub fn is_dead(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    /// True once a gone device's interrupts, DMA and windows are all released.
    pub fn is_torn_down(&self) -> bool {
        self.torn_down.load(Ordering::Acquire)
    }

    /// True if bus mastering is on (DMA reaches the front-end's domain).
    pub fn bus_master(&self) -> bool {
        !self.endpoint.is_gated()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `hook` when the device is gone (or now, if it already is).
    pub fn on_gone(&self, hook: Box<dyn FnOnce() + Send>) {
        let mut hooks = self.gone_hooks.lock().unwrap_or_else(|e| e.into_inner());
        if self.tearing_down.load(Ordering::Acquire) {
            drop(hooks);
            hook();
        } else {
            hooks.push(hook);
        }
    }

    /// The device is gone (its process died or stopped answering): a surprise removal.
    /// Says so once, and only for a device that had come up; the line is written
    /// before the teardown runs, so a VMM ending at that moment still reports it.
    pub fn died(&self, why: &str) {
        self.death.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(|| why.to_string());
        if !self.up.load(Ordering::Acquire) || self.removing.load(Ordering::Acquire) {
            self.gone.store(true, Ordering::Release);
            return;
        }
        self.gone.store(true, Ordering::Release);
        // A device declared gone may still hold guest memory: a process of ours is
        // ended; any other server loses its connection, and with it (as the protocol
        // asks of a server whose client went away) every DMA window, before this
        // returns. (A server that keeps the memfd mapped anyway is outside what a VMM
        // can revoke: run servers you do not trust in message mode.)
        if let Some(p) = &self.process {
            p.kill_and_reap(Duration::from_secs(5));
        }
        if !self.reported.swap(true, Ordering::AcqRel) {
            let how = self.process.as_ref().and_then(|p| p.status()).map(|s| format!("; process {}", describe(s)));
            tracing::warn!(device = %self.name, why, process = how.as_deref().unwrap_or(""), "device gone");
            eprintln!(
                "passthru: device {} is gone ({why}{}); its BARs now read all-ones",
                self.name,
                how.unwrap_or_default()
            );
        }
        // After the line (its closing runs this again with a reason of its own).
        if let Some(c) = &self.client {
            c.endpoint().declare_dead(why);
        }
        self.teardown();
    }

    /// Tears interrupts, DMA and windows down once; true the first time. A caller that
    /// finds the teardown running waits for it to finish.
    fn teardown(&self) -> bool {
        self.gone.store(true, Ordering::Release);
        let _running = self.teardown_lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.tearing_down.swap(true, Ordering::AcqRel) {
            return false;
        }
        let hooks = std::mem::take(&mut *self.gone_hooks.lock().unwrap_or_else(|e| e.into_inner()));
        for hook in hooks {
            hook();
        }
        self.lock().irqs.forget();
        if let Some(o) = self.observer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            self.endpoint.remove_observer(&o);
        }
        self.endpoint.close();
        drop(self.notifications.lock().unwrap_or_else(|e| e.into_inner()).take());
        self.torn_down.store(true, Ordering::Release);
        true
    }

    /// Sets whether the device's domain enforces snooping (on by default, as an IOMMU
    /// with IOMMU_CAP_ENFORCE_CACHE_COHERENCY).
    pub fn set_enforce_snoop(&self, on: bool) {
        self.enforce_snoop.store(on, Ordering::Release);
    }

    /// Runs `hook` once, when the device becomes non-coherent.
    pub fn on_noncoherent(&self, hook: Box<dyn Fn() + Send + Sync>) {
        *self.on_noncoherent.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// Marks the device non-coherent (declared so, or No Snoop seen without snoop
    /// enforcement): its mapped BAR parts carry the flag from now on. True the first
    /// time.
    pub fn mark_noncoherent(&self) -> bool {
        if self.is_dead() || self.noncoherent.swap(true, Ordering::AcqRel) {
            return false;
        }
        if let Some(h) = self.on_noncoherent.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            h();
        }
        true
    }

    /// True once the device is non-coherent.
    pub fn is_noncoherent(&self) -> bool {
        self.noncoherent.load(Ordering::Acquire)
    }

    /// Errors (ERR) and release requests (REQ) the device signalled.
    pub fn notifications(&self) -> (u64, u64) {
        let n = self.notifications.lock().unwrap_or_else(|e| e.into_inner());
        n.as_ref().map_or((0, 0), |n| {
            (n.counts().errors.load(Ordering::Relaxed), n.counts().requests.load(Ordering::Relaxed))
        })
    }

    /// Removes the function (unplug, VM end): torn down quietly, its device closed and,
    /// for a process, reaped (killed if it lingers).
    pub fn remove(&self) {
        if let Some(c) = &self.client
            && c.is_closed()
        {
            let why = c.endpoint().death().unwrap_or_else(|| "the vfio-user connection is closed".into());
            self.died(&why);
        }
        self.removing.store(true, Ordering::Release);
        if !self.is_dead() {
            let mut st = self.lock();
            let State { irqs, .. } = &mut *st;
            irqs.teardown(self.backend.as_ref());
        }
        self.teardown();
        self.backend.close();
        if let Some(c) = &self.client {
            c.close();
        }
        if let Some(p) = &self.process {
            p.reap(Duration::from_secs(5));
        }
    }

    /// Why the device was declared gone, if it was.
    pub fn death_reason(&self) -> Option<String> {
        self.death.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Trapped BAR accesses so far.
    pub fn bar_accesses(&self) -> u64 {
        self.bar_accesses.load(Ordering::Relaxed)
    }

    /// Counts a reply that broke the protocol; past [`MAX_VIOLATIONS`] the device is
    /// declared gone (a device whose every read is all-ones is of no use to the guest,
    /// and one that cannot keep the protocol cannot be trusted with its DMA).
    fn violation(&self, e: &vfio_user::endpoint::Error) {
        let n = self.violations.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!("device {}: {e} ({n} protocol violations)", self.name);
        if n == MAX_VIOLATIONS {
            self.died(&format!("it broke the vfio-user protocol {n} times (last: {e})"));
        }
    }

    /// Replies that broke the protocol so far.
    pub fn violations(&self) -> u64 {
        self.violations.load(Ordering::Relaxed)
    }

    /// What the guest's COMMAND change means: decoding (the root re-reads windows),
    /// bus mastering (DMA attached or blocked), INTx disable (masked).
    fn apply_command(&self, st: &mut State, before: u16, after: u16) {
        if (before ^ after) & command::MASTER != 0
            && let Err(e) = self.endpoint.set_gated(after & command::MASTER == 0)
        {
            // The device could not take the domain's mappings: it is failed.
            self.cut_off(&format!("it could not take its DMA mappings: {e}"));
        }
        if (before ^ after) & command::INTX_DISABLE != 0 {
            st.irqs.mask_intx(after & command::INTX_DISABLE != 0);
        }
    }

    /// The interrupt mode the configuration asks for.
    fn wanted_mode(st: &State) -> IrqMode {
        let (msix_on, _) = st.config.msix_control();
        if msix_on {
            return IrqMode::Msix;
        }
        if let Some(m) = st.config.msi_state()
            && m.enabled
        {
            return IrqMode::Msi(m.vectors);
        }
        match (st.config.pin, st.intx_gsi) {
            (1..=4, Some(gsi)) => IrqMode::Intx(gsi),
            _ => IrqMode::None,
        }
    }

    fn apply_interrupts(&self, st: &mut State, fx: config::Effects) {
        let want = Self::wanted_mode(st);
        let msi = st.config.msi_state();
        let changed = want != st.irqs.mode;
        if changed {
            let State { irqs, .. } = st;
            if let Err(e) = irqs.switch(self.backend.as_ref(), want, msi) {
                tracing::warn!("device {}: interrupts: {e}", self.name);
            }
            if want == IrqMode::Intx(st.intx_gsi.unwrap_or(0)) {
                st.irqs.mask_intx(st.config.command() & command::INTX_DISABLE != 0);
            }
        }
        if fx.msix || changed {
            let (_, mask_all) = st.config.msix_control();
            st.irqs.sync_msix(mask_all);
        }
        if fx.msi
            && let Some(m) = msi
        {
            st.irqs.sync_msi(m);
        }
    }

    /// A function-level reset: DEVICE_RESET, and the VMM's side back to reset state.
    fn reset(&self, st: &mut State) {
        let before = st.config.command();
        st.config.reset();
        self.apply_command(st, before, st.config.command());
        let State { irqs, .. } = st;
        irqs.teardown(self.backend.as_ref());
        if let Some(t) = &mut st.irqs.table {
            t.reset();
        }
        if let Err(e) = self.backend.reset() {
            tracing::warn!("device {}: reset: {e}", self.name);
        }
        self.apply_interrupts(st, config::Effects::default());
    }

    fn in_msix(&self, bar: u8, offset: u64, len: usize) -> Option<(bool, u64)> {
        let c = self.msix?;
        let end = offset.checked_add(len as u64)?;
        if bar == c.table.0 && offset >= c.table.1 && end <= c.table.1 + c.table_size() {
            return Some((true, offset - c.table.1));
        }
        if bar == c.pba.0 && offset >= c.pba.1 && end <= c.pba.1 + c.pba_size() {
            return Some((false, offset - c.pba.1));
        }
        None
    }
}

impl PciFunction for AssignedFunction {
    fn name(&self) -> &str {
        &self.name
    }

    fn config_read(&self, offset: u16, data: &mut [u8]) {
        if self.is_dead() {
            data.fill(0xff); // a removed device: nobody answers
            return;
        }
        let st = self.lock();
        let len = data.len();
        let beyond = usize::from(offset) + len > usize::from(st.config.size);
        if st.config.all_emulated(offset, len) || beyond {
            let mut none = vec![0xffu8; len];
            if beyond {
                none.fill(0);
            }
            st.config.merge(offset, &none, data);
            return;
        }
        drop(st);
        let mut dev = vec![0xffu8; len];
        if self.backend.region_read(proto::PCI_CONFIG, u64::from(offset), &mut dev).is_err() {
            dev.fill(0xff);
        }
        self.lock().config.merge(offset, &dev, data);
    }

    fn config_write(&self, offset: u16, data: &[u8]) {
        if self.is_dead() {
            return;
        }
        let mut st = self.lock();
        let forward = st.config.any_passthrough(offset, data.len()) || offset == reg::COMMAND;
        if offset == reg::INTERRUPT_LINE && !data.is_empty() {
            st.intx_gsi = Some(u32::from(data[0]));
        }
        let fx = st.config.write(offset, data);
        if forward
            && usize::from(offset) + data.len() <= usize::from(st.config.size)
            && let Err(e) = self.backend.region_write(proto::PCI_CONFIG, u64::from(offset), data)
        {
            tracing::debug!("device {}: config write at {offset:#x}: {e}", self.name);
        }
        if let Some((before, after)) = fx.command {
            self.apply_command(&mut st, before, after);
        }
        if fx.flr {
            self.reset(&mut st);
            return;
        }
        if fx.msi || fx.msix || fx.command.is_some() || offset == reg::INTERRUPT_LINE {
            self.apply_interrupts(&mut st, fx);
        }
        drop(st);
        if fx.no_snoop == Some(true) && !self.enforce_snoop.load(Ordering::Acquire) && self.mark_noncoherent() {
            tracing::info!("device {}: the guest enabled No Snoop and its domain does not enforce snooping", self.name);
        }
    }

    fn windows(&self) -> Vec<BarWindow> {
        let st = self.lock();
        st.config
            .bars
            .decoded(st.config.command())
            .into_iter()
            .map(|(s, addr)| BarWindow {
                bar: s.index,
                io: s.kind == BarKind::Io,
                addr,
                size: s.size,
                mapped: if self.is_dead() {
                    Vec::new()
                } else {
                    let flags = vm_api::RegionFlags { noncoherent_dma: self.is_noncoherent(), ..Default::default() };
                    self.memory
                        .get(usize::from(s.index))
                        .map(|m| {
                            m.areas
                                .iter()
                                .map(|(o, r)| {
                                    let mut r = r.clone();
                                    r.flags = flags;
                                    (*o, r)
                                })
                                .collect()
                        })
                        .unwrap_or_default()
                },
            })
            .collect()
    }

    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        if self.is_dead() {
            data.fill(0xff);
            return;
        }
        self.bar_accesses.fetch_add(1, Ordering::Relaxed);
        if let Some((table, off)) = self.in_msix(bar, offset, data.len()) {
            let mut st = self.lock();
            if table {
                if let Some(t) = &st.irqs.table {
                    t.read(off, data);
                }
            } else {
                st.irqs.read_pba(off, data);
            }
            return;
        }
        // No lock held across the exchange: a slow device delays only this access.
        if let Err(e) = self.backend.region_read(u32::from(bar), offset, data) {
            data.fill(0xff);
            if matches!(e, vfio_user::endpoint::Error::Proto(_)) {
                self.violation(&e);
            }
        }
    }

    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
        if self.is_dead() {
            return;
        }
        self.bar_accesses.fetch_add(1, Ordering::Relaxed);
        if let Some((table, off)) = self.in_msix(bar, offset, data.len()) {
            if table {
                let mut st = self.lock();
                let (_, mask_all) = st.config.msix_control();
                let change = st.irqs.table.as_mut().map(|t| t.write(off, data));
                if let Some(pci::msix::TableChange::Vector(v)) = change {
                    st.irqs.sync_vector(v, mask_all);
                }
            }
            return; // PBA writes are dropped
        }
        // MMIO writes are posted: the vCPU does not wait for the device.
        if let Err(e) = self.backend.region_write_posted(u32::from(bar), offset, data) {
            tracing::debug!("device {}: BAR {bar} write at {offset:#x}: {e}", self.name);
        }
    }

    fn removed(&self) {
        self.remove();
    }
}
