//! The device process's side of a vfio-user connection.

use crate::endpoint::{Endpoint, Error, Message, refuse};
use crate::proto::{
    self, Command, DeviceInfo, DmaAccess, DmaMap, DmaUnmap, IrqInfo, MAX_DATA_XFER, RegionInfo, Request, SetIrqs,
    Version,
};
use std::fs::File;
use std::sync::Arc;

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
    /// Memory is mapped for DMA (with an fd to map, or none: reach it by messages).
    fn dma_map(&mut self, map: &DmaMap, fd: Option<File>) -> Result<(), i32>;
    /// Memory is unmapped: when this returns the device must no longer touch it.
    fn dma_unmap(&mut self, unmap: &DmaUnmap) -> Result<(), i32>;
    /// Interrupt eventfds are set.
    fn set_irqs(&mut self, irqs: &SetIrqs, fds: Vec<File>) -> Result<(), i32>;
    /// Reset.
    fn reset(&mut self) -> Result<(), i32>;
}

/// Guest memory reached by messages: DMA_READ / DMA_WRITE requests to the VMM, which
/// checks each one against the device's domain.
#[derive(Clone, Debug)]
pub struct DmaMessages {
    ep: Arc<Endpoint>,
}

impl DmaMessages {
    /// Over `ep`.
    pub fn new(ep: Arc<Endpoint>) -> DmaMessages {
        DmaMessages { ep }
    }

    /// Reads guest memory at IOVA `address`.
    pub fn read(&self, address: u64, buf: &mut [u8]) -> Result<(), Error> {
        for (i, chunk) in buf.chunks_mut(MAX_DATA_XFER).enumerate() {
            let a = DmaAccess { address: address + (i * MAX_DATA_XFER) as u64, count: chunk.len() as u64 };
            let r = self.ep.request(Command::DmaRead, &a.encode(&[]), &[])?;
            let (_, data) = DmaAccess::decode(&r.payload, true)?;
            if data.len() != chunk.len() {
                return Err(Error::Proto(proto::ProtoError::BadSize("DMA_READ reply of the wrong size")));
            }
            chunk.copy_from_slice(data);
        }
        Ok(())
    }

    /// Writes guest memory at IOVA `address`.
    pub fn write(&self, address: u64, data: &[u8]) -> Result<(), Error> {
        for (i, chunk) in data.chunks(MAX_DATA_XFER).enumerate() {
            let a = DmaAccess { address: address + (i * MAX_DATA_XFER) as u64, count: chunk.len() as u64 };
            self.ep.request(Command::DmaWrite, &a.encode(chunk), &[])?;
        }
        Ok(())
    }
}

fn handle(ep: &Endpoint, device: &mut dyn Device, m: Message) {
    let h = m.header;
    let req = match proto::decode_request(&h, &m.payload) {
        Ok(r) => r,
        Err(e) => return refuse(ep, &h, &e),
    };
    let result: Result<Vec<u8>, i32> = match req {
        Request::Version(_) => Ok(Version::ours().encode()),
        Request::DeviceGetInfo => Ok(device.info().encode()),
        Request::DeviceGetRegionInfo(i) => device.region_info(i).map(|r| r.encode()).ok_or(libc::EINVAL),
        Request::DeviceGetIrqInfo(i) => device.irq_info(i).map(|r| r.encode()).ok_or(libc::EINVAL),
        Request::RegionRead(a) => {
            let mut buf = vec![0u8; a.count as usize];
            device.region_read(a.region, a.offset, &mut buf).map(|()| a.encode(&buf))
        }
        Request::RegionWrite(a, data) => device.region_write(a.region, a.offset, &data).map(|()| a.encode(&[])),
        Request::DmaMap(map) => {
            let mut fds = m.fds;
            if fds.len() > 1 { Err(libc::EINVAL) } else { device.dma_map(&map, fds.pop()).map(|()| Vec::new()) }
        }
        Request::DmaUnmap(u) => device.dma_unmap(&u).map(|()| u.encode()),
        Request::DeviceSetIrqs(s) => device.set_irqs(&s, m.fds).map(|()| Vec::new()),
        Request::DeviceReset => device.reset().map(|()| Vec::new()),
        Request::DmaRead(_) | Request::DmaWrite(..) | Request::Unsupported(_) => Err(libc::ENOTSUP),
    };
    if h.flags & proto::FLAG_NO_REPLY != 0 {
        return;
    }
    let _ = match result {
        Ok(payload) => ep.reply(&h, &payload),
        Err(errno) => ep.reply_error(&h, errno),
    };
}

/// Serves `device` on `ep` until the VMM closes the connection (or dies); returns why
/// it ended. Malformed requests get an error reply; a malformed header closes the
/// connection.
pub fn serve(ep: &Arc<Endpoint>, device: &mut dyn Device) -> Error {
    ep.run(|m| handle(ep, device, m))
}
