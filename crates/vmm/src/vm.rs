//! A passthru machine: accelerator, guest RAM and memory map, PIO and MMIO buses with
//! the fixed devices, and the hypercall registry. The vCPU loop and the qtest driver
//! port reach devices through the same dispatch methods here.

use crate::accel::{Accel, AccelKind, IoAddr, KvmAccel, QtestAccel};
use crate::assigned::AssignedDevice;
use crate::core_calls::{BenchMarks, CoreCalls};
use crate::error::{Error, Result};
use crate::memory::{GuestRam, MemoryListener, MemoryMap, MemslotListener};
use crate::test_irq::{IntxTestSource, MsiTestSource, TestIrqSummary};
use abi::hcall::{Args, Ret};
use abi::{layout, ports};
use devices::legacy::{ErrConsole, ExitLatch, ExitPort, NullDevice};
use devices::serial::SerialPort;
use devices::{Bus, BusDevice};
use dma::{LockedMemory, VmDma};
use irq::{GuestIrq, IrqRegistry, IrqSource, Mode, SourceId, Trigger};
use std::io::Write;
use std::sync::{Arc, Mutex};
use vm_api::HypercallRegistry;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// How to build a machine.
pub struct VmConfig {
    /// Bytes of guest RAM.
    pub memory: u64,
    /// KVM or qtest.
    pub accel: AccelKind,
    /// Where the guest console (COM1) goes.
    pub serial_out: Box<dyn Write + Send>,
    /// Where the error console (panic messages) goes.
    pub err_out: Box<dyn Write + Send>,
    /// Iterations per probe handed to benchmark guests.
    pub bench_iterations: u64,
    /// How device interrupts are delivered when they attach.
    pub irq_mode: Mode,
    /// The VM's locked-memory limit for pinned DMA memory (None: RLIMIT_MEMLOCK).
    pub locked_memory: Option<u64>,
    /// End the VM when the guest makes a paravirtual DMA call with invalid arguments
    /// (off: the guest gets a status).
    pub pvdma_kill_on_misuse: bool,
}

/// Which front-end programs an assigned device's DMA domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaFrontend {
    /// All guest RAM at IOVA = guest-physical, pinned (no guest-visible IOMMU).
    Identity,
    /// The guest maps its own DMA through paravirtual DMA hypercalls.
    Paravirtual,
}

/// How to run an assigned DMA engine.
pub enum DeviceSpec {
    /// In the VMM process.
    Inline,
    /// In a device process already connected, over vfio-user.
    Remote(crate::assigned::RemoteSpec),
}

impl VmConfig {
    /// Defaults: 256 MiB, console to stdout, errors to stderr.
    pub fn new(accel: AccelKind) -> VmConfig {
        VmConfig {
            memory: 256 << 20,
            accel,
            serial_out: Box::new(std::io::stdout()),
            err_out: Box::new(std::io::stderr()),
            bench_iterations: 10_000,
            irq_mode: Mode::Forwarded,
            locked_memory: None,
            pvdma_kill_on_misuse: false,
        }
    }
}

/// A machine, ready to run a guest program (KVM) or to be driven (qtest).
pub struct Vm {
    accel: Arc<dyn Accel>,
    kvm: Option<Arc<KvmAccel>>,
    qtest: Option<Arc<QtestAccel>>,
    // Dropped first: devices stop, sources detach, then guest memory goes.
    devices: Mutex<Vec<Arc<AssignedDevice>>>,
    core: Arc<CoreCalls>,
    irqs: Arc<IrqRegistry>,
    hypercalls: Arc<HypercallRegistry>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitLatch>,
    bench_ioevent: EventFd,
    memory_map: Arc<MemoryMap>,
    dma: Arc<VmDma>,
    pvdma: Arc<iommu::pvdma::PvDma>,
    ram: GuestRam,
}

impl Vm {
    /// Builds the machine.
    pub fn new(config: VmConfig) -> Result<Vm> {
        let (accel, kvm, qtest): (Arc<dyn Accel>, _, _) = match config.accel {
            AccelKind::Kvm => {
                let k = Arc::new(KvmAccel::new()?);
                (k.clone(), Some(k), None)
            }
            AccelKind::Qtest => {
                let q = Arc::new(QtestAccel::new()?);
                (q.clone(), None, Some(q))
            }
        };
        let ram = GuestRam::new(config.memory)?;
        let account = match config.locked_memory {
            Some(limit) => LockedMemory::new(limit),
            None => LockedMemory::from_rlimit(),
        };
        let dma = VmDma::new(Arc::clone(ram.memory_arc()), account);
        let memory_map = Arc::new(MemoryMap::new());
        let slots: Arc<dyn MemoryListener> = Arc::new(MemslotListener::new(Arc::clone(&accel)));
        memory_map.add_listener(slots)?;
        for r in ram.regions() {
            memory_map.add_region(r)?;
        }

        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let exit = ExitLatch::new();
        let chip: Arc<dyn irq::IrqChip> = accel.clone();
        let irqs = Arc::new(IrqRegistry::new(chip, config.irq_mode).map_err(Error::EventFd)?);
        let serial_irq = irq::eventfd().map_err(Error::EventFd)?;
        let serial_source = IrqSource {
            id: SourceId::new("serial", 0, 0),
            trigger: Trigger::Edge(serial_irq.try_clone().map_err(Error::EventFd)?),
        };
        irqs.attach(serial_source, GuestIrq::Edge(ports::SERIAL_GSI), Arc::new(()))
            .map_err(|e| Error::Irq(e.to_string()))?;
        let serial = SerialPort::new(serial_irq, config.serial_out);
        pio.insert(u64::from(ports::SERIAL_COM1), u64::from(ports::SERIAL_LEN), shared(serial))?;
        pio.insert(u64::from(ports::EXIT), 1, shared(ExitPort(Arc::clone(&exit))))?;
        pio.insert(u64::from(ports::ERR_CONSOLE), 1, shared(ErrConsole::new(config.err_out)))?;
        mmio.insert(layout::BENCH_MMIO_ADDR, 0x1000, shared(NullDevice))?;
        let bench_ioevent = irq::eventfd().map_err(Error::EventFd)?;
        accel.register_ioevent(&bench_ioevent, IoAddr::Pio(u64::from(ports::BENCH_IOEVENTFD)))?;

        let hypercalls = Arc::new(HypercallRegistry::new());
        let core = Arc::new(CoreCalls {
            bench: Arc::new(BenchMarks::new(config.bench_iterations)),
            test_irq: Arc::new(MsiTestSource::new(Arc::clone(&accel), Arc::clone(&irqs)).map_err(Error::EventFd)?),
            test_intx: Arc::new(
                IntxTestSource::new(Arc::clone(&accel), Arc::clone(&irqs), &pio).map_err(Error::EventFd)?,
            ),
        });
        hypercalls.register(abi::hcall::CORE_BASE, core.clone())?;
        let kill: Option<iommu::pvdma::KillHook> = config.pvdma_kill_on_misuse.then(|| {
            let exit = Arc::clone(&exit);
            Box::new(move |why: &str| {
                eprintln!("passthru: ending the VM (--pvdma-kill-on-misuse): {why}");
                exit.request(abi::EXIT_KILLED_BY_POLICY);
            }) as iommu::pvdma::KillHook
        });
        let pvdma = Arc::new(iommu::pvdma::PvDma::new(Arc::clone(ram.memory_arc()), kill));
        hypercalls.register(abi::pvdma::BASE, Arc::new(PvDmaCalls(Arc::clone(&pvdma))))?;

        Ok(Vm {
            accel,
            kvm,
            qtest,
            devices: Mutex::new(Vec::new()),
            core,
            irqs,
            hypercalls,
            pio,
            mmio,
            exit,
            bench_ioevent,
            memory_map,
            dma,
            pvdma,
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

    /// The paravirtual DMA front-end.
    pub fn pvdma(&self) -> &Arc<iommu::pvdma::PvDma> {
        &self.pvdma
    }

    /// Attaches a DMA engine in the next device slot (the slot number is its pvdma
    /// device id). Its BARs appear on the MMIO bus; its DMA domain is programmed by
    /// `frontend`.
    pub fn attach_device(&self, spec: DeviceSpec, frontend: DmaFrontend) -> Result<Arc<AssignedDevice>> {
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        let slot = devices.len() as u64;
        let name = format!("dma{slot}");
        let domain = match frontend {
            DmaFrontend::Paravirtual => Ok(self.dma.create_domain(&name, dma::DomainConfig::default())),
            DmaFrontend::Identity => self.dma.identity_domain(&name),
        };
        let domain = domain.map_err(|e| match e {
            dma::MapError::NoMemory { limit, .. } => Error::Device(
                name.clone(),
                format!(
                    "its identity DMA domain pins all {} MiB of guest RAM, over the locked-memory limit of {} MiB; \
                     pass --locked-memory {}M (or raise `ulimit -l`), or give the guest less --memory",
                    self.ram.size() >> 20,
                    limit >> 20,
                    self.ram.size() >> 20
                ),
            ),
            other => Error::Device(name.clone(), other.to_string()),
        })?;
        let remote = match spec {
            DeviceSpec::Inline => None,
            DeviceSpec::Remote(r) => Some(r),
        };
        let dev = AssignedDevice::attach(&name, slot, Arc::clone(&domain), Arc::clone(&self.irqs), &self.ram, remote)?;
        for (base, len, bus_dev) in dev.bars() {
            self.mmio.insert(base, len, bus_dev)?;
        }
        self.pvdma.add_device(slot, &name, domain, frontend == DmaFrontend::Paravirtual);
        let pvdma = Arc::downgrade(&self.pvdma);
        dev.on_gone(Box::new(move || {
            if let Some(p) = pvdma.upgrade() {
                p.remove_device(slot);
            }
        }));
        devices.push(Arc::clone(&dev));
        Ok(dev)
    }

    /// The assigned devices.
    pub fn devices(&self) -> Vec<Arc<AssignedDevice>> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The interrupt forwarding registry.
    pub fn irqs(&self) -> &Arc<IrqRegistry> {
        &self.irqs
    }

    /// The core hypercall block (test sources, benchmark marks).
    pub fn core(&self) -> &Arc<CoreCalls> {
        &self.core
    }

    /// What the MSI test source did.
    pub fn test_irq_summary(&self) -> TestIrqSummary {
        self.core.test_irq.summary()
    }

    /// What the INTx test source did.
    pub fn test_intx_summary(&self) -> TestIrqSummary {
        self.core.test_intx.summary()
    }

    /// The status the guest asked to exit with, if it did.
    pub fn exit_status(&self) -> Option<u8> {
        self.exit.status()
    }

    /// Asks the machine to stop with `status` (as the exit port does).
    pub fn request_exit(&self, status: u8) {
        self.exit.request(status);
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

    /// A guest-physical write as the CPU would do it: RAM if the range is RAM,
    /// otherwise the MMIO bus. False if neither takes it.
    pub fn phys_write(&self, addr: u64, data: &[u8]) -> bool {
        if self.is_ram(addr, data.len()) {
            return self.memory().write_slice(data, GuestAddress(addr)).is_ok();
        }
        self.mmio_write(addr, data)
    }

    /// A guest-physical read (RAM, else MMIO). False if neither takes it.
    pub fn phys_read(&self, addr: u64, data: &mut [u8]) -> bool {
        if self.is_ram(addr, data.len()) {
            return self.memory().read_slice(data, GuestAddress(addr)).is_ok();
        }
        self.mmio_read(addr, data)
    }

    /// True when `[addr, addr + len)` lies inside one RAM region.
    pub fn is_ram(&self, addr: u64, len: usize) -> bool {
        let Some(end) = addr.checked_add(len as u64) else {
            return false;
        };
        self.memory().find_region(GuestAddress(addr)).is_some_and(|r| {
            use vm_memory::GuestMemoryRegion;
            end <= r.start_addr().0 + r.len()
        })
    }

    /// Loads a guest program, prepares the boot vCPU and runs it until the guest
    /// exits; returns the guest's exit status. KVM only.
    pub fn run_guest(&self, elf: &[u8]) -> Result<u8> {
        self.run_guest_with_args(elf, &[])
    }

    /// As [`Vm::run_guest`], passing up to [`layout::MAX_GUEST_ARGS`] program arguments.
    pub fn run_guest_with_args(&self, elf: &[u8], args: &[u64]) -> Result<u8> {
        if args.len() > layout::MAX_GUEST_ARGS {
            return Err(Error::GuestArgs(args.len()));
        }
        let kvm = self.kvm.as_ref().ok_or_else(|| Error::GuestCrashed("a guest program needs --accel kvm".into()))?;
        let low = self.ram.size().min(layout::MMIO_HOLE_START);
        let entry = crate::boot::load_elf(self.memory(), elf, low)?;
        let info = layout::BootInfo {
            magic: layout::BOOT_MAGIC,
            low_ram_size: low,
            high_ram_size: self.ram.size() - low,
            apic_id: 0,
            arg_count: args.len() as u64,
            args: {
                let mut a = [0; layout::MAX_GUEST_ARGS];
                a[..args.len()].copy_from_slice(args);
                a
            },
        };
        crate::boot::write_boot_structures(self.memory(), &info)?;
        let mut vcpu = crate::vcpu::Vcpu::new(kvm, 0, entry)?;
        vcpu.run(self)
    }
}

/// The pvdma block of the hypercall registry.
struct PvDmaCalls(Arc<iommu::pvdma::PvDma>);

impl vm_api::HypercallHandler for PvDmaCalls {
    fn name(&self) -> &str {
        "pvdma"
    }

    fn call(&self, args: &Args) -> Ret {
        self.0.call(args)
    }
}

fn shared<D: BusDevice + 'static>(d: D) -> Arc<Mutex<dyn BusDevice>> {
    Arc::new(Mutex::new(d))
}

impl Drop for Vm {
    fn drop(&mut self) {
        for d in self.devices.get_mut().unwrap_or_else(|e| e.into_inner()).drain(..) {
            self.mmio.remove(d.bar0());
            self.mmio.remove(d.bar1());
            d.remove();
        }
        let _ = self.accel.unregister_ioevent(&self.bench_ioevent, IoAddr::Pio(u64::from(ports::BENCH_IOEVENTFD)));
    }
}
