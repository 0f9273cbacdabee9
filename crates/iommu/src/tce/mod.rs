//! TCE tables: the PAPR IOMMU as a passthru front-end (`dma=tce`, calls and codes in
//! `abi::tce`).
//!
//! Devices are grouped (`--device ...,dma=tce,group=N`; one group per device by
//! default). A group's devices share a domain; each of the group's windows (a default
//! 32-bit one at bus offset 0, at most one more created at run time) is a [`Table`] of
//! TCEs whose valid entries are the domain's mappings, one per IOMMU page, at
//! IOVA = bus offset + index << page shift. A table can back windows of several groups
//! (CREATE naming an existing liobn): a put through any liobn reaches every group's
//! domain before the call returns; the table's memory is held once and freed with its
//! last window.
//!
//! Every call is validated as Linux's book3s_64_vio.c does, with PAPR's codes and no
//! H_TOO_HARD (passthru is the only handler): an unknown liobn, an IOBA misaligned or
//! outside the window (the whole run for INDIRECT and STUFF, with checked arithmetic),
//! an entry with READ or WRITE pointing outside guest memory or misaligned, a list too
//! long or misaligned -> H_PARAMETER; table memory or pins over the locked-memory limit
//! -> H_RESOURCE with nothing changed. INDIRECT is all or nothing. STUFF only clears.

pub mod table;
mod tool;

use crate::frontend::Registration;
use crate::frontend::{
    Answer, Context, Device, FailDevice, Frontend, FrontendError, Queries, Query, Stats, fail_later,
};
use abi::hcall::{Args, Ret};
use abi::tce as t;
use dma::{Domain, DomainConfig, Endpoint, Gpa, Iova, Mapping, PageSizes, Perm, VmDma};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use table::Table;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// `dma=tce`.
pub const REGISTRATION: Registration = Registration {
    name: "tce",
    help: "PAPR TCE tables: per-group DMA windows the guest programs by hypercalls (options group=N, window=SIZE, page=SIZE)",
    build: |ctx| {
        let f = Arc::new(Tce::new(ctx));
        ctx.hypercalls
            .register(t::BASE, Arc::clone(&f) as Arc<dyn vm_api::HypercallHandler>)
            .map_err(|e| FrontendError::Build(e.to_string()))?;
        Ok(f as Arc<dyn Frontend>)
    },
    params: &["group", "window", "page"],
    tools: &[tool::TABLE],
};

/// A table and the windows (liobns) that use it.
struct Shared {
    table: Table,
    page_shift: u32,
    window_shift: u32,
    windows: BTreeSet<u32>,
}

struct Window {
    group: u32,
    bus_offset: u64,
    table: Arc<Mutex<Shared>>,
}

struct Group {
    domain: Arc<Domain>,
    /// Its devices, with how to fail each (a domain that cannot agree with its table).
    devices: BTreeMap<u16, (Endpoint, FailDevice)>,
    windows: Vec<u32>,
    /// The default window's (page shift, window shift).
    default: (u32, u32),
    /// The default window's liobn: kept across RESET (on POWER the device tree names
    /// it, and guests cache it).
    default_liobn: u32,
}

#[derive(Default)]
struct State {
    groups: BTreeMap<u32, Group>,
    devices: BTreeMap<u16, u32>,
    windows: BTreeMap<u32, Window>,
    next_liobn: u32,
}

/// Call names for the counters, by call number offset.
const CALLS: [&str; 10] = [
    "put_tce",
    "get_tce",
    "put_tce_indirect",
    "stuff_tce",
    "query_window",
    "create_window",
    "remove_window",
    "reset_windows",
    "device_group",
    "query_page_sizes",
];

/// Calls and their failures, counted.
#[derive(Default)]
struct Counters {
    calls: [AtomicU64; 10],
    parameter: AtomicU64,
    resource: AtomicU64,
    hardware: AtomicU64,
}

/// The TCE front-end of one VM.
pub struct Tce {
    dma: Arc<VmDma>,
    memory: Arc<GuestMemoryMmap>,
    /// A fair lock: a long guest call (STUFF) hands it to a waiting control-path
    /// caller between leaf pages instead of starving it.
    state: parking_lot::Mutex<State>,
    stats: Counters,
}

/// A PAPR outcome: the code and up to two results.
type Out = Result<(u64, u64), i64>;

fn perm_of(tce: u64) -> Perm {
    match (tce & t::READ != 0, tce & t::WRITE != 0) {
        (true, true) => Perm::READ_WRITE,
        (true, false) => Perm::READ,
        (false, true) => Perm::WRITE,
        (false, false) => Perm::NONE,
    }
}

fn valid(tce: u64) -> bool {
    tce & (t::READ | t::WRITE) != 0
}

/// The entry a table holds for `tce`: a clearing value (neither READ nor WRITE) is
/// stored as 0, so a clear never needs table memory (see `abi::tce::PUT_TCE`).
fn stored(tce: u64) -> u64 {
    if valid(tce) { tce } else { 0 }
}

/// The entry a domain's mapping at `iova` stands for (0: none starts there).
fn entry_in(domain: &Domain, iova: u64) -> u64 {
    match domain.lookup(Iova(iova)) {
        Some(m) if m.iova.0 == iova => m.gpa.0 | u64::from(m.perm.bits()),
        _ => 0,
    }
}

impl Tce {
    /// The front-end for the VM of `ctx` (its hypercall block registered by
    /// [`REGISTRATION`]).
    pub fn new(ctx: &Context) -> Tce {
        Tce {
            dma: Arc::clone(&ctx.dma),
            memory: Arc::clone(&ctx.memory),
            state: parking_lot::Mutex::new(State { next_liobn: 0x1000, ..State::default() }),
            stats: Counters::default(),
        }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, State> {
        self.state.lock()
    }

    /// The file of the table behind `liobn` (for mmap; layout in `abi::tce::layout`) and
    /// its entry bits.
    pub fn table_fd(&self, liobn: u32) -> Option<(Arc<std::fs::File>, u32)> {
        let st = self.lock();
        let w = st.windows.get(&liobn)?;
        let s = w.table.lock().unwrap_or_else(|e| e.into_inner());
        Some((Arc::clone(s.table.fd()), s.window_shift - s.page_shift))
    }

    fn domain_config() -> DomainConfig {
        DomainConfig {
            page_sizes: PageSizes::new(PageSizes::SZ_4K | PageSizes::SZ_64K | PageSizes::SZ_2M | PageSizes::SZ_16M)
                .unwrap_or(PageSizes::x86()),
            aperture_bits: 63,
            max_mappings: 1 << 24,
            ..DomainConfig::default()
        }
    }

    /// Adds a window of `2^window_shift` bytes in pages of `2^page_shift` to `group`,
    /// on a new table or on `alias`'s. Returns (liobn, bus offset).
    fn add_window(&self, st: &mut State, group: u32, page_shift: u32, window_shift: u32, alias: Option<u32>) -> Out {
        self.add_window_as(st, group, page_shift, window_shift, alias, None)
    }

    /// As `add_window`, with the liobn and bus offset given (a restore) rather than the
    /// next liobn and the offset of the group's next window.
    fn add_window_as(
        &self,
        st: &mut State,
        group: u32,
        page_shift: u32,
        window_shift: u32,
        alias: Option<u32>,
        given: Option<(u32, u64)>,
    ) -> Out {
        if given.is_some_and(|(l, b)| st.windows.contains_key(&l) || (b != 0 && b != t::WINDOW64_OFFSET)) {
            return Err(t::H_PARAMETER);
        }
        let supported = [12, 16, 21, 24];
        if !supported.contains(&page_shift) || window_shift < page_shift || window_shift > t::MAX_WINDOW_SHIFT {
            return Err(t::H_PARAMETER);
        }
        if window_shift - page_shift > table::MAX_ENTRY_BITS {
            return Err(t::H_PARAMETER);
        }
        let g = st.groups.get(&group).ok_or(t::H_PARAMETER)?;
        if g.windows.len() as u64 >= t::MAX_WINDOWS {
            return Err(t::H_HARDWARE);
        }
        let bus_offset = match given {
            Some((_, b)) => b,
            None if g.windows.is_empty() => 0,
            None => t::WINDOW64_OFFSET,
        };
        let domain = Arc::clone(&g.domain);
        let shared = match alias {
            Some(l) => {
                let w = st.windows.get(&l).ok_or(t::H_PARAMETER)?;
                let s = w.table.lock().unwrap_or_else(|e| e.into_inner());
                if (s.page_shift, s.window_shift) != (page_shift, window_shift) {
                    return Err(t::H_PARAMETER);
                }
                // The new group's domain gets every entry the table already holds.
                let maps: Vec<Mapping> = s
                    .table
                    .valid()
                    .into_iter()
                    .filter(|(_, v)| valid(*v))
                    .map(|(i, v)| Mapping {
                        iova: Iova(bus_offset + (i << page_shift)),
                        gpa: Gpa(v & !((1 << page_shift) - 1)),
                        size: 1 << page_shift,
                        perm: perm_of(v),
                    })
                    .collect();
                drop(s);
                if !maps.is_empty() {
                    domain.map_many(&maps).map_err(|_| t::H_RESOURCE)?;
                }
                Arc::clone(&w.table)
            }
            None => {
                let table = Table::new(window_shift - page_shift, Arc::clone(&self.dma)).map_err(|e| match e {
                    table::TableError::NoMemory(_) => t::H_RESOURCE,
                    table::TableError::TooLarge(_) => t::H_PARAMETER,
                    table::TableError::Host(_) => t::H_HARDWARE,
                })?;
                Arc::new(Mutex::new(Shared { table, page_shift, window_shift, windows: BTreeSet::new() }))
            }
        };
        let liobn = given.map_or(st.next_liobn, |(l, _)| l);
        st.next_liobn = st.next_liobn.max(liobn.saturating_add(1));
        shared.lock().unwrap_or_else(|e| e.into_inner()).windows.insert(liobn);
        st.windows.insert(liobn, Window { group, bus_offset, table: shared });
        if let Some(g) = st.groups.get_mut(&group) {
            g.windows.push(liobn);
        }
        Ok((u64::from(liobn), bus_offset))
    }

    /// Removes window `liobn`: its entries leave its group's domain (devices let go
    /// before this returns); its table goes with its last window.
    fn remove_window(&self, st: &mut State, liobn: u32) -> Out {
        let w = st.windows.remove(&liobn).ok_or(t::H_PARAMETER)?;
        let mut s = w.table.lock().unwrap_or_else(|e| e.into_inner());
        s.windows.remove(&liobn);
        if let Some(g) = st.groups.get_mut(&w.group) {
            g.windows.retain(|l| *l != liobn);
            let iovas: Vec<Iova> = s
                .table
                .valid()
                .into_iter()
                .filter(|(_, v)| valid(*v))
                .map(|(i, _)| Iova(w.bus_offset + (i << s.page_shift)))
                .collect();
            g.domain.unmap_exact(&iovas);
        }
        Ok((0, 0))
    }

    /// Every (group, its domain, bus offset) a table's entries reach.
    fn targets(st: &State, s: &Shared) -> Vec<(u32, Arc<Domain>, u64)> {
        s.windows
            .iter()
            .filter_map(|l| st.windows.get(l))
            .filter_map(|w| st.groups.get(&w.group).map(|g| (w.group, Arc::clone(&g.domain), w.bus_offset)))
            .collect()
    }

    /// Sets entries `first..` of the table behind `liobn` to `values`, all or nothing:
    /// exactly the table pages the call needs charged first, then every group domain
    /// updated (the changed entries' old mappings replaced by the new ones as one step
    /// each), then the table. A clearing value is stored as 0 and never fails for
    /// memory.
    ///
    /// If a domain refuses, the domains already changed are put back and the table
    /// follows the domain that refused: the old entries, or no entry where a device
    /// refused the new mappings after the old ones had left it (as the kernel clears an
    /// entry whose map failed). A group whose domain still disagrees with the table is
    /// failed (its devices are surprise-removed): a mapping the guest believes gone
    /// must not stay reachable.
    fn put(&self, st: &State, liobn: u32, first: u64, values: &[u64]) -> Out {
        let w = st.windows.get(&liobn).ok_or(t::H_PARAMETER)?;
        let mut s = w.table.lock().unwrap_or_else(|e| e.into_inner());
        let ps = s.page_shift;
        let page = 1u64 << ps;
        let addr = |v: &u64| v & !(t::READ | t::WRITE);
        if values.iter().any(|v| valid(*v) && !addr(v).is_multiple_of(page))
            || self.dma.first_not_guest_memory(values.iter().filter(|v| valid(**v)).map(|v| (addr(v), page))).is_some()
        {
            return Err(t::H_PARAMETER);
        }
        let values: Vec<u64> = values.iter().map(|v| stored(*v)).collect();
        let mut old = vec![0u64; values.len()];
        s.table.get_run(first, &mut old);
        let changed: Vec<usize> = (0..values.len()).filter(|&k| old[k] != values[k]).collect();
        if changed.is_empty() {
            return Ok((0, 0));
        }
        let need = s.table.pages_needed(first, &values);
        s.table.reserve(need).map_err(|_| t::H_RESOURCE)?;
        let iova = |bus: u64, k: usize| bus + ((first + k as u64) << ps);
        let maps = |bus: u64, vals: &[u64]| -> Vec<Mapping> {
            changed
                .iter()
                .filter(|&&k| valid(vals[k]))
                .map(|&k| Mapping {
                    iova: Iova(iova(bus, k)),
                    gpa: Gpa(addr(&vals[k])),
                    size: page,
                    perm: perm_of(vals[k]),
                })
                .collect()
        };
        let iovas = |bus: u64, vals: &[u64]| -> Vec<Iova> {
            changed.iter().filter(|&&k| valid(vals[k])).map(|&k| Iova(iova(bus, k))).collect()
        };
        let targets = Self::targets(st, &s);
        let failed = targets
            .iter()
            .enumerate()
            .find_map(|(n, (_, d, bus))| d.replace(&iovas(*bus, &old), &maps(*bus, &values)).err().map(|e| (n, e)));
        let Some((n, e)) = failed else {
            if let Err(e) = s.table.set_run(first, &values) {
                tracing::error!("TCE table of liobn {liobn:#x}: {e} despite the reservation");
            }
            s.table.release_reserve();
            return Ok((0, 0));
        };
        tracing::debug!("TCE put on liobn {liobn:#x}: {e}");
        for (_, d, bus) in &targets[..n] {
            if let Err(e) = d.replace(&iovas(*bus, &values), &maps(*bus, &old)) {
                tracing::warn!("TCE put on liobn {liobn:#x}: putting a domain back: {e}");
            }
        }
        let mut truth = old;
        if e.lost_old {
            let (_, d, bus) = &targets[n];
            for &k in &changed {
                truth[k] = entry_in(d, iova(*bus, k));
            }
            // Only clears: no table page needed.
            if let Err(e) = s.table.set_run(first, &truth) {
                tracing::error!("TCE table of liobn {liobn:#x}: {e}");
            }
        }
        s.table.release_reserve();
        // Every other domain drops what the table no longer holds (an unmap never fails).
        let cleared: Vec<usize> = changed.iter().copied().filter(|&k| truth[k] == 0).collect();
        if !cleared.is_empty() {
            for (k, (_, d, bus)) in targets.iter().enumerate() {
                if k != n {
                    d.unmap_exact(&cleared.iter().map(|&c| Iova(iova(*bus, c))).collect::<Vec<_>>());
                }
            }
        }
        let broken: Vec<u32> = targets
            .iter()
            .filter(|(_, d, bus)| changed.iter().any(|&k| entry_in(d, iova(*bus, k)) != truth[k]))
            .map(|(g, _, _)| *g)
            .collect();
        if !broken.is_empty() {
            let hooks: Vec<FailDevice> = broken
                .iter()
                .filter_map(|g| st.groups.get(g))
                .flat_map(|g| g.devices.values().map(|(_, f)| Arc::clone(f)))
                .collect();
            let why = format!("its TCE group's DMA domain could not follow liobn {liobn:#x}'s table ({})", e.error);
            tracing::error!("{why}: groups {broken:?} failed");
            fail_later(hooks, why);
        }
        Err(t::H_RESOURCE)
    }

    /// The entry index of `ioba` in `liobn`'s window, checking `count` entries fit.
    fn index(st: &State, liobn: u64, ioba: u64, count: u64) -> Result<(u32, u64), i64> {
        let liobn = u32::try_from(liobn).map_err(|_| t::H_PARAMETER)?;
        let w = st.windows.get(&liobn).ok_or(t::H_PARAMETER)?;
        let s = w.table.lock().unwrap_or_else(|e| e.into_inner());
        let page = 1u64 << s.page_shift;
        if !ioba.is_multiple_of(page) || ioba < w.bus_offset {
            return Err(t::H_PARAMETER);
        }
        let i = (ioba - w.bus_offset) >> s.page_shift;
        let end = i.checked_add(count).ok_or(t::H_PARAMETER)?;
        if count == 0 || end > s.table.entries() {
            return Err(t::H_PARAMETER);
        }
        Ok((liobn, i))
    }

    fn execute(&self, a: &Args) -> Out {
        let [x0, x1, x2, x3, _] = a.a;
        let mut st = self.lock();
        match a.nr {
            t::PUT_TCE => {
                let (liobn, i) = Self::index(&st, x0, x1, 1)?;
                self.put(&st, liobn, i, &[x2])
            }
            t::GET_TCE => {
                let (liobn, i) = Self::index(&st, x0, x1, 1)?;
                let w = st.windows.get(&liobn).ok_or(t::H_PARAMETER)?;
                let v = w.table.lock().unwrap_or_else(|e| e.into_inner()).table.get(i);
                Ok((v, 0))
            }
            t::PUT_TCE_INDIRECT => {
                if x3 == 0 || x3 > t::MAX_INDIRECT || !x2.is_multiple_of(4096) {
                    return Err(t::H_PARAMETER);
                }
                let (liobn, i) = Self::index(&st, x0, x1, x3)?;
                let mut raw = vec![0u8; (x3 * 8) as usize];
                self.memory.read_slice(&mut raw, GuestAddress(x2)).map_err(|_| t::H_PARAMETER)?;
                let values: Vec<u64> =
                    raw.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
                self.put(&st, liobn, i, &values)
            }
            t::STUFF_TCE => {
                if valid(x2) {
                    return Err(t::H_PARAMETER);
                }
                let (liobn, i) = Self::index(&st, x0, x1, x3)?;
                drop(st);
                self.clear(liobn, i, i.saturating_add(x3))
            }
            t::QUERY_WINDOW => {
                let g = st.groups.get(&u32::try_from(x0).map_err(|_| t::H_PARAMETER)?).ok_or(t::H_PARAMETER)?;
                Ok((t::MAX_WINDOWS - g.windows.len() as u64, t::LARGEST_WINDOW_PAGES))
            }
            t::QUERY_PAGE_SIZES => {
                st.groups.get(&u32::try_from(x0).map_err(|_| t::H_PARAMETER)?).ok_or(t::H_PARAMETER)?;
                Ok((t::pagesize::SZ_4K | t::pagesize::SZ_64K | t::pagesize::SZ_2M | t::pagesize::SZ_16M, 0))
            }
            t::CREATE_WINDOW => {
                let group = u32::try_from(x0).map_err(|_| t::H_PARAMETER)?;
                let (ps, ws) =
                    (u32::try_from(x1).map_err(|_| t::H_PARAMETER)?, u32::try_from(x2).map_err(|_| t::H_PARAMETER)?);
                let alias = if x3 == 0 { None } else { Some(u32::try_from(x3).map_err(|_| t::H_PARAMETER)?) };
                self.add_window(&mut st, group, ps, ws, alias)
            }
            t::REMOVE_WINDOW => self.remove_window(&mut st, u32::try_from(x0).map_err(|_| t::H_PARAMETER)?),
            t::RESET_WINDOWS => {
                let group = u32::try_from(x0).map_err(|_| t::H_PARAMETER)?;
                let windows = st.groups.get(&group).ok_or(t::H_PARAMETER)?.windows.clone();
                for l in windows {
                    self.remove_window(&mut st, l)?;
                }
                let g = st.groups.get(&group).ok_or(t::H_PARAMETER)?;
                let ((ps, ws), liobn) = (g.default, g.default_liobn);
                self.add_window_as(&mut st, group, ps, ws, None, Some((liobn, 0)))
            }
            t::DEVICE_GROUP => {
                let group = *st.devices.get(&u16::try_from(x0).map_err(|_| t::H_PARAMETER)?).ok_or(t::H_PARAMETER)?;
                let default = st.groups.get(&group).map_or(0, |g| g.default_liobn);
                Ok((u64::from(group), u64::from(default)))
            }
            _ => Err(t::H_PARAMETER),
        }
    }

    /// H_STUFF_TCE's clear of entries `from..end` of `liobn`'s window. Walks only
    /// the leaf pages present (the cost follows what is mapped, not the count), one
    /// leaf page per holding of the front-end's lock, so the control path (statistics,
    /// snapshots, hot-plug) never waits behind a long clear.
    fn clear(&self, liobn: u32, from: u64, end: u64) -> Out {
        let zeros = [0u64; table::ENTRIES as usize];
        let mut at = from;
        let mut st = self.lock();
        while at < end {
            // The window may have gone meanwhile (its group's last device unplugged).
            let w = st.windows.get(&liobn).ok_or(t::H_PARAMETER)?;
            let Some(i) = w.table.lock().unwrap_or_else(|e| e.into_inner()).table.next_present(at, end) else {
                break;
            };
            let n = (table::ENTRIES - i % table::ENTRIES).min(end - i);
            self.put(&st, liobn, i, &zeros[..n as usize])?;
            at = i + n;
            parking_lot::MutexGuard::bump(&mut st);
        }
        Ok((0, 0))
    }

    /// One hypercall of the block.
    pub fn call(&self, a: &Args) -> Ret {
        let Some(k) = a.nr.checked_sub(t::BASE).filter(|k| (*k as usize) < CALLS.len()) else {
            return Ret::err(abi::hcall::Status::UnknownCall);
        };
        self.stats.calls[k as usize].fetch_add(1, Ordering::Relaxed);
        match self.execute(a) {
            Ok((r1, r2)) => Ret::ok(t::H_SUCCESS as u64, r1, r2),
            Err(code) => {
                let c = match code {
                    t::H_PARAMETER => &self.stats.parameter,
                    t::H_RESOURCE => &self.stats.resource,
                    _ => &self.stats.hardware,
                };
                c.fetch_add(1, Ordering::Relaxed);
                Ret::ok(code as u64, 0, 0)
            }
        }
    }

    /// `tce_info`: the window behind `liobn`: its group, geometry, levels and pages of its
    /// table, bytes charged, valid entries, and the groups sharing the table.
    pub fn window_info(&self, liobn: u32) -> Option<Stats> {
        let st = self.lock();
        let w = st.windows.get(&liobn)?;
        let s = w.table.lock().unwrap_or_else(|e| e.into_inner());
        let groups: Vec<String> =
            s.windows.iter().filter_map(|l| st.windows.get(l)).map(|x| x.group.to_string()).collect();
        Some(
            Stats::new()
                .gauge("group", u64::from(w.group))
                .text("groups", groups.join(","))
                .text("bus_offset", format!("{:#x}", w.bus_offset))
                .gauge("page_shift", u64::from(s.page_shift))
                .gauge("window_shift", u64::from(s.window_shift))
                .gauge("levels", u64::from(s.table.levels()))
                .gauge("pages", s.table.pages())
                .gauge("bytes", s.table.bytes())
                .gauge("valid", s.table.valid_entries()),
        )
    }
}

impl Tce {
    /// Gives group `from` the number `to` (free): its devices and windows follow.
    fn renumber(st: &mut State, from: u32, to: u32) {
        let Some(g) = st.groups.remove(&from) else { return };
        for id in g.devices.keys() {
            st.devices.insert(*id, to);
        }
        for l in &g.windows {
            if let Some(w) = st.windows.get_mut(l) {
                w.group = to;
            }
        }
        st.groups.insert(to, g);
    }
}

/// "1G", "64K", "4096" -> bytes.
fn parse_size(v: &str) -> Option<u64> {
    let (digits, shift) = match v.chars().last()? {
        'K' | 'k' => (&v[..v.len() - 1], 10),
        'M' | 'm' => (&v[..v.len() - 1], 20),
        'G' | 'g' => (&v[..v.len() - 1], 30),
        _ => (v, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

impl vm_api::HypercallHandler for Tce {
    fn name(&self) -> &str {
        "tce"
    }

    fn call(&self, args: &Args) -> Ret {
        Tce::call(self, args)
    }
}

impl Frontend for Tce {
    fn name(&self) -> &'static str {
        REGISTRATION.name
    }

    fn attach(&self, device: &Device) -> Result<(), FrontendError> {
        self.attach_inner(device).map_err(FrontendError::Refused)
    }

    fn detach(&self, id: u16) {
        let mut st = self.lock();
        let Some(group) = st.devices.remove(&id) else { return };
        let empty = st.groups.get_mut(&group).is_some_and(|g| {
            g.devices.remove(&id);
            g.devices.is_empty()
        });
        if empty {
            let windows = st.groups.get(&group).map(|g| g.windows.clone()).unwrap_or_default();
            for l in windows {
                let _ = self.remove_window(&mut st, l);
            }
            st.groups.remove(&group);
        }
    }

    fn stats(&self) -> Stats {
        let s = &self.stats;
        let st = self.lock();
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = Stats::new();
        for (name, c) in CALLS.iter().zip(&s.calls) {
            out = out.total(name, n(c));
        }
        out.total("h_parameter", n(&s.parameter))
            .total("h_resource", n(&s.resource))
            .total("h_hardware", n(&s.hardware))
            .gauge("groups", st.groups.len() as u64)
            .gauge("windows", st.windows.len() as u64)
    }

    fn device_stats(&self, id: u16) -> Option<Stats> {
        let st = self.lock();
        let group = *st.devices.get(&id)?;
        let g = st.groups.get(&group)?;
        let liobns: Vec<String> = g.windows.iter().map(|l| format!("{l:#x}")).collect();
        Some(
            Stats::new()
                .gauge("group", u64::from(group))
                .text("liobns", liobns.join(","))
                .gauge("mappings", g.domain.mapping_count() as u64),
        )
    }

    fn state(&self) -> Option<&dyn vm_api::Snapshottable> {
        Some(self)
    }

    fn queries(&self) -> Option<&dyn Queries> {
        Some(self)
    }
}

/// The TCE front-end's queries.
const QUERIES: &[Query] = &[
    Query {
        name: "info",
        help: "LIOBN: the window's group, groups sharing its table, geometry, levels, table pages and bytes, valid entries",
    },
    Query {
        name: "table",
        help: "LIOBN: the table's geometry and its file (a memfd, read-only) to map and walk by abi::tce::layout",
    },
];

impl Queries for Tce {
    fn list(&self) -> &'static [Query] {
        QUERIES
    }

    fn query(&self, query: &str, arg: &str) -> Result<Answer, FrontendError> {
        let liobn = parse_liobn(arg).ok_or_else(|| FrontendError::Invalid(format!("'{arg}' is not a liobn")))?;
        let none = || FrontendError::NotFound(format!("no TCE window with liobn {liobn:#x} (see vm.info)"));
        match query {
            "info" => self.window_info(liobn).map(|fields| Answer { fields, files: Vec::new() }).ok_or_else(none),
            "table" => {
                let st = self.lock();
                let w = st.windows.get(&liobn).ok_or_else(none)?;
                let s = w.table.lock().unwrap_or_else(|e| e.into_inner());
                let fields = Stats::new()
                    .gauge("liobn", u64::from(liobn))
                    .gauge("group", u64::from(w.group))
                    .text("bus_offset", format!("{:#x}", w.bus_offset))
                    .gauge("page_shift", u64::from(s.page_shift))
                    .gauge("entry_bits", u64::from(s.window_shift - s.page_shift))
                    .gauge("levels", u64::from(s.table.levels()))
                    .text("layout", tool::LAYOUT);
                Ok(Answer { fields, files: vec![Arc::clone(s.table.fd())] })
            }
            _ => Err(FrontendError::NotFound(format!(
                "the TCE front-end answers no query '{query}' (it answers info, table)"
            ))),
        }
    }
}

/// One window of a group in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedWindow {
    /// Its liobn.
    pub liobn: u32,
    /// Its bus offset.
    pub bus_offset: u64,
    /// log2 of its IOMMU page size.
    pub page_shift: u32,
    /// log2 of its size.
    pub window_shift: u32,
    /// Other windows (liobns) sharing its table.
    pub shared_with: Vec<u32>,
    /// Its valid entries: (index, TCE).
    pub entries: Vec<(u64, u64)>,
}

/// One group in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedGroup {
    /// Its number.
    pub group: u32,
    /// Its devices' requester ids.
    pub devices: Vec<u16>,
    /// The default window's liobn (kept across RESET).
    pub default_liobn: u32,
    /// Its windows.
    pub windows: Vec<SavedWindow>,
}

/// The TCE front-end's state in a snapshot (version [`STATE_VERSION`]): every group,
/// its windows and their tables' valid entries.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedState {
    /// By group number.
    pub groups: Vec<SavedGroup>,
}

/// The format version of [`SavedState`].
pub const STATE_VERSION: u32 = 1;

impl vm_api::Snapshottable for Tce {
    fn id(&self) -> String {
        format!("frontend/{}", REGISTRATION.name)
    }

    fn save(&self) -> Result<Option<vm_api::Section>, vm_api::ComponentError> {
        let bad = |why: &str| vm_api::ComponentError::new(self.id(), why);
        let st = self.lock();
        let mut groups = Vec::new();
        for (&group, g) in &st.groups {
            let mut windows = Vec::new();
            for l in &g.windows {
                let w = st.windows.get(l).ok_or_else(|| bad("a window of a group is gone"))?;
                let sh = w.table.lock().unwrap_or_else(|e| e.into_inner());
                windows.push(SavedWindow {
                    liobn: *l,
                    bus_offset: w.bus_offset,
                    page_shift: sh.page_shift,
                    window_shift: sh.window_shift,
                    shared_with: sh.windows.iter().copied().filter(|o| o != l).collect(),
                    entries: sh.table.valid(),
                });
            }
            groups.push(SavedGroup {
                group,
                devices: g.devices.keys().copied().collect(),
                default_liobn: g.default_liobn,
                windows,
            });
        }
        vm_api::Section::new(&self.id(), STATE_VERSION, &SavedState { groups }).map(Some)
    }

    /// Puts every group back as saved, its devices attached again: the same group
    /// numbers, liobns, bus offsets and geometry, tables shared again, entries put
    /// (pinned and mapped for every group using the table).
    fn restore(&self, section: &vm_api::Section) -> Result<(), vm_api::ComponentError> {
        let state: SavedState = section.read(&self.id(), STATE_VERSION)?;
        let mut st = self.lock();
        self.restore_groups(&mut st, &state).map_err(|e| vm_api::ComponentError::new(self.id(), e))
    }
}

impl Tce {
    /// Puts `device` in its group (made, with its default window, if new).
    fn attach_inner(&self, device: &Device) -> Result<(), String> {
        let mut st = self.lock();
        let group = match device.params.iter().find(|(k, _)| k == "group") {
            Some((_, v)) => match v.parse::<u32>() {
                Ok(g) if g < t::AUTO_GROUP_BASE => g,
                _ => {
                    return Err(format!(
                        "group={v}: a group is a number from 0 to {} (larger ones are given to devices that name none)",
                        t::AUTO_GROUP_BASE - 1
                    ));
                }
            },
            // One group per device by default: the first number free above every group
            // an operator can name.
            None => (t::AUTO_GROUP_BASE..=u32::MAX)
                .find(|g| !st.groups.contains_key(g))
                .ok_or("no TCE group number left")?,
        };
        let size = |key: &str, default: u32| -> Result<u32, String> {
            match device.params.iter().find(|(k, _)| k == key) {
                None => Ok(default),
                Some((_, v)) => {
                    let bytes = parse_size(v).ok_or_else(|| format!("{key}={v}: write a size, e.g. 1G or 64K"))?;
                    if !bytes.is_power_of_two() {
                        return Err(format!("{key}={v}: the size must be a power of two"));
                    }
                    Ok(bytes.trailing_zeros())
                }
            }
        };
        let default = (size("page", t::DEFAULT_PAGE_SHIFT)?, size("window", t::DEFAULT_WINDOW_SHIFT)?);
        if let Some((k, v)) = device.params.iter().find(|(k, _)| !["group", "window", "page"].contains(&k.as_str())) {
            return Err(format!("{k}={v} is not an option of dma=tce (it takes group=N, window=SIZE, page=SIZE)"));
        }
        if let Some(g) = st.groups.get(&group)
            && g.default != default
            && device.params.iter().any(|(k, _)| k == "window" || k == "page")
        {
            return Err(format!("group {group} already has another default window geometry"));
        }
        if let std::collections::btree_map::Entry::Vacant(e) = st.groups.entry(group) {
            let domain = self.dma.create_domain(&format!("tce-group-{group}"), Self::domain_config());
            e.insert(Group { domain, devices: BTreeMap::new(), windows: Vec::new(), default, default_liobn: 0 });
            let added = self.add_window(&mut st, group, default.0, default.1, None);
            if let (Ok((liobn, _)), Some(g)) = (added, st.groups.get_mut(&group)) {
                g.default_liobn = u32::try_from(liobn).unwrap_or(0);
            }
            if let Err(code) = added {
                st.groups.remove(&group);
                let why = match code {
                    t::H_RESOURCE => "over the locked-memory limit: raise --locked-memory",
                    t::H_PARAMETER => "the page size must be 4K, 64K, 2M or 16M and the window at least a page",
                    _ => "no window available",
                };
                return Err(format!("creating group {group}'s default window: {why}"));
            }
        }
        let g = st.groups.get_mut(&group).ok_or("group vanished")?;
        device.endpoint.attach(Some(Arc::clone(&g.domain))).map_err(|e| e.to_string())?;
        g.devices.insert(device.id, (device.endpoint.clone(), Arc::clone(&device.fail)));
        st.devices.insert(device.id, group);
        Ok(())
    }

    /// [`vm_api::Snapshottable::restore`]: the groups numbered as saved first (their
    /// windows of now removed), then every saved window created and filled.
    fn restore_groups(&self, st: &mut State, state: &SavedState) -> Result<(), String> {
        for g in &state.groups {
            let first = g.devices.first().ok_or_else(|| format!("TCE group {} has no device", g.group))?;
            let now = *st.devices.get(first).ok_or_else(|| format!("device {first:#x} is not behind dma=tce"))?;
            if g.devices.iter().any(|d| st.devices.get(d) != Some(&now)) {
                return Err(format!("the devices of TCE group {} are not in one group here", g.group));
            }
            if now != g.group {
                // A group of its own (numbered as devices came and went): it takes the
                // saved number. A group the operator named must be named the same.
                let group = g.group;
                if now < t::AUTO_GROUP_BASE || group < t::AUTO_GROUP_BASE || st.groups.contains_key(&group) {
                    return Err(format!(
                        "the device is in TCE group {now} here, {group} in the snapshot{}",
                        if group < t::AUTO_GROUP_BASE { format!(" (give it group={group})") } else { String::new() }
                    ));
                }
                Self::renumber(st, now, group);
            }
            let here = st.groups.get_mut(&g.group).ok_or("TCE group missing")?;
            here.default_liobn = g.default_liobn;
            for l in here.windows.clone() {
                let _ = self.remove_window(st, l);
            }
        }
        for g in &state.groups {
            for w in &g.windows {
                let alias = w.shared_with.iter().copied().find(|o| st.windows.contains_key(o));
                let (ps, bus) = (w.page_shift, w.bus_offset);
                self.add_window_as(st, g.group, ps, w.window_shift, alias, Some((w.liobn, bus)))
                    .map_err(|code| format!("restoring TCE window {:#x}: PAPR code {code}", w.liobn))?;
                if alias.is_some() {
                    continue; // its table is filled already
                }
                // Entries through the hypercall path's checks (index in the window), in
                // runs of consecutive indexes: one put each.
                let entries = &w.entries;
                let mut k = 0;
                while let Some(&(first, _)) = entries.get(k) {
                    let bad = || format!("TCE window {:#x}: an entry outside it", w.liobn);
                    let ioba = first
                        .checked_shl(ps)
                        .filter(|o| o >> ps == first)
                        .and_then(|o| o.checked_add(bus))
                        .ok_or_else(bad)?;
                    let mut run = 1;
                    while entries.get(k + run).is_some_and(|e| Some(e.0) == first.checked_add(run as u64)) {
                        run += 1;
                    }
                    let values: Vec<u64> = entries[k..k + run].iter().map(|e| e.1).collect();
                    Self::index(st, u64::from(w.liobn), ioba, run as u64)
                        .and_then(|(l, i)| self.put(st, l, i, &values))
                        .map_err(|code| {
                            format!("restoring TCE entries {first}.. of {:#x}: PAPR code {code}", w.liobn)
                        })?;
                    k += run;
                }
            }
        }
        Ok(())
    }
}

/// A liobn as written to `tce_info` or the API: `0x` hexadecimal or decimal.
fn parse_liobn(arg: &str) -> Option<u32> {
    match arg.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => arg.parse().ok(),
    }
}
