//! The seam every DMA front-end plugs into.
//!
//! A front-end decides which translation domain a device's [`Endpoint`] reaches
//! memory through, and programs that domain on the guest's behalf: through hypercalls
//! it registers (paravirtual DMA, TCE), a PCI function of its own (virtio-iommu), or
//! the guest memory map itself (identity).
//!
//! The core every front-end has is small: [`Frontend::attach`], [`Frontend::detach`]
//! and typed [`Stats`]. The rest is opt-in, declared by the front-end:
//! - a hypercall block: registered by its [`Registration::build`]
//!   through [`Context::hypercalls`];
//! - a *device*: a PCI function plugged at a fixed slot through [`Context::pci`], with
//!   interrupts ([`Context::irqs`]) and ioeventfds ([`Context::io`]), when the
//!   front-end is built: before any endpoint attaches;
//! - VM-level state (domains shared by endpoints, allocators, counters):
//!   [`Frontend::state`], a [`Snapshottable`] whose section is typed and versioned;
//! - queries and files of its own for operators ([`Frontend::queries`], e.g. TCE's
//!   table behind a liobn): reached by name, never named by the CLI, the API or `vmm`;
//! - DMA faults in its domains: the DMA core calls the handler it gives
//!   [`dma::Domain::on_fault`], rate-limited and without blocking the device.
//!
//! The VMM builds a front-end only in a VM that uses it (see [`crate::registry`]).

use dma::{Endpoint, VmDma};
use std::sync::Arc;
use vm_api::{HypercallRegistry, IoEvents, MemoryMap, Pausable, Snapshottable};
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
    /// The PCI root: a device front-end plugs its function(s) here.
    pub pci: Arc<pci::PciRoot>,
    /// The VM's interrupt registry: a device front-end's interrupts attach here.
    pub irqs: Arc<irq::IrqRegistry>,
    /// ioeventfds (a device front-end's doorbells without an exit).
    pub io: Arc<dyn IoEvents>,
    /// Ends the VM: set when the operator asked that guest misuse of a DMA interface
    /// (invalid arguments, not transient failures) end the VM (`--dma-kill-on-misuse`).
    pub kill_on_misuse: Option<KillSwitch>,
    /// The guest-physical range devices may address without a guest IOMMU (the PCI
    /// bus's upstream window, `--dma-window`): what the identity front-end maps.
    pub dma_window: std::ops::Range<u64>,
}

impl Context {
    /// A context outside any VM: its own PCI root on fresh buses, an interrupt
    /// registry over an irqchip that delivers nothing, no ioeventfds, no kill switch,
    /// the whole DMA window. For front-ends exercised on their own (tests, benchmarks).
    pub fn standalone(
        dma: Arc<VmDma>,
        memory: Arc<GuestMemoryMmap>,
        memory_map: Arc<MemoryMap>,
        hypercalls: Arc<HypercallRegistry>,
    ) -> std::io::Result<Context> {
        let bus = || Arc::new(vm_api::Bus::new());
        let pci = pci::PciRoot::new(bus(), bus(), Arc::clone(&memory_map)).map_err(std::io::Error::other)?;
        let irqs = Arc::new(irq::IrqRegistry::new(Arc::new(irq::NullChip), irq::Mode::Forwarded)?);
        Ok(Context {
            dma,
            memory,
            memory_map,
            hypercalls,
            pci,
            irqs,
            io: Arc::new(vm_api::NoIoEvents),
            kill_on_misuse: None,
            dma_window: 0..1 << 48,
        })
    }
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

/// Why a front-end said no.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrontendError {
    /// It cannot take this device (one line naming the fix where there is one).
    #[error("{0}")]
    Refused(String),
    /// It cannot be built for this VM.
    #[error("{0}")]
    Build(String),
    /// A query it does not answer, or an argument that names nothing of it.
    #[error("{0}")]
    NotFound(String),
    /// A query's argument it cannot read.
    #[error("{0}")]
    Invalid(String),
}

/// One statistic's value: what it means decides how it is shown (a total gets a rate
/// in `passthru stat`, a gauge does not, text is listed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StatValue {
    /// A count that only grows (calls, faults).
    Total(u64),
    /// A level (mappings now, devices now).
    Gauge(u64),
    /// Words (names, lists).
    Text(String),
}

/// A front-end's statistics, in its own order: built from the front-end's typed
/// counters, rendered by qtest (`key=value` words), `--stats`, the control API (JSON)
/// and `passthru stat` from this one value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats(Vec<(&'static str, StatValue)>);

impl Stats {
    /// No statistics yet.
    pub fn new() -> Stats {
        Stats(Vec::new())
    }

    /// With a total.
    pub fn total(mut self, name: &'static str, value: u64) -> Stats {
        self.0.push((name, StatValue::Total(value)));
        self
    }

    /// With a gauge.
    pub fn gauge(mut self, name: &'static str, value: u64) -> Stats {
        self.0.push((name, StatValue::Gauge(value)));
        self
    }

    /// With text.
    pub fn text(mut self, name: &'static str, value: impl Into<String>) -> Stats {
        self.0.push((name, StatValue::Text(value.into())));
        self
    }

    /// With every statistic of `more` after these.
    pub fn extend(mut self, more: Stats) -> Stats {
        self.0.extend(more.0);
        self
    }

    /// The statistic `name`.
    pub fn get(&self, name: &str) -> Option<&StatValue> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Every statistic, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &StatValue)> {
        self.0.iter().map(|(n, v)| (*n, v))
    }

    /// `key=value` words (text with spaces joined by `_`, empty text as `-`).
    pub fn words(&self) -> String {
        let word = |v: &StatValue| match v {
            StatValue::Total(n) | StatValue::Gauge(n) => n.to_string(),
            StatValue::Text(t) if t.is_empty() => "-".into(),
            StatValue::Text(t) => t.split_whitespace().collect::<Vec<_>>().join("_"),
        };
        self.0.iter().map(|(n, v)| format!("{n}={}", word(v))).collect::<Vec<_>>().join(" ")
    }

    /// A JSON object: numbers for totals and gauges, strings for text.
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for (n, v) in &self.0 {
            let v = match v {
                StatValue::Total(x) | StatValue::Gauge(x) => serde_json::Value::from(*x),
                StatValue::Text(t) => serde_json::Value::from(t.as_str()),
            };
            m.insert((*n).to_string(), v);
        }
        serde_json::Value::Object(m)
    }

    /// A JSON object of what each statistic is: `total`, `gauge` or `text`.
    pub fn kinds_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for (n, v) in &self.0 {
            let k = match v {
                StatValue::Total(_) => "total",
                StatValue::Gauge(_) => "gauge",
                StatValue::Text(_) => "text",
            };
            m.insert((*n).to_string(), serde_json::Value::from(k));
        }
        serde_json::Value::Object(m)
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.words())
    }
}

/// An answer to a front-end's own query: its fields, and files handed along (e.g. a
/// table's memfd, for a tool to map read-only).
#[derive(Debug, Default)]
pub struct Answer {
    /// What it says, in order.
    pub fields: Stats,
    /// Files for the asker.
    pub files: Vec<Arc<std::fs::File>>,
}

/// A query a front-end answers: its name and a line of help (with its argument).
#[derive(Clone, Copy, Debug)]
pub struct Query {
    /// Its name (`info`, `table`).
    pub name: &'static str,
    /// What it answers.
    pub help: &'static str,
}

/// Queries of a front-end's own (qtest `NAME_info ARG` is the `info` query; the
/// control API's `frontend.query` reaches every one).
pub trait Queries: Send + Sync {
    /// What it answers.
    fn list(&self) -> &'static [Query];
    /// The answer to `query` about `arg`.
    fn query(&self, query: &str, arg: &str) -> Result<Answer, FrontendError>;
}

/// A front-end of one VM.
pub trait Frontend: Send + Sync {
    /// Its registered name.
    fn name(&self) -> &'static str;

    /// Takes charge of `device`'s DMA: chooses its domain and attaches its endpoint
    /// (or leaves it blocked until the guest programs it). An error refuses the device.
    fn attach(&self, device: &Device) -> Result<(), FrontendError>;

    /// Lets go of device `id` (unplugged, or gone): its calls fail from now on, the
    /// domain it alone used is emptied. Never fails.
    fn detach(&self, id: u16);

    /// VM-wide statistics.
    fn stats(&self) -> Stats;

    /// Statistics of device `id`.
    fn device_stats(&self, id: u16) -> Option<Stats>;

    /// Its VM-level state, if it keeps any (a front-end that follows the memory map
    /// keeps none): saved and restored as one typed, versioned section, after every
    /// device of the snapshot is attached again.
    fn state(&self) -> Option<&dyn Snapshottable> {
        None
    }

    /// Queries of its own, if it answers any.
    fn queries(&self) -> Option<&dyn Queries> {
        None
    }

    /// What the VM stops when it pauses, if the front-end does work of its own between
    /// guest exits (a device front-end's queue worker): paused after the devices,
    /// resumed before them.
    fn pausable(&self) -> Option<&dyn Pausable> {
        None
    }
}

/// Renders a query's answer (its fields as JSON, the files passed with it, a limit on
/// what to list): the answer with what was read added, and a text for a human.
pub type Render = fn(&serde_json::Value, &[std::fs::File], usize) -> Result<(serde_json::Value, String), String>;

/// A client-side rendering of a front-end's query answer (e.g. walking a TCE table
/// through the file the VMM handed out): `passthru ctl PATH frontend NAME QUERY ARG`
/// finds it in the front-end's registration, so the CLI names no front-end.
#[derive(Clone, Copy)]
pub struct Tool {
    /// The query it renders.
    pub query: &'static str,
    /// The answer's fields (JSON), the files passed with it, and a limit on what to
    /// list: the answer with what the tool read added, and a text for a human.
    pub render: Render,
}

/// A front-end's name, a line of help, and how to build it for a VM.
#[derive(Clone, Copy)]
pub struct Registration {
    /// The name `--device ...,dma=NAME` uses.
    pub name: &'static str,
    /// One line for `--help` and errors.
    pub help: &'static str,
    /// Builds it for a VM (registering its hypercall block, plugging its PCI
    /// function, if it has them).
    pub build: fn(&Context) -> Result<Arc<dyn Frontend>, FrontendError>,
    /// The `--device` options it takes (`group` for tce).
    pub params: &'static [&'static str],
    /// Client-side renderings of its queries' answers.
    pub tools: &'static [Tool],
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration").field("name", &self.name).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_stats_value_renders_as_words_and_json() {
        let s = Stats::new().total("map", 3).gauge("mappings", 2).text("p2p_unavailable", "").text("names", "a b");
        assert_eq!(s.words(), "map=3 mappings=2 p2p_unavailable=- names=a_b");
        assert_eq!(s.to_json(), serde_json::json!({ "map": 3, "mappings": 2, "p2p_unavailable": "", "names": "a b" }));
        assert_eq!(s.kinds_json()["mappings"], "gauge");
        assert_eq!(s.get("map"), Some(&StatValue::Total(3)));
    }
}
