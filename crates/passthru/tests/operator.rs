//! The operator's side: signals stop a VM in order (a second one at once), and `ctl`
//! says what an interrupted request leaves behind.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn sock(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("passthru-op-{tag}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

fn wait_socket(p: &Path) {
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(p).is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "{} never answered", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) to a process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

/// The pids of `parent`'s children.
fn children(parent: u32) -> Vec<u32> {
    let p = format!("/proc/{parent}/task/{parent}/children");
    std::fs::read_to_string(p).unwrap_or_default().split_whitespace().filter_map(|w| w.parse().ok()).collect()
}

fn spawn(args: &[&str]) -> Child {
    bin().args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// SIGTERM (and SIGINT, SIGHUP) stop a VM in order: one line, its device process
/// reaped, its API socket removed, exit 128 + N.
#[test]
fn a_signal_stops_the_vm_in_order_with_128_plus_its_number() {
    vmm::require_kvm!();
    for (sig, code) in [(libc::SIGTERM, 143), (libc::SIGINT, 130), (libc::SIGHUP, 129)] {
        let s = sock("term");
        let child = spawn(&[
            "run",
            "--guest",
            "idle",
            "--device",
            "dma-engine",
            "--locked-memory",
            "1G",
            "--api-socket",
            s.to_str().unwrap(),
        ]);
        wait_socket(&s);
        let device = children(child.id());
        assert_eq!(device.len(), 1, "the engine's process");
        signal(child.id(), sig);
        let out = wait_within(child, Duration::from_secs(20));
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{err}");
        assert_eq!(err.matches("stopping the VM in order").count(), 1, "one line: {err}");
        assert!(!err.contains("is gone"), "an orderly stop, not a death: {err}");
        assert!(!s.exists(), "the API socket is removed");
        assert!(!Path::new(&format!("/proc/{}", device[0])).exists(), "the device process is reaped");
    }
}

/// The same under qtest: the session ends, exit 130.
#[test]
fn sigint_ends_a_qtest_session_in_order() {
    let s = sock("qtest");
    let mut child = bin()
        .args(["run", "--accel", "qtest", "--api-socket", s.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _stdin = child.stdin.take();
    wait_socket(&s);
    signal(child.id(), libc::SIGINT);
    let out = wait_within(child, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    assert!(!s.exists());
}

/// A second signal does not wait for an orderly stop that takes long (a device that
/// does not answer its DMA_UNMAP, given 20 s to): the process ends at once.
#[test]
fn a_second_signal_stops_at_once() {
    let dev = std::env::temp_dir().join(format!("passthru-op-dev-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&dev);
    let mut server = spawn(&["device", "dma-engine", "--socket", dev.to_str().unwrap()]);
    let t = Instant::now();
    while !dev.exists() {
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = sock("twice");
    let spec = format!("vfio-user,socket={},timeout=20s", dev.display());
    let mut child = bin()
        .args(["run", "--accel", "qtest", "--locked-memory", "1G", "--device", &spec])
        .args(["--api-socket", s.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Bus mastering on: the device holds DMA windows the stop must take back.
    let (mut stdin, mut out) = (child.stdin.take().unwrap(), std::io::BufReader::new(child.stdout.take().unwrap()));
    qpci::enable(
        &mut |c| {
            use std::io::{BufRead, Write};
            writeln!(stdin, "{c}").unwrap();
            let mut l = String::new();
            out.read_line(&mut l).unwrap();
            l.trim_end().to_string()
        },
        1,
    );
    wait_socket(&s);
    signal(server.id(), libc::SIGSTOP); // its unmaps will not be answered
    signal(child.id(), libc::SIGINT);
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    signal(child.id(), libc::SIGINT);
    let out = {
        // Its standard output was taken above: wait for the status and stderr alone.
        let mut err = child.stderr.take().unwrap();
        let t = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "still running");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut e = Vec::new();
        std::io::Read::read_to_end(&mut err, &mut e).unwrap();
        std::process::Output { status, stdout: Vec::new(), stderr: e }
    };
    drop(stdin);
    signal(server.id(), libc::SIGCONT);
    let _ = server.kill();
    let _ = server.wait();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("SIGINT again: stopping at once"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "it took {:?}", t.elapsed());
    assert!(!s.exists(), "the API socket is removed");
}

/// The event stream, through `--event-monitor` and `passthru ctl PATH events` alike:
/// devices added, removed and gone (with why), interrupt forwarding switched, a
/// snapshot, DMA faults per second, pause and resume, and the VM stopping.
#[test]
fn the_event_stream_tells_what_happens() {
    let s = sock("events");
    let log = std::env::temp_dir().join(format!("passthru-op-events-{}.log", std::process::id()));
    let snap = std::env::temp_dir().join(format!("passthru-op-events-snap-{}", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_dir_all(&snap);
    let mut q = Q::start(&[
        "--locked-memory",
        "1G",
        "--device",
        "dma-engine,process=inline",
        "--api-socket",
        s.to_str().unwrap(),
        "--event-monitor",
        log.to_str().unwrap(),
    ]);
    wait_socket(&s);
    let follower = bin()
        .args(["ctl", s.to_str().unwrap(), "events"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let ctl = |args: &[&str]| {
        let out = bin().arg("ctl").arg(&s).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out.stderr));
    };
    ctl(&["add-device", "dma-engine,dma=pvdma"]);
    ctl(&["irq-set-mode", "serial/0/0", "vmm"]);
    ctl(&["snapshot", snap.to_str().unwrap()]);
    ctl(&["remove-device", "dma1"]);
    // A device process that dies: its death, and why.
    ctl(&["add-device", "dma-engine"]);
    let info: serde_json::Value =
        serde_json::from_slice(&bin().arg("ctl").arg("--json").arg(&s).arg("info").output().unwrap().stdout).unwrap();
    let pid = info["devices"].as_array().unwrap().iter().find_map(|d| d["process"].as_u64()).unwrap();
    signal(pid as u32, libc::SIGKILL);
    // The engine in the VMM, bus mastering off: its ring fetch faults (counted per second).
    let ring = "writeq 0xc0000008 0x200000";
    for c in [ring, "writel 0xc0000010 16", "writel 0xc0000024 1", "writel 0xc0000018 1"] {
        assert_eq!(q.cmd(c), "OK");
    }
    std::thread::sleep(Duration::from_millis(2500));
    assert!(q.cmd("pause").starts_with("OK"), "paused (the dead device cannot be stopped)");
    q.ok("resume");
    q.end(); // the driver leaves: the VM stops
    let followed = wait_within(follower, Duration::from_secs(20));
    let lines = std::fs::read_to_string(&log).unwrap();
    let events: Vec<serde_json::Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let has = |name: &str, f: &dyn Fn(&serde_json::Value) -> bool| events.iter().any(|e| e["event"] == name && f(e));
    assert!(has("device-added", &|e| e["name"] == "dma1" && e["frontend"] == "pvdma"), "{lines}");
    assert!(has("irq-mode", &|e| e["source"] == "serial/0/0" && e["mode"] == "vmm"), "{lines}");
    assert!(has("snapshot", &|e| e["phase"] == "started") && has("snapshot", &|e| e["phase"] == "done"), "{lines}");
    assert!(has("device-removed", &|e| e["name"] == "dma1"), "{lines}");
    assert!(has("device-gone", &|e| e["name"] == "dma2" && e["why"].as_str().unwrap().contains("closed")), "{lines}");
    assert!(has("dma-faults", &|e| e["per_second"].as_u64().unwrap() >= 1), "{lines}");
    assert!(has("vm-paused", &|_| true) && has("vm-resumed", &|_| true), "{lines}");
    assert_eq!(events.last().unwrap()["event"], "vm-stopping", "{lines}");
    // ctl events saw the same stream, in its human form.
    assert_eq!(followed.status.code(), Some(0), "the stream ended with the VM: {}", text(&followed.stderr));
    let human = text(&followed.stdout);
    for name in ["device-added", "irq-mode", "snapshot", "device-removed", "device-gone", "vm-stopping"] {
        assert!(human.contains(name), "ctl events: {human}");
    }
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_dir_all(&snap);
}

/// `--log-file` with PASSTHRU_LOG=debug: the request-level trail (method, path,
/// status, duration), attaches and detaches, a device's death with its cause.
#[test]
fn the_log_file_keeps_the_request_level_trail() {
    let s = sock("log");
    let log = std::env::temp_dir().join(format!("passthru-op-log-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let mut child = bin()
        .args(["--log-file", log.to_str().unwrap(), "run", "--accel", "qtest", "--api-socket", s.to_str().unwrap()])
        .env("PASSTHRU_LOG", "debug")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take();
    wait_socket(&s);
    for args in
        [vec!["info"], vec!["add-device", "dma-engine,dma=pvdma"], vec!["remove-device", "dma0"], vec!["resume"]]
    {
        let _ = bin().arg("ctl").arg(&s).args(&args).output().unwrap();
    }
    drop(stdin);
    let out = wait_within(child, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    let has = |a: &str, b: &str| text.lines().any(|l| l.contains(a) && l.contains(b));
    assert!(has("path=/api/v1/vm.info", "status=200"), "{text}");
    assert!(has("path=/api/v1/vm.resume", "status=409"), "an error answer too: {text}");
    assert!(text.lines().any(|l| l.contains("path=/api/v1/vm.info") && l.contains(" us=")), "its duration: {text}");
    assert!(has("attach", "attached") && has("detach", "detached"), "{text}");
    let _ = std::fs::remove_file(&log);
}

/// `passthru stat` opens with a header naming the VM, its process, state, uptime and
/// devices; `--filter` and `--sort` choose its rows; gauges show no rate.
#[test]
fn stat_has_a_header_sorts_filters_and_shows_no_rate_for_gauges() {
    let s = sock("stat");
    let q = Q::start(&["--device", "dma-engine,dma=pvdma,process=inline", "--api-socket", s.to_str().unwrap()]);
    wait_socket(&s);
    let out =
        bin().args(["stat", s.to_str().unwrap(), "--once", "--sort", "name", "--filter", "locked"]).output().unwrap();
    let text = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let header = text.lines().next().unwrap();
    let pid = q.child.id();
    assert!(
        header.contains(&format!("pid {pid}")) && header.contains("running") && header.contains("1 device(s)"),
        "{header}"
    );
    assert!(header.contains("sorted by name") && header.contains("only \"locked\""), "{header}");
    let rows: Vec<&str> = text.lines().skip(3).collect();
    assert_eq!(rows.len(), 4, "only the locked-memory rows: {text}");
    assert!(rows.windows(2).all(|w| w[0] <= w[1]), "sorted by name: {text}");
    assert!(rows.iter().all(|r| r.trim_end().ends_with('-')), "gauges: no rate: {text}");
    q.end();
}

/// Discoverability: examples in every --help, `--device help` listing every device
/// kind, option and front-end, completions and a manual page from the definitions.
#[test]
fn help_lists_examples_devices_completions_and_a_manual_page() {
    for sub in ["run", "ctl", "stat", "bench", "device", "guests", "completions", "man"] {
        let out = passthru(&[sub, "--help"]);
        assert!(text(&out.stdout).contains("Example"), "{sub} --help: {}", text(&out.stdout));
    }
    let run = text(&passthru(&["run", "--help"]).stdout);
    assert!(run.contains("tce (with group=N") && run.contains("--event-monitor"), "{run}");
    assert!(!run.contains("KVM only"), "--restore works under qtest too: {run}");
    let out = passthru(&["run", "--device", "help"]);
    assert_eq!(out.status.code(), Some(0));
    let devices = text(&out.stdout);
    for word in ["dma-engine", "vfio-user,socket=PATH", "timeout=T", "(default: 5s)", "coherent=", "enforce-snoop="] {
        assert!(devices.contains(word), "{word}: {devices}");
    }
    for fe in ["identity", "pvdma", "tce"] {
        assert!(devices.lines().any(|l| l.trim_start().starts_with(fe)), "front-end {fe}: {devices}");
    }
    for shell in ["bash", "zsh", "fish"] {
        let out = passthru(&["completions", shell]);
        assert_eq!(out.status.code(), Some(0));
        assert!(text(&out.stdout).contains("passthru") && text(&out.stdout).contains("snapshot"), "{shell}");
    }
    let man = text(&passthru(&["man"]).stdout);
    assert!(man.contains(".TH passthru 1") && man.contains("device assignment"), "{man}");
}

/// A built-in guest that needs a device says which `--device` to add and exits 2
/// before booting; the INTx test device is a built-in device.
#[test]
fn a_guest_without_the_device_it_needs_says_which_to_add() {
    for (args, want) in [
        (vec!["--guest", "dma"], "needs --device dma-engine (it has 0)"),
        (vec!["--guest", "p2p", "--device", "dma-engine"], "needs 2 of --device dma-engine (it has 1)"),
        (vec!["--guest", "tce", "--device", "dma-engine"], "needs --device dma-engine,dma=tce"),
        (vec!["--guest", "noncoherent", "--device", "dma-engine"], "needs --device dma-engine,enforce-snoop=off"),
        (vec!["--guest", "pci", "--guest-arg", "1"], "needs --device intx-test"),
    ] {
        let out = bin().arg("run").args(&args).output().unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want) && !err.contains("passthru: device"), "{args:?}: nothing built: {err}");
    }
    vmm::require_kvm!();
    let out = output_within(
        bin().args(["run", "--guest", "pci", "--guest-arg", "1", "--guest-arg", "50", "--device", "intx-test"]),
        Duration::from_secs(60),
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("50 interrupts") && stdout.contains("device counted 50, reset ok"), "{stdout}");
}
