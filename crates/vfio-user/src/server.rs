//! The device process's side of a vfio-user connection.
//!
//! [`Server`] serves a [`Device`] until the VMM goes away. It keeps the protocol's
//! rules itself, as libvfio-user does, so a device only models its registers: VERSION
//! first (major version must match, or the connection closes), DMA windows kept by
//! [`DmaWindows`] (EEXIST / ENOENT / partial-unmap / unmap-all rules), and a
//! [`DeviceDma`] handle through which the device reaches guest memory: in place where
//! a window has a file, by DMA_READ / DMA_WRITE messages (checked by the VMM) where not.

use crate::endpoint::{Endpoint, Error, Message, refuse};
use crate::migration::{Migration, MigrationState};
use crate::proto::{
    self, Command, DEFAULT_MAX_DMA_MAPS, DeviceInfo, DmaAccess, IrqInfo, MAX_DATA_XFER, RegionInfo, Request, SetIrqs,
    Version,
};
use crate::windows::{DmaWindows, Local};
use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Requests read ahead of the one being handled.
pub const REQUEST_QUEUE: usize = 64;

/// A device served over vfio-user. Errors are errnos for the reply.
pub trait Device: Send {
    /// Device information.
    fn info(&self) -> DeviceInfo;
    /// Region `index`, if it exists.
    fn region_info(&self, index: u32) -> Option<RegionInfo>;
    /// Interrupt index `index`, if it exists.
    fn irq_info(&self, index: u32) -> Option<IrqInfo>;
    /// The VMM reads a region.
    fn region_read(&mut self, region: u32, offset: u64, buf: &mut [u8]) -> Result<(), i32>;
    /// The VMM writes a region.
    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), i32>;
    /// Interrupt eventfds are set.
    fn set_irqs(&mut self, irqs: &SetIrqs, fds: Vec<File>) -> Result<(), i32>;
    /// Reset.
    fn reset(&mut self) -> Result<(), i32>;
    /// The file the client may mmap region `index` from (at the region's offset), and
    /// the areas of the region that may be mapped (empty: all of it). None: trapped.
    fn region_mmap(&self, _index: u32) -> Option<(std::os::fd::RawFd, Vec<(u64, u64)>)> {
        None
    }
    /// The device's migration support (None: every DEVICE_FEATURE is refused).
    fn migration(&mut self) -> Option<&mut dyn Migration> {
        None
    }
}

/// Guest memory reached by messages: DMA_READ / DMA_WRITE requests to the VMM, which
/// checks each one against the device's domain.
#[derive(Clone, Debug)]
pub struct DmaMessages {
    ep: Arc<Endpoint>,
    /// The VMM's max_data_xfer_size (learnt from its VERSION).
    xfer: Arc<AtomicUsize>,
}

impl DmaMessages {
    /// Over `ep`, with transfers of at most `MAX_DATA_XFER` until the VMM says less.
    pub fn new(ep: Arc<Endpoint>) -> DmaMessages {
        DmaMessages { ep, xfer: Arc::new(AtomicUsize::new(MAX_DATA_XFER)) }
    }

    fn chunk(&self) -> usize {
        self.xfer.load(Ordering::Relaxed).clamp(1, MAX_DATA_XFER)
    }

    /// Reads guest memory at IOVA `address`.
    pub fn read(&self, address: u64, buf: &mut [u8]) -> Result<(), Error> {
        let chunk = self.chunk();
        for (i, part) in buf.chunks_mut(chunk).enumerate() {
            let a = DmaAccess { address: address.wrapping_add((i * chunk) as u64), count: part.len() as u64 };
            let r = self.ep.request(Command::DmaRead, &a.encode(&[]), &[])?;
            let (_, data) = DmaAccess::decode(&r.payload, true)?;
            if data.len() != part.len() {
                return Err(Error::Proto(proto::ProtoError::BadSize("DMA_READ reply of the wrong size")));
            }
            part.copy_from_slice(data);
        }
        Ok(())
    }

    /// Writes guest memory at IOVA `address`.
    pub fn write(&self, address: u64, data: &[u8]) -> Result<(), Error> {
        let chunk = self.chunk();
        for (i, part) in data.chunks(chunk).enumerate() {
            let a = DmaAccess { address: address.wrapping_add((i * chunk) as u64), count: part.len() as u64 };
            self.ep.request(Command::DmaWrite, &a.encode(part), &[])?;
        }
        Ok(())
    }
}

/// A refused device access to guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaFault;

/// How a vfio-user device reaches guest memory: its windows first (in place), messages
/// for the rest (the VMM checks each one).
#[derive(Clone, Debug)]
pub struct DeviceDma {
    windows: DmaWindows,
    messages: DmaMessages,
}

impl DeviceDma {
    /// Reads `buf.len()` bytes at IOVA `iova`.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        match self.windows.read(iova, buf) {
            Local::Done => Ok(()),
            Local::Fault => Err(DmaFault),
            Local::NotHere => self.messages.read(iova, buf).map_err(|_| DmaFault),
        }
    }

    /// Writes `data` at IOVA `iova`.
    pub fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaFault> {
        match self.windows.write(iova, data) {
            Local::Done => Ok(()),
            Local::Fault => Err(DmaFault),
            Local::NotHere => self.messages.write(iova, data).map_err(|_| DmaFault),
        }
    }

    /// Copies in place when both ranges lie in windows; `None` when the caller must
    /// bounce the bytes through [`DeviceDma::read`] and [`DeviceDma::write`].
    pub fn copy_in_place(&self, src: u64, dst: u64, len: u64) -> Option<Result<(), DmaFault>> {
        match self.windows.copy(src, dst, len) {
            Local::Done => Some(Ok(())),
            Local::Fault => Some(Err(DmaFault)),
            Local::NotHere => None,
        }
    }

    /// The windows (for statistics and tests).
    pub fn windows(&self) -> &DmaWindows {
        &self.windows
    }
}

/// Serves one device on one connection.
pub struct Server {
    ep: Arc<Endpoint>,
    windows: DmaWindows,
    messages: DmaMessages,
}

impl Server {
    /// A server on `ep` accepting up to [`DEFAULT_MAX_DMA_MAPS`] DMA windows.
    pub fn new(ep: Arc<Endpoint>) -> Server {
        Server::with_max_dma_maps(ep, DEFAULT_MAX_DMA_MAPS as usize)
    }

    /// A server holding at most `max` DMA windows (announced as `max_dma_maps`).
    pub fn with_max_dma_maps(ep: Arc<Endpoint>, max: usize) -> Server {
        let messages = DmaMessages::new(Arc::clone(&ep));
        Server { ep, windows: DmaWindows::new(max), messages }
    }

    /// The handle the device reaches guest memory with.
    pub fn dma(&self) -> DeviceDma {
        DeviceDma { windows: self.windows.clone(), messages: self.messages.clone() }
    }

    /// The connection.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.ep
    }

    /// Serves `device` until the VMM closes the connection (or dies, or breaks the
    /// protocol's framing); returns why it ended. On the way out every DMA window is
    /// dropped, as the spec asks of a server whose client went away.
    pub fn serve(&self, device: &mut dyn Device) -> Error {
        // Requests are handled on their own thread, in order, while this one goes on
        // reading: a request whose handling waits for the device's own DMA messages
        // (a stop that lets the descriptor in flight finish, in message mode) gets
        // their replies. The queue is short: a device that stops handling stops
        // reading soon after, and the VMM's deadline judges it.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Message>(REQUEST_QUEUE);
        let why = std::thread::scope(|s| {
            let handler = std::thread::Builder::new().name("vfu-handler".into()).spawn_scoped(s, move || {
                let mut negotiated = false;
                let mut migration = MigrationState::default();
                for m in rx {
                    self.handle(device, &mut negotiated, &mut migration, m);
                }
            });
            let why = match handler {
                Ok(_) => self.ep.run(|m| {
                    // The handler is gone (the device panicked): stop reading at once
                    // rather than drop requests until the peer's deadline.
                    if tx.send(m).is_err() {
                        self.ep.shutdown();
                    }
                }),
                Err(e) => Error::Io(e),
            };
            drop(tx);
            why
        });
        let _ = self.windows.unmap(&proto::DmaUnmap { flags: proto::DMA_UNMAP_FLAG_ALL, address: 0, size: 0 });
        why
    }

    /// As [`Server::serve`], but each request is handled on the reading thread, as
    /// libvfio-user does: a device that stalls in a request stops reading its socket
    /// (tests model such devices with it). A stop in message mode cannot complete here.
    pub fn serve_sequential(&self, device: &mut dyn Device) -> Error {
        let (mut negotiated, mut migration) = (false, MigrationState::default());
        let why = self.ep.run(|m| self.handle(device, &mut negotiated, &mut migration, m));
        let _ = self.windows.unmap(&proto::DmaUnmap { flags: proto::DMA_UNMAP_FLAG_ALL, address: 0, size: 0 });
        why
    }

    /// DEVICE_FEATURE for DMA dirty logging (the server's windows log the device's
    /// in-place writes).
    fn dma_logging(&self, f: &proto::DeviceFeature) -> Result<Vec<u8>, i32> {
        use proto::mig::*;
        let index = f.flags & FEATURE_MASK;
        let (get, set, probe) = (f.flags & FEATURE_GET != 0, f.flags & FEATURE_SET != 0, f.flags & FEATURE_PROBE != 0);
        let report = index == FEATURE_DMA_LOGGING_REPORT;
        if (report && set) || (!report && get) || !(get || set || probe) {
            return Err(libc::EINVAL);
        }
        if probe {
            return Ok(f.encode());
        }
        let u64_at = |o: usize| f.data.get(o..o + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
        match index {
            FEATURE_DMA_LOGGING_START => {
                self.windows.start_logging(u64_at(0).ok_or(libc::EINVAL)?)?;
                Ok(f.encode())
            }
            FEATURE_DMA_LOGGING_STOP => {
                self.windows.stop_logging();
                Ok(f.encode())
            }
            _ => {
                let (iova, len, page) =
                    (u64_at(0).ok_or(libc::EINVAL)?, u64_at(8).ok_or(libc::EINVAL)?, u64_at(16).ok_or(libc::EINVAL)?);
                let bits = self.windows.report(iova, len, page)?;
                let mut data = f.data[..24].to_vec();
                for w in bits {
                    data.extend_from_slice(&w.to_le_bytes());
                }
                let argsz = proto::DeviceFeature::SIZE + data.len() as u32;
                if f.argsz < argsz {
                    return Err(libc::EINVAL);
                }
                Ok(proto::DeviceFeature { argsz, flags: f.flags, data }.encode())
            }
        }
    }

    fn handle(&self, device: &mut dyn Device, negotiated: &mut bool, migration: &mut MigrationState, m: Message) {
        let h = m.header;
        let req = match proto::decode_request(&h, &m.payload) {
            Ok(r) => r,
            Err(e) => {
                refuse(&self.ep, &h, &e);
                if !*negotiated {
                    self.ep.shutdown();
                }
                return;
            }
        };
        if !*negotiated {
            // The spec: the first message is VERSION; its major must be ours.
            match &req {
                Request::Version(v) if v.major == proto::VERSION_MAJOR => {
                    let limits = v.limits();
                    self.messages.xfer.store(limits.max_data_xfer_size, Ordering::Relaxed);
                    *negotiated = true;
                    let mut ours = Version::ours();
                    ours.minor = ours.minor.min(v.minor);
                    ours.capabilities["capabilities"]["max_dma_maps"] = serde_json::json!(self.windows.max());
                    let _ = self.ep.reply(&h, &ours.encode());
                }
                Request::Version(v) => {
                    tracing::warn!("vfio-user: client speaks {}.{}, not {}.x", v.major, v.minor, proto::VERSION_MAJOR);
                    let _ = self.ep.reply_error(&h, libc::ENOTSUP);
                    self.ep.shutdown();
                }
                _ => {
                    tracing::warn!("vfio-user: command {} before VERSION; closing", h.command);
                    let _ = self.ep.reply_error(&h, libc::EINVAL);
                    self.ep.shutdown();
                }
            }
            return;
        }
        if !migration.allows(&req) {
            // A stopped device changes nothing: finish DMA and IRQ changes before STOP.
            let _ = self.ep.reply_error(&h, libc::EINVAL);
            return;
        }
        if let Request::DeviceGetRegionInfo(i, argsz) = req {
            let r = match (device.region_info(i), device.region_mmap(i)) {
                (None, _) => self.ep.reply_error(&h, libc::EINVAL),
                (Some(info), None) => self.ep.reply(&h, &info.encode()),
                (Some(mut info), Some((fd, areas))) => {
                    info.flags |= proto::REGION_MMAP;
                    let payload = if areas.is_empty() { info.encode() } else { info.encode_with_areas(&areas, argsz) };
                    self.ep.reply_with_fds(&h, &payload, &[fd])
                }
            };
            let _ = r;
            return;
        }
        let result: Result<Vec<u8>, i32> = match req {
            Request::Version(_) => Err(libc::EINVAL), // negotiated once
            Request::DeviceGetInfo => Ok(device.info().encode()),
            Request::DeviceGetRegionInfo(..) => Err(libc::EINVAL), // answered above
            Request::DeviceGetIrqInfo(i) => device.irq_info(i).map(|r| r.encode()).ok_or(libc::EINVAL),
            Request::RegionRead(a) => {
                let mut buf = vec![0u8; a.count as usize];
                device.region_read(a.region, a.offset, &mut buf).map(|()| a.encode(&buf))
            }
            Request::RegionWrite(a, data) => device.region_write(a.region, a.offset, &data).map(|()| a.encode(&[])),
            Request::DmaMap(map) => {
                let mut fds = m.fds;
                if fds.len() > 1 { Err(libc::EINVAL) } else { self.windows.map(&map, fds.pop()).map(|()| Vec::new()) }
            }
            Request::DmaUnmap(u) => self.windows.unmap(&u).map(|()| u.encode()),
            Request::DeviceSetIrqs(s) => device.set_irqs(&s, m.fds).map(|()| Vec::new()),
            Request::DeviceReset => device.reset().map(|()| Vec::new()),
            Request::DeviceFeature(f) => match f.flags & proto::mig::FEATURE_MASK {
                proto::mig::FEATURE_DMA_LOGGING_START..=proto::mig::FEATURE_DMA_LOGGING_REPORT => self.dma_logging(&f),
                _ => migration.feature(device.migration(), &f),
            },
            Request::MigDataRead(d) => migration.read(device.migration(), &d),
            Request::MigDataWrite(d, data) => migration.write(device.migration(), &d, &data),
            Request::DmaRead(_) | Request::DmaWrite(..) | Request::Unsupported(_) => Err(libc::ENOTSUP),
        };
        if h.flags & proto::FLAG_NO_REPLY != 0 {
            if let Err(errno) = result {
                tracing::debug!("vfio-user: command {} (no reply wanted) failed: errno {errno}", h.command);
            }
            return;
        }
        let _ = match result {
            Ok(payload) => self.ep.reply(&h, &payload),
            Err(errno) => self.ep.reply_error(&h, errno),
        };
    }
}
