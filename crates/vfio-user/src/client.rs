//! The VMM's side of a vfio-user connection.
//!
//! Every call is bounded by the connection's timeout (see [`crate::endpoint`]): a
//! device that does not take a message or answer a request in time is declared dead,
//! the connection closes, and the owner's `on_close` runs once.

use crate::endpoint::{Endpoint, Error, Message, refuse};
use crate::proto::{
    self, Command, DeviceInfo, DmaMap, DmaUnmap, IrqInfo, Limits, RegionAccess, RegionInfo, Request, SetIrqs, Version,
};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Answers the device's DMA_READ / DMA_WRITE (regions mapped without an fd): the VMM
/// checks each one against the device's DMA domain. Errors are errnos for the reply.
pub trait DmaHandler: Send + Sync {
    /// The device reads guest memory at IOVA `address`.
    fn dma_read(&self, address: u64, buf: &mut [u8]) -> Result<(), i32>;
    /// The device writes guest memory at IOVA `address`.
    fn dma_write(&self, address: u64, data: &[u8]) -> Result<(), i32>;
}

/// Called once when the connection ends, with the reason (device process death).
pub type OnClose = Box<dyn FnOnce(&Error) + Send>;

/// Regions the client reads at connect time (PCI has 9; more is a malformed device).
pub const MAX_REGIONS: u32 = 64;
/// IRQ indexes the client reads at connect time (PCI has 5).
pub const MAX_IRQ_INDEXES: u32 = 16;
/// A device reset may take this many timeouts (the spec warns it can be slow).
pub const RESET_TIMEOUT_FACTOR: u32 = 4;

/// A region the device offers for mmap: the file (mapped at the region's offset) and
/// the areas that may be mapped (None: the whole region).
#[derive(Clone, Debug)]
pub struct RegionMmap {
    /// The file.
    pub fd: Arc<std::fs::File>,
    /// Mappable (offset, size) areas of the region, from its sparse mmap capability.
    pub areas: Option<Vec<(u64, u64)>>,
}

/// A connected vfio-user device.
pub struct Client {
    ep: Arc<Endpoint>,
    reader: Option<JoinHandle<()>>,
    info: DeviceInfo,
    regions: Vec<RegionInfo>,
    mmaps: Vec<Option<RegionMmap>>,
    irqs: Vec<IrqInfo>,
    limits: Limits,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("info", &self.info).field("closed", &self.ep.is_closed()).finish()
    }
}

fn serve_dma(ep: &Endpoint, dma: &dyn DmaHandler, m: Message) {
    match proto::decode_request(&m.header, &m.payload) {
        Ok(Request::DmaRead(a)) => {
            let mut data = vec![0u8; a.count as usize];
            let _ = match dma.dma_read(a.address, &mut data) {
                Ok(()) => ep.reply(&m.header, &a.encode(&data)),
                Err(errno) => ep.reply_error(&m.header, errno),
            };
        }
        Ok(Request::DmaWrite(a, data)) => {
            let _ = match dma.dma_write(a.address, &data) {
                Ok(()) => ep.reply(&m.header, &a.encode(&[])),
                Err(errno) => ep.reply_error(&m.header, errno),
            };
        }
        Ok(_) => {
            if m.header.flags & proto::FLAG_NO_REPLY == 0 {
                let _ = ep.reply_error(&m.header, libc::ENOTSUP);
            }
        }
        Err(e) => refuse(ep, &m.header, &e),
    }
}

impl Client {
    /// Connects over `stream` with the default timeout: starts the reader (which
    /// answers the device's DMA requests through `dma`), negotiates the version and
    /// reads the device's regions and interrupts. `on_close` runs when the connection
    /// ends, whatever ends it (the device's death, a timeout, [`Client::close`]).
    pub fn connect(stream: UnixStream, dma: Arc<dyn DmaHandler>, on_close: OnClose) -> Result<Client, Error> {
        Client::connect_with_timeout(stream, dma, on_close, crate::endpoint::DEFAULT_TIMEOUT)
    }

    /// As [`Client::connect`]; the device must take each message and answer each
    /// request within `timeout`, or it is declared dead.
    pub fn connect_with_timeout(
        stream: UnixStream,
        dma: Arc<dyn DmaHandler>,
        on_close: OnClose,
        timeout: Duration,
    ) -> Result<Client, Error> {
        let ep = Endpoint::with_timeout(stream, timeout);
        let e = Arc::clone(&ep);
        let reader = std::thread::Builder::new()
            .name("vfu-client".into())
            .spawn(move || {
                let why = e.run(|m| serve_dma(&e, dma.as_ref(), m));
                on_close(&why);
            })
            .map_err(Error::Io)?;
        let mut client = Client {
            ep,
            reader: Some(reader),
            info: DeviceInfo::default(),
            regions: vec![],
            mmaps: vec![],
            irqs: vec![],
            limits: Limits::default(),
        };
        let reply = client.ep.request(Command::Version, &Version::ours().encode(), &[])?;
        let v = Version::decode(&reply.payload)?;
        if v.major != proto::VERSION_MAJOR {
            return Err(Error::Proto(proto::ProtoError::BadVersion(format!("server speaks {}.{}", v.major, v.minor))));
        }
        client.limits = v.limits();
        let info = DeviceInfo::decode(
            &client.ep.request(Command::DeviceGetInfo, &DeviceInfo::default().encode(), &[])?.payload,
        )?;
        client.info = info;
        for index in 0..info.num_regions.min(MAX_REGIONS) {
            let mut req = RegionInfo { index, ..Default::default() }.encode();
            req[0..4].copy_from_slice(&proto::REGION_INFO_ARGSZ.to_le_bytes());
            let mut r = client.ep.request(Command::DeviceGetRegionInfo, &req, &[])?;
            let ri = RegionInfo::decode(&r.payload)?;
            let mmap = match (ri.flags & proto::REGION_MMAP != 0, r.fds.pop()) {
                (true, Some(fd)) => Some(RegionMmap { fd: Arc::new(fd), areas: proto::sparse_areas(&r.payload, &ri)? }),
                _ => None,
            };
            client.regions.push(ri);
            client.mmaps.push(mmap);
        }
        for index in 0..info.num_irqs.min(MAX_IRQ_INDEXES) {
            let req = IrqInfo { index, ..Default::default() }.encode();
            let r = client.ep.request(Command::DeviceGetIrqInfo, &req, &[])?;
            client.irqs.push(IrqInfo::decode(&r.payload)?);
        }
        Ok(client)
    }

    /// The device's information.
    pub fn info(&self) -> DeviceInfo {
        self.info
    }

    /// What the device announced in its VERSION reply.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Region `index`.
    pub fn region(&self, index: u32) -> Option<RegionInfo> {
        self.regions.get(index as usize).copied()
    }

    /// How region `index` may be mapped, if the device offered it.
    pub fn region_mmap(&self, index: u32) -> Option<RegionMmap> {
        self.mmaps.get(index as usize).cloned().flatten()
    }

    /// Interrupt index `index`.
    pub fn irq(&self, index: u32) -> Option<IrqInfo> {
        self.irqs.get(index as usize).copied()
    }

    /// True once the device is gone.
    pub fn is_closed(&self) -> bool {
        self.ep.is_closed()
    }

    /// Maps windows for DMA, as one batch: with an fd (and the offset in it) the
    /// device maps the memory itself; without, it reaches it by DMA_READ/DMA_WRITE.
    /// With a device that announced posted DMA_MAP the messages go with No_reply
    /// (ordered before every later request, so before any doorbell) and every entry is
    /// reported a success once sent; otherwise they are pipelined and every reply is
    /// awaited (one round trip for the batch). Returns each window's outcome, in order.
    pub fn dma_map_batch(&self, maps: &[(DmaMap, Option<RawFd>)]) -> Vec<Result<(), Error>> {
        if self.limits.posted_dma_map {
            let mut out = Vec::with_capacity(maps.len());
            for (map, fd) in maps {
                let payload = map.encode();
                let header = proto::Header {
                    id: 0,
                    command: Command::DmaMap as u16,
                    size: (proto::HEADER_SIZE + payload.len()) as u32,
                    flags: proto::FLAG_NO_REPLY,
                    error: 0,
                };
                let fds: Vec<RawFd> = fd.iter().copied().collect();
                out.push(self.ep.send(header, &payload, &fds));
            }
            return out;
        }
        let reqs: Vec<(Command, Vec<u8>, Vec<RawFd>)> =
            maps.iter().map(|(m, fd)| (Command::DmaMap, m.encode(), fd.iter().copied().collect())).collect();
        self.ep.request_many(&reqs).into_iter().map(|r| r.map(|_| ())).collect()
    }

    /// Unmaps windows, as one pipelined batch; returns when the device acknowledged
    /// every one (it no longer touches them), or the first failure once all were
    /// collected.
    pub fn dma_unmap_batch(&self, windows: &[(u64, u64)]) -> Result<(), Error> {
        let reqs: Vec<(Command, Vec<u8>, Vec<RawFd>)> = windows
            .iter()
            .map(|&(address, size)| (Command::DmaUnmap, DmaUnmap { flags: 0, address, size }.encode(), vec![]))
            .collect();
        self.ep.request_many(&reqs).into_iter().find_map(Result::err).map_or(Ok(()), Err)
    }

    /// Unmaps one window; returns when the device acknowledged it.
    pub fn dma_unmap(&self, address: u64, size: u64) -> Result<(), Error> {
        self.dma_unmap_batch(&[(address, size)])
    }

    fn xfer(&self) -> usize {
        self.limits.max_data_xfer_size
    }

    /// Reads a device region.
    pub fn region_read(&self, region: u32, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let x = self.xfer();
        for (i, chunk) in buf.chunks_mut(x).enumerate() {
            let a = RegionAccess { offset: offset.wrapping_add((i * x) as u64), region, count: chunk.len() as u32 };
            let r = self.ep.request(Command::RegionRead, &a.encode(&[]), &[])?;
            let (_, data) = RegionAccess::decode(&r.payload, true)?;
            if data.len() != chunk.len() {
                return Err(Error::Proto(proto::ProtoError::BadSize("REGION_READ reply of the wrong size")));
            }
            chunk.copy_from_slice(data);
        }
        Ok(())
    }

    /// Writes a device region and waits for the device.
    pub fn region_write(&self, region: u32, offset: u64, data: &[u8]) -> Result<(), Error> {
        let x = self.xfer();
        for (i, chunk) in data.chunks(x).enumerate() {
            let a = RegionAccess { offset: offset.wrapping_add((i * x) as u64), region, count: chunk.len() as u32 };
            self.ep.request(Command::RegionWrite, &a.encode(chunk), &[])?;
        }
        Ok(())
    }

    /// Writes a device region without waiting for the device (a posted write, as PCI
    /// MMIO writes are): sent with No_reply. Requests that follow on this connection
    /// are served after it, so a later read sees it. Errors are not reported.
    pub fn region_write_posted(&self, region: u32, offset: u64, data: &[u8]) -> Result<(), Error> {
        let x = self.xfer();
        for (i, chunk) in data.chunks(x).enumerate() {
            let a = RegionAccess { offset: offset.wrapping_add((i * x) as u64), region, count: chunk.len() as u32 };
            let payload = a.encode(chunk);
            let size = (proto::HEADER_SIZE + payload.len()) as u32;
            let header = proto::Header {
                id: 0,
                command: Command::RegionWrite as u16,
                size,
                flags: proto::FLAG_NO_REPLY,
                error: 0,
            };
            self.ep.send(header, &payload, &[])?;
        }
        Ok(())
    }

    /// Gives the device eventfds to trigger for vectors `start..` of IRQ `index` (in as
    /// many messages as the device's `max_msg_fds` requires). No fds: disables the
    /// vectors `start..start + count`.
    pub fn set_irqs(&self, index: u32, start: u32, fds: &[RawFd]) -> Result<(), Error> {
        let per = self.limits.max_msg_fds.max(1);
        for (i, part) in fds.chunks(per).enumerate() {
            let s = SetIrqs {
                flags: proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER,
                index,
                start: start + (i * per) as u32,
                count: part.len() as u32,
            };
            self.ep.request(Command::DeviceSetIrqs, &s.encode(), part)?;
        }
        Ok(())
    }

    /// Sends a raw SET_IRQS (flags and fds as given): masks, unmasks, disables.
    pub fn set_irqs_raw(&self, irqs: SetIrqs, fds: &[RawFd]) -> Result<(), Error> {
        self.ep.request(Command::DeviceSetIrqs, &irqs.encode(), fds).map(|_| ())
    }

    /// Resets the device (allowed [`RESET_TIMEOUT_FACTOR`] timeouts).
    pub fn reset(&self) -> Result<(), Error> {
        let t = self.ep.timeout() * RESET_TIMEOUT_FACTOR;
        self.ep.request_with_timeout(Command::DeviceReset, &[], &[], t).map(|_| ())
    }

    /// DEVICE_FEATURE with `flags` and `data`, accepting a reply payload of `argsz`:
    /// the reply's data.
    pub fn device_feature(&self, flags: u32, data: &[u8], argsz: u32) -> Result<Vec<u8>, Error> {
        let f = proto::DeviceFeature { argsz, flags, data: data.to_vec() };
        let r = self.ep.request(Command::DeviceFeature, &f.encode(), &[])?;
        Ok(proto::DeviceFeature::decode(&r.payload)?.data)
    }

    /// DMA dirty logging on, `page` bytes per bit, over every window.
    pub fn dma_logging_start(&self, page: u64) -> Result<(), Error> {
        let data = [page.to_le_bytes().as_slice(), &0u64.to_le_bytes()].concat();
        self.device_feature(proto::mig::FEATURE_SET | proto::mig::FEATURE_DMA_LOGGING_START, &data, 24).map(|_| ())
    }

    /// DMA dirty logging off.
    pub fn dma_logging_stop(&self) -> Result<(), Error> {
        self.device_feature(proto::mig::FEATURE_SET | proto::mig::FEATURE_DMA_LOGGING_STOP, &[], 8).map(|_| ())
    }

    /// The dirty bitmap of the window at `iova` over `len` bytes (`page` per bit, LSB
    /// first); the device clears what it reports.
    pub fn dma_logging_report(&self, iova: u64, len: u64, page: u64) -> Result<Vec<u64>, Error> {
        let data = [iova.to_le_bytes(), len.to_le_bytes(), page.to_le_bytes()].concat();
        let words = len.div_ceil(page.max(1)).div_ceil(64);
        let argsz = u32::try_from(8 + 24 + 8 * words)
            .map_err(|_| Error::Proto(proto::ProtoError::BadSize("range too large")))?;
        let r = self.device_feature(proto::mig::FEATURE_GET | proto::mig::FEATURE_DMA_LOGGING_REPORT, &data, argsz)?;
        // A short or long bitmap would read as clean pages: refuse it.
        let bitmap = r
            .get(24..)
            .filter(|b| b.len() as u64 == 8 * words)
            .ok_or(Error::Proto(proto::ProtoError::BadSize("DMA logging report of the wrong size")))?;
        Ok(bitmap.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())).collect())
    }

    /// MIG_DATA_READ of at most `size` bytes (empty: no more data).
    pub fn mig_data_read(&self, size: u32) -> Result<Vec<u8>, Error> {
        let size = size.min(self.xfer() as u32);
        let r = self.ep.request(Command::MigDataRead, &proto::MigData { argsz: 8 + size, size }.encode(&[]), &[])?;
        let (m, data) = proto::MigData::decode(&r.payload, false)?;
        // The size field counts the data; libvfio-user pads the payload.
        data.get(..m.size as usize)
            .map(<[u8]>::to_vec)
            .ok_or(Error::Proto(proto::ProtoError::BadSize("MIG_DATA_READ reply shorter than its size")))
    }

    /// MIG_DATA_WRITE of `data` (in pieces of at most max_data_xfer_size).
    pub fn mig_data_write(&self, data: &[u8]) -> Result<(), Error> {
        for chunk in data.chunks(self.xfer().max(1)) {
            let m = proto::MigData { argsz: 8 + chunk.len() as u32, size: chunk.len() as u32 };
            self.ep.request(Command::MigDataWrite, &m.encode(chunk), &[])?;
        }
        Ok(())
    }

    /// The endpoint (tests send hand-made messages through it).
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.ep
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.ep.shutdown();
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.ep.shutdown();
        if let Some(t) = self.reader.take() {
            // The reader may be this thread (a device dropped from its own on_close).
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}
