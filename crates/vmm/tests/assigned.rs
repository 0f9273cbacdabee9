//! Assigned devices in process (qtest machine, device servers on threads): a device's
//! DMA window limit reaches the guest as a transient status; a failed attach leaves
//! nothing behind and the VMM goes on with its other devices; every descriptor of the
//! VMM is close-on-exec.
#![allow(clippy::unwrap_used, missing_docs)]

use abi::hcall::{Args, Status};
use abi::pvdma::{self as pv, dir};
use std::fs::File;
use std::os::unix::net::UnixStream;
use std::time::Duration;
use vfio_user::endpoint::Endpoint;
use vfio_user::proto::{self, DeviceInfo, IrqInfo, RegionInfo, SetIrqs};
use vfio_user::server::{Device, Server};
use vmm::assigned::{IommuMode, RemoteSpec};
use vmm::{AccelKind, DeviceSpec, DmaFrontend, Vm, VmConfig};

/// Tests here count the process's threads: they run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn vm() -> Vm {
    let mut c = VmConfig::new(AccelKind::Qtest);
    c.memory = 64 << 20;
    c.locked_memory = Some(64 << 20);
    c.serial_out = Box::new(std::io::sink());
    c.err_out = Box::new(std::io::sink());
    Vm::new(c).unwrap()
}

/// A DMA engine served on a thread, its server announcing `max_windows`.
fn engine(max_windows: usize) -> RemoteSpec {
    let (ours, theirs) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        let server = Server::with_max_dma_maps(Endpoint::new(theirs), max_windows);
        let mut dev = devices::dma_engine::vfio::EngineServer::new(&server).unwrap();
        server.serve(&mut dev);
    });
    RemoteSpec { stream: ours, mode: IommuMode::SharedFd, process: None, timeout: Duration::from_secs(5) }
}

fn hcall(vm: &Vm, nr: u64, a: [u64; 5]) -> abi::hcall::Ret {
    vm.hypercall(&Args { nr, a })
}

#[test]
fn a_device_out_of_dma_windows_answers_busy_and_recovers_after_an_unmap() {
    let _s = serial();
    let vm = vm();
    vm.attach_device(DeviceSpec::Remote(engine(8)), DmaFrontend::Paravirtual).unwrap();
    let mut iovas = Vec::new();
    for i in 0..8 {
        let r = hcall(&vm, pv::MAP, [0, 0x10_0000 + i * 0x1000, 0x1000, dir::TO_DEVICE, 0]);
        assert_eq!(r.status, Status::Success, "map {i}");
        iovas.push(r.r[0]);
    }
    let r = hcall(&vm, pv::MAP, [0, 0x20_0000, 0x1000, dir::TO_DEVICE, 0]);
    assert_eq!(r.status, Status::Busy, "the device holds all the windows it accepts: transient");
    assert_eq!(vm.dma().account().pinned(), 8 * 0x1000, "the refused map left no pin");
    assert_eq!(hcall(&vm, pv::UNMAP, [0, iovas[0], 0x1000, 0, 0]).status, Status::Success);
    assert_eq!(hcall(&vm, pv::MAP, [0, 0x20_0000, 0x1000, dir::TO_DEVICE, 0]).status, Status::Success, "retry");
    let d = &vm.devices()[0];
    assert!(!d.is_dead(), "the limit is not a death");
}

/// A device that has no MSI to offer (libvfio-user's samples): SET_IRQS fails.
struct NoMsi;

impl Device for NoMsi {
    fn info(&self) -> DeviceInfo {
        DeviceInfo { flags: proto::DEVICE_FLAGS_PCI, num_regions: 9, num_irqs: 5 }
    }
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        (index < 9).then_some(RegionInfo { flags: 3, index, cap_offset: 0, size: 0x1000, offset: 0 })
    }
    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        (index < 5).then_some(IrqInfo { flags: 0, index, count: 0 })
    }
    fn region_read(&mut self, _r: u32, _o: u64, b: &mut [u8]) -> Result<(), i32> {
        b.fill(0);
        Ok(())
    }
    fn region_write(&mut self, _r: u32, _o: u64, _d: &[u8]) -> Result<(), i32> {
        Ok(())
    }
    fn set_irqs(&mut self, _s: &SetIrqs, _f: Vec<File>) -> Result<(), i32> {
        Err(libc::EINVAL)
    }
    fn reset(&mut self) -> Result<(), i32> {
        Ok(())
    }
}

fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
        .filter(|c| c.trim() == name)
        .count()
}

#[test]
fn a_failed_attach_leaves_no_source_thread_or_reference_and_the_vmm_goes_on() {
    let _s = serial();
    let vm = vm();
    let before = vm.irqs().counts();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || Server::new(Endpoint::new(theirs)).serve(&mut NoMsi));
    let spec = RemoteSpec { stream: ours, mode: IommuMode::SharedFd, process: None, timeout: Duration::from_secs(5) };
    let e = vm.attach_device(DeviceSpec::Remote(spec), DmaFrontend::Identity).unwrap_err().to_string();
    assert!(e.contains("setting up its MSI") && e.contains("Invalid argument"), "{e}");
    assert_eq!(vm.irqs().counts(), before, "its MSI source was detached (no registry -> device reference left)");
    assert!(vm.devices().is_empty());
    assert_eq!(vm.dma().account().pinned(), 0, "its identity domain is gone with it");
    server.join().unwrap(); // the connection was closed
    let t = std::time::Instant::now();
    while threads_named("vfu-client") > 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "its reader thread is still running");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The VMM goes on: the next device attaches and works.
    let d = vm.attach_device(DeviceSpec::Remote(engine(64)), DmaFrontend::Identity).unwrap();
    let mut id = [0u8; 4];
    assert!(vm.mmio_read(d.bar0(), &mut id));
    assert_eq!(u32::from_le_bytes(id), abi::dma_engine::ID_VALUE);
}

#[test]
fn every_descriptor_of_the_vmm_is_close_on_exec() {
    let _s = serial();
    let vm = vm();
    vm.attach_device(DeviceSpec::Remote(engine(64)), DmaFrontend::Paravirtual).unwrap();
    vm.attach_device(DeviceSpec::Inline, DmaFrontend::Identity).unwrap();
    let mut leaks = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let n: i32 = e.file_name().to_string_lossy().parse().unwrap();
        // SAFETY: F_GETFD on a descriptor number; no memory is passed.
        let flags = unsafe { libc::fcntl(n, libc::F_GETFD) };
        let target = std::fs::read_link(e.path()).map(|l| l.to_string_lossy().into_owned()).unwrap_or_default();
        // 0-2 are stdio; the test harness hands this process others it did not open
        // (they are not eventfds, memfds or sockets of ours).
        let ours = target.contains("eventfd")
            || target.contains("memfd")
            || target.contains("socket")
            || target.contains("kvm")
            || target.contains("eventpoll");
        if n > 2 && flags >= 0 && flags & libc::FD_CLOEXEC == 0 && ours {
            leaks.push(format!("{n} -> {target}"));
        }
    }
    assert!(leaks.is_empty(), "inheritable descriptors: {leaks:?}");
}
