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
        "indirect_scattered_ns_per_entry",
        "stuff_scattered_ns_per_entry",
        "table_bytes_one_group",
        "table_bytes_three_groups",
        "flat_bytes_three_groups",
    ] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key}: {table}");
    }
    assert!(table.contains("H_PUT_TCE_INDIRECT"), "{table}");
}

/// A tool reads a table through mmap: `passthru ctl SOCK frontend tce table LIOBN` (the
/// front-end's own query and tool, named by nothing in the CLI) gets the
/// table's file from the VMM (SCM_RIGHTS on the API connection), maps it read-only and
/// walks it by the documented layout. What it lists equals H_GET_TCE for a 2-level
/// default window and a 3-level 64-bit window, after puts and clears.
#[test]
fn a_tool_reads_a_table_through_its_file_as_h_get_tce_does() {
    let sock = std::env::temp_dir().join(format!("passthru-tce-table-{}.sock", std::process::id()));
    let mut q =
        Q::start(&[&MEM[..], &["--device", "dma-engine,dma=tce", "--api-socket", sock.to_str().unwrap()]].concat());
    let dev = abi::pci::bdf(0, 1, 0);
    let (code, group, liobn) = papr(&q.cmd(&format!("hcall {:#x} {dev}", t::DEVICE_GROUP)));
    assert_eq!(code, t::H_SUCCESS);
    let (code, l64, bus64) = papr(&q.cmd(&format!("hcall {:#x} {group} 12 36", t::CREATE_WINDOW)));
    assert_eq!(code, t::H_SUCCESS);
    let mut q_put = |liobn: u64, ioba: u64, tce: u64| {
        assert_eq!(papr(&q.cmd(&format!("hcall {:#x} {liobn:#x} {ioba:#x} {tce:#x}", t::PUT_TCE))).0, t::H_SUCCESS);
    };
    // Scattered entries over several leaf pages, one cleared again.
    let mut want: Vec<(u64, u64, u64)> = Vec::new(); // (liobn, index, tce)
    for (k, (l, bus)) in [(liobn, 0u64), (l64, bus64)].into_iter().enumerate() {
        for j in 0..20u64 {
            let index = j * 700 + k as u64 * 3;
            let tce = (0x20_0000 + j * 0x1000) | if j % 2 == 0 { t::READ } else { t::READ | t::WRITE };
            q_put(l, bus + (index << 12), tce);
            want.push((l, index, tce));
        }
        q_put(l, bus + ((5 * 700 + k as u64 * 3) << 12), 0);
        want.retain(|&(wl, wi, _)| !(wl == l && wi == 5 * 700 + k as u64 * 3));
    }
    let t0 = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(t0.elapsed() < std::time::Duration::from_secs(20), "the API socket never came up");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    for (l, bus, levels) in [(liobn, 0u64, 2u64), (l64, bus64, 3)] {
        let out = passthru(&["ctl", sock.to_str().unwrap(), "--json", "frontend", "tce", "table", &format!("{l:#x}")]);
        assert_eq!(out.status.code(), Some(0), "{}{}", text(&out.stdout), text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!((v["levels"].as_u64(), v["group"].as_u64()), (Some(levels), Some(group)), "{v}");
        let listed: Vec<(u64, u64)> = v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let hex = |x: &serde_json::Value| {
                    u64::from_str_radix(x.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
                };
                assert_eq!(hex(&e[1]), bus + (e[0].as_u64().unwrap() << 12), "the IOBA of {e}");
                (e[0].as_u64().unwrap(), hex(&e[2]))
            })
            .collect();
        let expected: Vec<(u64, u64)> = want.iter().filter(|w| w.0 == l).map(|w| (w.1, w.2)).collect();
        assert_eq!(listed, expected, "liobn {l:#x}: the mapped file lists what was put");
        for (index, tce) in &listed {
            let got = papr(&q.cmd(&format!("hcall {:#x} {l:#x} {:#x}", t::GET_TCE, bus + (index << 12))));
            assert_eq!((got.0, got.1), (t::H_SUCCESS, *tce), "H_GET_TCE agrees at index {index}");
        }
        // Human output names the geometry and counts the entries.
        let out = passthru(&["ctl", sock.to_str().unwrap(), "frontend", "tce", "table", &format!("{l:#x}")]);
        assert!(text(&out.stdout).contains(&format!("{} valid entries", expected.len())), "{}", text(&out.stdout));
    }
    // The descriptor a client gets is read-only and the file cannot be resized: the
    // table cannot be written or truncated through it.
    let (a, files) = api::client::call_with_files(
        &sock,
        "PUT",
        "frontend.query",
        Some(&format!("{{\"frontend\": \"tce\", \"query\": \"table\", \"arg\": \"{liobn}\"}}")),
        std::time::Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!((a.status, files.len()), (200, 1), "{a:?}");
    use std::os::unix::fs::FileExt;
    assert!(files[0].write_at(&[0xff; 8], 0).is_err(), "written through the reader's descriptor");
    assert!(files[0].set_len(0).is_err(), "truncated through the reader's descriptor");
    // An unknown liobn is a clear error; a client that takes no file (curl) gets the JSON.
    let out = passthru(&["ctl", sock.to_str().unwrap(), "frontend", "tce", "table", "0x7777"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no TCE window with liobn 0x7777"), "{}", text(&out.stderr));
    let curl = std::process::Command::new("curl")
        .args(["-s", "--unix-socket", sock.to_str().unwrap(), "-X", "PUT", "-d"])
        .arg(format!("{{\"frontend\": \"tce\", \"query\": \"table\", \"arg\": \"{liobn}\"}}"))
        .arg("http://localhost/api/v1/frontend.query")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&curl.stdout).unwrap();
    assert_eq!(v["levels"].as_u64(), Some(2), "{v}");
    q.end();
}
