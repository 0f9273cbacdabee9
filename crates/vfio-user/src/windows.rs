//! The server's DMA windows: what DMA_MAP / DMA_UNMAP gave the device, following the
//! rules of the spec and of libvfio-user.
//!
//! - A window is `[address, address + size)` with READ/WRITE permissions, backed by a
//!   file the client sent (reached in place) or by nothing (reached by DMA_READ /
//!   DMA_WRITE messages, which the client checks).
//! - DMA_MAP over an existing window fails with EEXIST; no permission, or a file that
//!   cannot back the window (too small, not mappable, read-only for a writable window)
//!   fails with EINVAL / EACCES; more than [`DmaWindows::max`] windows with ENOSPC.
//! - DMA_UNMAP must name one window exactly: nothing mapped there is ENOENT, a range
//!   that cuts a window is EINVAL; the ALL flag removes every window. It returns only
//!   when no access to the window is in flight (accesses hold the table's read lock;
//!   unmap takes it for writing).
//! - Each distinct file (device + inode) is mapped once, whole, however many windows
//!   point into it: a guest that maps one page ten thousand times costs the device
//!   no descriptor and no mapping beyond the first (descriptors are closed at once).
//! - Permissions are checked on every access: a device cannot read a write-only
//!   window through its mapping of the file.

use crate::mapping::FileMapping;
use crate::proto::{DMA_READ_FLAG, DMA_UNMAP_FLAG_ALL, DMA_WRITE_FLAG, DmaMap, DmaUnmap};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, Weak};

/// Most bytes copied under one hold of the table (an unmap waits for one chunk at most).
pub const ACCESS_CHUNK: usize = 1 << 20;

#[derive(Clone, Debug)]
struct Window {
    size: u64,
    flags: u32,
    /// The file mapping and the window's offset in it; None: reached by messages.
    backing: Option<(Arc<FileMapping>, u64)>,
    /// While DMA dirty logging is on: the log of the window's file (one bit per
    /// [`LOG_GRAIN`] of the file, shared by every window into it), set by in-place
    /// writes (writes by messages are the client's to log).
    dirty: Option<Arc<[AtomicU64]>>,
}

#[derive(Default)]
struct Table {
    windows: BTreeMap<u64, Window>,
    files: HashMap<(u64, u64), Vec<Weak<FileMapping>>>,
    /// DMA dirty logging's page size, while it is on.
    logging: Option<u64>,
    /// While logging: one log per mapped file (however many windows point into it).
    logs: Vec<(Weak<FileMapping>, Arc<[AtomicU64]>)>,
}

/// Smallest and largest page size DMA dirty logging takes.
pub const LOG_PAGE_MIN: u64 = 4096;
/// See [`LOG_PAGE_MIN`].
pub const LOG_PAGE_MAX: u64 = 1 << 30;

/// Bytes of guest memory one bit of a file's dirty log covers. Logged windows are
/// aligned to it (address, file offset, size), so every bit lies under one IOVA page.
pub const LOG_GRAIN: u64 = 4096;
/// Most bytes all the dirty logs of a device take: 64 MiB logs 2 TiB of files. Past
/// it, DMA_LOGGING_START (or a DMA_MAP of a new file while logging) fails with ENOMEM.
pub const MAX_LOG_BYTES: u64 = 64 << 20;

/// Marks `[offset, offset + len)` of a file dirty in its log.
fn mark(log: Option<&Arc<[AtomicU64]>>, offset: u64, len: u64) {
    let (Some(bits), true) = (log, len > 0) else { return };
    for g in offset / LOG_GRAIN..=offset.saturating_add(len - 1) / LOG_GRAIN {
        if let Some(w) = bits.get((g / 64) as usize) {
            w.fetch_or(1 << (g % 64), Ordering::Relaxed);
        }
    }
}

/// Clears bits `first..first + count` of a log; true if any was set.
fn take_bits(bits: &[AtomicU64], first: u64, count: u64) -> bool {
    let mut any = false;
    let (mut g, end) = (first, first.saturating_add(count));
    while g < end {
        let (word, bit) = ((g / 64) as usize, g % 64);
        let n = (64 - bit).min(end - g);
        let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << bit };
        if let Some(w) = bits.get(word) {
            any |= w.fetch_and(!mask, Ordering::AcqRel) & mask != 0;
        }
        g += n;
    }
    any
}

/// A window can be logged: aligned to [`LOG_GRAIN`] in IOVA, file offset and size.
fn loggable(address: u64, offset: u64, size: u64) -> bool {
    address.is_multiple_of(LOG_GRAIN) && offset.is_multiple_of(LOG_GRAIN) && size.is_multiple_of(LOG_GRAIN)
}

/// What a local access found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Local {
    /// Done in place.
    Done,
    /// Refused: the window does not allow it, or its file shrank under it.
    Fault,
    /// Exported by DMA_MAP, but not reachable in place (a window without a file, a
    /// permission the window lacks, a range across windows): ask the client
    /// (messages), which checks it and records a fault.
    NotHere,
}

/// A device's DMA windows, shared by its threads.
#[derive(Clone)]
pub struct DmaWindows {
    table: Arc<RwLock<Table>>,
    max: usize,
}

impl std::fmt::Debug for DmaWindows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaWindows").field("windows", &self.len()).field("max", &self.max).finish()
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// (device, inode, size, writable descriptor, sealed against shrinking) of `fd`.
fn inspect(fd: &File) -> Result<((u64, u64), u64, bool, bool), i32> {
    // SAFETY: fstat writes only into the zeroed struct we pass.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open (we own it); st is valid for writes.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(errno());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(libc::EINVAL); // only files (memfds included) back DMA windows
    }
    // SAFETY: F_GETFL / F_GET_SEALS on an open descriptor; no memory is passed.
    let (fl, seals) =
        unsafe { (libc::fcntl(fd.as_raw_fd(), libc::F_GETFL), libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS)) };
    let writable = fl >= 0 && fl & libc::O_ACCMODE == libc::O_RDWR;
    let sealed = seals > 0 && seals & libc::F_SEAL_SHRINK != 0;
    Ok(((st.st_dev, st.st_ino), u64::try_from(st.st_size).unwrap_or(0), writable, sealed))
}

impl DmaWindows {
    /// An empty table holding at most `max` windows.
    pub fn new(max: usize) -> DmaWindows {
        DmaWindows { table: Arc::default(), max }
    }

    /// Most windows held at once.
    pub fn max(&self) -> usize {
        self.max
    }

    fn read_table(&self) -> RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Windows held.
    pub fn len(&self) -> usize {
        self.read_table().windows.len()
    }

    /// True when no window is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Distinct file mappings held (one per file, whatever the number of windows).
    pub fn mapped_files(&self) -> usize {
        let t = self.read_table();
        let mut seen: Vec<*const FileMapping> =
            t.windows.values().filter_map(|w| w.backing.as_ref().map(|(m, _)| Arc::as_ptr(m))).collect();
        seen.sort();
        seen.dedup();
        seen.len()
    }

    /// DMA_MAP. Errors are errnos for the reply.
    pub fn map(&self, m: &DmaMap, fd: Option<File>) -> Result<(), i32> {
        if m.flags & (DMA_READ_FLAG | DMA_WRITE_FLAG) == 0 {
            return Err(libc::EINVAL);
        }
        let end = m.address.checked_add(m.size).filter(|_| m.size > 0).ok_or(libc::EINVAL)?;
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        if t.windows.range(..end).next_back().is_some_and(|(a, w)| a + w.size > m.address) {
            return Err(libc::EEXIST);
        }
        if t.windows.len() >= self.max {
            return Err(libc::ENOSPC);
        }
        if fd.is_some() && t.logging.is_some() && !loggable(m.address, m.offset, m.size) {
            return Err(libc::EINVAL); // it could not be logged
        }
        let backing = match fd {
            None => None,
            Some(fd) => Some(Self::back(&mut t, m, &fd)?),
        };
        let dirty = match (&backing, t.logging) {
            (Some((mapping, _)), Some(_)) => Some(Self::log_of(&mut t, mapping)?),
            _ => None,
        };
        t.windows.insert(m.address, Window { size: m.size, flags: m.flags, backing, dirty });
        Ok(())
    }

    /// The dirty log of `mapping`'s file, made if it has none yet (within
    /// [`MAX_LOG_BYTES`] for all of them).
    fn log_of(t: &mut Table, mapping: &Arc<FileMapping>) -> Result<Arc<[AtomicU64]>, i32> {
        t.logs.retain(|(m, _)| m.strong_count() > 0);
        if let Some((_, log)) = t.logs.iter().find(|(m, _)| std::ptr::eq(m.as_ptr(), Arc::as_ptr(mapping))) {
            return Ok(Arc::clone(log));
        }
        let words = (mapping.len() as u64).div_ceil(LOG_GRAIN).div_ceil(64);
        let held: u64 = t.logs.iter().map(|(_, l)| l.len() as u64 * 8).sum();
        if held.saturating_add(words.saturating_mul(8)) > MAX_LOG_BYTES {
            return Err(libc::ENOMEM);
        }
        let log: Arc<[AtomicU64]> = (0..words).map(|_| AtomicU64::new(0)).collect();
        t.logs.push((Arc::downgrade(mapping), Arc::clone(&log)));
        Ok(log)
    }

    /// DMA dirty logging on, with `page` bytes per bit of a report: every
    /// file-backed window, and those mapped later, logs the device's in-place writes.
    /// The logs are kept per file, not per window ([`LOG_GRAIN`] per bit, at most
    /// [`MAX_LOG_BYTES`] in all: ENOMEM beyond), so windows into one file cost one log
    /// however many or large they are. Again with the same size: nothing changes;
    /// another size, or a file-backed window not aligned to [`LOG_GRAIN`]: EINVAL.
    pub fn start_logging(&self, page: u64) -> Result<(), i32> {
        if !page.is_power_of_two() || !(LOG_PAGE_MIN..=LOG_PAGE_MAX).contains(&page) {
            return Err(libc::EINVAL);
        }
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        match t.logging {
            Some(p) if p == page => return Ok(()),
            Some(_) => return Err(libc::EINVAL),
            None => {}
        }
        let backed: Vec<(u64, Arc<FileMapping>)> = t
            .windows
            .iter()
            .filter_map(|(a, w)| w.backing.as_ref().map(|(m, off)| (a, m, off, w.size)))
            .map(|(a, m, off, size)| if loggable(*a, *off, size) { Ok((*a, Arc::clone(m))) } else { Err(libc::EINVAL) })
            .collect::<Result<_, _>>()?;
        let mut logs = Vec::new();
        for (a, m) in backed {
            match Self::log_of(&mut t, &m) {
                Ok(log) => logs.push((a, log)),
                Err(e) => {
                    t.logs.clear();
                    return Err(e);
                }
            }
        }
        for (a, log) in logs {
            if let Some(w) = t.windows.get_mut(&a) {
                w.dirty = Some(log);
            }
        }
        t.logging = Some(page);
        Ok(())
    }

    /// DMA dirty logging off: the logs go.
    pub fn stop_logging(&self) {
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        t.logging = None;
        t.logs.clear();
        for w in t.windows.values_mut() {
            w.dirty = None;
        }
    }

    /// Bytes the dirty logs take now.
    pub fn log_bytes(&self) -> u64 {
        self.read_table().logs.iter().map(|(_, l)| l.len() as u64 * 8).sum()
    }

    /// The dirty bits of `[iova, iova + len)`, `page` bytes per bit, LSB first in u64
    /// words; reading clears them. The range may span windows (libvfio-user asks for
    /// one window's start; its FIXME says any range should work, and here it does);
    /// pages in no logged window read as clean (writes by messages are the client's
    /// to log). A page is dirty if the device wrote the file behind it through any
    /// window (logs are per file: two windows onto one page share its bit, and the
    /// first report of either takes it). Logging off, another page size or a zero
    /// length: EINVAL.
    pub fn report(&self, iova: u64, len: u64, page: u64) -> Result<Vec<u64>, i32> {
        let t = self.read_table();
        if t.logging != Some(page) || len < page || !iova.is_multiple_of(page) {
            return Err(libc::EINVAL);
        }
        let end = iova.checked_add(len).ok_or(libc::EINVAL)?;
        let pages = len.div_ceil(page);
        // The bitmap travels in one reply: at most max_data_xfer_size.
        if pages.div_ceil(64).saturating_mul(8) > (crate::proto::MAX_DATA_XFER - 24) as u64 {
            return Err(libc::EINVAL);
        }
        let mut out = vec![0u64; pages.div_ceil(64) as usize];
        let first = t.windows.range(..=iova).next_back().map_or(iova, |(a, _)| *a);
        for (&start, w) in t.windows.range(first..end) {
            let (Some(bits), Some((_, base))) = (&w.dirty, &w.backing) else { continue };
            let (lo, hi) = (start.max(iova), start.saturating_add(w.size).min(end));
            let mut at = lo;
            while at < hi {
                // The part of IOVA page `p` inside the window, as file grains.
                let p = at / page;
                let next = p.saturating_add(1).saturating_mul(page).min(hi);
                let (g0, g1) = ((base + (at - start)) / LOG_GRAIN, (base + (next - start)).div_ceil(LOG_GRAIN));
                let op = p - iova / page;
                if take_bits(bits, g0, g1 - g0)
                    && let Some(o) = out.get_mut((op / 64) as usize)
                {
                    *o |= 1 << (op % 64);
                }
                at = next;
            }
        }
        Ok(out)
    }

    /// Finds or makes the mapping of `fd`'s file that backs window `m`.
    fn back(t: &mut Table, m: &DmaMap, fd: &File) -> Result<(Arc<FileMapping>, u64), i32> {
        let (id, size, fd_writable, sealed) = inspect(fd)?;
        let need_end = m.offset.checked_add(m.size).ok_or(libc::EINVAL)?;
        if need_end > size {
            return Err(libc::EINVAL); // the file cannot back the window: refuse now, not SIGBUS later
        }
        let want_write = m.flags & DMA_WRITE_FLAG != 0;
        if want_write && !fd_writable {
            return Err(libc::EACCES);
        }
        let list = t.files.entry(id).or_default();
        list.retain(|w| w.strong_count() > 0);
        let found = list
            .iter()
            .filter_map(Weak::upgrade)
            .find(|f| f.len() as u64 >= need_end && (f.writable() || !want_write) && !f.is_broken());
        let mapping = match found {
            Some(f) => f,
            None => {
                let len = usize::try_from(size).map_err(|_| libc::EINVAL)?;
                let f = Arc::new(
                    FileMapping::new(fd, len, id, fd_writable, sealed)
                        .map_err(|e| e.raw_os_error().unwrap_or(libc::ENOMEM))?,
                );
                list.push(Arc::downgrade(&f));
                f
            }
        };
        Ok((mapping, m.offset))
    }

    /// DMA_UNMAP: returns when no access to the window is in flight.
    pub fn unmap(&self, u: &DmaUnmap) -> Result<(), i32> {
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        if u.flags & DMA_UNMAP_FLAG_ALL != 0 {
            t.windows.clear();
            t.files.clear();
            return Ok(());
        }
        let end = u.address.checked_add(u.size).ok_or(libc::EINVAL)?;
        match t.windows.get(&u.address) {
            Some(w) if w.size == u.size => {
                t.windows.remove(&u.address);
                Ok(())
            }
            Some(_) => Err(libc::EINVAL),
            None => {
                let overlaps = t.windows.range(..end).next_back().is_some_and(|(a, w)| a + w.size > u.address);
                Err(if overlaps { libc::EINVAL } else { libc::ENOENT })
            }
        }
    }

    /// Host address of `[iova, iova + len)` if one file-backed window covers it and
    /// allows `flag`; `Err(Local)` says why not.
    fn find(t: &Table, iova: u64, len: u64, flag: u32) -> Result<(usize, &Arc<FileMapping>), Local> {
        Self::find_window(t, iova, len, flag).map(|(p, m, _, _)| (p, m))
    }

    /// As `find`, with the dirty log of the window's file and the access's offset in
    /// that file.
    #[allow(clippy::type_complexity)]
    fn find_window(
        t: &Table,
        iova: u64,
        len: u64,
        flag: u32,
    ) -> Result<(usize, &Arc<FileMapping>, Option<&Arc<[AtomicU64]>>, u64), Local> {
        let (start, w) = t.windows.range(..=iova).next_back().ok_or(Local::NotHere)?;
        let off = iova - start;
        if off.checked_add(len).is_none_or(|e| e > w.size) {
            return Err(Local::NotHere);
        }
        let Some((mapping, base)) = &w.backing else { return Err(Local::NotHere) };
        if w.flags & flag == 0 {
            return Err(Local::NotHere); // the client checks and records the fault
        }
        if mapping.is_broken() {
            return Err(Local::Fault);
        }
        Ok((mapping.addr(base + off), mapping, w.dirty.as_ref(), base + off))
    }

    /// Where a whole access would go: in place when one file-backed window covers all
    /// of it; to the client when windows cover it otherwise; refused here when some
    /// byte of it was never exported by DMA_MAP (the spec allows DMA_READ / DMA_WRITE
    /// only of exported ranges).
    fn whole(&self, iova: u64, len: u64, flag: u32) -> Local {
        let t = self.read_table();
        match Self::find(&t, iova, len, flag) {
            Ok(_) => Local::Done,
            Err(Local::NotHere) if !Self::exported(&t, iova, len) => Local::Fault,
            Err(why) => why,
        }
    }

    /// True if windows cover every byte of `[iova, iova + len)`.
    fn exported(t: &Table, iova: u64, len: u64) -> bool {
        let Some(end) = iova.checked_add(len) else { return false };
        let mut at = iova;
        let first = t.windows.range(..=iova).next_back().map_or(iova, |(a, _)| *a);
        for (&start, w) in t.windows.range(first..end) {
            if start > at {
                return false;
            }
            at = at.max(start.saturating_add(w.size));
            if at >= end {
                return true;
            }
        }
        at >= end && len > 0
    }

    /// Reads in place if one window covers the range. Longer than [`ACCESS_CHUNK`]:
    /// checked whole, then copied a chunk per hold of the table; an unmap racing with
    /// it cuts it short (a fault), as on hardware.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Local {
        let whole = self.whole(iova, buf.len() as u64, DMA_READ_FLAG);
        if whole != Local::Done {
            return whole;
        }
        for (i, chunk) in buf.chunks_mut(ACCESS_CHUNK).enumerate() {
            let at = iova.wrapping_add((i * ACCESS_CHUNK) as u64);
            let t = self.read_table();
            let Ok((p, mapping)) = Self::find(&t, at, chunk.len() as u64, DMA_READ_FLAG) else { return Local::Fault };
            // SAFETY: `find` checked the range lies in a live window whose mapping is
            // held by the table, and the read lock keeps it there across the copy; a
            // SIGBUS inside it is absorbed (mapping.rs) and reported just below.
            unsafe { std::ptr::copy_nonoverlapping(p as *const u8, chunk.as_mut_ptr(), chunk.len()) };
            if mapping.is_broken() {
                return Local::Fault;
            }
        }
        Local::Done
    }

    /// Writes in place if one writable window covers the range (chunked as `read`).
    pub fn write(&self, iova: u64, data: &[u8]) -> Local {
        let whole = self.whole(iova, data.len() as u64, DMA_WRITE_FLAG);
        if whole != Local::Done {
            return whole;
        }
        for (i, chunk) in data.chunks(ACCESS_CHUNK).enumerate() {
            let at = iova.wrapping_add((i * ACCESS_CHUNK) as u64);
            let t = self.read_table();
            let Ok((p, mapping, dirty, off)) = Self::find_window(&t, at, chunk.len() as u64, DMA_WRITE_FLAG) else {
                return Local::Fault;
            };
            // SAFETY: as in `read`, for a window that allows writes (its mapping was
            // made writable: `back` refuses writable windows on read-only files).
            unsafe { std::ptr::copy_nonoverlapping(chunk.as_ptr(), p as *mut u8, chunk.len()) };
            mark(dirty, off, chunk.len() as u64);
            if mapping.is_broken() {
                return Local::Fault;
            }
        }
        Local::Done
    }

    /// Copies in place if the source and the destination each lie in one window
    /// (chunked as `read`).
    pub fn copy(&self, src: u64, dst: u64, len: u64) -> Local {
        match (self.whole(src, len, DMA_READ_FLAG), self.whole(dst, len, DMA_WRITE_FLAG)) {
            (Local::Done, Local::Done) => {}
            (Local::Fault, _) | (_, Local::Fault) => return Local::Fault,
            _ => return Local::NotHere,
        }
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ACCESS_CHUNK as u64);
            let t = self.read_table();
            let from = Self::find(&t, src.wrapping_add(done), n, DMA_READ_FLAG);
            let to = Self::find_window(&t, dst.wrapping_add(done), n, DMA_WRITE_FLAG);
            let (Ok((f, fm)), Ok((d, dm, dirty, off))) = (from, to) else { return Local::Fault };
            // SAFETY: both ranges checked inside live windows held by the read lock;
            // overlap is allowed (memmove semantics, as a device copy within memory).
            unsafe { std::ptr::copy(f as *const u8, d as *mut u8, n as usize) };
            mark(dirty, off, n);
            if fm.is_broken() || dm.is_broken() {
                return Local::Fault;
            }
            done += n;
        }
        Local::Done
    }
}
