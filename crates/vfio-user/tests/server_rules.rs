//! The server keeps the protocol's rules as libvfio-user does: VERSION first with a
//! matching major; DMA windows with EEXIST / ENOENT / partial-unmap / unmap-all; files
//! that cannot back a window refused at DMA_MAP; one mapping per distinct file however
//! many windows; permissions of each window enforced; a file shrunk under a window
//! faults the access instead of killing the device.
#![allow(clippy::unwrap_used, missing_docs)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use vfio_user::endpoint::{Endpoint, Error};
use vfio_user::mapping::FileMapping;
use vfio_user::proto::{
    self, Command, DMA_READ_FLAG, DMA_UNMAP_FLAG_ALL, DMA_WRITE_FLAG, DeviceInfo, DmaMap, DmaUnmap, IrqInfo,
    RegionInfo, SetIrqs, Version,
};
use vfio_user::server::{DeviceDma, DmaFault, Server};
use vfio_user::windows::{DmaWindows, Local};

struct Nothing;
impl vfio_user::server::Device for Nothing {
    fn info(&self) -> DeviceInfo {
        DeviceInfo { flags: proto::DEVICE_FLAGS_PCI, num_regions: 0, num_irqs: 0 }
    }
    fn region_info(&self, _i: u32) -> Option<RegionInfo> {
        None
    }
    fn irq_info(&self, _i: u32) -> Option<IrqInfo> {
        None
    }
    fn region_read(&mut self, _r: u32, _o: u64, _b: &mut [u8]) -> Result<(), i32> {
        Err(libc::EINVAL)
    }
    fn region_write(&mut self, _r: u32, _o: u64, _d: &[u8]) -> Result<(), i32> {
        Err(libc::EINVAL)
    }
    fn set_irqs(&mut self, _s: &SetIrqs, _f: Vec<File>) -> Result<(), i32> {
        Err(libc::EINVAL)
    }
    fn reset(&mut self) -> Result<(), i32> {
        Ok(())
    }
}

/// A server on a thread and a raw client endpoint (whose reader runs too).
struct Pair {
    ep: Arc<Endpoint>,
    dma: DeviceDma,
    server: std::thread::JoinHandle<Error>,
    reader: std::thread::JoinHandle<Error>,
}

fn pair() -> Pair {
    let (a, b) = UnixStream::pair().unwrap();
    let server = Server::new(Endpoint::new(b));
    let dma = server.dma();
    let server = std::thread::spawn(move || server.serve(&mut Nothing));
    let ep = Endpoint::new(a);
    let e = Arc::clone(&ep);
    let reader = std::thread::spawn(move || e.run(|_| {}));
    Pair { ep, dma, server, reader }
}

fn negotiated() -> Pair {
    let p = pair();
    let r = p.ep.request(Command::Version, &Version::ours().encode(), &[]).unwrap();
    let v = Version::decode(&r.payload).unwrap();
    assert_eq!((v.major, v.minor), (0, 1));
    assert_eq!(v.limits().max_dma_maps, 65535);
    p
}

fn errno<T: std::fmt::Debug>(r: Result<T, Error>) -> i32 {
    match r {
        Err(Error::Remote { errno, .. }) => errno,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

fn map(p: &Pair, address: u64, size: u64, flags: u32, fd: Option<&File>, offset: u64) -> Result<(), Error> {
    let fds: Vec<i32> = fd.iter().map(|f| f.as_raw_fd()).collect();
    p.ep.request(Command::DmaMap, &DmaMap { flags, offset, address, size }.encode(), &fds).map(|_| ())
}

fn unmap(p: &Pair, address: u64, size: u64, flags: u32) -> Result<(), Error> {
    p.ep.request(Command::DmaUnmap, &DmaUnmap { flags, address, size }.encode(), &[]).map(|_| ())
}

fn memfd(size: u64, sealed: bool) -> File {
    let flags = libc::MFD_CLOEXEC | if sealed { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: memfd_create with a NUL-terminated name; the fd is taken over at once.
    let fd = unsafe { libc::memfd_create(c"test".as_ptr(), flags) };
    assert!(fd >= 0);
    // SAFETY: fresh descriptor.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    if sealed {
        // SAFETY: F_ADD_SEALS on our memfd; no memory is passed.
        let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) };
        assert_eq!(r, 0);
    }
    f
}

#[test]
fn a_command_before_version_is_refused_and_the_connection_closes() {
    let _s = serial();
    let p = pair();
    assert_eq!(errno(p.ep.request(Command::DeviceGetInfo, &DeviceInfo::default().encode(), &[])), libc::EINVAL);
    assert!(matches!(p.server.join().unwrap(), Error::Closed));
    p.reader.join().unwrap();
}

#[test]
fn a_foreign_major_version_is_refused_and_the_connection_closes() {
    let _s = serial();
    let p = pair();
    let v = Version { major: 1, minor: 0, capabilities: serde_json::json!({}) };
    assert_eq!(errno(p.ep.request(Command::Version, &v.encode(), &[])), libc::ENOTSUP);
    assert!(matches!(p.server.join().unwrap(), Error::Closed));
    p.reader.join().unwrap();
}

#[test]
fn dma_windows_follow_the_map_and_unmap_rules() {
    let _s = serial();
    let p = negotiated();
    let rw = DMA_READ_FLAG | DMA_WRITE_FLAG;
    map(&p, 0x10000, 0x4000, rw, None, 0).unwrap();
    assert_eq!(errno(map(&p, 0x10000, 0x4000, rw, None, 0)), libc::EEXIST, "same window");
    assert_eq!(errno(map(&p, 0x13000, 0x4000, rw, None, 0)), libc::EEXIST, "overlapping the end");
    assert_eq!(errno(map(&p, 0xf000, 0x2000, rw, None, 0)), libc::EEXIST, "overlapping the start");
    assert_eq!(errno(map(&p, 0x20000, 0x1000, 0, None, 0)), libc::EINVAL, "no permission");
    map(&p, 0x14000, 0x1000, DMA_READ_FLAG, None, 0).unwrap();
    assert_eq!(errno(unmap(&p, 0x30000, 0x1000, 0)), libc::ENOENT, "nothing mapped there");
    assert_eq!(errno(unmap(&p, 0x10000, 0x2000, 0)), libc::EINVAL, "half of a window");
    assert_eq!(errno(unmap(&p, 0x11000, 0x1000, 0)), libc::EINVAL, "inside a window");
    assert_eq!(errno(unmap(&p, 0x10000, 0x5000, 0)), libc::EINVAL, "two windows at once");
    assert_eq!(p.dma.windows().len(), 2, "refusals changed nothing");
    unmap(&p, 0x14000, 0x1000, 0).unwrap();
    assert_eq!(errno(unmap(&p, 0x14000, 0x1000, 0)), libc::ENOENT, "already unmapped");
    map(&p, 0x40000, 0x1000, rw, None, 0).unwrap();
    assert_eq!(errno(unmap(&p, 0x40000, 0x1000, DMA_UNMAP_FLAG_ALL)), libc::EINVAL, "ALL takes no range");
    unmap(&p, 0, 0, DMA_UNMAP_FLAG_ALL).unwrap();
    assert!(p.dma.windows().is_empty(), "unmap-all");
}

#[test]
fn a_file_that_cannot_back_its_window_is_refused_at_dma_map() {
    let _s = serial();
    let p = negotiated();
    let f = memfd(0x4000, true);
    let rw = DMA_READ_FLAG | DMA_WRITE_FLAG;
    assert_eq!(errno(map(&p, 0x10000, 0x5000, rw, Some(&f), 0)), libc::EINVAL, "file smaller than the window");
    assert_eq!(errno(map(&p, 0x10000, 0x2000, rw, Some(&f), 0x3000)), libc::EINVAL, "offset + size past the end");
    let pipe = {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two descriptors, taken over at once.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh descriptors.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    };
    assert_eq!(errno(map(&p, 0x10000, 0x1000, rw, Some(&pipe.0), 0)), libc::EINVAL, "not a file");
    map(&p, 0x10000, 0x4000, rw, Some(&f), 0).unwrap();
    assert_eq!(p.dma.windows().len(), 1);
}

/// Tests that count the process's descriptors and guarded mappings run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn one_file_mapped_ten_thousand_times_costs_one_mapping_and_no_descriptor() {
    let _s = serial();
    let p = negotiated();
    let f = memfd(0x10000, true);
    let fds_before = std::fs::read_dir("/proc/self/fd").unwrap().count();
    let guarded_before = FileMapping::guarded();
    for i in 0..10_000u64 {
        map(&p, 0x1_0000_0000 + i * 0x1000, 0x1000, DMA_READ_FLAG | DMA_WRITE_FLAG, Some(&f), 0).unwrap();
    }
    assert_eq!(p.dma.windows().len(), 10_000);
    assert_eq!(p.dma.windows().mapped_files(), 1, "one mapping of the one file");
    assert!(FileMapping::guarded() <= guarded_before + 1);
    let fds_after = std::fs::read_dir("/proc/self/fd").unwrap().count();
    assert!(fds_after <= fds_before + 1, "descriptors {fds_before} -> {fds_after}");
    // All the windows are the same page.
    p.dma.write(0x1_0000_0000 + 77 * 0x1000, b"same page").unwrap();
    let mut b = [0u8; 9];
    p.dma.read(0x1_0000_0000 + 9_999 * 0x1000, &mut b).unwrap();
    assert_eq!(&b, b"same page");
    unmap(&p, 0, 0, DMA_UNMAP_FLAG_ALL).unwrap();
    assert_eq!(p.dma.windows().mapped_files(), 0);
    assert_eq!(FileMapping::guarded(), guarded_before, "the mapping went with its last window");
}

#[test]
fn a_window_allows_only_what_its_flags_say() {
    let _s = serial();
    let w = DmaWindows::new(16);
    let f = memfd(0x3000, true);
    w.map(&DmaMap { flags: DMA_WRITE_FLAG, offset: 0, address: 0x1000, size: 0x1000 }, Some(f.try_clone().unwrap()))
        .unwrap();
    w.map(&DmaMap { flags: DMA_READ_FLAG, offset: 0x1000, address: 0x2000, size: 0x1000 }, Some(f)).unwrap();
    let mut b = [0u8; 8];
    assert_eq!(w.read(0x1000, &mut b), Local::NotHere, "a write-only window is not readable in place");
    assert_eq!(w.write(0x1000, b"12345678"), Local::Done);
    assert_eq!(w.write(0x2000, b"12345678"), Local::NotHere, "a read-only window is not writable in place");
    assert_eq!(w.read(0x2000, &mut b), Local::Done);
    assert_eq!(w.copy(0x1000, 0x2000, 8), Local::NotHere, "copy needs read at the source, write at the target");
    assert_eq!(w.copy(0x2000, 0x1000, 8), Local::Done);
    let ro = memfd(0x1000, true);
    // SAFETY: reopen our own memfd read-only through /proc.
    let ro_fd = File::open(format!("/proc/self/fd/{}", ro.as_raw_fd())).unwrap();
    let m = DmaMap { flags: DMA_READ_FLAG | DMA_WRITE_FLAG, offset: 0, address: 0x8000, size: 0x1000 };
    assert_eq!(w.map(&m, Some(ro_fd)), Err(libc::EACCES), "a writable window on a read-only descriptor");
}

/// DMA_READ / DMA_WRITE only of what DMA_MAP exported (the spec: the address "must
/// have been previously exported"): an access to an address no window covers fails in
/// the device, and the client is never asked.
#[test]
fn the_client_is_asked_only_for_exported_ranges() {
    let _s = serial();
    let w = DmaWindows::new(16);
    let mut b = [0u8; 8];
    assert_eq!(w.read(0x5000, &mut b), Local::Fault, "nothing exported");
    assert_eq!(w.write(0x5000, &b), Local::Fault);
    w.map(&DmaMap { flags: DMA_READ_FLAG | DMA_WRITE_FLAG, offset: 0, address: 0x5000, size: 0x1000 }, None).unwrap();
    assert_eq!(w.read(0x5000, &mut b), Local::NotHere, "exported without a file: by messages");
    assert_eq!(w.read(0x5ffc, &mut b), Local::Fault, "runs past the window into nothing");
    assert_eq!(w.copy(0x5000, 0x9000, 8), Local::Fault, "the target was never exported");
    w.map(&DmaMap { flags: DMA_READ_FLAG, offset: 0, address: 0x6000, size: 0x1000 }, None).unwrap();
    assert_eq!(w.read(0x5ffc, &mut b), Local::NotHere, "across two exported windows: the client decides");
    // Through a server: the client (this test) sees no request for an unexported range.
    let (a, c) = UnixStream::pair().unwrap();
    let server = Server::new(Endpoint::new(c));
    let dma = server.dma();
    let _serving = std::thread::spawn(move || server.serve(&mut Nothing));
    let ep = Endpoint::new(a);
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (e, n) = (Arc::clone(&ep), Arc::clone(&asked));
    let _reader = std::thread::spawn(move || {
        e.run(move |_| {
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })
    });
    let t = std::time::Instant::now();
    assert_eq!(dma.read(0x7000, &mut b), Err(DmaFault));
    assert_eq!(dma.write(0x7000, &b), Err(DmaFault));
    assert!(t.elapsed() < std::time::Duration::from_secs(1), "refused at once, not after a deadline");
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 0, "the client was never asked");
    ep.shutdown();
}

#[test]
fn a_file_shrunk_under_a_window_faults_the_access_and_the_device_lives() {
    let _s = serial();
    let p = negotiated();
    let f = memfd(0x4000, false); // unsealed: its owner may shrink it
    map(&p, 0x10000, 0x4000, DMA_READ_FLAG | DMA_WRITE_FLAG, Some(&f), 0).unwrap();
    p.dma.write(0x13000, b"before").unwrap();
    f.set_len(0x1000).unwrap(); // the peer shrinks the file under the window
    let mut b = [0u8; 6];
    assert_eq!(p.dma.read(0x13000, &mut b), Err(DmaFault), "a read past the new end faults");
    assert_eq!(p.dma.write(0x10000, b"after!"), Err(DmaFault), "the whole mapping is poisoned");
    // Still alive and serving.
    assert!(p.ep.request(Command::DeviceGetInfo, &DeviceInfo::default().encode(), &[]).is_ok());
    unmap(&p, 0x10000, 0x4000, 0).unwrap();
    // A new window on a fresh file works.
    let g = memfd(0x1000, true);
    map(&p, 0x20000, 0x1000, DMA_READ_FLAG | DMA_WRITE_FLAG, Some(&g), 0).unwrap();
    p.dma.write(0x20000, b"fresh!").unwrap();
    p.dma.read(0x20000, &mut b).unwrap();
    assert_eq!(&b, b"fresh!");
}

#[test]
fn a_sealed_memfd_cannot_shrink_under_its_windows() {
    let _s = serial();
    let f = memfd(0x4000, true);
    let e = f.set_len(0x1000).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "F_SEAL_SHRINK holds");
}

/// DMA dirty logging in the windows: in-place writes and copies are logged per page of
/// the IOVA space (windows not aligned to the page included), reports span windows and
/// clear what they return; sizes and ranges a peer could abuse are refused.
#[test]
fn dma_dirty_logging_reports_every_written_page_once() {
    let _s = serial();
    let w = DmaWindows::new(16);
    let f = memfd(0x10_0000, true);
    let rw = DMA_READ_FLAG | DMA_WRITE_FLAG;
    w.map(&DmaMap { flags: rw, offset: 0, address: 0x1000, size: 0x8000 }, Some(f.try_clone().unwrap())).unwrap();
    w.map(&DmaMap { flags: rw, offset: 0x8000, address: 0x9000, size: 0x8000 }, Some(f)).unwrap();
    assert_eq!(w.report(0, 0x10000, 4096), Err(libc::EINVAL), "logging is off");
    assert_eq!(w.start_logging(512), Err(libc::EINVAL), "below 4 KiB");
    w.start_logging(4096).unwrap();
    assert_eq!(w.start_logging(8192), Err(libc::EINVAL), "another size while on");
    assert_eq!(w.write(0x2ff8, &[1; 16]), Local::Done); // pages 2 and 3
    assert_eq!(w.copy(0x1000, 0x9800, 0x1000), Local::Done); // pages 9 and 10
    let bits = w.report(0, 0x11000, 4096).unwrap();
    assert_eq!(bits, vec![(1 << 2) | (1 << 3) | (1 << 9) | (1 << 10)], "across both windows");
    assert_eq!(w.report(0, 0x11000, 4096).unwrap(), vec![0], "a report clears");
    // A 2 MiB logging page over windows that are not 2 MiB-aligned.
    w.stop_logging();
    w.start_logging(2 << 20).unwrap();
    assert_eq!(w.write(0x9000, &[2; 8]), Local::Done);
    assert_eq!(w.report(0, 2 << 20, 2 << 20).unwrap(), vec![1], "page 0 of the IOVA space");
    // Bounds a peer could abuse.
    assert_eq!(w.report(0, u64::MAX - 1, 2 << 20), Err(libc::EINVAL), "a bitmap over one reply");
    assert_eq!(w.report(u64::MAX - (2 << 20) + 1, 2 << 20, 2 << 20), Err(libc::EINVAL), "misaligned");
}

/// Dirty logs are kept per file, not per window: a guest mapping one 1 GiB file 2,048
/// times costs one 32 KiB log; two windows onto one page share its bit; logs larger
/// than the bound, and windows that could not be logged, are refused.
#[test]
fn dma_dirty_logs_are_per_file_and_bounded() {
    use vfio_user::windows::{LOG_GRAIN, MAX_LOG_BYTES};
    let _s = serial();
    let w = DmaWindows::new(4096);
    let f = memfd(1 << 30, true);
    let rw = DMA_READ_FLAG | DMA_WRITE_FLAG;
    for k in 0..2048u64 {
        let m = DmaMap { flags: rw, offset: 0, address: (k + 1) << 30, size: 1 << 30 };
        w.map(&m, Some(f.try_clone().unwrap())).unwrap();
    }
    w.start_logging(4096).unwrap();
    assert_eq!(w.log_bytes(), (1u64 << 30) / LOG_GRAIN / 8, "one log for the file, not one per window");
    // Written through window 7, reported through window 3 (the same page of the file).
    assert_eq!(w.write((7 << 30) + 0x5000, &[1; 8]), Local::Done);
    assert_eq!(w.report(3 << 30, 0x10000, 4096).unwrap(), vec![1 << 5]);
    assert_eq!(w.report(7 << 30, 0x10000, 4096).unwrap(), vec![0], "taken by the first report");
    // A window not aligned to the log's grain cannot be logged.
    let g = memfd(0x10000, true);
    let odd = DmaMap { flags: rw, offset: 0x800, address: 0x1000, size: 0x1000 };
    assert_eq!(w.map(&odd, Some(g.try_clone().unwrap())), Err(libc::EINVAL));
    w.stop_logging();
    assert_eq!(w.log_bytes(), 0);
    w.map(&odd, Some(g)).unwrap();
    assert_eq!(w.start_logging(4096), Err(libc::EINVAL), "a window that could not be logged");
    // Files whose logs would pass the bound: refused whole, nothing kept.
    let w = DmaWindows::new(16);
    let big = (MAX_LOG_BYTES * 8 * LOG_GRAIN) / 2 + (1 << 30); // each file's log: just over half the bound
    for k in 0..2u64 {
        let h = memfd(big, true);
        w.map(&DmaMap { flags: rw, offset: 0, address: k << 44, size: big }, Some(h)).unwrap();
    }
    assert_eq!(w.start_logging(4096), Err(libc::ENOMEM));
    assert_eq!(w.log_bytes(), 0);
}
