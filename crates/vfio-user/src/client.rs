//! The VMM's side of a vfio-user connection.

use crate::endpoint::{Endpoint, Error, Message, refuse};
use crate::proto::{
    self, Command, DeviceInfo, DmaMap, DmaUnmap, IrqInfo, MAX_DATA_XFER, RegionAccess, RegionInfo, Request, SetIrqs,
    Version,
};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;

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

/// A connected vfio-user device.
pub struct Client {
    ep: Arc<Endpoint>,
    reader: Option<JoinHandle<()>>,
    info: DeviceInfo,
    regions: Vec<RegionInfo>,
    irqs: Vec<IrqInfo>,
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
            let _ = ep.reply_error(&m.header, libc::ENOTSUP);
        }
        Err(e) => refuse(ep, &m.header, &e),
    }
}

impl Client {
    /// Connects over `stream`: starts the reader (which answers the device's DMA
    /// requests through `dma`), negotiates the version and reads the device's regions
    /// and interrupts. `on_close` runs when the connection ends.
    pub fn connect(stream: UnixStream, dma: Arc<dyn DmaHandler>, on_close: OnClose) -> Result<Client, Error> {
        let ep = Endpoint::new(stream);
        let e = Arc::clone(&ep);
        let reader = std::thread::Builder::new()
            .name("vfu-client".into())
            .spawn(move || {
                let why = e.run(|m| serve_dma(&e, dma.as_ref(), m));
                on_close(&why);
            })
            .map_err(Error::Io)?;
        let mut client =
            Client { ep, reader: Some(reader), info: DeviceInfo::default(), regions: vec![], irqs: vec![] };
        let reply = client.ep.request(Command::Version, &Version::ours().encode(), &[])?;
        let v = Version::decode(&reply.payload)?;
        if v.major != proto::VERSION_MAJOR {
            return Err(Error::Proto(proto::ProtoError::BadVersion(format!("server speaks {}.{}", v.major, v.minor))));
        }
        let info = DeviceInfo::decode(
            &client.ep.request(Command::DeviceGetInfo, &DeviceInfo::default().encode(), &[])?.payload,
        )?;
        client.info = info;
        for index in 0..info.num_regions.min(64) {
            let req = RegionInfo { index, ..Default::default() }.encode();
            let r = client.ep.request(Command::DeviceGetRegionInfo, &req, &[])?;
            client.regions.push(RegionInfo::decode(&r.payload)?);
        }
        for index in 0..info.num_irqs.min(16) {
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

    /// Region `index`.
    pub fn region(&self, index: u32) -> Option<RegionInfo> {
        self.regions.get(index as usize).copied()
    }

    /// Interrupt index `index`.
    pub fn irq(&self, index: u32) -> Option<IrqInfo> {
        self.irqs.get(index as usize).copied()
    }

    /// True once the device is gone.
    pub fn is_closed(&self) -> bool {
        self.ep.is_closed()
    }

    /// Maps `[address, address + size)` for DMA: with `fd` (and `offset` in it) the
    /// device maps the memory itself; without, it reaches it by DMA_READ/DMA_WRITE.
    pub fn dma_map(&self, map: DmaMap, fd: Option<RawFd>) -> Result<(), Error> {
        let fds: Vec<RawFd> = fd.into_iter().collect();
        self.ep.request(Command::DmaMap, &map.encode(), &fds).map(|_| ())
    }

    /// As [`Client::dma_map`] without waiting for the device (sent with NO_REPLY).
    /// Requests that follow are served after it, so the device has the mapping before
    /// any doorbell that follows; a failure goes unreported (a device that could not map
    /// a region reaches it by messages instead, which the VMM checks).
    pub fn dma_map_posted(&self, map: DmaMap, fd: Option<RawFd>) -> Result<(), Error> {
        let fds: Vec<RawFd> = fd.into_iter().collect();
        let payload = map.encode();
        let header = proto::Header {
            id: 0,
            command: Command::DmaMap as u16,
            size: (proto::HEADER_SIZE + payload.len()) as u32,
            flags: proto::FLAG_NO_REPLY,
            error: 0,
        };
        self.ep.send(header, &payload, &fds)
    }

    /// Unmaps; returns when the device acknowledged (it no longer touches the range).
    pub fn dma_unmap(&self, address: u64, size: u64) -> Result<(), Error> {
        self.ep.request(Command::DmaUnmap, &DmaUnmap { flags: 0, address, size }.encode(), &[]).map(|_| ())
    }

    /// Reads a device region.
    pub fn region_read(&self, region: u32, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        for (i, chunk) in buf.chunks_mut(MAX_DATA_XFER).enumerate() {
            let a = RegionAccess { offset: offset + (i * MAX_DATA_XFER) as u64, region, count: chunk.len() as u32 };
            let r = self.ep.request(Command::RegionRead, &a.encode(&[]), &[])?;
            let (_, data) = RegionAccess::decode(&r.payload, true)?;
            if data.len() != chunk.len() {
                return Err(Error::Proto(proto::ProtoError::BadSize("REGION_READ reply of the wrong size")));
            }
            chunk.copy_from_slice(data);
        }
        Ok(())
    }

    /// Writes a device region.
    pub fn region_write(&self, region: u32, offset: u64, data: &[u8]) -> Result<(), Error> {
        for (i, chunk) in data.chunks(MAX_DATA_XFER).enumerate() {
            let a = RegionAccess { offset: offset + (i * MAX_DATA_XFER) as u64, region, count: chunk.len() as u32 };
            self.ep.request(Command::RegionWrite, &a.encode(chunk), &[])?;
        }
        Ok(())
    }

    /// Writes a device region without waiting for the device (a posted write, as PCI
    /// MMIO writes are): sent with NO_REPLY. Requests that follow on this connection
    /// are served after it, so a later read sees it. Errors are not reported.
    pub fn region_write_posted(&self, region: u32, offset: u64, data: &[u8]) -> Result<(), Error> {
        for (i, chunk) in data.chunks(MAX_DATA_XFER).enumerate() {
            let a = RegionAccess { offset: offset + (i * MAX_DATA_XFER) as u64, region, count: chunk.len() as u32 };
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

    /// Gives the device eventfds to trigger for vectors `start..` of IRQ `index`.
    pub fn set_irqs(&self, index: u32, start: u32, fds: &[RawFd]) -> Result<(), Error> {
        let s = SetIrqs {
            flags: proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER,
            index,
            start,
            count: fds.len() as u32,
        };
        self.ep.request(Command::DeviceSetIrqs, &s.encode(), fds).map(|_| ())
    }

    /// Resets the device.
    pub fn reset(&self) -> Result<(), Error> {
        self.ep.request(Command::DeviceReset, &[], &[]).map(|_| ())
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
            let _ = t.join();
        }
    }
}
