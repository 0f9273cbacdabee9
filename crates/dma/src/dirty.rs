//! The dirty log: guest pages written by devices, indexed by guest-physical page (what
//! migration needs), one bit per 4 KiB page, read and cleared atomically word by word.
//!
//! The log grows with guest memory: it is a table of 1 GiB chunks of bits, each
//! allocated once when memory appears there ([`DirtyLog::add_range`]) and never moved,
//! so marking a page (on every device write) takes no lock: one atomic load finds the
//! chunk. Writes outside guest memory (no chunk) are not logged.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

const PAGE_SHIFT: u32 = 12;
const CHUNK_SHIFT: u32 = 30;
/// Guest-physical space the log can cover: 0 .. 2 TiB (RAM; 64-bit BARs start at
/// 1 TiB and are device memory, logged when a front-end adds them).
const MAX_CHUNKS: usize = 2048;
const WORDS_PER_CHUNK: usize = 1 << (CHUNK_SHIFT - PAGE_SHIFT - 6);

/// One VM's dirty bitmap over its guest memory.
pub struct DirtyLog {
    chunks: Box<[OnceLock<Box<[AtomicU64]>>]>,
}

impl std::fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.chunks.iter().filter(|c| c.get().is_some()).count();
        f.debug_struct("DirtyLog").field("chunks", &n).finish()
    }
}

impl DirtyLog {
    /// A clean log over the given `(gpa, size)` regions.
    pub fn new(regions: &[(u64, u64)]) -> DirtyLog {
        let log = DirtyLog { chunks: (0..MAX_CHUNKS).map(|_| OnceLock::new()).collect() };
        for &(gpa, size) in regions {
            log.add_range(gpa, size);
        }
        log
    }

    /// Covers `[gpa, gpa + size)` from now on (memory that appeared). Memory beyond
    /// the log's reach is not logged.
    pub fn add_range(&self, gpa: u64, size: u64) {
        if size == 0 {
            return;
        }
        let first = gpa >> CHUNK_SHIFT;
        let last = gpa.saturating_add(size - 1) >> CHUNK_SHIFT;
        for c in first..=last {
            if let Some(cell) = usize::try_from(c).ok().and_then(|c| self.chunks.get(c)) {
                cell.get_or_init(|| (0..WORDS_PER_CHUNK).map(|_| AtomicU64::new(0)).collect());
            }
        }
    }

    fn chunk(&self, gpa: u64) -> Option<&[AtomicU64]> {
        let c = usize::try_from(gpa >> CHUNK_SHIFT).ok()?;
        self.chunks.get(c)?.get().map(|b| &b[..])
    }

    /// Marks the pages of `[gpa, gpa + len)` dirty. Words already fully set are only
    /// read, so a device rewriting the same buffer costs no atomic read-modify-write.
    #[inline]
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut page = gpa >> PAGE_SHIFT;
        let last = gpa.saturating_add(len - 1) >> PAGE_SHIFT;
        while page <= last {
            let chunk_end = ((page >> (CHUNK_SHIFT - PAGE_SHIFT)) + 1) << (CHUNK_SHIFT - PAGE_SHIFT);
            let upto = last.min(chunk_end - 1);
            if let Some(words) = self.chunk(page << PAGE_SHIFT) {
                let base = page & !((1 << (CHUNK_SHIFT - PAGE_SHIFT)) - 1);
                let mut p = page;
                while p <= upto {
                    let rel = p - base;
                    let (word, lo) = ((rel / 64) as usize, rel % 64);
                    let hi = (upto - p + lo).min(63);
                    let mask = if hi - lo == 63 { u64::MAX } else { ((1u64 << (hi - lo + 1)) - 1) << lo };
                    if let Some(w) = words.get(word)
                        && w.load(Ordering::Relaxed) & mask != mask
                    {
                        w.fetch_or(mask, Ordering::Relaxed);
                    }
                    p += hi - lo + 1;
                }
            }
            page = upto + 1;
        }
    }

    /// True if the page holding `gpa` is dirty.
    pub fn is_dirty(&self, gpa: u64) -> bool {
        let rel = (gpa >> PAGE_SHIFT) & ((1 << (CHUNK_SHIFT - PAGE_SHIFT)) - 1);
        self.chunk(gpa)
            .and_then(|w| w.get((rel / 64) as usize))
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (rel % 64)) != 0)
    }

    /// Returns the guest-physical addresses of dirty pages, in order, and clears them.
    /// Each word is swapped atomically: a page marked during the call is reported now
    /// or next time, never lost.
    pub fn take(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (c, cell) in self.chunks.iter().enumerate() {
            let Some(words) = cell.get() else { continue };
            let base = (c as u64) << CHUNK_SHIFT;
            for (i, w) in words.iter().enumerate() {
                let v = w.swap(0, Ordering::AcqRel);
                pages_of_bits(base + ((i as u64 * 64) << PAGE_SHIFT), &[v], u64::MAX, &mut out);
            }
        }
        out
    }

    /// Number of dirty pages (without clearing).
    pub fn count(&self) -> u64 {
        self.chunks
            .iter()
            .filter_map(|c| c.get())
            .flat_map(|w| w.iter())
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }
}

/// Appends the 4 KiB page of each bit set in `bits` (bit `i`, LSB first, is the page
/// at `base + i * 4 KiB`), ignoring bits at or past `limit` (a bitmap from a device or
/// the kernel covers a whole last word: its spare bits must not name pages beyond the
/// range asked for).
pub fn pages_of_bits(base: u64, bits: &[u64], limit: u64, out: &mut Vec<u64>) {
    for (i, w) in bits.iter().enumerate() {
        let mut w = *w;
        while w != 0 {
            let bit = (i as u64) * 64 + u64::from(w.trailing_zeros());
            w &= w - 1;
            if bit >= limit {
                return;
            }
            out.push(base.saturating_add(bit << PAGE_SHIFT));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bitmap_names_pages_of_its_range_only() {
        let mut out = Vec::new();
        // Bits 0, 2, 65, and bits 66.. set (a bitmap's spare bits): a range of 66 pages.
        pages_of_bits(0x10_0000, &[0b101, !0b1], 66, &mut out);
        assert_eq!(out, vec![0x10_0000, 0x10_2000, 0x10_0000 + 65 * 4096]);
    }

    #[test]
    fn marks_every_touched_page_and_take_clears() {
        let log = DirtyLog::new(&[(0, 1 << 20), (1 << 32, 1 << 20)]);
        log.mark(0x1fff, 2); // straddles pages 1 and 2
        log.mark(0x40000, 64 * 4096 + 1); // 65 pages across a word boundary
        log.mark((1 << 32) + 0x3000, 1);
        log.mark(0x1_4000_0000, 10); // outside guest memory (no chunk): ignored
        assert!(log.is_dirty(0x1000) && log.is_dirty(0x2000) && !log.is_dirty(0x3000));
        assert_eq!(log.count(), 2 + 65 + 1);
        let pages = log.take();
        assert_eq!(pages.len(), 68);
        assert_eq!(pages[0], 0x1000);
        assert_eq!(*pages.last().unwrap(), (1 << 32) + 0x3000);
        assert_eq!(log.count(), 0);
        assert!(log.take().is_empty());
    }

    #[test]
    fn the_log_grows_with_memory_and_marks_across_chunks() {
        let log = DirtyLog::new(&[(0, 1 << 30)]);
        log.mark((1 << 30) + 0x1000, 1);
        assert_eq!(log.count(), 0, "not guest memory yet");
        log.add_range(1 << 30, 1 << 30);
        // One mark across the 1 GiB boundary: the last page of one chunk, the first of
        // the next.
        log.mark((1 << 30) - 0x800, 0x1000);
        assert_eq!(log.take(), vec![(1 << 30) - 0x1000, 1 << 30]);
        log.mark(u64::MAX - 10, 100); // at the top of the address space: no overflow
        assert_eq!(log.count(), 0);
    }
}
