//! A device whose BAR 0 is memory it offers for mmap (a GPU frame buffer, as a snapshot
//! sees it), migratable with no state of its own: what the snapshot benchmark flags
//! non-coherent, and a test device for device memory.

/// The device: BAR 0 of `size` bytes of memory.
pub struct MemoryDevice {
    memory: crate::dma_engine::Scratch,
    size: u64,
    config: std::sync::Mutex<pci::config::ConfigSpace>,
}

impl MemoryDevice {
    /// A device with `size` bytes of memory (zeros).
    pub fn new(size: u64) -> Result<MemoryDevice, String> {
        let memory = crate::dma_engine::Scratch::new(size as usize).map_err(|e| e.to_string())?;
        let bar = abi::pci::bar::MEM_TYPE_64 | abi::pci::bar::PREFETCH;
        let mut config = pci::config::Builder::new(0x1b36, 0x11ff, 0x0380, 0).set_u32(abi::pci::reg::BAR0, bar).build();
        config.set_writable(abi::pci::reg::COMMAND, &[0x07, 0x04]);
        Ok(MemoryDevice { memory, size, config: std::sync::Mutex::new(config) })
    }
}

impl vfio_user::server::Device for MemoryDevice {
    fn info(&self) -> vfio_user::proto::DeviceInfo {
        use vfio_user::proto as p;
        p::DeviceInfo {
            flags: p::DEVICE_FLAGS_PCI | p::DEVICE_FLAGS_RESET,
            num_regions: p::PCI_NUM_REGIONS,
            num_irqs: p::PCI_NUM_IRQS,
        }
    }
    fn region_info(&self, index: u32) -> Option<vfio_user::proto::RegionInfo> {
        use vfio_user::proto as p;
        let rw = p::DMA_READ_FLAG | p::DMA_WRITE_FLAG;
        let size = match index {
            0 => self.size,
            p::PCI_CONFIG => 256,
            i if i < p::PCI_NUM_REGIONS => 0,
            _ => return None,
        };
        Some(p::RegionInfo { flags: if size > 0 { rw } else { 0 }, index, cap_offset: 0, size, offset: 0 })
    }
    fn region_mmap(&self, index: u32) -> Option<(std::os::fd::RawFd, Vec<(u64, u64)>)> {
        (index == 0).then(|| (self.memory.fd(), Vec::new()))
    }
    fn irq_info(&self, index: u32) -> Option<vfio_user::proto::IrqInfo> {
        use vfio_user::proto as p;
        (index < p::PCI_NUM_IRQS).then_some(p::IrqInfo { flags: p::IRQ_INFO_EVENTFD, index, count: 0 })
    }
    fn region_read(&mut self, region: u32, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        match region {
            0 => self.memory.read(offset, buf),
            vfio_user::proto::PCI_CONFIG if offset + buf.len() as u64 <= 256 => {
                self.config.lock().unwrap_or_else(|e| e.into_inner()).read(offset as u16, buf)
            }
            _ => return Err(libc::EINVAL),
        }
        Ok(())
    }
    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), i32> {
        match region {
            0 => self.memory.write(offset, data),
            vfio_user::proto::PCI_CONFIG if offset + data.len() as u64 <= 256 => {
                self.config.lock().unwrap_or_else(|e| e.into_inner()).write(offset as u16, data)
            }
            _ => return Err(libc::EINVAL),
        }
        Ok(())
    }
    fn set_irqs(&mut self, irqs: &vfio_user::proto::SetIrqs, fds: Vec<std::fs::File>) -> Result<(), i32> {
        if irqs.count == 0 && fds.is_empty() { Ok(()) } else { Err(libc::EINVAL) }
    }
    fn reset(&mut self) -> Result<(), i32> {
        Ok(())
    }
    fn migration(&mut self) -> Option<&mut dyn vfio_user::migration::Migration> {
        Some(self)
    }
}

/// No state beyond its memory, which the VMM saves as device memory.
impl vfio_user::migration::Migration for MemoryDevice {
    fn transition(&mut self, _from: u32, _to: u32) -> Result<(), i32> {
        Ok(())
    }
    fn read_data(&mut self, _max: usize) -> Result<Vec<u8>, i32> {
        Ok(Vec::new())
    }
    fn write_data(&mut self, data: &[u8]) -> Result<(), i32> {
        if data.is_empty() { Ok(()) } else { Err(libc::EINVAL) }
    }
}
