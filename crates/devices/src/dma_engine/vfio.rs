//! The DMA engine as a vfio-user PCI device (the same model in the VMM and in a device
//! process).
//!
//! Regions: BAR 0 (registers), BAR 1 (scratch memory, offered for mmap: its memfd;
//! the VMM traps the MSI-X table and pending bits in its last 8 KiB), configuration
//! space (header, MSI-X and PCI Express capabilities: function-level reset). Interrupts:
//! MSI-X with [`de::MSIX_VECTORS`] vectors, eventfds from the VMM; no INTx, no MSI. DMA:
//! through the memory it was built with (the VMM's endpoint in process; the server's
//! windows and messages in a device process).

use super::{DeviceMemory, DmaEngine, Remote};
use abi::dma_engine as de;
use abi::pci::{cap, reg};
use pci::config::{Builder, ConfigSpace};
use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::sync::Mutex;
use vfio_user::endpoint::Endpoint;
use vfio_user::migration::Migration;
use vfio_user::proto::{self, DeviceInfo, IrqInfo, RegionInfo, SetIrqs};
use vfio_user::server::{Device, Server};
use vmm_sys_util::eventfd::EventFd;

/// Bytes of the configuration region.
pub const CONFIG_SIZE: u64 = 256;

/// The engine's configuration space as the device holds it.
pub fn config_space() -> ConfigSpace {
    let table = de::MSIX_TABLE_OFFSET as u32 | u32::from(de::SCRATCH_BAR);
    let pba = de::MSIX_PBA_OFFSET as u32 | u32::from(de::SCRATCH_BAR);
    let mut msix = Vec::new();
    msix.extend_from_slice(&(de::MSIX_VECTORS - 1).to_le_bytes());
    msix.extend_from_slice(&table.to_le_bytes());
    msix.extend_from_slice(&pba.to_le_bytes());
    // PCI Express endpoint, version 2; DEVCAP with function-level reset; the rest zero.
    let mut exp = vec![0u8; 58];
    exp[0..2].copy_from_slice(&0x0002u16.to_le_bytes());
    exp[2..6].copy_from_slice(&cap::EXP_DEVCAP_FLR.to_le_bytes());
    let b = Builder::new(de::VENDOR_ID, de::DEVICE_ID, de::CLASS, 0)
        .set_u32(reg::BAR0, 0)
        .set_u32(reg::BAR0 + 4, abi::pci::bar::MEM_TYPE_64 | abi::pci::bar::PREFETCH);
    let (b, _) = b.capability(cap::MSIX, &msix);
    let (b, _) = b.capability(cap::EXP, &exp);
    b.build()
}

/// How long a stop (RUNNING -> STOP) waits for the descriptor in flight.
pub const STOP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// The engine as a vfio-user device.
pub struct EngineServer {
    engine: DmaEngine,
    config: Mutex<ConfigSpace>,
    /// The state captured for STOP_COPY, read out by MIG_DATA_READ.
    outgoing: Vec<u8>,
    /// The state written during RESUMING, applied on RESUMING -> STOP.
    incoming: Vec<u8>,
}

impl EngineServer {
    /// An engine reaching guest memory through `memory`.
    pub fn new(memory: Box<dyn DeviceMemory>) -> std::io::Result<EngineServer> {
        let mut config = config_space();
        // The device keeps the command register (the VMM decides what it means).
        config.set_writable(reg::COMMAND, &[0x07, 0x04]);
        Ok(EngineServer {
            engine: DmaEngine::new(memory)?,
            config: Mutex::new(config),
            outgoing: Vec::new(),
            incoming: Vec::new(),
        })
    }

    /// An engine served by `server`: DMA through its windows, messages otherwise.
    pub fn remote(server: &Server) -> std::io::Result<EngineServer> {
        EngineServer::new(Box::new(Remote(server.dma())))
    }

    /// The model.
    pub fn engine(&self) -> &DmaEngine {
        &self.engine
    }
}

fn region(index: u32, size: u64, flags: u32) -> RegionInfo {
    RegionInfo { flags, index, cap_offset: 0, size, offset: 0 }
}

fn fits(offset: u64, len: usize, size: u64) -> bool {
    offset.checked_add(len as u64).is_some_and(|e| e <= size)
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
            i if i == u32::from(de::REGS_BAR) => Some(region(index, de::REGS_SIZE, rw)),
            i if i == u32::from(de::SCRATCH_BAR) => Some(region(index, de::SCRATCH_SIZE, rw)),
            proto::PCI_CONFIG => Some(region(index, CONFIG_SIZE, rw)),
            i if i < proto::PCI_NUM_REGIONS => Some(region(i, 0, 0)),
            _ => None,
        }
    }

    fn region_mmap(&self, index: u32) -> Option<(RawFd, Vec<(u64, u64)>)> {
        (index == u32::from(de::SCRATCH_BAR)).then(|| (self.engine.scratch().fd(), Vec::new()))
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        match index {
            proto::PCI_MSIX => {
                Some(IrqInfo { flags: proto::IRQ_INFO_EVENTFD, index, count: u32::from(de::MSIX_VECTORS) })
            }
            i if i < proto::PCI_NUM_IRQS => Some(IrqInfo { flags: proto::IRQ_INFO_EVENTFD, index: i, count: 0 }),
            _ => None,
        }
    }

    fn region_read(&mut self, region: u32, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        match region {
            r if r == u32::from(de::REGS_BAR) && fits(offset, buf.len(), de::REGS_SIZE) => {
                self.engine.read_reg(offset, buf)
            }
            r if r == u32::from(de::SCRATCH_BAR) && fits(offset, buf.len(), de::SCRATCH_SIZE) => {
                self.engine.read_scratch(offset, buf)
            }
            proto::PCI_CONFIG if fits(offset, buf.len(), CONFIG_SIZE) => {
                self.config.lock().unwrap_or_else(|e| e.into_inner()).read(offset as u16, buf)
            }
            _ => return Err(libc::EINVAL),
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), i32> {
        match region {
            r if r == u32::from(de::REGS_BAR) && fits(offset, data.len(), de::REGS_SIZE) => {
                self.engine.write_reg(offset, data)
            }
            r if r == u32::from(de::SCRATCH_BAR) && fits(offset, data.len(), de::SCRATCH_SIZE) => {
                self.engine.write_scratch(offset, data)
            }
            proto::PCI_CONFIG if fits(offset, data.len(), CONFIG_SIZE) => {
                self.config.lock().unwrap_or_else(|e| e.into_inner()).write(offset as u16, data)
            }
            _ => return Err(libc::EINVAL),
        }
        Ok(())
    }

    fn set_irqs(&mut self, irqs: &SetIrqs, fds: Vec<File>) -> Result<(), i32> {
        if irqs.index != proto::PCI_MSIX {
            // No INTx, no MSI: disabling them is fine, anything else is not.
            return if irqs.count == 0 && fds.is_empty() { Ok(()) } else { Err(libc::EINVAL) };
        }
        if irqs.flags & proto::IRQ_SET_ACTION_TRIGGER == 0 {
            return Ok(()); // masking is the VMM's business (it emulates the table)
        }
        let end =
            irqs.start.checked_add(irqs.count).filter(|e| *e <= u32::from(de::MSIX_VECTORS)).ok_or(libc::EINVAL)?;
        if irqs.flags & proto::IRQ_SET_DATA_EVENTFD != 0 {
            if fds.len() != irqs.count as usize {
                return Err(libc::EINVAL);
            }
            for (v, f) in (irqs.start..end).zip(fds) {
                // SAFETY: the VMM passed an eventfd; we take ownership of the descriptor.
                self.engine.set_irq(v as u16, Some(unsafe { EventFd::from_raw_fd(f.into_raw_fd()) }));
            }
        } else if irqs.count == 0 {
            for v in 0..de::MSIX_VECTORS {
                self.engine.set_irq(v, None);
            }
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), i32> {
        self.engine.write_reg(de::regs::CONTROL, &de::control::RESET.to_le_bytes());
        let mut c = self.config.lock().unwrap_or_else(|e| e.into_inner());
        c.set_u16(reg::COMMAND, 0);
        Ok(())
    }

    fn migration(&mut self) -> Option<&mut dyn Migration> {
        Some(self)
    }
}

/// The engine's migration stream: its registers ([`super::STATE_BYTES`]) and the
/// command register it keeps. Scratch memory (BAR 1) is device memory the VMM maps and
/// saves itself; descriptors not yet taken stay in the guest's ring.
impl Migration for EngineServer {
    fn transition(&mut self, from: u32, to: u32) -> Result<(), i32> {
        use vfio_user::proto::mig::*;
        match (from, to) {
            (STATE_RUNNING, STATE_STOP) => self.engine.stop(STOP_DEADLINE).map_err(|e| {
                tracing::warn!("dma-engine: cannot stop: {e}");
                libc::ETIMEDOUT
            }),
            (STATE_STOP, STATE_RUNNING) => {
                self.engine.start();
                Ok(())
            }
            (STATE_STOP, STATE_STOP_COPY) => {
                let command = self.config.lock().unwrap_or_else(|e| e.into_inner()).u16(reg::COMMAND);
                self.outgoing = self.engine.save();
                self.outgoing.extend_from_slice(&command.to_le_bytes());
                Ok(())
            }
            (STATE_STOP_COPY, STATE_STOP) => {
                self.outgoing.clear();
                Ok(())
            }
            (STATE_STOP, STATE_RESUMING) => {
                self.incoming.clear();
                Ok(())
            }
            (STATE_RESUMING, STATE_STOP) => {
                let b = std::mem::take(&mut self.incoming);
                let (regs, command) = b.split_at_checked(super::STATE_BYTES).ok_or(libc::EINVAL)?;
                let command: [u8; 2] = command.try_into().map_err(|_| libc::EINVAL)?;
                self.engine.load(regs).map_err(|e| {
                    tracing::warn!("dma-engine: refusing a state: {e}");
                    libc::EINVAL
                })?;
                self.config
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .set_u16(reg::COMMAND, u16::from_le_bytes(command));
                Ok(())
            }
            _ => Err(libc::EINVAL),
        }
    }

    fn read_data(&mut self, max: usize) -> Result<Vec<u8>, i32> {
        let n = max.min(self.outgoing.len());
        Ok(self.outgoing.drain(..n).collect())
    }

    fn write_data(&mut self, data: &[u8]) -> Result<(), i32> {
        if self.incoming.len().saturating_add(data.len()) > super::STATE_BYTES + 2 {
            return Err(libc::EINVAL);
        }
        self.incoming.extend_from_slice(data);
        Ok(())
    }
}

/// Serves one DMA engine on `stream` until the VMM goes away.
pub fn serve(stream: std::os::unix::net::UnixStream) -> std::io::Result<()> {
    let server = Server::new(Endpoint::new(stream));
    let mut engine = EngineServer::remote(&server)?;
    let why = server.serve(&mut engine);
    tracing::info!("dma-engine: connection ended: {why}");
    Ok(())
}
