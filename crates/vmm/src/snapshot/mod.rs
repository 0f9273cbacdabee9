//! Snapshots of a running VM with its assigned devices, and their restore in a new
//! process.
//!
//! A snapshot is the VM's *layout* (what must be built before anything is applied:
//! boot RAM size, the devices with their names, slots and `--device` text, where each
//! device's BAR memory lies in `devmem.bin`, whether a vCPU ran and the test sources
//! existed) and a set of sections keyed by component, each the component's own typed,
//! versioned state (`vm_api::Snapshottable`): `vcpu0`, `irqchip`, `memory`,
//! `device/NAME`, `frontend/NAME`, `irqs`, `test-sources`. Guest RAM and device memory
//! are streamed to data files. How the directory is written and read (manifest,
//! checksums, the atomic swap) is [`format`]'s.
//!
//! Saving: everything that could refuse (a device without migration or already gone,
//! a front-end that cannot save, the non-coherent policy) is checked before a byte is
//! written. Then the vCPU is paused (parked between two instructions, its pending
//! I/O completed), every device stopped (vfio-user RUNNING -> STOP), every component
//! saved, guest RAM and device memory streamed (the VMM never holds a copy of guest
//! memory; the pause lasts that write), and everything resumed.
//!
//! Restoring ([`Snapshot::load`] checks every section before anything is applied;
//! files are opened once, as regular files only, and what is applied is checksummed
//! again as it is read from those same descriptors): RAM is written, the caller
//! attaches the devices with their saved names and slots, then each DMA front-end
//! takes its state back (mappings pinned and DMA_MAPped again, gated by bus
//! mastering until the configuration is replayed), each device replays its
//! configuration and loads its state (left stopped), its BAR memory is written back,
//! the test sources and interrupt modes are set; at [`Snapshot::start`] the irqchip
//! and clock are loaded and the devices run; the vCPU loads its state as it starts.

pub mod format;
pub mod memory;

use crate::device_state::DeviceState;
use crate::error::{Error, Result};
use crate::vm::Vm;
use format::{CHUNK, Checked, DATA_MAGIC, MAX_STATE_JSON, Manifest, Out, SectionFile, TempDir};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_api::{Section, Snapshottable};

pub use format::{FORMAT, VERSION};

fn err(what: impl Into<String>) -> Error {
    Error::Snapshot(what.into())
}

fn component(e: vm_api::ComponentError) -> Error {
    err(e.to_string())
}

/// A piece of a device's mmapped BAR memory, its bytes in `devmem.bin`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeviceMemory {
    /// The device's name.
    pub device: String,
    /// BAR index.
    pub bar: u8,
    /// Offset in the BAR.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// Where its bytes start in `devmem.bin` (after the magic).
    pub at: u64,
}

/// One assigned device as the VM is built with it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeviceSlot {
    /// Its name (`dma0`...).
    pub name: String,
    /// Its slot on bus 0.
    pub slot: u8,
    /// How it was given (passthru's `--device` text), to attach it again.
    pub spec: String,
    /// Its DMA front-end.
    pub frontend: String,
}

/// What must be built before any component's state is applied.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Layout {
    /// Boot RAM bytes.
    pub memory: u64,
    /// Devices in slot order.
    pub devices: Vec<DeviceSlot>,
    /// Their BAR memory in `devmem.bin`, front to back.
    pub device_memory: Vec<DeviceMemory>,
    /// A vCPU ran (a KVM guest); without one (qtest) there is no `vcpu0` section.
    pub vcpu: bool,
    /// The VM had the test interrupt sources.
    pub test_sources: bool,
}

/// `vm.json`: the layout, and every component's section by its id.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// What to build.
    pub layout: Layout,
    /// Each component's state.
    pub components: BTreeMap<String, Section>,
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

/// Everything that could refuse the snapshot, before anything stops: the devices'
/// layout (their `--device` text) if none does.
fn refusals(vm: &Vm, specs: &dyn Fn(&str) -> Option<String>) -> Result<Vec<DeviceSlot>> {
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
    let mut slots = Vec::new();
    for d in vm.devices() {
        if let Some(why) = d.cannot_save() {
            return Err(err(format!("{why}: snapshot refused, nothing was written")));
        }
        let spec = specs(d.name())
            .ok_or_else(|| err(format!("device {}: its --device specification is unknown", d.name())))?;
        slots.push(DeviceSlot {
            name: d.name().to_string(),
            slot: d.slot(),
            spec,
            frontend: d.frontend().name().to_string(),
        });
    }
    Ok(slots)
}

/// [`save`], calling `started` once the refusals are past.
fn save_inner(vm: &Vm, dir: &Path, specs: &dyn Fn(&str) -> Option<String>, started: &dyn Fn()) -> Result<SaveReport> {
    let t0 = Instant::now();
    let _one = vm.snapshot_lock();
    // One pauser at a time (operator pause/resume, vm.info's PAT read): until the VM
    // runs again, not while the files are written.
    let pausers = vm.pause_lock();
    format::check_target(dir)?;
    let slots = refusals(vm, specs)?;
    let devices = vm.devices();
    let tmp = TempDir::beside(dir)?;
    started();
    // Pause the vCPU and stop every device; if the operator paused already, stop any
    // device hot-plugged since too (it stays so until their resume).
    let paused_at = Instant::now();
    let (result, owned) = match vm.pause_unlocked() {
        Ok(left) if left.is_empty() => (collect(vm, &devices, slots, &tmp.path), true),
        Ok(left) => {
            (Err(err(format!("device(s) {} could not be stopped; nothing was written", left.join(", ")))), true)
        }
        Err(crate::run_control::RunError::AlreadyPaused) => {
            let r = devices.iter().try_for_each(|d| vm.quiesce(d).map_err(err)).and_then(|()| {
                // What a device stopped just now signalled reaches the irqchip first.
                vm.irqs().settle();
                collect(vm, &devices, slots, &tmp.path)
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
    let json = serde_json::to_vec(&state).map_err(|e| err(format!("encoding the VM state: {e}")))?;
    report.bytes = format::finish_dir(&tmp.path, &json, sections)?;
    tmp.swap_into(dir)?;
    report.paused = if was_paused { Duration::ZERO } else { paused };
    report.took = t0.elapsed();
    Ok(report)
}

/// Streams the devices' mmapped BAR memory into `devmem.bin` in `tmp`: the pieces,
/// and the bytes written.
fn write_device_memory(
    vm: &Vm,
    devices: &[Arc<crate::device_manager::AssignedDevice>],
    tmp: &Path,
    buf: &mut [u8],
) -> Result<(SectionFile, Vec<DeviceMemory>, u64)> {
    let mut dm = Out::create(&tmp.join("devmem.bin"))?;
    dm.put(DATA_MAGIC)?;
    let (mut pieces, mut bytes) = (Vec::new(), 0u64);
    for d in devices {
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
                pieces.push(DeviceMemory {
                    device: d.name().to_string(),
                    bar: w.bar,
                    offset: *offset,
                    len: region.size,
                    at,
                });
                bytes += region.size;
            }
        }
    }
    Ok((dm.finish("devmem", "devmem.bin")?, pieces, bytes))
}

/// The components of `vm` a snapshot saves, in the order they are saved.
fn components<'a>(
    vm: &'a Vm,
    devices: &'a [Arc<crate::device_manager::AssignedDevice>],
) -> Vec<Box<dyn Snapshottable + 'a>> {
    struct Ref<'a>(&'a dyn Snapshottable);
    impl Snapshottable for Ref<'_> {
        fn id(&self) -> String {
            self.0.id()
        }
        fn can_save(&self) -> std::result::Result<(), vm_api::ComponentError> {
            self.0.can_save()
        }
        fn save(&self) -> std::result::Result<Option<Section>, vm_api::ComponentError> {
            self.0.save()
        }
        fn restore(&self, s: &Section) -> std::result::Result<(), vm_api::ComponentError> {
            self.0.restore(s)
        }
    }
    let mut out: Vec<Box<dyn Snapshottable + 'a>> = Vec::new();
    for d in devices {
        out.push(Box::new(Ref(d.as_ref())));
    }
    out.push(Box::new(Ref(vm.irqs().as_ref())));
    #[cfg(feature = "test-sources")]
    if let Some(t) = vm.test_sources() {
        out.push(Box::new(Ref(t.as_ref())));
    }
    if let Some(k) = vm.kvm() {
        out.push(Box::new(Ref(k.as_ref())));
    }
    out.push(Box::new(crate::vcpu_state::VcpuComponent(vm)));
    out.push(Box::new(memory::MemoryComponent(vm)));
    out
}

/// Saves every component of the paused VM and its stopped devices, streaming
/// device memory and guest RAM into `tmp`.
fn collect(
    vm: &Vm,
    devices: &[Arc<crate::device_manager::AssignedDevice>],
    slots: Vec<DeviceSlot>,
    tmp: &Path,
) -> Result<(VmState, Vec<SectionFile>, SaveReport)> {
    let mut report = SaveReport::default();
    let mut buf = memory::buffer();
    let (devmem, device_memory, dm_bytes) = write_device_memory(vm, devices, tmp, &mut buf)?;
    report.device_memory_bytes = dm_bytes;
    let mut sections = BTreeMap::new();
    // Read while the guest is stopped: mappings, configuration, device state.
    for fe in vm.frontends().all() {
        if let Some(state) = fe.state()
            && let Some(s) = state.save().map_err(component)?
        {
            sections.insert(state.id(), s);
        }
    }
    for c in components(vm, devices) {
        if let Some(s) = c.save().map_err(component)? {
            sections.insert(c.id(), s);
        }
    }
    // Guest RAM last, while everything is still stopped.
    let (ram, hotram, ram_bytes) = memory::write(vm, tmp, &mut buf)?;
    report.ram_bytes = ram_bytes;
    let layout = Layout {
        memory: vm.ram().size(),
        devices: slots,
        device_memory,
        vcpu: sections.contains_key("vcpu0"),
        test_sources: sections.contains_key("test-sources"),
    };
    Ok((VmState { layout, components: sections }, vec![devmem, ram, hotram], report))
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
    files: Vec<(SectionFile, std::fs::File)>,
}

impl Snapshot {
    /// Reads `dir` and checks it whole: format and version, the sections (each once,
    /// none unknown), every file's size and checksum, every record's bounds, the
    /// layout and every component's state. Nothing is applied anywhere.
    pub fn load(dir: &Path) -> Result<Snapshot> {
        let (manifest, files) = format::open_dir(dir)?;
        let (vs, vf) = files.iter().find(|(s, _)| s.name == "vm").ok_or_else(|| err("no 'vm' section"))?;
        let json = format::read_whole(vf, vs, MAX_STATE_JSON)?;
        let state: VmState = serde_json::from_slice(&json).map_err(|e| err(format!("vm.json: {e}")))?;
        let snap = Snapshot { dir: dir.to_path_buf(), manifest, state, files };
        snap.check_state()?;
        snap.check_data()?;
        Ok(snap)
    }

    fn file(&self, name: &str) -> Option<(&SectionFile, &std::fs::File)> {
        self.files.iter().find(|(s, _)| s.name == name).map(|(s, f)| (s, f))
    }

    /// Component `id`'s state, of its type.
    fn section<T: serde::de::DeserializeOwned>(&self, id: &str, version: u32) -> Result<Option<T>> {
        self.state.components.get(id).map(|s| s.read(id, version)).transpose().map_err(component)
    }

    /// The memory component's state.
    fn memory(&self) -> Result<memory::MemoryState> {
        Ok(self.section("memory", memory::STATE_VERSION)?.unwrap_or_default())
    }

    /// The layout and every component's shape: devices (named once, slots, their
    /// state, their memory inside devmem.bin and not overlapping), each section one
    /// of a known component, of the version this passthru reads; interrupt sources of
    /// known devices; hot RAM.
    fn check_state(&self) -> Result<()> {
        let l = &self.state.layout;
        let devmem_len = self.file("devmem").map_or(0, |(s, _)| s.bytes.saturating_sub(DATA_MAGIC.len() as u64));
        let mut names = BTreeSet::new();
        for d in &l.devices {
            if !names.insert(d.name.as_str()) {
                return Err(err(format!("device {} is listed twice", d.name)));
            }
            if d.slot == 0 || d.slot >= abi::pci::SLOTS {
                return Err(err(format!("device {}: slot {} is not one a device can have", d.name, d.slot)));
            }
            let id = format!("device/{}", d.name);
            let state: DeviceState = self
                .section(&id, crate::device_state::STATE_VERSION)?
                .ok_or_else(|| err(format!("device {} has no saved state", d.name)))?;
            state.check(&d.name).map_err(err)?;
        }
        let mut pieces: Vec<(u64, u64)> = Vec::new();
        for m in &l.device_memory {
            if !names.contains(m.device.as_str()) {
                return Err(err(format!("devmem.bin: memory of an unknown device '{}'", m.device)));
            }
            if m.len == 0 || m.at.checked_add(m.len).is_none_or(|e| e > devmem_len) || m.bar >= 6 {
                return Err(err(format!("device {}: its memory lies outside devmem.bin", m.device)));
            }
            pieces.push((m.at, m.len));
        }
        // Device memory is applied front to back: its pieces must not overlap.
        pieces.sort_unstable();
        if pieces.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
            return Err(err("devmem.bin: two devices' memory overlap"));
        }
        let frontends: BTreeSet<&str> = l.devices.iter().map(|d| d.frontend.as_str()).collect();
        for id in self.state.components.keys() {
            let known = match id.split_once('/') {
                Some(("device", n)) => names.contains(n),
                Some(("frontend", n)) => frontends.contains(n),
                _ => ["vcpu0", "irqchip", "memory", "irqs", "test-sources"].contains(&id.as_str()),
            };
            if !known {
                return Err(err(format!("vm.json: a section of an unknown component '{id}'")));
            }
        }
        if l.vcpu != self.state.components.contains_key("vcpu0")
            || l.test_sources != self.state.components.contains_key("test-sources")
        {
            return Err(err("vm.json: the layout and the sections disagree"));
        }
        if l.test_sources {
            self.section::<devices::test_irq_state::TestSourcesState>(
                "test-sources",
                devices::test_irq_state::STATE_VERSION,
            )?;
        }
        // The VM's own sources, and the test sources of a VM built with them.
        let own = |n: &str| crate::vm::OWN_SOURCES.contains(&n) || (l.test_sources && n.starts_with("test-"));
        let modes: irq::SavedModes = self.section("irqs", irq::STATE_VERSION)?.unwrap_or_default();
        let mut seen = BTreeSet::new();
        for (device, index, sub, mode) in &modes.sources {
            if !names.contains(device.as_str()) && !own(device) {
                return Err(err(format!("an interrupt source of an unknown device '{device}'")));
            }
            if !seen.insert((device, index, sub)) {
                return Err(err(format!("interrupt source {device}/{index}/{sub} is listed twice")));
            }
            mode.parse::<irq::Mode>().map_err(|e| err(format!("interrupt source {device}/{index}/{sub}: {e}")))?;
        }
        self.memory()?.check()
    }

    /// Every data file checksummed whole and every record within its memory.
    fn check_data(&self) -> Result<()> {
        let ram = self.file("ram").ok_or_else(|| err("no 'ram' section"))?;
        memory::check(ram, self.file("hotram"), self.state.layout.memory, &self.memory()?)?;
        let (ds, df) = self.file("devmem").ok_or_else(|| err("no 'devmem' section"))?;
        memory::check_devmem(ds, df)
    }

    /// The saved RAM written into `vm`'s memory (the VM has the snapshot's RAM size),
    /// hot-added RAM added again and written; every byte checksummed as it goes.
    pub fn apply_ram(&self, vm: &Vm) -> Result<u64> {
        if vm.ram().size() != self.state.layout.memory {
            return Err(err(format!(
                "the snapshot has {} bytes of RAM, the VM {}",
                self.state.layout.memory,
                vm.ram().size()
            )));
        }
        if let Some(s) = self.state.components.get("memory") {
            memory::MemoryComponent(vm).restore(s).map_err(component)?;
        }
        let ram = self.file("ram").ok_or_else(|| err("no 'ram' section"))?;
        memory::apply(vm, ram, self.file("hotram"), &self.memory()?)
    }

    /// Writes each device's saved BAR memory back, front to back through devmem.bin
    /// (checksummed as it goes).
    fn apply_device_memory(&self, vm: &Vm) -> Result<()> {
        let mut pieces: Vec<&DeviceMemory> = self.state.layout.device_memory.iter().collect();
        pieces.sort_by_key(|m| m.at);
        let (ds, df) = self.file("devmem").ok_or_else(|| err("no 'devmem' section"))?;
        let mut r = Checked::new(df, ds);
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)?;
        let mut at = 0u64;
        for m in pieces {
            r.pass(m.at - at, None)?;
            let dev = vm.device(&m.device).ok_or_else(|| err(format!("device {} was not attached", m.device)))?;
            let base =
                dev.bar(m.bar).ok_or_else(|| err(format!("device {}: BAR {} does not decode", m.device, m.bar)))?;
            let gpa = base.checked_add(m.offset).ok_or_else(|| err("BAR address overflow"))?;
            r.pass(m.len, Some(&mut |off, b| vm.write_memory_for_host(gpa + off, b)))?;
            at = m.at + m.len;
        }
        r.pass(r.left(), None)?;
        r.finish()
    }

    /// Brings the attached devices (`vm.device(name)` for each saved one) back to
    /// their saved state: each front-end's state (its domains, shared ones whole),
    /// each device's configuration and own state (left stopped until
    /// [`Snapshot::start`]), their BAR memory, the test sources, interrupt modes.
    pub fn apply_devices(&self, vm: &Vm) -> Result<()> {
        let mut devices = Vec::new();
        for d in &self.state.layout.devices {
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
            devices.push(dev);
        }
        // Every device is attached again: each front-end takes its state back whole.
        // Its mappings reach a device once its configuration turns bus mastering on.
        for (id, section) in &self.state.components {
            let Some(name) = id.strip_prefix("frontend/") else { continue };
            let fe = vm.frontends().get(name).ok_or_else(|| {
                err(format!("the snapshot has state of DMA front-end {name}, and no device here uses it"))
            })?;
            let state = fe.state().ok_or_else(|| err(format!("DMA front-end {name} keeps no state to restore")))?;
            state.restore(section).map_err(component)?;
        }
        for dev in &devices {
            let section = self
                .state
                .components
                .get(&dev.id())
                .ok_or_else(|| err(format!("device {} has no saved state", dev.name())))?;
            dev.restore(section).map_err(component)?;
        }
        self.apply_device_memory(vm)?;
        if let Some(s) = self.state.components.get("test-sources") {
            restore_test_sources(vm, s)?;
        }
        if let Some(s) = self.state.components.get("irqs") {
            vm.irqs().restore(s).map_err(component)?;
        }
        if let Some(s) = self.state.components.get("vcpu0") {
            crate::vcpu_state::VcpuComponent(vm).restore(s).map_err(component)?;
        }
        Ok(())
    }

    /// Loads the irqchip and clock (KVM), then lets every front-end worker and every
    /// device run.
    pub fn start(&self, vm: &Vm) -> Result<()> {
        if let (Some(kvm), Some(chip)) = (vm.kvm(), self.state.components.get("irqchip")) {
            kvm.restore(chip).map_err(component)?;
        }
        // Front-ends' workers first (as a resume does), then the devices.
        for fe in vm.frontends().all() {
            if let Some(p) = fe.pausable() {
                p.resume().map_err(component)?;
            }
        }
        for d in &self.state.layout.devices {
            if let Some(dev) = vm.device(&d.name) {
                vm_api::Pausable::resume(dev.as_ref()).map_err(component)?;
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
fn restore_test_sources(vm: &Vm, s: &Section) -> Result<()> {
    let t = vm
        .test_sources()
        .ok_or_else(|| err("the snapshot has test interrupt sources: restore it with --test-sources"))?;
    Snapshottable::restore(t.as_ref(), s).map_err(component)
}

#[cfg(not(feature = "test-sources"))]
fn restore_test_sources(_vm: &Vm, _s: &Section) -> Result<()> {
    Err(err("the snapshot has test interrupt sources, and this passthru was built without them"))
}
