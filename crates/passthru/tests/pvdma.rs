//! Paravirtual DMA end to end: the default demo, the `pvdma` guest against the engine
//! in the VMM and in message mode, statuses through the qtest dispatch, the kill
//! policy and the counters.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
use common::*;

use std::io::Write;
use std::process::Output;

fn check_demo(out: &Output) {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    for needle in [
        "pvdma: size 1048576 via IOVAs",
        "directions enforced",
        "MAP_SG of 8 pages in one exit",
        "DMA to the unmapped IOVA",
        "18 maps, 18 unmaps, 2 DMA faults (all expected), 3 MSIs",
    ] {
        assert!(stdout.contains(needle), "{needle}: {stdout}");
    }
    assert!(
        stderr.contains(
            "DMA front-end pvdma: query=1 map=10 map_sg=1 unmap=10 unmap_sg=1 pages_mapped=558 pages_unmapped=558"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("device dma0 (00:01.0): 0 DMA mappings left"), "{stderr}");
}

#[test]
fn passthru_run_with_no_arguments_runs_the_paravirtual_dma_demo_in_a_device_process() {
    vmm::require_kvm!();
    let out = passthru(&["run"]);
    check_demo(&out);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("in process") && stderr.contains("guest memory shared by fd, DMA by pvdma"), "{stderr}");
}

#[test]
fn the_demo_runs_against_the_engine_in_the_vmm_and_in_message_mode() {
    vmm::require_kvm!();
    for dev in ["dma-engine,dma=pvdma,process=inline", "dma-engine,dma=pvdma,iommu-mode=messages"] {
        let out = passthru(&["run", "--guest", "pvdma", "--device", dev]);
        check_demo(&out);
    }
}

fn qtest(args: &[&str], script: &str) -> (Option<i32>, Vec<String>) {
    let out = passthru_with_input(&[&["run", "--accel", "qtest"], args].concat(), script);
    (out.status.code(), text(&out.stdout).lines().map(str::to_string).collect())
}

#[test]
fn statuses_through_the_qtest_dispatch_and_the_counters() {
    // the engine in slot 1 (requester id 8) on pvdma, in the VMM; 64 KiB of locked memory.
    let args = ["--device", "dma-engine,dma=pvdma,process=inline", "--locked-memory", "64K"];
    let script = "hcall 0x100 8\n\
                  hcall 0x100 7\n\
                  hcall 0x101 7 0x100000 4096 1\n\
                  hcall 0x101 8 0x100000 0 1\n\
                  hcall 0x101 8 0x100000 4096 9\n\
                  hcall 0x101 8 0x100000 0x20000 1\n\
                  hcall 0x101 8 0x100000 0x10000 3\n\
                  hcall 0x103 8 0x100020000 0x10000\n\
                  hcall 0x103 8 0x100020000 0x10000\n\
                  frontend_stats pvdma\n\
                  frontend_stats pvdma dma0\n";
    let (code, lines) = qtest(&args, script);
    assert_eq!(code, Some(0));
    assert_eq!(lines[0], "OK 0x0 0x1 0x1000 0x200", "QUERY: pvdma, 4 KiB granule, 512 SG entries");
    assert_eq!(lines[1], "OK 0x0 0x0 0x0 0x200", "QUERY of no device: not behind pvdma");
    assert_eq!(lines[2], "OK 0x3 0x0 0x0 0x0", "not assigned");
    assert_eq!(lines[3], "OK 0x2 0x0 0x0 0x0", "zero length");
    assert_eq!(lines[4], "OK 0x2 0x0 0x0 0x0", "bad direction");
    assert_eq!(lines[5], "OK 0x5 0x0 0x0 0x0", "over the locked-memory limit");
    // The failed 128 KiB MAP left its IOVA in the allocator's cache of that size: this
    // 64 KiB MAP comes from the next free range.
    assert_eq!(lines[6], "OK 0x0 0x100020000 0x0 0x0", "exactly the limit");
    assert_eq!(lines[7], "OK 0x0 0x0 0x0 0x0", "unmap");
    assert_eq!(lines[8], "OK 0x8 0x0 0x0 0x0", "unmap twice: not found");
    assert_eq!(
        lines[9],
        "OK query=2 map=5 map_sg=0 unmap=2 unmap_sg=0 pages_mapped=16 pages_unmapped=16 \
         invalid_argument=2 not_assigned=1 over_locked_limit=1 not_found=1"
    );
    assert!(lines[10].starts_with("OK query=1 map=2 ") && lines[10].ends_with("live_mappings=0"), "{}", lines[10]);
}

/// Counters add up on every path: a device's mappings show while bus mastering is off,
/// and the pages it still held when unplugged count as unmapped.
#[test]
fn counters_add_up_with_bus_mastering_off_and_after_an_unplug() {
    let args = ["--device", "dma-engine,dma=pvdma,process=inline"];
    let script = "hcall 0x101 8 0x100000 0x3000 1
                  dev_info dma0
                  device_del dma0
                  frontend_stats pvdma
";
    let (code, lines) = qtest(&args, script);
    assert_eq!(code, Some(0));
    assert!(lines[1].contains("bus_master=0") && lines[1].contains(" mappings=1 "), "{}", lines[1]);
    assert!(lines[1].contains("frontend.live_mappings=1"), "{}", lines[1]);
    assert!(lines[3].contains("pages_mapped=3 pages_unmapped=3"), "{}", lines[3]);
}

#[test]
fn the_kill_policy_ends_the_vm_on_misuse_and_is_off_by_default() {
    let dev = ["--device", "dma-engine,dma=pvdma,process=inline"];
    let (code, lines) = qtest(&dev, "hcall 0x101 8 0x100000 0 1\nhcall 0x100 8\n");
    assert_eq!(code, Some(0));
    assert_eq!(lines, vec!["OK 0x2 0x0 0x0 0x0", "OK 0x0 0x1 0x1000 0x200"], "a status, and the VM goes on");
    let mut args = dev.to_vec();
    args.push("--dma-kill-on-misuse");
    let (code, lines) = qtest(&args, "hcall 0x101 8 0x100000 4096 1\nhcall 0x101 8 0x100000 0 1\nhcall 0x100 8\n");
    assert_eq!(code, Some(125), "killed by policy");
    assert_eq!(lines, vec!["OK 0x0 0x100000000 0x0 0x0", "OK 0x2 0x0 0x0 0x0"], "nothing served after the kill");
}

#[test]
fn a_dead_device_is_not_assigned_any_more() {
    let mut child = spawn_piped(&["run", "--accel", "qtest", "--device", "dma-engine,dma=pvdma"]);
    use std::io::{BufRead, BufReader};
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let pid: i32 = line.split("in process ").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut ask = |c: &str| {
        writeln!(stdin, "{c}").unwrap();
        let mut l = String::new();
        out.read_line(&mut l).unwrap();
        l.trim_end().to_string()
    };
    assert_eq!(ask("hcall 0x101 8 0x100000 4096 3"), "OK 0x0 0x100000000 0x0 0x0");
    // SAFETY: SIGKILL to the device process this VMM spawned.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let t = std::time::Instant::now();
    while ask("dev_info dma0").contains("dead=0") {
        assert!(t.elapsed() < std::time::Duration::from_secs(10));
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(ask("hcall 0x101 8 0x100000 4096 3"), "OK 0x3 0x0 0x0 0x0", "not assigned");
    assert_eq!(ask("hcall 0x100 8"), "OK 0x0 0x0 0x0 0x200", "QUERY: no longer a pvdma device");
    drop(stdin);
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[test]
fn bench_pvdma_reports_every_figure() {
    vmm::require_kvm!();
    let (table, v) = bench_json(&["pvdma", "--iterations", "50"]);
    for key in [
        "map_ns",
        "unmap_ns",
        "map_ns_device_process",
        "unmap_ns_device_process",
        "map_sg_ns_per_page",
        "unmap_sg_ns_per_page",
        "guest_map_ns",
        "guest_unmap_ns",
        "guest_null_ns",
    ] {
        let ns = v[key].as_f64().unwrap();
        assert!(ns.is_finite() && ns > 0.0, "{key} = {ns}");
    }
    assert!(table.contains("MAP+UNMAP / null exit"), "{table}");
    assert_eq!(v["spread"].as_array().unwrap().last().unwrap()["goal"]["at_most"], 5.0, "{v}");
}

#[test]
fn a_locked_memory_limit_too_small_for_the_demo_names_the_fix() {
    vmm::require_kvm!();
    let out = passthru(&["run", "--locked-memory", "1M"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_ne!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("failed: over_locked_limit"), "{stdout}");
    assert!(stderr.contains("hit the VM's locked-memory limit (1024 KiB)"), "{stderr}");
    assert!(stderr.contains("--locked-memory"), "{stderr}");
}
