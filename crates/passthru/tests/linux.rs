//! A stock Linux kernel (Debian's linux-image-cloud-amd64, which .ci/run fetches into
//! target/test-kernel/) booted with `passthru run --kernel` under this machine's KVM:
//! it prints its version, the e820 map exactly as passthru built it and the ACPI
//! tables it found, then stops where this software KVM cannot emulate an instruction
//! (docs: README "Running Linux"). Nothing later is asserted: it cannot run here.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The kernel: PASSTHRU_TEST_KERNEL, or what .ci/run put in target/test-kernel/.
fn kernel() -> Option<PathBuf> {
    let p = std::env::var_os("PASSTHRU_TEST_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-kernel/vmlinuz"));
    p.exists().then_some(p)
}

const MEMORY: u64 = 512 << 20;
/// The boot takes about two minutes here (the decompressor alone about 100 s).
const DEADLINE: Duration = Duration::from_secs(420);

#[test]
fn a_stock_kernel_prints_its_version_our_e820_map_and_acpi_tables_then_stops_where_kvm_here_cannot_go() {
    vmm::require_kvm!();
    let Some(kernel) = kernel() else {
        eprintln!("skipped: no test kernel (.ci/run fetches Debian's linux-image-cloud-amd64 into target/test-kernel)");
        return;
    };
    let start = Instant::now();
    let mut child = common::bin()
        .args(["run", "--kernel"])
        .arg(&kernel)
        .args(["--memory", "512M", "--locked-memory", "1G", "--device", "dma-engine,dma=virtio-iommu,process=inline"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let mut lines: Vec<String> = Vec::new();
    let mut first_line = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok((at, line)) => {
                first_line.get_or_insert(at.duration_since(start));
                lines.push(line);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            break;
        }
    }
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    let all = lines.join("\n");
    eprintln!(
        "kernel: first console line after {:?}, stopped after {:?}, {} lines; {}",
        first_line,
        start.elapsed(),
        lines.len(),
        err.trim()
    );
    assert!(all.contains("Linux version 6."), "{all}\n{err}");
    assert!(all.contains("Command line: console=ttyS0"), "{all}");
    // The e820 map, entry for entry, as passthru built it.
    let printed: Vec<&str> = lines.iter().filter_map(|l| l.split("BIOS-e820: ").nth(1)).collect();
    let built: Vec<String> = vmm::linux::e820(&[(0, MEMORY)])
        .iter()
        .map(|e| {
            let kind = if e.kind == vmm::linux::E820_RAM { "usable" } else { "reserved" };
            format!("[mem {:#018x}-{:#018x}] {kind}", e.addr, e.addr + e.size - 1)
        })
        .collect();
    assert_eq!(printed, built, "{all}");
    // The ACPI tables it found, where passthru put them (the VIOT names the engine).
    let tables = vmm::acpi::build(&vmm::acpi::Machine { viommu: Some((0xf8, vec![0x08])) });
    assert!(all.contains(&format!("ACPI: RSDP {:#018X}", vmm::acpi::RSDP_ADDR).replace("0X", "0x")), "{all}");
    for (sig, at, data) in &tables.tables {
        let name = String::from_utf8_lossy(sig);
        let want = format!("ACPI: {name} 0x{at:016X} {:06X}", data.len());
        assert!(all.contains(&want), "{want} in {all}");
    }
    // Then this machine's KVM stops it: passthru names the instruction and exits 1.
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("KVM internal error") && err.contains("instruction bytes at guest-physical"), "{err}");
}
