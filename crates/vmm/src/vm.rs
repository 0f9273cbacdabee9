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
use irq::{GuestIrq, IrqRegistry, IrqSource, Mode, SourceId, Trigger};
use std::io::Write;
use std::sync::{Arc, Mutex};
use vm_api::HypercallRegistry;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// The interrupt source of the serial port (COM1), the VM's own.
pub const SERIAL_SOURCE: &str = "serial";

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
    /// End the VM when the guest calls a DMA front-end with invalid arguments (off:
    /// the guest gets a status).
    pub dma_kill_on_misuse: bool,
    /// The guest-physical range devices may address without a guest IOMMU (the PCI
    /// bus's upstream window): what the identity front-end maps.
    pub dma_window: std::ops::Range<u64>,
    /// What host-side reads of guest memory (dumps, snapshots) do while a non-coherent
    /// device is attached.
    pub noncoherent_reads: NonCoherentReads,
    /// DMA front-ends to build with the VM (those its devices name; one named later by
    /// a hot-plugged device is built then).
    pub frontends: Vec<String>,
    /// Build the test interrupt sources (interrupt tests and benchmarks only).
    #[cfg(feature = "test-sources")]
    pub test_sources: bool,
}

/// What the VMM does before reading guest memory a non-coherent device may have
/// written behind the CPU caches (`--noncoherent-migration`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NonCoherentReads {
    /// Flush exactly the flagged ranges first (CLFLUSHOPT, else CLFLUSH).
    Flush,
    /// Refuse the read (a snapshot or dump) while a non-coherent device is attached.
    Refuse,
}

impl std::str::FromStr for NonCoherentReads {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<NonCoherentReads, String> {
        match s {
            "flush" => Ok(NonCoherentReads::Flush),
            "refuse" => Ok(NonCoherentReads::Refuse),
            _ => Err(format!("'{s}': use flush or refuse")),
        }
    }
}

/// The default DMA window: the whole 48-bit guest-physical space (RAM, and the 32- and
/// 64-bit BAR windows).
pub const DEFAULT_DMA_WINDOW: std::ops::Range<u64> = 0..(1 << 48);

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
            dma_kill_on_misuse: false,
            dma_window: DEFAULT_DMA_WINDOW,
            noncoherent_reads: NonCoherentReads::Flush,
            frontends: Vec::new(),
            #[cfg(feature = "test-sources")]
            test_sources: false,
        }
    }
}

/// A machine, ready to run a guest program (KVM) or to be driven (qtest).
pub struct Vm {
    accel: Arc<dyn Accel>,
    kvm: Option<Arc<KvmAccel>>,
    qtest: Option<Arc<QtestAccel>>,
    // Dropped first: devices stop, sources detach, then guest memory goes.
    devices: DeviceManager,
    core: Arc<CoreCalls>,
    irqs: Arc<IrqRegistry>,
    hypercalls: Arc<HypercallRegistry>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitLatch>,
    bench_ioevent: EventFd,
    memory_map: Arc<MemoryMap>,
    dma: Arc<VmDma>,
    noncoherent_reads: NonCoherentReads,
    slots: Arc<MemslotListener>,
    run: crate::run_control::RunControl,
    /// What an operator watches happen (see [`crate::events`]).
    events: Arc<crate::events::Events>,
    /// The VM said it is stopping (once).
    stopping: std::sync::atomic::AtomicBool,
    /// Devices stopped by a pause (or a snapshot of a paused VM), started by resume.
    quiesced: Mutex<Vec<String>>,
    /// Devices declared gone because they did not run again after a pause.
    resume_failures: std::sync::atomic::AtomicU64,
    /// Held by whoever pauses or resumes (operator, snapshot, the PAT read), so one's
    /// pause is never resumed by another.
    pausers: Mutex<()>,
    /// Held across a whole snapshot (one at a time: they share the temporary
    /// directory's name); taken before `pausers`, which a snapshot lets go once the VM
    /// runs again, while the files are written.
    snapshots: Mutex<()>,
    /// A vCPU state a restore left for the vCPU that continues the guest.
    restored_cpu: Mutex<Option<crate::vcpu_state::CpuState>>,
    exits: crate::run_control::ExitCounters,
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
        let slots = Arc::new(MemslotListener::new(Arc::clone(&accel)));
        memory_map.add_listener(Arc::clone(&slots) as Arc<dyn MemoryListener>)?;
        for r in ram.regions() {
            memory_map.add_region(r)?;
        }
        // Device DMA follows the memory map (RAM added later, mmapped BARs).
        memory_map.add_listener(Arc::clone(&dma) as Arc<dyn MemoryListener>)?;

        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let exit = ExitLatch::new();
        let chip: Arc<dyn irq::IrqChip> = accel.clone();
        let irqs = Arc::new(IrqRegistry::new(chip, config.irq_mode).map_err(Error::EventFd)?);
        let serial_irq = irq::eventfd().map_err(Error::EventFd)?;
        let serial_source = IrqSource {
            id: SourceId::new(SERIAL_SOURCE, 0, 0),
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
            noncoherent: std::sync::OnceLock::new(),
            #[cfg(feature = "test-sources")]
            test: if config.test_sources {
                let services = devices::test_irq::Services {
                    chip: accel.clone(),
                    io: Arc::new(crate::accel::AccelIo(Arc::clone(&accel))),
                    irqs: Arc::clone(&irqs),
                    pio: Arc::clone(&pio),
                };
                Some(Arc::new(devices::test_irq::TestSources::new(&services).map_err(Error::EventFd)?))
            } else {
                None
            },
        });
        hypercalls.register(abi::hcall::CORE_BASE, core.clone())?;
        let kill_on_misuse = config.dma_kill_on_misuse.then(|| {
            let exit = Arc::clone(&exit);
            Arc::new(move |why: &str| {
                eprintln!("passthru: ending the VM (--dma-kill-on-misuse): {why}");
                exit.request(abi::EXIT_KILLED_BY_POLICY);
            }) as iommu::frontend::KillSwitch
        });
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
            kill_on_misuse,
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
        let devices = DeviceManager::new(root, frontends, Arc::clone(&irqs), Arc::clone(&dma), Arc::clone(&events));
        let (nc, map) = (Arc::clone(devices.noncoherent()), Arc::downgrade(&memory_map));
        let _ = core.noncoherent.set(Box::new(move |gpa| {
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
        }));

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

    /// Hot-adds `size` bytes of RAM at `gpa` (its own memfd): KVM slots, device DMA and
    /// the identity front-end follow. The guest is not told (no ACPI); it must know.
    pub fn add_ram(&self, gpa: u64, size: u64) -> Result<()> {
        let r = crate::memory::hot_ram(gpa, size)?;
        self.memory_map.add_region(r)?;
        Ok(())
    }

    /// Hot-removes the RAM region starting at `gpa` (only RAM added with
    /// [`Vm::add_ram`]: the boot RAM stays). Devices lose it before this returns.
    pub fn remove_ram(&self, gpa: u64) -> Result<()> {
        let boot = self.ram.regions().iter().any(|r| r.gpa == gpa);
        let ram = self.memory_map.regions().iter().any(|r| r.gpa == gpa && r.kind == vm_api::RegionKind::Ram);
        if boot || !ram {
            return Err(Error::Memory(format!("no hot-added RAM starts at {gpa:#x}")));
        }
        self.memory_map.remove_region(gpa);
        Ok(())
    }

    /// Reads guest memory (RAM or device memory in the memory map) for the VMM itself:
    /// a dump, a snapshot. Memory flagged non-coherent is flushed from the CPU caches
    /// first (exactly the flagged bytes read), or the read is refused under
    /// `NonCoherentReads::Refuse` while a non-coherent device is attached. Fails if a
    /// byte is in no region.
    pub fn read_memory_for_host(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        let nc = self.devices.noncoherent().count();
        if nc > 0 && self.noncoherent_reads == NonCoherentReads::Refuse {
            return Err(Error::Memory(format!(
                "{nc} non-coherent device(s) attached ({}): reading guest memory is refused \
                 (--noncoherent-migration refuse); use --noncoherent-migration flush",
                self.devices.noncoherent().devices().join(", ")
            )));
        }
        self.host_access(gpa, buf.len(), |host, off, len, flagged| {
            // SAFETY: `host` is valid for `len` bytes (a region of the memory map, held
            // alive by the caller for the duration).
            if flagged && !unsafe { crate::flush::flush_range(host, len, None) } {
                return Err(Error::Memory("this CPU cannot flush caches (no CLFLUSH)".into()));
            }
            // SAFETY: as above; the buffer range is inside `buf`.
            let s = unsafe { vm_memory::VolatileSlice::new(host as *mut u8, len) };
            s.copy_to(&mut buf[off..off + len]);
            Ok(())
        })
    }

    /// Writes guest memory for the VMM itself (a restore); memory flagged non-coherent
    /// is flushed after the write, so a non-snooping device reads the new bytes.
    pub fn write_memory_for_host(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.host_access(gpa, data.len(), |host, off, len, flagged| {
            // SAFETY: `host` is valid for `len` bytes (a region held alive by the caller).
            let s = unsafe { vm_memory::VolatileSlice::new(host as *mut u8, len) };
            s.copy_from(&data[off..off + len]);
            // SAFETY: as above.
            if flagged && !unsafe { crate::flush::flush_range(host, len, None) } {
                return Err(Error::Memory("this CPU cannot flush caches (no CLFLUSH)".into()));
            }
            Ok(())
        })
    }

    /// Walks `[gpa, gpa + len)` over the memory map's regions: `f(host, offset in the
    /// buffer, bytes, flagged non-coherent)` per piece.
    fn host_access(
        &self,
        gpa: u64,
        len: usize,
        mut f: impl FnMut(*const u8, usize, usize, bool) -> Result<()>,
    ) -> Result<()> {
        let regions = self.memory_map.regions();
        let mut done = 0usize;
        while done < len {
            let at = gpa.checked_add(done as u64).ok_or_else(|| Error::Memory("address overflow".into()))?;
            let r = regions
                .iter()
                .find(|r| at >= r.gpa && at < r.end())
                .ok_or_else(|| Error::Memory(format!("{at:#x} is not guest memory")))?;
            let n = ((r.end() - at) as usize).min(len - done);
            // The region (and its mapping) stays alive: `regions` holds it.
            let host = r.host().wrapping_add((at - r.gpa) as usize) as *const u8;
            f(host, done, n, r.flags.noncoherent_dma)?;
            done += n;
        }
        Ok(())
    }

    /// Each memory-map region with its non-coherent flag and the memory type the guest
    /// gets there for a WB and a WC PAT entry, under passthru's per-slot model and
    /// under today's VM-wide kernels: `(region, flagged, [per-slot WB, per-slot WC,
    /// VM-wide WB, VM-wide WC])`.
    pub fn memory_types(&self) -> Vec<(vm_api::Region, bool, [crate::memtype::MemType; 4])> {
        // A PAT whose entry 0 is WB (6) and entry 1 WC (1), caches enabled.
        self.memory_types_for(0x0106, false)
            .into_iter()
            .map(|(r, [per_slot, vm_wide])| {
                let flagged = r.flags.noncoherent_dma;
                (r, flagged, [per_slot[0], per_slot[1], vm_wide[0], vm_wide[1]])
            })
            .collect()
    }

    /// The guest's IA32_PAT and CR0.CD, read on the vCPU's thread between two of its
    /// KVM_RUNs (no pause, no device stopped; see [`crate::run_control::RunControl::ask`]). None without a
    /// running vCPU, or one busy for longer than 200 ms (in a device's call).
    pub fn guest_cache_control(&self) -> Option<(u64, bool)> {
        self.run
            .ask(std::time::Duration::from_millis(200), |v| {
                let fd = v.downcast_mut::<kvm_ioctls::VcpuFd>()?;
                let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
                    index: crate::memtype::IA32_PAT,
                    ..Default::default()
                }])
                .ok()?;
                let pat = (fd.get_msrs(&mut msrs).ok()? == 1).then(|| msrs.as_slice()[0].data)?;
                let cd = fd.get_sregs().ok()?.cr0 & (1 << 30) != 0;
                Some((pat, cd))
            })
            .ok()
            .flatten()
    }

    /// For each memory-map region: its flag and, for each of the guest's eight PAT
    /// entries (`pat`, with CR0.CD `cd`), the effective memory type under passthru's
    /// per-slot model and under today's VM-wide kernels.
    pub fn memory_types_for(&self, pat: u64, cd: bool) -> Vec<(vm_api::Region, [[crate::memtype::MemType; 8]; 2])> {
        use crate::memtype::{Kernel, Page, decide, pat_entries};
        let vm_nc = self.devices.noncoherent().count() > 0;
        let entries = pat_entries(pat);
        self.memory_map
            .regions()
            .into_iter()
            .map(|r| {
                let page = Page {
                    vm_noncoherent: vm_nc,
                    slot_noncoherent: r.flags.noncoherent_dma,
                    cr0_cd: cd,
                    ..Page::default()
                };
                let t = |k, p| decide(k, &Page { guest_pat: p, ..page }).effective(p);
                let per_slot = entries.map(|p| t(Kernel::PerSlot, p));
                let vm_wide = entries.map(|p| t(Kernel::Current, p));
                (r, [per_slot, vm_wide])
            })
            .collect()
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

    /// Dirty tracking on (what live migration needs): KVM logs the vCPU's writes to
    /// RAM (its slots get KVM_MEM_LOG_DIRTY_PAGES), the DMA core logs every write made
    /// through a `DmaSpace` (in-process devices, and device processes' writes by
    /// message), and each device process logs its own in-place writes (vfio-user DMA
    /// dirty logging). [`Vm::dirty_take`] merges the three.
    pub fn dirty_start(&self) -> Result<()> {
        for r in self.memory_map.regions() {
            if r.kind == vm_api::RegionKind::Ram && !r.flags.log_dirty {
                self.memory_map
                    .set_flags(r.gpa, vm_api::RegionFlags { log_dirty: true, ..r.flags })
                    .map_err(Error::Memory)?;
            }
        }
        let _ = self.dma.dirty().take();
        for d in self.devices() {
            d.function().dirty_start().map_err(|e| Error::Device(d.name().to_string(), e))?;
        }
        Ok(())
    }

    /// Dirty tracking off.
    pub fn dirty_stop(&self) -> Result<()> {
        // Every source is stopped; the first device that refused is reported.
        let mut refused = None;
        for d in self.devices() {
            if let Err(e) = d.function().dirty_stop() {
                refused.get_or_insert(Error::Device(d.name().to_string(), e));
            }
        }
        for r in self.memory_map.regions() {
            if r.kind == vm_api::RegionKind::Ram && r.flags.log_dirty {
                self.memory_map
                    .set_flags(r.gpa, vm_api::RegionFlags { log_dirty: false, ..r.flags })
                    .map_err(Error::Memory)?;
            }
        }
        refused.map_or(Ok(()), Err)
    }

    /// The guest-physical pages (4 KiB) written since dirty tracking started or the
    /// last call, by anyone: the vCPU, in-process devices, device processes. One sorted
    /// list per VM; every source clears what it reports.
    pub fn dirty_take(&self) -> Result<Vec<u64>> {
        let mut pages = Vec::new();
        if let Some(kvm) = &self.kvm {
            let regions = self.memory_map.regions();
            for (gpa, slot, flags) in self.slots.slots() {
                let Some(r) = regions.iter().find(|r| r.gpa == gpa) else { continue };
                if !flags.log_dirty {
                    continue;
                }
                let size = usize::try_from(r.size).map_err(|_| Error::Memory("slot too large".into()))?;
                let bits = kvm.vm().get_dirty_log(slot, size).map_err(|e| Error::Kvm("KVM_GET_DIRTY_LOG", e))?;
                dma::pages_of_bits(gpa, &bits, r.size.div_ceil(4096), &mut pages);
            }
        }
        pages.extend(self.dma.dirty().take());
        for d in self.devices() {
            d.function().dirty_take(&mut pages).map_err(|e| Error::Device(d.name().to_string(), e))?;
        }
        pages.sort_unstable();
        pages.dedup();
        Ok(pages)
    }

    /// What host-side reads of memory flagged non-coherent do.
    pub fn noncoherent_reads(&self) -> NonCoherentReads {
        self.noncoherent_reads
    }

    /// Pause and resume.
    pub fn run_control(&self) -> &crate::run_control::RunControl {
        &self.run
    }

    /// Stops the vCPU at an instruction boundary (see [`crate::run_control`]), then
    /// quiesces every device that can be (vfio-user migration RUNNING -> STOP: no DMA
    /// in flight, no interrupt raised). Returns the devices that could not be (no
    /// migration support, or the stop failed): they go on running.
    pub fn pause(&self) -> std::result::Result<Vec<String>, crate::run_control::RunError> {
        let _pausers = self.pause_lock();
        self.pause_unlocked()
    }

    /// Leaves `state` for the vCPU that continues a restored guest.
    pub(crate) fn set_restored_cpu(&self, state: crate::vcpu_state::CpuState) {
        *self.restored_cpu.lock().unwrap_or_else(|e| e.into_inner()) = Some(state);
    }

    /// Takes what [`Vm::set_restored_cpu`] left.
    pub(crate) fn take_restored_cpu(&self) -> Option<crate::vcpu_state::CpuState> {
        self.restored_cpu.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// One snapshot at a time (see the field).
    pub(crate) fn snapshot_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.snapshots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One pauser at a time: held across a pause and what is done while paused.
    pub(crate) fn pause_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.pausers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// [`Vm::pause`] for a holder of [`Vm::pause_lock`].
    pub(crate) fn pause_unlocked(&self) -> std::result::Result<Vec<String>, crate::run_control::RunError> {
        self.run.pause()?;
        self.events.publish(crate::events::Event::VmPaused);
        let mut unquiesced = Vec::new();
        for d in self.devices() {
            if let Err(e) = self.quiesce(&d) {
                tracing::warn!("pause: {e}");
                unquiesced.push(d.name().to_string());
            }
        }
        #[cfg(feature = "test-sources")]
        if let Some(t) = self.test_sources()
            && let Err(e) = vm_api::Pausable::pause(t.as_ref())
        {
            tracing::warn!("pause: {e}");
            unquiesced.push("test-sources".to_string());
        }
        // What the devices signalled before they stopped reaches the irqchip before
        // anyone reads the vCPU's local APIC.
        self.irqs.settle();
        Ok(unquiesced)
    }

    /// Stops device `d` (vfio-user migration STOP) until [`Vm::resume`].
    pub(crate) fn quiesce(&self, d: &AssignedDevice) -> std::result::Result<(), String> {
        let mut stopped = self.quiesced.lock().unwrap_or_else(|e| e.into_inner());
        if stopped.iter().any(|n| n == d.name()) {
            return Ok(());
        }
        vm_api::Pausable::pause(d).map_err(|e| e.to_string())?;
        stopped.push(d.name().to_string());
        Ok(())
    }

    /// Lets the quiesced devices and the paused vCPU run again. Returns the devices
    /// that could not run again (STOP -> RUNNING refused or unanswered): each is
    /// declared gone (a surprise removal, counted), since a device left stopped under a
    /// running guest would be a device that silently does nothing.
    pub fn resume(&self) -> std::result::Result<Vec<String>, crate::run_control::RunError> {
        let _pausers = self.pause_lock();
        self.resume_unlocked()
    }

    /// [`Vm::resume`] for a holder of [`Vm::pause_lock`].
    pub(crate) fn resume_unlocked(&self) -> std::result::Result<Vec<String>, crate::run_control::RunError> {
        if self.run.state() != crate::run_control::RunState::Paused {
            return Err(crate::run_control::RunError::NotPaused);
        }
        let stopped = std::mem::take(&mut *self.quiesced.lock().unwrap_or_else(|e| e.into_inner()));
        let mut failed = Vec::new();
        for name in stopped {
            if let Some(d) = self.device(&name)
                && let Err(e) = vm_api::Pausable::resume(d.as_ref())
            {
                tracing::error!("resume: device {name}: {e}");
                d.function().died(&format!("it did not run again after a pause: {e}"));
                self.resume_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                failed.push(name);
            }
        }
        #[cfg(feature = "test-sources")]
        if let Some(t) = self.test_sources() {
            let _ = vm_api::Pausable::resume(t.as_ref());
        }
        self.run.resume()?;
        self.events.publish(crate::events::Event::VmResumed { failed: failed.clone() });
        Ok(failed)
    }

    /// Devices declared gone because they did not run again after a pause.
    pub fn resume_failures(&self) -> u64 {
        self.resume_failures.load(std::sync::atomic::Ordering::Relaxed)
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

    /// A guest-physical write as the CPU would do it: RAM if the range is RAM (boot or
    /// hot-added), otherwise the MMIO bus. False if neither takes it.
    pub fn phys_write(&self, addr: u64, data: &[u8]) -> bool {
        if self.is_ram(addr, data.len()) {
            return self.memory().write_slice(data, GuestAddress(addr)).is_ok();
        }
        if let Some(s) = self.hot_ram_slice(addr, data.len()) {
            s.copy_from(data);
            return true;
        }
        self.mmio_write(addr, data)
    }

    /// A guest-physical read (RAM, else MMIO). False if neither takes it.
    pub fn phys_read(&self, addr: u64, data: &mut [u8]) -> bool {
        if self.is_ram(addr, data.len()) {
            return self.memory().read_slice(data, GuestAddress(addr)).is_ok();
        }
        if let Some(s) = self.hot_ram_slice(addr, data.len()) {
            s.copy_to(data);
            return true;
        }
        self.mmio_read(addr, data)
    }

    /// `[addr, addr + len)` inside one hot-added RAM region, as a volatile slice that
    /// keeps the region (and its mapping) alive while it is used.
    fn hot_ram_slice(&self, addr: u64, len: usize) -> Option<HotSlice> {
        let end = addr.checked_add(len as u64)?;
        let r = self
            .memory_map
            .regions()
            .into_iter()
            .find(|r| r.kind == vm_api::RegionKind::Ram && addr >= r.gpa && end <= r.end())?;
        Some(HotSlice { offset: (addr - r.gpa) as usize, len, region: r })
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
}

/// A window into hot-added RAM, holding its region.
struct HotSlice {
    region: vm_api::Region,
    offset: usize,
    len: usize,
}

impl HotSlice {
    fn slice(&self) -> vm_memory::VolatileSlice<'_> {
        // SAFETY: the region's host memory is valid for its size while the region (held
        // here) lives; `offset + len` lies inside it (checked by `hot_ram_slice`).
        unsafe { vm_memory::VolatileSlice::new(self.region.host().add(self.offset), self.len) }
    }

    fn copy_from(&self, data: &[u8]) {
        self.slice().copy_from(data);
    }

    fn copy_to(&self, data: &mut [u8]) {
        self.slice().copy_to(data);
    }
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
