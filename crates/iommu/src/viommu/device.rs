//! The virtio-iommu device: its configuration, its request queue (ATTACH, DETACH,
//! MAP, UNMAP, PROBE) and its event queue (fault reports), over the DMA core's
//! domains.
//!
//! - A domain is a `dma::Domain` created by the guest's first ATTACH naming it; it
//!   ceases to exist when its last endpoint leaves (a later MAP on it: NOENT).
//! - An endpoint is an assigned PCI function, by requester id. It moves between
//!   domains with the DMA core's handover: when the request completes, no access
//!   through the old domain succeeds or is in flight.
//! - An endpoint attached to no domain reaches guest-physical memory as the identity
//!   front-end maps it when `bypass` is 1, and nothing when it is 0 (it then sits on
//!   an empty domain whose faults are reported with reason DOMAIN).
//! - Every recognised request is returned with its status in the tail (first in the
//!   writable part; after probe_size bytes of properties for PROBE) and the used
//!   length of what that takes, which is the whole writable part of a request laid
//!   out as the spec's (Linux copies the status back only then); an unrecognised or
//!   unparsable one is returned unwritten, used length 0.
//! - Consecutive MAPs (or UNMAPs) of one kick on one domain reach the DMA core as one
//!   batch: a device process gets them as one pipelined DMA_MAP (DMA_UNMAP) exchange.

use super::trace::Recorder;
use super::wire::{self, Request};
use crate::frontend::{Device, Frontend};
use crate::identity::Identity;
use abi::viommu::{self as v, feature, status};
use dma::{Domain, DomainConfig, Gpa, Iova, MapError, Mapping, Perm, VmDma};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;
use virtio::QueueAccess;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// Domains the device holds at most (another ATTACH creating one: NOMEM).
pub const MAX_DOMAINS: usize = 1024;
/// Mappings one domain holds at most (another MAP: NOMEM).
pub const MAX_MAPPINGS: usize = 65_536;
/// Fault reports waiting for an event buffer at most (more are dropped, counted).
pub const MAX_PENDING_FAULTS: usize = 64;

/// What a domain is.
#[derive(Clone)]
pub(super) enum Kind {
    /// Translated through its mappings.
    Paging(Arc<Domain>),
    /// Its endpoints bypass translation (ATTACH flag BYPASS).
    Bypass,
}

/// A domain and the endpoints attached to it.
#[derive(Clone)]
pub(super) struct Dom {
    pub(super) kind: Kind,
    pub(super) endpoints: BTreeSet<u32>,
}

/// An endpoint the device manages.
pub(super) struct Ep {
    pub(super) device: Device,
    pub(super) domain: Option<u32>,
    /// On the identity (bypass) domain now.
    pub(super) in_identity: bool,
    /// Bypass was refused once (said once).
    pub(super) bypass_refused: bool,
}

/// The device's state (one lock).
pub(super) struct State {
    pub(super) features: u64,
    pub(super) bypass: bool,
    pub(super) domains: BTreeMap<u32, Dom>,
    pub(super) endpoints: BTreeMap<u32, Ep>,
}

/// A fault to report on the event queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Event {
    pub(super) reason: u8,
    pub(super) flags: u32,
    pub(super) endpoint: u32,
    pub(super) address: u64,
}

/// Counters.
#[derive(Default)]
pub(super) struct Counters {
    /// Requests by type (ATTACH..PROBE).
    pub(super) requests: [AtomicU64; 5],
    /// Answers by status.
    pub(super) statuses: [AtomicU64; 9],
    /// Requests returned unwritten (unrecognised type, unparsable chain).
    pub(super) unwritten: AtomicU64,
    /// Faults reported, and dropped (no event buffer, or too many waiting).
    pub(super) events: AtomicU64,
    pub(super) events_dropped: AtomicU64,
    /// MAP and UNMAP batches sent to the DMA core.
    pub(super) batches: AtomicU64,
    /// VMM time by request type, in nanoseconds (see `KickTime`).
    pub(super) nanos: [AtomicU64; 5],
}

/// The virtio-iommu device of one VM.
pub struct Viommu {
    pub(super) dma: Arc<VmDma>,
    pub(super) identity: Arc<Identity>,
    /// Where endpoints without a domain and without bypass sit: no mappings.
    pub(super) blocked: Arc<Domain>,
    pub(super) state: Mutex<State>,
    pub(super) boot_bypass: bool,
    pub(super) pending: Mutex<VecDeque<Event>>,
    pub(super) waker: Mutex<Option<EventFd>>,
    pub(super) counters: Counters,
    /// Device names -> endpoint ids (fault reports name the accessor).
    pub(super) names: Mutex<BTreeMap<String, u32>>,
    pub(super) me: Weak<Viommu>,
    /// Where answered requests are recorded, if anywhere.
    pub(super) recorder: Mutex<Option<Arc<Recorder>>>,
    /// A recorder is set (the request path takes `recorder` only then).
    pub(super) recording: AtomicBool,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Tells the device of its domains' faults (never blocks: a bounded queue and a wake).
struct FaultSink {
    viommu: Weak<Viommu>,
    /// The domain is the blocking one: the reason is DOMAIN.
    unattached: bool,
}

impl dma::FaultHandler for FaultSink {
    fn fault(&self, f: &dma::Fault) {
        if let Some(v) = self.viommu.upgrade() {
            v.report(f, self.unattached);
        }
    }
}

impl Viommu {
    /// A device over `dma`, endpoints unattached bypassing through `identity` when
    /// `bypass` (its initial value, restored on system reset).
    pub fn new(dma: Arc<VmDma>, identity: Arc<Identity>, bypass: bool) -> Arc<Viommu> {
        Arc::new_cyclic(|me: &Weak<Viommu>| {
            let blocked = dma.create_domain("viommu-blocked", DomainConfig::default());
            blocked.on_fault(Some(Arc::new(FaultSink { viommu: me.clone(), unattached: true })));
            Viommu {
                dma,
                identity,
                blocked,
                state: Mutex::new(State { features: 0, bypass, domains: BTreeMap::new(), endpoints: BTreeMap::new() }),
                boot_bypass: bypass,
                pending: Mutex::new(VecDeque::new()),
                waker: Mutex::new(None),
                counters: Counters::default(),
                names: Mutex::new(BTreeMap::new()),
                me: me.clone(),
                recorder: Mutex::new(None),
                recording: AtomicBool::new(false),
            }
        })
    }

    /// The features it offers.
    pub fn offered() -> u64 {
        [feature::INPUT_RANGE, feature::DOMAIN_RANGE, feature::MAP_UNMAP, feature::PROBE, feature::BYPASS_CONFIG]
            .iter()
            .fold(0, |a, f| a | (1 << f))
    }

    fn negotiated(st: &State, f: u32) -> bool {
        st.features & (1 << f) != 0
    }

    /// Its configuration, as the driver reads it.
    pub fn config(&self) -> [u8; v::config::SIZE as usize] {
        let st = lock(&self.state);
        let mut c = [0u8; v::config::SIZE as usize];
        c[0..8].copy_from_slice(&v::PAGE_SIZE_MASK.to_le_bytes());
        c[8..16].copy_from_slice(&v::INPUT_RANGE.0.to_le_bytes());
        c[16..24].copy_from_slice(&v::INPUT_RANGE.1.to_le_bytes());
        c[24..28].copy_from_slice(&v::DOMAIN_RANGE.0.to_le_bytes());
        c[28..32].copy_from_slice(&v::DOMAIN_RANGE.1.to_le_bytes());
        c[32..36].copy_from_slice(&v::PROBE_SIZE.to_le_bytes());
        c[36] = u8::from(st.bypass);
        c
    }

    /// A configuration write: only `bypass`, only with BYPASS_CONFIG negotiated; the
    /// device keeps 0 or 1 (bit 0 of what was written).
    pub fn write_config(&self, offset: u64, data: &[u8]) {
        let mut st = lock(&self.state);
        if offset != v::config::BYPASS || data.is_empty() || !Self::negotiated(&st, feature::BYPASS_CONFIG) {
            return;
        }
        let on = data[0] & 1 != 0;
        if on != st.bypass {
            st.bypass = on;
            let unattached: Vec<u32> =
                st.endpoints.iter().filter(|(_, e)| e.domain.is_none()).map(|(id, _)| *id).collect();
            for id in unattached {
                self.park(&mut st, id);
            }
        }
    }

    /// Features accepted (FEATURES_OK).
    pub fn set_features(&self, f: u64) {
        lock(&self.state).features = f;
    }

    /// Device reset: endpoints attached to no domain, every domain gone, features
    /// forgotten, waiting fault reports dropped. `bypass` keeps its value (the spec:
    /// it SHOULD NOT change on device reset).
    pub fn reset(&self) {
        let mut st = lock(&self.state);
        let attached: Vec<u32> = st.endpoints.iter().filter(|(_, e)| e.domain.is_some()).map(|(id, _)| *id).collect();
        for id in attached {
            self.park(&mut st, id);
            if let Some(e) = st.endpoints.get_mut(&id) {
                e.domain = None;
            }
        }
        for (_, d) in std::mem::take(&mut st.domains) {
            if let Kind::Paging(d) = d.kind {
                d.unmap_all();
            }
        }
        st.features = 0;
        lock(&self.pending).clear();
    }

    /// System reset: a device reset, and `bypass` back to its initial value.
    pub fn system_reset(&self) {
        self.reset();
        let mut st = lock(&self.state);
        if st.bypass != self.boot_bypass {
            st.bypass = self.boot_bypass;
            let ids: Vec<u32> = st.endpoints.keys().copied().collect();
            for id in ids {
                self.park(&mut st, id);
            }
        }
    }

    /// Endpoint `e` on the blocking domain (it reaches nothing). A refusal (a device
    /// process that cannot take the switch) leaves it on no domain, reaching nothing
    /// too, and is said.
    fn block(&self, e: &Ep) {
        if let Err(err) = e.device.endpoint.attach(Some(Arc::clone(&self.blocked))) {
            tracing::warn!("virtio-iommu: endpoint {:#x} cannot be blocked, left on no domain: {err}", e.device.id);
        }
    }

    /// Puts endpoint `id` where an unattached endpoint belongs: the identity domain
    /// (bypass), or the blocking one.
    pub(super) fn park(&self, st: &mut State, id: u32) {
        let bypass = st.bypass;
        let Some(e) = st.endpoints.get_mut(&id) else { return };
        if bypass {
            if !e.in_identity {
                match self.identity.attach(&e.device) {
                    Ok(()) => e.in_identity = true,
                    Err(err) => {
                        if !std::mem::replace(&mut e.bypass_refused, true) {
                            tracing::warn!(
                                "virtio-iommu: endpoint {id:#x} cannot bypass, it reaches nothing until the guest attaches it: {err}"
                            );
                        }
                        self.block(e);
                    }
                }
            }
        } else {
            self.block(e);
            if e.in_identity {
                e.in_identity = false;
                self.identity.detach(e.device.id);
            }
        }
    }

    /// A new endpoint (a device given to this front-end): unattached.
    pub fn add_endpoint(&self, device: &Device) {
        let id = u32::from(device.id);
        lock(&self.names).insert(device.name.clone(), id);
        let mut st = lock(&self.state);
        st.endpoints.insert(id, Ep { device: device.clone(), domain: None, in_identity: false, bypass_refused: false });
        self.park(&mut st, id);
    }

    /// An endpoint that went (unplugged or dead): out of its domain (gone if it was the
    /// last one), out of the identity domain.
    pub fn remove_endpoint(&self, id: u16) {
        let id = u32::from(id);
        let mut st = lock(&self.state);
        let Some(e) = st.endpoints.remove(&id) else { return };
        lock(&self.names).remove(&e.device.name);
        let _ = e.device.endpoint.attach(None);
        if e.in_identity {
            self.identity.detach(e.device.id);
        }
        if let Some(d) = e.domain {
            Self::leave(&mut st, id, d);
        }
    }

    /// Endpoint `id` leaves domain `d`; an emptied domain ceases to exist.
    fn leave(st: &mut State, id: u32, d: u32) {
        let empty = st.domains.get_mut(&d).is_some_and(|dom| {
            dom.endpoints.remove(&id);
            dom.endpoints.is_empty()
        });
        if empty && let Some(Dom { kind: Kind::Paging(dom), .. }) = st.domains.remove(&d) {
            dom.unmap_all();
        }
    }

    /// A fault in one of its domains: queued for the event queue (or dropped, counted,
    /// past [`MAX_PENDING_FAULTS`]), and the queue worker woken.
    fn report(&self, f: &dma::Fault, unattached: bool) {
        let Some(endpoint) = lock(&self.names).get(&*f.device).copied() else { return };
        let flags = match f.access {
            dma::Access::Read => v::fault::F_READ,
            dma::Access::Write => v::fault::F_WRITE,
        } | v::fault::F_ADDRESS;
        let reason = if unattached { v::fault::R_DOMAIN } else { v::fault::R_MAPPING };
        {
            let mut p = lock(&self.pending);
            if p.len() >= MAX_PENDING_FAULTS {
                self.counters.events_dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            p.push_back(Event { reason, flags, endpoint, address: f.iova.0 });
        }
        if let Some(w) = lock(&self.waker).as_ref() {
            let _ = w.write(1);
        }
    }

    /// The paging domain `id` for `st`'s caps, made.
    fn new_domain(&self, id: u32) -> Arc<Domain> {
        // The default reserves the MSI window, as PROBE reports it.
        let config = DomainConfig { max_mappings: MAX_MAPPINGS, ..DomainConfig::default() };
        let d = self.dma.create_domain(&format!("viommu-{id}"), config);
        d.on_fault(Some(Arc::new(FaultSink { viommu: self.me.clone(), unattached: false })));
        d
    }

    /// ATTACH.
    pub(super) fn attach(&self, st: &mut State, domain: u32, endpoint: u32, flags: u32, reserved: bool) -> u8 {
        if reserved || flags & !v::ATTACH_F_BYPASS != 0 {
            return status::INVAL;
        }
        let bypass = flags & v::ATTACH_F_BYPASS != 0;
        if bypass && !Self::negotiated(st, feature::BYPASS_CONFIG) {
            return status::INVAL;
        }
        if !(v::DOMAIN_RANGE.0..=v::DOMAIN_RANGE.1).contains(&domain) {
            return status::RANGE;
        }
        let Some(old) = st.endpoints.get(&endpoint).map(|e| e.domain) else { return status::NOENT };
        match st.domains.get(&domain) {
            Some(d) if matches!(d.kind, Kind::Bypass) != bypass => return status::INVAL,
            Some(_) => {}
            None if st.domains.len() >= MAX_DOMAINS => return status::NOMEM,
            None => {
                let kind = if bypass { Kind::Bypass } else { Kind::Paging(self.new_domain(domain)) };
                st.domains.insert(domain, Dom { kind, endpoints: BTreeSet::new() });
            }
        }
        if old == Some(domain) {
            return status::OK;
        }
        let Some(kind) = st.domains.get(&domain).map(|d| d.kind.clone()) else { return status::DEVERR };
        let Some(e) = st.endpoints.get_mut(&endpoint) else { return status::NOENT };
        // The handover: once this returns, the old domain is out of reach.
        let moved = match &kind {
            Kind::Paging(d) => e.device.endpoint.attach(Some(Arc::clone(d))).map_err(|x| x.to_string()),
            Kind::Bypass if e.in_identity => Ok(()),
            Kind::Bypass => self.identity.attach(&e.device).map_err(|x| x.to_string()),
        };
        if let Err(why) = moved {
            tracing::warn!("virtio-iommu: endpoint {endpoint:#x} cannot join domain {domain}: {why}");
            if st.domains.get(&domain).is_some_and(|d| d.endpoints.is_empty()) {
                st.domains.remove(&domain);
            }
            return status::DEVERR;
        }
        match kind {
            Kind::Bypass => e.in_identity = true,
            Kind::Paging(_) if e.in_identity => {
                e.in_identity = false;
                self.identity.detach(e.device.id);
            }
            Kind::Paging(_) => {}
        }
        e.domain = Some(domain);
        if let Some(d) = st.domains.get_mut(&domain) {
            d.endpoints.insert(endpoint);
        }
        if let Some(o) = old {
            Self::leave(st, endpoint, o);
        }
        status::OK
    }

    /// DETACH.
    fn detach(&self, st: &mut State, domain: u32, endpoint: u32) -> u8 {
        let Some(e) = st.endpoints.get(&endpoint) else { return status::NOENT };
        if e.domain != Some(domain) || !st.domains.contains_key(&domain) {
            return status::INVAL;
        }
        self.park(st, endpoint);
        if let Some(e) = st.endpoints.get_mut(&endpoint) {
            e.domain = None;
        }
        Self::leave(st, endpoint, domain);
        status::OK
    }

    /// The paging domain `domain` (NOENT if none, INVAL for a bypass domain).
    fn paging(st: &State, domain: u32) -> Result<&Arc<Domain>, u8> {
        match st.domains.get(&domain).map(|d| &d.kind) {
            None => Err(status::NOENT),
            Some(Kind::Bypass) => Err(status::INVAL),
            Some(Kind::Paging(d)) => Ok(d),
        }
    }

    /// A MAP's checks before the DMA core sees it: its mapping, or its status.
    fn check_map(
        st: &State,
        domain: u32,
        start: u64,
        end: u64,
        phys: u64,
        flags: u32,
    ) -> Result<(&Arc<Domain>, Mapping), u8> {
        if !Self::negotiated(st, feature::MAP_UNMAP) {
            return Err(status::UNSUPP);
        }
        // MMIO is not offered: an unrecognised flag.
        if flags & !(v::map::READ | v::map::WRITE) != 0 || flags == 0 {
            return Err(status::INVAL);
        }
        let d = Self::paging(st, domain)?;
        if end < start {
            return Err(status::INVAL);
        }
        let g = d.granule();
        let size_ok = end.checked_add(1).filter(|e| e.is_multiple_of(g));
        if !start.is_multiple_of(g) || !phys.is_multiple_of(g) || size_ok.is_none() {
            return Err(status::RANGE);
        }
        if end > v::INPUT_RANGE.1 || start < v::INPUT_RANGE.0 {
            return Err(status::RANGE);
        }
        if start <= v::MSI_REGION.1 && v::MSI_REGION.0 <= end {
            return Err(status::INVAL);
        }
        let size = end - start + 1;
        if phys.checked_add(size).is_none() {
            return Err(status::RANGE);
        }
        let perm = Perm::new(flags & v::map::READ != 0, flags & v::map::WRITE != 0);
        Ok((d, Mapping { iova: Iova(start), gpa: Gpa(phys), size, perm }))
    }

    /// The status of a MAP the DMA core refused.
    fn map_status(e: &MapError) -> u8 {
        match e {
            MapError::Exists { .. } | MapError::InvalidArgument(_) => status::INVAL,
            MapError::BadAddress { .. } => status::FAULT,
            MapError::NoSpace { .. } => status::NOMEM,
            MapError::Rejected(_) => status::DEVERR,
            _ => status::NOMEM,
        }
    }

    /// An UNMAP's checks: appends to `out` the IOVAs of the mappings it removes (none
    /// straddling its ends, unless an earlier UNMAP of the run, whose IOVAs `out`
    /// already holds, removes it), or its status.
    fn check_unmap<'s>(
        st: &'s State,
        domain: u32,
        start: u64,
        end: u64,
        reserved: bool,
        out: &mut Vec<Iova>,
    ) -> Result<&'s Arc<Domain>, u8> {
        if !Self::negotiated(st, feature::MAP_UNMAP) {
            return Err(status::UNSUPP);
        }
        if reserved {
            return Err(status::INVAL);
        }
        let d = Self::paging(st, domain)?;
        if end < start {
            return Err(status::INVAL);
        }
        // Nothing is mapped past the input range.
        let end = end.min(v::INPUT_RANGE.1);
        if start > end {
            return Ok(d);
        }
        let from = out.len();
        let straddling = d.whole_mappings_in(Iova(start), Iova(end), out);
        // A mapping an earlier UNMAP of this run removes is no longer there to split.
        if straddling.iter().flatten().any(|m| !out[..from].contains(&m.iova)) {
            out.truncate(from);
            return Err(status::RANGE);
        }
        Ok(d)
    }
}

/// Descriptors of each kind (device-readable, device-writable) a chain may have for
/// the direct path; a chain with more goes through virtio-queue's reader and writer.
const SEGMENTS: usize = 2;

/// A chain's buffers: its device-readable parts, then its device-writable ones.
#[derive(Clone, Copy, Default)]
struct Segments {
    read: [(u64, u32); SEGMENTS],
    nr: usize,
    write: [(u64, u32); SEGMENTS],
    nw: usize,
}

impl Segments {
    /// A chain's buffers; None when they are not readable-then-writable, at most
    /// [`SEGMENTS`] of each.
    fn of(chain: &virtio_queue::DescriptorChain<&vm_memory::GuestMemoryMmap>) -> Option<Segments> {
        let mut s = Segments::default();
        for d in chain.clone() {
            if d.is_write_only() {
                *s.write.get_mut(s.nw)? = (d.addr().0, d.len());
                s.nw += 1;
            } else {
                if s.nw > 0 {
                    return None;
                }
                *s.read.get_mut(s.nr)? = (d.addr().0, d.len());
                s.nr += 1;
            }
        }
        Some(s)
    }

    /// Bytes the device may write.
    fn writable(&self) -> usize {
        let n: u64 = self.write[..self.nw].iter().map(|(_, l)| u64::from(*l)).sum();
        usize::try_from(n).unwrap_or(usize::MAX)
    }

    /// Reads the first readable bytes into `buf`; how many (None: memory that is not
    /// guest memory).
    fn read(&self, mem: &vm_memory::GuestMemoryMmap, buf: &mut [u8]) -> Option<usize> {
        let mut n = 0;
        for (addr, len) in &self.read[..self.nr] {
            let k = (*len as usize).min(buf.len() - n);
            if k == 0 {
                continue;
            }
            mem.read_slice(&mut buf[n..n + k], GuestAddress(*addr)).ok()?;
            n += k;
        }
        Some(n)
    }

    /// Writes `data` at `offset` of the writable part; false if it does not all fit
    /// in guest memory.
    fn write_at(&self, mem: &vm_memory::GuestMemoryMmap, mut offset: usize, mut data: &[u8]) -> bool {
        for (addr, len) in &self.write[..self.nw] {
            let len = *len as usize;
            if data.is_empty() {
                break;
            }
            if offset >= len {
                offset -= len;
                continue;
            }
            let k = (len - offset).min(data.len());
            let Some(at) = addr.checked_add(offset as u64) else { return false };
            if mem.write_slice(&data[..k], GuestAddress(at)).is_err() {
                return false;
            }
            data = &data[k..];
            offset = 0;
        }
        data.is_empty()
    }
}

/// A request taken from the queue, and what to answer.
struct Taken<'m> {
    chain: virtio_queue::DescriptorChain<&'m vm_memory::GuestMemoryMmap>,
    /// Its buffers, when the direct path takes them.
    segments: Option<Segments>,
    /// Writable bytes the driver gave.
    writable: usize,
    request: Option<Request>,
    status: u8,
    /// PROBE: the properties to write.
    probe: Option<Vec<u8>>,
}

/// MAPs or UNMAPs of one kick on one domain, gathered to reach the DMA core at once
/// (an UNMAP run's IOVAs are gathered beside it, in the kick's `iovas`).
enum Batch {
    None,
    Map(u32, Vec<usize>, Vec<Mapping>, Arc<Domain>),
    Unmap(u32, Vec<usize>, Arc<Domain>),
}

/// Where one kick's VMM time went, by request type (ATTACH..PROBE). The clock is read
/// when the type of work changes (a run of 256 MAPs reads it twice): each type gets
/// its requests' and batches' time, and the kick's shared work (taking, parsing,
/// answering) is spread over its requests by count.
struct KickTime {
    start: Instant,
    last: Instant,
    current: Option<usize>,
    spent: [u64; 5],
    count: [u64; 5],
}

impl KickTime {
    fn new() -> KickTime {
        let now = Instant::now();
        KickTime { start: now, last: now, current: None, spent: [0; 5], count: [0; 5] }
    }

    /// Work of type `k` starts (or goes on). The kick's first type also gets the
    /// time since the kick began (no clock read for a kick of one type).
    fn at(&mut self, k: usize) {
        match self.current {
            Some(c) if c == k => {}
            None => self.current = Some(k),
            Some(_) => {
                self.stop();
                self.current = Some(k);
            }
        }
    }

    /// The current type's work ends.
    fn stop(&mut self) {
        let now = Instant::now();
        if let Some(s) = self.current.take().and_then(|c| self.spent.get_mut(c)) {
            *s = s.saturating_add(now.duration_since(self.last).as_nanos() as u64);
        }
        self.last = now;
    }

    /// The kick is done (the last type's work stopped): its shared work goes to the
    /// types by count.
    fn settle(&self, into: &[AtomicU64; 5], requests: &[AtomicU64; 5]) {
        let n: u64 = self.count.iter().sum();
        if n == 0 {
            return;
        }
        for (count, r) in self.count.iter().zip(requests) {
            if *count > 0 {
                r.fetch_add(*count, Ordering::Relaxed);
            }
        }
        let total = self.last.duration_since(self.start).as_nanos() as u64;
        let shared = total.saturating_sub(self.spent.iter().sum());
        for ((spent, count), into) in self.spent.iter().zip(&self.count).zip(into) {
            if *count > 0 {
                let share = shared.saturating_mul(*count) / n;
                into.fetch_add(spent.saturating_add(share), Ordering::Relaxed);
            }
        }
    }
}

impl Viommu {
    /// Takes every available request, answers them in order (MAP and UNMAP runs
    /// batched), and returns each with its used length.
    pub fn process_requests(&self, q: &mut QueueAccess<'_>) {
        let mut time = KickTime::new();
        let mut taken: Vec<Taken<'_>> = Vec::with_capacity(4);
        while let Some(chain) = q.pop() {
            taken.push(self.parse(q.memory(), chain));
        }
        if taken.is_empty() {
            return;
        }
        let mut st = lock(&self.state);
        let mut batch = Batch::None;
        let mut iovas: Vec<Iova> = Vec::new();
        for i in 0..taken.len() {
            let Some(r) = taken[i].request else { continue };
            let k = r_index(&r);
            time.count[k] += 1;
            match r {
                Request::Map { domain, virt_start, virt_end, phys_start, flags } => {
                    // What came before in this kick is done before this is checked;
                    // within a run the DMA core checks each against those before it.
                    if !matches!(&batch, Batch::Map(bd, ..) if *bd == domain) {
                        self.flush(&mut batch, &mut iovas, &mut taken);
                    }
                    time.at(k);
                    match Self::check_map(&st, domain, virt_start, virt_end, phys_start, flags) {
                        Err(s) => taken[i].status = s,
                        Ok((d, m)) => {
                            if matches!(batch, Batch::None) {
                                batch = Batch::Map(domain, Vec::new(), Vec::new(), Arc::clone(d));
                            }
                            if let Batch::Map(_, reqs, maps, _) = &mut batch {
                                reqs.push(i);
                                maps.push(m);
                            }
                        }
                    }
                }
                Request::Unmap { domain, virt_start, virt_end, reserved } => {
                    if !matches!(&batch, Batch::Unmap(bd, ..) if *bd == domain) {
                        self.flush(&mut batch, &mut iovas, &mut taken);
                    }
                    time.at(k);
                    match Self::check_unmap(&st, domain, virt_start, virt_end, reserved, &mut iovas) {
                        Err(s) => taken[i].status = s,
                        Ok(d) => {
                            if matches!(batch, Batch::None) {
                                batch = Batch::Unmap(domain, Vec::new(), Arc::clone(d));
                            }
                            if let Batch::Unmap(_, reqs, _) = &mut batch {
                                reqs.push(i);
                            }
                        }
                    }
                }
                other => {
                    self.flush(&mut batch, &mut iovas, &mut taken);
                    time.at(k);
                    taken[i].status = match other {
                        Request::Attach { domain, endpoint, flags, reserved } => {
                            self.attach(&mut st, domain, endpoint, flags, reserved)
                        }
                        Request::Detach { domain, endpoint } => self.detach(&mut st, domain, endpoint),
                        Request::Probe { endpoint } => self.probe(&st, &mut taken[i], endpoint),
                        _ => status::DEVERR,
                    };
                }
            }
        }
        self.flush(&mut batch, &mut iovas, &mut taken);
        drop(st);
        let recorder = if self.recording.load(Ordering::Acquire) { lock(&self.recorder).clone() } else { None };
        let mut answered = Vec::new();
        for t in taken {
            if let (Some(_), Some(r)) = (&recorder, t.request) {
                let resv = t.probe.as_ref().map(|_| v::MSI_REGION);
                answered.push((r, t.status, resv));
            }
            self.answer(q, t);
        }
        // Answering goes to the last type of the kick (all of it, for a kick of one).
        time.stop();
        time.settle(&self.counters.nanos, &self.counters.requests);
        if let Some(rec) = recorder
            && !answered.is_empty()
        {
            rec.kick(&answered);
        }
    }

    /// Sends a gathered batch to the DMA core and sets its requests' statuses.
    fn flush(&self, batch: &mut Batch, iovas: &mut Vec<Iova>, taken: &mut [Taken<'_>]) {
        match std::mem::replace(batch, Batch::None) {
            Batch::None => {}
            Batch::Map(_, reqs, maps, d) => {
                if maps.is_empty() {
                    return;
                }
                self.counters.batches.fetch_add(1, Ordering::Relaxed);
                // All or nothing: on a refusal the batch was undone. Those before the
                // one refused go in again as one batch; from it on, each on its own,
                // for its own status (as many DMA-core calls as requests, at most).
                let mut ok = maps.len();
                if let Err((at, _)) = d.map_many(&maps) {
                    ok = at.min(maps.len());
                    if ok > 0 && d.map_many(&maps[..ok]).is_err() {
                        ok = 0;
                    }
                }
                for i in &reqs[..ok] {
                    taken[*i].status = status::OK;
                }
                for (i, m) in reqs[ok..].iter().zip(&maps[ok..]) {
                    taken[*i].status = match d.map(m.iova, m.gpa, m.size, m.perm) {
                        Ok(()) => status::OK,
                        Err(e) => Self::map_status(&e),
                    };
                }
            }
            Batch::Unmap(_, reqs, d) => {
                self.counters.batches.fetch_add(1, Ordering::Relaxed);
                iovas.sort_unstable_by_key(|i| i.0);
                iovas.dedup();
                if !iovas.is_empty() {
                    d.unmap_exact(iovas);
                }
                iovas.clear();
                for i in reqs {
                    taken[i].status = status::OK;
                }
            }
        }
    }

    /// PROBE: the endpoint's properties (one RESV_MEM MSI region), zeros after; INVAL
    /// if the driver gave less than `probe_size` bytes for them.
    fn probe(&self, st: &State, t: &mut Taken<'_>, endpoint: u32) -> u8 {
        if !Self::negotiated(st, feature::PROBE) {
            return status::UNSUPP;
        }
        if !st.endpoints.contains_key(&endpoint) {
            return status::NOENT;
        }
        let size = v::PROBE_SIZE as usize;
        if t.writable < size + v::size::TAIL as usize {
            return status::INVAL;
        }
        let mut p = vec![0u8; size];
        p[0..2].copy_from_slice(&v::probe::T_RESV_MEM.to_le_bytes());
        p[2..4].copy_from_slice(&v::probe::RESV_MEM_LEN.to_le_bytes());
        p[4] = v::probe::RESV_MEM_T_MSI;
        p[8..16].copy_from_slice(&v::MSI_REGION.0.to_le_bytes());
        p[16..24].copy_from_slice(&v::MSI_REGION.1.to_le_bytes());
        t.probe = Some(p);
        status::OK
    }

    /// Reads one chain's request (None: unrecognised or unparsable: returned unwritten).
    fn parse<'m>(
        &self,
        mem: &'m vm_memory::GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&'m vm_memory::GuestMemoryMmap>,
    ) -> Taken<'m> {
        let segments = Segments::of(&chain);
        let mut t = Taken { chain, segments, writable: 0, request: None, status: status::OK, probe: None };
        let mut b = [0u8; v::size::PROBE as usize];
        let n = match &t.segments {
            // The common case: the buffers read and written where they are.
            Some(s) => {
                t.writable = s.writable();
                let Some(n) = s.read(mem, &mut b) else { return t };
                n
            }
            None => {
                let (Ok(mut reader), Ok(writer)) = (t.chain.clone().reader(mem), t.chain.clone().writer(mem)) else {
                    return t;
                };
                t.writable = writer.available_bytes();
                let n = reader.available_bytes().min(b.len());
                if reader.read_exact(&mut b[..n]).is_err() {
                    return t;
                }
                n
            }
        };
        if n == 0 || t.writable < v::size::TAIL as usize {
            return t;
        }
        t.request = wire::decode(&b[..n]);
        t
    }

    /// Returns a chain: its status (and PROBE's properties) written, the used length
    /// the full writable size for a recognised request, 0 otherwise.
    fn answer(&self, q: &mut QueueAccess<'_>, t: Taken<'_>) {
        let head = t.chain.head_index();
        if t.request.is_none() {
            self.counters.unwritten.fetch_add(1, Ordering::Relaxed);
            q.add_used(head, 0);
            return;
        }
        if let Some(c) = self.counters.statuses.get(usize::from(t.status)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let is_probe = matches!(t.request, Some(Request::Probe { .. }));
        // The tail: after probe_size bytes of properties for PROBE (or at the end of a
        // shorter buffer, which is INVAL), first for the others.
        let tail_at = if is_probe { (v::PROBE_SIZE as usize).min(t.writable - v::size::TAIL as usize) } else { 0 };
        let used = if is_probe { tail_at + v::size::TAIL as usize } else { v::size::TAIL as usize };
        let mut tail = [0u8; v::size::TAIL as usize];
        tail[0] = t.status;
        // PROBE's properties when it succeeded; otherwise the bytes before the tail are
        // left as they were (no property written on error).
        let written = match &t.segments {
            Some(s) => {
                let mem = q.memory();
                t.probe.as_ref().is_none_or(|p| s.write_at(mem, 0, p)) && s.write_at(mem, tail_at, &tail)
            }
            None => {
                let Ok(mut w) = t.chain.clone().writer(q.memory()) else {
                    q.add_used(head, 0);
                    return;
                };
                let at_tail = match &t.probe {
                    Some(p) => w.write_all(p).ok().map(|()| w),
                    None => w.split_at(tail_at).ok(),
                };
                at_tail.is_some_and(|mut w| w.write_all(&tail).is_ok())
            }
        };
        q.add_used(head, if written { used as u32 } else { 0 });
    }

    /// Writes waiting fault reports into event buffers, in order; a report finding no
    /// buffer is dropped and counted.
    pub fn process_events(&self, q: &mut QueueAccess<'_>) {
        loop {
            let Some(e) = lock(&self.pending).pop_front() else { return };
            // Without a buffer the report is dropped (counted): the device never
            // waits on the driver.
            let Some(chain) = q.pop() else {
                self.counters.events_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let head = chain.head_index();
            let mut b = [0u8; v::size::FAULT as usize];
            b[0] = e.reason;
            b[4..8].copy_from_slice(&e.flags.to_le_bytes());
            b[8..12].copy_from_slice(&e.endpoint.to_le_bytes());
            b[16..24].copy_from_slice(&e.address.to_le_bytes());
            let written = chain
                .writer(q.memory())
                .ok()
                .filter(|w| w.available_bytes() >= b.len())
                .and_then(|mut w| w.write_all(&b).ok());
            match written {
                Some(()) => {
                    self.counters.events.fetch_add(1, Ordering::Relaxed);
                    q.add_used(head, b.len() as u32);
                }
                None => {
                    self.counters.events_dropped.fetch_add(1, Ordering::Relaxed);
                    q.add_used(head, 0);
                }
            }
        }
    }
}

/// Counter index of MAP and UNMAP requests.
const REQ_MAP: usize = 2;
const REQ_UNMAP: usize = 3;

/// The counter index of a request's type.
fn r_index(r: &Request) -> usize {
    match r {
        Request::Attach { .. } => 0,
        Request::Detach { .. } => 1,
        Request::Map { .. } => REQ_MAP,
        Request::Unmap { .. } => REQ_UNMAP,
        Request::Probe { .. } => 4,
    }
}
