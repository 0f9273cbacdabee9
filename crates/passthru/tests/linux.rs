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
    let tables = vmm::acpi::build(&vmm::acpi::Machine {
        viommu: Some((abi::pci::bdf(0, abi::viommu::SLOT, 0), vec![abi::pci::bdf(0, 1, 0)])),
    });
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
    let size = vmm::acpi::build(&vmm::acpi::Machine {
        viommu: Some((abi::pci::bdf(0, abi::viommu::SLOT, 0), vec![abi::pci::bdf(0, 1, 0)])),
    })
    .size() as u64;
    assert_eq!(v["acpi_bytes"].as_u64(), Some(size));
    assert!(table.contains("PVH vmlinux: run to first console line"), "{table}");
}

/// A VM without a vCPU: loading a kernel needs none.
fn qtest_vm() -> vmm::Vm {
    let mut config = vmm::VmConfig::new(vmm::AccelKind::Qtest);
    config.memory = MEMORY;
    config.serial_out = Box::new(std::io::sink());
    vmm::Vm::new(config).unwrap()
}

fn u32_at(vm: &vmm::Vm, gpa: u64) -> u32 {
    let mut b = [0u8; 4];
    assert!(vm.phys_read(gpa, &mut b));
    u32::from_le_bytes(b)
}

fn u64_at(vm: &vmm::Vm, gpa: u64) -> u64 {
    let mut b = [0u8; 8];
    assert!(vm.phys_read(gpa, &mut b));
    u64::from_le_bytes(b)
}

/// The bytes of `len` at `gpa`.
fn bytes_at(vm: &vmm::Vm, gpa: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    assert!(vm.phys_read(gpa, &mut b));
    b
}

#[test]
fn the_boot_parameters_place_the_command_line_initramfs_map_and_rsdp_as_the_boot_protocols_say() {
    let Some(bz) = kernel() else {
        eprintln!("skipped: no test kernel (.ci/run fetches Debian's linux-image-cloud-amd64 into target/test-kernel)");
        return;
    };
    let initrd: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
    let k = vmm::linux::Kernel {
        image: std::fs::read(&bz).unwrap(),
        initramfs: Some(initrd.clone()),
        cmdline: "console=ttyS0 root=/dev/ram0 quiet".into(),
    };
    // bzImage: the zero page (boot_params) at 0x7000, per Documentation/arch/x86/boot.rst.
    let vm = qtest_vm();
    let entry = vm.load_kernel(&k).unwrap();
    assert!(matches!(entry, vmm::linux::KernelEntry::Linux64 { rip: 0x10_0200, zero_page: 0x7000 }), "{entry:?}");
    let zp = vmm::linux::ZERO_PAGE;
    assert_eq!(u32_at(&vm, zp + 0x202), 0x5372_6448, "HdrS");
    assert_eq!(bytes_at(&vm, zp + 0x210, 1)[0], 0xff, "type_of_loader: undefined");
    let (image, size) = (u32_at(&vm, zp + 0x218), u32_at(&vm, zp + 0x21c));
    assert_eq!(size as usize, initrd.len());
    assert_eq!(image % 4096, 0, "page-aligned");
    assert!(u64::from(image) + u64::from(size) <= u64::from(u32_at(&vm, zp + 0x22c)) + 1, "under initrd_addr_max");
    assert_eq!(bytes_at(&vm, u64::from(image), initrd.len()), initrd);
    let line = u32_at(&vm, zp + 0x228);
    assert_eq!(bytes_at(&vm, u64::from(line), k.cmdline.len() + 1), [k.cmdline.as_bytes(), &[0]].concat());
    assert_eq!(u64_at(&vm, zp + 0x70), vmm::acpi::RSDP_ADDR, "acpi_rsdp_addr");
    let n = bytes_at(&vm, zp + 0x1e8, 1)[0] as usize;
    let map: Vec<(u64, u64, u32)> = (0..n)
        .map(|i| {
            let at = zp + 0x2d0 + 20 * i as u64;
            (u64_at(&vm, at), u64_at(&vm, at + 8), u32_at(&vm, at + 16))
        })
        .collect();
    let want: Vec<(u64, u64, u32)> = vm.e820().iter().map(|e| (e.addr, e.size, e.kind)).collect();
    assert_eq!(map, want);
    assert_eq!(&bytes_at(&vm, vmm::acpi::RSDP_ADDR, 8), b"RSD PTR ");
    // PVH: hvm_start_info at 0x7000 (Xen's arch-x86/hvm/start_info.h), the initramfs as
    // its one module, the same map.
    let Some(elf) = kernel().map(|p| p.with_file_name("vmlinux")).filter(|p| p.exists()) else {
        eprintln!("skipped the PVH half: no test vmlinux");
        return;
    };
    let vm = qtest_vm();
    let entry = vm.load_kernel(&vmm::linux::Kernel { image: std::fs::read(&elf).unwrap(), ..k.clone() }).unwrap();
    assert!(matches!(entry, vmm::linux::KernelEntry::Pvh { start_info: 0x7000, .. }), "{entry:?}");
    let si = 0x7000;
    assert_eq!(u32_at(&vm, si), 0x336e_c578, "magic");
    assert_eq!(u32_at(&vm, si + 4), 1, "version");
    assert_eq!(u32_at(&vm, si + 12), 1, "nr_modules");
    let modlist = u64_at(&vm, si + 16);
    let (paddr, size) = (u64_at(&vm, modlist), u64_at(&vm, modlist + 8));
    assert_eq!(size as usize, initrd.len());
    assert_eq!(bytes_at(&vm, paddr, initrd.len()), initrd);
    assert_eq!(bytes_at(&vm, u64_at(&vm, si + 24), k.cmdline.len()), k.cmdline.as_bytes());
    assert_eq!(u64_at(&vm, si + 32), vmm::acpi::RSDP_ADDR);
    let (memmap, entries) = (u64_at(&vm, si + 40), u32_at(&vm, si + 48) as usize);
    let pvh_map: Vec<(u64, u64, u32)> = (0..entries)
        .map(|i| {
            let at = memmap + 24 * i as u64;
            (u64_at(&vm, at), u64_at(&vm, at + 8), u32_at(&vm, at + 16))
        })
        .collect();
    assert_eq!(pvh_map, want);
}
