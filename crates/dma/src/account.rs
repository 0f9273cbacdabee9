//! The VM's locked-memory account. Guest pages pinned for DMA are counted once however
//! many domains or IOVAs map them (a reference count per guest-physical extent);
//! other locked allocations (TCE tables) are charged by size. A request that would
//! exceed the limit fails whole and changes nothing.

use crate::error::MapError;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// Reference counts over guest-physical extents: `start -> (end, count)`, with no two
/// extents overlapping and no extent of count zero.
#[derive(Debug, Default)]
struct Extents(BTreeMap<u64, (u64, u32)>);

impl Extents {
    /// Bytes of `[start, end)` not covered by any extent (what pinning it would add).
    fn uncovered(&self, start: u64, end: u64) -> u64 {
        let mut covered = 0;
        let first = self.0.range(..start).next_back().filter(|(_, (e, _))| *e > start).map(|(s, _)| *s);
        let from = first.unwrap_or(start);
        for (&s, &(e, _)) in self.0.range(from..end) {
            covered += e.min(end) - s.max(start);
        }
        (end - start) - covered
    }

    /// Splits the extent containing `at` (if any) so that an extent starts at `at`.
    fn split_at(&mut self, at: u64) {
        if let Some((&s, &(e, c))) = self.0.range(..at).next_back()
            && e > at
        {
            self.0.insert(s, (at, c));
            self.0.insert(at, (e, c));
        }
    }

    /// Adds one reference to every byte of `[start, end)`; calls `fresh` with each
    /// newly-referenced sub-range.
    fn add(&mut self, start: u64, end: u64, mut fresh: impl FnMut(u64, u64)) {
        // Fast path: nothing overlaps (the common case: a buffer pinned once).
        let before = self.0.range(..end).next_back().map(|(s, (e, c))| (*s, *e, *c));
        if before.is_none_or(|(_, e, _)| e <= start) {
            fresh(start, end);
            // Join the neighbours it touches that are referenced once too (a look at
            // each, not a walk: scattered pages pinned one by one stay cheap).
            let (mut s0, mut e0) = (start, end);
            if let Some((ps, pe, 1)) = before
                && pe == start
            {
                self.0.remove(&ps);
                s0 = ps;
            }
            if let Some(&(ne, 1)) = self.0.get(&end) {
                self.0.remove(&end);
                e0 = ne;
            }
            self.0.insert(s0, (e0, 1));
            return;
        }
        self.split_at(start);
        self.split_at(end);
        let mut gaps = Vec::new();
        let mut cursor = start;
        let inside: Vec<u64> = self.0.range(start..end).map(|(s, _)| *s).collect();
        for s in inside {
            if s > cursor {
                gaps.push((cursor, s));
            }
            if let Some(v) = self.0.get_mut(&s) {
                v.1 += 1;
                cursor = v.0;
            }
        }
        if cursor < end {
            gaps.push((cursor, end));
        }
        for (s, e) in gaps {
            self.0.insert(s, (e, 1));
            fresh(s, e);
        }
        self.merge_around(start, end);
    }

    /// Drops one reference from every byte of `[start, end)` (which must be fully
    /// referenced); calls `freed` with each sub-range no longer referenced.
    fn remove(&mut self, start: u64, end: u64, mut freed: impl FnMut(u64, u64)) {
        // Fast path: exactly one extent, referenced once (the common case).
        if self.0.get(&start) == Some(&(end, 1)) {
            self.0.remove(&start);
            freed(start, end);
            return;
        }
        self.split_at(start);
        self.split_at(end);
        let inside: Vec<u64> = self.0.range(start..end).map(|(s, _)| *s).collect();
        for s in inside {
            if let Some(v) = self.0.get_mut(&s) {
                v.1 -= 1;
                if v.1 == 0 {
                    let e = v.0;
                    self.0.remove(&s);
                    freed(s, e);
                }
            }
        }
        self.merge_around(start, end);
    }

    /// Merges adjacent extents of equal count around `[start, end]` so the map stays
    /// as small as the pinned set allows.
    fn merge_around(&mut self, start: u64, end: u64) {
        let mut at = self.0.range(..start).next_back().map(|(s, _)| *s).unwrap_or(start);
        while let Some((&a, &(ae, ac))) = self.0.range(at..).next() {
            if a > end {
                break;
            }
            match self.0.get(&ae).copied() {
                Some((be, bc)) if bc == ac => {
                    self.0.remove(&ae);
                    self.0.insert(a, (be, ac));
                    // Stay on `a`: it may merge with the next one too.
                }
                _ => at = ae.max(a + 1),
            }
        }
    }

    fn covered_bytes(&self) -> u64 {
        self.0.iter().map(|(s, (e, _))| e - s).sum()
    }
}

#[derive(Debug)]
struct State {
    limit: u64,
    pinned: Extents,
    pinned_bytes: u64,
    charged: u64,
}

/// One VM's locked-memory account.
#[derive(Debug)]
pub struct LockedMemory {
    state: Mutex<State>,
    mlock_base: Option<usize>,
}

impl LockedMemory {
    /// An account with `limit` bytes. Pinning only counts.
    pub fn new(limit: u64) -> LockedMemory {
        LockedMemory {
            state: Mutex::new(State { limit, pinned: Extents::default(), pinned_bytes: 0, charged: 0 }),
            mlock_base: None,
        }
    }

    /// An account whose limit is the process's RLIMIT_MEMLOCK (its soft limit).
    pub fn from_rlimit() -> LockedMemory {
        LockedMemory::new(rlimit_memlock())
    }

    /// Also `mlock`s newly pinned guest pages (and `munlock`s released ones), with
    /// guest-physical 0 at host address `host_base` (guest RAM mapped contiguously).
    pub fn with_mlock(mut self, host_base: usize) -> LockedMemory {
        self.mlock_base = Some(host_base);
        self
    }

    /// The limit in bytes.
    pub fn limit(&self) -> u64 {
        self.lock().limit
    }

    /// Changes the limit; what is already locked stays.
    pub fn set_limit(&self, limit: u64) {
        self.lock().limit = limit;
    }

    /// Bytes locked now (pinned guest pages + charged allocations).
    pub fn locked(&self) -> u64 {
        let s = self.lock();
        s.pinned_bytes + s.charged
    }

    /// Bytes of guest memory pinned (each page once).
    pub fn pinned(&self) -> u64 {
        self.lock().pinned_bytes
    }

    /// Bytes charged (not pinned: table memory and the like).
    pub fn charged(&self) -> u64 {
        self.lock().charged
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pins the guest-physical ranges (one reference each); all or nothing.
    pub fn pin(&self, ranges: &[(u64, u64)]) -> Result<(), MapError> {
        let ranges = coalesce(ranges);
        let mut s = self.lock();
        let st = &mut *s;
        // One pass: take the references, adding up what is newly pinned; over the
        // limit, give them back (the rare path) — nothing was locked yet.
        let mut wanted = 0u64;
        let mut fresh: Vec<(u64, u64)> = Vec::new();
        let keep = self.mlock_base.is_some();
        for &(a, len) in ranges.iter() {
            st.pinned.add(a, a + len, |fs, fe| {
                wanted += fe - fs;
                if keep {
                    fresh.push((fs, fe));
                }
            });
        }
        let locked = st.pinned_bytes + st.charged;
        if wanted > 0 && locked.saturating_add(wanted) > st.limit {
            for &(a, len) in ranges.iter() {
                st.pinned.remove(a, a + len, |_, _| {});
            }
            debug_assert_eq!(st.pinned_bytes, st.pinned.covered_bytes());
            return Err(MapError::NoMemory { locked, wanted, limit: st.limit });
        }
        st.pinned_bytes += wanted;
        for (fs, fe) in fresh {
            self.mlock(fs, fe, true);
        }
        debug_assert_eq!(st.pinned_bytes, st.pinned.covered_bytes());
        Ok(())
    }

    /// Drops one reference from each range (each must have been pinned).
    pub fn unpin(&self, ranges: &[(u64, u64)]) {
        let ranges = coalesce(ranges);
        let mut s = self.lock();
        let st = &mut *s;
        for &(a, len) in ranges.iter() {
            st.pinned.remove(a, a + len, |fs, fe| {
                st.pinned_bytes -= fe - fs;
                self.mlock(fs, fe, false);
            });
        }
    }

    /// Drops one reference from each of `unpin` and pins `pin`, as one step: what the
    /// first releases counts toward the second (replacing a page by another never
    /// needs room for both). Over the limit nothing changes.
    pub fn repin(&self, unpin: &[(u64, u64)], pin: &[(u64, u64)]) -> Result<(), MapError> {
        let (unpin, pin) = (coalesce(unpin), coalesce(pin));
        let mut s = self.lock();
        let st = &mut *s;
        let keep = self.mlock_base.is_some();
        let (mut released, mut wanted) = (0u64, 0u64);
        let mut freed: Vec<(u64, u64)> = Vec::new();
        let mut fresh: Vec<(u64, u64)> = Vec::new();
        for &(a, len) in unpin.iter() {
            st.pinned.remove(a, a + len, |fs, fe| {
                released += fe - fs;
                if keep {
                    freed.push((fs, fe));
                }
            });
        }
        for &(a, len) in pin.iter() {
            st.pinned.add(a, a + len, |fs, fe| {
                wanted += fe - fs;
                if keep {
                    fresh.push((fs, fe));
                }
            });
        }
        let locked = st.pinned_bytes - released + st.charged;
        if wanted > released && locked.saturating_add(wanted) > st.limit {
            // Back as it was: the new references go, the old ones come back.
            for &(a, len) in pin.iter() {
                st.pinned.remove(a, a + len, |_, _| {});
            }
            for &(a, len) in unpin.iter() {
                st.pinned.add(a, a + len, |_, _| {});
            }
            debug_assert_eq!(st.pinned_bytes, st.pinned.covered_bytes());
            return Err(MapError::NoMemory { locked, wanted, limit: st.limit });
        }
        st.pinned_bytes = st.pinned_bytes - released + wanted;
        for (fs, fe) in freed {
            self.mlock(fs, fe, false);
        }
        for (fs, fe) in fresh {
            self.mlock(fs, fe, true);
        }
        debug_assert_eq!(st.pinned_bytes, st.pinned.covered_bytes());
        Ok(())
    }

    /// Charges `bytes` of other locked memory (e.g. TCE tables); all or nothing.
    pub fn charge(&self, bytes: u64) -> Result<(), MapError> {
        let mut s = self.lock();
        let locked = s.pinned_bytes + s.charged;
        if locked.saturating_add(bytes) > s.limit {
            return Err(MapError::NoMemory { locked, wanted: bytes, limit: s.limit });
        }
        s.charged += bytes;
        Ok(())
    }

    /// Returns `bytes` charged with [`LockedMemory::charge`].
    pub fn uncharge(&self, bytes: u64) {
        let mut s = self.lock();
        s.charged = s.charged.saturating_sub(bytes);
    }

    /// True if any byte of `[gpa, gpa + len)` is pinned (memory that must not be
    /// released or moved, e.g. by ballooning).
    pub fn is_pinned(&self, gpa: u64, len: u64) -> bool {
        self.lock().pinned.uncovered(gpa, gpa + len) < len
    }

    fn mlock(&self, start: u64, end: u64, lock: bool) {
        let Some(base) = self.mlock_base else { return };
        let Ok(off) = usize::try_from(start) else {
            return;
        };
        let Ok(len) = usize::try_from(end - start) else {
            return;
        };
        let ptr = base.wrapping_add(off) as *const libc::c_void;
        // SAFETY: mlock/munlock only change residency of pages of our own mapping of
        // guest RAM; they do not read or write memory. Failures are reported, and the
        // accounting above stays the authority.
        let rc = unsafe { if lock { libc::mlock(ptr, len) } else { libc::munlock(ptr, len) } };
        if rc != 0 {
            let what = if lock { "mlock" } else { "munlock" };
            eprintln!("dma: {what} of gpa {start:#x}..{end:#x} failed: {}", std::io::Error::last_os_error());
        }
    }
}

/// Joins ranges that touch end to start (sorted by address); overlapping ranges stay
/// apart, so every byte keeps the number of references the caller asked for. One
/// range comes back borrowed.
pub(crate) fn coalesce(ranges: &[(u64, u64)]) -> std::borrow::Cow<'_, [(u64, u64)]> {
    if ranges.len() < 2 {
        return std::borrow::Cow::Borrowed(ranges);
    }
    let sorted;
    let v: &[(u64, u64)] = if ranges.is_sorted() {
        ranges // the common case (a batch in address order): no copy
    } else {
        let mut c = ranges.to_vec();
        c.sort_unstable();
        sorted = c;
        &sorted
    };
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(a, len) in v {
        match out.last_mut() {
            Some((pa, plen)) if *pa + *plen == a => *plen += len,
            _ => out.push((a, len)),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The soft RLIMIT_MEMLOCK of this process (u64::MAX when unlimited).
pub fn rlimit_memlock() -> u64 {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) };
    if rc != 0 || r.rlim_cur == libc::RLIM_INFINITY { u64::MAX } else { r.rlim_cur }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = 4096;

    #[test]
    fn a_page_pinned_twice_counts_once_and_stays_until_the_last_unpin() {
        let a = LockedMemory::new(10 * P);
        a.pin(&[(0, 4 * P)]).unwrap();
        a.pin(&[(2 * P, 4 * P)]).unwrap();
        assert_eq!(a.pinned(), 6 * P, "overlap counted once");
        a.unpin(&[(0, 4 * P)]);
        assert_eq!(a.pinned(), 4 * P, "pages 2..6 still referenced by the second pin");
        assert!(a.is_pinned(2 * P, P) && !a.is_pinned(0, 2 * P));
        a.unpin(&[(2 * P, 4 * P)]);
        assert_eq!(a.locked(), 0);
    }

    #[test]
    fn the_limit_is_reached_exactly_and_a_failure_changes_nothing() {
        let a = LockedMemory::new(8 * P);
        a.pin(&[(0, 8 * P)]).unwrap();
        assert_eq!(a.locked(), 8 * P, "exactly at the limit");
        a.pin(&[(0, 8 * P)]).unwrap(); // already pinned: costs nothing
        let e = a.pin(&[(8 * P, P)]).unwrap_err();
        assert_eq!(e, MapError::NoMemory { locked: 8 * P, wanted: P, limit: 8 * P });
        assert_eq!(a.pinned(), 8 * P);
        // A multi-range request over the limit pins none of its ranges.
        a.unpin(&[(0, 8 * P)]);
        a.unpin(&[(0, 8 * P)]);
        assert!(a.pin(&[(0, 4 * P), (100 * P, 5 * P)]).is_err());
        assert_eq!(a.locked(), 0);
        assert!(!a.is_pinned(0, 4 * P));
    }

    #[test]
    fn one_request_naming_a_page_twice_is_charged_once_but_holds_two_references() {
        let a = LockedMemory::new(P);
        a.pin(&[(0, P), (0, P)]).unwrap();
        assert_eq!(a.pinned(), P);
        a.unpin(&[(0, P)]);
        assert!(a.is_pinned(0, P), "the second reference holds the page");
        a.unpin(&[(0, P)]);
        assert_eq!(a.pinned(), 0);
        // Adjacent ranges coalesce into one extent.
        a.set_limit(u64::MAX);
        let pages: Vec<(u64, u64)> = (0..512).map(|i| (i * P, P)).collect();
        a.pin(&pages).unwrap();
        assert_eq!(a.pinned(), 512 * P);
        a.unpin(&pages);
        assert_eq!(a.pinned(), 0);
    }

    #[test]
    fn a_repin_counts_what_it_releases_toward_what_it_pins() {
        let a = LockedMemory::new(2 * P);
        a.pin(&[(0, P), (P, P)]).unwrap();
        // At the limit: replacing page 1 by page 5 fits (page 1 is released first).
        a.repin(&[(P, P)], &[(5 * P, P)]).unwrap();
        assert_eq!(a.pinned(), 2 * P);
        assert!(a.is_pinned(5 * P, P) && !a.is_pinned(P, P));
        // Replacing one page by two does not: nothing changes.
        let e = a.repin(&[(5 * P, P)], &[(7 * P, 2 * P)]).unwrap_err();
        assert!(matches!(e, MapError::NoMemory { .. }), "{e}");
        assert_eq!(a.pinned(), 2 * P);
        assert!(a.is_pinned(5 * P, P) && !a.is_pinned(7 * P, 2 * P), "the old reference is back");
        // A page replaced by itself keeps its single reference.
        a.repin(&[(0, P)], &[(0, P)]).unwrap();
        a.unpin(&[(0, P), (5 * P, P)]);
        assert_eq!(a.pinned(), 0);
    }

    #[test]
    fn charges_share_the_limit_with_pins() {
        let a = LockedMemory::new(4 * P);
        a.charge(3 * P).unwrap();
        assert!(a.pin(&[(0, 2 * P)]).is_err());
        a.pin(&[(0, P)]).unwrap();
        assert!(a.charge(1).is_err());
        a.uncharge(3 * P);
        assert_eq!(a.locked(), P);
    }

    #[test]
    fn extents_stay_merged() {
        let mut e = Extents::default();
        let mut fresh = Vec::new();
        e.add(0, 10, |a, b| fresh.push((a, b)));
        e.add(10, 20, |a, b| fresh.push((a, b)));
        assert_eq!(e.0.len(), 1);
        e.add(5, 25, |a, b| fresh.push((a, b)));
        assert_eq!(fresh, vec![(0, 10), (10, 20), (20, 25)], "only never-referenced bytes are fresh");
        e.remove(20, 25, |_, _| {});
        assert_eq!(e.0.len(), 2, "[0,5) once, [5,20) twice");
        let mut freed = Vec::new();
        e.remove(5, 15, |a, b| freed.push((a, b)));
        assert!(freed.is_empty(), "still referenced once");
        assert_eq!(e.0.iter().map(|(s, v)| (*s, *v)).collect::<Vec<_>>(), vec![(0, (15, 1)), (15, (20, 2))]);
        e.remove(0, 20, |a, b| freed.push((a, b)));
        assert_eq!(freed, vec![(0, 15)]);
        assert_eq!(e.0.iter().map(|(s, v)| (*s, *v)).collect::<Vec<_>>(), vec![(15, (20, 1))]);
    }

    #[test]
    fn mlock_really_locks_pages() {
        let len = 16 * P as usize;
        let buf = vec![1u8; len + P as usize];
        let base = (buf.as_ptr() as usize).next_multiple_of(P as usize);
        let a = LockedMemory::new(u64::MAX).with_mlock(base);
        let before = vm_lck_kib();
        a.pin(&[(0, 16 * P)]).unwrap();
        let during = vm_lck_kib();
        a.unpin(&[(0, 16 * P)]);
        assert!(during >= before + 64, "VmLck {before} -> {during} KiB");
        assert!(vm_lck_kib() < during);
        drop(buf);
    }

    fn vm_lck_kib() -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        let l = s.lines().find(|l| l.starts_with("VmLck:")).unwrap();
        l.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}
