//! Assigned devices end to end: the `dma` guest against the DMA engine in the VMM, in a
//! child process with shared fds, and in message mode; a separately started vfio-user
//! server; isolation; device and VMM deaths; what is left after a device dies.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
use common::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const MEM: [&str; 4] = ["--memory", "64M", "--locked-memory", "64M"];

/// Runs the dma guest and checks every reported CRC against one computed here.
fn dma_guest(device: &str) {
    dma_guest_irq(device, "forwarded");
}

/// The same with the engine's MSI-X vectors delivered `irq_mode` (forwarded or vmm).
fn dma_guest_irq(device: &str, irq_mode: &str) {
    let out =
        bin().args(["run", "--guest", "dma", "--irq-mode", irq_mode, "--device", device]).args(MEM).output().unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{device}: {stdout}{stderr}");
    let mut checked = 0;
    for line in stdout.lines().filter(|l| l.starts_with("dma: size ")) {
        // "dma: size S pattern 0xP crc32c 0xC ok"
        let w: Vec<&str> = line.split_whitespace().collect();
        let size: usize = w[2].parse().unwrap();
        let pattern = u64::from_str_radix(w[4].trim_start_matches("0x"), 16).unwrap();
        let crc = u32::from_str_radix(w[6].trim_start_matches("0x"), 16).unwrap();
        let data: Vec<u8> = pattern.to_le_bytes().iter().copied().cycle().take(size).collect();
        assert_eq!(crc, crc32c::crc32c(&data), "{device}: {line}");
        checked += 1;
    }
    assert_eq!(checked, 3, "{stdout}");
    assert!(stdout.contains("3 MSIs, fault check ok"), "{stdout}");
    assert!(stderr.contains("at 00:01.0 (1b36:11e8)"), "the engine is a PCI function: {stderr}");
    assert!(stderr.contains("passthru: guest DMA throughput: 4472832 bytes in"), "{stderr}");
}

#[test]
fn dma_guest_against_the_engine_in_the_vmm() {
    vmm::require_kvm!();
    dma_guest("dma-engine,process=inline");
}

#[test]
fn dma_guest_against_a_device_process_with_shared_memory() {
    vmm::require_kvm!();
    dma_guest("dma-engine");
}

#[test]
fn dma_guest_against_a_device_process_in_message_mode() {
    vmm::require_kvm!();
    dma_guest("dma-engine,iommu-mode=messages");
}

#[test]
fn dma_guest_with_msix_delivered_by_the_vmm_in_process_and_out() {
    vmm::require_kvm!();
    dma_guest_irq("dma-engine,process=inline", "vmm");
    dma_guest_irq("dma-engine", "vmm");
}

fn start_server(path: &std::path::Path) -> Child {
    let _ = std::fs::remove_file(path);
    let server = bin()
        .args(["device", "dma-engine", "--socket", path.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !path.exists() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    server
}

fn wait_exit(c: &mut Child, within: Duration) -> Option<i32> {
    let t = Instant::now();
    while t.elapsed() < within {
        if let Some(s) = c.try_wait().unwrap() {
            return s.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    None
}

#[test]
fn a_separately_started_server_serves_the_guest_and_exits_when_the_vmm_ends() {
    vmm::require_kvm!();
    let path = std::env::temp_dir().join(format!("passthru-dmae-{}.sock", std::process::id()));
    let mut server = start_server(&path);
    let dev = format!("vfio-user,socket={}", path.display());
    let out = bin().args(["run", "--guest", "dma", "--device", &dev]).args(MEM).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(wait_exit(&mut server, Duration::from_secs(10)), Some(0), "the server exits cleanly after its VMM");
}

#[test]
fn a_server_whose_vmm_is_killed_exits_cleanly() {
    let path = std::env::temp_dir().join(format!("passthru-orphan-{}.sock", std::process::id()));
    let mut server = start_server(&path);
    let dev = format!("vfio-user,socket={}", path.display());
    let mut vmm = bin()
        .args(["run", "--accel", "qtest", "--device", &dev])
        .args(MEM)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = vmm.stdin.take().unwrap();
    let mut out = BufReader::new(vmm.stdout.take().unwrap());
    writeln!(stdin, "readl 0xc0000000").unwrap();
    let mut l = String::new();
    out.read_line(&mut l).unwrap();
    assert_eq!(l.trim(), "OK 0x0000000045414d44", "the device answers through the VMM");
    vmm.kill().unwrap(); // SIGKILL
    let _ = vmm.wait();
    assert_eq!(wait_exit(&mut server, Duration::from_secs(10)), Some(0));
}

/// Reads stderr lines until the device's pid shows up.
fn device_pid(stderr: &mut impl BufRead) -> i32 {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "no device line on stderr");
        if let Some(rest) = line.split("in process ").nth(1) {
            return rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    }
}

#[test]
fn kill_9_of_the_device_while_descriptors_are_in_flight_leaves_the_guest_running() {
    vmm::require_kvm!();
    let mut vmm = bin()
        .args(["run", "--guest", "dma", "--guest-arg", "1000000", "--device", "dma-engine"])
        .args(MEM)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(vmm.stderr.take().unwrap());
    let pid = device_pid(&mut stderr);
    let mut stdout = BufReader::new(vmm.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap(); // the guest is copying
    assert!(first.starts_with("dma: size"), "{first}");
    // SAFETY: sending SIGKILL to the device process this test's VMM spawned.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let mut err = String::new();
    stderr.read_to_string(&mut err).unwrap();
    let status = vmm.wait().unwrap();
    assert_eq!(status.code(), Some(3), "the guest saw a surprise removal: {rest}{err}");
    assert!(rest.contains("device gone during a copy batch"), "{rest}");
    assert!(err.contains("device dma0 is gone"), "{err}");
}

/// A qtest session on passthru with one device; returns (child, stdin, stdout lines).
struct Session {
    vmm: Child,
    stdin: std::process::ChildStdin,
    out: BufReader<std::process::ChildStdout>,
    device_pid: Option<i32>,
}

impl Session {
    fn new(device: &str) -> Session {
        let mut vmm = spawn_piped(&[&["run", "--accel", "qtest", "--device", device][..], &MEM].concat());
        let mut err = BufReader::new(vmm.stderr.take().unwrap());
        let spawned = device.starts_with("dma-engine") && !device.contains("inline");
        let device_pid = spawned.then(|| device_pid(&mut err));
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        let stdin = vmm.stdin.take().unwrap();
        let out = BufReader::new(vmm.stdout.take().unwrap());
        Session { vmm, stdin, out, device_pid }
    }

    fn cmd(&mut self, c: &str) -> String {
        writeln!(self.stdin, "{c}").unwrap();
        loop {
            let mut l = String::new();
            self.out.read_line(&mut l).unwrap();
            if !l.starts_with("IRQ ") {
                return l.trim_end().to_string();
            }
        }
    }

    /// Memory decoding and bus mastering on for the device in slot 1.
    fn enable(&mut self) {
        qpci::enable(&mut |c| self.cmd(c), 1);
    }

    fn field(&mut self, c: &str, key: &str) -> String {
        let a = self.cmd(c);
        a.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key} in {a}"))
            .to_string()
    }
}

/// A COPY descriptor (see abi::dma_engine) as qtest hex.
fn copy_desc(src: u64, dst: u64, len: u64, completion: u64, flags: u32) -> String {
    let mut b = Vec::new();
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    for v in [src, dst, len, 0, completion, 0, 0] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An IOVA never exported by DMA_MAP is refused in the device process itself: the
/// spec allows DMA_READ / DMA_WRITE only of exported ranges, so the VMM is not asked
/// (and logs no fault of its own).
#[test]
fn in_message_mode_an_iova_never_exported_is_refused_by_the_device_and_nothing_is_written() {
    let mut s = Session::new("dma-engine,iommu-mode=messages");
    s.enable();
    assert_eq!(s.cmd("memset 0x400000 4096 0x33"), "OK");
    // COPY from the MMIO hole (not RAM, so not in the identity domain) to guest RAM.
    let d = copy_desc(0xe000_0000, 0x400000, 4096, 0x210000, 0);
    assert_eq!(s.cmd(&format!("write 0x200000 64 0x{d}")), "OK");
    for c in ["writeq 0xc0000008 0x200000", "writel 0xc0000010 16", "writel 0xc0000024 1", "writel 0xc0000018 1"] {
        assert_eq!(s.cmd(c), "OK");
    }
    let t = Instant::now();
    while s.cmd("readl 0xc0000014") != "OK 0x0000000000000001" {
        assert!(t.elapsed() < Duration::from_secs(10), "descriptor never completed");
    }
    assert_eq!(s.cmd("readl 0x210000"), "OK 0x0000000000000002", "completion status DMA_FAULT");
    assert_eq!(s.cmd("read 0x400000 8"), "OK 0x3333333333333333", "the target is untouched");
    assert_eq!(s.field("dev_info dma0", "faults"), "0", "the VMM was never asked");
    drop(s.stdin);
    assert_eq!(s.vmm.wait().unwrap().code(), Some(0));
}

#[test]
fn with_bus_mastering_off_every_dma_faults_in_every_mode() {
    for mode in ["dma-engine,process=inline", "dma-engine", "dma-engine,iommu-mode=messages"] {
        let mut s = Session::new(mode);
        assert!(s.cmd("dev_info dma0").contains("bus_master=0"), "{mode}: off at reset");
        assert_eq!(s.cmd("memset 0x300000 4096 0x5a"), "OK");
        assert_eq!(s.cmd("memset 0x400000 4096 0x33"), "OK");
        let d = copy_desc(0x300000, 0x400000, 4096, 0x210000, 0);
        assert_eq!(s.cmd(&format!("write 0x200000 64 0x{d}")), "OK");
        for c in ["writeq 0xc0000008 0x200000", "writel 0xc0000010 16", "writel 0xc0000024 1", "writel 0xc0000018 1"] {
            assert_eq!(s.cmd(c), "OK");
        }
        // The ring fetch itself is DMA: refused, the engine stops with a ring fault.
        let t = Instant::now();
        while s.cmd("readl 0xc000001c") != "OK 0x0000000000000003" {
            assert!(t.elapsed() < Duration::from_secs(10), "{mode}: no ring fault: {}", s.cmd("readl 0xc000001c"));
            std::thread::sleep(Duration::from_millis(5));
        }
        if mode.contains("inline") {
            assert_eq!(s.field("dev_info dma0", "last_fault"), "0x200000", "{mode}: the VMM refused the ring fetch");
            assert!(s.field("dev_info dma0", "faults").parse::<u64>().unwrap() >= 1, "{mode}");
        } else {
            // A device process holds no window while gated: it refuses the fetch itself
            // (nothing was exported to ask the VMM about).
            assert_eq!(s.field("dev_info dma0", "faults"), "0", "{mode}: the VMM was not asked");
        }
        assert_eq!(s.cmd("read 0x400000 8"), "OK 0x3333333333333333", "{mode}: nothing written");
        // Bus mastering on: the same descriptor goes through.
        s.enable();
        assert!(s.cmd("dev_info dma0").contains("bus_master=1"), "{mode}");
        for c in ["writel 0xc0000024 2", "writeq 0xc0000008 0x200000", "writel 0xc0000010 16", "writel 0xc0000024 1"] {
            assert_eq!(s.cmd(c), "OK");
        }
        assert_eq!(s.cmd("writel 0xc0000018 1"), "OK");
        let t = Instant::now();
        while s.cmd("readl 0x210000") != "OK 0x0000000000000001" {
            assert!(t.elapsed() < Duration::from_secs(10), "{mode}: the copy never completed");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(s.cmd("read 0x400000 8"), "OK 0x5a5a5a5a5a5a5a5a", "{mode}: copied");
        drop(s.stdin);
        assert_eq!(s.vmm.wait().unwrap().code(), Some(0));
    }
}

#[test]
fn a_bar_moved_at_run_time_leaves_its_old_address_and_its_memory_slot_follows() {
    use abi::pci::{command, reg};
    let mut s = Session::new("dma-engine");
    let regions = s.cmd("memory_regions");
    // The scratch BAR is memory the device offers for mmap, minus its MSI-X pages.
    assert!(regions.contains("0xc0200000+0x1fe000:dma0"), "{regions}");
    assert_eq!(s.cmd("writel 0xc0200100 0x600dcafe"), "OK");
    assert_eq!(s.cmd("readl 0x0c0000000"), "OK 0x0000000045414d44", "registers at BAR 0");
    // Move both BARs as a driver would: decoding off, new addresses, decoding on.
    let cmd = qpci::cfg(1, reg::COMMAND);
    assert_eq!(s.cmd(&format!("writew {cmd:#x} 0")), "OK");
    assert!(!s.cmd("memory_regions").contains("dma0"), "decoding off: no memory slot");
    assert_eq!(s.cmd("readl 0xc0000000"), "OK 0x00000000ffffffff", "decoding off: nobody answers");
    assert_eq!(s.cmd(&format!("writel {:#x} 0xc0600000", qpci::cfg(1, reg::BAR0))), "OK");
    assert_eq!(s.cmd(&format!("writel {:#x} 0xc0400000", qpci::cfg(1, reg::BAR0 + 4))), "OK");
    assert_eq!(s.cmd(&format!("writel {:#x} 0", qpci::cfg(1, reg::BAR0 + 8))), "OK");
    assert_eq!(s.cmd(&format!("writew {cmd:#x} {:#x}", command::MEMORY)), "OK");
    assert_eq!(qpci::bar(&mut |c| s.cmd(c), 1, 0), 0xc060_0000);
    assert_eq!(qpci::bar(&mut |c| s.cmd(c), 1, 1), 0xc040_0000);
    let regions = s.cmd("memory_regions");
    assert!(regions.contains("0xc0400000+0x1fe000:dma0") && !regions.contains("0xc0200000"), "{regions}");
    assert_eq!(s.cmd("readl 0xc0000000"), "OK 0x00000000ffffffff", "the old register address is empty");
    assert_eq!(s.cmd("readl 0xc0200100"), "OK 0x00000000ffffffff", "the old scratch address is empty");
    assert_eq!(s.cmd("readl 0xc0600000"), "OK 0x0000000045414d44", "the registers answer at the new address");
    assert_eq!(s.cmd("readl 0xc0400100"), "OK 0x00000000600dcafe", "the same scratch memory at the new address");
    drop(s.stdin);
    assert_eq!(s.vmm.wait().unwrap().code(), Some(0));
}

#[test]
fn after_kill_9_of_a_device_process_with_irqs_firing_nothing_of_it_remains() {
    let mut s = Session::new("dma-engine");
    let before = s.cmd("resources");
    assert!(before.contains("vfu-client:1"), "{before}");
    assert_eq!(s.cmd("irq_intercept_in ioapic"), "OK");
    // MSI-X on, then a stream of interrupting copies.
    s.enable();
    qpci::msix_vector(&mut |c| s.cmd(c), 1, 0, abi::layout::msi_address(0), 0x61);
    assert!(s.cmd("irq_list").contains("dma0/2/0=forwarded"), "the completion vector is an MSI-X source");
    assert_eq!(s.cmd("writel 0xc0000020 1"), "OK");
    let ring: String = (0..16).map(|i| copy_desc(0x300000, 0x400000, 4096, 0x210000 + 32 * i, 1)).collect();
    assert_eq!(s.cmd(&format!("write 0x200000 1024 0x{ring}")), "OK");
    for c in ["writeq 0xc0000008 0x200000", "writel 0xc0000010 16", "writel 0xc0000024 1"] {
        assert_eq!(s.cmd(c), "OK");
    }
    let mut tail = 0u32;
    for _ in 0..20 {
        tail += 8;
        assert_eq!(s.cmd(&format!("writel 0xc0000018 {tail}")), "OK");
    }
    let fds_before: i64 = s.field("resources", "eventfds").parse().unwrap();
    // SAFETY: SIGKILL to the device process this VMM spawned.
    assert_eq!(unsafe { libc::kill(s.device_pid.unwrap(), libc::SIGKILL) }, 0);
    let t = Instant::now();
    while s.field("dev_info dma0", "dead") != "1" {
        assert!(t.elapsed() < Duration::from_secs(10), "the VMM never noticed");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(s.cmd("readl 0xc0000000"), "OK 0x00000000ffffffff", "BARs read all-ones");
    assert_eq!(s.field("dev_info dma0", "mappings"), "0", "its DMA mappings are gone");
    assert!(!s.cmd("irq_list").contains("dma0"), "its interrupt source is detached");
    assert_eq!(
        s.cmd("irq_counts"),
        "OK sources=2 forwarded=2 irqfds=2 watched=0 msi_routes=0",
        "only the VM's own irqfds are left (the serial port's, ACPI hot-plug's)"
    );
    let t = Instant::now();
    loop {
        let after = s.cmd("resources");
        let fds: i64 = after.split_whitespace().find_map(|w| w.strip_prefix("eventfds=")).unwrap().parse().unwrap();
        if !after.contains("vfu-client") && fds < fds_before {
            break; // reader thread gone, the device's irq eventfd closed
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{after} (eventfds before {fds_before})");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(s.stdin);
    assert_eq!(s.vmm.wait().unwrap().code(), Some(0), "the VMM survived and ends normally");
}

#[test]
fn bench_devices_reports_every_backend_and_size() {
    let (table, v) = bench_json(&["devices", "--bytes", "256K", "--reads", "200"]);
    let figs = v["copies"].as_array().unwrap();
    assert_eq!(figs.len(), 9, "3 backends x 3 sizes");
    for f in figs {
        assert!(f["ratio_to_memcpy"].as_f64().unwrap() > 0.0, "{f}");
        assert!(f["copies"].as_u64().unwrap() >= 1);
    }
    assert!(table.contains("shared fd / in process at 64 KiB"));
    let reads = v["register_reads"].as_array().unwrap();
    if vmm::kvm_available() {
        let names: Vec<&str> = reads.iter().map(|f| f["what"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "null MMIO read exit",
                "register, trapped in the VMM",
                "register, trapped and forwarded",
                "mmapped BAR (no exit)"
            ]
        );
        assert!(reads.iter().all(|f| f["ns_per_read"].as_f64().unwrap() >= 0.0), "{reads:?}");
        assert!(table.contains("mmapped BAR (no exit)"), "{table}");
    }
}
