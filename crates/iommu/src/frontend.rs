//! The seam every DMA front-end plugs into.
//!
//! A front-end decides which translation domain a device's [`Endpoint`] reaches
//! memory through, and programs that domain on the guest's behalf: through hypercalls
//! it registers (paravirtual DMA, TCE), a device it emulates (virtio-iommu), or the
//! guest memory map itself (identity). The VMM knows front-ends only by name: it
//! builds every registered front-end for each VM ([`Registration::build`]), hands each
//! assigned device to the one its `--device ...,dma=NAME` names ([`Frontend::attach`]),
//! takes it back when the device goes ([`Frontend::detach`]), and shows their
//! statistics (`--stats`, qtest `frontend_stats`, the control API).
//!
//! Adding a front-end is one module and one line in [`BUILT_IN`]; a test may also
//! [`register`] one at run time.

use dma::{Endpoint, VmDma};
use std::sync::{Arc, Mutex};
use vm_api::{HypercallRegistry, MemoryMap};
use vm_memory::GuestMemoryMmap;

/// Ends the VM, saying why (the misuse policy).
pub type KillSwitch = Arc<dyn Fn(&str) + Send + Sync>;

/// What a front-end may use of the VM it serves.
#[derive(Clone)]
pub struct Context {
    /// The VM's DMA state: domains are created here, pins are charged here.
    pub dma: Arc<VmDma>,
    /// Guest RAM as the VMM maps it (scatter-gather lists, tables in guest memory).
    pub memory: Arc<GuestMemoryMmap>,
    /// The guest memory map (RAM and RAM-device regions, with listeners).
    pub memory_map: Arc<MemoryMap>,
    /// Hypercall blocks are registered here.
    pub hypercalls: Arc<HypercallRegistry>,
    /// Ends the VM: set when the operator asked that guest misuse of a DMA interface
    /// (invalid arguments, not transient failures) end the VM (`--dma-kill-on-misuse`).
    pub kill_on_misuse: Option<KillSwitch>,
    /// The guest-physical range devices may address without a guest IOMMU (the PCI
    /// bus's upstream window, `--dma-window`): what the identity front-end maps.
    pub dma_window: std::ops::Range<u64>,
}

/// Fails a device (a surprise removal), saying why: for a front-end that can no
/// longer give the device the memory it must reach.
pub type FailDevice = Arc<dyn Fn(&str) + Send + Sync>;

/// Fails devices on a thread of its own: a device's teardown comes back to its
/// front-end (`detach`) and to the memory map, which the caller may hold now.
pub fn fail_later(hooks: Vec<FailDevice>, why: String) {
    if hooks.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new().name("dma-fail".into()).spawn(move || {
        for fail in hooks {
            fail(&why);
        }
    });
    if let Err(e) = spawned {
        tracing::error!("DMA front-end: could not fail the devices ({e})");
    }
}

/// A device as its front-end sees it.
#[derive(Clone)]
pub struct Device {
    /// Its requester id on the PCI bus (bus << 8 | device << 3 | function): the id
    /// the guest passes to a front-end's calls.
    pub id: u16,
    /// Its name (logs, statistics).
    pub name: String,
    /// The attachment the front-end switches between domains.
    pub endpoint: Endpoint,
    /// Fails the device.
    pub fail: FailDevice,
    /// Front-end options from `--device ...` (e.g. `group=2` for `dma=tce`), only keys
    /// the front-end's registration lists.
    pub params: Vec<(String, String)>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("id", &self.id).field("name", &self.name).finish_non_exhaustive()
    }
}

/// A translation table as an outside reader gets it: its file (mmap it read-only;
/// layout in `abi::tce::layout`) and geometry.
#[derive(Clone, Debug)]
pub struct TableView {
    /// The table's file (a memfd).
    pub file: Arc<std::fs::File>,
    /// log2 of the entries in the window.
    pub entry_bits: u32,
    /// Levels of the tree.
    pub levels: u32,
    /// log2 of the IOMMU page size.
    pub page_shift: u32,
    /// The window's bus offset (entry i translates IOBA bus_offset + i << page_shift).
    pub bus_offset: u64,
    /// The group whose window this is.
    pub group: u32,
}

/// A front-end of one VM.
pub trait Frontend: Send + Sync {
    /// Its registered name.
    fn name(&self) -> &str;

    /// Takes charge of `device`'s DMA: chooses its domain and attaches its endpoint
    /// (or leaves it blocked until the guest programs it). An error refuses the device
    /// (a one-line reason naming the fix where there is one).
    fn attach(&self, device: &Device) -> Result<(), String>;

    /// Lets go of device `id` (unplugged, or gone): its calls fail from now on, the
    /// domain it alone used is emptied. Never fails.
    fn detach(&self, id: u16);

    /// VM-wide statistics, one line of `key=value` words.
    fn stats(&self) -> String;

    /// Statistics of device `id`, one line of `key=value` words.
    fn device_stats(&self, id: u16) -> Option<String>;

    /// A front-end's own query (qtest `NAME_info ARG`, e.g. `tce_info LIOBN`).
    fn info(&self, _arg: &str) -> Option<String> {
        None
    }

    /// A table the front-end hands to outside readers for `arg` (TCE: the table behind
    /// a liobn), with what a reader needs to walk it.
    fn table_view(&self, _arg: &str) -> Option<TableView> {
        None
    }

    /// Device `id`'s state for a snapshot, as words the same front-end's
    /// [`Frontend::restore`] takes back (None: nothing to save, e.g. a domain that
    /// follows the memory map). An error refuses the snapshot, naming why.
    fn save(&self, _id: u16) -> Result<Option<Vec<u64>>, String> {
        Ok(None)
    }

    /// Restores what [`Frontend::save`] returned for device `id`, freshly attached:
    /// its mappings (pinned and given to the device again) and counters.
    fn restore(&self, _id: u16, _state: &[u64]) -> Result<(), String> {
        Err(format!("DMA front-end {} keeps no state to restore", self.name()))
    }
}

/// A front-end's name, a line of help, and how to build it for a VM.
#[derive(Clone, Copy)]
pub struct Registration {
    /// The name `--device ...,dma=NAME` uses.
    pub name: &'static str,
    /// One line for `--help` and errors.
    pub help: &'static str,
    /// Builds it for a VM (registering its hypercall block, if it has one).
    pub build: fn(&Context) -> Result<Arc<dyn Frontend>, String>,
    /// The `--device` options it takes (`group` for tce).
    pub params: &'static [&'static str],
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration").field("name", &self.name).finish_non_exhaustive()
    }
}

/// The front-ends passthru has: the first is the default.
pub const BUILT_IN: &[Registration] =
    &[crate::identity::REGISTRATION, crate::pvdma::REGISTRATION, crate::tce::REGISTRATION];

static EXTRA: Mutex<Vec<Registration>> = Mutex::new(Vec::new());

/// Registers a front-end beyond the built-in ones (for a test, or an embedding
/// program), before the VMs that should have it are built. A name already taken is
/// refused.
pub fn register(r: Registration) -> Result<(), String> {
    if find(r.name).is_some() {
        return Err(format!("a DMA front-end named '{}' is already registered", r.name));
    }
    EXTRA.lock().unwrap_or_else(|e| e.into_inner()).push(r);
    Ok(())
}

/// Every registered front-end, built-in first.
pub fn registered() -> Vec<Registration> {
    let mut all = BUILT_IN.to_vec();
    all.extend(EXTRA.lock().unwrap_or_else(|e| e.into_inner()).iter().copied());
    all
}

/// The front-end registered as `name`.
pub fn find(name: &str) -> Option<Registration> {
    registered().into_iter().find(|r| r.name == name)
}

/// The registered names, for errors: "identity, pvdma".
pub fn names() -> String {
    registered().iter().map(|r| r.name).collect::<Vec<_>>().join(", ")
}

/// The name of the default front-end.
pub fn default_name() -> &'static str {
    BUILT_IN[0].name
}

/// Checks a `dma=NAME` value: the name, or an error listing the registered ones.
pub fn parse_name(name: &str) -> Result<String, String> {
    match find(name) {
        Some(r) => Ok(r.name.to_string()),
        None => Err(format!("dma={name}: no such DMA front-end; use one of {}", names())),
    }
}

/// The front-ends of one VM, by name.
pub struct Frontends {
    all: Vec<Arc<dyn Frontend>>,
}

impl std::fmt::Debug for Frontends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.all.iter().map(|x| x.name().to_string())).finish()
    }
}

impl Frontends {
    /// Builds every registered front-end for a VM.
    pub fn build(ctx: &Context) -> Result<Frontends, String> {
        let mut all = Vec::new();
        for r in registered() {
            all.push((r.build)(ctx).map_err(|e| format!("DMA front-end {}: {e}", r.name))?);
        }
        Ok(Frontends { all })
    }

    /// The one named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Frontend>> {
        self.all.iter().find(|f| f.name() == name)
    }

    /// All of them, in registration order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Frontend>> {
        self.all.iter()
    }
}
