//! Fuzzes DMA dirty logging in a device server, over a real socket pair: arbitrary
//! DMA_MAP (a memfd attached), DMA_UNMAP, DEVICE_FEATURE DMA_LOGGING_START / STOP /
//! REPORT with arbitrary fields, and device writes and copies at arbitrary IOVAs.
//! Nothing may panic or hang, and the logs never take more than their bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;
use vfio_user::endpoint::Endpoint;
use vfio_user::proto::{Command, DeviceFeature, DmaMap, DmaUnmap, Version, mig};
use vfio_user::windows::MAX_LOG_BYTES;

struct Nothing;
impl vfio_user::server::Device for Nothing {
    fn info(&self) -> vfio_user::proto::DeviceInfo {
        vfio_user::proto::DeviceInfo { flags: vfio_user::proto::DEVICE_FLAGS_PCI, num_regions: 0, num_irqs: 0 }
    }
    fn region_info(&self, _: u32) -> Option<vfio_user::proto::RegionInfo> {
        None
    }
    fn irq_info(&self, _: u32) -> Option<vfio_user::proto::IrqInfo> {
        None
    }
    fn region_read(&mut self, _: u32, _: u64, _: &mut [u8]) -> Result<(), i32> {
        Err(libc::EINVAL)
    }
    fn region_write(&mut self, _: u32, _: u64, _: &[u8]) -> Result<(), i32> {
        Err(libc::EINVAL)
    }
    fn set_irqs(&mut self, _: &vfio_user::proto::SetIrqs, _: Vec<std::fs::File>) -> Result<(), i32> {
        Err(libc::EINVAL)
    }
    fn reset(&mut self) -> Result<(), i32> {
        Ok(())
    }
}

/// A sealed 16 MiB memfd: what the VMM sends for guest RAM.
fn memfd() -> Option<std::fs::File> {
    // SAFETY: memfd_create with a NUL-terminated name; the descriptor is owned at once.
    let fd = unsafe { libc::memfd_create(c"fuzz".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(16 << 20).ok()?;
    Some(f)
}

fn u64_at(d: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, x) in b.iter_mut().enumerate() {
        *x = d.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let Some(file) = memfd() else { return };
    let Ok((ours, theirs)) = UnixStream::pair() else { return };
    let server = vfio_user::server::Server::new(Endpoint::with_timeout(theirs, Duration::from_millis(200)));
    let dma = server.dma();
    let serving = std::thread::spawn(move || server.serve(&mut Nothing));
    let ep = Endpoint::with_timeout(ours, Duration::from_secs(5));
    let reader = {
        let ep = std::sync::Arc::clone(&ep);
        std::thread::spawn(move || ep.run(|_| {}))
    };
    let _ = ep.request(Command::Version, &Version::ours().encode(), &[]);
    for op in data.chunks(25) {
        let (kind, a, b, c) = (op[0], u64_at(op, 1), u64_at(op, 9), u64_at(op, 17));
        // Steer addresses toward the small file and page-aligned values half the time.
        let (a, b, c) = if kind & 0x80 != 0 { (a & 0xff_f000, b & 0xff_f000, c % (32 << 20)) } else { (a, b, c) };
        let feature = |flags: u32, payload: Vec<u8>| {
            let f = DeviceFeature { argsz: (payload.len() + 4096) as u32, flags, data: payload };
            let _ = ep.request(Command::DeviceFeature, &f.encode(), &[]);
        };
        match kind % 8 {
            0 => {
                let m = DmaMap { flags: (c as u32) & 3, offset: b, address: a, size: c };
                let _ = ep.request(Command::DmaMap, &m.encode(), &[file.as_raw_fd()]);
            }
            1 => {
                let u = DmaUnmap { flags: (c as u32) & 2, address: a, size: b };
                let _ = ep.request(Command::DmaUnmap, &u.encode(), &[]);
            }
            2 => {
                let mut p = a.to_le_bytes().to_vec(); // page size
                p.extend_from_slice(&b.to_le_bytes()[..(c % 9) as usize]);
                feature(mig::FEATURE_SET | mig::FEATURE_DMA_LOGGING_START, p);
            }
            3 => feature(mig::FEATURE_SET | mig::FEATURE_DMA_LOGGING_STOP, vec![]),
            4 => {
                let mut p = a.to_le_bytes().to_vec();
                p.extend_from_slice(&b.to_le_bytes());
                p.extend_from_slice(&(1u64 << (c % 40)).to_le_bytes());
                feature(mig::FEATURE_GET | mig::FEATURE_DMA_LOGGING_REPORT, p);
            }
            5 => {
                let _ = dma.windows().write(a, &vec![kind; (b % 8192) as usize]);
            }
            6 => {
                let _ = dma.windows().copy(a, b, c % (1 << 21));
            }
            _ => {
                let _ = dma.windows().report(a, b, 1 << (c % 40));
            }
        }
        assert!(dma.windows().log_bytes() <= MAX_LOG_BYTES);
    }
    ep.shutdown();
    let _ = reader.join();
    let _ = serving.join();
});
