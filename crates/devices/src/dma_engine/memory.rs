//! How the DMA engine reaches guest memory. Three ways, one trait:
//!
//! - [`InProcess`]: a [`dma::DmaSpace`] of the device's domain (the VMM process);
//! - [`Remote`]: in the device process, the vfio-user server's DMA windows (the files
//!   the VMM sent with DMA_MAP, reached in place; DMA_UNMAP waits for accesses in
//!   flight) and DMA_READ / DMA_WRITE messages for the rest, which the VMM checks.

use dma::{Access, DmaSpace, Iova};

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

    /// Both ranges are checked whole before a byte moves, then copied host to host
    /// chunk by chunk, each chunk translated in its own access section of at most
    /// [`dma::MAX_SECTION_BYTES`] (an unmap in the domain waits for one chunk, not for
    /// a 1 GiB copy). An unmap racing with the copy can cut it short, as on hardware.
    fn copy(&mut self, src: u64, dst: u64, len: u64) -> Result<(), MemFault> {
        let fault = |f: dma::Fault| MemFault { iova: f.iova.0 };
        self.0.check(Iova(src), len, Access::Read).map_err(fault)?;
        self.0.check(Iova(dst), len, Access::Write).map_err(fault)?;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(dma::MAX_SECTION_BYTES);
            self.copy_chunk(src + done, dst + done, n)?;
            done += n;
        }
        Ok(())
    }
}

impl InProcess {
    fn copy_chunk(&mut self, src: u64, dst: u64, len: u64) -> Result<(), MemFault> {
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

/// Device-process memory: the vfio-user server's windows first (in place), messages
/// for the rest (the VMM checks those).
pub struct Remote(pub vfio_user::server::DeviceDma);

impl DeviceMemory for Remote {
    fn read(&mut self, iova: u64, buf: &mut [u8]) -> Result<(), MemFault> {
        self.0.read(iova, buf).map_err(|_| MemFault { iova })
    }

    fn write(&mut self, iova: u64, data: &[u8]) -> Result<(), MemFault> {
        self.0.write(iova, data).map_err(|_| MemFault { iova })
    }

    fn copy(&mut self, src: u64, dst: u64, len: u64) -> Result<(), MemFault> {
        match self.0.copy_in_place(src, dst, len) {
            Some(r) => r.map_err(|_| MemFault { iova: src }),
            // Not both in windows: through a bounce buffer (messages where needed).
            None => bounce_copy(self, src, dst, len),
        }
    }
}
