//! A passthru machine: accelerator, guest RAM and memory map, PIO and MMIO buses with
//! the fixed devices, and the hypercall registry. The vCPU loop and the qtest driver
//! port reach devices through the same dispatch methods here.

use crate::accel::{Accel, AccelKind, IoAddr, KvmAccel, QtestAccel};
use crate::core_calls::{BenchMarks, CoreCalls};
use crate::device_manager::{AssignedDevice, DeviceManager, DeviceSpec};
use crate::error::{Error, Result};
use crate::memory::{GuestRam, MemoryListener, MemoryMap, MemslotListener};
use abi::hcall::{Args, Ret};
use abi::{layout, ports};
use devices::legacy::{ErrConsole, ExitLatch, ExitPort, NullDevice};
use devices::serial::SerialPort;
use devices::{Bus, BusDevice};
use dma::{LockedMemory, VmDma};
use irq::{GuestIrq, IrqRegistry, IrqSource, SourceId, Trigger};
use std::sync::{Arc, Mutex};
use vm_api::HypercallRegistry;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use crate::config::{DEFAULT_DMA_WINDOW, NonCoherentReads, VmConfig};

/// The interrupt source of the serial port (COM1), the VM's own.
pub const SERIAL_SOURCE: &str = "serial";
/// The interrupt source of ACPI PCI hot-plug (the GED's GSI), the VM's own.
pub const HOTPLUG_SOURCE: &str = "acpi-hotplug";
/// The interrupt sources every VM has of its own (no device's).
pub const OWN_SOURCES: [&str; 2] = [SERIAL_SOURCE, HOTPLUG_SOURCE];

/// A machine, ready to run a guest program (KVM) or to be driven (qtest).
pub struct Vm {
    pub(crate) accel: Arc<dyn Accel>,
    pub(crate) kvm: Option<Arc<KvmAccel>>,
    pub(crate) qtest: Option<Arc<QtestAccel>>,
    // Dropped first: devices stop, sources detach, then guest memory goes.
    pub(crate) devices: DeviceManager,
    pub(crate) core: Arc<CoreCalls>,
    pub(crate) irqs: Arc<IrqRegistry>,
    pub(crate) hypercalls: Arc<HypercallRegistry>,
    pub(crate) pio: Arc<Bus>,
    pub(crate) mmio: Arc<Bus>,
    pub(crate) exit: Arc<ExitLatch>,
    pub(crate) bench_ioevent: EventFd,
    pub(crate) memory_map: Arc<MemoryMap>,
    pub(crate) dma: Arc<VmDma>,
    pub(crate) noncoherent_reads: NonCoherentReads,
    pub(crate) slots: Arc<MemslotListener>,
    pub(crate) run: crate::run_control::RunControl,
    /// What an operator watches happen (see [`crate::events`]).
    pub(crate) events: Arc<crate::events::Events>,
    /// The VM said it is stopping (once).
    pub(crate) stopping: std::sync::atomic::AtomicBool,
    /// Devices stopped by a pause (or a snapshot of a paused VM), started by resume.
    pub(crate) quiesced: Mutex<Vec<String>>,
    /// Devices declared gone because they did not run again after a pause.
    pub(crate) resume_failures: std::sync::atomic::AtomicU64,
    /// Held by whoever pauses or resumes (operator, snapshot, the PAT read), so one's
    /// pause is never resumed by another.
    pub(crate) pausers: Mutex<()>,
    /// Held across a whole snapshot (one at a time: they share the temporary
    /// directory's name); taken before `pausers`, which a snapshot lets go once the VM
    /// runs again, while the files are written.
    pub(crate) snapshots: Mutex<()>,
    /// The vCPU's section a restore left for the vCPU that continues the guest.
    pub(crate) restored_cpu: Mutex<Option<vm_api::Section>>,
    pub(crate) exits: crate::run_control::ExitCounters,
    pub(crate) ram: GuestRam,
}

impl Vm {
    /// Builds the machine.
    pub fn new(config: VmConfig) -> Result<Vm> {
        let (accel, kvm, qtest) = accelerator(config.accel)?;
        let Memory { ram, dma, memory_map, slots } = guest_memory(&config, &accel)?;
        let irqs = Arc::new(IrqRegistry::new(accel.clone(), config.irq_mode).map_err(Error::EventFd)?);
        let Fixed { pio, mmio, exit, bench_ioevent, hotplug } =
            fixed_devices(&accel, &irqs, config.serial_out, config.err_out)?;
        let hypercalls = Arc::new(HypercallRegistry::new());
        #[cfg(feature = "test-sources")]
        let test_sources = config.test_sources;
        #[cfg(not(feature = "test-sources"))]
        let test_sources = false;
        let core = core_calls(config.bench_iterations, &accel, &irqs, &pio, test_sources)?;
        hypercalls.register(abi::hcall::CORE_BASE, core.clone())?;
        let root = pci::PciRoot::new(Arc::clone(&mmio), Arc::clone(&pio), Arc::clone(&memory_map))
            .map_err(|e| Error::Device("pci".into(), e.to_string()))?;
        let context = iommu::Context {
            dma: Arc::clone(&dma),
            memory: Arc::clone(ram.memory_arc()),
            memory_map: Arc::clone(&memory_map),
            hypercalls: Arc::clone(&hypercalls),
            pci: Arc::clone(&root),
            irqs: Arc::clone(&irqs),
            io: Arc::new(crate::accel::AccelIo(Arc::clone(&accel))),
            kill_on_misuse: config.dma_kill_on_misuse.then(|| kill_switch(&exit)),
            dma_window: config.dma_window.clone(),
        };
        let frontends =
            iommu::Frontends::new(context, &config.frontends).map_err(|e| Error::Device("-".into(), e.to_string()))?;
        let events = Arc::new(crate::events::Events::new());
        let e = Arc::downgrade(&events);
        irqs.on_switch(Arc::new(move |id, mode| {
            if let Some(e) = e.upgrade() {
                e.publish(crate::events::Event::IrqMode { source: id.to_string(), mode: mode.to_string() });
            }
        }));
        let devices =
            DeviceManager::new(root, frontends, Arc::clone(&irqs), Arc::clone(&dma), Arc::clone(&events), hotplug);
        let _ = core.noncoherent.set(noncoherent_query(Arc::clone(devices.noncoherent()), Arc::downgrade(&memory_map)));
        Ok(Vm {
            accel,
            kvm,
            qtest,
            devices,
            core,
            irqs,
            hypercalls,
            pio,
            mmio,
            exit,
            bench_ioevent,
            memory_map,
            dma,
            noncoherent_reads: config.noncoherent_reads,
            slots,
            run: crate::run_control::RunControl::new(),
            events,
            stopping: std::sync::atomic::AtomicBool::new(false),
            quiesced: Mutex::new(Vec::new()),
            resume_failures: std::sync::atomic::AtomicU64::new(0),
            pausers: Mutex::new(()),
            snapshots: Mutex::new(()),
            restored_cpu: Mutex::new(None),
            exits: crate::run_control::ExitCounters::default(),
            ram,
        })
    }

    /// The accelerator.
    pub fn accel(&self) -> &Arc<dyn Accel> {
        &self.accel
    }

    /// The KVM accelerator, when running on KVM.
    pub fn kvm(&self) -> Option<&Arc<KvmAccel>> {
        self.kvm.as_ref()
    }

    /// The qtest accelerator, when driven through the qtest port.
    pub fn qtest(&self) -> Option<&Arc<QtestAccel>> {
        self.qtest.as_ref()
    }

    /// Guest RAM as mapped in the VMM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.ram.memory()
    }

    /// Guest RAM (memfd, size).
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The guest memory map (RAM and RAM-device regions).
    pub fn memory_map(&self) -> &Arc<MemoryMap> {
        &self.memory_map
    }

    /// The port I/O bus.
    pub fn pio_bus(&self) -> &Arc<Bus> {
        &self.pio
    }

    /// The MMIO bus.
    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.mmio
    }

    /// The hypercall registry; front-ends register their blocks here.
    pub fn hypercalls(&self) -> &Arc<HypercallRegistry> {
        &self.hypercalls
    }

    /// Benchmark marks recorded by the guest.
    pub fn bench(&self) -> &Arc<BenchMarks> {
        &self.core.bench
    }

    /// The VM's DMA state (guest memory, locked-memory account, dirty log).
    pub fn dma(&self) -> &Arc<VmDma> {
        &self.dma
    }

    /// The VM's DMA front-ends, by name.
    pub fn frontends(&self) -> &iommu::Frontends {
        self.devices.frontends()
    }

    /// The PCI root complex (bus 0).
    pub fn pci(&self) -> &Arc<pci::PciRoot> {
        self.devices.root()
    }

    /// The device manager.
    pub fn device_manager(&self) -> &DeviceManager {
        &self.devices
    }

    /// Attaches a device in the first free PCI slot, its DMA programmed by the
    /// front-end named `frontend` (`identity`, `pvdma`, ...). Works while the guest
    /// runs (hot-plug).
    pub fn attach_device(&self, spec: DeviceSpec, frontend: &str) -> Result<Arc<AssignedDevice>> {
        self.devices.attach(spec, frontend)
    }

    /// As [`Vm::attach_device`], with options (coherency, snoop enforcement).
    pub fn attach_device_with(
        &self,
        spec: DeviceSpec,
        frontend: &str,
        options: crate::device_manager::AttachOptions,
    ) -> Result<Arc<AssignedDevice>> {
        self.devices.attach_with(spec, frontend, options)
    }

    /// Detaches device `name` (hot-unplug).
    pub fn detach_device(&self, name: &str) -> Result<()> {
        self.devices.detach(name)
    }

    /// ACPI PCI hot-plug (the registers a Linux guest's DSDT reads, the GED's interrupt).
    pub fn acpi_hotplug(&self) -> &Arc<crate::hotplug::AcpiHotplug> {
        self.devices.hotplug()
    }

    /// The assigned devices.
    pub fn devices(&self) -> Vec<Arc<AssignedDevice>> {
        self.devices.list()
    }

    /// The assigned device named `name`.
    pub fn device(&self, name: &str) -> Option<Arc<AssignedDevice>> {
        self.devices.get(name)
    }

    /// The interrupt forwarding registry.
    pub fn irqs(&self) -> &Arc<IrqRegistry> {
        &self.irqs
    }

    /// The core hypercall block (test sources, benchmark marks).
    pub fn core(&self) -> &Arc<CoreCalls> {
        &self.core
    }

    /// The test interrupt sources, when the VM was built with them.
    #[cfg(feature = "test-sources")]
    pub fn test_sources(&self) -> Option<&Arc<devices::test_irq::TestSources>> {
        self.core.test.as_ref()
    }

    /// The status the guest asked to exit with, if it did.
    pub fn exit_status(&self) -> Option<u8> {
        self.exit.status()
    }

    /// Asks the machine to stop with `status` (as the exit port does); a running or
    /// paused vCPU sees it at once.
    pub fn request_exit(&self, status: u8) {
        self.exit.request(status);
        self.stopping(self.exit_status().unwrap_or(status));
        self.run.wake();
    }

    /// The VM's event stream (see [`crate::events`]).
    pub fn events(&self) -> &Arc<crate::events::Events> {
        &self.events
    }

    /// A new subscriber to the event stream; the per-second DMA fault count runs
    /// while someone subscribes.
    pub fn subscribe_events(&self) -> std::sync::mpsc::Receiver<String> {
        let rx = self.events.subscribe();
        let dma = Arc::downgrade(&self.dma);
        self.events.tick_faults(move || dma.upgrade().map(|d| d.faults_total()));
        rx
    }

    /// Says, once, that the VM is stopping with `status`.
    pub fn stopping(&self, status: u8) {
        if !self.stopping.swap(true, std::sync::atomic::Ordering::AcqRel) {
            self.events.publish(crate::events::Event::VmStopping { status });
        }
    }

    /// What host-side reads of memory flagged non-coherent do.
    pub fn noncoherent_reads(&self) -> NonCoherentReads {
        self.noncoherent_reads
    }

    /// Pause and resume.
    pub fn run_control(&self) -> &crate::run_control::RunControl {
        &self.run
    }

    /// vCPU exits by kind.
    pub fn exit_counters(&self) -> &crate::run_control::ExitCounters {
        &self.exits
    }

    /// Forgets an exit request, so a driver may start another session on the machine.
    pub fn clear_exit(&self) {
        self.exit.clear();
    }

    /// A hypercall, exactly as the vCPU's hypercall-port write performs it.
    pub fn hypercall(&self, args: &Args) -> Ret {
        self.hypercalls.dispatch(args)
    }

    /// A port write. Writes nobody decodes are dropped (and return false).
    pub fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        self.accel.emulate_ioevent(IoAddr::Pio(u64::from(port))) || self.pio.write(u64::from(port), data)
    }

    /// A port read. Ports nobody decodes read as all-ones (and return false).
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        let hit = self.pio.read(u64::from(port), data);
        if !hit {
            data.fill(0xff);
        }
        hit
    }

    /// An MMIO write. Writes nobody decodes are dropped (and return false).
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        self.accel.emulate_ioevent(IoAddr::Mmio(addr)) || self.mmio.write(addr, data)
    }

    /// An MMIO read. Addresses nobody decodes read as all-ones (and return false).
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        let hit = self.mmio.read(addr, data);
        if !hit {
            data.fill(0xff);
        }
        hit
    }
}

/// The accelerator `kind` names: (as the VM sees it, KVM's, qtest's).
type Accels = (Arc<dyn Accel>, Option<Arc<KvmAccel>>, Option<Arc<QtestAccel>>);

fn accelerator(kind: AccelKind) -> Result<Accels> {
    Ok(match kind {
        AccelKind::Kvm => {
            let k = Arc::new(KvmAccel::new()?);
            (k.clone(), Some(k), None)
        }
        AccelKind::Qtest => {
            let q = Arc::new(QtestAccel::new()?);
            (q.clone(), None, Some(q))
        }
    })
}

/// Guest RAM, the VM's DMA state (its locked-memory account from `config` or the
/// rlimit) and the memory map, with KVM's memory slots and device DMA following it.
fn guest_memory(config: &VmConfig, accel: &Arc<dyn Accel>) -> Result<Memory> {
    let ram = GuestRam::new(config.memory)?;
    let account = match config.locked_memory {
        Some(limit) => LockedMemory::new(limit),
        None => LockedMemory::from_rlimit(),
    };
    let dma = VmDma::new(Arc::clone(ram.memory_arc()), account);
    let memory_map = Arc::new(MemoryMap::new());
    let slots = Arc::new(MemslotListener::new(Arc::clone(accel)));
    memory_map.add_listener(Arc::clone(&slots) as Arc<dyn MemoryListener>)?;
    for r in ram.regions() {
        memory_map.add_region(r)?;
    }
    // Device DMA follows the memory map (RAM added later, mmapped BARs).
    memory_map.add_listener(Arc::clone(&dma) as Arc<dyn MemoryListener>)?;
    Ok(Memory { ram, dma, memory_map, slots })
}

/// What [`guest_memory`] builds.
struct Memory {
    ram: GuestRam,
    dma: Arc<VmDma>,
    memory_map: Arc<MemoryMap>,
    slots: Arc<MemslotListener>,
}

/// What [`fixed_devices`] builds.
struct Fixed {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitLatch>,
    bench_ioevent: EventFd,
    hotplug: Arc<crate::hotplug::AcpiHotplug>,
}

/// The buses and the devices every VM has: COM1 (its interrupt source attached), the
/// exit port, the error console, the benchmarks' null MMIO device and ioeventfd.
fn fixed_devices(
    accel: &Arc<dyn Accel>,
    irqs: &IrqRegistry,
    serial_out: Box<dyn std::io::Write + Send>,
    err_out: Box<dyn std::io::Write + Send>,
) -> Result<Fixed> {
    let pio = Arc::new(Bus::new());
    let mmio = Arc::new(Bus::new());
    let exit = ExitLatch::new();
    let serial_irq = irq::eventfd().map_err(Error::EventFd)?;
    let serial_source = IrqSource {
        id: SourceId::new(SERIAL_SOURCE, 0, 0),
        trigger: Trigger::Edge(serial_irq.try_clone().map_err(Error::EventFd)?),
    };
    irqs.attach(serial_source, GuestIrq::Edge(ports::SERIAL_GSI), Arc::new(()))
        .map_err(|e| Error::Irq(e.to_string()))?;
    let serial = SerialPort::new(serial_irq, serial_out);
    pio.insert(u64::from(ports::SERIAL_COM1), u64::from(ports::SERIAL_LEN), shared(serial))?;
    pio.insert(u64::from(ports::EXIT), 1, shared(ExitPort(Arc::clone(&exit))))?;
    pio.insert(u64::from(ports::ERR_CONSOLE), 1, shared(ErrConsole::new(err_out)))?;
    mmio.insert(layout::BENCH_MMIO_ADDR, 0x1000, shared(NullDevice))?;
    // ACPI PCI hot-plug: its registers, and the GED's edge-triggered interrupt.
    let hotplug_irq = irq::eventfd().map_err(Error::EventFd)?;
    let hotplug_source = IrqSource {
        id: SourceId::new(HOTPLUG_SOURCE, 0, 0),
        trigger: Trigger::Edge(hotplug_irq.try_clone().map_err(Error::EventFd)?),
    };
    irqs.attach(hotplug_source, GuestIrq::Edge(layout::acpi_hotplug::GSI), Arc::new(()))
        .map_err(|e| Error::Irq(e.to_string()))?;
    let hotplug = crate::hotplug::AcpiHotplug::new(hotplug_irq);
    mmio.insert(layout::acpi_hotplug::ADDR, layout::acpi_hotplug::LEN, shared(hotplug.registers()))?;
    let bench_ioevent = irq::eventfd().map_err(Error::EventFd)?;
    accel.register_ioevent(&bench_ioevent, IoAddr::Pio(u64::from(ports::BENCH_IOEVENTFD)))?;
    Ok(Fixed { pio, mmio, exit, bench_ioevent, hotplug })
}

/// The core hypercall block: benchmark marks, the non-coherent query (set once the
/// device manager exists), and the test interrupt sources when `test_sources`.
#[cfg_attr(not(feature = "test-sources"), allow(unused_variables))]
fn core_calls(
    bench_iterations: u64,
    accel: &Arc<dyn Accel>,
    irqs: &Arc<IrqRegistry>,
    pio: &Arc<Bus>,
    test_sources: bool,
) -> Result<Arc<CoreCalls>> {
    Ok(Arc::new(CoreCalls {
        bench: Arc::new(BenchMarks::new(bench_iterations)),
        noncoherent: std::sync::OnceLock::new(),
        #[cfg(feature = "test-sources")]
        test: if test_sources {
            let services = devices::test_irq::Services {
                chip: accel.clone(),
                io: Arc::new(crate::accel::AccelIo(Arc::clone(accel))),
                irqs: Arc::clone(irqs),
                pio: Arc::clone(pio),
            };
            Some(Arc::new(devices::test_irq::TestSources::new(&services).map_err(Error::EventFd)?))
        } else {
            None
        },
    }))
}

/// Ends the VM with the misuse policy's status, saying why (`--dma-kill-on-misuse`).
fn kill_switch(exit: &Arc<ExitLatch>) -> iommu::frontend::KillSwitch {
    let exit = Arc::clone(exit);
    Arc::new(move |why: &str| {
        eprintln!("passthru: ending the VM (--dma-kill-on-misuse): {why}");
        exit.request(abi::EXIT_KILLED_BY_POLICY);
    })
}

/// The answer to NONCOHERENT_QUERY for `gpa`: the VM's non-coherent devices, whether
/// the page's slot is flagged, and the memory type a WC guest mapping gets there.
fn noncoherent_query(
    nc: Arc<crate::device_manager::NonCoherent>,
    map: std::sync::Weak<MemoryMap>,
) -> crate::core_calls::Query {
    Box::new(move |gpa| {
        use crate::memtype::{Kernel, MemType, Page, decide};
        let flagged = map
            .upgrade()
            .is_some_and(|m| m.regions().iter().any(|r| gpa >= r.gpa && gpa < r.end() && r.flags.noncoherent_dma));
        let page = Page {
            vm_noncoherent: nc.count() > 0,
            slot_noncoherent: flagged,
            guest_pat: MemType::Wc,
            ..Page::default()
        };
        let code = match decide(Kernel::PerSlot, &page).effective(MemType::Wc) {
            MemType::Uc => abi::hcall::memtype::UC,
            MemType::Wc => abi::hcall::memtype::WC,
            MemType::Wt => abi::hcall::memtype::WT,
            MemType::Wp => abi::hcall::memtype::WP,
            MemType::Wb => abi::hcall::memtype::WB,
        };
        Ret::ok(nc.count() as u64, u64::from(flagged), code)
    })
}

fn shared<D: BusDevice + 'static>(d: D) -> Arc<Mutex<dyn BusDevice>> {
    Arc::new(Mutex::new(d))
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.devices.shutdown();
        let _ = self.accel.unregister_ioevent(&self.bench_ioevent, IoAddr::Pio(u64::from(ports::BENCH_IOEVENTFD)));
    }
}

/// A driver in the VMM's own process (tests, `passthru replay`, benchmarks) reaches
/// the VM's devices as a vCPU's MMIO does: ioeventfds first, then the bus.
impl virtio::driver::Bus for Vm {
    fn read(&self, addr: u64, data: &mut [u8]) {
        self.mmio_read(addr, data);
    }
    fn write(&self, addr: u64, data: &[u8]) {
        self.mmio_write(addr, data);
    }
}
