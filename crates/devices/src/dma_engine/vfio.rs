//! The DMA engine served over vfio-user (the device process's side).
//!
//! Regions: BAR 0 (registers), BAR 1 (scratch), config space. Interrupts: one MSI
//! vector (index 1), an eventfd from the VMM. DMA: regions mapped with an fd are
//! mapped here and reached directly; everything else goes to the VMM as DMA_READ /
//! DMA_WRITE messages, which the VMM checks against the device's domain.

use super::{DmaEngine, Remote};
use abi::dma_engine as de;
use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd};
use vfio_user::endpoint::Endpoint;
use vfio_user::proto::{self, DeviceInfo, IrqInfo, RegionInfo, SetIrqs};
use vfio_user::server::{Device, Server};
use vmm_sys_util::eventfd::EventFd;

/// The engine as a vfio-user device.
pub struct EngineServer {
    engine: DmaEngine,
}

impl EngineServer {
    /// An engine served by `server`: DMA through its windows, messages otherwise.
    pub fn new(server: &Server) -> std::io::Result<EngineServer> {
        Ok(EngineServer { engine: DmaEngine::new(Box::new(Remote(server.dma())))? })
    }
}

fn region(index: u32, size: u64, flags: u32) -> RegionInfo {
    RegionInfo { flags, index, cap_offset: 0, size, offset: 0 }
}

impl Device for EngineServer {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: proto::DEVICE_FLAGS_PCI | proto::DEVICE_FLAGS_RESET,
            num_regions: proto::PCI_NUM_REGIONS,
            num_irqs: proto::PCI_NUM_IRQS,
        }
    }

    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let rw = proto::DMA_READ_FLAG | proto::DMA_WRITE_FLAG;
        match index {
            proto::PCI_BAR0 => Some(region(index, de::BAR0_SIZE, rw)),
            proto::PCI_BAR1 => Some(region(index, de::BAR1_SIZE, rw)),
            proto::PCI_CONFIG => Some(region(index, 256, proto::DMA_READ_FLAG)),
            i if i < proto::PCI_NUM_REGIONS => Some(region(i, 0, 0)),
            _ => None,
        }
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        match index {
            proto::PCI_MSI => Some(IrqInfo { flags: proto::IRQ_INFO_EVENTFD, index, count: 1 }),
            i if i < proto::PCI_NUM_IRQS => Some(IrqInfo { flags: 0, index: i, count: 0 }),
            _ => None,
        }
    }

    fn region_read(&mut self, region: u32, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        match region {
            proto::PCI_BAR0 if offset.saturating_add(buf.len() as u64) <= de::BAR0_SIZE => {
                self.engine.read_reg(offset, buf)
            }
            proto::PCI_BAR1 if offset.saturating_add(buf.len() as u64) <= de::BAR1_SIZE => {
                self.engine.read_scratch(offset, buf)
            }
            proto::PCI_CONFIG if offset.saturating_add(buf.len() as u64) <= 256 => self.engine.read_config(offset, buf),
            _ => return Err(libc::EINVAL),
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), i32> {
        match region {
            proto::PCI_BAR0 if offset.saturating_add(data.len() as u64) <= de::BAR0_SIZE => {
                self.engine.write_reg(offset, data)
            }
            proto::PCI_BAR1 if offset.saturating_add(data.len() as u64) <= de::BAR1_SIZE => {
                self.engine.write_scratch(offset, data)
            }
            _ => return Err(libc::EINVAL),
        }
        Ok(())
    }

    fn set_irqs(&mut self, irqs: &SetIrqs, mut fds: Vec<File>) -> Result<(), i32> {
        if irqs.index != proto::PCI_MSI || irqs.start != 0 || irqs.count > 1 || fds.len() > 1 {
            return Err(libc::EINVAL);
        }
        let irq = fds.pop().map(|f| {
            // SAFETY: the VMM passed an eventfd; we take ownership of the descriptor.
            unsafe { EventFd::from_raw_fd(f.into_raw_fd()) }
        });
        self.engine.set_irq(irq);
        Ok(())
    }

    fn reset(&mut self) -> Result<(), i32> {
        self.engine.write_reg(de::regs::CONTROL, &2u32.to_le_bytes());
        Ok(())
    }
}

/// Serves one DMA engine on `stream` until the VMM goes away.
pub fn serve(stream: std::os::unix::net::UnixStream) -> std::io::Result<()> {
    let server = Server::new(Endpoint::new(stream));
    let mut engine = EngineServer::new(&server)?;
    let why = server.serve(&mut engine);
    tracing::info!("dma-engine: connection ended: {why}");
    Ok(())
}
