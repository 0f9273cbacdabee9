//! `passthru run --record` and `passthru replay virtio-iommu`: a trace recorded from a
//! guest replays with the statuses it got, a hand-written Linux-shaped trace replays
//! with the statuses the spec gives, and a status that differs is found and named.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

const LINUX_LIKE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/viommu-linux-like.trace");

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("passthru-replay-{}-{name}", std::process::id()))
}

/// `passthru replay virtio-iommu FILE ARGS`: exit code, stdout, stderr.
fn replay(file: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = common::output_within(
        common::bin().args(["replay", "virtio-iommu"]).arg(file).args(args),
        Duration::from_secs(60),
    );
    (out.status.code(), common::text(&out.stdout), common::text(&out.stderr))
}

#[test]
fn a_linux_shaped_trace_gets_the_statuses_the_spec_gives() {
    let json = tmp("linux.json");
    let (code, out, err) = replay(Path::new(LINUX_LIKE), &["--json", json.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("24 requests in 11 kicks"), "{out}");
    assert!(out.contains("phases: probe, identity, dma-domains"), "{out}");
    assert!(out.contains("statuses that differ from the trace: 0"), "{out}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    assert_eq!(v["kicks"], 11);
    assert_eq!(v["requests"]["MAP"]["count"], 10);
    assert_eq!(v["requests"]["MAP"]["statuses"]["OK"], 4);
    assert_eq!(v["requests"]["MAP"]["statuses"]["INVAL"], 3);
    assert_eq!(v["requests"]["UNMAP"]["statuses"]["RANGE"], 1);
    assert_eq!(v["peak_mappings"], 3);
    assert!(v["requests"]["MAP"]["vmm_ns_per_request"].as_u64().unwrap() > 0);
    assert_eq!(v["differences"].as_array().unwrap().len(), 0);
}

#[test]
fn a_status_that_differs_is_named_with_its_line_and_the_exit_status_is_1() {
    let text = std::fs::read_to_string(LINUX_LIKE).unwrap();
    // The splitting UNMAP traced as OK (what a lenient device answers), and the MAP over
    // the MSI doorbell traced as accepted.
    let lenient = text.replace("virt_end=0xffffcfff status=RANGE", "virt_end=0xffffcfff status=OK").replace(
        "virt_start=0xfee00000 virt_end=0xfee00fff phys_start=0x2000000 flags=0x3 status=INVAL",
        "virt_start=0xfee00000 virt_end=0xfee00fff phys_start=0x2000000 flags=0x3",
    );
    assert_ne!(lenient, text);
    let lines: Vec<usize> = lenient
        .lines()
        .enumerate()
        .filter(|(_, l)| {
            l.contains("0xffffcfff status=OK") || (l.contains("0xfee00000 virt_end") && !l.contains("status"))
        })
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(lines.len(), 2);
    let file = tmp("lenient.trace");
    std::fs::write(&file, lenient).unwrap();
    let (code, out, err) = replay(&file, &[]);
    let _ = std::fs::remove_file(&file);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("statuses that differ from the trace: 2"), "{out}");
    assert!(out.contains(&format!("line {}: MAP domain=1 virt_start=0xfee00000", lines[0])), "{out}");
    assert!(out.contains("traced OK, got INVAL"), "{out}");
    assert!(out.contains(&format!("line {}: UNMAP domain=1 virt_start=0xffffc000", lines[1])), "{out}");
    assert!(out.contains("traced OK, got RANGE"), "{out}");
}

#[test]
fn bad_traces_and_too_few_devices_get_one_line_naming_the_fix() {
    let file = tmp("bad.trace");
    std::fs::write(&file, "KICK\nMAP domain=1 virt_start=0x1000 virt_end=zz phys_start=0 flags=0x3\n").unwrap();
    let (code, out, err) = replay(&file, &[]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("line 2") && err.contains("'zz' is not a number"), "{err}");
    std::fs::write(&file, "FROB domain=1\n").unwrap();
    let (_, _, err) = replay(&file, &[]);
    assert!(err.contains("line 1") && err.contains("FROB"), "{err}");
    // The Linux-shaped trace names two endpoints.
    let (code, _, err) = replay(Path::new(LINUX_LIKE), &["--device", "dma-engine,dma=virtio-iommu,process=inline"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("give one --device per endpoint, or none"), "{err}");
    let (code, _, err) =
        replay(Path::new(LINUX_LIKE), &["--device", "dma-engine,process=inline", "--device", "dma-engine"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("add dma=virtio-iommu"), "{err}");
    let _ = std::fs::remove_file(&file);
}

#[test]
fn a_trace_recorded_from_the_viommu_guest_replays_with_the_statuses_it_got() {
    vmm::require_kvm!();
    let trace = tmp("guest.trace");
    let out = common::output_within(
        common::bin()
            .args(["run", "--guest", "viommu", "--memory", "64M", "--locked-memory", "64M"])
            .args(["--device", "dma-engine,dma=virtio-iommu,process=inline", "--record"])
            .arg(&trace),
        Duration::from_secs(120),
    );
    assert_eq!(out.status.code(), Some(0), "{}", common::text(&out.stderr));
    let text = std::fs::read_to_string(&trace).unwrap();
    for kind in ["PROBE endpoint=0x8", "ATTACH domain=1 endpoint=0x8", "MAP domain=1", "UNMAP domain=1", "KICK"] {
        assert!(text.contains(kind), "{kind} in {text}");
    }
    let json = tmp("guest.json");
    let (code, out, err) = replay(&trace, &["--json", json.to_str().unwrap()]);
    let _ = std::fs::remove_file(&trace);
    assert_eq!(code, Some(0), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    // Every recorded request was replayed, kick by kick.
    for kind in ["ATTACH", "DETACH", "MAP", "UNMAP", "PROBE"] {
        let traced = text.lines().filter(|l| l.starts_with(&format!("{kind} "))).count();
        assert_eq!(v["requests"][kind]["count"], traced as u64, "{kind}: {out}");
    }
    assert_eq!(v["kicks"], text.lines().filter(|l| l.starts_with("KICK")).count() as u64);
    assert!(out.contains("statuses that differ from the trace: 0"), "{out}");
}
