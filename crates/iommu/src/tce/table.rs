//! A TCE table: one 64-bit translation control entry per IOMMU page of a DMA window,
//! stored as a multi-level tree of 4 KiB pages allocated on demand (as powernv hardware
//! tables), so its memory follows what is mapped, not the window's size.
//!
//! The tree lives in a memfd ([`Table::fd`]) laid out as hardware would walk it
//! (`abi::tce::layout`): the root level is the file's first page; an inner entry holds
//! the file offset of the next level's page with [`abi::tce::READ`] | [`abi::tce::WRITE`]
//! set (0: not allocated); a leaf entry is the TCE itself. Entries are little-endian.
//! A reader (a tool, a device process, a restore) maps the file and walks it.
//!
//! Pages are charged to the VM's locked-memory account when allocated and released
//! when freed: a leaf page whose entries are all clear is freed (hole punched), and an
//! inner page whose children are all gone too. Reads and clears never allocate. A
//! table keeps up to [`SPARE_PAGES`] freed pages (all zeros, still charged) for its
//! next allocations, so mapping and clearing across a leaf boundary does not pay a
//! hole punch and a page fault each time (that cycle was most of a single
//! H_PUT_TCE's cost).

use abi::tce as t;
use dma::{MapError, VmDma};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

/// Bytes of one table page.
pub const PAGE: u64 = 4096;
/// Freed pages a table keeps (zeroed, charged) for reuse.
pub const SPARE_PAGES: usize = 4;
/// Most table pages one table can hold at once (64 GiB of pages).
const MAX_TABLE_PAGES: u64 = 1 << 24;
/// Most index bits a table has (5 levels of 9 bits).
pub const MAX_ENTRY_BITS: u32 = t::MAX_ENTRY_BITS;
/// Levels of the tree of a window of `2^entry_bits` entries.
fn levels_for(entry_bits: u32) -> u32 {
    entry_bits.div_ceil(LEVEL_BITS).max(1)
}

/// Entries per table page.
pub const ENTRIES: u64 = PAGE / 8;
/// Index bits per level.
const LEVEL_BITS: u32 = t::layout::LEVEL_BITS;

/// Why a table cannot be made or written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TableError {
    /// The geometry is out of range.
    #[error("a window of 2^{0} entries needs more than {max} levels", max = t::MAX_LEVELS)]
    TooLarge(u32),
    /// The locked-memory limit refused a table page.
    #[error("table memory over the locked-memory limit: {0}")]
    NoMemory(String),
    /// The host refused (memfd, mmap).
    #[error("table memory: {0}")]
    Host(String),
}

/// One table (shared by every window that aliases it).
pub struct Table {
    /// log2 of the entry count.
    entry_bits: u32,
    levels: u32,
    file: Arc<File>,
    base: *mut u64,
    /// Bytes of the file (and of the mapping).
    capacity: u64,
    /// Next never-used page and the freed ones (page numbers in the file).
    next_page: u64,
    free_pages: Vec<u64>,
    /// Non-zero entries per page, by page number (0 for free pages).
    used: Vec<u32>,
    account: Arc<VmDma>,
    /// Pages in the tree now (the root included).
    pages: u64,
    /// Freed pages kept for reuse: all zeros, resident and still charged.
    spare: Vec<u64>,
    /// Pages already charged for allocations to come ([`Table::reserve_for`]).
    reserved: u64,
}

// SAFETY: `base` points into a private shared mapping owned by the table; every access
// goes through `&self`/`&mut self` methods, and the caller serialises writers (the
// front-end holds the table behind a mutex).
unsafe impl Send for Table {}
// SAFETY: as above: readers and writers are serialised by the owner's lock.
unsafe impl Sync for Table {}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table").field("entries", &(1u64 << self.entry_bits)).field("pages", &self.pages).finish()
    }
}

fn host(e: impl std::fmt::Display) -> TableError {
    TableError::Host(e.to_string())
}

impl Table {
    /// A table of `2^entry_bits` entries, charging `account` for its pages (the root
    /// page at once).
    pub fn new(entry_bits: u32, account: Arc<VmDma>) -> Result<Table, TableError> {
        let levels = levels_for(entry_bits);
        if levels > t::MAX_LEVELS {
            return Err(TableError::TooLarge(entry_bits));
        }
        // The most pages the tree can ever use: every level fully populated.
        let mut capacity_pages: u64 = 0;
        for l in 0..levels {
            let bits_below = LEVEL_BITS * (levels - 1 - l);
            let entries_at_level = 1u64 << entry_bits.saturating_sub(bits_below).min(63);
            capacity_pages += entries_at_level.div_ceil(ENTRIES);
        }
        // The file is sparse and pages come from a bump allocator with reuse, so only
        // the pages in use at once count; the address space reserved for the mapping is
        // capped (64 GiB of table pages: more than any locked-memory limit allows).
        let capacity = capacity_pages.min(MAX_TABLE_PAGES) * PAGE;
        // SAFETY: memfd_create with a NUL-terminated name and valid flags (sealing
        // allowed: the size is sealed below); the descriptor is owned at once.
        let fd = unsafe { libc::memfd_create(c"passthru-tce".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(host(std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(capacity).map_err(host)?;
        // Its size is fixed: whoever else holds the file (a reader given it through the
        // control API) cannot truncate it under the VMM's mapping. Punching holes
        // (freeing pages) stays allowed.
        // SAFETY: F_ADD_SEALS on a memfd we own; no memory is passed.
        if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL) }
            < 0
        {
            return Err(host(std::io::Error::last_os_error()));
        }
        let len = usize::try_from(capacity).map_err(host)?;
        // SAFETY: a new shared mapping of the whole (sparse) file; nothing else maps
        // this address range. Untouched pages cost nothing (shmem holes).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(host(std::io::Error::last_os_error()));
        }
        let mut table = Table {
            entry_bits,
            levels,
            file: Arc::new(file),
            base: p.cast(),
            capacity,
            next_page: 0,
            free_pages: Vec::new(),
            used: Vec::new(),
            account,
            pages: 0,
            spare: Vec::new(),
            reserved: 0,
        };
        let root = table.alloc_page()?;
        debug_assert_eq!(root, 0);
        Ok(table)
    }

    /// Entries in the window.
    pub fn entries(&self) -> u64 {
        1 << self.entry_bits
    }

    /// Levels of the tree.
    pub fn levels(&self) -> u32 {
        self.levels
    }

    /// Table pages in the tree now.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Bytes of table memory charged now (the tree's pages and the spare ones).
    pub fn bytes(&self) -> u64 {
        (self.pages + self.spare.len() as u64) * PAGE
    }

    /// The file the tree lives in (for mmap).
    pub fn fd(&self) -> &Arc<File> {
        &self.file
    }

    fn word(&self, page: u64, index: u64) -> u64 {
        debug_assert!(page * PAGE + index * 8 < self.capacity);
        // SAFETY: `page` was allocated inside the mapping and `index < ENTRIES`.
        unsafe { std::ptr::read_volatile(self.base.add((page * ENTRIES + index) as usize)) }
    }

    fn set_word(&mut self, page: u64, index: u64, v: u64) {
        debug_assert!(page * PAGE + index * 8 < self.capacity);
        // SAFETY: as in `word`; writers are serialised by `&mut self`.
        unsafe { std::ptr::write_volatile(self.base.add((page * ENTRIES + index) as usize), v.to_le()) }
    }

    /// Table pages that setting entries `first..` to `values` would allocate: the
    /// missing pages on the paths to the leaves that get a non-zero value, each
    /// counted once (clears never allocate).
    pub fn pages_needed(&self, first: u64, values: &[u64]) -> u64 {
        let mut need = 0;
        // The last missing page counted at each level (by the index bits above it):
        // consecutive leaves under one missing parent share it.
        let mut counted = [u64::MAX; t::MAX_LEVELS as usize];
        let mut k = 0usize;
        while k < values.len() {
            let i = first.saturating_add(k as u64);
            let n = (ENTRIES - (i & (ENTRIES - 1))).min((values.len() - k) as u64) as usize;
            if values[k..k + n].iter().any(|v| *v != 0) {
                let mut page = Some(0u64);
                for l in 0..self.levels - 1 {
                    if let Some(p) = page {
                        let e = u64::from_le(self.word(p, self.index_at(i, l)));
                        page = if e == 0 { None } else { self.child(e) };
                        if page.is_some() {
                            continue;
                        }
                    }
                    // The page at level l + 1 holding entry i is missing.
                    let prefix = i >> (LEVEL_BITS * (self.levels - 1 - l));
                    if let Some(c) = counted.get_mut(l as usize + 1)
                        && *c != prefix
                    {
                        *c = prefix;
                        need += 1;
                    }
                }
            }
            k += n;
        }
        need
    }

    /// Charges, now, `pages` table pages for the sets to come, beyond the spare pages
    /// (charged already, taken first), so those sets cannot fail for memory (a batch
    /// is all or nothing). Undo with [`Table::release_reserve`], which returns what the
    /// sets did not use.
    pub fn reserve(&mut self, pages: u64) -> Result<(), TableError> {
        let pages = pages.saturating_sub(self.spare.len() as u64);
        if pages == 0 {
            return Ok(());
        }
        self.account.account().charge(pages * PAGE).map_err(|e: MapError| TableError::NoMemory(e.to_string()))?;
        self.reserved += pages;
        Ok(())
    }

    /// The first index in `from..end` whose leaf page exists (entries elsewhere are
    /// all clear). Skips missing subtrees whole: the cost follows the pages present,
    /// not the range.
    pub fn next_present(&self, from: u64, end: u64) -> Option<u64> {
        let end = end.min(self.entries());
        let mut i = from;
        'next: while i < end {
            let mut page = 0;
            for l in 0..self.levels - 1 {
                let e = u64::from_le(self.word(page, self.index_at(i, l)));
                match (e != 0).then(|| self.child(e)).flatten() {
                    Some(c) => page = c,
                    None => {
                        // Past the subtree this entry would hold.
                        let span = LEVEL_BITS * (self.levels - 1 - l);
                        i = ((i >> span) + 1).checked_shl(span).filter(|n| *n > i)?;
                        continue 'next;
                    }
                }
            }
            return Some(i);
        }
        None
    }

    /// Returns the unused part of a reservation.
    pub fn release_reserve(&mut self) {
        self.account.account().uncharge(self.reserved * PAGE);
        self.reserved = 0;
    }

    fn alloc_page(&mut self) -> Result<u64, TableError> {
        if let Some(page) = self.spare.pop() {
            // Zeroed and charged already.
            self.pages += 1;
            if let Some(u) = self.used.get_mut(page as usize) {
                *u = 0;
            }
            return Ok(page);
        }
        if self.reserved > 0 {
            self.reserved -= 1;
        } else {
            self.account.account().charge(PAGE).map_err(|e: MapError| TableError::NoMemory(e.to_string()))?;
        }
        let page = match self.free_pages.pop() {
            Some(p) => p,
            None => {
                let p = self.next_page;
                if (p + 1) * PAGE > self.capacity {
                    self.account.account().uncharge(PAGE);
                    return Err(TableError::Host("table file full".into()));
                }
                self.next_page += 1;
                p
            }
        };
        // A fresh or punched page reads as zeros.
        self.pages += 1;
        let p = page as usize;
        if self.used.len() <= p {
            self.used.resize(p + 1, 0);
        }
        self.used[p] = 0;
        Ok(page)
    }

    fn free_page(&mut self, page: u64) {
        // A page is freed only when it holds nothing: all zeros, reusable as it is.
        if self.spare.len() < SPARE_PAGES {
            if let Some(u) = self.used.get_mut(page as usize) {
                *u = 0;
            }
            self.spare.push(page);
            self.pages -= 1;
            return;
        }
        // SAFETY: fallocate on our own memfd, inside the file: the page becomes a hole
        // (zeros, no memory).
        unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (page * PAGE) as libc::off_t,
                PAGE as libc::off_t,
            );
        }
        if let Some(u) = self.used.get_mut(page as usize) {
            *u = 0;
        }
        self.free_pages.push(page);
        self.pages -= 1;
        self.account.account().uncharge(PAGE);
    }

    /// The index of entry `i` at level `l` (0 = root).
    fn index_at(&self, i: u64, l: u32) -> u64 {
        (i >> (LEVEL_BITS * (self.levels - 1 - l))) & (ENTRIES - 1)
    }

    /// Entry `i` (0 if its leaf page was never allocated). Never allocates.
    pub fn get(&self, i: u64) -> u64 {
        let mut v = [0];
        self.get_run(i, &mut v);
        v[0]
    }

    /// Entries `first..first + out.len()` into `out` (0 where no leaf page exists or
    /// past the window). One walk per leaf page. Never allocates.
    pub fn get_run(&self, first: u64, out: &mut [u64]) {
        let mut k = 0usize;
        while k < out.len() {
            let i = first.saturating_add(k as u64);
            let n = (ENTRIES - (i & (ENTRIES - 1))).min((out.len() - k) as u64) as usize;
            let chunk = &mut out[k..k + n];
            match self.leaf_of(i) {
                Some(page) => {
                    let at = self.index_at(i, self.levels - 1);
                    for (j, o) in chunk.iter_mut().enumerate() {
                        *o = u64::from_le(self.word(page, at + j as u64));
                    }
                }
                None => chunk.fill(0),
            }
            k += n;
        }
    }

    /// The leaf page holding entry `i`, if allocated.
    fn leaf_of(&self, i: u64) -> Option<u64> {
        if i >= self.entries() {
            return None;
        }
        let mut page = 0;
        for l in 0..self.levels - 1 {
            let e = u64::from_le(self.word(page, self.index_at(i, l)));
            if e == 0 {
                return None;
            }
            page = self.child(e)?;
        }
        Some(page)
    }

    /// The page an inner entry points to: only a page the table allocated (the VMM is
    /// the only writer, but a page number is never used unchecked).
    fn child(&self, e: u64) -> Option<u64> {
        let page = (e & !(t::READ | t::WRITE)) / PAGE;
        (page != 0 && page < self.next_page).then_some(page)
    }

    /// Sets entry `i`; returns the previous value. Storing 0 into a missing page
    /// allocates nothing; a leaf page left all clear is freed, then empty parents.
    #[cfg(test)]
    pub fn set(&mut self, i: u64, v: u64) -> Result<u64, TableError> {
        let old = self.get(i);
        self.set_run(i, &[v])?;
        Ok(old)
    }

    /// Sets entries `first..` to `values`, one walk per leaf page (as [`Table::set`]
    /// for each). A page it would need but cannot allocate fails the call with the
    /// entries of earlier leaf pages set (reserve with [`Table::reserve_for`] first
    /// for all or nothing).
    pub fn set_run(&mut self, first: u64, values: &[u64]) -> Result<(), TableError> {
        let last = first.checked_add(values.len() as u64);
        if last.is_none_or(|l| l > self.entries()) {
            return Err(TableError::Host(format!("entries {first}+{} outside the table", values.len())));
        }
        let mut k = 0usize;
        while k < values.len() {
            let i = first + k as u64;
            let n = (ENTRIES - (i & (ENTRIES - 1))).min((values.len() - k) as u64) as usize;
            self.set_in_leaf(i, &values[k..k + n])?;
            k += n;
        }
        Ok(())
    }

    /// Sets `vals` from entry `i` on, all in `i`'s leaf page.
    fn set_in_leaf(&mut self, i: u64, vals: &[u64]) -> Result<(), TableError> {
        let storing = vals.iter().any(|v| *v != 0);
        // Walk down, allocating only to store a non-zero value (the path on the stack:
        // this runs for every put).
        let mut path = [(0u64, 0u64); t::MAX_LEVELS as usize];
        let mut depth = 0;
        let mut page = 0u64;
        for l in 0..self.levels - 1 {
            let idx = self.index_at(i, l);
            if let Some(p) = path.get_mut(depth) {
                *p = (page, idx);
                depth += 1;
            }
            let e = u64::from_le(self.word(page, idx));
            page = if e != 0 {
                self.child(e).ok_or_else(|| TableError::Host(format!("a corrupted inner entry {e:#x}")))?
            } else if !storing {
                return Ok(());
            } else {
                let child = self.alloc_page()?;
                self.set_word(page, idx, (child * PAGE) | t::READ | t::WRITE);
                self.used[page as usize] += 1;
                child
            };
        }
        let at = self.index_at(i, self.levels - 1);
        let mut used = self.used[page as usize];
        for (j, v) in vals.iter().enumerate() {
            let idx = at + j as u64;
            let old = u64::from_le(self.word(page, idx));
            self.set_word(page, idx, *v);
            match (old != 0, *v != 0) {
                (false, true) => used += 1,
                (true, false) => used -= 1,
                _ => {}
            }
        }
        self.used[page as usize] = used;
        // Free empty pages bottom-up (never the root).
        let mut child = page;
        while child != 0 && self.used.get(child as usize).copied() == Some(0) {
            let Some(d) = depth.checked_sub(1) else { break };
            depth = d;
            let (parent, pidx) = path[d];
            self.set_word(parent, pidx, 0);
            self.free_page(child);
            if let Some(u) = self.used.get_mut(parent as usize) {
                *u -= 1;
            }
            child = parent;
        }
        Ok(())
    }

    /// Non-zero entries.
    pub fn valid_entries(&self) -> u64 {
        // Leaf pages' counts: the pages at the last level. Inner counts count children.
        let mut n = 0;
        self.walk_leaves(0, 0, &mut |_, v| {
            if v != 0 {
                n += 1
            }
        });
        n
    }

    /// Every non-zero entry, in order: (index, value).
    pub fn valid(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        self.walk_leaves(0, 0, &mut |i, v| {
            if v != 0 {
                out.push((i, v))
            }
        });
        out
    }

    fn walk_leaves(&self, page: u64, level: u32, f: &mut impl FnMut(u64, u64)) {
        self.walk(page, level, 0, f);
    }

    fn walk(&self, page: u64, level: u32, prefix: u64, f: &mut impl FnMut(u64, u64)) {
        for idx in 0..ENTRIES {
            let e = u64::from_le(self.word(page, idx));
            if e == 0 {
                continue;
            }
            let i = (prefix << LEVEL_BITS) | idx;
            if level + 1 == self.levels {
                if i < self.entries() {
                    f(i, e);
                }
            } else if let Some(child) = self.child(e) {
                self.walk(child, level + 1, i, f);
            }
        }
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        self.release_reserve();
        self.account.account().uncharge(self.bytes());
        if let Ok(len) = usize::try_from(self.capacity) {
            // SAFETY: the mapping made in `new`, of `len` bytes, used by nobody else now.
            unsafe { libc::munmap(self.base.cast(), len) };
        }
    }
}

/// The valid (non-zero) entries of a table's file, `(index, TCE)` in index order, at
/// most `max` of them: the file mapped read-only and walked from the root by the
/// documented layout, as an outside tool does. The file is not trusted: an inner entry
/// pointing outside it or at a misaligned offset is an error, and every word is read
/// once with a volatile load (the VMM may be writing the table meanwhile).
pub fn mapped_entries(file: &File, entry_bits: u32, max: usize) -> std::io::Result<Vec<(u64, u64)>> {
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let levels = levels_for(entry_bits);
    if levels > t::MAX_LEVELS {
        return Err(bad(format!("a window of 2^{entry_bits} entries")));
    }
    let len = file.metadata()?.len();
    if len < PAGE {
        return Err(bad("the file holds no root page".into()));
    }
    let map_len = usize::try_from(len).map_err(|_| bad("the file is too large to map".into()))?;
    // SAFETY: a new read-only shared mapping of the whole file; nothing else uses this
    // address range; it is unmapped below before returning.
    let p =
        unsafe { libc::mmap(std::ptr::null_mut(), map_len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let words = len / 8;
    let word = |at: u64| -> u64 {
        debug_assert!(at < words);
        // SAFETY: `at < words`: inside the mapping made above, 8-byte aligned.
        u64::from_le(unsafe { std::ptr::read_volatile(p.cast::<u64>().add(at as usize)) })
    };
    let mut out = Vec::new();
    // Depth-first, in index order: (page, level, index prefix). A tree reaches every
    // page once: a page reached twice (a crafted file) ends the walk.
    let mut stack = vec![(0u64, 0u32, 0u64)];
    let mut seen = vec![false; usize::try_from(len / PAGE).unwrap_or(usize::MAX).min(MAX_TABLE_PAGES as usize)];
    seen[0] = true;
    let mut result = Ok(());
    while let Some((page, level, prefix)) = stack.pop() {
        let leaf = level + 1 == levels;
        let mut children = Vec::new();
        for idx in 0..ENTRIES {
            let e = word(page * ENTRIES + idx);
            if e == 0 {
                continue;
            }
            let i = (prefix << LEVEL_BITS) | idx;
            if leaf {
                if out.len() >= max || i >> entry_bits != 0 {
                    break;
                }
                out.push((i, e));
            } else {
                let off = e & !(t::READ | t::WRITE);
                if !off.is_multiple_of(PAGE) || off.checked_add(PAGE).is_none_or(|end| end > len) || off == 0 {
                    result = Err(bad(format!("an inner entry {e:#x} at level {level} points outside the table")));
                    break;
                }
                match seen.get_mut((off / PAGE) as usize) {
                    Some(s) if !*s => *s = true,
                    _ => {
                        result = Err(bad(format!("the page at {off:#x} is reached twice: not a tree")));
                        break;
                    }
                }
                children.push((off / PAGE, level + 1, i));
            }
        }
        if result.is_err() || out.len() >= max {
            break;
        }
        stack.extend(children.into_iter().rev());
    }
    // SAFETY: the mapping made above, of `map_len` bytes, used by nothing now.
    unsafe { libc::munmap(p, map_len) };
    result.map(|()| out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn account(limit: u64) -> Arc<VmDma> {
        let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
        VmDma::new(Arc::new(mem), dma::LockedMemory::new(limit))
    }

    #[test]
    fn memory_follows_what_is_mapped_not_the_window() {
        // 64 GiB window of 4 KiB pages: 2^24 entries, 3 levels.
        let a = account(u64::MAX);
        let mut t = Table::new(24, Arc::clone(&a)).unwrap();
        assert_eq!((t.levels(), t.pages()), (3, 1), "only the root at creation");
        // Map 1 GiB: 2^18 entries.
        for i in 0..(1u64 << 18) {
            t.set(i, (i << 12) | abi::tce::READ).unwrap();
        }
        // 512 leaf pages, 1 mid page, the root: about 2 MiB, not 128 MiB.
        assert_eq!(t.pages(), 512 + 1 + 1);
        assert_eq!(t.bytes(), 514 * 4096);
        assert_eq!(a.account().charged(), t.bytes(), "charged as allocated");
        for i in 0..(1u64 << 18) {
            t.set(i, 0).unwrap();
        }
        assert_eq!(t.pages(), 1, "cleared pages freed bottom-up, the root kept");
        assert_eq!(a.account().charged(), (1 + SPARE_PAGES as u64) * 4096, "the root and the spare pages");
        assert_eq!(a.account().charged(), t.bytes());
        // Mapping again reuses the spare pages: no new charge until they are used up.
        t.set(0, 0x1000 | abi::tce::READ).unwrap();
        assert_eq!((t.pages(), a.account().charged()), (3, (1 + SPARE_PAGES as u64) * 4096));
        assert_eq!(t.get(0), 0x1000 | abi::tce::READ);
        assert_eq!(
            mapped_entries(t.fd(), 24, usize::MAX).unwrap(),
            vec![(0, 0x1000 | abi::tce::READ)],
            "a reused page reads right"
        );
        assert_eq!(t.valid(), vec![(0, 0x1000 | abi::tce::READ)], "a reused page holds nothing stale");
        drop(t);
        assert_eq!(a.account().charged(), 0);
    }

    #[test]
    fn reads_and_clears_never_allocate_and_the_limit_refuses_cleanly() {
        let a = account(2 * 4096);
        let mut t = Table::new(20, Arc::clone(&a)).unwrap(); // 3 levels: root + 2 pages for one entry
        assert_eq!(t.get(12345), 0);
        assert_eq!(t.set(12345, 0), Ok(0));
        assert_eq!(t.pages(), 1);
        let e = t.set(12345, 0x1000 | abi::tce::WRITE).unwrap_err();
        assert!(matches!(e, TableError::NoMemory(_)), "{e}");
        assert_eq!(t.get(12345), 0);
        assert!(t.pages() <= 2, "an inner page may have been taken before the refusal");
        assert_eq!(a.account().charged(), t.bytes(), "the charge equals what is held");
    }

    #[test]
    fn a_reader_refuses_a_crafted_file_instead_of_looping() {
        use std::os::unix::fs::FileExt;
        // Five pages, every inner entry of each pointing at the next: 512^4 paths.
        let f = tempfile_in_memory();
        f.set_len(5 * PAGE).unwrap();
        for p in 0..4u64 {
            let e = (((p + 1) * PAGE) | t::READ | t::WRITE).to_le_bytes();
            for idx in 0..ENTRIES {
                f.write_all_at(&e, p * PAGE + idx * 8).unwrap();
            }
        }
        let e = mapped_entries(&f, 45, usize::MAX).unwrap_err();
        assert!(e.to_string().contains("reached twice"), "{e}");
        // An entry pointing past the file.
        f.write_all_at(&((64 * PAGE) | t::READ).to_le_bytes(), 0).unwrap();
        assert!(mapped_entries(&f, 45, usize::MAX).unwrap_err().to_string().contains("outside"));
    }

    fn tempfile_in_memory() -> File {
        // SAFETY: memfd_create with a NUL-terminated name; the descriptor is owned at once.
        let fd = unsafe { libc::memfd_create(c"test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor owned by nobody else.
        unsafe { File::from_raw_fd(fd) }
    }

    #[test]
    fn the_file_cannot_be_resized_by_another_holder() {
        let t = Table::new(14, account(u64::MAX)).unwrap();
        let other = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/self/fd/{}", t.fd().as_raw_fd()))
            .unwrap();
        assert!(other.set_len(0).is_err(), "a shrink would make the VMM's mapping fault");
        assert!(other.set_len(1 << 40).is_err());
    }

    #[test]
    fn too_many_levels_are_refused() {
        assert_eq!(Table::new(46, account(u64::MAX)).unwrap_err(), TableError::TooLarge(46));
        assert_eq!(Table::new(45, account(u64::MAX)).unwrap().levels(), 5);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        /// Against a flat model: every set/get agrees, the mapped file agrees, the page
        /// count is exactly what the non-zero entries need.
        #[test]
        fn the_tree_behaves_as_a_flat_array(ops in proptest::collection::vec((0u64..1 << 14, 0u64..4), 1..400)) {
            let mut t = Table::new(14, account(u64::MAX)).unwrap(); // 2 levels
            let mut model: BTreeMap<u64, u64> = BTreeMap::new();
            for (i, v) in ops {
                let v = if v == 0 { 0 } else { (i << 12) | v };
                let old = t.set(i, v).unwrap();
                prop_assert_eq!(old, model.get(&i).copied().unwrap_or(0));
                if v == 0 { model.remove(&i); } else { model.insert(i, v); }
            }
            let mapped: BTreeMap<u64, u64> = mapped_entries(t.fd(), 14, usize::MAX).unwrap().into_iter().collect();
            for (i, v) in &model {
                prop_assert_eq!(t.get(*i), *v);
                prop_assert_eq!(mapped.get(i), Some(v));
            }
            prop_assert_eq!(t.valid(), model.iter().map(|(a, b)| (*a, *b)).collect::<Vec<_>>());
            prop_assert_eq!(
                mapped_entries(t.fd(), 14, usize::MAX).unwrap(),
                model.iter().map(|(a, b)| (*a, *b)).collect::<Vec<_>>(),
                "the mapped file, walked as a reader does"
            );
            let leaves: std::collections::BTreeSet<u64> = model.keys().map(|i| i >> 9).collect();
            prop_assert_eq!(t.pages(), 1 + leaves.len() as u64);
            // The first index from `from` whose leaf is present: the start of the next
            // leaf holding an entry, or `from` itself inside one.
            for from in [0u64, 1, 511, 512, 4000, 9000, 16383] {
                let want = leaves.iter().find(|l| **l >= from >> 9).map(|l| (l << 9).max(from));
                prop_assert_eq!(t.next_present(from, 1 << 14), want);
            }
        }

        /// `pages_needed` is exactly what storing a batch then allocates (3 levels: a
        /// batch can need inner and leaf pages, shared by neighbours).
        #[test]
        fn pages_needed_is_what_a_put_allocates(
            before in proptest::collection::vec(0u64..1 << 20, 0..20),
            first in 0u64..(1 << 20) - 2048,
            bits in proptest::collection::vec(0u64..4, 1..2048),
        ) {
            let mut t = Table::new(20, account(u64::MAX)).unwrap();
            for i in before {
                t.set(i, (i << 12) | 1).unwrap();
            }
            let values: Vec<u64> = bits.iter().enumerate().map(|(k, b)| if *b == 0 { 0 } else { ((first + k as u64) << 12) | b }).collect();
            let had = t.pages();
            let need = t.pages_needed(first, &values);
            // Clears only free pages; count what the stores add: set the stores alone.
            let stores: Vec<u64> = values.iter().zip(0..).map(|(v, k)| if *v == 0 { t.get(first + k) } else { *v }).collect();
            t.set_run(first, &stores).unwrap();
            prop_assert_eq!(t.pages() - had, need);
        }
    }
}
