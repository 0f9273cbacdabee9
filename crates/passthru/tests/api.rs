//! The control API from outside: `curl` (a real HTTP client, not passthru's code)
//! over the Unix socket against `passthru run --api-socket`; `passthru ctl` and
//! `passthru stat`; hot-plug cycles without leaks; pause and resume of a running
//! guest; the locked-memory default.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Q, bin, text};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn socket_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("passthru-api-{tag}-{}.sock", std::process::id()))
}

/// Waits until the API socket answers.
fn wait_for(path: &Path) {
    let t = Instant::now();
    while UnixStream::connect(path).is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "the API socket {} never came up", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `curl` over the Unix socket: (status, body as JSON).
fn curl(path: &Path, method: &str, endpoint: &str, body: Option<&str>) -> (u16, Value) {
    let mut c = std::process::Command::new("curl");
    c.args(["-sS", "--max-time", "30", "-o", "-", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(path)
        .args(["-X", method])
        .arg(format!("http://localhost/api/v1/{endpoint}"));
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    let out = c.output().unwrap_or_else(|e| panic!("curl is needed by this test (apt-get install curl): {e}"));
    assert!(out.status.success(), "curl failed: {}", text(&out.stderr));
    let t = text(&out.stdout);
    let (body, code) = t.rsplit_once('\n').unwrap();
    let v = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
    };
    (code.parse().unwrap(), v)
}

fn ok(path: &Path, method: &str, endpoint: &str, body: Option<&str>) -> Value {
    let (status, v) = curl(path, method, endpoint, body);
    assert_eq!(status, 200, "{method} {endpoint} {body:?}: {v}");
    v
}

/// A qtest VM (no vCPU) with an API socket; its qtest session is the test's.
fn qtest_vm(tag: &str, extra: &[&str]) -> (Q, PathBuf) {
    let path = socket_path(tag);
    let p = path.to_str().unwrap().to_string();
    let q = Q::start(&[&["--api-socket", &p, "--locked-memory", "1G"][..], extra].concat());
    wait_for(&path);
    (q, path)
}

#[test]
fn every_endpoint_answers_over_http_and_errors_name_the_problem() {
    let (mut q, path) = qtest_vm("endpoints", &[]);
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = std::fs::metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "the API socket must be private");

    let info = ok(&path, "GET", "vm.info", None);
    assert_eq!(info["run"]["state"], "running");
    assert_eq!(info["memory"][0]["owner"], "ram");
    assert!(info["devices"].as_array().unwrap().is_empty());

    // Hot-plug: one engine in the VMM process, one in its own process.
    let a = ok(&path, "PUT", "vm.add-device", Some(r#"{"device":"dma-engine,dma=pvdma,process=inline"}"#));
    let b = ok(&path, "PUT", "vm.add-device", Some(r#"{"device":"dma-engine,dma=identity"}"#));
    assert_eq!((a["name"].as_str(), b["frontend"].as_str()), (Some("dma0"), Some("identity")));
    let info = ok(&path, "GET", "vm.info", None);
    let devs = info["devices"].as_array().unwrap();
    assert_eq!(devs.len(), 2);
    assert_eq!(devs[0]["bdf"], "00:01.0");
    assert!(devs[0]["process"].is_null() && devs[1]["process"].as_u64().is_some());
    assert!(devs[1]["domain"]["mapping_count"].as_u64().unwrap() >= 1, "identity maps guest RAM: {info}");
    assert!(devs[0]["bars"].as_array().unwrap().len() >= 2);
    // The qtest driver sees the same bus.
    assert!(q.cmd("pci_list").contains("00:02.0"));

    // Interrupt sources appear once the guest enables MSI-X; the mode of an unknown
    // one is a 404, a malformed one a 400.
    let (s, e) = curl(&path, "PUT", "irq.set-mode", Some(r#"{"source":"dma0/2/0","mode":"vmm"}"#));
    assert_eq!(s, 404, "{e}");
    assert!(e["error"].as_str().unwrap().contains("not attached"), "{e}");
    let (s, _) = curl(&path, "PUT", "irq.set-mode", Some(r#"{"source":"serial","mode":"vmm"}"#));
    assert_eq!(s, 400);
    ok(&path, "PUT", "irq.set-mode", Some(r#"{"source":"serial/0/0","mode":"vmm"}"#));
    assert!(q.cmd("irq_list").contains("serial/0/0=vmm"));
    ok(&path, "PUT", "irq.set-mode", Some(r#"{"source":"serial/0/0","mode":"forwarded"}"#));

    // Memory hot-add is seen by the identity domain and by qtest; remove undoes it.
    let before = devs[1]["domain"]["mapping_count"].as_u64().unwrap();
    ok(&path, "PUT", "memory.add", Some(r#"{"gpa":"0x200000000","size":"2M"}"#));
    assert!(q.cmd("memory_regions").contains("0x200000000+0x200000:ram"));
    let info = ok(&path, "GET", "vm.info", None);
    assert_eq!(info["devices"][1]["domain"]["mapping_count"].as_u64().unwrap(), before + 1);
    let (s, e) = curl(&path, "PUT", "memory.add", Some(r#"{"gpa":"0x200000000","size":"2M"}"#));
    assert_eq!(s, 409, "an overlap is refused: {e}");
    ok(&path, "PUT", "memory.remove", Some(r#"{"gpa":"0x200000000"}"#));
    let (s, _) = curl(&path, "PUT", "memory.remove", Some(r#"{"gpa":"0x200000000"}"#));
    assert_eq!(s, 409);

    // Pause and resume (no vCPU under qtest: at once), twice is a conflict.
    ok(&path, "PUT", "vm.pause", None);
    assert_eq!(curl(&path, "PUT", "vm.pause", None).0, 409);
    assert!(q.cmd("run_state").starts_with("OK paused"));
    ok(&path, "PUT", "vm.resume", Some("{}"));
    assert_eq!(curl(&path, "PUT", "vm.resume", None).0, 409);

    // Errors.
    let (s, e) = curl(&path, "GET", "vm.nothing", None);
    assert!(s == 404 && e["error"].as_str().unwrap().contains("vm.info"), "{e}");
    let (s, e) = curl(&path, "DELETE", "vm.info", None);
    assert!(s == 405 && e["error"].as_str().unwrap().contains("GET"), "{e}");
    let (s, e) = curl(&path, "PUT", "vm.add-device", Some("{\"device\": "));
    assert!(s == 400 && e["error"].as_str().unwrap().contains("not JSON"), "{e}");
    let (s, e) = curl(&path, "PUT", "vm.add-device", Some(r#"{"device":"toaster"}"#));
    assert!(s == 400 && e["error"].as_str().unwrap().contains("unknown device"), "{e}");
    let (s, e) = curl(&path, "PUT", "vm.remove-device", Some(r#"{"name":"dma9"}"#));
    assert!(s == 404 && e["error"].as_str().unwrap().contains("dma9"), "{e}");
    let (s, _) = curl(&path, "PUT", "vm.add-device", Some(r#"{"device":"vfio-user,socket=/nonexistent"}"#));
    assert_eq!(s, 409, "a device that cannot attach is refused, nothing half-done");
    assert_eq!(ok(&path, "GET", "vm.info", None)["devices"].as_array().unwrap().len(), 2);
    let mut raw = UnixStream::connect(&path).unwrap();
    raw.write_all(b"this is not HTTP\r\n\r\n").unwrap();
    let mut answer = String::new();
    raw.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");

    // Counters are JSON numbers, per device.
    let c = ok(&path, "GET", "vm.counters", None);
    assert!(c["devices"]["dma1"]["dma_maps"].as_u64().unwrap() >= 1, "{c}");
    assert!(c["locked_memory"]["pinned"].as_u64().unwrap() >= 256 << 20, "identity pins all RAM: {c}");

    // Unplug both, then shut down with a status: passthru exits with it.
    ok(&path, "PUT", "vm.remove-device", Some(r#"{"name":"dma0"}"#));
    ok(&path, "PUT", "vm.remove-device", Some(r#"{"name":"dma1"}"#));
    let c = ok(&path, "GET", "vm.counters", None);
    assert_eq!(c["locked_memory"]["pinned"], 0, "{c}");
    ok(&path, "PUT", "vm.shutdown", Some(r#"{"status":7}"#));
    let t = Instant::now();
    let status = loop {
        if let Some(s) = q.child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "vm.shutdown did not end passthru");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(7));
    assert!(!path.exists(), "the socket file is removed at exit");
}

/// Raw requests: a client that leaves mid-request changes nothing, one that stalls
/// gets 408 at the deadline, keep-alive serves several requests on one connection.
#[test]
fn a_client_that_leaves_or_stalls_mid_request_changes_nothing() {
    let (q, path) = qtest_vm("partial", &[]);
    for cut in [10usize, 60, 90] {
        let body = r#"{"device":"dma-engine,dma=pvdma,process=inline"}"#;
        let req = format!("PUT /api/v1/vm.add-device HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(&req.as_bytes()[..cut.min(req.len() - 1)]).unwrap();
        drop(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(ok(&path, "GET", "vm.info", None)["devices"].as_array().unwrap().is_empty());

    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 2\r\n\r\n{").unwrap();
    let t = Instant::now();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(t.elapsed() < Duration::from_secs(8), "the deadline is 5 s");
    assert_eq!(ok(&path, "GET", "vm.info", None)["run"]["state"], "running", "the stalled pause did nothing");

    // Keep-alive: two requests, two answers on one connection.
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"GET /api/v1/vm.info HTTP/1.1\r\n\r\nGET /api/v1/vm.counters HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
    q.end();
}

/// Many clients at once: each gets its own answers, hot-plugs interleave correctly.
#[test]
fn concurrent_clients_each_get_their_answers() {
    let (q, path) = qtest_vm("concurrent", &[]);
    let threads: Vec<_> = (0..6)
        .map(|i| {
            let path = path.clone();
            std::thread::spawn(move || {
                for _ in 0..5 {
                    let a =
                        ok(&path, "PUT", "vm.add-device", Some(r#"{"device":"dma-engine,dma=pvdma,process=inline"}"#));
                    let name = a["name"].as_str().unwrap().to_string();
                    let info = ok(&path, "GET", "vm.info", None);
                    assert!(info["devices"].as_array().unwrap().iter().any(|d| d["name"] == name.as_str()), "{i}");
                    ok(&path, "PUT", "vm.remove-device", Some(&json!({ "name": name }).to_string()));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(ok(&path, "GET", "vm.info", None)["devices"].as_array().unwrap().is_empty());
    q.end();
}

fn resources(path: &Path) -> (Value, Value, Value) {
    let c = api::client::call(path, "GET", "vm.counters", None, Duration::from_secs(10)).unwrap().body;
    let mut r = c["resources"].clone();
    // The API's own client threads come and go with connections.
    r["threads"].as_object_mut().unwrap().remove("api-client");
    (r, c["irq_resources"].clone(), c["locked_memory"].clone())
}

fn start_kvm(tag: &str, args: &[&str]) -> (Child, PathBuf, std::sync::mpsc::Receiver<String>) {
    let path = socket_path(tag);
    let mut child = bin()
        .args(["run", "--api-socket", path.to_str().unwrap()])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut err = child.stderr.take().unwrap();
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    wait_for(&path);
    (child, path, rx)
}

fn wait_line(rx: &std::sync::mpsc::Receiver<String>, what: &str) {
    let t = Instant::now();
    loop {
        let left = Duration::from_secs(20).saturating_sub(t.elapsed());
        let l = rx.recv_timeout(left).unwrap_or_else(|_| panic!("the guest never printed '{what}'"));
        if l.contains(what) {
            return;
        }
    }
}

fn wait_exit(child: &mut Child) -> Option<i32> {
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        if t.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("passthru did not end");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// 100 hot-plug/unplug cycles of a DMA engine (in process, and in its own process,
/// behind each front-end) while the guest runs and polls the bus: afterwards the VMM
/// holds exactly the descriptors, threads, interrupt resources and pins it held before.
#[test]
fn a_hundred_hotplug_cycles_under_a_running_guest_leak_nothing() {
    vmm::require_kvm!();
    let (mut child, path, rx) = start_kvm("cycles", &["--guest", "idle", "--guest-arg", "20", "--locked-memory", "1G"]);
    wait_line(&rx, "idle: up");
    // The guest is told by polling: the first plug and unplug are seen.
    let call = |m: &str, e: &str, b: Option<&str>| {
        let a = api::client::call(&path, m, e, b, Duration::from_secs(30)).unwrap();
        assert_eq!(a.status, 200, "{e}: {}", a.message());
        a.body
    };
    call("PUT", "vm.add-device", Some(r#"{"device":"dma-engine,dma=pvdma"}"#));
    wait_line(&rx, "appeared");
    call("PUT", "vm.remove-device", Some(r#"{"name":"dma0"}"#));
    wait_line(&rx, "left");
    let before = resources(&path);
    let specs = [
        "dma-engine,dma=pvdma,process=inline",
        "dma-engine,dma=identity",
        "dma-engine,dma=tce",
        "dma-engine,dma=identity,iommu-mode=messages",
    ];
    for i in 0..100 {
        let spec = specs[i % specs.len()];
        let a = call("PUT", "vm.add-device", Some(&json!({ "device": spec }).to_string()));
        let name = a["name"].as_str().unwrap().to_string();
        call("PUT", "vm.remove-device", Some(&json!({ "name": name }).to_string()));
    }
    // Give the API's client threads of the last calls time to be reaped.
    std::thread::sleep(Duration::from_millis(300));
    let after = resources(&path);
    assert_eq!(before, after, "resources before and after 100 cycles");
    let info = call("GET", "vm.info", None);
    assert!(info["devices"].as_array().unwrap().is_empty());
    assert_eq!(info["memory"].as_array().unwrap().len(), 1, "only RAM is left in the memory map: {info}");
    call("PUT", "vm.shutdown", None);
    assert_eq!(wait_exit(&mut child), Some(0));
}

/// Pause stops the vCPU (its exit counters freeze), resume lets the guest finish its
/// work correctly; `ctl` and `stat --once --json` against the same VM.
#[test]
fn pause_freezes_a_running_guest_and_resume_lets_it_finish() {
    vmm::require_kvm!();
    let (mut child, path, rx) = start_kvm(
        "pause",
        &["--guest", "dma", "--guest-arg", "600", "--device", "dma-engine", "--locked-memory", "1G"],
    );
    let _ = rx;
    let sock = path.to_str().unwrap();
    let exits = |c: &Value| -> u64 { c["exits"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum() };
    let mut paused_once = false;
    for _ in 0..3 {
        let out = bin().args(["ctl", sock, "pause"]).output().unwrap();
        if out.status.code() != Some(0) {
            // The guest finished before the pause: the run is too short for this machine.
            eprintln!("pause: {}", text(&out.stderr));
            break;
        }
        paused_once = true;
        let a = ok(&path, "GET", "vm.counters", None);
        std::thread::sleep(Duration::from_millis(150));
        let b = ok(&path, "GET", "vm.counters", None);
        assert_eq!(exits(&a), exits(&b), "the vCPU ran while paused");
        assert_eq!(b["run"]["state"], "paused");
        let out = bin().args(["stat", sock, "--once", "--json"]).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let v: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
        assert!(v["counters"]["devices"]["dma0"]["dma_maps"].as_u64().is_some(), "{v}");
        let out = bin().args(["ctl", sock, "info"]).output().unwrap();
        assert!(text(&out.stdout).contains("VM paused"), "{}", text(&out.stdout));
        let out = bin().args(["ctl", "--json", sock, "resume"]).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(paused_once, "the guest ended before the first pause");
    assert_eq!(wait_exit(&mut child), Some(0), "the dma guest checks every result: it must finish cleanly");
}

/// A guest clearing the largest TCE window whole, over and over, cannot stall the VM:
/// each clear costs what is mapped, so pauses land within their deadline and the TCE
/// statistics answer meanwhile.
#[test]
fn a_guest_clearing_the_largest_tce_window_cannot_stall_pause_or_the_api() {
    vmm::require_kvm!();
    let (mut child, path, rx) = start_kvm(
        "stuff",
        &["--guest", "tce", "--guest-arg", "1", "--device", "dma-engine,dma=tce,process=inline", "--memory", "64M"],
    );
    wait_line(&rx, "clearing a window of 2^45 entries");
    for _ in 0..5 {
        let t0 = Instant::now();
        ok(&path, "PUT", "vm.pause", None);
        assert!(t0.elapsed() < vmm::run_control::PAUSE_DEADLINE, "the pause took {:?}", t0.elapsed());
        let c = ok(&path, "GET", "vm.counters", None);
        assert!(c.to_string().contains("stuff_tce"), "{c}");
        ok(&path, "PUT", "vm.resume", None);
        std::thread::sleep(Duration::from_millis(50));
    }
    ok(&path, "PUT", "vm.shutdown", None);
    assert_eq!(wait_exit(&mut child), Some(0));
}

#[test]
fn ctl_reports_a_server_error_and_a_missing_socket_clearly() {
    let (q, path) = qtest_vm("ctl", &[]);
    let sock = path.to_str().unwrap();
    let out = bin().args(["ctl", sock, "remove-device", "dma7"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no device 'dma7'") && text(&out.stderr).contains("404"),
        "{}",
        text(&out.stderr)
    );
    let out = bin().args(["ctl", sock, "add-device", "dma-engine,dma=pvdma,process=inline"]).output().unwrap();
    assert!(text(&out.stdout).contains("\"dma0\""), "{}", text(&out.stdout));
    let out = bin().args(["ctl", "--json", sock, "counters"]).output().unwrap();
    let v: Value = serde_json::from_str(&text(&out.stdout)).unwrap();
    assert!(v["exits"].is_object() && v["devices"]["dma0"].is_object(), "{v}");
    let out = bin().args(["ctl", "/nonexistent/api.sock", "info"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--api-socket"), "{}", text(&out.stderr));
    q.end();
}

/// A newcomer's `passthru run --guest dma --device dma-engine` (identity: all guest RAM
/// pinned) works when the process may raise RLIMIT_MEMLOCK; when it may not, the error
/// says why and names --locked-memory.
#[test]
fn the_locked_memory_default_is_raised_when_allowed_and_explained_when_not() {
    vmm::require_kvm!();
    let out = bin().args(["run", "--guest", "dma", "--device", "dma-engine", "--memory", "64M"]).output().unwrap();
    let err = text(&out.stderr);
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct passed.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) };
    let need = (64u64 + 2) << 20;
    let may = r.rlim_cur >= need || r.rlim_max >= need || has_cap_sys_resource();
    if may {
        assert_eq!(out.status.code(), Some(0), "{err}");
        if r.rlim_cur < need {
            assert!(err.contains("raised the locked-memory limit"), "{err}");
        }
    } else {
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("may not raise it") && err.contains("CAP_SYS_RESOURCE"), "{err}");
        assert!(err.contains("--locked-memory 64M"), "{err}");
    }
}

fn has_cap_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap().trim();
    u64::from_str_radix(eff, 16).unwrap() & (1 << CAP_SYS_RESOURCE) != 0
}

/// vm.info reads the guest's own PAT and CR0.CD from the running vCPU and gives each
/// slot's effective memory type per PAT entry; a non-coherent device's slot follows
/// the guest's PAT (per-slot model) while RAM stays WB-forced.
#[test]
fn vm_info_reports_memory_types_for_the_guests_own_pat() {
    vmm::require_kvm!();
    let (mut child, path, rx) = start_kvm(
        "pat",
        &["--guest", "idle", "--device", "dma-engine,coherent=false,process=inline", "--locked-memory", "1G"],
    );
    wait_line(&rx, "idle: up");
    let info = ok(&path, "GET", "vm.info", None);
    let cc = &info["cache_control"];
    assert_eq!(cc["from"], "guest", "{cc}");
    assert_eq!(cc["pat"], "0x7040600070406", "the guest runs with the reset PAT: {cc}");
    assert_eq!(cc["cr0_cd"], false);
    let entries = cc["memory_type_by_pat_entry"].as_array().unwrap();
    let ram = entries.iter().find(|e| e["gpa"] == "0x0").unwrap();
    let all_wb: Vec<&str> = vec!["WB"; 8];
    let got: Vec<&str> = ram["per_slot"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(got, all_wb, "RAM is coherent: WB whatever the PAT says");
    let bar = info["memory"].as_array().unwrap().iter().find(|m| m["noncoherent"] == true).unwrap()["gpa"].clone();
    let dev = entries.iter().find(|e| e["gpa"] == bar).unwrap();
    let got: Vec<&str> = dev["per_slot"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(got, ["WB", "WT", "UC", "UC", "WB", "WT", "UC", "UC"], "the flagged slot honours the guest's PAT");
    assert_eq!(info["run"]["state"], "running", "the read paused the vCPU only for itself");
    for _ in 0..3 {
        assert_eq!(ok(&path, "GET", "vm.info", None)["cache_control"]["from"], "guest");
    }
    assert_eq!(ok(&path, "GET", "vm.info", None)["run"]["pauses"], 0, "reading the PAT pauses nothing");
    ok(&path, "PUT", "vm.shutdown", None);
    assert_eq!(wait_exit(&mut child), Some(0));
}

/// Unplugging a device in the middle of its DMA is carried out safely: the answer
/// comes, the VM goes on, and from the answer on the device writes nothing more.
#[test]
fn unplugging_a_device_mid_dma_is_safe_and_final() {
    use abi::dma_engine::{self as de, Descriptor, op, regs as r};
    let (mut q, path) = qtest_vm("middma", &["--device", "dma-engine,iommu-mode=messages"]);
    common::qpci::enable(&mut |c| q.cmd(c), 1);
    let bar0 = common::qpci::bar(&mut |c| q.cmd(c), 1, 0);
    // 16 MiB filled by DMA messages: long enough to be cut in the middle.
    let d = Descriptor {
        op: op::FILL,
        dst: 0x100_0000,
        len: 16 << 20,
        pattern: 0x77,
        completion: 0x21_0000,
        ..Default::default()
    };
    let hex: String = d.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
    q.ok(&format!("write 0x200000 64 0x{hex}"));
    q.ok(&format!("writel {:#x} {}", bar0 + r::CONTROL, de::control::RESET));
    q.ok(&format!("writeq {:#x} 0x200000", bar0 + r::RING_BASE));
    q.ok(&format!("writel {:#x} 1", bar0 + r::RING_SIZE));
    q.ok(&format!("writel {:#x} {}", bar0 + r::CONTROL, de::control::ENABLE));
    q.ok(&format!("writel {:#x} 1", bar0 + r::TAIL));
    std::thread::sleep(Duration::from_millis(20));
    ok(&path, "PUT", "vm.remove-device", Some(r#"{"name":"dma0"}"#));
    // Nothing written after the answer: the filled prefix does not grow.
    let filled = |q: &mut Q| {
        // 256 KiB blocks whose first word the fill reached.
        (0..256u64)
            .filter(|b| common::qpci::value(&q.cmd(&format!("readq {:#x}", 0x100_0000 + b * 0x4_0000))) == 0x77)
            .count()
    };
    let a = filled(&mut q);
    assert!(a < 256, "the fill finished before the unplug: lengthen it");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(filled(&mut q), a, "the device wrote after it was unplugged");
    let info = ok(&path, "GET", "vm.info", None);
    assert!(info["devices"].as_array().unwrap().is_empty());
    assert_eq!(info["memory"].as_array().unwrap().len(), 1, "its BAR memory left the map: {info}");
    assert_eq!(q.cmd(&format!("readl {bar0:#x}")), "OK 0x00000000ffffffff", "the slot reads all-ones");
    q.end();
}
