//! TCE tables end to end: the `tce` guest in every device mode, `tce_info` and the
//! stats through qtest, peer-to-peer through a TCE window (a guest maps another device's
//! BAR), and `bench tce`.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
use common::*;

use abi::tce as t;

const MEM: [&str; 4] = ["--memory", "64M", "--locked-memory", "128M"];

#[test]
fn the_tce_guest_passes_in_every_mode() {
    vmm::require_kvm!();
    for d in ["dma-engine,dma=tce,process=inline", "dma-engine,dma=tce", "dma-engine,dma=tce,iommu-mode=messages"] {
        let out =
            bin().args(["run", "--guest", "tce", "--device", d, "--device", d, "--stats"]).args(MEM).output().unwrap();
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(0), "{d}: {stdout}{stderr}");
        assert!(stdout.contains("cleared entries fault") && stdout.contains("through the shared table"), "{stdout}");
        assert!(stderr.contains("DMA front-end tce: put_tce=0 get_tce=1 put_tce_indirect=4 stuff_tce=1"), "{stderr}");
    }
}

#[test]
fn qtest_shows_windows_and_peer_to_peer_goes_through_a_tce_window() {
    use abi::dma_engine::{Descriptor, completion, op};
    // Engine A on TCE (a group of its own); engine B on identity, its scratch BAR at
    // 0xc0400000. The guest (this script) maps B's BAR into A's default window and A
    // fills it through the window.
    let mut q =
        Q::start(&[&MEM[..], &["--device", "dma-engine,dma=tce", "--device", "dma-engine,process=inline"]].concat());
    qpci::enable(&mut |c| q.cmd(c), 1);
    let dev = abi::pci::bdf(0, 1, 0);
    let (code, group, liobn) = papr(&q.cmd(&format!("hcall {:#x} {dev}", t::DEVICE_GROUP)));
    assert_eq!(code, t::H_SUCCESS);
    let put = |q: &mut Q, ioba: u64, tce: u64| {
        papr(&q.cmd(&format!("hcall {:#x} {liobn:#x} {ioba:#x} {tce:#x}", t::PUT_TCE))).0
    };
    assert_eq!(put(&mut q, 0x0, 0x20_0000 | t::READ), t::H_SUCCESS); // ring
    assert_eq!(put(&mut q, 0x1000, 0x21_0000 | t::WRITE), t::H_SUCCESS); // completion
    assert_eq!(put(&mut q, 0x2000, 0xc040_0000 | t::WRITE), t::H_SUCCESS, "B's BAR is guest memory too");
    assert_eq!(put(&mut q, 0x3000, 0x4000_0000 | t::READ), t::H_PARAMETER, "outside guest memory");
    let info = q.cmd(&format!("tce_info {liobn:#x}"));
    assert!(
        info.contains(&format!("group={group}")) && info.contains("levels=2") && info.contains("valid=3"),
        "{info}"
    );
    assert!(info.contains("bytes=8192"), "the root and one leaf page: {info}");
    let stats = q.cmd("frontend_stats tce dma0");
    assert!(stats.contains(&format!("liobns={liobn:#x}")) && stats.contains("mappings=3"), "{stats}");
    let d = Descriptor {
        op: op::FILL,
        dst: 0x2000,
        len: 0x1000,
        pattern: 0x2b2b_2b2b_2b2b_2b2b,
        completion: 0x1000,
        ..Default::default()
    };
    assert_eq!(q.run_descriptor(0xc000_0000, 0x20_0000, 0x0, 0x21_0000, d), completion::SUCCESS);
    assert_eq!(q.cmd("readq 0xc0400ff8"), "OK 0x2b2b2b2b2b2b2b2b", "A wrote B's memory through the TCE window");
    // The entry cleared: the same DMA faults.
    assert_eq!(put(&mut q, 0x2000, 0), t::H_SUCCESS);
    assert_eq!(q.run_descriptor(0xc000_0000, 0x20_0000, 0x0, 0x21_0000, d), completion::DMA_FAULT);
    q.end();
}

#[test]
fn bench_tce_reports_every_figure() {
    let svg = std::env::temp_dir().join(format!("passthru-tce-{}.svg", std::process::id()));
    let (table, v) = bench_json(&["tce", "--rounds", "20", "--plot", svg.to_str().unwrap()]);
    // The chart holds both batched calls; the series it draws are the ones measured.
    let chart = std::fs::read_to_string(&svg).unwrap();
    let _ = std::fs::remove_file(&svg);
    assert!(chart.starts_with("<svg") && chart.contains("H_PUT_TCE_INDIRECT") && chart.contains("H_STUFF_TCE"));
    let batches = v["batches"].as_array().unwrap();
    assert_eq!(batches.iter().map(|b| b["entries"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 8, 64, 512]);
    let per = |i: usize| batches[i]["indirect_ns_per_entry"].as_f64().unwrap();
    assert!(per(0) > per(3), "one entry per call costs more per entry than 512: {table}");
    for key in [
        "indirect_ns_per_entry",
        "stuff_ns_per_entry",
        "table_bytes_one_group",
        "table_bytes_three_groups",
        "flat_bytes_three_groups",
    ] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key}: {table}");
    }
    assert!(table.contains("H_PUT_TCE_INDIRECT"), "{table}");
}
