//! Paravirtual DMA (call numbers and layouts in [`abi::pvdma`]).
//!
//! The guest maps a buffer before a device may touch it and unmaps it afterwards; the
//! VMM allocates an IOVA in the device's domain, pins and accounts the guest pages in
//! the VM's locked-memory account, and records everything in counters per VM and per
//! device (as the 2008 patch added hypercall_map / hypercall_unmap / hypercall_pv_dev
//! to KVM's statistics). A misbehaving guest gets statuses, never a dead VMM; killing
//! the VM on misuse is an explicit policy, off by default. Transient failures (no IOVA
//! space, over the locked-memory limit, busy) tell the guest to retry or quiesce.
//!
//! Decoding ([`decode`]) is pure and separate from execution, so it can be fuzzed.

use crate::iova::IovaAllocator;
use abi::hcall::{Args, Ret, Status};
use abi::pvdma::{self as pv, SgEntry};
use dma::{Domain, Gpa, Iova, MapError, Perm};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// IOVAs handed out start here (not 0: a zero IOVA is a classic driver bug to catch).
pub const IOVA_BASE: u64 = 1 << 32;

/// A decoded call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// QUERY.
    Query {
        /// Device.
        device: u64,
    },
    /// MAP.
    Map {
        /// Device.
        device: u64,
        /// Guest-physical start.
        gpa: u64,
        /// Bytes.
        len: u64,
        /// What the device may do.
        perm: Perm,
    },
    /// MAP_SG.
    MapSg {
        /// Device.
        device: u64,
        /// Guest-physical address of the list.
        list: u64,
        /// Entries.
        count: u64,
        /// What the device may do.
        perm: Perm,
    },
    /// UNMAP.
    Unmap {
        /// Device.
        device: u64,
        /// IOVA returned by MAP.
        iova: u64,
        /// Bytes given to MAP.
        len: u64,
    },
    /// UNMAP_SG.
    UnmapSg {
        /// Device.
        device: u64,
        /// Guest-physical address of the list.
        list: u64,
        /// Entries.
        count: u64,
    },
}

fn perm_of(direction: u64) -> Result<Perm, Status> {
    match direction {
        pv::dir::TO_DEVICE => Ok(Perm::READ),
        pv::dir::FROM_DEVICE => Ok(Perm::WRITE),
        pv::dir::BIDIRECTIONAL => Ok(Perm::READ_WRITE),
        _ => Err(Status::InvalidArgument),
    }
}

fn check_len(len: u64) -> Result<u64, Status> {
    if len == 0 || len > pv::MAX_MAP_LEN { Err(Status::InvalidArgument) } else { Ok(len) }
}

fn check_count(count: u64) -> Result<u64, Status> {
    if count == 0 || count > pv::MAX_SG { Err(Status::InvalidArgument) } else { Ok(count) }
}

/// Decodes the registers of a pvdma hypercall. Pure; never panics.
pub fn decode(a: &Args) -> Result<Call, Status> {
    let [device, x, y, z, _] = a.a;
    Ok(match a.nr {
        pv::QUERY => Call::Query { device },
        pv::MAP => Call::Map { device, gpa: x, len: check_len(y)?, perm: perm_of(z)? },
        pv::MAP_SG => Call::MapSg { device, list: x, count: check_count(y)?, perm: perm_of(z)? },
        pv::UNMAP => Call::Unmap { device, iova: x, len: check_len(y)? },
        pv::UNMAP_SG => Call::UnmapSg { device, list: x, count: check_count(y)? },
        _ => return Err(Status::UnknownCall),
    })
}

/// Parses a scatter-gather list (little-endian 16-byte entries). Pure.
pub fn parse_sg(bytes: &[u8]) -> Vec<SgEntry> {
    bytes
        .chunks_exact(pv::SG_ENTRY_SIZE as usize)
        .map(|c| {
            let mut a = [0u8; 8];
            let mut l = [0u8; 8];
            a.copy_from_slice(&c[..8]);
            l.copy_from_slice(&c[8..16]);
            SgEntry { addr: u64::from_le_bytes(a), len: u64::from_le_bytes(l) }
        })
        .collect()
}

/// Counters of calls and of their statuses (for calls that reached no device; a
/// device's counters live under its lock, which every call takes anyway).
#[derive(Debug, Default)]
struct Stats {
    calls: [AtomicU64; 5],
    unknown: AtomicU64,
    statuses: [AtomicU64; 10],
}

/// A snapshot of [`Stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsSnapshot {
    /// QUERY, MAP, MAP_SG, UNMAP, UNMAP_SG calls.
    pub calls: [u64; 5],
    /// Calls with a number of the block that names no call.
    pub unknown: u64,
    /// Results by status (indexed by its value).
    pub statuses: [u64; 10],
    /// Granules mapped and unmapped.
    pub pages: (u64, u64),
}

const CALL_NAMES: [&str; 5] = ["query", "map", "map_sg", "unmap", "unmap_sg"];

impl Stats {
    /// Counts one call of kind `call` (None: an unknown call number) with `status`.
    fn record(&self, call: Option<usize>, status: Status) {
        match call.and_then(|c| self.calls.get(c)) {
            Some(c) => c.fetch_add(1, Ordering::Relaxed),
            None => self.unknown.fetch_add(1, Ordering::Relaxed),
        };
        self.statuses[status as usize % 10].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> StatsSnapshot {
        let mut s = StatsSnapshot { unknown: self.unknown.load(Ordering::Relaxed), ..Default::default() };
        for (o, c) in s.calls.iter_mut().zip(&self.calls) {
            *o = c.load(Ordering::Relaxed);
        }
        for (o, c) in s.statuses.iter_mut().zip(&self.statuses) {
            *o = c.load(Ordering::Relaxed);
        }
        s
    }
}

impl StatsSnapshot {
    // Counters wrap (as hardware counters do): one restored from a snapshot may be
    // anywhere, and a counter must never end the VMM.
    fn record(&mut self, call: usize, status: Status) {
        if let Some(c) = self.calls.get_mut(call) {
            *c = c.wrapping_add(1);
        }
        let s = &mut self.statuses[status as usize % 10];
        *s = s.wrapping_add(1);
    }

    fn add(&mut self, o: &StatsSnapshot) {
        for (a, b) in self.calls.iter_mut().zip(o.calls) {
            *a = a.wrapping_add(b);
        }
        self.unknown = self.unknown.wrapping_add(o.unknown);
        for (a, b) in self.statuses.iter_mut().zip(o.statuses) {
            *a = a.wrapping_add(b);
        }
        self.pages.0 = self.pages.0.wrapping_add(o.pages.0);
        self.pages.1 = self.pages.1.wrapping_add(o.pages.1);
    }

    /// Whether a device's counters (from a snapshot) hold together: every call has one
    /// status, no unknown call reached a device, and the pages mapped and not unmapped
    /// are those of its live mappings.
    fn consistent(&self, live_pages: u64) -> bool {
        let sum = |v: &[u64]| v.iter().try_fold(0u64, |a, b| a.checked_add(*b));
        self.unknown == 0
            && sum(&self.calls).is_some_and(|c| Some(c) == sum(&self.statuses))
            && self.pages.0.checked_sub(self.pages.1) == Some(live_pages)
    }

    /// Calls of one kind by name ("map", ...).
    pub fn calls_named(&self, name: &str) -> u64 {
        CALL_NAMES.iter().position(|n| *n == name).map_or(0, |i| self.calls[i])
    }

    /// Results with `status`.
    pub fn with_status(&self, status: Status) -> u64 {
        self.statuses[status as usize % 10]
    }
}

impl StatsSnapshot {
    /// The counters as statistics: calls by kind, unknown calls (if any), pages, and
    /// results by status (those that happened).
    pub fn to_stats(&self) -> crate::frontend::Stats {
        let mut s = crate::frontend::Stats::new();
        for (n, c) in CALL_NAMES.iter().zip(self.calls) {
            s = s.total(n, c);
        }
        if self.unknown > 0 {
            s = s.total("unknown", self.unknown);
        }
        s = s.total("pages_mapped", self.pages.0).total("pages_unmapped", self.pages.1);
        for raw in 1..10u64 {
            let n = self.statuses[raw as usize];
            if n > 0
                && let Some(st) = Status::from_raw(raw)
            {
                s = s.total(st.name(), n);
            }
        }
        s
    }
}

impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_stats().words())
    }
}

struct DevState {
    alloc: IovaAllocator,
    stats: StatsSnapshot,
}

/// One device behind (or not behind) paravirtual DMA.
pub struct PvDevice {
    name: String,
    domain: Arc<Domain>,
    paravirtual: bool,
    state: Mutex<DevState>,
}

impl PvDevice {
    /// The device's counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).stats
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Live mappings made through pvdma (the domain of a pvdma device has no others).
    pub fn live_mappings(&self) -> usize {
        self.domain.mapping_count()
    }
}

/// One device's paravirtual DMA state in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedDevice {
    /// Its requester id.
    pub id: u64,
    /// Its counters.
    pub counters: StatsSnapshot,
    /// Its mappings, by IOVA.
    pub mappings: Vec<SavedMapping>,
}

/// One mapping a guest made through paravirtual DMA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedMapping {
    /// First IOVA.
    pub iova: u64,
    /// First guest-physical address.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
    /// The device may read.
    pub read: bool,
    /// The device may write.
    pub write: bool,
}

/// The front-end's state in a snapshot (version [`STATE_VERSION`]): every device's.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedState {
    /// By requester id.
    pub devices: Vec<SavedDevice>,
}

/// The format version of [`SavedState`].
pub const STATE_VERSION: u32 = 1;

/// Why a call ends the VM under the kill policy.
pub type KillHook = Box<dyn Fn(&str) + Send + Sync>;

/// The paravirtual DMA front-end of one VM.
pub struct PvDma {
    memory: Arc<GuestMemoryMmap>,
    devices: RwLock<HashMap<u64, Arc<PvDevice>>>,
    stats: Stats,
    /// Counters of devices that are gone: VM-wide totals never go backwards.
    retired: Mutex<StatsSnapshot>,
    kill: Option<KillHook>,
}

fn status_of(e: &MapError) -> Status {
    match e {
        MapError::NoMemory { .. } => Status::OverLockedLimit,
        MapError::NoSpace { .. } => Status::NoIovaSpace,
        MapError::Rejected(_) => Status::Busy,
        MapError::BadAddress { .. } | MapError::InvalidArgument(_) => Status::InvalidArgument,
        MapError::Exists { .. } => Status::Internal,
    }
}

impl PvDma {
    /// A front-end reading scatter-gather lists from `memory`. With `kill`, a call the
    /// guest got wrong (invalid argument) ends the VM through it; transient failures
    /// never do.
    pub fn new(memory: Arc<GuestMemoryMmap>, kill: Option<KillHook>) -> PvDma {
        PvDma {
            memory,
            devices: RwLock::new(HashMap::new()),
            stats: Stats::default(),
            retired: Mutex::new(StatsSnapshot::default()),
            kill,
        }
    }

    /// Registers device `id` with its domain; `paravirtual` says whether the guest maps
    /// its DMA (false: the device has another front-end and QUERY answers 0).
    pub fn add_device(&self, id: u64, name: &str, domain: Arc<Domain>, paravirtual: bool) {
        let c = domain.config();
        let limit = if c.aperture_bits >= 64 { u64::MAX } else { 1u64 << c.aperture_bits };
        let alloc = IovaAllocator::new(IOVA_BASE, limit, domain.granule(), &c.reserved);
        let dev = PvDevice {
            name: name.to_string(),
            domain,
            paravirtual,
            state: Mutex::new(DevState { alloc, stats: StatsSnapshot::default() }),
        };
        self.devices.write().unwrap_or_else(|e| e.into_inner()).insert(id, Arc::new(dev));
    }

    /// Forgets device `id` (removed or dead): its calls answer `NotAssigned`, the
    /// mappings it still held are released (and counted as unmapped pages), and what it
    /// counted stays in the VM-wide totals.
    pub fn remove_device(&self, id: u64) {
        let removed = self.devices.write().unwrap_or_else(|e| e.into_inner()).remove(&id);
        let Some(d) = removed else { return };
        // No call of the device runs now (each holds the table's read lock throughout).
        let released = d.domain.unmap_all() / d.domain.granule();
        let mut st = d.state.lock().unwrap_or_else(|e| e.into_inner());
        st.stats.pages.1 = st.stats.pages.1.wrapping_add(released);
        self.retired.lock().unwrap_or_else(|e| e.into_inner()).add(&st.stats);
    }

    /// Device `id`'s state for a snapshot: its counters and its mappings. The IOVA
    /// allocator's state is those mappings: a restore takes the same ranges.
    pub fn save_device(&self, id: u64) -> Option<SavedDevice> {
        let d = self.device(id)?;
        let st = d.state.lock().unwrap_or_else(|e| e.into_inner());
        let mappings = d
            .domain
            .mappings()
            .into_iter()
            .map(|m| SavedMapping {
                iova: m.iova.0,
                gpa: m.gpa.0,
                size: m.size,
                read: m.perm.allows(dma::Access::Read),
                write: m.perm.allows(dma::Access::Write),
            })
            .collect();
        Some(SavedDevice { id, counters: st.stats, mappings })
    }

    /// Puts back what [`PvDma::save_device`] saved, on device `id` just attached: the
    /// same IOVAs taken from its allocator and mapped (pinned, and given to the
    /// device). Counters that do not match the mappings, or a range that cannot be
    /// taken, is an error; mappings made before it are undone.
    pub fn restore_device(&self, id: u64, saved: &SavedDevice) -> Result<(), String> {
        let d = self.device(id).ok_or_else(|| format!("device {id:#x} is not behind paravirtual DMA"))?;
        let stats = saved.counters;
        let g = d.domain.granule();
        let live = saved.mappings.iter().try_fold(0u64, |a, m| a.checked_add(m.size / g));
        if !live.is_some_and(|live| stats.consistent(live)) {
            return Err("paravirtual DMA state: the counters do not match the mappings".into());
        }
        let mut st = d.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut done = Vec::new();
        for m in &saved.mappings {
            let (iova, gpa, size) = (m.iova, m.gpa, m.size);
            let perm = Perm::new(m.read, m.write);
            let taken = st.alloc.rounded(size);
            let r = if st.alloc.take(iova, taken) {
                d.domain.map(Iova(iova), Gpa(gpa), size, perm).map_err(|e| {
                    st.alloc.free(iova, taken);
                    format!("restoring the mapping at IOVA {iova:#x}: {e}")
                })
            } else {
                Err(format!("IOVA {iova:#x}+{size:#x} is not free in the restored allocator"))
            };
            if let Err(e) = r {
                for (iova, size, taken) in done {
                    let _ = d.domain.unmap(Iova(iova), size);
                    st.alloc.free(iova, taken);
                }
                return Err(e);
            }
            done.push((iova, size, taken));
        }
        st.stats = stats;
        Ok(())
    }

    /// Device `id`.
    pub fn device(&self, id: u64) -> Option<Arc<PvDevice>> {
        self.devices.read().unwrap_or_else(|e| e.into_inner()).get(&id).cloned()
    }

    /// VM-wide counters: devices present and gone, plus calls that reached no device.
    pub fn stats(&self) -> StatsSnapshot {
        let mut s = self.stats.snapshot();
        let devices = self.devices.read().unwrap_or_else(|e| e.into_inner());
        for d in devices.values() {
            s.add(&d.stats());
        }
        s.add(&self.retired.lock().unwrap_or_else(|e| e.into_inner()));
        s
    }

    /// Executes one hypercall of the block.
    pub fn call(&self, a: &Args) -> Ret {
        let (kind, counted, result) = match decode(a) {
            Ok(call) => {
                let (k, counted, r) = self.execute(call);
                (Some(k), counted, r)
            }
            // A known call with bad arguments counts as that call; a number of the block
            // that names no call counts as unknown.
            Err(s) => {
                let k = usize::try_from(a.nr.wrapping_sub(pv::BASE)).ok().filter(|k| *k < CALL_NAMES.len());
                (k, false, Err(s))
            }
        };
        let status = match &result {
            Ok(_) => Status::Success,
            Err(s) => *s,
        };
        if !counted {
            self.stats.record(kind, status);
        }
        if status == Status::InvalidArgument
            && let Some(kill) = &self.kill
        {
            kill(&format!("paravirtual DMA call {:#x} with invalid arguments {:x?}", a.nr, a.a));
        }
        match result {
            Ok(r) => r,
            Err(s) => Ret::err(s),
        }
    }

    /// Runs a decoded call; the bool says whether it was counted on a device.
    fn execute(&self, call: Call) -> (usize, bool, Result<Ret, Status>) {
        let (kind, device) = match call {
            Call::Query { device } => (0, device),
            Call::Map { device, .. } => (1, device),
            Call::MapSg { device, .. } => (2, device),
            Call::Unmap { device, .. } => (3, device),
            Call::UnmapSg { device, .. } => (4, device),
        };
        if let Call::Query { device } = call {
            let d = self.device(device);
            let granule = d.as_ref().map_or(0, |d| d.domain.granule());
            let pv = d.as_ref().is_some_and(|d| d.paravirtual);
            let r = Ret::ok(u64::from(pv), granule, pv::MAX_SG);
            return match d {
                Some(d) => {
                    d.state.lock().unwrap_or_else(|e| e.into_inner()).stats.record(0, Status::Success);
                    (0, true, Ok(r))
                }
                None => (0, false, Ok(r)),
            };
        }
        let devices = self.devices.read().unwrap_or_else(|e| e.into_inner());
        let Some(d) = devices.get(&device).filter(|d| d.paravirtual) else {
            return (kind, false, Err(Status::NotAssigned));
        };
        let mut st = d.state.lock().unwrap_or_else(|e| e.into_inner());
        let r = match call {
            Call::Map { gpa, len, perm, .. } => {
                self.map_one(d, &mut st, gpa, len, perm).map(|iova| Ret::ok(iova, 0, 0))
            }
            Call::MapSg { list, count, perm, .. } => {
                self.map_sg(d, &mut st, list, count, perm).map(|n| Ret::ok(n, 0, 0))
            }
            Call::Unmap { iova, len, .. } => self.unmap_one(d, &mut st, iova, len).map(|()| Ret::ok(0, 0, 0)),
            Call::UnmapSg { list, count, .. } => self.unmap_sg(d, &mut st, list, count).map(|n| Ret::ok(n, 0, 0)),
            Call::Query { .. } => Err(Status::Internal),
        };
        st.stats.record(kind, if let Err(e) = &r { *e } else { Status::Success });
        (kind, true, r)
    }

    /// Maps the granules covering `[gpa, gpa + len)`; returns the IOVA of `gpa`.
    fn map_one(&self, d: &PvDevice, st: &mut DevState, gpa: u64, len: u64, perm: Perm) -> Result<u64, Status> {
        let g = d.domain.granule();
        let start = gpa - gpa % g;
        let end = gpa.checked_add(len).and_then(|e| e.checked_next_multiple_of(g)).ok_or(Status::InvalidArgument)?;
        let size = end - start;
        let (iova, taken) = st.alloc.alloc(size).ok_or(Status::NoIovaSpace)?;
        if let Err(e) = d.domain.map(Iova(iova), Gpa(start), size, perm) {
            st.alloc.free(iova, taken);
            return Err(status_of(&e));
        }
        st.stats.pages.0 = st.stats.pages.0.wrapping_add(size / g);
        Ok(iova + (gpa - start))
    }

    /// Unmaps what one MAP of `(iova, len)` mapped. Nothing mapped there (never, or
    /// not any more) is `NotFound`: a stale unmap is not misuse. A mapping there whose
    /// extent differs from `(iova, len)` is `InvalidArgument`.
    fn unmap_one(&self, d: &PvDevice, st: &mut DevState, iova: u64, len: u64) -> Result<(), Status> {
        let g = d.domain.granule();
        let start = iova - iova % g;
        let end = iova.checked_add(len).and_then(|e| e.checked_next_multiple_of(g)).ok_or(Status::InvalidArgument)?;
        let m = d.domain.lookup(Iova(start)).ok_or(Status::NotFound)?;
        if m.iova.0 != start || end - start != m.size {
            return Err(Status::InvalidArgument);
        }
        d.domain.unmap(Iova(start), m.size).map_err(|e| status_of(&e))?;
        st.alloc.free(start, st.alloc.rounded(m.size));
        st.stats.pages.1 = st.stats.pages.1.wrapping_add(m.size / g);
        Ok(())
    }

    fn read_list(&self, list: u64, count: u64) -> Result<Vec<SgEntry>, Status> {
        let bytes = usize::try_from(count * pv::SG_ENTRY_SIZE).map_err(|_| Status::InvalidArgument)?;
        let mut raw = vec![0u8; bytes];
        self.memory.read_slice(&mut raw, GuestAddress(list)).map_err(|_| Status::InvalidArgument)?;
        Ok(parse_sg(&raw))
    }

    /// All or nothing, in one batch: every IOVA is allocated first, then the domain maps
    /// the whole list under one lock with one locked-memory charge.
    fn map_sg(&self, d: &PvDevice, st: &mut DevState, list: u64, count: u64, perm: Perm) -> Result<u64, Status> {
        let mut entries = self.read_list(list, count)?;
        let g = d.domain.granule();
        let mut maps = Vec::with_capacity(entries.len());
        let mut taken = Vec::with_capacity(entries.len());
        let mut failure = None;
        for e in &entries {
            let extent = check_len(e.len).and_then(|len| {
                let start = e.addr - e.addr % g;
                let end = e.addr.checked_add(len).and_then(|x| x.checked_next_multiple_of(g));
                end.map(|end| (start, end - start)).ok_or(Status::InvalidArgument)
            });
            match extent
                .and_then(|(start, size)| st.alloc.alloc(size).map(|a| (start, size, a)).ok_or(Status::NoIovaSpace))
            {
                Ok((start, size, (iova, t))) => {
                    maps.push(dma::Mapping { iova: Iova(iova), gpa: Gpa(start), size, perm });
                    taken.push(t);
                }
                Err(s) => {
                    failure = Some(s);
                    break;
                }
            }
        }
        if failure.is_none()
            && let Err((_, e)) = d.domain.map_many(&maps)
        {
            failure = Some(status_of(&e));
        }
        if let Some(s) = failure {
            for (m, t) in maps.iter().zip(&taken) {
                st.alloc.free(m.iova.0, *t);
            }
            return Err(s);
        }
        let mut out = Vec::with_capacity(entries.len() * pv::SG_ENTRY_SIZE as usize);
        for (e, m) in entries.iter_mut().zip(&maps) {
            e.addr = m.iova.0 + (e.addr - m.gpa.0);
            out.extend_from_slice(&e.addr.to_le_bytes());
            out.extend_from_slice(&e.len.to_le_bytes());
        }
        if self.memory.write_slice(&out, GuestAddress(list)).is_err() {
            let iovas: Vec<Iova> = maps.iter().map(|m| m.iova).collect();
            d.domain.unmap_exact(&iovas);
            for (m, t) in maps.iter().zip(&taken) {
                st.alloc.free(m.iova.0, *t);
            }
            return Err(Status::InvalidArgument);
        }
        st.stats.pages.0 = st.stats.pages.0.wrapping_add(maps.iter().map(|m| m.size / g).sum::<u64>());
        Ok(count)
    }

    /// Unmaps the entries that name a live mapping exactly, in one batch. A malformed
    /// entry makes the status `InvalidArgument`, else an entry naming nothing mapped
    /// (or named twice) makes it `NotFound`; either way the good entries are unmapped.
    fn unmap_sg(&self, d: &PvDevice, st: &mut DevState, list: u64, count: u64) -> Result<u64, Status> {
        let entries = self.read_list(list, count)?;
        let g = d.domain.granule();
        let mut valid: Vec<(Iova, u64)> = Vec::with_capacity(entries.len());
        let (mut bad, mut stale) = (false, false);
        let mut seen = std::collections::HashSet::with_capacity(entries.len());
        for e in &entries {
            let start = e.addr - e.addr % g;
            let end = check_len(e.len)
                .ok()
                .and_then(|len| e.addr.checked_add(len))
                .and_then(|x| x.checked_next_multiple_of(g));
            match (end, d.domain.lookup(Iova(start))) {
                (None, _) => bad = true,
                (Some(_), None) => stale = true,
                (Some(end), Some(m)) if m.iova.0 == start && end - start == m.size => {
                    if seen.insert(start) {
                        valid.push((m.iova, m.size));
                    } else {
                        stale = true; // gone with its first naming
                    }
                }
                (Some(_), Some(_)) => bad = true,
            }
        }
        let iovas: Vec<Iova> = valid.iter().map(|v| v.0).collect();
        d.domain.unmap_exact(&iovas);
        for (i, size) in &valid {
            st.alloc.free(i.0, st.alloc.rounded(*size));
            st.stats.pages.1 = st.stats.pages.1.wrapping_add(size / g);
        }
        if bad {
            Err(Status::InvalidArgument)
        } else if stale {
            Err(Status::NotFound)
        } else {
            Ok(valid.len() as u64)
        }
    }
}

/// `dma=pvdma`.
pub const REGISTRATION: crate::frontend::Registration = crate::frontend::Registration {
    name: "pvdma",
    help: "the guest maps its own DMA through paravirtual DMA hypercalls",
    build: |ctx| {
        let f = Arc::new(PvDmaFrontend::new(ctx));
        ctx.hypercalls
            .register(pv::BASE, Arc::clone(&f) as Arc<dyn vm_api::HypercallHandler>)
            .map_err(|e| crate::frontend::FrontendError::Build(e.to_string()))?;
        Ok(f as Arc<dyn crate::frontend::Frontend>)
    },
    params: &[],
    tools: &[],
};

/// Paravirtual DMA as a VM's front-end: each device gets a domain of its own, which
/// the guest's MAP and UNMAP calls program.
pub struct PvDmaFrontend {
    pvdma: PvDma,
    dma: Arc<dma::VmDma>,
}

impl PvDmaFrontend {
    /// The front-end for the VM of `ctx` (its hypercall block is registered by
    /// [`REGISTRATION`]).
    pub fn new(ctx: &crate::frontend::Context) -> PvDmaFrontend {
        let kill = ctx.kill_on_misuse.clone().map(|k| Box::new(move |why: &str| k(why)) as KillHook);
        PvDmaFrontend { pvdma: PvDma::new(Arc::clone(&ctx.memory), kill), dma: Arc::clone(&ctx.dma) }
    }

    /// The calls' state.
    pub fn pvdma(&self) -> &PvDma {
        &self.pvdma
    }
}

impl vm_api::HypercallHandler for PvDmaFrontend {
    fn name(&self) -> &str {
        "pvdma"
    }

    fn call(&self, args: &Args) -> Ret {
        self.pvdma.call(args)
    }
}

impl crate::frontend::Frontend for PvDmaFrontend {
    fn name(&self) -> &'static str {
        REGISTRATION.name
    }

    fn attach(&self, device: &crate::frontend::Device) -> Result<(), crate::frontend::FrontendError> {
        let domain = self.dma.create_domain(&device.name, dma::DomainConfig::default());
        device
            .endpoint
            .attach(Some(Arc::clone(&domain)))
            .map_err(|e| crate::frontend::FrontendError::Refused(e.to_string()))?;
        self.pvdma.add_device(u64::from(device.id), &device.name, domain, true);
        Ok(())
    }

    fn detach(&self, id: u16) {
        self.pvdma.remove_device(u64::from(id));
    }

    fn stats(&self) -> crate::frontend::Stats {
        self.pvdma.stats().to_stats()
    }

    fn device_stats(&self, id: u16) -> Option<crate::frontend::Stats> {
        self.pvdma.device(u64::from(id)).map(|d| d.stats().to_stats().gauge("live_mappings", d.live_mappings() as u64))
    }

    fn state(&self) -> Option<&dyn vm_api::Snapshottable> {
        Some(self)
    }
}

impl vm_api::Snapshottable for PvDmaFrontend {
    fn id(&self) -> String {
        format!("frontend/{}", REGISTRATION.name)
    }

    fn save(&self) -> Result<Option<vm_api::Section>, vm_api::ComponentError> {
        let ids: Vec<u64> = {
            let mut v: Vec<u64> =
                self.pvdma.devices.read().unwrap_or_else(|e| e.into_inner()).keys().copied().collect();
            v.sort_unstable();
            v
        };
        let devices = ids.into_iter().filter_map(|id| self.pvdma.save_device(id)).collect();
        vm_api::Section::new(&self.id(), STATE_VERSION, &SavedState { devices }).map(Some)
    }

    fn restore(&self, section: &vm_api::Section) -> Result<(), vm_api::ComponentError> {
        let state: SavedState = section.read(&self.id(), STATE_VERSION)?;
        for d in &state.devices {
            self.pvdma
                .restore_device(d.id, d)
                .map_err(|e| vm_api::ComponentError::new(self.id(), format!("device {:#x}: {e}", d.id)))?;
        }
        Ok(())
    }
}
