//! What the VMM needs of a device it assigns, whichever side of a socket it runs on: a
//! vfio-user server in a process of its own ([`Client`]), or a device model in the VMM
//! behind the very same interface ([`LocalDevice`]), so both take one path through the
//! VMM (configuration virtualization, BARs, interrupts, DMA).

use std::fs::File;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::{Arc, Mutex};
use vfio_user::Error;
use vfio_user::client::{Client, RegionMmap};
use vfio_user::proto::{DeviceInfo, IrqInfo, Limits, RegionInfo, SetIrqs};
use vfio_user::server::Device;

/// A device the VMM assigns to the guest.
pub trait VfioDevice: Send + Sync {
    /// Device information.
    fn info(&self) -> DeviceInfo;
    /// Region `index`.
    fn region(&self, index: u32) -> Option<RegionInfo>;
    /// How region `index` may be mapped, if the device offers it.
    fn region_mmap(&self, index: u32) -> Option<RegionMmap>;
    /// Interrupt index `index`.
    fn irq(&self, index: u32) -> Option<IrqInfo>;
    /// Reads a region (waits for the device).
    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), Error>;
    /// Writes a region and waits for the device.
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), Error>;
    /// Writes a region without waiting (a posted MMIO write).
    fn region_write_posted(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), Error>;
    /// Sets interrupt eventfds (trigger, unmask...) of one index.
    fn set_irqs(&self, irqs: SetIrqs, fds: &[RawFd]) -> Result<(), Error>;
    /// Resets the device.
    fn reset(&self) -> Result<(), Error>;
    /// What the device announced (DMA window limits and such).
    fn limits(&self) -> Limits;
    /// The connection to a device process (None: the device runs in the VMM).
    fn client(&self) -> Option<&Client>;
    /// True once the device is gone.
    fn is_closed(&self) -> bool;
    /// Cuts the device off (a device process is disconnected).
    fn close(&self);
    /// DEVICE_FEATURE (migration): the reply's data.
    fn device_feature(&self, flags: u32, data: &[u8], argsz: u32) -> Result<Vec<u8>, Error>;
    /// MIG_DATA_READ of at most `size` bytes (empty: the end).
    fn mig_data_read(&self, size: u32) -> Result<Vec<u8>, Error>;
    /// MIG_DATA_WRITE.
    fn mig_data_write(&self, data: &[u8]) -> Result<(), Error>;
    /// DMA dirty logging on (4 KiB pages): true if the device logs its own writes;
    /// false if every write it makes goes through the VMM, which logs it.
    fn dirty_start(&self) -> Result<bool, Error>;
    /// DMA dirty logging off.
    fn dirty_stop(&self) -> Result<(), Error>;
    /// The device's dirty bits of `[iova, iova + len)` (4 KiB per bit), cleared.
    fn dirty_report(&self, iova: u64, len: u64) -> Result<Vec<u64>, Error>;
}

impl VfioDevice for Client {
    fn info(&self) -> DeviceInfo {
        Client::info(self)
    }
    fn region(&self, index: u32) -> Option<RegionInfo> {
        Client::region(self, index)
    }
    fn region_mmap(&self, index: u32) -> Option<RegionMmap> {
        Client::region_mmap(self, index)
    }
    fn irq(&self, index: u32) -> Option<IrqInfo> {
        Client::irq(self, index)
    }
    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        Client::region_read(self, index, offset, buf)
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), Error> {
        Client::region_write(self, index, offset, data)
    }
    fn region_write_posted(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), Error> {
        Client::region_write_posted(self, index, offset, data)
    }
    fn set_irqs(&self, irqs: SetIrqs, fds: &[RawFd]) -> Result<(), Error> {
        if fds.is_empty() || irqs.flags & vfio_user::proto::IRQ_SET_DATA_EVENTFD == 0 {
            return self.set_irqs_raw(irqs, fds);
        }
        // In as many messages as the device's max_msg_fds requires.
        let per = self.limits().max_msg_fds.max(1);
        for (i, part) in fds.chunks(per).enumerate() {
            let s = SetIrqs { start: irqs.start + (i * per) as u32, count: part.len() as u32, ..irqs };
            self.set_irqs_raw(s, part)?;
        }
        Ok(())
    }
    fn reset(&self) -> Result<(), Error> {
        Client::reset(self)
    }
    fn limits(&self) -> Limits {
        Client::limits(self)
    }
    fn client(&self) -> Option<&Client> {
        Some(self)
    }
    fn is_closed(&self) -> bool {
        Client::is_closed(self)
    }
    fn close(&self) {
        Client::close(self)
    }
    fn device_feature(&self, flags: u32, data: &[u8], argsz: u32) -> Result<Vec<u8>, Error> {
        Client::device_feature(self, flags, data, argsz)
    }
    fn mig_data_read(&self, size: u32) -> Result<Vec<u8>, Error> {
        Client::mig_data_read(self, size)
    }
    fn mig_data_write(&self, data: &[u8]) -> Result<(), Error> {
        Client::mig_data_write(self, data)
    }
    fn dirty_start(&self) -> Result<bool, Error> {
        Client::dma_logging_start(self, 4096).map(|()| true)
    }
    fn dirty_stop(&self) -> Result<(), Error> {
        Client::dma_logging_stop(self)
    }
    fn dirty_report(&self, iova: u64, len: u64) -> Result<Vec<u64>, Error> {
        Client::dma_logging_report(self, iova, len, 4096)
    }
}

/// A vfio-user device model run in the VMM: calls go straight to it, under a lock.
pub struct LocalDevice {
    device: Mutex<Box<dyn Device>>,
    /// Migration state, kept by the same rules as a server's.
    migration: Mutex<vfio_user::migration::MigrationState>,
    info: DeviceInfo,
    regions: Vec<Option<RegionInfo>>,
    mmaps: Vec<Option<RegionMmap>>,
    irqs: Vec<Option<IrqInfo>>,
    closed: std::sync::atomic::AtomicBool,
}

fn errno(e: i32) -> Error {
    Error::Remote { command: vfio_user::proto::Command::Version, errno: e }
}

impl LocalDevice {
    /// Wraps `device` (its regions, interrupts and mappable files are read now).
    pub fn new(device: Box<dyn Device>) -> std::io::Result<LocalDevice> {
        let info = device.info();
        let regions: Vec<Option<RegionInfo>> = (0..info.num_regions.min(64)).map(|i| device.region_info(i)).collect();
        let mut mmaps = Vec::new();
        for i in 0..regions.len() as u32 {
            mmaps.push(match device.region_mmap(i) {
                Some((fd, areas)) => {
                    // Our own copy of the descriptor, as a client would receive one.
                    // SAFETY: F_DUPFD_CLOEXEC on a descriptor the device holds open.
                    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
                    if dup < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // SAFETY: a fresh descriptor owned by nobody else.
                    let file = unsafe { File::from_raw_fd(dup) };
                    Some(RegionMmap { fd: Arc::new(file), areas: (!areas.is_empty()).then_some(areas) })
                }
                None => None,
            });
        }
        let irqs = (0..info.num_irqs.min(16)).map(|i| device.irq_info(i)).collect();
        Ok(LocalDevice {
            device: Mutex::new(device),
            migration: Mutex::new(vfio_user::migration::MigrationState::default()),
            info,
            regions,
            mmaps,
            irqs,
            closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A stopped device (migration STOP, STOP_COPY) takes no interrupt or reset
    /// change, as a vfio-user server refuses them: EINVAL.
    fn check_allowed(&self, req: &vfio_user::proto::Request) -> Result<(), Error> {
        if self.migration.lock().unwrap_or_else(|e| e.into_inner()).allows(req) {
            Ok(())
        } else {
            Err(errno(libc::EINVAL))
        }
    }

    fn dev(&self) -> Result<std::sync::MutexGuard<'_, Box<dyn Device>>, Error> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::Closed);
        }
        Ok(self.device.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl VfioDevice for LocalDevice {
    fn info(&self) -> DeviceInfo {
        self.info
    }
    fn region(&self, index: u32) -> Option<RegionInfo> {
        self.regions.get(index as usize).copied().flatten()
    }
    fn region_mmap(&self, index: u32) -> Option<RegionMmap> {
        self.mmaps.get(index as usize).cloned().flatten()
    }
    fn irq(&self, index: u32) -> Option<IrqInfo> {
        self.irqs.get(index as usize).copied().flatten()
    }
    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.dev()?.region_read(index, offset, buf).map_err(errno)
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.dev()?.region_write(index, offset, data).map_err(errno)
    }
    fn region_write_posted(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.region_write(index, offset, data)
    }
    fn set_irqs(&self, irqs: SetIrqs, fds: &[RawFd]) -> Result<(), Error> {
        self.check_allowed(&vfio_user::proto::Request::DeviceSetIrqs(irqs))?;
        let mut files = Vec::with_capacity(fds.len());
        for &fd in fds {
            // Our own copy of each descriptor, as a device process would receive it.
            // SAFETY: F_DUPFD_CLOEXEC on a descriptor the caller holds open.
            let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
            if dup < 0 {
                return Err(Error::Io(std::io::Error::last_os_error()));
            }
            // SAFETY: a fresh descriptor owned by nobody else.
            files.push(unsafe { File::from_raw_fd(dup) });
        }
        self.dev()?.set_irqs(&irqs, files).map_err(errno)
    }
    fn reset(&self) -> Result<(), Error> {
        self.check_allowed(&vfio_user::proto::Request::DeviceReset)?;
        self.dev()?.reset().map_err(errno)
    }
    fn limits(&self) -> Limits {
        Limits::default()
    }
    fn client(&self) -> Option<&Client> {
        None
    }
    fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }
    fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::Release);
    }
    fn device_feature(&self, flags: u32, data: &[u8], argsz: u32) -> Result<Vec<u8>, Error> {
        let mut dev = self.dev()?;
        let f = vfio_user::proto::DeviceFeature { argsz, flags, data: data.to_vec() };
        let reply =
            self.migration.lock().unwrap_or_else(|e| e.into_inner()).feature(dev.migration(), &f).map_err(errno)?;
        Ok(vfio_user::proto::DeviceFeature::decode(&reply).map_err(Error::Proto)?.data)
    }
    fn mig_data_read(&self, size: u32) -> Result<Vec<u8>, Error> {
        let mut dev = self.dev()?;
        let m = vfio_user::proto::MigData { argsz: 8 + size, size };
        let reply =
            self.migration.lock().unwrap_or_else(|e| e.into_inner()).read(dev.migration(), &m).map_err(errno)?;
        Ok(reply.get(8..).unwrap_or_default().to_vec())
    }
    fn mig_data_write(&self, data: &[u8]) -> Result<(), Error> {
        let mut dev = self.dev()?;
        let m = vfio_user::proto::MigData { argsz: 8 + data.len() as u32, size: data.len() as u32 };
        self.migration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(dev.migration(), &m, data)
            .map(|_| ())
            .map_err(errno)
    }
    fn dirty_start(&self) -> Result<bool, Error> {
        Ok(false) // an in-process model reaches memory through the VMM's DmaSpace
    }
    fn dirty_stop(&self) -> Result<(), Error> {
        Ok(())
    }
    fn dirty_report(&self, _iova: u64, _len: u64) -> Result<Vec<u64>, Error> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::dma_engine::{DeviceMemory, MemFault};
    use vfio_user::proto::{self, mig};

    /// An engine that reaches no memory: only its interrupts and resets matter here.
    struct NoMemory;

    impl DeviceMemory for NoMemory {
        fn read(&mut self, iova: u64, _buf: &mut [u8]) -> Result<(), MemFault> {
            Err(MemFault { iova })
        }
        fn write(&mut self, iova: u64, _data: &[u8]) -> Result<(), MemFault> {
            Err(MemFault { iova })
        }
    }

    fn set_state(d: &LocalDevice, state: u32) {
        let data = [state.to_le_bytes(), u32::MAX.to_le_bytes()].concat();
        d.device_feature(mig::FEATURE_SET | mig::FEATURE_MIG_DEVICE_STATE, &data, 16).unwrap();
    }

    #[test]
    fn a_stopped_local_device_refuses_interrupt_changes_and_resets_as_a_server_does() {
        let engine = crate::dma_engine::vfio::EngineServer::new(Box::new(NoMemory)).unwrap();
        let local = LocalDevice::new(Box::new(engine)).unwrap();
        let index = (0..local.info().num_irqs).find(|&i| local.irq(i).is_some_and(|q| q.count > 0)).unwrap();
        let off =
            SetIrqs { flags: proto::IRQ_SET_DATA_NONE | proto::IRQ_SET_ACTION_TRIGGER, index, start: 0, count: 0 };
        local.set_irqs(off, &[]).unwrap();
        local.reset().unwrap();
        set_state(&local, mig::STATE_STOP);
        for r in [local.set_irqs(off, &[]), local.reset()] {
            assert!(matches!(r, Err(Error::Remote { errno: libc::EINVAL, .. })), "{r:?}");
        }
        set_state(&local, mig::STATE_RUNNING);
        local.set_irqs(off, &[]).unwrap();
        local.reset().unwrap();
    }
}
