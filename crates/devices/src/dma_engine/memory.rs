//! How the DMA engine reaches guest memory. Three ways, one trait:
//!
//! - [`InProcess`]: a [`dma::DmaSpace`] of the device's domain (the VMM process);
//! - [`SharedFd`]: in the device process, the regions the VMM sent by DMA_MAP with an
//!   fd, mapped here and accessed at memory speed; DMA_UNMAP waits for accesses in
//!   flight (a write lock over the map) before the device acknowledges it;
//! - [`Messages`]: in the device process, DMA_READ / DMA_WRITE messages for everything
//!   not mapped with an fd; the VMM checks each one against the domain.

use dma::{Access, DmaSpace, Iova};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, RwLock};

/// A refused DMA access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemFault {
    /// First IOVA of the refused access.
    pub iova: u64,
}

/// Guest memory as the device sees it: IOVAs of its DMA domain.
pub trait DeviceMemory: Send {
    /// Reads `buf.len()` bytes at `iova`; nothing is read on a fault.
    fn read(&mut self, iova: u64, buf: &mut [u8]) -> Result<(), MemFault>;
    /// Writes `data` at `iova`; nothing is written on a fault.
    fn write(&mut self, iova: u64, data: &[u8]) -> Result<(), MemFault>;
    /// Copies `len` bytes from `src` to `dst`. The default bounces through a buffer,
    /// chunk by chunk; backends with direct access copy once.
    fn copy(&mut self, src: u64, dst: u64, len: u64) -> Result<(), MemFault> {
        bounce_copy(self, src, dst, len)
    }
}

/// Copies through a bounce buffer, chunk by chunk: each chunk is read whole before it
/// is written, so a faulting source writes nothing of that chunk.
pub fn bounce_copy<M: DeviceMemory + ?Sized>(memory: &mut M, src: u64, dst: u64, len: u64) -> Result<(), MemFault> {
    let mut buf = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done) as usize;
        memory.read(src + done, &mut buf[..n])?;
        memory.write(dst + done, &buf[..n])?;
        done += n as u64;
    }
    Ok(())
}

/// Bytes moved per step by chunked operations.
pub const CHUNK: u64 = 256 << 10;

/// The VMM's own access to the domain (the in-process engine).
pub struct InProcess(pub DmaSpace);

impl DeviceMemory for InProcess {
    fn read(&mut self, iova: u64, buf: &mut [u8]) -> Result<(), MemFault> {
        self.0.read(Iova(iova), buf).map_err(|f| MemFault { iova: f.iova.0 })
    }

    fn write(&mut self, iova: u64, data: &[u8]) -> Result<(), MemFault> {
        self.0.write(Iova(iova), data).map_err(|f| MemFault { iova: f.iova.0 })
    }

    /// Both ranges are translated (and so checked) whole before a byte moves, then
    /// copied host to host inside one access section.
    fn copy(&mut self, src: u64, dst: u64, len: u64) -> Result<(), MemFault> {
        let from = self.0.translate(Iova(src), len, Access::Read).map_err(|f| MemFault { iova: f.iova.0 })?;
        let to = self.0.translate(Iova(dst), len, Access::Write).map_err(|f| MemFault { iova: f.iova.0 })?;
        let (mut fs, mut ts) = (from.slices(), to.slices());
        let (mut f, mut t) = (fs.next(), ts.next());
        let (mut foff, mut toff) = (0usize, 0usize);
        while let (Some(a), Some(b)) = (&f, &t) {
            let n = (a.len() - foff).min(b.len() - toff);
            // SAFETY: both slices come from validated translations alive for this
            // scope; the offsets stay inside them. Overlapping source and destination
            // is allowed (copy, not copy_nonoverlapping), as for a memmove.
            unsafe { std::ptr::copy(a.ptr_guard().as_ptr().add(foff), b.ptr_guard_mut().as_ptr().add(toff), n) };
            foff += n;
            toff += n;
            if foff == a.len() {
                f = fs.next();
                foff = 0;
            }
            if toff == b.len() {
                t = ts.next();
                toff = 0;
            }
        }
        Ok(())
    }
}

struct Mapped {
    ptr: usize,
    len: u64,
    writable: bool,
    _fd: File,
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: ptr/len is exactly the mapping made in SharedFd::map, unmapped once.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len as usize) };
    }
}

// SAFETY: the raw mapping is only read and written through the map's lock discipline;
// the pointer is an address, not shared Rust data.
unsafe impl Send for Mapped {}
// SAFETY: as above: accesses go through copies under the read lock.
unsafe impl Sync for Mapped {}

/// Regions mapped with an fd, by IOVA, shared by the device's threads.
#[derive(Default, Clone)]
pub struct SharedFd {
    map: Arc<RwLock<BTreeMap<u64, Mapped>>>,
}

impl SharedFd {
    /// Maps `len` bytes of `fd` at `offset` for IOVA `iova`.
    pub fn map(&self, iova: u64, len: u64, offset: u64, writable: bool, fd: File) -> Result<(), i32> {
        let size = usize::try_from(len).map_err(|_| libc::EINVAL)?;
        let off = libc::off_t::try_from(offset).map_err(|_| libc::EINVAL)?;
        if len == 0 || iova.checked_add(len).is_none() {
            return Err(libc::EINVAL);
        }
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: a fresh shared mapping of a file the VMM passed us; the kernel checks
        // the fd, offset and length; the result is checked below.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), size, prot, libc::MAP_SHARED, fd.as_raw_fd(), off) };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EFAULT));
        }
        let mut m = self.map.write().unwrap_or_else(|e| e.into_inner());
        let end = iova + len;
        if m.range(..end).next_back().is_some_and(|(k, v)| k + v.len > iova) {
            // SAFETY: undo the mapping just made.
            unsafe { libc::munmap(p, size) };
            return Err(libc::EEXIST);
        }
        m.insert(iova, Mapped { ptr: p as usize, len, writable, _fd: fd });
        Ok(())
    }

    /// Unmaps the regions inside `[iova, iova + len)`. Waits for accesses in flight.
    pub fn unmap(&self, iova: u64, len: u64) -> usize {
        let mut m = self.map.write().unwrap_or_else(|e| e.into_inner());
        let keys: Vec<u64> = m.range(iova..iova.saturating_add(len)).map(|(k, _)| *k).collect();
        for k in &keys {
            m.remove(k);
        }
        keys.len()
    }

    /// Host pointer for `[iova, iova + len)` if one region covers it all.
    fn find(m: &BTreeMap<u64, Mapped>, iova: u64, len: u64, write: bool) -> Option<*mut u8> {
        let (k, v) = m.range(..=iova).next_back()?;
        let off = iova - k;
        (off.checked_add(len)? <= v.len && (!write || v.writable)).then(|| (v.ptr + off as usize) as *mut u8)
    }

    /// Reads if one mapped region covers the range; `None` if not mapped here.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Option<()> {
        let m = self.map.read().unwrap_or_else(|e| e.into_inner());
        let p = Self::find(&m, iova, buf.len() as u64, false)?;
        // SAFETY: `find` checked the range lies in a live mapping, kept alive by the
        // read lock held across the copy.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
        Some(())
    }

    /// Writes if one writable mapped region covers the range.
    pub fn write(&self, iova: u64, data: &[u8]) -> Option<()> {
        let m = self.map.read().unwrap_or_else(|e| e.into_inner());
        let p = Self::find(&m, iova, data.len() as u64, true)?;
        // SAFETY: as in `read`, for a writable mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Some(())
    }

    /// Copies within mapped memory in one step if both ranges are mapped here.
    pub fn copy(&self, src: u64, dst: u64, len: u64) -> Option<()> {
        let m = self.map.read().unwrap_or_else(|e| e.into_inner());
        let from = Self::find(&m, src, len, false)?;
        let to = Self::find(&m, dst, len, true)?;
        // SAFETY: both ranges checked inside live mappings held by the read lock.
        unsafe { std::ptr::copy(from, to, usize::try_from(len).ok()?) };
        Some(())
    }
}

/// Device-process memory: mapped regions first, messages for the rest.
pub struct Remote {
    /// Regions mapped with an fd.
    pub shared: SharedFd,
    /// Everything else, checked by the VMM.
    pub messages: Option<vfio_user::server::DmaMessages>,
}

impl DeviceMemory for Remote {
    fn read(&mut self, iova: u64, buf: &mut [u8]) -> Result<(), MemFault> {
        if self.shared.read(iova, buf).is_some() {
            return Ok(());
        }
        match &self.messages {
            Some(m) => m.read(iova, buf).map_err(|_| MemFault { iova }),
            None => Err(MemFault { iova }),
        }
    }

    fn write(&mut self, iova: u64, data: &[u8]) -> Result<(), MemFault> {
        if self.shared.write(iova, data).is_some() {
            return Ok(());
        }
        match &self.messages {
            Some(m) => m.write(iova, data).map_err(|_| MemFault { iova }),
            None => Err(MemFault { iova }),
        }
    }

    fn copy(&mut self, src: u64, dst: u64, len: u64) -> Result<(), MemFault> {
        if self.shared.copy(src, dst, len).is_some() {
            return Ok(());
        }
        // Not both in one mapped region: through a bounce buffer (messages if needed).
        bounce_copy(self, src, dst, len)
    }
}
