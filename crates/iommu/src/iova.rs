//! IOVA allocation for one domain.
//!
//! Free space is a set of ranges kept twice: by address (to merge neighbours on free)
//! and by (length, address) (best fit): both `O(log n)` in the number of free ranges,
//! so the cost does not grow linearly with live mappings. In front of it, as Linux's
//! IOVA allocator does, small allocations are rounded up to a power of two of granules
//! and recently freed ones are kept in per-size caches: a driver that maps and unmaps
//! buffers of the same sizes allocates in `O(1)` from the cache.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

/// Largest allocation (in granules, a power of two) served from the caches.
pub const CACHED_MAX_GRANULES: u64 = 32;
/// Entries kept per cache.
pub const CACHE_DEPTH: usize = 1024;

/// An IOVA allocator over `[base, limit)` minus reserved ranges.
#[derive(Debug)]
pub struct IovaAllocator {
    granule: u64,
    by_addr: BTreeMap<u64, u64>,
    by_size: BTreeSet<(u64, u64)>,
    caches: Vec<Vec<u64>>,
}

impl IovaAllocator {
    /// An allocator handing out `granule`-aligned ranges of `[base, limit)`, never
    /// overlapping `reserved`.
    pub fn new(base: u64, limit: u64, granule: u64, reserved: &[Range<u64>]) -> IovaAllocator {
        let mut a = IovaAllocator {
            granule,
            by_addr: BTreeMap::new(),
            by_size: BTreeSet::new(),
            caches: vec![Vec::new(); CACHED_MAX_GRANULES.trailing_zeros() as usize + 1],
        };
        let base = base.next_multiple_of(granule);
        let limit = limit - limit % granule;
        let mut pieces = vec![(base, limit)];
        for r in reserved {
            let (rs, re) = (r.start - r.start % granule, r.end.next_multiple_of(granule));
            pieces = pieces
                .into_iter()
                .flat_map(|(s, e)| {
                    if re <= s || e <= rs {
                        vec![(s, e)]
                    } else {
                        [(s, rs.max(s)), (re.min(e), e)].into_iter().filter(|(a, b)| a < b).collect()
                    }
                })
                .collect();
        }
        for (s, e) in pieces {
            if s < e {
                a.insert_free(s, e);
            }
        }
        a
    }

    fn insert_free(&mut self, s: u64, e: u64) {
        self.by_addr.insert(s, e);
        self.by_size.insert((e - s, s));
    }

    fn remove_free(&mut self, s: u64) -> Option<u64> {
        let e = self.by_addr.remove(&s)?;
        self.by_size.remove(&(e - s, s));
        Some(e)
    }

    /// The size an allocation of `size` bytes takes (small ones round up to a power of
    /// two of granules, so freed ranges can serve later requests of the same class).
    pub fn rounded(&self, size: u64) -> u64 {
        let granules = size.div_ceil(self.granule).max(1);
        if granules <= CACHED_MAX_GRANULES {
            granules.next_power_of_two() * self.granule
        } else {
            granules * self.granule
        }
    }

    fn class(&self, rounded: u64) -> Option<usize> {
        let g = rounded / self.granule;
        (g <= CACHED_MAX_GRANULES).then(|| g.trailing_zeros() as usize)
    }

    /// Allocates room for `size` bytes; returns (IOVA, bytes taken). Small allocations
    /// are aligned to their rounded size, large ones to 2 MiB when they are that big.
    pub fn alloc(&mut self, size: u64) -> Option<(u64, u64)> {
        if size == 0 {
            return None;
        }
        let taken = self.rounded(size);
        if let Some(c) = self.class(taken)
            && let Some(iova) = self.caches[c].pop()
        {
            return Some((iova, taken));
        }
        let align = if self.class(taken).is_some() {
            taken
        } else if taken >= 2 << 20 {
            2 << 20
        } else {
            self.granule
        };
        let fit = self.by_size.range((taken, 0)..).find_map(|&(_, s)| {
            let e = self.by_addr.get(&s).copied()?;
            let start = s.next_multiple_of(align);
            (start.checked_add(taken)? <= e).then_some((s, e, start))
        });
        let (s, e, start) = fit?;
        self.remove_free(s);
        if s < start {
            self.insert_free(s, start);
        }
        if start + taken < e {
            self.insert_free(start + taken, e);
        }
        Some((start, taken))
    }

    /// Gives back `[iova, iova + taken)` from [`IovaAllocator::alloc`].
    pub fn free(&mut self, iova: u64, taken: u64) {
        if let Some(c) = self.class(taken)
            && self.caches[c].len() < CACHE_DEPTH
        {
            self.caches[c].push(iova);
            return;
        }
        let (mut s, mut e) = (iova, iova + taken);
        if let Some((&ps, &pe)) = self.by_addr.range(..s).next_back()
            && pe == s
        {
            self.remove_free(ps);
            s = ps;
        }
        if let Some(ne) = self.by_addr.get(&e).copied() {
            self.remove_free(e);
            e = ne;
        }
        self.insert_free(s, e);
    }

    /// Takes exactly `[start, start + len)` out of the free space (a restore puts back
    /// the allocations a snapshot recorded); false if any of it is not free.
    pub fn take(&mut self, start: u64, len: u64) -> bool {
        let Some(end) = start.checked_add(len) else { return false };
        let Some((&s, &e)) = self.by_addr.range(..=start).next_back() else { return false };
        if e < end || len == 0 {
            return false;
        }
        self.remove_free(s);
        if s < start {
            self.insert_free(s, start);
        }
        if end < e {
            self.insert_free(end, e);
        }
        true
    }

    /// Bytes free (cached ranges included).
    pub fn free_bytes(&self) -> u64 {
        let tree: u64 = self.by_addr.iter().map(|(s, e)| e - s).sum();
        let cached: u64 = self.caches.iter().enumerate().map(|(c, v)| v.len() as u64 * (self.granule << c)).sum();
        tree + cached
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_carves_exact_ranges_and_refuses_what_is_not_free() {
        let mut a = IovaAllocator::new(0x1000, 0x100000, 0x1000, &[]);
        let free = a.free_bytes();
        assert!(a.take(0x5000, 0x2000));
        assert!(!a.take(0x6000, 0x1000), "taken already");
        assert!(!a.take(0xff000, 0x2000), "past the end");
        assert_eq!(a.free_bytes(), free - 0x2000);
        a.free(0x5000, 0x2000);
        assert_eq!(a.free_bytes(), free);
    }

    const G: u64 = 4096;

    #[test]
    fn allocations_are_aligned_disjoint_and_avoid_reserved_ranges() {
        let reserved = std::slice::from_ref(&(8 * G..16 * G));
        let mut a = IovaAllocator::new(0, 64 * G, G, reserved);
        let mut got = Vec::new();
        while let Some((iova, taken)) = a.alloc(3 * G) {
            assert_eq!(taken, 4 * G, "3 granules round up to 4");
            assert_eq!(iova % (4 * G), 0, "size-aligned");
            assert!(iova + taken <= 8 * G || iova >= 16 * G, "reserved range avoided: {iova:#x}");
            got.push(iova);
        }
        got.sort();
        got.dedup();
        assert_eq!(got.len(), 14, "2 below the reserved range, 12 above, all disjoint");
    }

    #[test]
    fn freed_ranges_are_reused_and_merged() {
        let mut a = IovaAllocator::new(0, 1 << 30, G, &[]);
        let before = a.free_bytes();
        let (x, t) = a.alloc(G).unwrap();
        a.free(x, t);
        assert_eq!(a.alloc(G).unwrap().0, x, "the cache hands the same range back");
        a.free(x, t);
        // Large allocations bypass the caches and merge back into the tree.
        let big: Vec<_> = (0..4).map(|_| a.alloc(4 << 20).unwrap()).collect();
        for (i, t) in big {
            a.free(i, t);
        }
        assert_eq!(a.free_bytes(), before);
        assert_eq!(a.alloc(1 << 29).map(|(_, t)| t), Some(1 << 29), "merged back into one large range");
    }

    #[test]
    fn exhaustion_is_none() {
        let mut a = IovaAllocator::new(0, 4 * G, G, &[]);
        assert!(a.alloc(4 * G).is_some());
        assert!(a.alloc(G).is_none());
        assert!(a.alloc(0).is_none());
    }
}
