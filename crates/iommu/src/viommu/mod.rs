//! virtio-iommu (virtio device 23) as a *device* front-end (`dma=virtio-iommu`): the
//! paravirtual IOMMU a stock guest's driver speaks. When a VM builds it, it plugs a
//! modern virtio-pci function at slot [`abi::viommu::SLOT`]; every device given to it
//! is one of its endpoints (by requester id), placed by the guest's requests.
//! See [`device`] for the semantics, [`wire`] for the requests' layout.

pub mod client;
pub mod device;
pub mod trace;
pub mod wire;

use crate::frontend::{Answer, Context, Device, Frontend, FrontendError, Queries, Query, Registration, Stats};
use crate::identity::Identity;
use abi::viommu as v;
use device::{Kind, Viommu, lock};
use dma::{Gpa, Iova, Perm};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use virtio::{QueueAccess, TransportState, VirtioDevice, VirtioPci};
use vm_api::{ComponentError, Pausable, Section, Snapshottable};

/// `dma=virtio-iommu`.
pub const REGISTRATION: Registration = Registration {
    name: "virtio-iommu",
    help: "virtio-iommu: a PCI device (slot 31) the guest's driver programs with ATTACH/MAP/UNMAP requests",
    build,
    params: &[],
    tools: &[],
};

/// PCI class of an IOMMU (base system peripheral, IOMMU).
const CLASS_IOMMU: u16 = 0x0806;

fn build(ctx: &Context) -> Result<Arc<dyn Frontend>, FrontendError> {
    let e = |what: &str, x: &dyn std::fmt::Display| FrontendError::Build(format!("virtio-iommu: {what}: {x}"));
    // Unattached endpoints bypass at boot (QEMU's boot-bypass), until the driver says
    // otherwise through BYPASS_CONFIG.
    let dev = Viommu::new(Arc::clone(&ctx.dma), Identity::new(ctx), true);
    let pci = VirtioPci::new(
        "viommu",
        Arc::clone(&dev) as Arc<dyn VirtioDevice>,
        Arc::clone(&ctx.memory),
        Arc::clone(&ctx.irqs),
        Arc::clone(&ctx.io),
        CLASS_IOMMU,
    )
    .map_err(|x| e("its PCI function", &x))?;
    *lock(&dev.waker) = Some(pci.waker().map_err(|x| e("its wake-up", &x))?);
    ctx.pci.plug_at(v::SLOT, Arc::clone(&pci) as Arc<dyn pci::PciFunction>).map_err(|x| e("plugging it", &x))?;
    Ok(Arc::new(ViommuFrontend { dev, pci }))
}

impl VirtioDevice for Viommu {
    fn device_type(&self) -> u16 {
        v::DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        Viommu::offered()
    }

    fn queue_sizes(&self) -> &'static [u16] {
        &[v::QUEUE_SIZE, v::QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset).ok().and_then(|o| c.get(o + i)).copied().unwrap_or(0);
        }
    }

    fn write_config(&self, offset: u64, data: &[u8]) {
        Viommu::write_config(self, offset, data);
    }

    fn accept_features(&self, features: u64) -> bool {
        self.set_features(features);
        true
    }

    fn activate(&self, features: u64) {
        self.set_features(features);
    }

    fn reset(&self) {
        Viommu::reset(self);
    }

    /// Linux waits for every request (it spins on the used ring): the request queue
    /// is answered by the vCPU that notifies it, before it returns. Fault reports go
    /// on the worker thread (they come from the faulting device's thread).
    fn runs_on_notify(&self, index: u16) -> bool {
        index == v::REQUESTQ
    }

    fn process(&self, index: u16, q: &mut QueueAccess<'_>) {
        match index {
            v::REQUESTQ => self.process_requests(q),
            v::EVENTQ => self.process_events(q),
            _ => {}
        }
    }
}

/// The front-end: the device and the PCI function carrying it.
pub struct ViommuFrontend {
    dev: Arc<Viommu>,
    pci: Arc<VirtioPci>,
}

impl ViommuFrontend {
    /// The device.
    pub fn device(&self) -> &Arc<Viommu> {
        &self.dev
    }

    /// The PCI function.
    pub fn function(&self) -> &Arc<VirtioPci> {
        &self.pci
    }
}

impl Frontend for ViommuFrontend {
    fn name(&self) -> &'static str {
        REGISTRATION.name
    }

    fn attach(&self, device: &Device) -> Result<(), FrontendError> {
        if !device.params.is_empty() {
            return Err(FrontendError::Refused("dma=virtio-iommu takes no options".into()));
        }
        self.dev.add_endpoint(device);
        Ok(())
    }

    fn detach(&self, id: u16) {
        self.dev.remove_endpoint(id);
    }

    fn stats(&self) -> Stats {
        let c = &self.dev.counters;
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let st = lock(&self.dev.state);
        let mappings: usize = st
            .domains
            .values()
            .map(|d| match &d.kind {
                Kind::Paging(d) => d.mapping_count(),
                Kind::Bypass => 0,
            })
            .sum();
        let mut s = Stats::new();
        for (name, k) in ["attach", "detach", "map", "unmap", "probe"].iter().zip(&c.requests) {
            s = s.total(name, n(k));
        }
        for (name, k) in
            ["ok", "ioerr", "unsupp", "deverr", "inval", "range", "noent", "fault", "nomem"].iter().zip(&c.statuses)
        {
            s = s.total(name, n(k));
        }
        for (name, k) in ["attach_ns", "detach_ns", "map_ns", "unmap_ns", "probe_ns"].iter().zip(&c.nanos) {
            s = s.total(name, n(k));
        }
        s.total("unwritten", n(&c.unwritten))
            .total("batches", n(&c.batches))
            .total("events", n(&c.events))
            .total("events_dropped", n(&c.events_dropped))
            .gauge("domains", st.domains.len() as u64)
            .gauge("endpoints", st.endpoints.len() as u64)
            .gauge("mappings", mappings as u64)
            .gauge("bypass", u64::from(st.bypass))
    }

    fn device_stats(&self, id: u16) -> Option<Stats> {
        let st = lock(&self.dev.state);
        let e = st.endpoints.get(&u32::from(id))?;
        Some(
            Stats::new()
                .text("domain", e.domain.map_or("-".to_string(), |d| d.to_string()))
                .gauge("bypassing", u64::from(e.in_identity)),
        )
    }

    fn state(&self) -> Option<&dyn Snapshottable> {
        Some(self)
    }

    fn queries(&self) -> Option<&dyn Queries> {
        Some(self)
    }

    fn pausable(&self) -> Option<&dyn Pausable> {
        Some(self.pci.as_ref())
    }
}

const QUERIES: &[Query] = &[
    Query {
        name: "info",
        help: "-: domains, endpoints, mappings, events dropped; domain=N: its kind, endpoints and mappings; endpoint=ID: its domain",
    },
    Query {
        name: "record",
        help: "PATH: write every request the guest makes from now on to PATH (the trace `passthru replay virtio-iommu` reads); -: stop",
    },
];

impl Queries for ViommuFrontend {
    fn list(&self) -> &'static [Query] {
        QUERIES
    }

    fn query(&self, query: &str, arg: &str) -> Result<Answer, FrontendError> {
        match query {
            "info" => {}
            "record" => return self.record(arg),
            _ => {
                return Err(FrontendError::NotFound(format!(
                    "virtio-iommu answers no query '{query}' (it answers info and record)"
                )));
            }
        }
        let num = |s: &str| trace::number(s).map_err(FrontendError::Invalid);
        let st = lock(&self.dev.state);
        let fields = match arg.split_once('=') {
            None => {
                drop(st);
                let s = self.stats();
                let pick = ["domains", "endpoints", "mappings", "bypass", "events", "events_dropped"];
                let mut out = Stats::new();
                for (k, val) in s.iter() {
                    if pick.contains(&k) {
                        out = match val {
                            crate::StatValue::Total(x) => out.total(k, *x),
                            crate::StatValue::Gauge(x) => out.gauge(k, *x),
                            crate::StatValue::Text(t) => out.text(k, t.clone()),
                        };
                    }
                }
                out
            }
            Some(("domain", d)) => {
                let id = u32::try_from(num(d)?).map_err(|_| FrontendError::Invalid(format!("domain {d}")))?;
                let dom = st.domains.get(&id).ok_or_else(|| FrontendError::NotFound(format!("no domain {id}")))?;
                let eps: Vec<String> = dom.endpoints.iter().map(|e| format!("{e:#x}")).collect();
                let (kind, maps) = match &dom.kind {
                    Kind::Paging(d) => ("paging", d.mapping_count() as u64),
                    Kind::Bypass => ("bypass", 0),
                };
                Stats::new().text("kind", kind).text("endpoints", eps.join(",")).gauge("mappings", maps)
            }
            Some(("endpoint", e)) => {
                let id = u32::try_from(num(e)?).map_err(|_| FrontendError::Invalid(format!("endpoint {e}")))?;
                let ep =
                    st.endpoints.get(&id).ok_or_else(|| FrontendError::NotFound(format!("no endpoint {id:#x}")))?;
                Stats::new()
                    .text("domain", ep.domain.map_or("-".into(), |d| d.to_string()))
                    .gauge("bypassing", u64::from(ep.in_identity))
            }
            Some((k, _)) => return Err(FrontendError::Invalid(format!("'{k}=': use domain=N or endpoint=ID"))),
        };
        Ok(Answer { fields, files: Vec::new() })
    }
}

impl ViommuFrontend {
    /// Starts recording the guest's requests to `path` (replacing a recording under
    /// way), or stops (`-` or nothing).
    pub fn record(&self, path: &str) -> Result<Answer, FrontendError> {
        let mut slot = lock(&self.dev.recorder);
        if path.is_empty() || path == "-" {
            self.dev.recording.store(false, Ordering::Release);
            let was = slot.take().map_or("-".to_string(), |r| r.path().to_string());
            return Ok(Answer { fields: Stats::new().text("stopped", was), files: Vec::new() });
        }
        let r = trace::Recorder::create(path)
            .map_err(|e| FrontendError::Invalid(format!("cannot record to {path}: {e}")))?;
        *slot = Some(Arc::new(r));
        self.dev.recording.store(true, Ordering::Release);
        Ok(Answer { fields: Stats::new().text("recording", path), files: Vec::new() })
    }
}

/// One domain in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedDomain {
    /// Its id.
    pub id: u32,
    /// A bypass domain.
    pub bypass: bool,
    /// Its endpoints.
    pub endpoints: Vec<u32>,
    /// Its mappings: IOVA, guest-physical address, size, read, write.
    pub mappings: Vec<(u64, u64, u64, bool, bool)>,
}

/// The device's state in a snapshot (version [`STATE_VERSION`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedState {
    /// The transport (PCI configuration, queues, vectors).
    pub transport: TransportState,
    /// Negotiated features.
    pub features: u64,
    /// The configuration's `bypass`.
    pub bypass: bool,
    /// The domains.
    pub domains: Vec<SavedDomain>,
}

/// The format version of [`SavedState`].
pub const STATE_VERSION: u32 = 1;

impl Snapshottable for ViommuFrontend {
    fn id(&self) -> String {
        format!("frontend/{}", REGISTRATION.name)
    }

    fn save(&self) -> Result<Option<Section>, ComponentError> {
        let transport = self.pci.save_state();
        let st = lock(&self.dev.state);
        let domains = st
            .domains
            .iter()
            .map(|(id, d)| SavedDomain {
                id: *id,
                bypass: matches!(d.kind, Kind::Bypass),
                endpoints: d.endpoints.iter().copied().collect(),
                mappings: match &d.kind {
                    Kind::Paging(dom) => dom
                        .mappings()
                        .iter()
                        .map(|m| {
                            (
                                m.iova.0,
                                m.gpa.0,
                                m.size,
                                m.perm.allows(dma::Access::Read),
                                m.perm.allows(dma::Access::Write),
                            )
                        })
                        .collect(),
                    Kind::Bypass => Vec::new(),
                },
            })
            .collect();
        Section::new(
            &self.id(),
            STATE_VERSION,
            &SavedState { transport, features: st.features, bypass: st.bypass, domains },
        )
        .map(Some)
    }

    /// Domains made again with their mappings (pinned, and given to devices in their
    /// processes once bus mastering is replayed), endpoints attached as they were,
    /// the transport's queues where they were (running once the VM resumes).
    fn restore(&self, section: &Section) -> Result<(), ComponentError> {
        let s: SavedState = section.read(&self.id(), STATE_VERSION)?;
        let err = |w: String| ComponentError::new("frontend/virtio-iommu", w);
        {
            let mut st = lock(&self.dev.state);
            st.features = s.features;
            st.bypass = s.bypass;
        }
        for d in &s.domains {
            let mut st = lock(&self.dev.state);
            let flags = if d.bypass { v::ATTACH_F_BYPASS } else { 0 };
            // Each endpoint through ATTACH's own path (features as negotiated).
            for e in &d.endpoints {
                let status = self.dev.attach_saved(&mut st, d.id, *e, flags);
                if status != v::status::OK {
                    return Err(err(format!("endpoint {e:#x} into domain {}: status {status}", d.id)));
                }
            }
            if let Some(device::Dom { kind: Kind::Paging(dom), .. }) = st.domains.get(&d.id) {
                for &(iova, gpa, size, r, w) in &d.mappings {
                    dom.map(Iova(iova), Gpa(gpa), size, Perm::new(r, w))
                        .map_err(|x| err(format!("domain {}: mapping {iova:#x}: {x}", d.id)))?;
                }
            }
        }
        {
            let mut st = lock(&self.dev.state);
            let ids: Vec<u32> = st.endpoints.iter().filter(|(_, e)| e.domain.is_none()).map(|(i, _)| *i).collect();
            for id in ids {
                self.dev.park(&mut st, id);
            }
        }
        self.pci.restore_state(&s.transport).map_err(err)
    }
}

impl Viommu {
    /// ATTACH for a restore (the same checks and handover as the guest's request).
    fn attach_saved(&self, st: &mut device::State, domain: u32, endpoint: u32, flags: u32) -> u8 {
        self.attach(st, domain, endpoint, flags, false)
    }
}
