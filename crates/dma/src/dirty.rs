//! The dirty log: guest pages written by devices, indexed by guest-physical page (what
//! migration needs), one bit per 4 KiB page, read and cleared atomically word by word.

use std::sync::atomic::{AtomicU64, Ordering};

const PAGE_SHIFT: u32 = 12;

#[derive(Debug)]
struct Region {
    start: u64,
    end: u64,
    bits: Box<[AtomicU64]>,
}

/// One VM's dirty bitmap over its guest memory regions.
#[derive(Debug)]
pub struct DirtyLog {
    regions: Vec<Region>,
}

impl DirtyLog {
    /// A clean log over the given `(gpa, size)` regions.
    pub fn new(regions: &[(u64, u64)]) -> DirtyLog {
        let regions = regions
            .iter()
            .map(|&(start, size)| {
                let pages = size.div_ceil(1 << PAGE_SHIFT);
                let words = usize::try_from(pages.div_ceil(64)).unwrap_or(0);
                Region { start, end: start + size, bits: (0..words).map(|_| AtomicU64::new(0)).collect() }
            })
            .collect();
        DirtyLog { regions }
    }

    /// Marks the pages of `[gpa, gpa + len)` dirty. Words already fully set are only
    /// read, so a device rewriting the same buffer costs no atomic read-modify-write.
    #[inline]
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let Some(r) = self.regions.iter().find(|r| gpa >= r.start && gpa < r.end) else {
            return;
        };
        let first = (gpa - r.start) >> PAGE_SHIFT;
        let last = ((gpa - r.start).saturating_add(len - 1).min(r.end - r.start - 1)) >> PAGE_SHIFT;
        let mut page = first;
        while page <= last {
            let word = (page / 64) as usize;
            let lo = page % 64;
            let hi = (last - page + lo).min(63);
            let mask = if hi - lo == 63 { u64::MAX } else { ((1u64 << (hi - lo + 1)) - 1) << lo };
            if let Some(w) = r.bits.get(word)
                && w.load(Ordering::Relaxed) & mask != mask
            {
                w.fetch_or(mask, Ordering::Relaxed);
            }
            page += hi - lo + 1;
        }
    }

    /// True if the page holding `gpa` is dirty.
    pub fn is_dirty(&self, gpa: u64) -> bool {
        self.regions.iter().find(|r| gpa >= r.start && gpa < r.end).is_some_and(|r| {
            let page = (gpa - r.start) >> PAGE_SHIFT;
            r.bits.get((page / 64) as usize).is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (page % 64)) != 0)
        })
    }

    /// Returns the guest-physical addresses of dirty pages and clears them. Each word
    /// is swapped atomically: a page marked during the call is reported now or next time,
    /// never lost.
    pub fn take(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for r in &self.regions {
            for (i, w) in r.bits.iter().enumerate() {
                let mut v = w.swap(0, Ordering::AcqRel);
                while v != 0 {
                    let bit = u64::from(v.trailing_zeros());
                    v &= v - 1;
                    out.push(r.start + ((i as u64 * 64 + bit) << PAGE_SHIFT));
                }
            }
        }
        out
    }

    /// Number of dirty pages (without clearing).
    pub fn count(&self) -> u64 {
        self.regions.iter().flat_map(|r| r.bits.iter()).map(|w| u64::from(w.load(Ordering::Relaxed).count_ones())).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_every_touched_page_and_take_clears() {
        let log = DirtyLog::new(&[(0, 1 << 20), (1 << 32, 1 << 20)]);
        log.mark(0x1fff, 2); // straddles pages 1 and 2
        log.mark(0x40000, 64 * 4096 + 1); // 65 pages across a word boundary
        log.mark((1 << 32) + 0x3000, 1);
        log.mark(0xdead_0000, 10); // outside guest memory: ignored
        assert!(log.is_dirty(0x1000) && log.is_dirty(0x2000) && !log.is_dirty(0x3000));
        assert_eq!(log.count(), 2 + 65 + 1);
        let pages = log.take();
        assert_eq!(pages.len(), 68);
        assert_eq!(pages[0], 0x1000);
        assert_eq!(*pages.last().unwrap(), (1 << 32) + 0x3000);
        assert_eq!(log.count(), 0);
        assert!(log.take().is_empty());
    }
}
