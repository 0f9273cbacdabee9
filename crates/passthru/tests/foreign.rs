//! passthru against a vfio-user implementation it did not write: the rust-vmm
//! `vfio_user` crate (crates.io).
//!
//! Its server backs the INTx test device (`abi::test_device`): registers in BAR 2,
//! INTx only, no MSI, a 256-byte BAR, PCIe function-level reset. A guest program and
//! a qtest script find it by vendor and device id, read and write its registers, take
//! its level-triggered interrupt (unmask eventfd protocol) and reset it.
//!
//! Its client drives passthru's own device server: version, device and region info,
//! configuration space, DMA_MAP of a memfd, a COPY through it, DMA_UNMAP.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
use common::*;

use abi::pci::{cap, command, reg};
use abi::test_device::{self as td, regs};
use rust_vfio_user::{IrqInfo, Server, ServerBackend, ServerRegion};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vfio_bindings::bindings::vfio::vfio_region_info;

const MEM: [&str; 4] = ["--memory", "64M", "--locked-memory", "64M"];
/// Offset of the test device's PCI Express capability.
const EXP_CAP: usize = 0x40;

#[derive(Default)]
struct State {
    scratch: u32,
    asserted: bool,
    /// vfio's INTx auto-masking: signalled and not unmasked since.
    masked: bool,
    assertions: u32,
    resets: u32,
    trigger: Option<File>,
    command: u16,
}

impl State {
    /// Signals the line unless it is masked (vfio's INTx protocol: the line is masked
    /// when signalled, and re-signalled at unmask while still asserted).
    fn raise(&mut self) {
        if self.masked {
            return;
        }
        if let Some(t) = &mut self.trigger {
            self.masked = true;
            let _ = t.write_all(&1u64.to_le_bytes());
        }
    }

    fn unmask(&mut self) {
        self.masked = false;
        if self.asserted {
            self.raise();
        }
    }
}

/// The INTx test device as a backend of the rust-vmm server.
struct IntxDevice(Arc<Mutex<State>>);

impl IntxDevice {
    fn config(&self) -> [u8; 256] {
        let st = self.0.lock().unwrap();
        let mut c = [0u8; 256];
        c[0..2].copy_from_slice(&td::VENDOR_ID.to_le_bytes());
        c[2..4].copy_from_slice(&td::DEVICE_ID.to_le_bytes());
        c[4..6].copy_from_slice(&st.command.to_le_bytes());
        c[6..8].copy_from_slice(&abi::pci::status::CAP_LIST.to_le_bytes());
        c[0x0a..0x0c].copy_from_slice(&td::CLASS.to_le_bytes());
        c[usize::from(reg::CAPABILITIES)] = EXP_CAP as u8;
        c[usize::from(reg::INTERRUPT_PIN)] = 1;
        // PCI Express capability, version 2, endpoint; function-level reset.
        c[EXP_CAP] = cap::EXP;
        c[EXP_CAP + 2] = 0x02;
        c[EXP_CAP + 4..EXP_CAP + 8].copy_from_slice(&cap::EXP_DEVCAP_FLR.to_le_bytes());
        c
    }
}

fn reg_value(st: &State, offset: u64) -> u32 {
    match offset {
        regs::ID => td::ID_VALUE,
        regs::SCRATCH => st.scratch,
        regs::IRQ_STATUS => u32::from(st.asserted),
        regs::RESETS => st.resets,
        regs::ASSERTIONS => st.assertions,
        _ => 0,
    }
}

impl ServerBackend for IntxDevice {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), std::io::Error> {
        match region {
            7 => {
                let c = self.config();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = c.get(offset as usize + i).copied().unwrap_or(0);
                }
            }
            2 => {
                let st = self.0.lock().unwrap();
                let v = reg_value(&st, offset & !3).to_le_bytes();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = v.get((offset & 3) as usize + i).copied().unwrap_or(0);
                }
            }
            _ => data.fill(0xff),
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        let mut st = self.0.lock().unwrap();
        match (region, offset) {
            (7, 4) => st.command = v as u16,
            (2, regs::SCRATCH) => st.scratch = v,
            (2, regs::DOORBELL) => {
                st.asserted = true;
                st.assertions += 1;
                st.raise();
            }
            (2, regs::IRQ_STATUS) if v == 0 => st.asserted = false,
            _ => {}
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        _flags: rust_vfio_user::DmaMapFlags,
        _offset: u64,
        _address: u64,
        _size: u64,
        _fd: Option<File>,
    ) -> Result<(), std::io::Error> {
        Ok(())
    }

    fn dma_unmap(
        &mut self,
        _flags: rust_vfio_user::DmaUnmapFlags,
        _address: u64,
        _size: u64,
    ) -> Result<(), std::io::Error> {
        Ok(())
    }

    fn reset(&mut self) -> Result<(), std::io::Error> {
        let mut st = self.0.lock().unwrap();
        st.scratch = 0;
        st.asserted = false;
        st.masked = false;
        st.assertions = 0;
        st.resets += 1;
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        _start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> Result<(), std::io::Error> {
        use vfio_user::proto::{IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK, IRQ_SET_DATA_EVENTFD};
        if index != vfio_user::proto::PCI_INTX {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut fds = fds.into_iter();
        if flags & IRQ_SET_ACTION_TRIGGER != 0 {
            self.0.lock().unwrap().trigger =
                if count > 0 && flags & IRQ_SET_DATA_EVENTFD != 0 { fds.next() } else { None };
        } else if flags & IRQ_SET_ACTION_UNMASK != 0 && flags & IRQ_SET_DATA_EVENTFD != 0 {
            // vfio's INTx protocol: each unmask (the guest's EOI) re-raises a line
            // that is still asserted.
            // The eventfd may be non-blocking: wait for it with poll(2). The thread
            // ends with the device (the test's last reference to its state).
            if let Some(mut unmask) = fds.next() {
                let st = Arc::clone(&self.0);
                std::thread::spawn(move || {
                    let mut b = [0u8; 8];
                    while Arc::strong_count(&st) > 1 {
                        let mut p = libc::pollfd { fd: unmask.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                        // SAFETY: poll(2) on one pollfd that lives across the call.
                        if unsafe { libc::poll(&mut p, 1, 100) } <= 0 || unmask.read_exact(&mut b).is_err() {
                            continue;
                        }
                        st.lock().unwrap().unmask();
                    }
                });
            }
        }
        Ok(())
    }
}

fn region(index: u32, size: u64) -> ServerRegion {
    let flags = if size > 0 { 3 } else { 0 };
    let info = vfio_region_info { argsz: 32, flags, index, cap_offset: 0, size, offset: 0 };
    ServerRegion { region_info: info, sparse_areas: Vec::new(), mmap_fd: None }
}

/// Starts the rust-vmm server of the INTx test device on a fresh socket.
fn start_test_device(tag: &str) -> (PathBuf, Arc<Mutex<State>>) {
    let path = std::env::temp_dir().join(format!("passthru-foreign-{tag}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let regions = (0..9).map(|i| region(i, [0, 0, td::REGS_SIZE, 0, 0, 0, 0, 256, 0][i as usize])).collect();
    let irqs = (0..5).map(|index| IrqInfo { index, flags: 1, count: u32::from(index == 0) }).collect();
    let server = Server::new(&path, true, irqs, regions).unwrap();
    let state = Arc::new(Mutex::new(State::default()));
    let mut dev = IntxDevice(Arc::clone(&state));
    std::thread::spawn(move || {
        let _ = server.run(&mut dev);
    });
    (path, state)
}

fn pci_guest(path: &Path, irq_mode: &str) {
    let dev = format!("vfio-user,socket={}", path.display());
    let out = bin()
        .args(["run", "--guest", "pci", "--guest-arg", "1", "--guest-arg", "100", "--irq-mode", irq_mode])
        .args(["--device", &dev])
        .args(MEM)
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("100 interrupts on line"), "{stdout}");
    assert!(stdout.contains("device counted 100, reset ok"), "{stdout}");
    assert!(stderr.contains(&format!("({:04x}:{:04x})", td::VENDOR_ID, td::DEVICE_ID)), "{stderr}");
}

#[test]
fn a_guest_drives_the_rust_vmm_test_device_forwarded() {
    vmm::require_kvm!();
    let (path, state) = start_test_device("guest");
    pci_guest(&path, "forwarded");
    assert_eq!(state.lock().unwrap().resets, 1, "one function-level reset reached the device");
}

#[test]
fn a_guest_drives_the_rust_vmm_test_device_through_the_vmm() {
    vmm::require_kvm!();
    let (path, _state) = start_test_device("guest-vmm");
    pci_guest(&path, "vmm");
}

#[test]
fn a_guest_lists_the_functions_it_finds() {
    vmm::require_kvm!();
    let (path, _state) = start_test_device("list");
    let dev = format!("vfio-user,socket={}", path.display());
    let out =
        bin().args(["run", "--guest", "pci", "--device", "dma-engine", "--device", &dev]).args(MEM).output().unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    let engine =
        format!("pci: 00:01.0 {:04x}:{:04x} class 0880", abi::dma_engine::VENDOR_ID, abi::dma_engine::DEVICE_ID);
    let test = format!("pci: 00:02.0 {:04x}:{:04x} class 0880", td::VENDOR_ID, td::DEVICE_ID);
    for needle in [
        "pci: 00:00.0 1b36:0008 class 0600",
        &engine,
        "BAR 0 memory at 0xc0000000 size 0x1000",
        "BAR 1 memory at 0xc0200000 size 0x200000",
        &test,
        "BAR 2 memory at 0xc0001000 size 0x100",
        "INTx pin 1 line",
        "pci: 3 functions",
    ] {
        assert!(stdout.contains(needle), "{needle}: {stdout}");
    }
}

/// A qtest session on a passthru with the test device.
struct Qtest {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    out: std::io::BufReader<std::process::ChildStdout>,
    irqs: Vec<String>,
}

impl Qtest {
    fn start(path: &Path) -> Qtest {
        let dev = format!("vfio-user,socket={}", path.display());
        let mut child = spawn_piped(&[&["run", "--accel", "qtest", "--device", &dev][..], &MEM].concat());
        let stdin = child.stdin.take().unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut err = child.stderr.take().unwrap();
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        Qtest { child, stdin, out, irqs: Vec::new() }
    }

    fn line(&mut self) -> String {
        use std::io::BufRead;
        let mut l = String::new();
        assert!(self.out.read_line(&mut l).unwrap() > 0, "the VMM closed its output");
        l.trim_end().to_string()
    }

    fn cmd(&mut self, c: &str) -> String {
        writeln!(self.stdin, "{c}").unwrap();
        loop {
            let l = self.line();
            if l.starts_with("IRQ ") {
                self.irqs.push(l);
            } else {
                return l;
            }
        }
    }

    /// The next IRQ line (waiting for it with a harmless command if none came yet).
    fn next_irq(&mut self) -> String {
        let t = Instant::now();
        while self.irqs.is_empty() {
            assert!(t.elapsed() < Duration::from_secs(10), "no interrupt");
            self.cmd("endianness");
            std::thread::sleep(Duration::from_millis(2));
        }
        self.irqs.remove(0)
    }
}

#[test]
fn a_qtest_script_drives_the_rust_vmm_test_device() {
    let (path, state) = start_test_device("qtest");
    let mut q = Qtest::start(&path);
    let id = qpci::value(&q.cmd(&format!("readl {:#x}", qpci::cfg(1, reg::VENDOR_ID))));
    assert_eq!(id, u64::from(td::VENDOR_ID) | u64::from(td::DEVICE_ID) << 16, "found by its ids in slot 1");
    let bar = qpci::bar(&mut |c| q.cmd(c), 1, td::REGS_BAR);
    assert_eq!(bar, abi::pci::MMIO32_BASE, "BAR 2 placed at the base of the 32-bit window");
    assert_eq!(q.cmd(&format!("readl {bar:#x}")), format!("OK 0x{:016x}", td::ID_VALUE), "decoding from plug");
    let list = q.cmd("pci_list");
    assert!(list.contains(&format!("00:01.0 {:04x}:{:04x} class=0880", td::VENDOR_ID, td::DEVICE_ID)), "{list}");
    assert!(list.contains(&format!("bars=2:{bar:#x}+0x100")), "{list}");
    assert!(q.cmd(&format!("writel {:#x} 0xabcd", bar + regs::SCRATCH)) == "OK");
    assert_eq!(qpci::value(&q.cmd(&format!("readl {:#x}", bar + regs::SCRATCH))), 0xabcd);
    // INTx: the line firmware wrote, enabled by the VMM since the pin is set.
    let line = qpci::value(&q.cmd(&format!("readb {:#x}", qpci::cfg(1, reg::INTERRUPT_LINE))));
    assert_eq!(line, u64::from(abi::pci::intx_gsi(1, 1)), "INTA of slot 1");
    assert!(q.cmd("dev_info vfu0").contains(&format!("irq=intx:{line}")));
    assert_eq!(q.cmd("irq_intercept_in ioapic"), "OK");
    for i in 0..5 {
        assert_eq!(q.cmd(&format!("writel {:#x} 1", bar + regs::DOORBELL)), "OK");
        assert_eq!(q.next_irq(), format!("IRQ raise {line}"), "assertion {i}");
        // The EOI while the line is still asserted: the device raises it again.
        assert_eq!(q.cmd(&format!("irq_eoi {line}")), "OK 1");
        assert_eq!(q.next_irq(), format!("IRQ raise {line}"), "re-raised at the EOI of assertion {i}");
        // Deassert at the device (read back: MMIO writes are posted, a read flushes
        // them, as a driver does before its EOI), then EOI: nothing more.
        assert_eq!(q.cmd(&format!("writel {:#x} 0", bar + regs::IRQ_STATUS)), "OK");
        assert_eq!(qpci::value(&q.cmd(&format!("readl {:#x}", bar + regs::IRQ_STATUS))), 0);
        assert_eq!(q.cmd(&format!("irq_eoi {line}")), "OK 1");
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(q.cmd("endianness"), "OK little");
    assert!(q.irqs.is_empty(), "no interrupt after the deasserted EOIs: {:?}", q.irqs);
    // INTx disable masks the line: an assertion is held, not delivered.
    let cmd_reg = qpci::cfg(1, reg::COMMAND);
    assert_eq!(q.cmd(&format!("writew {cmd_reg:#x} {:#x}", command::MEMORY | command::INTX_DISABLE)), "OK");
    assert_eq!(q.cmd(&format!("writel {:#x} 1", bar + regs::DOORBELL)), "OK");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(q.cmd("endianness"), "OK little");
    assert!(q.irqs.is_empty(), "masked: {:?}", q.irqs);
    assert_eq!(q.cmd(&format!("writew {cmd_reg:#x} {:#x}", command::MEMORY)), "OK");
    assert_eq!(q.next_irq(), format!("IRQ raise {line}"), "delivered at unmask");
    // Function-level reset through the PCIe capability.
    let exp = qpci::capability(&mut |c| q.cmd(c), 1, cap::EXP).unwrap();
    let devctl = qpci::cfg(1, exp + cap::EXP_DEVCTL);
    assert_eq!(q.cmd(&format!("writew {devctl:#x} {:#x}", cap::EXP_DEVCTL_FLR)), "OK");
    assert_eq!(state.lock().unwrap().resets, 1, "DEVICE_RESET reached the device");
    assert_eq!(qpci::value(&q.cmd(&format!("readw {cmd_reg:#x}"))) & u64::from(command::MEMORY), 0, "decoding off");
    qpci::enable(&mut |c| q.cmd(c), 1);
    assert_eq!(qpci::value(&q.cmd(&format!("readl {:#x}", bar + regs::SCRATCH))), 0, "reset cleared it");
    drop(q.stdin);
    assert_eq!(q.child.wait().unwrap().code(), Some(0));
}

/// Runs `f` on a thread and fails the test if it takes longer than `within` (the
/// third-party client has no timeouts of its own).
fn bounded<T: Send + 'static>(within: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(within).expect("the rust-vmm client got no answer in time")
}

#[test]
fn the_rust_vmm_client_drives_passthrus_device_server() {
    use abi::dma_engine::{self as de, Descriptor, op};
    let path = std::env::temp_dir().join(format!("passthru-served-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let mut server = bin()
        .args(["device", "dma-engine", "--socket", path.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !path.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "the server never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    let p = path.clone();
    let report = bounded(Duration::from_secs(30), move || {
        let mut c = rust_vfio_user::Client::new(&p).unwrap(); // VERSION, DEVICE_GET_INFO, regions
        let cfg = c.region(7).map(|r| r.size).unwrap();
        let bar0 = c.region(0).map(|r| r.size).unwrap();
        let mut id = [0u8; 4];
        c.region_read(7, 0, &mut id).unwrap();
        let msix = c.get_irq_info(vfio_user::proto::PCI_MSIX).unwrap();
        // 1 MiB of "guest memory" in a memfd, mapped at IOVA 1 MiB.
        // SAFETY: memfd_create with a NUL-terminated name; the descriptor is taken over.
        let fd = unsafe { libc::memfd_create(c"foreign".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor owned by nobody else.
        let mem = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        mem.set_len(1 << 20).unwrap();
        let iova = 1u64 << 20;
        let src = vec![0x5au8; 4096];
        std::os::unix::fs::FileExt::write_all_at(&mem, &src, 0x1000).unwrap();
        let d = Descriptor {
            op: op::COPY,
            src: iova + 0x1000,
            dst: iova + 0x2000,
            len: 4096,
            completion: iova + 0x3000,
            ..Default::default()
        };
        std::os::unix::fs::FileExt::write_all_at(&mem, &d.to_bytes(), 0).unwrap();
        c.dma_map(0, iova, 1 << 20, mem.as_raw_fd()).unwrap();
        let w32 = |c: &mut rust_vfio_user::Client, off: u64, v: u32| c.region_write(0, off, &v.to_le_bytes()).unwrap();
        w32(&mut c, de::regs::CONTROL, de::control::RESET);
        c.region_write(0, de::regs::RING_BASE, &iova.to_le_bytes()).unwrap();
        w32(&mut c, de::regs::RING_SIZE, 1);
        w32(&mut c, de::regs::CONTROL, de::control::ENABLE);
        w32(&mut c, de::regs::TAIL, 1);
        let t = Instant::now();
        let mut head = [0u8; 4];
        while u32::from_le_bytes(head) != 1 && t.elapsed() < Duration::from_secs(10) {
            c.region_read(0, de::regs::HEAD, &mut head).unwrap();
        }
        let mut status = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&mem, &mut status, 0x3000).unwrap();
        let mut copied = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&mem, &mut copied, 0x2000).unwrap();
        c.dma_unmap(iova, 1 << 20).unwrap();
        // After DMA_UNMAP the engine has no memory: the same descriptor faults.
        w32(&mut c, de::regs::TAIL, 2);
        let mut faults = [0u8; 4];
        let t = Instant::now();
        while u32::from_le_bytes(faults) == 0 && t.elapsed() < Duration::from_secs(10) {
            c.region_read(0, de::regs::FAULTS, &mut faults).unwrap();
        }
        c.shutdown().unwrap();
        (
            cfg,
            bar0,
            u32::from_le_bytes(id),
            msix.count,
            u32::from_le_bytes(status),
            copied == src,
            u32::from_le_bytes(faults),
        )
    });
    let (cfg, bar0, id, vectors, status, copied, faults) = report;
    assert_eq!(cfg, 256, "configuration region");
    assert_eq!(bar0, de::REGS_SIZE, "register BAR");
    assert_eq!(id, u32::from(de::VENDOR_ID) | u32::from(de::DEVICE_ID) << 16);
    assert_eq!(vectors, u32::from(de::MSIX_VECTORS));
    assert_eq!(status, de::completion::SUCCESS, "the COPY completed through the mapped memfd");
    assert!(copied, "the data arrived");
    assert!(faults >= 1, "after DMA_UNMAP the device reached nothing");
    let t = Instant::now();
    let code = loop {
        if let Some(s) = server.try_wait().unwrap() {
            break s.code();
        }
        assert!(t.elapsed() < Duration::from_secs(10), "the server did not exit after the client left");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(code, Some(0));
}

/// A device without vfio-user migration (the rust-vmm server knows no DEVICE_FEATURE)
/// makes a snapshot refuse with a clear error naming it, and nothing is written; the
/// device goes on working.
#[test]
fn a_snapshot_is_refused_for_a_device_without_migration() {
    let (path, _state) = start_test_device("nomig");
    let sock = std::env::temp_dir().join(format!("passthru-foreign-nomig-api-{}.sock", std::process::id()));
    let dir = std::env::temp_dir().join(format!("passthru-foreign-nomig-snap-{}", std::process::id()));
    let dev = format!("vfio-user,socket={}", path.display());
    let s = sock.to_str().unwrap();
    let mut child =
        spawn_piped(&[&["run", "--accel", "qtest", "--api-socket", s, "--device", &dev][..], &MEM].concat());
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "no API socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let body = format!(r#"{{"dir": "{}"}}"#, dir.display());
    let a = api::client::call(&sock, "PUT", "vm.snapshot", Some(&body), Duration::from_secs(30)).unwrap();
    assert_eq!(a.status, 409, "{}", a.message());
    assert!(a.message().contains("device vfu0 does not support migration"), "{}", a.message());
    assert!(a.message().contains("nothing was written"), "{}", a.message());
    assert!(!dir.exists());
    let info = api::client::call(&sock, "GET", "vm.info", None, Duration::from_secs(30)).unwrap();
    assert_eq!(info.body["devices"][0]["gone"], false, "the device is still there: {}", info.body);
    // A pause cannot quiesce it: it says so, and the device goes on.
    let p = api::client::call(&sock, "PUT", "vm.pause", None, Duration::from_secs(30)).unwrap();
    assert_eq!((p.status, p.body["unquiesced"].clone()), (200, serde_json::json!(["vfu0"])), "{}", p.body);
    let r = api::client::call(&sock, "PUT", "vm.resume", None, Duration::from_secs(30)).unwrap();
    assert_eq!(r.status, 200);
    // An external vfio-user device hot-plugged and unplugged through the API.
    let (path2, _state2) = start_test_device("nomig-hotplug");
    let body = format!(r#"{{"device": "vfio-user,socket={}"}}"#, path2.display());
    let a = api::client::call(&sock, "PUT", "vm.add-device", Some(&body), Duration::from_secs(30)).unwrap();
    assert_eq!((a.status, a.body["name"].as_str()), (200, Some("vfu1")), "{}", a.body);
    let info = api::client::call(&sock, "GET", "vm.info", None, Duration::from_secs(30)).unwrap();
    assert_eq!(info.body["devices"].as_array().unwrap().len(), 2);
    let r = api::client::call(&sock, "PUT", "vm.remove-device", Some(r#"{"name":"vfu1"}"#), Duration::from_secs(30))
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    drop(child.stdin.take());
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
