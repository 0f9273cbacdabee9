//! DMA for an assigned device process: the endpoint's mappings forwarded as DMA_MAP /
//! DMA_UNMAP windows (in the endpoint's order and batches), and the device's DMA_READ /
//! DMA_WRITE messages checked through the endpoint.

use dma::{Access, DmaSpace, Iova, MapObserver, Mapping};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vfio_user::client::{Client, DmaHandler};
use vfio_user::proto::{self, DmaMap};

/// How a device process reaches guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IommuMode {
    /// DMA_MAP with the file behind guest memory: the device maps what the domain maps.
    SharedFd,
    /// No file is shared: every access is a DMA_READ / DMA_WRITE message.
    Messages,
}

impl std::str::FromStr for IommuMode {
    type Err = String;
    fn from_str(s: &str) -> Result<IommuMode, String> {
        match s {
            "shared" | "shared-fd" => Ok(IommuMode::SharedFd),
            "messages" => Ok(IommuMode::Messages),
            _ => Err(format!("'{s}' is not an IOMMU mode; use shared or messages")),
        }
    }
}

/// Answers a device's DMA_READ / DMA_WRITE: every access checked through its endpoint.
pub struct EndpointDma(pub Mutex<DmaSpace>);

impl DmaHandler for EndpointDma {
    fn dma_read(&self, address: u64, buf: &mut [u8]) -> Result<(), i32> {
        let space = self.0.lock().unwrap_or_else(|e| e.into_inner());
        space.read(Iova(address), buf).map_err(|_| libc::EFAULT)
    }

    fn dma_write(&self, address: u64, data: &[u8]) -> Result<(), i32> {
        let space = self.0.lock().unwrap_or_else(|e| e.into_inner());
        space.write(Iova(address), data).map_err(|_| libc::EFAULT)
    }
}

/// What the forwarder needs of the function it forwards for.
pub trait Forwarding: Send + Sync {
    /// The connection, while the device is alive.
    fn client(&self) -> Option<Arc<Client>>;
    /// The device failed to let go of memory (or to answer): cut it off now.
    fn cut_off(&self, why: &str);
}

/// A DMA_MAP window and the file it maps (none in message mode).
type Window = (DmaMap, Option<Arc<std::fs::File>>);

/// Turns the endpoint's mappings into DMA windows of the device process.
pub struct ForwardMaps {
    pub(crate) owner: std::sync::Weak<dyn Forwarding>,
    /// Guest memory devices reach, with the files behind it.
    pub(crate) memory: Arc<::dma::VmDma>,
    pub(crate) mode: IommuMode,
    /// Windows the device holds now, against the limit it announced (max_dma_maps).
    pub(crate) windows: AtomicU64,
}

fn dma_flags(m: &Mapping) -> u32 {
    let mut f = 0;
    if m.perm.allows(Access::Read) {
        f |= proto::DMA_READ_FLAG;
    }
    if m.perm.allows(Access::Write) {
        f |= proto::DMA_WRITE_FLAG;
    }
    f
}

impl ForwardMaps {
    /// The DMA_MAP windows of a mapping: one per piece backed by one file (shared
    /// mode), or the whole mapping without a file (message mode).
    fn windows_of(&self, m: &Mapping) -> Result<Vec<Window>, String> {
        let flags = dma_flags(m);
        if self.mode == IommuMode::Messages {
            return Ok(vec![(DmaMap { flags, offset: 0, address: m.iova.0, size: m.size }, None)]);
        }
        let mut out = Vec::new();
        let mut done = 0;
        while done < m.size {
            let gpa = m.gpa.0 + done;
            let (fd, offset, avail) =
                self.memory.backing_of(gpa).ok_or_else(|| format!("guest-physical {gpa:#x} has no file behind it"))?;
            let size = avail.min(m.size - done);
            out.push((DmaMap { flags, offset, address: m.iova.0 + done, size }, Some(fd)));
            done += size;
        }
        Ok(out)
    }

    fn unmap_windows(&self, client: &Client, owner: &dyn Forwarding, windows: &[(u64, u64)]) {
        if windows.is_empty() {
            return;
        }
        if let Err(e) = client.dma_unmap_batch(windows) {
            owner.cut_off(&format!("it did not acknowledge DMA_UNMAP: {e}"));
        }
        self.windows.fetch_sub(windows.len() as u64, Ordering::Relaxed);
    }
}

impl MapObserver for ForwardMaps {
    fn mapped(&self, maps: &[Mapping]) -> Result<(), String> {
        let owner = self.owner.upgrade().ok_or("the device is gone")?;
        let client = owner.client().ok_or("the device is gone")?;
        let mut windows = Vec::new();
        for m in maps {
            windows.extend(self.windows_of(m)?);
        }
        let max = client.limits().max_dma_maps;
        let held = self.windows.fetch_add(windows.len() as u64, Ordering::Relaxed);
        if held + windows.len() as u64 > max {
            self.windows.fetch_sub(windows.len() as u64, Ordering::Relaxed);
            return Err(format!("the device holds {held} DMA windows of the {max} it accepts"));
        }
        let batch: Vec<(DmaMap, Option<RawFd>)> =
            windows.iter().map(|(d, f)| (*d, f.as_ref().map(|f| f.as_raw_fd()))).collect();
        let results = client.dma_map_batch(&batch);
        if let Some(e) = results.iter().find_map(|r| r.as_ref().err()) {
            // Take back what the device did map: the domain undoes the whole batch.
            let made: Vec<(u64, u64)> = windows
                .iter()
                .zip(&results)
                .filter(|(_, r)| r.is_ok())
                .map(|((m, _), _)| (m.address, m.size))
                .collect();
            let why = format!("the device refused DMA_MAP: {e}");
            self.windows.fetch_sub((windows.len() - made.len()) as u64, Ordering::Relaxed);
            self.unmap_windows(&client, owner.as_ref(), &made);
            return Err(why);
        }
        Ok(())
    }

    fn unmapped(&self, maps: &[Mapping]) {
        let Some(owner) = self.owner.upgrade() else { return };
        let Some(client) = owner.client() else { return };
        let mut windows = Vec::new();
        for m in maps {
            match self.windows_of(m) {
                Ok(w) => windows.extend(w.into_iter().map(|(d, _)| (d.address, d.size))),
                Err(e) => tracing::error!("unmapping {:#x}: {e}", m.iova.0),
            }
        }
        self.unmap_windows(&client, owner.as_ref(), &windows);
    }
}
