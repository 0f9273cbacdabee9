//! Snapshots of a running VM with its assigned devices, and their restore in a new
//! process.
//!
//! A snapshot is a directory: `manifest.json` (format name, version, every section's
//! file, size and CRC32C), `vm.json` (vCPU, irqchip, clock, devices: their guest-
//! visible configuration, emulated MSI-X table, device state from vfio-user
//! migration, DMA front-end state, interrupt forwarding modes), `ram.bin` (guest RAM,
//! only the pages ever touched: the memfd's data extents) and `devmem.bin` (the
//! devices' mmapped BAR memory, read through [`Vm::read_memory_for_host`]: flushed
//! first where flagged non-coherent, or refused by policy). It is written to a
//! temporary directory beside the target and swapped in with one `renameat2`
//! (RENAME_EXCHANGE), so a crash leaves the previous snapshot whole.
//!
//! Saving: everything that could refuse (a device without migration, a front-end
//! that cannot save, hot-added RAM, the non-coherent policy) is checked before a byte
//! is written. Then the vCPU is paused (parked between two instructions, its pending
//! I/O completed), every device stopped (no DMA in flight, no interrupt raised:
//! vfio-user RUNNING -> STOP), the state read, and everything resumed.
//!
//! Restoring ([`Snapshot::load`] checks every section before anything is applied):
//! RAM is written into the new VM's memfd, the devices are attached with their saved
//! names and slots, their configuration is replayed through the guest-visible
//! interface (BARs, command, MSI-X table and capabilities: the routes and irqfds
//! follow), their BAR memory written back, their front-end state restored (DMA_MAP
//! again), their device state loaded (RESUMING -> STOP); then the irqchip, the clock
//! and the vCPU, and the devices run again when the vCPU does.

use crate::device_manager::AssignedDevice;
use crate::error::{Error, Result};
use crate::vm::Vm;
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vfio_user::proto::mig;

/// The format's name in every manifest.
pub const FORMAT: &str = "passthru-snapshot";
/// The format's version: a snapshot of another version is refused.
pub const VERSION: u32 = 1;
/// First bytes of `ram.bin` and `devmem.bin`.
const DATA_MAGIC: &[u8; 8] = b"PTDATA1\0";
/// Largest `vm.json` accepted.
const MAX_STATE_JSON: u64 = 256 << 20;

/// The manifest: what the directory holds.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// The passthru version that wrote it.
    pub writer: String,
    /// Every section.
    pub sections: Vec<Section>,
}

/// One file of the snapshot.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// `vm`, `ram`, `devmem`.
    pub name: String,
    /// Its file in the directory.
    pub file: String,
    /// Its size.
    pub bytes: u64,
    /// CRC32C of its bytes.
    pub crc32c: u32,
}

/// A vCPU's state.
#[derive(Serialize, Deserialize)]
pub struct CpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    lapic: kvm_lapic_state,
    msrs: Vec<kvm_msr_entry>,
    mp_state: kvm_mp_state,
    events: kvm_vcpu_events,
    debugregs: kvm_debugregs,
}

/// The in-kernel irqchip (PIC master, PIC slave, IOAPIC) and the clock.
#[derive(Serialize, Deserialize, Clone)]
pub struct ChipState {
    chips: Vec<kvm_irqchip>,
    clock: kvm_clock_data,
}

/// A piece of a device's mmapped BAR memory, its bytes in `devmem.bin`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DeviceMemory {
    /// BAR index.
    pub bar: u8,
    /// Offset in the BAR.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// Where its bytes start in `devmem.bin`.
    pub at: u64,
}

/// One assigned device.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct DeviceState {
    /// Its name (`dma0`...).
    pub name: String,
    /// Its slot on bus 0.
    pub slot: u8,
    /// How it was given (passthru's `--device` text), to attach it again.
    pub spec: String,
    /// Its DMA front-end.
    pub frontend: String,
    /// The configuration space as the guest read it.
    pub config: Vec<u8>,
    /// The emulated MSI-X table: BAR, offset, bytes.
    pub msix: Option<(u8, u64, Vec<u8>)>,
    /// The device's own state (vfio-user migration data).
    pub device: Vec<u8>,
    /// Its front-end's state.
    pub frontend_state: Option<Vec<u64>>,
    /// Its mmapped BAR memory.
    pub memory: Vec<DeviceMemory>,
    /// It was non-coherent.
    pub noncoherent: bool,
}

/// Everything but RAM and device memory.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    /// Boot RAM bytes.
    pub memory: u64,
    /// The vCPU (None: no vCPU ran, e.g. qtest).
    pub cpu: Option<CpuState>,
    /// The irqchip and clock (KVM only).
    pub chip: Option<ChipState>,
    /// Devices in slot order.
    pub devices: Vec<DeviceState>,
    /// Interrupt sources and who delivered them: (device, index, sub, mode).
    pub irq_modes: Vec<(String, u32, u32, String)>,
    /// RAM hot-added since boot: (guest-physical start, size); contents in hotram.bin.
    #[serde(default)]
    pub hot_ram: Vec<(u64, u64)>,
    /// The test interrupt sources (a VM built with them), their runs paused mid-way.
    #[serde(default)]
    pub test_sources: Option<devices::test_irq_state::TestSourcesState>,
}

/// What a snapshot took.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct SaveReport {
    /// Bytes of guest RAM written.
    pub ram_bytes: u64,
    /// Bytes of device memory written.
    pub device_memory_bytes: u64,
    /// Bytes written in all.
    pub bytes: u64,
    /// vCPU paused to resumed (zero if the VM was paused by the operator).
    pub paused: Duration,
    /// Start to end.
    pub took: Duration,
}

fn err(what: impl Into<String>) -> Error {
    Error::Snapshot(what.into())
}

/// Saves `vm` to `dir`. `specs` gives each device's `--device` text (to attach it
/// again on restore). Refusals come before anything is written.
pub fn save(vm: &Vm, dir: &Path, specs: &dyn Fn(&str) -> Option<String>) -> Result<SaveReport> {
    let t0 = Instant::now();
    let _one = vm.snapshot_lock();
    // One pauser at a time (operator pause/resume, vm.info's PAT read): until the VM
    // runs again, not while the files are written.
    let pausers = vm.pause_lock();
    check_target(dir)?;
    // Refusals first: nothing is stopped, nothing written.
    let devices = vm.devices();
    let nc = vm.device_manager().noncoherent();
    if nc.count() > 0 && vm.noncoherent_reads() == crate::vm::NonCoherentReads::Refuse {
        return Err(err(format!(
            "{} non-coherent device(s) attached ({}): snapshots are refused by --noncoherent-migration refuse; \
             nothing was written",
            nc.count(),
            nc.devices().join(", ")
        )));
    }
    let mut frontend_states = Vec::new();
    for d in &devices {
        if d.is_torn_down() {
            return Err(err(format!("device {} is gone: unplug it first; nothing was written", d.name())));
        }
        if !d.function().migration_supported() {
            return Err(err(format!(
                "device {} does not support migration (vfio-user DEVICE_FEATURE MIGRATION with STOP_COPY): \
                 snapshot refused, nothing was written",
                d.name()
            )));
        }
        let spec = specs(d.name())
            .ok_or_else(|| err(format!("device {}: its --device specification is unknown", d.name())))?;
        // Refused now if it cannot be saved; saved for real once everything is stopped.
        d.frontend().save(d.bdf()).map_err(|e| err(format!("{e}; nothing was written")))?;
        frontend_states.push(spec);
    }
    // Pause the vCPU and stop every device; if the operator paused already, stop any
    // device hot-plugged since too (it stays so until their resume).
    let paused_at = Instant::now();
    let (result, owned) = match vm.pause_unlocked() {
        Ok(left) if left.is_empty() => (collect(vm, &devices, frontend_states), true),
        Ok(left) => {
            (Err(err(format!("device(s) {} could not be stopped; nothing was written", left.join(", ")))), true)
        }
        Err(crate::run_control::RunError::AlreadyPaused) => {
            let r = devices.iter().try_for_each(|d| vm.quiesce(d).map_err(err)).and_then(|()| {
                // What a device stopped just now signalled reaches the irqchip first.
                vm.irqs().settle();
                collect(vm, &devices, frontend_states)
            });
            (r, false)
        }
        Err(e) => (Err(err(e.to_string())), false),
    };
    let paused = paused_at.elapsed();
    if owned && let Err(e) = vm.resume_unlocked() {
        // Not the snapshot's failure, but the VM's: say so.
        tracing::error!("snapshot: resuming the VM after saving it: {e}");
    }
    drop(pausers);
    let was_paused = !owned;
    let (state, devmem, ram) = result?;
    let mut report = write_dir(dir, &state, &devmem, &ram)?;
    report.paused = if was_paused { Duration::ZERO } else { paused };
    report.took = t0.elapsed();
    Ok(report)
}

/// Reads the state of the paused VM and its stopped devices.
fn collect(vm: &Vm, devices: &[Arc<AssignedDevice>], specs: Vec<String>) -> Result<(VmState, Vec<u8>, RamImage)> {
    let mut devmem = Vec::new();
    let mut states = Vec::new();
    for (d, spec) in devices.iter().zip(specs) {
        let f = d.function();
        // Read while the guest is stopped: its mappings cannot change under us.
        let frontend_state = d.frontend().save(d.bdf()).map_err(err)?;
        let device = f.save_device_state().map_err(err)?;
        let mut memory = Vec::new();
        for w in d.bars() {
            for (offset, region) in &w.mapped {
                let gpa = w.addr.checked_add(*offset).ok_or_else(|| err("BAR address overflow"))?;
                let mut buf = vec![0u8; usize::try_from(region.size).map_err(|_| err("BAR too large"))?];
                vm.read_memory_for_host(gpa, &mut buf)?;
                memory.push(DeviceMemory { bar: w.bar, offset: *offset, len: region.size, at: devmem.len() as u64 });
                devmem.extend_from_slice(&buf);
            }
        }
        states.push(DeviceState {
            name: d.name().to_string(),
            slot: d.slot(),
            spec,
            frontend: d.frontend().name().to_string(),
            config: f.config_bytes(),
            msix: f.msix_table(),
            device,
            frontend_state,
            memory,
            noncoherent: f.is_noncoherent(),
        });
    }
    let irqs = vm.irqs();
    let irq_modes = irqs
        .sources()
        .iter()
        .filter_map(|id| irqs.stats(id).map(|s| (id.device.clone(), id.index, id.sub, s.mode.to_string())))
        .collect();
    let (cpu, chip) = match vm.kvm() {
        Some(kvm) => {
            let msr_list = kvm.kvm().get_msr_index_list().map_err(|e| Error::Kvm("KVM_GET_MSR_INDEX_LIST", e))?;
            let indexes: Vec<u32> = msr_list.as_slice().to_vec();
            let cpu = match vm.run_control().on_vcpu(move |v| save_cpu(v, &indexes)) {
                Ok(c) => Some(c?),
                Err(crate::run_control::RunError::NoVcpu) => None,
                Err(e) => return Err(err(e.to_string())),
            };
            (cpu, Some(save_chip(kvm)?))
        }
        None => (None, None),
    };
    // Guest RAM last, while everything is still stopped: copied to memory (the pause
    // lasts a memcpy of the touched pages; the file is written after resuming).
    #[cfg(feature = "test-sources")]
    let test_sources = vm.test_sources().map(|t| t.save()).transpose().map_err(err)?;
    #[cfg(not(feature = "test-sources"))]
    let test_sources = None;
    let (ram, hot_ram) = copy_ram(vm)?;
    Ok((VmState { memory: vm.ram().size(), cpu, chip, devices: states, irq_modes, hot_ram, test_sources }, devmem, ram))
}

/// Touched guest RAM copied out: (memfd offset, bytes) per data extent of boot RAM,
/// and (guest-physical address, bytes) per data extent of hot-added RAM.
struct RamImage(Vec<(u64, Vec<u8>)>, Vec<(u64, Vec<u8>)>);

fn copy_ram(vm: &Vm) -> Result<(RamImage, Vec<(u64, u64)>)> {
    use std::os::unix::fs::FileExt;
    let read = |file: &std::fs::File, off: u64, len: u64| -> Result<Vec<u8>> {
        let mut buf = vec![0u8; usize::try_from(len).map_err(|_| err("RAM extent too large"))?];
        file.read_exact_at(&mut buf, off).map_err(|e| err(format!("reading guest RAM: {e}")))?;
        Ok(buf)
    };
    let memfd = vm.ram().memfd();
    let mut boot = Vec::new();
    for (off, len) in ram_extents(memfd, 0, vm.ram().size()) {
        boot.push((off, read(memfd, off, len)?));
    }
    let boot_regions = vm.ram().regions();
    let mut hot = Vec::new();
    let mut hot_ram = Vec::new();
    for r in vm.memory_map().regions() {
        if r.kind != vm_api::RegionKind::Ram || boot_regions.iter().any(|b| b.gpa == r.gpa) {
            continue;
        }
        let (file, base, _) =
            vm.dma().backing_of(r.gpa).ok_or_else(|| err(format!("hot-added RAM at {:#x} has no file", r.gpa)))?;
        for (off, len) in ram_extents(&file, base, base + r.size) {
            hot.push((r.gpa + (off - base), read(&file, off, len)?));
        }
        hot_ram.push((r.gpa, r.size));
    }
    Ok((RamImage(boot, hot), hot_ram))
}

/// On the parked vCPU thread (its last exit completed before it parked, see
/// `Vcpu::run`): reads every piece of state.
fn save_cpu(v: &mut dyn std::any::Any, msr_indexes: &[u32]) -> Result<CpuState> {
    let fd = v.downcast_mut::<kvm_ioctls::VcpuFd>().ok_or_else(|| err("the vCPU job got no vCPU"))?;
    let k = |what, e| Error::Kvm(what, e);
    let mut msrs = Vec::new();
    let mut rest: Vec<u32> = msr_indexes.to_vec();
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> =
            rest.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut m = kvm_bindings::Msrs::from_entries(&entries).map_err(|_| err("too many MSRs"))?;
        let n = fd.get_msrs(&mut m).map_err(|e| k("KVM_GET_MSRS", e))?;
        msrs.extend_from_slice(&m.as_slice()[..n]);
        // The MSR at `n` cannot be read: skip it and go on after it.
        rest = rest.split_off((n + 1).min(rest.len()));
    }
    Ok(CpuState {
        regs: fd.get_regs().map_err(|e| k("KVM_GET_REGS", e))?,
        sregs: fd.get_sregs().map_err(|e| k("KVM_GET_SREGS", e))?,
        xsave: fd.get_xsave().map_err(|e| k("KVM_GET_XSAVE", e))?,
        xcrs: fd.get_xcrs().map_err(|e| k("KVM_GET_XCRS", e))?,
        lapic: fd.get_lapic().map_err(|e| k("KVM_GET_LAPIC", e))?,
        msrs,
        mp_state: fd.get_mp_state().map_err(|e| k("KVM_GET_MP_STATE", e))?,
        events: fd.get_vcpu_events().map_err(|e| k("KVM_GET_VCPU_EVENTS", e))?,
        debugregs: fd.get_debug_regs().map_err(|e| k("KVM_GET_DEBUGREGS", e))?,
    })
}

/// Loads a vCPU's state (into a vCPU created for it).
pub fn load_cpu(fd: &mut kvm_ioctls::VcpuFd, c: &CpuState) -> Result<()> {
    let k = |what, e| Error::Kvm(what, e);
    fd.set_sregs(&c.sregs).map_err(|e| k("KVM_SET_SREGS", e))?;
    fd.set_regs(&c.regs).map_err(|e| k("KVM_SET_REGS", e))?;
    // SAFETY: `c.xsave` is a whole kvm_xsave as KVM_GET_XSAVE returned it; passthru
    // never enables KVM_CAP_XSAVE2, so the kernel reads no more than that struct.
    unsafe { fd.set_xsave(&c.xsave) }.map_err(|e| k("KVM_SET_XSAVE", e))?;
    fd.set_xcrs(&c.xcrs).map_err(|e| k("KVM_SET_XCRS", e))?;
    fd.set_debug_regs(&c.debugregs).map_err(|e| k("KVM_SET_DEBUGREGS", e))?;
    fd.set_lapic(&c.lapic).map_err(|e| k("KVM_SET_LAPIC", e))?;
    let m = kvm_bindings::Msrs::from_entries(&c.msrs).map_err(|_| err("too many MSRs"))?;
    let n = fd.set_msrs(&m).map_err(|e| k("KVM_SET_MSRS", e))?;
    if n != c.msrs.len() {
        return Err(err(format!("KVM took {n} of {} MSRs (first refused: {:#x})", c.msrs.len(), c.msrs[n].index)));
    }
    fd.set_mp_state(c.mp_state).map_err(|e| k("KVM_SET_MP_STATE", e))?;
    fd.set_vcpu_events(&c.events).map_err(|e| k("KVM_SET_VCPU_EVENTS", e))?;
    Ok(())
}

fn save_chip(kvm: &crate::accel::KvmAccel) -> Result<ChipState> {
    let mut chips = Vec::new();
    for id in 0..3 {
        let mut c = kvm_irqchip { chip_id: id, ..Default::default() };
        kvm.vm().get_irqchip(&mut c).map_err(|e| Error::Kvm("KVM_GET_IRQCHIP", e))?;
        chips.push(c);
    }
    let clock = kvm.vm().get_clock().map_err(|e| Error::Kvm("KVM_GET_CLOCK", e))?;
    Ok(ChipState { chips, clock })
}

fn load_chip(kvm: &crate::accel::KvmAccel, c: &ChipState) -> Result<()> {
    for chip in &c.chips {
        kvm.vm().set_irqchip(chip).map_err(|e| Error::Kvm("KVM_SET_IRQCHIP", e))?;
    }
    // Only the clock value: the flags KVM_GET_CLOCK reports are not all settable.
    let clock = kvm_clock_data { clock: c.clock.clock, ..Default::default() };
    kvm.vm().set_clock(&clock).map_err(|e| Error::Kvm("KVM_SET_CLOCK", e))
}

/// A file being written, its CRC32C and size kept.
struct Out {
    file: std::fs::File,
    crc: u32,
    bytes: u64,
}

impl Out {
    fn create(path: &Path) -> Result<Out> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| err(format!("creating {}: {e}", path.display())))?;
        Ok(Out { file, crc: 0, bytes: 0 })
    }

    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.file.write_all(b).map_err(|e| err(format!("writing the snapshot: {e}")))?;
        self.crc = crc32c::crc32c_append(self.crc, b);
        self.bytes += b.len() as u64;
        Ok(())
    }

    fn finish(self, name: &str, file: &str) -> Result<Section> {
        self.file.sync_all().map_err(|e| err(format!("syncing {file}: {e}")))?;
        Ok(Section { name: name.into(), file: file.into(), bytes: self.bytes, crc32c: self.crc })
    }
}

/// The data extents (pages ever touched) of `[start, end)` of a memfd: (offset, length).
fn ram_extents(memfd: &std::fs::File, start: u64, end: u64) -> Vec<(u64, u64)> {
    let fd = memfd.as_raw_fd();
    let mut out = Vec::new();
    let mut at = i64::try_from(start).unwrap_or(i64::MAX);
    let end = i64::try_from(end).unwrap_or(i64::MAX);
    while at < end {
        // SAFETY: lseek on a descriptor this VM owns; it only moves the file offset.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data after `at`
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { end } else { hole.min(end) };
        if hole > data {
            out.push((data as u64, (hole - data) as u64));
        }
        at = hole;
    }
    out
}

/// A snapshot replaces only a snapshot: an existing `dir` must hold a passthru
/// manifest (anything else is refused, never deleted).
fn check_target(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let is_snapshot = std::fs::read(dir.join("manifest.json"))
        .ok()
        .and_then(|t| serde_json::from_slice::<Manifest>(&t).ok())
        .is_some_and(|m| m.format == FORMAT);
    if is_snapshot {
        Ok(())
    } else {
        Err(err(format!("{} exists and is not a passthru snapshot: pick another directory", dir.display())))
    }
}

fn write_dir(dir: &Path, state: &VmState, devmem: &[u8], image: &RamImage) -> Result<SaveReport> {
    let name = dir.file_name().ok_or_else(|| err(format!("{}: not a directory name", dir.display())))?;
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = parent.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    // Guest memory inside: private to the owner, as the API socket is.
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(&tmp).map_err(|e| err(format!("creating {}: {e}", tmp.display())))?;
    let r = (|| {
        let mut report = SaveReport::default();
        let mut sections = Vec::new();
        // RAM: the memfd's data extents as (offset, length, bytes) records; hot-added
        // RAM likewise with guest-physical addresses.
        for (name, records) in [("ram", &image.0), ("hotram", &image.1)] {
            let file = format!("{name}.bin");
            let mut out = Out::create(&tmp.join(&file))?;
            out.put(DATA_MAGIC)?;
            for (at, bytes) in records {
                out.put(&at.to_le_bytes())?;
                out.put(&(bytes.len() as u64).to_le_bytes())?;
                out.put(bytes)?;
                report.ram_bytes += bytes.len() as u64;
            }
            sections.push(out.finish(name, &file)?);
        }
        let mut dm = Out::create(&tmp.join("devmem.bin"))?;
        dm.put(DATA_MAGIC)?;
        dm.put(devmem)?;
        report.device_memory_bytes = devmem.len() as u64;
        sections.push(dm.finish("devmem", "devmem.bin")?);
        let json = serde_json::to_vec(state).map_err(|e| err(format!("encoding the VM state: {e}")))?;
        let mut v = Out::create(&tmp.join("vm.json"))?;
        v.put(&json)?;
        sections.push(v.finish("vm", "vm.json")?);
        report.bytes = sections.iter().map(|s| s.bytes).sum();
        let manifest =
            Manifest { format: FORMAT.into(), version: VERSION, writer: env!("CARGO_PKG_VERSION").into(), sections };
        let text = serde_json::to_vec_pretty(&manifest).map_err(|e| err(e.to_string()))?;
        let mut m = Out::create(&tmp.join("manifest.json"))?;
        m.put(&text)?;
        m.finish("manifest", "manifest.json")?;
        std::fs::File::open(&tmp)
            .and_then(|d| d.sync_all())
            .map_err(|e| err(format!("syncing {}: {e}", tmp.display())))?;
        Ok(report)
    })();
    let report = match r {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    swap_in(&tmp, dir)?;
    Ok(report)
}

/// Puts `tmp` at `dir` in one step: a plain rename if `dir` does not exist, else an
/// atomic exchange (the old snapshot, now at `tmp`, is then removed).
fn swap_in(tmp: &Path, dir: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| err("a path with a NUL byte"));
    let (a, b) = (c(tmp)?, c(dir)?);
    let flags = if dir.exists() { libc::RENAME_EXCHANGE } else { libc::RENAME_NOREPLACE };
    // SAFETY: two valid NUL-terminated paths; renameat2 only renames.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), flags) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        let _ = std::fs::remove_dir_all(tmp);
        return Err(err(format!("putting the snapshot at {}: {e}", dir.display())));
    }
    if flags == libc::RENAME_EXCHANGE {
        let _ = std::fs::remove_dir_all(tmp);
    }
    if let Some(p) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        let _ = std::fs::File::open(p).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// A snapshot read back and checked.
pub struct Snapshot {
    /// Where it is.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// Its state.
    pub state: VmState,
    /// Device memory bytes.
    pub devmem: Vec<u8>,
}

fn read_section(dir: &Path, s: &Section) -> Result<std::fs::File> {
    if s.file.contains('/') || s.file.starts_with('.') {
        return Err(err(format!("section {}: file name '{}' is not allowed", s.name, s.file)));
    }
    let path = dir.join(&s.file);
    let mut f = std::fs::File::open(&path).map_err(|e| err(format!("{}: {e}", path.display())))?;
    let len = f.metadata().map_err(|e| err(e.to_string()))?.len();
    if len != s.bytes {
        return Err(err(format!("{}: {len} bytes, the manifest says {} (truncated or altered)", s.file, s.bytes)));
    }
    let mut crc = 0u32;
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| err(format!("{}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
    }
    if crc != s.crc32c {
        return Err(err(format!("{}: checksum {crc:#010x}, the manifest says {:#010x} (corrupted)", s.file, s.crc32c)));
    }
    use std::io::Seek;
    f.rewind().map_err(|e| err(e.to_string()))?;
    Ok(f)
}

impl Snapshot {
    /// Reads `dir` and checks it whole: format and version, every section's size and
    /// checksum, the state's shape. Nothing is applied anywhere.
    pub fn load(dir: &Path) -> Result<Snapshot> {
        let mpath = dir.join("manifest.json");
        let text = std::fs::read(&mpath)
            .map_err(|e| err(format!("{}: {e} (not a passthru snapshot directory?)", mpath.display())))?;
        let manifest: Manifest = serde_json::from_slice(&text)
            .map_err(|e| err(format!("{}: not a snapshot manifest: {e}", mpath.display())))?;
        if manifest.format != FORMAT {
            return Err(err(format!("{}: format '{}', not '{FORMAT}'", mpath.display(), manifest.format)));
        }
        if manifest.version != VERSION {
            return Err(err(format!(
                "{}: a snapshot of format version {} (written by passthru {}); this passthru reads version {VERSION} only",
                dir.display(),
                manifest.version,
                manifest.writer
            )));
        }
        let find = |n: &str| {
            manifest
                .sections
                .iter()
                .find(|s| s.name == n)
                .ok_or_else(|| err(format!("the manifest has no '{n}' section")))
        };
        // Every section checked whole; vm.json and devmem.bin are checked as they are
        // read below.
        for s in manifest.sections.iter().filter(|s| s.name != "vm" && s.name != "devmem") {
            read_section(dir, s)?;
        }
        let mut vm_json = Vec::new();
        let vs = find("vm")?;
        if vs.bytes > MAX_STATE_JSON {
            return Err(err("vm.json is too large"));
        }
        read_section(dir, vs)?.read_to_end(&mut vm_json).map_err(|e| err(e.to_string()))?;
        let state: VmState = serde_json::from_slice(&vm_json).map_err(|e| err(format!("vm.json: {e}")))?;
        let mut devmem = Vec::new();
        read_section(dir, find("devmem")?)?.read_to_end(&mut devmem).map_err(|e| err(e.to_string()))?;
        if !devmem.starts_with(DATA_MAGIC) {
            return Err(err("devmem.bin: bad magic"));
        }
        devmem.drain(..DATA_MAGIC.len());
        for d in &state.devices {
            for m in &d.memory {
                if m.at.checked_add(m.len).is_none_or(|e| e > devmem.len() as u64) || m.bar >= 6 {
                    return Err(err(format!("device {}: its memory lies outside devmem.bin", d.name)));
                }
            }
            if !(0x40..=4096).contains(&d.config.len()) || d.slot == 0 || d.slot >= abi::pci::SLOTS {
                return Err(err(format!("device {}: a malformed configuration space or slot", d.name)));
            }
            if let Some((bar, off, table)) = &d.msix
                && (*bar >= 6 || table.len() > 2048 * 16 || off.checked_add(table.len() as u64).is_none())
            {
                return Err(err(format!("device {}: a malformed MSI-X table", d.name)));
            }
        }
        let mut hot = state.hot_ram.clone();
        hot.sort_unstable();
        for w in hot.windows(2) {
            if w[0].0.checked_add(w[0].1).is_none_or(|e| e > w[1].0) {
                return Err(err("vm.json: hot-added RAM regions overlap"));
            }
        }
        let snap = Snapshot { dir: dir.to_path_buf(), manifest, state, devmem };
        snap.check_ram()?;
        Ok(snap)
    }

    fn section_file(&self, name: &str) -> Result<Option<std::fs::File>> {
        let Some(s) = self.manifest.sections.iter().find(|s| s.name == name) else { return Ok(None) };
        let path = self.dir.join(&s.file);
        std::fs::File::open(&path).map(Some).map_err(|e| err(format!("{}: {e}", path.display())))
    }

    fn ram_file(&self) -> Result<std::fs::File> {
        self.section_file("ram")?.ok_or_else(|| err("no 'ram' section"))
    }

    /// Walks `ram.bin`'s records: `f(offset, len, file position of the bytes)`.
    fn ram_records(&self, f: impl FnMut(u64, u64, u64) -> Result<()>) -> Result<()> {
        records(&self.ram_file()?, "ram.bin", f)
    }
}

/// Walks a data file's records: `f(address, len, file position of the bytes)`.
fn records(file: &std::fs::File, what: &str, mut f: impl FnMut(u64, u64, u64) -> Result<()>) -> Result<()> {
    let size = file.metadata().map_err(|e| err(e.to_string()))?.len();
    use std::os::unix::fs::FileExt;
    let mut magic = [0u8; 8];
    file.read_exact_at(&mut magic, 0).map_err(|_| err(format!("{what}: too short")))?;
    if &magic != DATA_MAGIC {
        return Err(err(format!("{what}: bad magic")));
    }
    let mut at = 8u64;
    while at < size {
        let mut h = [0u8; 16];
        file.read_exact_at(&mut h, at).map_err(|_| err(format!("{what}: a record is cut")))?;
        let (a, l) = h.split_at(8);
        let addr = u64::from_le_bytes(a.try_into().map_err(|_| err(what.to_string()))?);
        let len = u64::from_le_bytes(l.try_into().map_err(|_| err(what.to_string()))?);
        let data = at + 16;
        let end = data
            .checked_add(len)
            .filter(|e| *e <= size)
            .ok_or_else(|| err(format!("{what}: a record runs past the end")))?;
        f(addr, len, data)?;
        at = end;
    }
    Ok(())
}

impl Snapshot {
    fn check_ram(&self) -> Result<()> {
        let size = self.state.memory;
        self.ram_records(|off, len, _| {
            if off.checked_add(len).is_none_or(|e| e > size) {
                return Err(err(format!("ram.bin: a record at {off:#x}+{len:#x} lies outside {size:#x} bytes of RAM")));
            }
            Ok(())
        })?;
        let hot = &self.state.hot_ram;
        if let Some(f) = self.section_file("hotram")? {
            records(&f, "hotram.bin", |gpa, len, _| {
                let end = gpa.checked_add(len).ok_or_else(|| err("hotram.bin: address overflow"))?;
                if !hot.iter().any(|&(g, s)| gpa >= g && end <= g.saturating_add(s)) {
                    return Err(err(format!("hotram.bin: a record at {gpa:#x}+{len:#x} lies in no hot-added region")));
                }
                Ok(())
            })?;
        } else if !hot.is_empty() {
            return Err(err("the snapshot lists hot-added RAM but has no hotram section"));
        }
        Ok(())
    }

    /// Writes the saved RAM into `vm`'s memfd (the VM has the snapshot's RAM size).
    pub fn apply_ram(&self, vm: &Vm) -> Result<u64> {
        if vm.ram().size() != self.state.memory {
            return Err(err(format!(
                "the snapshot has {} bytes of RAM, the VM {}",
                self.state.memory,
                vm.ram().size()
            )));
        }
        let file = self.ram_file()?;
        let memfd = vm.ram().memfd();
        let mut buf = vec![0u8; 4 << 20];
        let mut total = 0;
        use std::os::unix::fs::FileExt;
        self.ram_records(|off, len, at| {
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                file.read_exact_at(&mut buf[..n], at + done).map_err(|e| err(format!("ram.bin: {e}")))?;
                memfd.write_all_at(&buf[..n], off + done).map_err(|e| err(format!("guest RAM: {e}")))?;
                done += n as u64;
            }
            total += len;
            Ok(())
        })?;
        for &(gpa, size) in &self.state.hot_ram {
            vm.add_ram(gpa, size)?;
        }
        if let Some(f) = self.section_file("hotram")? {
            records(&f, "hotram.bin", |gpa, len, at| {
                // Through the same bounded buffer as boot RAM.
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(buf.len() as u64) as usize;
                    f.read_exact_at(&mut buf[..n], at + done).map_err(|e| err(format!("hotram.bin: {e}")))?;
                    vm.write_memory_for_host(gpa + done, &buf[..n])?;
                    done += n as u64;
                }
                total += len;
                Ok(())
            })?;
        }
        Ok(total)
    }

    /// Brings the attached devices (`vm.device(name)` for each saved one) back to
    /// their saved state: configuration replayed, BAR memory written, front-end state
    /// restored, device state loaded (each device is left stopped until
    /// [`Snapshot::start`]), interrupt modes set.
    pub fn apply_devices(&self, vm: &Vm) -> Result<()> {
        for d in &self.state.devices {
            let dev = vm.device(&d.name).ok_or_else(|| err(format!("device {} was not attached", d.name)))?;
            if dev.slot() != d.slot {
                return Err(err(format!("device {} is in slot {}, the snapshot has {}", d.name, dev.slot(), d.slot)));
            }
            replay_config(vm, &dev, d)?;
            for m in &d.memory {
                let base =
                    dev.bar(m.bar).ok_or_else(|| err(format!("device {}: BAR {} does not decode", d.name, m.bar)))?;
                let gpa = base.checked_add(m.offset).ok_or_else(|| err("BAR address overflow"))?;
                let (at, len) = (m.at as usize, m.len as usize);
                vm.write_memory_for_host(gpa, &self.devmem[at..at + len])?;
            }
            if let Some(fs) = &d.frontend_state {
                dev.frontend().restore(dev.bdf(), fs).map_err(|e| err(format!("device {}: {e}", d.name)))?;
            }
            if d.noncoherent {
                dev.function().mark_noncoherent();
            }
            dev.function().set_migration_state(mig::STATE_STOP).map_err(err)?;
            dev.function().load_device_state(&d.device).map_err(err)?;
        }
        if let Some(ts) = &self.state.test_sources {
            restore_test_sources(vm, ts)?;
        }
        for (device, index, sub, mode) in &self.state.irq_modes {
            let id = irq::SourceId::new(device, *index, *sub);
            let m = mode.parse::<irq::Mode>().map_err(|e| err(format!("interrupt source {id}: {e}")))?;
            // A source the restored devices did not bring back (the guest had not
            // enabled it yet) has no mode to restore; any other failure is an error.
            match vm.irqs().set_mode(&id, m) {
                Ok(()) | Err(irq::IrqError::Unknown(_)) => {}
                Err(e) => return Err(err(format!("interrupt source {id}: {e}"))),
            }
        }
        Ok(())
    }

    /// Loads the irqchip and clock (KVM), then lets every device run.
    pub fn start(&self, vm: &Vm) -> Result<()> {
        if let (Some(kvm), Some(chip)) = (vm.kvm(), &self.state.chip) {
            load_chip(kvm, chip)?;
        }
        for d in &self.state.devices {
            if let Some(dev) = vm.device(&d.name) {
                dev.function().set_migration_state(mig::STATE_RUNNING).map_err(err)?;
            }
        }
        #[cfg(feature = "test-sources")]
        if let Some(t) = vm.test_sources() {
            t.resume();
        }
        Ok(())
    }
}

/// The test interrupt sources wired again, their runs paused where they stopped.
#[cfg(feature = "test-sources")]
fn restore_test_sources(vm: &Vm, s: &devices::test_irq_state::TestSourcesState) -> Result<()> {
    let t = vm
        .test_sources()
        .ok_or_else(|| err("the snapshot has test interrupt sources: restore it with --test-sources"))?;
    t.restore(s).map_err(err)
}

#[cfg(not(feature = "test-sources"))]
fn restore_test_sources(_vm: &Vm, _s: &devices::test_irq_state::TestSourcesState) -> Result<()> {
    Err(err("the snapshot has test interrupt sources, and this passthru was built without them"))
}

/// Replays a device's saved configuration through the guest-visible interface, in an
/// order that works: BARs (decoding off), interrupt line, decoding on, the MSI-X table,
/// the capabilities (MSI, MSI-X enable, PCIe device control), then the command
/// register with bus mastering.
fn replay_config(vm: &Vm, dev: &AssignedDevice, d: &DeviceState) -> Result<()> {
    use abi::pci::{command, reg};
    use pci::PciFunction;
    let c = &d.config;
    if c.len() < 0x40 {
        return Err(err(format!("device {}: a configuration space of {} bytes", d.name, c.len())));
    }
    let (slot, pci) = (dev.slot(), vm.pci());
    for off in (reg::BAR0..reg::BAR0 + 24).step_by(4) {
        pci.config_write(slot, off, &c[usize::from(off)..usize::from(off) + 4]);
    }
    pci.config_write(slot, reg::INTERRUPT_LINE, &c[usize::from(reg::INTERRUPT_LINE)..][..1]);
    let cmd = u16::from_le_bytes([c[usize::from(reg::COMMAND)], c[usize::from(reg::COMMAND) + 1]]);
    pci.config_write(slot, reg::COMMAND, &(cmd & !command::MASTER).to_le_bytes());
    if let Some((bar, offset, table)) = &d.msix {
        for (i, chunk) in table.chunks(4).enumerate() {
            dev.function().bar_write(*bar, offset + (i * 4) as u64, chunk);
        }
    }
    for off in (0x40..c.len()).step_by(4) {
        if off + 4 <= c.len() {
            pci.config_write(slot, off as u16, &c[off..off + 4]);
        }
    }
    pci.config_write(slot, reg::COMMAND, &cmd.to_le_bytes());
    Ok(())
}
