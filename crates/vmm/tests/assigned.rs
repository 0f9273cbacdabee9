//! Assigned devices in process (qtest machine, device servers on threads): a device's
//! DMA window limit reaches the guest as a transient status; a device without MSI is
//! a PCI device like any other; a failed attach (a malformed device, or any step made
//! to fail) leaves nothing behind and the VMM goes on with its other devices; every
//! descriptor of the VMM is close-on-exec.
#![allow(clippy::unwrap_used, missing_docs)]

use abi::hcall::{Args, Status};
use abi::pvdma::{self as pv, dir};
use std::fs::File;
use std::os::unix::net::UnixStream;
use std::time::Duration;
use vfio_user::endpoint::Endpoint;
use vfio_user::proto::{self, DeviceInfo, IrqInfo, RegionInfo, SetIrqs};
use vfio_user::server::{Device, Server};
use vmm::device_manager::AttachStep;
use vmm::{AccelKind, AssignedDevice, DeviceSpec, IommuMode, RemoteSpec, Vm, VmConfig};

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
        let mut dev = devices::dma_engine::vfio::EngineServer::remote(&server).unwrap();
        server.serve(&mut dev);
    });
    RemoteSpec { stream: ours, mode: IommuMode::SharedFd, process: None, timeout: Duration::from_secs(5) }
}

/// Memory decoding and bus mastering on, as the guest's driver would.
fn enable(vm: &Vm, d: &AssignedDevice) {
    let cmd = abi::pci::command::MEMORY | abi::pci::command::MASTER;
    vm.pci().config_write(d.slot(), abi::pci::reg::COMMAND, &cmd.to_le_bytes());
}

fn hcall(vm: &Vm, nr: u64, a: [u64; 5]) -> abi::hcall::Ret {
    vm.hypercall(&Args { nr, a })
}

#[test]
fn a_device_out_of_dma_windows_answers_busy_and_recovers_after_an_unmap() {
    let _s = serial();
    let vm = vm();
    let d = vm.attach_device(DeviceSpec::Remote(engine(8)), "pvdma").unwrap();
    enable(&vm, &d);
    let dev = u64::from(d.bdf());
    let mut iovas = Vec::new();
    for i in 0..8 {
        let r = hcall(&vm, pv::MAP, [dev, 0x10_0000 + i * 0x1000, 0x1000, dir::TO_DEVICE, 0]);
        assert_eq!(r.status, Status::Success, "map {i}");
        iovas.push(r.r[0]);
    }
    let r = hcall(&vm, pv::MAP, [dev, 0x20_0000, 0x1000, dir::TO_DEVICE, 0]);
    assert_eq!(r.status, Status::Busy, "the device holds all the windows it accepts: transient");
    assert_eq!(vm.dma().account().pinned(), 8 * 0x1000, "the refused map left no pin");
    assert_eq!(hcall(&vm, pv::UNMAP, [dev, iovas[0], 0x1000, 0, 0]).status, Status::Success);
    assert_eq!(hcall(&vm, pv::MAP, [dev, 0x20_0000, 0x1000, dir::TO_DEVICE, 0]).status, Status::Success, "retry");
    assert!(!d.is_dead(), "the limit is not a death");
}

/// A PCI device with `config_size` bytes of configuration space (the header of a
/// plain function with BAR 0 of 4 KiB) and no MSI, as libvfio-user's samples: SET_IRQS
/// of MSI or MSI-X fails.
struct Plain {
    config_size: u64,
    bar0_size: u64,
    msix_vectors: u32,
    /// Offers ERR and REQ; their eventfds land here.
    notify: Option<std::sync::Arc<std::sync::Mutex<Vec<File>>>>,
}

impl Device for Plain {
    fn info(&self) -> DeviceInfo {
        DeviceInfo { flags: proto::DEVICE_FLAGS_PCI, num_regions: 9, num_irqs: 5 }
    }
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let size = match index {
            0 => self.bar0_size,
            7 => self.config_size,
            _ => 0,
        };
        (index < 9).then_some(RegionInfo { flags: 3, index, cap_offset: 0, size, offset: 0 })
    }
    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        let count = match index {
            proto::PCI_MSIX => self.msix_vectors,
            proto::PCI_ERR | proto::PCI_REQ => u32::from(self.notify.is_some()),
            _ => 0,
        };
        (index < 5).then_some(IrqInfo { flags: 0, index, count })
    }
    fn region_read(&mut self, r: u32, o: u64, b: &mut [u8]) -> Result<(), i32> {
        b.fill(0);
        if r == 7 {
            let mut cfg = [0u8; 64];
            cfg[0..4].copy_from_slice(&0x1234_abcdu32.to_le_bytes());
            for (i, x) in b.iter_mut().enumerate() {
                *x = cfg.get(o as usize + i).copied().unwrap_or(0);
            }
        }
        Ok(())
    }
    fn region_write(&mut self, _r: u32, _o: u64, _d: &[u8]) -> Result<(), i32> {
        Ok(())
    }
    fn set_irqs(&mut self, s: &SetIrqs, f: Vec<File>) -> Result<(), i32> {
        match (s.index, &self.notify) {
            (proto::PCI_INTX, _) => Ok(()),
            (proto::PCI_ERR | proto::PCI_REQ, Some(n)) => {
                n.lock().unwrap().extend(f);
                Ok(())
            }
            _ => Err(libc::EINVAL),
        }
    }
    fn reset(&mut self) -> Result<(), i32> {
        Ok(())
    }
}

fn plain(config_size: u64) -> (RemoteSpec, std::thread::JoinHandle<vfio_user::Error>) {
    shaped(Plain { config_size, bar0_size: 0x1000, msix_vectors: 0, notify: None })
}

fn shaped(mut dev: Plain) -> (RemoteSpec, std::thread::JoinHandle<vfio_user::Error>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || Server::new(Endpoint::new(theirs)).serve(&mut dev));
    (RemoteSpec { stream: ours, mode: IommuMode::SharedFd, process: None, timeout: Duration::from_secs(5) }, server)
}

fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
        .filter(|c| c.trim() == name)
        .count()
}

#[test]
fn a_device_without_msi_is_assigned_and_reachable() {
    let _s = serial();
    let vm = vm();
    let (spec, _server) = plain(256);
    let d = vm.attach_device(DeviceSpec::Remote(spec), "identity").unwrap();
    let mut id = [0u8; 4];
    vm.pci().config_read(d.slot(), 0, &mut id);
    assert_eq!(u32::from_le_bytes(id), 0x1234_abcd, "its identity, read from its configuration region");
    assert_eq!(d.bars().len(), 1, "BAR 0 placed and decoding: {:?}", d.bars());
    assert_eq!(d.bars()[0].size, 0x1000, "its size from the device's region info");
}

#[test]
fn a_device_error_and_release_request_reach_the_vmm_counted() {
    use std::io::Write;
    let _s = serial();
    let vm = vm();
    let fds = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (spec, _server) = shaped(Plain {
        config_size: 256,
        bar0_size: 0x1000,
        msix_vectors: 0,
        notify: Some(std::sync::Arc::clone(&fds)),
    });
    let d = vm.attach_device(DeviceSpec::Remote(spec), "identity").unwrap();
    // A new thread names itself once it runs: give it that moment.
    let t = std::time::Instant::now();
    while threads_named("vfu-notify") == 0 && t.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(threads_named("vfu-notify"), 1, "one watcher for its ERR and REQ");
    let mut given = std::mem::take(&mut *fds.lock().unwrap());
    assert_eq!(given.len(), 2, "an eventfd for ERR and one for REQ");
    given[0].write_all(&1u64.to_le_bytes()).unwrap(); // ERR
    given[1].write_all(&1u64.to_le_bytes()).unwrap(); // REQ
    given[1].write_all(&1u64.to_le_bytes()).unwrap(); // REQ again (may coalesce)
    let t = std::time::Instant::now();
    while d.function().notifications().0 < 1 || d.function().notifications().1 < 1 {
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", d.function().notifications());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!d.is_dead(), "an error report is not a death");
    vm.detach_device(d.name()).unwrap();
    assert_eq!(threads_named("vfu-notify"), 0, "the watcher stops with the device");
}

#[test]
fn the_non_coherent_count_follows_hot_plug_death_and_failed_attaches() {
    use vmm::device_manager::AttachOptions;
    let _s = serial();
    let vm = vm();
    let nc = || (vm.device_manager().noncoherent().count(), vm.device_manager().noncoherent().transitions());
    let declared = AttachOptions { coherent: false, ..AttachOptions::default() };
    // A failed attach of a declared device counts nothing.
    vm.device_manager().fail_attach_after(Some(AttachStep::Frontend));
    assert!(vm.attach_device_with(DeviceSpec::Remote(engine(64)), "identity", declared.clone()).is_err());
    vm.device_manager().fail_attach_after(None);
    assert_eq!(nc(), (0, 0));
    // Hot-plug of a declared device while another (coherent) runs: 0 -> 1.
    let _plain = vm.attach_device(DeviceSpec::Inline, "pvdma").unwrap();
    let d = vm.attach_device_with(DeviceSpec::Remote(engine(64)), "identity", declared).unwrap();
    assert_eq!(nc(), (1, 1));
    // Its death (its connection cut): 1 -> 0.
    d.function().died("the test killed it");
    let t = std::time::Instant::now();
    while nc().0 != 0 {
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(nc(), (0, 2));
    // A dead device cannot become non-coherent again.
    assert!(!d.function().mark_noncoherent());
    assert_eq!(nc(), (0, 2));
}

/// What a device leaves in the VMM: interrupt sources and routes, pins, devices,
/// eventfds, memory-map regions, and the threads devices run (connection readers and
/// writers, engine workers).
fn footprint(vm: &Vm) -> Footprint {
    let r = vmm::resources();
    let eventfds = r.split(' ').next().unwrap_or_default().to_string();
    let threads = [threads_named("vfu-client"), threads_named("vfu-writer"), threads_named("dma-engine")];
    (
        vm.irqs().counts(),
        vm.dma().account().pinned(),
        vm.devices().len(),
        eventfds,
        vm.memory_map().regions().len(),
        threads,
    )
}

type Footprint = (irq::IrqCounts, u64, usize, String, usize, [usize; 3]);

/// Waits (bounded) until the footprint is back to `before` (threads of a closed
/// connection end on their own), then asserts it.
fn settle(vm: &Vm, before: &Footprint, what: &str) {
    let t = std::time::Instant::now();
    while footprint(vm) != *before && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(footprint(vm), *before, "nothing of it is left: {what}");
}

fn wait_threads_gone(name: &str) {
    let t = std::time::Instant::now();
    while threads_named(name) > 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "{name} threads are still running");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_failed_attach_leaves_no_source_thread_or_reference_and_the_vmm_goes_on() {
    let _s = serial();
    let vm = vm();
    // A device attached and detached first: what the VM itself starts lazily runs now.
    let d = vm.attach_device(DeviceSpec::Remote(engine(64)), "identity").unwrap();
    vm.detach_device(d.name()).unwrap();
    wait_threads_gone("vfu-client");
    wait_threads_gone("dma-engine");
    // A device that stays attached and working through all the failures below.
    let keeper = vm.attach_device(DeviceSpec::Inline, "pvdma").unwrap();
    enable(&vm, &keeper);
    // A thread names itself once it runs: wait for the keeper's engine worker.
    let t = std::time::Instant::now();
    while threads_named("dma-engine") != 1 {
        assert!(t.elapsed() < Duration::from_secs(5), "the keeper's engine thread never ran");
        std::thread::sleep(Duration::from_millis(2));
    }
    let before = footprint(&vm);
    // Malformed devices: configuration space too small for a header, a BAR size that
    // is not a power of two, an absurd number of MSI-X vectors.
    for (dev, says) in [
        (Plain { config_size: 16, bar0_size: 0x1000, msix_vectors: 0, notify: None }, "configuration"),
        (Plain { config_size: 256, bar0_size: 0x3000, msix_vectors: 0, notify: None }, "power of two"),
        (
            Plain { config_size: 256, bar0_size: 0x1000, msix_vectors: 100_000, notify: None },
            "100000 vectors of IRQ index 2",
        ),
    ] {
        let (spec, server) = shaped(dev);
        let e = vm.attach_device(DeviceSpec::Remote(spec), "identity").unwrap_err().to_string();
        assert!(e.contains(says), "{e}");
        assert_eq!(e.lines().count(), 1, "one line: {e}");
        server.join().unwrap(); // the connection was closed
        settle(&vm, &before, says);
    }
    let mut id = [0u8; 4];
    assert!(vm.mmio_read(keeper.bar(abi::dma_engine::REGS_BAR).unwrap(), &mut id));
    assert_eq!(u32::from_le_bytes(id), abi::dma_engine::ID_VALUE, "the other device still works");
    // Each later step made to fail in turn, on a device that works.
    for step in [AttachStep::Function, AttachStep::Plug, AttachStep::Frontend] {
        for frontend in ["identity", "pvdma"] {
            vm.device_manager().fail_attach_after(Some(step));
            let e = vm.attach_device(DeviceSpec::Remote(engine(64)), frontend).unwrap_err().to_string();
            assert!(e.contains("injected failure"), "{e}");
            vm.device_manager().fail_attach_after(None);
            settle(&vm, &before, &format!("after a failure at {step:?} with {frontend}"));
            assert_eq!(vm.pci().list().len(), 2, "only the host bridge and the keeper are on the bus");
        }
    }
    // The VMM goes on: the next device attaches and works.
    let d = vm.attach_device(DeviceSpec::Remote(engine(64)), "identity").unwrap();
    enable(&vm, &d);
    let mut id = [0u8; 4];
    assert!(vm.mmio_read(d.bar(abi::dma_engine::REGS_BAR).unwrap(), &mut id));
    assert_eq!(u32::from_le_bytes(id), abi::dma_engine::ID_VALUE);
}

#[test]
fn every_descriptor_of_the_vmm_is_close_on_exec() {
    let _s = serial();
    let vm = vm();
    vm.attach_device(DeviceSpec::Remote(engine(64)), "pvdma").unwrap();
    vm.attach_device(DeviceSpec::Inline, "identity").unwrap();
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
