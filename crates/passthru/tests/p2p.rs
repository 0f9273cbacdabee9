//! Peer-to-peer DMA through the identity front-end (no guest IOMMU): DMA engine A
//! fills and copies device B's mmapped BAR memory at its guest-physical address, in
//! every mode of A (in the VMM, a device process with shared memory, message mode)
//! and with B in the VMM or in its own process; DMA to a BAR part that is not mapped
//! (B's MSI-X page, trapped) faults, counted. Through paravirtual DMA, the guest maps
//! B's BAR into A's domain itself. A BAR moved while A writes to it receives nothing at
//! its old address once the move returns.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
use common::*;

use abi::dma_engine::{self as de, Descriptor, completion, op, regs};
use std::time::{Duration, Instant};

const MEM: [&str; 4] = ["--memory", "64M", "--locked-memory", "128M"];
/// A's registers (slot 1, first BAR of the 32-bit window).
const A_REGS: u64 = 0xc000_0000;
/// B's scratch BAR (slot 2, 2 MiB-aligned): mmapped but for its last two pages (MSI-X).
const B_SCRATCH: u64 = 0xc040_0000;
const RING: u64 = 0x20_0000;
const DONE: u64 = 0x21_0000;

/// A qtest session with `devices` (the common driver, this file's memory sizes).
fn start(devices: &[&str], extra: &[&str]) -> Q {
    let mut args = Vec::new();
    for d in devices {
        args.extend(["--device", d]);
    }
    args.extend(MEM);
    args.extend(extra);
    Q::start(&args)
}

/// Runs one descriptor on A (ring of 1 at RING, record at DONE); returns its status.
fn run(q: &mut Q, d: Descriptor) -> u32 {
    q.run_descriptor(A_REGS, RING, RING, DONE, Descriptor { completion: DONE, ..d })
}

fn fill(dst: u64, len: u64, pattern: u64) -> Descriptor {
    Descriptor { op: op::FILL, dst, len, pattern, ..Default::default() }
}

fn copy(src: u64, dst: u64, len: u64) -> Descriptor {
    Descriptor { op: op::COPY, src, dst, len, ..Default::default() }
}

#[test]
fn engine_a_reaches_engine_b_bar_memory_in_every_mode_and_faults_where_it_is_not_mapped() {
    let modes = ["dma-engine,process=inline", "dma-engine", "dma-engine,iommu-mode=messages"];
    for a in modes {
        for b in ["dma-engine,process=inline", "dma-engine"] {
            let mut q = start(&[a, b], &[]);
            let regions = q.cmd("memory_regions");
            assert!(regions.contains(&format!("{B_SCRATCH:#x}+{:#x}:dma1", de::SCRATCH_USABLE)), "{regions}");
            qpci::enable(&mut |c| q.cmd(c), 1);
            // A fills B's memory; the CPU reads it through B's BAR.
            assert_eq!(
                run(&mut q, fill(B_SCRATCH + 0x1000, 0x2000, 0x5a5a_5a5a_5a5a_5a5a)),
                completion::SUCCESS,
                "{a} -> {b}"
            );
            assert_eq!(q.cmd(&format!("readq {:#x}", B_SCRATCH + 0x2ff8)), "OK 0x5a5a5a5a5a5a5a5a", "{a} -> {b}");
            assert_eq!(q.cmd(&format!("readq {:#x}", B_SCRATCH + 0x3000)), "OK 0x0000000000000000", "exact length");
            // A copies B's memory into RAM.
            q.ok("memset 0x400000 0x2000 0");
            assert_eq!(run(&mut q, copy(B_SCRATCH + 0x1000, 0x40_0000, 0x2000)), completion::SUCCESS);
            assert_eq!(q.cmd("read 0x401ff8 8"), "OK 0x5a5a5a5a5a5a5a5a", "{a} -> {b}: copied back");
            // B's MSI-X page is trapped, not memory: peer-to-peer DMA there faults (in the
            // VMM for an engine in it; in a device process, which was never given it).
            let faults: u64 = q.field("dev_info dma0", "faults").parse().unwrap();
            assert_eq!(
                run(&mut q, fill(B_SCRATCH + de::MSIX_TABLE_OFFSET, 16, 1)),
                completion::DMA_FAULT,
                "{a} -> {b}"
            );
            let after: u64 = q.field("dev_info dma0", "faults").parse().unwrap();
            if a.contains("inline") {
                assert!(after > faults, "{a}: counted by the VMM ({faults} -> {after})");
            } else {
                // Never exported to A's process: refused there, the VMM is not asked.
                assert_eq!(after, faults, "{a}: the device process refused it itself");
            }
            q.end();
        }
    }
}

#[test]
fn through_paravirtual_dma_the_guest_maps_b_bar_into_a_domain() {
    let mut q = start(&["dma-engine,dma=pvdma", "dma-engine,process=inline"], &[]);
    qpci::enable(&mut |c| q.cmd(c), 1);
    let dev = qpci::FIRST_BDF;
    let map = |q: &mut Q, gpa: u64, dir: u64| {
        let r = q.cmd(&format!("hcall 0x101 {dev} {gpa:#x} 4096 {dir}"));
        assert!(r.starts_with("OK 0x0 "), "{r}");
        u64::from_str_radix(r.split_whitespace().nth(2).unwrap().trim_start_matches("0x"), 16).unwrap()
    };
    let ring = map(&mut q, RING, 1);
    let done = map(&mut q, DONE, 2);
    let bar = map(&mut q, B_SCRATCH, 3);
    assert_ne!(bar, B_SCRATCH, "an IOVA the front-end chose");
    let d = Descriptor { op: op::FILL, dst: bar, len: 4096, pattern: 0x77, completion: done, ..Default::default() };
    let hex: String = d.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
    q.ok(&format!("write {RING:#x} 64 0x{hex}"));
    q.ok(&format!("writeq {:#x} {ring:#x}", A_REGS + regs::RING_BASE));
    q.ok(&format!("writel {:#x} 1", A_REGS + regs::RING_SIZE));
    q.ok(&format!("writel {:#x} {}", A_REGS + regs::CONTROL, de::control::ENABLE));
    q.ok(&format!("writel {:#x} 1", A_REGS + regs::TAIL));
    let t = Instant::now();
    while q.cmd(&format!("readl {DONE:#x}")) == "OK 0x0000000000000000" {
        assert!(t.elapsed() < Duration::from_secs(10));
    }
    assert_eq!(q.cmd(&format!("readl {DONE:#x}")), format!("OK 0x{:016x}", completion::SUCCESS));
    assert_eq!(q.cmd(&format!("readq {B_SCRATCH:#x}")), "OK 0x0000000000000077");
    q.end();
}

#[test]
fn a_bar_moved_while_a_writes_to_it_gets_nothing_at_its_old_address_after_the_move() {
    let mut q = start(&["dma-engine,process=inline", "dma-engine,process=inline"], &[]);
    qpci::enable(&mut |c| q.cmd(c), 1);
    // A ring of 64 FILLs of B's first page, completions ignored, kept busy.
    let ring: String = (0..64u64)
        .map(|i| {
            let d = Descriptor {
                op: op::FILL,
                dst: B_SCRATCH,
                len: 4096,
                pattern: 0xee,
                completion: DONE + 32 * (i % 64),
                ..Default::default()
            };
            d.to_bytes().iter().map(|b| format!("{b:02x}")).collect::<String>()
        })
        .collect();
    q.ok(&format!("write {RING:#x} 4096 0x{ring}"));
    q.ok(&format!("writeq {:#x} {RING:#x}", A_REGS + regs::RING_BASE));
    q.ok(&format!("writel {:#x} 64", A_REGS + regs::RING_SIZE));
    q.ok(&format!("writel {:#x} {}", A_REGS + regs::CONTROL, de::control::ENABLE));
    q.ok(&format!("writel {:#x} 100000", A_REGS + regs::TAIL)); // keeps the engine busy
    // Move B's scratch BAR (slot 2, BAR 1: 64-bit at 0x14/0x18) while A fills it.
    let cmd = qpci::cfg(2, abi::pci::reg::COMMAND);
    q.ok(&format!("writew {cmd:#x} 0"));
    q.ok(&format!("writel {:#x} 0xc0800000", qpci::cfg(2, abi::pci::reg::BAR0 + 4)));
    q.ok(&format!("writew {cmd:#x} {:#x}", abi::pci::command::MEMORY));
    // The move has returned: B's memory (now at its new address) must stop changing.
    q.ok("writeq 0xc0800000 0x1111111111111111");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(q.cmd("readq 0xc0800000"), "OK 0x1111111111111111", "A's DMA to the old address landed");
    assert!(q.field("dev_info dma0", "faults").parse::<u64>().unwrap() > 0, "A's later writes faulted");
    q.end();
}

#[test]
fn ram_hot_added_and_removed_with_devices_attached_is_mapped_and_unmapped_for_them() {
    let mut q = start(&["dma-engine", "dma-engine,process=inline"], &[]);
    qpci::enable(&mut |c| q.cmd(c), 1);
    let regions: u64 = q.field("frontend_stats identity", "regions").parse().unwrap();
    q.ok("ram_add 0x100000000 0x200000");
    assert_eq!(q.field("frontend_stats identity", "regions").parse::<u64>().unwrap(), regions + 1);
    assert!(q.cmd("memory_regions").contains("0x100000000+0x200000:ram"));
    // The device process writes into the new RAM; the CPU reads it.
    assert_eq!(run(&mut q, fill(0x1_0000_1000, 0x1000, 0x3c3c_3c3c_3c3c_3c3c)), completion::SUCCESS);
    assert_eq!(q.cmd("readq 0x100001ff8"), "OK 0x3c3c3c3c3c3c3c3c");
    q.ok("ram_remove 0x100000000");
    assert_eq!(q.field("frontend_stats identity", "regions").parse::<u64>().unwrap(), regions);
    assert_eq!(run(&mut q, fill(0x1_0000_1000, 0x1000, 1)), completion::DMA_FAULT, "gone RAM faults");
    assert!(q.cmd("ram_remove 0x0").contains("no hot-added RAM starts at 0x0"), "the boot RAM stays");
    q.end();
}

#[test]
fn the_p2p_guest_passes_in_every_mode() {
    vmm::require_kvm!();
    for (a, b) in [
        ("dma-engine,process=inline", "dma-engine,process=inline"),
        ("dma-engine", "dma-engine"),
        ("dma-engine,iommu-mode=messages", "dma-engine"),
    ] {
        let out = bin().args(["run", "--guest", "p2p", "--device", a, "--device", b]).args(MEM).output().unwrap();
        let stdout = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{a} / {b}: {stdout}{}", text(&out.stderr));
        assert!(stdout.contains("= A's copy's") && stdout.contains("the old address faults"), "{stdout}");
        assert!(stdout.contains("faulted cleanly"), "{stdout}");
    }
}

#[test]
fn bench_devices_reports_peer_to_peer_copies() {
    let (table, v) = bench_json(&["devices", "--bytes", "256K", "--reads", "50"]);
    let p2p = v["p2p"].as_array().unwrap();
    assert_eq!(p2p.len(), 2, "64 KiB and 1 MiB: {table}");
    for f in p2p {
        assert!(f["ratio_to_ram"].as_f64().unwrap() > 0.0, "{f}");
    }
    assert!(v["hot_add_1g_ms"].as_f64().unwrap() > 0.0);
    assert!(table.contains("peer-to-peer / RAM at 1 MiB"), "{table}");
}
