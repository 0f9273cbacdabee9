//! Hostile and broken device processes against a running passthru (qtest driver, so no
//! vCPU is needed): a server that stops reading, one that stops replying, one that
//! floods DMA requests without reading the replies, one that ignores DMA_UNMAP (it is
//! stopped), one whose sandbox kills it, one that cannot take an MSI. Each time the VM
//! goes on, the device is declared dead once within its deadline, later accesses are
//! immediate, and the VMM still ends cleanly when its input closes.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
use common::*;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vfio_user::endpoint::Endpoint;
use vfio_user::proto::{self, Command, DeviceInfo, DmaAccess, HEADER_SIZE, Header, IrqInfo, RegionInfo, SetIrqs};
use vfio_user::server::{Device, Server};

const MEM: [&str; 4] = ["--memory", "64M", "--locked-memory", "64M"];
/// Far beyond the 300 ms device deadline the tests set, for a loaded machine.
const SLACK: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Misbehaviour {
    /// Stops reading its socket at the first BAR write.
    StopReading,
    /// Never answers a BAR read.
    StopReplying,
    /// At the first BAR write, floods 1 MiB DMA_READs and reads nothing more.
    FloodDmaReads,
    /// Offers a million MSI-X vectors.
    AbsurdIrqs,
    /// Well-behaved, but writes a counter at IOVA 0x100000 every millisecond through
    /// whatever DMA windows it holds, for as long as the test runs.
    KeepsWriting,
    /// Offers migration, stops, and refuses to run again (STOP -> RUNNING).
    NoRestart,
    /// An MSI-X capability whose 2048-entry table (32 KiB) lies in its 4 KiB BAR 0.
    MsixTooBig,
    /// An MSI-X capability whose table lies in BAR 3, which it does not have.
    MsixNoBar,
}

/// A PCI device shaped like the DMA engine (BAR0, BAR1, configuration space, one MSI)
/// that misbehaves once attached.
struct Fake {
    how: Misbehaviour,
    ep: Arc<Endpoint>,
    hold: Receiver<()>,
}

impl Fake {
    fn stall(&self) {
        // Held until the test ends (bounded, so the thread never outlives it for long).
        let _ = self.hold.recv_timeout(Duration::from_secs(60));
    }
}

impl Device for Fake {
    fn info(&self) -> DeviceInfo {
        DeviceInfo { flags: proto::DEVICE_FLAGS_PCI | proto::DEVICE_FLAGS_RESET, num_regions: 9, num_irqs: 5 }
    }
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let size = match index {
            0 => 0x1000,
            1 => 0x1_0000,
            7 => 256,
            i if i < 9 => 0,
            _ => return None,
        };
        Some(RegionInfo { flags: 3, index, cap_offset: 0, size, offset: 0 })
    }
    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        let count = match (index, self.how) {
            (proto::PCI_MSIX, Misbehaviour::AbsurdIrqs) => 1_000_000,
            (proto::PCI_MSI, _) => 1,
            _ => 0,
        };
        (index < 5).then_some(IrqInfo { flags: proto::IRQ_INFO_EVENTFD, index, count })
    }
    fn region_read(&mut self, region: u32, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        if region == proto::PCI_CONFIG {
            // A plain header: ids, class, two 32-bit memory BARs, no capability (or the
            // impossible MSI-X one).
            let mut cfg = [0u8; 256];
            cfg[0..4].copy_from_slice(&0xfa4e_1234u32.to_le_bytes());
            cfg[0x0a..0x0c].copy_from_slice(&0x0880u16.to_le_bytes());
            let table_bir = match self.how {
                Misbehaviour::MsixTooBig => Some(0u32),
                Misbehaviour::MsixNoBar => Some(3),
                _ => None,
            };
            if let Some(bir) = table_bir {
                cfg[0x06] = 0x10; // status: capability list
                cfg[0x34] = 0x40;
                cfg[0x40] = abi::pci::cap::MSIX;
                cfg[0x42..0x44].copy_from_slice(&2047u16.to_le_bytes()); // 2048 vectors
                cfg[0x44..0x48].copy_from_slice(&bir.to_le_bytes()); // table at offset 0
                cfg[0x48..0x4c].copy_from_slice(&(1u32).to_le_bytes()); // PBA in BAR 1
            }
            for (i, b) in buf.iter_mut().enumerate() {
                *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
            }
            return Ok(());
        }
        if self.how == Misbehaviour::StopReplying {
            self.stall();
        }
        buf.fill(0x11);
        Ok(())
    }
    fn region_write(&mut self, region: u32, _offset: u64, _data: &[u8]) -> Result<(), i32> {
        if region == proto::PCI_CONFIG {
            return Ok(());
        }
        match self.how {
            Misbehaviour::StopReading => self.stall(),
            Misbehaviour::FloodDmaReads => {
                let ep = Arc::clone(&self.ep);
                std::thread::spawn(move || {
                    let req = DmaAccess { address: 0x10_0000, count: 1 << 20 }.encode(&[]);
                    for id in 0..10_000u16 {
                        let size = (HEADER_SIZE + req.len()) as u32;
                        let h = Header { id, command: Command::DmaRead as u16, size, flags: 0, error: 0 };
                        if ep.send(h, &req, &[]).is_err() {
                            break;
                        }
                    }
                });
                self.stall();
            }
            _ => {}
        }
        Ok(())
    }
    fn set_irqs(&mut self, irqs: &SetIrqs, _fds: Vec<File>) -> Result<(), i32> {
        let _ = irqs;
        Ok(())
    }
    fn reset(&mut self) -> Result<(), i32> {
        Ok(())
    }
    fn migration(&mut self) -> Option<&mut dyn vfio_user::migration::Migration> {
        (self.how == Misbehaviour::NoRestart).then_some(self as &mut dyn vfio_user::migration::Migration)
    }
}

impl vfio_user::migration::Migration for Fake {
    fn transition(&mut self, from: u32, to: u32) -> Result<(), i32> {
        if (from, to) == (proto::mig::STATE_STOP, proto::mig::STATE_RUNNING) { Err(libc::EIO) } else { Ok(()) }
    }
    fn read_data(&mut self, _max: usize) -> Result<Vec<u8>, i32> {
        Ok(Vec::new())
    }
    fn write_data(&mut self, _data: &[u8]) -> Result<(), i32> {
        Ok(())
    }
}

/// Serves one `Fake` on a fresh socket path; dropping the sender lets a stalled device go.
fn fake_server(how: Misbehaviour, tag: &str) -> (PathBuf, std::sync::mpsc::Sender<()>) {
    let path = std::env::temp_dir().join(format!("passthru-fake-{tag}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let (release, hold) = channel();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let server = Server::new(Endpoint::new(stream));
        if how == Misbehaviour::KeepsWriting {
            let dma = server.dma();
            std::thread::spawn(move || {
                for n in 1..60_000u64 {
                    let _ = dma.windows().write(0x10_0000, &n.to_le_bytes());
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
        }
        let mut dev = Fake { how, ep: Arc::clone(server.endpoint()), hold };
        // Handled on the reading thread: a stalled fake stops reading its socket.
        server.serve_sequential(&mut dev);
    });
    (path, release)
}

/// A passthru driven through qtest on its standard input, its stderr collected.
struct Vmm {
    child: Child,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
    err: Arc<Mutex<String>>,
}

impl Vmm {
    fn start(device: &str) -> Vmm {
        Vmm::start_with_env(device, &[])
    }

    fn start_with_env(device: &str, env: &[(&str, &str)]) -> Vmm {
        let mut c = bin();
        c.args(["run", "--accel", "qtest", "--device", device]).args(MEM);
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let err = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let e = Arc::clone(&err);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                e.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let stdin = child.stdin.take();
        let out = BufReader::new(child.stdout.take().unwrap());
        Vmm { child, stdin, out, err }
    }

    fn cmd(&mut self, c: &str) -> String {
        writeln!(self.stdin.as_mut().unwrap(), "{c}").unwrap();
        loop {
            let mut l = String::new();
            assert!(self.out.read_line(&mut l).unwrap() > 0, "the VMM closed its output; stderr: {}", self.stderr());
            if !l.starts_with("IRQ ") {
                return l.trim_end().to_string();
            }
        }
    }

    fn stderr(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    /// Waits until device `name` is gone and torn down (its death is reported first,
    /// then its teardown runs).
    fn wait_torn_down(&mut self, name: &str) {
        let t = Instant::now();
        while !self.cmd(&format!("dev_info {name}")).contains("dead=1") {
            assert!(t.elapsed() < SLACK, "{name} never torn down: {}", self.stderr());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Memory decoding and bus mastering on for the device in slot 1.
    fn enable(&mut self) {
        qpci::enable(&mut |c| self.cmd(c), 1);
    }

    /// Waits until stderr contains `what`.
    fn wait_stderr(&self, what: &str, within: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < within {
            if self.stderr().contains(what) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// The pid of the device process it spawned (from its stderr).
    fn device_pid(&self) -> i32 {
        assert!(self.wait_stderr(" over vfio-user", SLACK), "{}", self.stderr());
        let s = self.stderr();
        let rest = s.split("in process ").nth(1).unwrap();
        rest.split_whitespace().next().unwrap().parse().unwrap()
    }

    /// Closes its input; returns its exit code and how long it took to end.
    fn finish(mut self) -> (Option<i32>, Duration, String) {
        drop(self.stdin.take());
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(50)); // let the stderr reader catch up
                return (s.code(), t.elapsed(), self.stderr());
            }
            if t.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                panic!("the VMM did not end 30 s after its input closed; stderr: {}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn assert_gone_once(name: &str, stderr: &str) {
    assert_eq!(stderr.matches(&format!("device {name} is gone")).count(), 1, "{stderr}");
}

#[test]
fn a_device_that_stops_reading_is_declared_dead_and_the_vmm_still_ends_on_eof() {
    let (path, _release) = fake_server(Misbehaviour::StopReading, "noread");
    let mut vmm = Vmm::start(&format!("vfio-user,socket={},timeout=300ms", path.display()));
    assert_eq!(vmm.cmd("readl 0xc0000000"), "OK 0x0000000011111111", "alive at first");
    // 64 KiB posted writes to the scratch BAR until the device is judged: the socket
    // and the 4 MiB backlog fill, the next write waits at most the deadline.
    let block = format!("0x{}", "ab".repeat(0x1_0000));
    let t = Instant::now();
    let mut writes = 0;
    while !vmm.stderr().contains("is gone") {
        assert_eq!(vmm.cmd(&format!("write 0xc0010000 0x10000 {block}")), "OK");
        writes += 1;
        assert!(t.elapsed() < SLACK, "still not judged after {writes} writes: {}", vmm.stderr());
    }
    assert!(writes >= 2, "the socket and the backlog took {writes} writes before the deadline passed");
    // Every later access is immediate and all-ones.
    let t = Instant::now();
    assert_eq!(vmm.cmd("readl 0xc0000000"), "OK 0x00000000ffffffff");
    assert!(t.elapsed() < Duration::from_millis(200));
    vmm.wait_torn_down("vfu0");
    let (code, took, stderr) = vmm.finish();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    assert!(stderr.contains("stopped responding") && stderr.contains("took no bytes"), "{stderr}");
    assert_gone_once("vfu0", &stderr);
}

#[test]
fn a_device_that_stops_replying_is_declared_dead_at_its_deadline() {
    let (path, _release) = fake_server(Misbehaviour::StopReplying, "noreply");
    let mut vmm = Vmm::start(&format!("vfio-user,socket={},timeout=300ms", path.display()));
    let t = Instant::now();
    assert_eq!(vmm.cmd("readl 0xc0000000"), "OK 0x00000000ffffffff", "the read gives up at the deadline");
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(300) && waited < SLACK, "{waited:?}");
    assert!(vmm.wait_stderr("device vfu0 is gone", SLACK), "{}", vmm.stderr());
    let t = Instant::now();
    assert_eq!(vmm.cmd("readl 0xc0000000"), "OK 0x00000000ffffffff");
    assert!(t.elapsed() < Duration::from_millis(200), "a dead device answers at once");
    let (code, took, stderr) = vmm.finish();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    assert!(stderr.contains("no reply to RegionRead within 300ms"), "{stderr}");
    assert_gone_once("vfu0", &stderr);
}

#[test]
fn a_device_flooding_dma_reads_is_cut_off_and_the_vmm_exits_cleanly() {
    let (path, _release) = fake_server(Misbehaviour::FloodDmaReads, "flood");
    let mut vmm = Vmm::start(&format!("vfio-user,socket={},timeout=300ms", path.display()));
    assert_eq!(vmm.cmd("writel 0xc0000018 1"), "OK"); // starts the flood
    assert!(vmm.wait_stderr("device vfu0 is gone", SLACK), "{}", vmm.stderr());
    assert_eq!(vmm.cmd("readl 0xc0000000"), "OK 0x00000000ffffffff");
    let (code, took, stderr) = vmm.finish();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    assert_gone_once("vfu0", &stderr);
}

#[test]
fn a_device_offering_absurd_interrupt_counts_is_refused_at_attach_with_one_clear_line() {
    let (path, _release) = fake_server(Misbehaviour::AbsurdIrqs, "absurd");
    let out = bin()
        .args(["run", "--accel", "qtest", "--device"])
        .arg(format!("vfio-user,socket={}", path.display()))
        .args(MEM)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("passthru: error: device vfu0: it offers 1000000 vectors of IRQ index 2 (at most 2048)"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().filter(|l| l.contains("error")).count(), 1, "{stderr}");
    assert!(!stderr.contains("is gone"), "a device that never came up is not 'gone': {stderr}");
}

/// A process a test may stop (SIGSTOP): resumed and killed when the test ends, even
/// by a failed assertion, so no stopped process outlives it.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            // SAFETY: kill(2) to the child this guard owns.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGCONT) };
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Stops (SIGSTOP) or resumes a process.
fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) to a process this test started (directly or through the VMM).
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

#[test]
fn a_spawned_device_that_does_not_acknowledge_dma_unmap_is_killed_and_reaped_before_unmap_returns() {
    let mut vmm = Vmm::start("dma-engine,dma=pvdma,timeout=300ms");
    let pid = vmm.device_pid();
    vmm.enable(); // bus mastering: the device is given what the guest maps
    let map = vmm.cmd("hcall 0x101 8 0x100000 4096 3");
    assert!(map.starts_with("OK 0x0 "), "{map}");
    let iova = map.split_whitespace().nth(2).unwrap().to_string();
    signal(pid, libc::SIGSTOP); // the device can no longer answer anything
    let t = Instant::now();
    assert_eq!(vmm.cmd(&format!("hcall 0x103 8 {iova} 4096")), "OK 0x0 0x0 0x0 0x0", "the unmap completes");
    assert!(t.elapsed() < SLACK);
    // By the time UNMAP returned, the process is gone: killed and reaped.
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "device process {pid} still exists");
    assert!(vmm.wait_stderr("device dma0 is gone", SLACK), "{}", vmm.stderr());
    vmm.wait_torn_down("dma0");
    assert_eq!(vmm.cmd("hcall 0x101 8 0x100000 4096 3"), "OK 0x3 0x0 0x0 0x0", "not assigned any more");
    let (code, _, stderr) = vmm.finish();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("did not acknowledge DMA_UNMAP"), "{stderr}");
    assert_gone_once("dma0", &stderr);
}

/// An external device declared gone (here: a RAM hot-add its identity domain cannot
/// map, over the locked-memory limit) loses its connection before the death returns,
/// and with it its DMA windows: its writes into guest memory stop.
#[test]
fn an_external_device_declared_gone_is_cut_off_and_its_writes_stop() {
    let (path, _release) = fake_server(Misbehaviour::KeepsWriting, "writes");
    let mut vmm = Vmm::start(&format!("vfio-user,socket={},dma=identity", path.display()));
    vmm.enable();
    let counter = |vmm: &mut Vmm| vmm.cmd("readq 0x100000");
    let t = Instant::now();
    let first = counter(&mut vmm);
    while counter(&mut vmm) == first {
        assert!(t.elapsed() < SLACK, "the device never wrote guest memory");
        std::thread::sleep(Duration::from_millis(5));
    }
    // 64 MiB of RAM pinned already, at the 64 MiB limit: the next 64 MiB cannot be.
    let r = vmm.cmd("ram_add 0x100000000 0x4000000");
    assert!(r.starts_with("OK"), "{r}");
    assert!(vmm.wait_stderr("device vfu0 is gone", SLACK), "{}", vmm.stderr());
    vmm.wait_torn_down("vfu0");
    // The server has seen its connection close and dropped its windows: nothing moves.
    std::thread::sleep(Duration::from_millis(100));
    let a = counter(&mut vmm);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(counter(&mut vmm), a, "a device declared gone still writes guest memory");
    let (code, _, stderr) = vmm.finish();
    assert_eq!(code, Some(0), "{stderr}");
    assert_gone_once("vfu0", &stderr);
}

/// A device that stops for a pause and then refuses to run again is not left stopped
/// under a running guest: the resume says so, and the device is gone (counted).
#[test]
fn a_device_that_does_not_run_again_after_a_pause_is_declared_gone() {
    let (path, _release) = fake_server(Misbehaviour::NoRestart, "norestart");
    let mut vmm = Vmm::start(&format!("vfio-user,socket={}", path.display()));
    assert_eq!(vmm.cmd("pause"), "OK", "the device stopped");
    assert_eq!(vmm.cmd("resume"), "OK failed=vfu0");
    assert!(vmm.cmd("dev_info vfu0").contains("dead=1"));
    assert_eq!(vmm.cmd("run_state").split_whitespace().nth(1), Some("running"));
    let (code, _, stderr) = vmm.finish();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("device vfu0 is gone (it did not run again after a pause"), "{stderr}");
}

/// Impossible MSI-X capabilities are refused at attach with one line naming the
/// problem, as the other malformations are.
#[test]
fn a_device_with_an_impossible_msix_capability_is_refused_with_one_clear_line() {
    for (how, tag, want) in [
        (
            Misbehaviour::MsixTooBig,
            "msixbig",
            "its table (2048 vectors, 32768 bytes at offset 0x0) does not fit in BAR 0",
        ),
        (Misbehaviour::MsixNoBar, "msixnobar", "its table (2048 vectors) lies in BAR 3, which is not a memory BAR"),
    ] {
        let (path, _release) = fake_server(how, tag);
        let out = bin()
            .args(["run", "--accel", "qtest", "--device", &format!("vfio-user,socket={}", path.display())])
            .args(MEM)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("its MSI-X capability is impossible") && err.contains(want), "{err}");
        assert_eq!(err.lines().filter(|l| l.contains("error")).count(), 1, "one line: {err}");
    }
}

/// Relays a vfio-user connection, cutting one byte off every REGION_READ reply of a
/// BAR: the server behind it is fine, the device the VMM sees breaks the protocol.
fn shortening_proxy(upstream: PathBuf, tag: &str) -> PathBuf {
    use vfio_user::proto::{FLAG_REPLY, FLAG_TYPE_MASK};
    let path = std::env::temp_dir().join(format!("passthru-proxy-{tag}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let (vmm, _) = listener.accept().unwrap();
        let dev = std::os::unix::net::UnixStream::connect(&upstream).unwrap();
        let (mut vmm_r, mut dev_w) = (vmm.try_clone().unwrap(), dev.try_clone().unwrap());
        std::thread::spawn(move || std::io::copy(&mut vmm_r, &mut dev_w));
        let (mut dev_r, mut vmm_w) = (dev, vmm);
        loop {
            let mut h = [0u8; HEADER_SIZE];
            if dev_r.read_exact(&mut h).is_err() {
                return;
            }
            let mut hd = Header::from_bytes(&h).unwrap();
            let mut body = vec![0u8; hd.size as usize - HEADER_SIZE];
            if dev_r.read_exact(&mut body).is_err() {
                return;
            }
            let reply = hd.flags & FLAG_TYPE_MASK == FLAG_REPLY;
            let region = body.get(8..12).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
            if reply && hd.command == Command::RegionRead as u16 && body.len() > 16 && region != Some(proto::PCI_CONFIG)
            {
                body.pop();
                hd.size -= 1;
            }
            if vmm_w.write_all(&hd.to_bytes()).is_err() || vmm_w.write_all(&body).is_err() {
                return;
            }
        }
    });
    path
}

/// A device that answers BAR reads with the wrong length reads all-ones, and past a
/// bound of such replies it is declared gone rather than kept forever.
#[test]
fn a_device_answering_reads_with_the_wrong_length_is_declared_gone_past_a_bound() {
    let (upstream, _release) = fake_server(Misbehaviour::KeepsWriting, "shortreads");
    let path = shortening_proxy(upstream, "shortreads");
    let mut vmm = Vmm::start(&format!("vfio-user,socket={},iommu-mode=messages", path.display()));
    vmm.enable();
    let bar0 = qpci::bar(&mut |c| vmm.cmd(c), 1, 0);
    for _ in 0..devices::vfio_pci::MAX_VIOLATIONS {
        assert_eq!(vmm.cmd(&format!("readl {bar0:#x}")), "OK 0x00000000ffffffff");
    }
    assert!(
        vmm.wait_stderr("device vfu0 is gone (it broke the vfio-user protocol 16 times", SLACK),
        "{}",
        vmm.stderr()
    );
    vmm.wait_torn_down("vfu0");
    let (code, _, stderr) = vmm.finish();
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn an_external_device_that_does_not_acknowledge_dma_unmap_is_disconnected_and_declared_dead() {
    let path = std::env::temp_dir().join(format!("passthru-stopped-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let mut server = Stopped(
        bin()
            .args(["device", "dma-engine", "--socket", path.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let server = &mut server.0;
    let t = Instant::now();
    while !path.exists() {
        assert!(t.elapsed() < SLACK);
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut vmm = Vmm::start(&format!("vfio-user,socket={},dma=pvdma,timeout=300ms", path.display()));
    vmm.enable();
    let map = vmm.cmd("hcall 0x101 8 0x100000 4096 3");
    let iova = map.split_whitespace().nth(2).unwrap().to_string();
    signal(server.id() as i32, libc::SIGSTOP);
    assert_eq!(vmm.cmd(&format!("hcall 0x103 8 {iova} 4096")), "OK 0x0 0x0 0x0 0x0");
    assert!(vmm.wait_stderr("device vfu0 is gone", SLACK), "{}", vmm.stderr());
    vmm.wait_torn_down("vfu0");
    // Not ours to kill: it was disconnected. Resumed, it sees the connection closed.
    signal(server.id() as i32, libc::SIGCONT);
    let t = Instant::now();
    let status = loop {
        if let Some(s) = server.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < SLACK, "the external server did not notice its disconnection");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0));
    let (code, _, stderr) = vmm.finish();
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn a_spawned_device_holds_exactly_its_socket_scratch_memory_and_msix_eventfds() {
    let mut vmm = Vmm::start("dma-engine");
    let pid = vmm.device_pid();
    assert_eq!(vmm.cmd("readl 0xc0000000"), "OK 0x0000000045414d44", "attached and serving");
    vmm.enable();
    qpci::msix_vector(&mut |c| vmm.cmd(c), 1, 0, abi::layout::msi_address(0), 0x61);
    let mut fds: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| {
            let n = e.file_name().to_string_lossy().parse().unwrap();
            (n, std::fs::read_link(e.path()).map(|l| l.to_string_lossy().into_owned()).unwrap_or_default())
        })
        .collect();
    fds.sort();
    let listing = format!("{fds:?}");
    let numbers: Vec<i32> = fds.iter().map(|(n, _)| *n).collect();
    let eventfds = fds.iter().filter(|(_, l)| l.contains("eventfd")).count();
    let vectors = usize::from(abi::dma_engine::MSIX_VECTORS);
    assert_eq!(eventfds, vectors, "only the MSI-X eventfds it was given: {listing}");
    assert_eq!(fds.iter().filter(|(_, l)| l.starts_with("/memfd:")).count(), 1, "its scratch BAR: {listing}");
    assert_eq!(&numbers[..4], &[0, 1, 2, 3], "{listing}");
    assert_eq!(fds.len(), 5 + vectors, "stdin, stdout, stderr, socket, scratch, MSI-X eventfds: {listing}");
    assert!(fds[3].1.starts_with("socket:"), "{listing}");
    assert!(fds[0].1 == "/dev/null" && fds[1].1 == "/dev/null", "{listing}");
    let (code, _, _) = vmm.finish();
    assert_eq!(code, Some(0));
}

#[test]
fn a_forbidden_system_call_kills_the_sandboxed_device_and_the_vm_carries_on() {
    let mut vmm = Vmm::start_with_env("dma-engine", &[("PASSTHRU_DEVICE_SELFTEST", "forbidden-syscall")]);
    let pid = vmm.device_pid();
    assert_eq!(vmm.cmd("readl 0xc0000000"), "OK 0x0000000045414d44");
    assert_eq!(vmm.cmd("writel 0xc0000024 2"), "OK"); // reset: the self-test opens a socket
    assert!(vmm.wait_stderr("device dma0 is gone", SLACK), "{}", vmm.stderr());
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "reaped");
    assert_eq!(vmm.cmd("readl 0xc0000000"), "OK 0x00000000ffffffff", "surprise removal");
    let (code, _, stderr) = vmm.finish();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("killed by signal 31 (SIGSYS"), "{stderr}");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A COPY descriptor (abi::dma_engine layout) as bytes.
fn copy_desc(src: u64, dst: u64, len: u64, completion: u64) -> Vec<u8> {
    let d =
        abi::dma_engine::Descriptor { op: abi::dma_engine::op::COPY, src, dst, len, completion, ..Default::default() };
    d.to_bytes().to_vec()
}

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

fn maps(pid: i32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).map(|m| m.lines().count()).unwrap_or(0)
}

#[test]
fn a_guest_mapping_one_page_twenty_thousand_times_costs_the_device_no_descriptor_and_no_mapping() {
    let mut vmm = Vmm::start("dma-engine,dma=pvdma");
    let pid = vmm.device_pid();
    vmm.enable();
    // 512 entries naming the same page.
    let list: Vec<u8> = (0..512).flat_map(|_| [0x10_0000u64.to_le_bytes(), 4096u64.to_le_bytes()].concat()).collect();
    let first = vmm.cmd("hcall 0x100 8");
    assert!(first.starts_with("OK 0x0 0x1"), "{first}");
    let (fds0, maps0) = (count(&format!("/proc/{pid}/fd")), maps(pid));
    for round in 0..40 {
        assert_eq!(vmm.cmd(&format!("write 0x800000 8192 0x{}", hex(&list))), "OK");
        assert_eq!(vmm.cmd("hcall 0x102 8 0x800000 512 1"), "OK 0x0 0x200 0x0 0x0", "round {round}");
    }
    assert_eq!(vmm.cmd("readl 0xc0000000"), "OK 0x0000000045414d44", "the device is alive and caught up");
    let (fds1, maps1) = (count(&format!("/proc/{pid}/fd")), maps(pid));
    assert_eq!(fds1, fds0, "20,480 windows, no new descriptor");
    assert!(maps1 <= maps0 + 2, "20,480 windows cost {} mappings", maps1 - maps0);
    assert!(vmm.cmd("frontend_stats pvdma dma0").contains("live_mappings=20480"));
    let (code, _, stderr) = vmm.finish();
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn in_shared_fd_mode_a_device_cannot_read_a_write_only_mapping() {
    let mut vmm = Vmm::start("dma-engine,dma=pvdma");
    vmm.enable();
    let iova = |answer: String| -> u64 {
        assert!(answer.starts_with("OK 0x0 "), "{answer}");
        u64::from_str_radix(answer.split_whitespace().nth(2).unwrap().trim_start_matches("0x"), 16).unwrap()
    };
    let ring = iova(vmm.cmd("hcall 0x101 8 0x200000 4096 1")); // the device reads its ring
    let done = iova(vmm.cmd("hcall 0x101 8 0x210000 4096 2")); // and writes completions
    let src = iova(vmm.cmd("hcall 0x101 8 0x300000 4096 2")); // FROM_DEVICE: write-only for it
    let dst = iova(vmm.cmd("hcall 0x101 8 0x400000 4096 2"));
    assert_eq!(vmm.cmd("memset 0x300000 4096 0x5a"), "OK");
    assert_eq!(vmm.cmd("memset 0x400000 4096 0x33"), "OK");
    let mut ring_bytes = copy_desc(src, dst, 4096, done);
    // A second descriptor: the same copy once the source is readable (the control).
    let src_rw = iova(vmm.cmd("hcall 0x101 8 0x300000 4096 3"));
    ring_bytes.extend(copy_desc(src_rw, dst, 4096, done + 32));
    assert_eq!(vmm.cmd(&format!("write 0x200000 128 0x{}", hex(&ring_bytes))), "OK");
    for c in [format!("writeq 0xc0000008 {ring:#x}"), "writel 0xc0000010 16".into(), "writel 0xc0000024 1".into()] {
        assert_eq!(vmm.cmd(&c), "OK");
    }
    assert_eq!(vmm.cmd("writel 0xc0000018 1"), "OK");
    let t = Instant::now();
    while vmm.cmd("readl 0xc0000014") != "OK 0x0000000000000001" {
        assert!(t.elapsed() < SLACK, "the descriptor never completed");
    }
    assert_eq!(vmm.cmd("readl 0x210000"), "OK 0x0000000000000002", "DMA_FAULT");
    assert_eq!(vmm.cmd("read 0x400000 8"), "OK 0x3333333333333333", "nothing copied");
    let info = vmm.cmd("dev_info dma0");
    assert!(info.contains(&format!("last_fault={src:#x}")), "the VMM saw and logged the refused read: {info}");
    assert_eq!(vmm.cmd("writel 0xc0000018 2"), "OK");
    let t = Instant::now();
    while vmm.cmd("readl 0xc0000014") != "OK 0x0000000000000002" {
        assert!(t.elapsed() < SLACK, "the control descriptor never completed");
    }
    assert_eq!(vmm.cmd("readl 0x210020"), "OK 0x0000000000000001", "the readable mapping copies");
    assert_eq!(vmm.cmd("read 0x400000 8"), "OK 0x5a5a5a5a5a5a5a5a");
    let (code, _, stderr) = vmm.finish();
    assert_eq!(code, Some(0), "{stderr}");
}

fn memfd(size: u64, sealed: bool) -> File {
    use std::os::fd::FromRawFd;
    let flags = libc::MFD_CLOEXEC | if sealed { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: memfd_create with a NUL-terminated name; the descriptor is taken over.
    let fd = unsafe { libc::memfd_create(c"hostile".as_ptr(), flags) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    if sealed {
        use std::os::fd::AsRawFd;
        // SAFETY: F_ADD_SEALS on our memfd.
        assert_eq!(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) }, 0);
    }
    f
}

#[test]
fn the_device_process_refuses_a_file_too_small_and_survives_one_shrunk_under_it() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    use vfio_user::proto::{DMA_READ_FLAG, DMA_WRITE_FLAG, DmaMap};
    let path = std::env::temp_dir().join(format!("passthru-shrink-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let mut server = bin()
        .args(["device", "dma-engine", "--socket", path.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The socket file appears at bind(), a moment before listen(): connect until it
    // is accepted.
    let t = Instant::now();
    let stream = loop {
        match std::os::unix::net::UnixStream::connect(&path) {
            Ok(s) => break s,
            Err(e) => assert!(t.elapsed() < SLACK, "the device never listened: {e}"),
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    struct NoDma;
    impl vfio_user::client::DmaHandler for NoDma {
        fn dma_read(&self, _a: u64, _b: &mut [u8]) -> Result<(), i32> {
            Err(libc::EFAULT)
        }
        fn dma_write(&self, _a: u64, _d: &[u8]) -> Result<(), i32> {
            Err(libc::EFAULT)
        }
    }
    // This test plays a careless (or hostile) VMM.
    let client = vfio_user::client::Client::connect(stream, Arc::new(NoDma), Box::new(|_| {})).unwrap();
    let rw = DMA_READ_FLAG | DMA_WRITE_FLAG;
    let small = memfd(0x1000, true);
    let map = |m: DmaMap, f: &File| client.endpoint().request(Command::DmaMap, &m.encode(), &[f.as_raw_fd()]);
    let r = map(DmaMap { flags: rw, offset: 0, address: 0x10_0000, size: 0x10_0000 }, &small);
    assert!(matches!(r, Err(vfio_user::Error::Remote { errno: libc::EINVAL, .. })), "{r:?}");
    // Ring and completions in a sealed file; the copy source in an unsealed one.
    let ring = memfd(0x1_0000, true);
    let source = memfd(0x1_0000, false);
    map(DmaMap { flags: rw, offset: 0, address: 0, size: 0x1_0000 }, &ring).unwrap();
    map(DmaMap { flags: rw, offset: 0, address: 0x10_0000, size: 0x1_0000 }, &source).unwrap();
    ring.write_all_at(&copy_desc(0x10_0000, 0x8000, 0x1000, 0x4000), 0).unwrap();
    source.set_len(0).unwrap(); // shrunk under the device's window
    let reg = |off: u64, v: u64, n: usize| client.region_write(0, off, &v.to_le_bytes()[..n]).unwrap();
    reg(abi::dma_engine::regs::RING_BASE, 0, 8);
    reg(abi::dma_engine::regs::RING_SIZE, 4, 4);
    reg(abi::dma_engine::regs::CONTROL, 1, 4);
    reg(abi::dma_engine::regs::TAIL, 1, 4);
    let mut head = [0u8; 4];
    let t = Instant::now();
    loop {
        client.region_read(0, abi::dma_engine::regs::HEAD, &mut head).unwrap();
        if head == [1, 0, 0, 0] {
            break;
        }
        assert!(t.elapsed() < SLACK, "the copy never completed");
    }
    let mut status = [0u8; 4];
    ring.read_exact_at(&mut status, 0x4000).unwrap();
    assert_eq!(u32::from_le_bytes(status), abi::dma_engine::completion::DMA_FAULT, "the lost pages fault");
    let mut id = [0u8; 4];
    client.region_read(0, abi::dma_engine::regs::ID, &mut id).unwrap();
    assert_eq!(u32::from_le_bytes(id), abi::dma_engine::ID_VALUE, "the device is alive");
    assert!(server.try_wait().unwrap().is_none(), "no SIGBUS killed it");
    drop(client);
    let t = Instant::now();
    while server.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < SLACK);
        std::thread::sleep(Duration::from_millis(10));
    }
}
