//! `DmaSpace`: a device's only door to guest memory.
//!
//! Every access is checked whole against the domain before a byte moves: an access
//! outside any mapping or without the permission fails, is recorded in the domain's
//! fault log, and reads or writes nothing. Writes mark guest pages in the VM's dirty
//! log. Each `DmaSpace` is one accessor with its own IOTLB; give each device thread its
//! own (`try_clone`). The unmap protocol is described in `readers.rs`.

use crate::addr::{Access, Iova};
use crate::domain::Domain;
use crate::endpoint::{Endpoint, Inner as EndpointInner};
use crate::error::FaultReason;
use crate::faults::Fault;
use crate::readers::Slot;
use std::cell::UnsafeCell;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use vm_memory::VolatileSlice;

/// IOTLB entries per accessor.
const IOTLB_ENTRIES: usize = 8;

/// Most bytes one access section covers. Longer reads and writes are checked whole,
/// then copied in chunks of this size, each in its own section with its own
/// translation: an unmap anywhere in the domain waits for one chunk at most (about
/// 100 us here), not for a whole 1 GiB copy. Callers of [`DmaSpace::translate`] keep
/// their translations this short for the same reason.
pub const MAX_SECTION_BYTES: u64 = 1 << 20;

/// A cached translation: `[lo, hi)` in IOVA space maps to host memory at `host`
/// (guest-physical `gpa`), host-contiguous, with `perm` bits.
#[derive(Clone, Copy, Debug)]
struct Entry {
    lo: u64,
    hi: u64,
    host: usize,
    gpa: u64,
    perm: u8,
}

const EMPTY: Entry = Entry { lo: 1, hi: 0, host: 0, gpa: 0, perm: 0 };

impl Entry {
    #[inline(always)]
    fn host_at(&self, iova: u64) -> usize {
        self.host + (iova - self.lo) as usize
    }

    #[inline(always)]
    fn covers(&self, iova: u64, len: u64, access: Access) -> bool {
        iova >= self.lo && len <= self.hi - iova.min(self.hi) && self.perm & access as u8 != 0
    }
}

/// One host-contiguous piece of a translated access.
#[derive(Clone, Copy, Debug, Default)]
struct Piece {
    host: usize,
    len: usize,
    gpa: u64,
}

/// Pieces of one access: almost always one.
enum Pieces {
    One(Piece),
    Many(Vec<Piece>),
}

impl Pieces {
    fn iter(&self) -> std::slice::Iter<'_, Piece> {
        match self {
            Pieces::One(p) => std::slice::from_ref(p).iter(),
            Pieces::Many(v) => v.iter(),
        }
    }
}

struct State {
    /// This accessor's sequence (even outside accesses); mirrors its slot.
    seq: u64,
    /// Nesting depth of accesses (a `Translation` alive while `read` is called).
    depth: u32,
    /// Domain generation the IOTLB was filled under.
    generation: u64,
    entries: [Entry; IOTLB_ENTRIES],
    /// Index of the most recently used entry (checked first).
    mru: usize,
    /// Next entry to replace.
    victim: usize,
}

/// A device's accessor of its endpoint (whatever domain the endpoint is attached to).
pub struct DmaSpace {
    ep: Arc<EndpointInner>,
    slot: Arc<Slot>,
    device: Arc<str>,
    state: UnsafeCell<State>,
    /// `DmaSpace` is `Send` but not `Sync`: one accessor belongs to one thread.
    _not_sync: PhantomData<std::cell::Cell<()>>,
}

// SAFETY: all fields are Send (Arc of Sync types, plain data in the UnsafeCell, raw host
// addresses stored as usize into guest memory kept alive by the domain's Arc). The
// UnsafeCell is only touched by the owning thread because DmaSpace is not Sync.
unsafe impl Send for DmaSpace {}

impl std::fmt::Debug for DmaSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaSpace").field("endpoint", &self.ep.name).field("device", &self.device).finish()
    }
}

/// Ends the accessor's read-side section when dropped.
struct Section<'a> {
    space: &'a DmaSpace,
}

impl Drop for Section<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        let st = self.space.state();
        // Counters are internal and cannot overflow in practice; wrapping keeps the
        // release build's overflow checks off the hot path.
        st.depth = st.depth.wrapping_sub(1);
        if st.depth == 0 {
            self.space.slot.leave(st.seq);
            st.seq = st.seq.wrapping_add(2);
        }
    }
}

impl DmaSpace {
    /// An accessor of `domain` for `device` (the name recorded with its faults), through
    /// an endpoint of its own attached to `domain`.
    pub fn new(domain: Arc<Domain>, device: &str) -> DmaSpace {
        DmaSpace::of(&Endpoint::attached(&domain, device))
    }

    /// An accessor of `endpoint`: it translates through whatever domain the endpoint is
    /// attached to, and faults while it is attached to none.
    pub fn of(endpoint: &Endpoint) -> DmaSpace {
        let ep = Arc::clone(&endpoint.inner);
        let slot = ep.readers.register();
        let device = Arc::clone(&ep.name);
        DmaSpace {
            ep,
            slot,
            device,
            state: UnsafeCell::new(State {
                seq: 0,
                depth: 0,
                generation: u64::MAX,
                entries: [EMPTY; IOTLB_ENTRIES],
                mru: 0,
                victim: 0,
            }),
            _not_sync: PhantomData,
        }
    }

    /// Another accessor of the same endpoint (one per thread).
    pub fn try_clone(&self) -> DmaSpace {
        DmaSpace::of(&Endpoint { inner: Arc::clone(&self.ep) })
    }

    /// The endpoint's current domain.
    pub fn domain(&self) -> Option<Arc<Domain>> {
        self.ep.domain()
    }

    /// The device name.
    pub fn device(&self) -> &str {
        &self.device
    }

    #[allow(clippy::mut_from_ref)]
    #[inline(always)]
    fn state(&self) -> &mut State {
        // SAFETY: DmaSpace is !Sync, so only one thread reaches this cell, and no
        // caller keeps the returned reference across another call to state().
        unsafe { &mut *self.state.get() }
    }

    /// Enters the read-side section (see readers.rs) and validates the IOTLB.
    #[inline(always)]
    fn enter(&self) -> Section<'_> {
        let st = self.state();
        if st.depth == 0 {
            self.slot.enter(st.seq);
            let g = self.ep.generation.load(Ordering::SeqCst);
            if g != st.generation {
                st.entries = [EMPTY; IOTLB_ENTRIES];
                st.generation = g;
            }
        }
        st.depth = st.depth.wrapping_add(1);
        Section { space: self }
    }

    /// Looks `iova` up in the IOTLB, then in the domain; fills the IOTLB on a miss.
    #[inline]
    fn entry_for(&self, iova: u64, access: Access) -> Result<Entry, FaultReason> {
        let st = self.state();
        for i in 0..IOTLB_ENTRIES {
            let e = st.entries[i];
            if iova >= e.lo && iova < e.hi {
                if e.perm & access as u8 == 0 {
                    return Err(FaultReason::Permission);
                }
                st.mru = i;
                return Ok(e);
            }
        }
        let domain = self.ep.domain().ok_or(FaultReason::Blocked)?;
        let m = domain.lookup(Iova(iova)).ok_or(FaultReason::NotMapped)?;
        // Clip the mapping to the host-contiguous guest memory region holding `iova`.
        let gpa_at = m.gpa.0 + (iova - m.iova.0);
        let (host_at, region_start, region_end) = self.ep.vm.host_span(gpa_at).ok_or(FaultReason::NotMapped)?;
        let lo = iova - (iova - m.iova.0).min(gpa_at - region_start);
        let hi = iova + (m.end() - iova).min(region_end - gpa_at);
        let back = iova - lo;
        let e = Entry { lo, hi, host: host_at - back as usize, gpa: gpa_at - back, perm: m.perm.bits() };
        let st = self.state();
        let v = st.victim;
        st.entries[v] = e;
        st.mru = v;
        st.victim = (v + 1) % IOTLB_ENTRIES;
        if e.perm & access as u8 == 0 {
            return Err(FaultReason::Permission);
        }
        Ok(e)
    }

    /// Translates `[iova, iova + len)` into host pieces (IOTLB, then the domain),
    /// or says why it cannot.
    #[inline(never)]
    fn resolve_slow(&self, iova: u64, len: u64, access: Access) -> Result<Pieces, FaultReason> {
        let end = iova.checked_add(len).ok_or(FaultReason::Overflow)?;
        let piece = |e: &Entry, at: u64| {
            let off = at - e.lo;
            Piece { host: e.host + off as usize, len: (end.min(e.hi) - at) as usize, gpa: e.gpa + off }
        };
        if len == 0 {
            return Ok(Pieces::Many(Vec::new()));
        }
        let first = self.entry_for(iova, access)?;
        if end <= first.hi {
            return Ok(Pieces::One(piece(&first, iova)));
        }
        let mut pieces = vec![piece(&first, iova)];
        let mut at = first.hi;
        while at < end {
            let e = self.entry_for(at, access)?;
            pieces.push(piece(&e, at));
            at = end.min(e.hi);
        }
        Ok(Pieces::Many(pieces))
    }

    fn fault(&self, iova: u64, len: u64, access: Access, reason: FaultReason) -> Fault {
        let f = Fault { iova: Iova(iova), len, access, reason, device: Arc::clone(&self.device) };
        self.ep.faults.record(f.clone());
        if let Some(d) = self.ep.domain() {
            d.fault(&f);
        }
        f
    }

    /// Reads `buf.len()` bytes at `iova`. Nothing is read unless all of it is mapped
    /// readable.
    ///
    /// Longer than [`MAX_SECTION_BYTES`]: the whole range is checked first, then read
    /// chunk by chunk; an unmap that races with the read can cut it short (the fault
    /// names the first chunk that failed), as a DMA on hardware is cut short.
    #[inline]
    pub fn read(&self, iova: Iova, buf: &mut [u8]) -> Result<(), Fault> {
        let len = buf.len() as u64;
        if len > MAX_SECTION_BYTES {
            return self.read_long(iova, buf);
        }
        // The fault is recorded after the read-side section ends: keep sections short.
        self.read_in_section(iova, buf).map_err(|r| self.fault(iova.0, len, Access::Read, r))
    }

    #[inline(never)]
    fn read_long(&self, iova: Iova, buf: &mut [u8]) -> Result<(), Fault> {
        self.check(iova, buf.len() as u64, Access::Read)?;
        for (i, chunk) in buf.chunks_mut(MAX_SECTION_BYTES as usize).enumerate() {
            let at = iova.0 + i as u64 * MAX_SECTION_BYTES;
            self.read_in_section(Iova(at), chunk).map_err(|r| self.fault(at, chunk.len() as u64, Access::Read, r))?;
        }
        Ok(())
    }

    /// Checks that all of `[iova, iova + len)` is mapped for `access`, without moving a
    /// byte (a refused check is a recorded fault, as an access would be).
    pub fn check(&self, iova: Iova, len: u64, access: Access) -> Result<(), Fault> {
        let r = {
            let _s = self.enter();
            self.resolve_slow(iova.0, len, access).map(|_| ())
        };
        r.map_err(|r| self.fault(iova.0, len, access, r))
    }

    #[inline(always)]
    fn read_in_section(&self, iova: Iova, buf: &mut [u8]) -> Result<(), FaultReason> {
        let _s = self.enter();
        let st = self.state();
        let e = st.entries[st.mru % IOTLB_ENTRIES];
        if e.covers(iova.0, buf.len() as u64, Access::Read) {
            // SAFETY: the entry maps [lo, hi) to guest memory kept alive by the
            // domain's Arc and the range lies inside it (covers); inside the access
            // section no unmap of it can complete. Guest memory is plain bytes
            // (vm-memory copies it the same way).
            unsafe { std::ptr::copy_nonoverlapping(e.host_at(iova.0) as *const u8, buf.as_mut_ptr(), buf.len()) };
            return Ok(());
        }
        self.read_slow(iova, buf)
    }

    #[inline(never)]
    fn read_slow(&self, iova: Iova, buf: &mut [u8]) -> Result<(), FaultReason> {
        let mut off = 0;
        for p in self.resolve_slow(iova.0, buf.len() as u64, Access::Read)?.iter() {
            // SAFETY: as in the fast path, for each validated piece; the pieces
            // partition `buf`.
            unsafe { std::ptr::copy_nonoverlapping(p.host as *const u8, buf.as_mut_ptr().add(off), p.len) };
            off += p.len;
        }
        Ok(())
    }

    /// Writes `data` at `iova` and marks the pages dirty. Nothing is written unless all
    /// of it is mapped writable.
    /// Longer than [`MAX_SECTION_BYTES`]: checked whole, written chunk by chunk (see
    /// [`DmaSpace::read`]).
    #[inline]
    pub fn write(&self, iova: Iova, data: &[u8]) -> Result<(), Fault> {
        let len = data.len() as u64;
        if len > MAX_SECTION_BYTES {
            return self.write_long(iova, data);
        }
        self.write_in_section(iova, data).map_err(|r| self.fault(iova.0, len, Access::Write, r))
    }

    #[inline(never)]
    fn write_long(&self, iova: Iova, data: &[u8]) -> Result<(), Fault> {
        self.check(iova, data.len() as u64, Access::Write)?;
        for (i, chunk) in data.chunks(MAX_SECTION_BYTES as usize).enumerate() {
            let at = iova.0 + i as u64 * MAX_SECTION_BYTES;
            self.write_in_section(Iova(at), chunk).map_err(|r| self.fault(at, chunk.len() as u64, Access::Write, r))?;
        }
        Ok(())
    }

    #[inline(always)]
    fn write_in_section(&self, iova: Iova, data: &[u8]) -> Result<(), FaultReason> {
        let _s = self.enter();
        let st = self.state();
        let e = st.entries[st.mru % IOTLB_ENTRIES];
        if e.covers(iova.0, data.len() as u64, Access::Write) {
            // SAFETY: as in `read_in_section`, with the entry writable.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), e.host_at(iova.0) as *mut u8, data.len()) };
            self.ep.vm.dirty().mark(e.gpa + (iova.0 - e.lo), data.len() as u64);
            return Ok(());
        }
        self.write_slow(iova, data)
    }

    #[inline(never)]
    fn write_slow(&self, iova: Iova, data: &[u8]) -> Result<(), FaultReason> {
        let mut off = 0;
        for p in self.resolve_slow(iova.0, data.len() as u64, Access::Write)?.iter() {
            // SAFETY: as in `read_in_section`, for each validated writable piece.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr().add(off), p.host as *mut u8, p.len) };
            self.ep.vm.dirty().mark(p.gpa, p.len as u64);
            off += p.len;
        }
        Ok(())
    }

    /// Opens one access section for several accesses: `read`, `write` and `translate`
    /// calls while the [`Batch`] lives pay no fence of their own. An unmap of anything
    /// in the domain waits until the batch ends, so keep it short and never block
    /// inside it (one descriptor's accesses, not a device's lifetime).
    #[inline]
    pub fn batch(&self) -> Batch<'_> {
        Batch { _section: self.enter() }
    }

    /// Translates `[iova, iova + len)` for `access` into host slices, valid while the
    /// returned [`Translation`] lives (an unmap anywhere in the domain waits for it:
    /// keep it to [`MAX_SECTION_BYTES`] and short-lived). A write translation marks its
    /// pages dirty when it is dropped, after the writes through it: a dirty-log
    /// `take()` that runs meanwhile cannot lose them.
    #[inline]
    pub fn translate(&self, iova: Iova, len: u64, access: Access) -> Result<Translation<'_>, Fault> {
        let section = self.enter();
        let st = self.state();
        let e = st.entries[st.mru % IOTLB_ENTRIES];
        let (first, rest) = if e.covers(iova.0, len, access) {
            let piece = Piece { host: e.host_at(iova.0), len: len as usize, gpa: e.gpa + (iova.0 - e.lo) };
            (piece, None)
        } else {
            match self.resolve_slow(iova.0, len, access) {
                Ok(Pieces::One(p)) => (p, None),
                Ok(Pieces::Many(mut v)) => {
                    let first = if v.is_empty() { Piece::default() } else { v.remove(0) };
                    (first, Some(v.into_boxed_slice()))
                }
                Err(r) => {
                    drop(section);
                    return Err(self.fault(iova.0, len, access, r));
                }
            }
        };
        Ok(Translation { space: self, write: access == Access::Write, _section: section, first, rest })
    }
}

impl Drop for DmaSpace {
    fn drop(&mut self) {
        self.ep.readers.unregister(&self.slot);
    }
}

/// Host slices of a translated access. While it lives, an unmap of the range waits.
pub struct Translation<'a> {
    space: &'a DmaSpace,
    write: bool,
    _section: Section<'a>,
    first: Piece,
    rest: Option<Box<[Piece]>>,
}

impl Drop for Translation<'_> {
    fn drop(&mut self) {
        // The writes through the slices are done: mark them now (still inside the
        // section), so every write is seen by some later dirty-log take().
        if self.write {
            for (gpa, n) in self.gpa_ranges() {
                self.space.ep.vm.dirty().mark(gpa, n);
            }
        }
    }
}

impl Translation<'_> {
    fn pieces(&self) -> impl Iterator<Item = &Piece> {
        std::iter::once(&self.first).filter(|p| p.len > 0).chain(self.rest.iter().flat_map(|r| r.iter()))
    }

    /// The host-contiguous slices, in IOVA order.
    pub fn slices(&self) -> impl Iterator<Item = VolatileSlice<'_>> {
        self.pieces().map(|p| {
            // SAFETY: each piece was validated against the domain and lies in guest
            // memory kept alive by the domain; the slice borrows the Translation, which
            // holds the access section, so no unmap of it completes meanwhile.
            unsafe { VolatileSlice::new(p.host as *mut u8, p.len) }
        })
    }

    /// Guest-physical ranges `(gpa, len)` of the slices.
    pub fn gpa_ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.pieces().map(|p| (p.gpa, p.len as u64))
    }

    /// Number of slices.
    pub fn slice_count(&self) -> usize {
        self.pieces().count()
    }
}

/// An access section spanning several accesses (see [`DmaSpace::batch`]).
pub struct Batch<'a> {
    _section: Section<'a>,
}
