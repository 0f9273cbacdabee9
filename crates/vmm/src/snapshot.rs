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
//! that cannot save, a device already gone, the non-coherent policy) is checked before a byte
//! is written. Then the vCPU is paused (parked between two instructions, its pending
//! I/O completed), every device stopped (no DMA in flight, no interrupt raised:
//! vfio-user RUNNING -> STOP), the state read, guest RAM and device memory streamed
//! to the files in 4 MiB pieces (the VMM never holds a copy of guest memory; the pause
//! lasts that write), and everything resumed.
//!
//! Restoring ([`Snapshot::load`] checks every section before anything is applied;
//! sections are opened once, as regular files only, never through a symlink or a
//! FIFO, and what is applied is checksummed again as it is read from those same
//! descriptors):
//! RAM is written into the new VM's memfd, the devices are attached with their saved
//! names and slots, their configuration is replayed through the guest-visible
//! interface (BARs, command, MSI-X table and capabilities: the routes and irqfds
//! follow), their BAR memory written back, their front-end state restored (DMA_MAP
//! again), their device state loaded (RESUMING -> STOP); then the irqchip, the clock
//! and the vCPU, and the devices run again when the vCPU does.

use crate::device_manager::AssignedDevice;
use crate::error::{Error, Result};
use crate::vcpu_state::{CpuState, save_cpu};
use crate::vm::Vm;
use kvm_bindings::{kvm_clock_data, kvm_irqchip};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vfio_user::proto::mig;

/// The format's name in every manifest.
pub const FORMAT: &str = "passthru-snapshot";
/// The format's version: a snapshot of another version is refused. Version 2 saved
/// the vCPU's CPUID; version 3 saves each DMA front-end's state as one typed section
/// (not words per device).
pub const VERSION: u32 = 3;
/// First bytes of `ram.bin` and `devmem.bin`.
const DATA_MAGIC: &[u8; 8] = b"PTDATA1\0";
/// Largest `vm.json` accepted.
const MAX_STATE_JSON: u64 = 256 << 20;
/// Largest `manifest.json` accepted.
const MAX_MANIFEST: u64 = 1 << 20;
/// Bytes moved at a time between guest memory and the files.
const CHUNK: usize = 4 << 20;
/// The sections a snapshot holds; `hotram` may be absent.
const SECTIONS: [&str; 4] = ["vm", "ram", "hotram", "devmem"];

/// The manifest: what the directory holds.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
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
#[serde(deny_unknown_fields)]
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

/// The in-kernel irqchip (PIC master, PIC slave, IOAPIC) and the clock.
#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ChipState {
    chips: Vec<kvm_irqchip>,
    clock: kvm_clock_data,
}

/// A piece of a device's mmapped BAR memory, its bytes in `devmem.bin`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
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
#[serde(deny_unknown_fields)]
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
    /// Its mmapped BAR memory.
    pub memory: Vec<DeviceMemory>,
    /// It was non-coherent.
    pub noncoherent: bool,
}

/// Everything but RAM and device memory.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// Boot RAM bytes.
    pub memory: u64,
    /// The vCPU (None: no vCPU ran, e.g. qtest).
    pub cpu: Option<CpuState>,
    /// The irqchip and clock (KVM only).
    pub chip: Option<ChipState>,
    /// Devices in slot order.
    pub devices: Vec<DeviceState>,
    /// The DMA front-ends that keep state, by name: each its own typed, versioned
    /// section.
    pub frontends: std::collections::BTreeMap<String, vm_api::Section>,
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
    use crate::events::Event;
    let shown = dir.display().to_string();
    let _span = tracing::info_span!("snapshot", dir = %shown).entered();
    let r = save_inner(vm, dir, specs, &|| {
        vm.events().publish(Event::Snapshot { phase: "started".into(), dir: shown.clone(), bytes: None, error: None })
    });
    match &r {
        Ok(report) => tracing::info!(bytes = report.bytes, paused_us = report.paused.as_micros() as u64, "saved"),
        Err(e) => tracing::info!("refused or failed: {e}"),
    }
    let event = match &r {
        Ok(report) => Event::Snapshot { phase: "done".into(), dir: shown, bytes: Some(report.bytes), error: None },
        Err(e) => Event::Snapshot { phase: "failed".into(), dir: shown, bytes: None, error: Some(e.to_string()) },
    };
    vm.events().publish(event);
    r
}

/// [`save`], calling `started` once the refusals are past.
fn save_inner(vm: &Vm, dir: &Path, specs: &dyn Fn(&str) -> Option<String>, started: &dyn Fn()) -> Result<SaveReport> {
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
    for fe in vm.frontends().all() {
        if let Some(state) = fe.state() {
            state.can_save().map_err(|e| err(format!("{e}; nothing was written")))?;
        }
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
        frontend_states.push(spec);
    }
    let tmp = TempDir::beside(dir)?;
    started();
    // Pause the vCPU and stop every device; if the operator paused already, stop any
    // device hot-plugged since too (it stays so until their resume).
    let paused_at = Instant::now();
    let (result, owned) = match vm.pause_unlocked() {
        Ok(left) if left.is_empty() => (collect(vm, &devices, frontend_states, &tmp.path), true),
        Ok(left) => {
            (Err(err(format!("device(s) {} could not be stopped; nothing was written", left.join(", ")))), true)
        }
        Err(crate::run_control::RunError::AlreadyPaused) => {
            let r = devices.iter().try_for_each(|d| vm.quiesce(d).map_err(err)).and_then(|()| {
                // What a device stopped just now signalled reaches the irqchip first.
                vm.irqs().settle();
                collect(vm, &devices, frontend_states, &tmp.path)
            });
            (r, false)
        }
        Err(e) => (Err(err(e.to_string())), false),
    };
    let paused = paused_at.elapsed();
    if owned {
        // Not the snapshot's failure, but the VM's: say so.
        match vm.resume_unlocked() {
            Ok(failed) if !failed.is_empty() => {
                tracing::error!("snapshot: device(s) {} did not run again and are gone", failed.join(", "));
            }
            Ok(_) => {}
            Err(e) => tracing::error!("snapshot: resuming the VM after saving it: {e}"),
        }
    }
    drop(pausers);
    let was_paused = !owned;
    let (state, sections, mut report) = result?;
    finish_dir(&tmp.path, &state, sections, &mut report)?;
    tmp.swap_into(dir)?;
    report.paused = if was_paused { Duration::ZERO } else { paused };
    report.took = t0.elapsed();
    Ok(report)
}

/// Reads the state of the paused VM and its stopped devices, streaming guest RAM and
/// device memory into `tmp` (the sections `ram`, `hotram`, `devmem`).
fn collect(
    vm: &Vm,
    devices: &[Arc<AssignedDevice>],
    specs: Vec<String>,
    tmp: &Path,
) -> Result<(VmState, Vec<Section>, SaveReport)> {
    let mut report = SaveReport::default();
    let mut buf = vec![0u8; CHUNK];
    let mut dm = Out::create(&tmp.join("devmem.bin"))?;
    dm.put(DATA_MAGIC)?;
    let mut states = Vec::new();
    for (d, spec) in devices.iter().zip(specs) {
        let f = d.function();
        let device = f.save_device_state().map_err(err)?;
        let mut memory = Vec::new();
        for w in d.bars() {
            for (offset, region) in &w.mapped {
                let gpa = w.addr.checked_add(*offset).ok_or_else(|| err("BAR address overflow"))?;
                let at = dm.bytes - DATA_MAGIC.len() as u64;
                let mut done = 0u64;
                while done < region.size {
                    let n = (region.size - done).min(CHUNK as u64) as usize;
                    vm.read_memory_for_host(gpa + done, &mut buf[..n])?;
                    dm.put(&buf[..n])?;
                    done += n as u64;
                }
                memory.push(DeviceMemory { bar: w.bar, offset: *offset, len: region.size, at });
                report.device_memory_bytes += region.size;
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
            memory,
            noncoherent: f.is_noncoherent(),
        });
    }
    let mut sections = vec![dm.finish("devmem", "devmem.bin")?];
    // Read while the guest is stopped: its mappings cannot change under us.
    let mut frontends = std::collections::BTreeMap::new();
    for fe in vm.frontends().all() {
        if let Some(state) = fe.state() {
            frontends.insert(fe.name().to_string(), state.save().map_err(|e| err(e.to_string()))?);
        }
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
    #[cfg(feature = "test-sources")]
    let test_sources = vm.test_sources().map(|t| t.save()).transpose().map_err(err)?;
    #[cfg(not(feature = "test-sources"))]
    let test_sources = None;
    // Guest RAM last, while everything is still stopped.
    let SavedRam { ram, hotram, hot_ram } = write_ram(vm, tmp, &mut buf, &mut report)?;
    sections.extend([ram, hotram]);
    let state =
        VmState { memory: vm.ram().size(), cpu, chip, devices: states, frontends, irq_modes, hot_ram, test_sources };
    Ok((state, sections, report))
}

/// Streams the touched pages of guest RAM (the memfds' data extents) into `ram.bin`
/// (records by memfd offset) and `hotram.bin` (hot-added RAM, by guest-physical
/// address); returns both sections and the hot-added regions.
fn write_ram(vm: &Vm, tmp: &Path, buf: &mut [u8], report: &mut SaveReport) -> Result<SavedRam> {
    use std::os::unix::fs::FileExt;
    let mut put_extent = |out: &mut Out, file: &std::fs::File, addr: u64, off: u64, len: u64| -> Result<()> {
        out.put(&addr.to_le_bytes())?;
        out.put(&len.to_le_bytes())?;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], off + done).map_err(|e| err(format!("reading guest RAM: {e}")))?;
            out.put(&buf[..n])?;
            done += n as u64;
        }
        report.ram_bytes += len;
        Ok(())
    };
    let mut ram = Out::create(&tmp.join("ram.bin"))?;
    ram.put(DATA_MAGIC)?;
    let memfd = vm.ram().memfd();
    for (off, len) in ram_extents(memfd, 0, vm.ram().size()) {
        put_extent(&mut ram, memfd, off, off, len)?;
    }
    let mut hot = Out::create(&tmp.join("hotram.bin"))?;
    hot.put(DATA_MAGIC)?;
    let boot_regions = vm.ram().regions();
    let mut hot_ram = Vec::new();
    for r in vm.memory_map().regions() {
        if r.kind != vm_api::RegionKind::Ram || boot_regions.iter().any(|b| b.gpa == r.gpa) {
            continue;
        }
        let (file, base, _) =
            vm.dma().backing_of(r.gpa).ok_or_else(|| err(format!("hot-added RAM at {:#x} has no file", r.gpa)))?;
        for (off, len) in ram_extents(&file, base, base + r.size) {
            put_extent(&mut hot, &file, r.gpa + (off - base), off, len)?;
        }
        hot_ram.push((r.gpa, r.size));
    }
    Ok(SavedRam { ram: ram.finish("ram", "ram.bin")?, hotram: hot.finish("hotram", "hotram.bin")?, hot_ram })
}

/// What [`write_ram`] wrote: its two sections and the hot-added regions.
struct SavedRam {
    ram: Section,
    hotram: Section,
    hot_ram: Vec<(u64, u64)>,
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

/// The directory a snapshot is written to, beside its target (`.NAME.tmp-PID`,
/// 0700): removed on drop unless swapped in.
struct TempDir {
    path: PathBuf,
    kept: bool,
}

impl TempDir {
    fn beside(dir: &Path) -> Result<TempDir> {
        let name = dir.file_name().ok_or_else(|| err(format!("{}: not a directory name", dir.display())))?;
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let path = parent.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        // Guest memory inside: private to the owner, as the API socket is.
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| err(format!("creating {}: {e}", path.display())))?;
        Ok(TempDir { path, kept: false })
    }

    /// Puts the directory at `dir` in one step: a plain rename if `dir` does not
    /// exist, else an atomic exchange (the old snapshot, now here, is then removed).
    fn swap_into(mut self, dir: &Path) -> Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| err("a path with a NUL byte"));
        let (a, b) = (c(&self.path)?, c(dir)?);
        let flags = if dir.exists() { libc::RENAME_EXCHANGE } else { libc::RENAME_NOREPLACE };
        // SAFETY: two valid NUL-terminated paths; renameat2 only renames.
        let rc = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), flags) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(err(format!("putting the snapshot at {}: {e}", dir.display())));
        }
        // After an exchange this directory holds the old snapshot: drop removes it.
        self.kept = flags != libc::RENAME_EXCHANGE;
        if let Some(p) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            let _ = std::fs::File::open(p).and_then(|d| d.sync_all());
        }
        Ok(())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Writes `vm.json` and the manifest beside the data sections already in `tmp`, and
/// syncs the directory.
fn finish_dir(tmp: &Path, state: &VmState, mut sections: Vec<Section>, report: &mut SaveReport) -> Result<()> {
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
    std::fs::File::open(tmp).and_then(|d| d.sync_all()).map_err(|e| err(format!("syncing {}: {e}", tmp.display())))
}

/// A snapshot read back and checked.
pub struct Snapshot {
    /// Where it is.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// Its state.
    pub state: VmState,
    /// The data sections, opened once (regular files only) and checked: what a
    /// restore applies is read from these very descriptors, and checksummed again.
    files: Vec<(Section, std::fs::File)>,
}

/// Opens `path` for reading only if it is a regular file, not through a symlink, and
/// without blocking (a FIFO put in its place would block `open` forever).
fn open_regular(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).map_err(
            |e| match e.raw_os_error() {
                Some(libc::ELOOP) => err(format!("{}: a symbolic link; a snapshot holds only files", path.display())),
                _ => err(format!("{}: {e}", path.display())),
            },
        )?;
    let meta = f.metadata().map_err(|e| err(format!("{}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(err(format!("{}: not a regular file", path.display())));
    }
    Ok(f)
}

/// Where bytes read from a section go: `(offset in the piece being passed, bytes)`.
type Sink<'a> = &'a mut dyn FnMut(u64, &[u8]) -> Result<()>;
/// Where a record's bytes go: `(the record's address, offset in it, bytes)`.
type RecordSink<'a> = &'a mut dyn FnMut(u64, u64, &[u8]) -> Result<()>;

/// Reads a section's file front to back through a bounded buffer, checksumming every
/// byte: what is parsed and applied is exactly what was checked.
struct Checked<'a> {
    file: &'a std::fs::File,
    section: &'a Section,
    buf: Vec<u8>,
    /// Unread bytes of `buf`: `buf[at..len]`.
    at: usize,
    len: usize,
    pos: u64,
    crc: u32,
}

impl<'a> Checked<'a> {
    fn new(file: &'a std::fs::File, section: &'a Section) -> Checked<'a> {
        Checked { file, section, buf: vec![0; 1 << 20], at: 0, len: 0, pos: 0, crc: 0 }
    }

    /// Bytes not read yet.
    fn left(&self) -> u64 {
        self.section.bytes - self.pos
    }

    /// The next bytes, at most `max` of them (empty only at the end).
    fn next(&mut self, max: usize) -> Result<&[u8]> {
        use std::os::unix::fs::FileExt;
        if self.at == self.len {
            let want = (self.left().min(self.buf.len() as u64)) as usize;
            let n = self
                .file
                .read_at(&mut self.buf[..want], self.pos)
                .map_err(|e| err(format!("{}: {e}", self.section.file)))?;
            if n == 0 && want > 0 {
                return Err(err(format!(
                    "{}: shorter than the manifest says (truncated or altered)",
                    self.section.file
                )));
            }
            self.crc = crc32c::crc32c_append(self.crc, &self.buf[..n]);
            (self.at, self.len) = (0, n);
        }
        let n = max.min(self.len - self.at);
        let out = &self.buf[self.at..self.at + n];
        self.at += n;
        self.pos += n as u64;
        Ok(out)
    }

    /// Exactly `out.len()` bytes.
    fn read_exact(&mut self, out: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < out.len() {
            let b = self.next(out.len() - done)?;
            if b.is_empty() {
                return Err(err(format!("{}: a record is cut", self.section.file)));
            }
            out[done..done + b.len()].copy_from_slice(b);
            done += b.len();
        }
        Ok(())
    }

    /// Passes the next `len` bytes to `sink` in pieces (None: read and checksum only).
    fn pass(&mut self, len: u64, mut sink: Option<Sink<'_>>) -> Result<()> {
        let mut done = 0u64;
        while done < len {
            let b = self.next((len - done).min(CHUNK as u64) as usize)?;
            if b.is_empty() {
                return Err(err(format!("{}: a record runs past the end", self.section.file)));
            }
            let n = b.len() as u64;
            if let Some(f) = sink.as_deref_mut() {
                f(done, b)?;
            }
            done += n;
        }
        Ok(())
    }

    /// The whole file was read and its checksum is the manifest's.
    fn finish(mut self) -> Result<()> {
        if self.left() != 0 || !self.next(1)?.is_empty() {
            return Err(err(format!("{}: longer than the manifest says (altered)", self.section.file)));
        }
        let size = self.file.metadata().map_err(|e| err(e.to_string()))?.len();
        if size != self.section.bytes {
            return Err(err(format!(
                "{}: {size} bytes, the manifest says {} (truncated or altered)",
                self.section.file, self.section.bytes
            )));
        }
        if self.crc != self.section.crc32c {
            return Err(err(format!(
                "{}: checksum {:#010x}, the manifest says {:#010x} (corrupted)",
                self.section.file, self.crc, self.section.crc32c
            )));
        }
        Ok(())
    }
}

/// Walks a data section's records (`address, length, bytes`), all checksummed:
/// `record(address, len)` checks each header, then `data(address, offset, bytes)` gets
/// its bytes in pieces (None: checked only). A record of no bytes is refused.
fn walk_records(
    file: &std::fs::File,
    section: &Section,
    mut record: impl FnMut(u64, u64) -> Result<()>,
    mut data: Option<RecordSink<'_>>,
) -> Result<()> {
    let mut r = Checked::new(file, section);
    let parsed = (|| {
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic).map_err(|_| err(format!("{}: too short", section.file)))?;
        if &magic != DATA_MAGIC {
            return Err(err(format!("{}: bad magic", section.file)));
        }
        while r.left() > 0 {
            let mut h = [0u8; 16];
            r.read_exact(&mut h)?;
            let (a, l) = h.split_at(8);
            let addr = u64::from_le_bytes(a.try_into().map_err(|_| err("a record header"))?);
            let len = u64::from_le_bytes(l.try_into().map_err(|_| err("a record header"))?);
            if len == 0 || len > r.left() {
                return Err(err(format!(
                    "{}: a record of {len} bytes at {addr:#x} (empty or past the end)",
                    section.file
                )));
            }
            record(addr, len)?;
            match data.as_deref_mut() {
                Some(d) => r.pass(len, Some(&mut |off, b| d(addr, off, b)))?,
                None => r.pass(len, None)?,
            }
        }
        Ok(())
    })();
    match parsed {
        Ok(()) => r.finish(),
        // A file that does not parse is most often a corrupted one: say so if it is.
        Err(e) => {
            let left = r.left();
            r.pass(left, None).and_then(|()| r.finish()).and(Err(e))
        }
    }
}

impl Snapshot {
    /// Reads `dir` and checks it whole: format and version, the sections (each once,
    /// none unknown), every section's size and checksum, every record's bounds, the
    /// state's shape. Nothing is applied anywhere.
    pub fn load(dir: &Path) -> Result<Snapshot> {
        let mpath = dir.join("manifest.json");
        let mut text = Vec::new();
        open_regular(&mpath)
            .map_err(|e| err(format!("{e} (not a passthru snapshot directory?)")))?
            .take(MAX_MANIFEST)
            .read_to_end(&mut text)
            .map_err(|e| err(format!("{}: {e}", mpath.display())))?;
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
        let mut files = Vec::new();
        for s in &manifest.sections {
            if !SECTIONS.contains(&s.name.as_str()) {
                return Err(err(format!("the manifest lists an unknown section '{}'", s.name)));
            }
            if files.iter().any(|(o, _): &(Section, std::fs::File)| o.name == s.name) {
                return Err(err(format!("the manifest lists section '{}' twice", s.name)));
            }
            if s.file.contains('/') || s.file.starts_with('.') {
                return Err(err(format!("section {}: file name '{}' is not allowed", s.name, s.file)));
            }
            let f = open_regular(&dir.join(&s.file))?;
            let size = f.metadata().map_err(|e| err(format!("{}: {e}", s.file)))?.len();
            if size != s.bytes {
                return Err(err(format!(
                    "{}: {size} bytes, the manifest says {} (truncated or altered)",
                    s.file, s.bytes
                )));
            }
            files.push((s.clone(), f));
        }
        for need in ["vm", "ram", "devmem"] {
            if !files.iter().any(|(s, _)| s.name == need) {
                return Err(err(format!("the manifest has no '{need}' section")));
            }
        }
        let section = |n: &str| files.iter().find(|(s, _)| s.name == n);
        // The state first (its records' bounds check the data sections).
        let (vs, vf) = section("vm").ok_or_else(|| err("no 'vm' section"))?;
        if vs.bytes > MAX_STATE_JSON {
            return Err(err("vm.json is too large"));
        }
        let mut vm_json = Vec::new();
        let mut r = Checked::new(vf, vs);
        r.pass(
            vs.bytes,
            Some(&mut |_, b| {
                vm_json.extend_from_slice(b);
                Ok(())
            }),
        )?;
        r.finish()?;
        let state: VmState = serde_json::from_slice(&vm_json).map_err(|e| err(format!("vm.json: {e}")))?;
        let snap = Snapshot { dir: dir.to_path_buf(), manifest: manifest.clone(), state, files };
        snap.check_state()?;
        snap.check_data()?;
        Ok(snap)
    }

    fn file(&self, name: &str) -> Option<(&Section, &std::fs::File)> {
        self.files.iter().find(|(s, _)| s.name == name).map(|(s, f)| (s, f))
    }

    /// The state's shape: devices, their memory records, interrupt sources, hot RAM.
    fn check_state(&self) -> Result<()> {
        let st = &self.state;
        let devmem_len = self.file("devmem").map_or(0, |(s, _)| s.bytes.saturating_sub(DATA_MAGIC.len() as u64));
        let mut names = std::collections::BTreeSet::new();
        let mut pieces: Vec<(u64, u64)> = Vec::new();
        for d in &st.devices {
            if !names.insert(d.name.as_str()) {
                return Err(err(format!("device {} is listed twice", d.name)));
            }
            for m in &d.memory {
                if m.len == 0 || m.at.checked_add(m.len).is_none_or(|e| e > devmem_len) || m.bar >= 6 {
                    return Err(err(format!("device {}: its memory lies outside devmem.bin", d.name)));
                }
                pieces.push((m.at, m.len));
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
        // Device memory is applied front to back: its pieces must not overlap.
        pieces.sort_unstable();
        if pieces.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
            return Err(err("devmem.bin: two devices' memory overlap"));
        }
        // The VM's own sources, and the test sources of a VM built with them.
        let own = |n: &str| n == crate::vm::SERIAL_SOURCE || (st.test_sources.is_some() && n.starts_with("test-"));
        let mut seen = std::collections::BTreeSet::new();
        for (device, index, sub, mode) in &st.irq_modes {
            if !names.contains(device.as_str()) && !own(device) {
                return Err(err(format!("an interrupt source of an unknown device '{device}'")));
            }
            if !seen.insert((device, index, sub)) {
                return Err(err(format!("interrupt source {device}/{index}/{sub} is listed twice")));
            }
            mode.parse::<irq::Mode>().map_err(|e| err(format!("interrupt source {device}/{index}/{sub}: {e}")))?;
        }
        let mut hot = st.hot_ram.clone();
        hot.sort_unstable();
        if hot.iter().any(|(g, s)| *s == 0 || g.checked_add(*s).is_none()) {
            return Err(err("vm.json: a malformed hot-added RAM region"));
        }
        for w in hot.windows(2) {
            if w[0].0 + w[0].1 > w[1].0 {
                return Err(err("vm.json: hot-added RAM regions overlap"));
            }
        }
        Ok(())
    }

    /// Every data section checksummed whole and every record within its memory.
    fn check_data(&self) -> Result<()> {
        let size = self.state.memory;
        let (rs, rf) = self.file("ram").ok_or_else(|| err("no 'ram' section"))?;
        walk_records(
            rf,
            rs,
            |off, len| {
                if off.checked_add(len).is_none_or(|e| e > size) {
                    return Err(err(format!(
                        "ram.bin: a record at {off:#x}+{len:#x} lies outside {size:#x} bytes of RAM"
                    )));
                }
                Ok(())
            },
            None,
        )?;
        let hot = &self.state.hot_ram;
        match self.file("hotram") {
            Some((hs, hf)) => walk_records(
                hf,
                hs,
                |gpa, len| {
                    let end = gpa.checked_add(len).ok_or_else(|| err("hotram.bin: address overflow"))?;
                    if !hot.iter().any(|&(g, s)| gpa >= g && end <= g.saturating_add(s)) {
                        return Err(err(format!(
                            "hotram.bin: a record at {gpa:#x}+{len:#x} lies in no hot-added region"
                        )));
                    }
                    Ok(())
                },
                None,
            )?,
            None if !hot.is_empty() => return Err(err("the snapshot lists hot-added RAM but has no hotram section")),
            None => {}
        }
        let (ds, df) = self.file("devmem").ok_or_else(|| err("no 'devmem' section"))?;
        let mut r = Checked::new(df, ds);
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic).map_err(|_| err("devmem.bin: too short"))?;
        if &magic != DATA_MAGIC {
            return Err(err("devmem.bin: bad magic"));
        }
        r.pass(r.left(), None)?;
        r.finish()
    }

    /// Writes the saved RAM into `vm`'s memfd (the VM has the snapshot's RAM size), and
    /// hot-added RAM into regions added again; every byte checksummed as it goes.
    pub fn apply_ram(&self, vm: &Vm) -> Result<u64> {
        use std::os::unix::fs::FileExt;
        if vm.ram().size() != self.state.memory {
            return Err(err(format!(
                "the snapshot has {} bytes of RAM, the VM {}",
                self.state.memory,
                vm.ram().size()
            )));
        }
        let memfd = vm.ram().memfd();
        let mut total = 0;
        let (rs, rf) = self.file("ram").ok_or_else(|| err("no 'ram' section"))?;
        walk_records(
            rf,
            rs,
            |off, len| {
                total += len;
                // Checked at load; checked again: the bytes come from the file as it is now.
                if off.checked_add(len).is_none_or(|e| e > self.state.memory) {
                    return Err(err("ram.bin: a record outside RAM"));
                }
                Ok(())
            },
            Some(&mut |off, at, b| memfd.write_all_at(b, off + at).map_err(|e| err(format!("guest RAM: {e}")))),
        )?;
        for &(gpa, size) in &self.state.hot_ram {
            vm.add_ram(gpa, size)?;
        }
        if let Some((hs, hf)) = self.file("hotram") {
            let hot = &self.state.hot_ram;
            walk_records(
                hf,
                hs,
                |gpa, len| {
                    total += len;
                    let end = gpa.checked_add(len).ok_or_else(|| err("hotram.bin: address overflow"))?;
                    if !hot.iter().any(|&(g, s)| gpa >= g && end <= g.saturating_add(s)) {
                        return Err(err("hotram.bin: a record outside hot-added RAM"));
                    }
                    Ok(())
                },
                Some(&mut |gpa, at, b| vm.write_memory_for_host(gpa + at, b)),
            )?;
        }
        Ok(total)
    }

    /// Writes each device's saved BAR memory back, front to back through devmem.bin
    /// (checksummed as it goes).
    fn apply_device_memory(&self, vm: &Vm) -> Result<()> {
        let mut pieces: Vec<(&DeviceState, &DeviceMemory)> =
            self.state.devices.iter().flat_map(|d| d.memory.iter().map(move |m| (d, m))).collect();
        pieces.sort_by_key(|(_, m)| m.at);
        let (ds, df) = self.file("devmem").ok_or_else(|| err("no 'devmem' section"))?;
        let mut r = Checked::new(df, ds);
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)?;
        let mut at = 0u64;
        for (d, m) in pieces {
            r.pass(m.at - at, None)?;
            let dev = vm.device(&d.name).ok_or_else(|| err(format!("device {} was not attached", d.name)))?;
            let base =
                dev.bar(m.bar).ok_or_else(|| err(format!("device {}: BAR {} does not decode", d.name, m.bar)))?;
            let gpa = base.checked_add(m.offset).ok_or_else(|| err("BAR address overflow"))?;
            r.pass(m.len, Some(&mut |off, b| vm.write_memory_for_host(gpa + off, b)))?;
            at = m.at + m.len;
        }
        r.pass(r.left(), None)?;
        r.finish()
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
            if dev.frontend().name() != d.frontend {
                return Err(err(format!(
                    "device {}: its DMA front-end is {} here, {} in the snapshot",
                    d.name,
                    dev.frontend().name(),
                    d.frontend
                )));
            }
            replay_config(vm, &dev, d)?;
        }
        self.apply_device_memory(vm)?;
        // Every device is attached again: each front-end takes its state back whole
        // (domains shared by several devices included).
        for (name, section) in &self.state.frontends {
            let fe = vm.frontends().get(name).ok_or_else(|| {
                err(format!("the snapshot has state of DMA front-end {name}, and no device here uses it"))
            })?;
            let state = fe.state().ok_or_else(|| err(format!("DMA front-end {name} keeps no state to restore")))?;
            state.restore(section).map_err(|e| err(e.to_string()))?;
        }
        for d in &self.state.devices {
            let dev = vm.device(&d.name).ok_or_else(|| err(format!("device {} was not attached", d.name)))?;
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
            // Every saved source is back: the devices' configuration replayed enabled
            // exactly what the guest had enabled.
            vm.irqs().set_mode(&id, m).map_err(|e| err(format!("interrupt source {id}: {e}")))?;
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
