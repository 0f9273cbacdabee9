//! Snapshot and restore, from outside: a VM is saved through the control API, the
//! process killed, and `passthru run --restore DIR` goes on in a new process.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Q, bin, output_within, papr, qpci, text, wait_within};
use serde_json::Value;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

fn tmp(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("passthru-snap-{tag}-{}", std::process::id()))
}

fn wait_for(path: &Path) {
    let t = Instant::now();
    while UnixStream::connect(path).is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "the API socket never came up");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn api(path: &Path, method: &str, endpoint: &str, body: Option<&str>) -> (u16, Value) {
    let a = api::client::call(path, method, endpoint, body, Duration::from_secs(60)).unwrap();
    (a.status, a.body)
}

/// A qtest session on `passthru run --accel qtest --restore DIR` (and `extra`).
fn restored(dir: &Path, extra: &[&str]) -> Q {
    let mut child = bin()
        .args(["run", "--accel", "qtest", "--locked-memory", "1G"])
        .args(extra)
        .arg("--restore")
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Q { stdin: child.stdin.take().unwrap(), out: std::io::BufReader::new(child.stdout.take().unwrap()), child }
}

/// A socket path and a snapshot directory for test `tag` (a directory left by an
/// earlier run removed).
fn paths(tag: &str) -> (PathBuf, PathBuf) {
    let dir = tmp(tag);
    let _ = std::fs::remove_dir_all(&dir);
    (tmp(&format!("{tag}.sock")), dir)
}

/// A qtest session with its control API on `sock` and `args`, once the socket answers.
fn q_with_api(sock: &Path, args: &[&str]) -> Q {
    let q = Q::start(&[&["--api-socket", sock.to_str().unwrap()][..], args].concat());
    wait_for(sock);
    q
}

fn snapshot(sock: &Path, dir: &Path) -> (u16, Value) {
    api(sock, "PUT", "vm.snapshot", Some(&serde_json::json!({ "dir": dir }).to_string()))
}

/// The `dma` guest (every FILL, COPY and CRC32C checked, every MSI counted) saved
/// mid-run, its process killed, restored in a new one: it finishes, all checks pass,
/// every interrupt arrives exactly once — with the engine in the VMM, in its own
/// process sharing memory, and in its own process in message mode.
#[test]
fn the_dma_guest_saved_mid_run_finishes_after_a_restore_in_every_device_mode() {
    vmm::require_kvm!();
    for (tag, device) in [
        ("inline", "dma-engine,process=inline"),
        ("child", "dma-engine"),
        ("messages", "dma-engine,iommu-mode=messages"),
    ] {
        let (sock, dir) = paths(tag);
        let rounds = "300";
        let mut child = bin()
            .args(["run", "--guest", "dma", "--guest-arg", rounds, "--device", device, "--locked-memory", "1G"])
            .arg("--api-socket")
            .arg(&sock)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(&sock);
        std::thread::sleep(Duration::from_millis(400));
        let (status, r) = snapshot(&sock, &dir);
        assert_eq!(status, 200, "{tag}: {r}");
        assert!(r["ram_bytes"].as_u64().unwrap() > 0 && r["device_memory_bytes"].as_u64().unwrap() > 0, "{r}");
        child.kill().unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(!text(&out.stdout).contains("300 rounds"), "{tag}: the guest had finished before the snapshot");
        let out = bin().args(["run", "--locked-memory", "1G", "--restore"]).arg(&dir).output().unwrap();
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(0), "{tag}: {stdout}{stderr}");
        assert!(
            stdout.contains("dma: 300 rounds, 3600 descriptors") && stdout.contains("900 MSIs, fault check ok"),
            "{tag}: {stdout}"
        );
        assert!(stderr.contains("restored"), "{stderr}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The numbers of the first line of `s` starting with `prefix`, in order.
fn numbers(s: &str, prefix: &str) -> Vec<u64> {
    let line = s.lines().find(|l| l.contains(prefix)).unwrap_or_else(|| panic!("no '{prefix}' line in {s}"));
    let line = &line[line.find(prefix).unwrap()..];
    line.split(|c: char| !c.is_ascii_digit()).filter(|w| !w.is_empty()).filter_map(|w| w.parse().ok()).collect()
}

/// `irqstorm` (every MSI acknowledged before the next, forwarding switched while
/// they fly) and `intx` (a level line, asserted again only after the guest cleared
/// it), paused for longer than the source's acknowledgement deadline and snapshotted
/// mid-storm: the original VM finishes with every interrupt counted exactly once and
/// no time-out; the snapshot, restored in a new process, finishes the same storm the
/// same way (the interrupt in flight at the snapshot is neither lost nor counted
/// twice, and the switches go on where they were).
#[test]
fn interrupt_storms_saved_mid_storm_count_every_interrupt_after_a_restore() {
    vmm::require_kvm!();
    for (round, (guest, n, m, source, pause)) in [
        ("irqstorm", 60_000u64, 6_000u64, "msi", true),
        ("irqstorm", 60_000, 6_000, "msi", false),
        ("intx", 40_000, 4_000, "intx", true),
    ]
    .into_iter()
    .enumerate()
    {
        let (sock, dir) = paths(&format!("storm{round}"));
        let child = bin()
            .args(["run", "--guest", guest, "--guest-arg", &n.to_string(), "--guest-arg", &m.to_string()])
            .arg("--api-socket")
            .arg(&sock)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for(&sock);
        std::thread::sleep(Duration::from_millis(200));
        if pause {
            // Longer than the 2 s the source waits for an acknowledgement.
            assert_eq!(api(&sock, "PUT", "vm.pause", None).0, 200);
            std::thread::sleep(Duration::from_millis(2500));
            assert_eq!(api(&sock, "PUT", "vm.resume", None).0, 200);
            std::thread::sleep(Duration::from_millis(100));
        }
        let (status, r) = snapshot(&sock, &dir);
        assert_eq!(status, 200, "{guest}: {r}");
        // "irqstorm: guest counted C of F fired (asked N, ...)", "intx: guest counted C
        // of A assertions (asked N, ...)": C = F = N.
        let check = |who: &str, out: &std::process::Output| {
            let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
            assert_eq!(out.status.code(), Some(0), "{who}: {stdout}{stderr}");
            let g = numbers(&stdout, &format!("{guest}:"));
            assert_eq!((g[0], g[1], g[2]), (n, n, n), "{who}: {stdout}");
            let v = numbers(&stderr, &format!("passthru: test-{}:", if source == "msi" { "irq" } else { "intx" }));
            assert_eq!((v[0], v[1], v[2]), (n, n, m), "{who}: {stderr}");
            assert!(stderr.contains("timed out no"), "{who}: {stderr}");
        };
        check(&format!("{guest}, the original VM"), &wait_within(child, Duration::from_secs(60)));
        // Saved mid-storm.
        let state: Value = serde_json::from_slice(&std::fs::read(dir.join("vm.json")).unwrap()).unwrap();
        let run = &state["components"]["test-sources"]["state"][source]["run"];
        let fired = run["fired"].as_u64().unwrap();
        assert!(fired > 0 && fired < n && !run["done"].as_bool().unwrap(), "{guest}: not saved mid-storm: {run}");
        let out = output_within(bin().args(["run", "--restore"]).arg(&dir), Duration::from_secs(60));
        check(&format!("{guest}, restored from {run}"), &out);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Paravirtual DMA with live mappings: after a restore the same IOVAs work, an IOVA
/// unmapped before the snapshot faults, and the pinned bytes are the same.
#[test]
fn pvdma_mappings_come_back_at_the_same_iovas_with_the_same_pins() {
    use abi::dma_engine::{Descriptor, completion, op};
    let (sock, dir) = paths("pvdma");
    let mut q = q_with_api(&sock, &["--device", "dma-engine,dma=pvdma", "--locked-memory", "1G"]);
    qpci::enable(&mut |c| q.cmd(c), 1);
    let bar0 = qpci::bar(&mut |c| q.cmd(c), 1, 0);
    let map = |q: &mut Q, gpa: u64, len: u64, dir: u64| {
        let a = q.cmd(&format!("hcall {:#x} 8 {gpa:#x} {len:#x} {dir}", abi::pvdma::MAP));
        let w: Vec<&str> = a.split_whitespace().collect();
        assert_eq!(w[1], "0x0", "MAP: {a}");
        qpci::value(&format!("OK {}", w[2]))
    };
    let ring = map(&mut q, 0x20_0000, 0x1000, 3);
    let done = map(&mut q, 0x21_0000, 0x1000, 3);
    let buf = map(&mut q, 0x40_0000, 0x10000, 3);
    let gone = map(&mut q, 0x50_0000, 0x1000, 3);
    let a = q.cmd(&format!("hcall {:#x} 8 {gone:#x} 0x1000", abi::pvdma::UNMAP));
    assert!(a.starts_with("OK 0x0 "), "{a}");
    let fill = |iova: u64| Descriptor {
        op: op::FILL,
        dst: iova,
        len: 0x1000,
        pattern: 0x5a5a_5a5a_5a5a_5a5a,
        completion: done,
        ..Default::default()
    };
    assert_eq!(q.run_descriptor(bar0, 0x20_0000, ring, 0x21_0000, fill(buf)), completion::SUCCESS);
    let before = api(&sock, "GET", "vm.counters", None).1;
    let (status, r) = snapshot(&sock, &dir);
    assert_eq!(status, 200, "{r}");
    q.end();

    let mut q = restored(&dir, &["--api-socket", sock.to_str().unwrap()]);
    wait_for(&sock);
    let after = api(&sock, "GET", "vm.counters", None).1;
    assert_eq!(after["locked_memory"]["pinned"], before["locked_memory"]["pinned"], "the same pins");
    assert_eq!(after["devices"]["dma0"]["mappings"], before["devices"]["dma0"]["mappings"]);
    assert_eq!(after["devices"]["dma0"]["frontend"]["map"], before["devices"]["dma0"]["frontend"]["map"], "counters");
    // Guest RAM came back: the first fill is there.
    assert_eq!(q.cmd("readq 0x400ff8"), "OK 0x5a5a5a5a5a5a5a5a");
    q.ok("memset 0x400000 0x1000 0");
    assert_eq!(
        q.run_descriptor(bar0, 0x20_0000, ring, 0x21_0000, fill(buf)),
        completion::SUCCESS,
        "the same IOVA works"
    );
    assert_eq!(q.cmd("readq 0x400008"), "OK 0x5a5a5a5a5a5a5a5a");
    assert_eq!(
        q.run_descriptor(bar0, 0x20_0000, ring, 0x21_0000, fill(gone)),
        completion::DMA_FAULT,
        "unmapped before"
    );
    // The allocator knows the restored ranges: a new MAP gets a fresh IOVA.
    let fresh = map(&mut q, 0x60_0000, 0x1000, 3);
    assert!(![ring, done, buf].contains(&fresh), "{fresh:#x}");
    q.end();
    let _ = std::fs::remove_dir_all(&dir);
}

/// What must be refused is refused with a clear error and nothing written or
/// half-restored: a snapshot the policy forbids (a non-coherent device under
/// `--noncoherent-migration refuse`; a device without migration is in foreign.rs), a
/// corrupted, a truncated and another version's snapshot. A refused snapshot leaves the
/// previous one in place.
#[test]
fn refusals_are_clear_and_leave_nothing_half_done() {
    let (sock, dir) = paths("refuse");
    let q = q_with_api(
        &sock,
        &["--device", "dma-engine,process=inline", "--locked-memory", "1G", "--noncoherent-migration", "refuse"],
    );
    assert_eq!(snapshot(&sock, &dir).0, 200);
    let manifest = std::fs::read(dir.join("manifest.json")).unwrap();
    let (status, _) =
        api(&sock, "PUT", "vm.add-device", Some(r#"{"device":"dma-engine,process=inline,coherent=false"}"#));
    assert_eq!(status, 200);
    let (status, e) = snapshot(&sock, &dir);
    assert_eq!(status, 409);
    let msg = e["error"].as_str().unwrap();
    assert!(msg.contains("--noncoherent-migration refuse") && msg.contains("nothing was written"), "{msg}");
    assert_eq!(std::fs::read(dir.join("manifest.json")).unwrap(), manifest, "the previous snapshot is intact");
    let leftovers: Vec<_> = std::fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(&format!("refuse-{}.tmp", std::process::id())))
        .collect();
    assert!(leftovers.is_empty(), "no temporary directory left");
    q.end();

    let restore = |d: &Path| {
        let out = bin()
            .args(["run", "--accel", "qtest", "--locked-memory", "1G", "--restore"])
            .arg(d)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (out.status.code(), text(&out.stderr))
    };
    let copy = |tag: &str| {
        let c = tmp(tag);
        let _ = std::fs::remove_dir_all(&c);
        std::fs::create_dir_all(&c).unwrap();
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), c.join(f.file_name())).unwrap();
        }
        c
    };
    let (code, err) = restore(&copy("intact"));
    assert_eq!(code, Some(0), "the intact copy restores: {err}");
    // One bit flipped in guest RAM.
    let c = copy("corrupt");
    let mut ram = std::fs::read(c.join("ram.bin")).unwrap();
    let mid = ram.len() / 2;
    ram[mid] ^= 1;
    std::fs::write(c.join("ram.bin"), ram).unwrap();
    let (code, err) = restore(&c);
    assert!(code == Some(1) && err.contains("ram.bin") && err.contains("corrupted"), "{err}");
    assert!(!err.contains("passthru: device"), "nothing was attached: {err}");
    // Device memory cut short.
    let c = copy("truncated");
    let f = std::fs::OpenOptions::new().write(true).open(c.join("devmem.bin")).unwrap();
    f.set_len(100).unwrap();
    let (code, err) = restore(&c);
    assert!(code == Some(1) && err.contains("devmem.bin") && err.contains("truncated"), "{err}");
    // The previous format version: refused, naming both.
    let c = copy("version");
    let v = vmm::snapshot::VERSION;
    let m = std::fs::read_to_string(c.join("manifest.json"))
        .unwrap()
        .replace(&format!("\"version\": {v}"), &format!("\"version\": {}", v - 1));
    std::fs::write(c.join("manifest.json"), m).unwrap();
    let (code, err) = restore(&c);
    assert!(
        code == Some(1) && err.contains(&format!("version {}", v - 1)) && err.contains(&format!("reads version {v}")),
        "{err}"
    );
    for t in ["intact", "corrupt", "truncated", "version", "refuse"] {
        let _ = std::fs::remove_dir_all(tmp(t));
    }
}

/// The non-coherent policy: under `refuse` a snapshot with a non-coherent device is
/// refused and nothing written; under `flush` the device memory it reads is flushed
/// first (the bytes flushed grow by exactly what was read of flagged memory).
#[test]
fn non_coherent_devices_are_flushed_before_a_snapshot_or_refused() {
    let (sock, dir) = paths("nc");
    let nc = "dma-engine,process=inline,coherent=false";
    let q = q_with_api(&sock, &["--device", nc, "--locked-memory", "1G", "--noncoherent-migration", "refuse"]);
    let (status, e) = snapshot(&sock, &dir);
    assert_eq!(status, 409);
    assert!(e["error"].as_str().unwrap().contains("--noncoherent-migration refuse"), "{e}");
    assert!(!dir.exists(), "nothing written");
    q.end();
    let mut q = q_with_api(&sock, &["--device", nc, "--locked-memory", "1G"]);
    qpci::enable(&mut |c| q.cmd(c), 1); // the BARs decode: the scratch memory is mapped
    let flushed = |q: &mut Q| q.field("noncoherent", "flushed").parse::<u64>().unwrap();
    let before = flushed(&mut q);
    let (status, r) = snapshot(&sock, &dir);
    assert_eq!(status, 200, "{r}");
    let read = r["device_memory_bytes"].as_u64().unwrap();
    assert!(read > 0, "{r}");
    assert_eq!(flushed(&mut q) - before, read, "exactly the flagged bytes read");
    q.end();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A snapshot taken with a non-coherent device restores its memory byte for byte (the
/// restore writes it back and flushes it for the non-snooping device).
#[test]
fn a_non_coherent_device_memory_restores_identical() {
    let (sock, dir) = paths("ncr");
    let nc = "dma-engine,coherent=false";
    let mut q = q_with_api(&sock, &["--device", nc, "--locked-memory", "1G"]);
    qpci::enable(&mut |c| q.cmd(c), 1);
    let bar1 = qpci::bar(&mut |c| q.cmd(c), 1, 1);
    let pattern: String = (0..4096u32).map(|i| format!("{:02x}", (i * 7 + 3) as u8)).collect();
    q.ok(&format!("write {:#x} 4096 0x{pattern}", bar1 + 0x3000));
    assert_eq!(snapshot(&sock, &dir).0, 200);
    q.end();
    let mut q = restored(&dir, &[]);
    assert_eq!(q.field("noncoherent", "count"), "1", "still counted after the restore");
    assert_eq!(q.cmd(&format!("dump {:#x} 4096", bar1 + 0x3000)), format!("OK 0x{pattern}"));
    q.end();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Dirty tracking, one list per VM: the pages a DMA engine wrote are in it whoever
/// carried the writes — a device process writing in place through shared memory
/// (only its own DMA dirty log sees them), a device process in message mode and one in
/// the VMM (the DMA core's log sees them) — and a take clears them.
#[test]
fn dirty_tracking_sees_every_page_a_device_wrote_in_every_mode() {
    use abi::dma_engine::{Descriptor, completion, op};
    for device in ["dma-engine", "dma-engine,iommu-mode=messages", "dma-engine,process=inline"] {
        let mut q = Q::start(&["--device", device, "--locked-memory", "1G"]);
        qpci::enable(&mut |c| q.cmd(c), 1);
        let bar0 = qpci::bar(&mut |c| q.cmd(c), 1, 0);
        q.ok("dirty_start");
        // The ring written here by the driver (no vCPU under qtest: not logged), then
        // the log emptied: what follows is the device's alone.
        let fill = Descriptor {
            op: op::FILL,
            dst: 0x40_0000,
            len: 0x10000,
            pattern: 7,
            completion: 0x21_0000,
            ..Default::default()
        };
        let hex: String = fill.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
        q.ok(&format!("write 0x200000 64 0x{hex}"));
        q.cmd("dirty_take");
        assert_eq!(q.run_descriptor(bar0, 0x20_0000, 0x20_0000, 0x21_0000, fill), completion::SUCCESS);
        let taken = q.cmd("dirty_take");
        assert!(taken.contains("0x400000+0x10000"), "{device}: every page of the fill: {taken}");
        assert!(taken.contains("0x210000+0x1000"), "{device}: the completion record: {taken}");
        assert!(taken.starts_with("OK 17 "), "{device}: nothing else: {taken}");
        assert_eq!(q.cmd("dirty_take"), "OK 0", "{device}: a take clears");
        q.ok("dirty_stop");
        q.end();
    }
}

/// A pause quiesces the devices: a descriptor rung while paused does not run (its
/// completion stays pending) until resume; then it completes.
#[test]
fn a_paused_vm_has_quiet_devices_until_resume() {
    use abi::dma_engine::{self as de, Descriptor, completion, op, regs as r};
    let mut q = Q::start(&["--device", "dma-engine", "--locked-memory", "1G"]);
    qpci::enable(&mut |c| q.cmd(c), 1);
    let bar0 = qpci::bar(&mut |c| q.cmd(c), 1, 0);
    let d = Descriptor {
        op: op::FILL,
        dst: 0x40_0000,
        len: 0x1000,
        pattern: 9,
        completion: 0x21_0000,
        ..Default::default()
    };
    let hex: String = d.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
    q.ok(&format!("write 0x200000 64 0x{hex}"));
    q.ok("memset 0x210000 32 0");
    q.ok(&format!("writel {:#x} {}", bar0 + r::CONTROL, de::control::RESET));
    q.ok(&format!("writeq {:#x} 0x200000", bar0 + r::RING_BASE));
    q.ok(&format!("writel {:#x} 1", bar0 + r::RING_SIZE));
    q.ok(&format!("writel {:#x} {}", bar0 + r::CONTROL, de::control::ENABLE));
    assert_eq!(q.cmd("pause"), "OK", "every device quiesced");
    q.ok(&format!("writel {:#x} 1", bar0 + r::TAIL));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(qpci::value(&q.cmd("readl 0x210000")) as u32, completion::PENDING, "no DMA while paused");
    q.ok("resume");
    let t = Instant::now();
    while qpci::value(&q.cmd("readl 0x210000")) as u32 == completion::PENDING {
        assert!(t.elapsed() < Duration::from_secs(10), "the descriptor never ran after resume");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(qpci::value(&q.cmd("readl 0x210000")) as u32, completion::SUCCESS);
    q.end();
}

/// RAM hot-added after boot is saved (its touched pages only) and comes back at the
/// same address with the same bytes.
#[test]
fn hot_added_ram_is_saved_and_restored() {
    let (sock, dir) = paths("hot");
    let mut q = q_with_api(&sock, &["--device", "dma-engine,process=inline", "--locked-memory", "1G"]);
    let (status, _) = api(&sock, "PUT", "memory.add", Some(r#"{"gpa":"0x200000000","size":"2M"}"#));
    assert_eq!(status, 200);
    let pattern: String = (0..4096u32).map(|i| format!("{:02x}", (i * 13 + 1) as u8)).collect();
    q.ok(&format!("write 0x200001000 4096 0x{pattern}"));
    let mappings = q.field("dev_info dma0", "mappings");
    let (status, r) = snapshot(&sock, &dir);
    assert_eq!(status, 200, "{r}");
    q.end();
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let hot = manifest["sections"].as_array().unwrap().iter().find(|s| s["name"] == "hotram").unwrap().clone();
    assert_eq!(hot["bytes"], 8 + 16 + 4096, "only the touched page: {hot}");
    let mut q = restored(&dir, &[]);
    assert!(q.cmd("memory_regions").contains("0x200000000+0x200000:ram"));
    assert_eq!(q.cmd("read 0x200001000 4096"), format!("OK 0x{pattern}"));
    assert_eq!(q.field("dev_info dma0", "mappings"), mappings, "the identity domain maps the hot RAM again");
    q.end();
    let _ = std::fs::remove_dir_all(&dir);
}

/// TCE groups, windows and tables come back: the same liobns and bus offsets, a table
/// shared by two groups shared again (memory once), every entry, DMA through them.
#[test]
fn tce_windows_and_shared_tables_are_saved_and_restored() {
    use abi::dma_engine::{Descriptor, completion, op};
    use abi::tce as t;
    let (sock, dir) = paths("tce");
    let tce = "dma-engine,dma=tce,process=inline";
    let mut q = q_with_api(&sock, &["--device", tce, "--device", tce, "--locked-memory", "1G"]);
    qpci::enable(&mut |c| q.cmd(c), 1);
    let bar0 = qpci::bar(&mut |c| q.cmd(c), 1, 0);
    let (code, ga, la) = papr(&q.cmd(&format!("hcall {:#x} {:#x}", t::DEVICE_GROUP, abi::pci::bdf(0, 1, 0))));
    assert_eq!(code, t::H_SUCCESS);
    let (_, gb, lb0) = papr(&q.cmd(&format!("hcall {:#x} {:#x}", t::DEVICE_GROUP, abi::pci::bdf(0, 2, 0))));
    // A 4 GiB 64-bit window in A's group, shared by B's group.
    let (code, l64, bus) = papr(&q.cmd(&format!("hcall {:#x} {ga:#x} 12 32 0", t::CREATE_WINDOW)));
    assert_eq!((code, bus), (t::H_SUCCESS, t::WINDOW64_OFFSET));
    let (code, lb, _) = papr(&q.cmd(&format!("hcall {:#x} {gb:#x} 12 32 {l64:#x}", t::CREATE_WINDOW)));
    assert_eq!(code, t::H_SUCCESS);
    // B's group lets go of its default window: its liobn must still come back on RESET.
    assert_eq!(papr(&q.cmd(&format!("hcall {:#x} {lb0:#x}", t::REMOVE_WINDOW))).0, t::H_SUCCESS);
    let put = |q: &mut Q, liobn: u64, ioba: u64, tce: u64| {
        papr(&q.cmd(&format!("hcall {:#x} {liobn:#x} {ioba:#x} {tce:#x}", t::PUT_TCE))).0
    };
    assert_eq!(put(&mut q, la, 0x0, 0x20_0000 | t::READ), t::H_SUCCESS); // ring
    assert_eq!(put(&mut q, la, 0x1000, 0x21_0000 | t::WRITE), t::H_SUCCESS); // completion
    assert_eq!(put(&mut q, l64, bus + 0x5000, 0x40_0000 | t::READ | t::WRITE), t::H_SUCCESS);
    let info_before = q.cmd(&format!("tce_info {l64:#x}"));
    let (status, r) = snapshot(&sock, &dir);
    assert_eq!(status, 200, "{r}");
    q.end();

    let mut q = restored(&dir, &[]);
    assert_eq!(q.cmd(&format!("tce_info {l64:#x}")), info_before, "the same window, groups and table");
    assert!(info_before.contains("valid=1"), "{info_before}");
    let get = |q: &mut Q, liobn: u64, ioba: u64| papr(&q.cmd(&format!("hcall {:#x} {liobn:#x} {ioba:#x}", t::GET_TCE)));
    assert_eq!(get(&mut q, lb, bus + 0x5000), (t::H_SUCCESS, 0x40_0000 | t::READ | t::WRITE, 0), "B still shares it");
    assert_eq!(get(&mut q, la, 0x1000), (t::H_SUCCESS, 0x21_0000 | t::WRITE, 0));
    // A fills through its 64-bit window after the restore.
    let d = Descriptor {
        op: op::FILL,
        dst: bus + 0x5000,
        len: 0x1000,
        pattern: 0x3c3c_3c3c_3c3c_3c3c,
        completion: 0x1000,
        ..Default::default()
    };
    assert_eq!(q.run_descriptor(bar0, 0x20_0000, 0x0, 0x21_0000, d), completion::SUCCESS);
    assert_eq!(q.cmd("readq 0x400ff8"), "OK 0x3c3c3c3c3c3c3c3c");
    // The default liobns survive: B's removed one is named by DEVICE_GROUP and comes
    // back on RESET; A's RESET keeps A's.
    let (_, _, named) = papr(&q.cmd(&format!("hcall {:#x} {:#x}", t::DEVICE_GROUP, abi::pci::bdf(0, 2, 0))));
    assert_eq!(named, lb0);
    assert_eq!(papr(&q.cmd(&format!("hcall {:#x} {gb:#x}", t::RESET_WINDOWS))), (t::H_SUCCESS, lb0, 0));
    assert_eq!(papr(&q.cmd(&format!("hcall {:#x} {ga:#x}", t::RESET_WINDOWS))), (t::H_SUCCESS, la, 0));
    // A new window gets a liobn the restored ones do not use.
    let (code, fresh, _) = papr(&q.cmd(&format!("hcall {:#x} {gb:#x} 12 30 0", t::CREATE_WINDOW)));
    assert_eq!(code, t::H_SUCCESS);
    assert!(![la, lb0, l64, lb].contains(&fresh), "{fresh:#x}");
    q.end();
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGTERM while a snapshot is being written: the VMM lets it finish (the client gets
/// its 200, the new snapshot is in place and restores), then stops in order, 143.
#[test]
fn a_sigterm_mid_snapshot_lets_it_finish_then_stops() {
    let (sock, dir) = paths("sigterm");
    let mut q = q_with_api(&sock, &["--memory", "1G", "--locked-memory", "2G"]);
    q.ok("memset 0x100000 0x1000 0x11");
    assert_eq!(snapshot(&sock, &dir).0, 200);
    let first = std::fs::read(dir.join("manifest.json")).unwrap();
    for i in 0..16u64 {
        q.ok(&format!("memset {:#x} 0x1000000 0x33", 0x100_0000 + i * 0x100_0000));
    }
    let (d, sk) = (dir.clone(), sock.clone());
    let second = std::thread::spawn(move || {
        let body = serde_json::json!({ "dir": d }).to_string();
        api::client::call(&sk, "PUT", "vm.snapshot", Some(&body), Duration::from_secs(60)).map(|a| a.status)
    });
    // Wait until the new snapshot is being written (its directory beside the target).
    let tmp_name = format!(".{}.tmp-{}", dir.file_name().unwrap().to_string_lossy(), q.child.id());
    let tmp_dir = dir.parent().unwrap().join(&tmp_name);
    let t = Instant::now();
    while !tmp_dir.exists() && !second.is_finished() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let cut = tmp_dir.exists();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(q.child.id() as i32, libc::SIGTERM) };
    assert_eq!(second.join().unwrap().ok(), Some(200), "the snapshot under way finished");
    drop(q.stdin);
    let status = q.child.wait().unwrap();
    assert_eq!(status.code(), Some(143));
    if !cut {
        eprintln!("note: the snapshot finished before its directory was seen; the signal came after it");
    }
    assert_ne!(std::fs::read(dir.join("manifest.json")).unwrap(), first, "the new snapshot is in place");
    assert!(!tmp_dir.exists(), "nothing half-written is left");
    let out = bin()
        .args(["run", "--accel", "qtest", "--locked-memory", "2G", "--restore"])
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A VMM killed in the middle of writing a snapshot leaves the previous snapshot at
/// its place, whole: the new one is written beside it and swapped in at the end.
#[test]
fn a_crash_mid_snapshot_leaves_the_previous_snapshot_intact() {
    let (sock, dir) = paths("crash");
    let mut q = q_with_api(&sock, &["--memory", "1G", "--locked-memory", "2G"]);
    q.ok("memset 0x100000 0x1000 0x11");
    assert_eq!(snapshot(&sock, &dir).0, 200);
    let manifest = std::fs::read(dir.join("manifest.json")).unwrap();
    // 256 MiB touched: the next snapshot takes a while to write.
    for i in 0..16u64 {
        q.ok(&format!("memset {:#x} 0x1000000 0x22", 0x100_0000 + i * 0x100_0000));
    }
    let (d, sk) = (dir.clone(), sock.clone());
    let second = std::thread::spawn(move || {
        let body = serde_json::json!({ "dir": d }).to_string();
        api::client::call(&sk, "PUT", "vm.snapshot", Some(&body), Duration::from_secs(60)).map(|a| a.status)
    });
    std::thread::sleep(Duration::from_millis(150));
    q.child.kill().unwrap();
    let _ = q.child.wait();
    let finished = matches!(second.join().unwrap(), Ok(200));
    if finished {
        eprintln!("skipped: the second snapshot finished within 150 ms; nothing was cut");
    } else {
        assert_eq!(std::fs::read(dir.join("manifest.json")).unwrap(), manifest, "the previous manifest");
    }
    // Whichever snapshot is there, it is whole: it restores.
    let out = bin()
        .args(["run", "--accel", "qtest", "--locked-memory", "2G", "--restore"])
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
    if let Ok(entries) = std::fs::read_dir(dir.parent().unwrap()) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().contains(&format!("crash-{}.tmp", std::process::id())) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

#[test]
fn bench_snapshot_reports_every_figure() {
    let (table, v) = common::bench_json(&["snapshot", "--memory", "64M", "--touched", "8M"]);
    for key in
        ["save_ms", "plain_write_ms", "restore_ms", "plain_read_ms", "pause_ms", "save_ms_64m_device_memory_flagged"]
    {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key}: {table}");
    }
    assert!(v["snapshot_bytes"].as_u64().unwrap() >= 8 << 20, "{table}");
    assert_eq!(v["flushed_bytes_64m"].as_u64(), Some(64 << 20), "exactly the flagged 64 MiB flushed: {table}");
    assert!(table.contains("64 MiB flagged non-coherent"), "{table}");
}

/// The VMM's peak resident memory (VmHWM) in KiB.
fn peak_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A snapshot streams guest RAM and device memory to its files: the VMM's peak memory
/// grows by its bounded buffers, not by the RAM it saves.
#[test]
fn a_snapshot_streams_guest_memory_instead_of_copying_it() {
    let (sock, dir) = paths("stream");
    let mut q = q_with_api(&sock, &["--memory", "512M", "--locked-memory", "1G"]);
    // 256 MiB of guest RAM touched (resident in the VMM too: it maps guest RAM).
    for mib in 0..256u64 {
        q.ok(&format!("memset {:#x} 0x100000 0x{:02x}", 0x100_0000 + mib * 0x10_0000, mib & 0xff));
    }
    let before = peak_kib(q.child.id());
    let (status, r) = snapshot(&sock, &dir);
    assert_eq!(status, 200, "{r}");
    let grew = peak_kib(q.child.id()).saturating_sub(before);
    assert!(grew < 64 << 10, "saving 256 MiB of RAM grew the VMM by {} MiB", grew >> 10);
    assert!(r["ram_bytes"].as_u64().unwrap() >= 256 << 20, "{r}");
    q.end();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Rewrites a snapshot's section file and its manifest entry (size and checksum), as
/// a crafted snapshot would: only the content's checks can refuse it.
fn forge(dir: &Path, file: &str, bytes: &[u8]) {
    std::fs::write(dir.join(file), bytes).unwrap();
    let mpath = dir.join("manifest.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    for s in m["sections"].as_array_mut().unwrap() {
        if s["file"] == file {
            s["bytes"] = Value::from(bytes.len() as u64);
            s["crc32c"] = Value::from(crc32c::crc32c(bytes));
        }
    }
    std::fs::write(&mpath, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

/// Crafted snapshots are refused with one line, quickly, before anything is built: a
/// FIFO or a symlink in place of a section, a RAM file of empty records, a section
/// listed twice, an unknown field, an interrupt source of no device.
#[test]
fn crafted_snapshots_are_refused_quickly_and_clearly() {
    let (sock, dir) = paths("crafted");
    let q = q_with_api(&sock, &["--device", "dma-engine,process=inline", "--locked-memory", "1G"]);
    assert_eq!(snapshot(&sock, &dir).0, 200);
    q.end();
    let restore = |d: &Path| {
        let mut c = bin();
        c.args(["run", "--accel", "qtest", "--locked-memory", "1G", "--restore"]).arg(d).stdin(Stdio::null());
        let out = output_within(&mut c, Duration::from_secs(30));
        (out.status.code(), text(&out.stderr))
    };
    let copy = |tag: &str| {
        let c = tmp(tag);
        let _ = std::fs::remove_dir_all(&c);
        std::fs::create_dir_all(&c).unwrap();
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), c.join(f.file_name())).unwrap();
        }
        c
    };
    let refused = |c: &Path, what: &str| {
        let t = Instant::now();
        let (code, err) = restore(c);
        assert!(code == Some(1) && err.contains(what), "expected '{what}': {err}");
        assert!(!err.contains("passthru: device"), "nothing was attached: {err}");
        assert!(t.elapsed() < Duration::from_secs(10), "refused only after {:?}", t.elapsed());
    };
    // A FIFO in place of ram.bin: refused, not waited on.
    let c = copy("fifo");
    std::fs::remove_file(c.join("ram.bin")).unwrap();
    let path = std::ffi::CString::new(c.join("ram.bin").to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    refused(&c, "not a regular file");
    // A symlink to a file outside the directory.
    let c = copy("symlink");
    let outside = tmp("outside-ram.bin");
    std::fs::copy(c.join("ram.bin"), &outside).unwrap();
    std::fs::remove_file(c.join("ram.bin")).unwrap();
    std::os::unix::fs::symlink(&outside, c.join("ram.bin")).unwrap();
    refused(&c, "symbolic link");
    // 64 MiB of empty records, checksum and all.
    let c = copy("empty");
    let mut ram = b"PTDATA1\0".to_vec();
    ram.resize(8 + (64 << 20), 0);
    forge(&c, "ram.bin", &ram);
    refused(&c, "a record of 0 bytes");
    // A section listed twice.
    let c = copy("twice");
    let mpath = c.join("manifest.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    let first = m["sections"][0].clone();
    m["sections"].as_array_mut().unwrap().push(first);
    std::fs::write(&mpath, serde_json::to_vec(&m).unwrap()).unwrap();
    refused(&c, "twice");
    // vm.json with a field no passthru wrote (in the layout, in a component's state),
    // a section of no component, another version of a component's state, and an
    // interrupt source of no device.
    let vm: Value = serde_json::from_slice(&std::fs::read(dir.join("vm.json")).unwrap()).unwrap();
    let c = copy("field");
    let mut v = vm.clone();
    v["layout"]["devices"][0]["frontend_sate"] = Value::from("pvdma");
    forge(&c, "vm.json", &serde_json::to_vec(&v).unwrap());
    refused(&c, "unknown field");
    let c = copy("field");
    let mut v = vm.clone();
    v["components"]["device/dma0"]["state"]["extra"] = Value::from(1);
    forge(&c, "vm.json", &serde_json::to_vec(&v).unwrap());
    refused(&c, "device/dma0: state: unknown field");
    let c = copy("field");
    let mut v = vm.clone();
    v["components"]["ghost"] = serde_json::json!({ "version": 1, "state": {} });
    forge(&c, "vm.json", &serde_json::to_vec(&v).unwrap());
    refused(&c, "a section of an unknown component 'ghost'");
    let c = copy("field");
    let mut v = vm.clone();
    v["components"]["irqs"]["version"] = Value::from(9);
    forge(&c, "vm.json", &serde_json::to_vec(&v).unwrap());
    refused(&c, "irqs: state of format version 9; this passthru reads version 1");
    let c = copy("irq");
    let mut v = vm.clone();
    v["components"]["irqs"]["state"]["sources"].as_array_mut().unwrap().push(serde_json::json!([
        "ghost",
        2,
        0,
        "forwarded"
    ]));
    forge(&c, "vm.json", &serde_json::to_vec(&v).unwrap());
    refused(&c, "unknown device 'ghost'");
    let c = copy("frontend");
    let mut v = vm.clone();
    v["layout"]["devices"][0]["frontend"] = Value::from("tce");
    forge(&c, "vm.json", &serde_json::to_vec(&v).unwrap());
    refused(&c, "its DMA front-end is identity by its specification, tce in its state");
    for t in ["fifo", "symlink", "empty", "twice", "field", "irq", "frontend", "crafted"] {
        let _ = std::fs::remove_dir_all(tmp(t));
    }
    let _ = std::fs::remove_file(outside);
}

/// The vCPU's CPUID is saved and set again before anything else on restore; a
/// snapshot asking for a CPU feature this host does not give is refused with a line
/// naming the leaf.
#[test]
fn cpuid_is_saved_and_a_restore_needing_a_feature_the_host_lacks_is_refused() {
    vmm::require_kvm!();
    let (sock, dir) = paths("cpuid");
    let mut child = bin()
        .args(["run", "--guest", "idle", "--api-socket"])
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&sock);
    std::thread::sleep(Duration::from_millis(200));
    let (status, r) = snapshot(&sock, &dir);
    assert_eq!(status, 200, "{r}");
    child.kill().unwrap();
    let _ = child.wait();
    let vm: Value = serde_json::from_slice(&std::fs::read(dir.join("vm.json")).unwrap()).unwrap();
    // Each entry is kvm_cpuid_entry2's bytes: function, index, flags, eax, ebx, ...
    let word = |e: &Value, at: usize| -> u32 {
        u32::from_le_bytes(std::array::from_fn(|i| e[at + i].as_u64().unwrap() as u8))
    };
    let leaves = vm["components"]["vcpu0"]["state"]["cpuid"].as_array().unwrap();
    assert!(leaves.iter().any(|e| word(e, 0) == 7), "the CPUID is saved: {} leaves", leaves.len());
    // Leaf 0x7.0 EBX asking for every feature there is.
    let mut v = vm.clone();
    for e in v["components"]["vcpu0"]["state"]["cpuid"].as_array_mut().unwrap() {
        if word(e, 0) == 7 && word(e, 4) == 0 {
            for i in 16..20 {
                e[i] = Value::from(0xffu8);
            }
        }
    }
    forge(&dir, "vm.json", &serde_json::to_vec(&v).unwrap());
    let mut c = bin();
    c.args(["run", "--restore"]).arg(&dir);
    let out = output_within(&mut c, Duration::from_secs(30));
    let err = text(&out.stderr);
    assert!(out.status.code() == Some(1) && err.contains("CPUID 0x7.0 ebx"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
