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
/// The bzImage's boot takes about a minute here (its decompressor most of it).
const DEADLINE: Duration = Duration::from_secs(420);

/// What a boot printed and how it ended.
struct Boot {
    lines: Vec<String>,
    first_line: Option<Duration>,
    took: Duration,
    stderr: String,
    code: Option<i32>,
}

/// Boots `kernel` with one DMA engine behind the virtio-iommu (so the VIOT exists).
fn boot(kernel: &std::path::Path) -> Boot {
    let start = Instant::now();
    let mut child = common::bin()
        .args(["run", "--kernel"])
        .arg(kernel)
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
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let b = Boot { lines, first_line, took: start.elapsed(), stderr, code: status.code() };
    eprintln!(
        "{}: first console line after {:?}, stopped after {:?}, {} lines; {}",
        kernel.display(),
        b.first_line,
        b.took,
        b.lines.len(),
        b.stderr.trim()
    );
    b
}

/// The e820 entries the kernel printed, as `[mem 0x...-0x...] usable|reserved`.
fn printed_e820(b: &Boot) -> Vec<String> {
    b.lines.iter().filter_map(|l| l.split("BIOS-e820: ").nth(1)).map(str::to_string).collect()
}

/// passthru's e820 map for the test's RAM, printed as Linux prints it.
fn built_e820() -> Vec<String> {
    vmm::linux::e820(&[(0, MEMORY)])
        .iter()
        .map(|e| {
            let kind = if e.kind == vmm::linux::E820_RAM { "usable" } else { "reserved" };
            format!("[mem {:#018x}-{:#018x}] {kind}", e.addr, e.addr + e.size - 1)
        })
        .collect()
}

/// Version, ACPI tables where passthru put them, and the stop at an instruction this
/// KVM does not emulate.
fn check_common(b: &Boot) {
    let all = b.lines.join("\n");
    assert!(all.contains("Linux version 6."), "{all}\n{}", b.stderr);
    assert!(all.contains("Command line: console=ttyS0"), "{all}");
    let tables = vmm::acpi::build(&vmm::acpi::Machine { viommu: Some((0xf8, vec![0x08])) });
    assert!(all.contains(&format!("ACPI: RSDP 0x{:016X} 000024", vmm::acpi::RSDP_ADDR)), "{all}");
    for (sig, at, data) in &tables.tables {
        let name = String::from_utf8_lossy(sig);
        let want = format!("ACPI: {name} 0x{at:016X} {:06X}", data.len());
        assert!(all.contains(&want), "{want} in {all}");
    }
    assert_eq!(b.code, Some(1), "{}", b.stderr);
    assert!(
        b.stderr.contains("KVM internal error") && b.stderr.contains("instruction bytes at guest-physical"),
        "{}",
        b.stderr
    );
}

#[test]
fn a_stock_bzimage_prints_its_version_our_e820_map_and_acpi_tables_then_stops_where_kvm_here_cannot_go() {
    vmm::require_kvm!();
    let Some(kernel) = kernel() else {
        eprintln!("skipped: no test kernel (.ci/run fetches Debian's linux-image-cloud-amd64 into target/test-kernel)");
        return;
    };
    let b = boot(&kernel);
    check_common(&b);
    // The e820 map, entry for entry, as passthru built it.
    assert_eq!(printed_e820(&b), built_e820(), "{}", b.lines.join("\n"));
}

#[test]
fn its_vmlinux_boots_by_the_pvh_entry_with_the_same_map_and_tables() {
    vmm::require_kvm!();
    let Some(kernel) = kernel().map(|k| k.with_file_name("vmlinux")).filter(|k| k.exists()) else {
        eprintln!("skipped: no test vmlinux (.ci/run unpacks it next to the test kernel)");
        return;
    };
    let b = boot(&kernel);
    check_common(&b);
    // Under PVH Linux reserves the legacy 640 KiB-1 MiB area itself: the RAM and the
    // ECAM window are passthru's, entry for entry.
    let printed = printed_e820(&b);
    for want in built_e820() {
        if want.contains("usable") || want.contains("0x00000000e0000000") {
            assert!(printed.contains(&want), "{want} in {printed:?}");
        }
    }
    assert_eq!(printed.iter().filter(|l| l.ends_with("usable")).count(), 2, "{printed:?}");
}

#[test]
fn bench_linux_times_the_first_console_line_and_the_stop() {
    vmm::require_kvm!();
    let Some(vmlinux) = kernel().map(|k| k.with_file_name("vmlinux")).filter(|k| k.exists()) else {
        eprintln!("skipped: no test vmlinux (.ci/run unpacks it next to the test kernel)");
        return;
    };
    let (table, v) = common::bench_json(&["linux", "--kernel", vmlinux.to_str().unwrap()]);
    let k = &v["kernels"][0];
    assert_eq!(k["kind"], "PVH vmlinux", "{table}");
    let (first, stop) = (k["first_line_s"].as_f64().unwrap(), k["stopped_s"].as_f64().unwrap());
    assert!(first > 0.0 && first < stop, "{table}");
    assert!(k["lines"].as_u64().unwrap() > 20, "{table}");
    let size = vmm::acpi::build(&vmm::acpi::Machine { viommu: Some((0xf8, vec![0x08])) }).size() as u64;
    assert_eq!(v["acpi_bytes"].as_u64(), Some(size));
    assert!(table.contains("PVH vmlinux: run to first console line"), "{table}");
}
