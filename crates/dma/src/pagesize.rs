//! Page sizes a domain supports, and how a mapping decomposes into pages (the largest
//! size alignment allows at each step, as IOMMU drivers build their page tables).

/// A bitmap of supported page sizes (bit `n` set = pages of `1 << n` bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageSizes(u64);

impl PageSizes {
    /// 4 KiB.
    pub const SZ_4K: u64 = 1 << 12;
    /// 64 KiB.
    pub const SZ_64K: u64 = 1 << 16;
    /// 2 MiB.
    pub const SZ_2M: u64 = 1 << 21;
    /// 16 MiB.
    pub const SZ_16M: u64 = 1 << 24;
    /// 1 GiB.
    pub const SZ_1G: u64 = 1 << 30;
    const ALLOWED: u64 = Self::SZ_4K | Self::SZ_64K | Self::SZ_2M | Self::SZ_16M | Self::SZ_1G;

    /// A bitmap of the given sizes; `None` if empty or if a size is not one of 4 KiB,
    /// 64 KiB, 2 MiB, 16 MiB, 1 GiB.
    pub fn new(bitmap: u64) -> Option<PageSizes> {
        (bitmap != 0 && bitmap & !Self::ALLOWED == 0).then_some(PageSizes(bitmap))
    }

    /// x86-64 IOMMU sizes: 4 KiB, 2 MiB, 1 GiB.
    pub const fn x86() -> PageSizes {
        PageSizes(Self::SZ_4K | Self::SZ_2M | Self::SZ_1G)
    }

    /// The bitmap.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// The smallest size: the domain's granule.
    pub const fn granule(self) -> u64 {
        1 << self.0.trailing_zeros()
    }

    /// The page size used at `iova`/`gpa` with `remaining` bytes left: the largest
    /// supported size both addresses are aligned to that fits.
    pub fn page_at(self, iova: u64, gpa: u64, remaining: u64) -> u64 {
        let align = (iova | gpa).trailing_zeros().min(63);
        let fit = 63 - remaining.leading_zeros().min(63);
        let limit = align.min(fit);
        let mask = if limit >= 63 { u64::MAX } else { (2u64 << limit) - 1 };
        let candidates = self.0 & mask;
        if candidates == 0 { self.granule() } else { 1 << (63 - candidates.leading_zeros()) }
    }

    /// Number of pages `[iova, iova + size) -> gpa` takes (both granule-aligned).
    pub fn count_pages(self, iova: u64, gpa: u64, size: u64) -> u64 {
        let (mut off, mut n) = (0, 0);
        while off < size {
            off += self.page_at(iova + off, gpa + off, size - off);
            n += 1;
        }
        n
    }
}

impl Default for PageSizes {
    fn default() -> Self {
        PageSizes::x86()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_five_sizes_are_accepted() {
        assert!(PageSizes::new(0).is_none());
        assert!(PageSizes::new(1 << 13).is_none());
        assert_eq!(PageSizes::new(PageSizes::SZ_64K | PageSizes::SZ_16M).unwrap().granule(), PageSizes::SZ_64K);
    }

    #[test]
    fn large_pages_are_used_where_alignment_allows() {
        let p = PageSizes::x86();
        assert_eq!(p.count_pages(1 << 30, 2 << 30, 1 << 30), 1, "1 GiB aligned: one page");
        assert_eq!(p.count_pages(0, 0, 4 << 20), 2, "two 2 MiB pages");
        assert_eq!(p.count_pages(0x1000, 0x1000, 2 << 20), 512, "misaligned by 4 KiB: all small");
        // 4 KiB head up to 2 MiB, then a 2 MiB page, then a 4 KiB tail.
        assert_eq!(p.count_pages(0x1ff000, 0x1ff000, 0x1000 + (2 << 20) + 0x1000), 3);
        // iova and gpa must both be aligned.
        assert_eq!(p.count_pages(0, 0x1000, 2 << 20), 512);
        let small = PageSizes::new(PageSizes::SZ_4K | PageSizes::SZ_64K).unwrap();
        assert_eq!(small.count_pages(0, 0, 1 << 20), 16);
    }
}
