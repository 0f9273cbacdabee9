//! Non-coherent DMA: declared (`coherent=false`) or caused by the guest's No Snoop on a
//! domain without snoop enforcement; counted across attach and unplug with its
//! 0 -> 1 -> 0 transitions; the device's memory slots flagged (system RAM
//! cannot be); the VMM's own reads flush exactly the flagged bytes first, or are
//! refused by policy.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
use common::*;

use abi::pci::cap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout};

const MEM: [&str; 4] = ["--memory", "64M", "--locked-memory", "128M"];

struct Q {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<ChildStdout>,
}

impl Q {
    fn start(args: &[&str]) -> Q {
        let mut child = spawn_piped(&[&["run", "--accel", "qtest"][..], &MEM, args].concat());
        let mut err = child.stderr.take().unwrap();
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        let stdin = child.stdin.take().unwrap();
        Q { out: BufReader::new(child.stdout.take().unwrap()), child, stdin }
    }

    fn cmd(&mut self, c: &str) -> String {
        writeln!(self.stdin, "{c}").unwrap();
        let mut l = String::new();
        self.out.read_line(&mut l).unwrap();
        l.trim_end().to_string()
    }

    fn nc(&mut self, key: &str) -> String {
        let a = self.cmd("noncoherent");
        a.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}="))).unwrap_or_else(|| panic!("{a}")).into()
    }

    /// Sets or clears No Snoop in the PCIe Device Control of the function in `slot`.
    fn no_snoop(&mut self, slot: u8, on: bool) {
        let exp = qpci::capability(&mut |c| self.cmd(c), slot, cap::EXP).unwrap();
        let at = qpci::cfg(slot, exp + cap::EXP_DEVCTL);
        let v = qpci::value(&self.cmd(&format!("readw {at:#x}")));
        let v = if on { v | u64::from(cap::EXP_DEVCTL_NOSNOOP) } else { v & !u64::from(cap::EXP_DEVCTL_NOSNOOP) };
        assert_eq!(self.cmd(&format!("writew {at:#x} {v:#x}")), "OK");
    }

    fn end(mut self) {
        drop(self.stdin);
        assert_eq!(self.child.wait().unwrap().code(), Some(0));
    }
}

#[test]
fn the_count_follows_declarations_no_snoop_and_unplug() {
    let mut q = Q::start(&["--device", "dma-engine,coherent=false", "--device", "dma-engine,enforce-snoop=off"]);
    assert_eq!((q.nc("count"), q.nc("devices"), q.nc("transitions")), ("1".into(), "dma0".into(), "1".into()));
    let regions = q.cmd("memory_regions");
    assert!(
        regions.contains("0xc0200000+0x1fe000:dma0[noncoherent]"),
        "the declared device's BAR is flagged: {regions}"
    );
    assert!(
        regions.contains("0xc0400000+0x1fe000:dma1 ") || regions.ends_with("0xc0400000+0x1fe000:dma1"),
        "{regions}"
    );
    // The second device becomes non-coherent when the guest enables No Snoop; clearing
    // it again does not uncount it (as KVM's registration, until the device leaves).
    q.no_snoop(2, true);
    assert_eq!((q.nc("count"), q.nc("transitions")), ("2".into(), "1".into()), "no new transition: already > 0");
    assert!(q.cmd("memory_regions").contains("dma1[noncoherent]"));
    q.no_snoop(2, false);
    assert_eq!(q.nc("count"), "2");
    // Unplugs: the count follows; the last one is the 1 -> 0 event. (Deaths, hot-plug
    // and failed attaches: vmm/tests/assigned.rs.)
    assert_eq!(q.cmd("device_del dma0"), "OK");
    assert_eq!((q.nc("count"), q.nc("devices")), ("1".into(), "dma1".into()));
    assert_eq!(q.cmd("device_del dma1"), "OK");
    assert_eq!((q.nc("count"), q.nc("transitions")), ("0".into(), "2".into()));
    q.end();
}

#[test]
fn no_snoop_on_a_domain_that_enforces_snooping_changes_nothing() {
    let mut q = Q::start(&["--device", "dma-engine"]);
    q.no_snoop(1, true);
    assert_eq!((q.nc("count"), q.nc("transitions")), ("0".into(), "0".into()));
    assert!(!q.cmd("memory_regions").contains("noncoherent"));
    q.end();
}

#[test]
fn system_ram_cannot_be_flagged_and_host_reads_flush_exactly_the_flagged_bytes() {
    let mut q = Q::start(&["--device", "dma-engine,coherent=false,process=inline"]);
    let e = q.cmd("mem_flag 0x0 noncoherent");
    assert!(e.starts_with("FAIL") && e.contains("system RAM, which cannot be flagged non-coherent"), "{e}");
    let flushed = |q: &mut Q| q.nc("flushed").parse::<u64>().unwrap();
    let f0 = flushed(&mut q);
    assert!(q.cmd("dump 0x100000 0x2000").starts_with("OK 0x"));
    assert_eq!(flushed(&mut q), f0, "unflagged RAM is never flushed");
    assert_eq!(q.cmd("writel 0xc0200100 0x12345678"), "OK");
    let d = q.cmd("dump 0xc0200100 0x300");
    assert!(d.starts_with("OK 0x78563412"), "the dump reads the device's memory: {d}");
    assert_eq!(flushed(&mut q), f0 + 0x300, "exactly the flagged bytes read");
    // The memory-type report: the flagged slot honours the guest's WC there.
    let t = q.cmd("memtype");
    assert!(t.contains("0xc0200000:noncoherent:slot-wb=WB,slot-wc=WC"), "{t}");
    assert!(t.contains("0x0:coherent:slot-wb=WB,slot-wc=WB,vmwide-wb=WB,vmwide-wc=WC"), "{t}");
    q.end();
}

#[test]
fn the_refuse_policy_refuses_host_reads_while_a_non_coherent_device_is_attached() {
    let mut q =
        Q::start(&["--noncoherent-migration", "refuse", "--device", "dma-engine,coherent=false,process=inline"]);
    let e = q.cmd("dump 0x100000 0x1000");
    assert!(e.starts_with("FAIL") && e.contains("--noncoherent-migration flush"), "{e}");
    assert_eq!(q.cmd("device_del dma0"), "OK");
    assert!(q.cmd("dump 0x100000 0x1000").starts_with("OK 0x"), "allowed once it left");
    q.end();
}

#[test]
fn the_noncoherent_guest_sees_itself_counted_and_its_slot_flagged() {
    vmm::require_kvm!();
    let out = bin()
        .args(["run", "--guest", "noncoherent", "--device", "dma-engine,enforce-snoop=off", "--stats"])
        .args(MEM)
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("after: count 1 flagged 1 WC->1"), "{stdout}");
    assert!(stderr.contains("slot 0xc0200000+0x1fe000 non-coherent: guest PAT WB -> WB, WC -> WC"), "{stderr}");
    assert!(
        stderr.contains("no non-coherent DMA in the VM any more (device dma0 left)"),
        "unplugged at the end: {stderr}"
    );
}

#[test]
fn bench_noncoherent_reports_the_flush_cost() {
    let (table, v) = bench_json(&["noncoherent", "--mib", "4"]);
    let figs = v["flush"].as_array().unwrap();
    assert!(!figs.is_empty(), "{table}");
    for f in figs {
        assert!(f["ns_per_mib"].as_f64().unwrap() > 0.0 && f["ratio_to_memcpy"].as_f64().unwrap() > 0.0, "{f}");
    }
}
