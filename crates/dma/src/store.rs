//! A domain's mappings, kept as runs: a run is `count` mappings of `unit` bytes each,
//! back to back in IOVA and in guest-physical address, with one permission. Every
//! mapping stays a mapping of its own (looked up, listed, unmapped exactly as it was
//! made); only the storage is shared, so a TCE window mapping guest RAM page by page
//! costs one tree entry per contiguous stretch instead of one per page.

use crate::addr::{Gpa, Iova, Perm};
use crate::mapping::Mapping;
use std::collections::BTreeMap;

/// `n` mappings of `unit` bytes from `iova` -> `gpa` (32 bytes: a tree of them is as
/// small as one of plain mappings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    iova: u64,
    gpa: u64,
    unit: u64,
    n: u32,
    perm: Perm,
}

impl Run {
    fn of(m: &Mapping) -> Run {
        Run { iova: m.iova.0, gpa: m.gpa.0, unit: m.size, n: 1, perm: m.perm }
    }

    /// Mappings in the run.
    fn count(&self) -> u64 {
        u64::from(self.n)
    }

    fn end(&self) -> u64 {
        self.iova + self.unit * self.count()
    }

    /// Mapping `k` of the run.
    fn mapping(&self, k: u64) -> Mapping {
        Mapping {
            iova: Iova(self.iova + k * self.unit),
            gpa: Gpa(self.gpa + k * self.unit),
            size: self.unit,
            perm: self.perm,
        }
    }

    /// `m` continues the run.
    fn continued_by(&self, m: &Mapping) -> bool {
        self.n < u32::MAX
            && m.size == self.unit
            && m.perm == self.perm
            && m.iova.0 == self.end()
            && m.gpa.0 == self.gpa + self.unit * self.count()
    }

    /// The run from mapping `from` on, `count` of them (at most the run's own).
    fn slice(&self, from: u64, count: u64) -> Run {
        let n = u32::try_from(count).unwrap_or(self.n).min(self.n);
        Run { iova: self.iova + from * self.unit, gpa: self.gpa + from * self.unit, n, ..*self }
    }
}

/// The mappings of one domain.
#[derive(Debug, Default)]
pub(crate) struct Store {
    runs: BTreeMap<u64, Run>,
    mappings: usize,
}

impl Store {
    /// Number of mappings.
    pub(crate) fn len(&self) -> usize {
        self.mappings
    }

    /// The run holding `iova`.
    fn run_at(&self, iova: u64) -> Option<&Run> {
        // A run starting right there (an unmap of what a map made) needs no range walk.
        if let Some(r) = self.runs.get(&iova) {
            return Some(r);
        }
        self.runs.range(..iova).next_back().map(|(_, r)| r).filter(|r| r.end() > iova)
    }

    /// The mapping covering `iova`.
    pub(crate) fn lookup(&self, iova: u64) -> Option<Mapping> {
        self.run_at(iova).map(|r| r.mapping((iova - r.iova) / r.unit))
    }

    /// True if a mapping covers any of `[start, end)`.
    pub(crate) fn overlaps(&self, start: u64, end: u64) -> bool {
        self.runs.range(..end).next_back().is_some_and(|(_, r)| r.end() > start)
    }

    /// Adds mappings that overlap nothing mapped nor each other (the caller checked),
    /// joining each to the run it continues.
    /// `maps` are in IOVA order: only the first run can join one already in the tree
    /// (each later one follows a run of this batch that it did not continue).
    pub(crate) fn insert(&mut self, maps: &[Mapping]) {
        let mut pending: Option<Run> = None;
        let mut first = true;
        for m in maps {
            match &mut pending {
                Some(r) if r.continued_by(m) => r.n += 1,
                _ => {
                    if let Some(r) = pending.take() {
                        self.place(r, std::mem::take(&mut first));
                    }
                    pending = Some(Run::of(m));
                }
            }
        }
        if let Some(r) = pending {
            self.place(r, first);
        }
        self.mappings += maps.len();
    }

    fn place(&mut self, r: Run, may_join: bool) {
        if may_join {
            self.put(r);
        } else {
            self.runs.insert(r.iova, r);
        }
    }

    /// Adds one mapping if it overlaps nothing (false, nothing changed, if it does):
    /// the overlap check and the join with the run before share one look at the tree
    /// (a paravirtual DMA MAP's path).
    /// With `full`, nothing is added: `Err(true)` if it overlaps, `Err(false)` if not.
    pub(crate) fn insert_one(&mut self, m: &Mapping, full: bool) -> Result<(), bool> {
        let end = m.end();
        let prev = self.runs.range_mut(..end).next_back().map(|(_, r)| r);
        if prev.as_ref().is_some_and(|p| p.end() > m.iova.0) {
            return Err(true);
        }
        if full {
            return Err(false);
        }
        match prev {
            Some(p) if p.continued_by(m) => p.n += 1,
            _ => {
                self.runs.insert(m.iova.0, Run::of(m));
            }
        }
        self.mappings += 1;
        Ok(())
    }

    /// Puts a run in the tree, joined to the run before it where it continues it
    /// (mappings made in ascending order, the common case, join as they come; the
    /// store stays correct, only larger, when they do not).
    fn put(&mut self, r: Run) {
        if let Some((_, prev)) = self.runs.range_mut(..r.iova).next_back()
            && prev.continued_by(&r.mapping(0))
            && let Some(n) = prev.n.checked_add(r.n)
        {
            prev.n = n;
            return;
        }
        self.runs.insert(r.iova, r);
    }

    /// Removes the mappings that start at each of `iovas` (others are skipped), and
    /// returns them in the order found.
    pub(crate) fn remove(&mut self, iovas: &[Iova]) -> Vec<Mapping> {
        if let [one] = iovas {
            return self.remove_one(one.0, None).into_iter().collect();
        }
        let mut sorted: Vec<u64> = iovas.iter().map(|i| i.0).collect();
        sorted.sort_unstable();
        sorted.dedup();
        let mut out = Vec::with_capacity(sorted.len());
        let mut i = 0;
        while i < sorted.len() {
            let Some(run) = self.run_at(sorted[i]).copied() else {
                i += 1;
                continue;
            };
            // Every requested start inside this run, as mapping indexes.
            let mut gone: Vec<u64> = Vec::new();
            while let Some(&a) = sorted.get(i)
                && a < run.end()
            {
                if (a - run.iova).is_multiple_of(run.unit) {
                    gone.push((a - run.iova) / run.unit);
                }
                i += 1;
            }
            if gone.is_empty() {
                continue;
            }
            self.runs.remove(&run.iova);
            let mut from = 0;
            for &k in &gone {
                if k > from {
                    self.runs.insert(run.iova + from * run.unit, run.slice(from, k - from));
                }
                out.push(run.mapping(k));
                from = k + 1;
            }
            if from < run.count() {
                self.runs.insert(run.iova + from * run.unit, run.slice(from, run.count() - from));
            }
            self.mappings -= gone.len();
        }
        out
    }

    /// Removes the mapping starting at `iova`, if there is one (and, with `size`, it
    /// is of that size: an unmap of exactly one mapping).
    pub(crate) fn remove_one(&mut self, iova: u64, size: Option<u64>) -> Option<Mapping> {
        let run = *self.run_at(iova)?;
        let off = iova - run.iova;
        if !off.is_multiple_of(run.unit) || size.is_some_and(|s| s != run.unit) {
            return None;
        }
        let k = off / run.unit;
        if run.count() == 1 {
            self.runs.remove(&run.iova);
        } else if k == 0 {
            self.runs.remove(&run.iova);
            self.runs.insert(iova + run.unit, run.slice(1, run.count() - 1));
        } else {
            if let Some(r) = self.runs.get_mut(&run.iova) {
                r.n = u32::try_from(k).unwrap_or(r.n);
            }
            if k + 1 < run.count() {
                self.runs.insert(iova + run.unit, run.slice(k + 1, run.count() - k - 1));
            }
        }
        self.mappings -= 1;
        Some(run.mapping(k))
    }

    /// The mappings starting in `[start, end)`, by IOVA.
    pub(crate) fn starting_in(&self, start: u64, end: u64) -> Vec<Mapping> {
        let first = self.run_at(start).map_or(start, |r| r.iova);
        let mut out = Vec::new();
        for r in self.runs.range(first..end).map(|(_, r)| r) {
            // The run's mappings whose start is in the range, by index (a long run
            // costs what it contributes, not its length).
            let lo = start.saturating_sub(r.iova).div_ceil(r.unit);
            let hi = end.saturating_sub(r.iova).div_ceil(r.unit).min(r.count());
            out.extend((lo..hi).map(|k| r.mapping(k)));
        }
        out
    }

    /// Appends the IOVAs of the mappings starting in `[start, end)`, by IOVA.
    pub(crate) fn iovas_starting_in(&self, start: u64, end: u64, out: &mut Vec<Iova>) {
        let first = self.run_at(start).map_or(start, |r| r.iova);
        for r in self.runs.range(first..end).map(|(_, r)| r) {
            let lo = start.saturating_sub(r.iova).div_ceil(r.unit);
            let hi = end.saturating_sub(r.iova).div_ceil(r.unit).min(r.count());
            out.extend((lo..hi).map(|k| Iova(r.iova + k * r.unit)));
        }
    }

    /// Every mapping, by IOVA.
    pub(crate) fn iter(&self) -> impl Iterator<Item = Mapping> + '_ {
        self.runs.values().flat_map(|r| (0..r.count()).map(move |k| r.mapping(k)))
    }

    /// Removes and returns every mapping.
    pub(crate) fn take_all(&mut self) -> Vec<Mapping> {
        let all = self.iter().collect();
        self.runs.clear();
        self.mappings = 0;
        all
    }

    /// Tree entries (runs) held: what the storage costs.
    pub(crate) fn runs(&self) -> usize {
        self.runs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = 4096;

    fn m(iova: u64, gpa: u64, pages: u64) -> Mapping {
        Mapping { iova: Iova(iova * P), gpa: Gpa(gpa * P), size: pages * P, perm: Perm::READ }
    }

    #[test]
    fn contiguous_mappings_share_a_run_and_stay_mappings_of_their_own() {
        let mut s = Store::default();
        let batch: Vec<Mapping> = (0..512).map(|i| m(i, 100 + i, 1)).collect();
        s.insert(&batch);
        assert_eq!((s.len(), s.runs()), (512, 1));
        assert_eq!(s.lookup(7 * P + 5), Some(m(7, 107, 1)));
        // A mapping of another size, or not contiguous in guest memory, starts a run.
        s.insert(&[m(512, 612, 2), m(514, 999, 1)]);
        assert_eq!((s.len(), s.runs()), (514, 3));
        // Removing from the middle splits the run; a start that is not a mapping's is
        // skipped.
        let gone = s.remove(&[Iova(10 * P), Iova(11 * P), Iova(513 * P)]);
        assert_eq!(gone, vec![m(10, 110, 1), m(11, 111, 1)]);
        assert_eq!((s.len(), s.runs()), (512, 4));
        assert_eq!(s.lookup(10 * P), None);
        assert_eq!(s.lookup(12 * P), Some(m(12, 112, 1)));
        // Filling the hole joins the refill to the piece before it.
        s.insert(&[m(10, 110, 1), m(11, 111, 1)]);
        assert_eq!(s.runs(), 4);
        assert_eq!(s.lookup(11 * P), Some(m(11, 111, 1)));
        assert_eq!(s.iter().count(), 514);
        assert_eq!(
            s.starting_in(509 * P, 514 * P),
            vec![m(509, 609, 1), m(510, 610, 1), m(511, 611, 1), m(512, 612, 2)]
        );
        assert!(s.overlaps(513 * P, 514 * P) && !s.overlaps(515 * P, 600 * P));
        assert_eq!(s.take_all().len(), 514);
        assert_eq!((s.len(), s.runs()), (0, 0));
    }
}
