//! The ACPI tables passthru builds for Linux: written out by `passthru acpi-dump`,
//! disassembled by ACPICA's `iasl -d` without an error or a warning, and saying what
//! the machine is (the host bridge, its windows and INTx routing, the APICs, ECAM, the
//! endpoints behind the virtio-iommu); the VIOT follows hot-plug as `pci_list` does.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use proptest::prelude::*;
use std::process::Command;
use std::time::Duration;
use vmm::{AccelKind, Vm, VmConfig};

/// `iasl` (Debian's acpica-tools, which .ci/run installs), if present.
fn iasl() -> Option<Command> {
    Command::new("iasl").arg("-v").output().ok().map(|_| Command::new("iasl"))
}

/// The nodes of a VIOT: (type, the BDF it names or its range) as (type, first, last).
fn viot_nodes(t: &[u8]) -> Vec<(u8, u16, u16)> {
    let count = u16::from_le_bytes([t[36], t[37]]);
    let mut at = usize::from(u16::from_le_bytes([t[38], t[39]]));
    let mut out = Vec::new();
    for _ in 0..count {
        let kind = t[at];
        let len = usize::from(u16::from_le_bytes([t[at + 2], t[at + 3]]));
        let w = |o: usize| u16::from_le_bytes([t[at + o], t[at + o + 1]]);
        match kind {
            1 => out.push((1, w(12), w(14))), // PCI range: first, last BDF
            3 => out.push((3, w(6), w(6))),   // virtio-pci IOMMU: its BDF
            _ => out.push((kind, 0, 0)),
        }
        at += len;
    }
    out
}

#[test]
fn acpi_dump_tables_disassemble_cleanly_and_describe_the_machine() {
    let dir = std::env::temp_dir().join(format!("passthru-acpi-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Two engines behind the virtio-iommu and a foreign (vfio-user) device.
    let sock = std::env::temp_dir().join(format!("passthru-acpi-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let mut server = common::bin()
        .args(["device", "dma-engine", "--socket", sock.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "the device never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    let foreign = format!("vfio-user,socket={}", sock.display());
    let out = common::output_within(
        common::bin().arg("acpi-dump").arg(&dir).args([
            "--device",
            "dma-engine,dma=virtio-iommu,process=inline",
            "--device",
            "dma-engine,dma=virtio-iommu,process=inline",
            "--device",
            &foreign,
        ]),
        Duration::from_secs(60),
    );
    let _ = server.kill();
    let _ = server.wait();
    let text = common::text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}{}", common::text(&out.stderr));
    for name in ["RSDP", "XSDT", "FACP", "DSDT", "APIC", "MCFG", "VIOT"] {
        assert!(text.contains(&format!("{name} at ")), "{name}: {text}");
    }
    // The RSDP (ACPI 2.0: both checksums) points at the XSDT, which lists the rest.
    let read = |n: &str| std::fs::read(dir.join(n)).unwrap();
    let rsdp = read("rsdp.dat");
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert!(vmm::acpi::checksum_ok(&rsdp[..20]) && vmm::acpi::checksum_ok(&rsdp), "RSDP checksums");
    let xsdt_at = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
    assert!(text.contains(&format!("XSDT at {xsdt_at:#07x}")), "{text}");
    // The VIOT: the virtio-iommu at 00:1f.0, the engines at 00:01.0 and 00:02.0 behind
    // it, the foreign device (00:03.0, identity DMA) not.
    let viot = read("viot.dat");
    assert!(vmm::acpi::checksum_ok(&viot));
    assert_eq!(viot_nodes(&viot), vec![(3, 0xf8, 0xf8), (1, 0x08, 0x08), (1, 0x10, 0x10)]);
    let Some(_) = iasl() else {
        eprintln!("skipped the disassembly: no iasl (apt-get install acpica-tools; .ci/run does)");
        return;
    };
    let mut dsl = std::collections::BTreeMap::new();
    for table in ["xsdt", "facp", "dsdt", "apic", "mcfg", "viot"] {
        let dat = dir.join(format!("{table}.dat"));
        let o = Command::new("iasl").arg("-d").arg(&dat).current_dir(&dir).output().unwrap();
        let log = format!("{}{}", common::text(&o.stdout), common::text(&o.stderr));
        assert_eq!(o.status.code(), Some(0), "iasl -d {table}: {log}");
        // Debian 12's ACPICA (20200925) predates VIOT (20210730): it dumps the
        // header and raw bytes, checked above field by field instead.
        let lower = log.to_lowercase();
        assert!(!lower.contains("error") && !lower.contains("warning"), "iasl -d {table}: {log}");
        dsl.insert(table, std::fs::read_to_string(dir.join(format!("{table}.dsl"))).unwrap());
    }
    let squeeze = |s: &str| s.split_whitespace().collect::<String>();
    let dsdt = squeeze(&dsl["dsdt"]);
    for want in [
        "Device(PCI0)",
        "Name(_HID,EisaId(\"PNP0A08\")",
        "WordBusNumber(",
        "0x0CF8,//RangeMinimum",
        "0xC000,//RangeMinimum",
        "0xC0000000,//RangeMinimum",
        "0xDFFFFFFF,//RangeMaximum",
        "0x0000010000000000,//RangeMinimum",
        "Name(_PRT,Package(0x80)",
        "Device(COM1)",
        "EisaId(\"PNP0501\")",
        "0x03F8,//RangeMinimum",
        "EisaId(\"PNP0C02\")",
        "Memory32Fixed(ReadOnly,0xE0000000,//AddressBase0x00100000,//AddressLength",
        // Hot-plug: the GED, its event method, the registers, a slot and its notifies.
        "Name(_HID,\"ACPI0013\"",
        "Method(_EVT,1,Serialized)",
        "\\_SB.PCI0.PCNT()",
        "Device(PHPR)",
        "OperationRegion(PCST,SystemMemory,0xFEB00000,0x10)",
        "Device(S01)",
        "Name(_ADR,0x00010000)",
        "Method(_EJ0,1,NotSerialized)",
        "\\_SB.PHPR.B0EJ=0x02",
        "Local0=\\_SB.PHPR.PCIU",
        "Notify(S01,One)",
        "Notify(S01,0x03)",
        "Notify(S1F,0x03)",
    ] {
        assert!(dsdt.contains(want), "DSDT lacks {want}: {}", dsl["dsdt"]);
    }
    // _PRT: slot s, pin p (0-based) on GSI 16 + (s + p) % 4, as passthru swizzles.
    for (slot, pin) in [(1u32, 0u32), (1, 3), (2, 1), (31, 2)] {
        let gsi = abi::pci::intx_gsi(slot as u8, (pin + 1) as u8);
        let pin_s = ["Zero", "One", "0x02", "0x03"][pin as usize];
        let entry = format!("Package(0x04){{0x{slot:04X}FFFF,{pin_s},Zero,0x{gsi:02X}}}");
        assert!(dsdt.contains(&entry), "_PRT lacks {entry}");
    }
    let facp = squeeze(&dsl["facp"]);
    assert!(facp.contains("HardwareReduced(V5):1"), "{}", dsl["facp"]);
    assert!(facp.contains("ResetRegisterSupported(V2):1"), "{}", dsl["facp"]);
    assert!(facp.contains("Address:00000000000000F4"), "the reset register is the exit port: {}", dsl["facp"]);
    let apic = squeeze(&dsl["apic"]);
    assert!(apic.contains("Address:FEC00000") && apic.contains("LocalApicAddress:FEE00000"), "{}", dsl["apic"]);
    let mcfg = squeeze(&dsl["mcfg"]);
    assert!(mcfg.contains("BaseAddress:00000000E0000000") && mcfg.contains("EndBusNumber:00"), "{}", dsl["mcfg"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A VM without a vCPU, where devices come and go.
fn vm() -> Vm {
    let mut config = VmConfig::new(AccelKind::Qtest);
    config.memory = 64 << 20;
    config.locked_memory = Some(1 << 30);
    config.serial_out = Box::new(std::io::sink());
    Vm::new(config).unwrap()
}

/// The endpoints behind the virtio-iommu as `pci_list` and `dev_info` tell them.
fn behind_viommu(vm: &Vm) -> Vec<u16> {
    let list = common::qtest_cmd(vm, "pci_list");
    let mut out = Vec::new();
    for f in list.trim_start_matches("OK ").split("; ").filter(|f| !f.is_empty()) {
        let mut w = f.split_whitespace();
        let addr = w.next().unwrap(); // 00:SS.0
        let name = f.split_whitespace().find_map(|x| x.strip_prefix("name=")).unwrap();
        let info = common::qtest_cmd(vm, &format!("dev_info {name}"));
        if info.contains("frontend=virtio-iommu") {
            let slot = u16::from_str_radix(&addr[3..5], 16).unwrap();
            out.push(slot << 3);
        }
    }
    out.sort_unstable();
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

    /// Devices plugged and unplugged in any order: each rebuild of the tables has a
    /// VIOT naming exactly the endpoints `pci_list` shows behind the virtio-iommu.
    #[test]
    fn the_viot_follows_hot_plug_as_pci_list_does(ops in proptest::collection::vec((any::<bool>(), 0usize..4), 1..8)) {
        let vm = vm();
        let mut names: Vec<String> = Vec::new();
        for (add, pick) in ops {
            if add || names.is_empty() {
                let spec = if pick % 2 == 0 { "dma-engine,dma=virtio-iommu,process=inline" } else { "dma-engine,process=inline" };
                let d = passthru::device::attach(&vm, &passthru::device::parse_device(spec).unwrap()).unwrap();
                names.push(d.name().to_string());
            } else {
                let name = names.remove(pick % names.len());
                vm.detach_device(&name).unwrap();
            }
            let t = vm.acpi_tables();
            let want = behind_viommu(&vm);
            match t.get(b"VIOT") {
                None => prop_assert!(want.is_empty(), "no VIOT but {:?} behind the virtio-iommu", want),
                Some(v) => {
                    prop_assert!(vmm::acpi::checksum_ok(v));
                    let nodes = viot_nodes(v);
                    prop_assert_eq!(nodes[0], (3, 0xf8, 0xf8));
                    let eps: Vec<u16> = nodes[1..].iter().map(|n| n.1).collect();
                    prop_assert_eq!(eps, want);
                }
            }
            for (_, _, data) in &t.tables {
                prop_assert!(vmm::acpi::checksum_ok(data));
            }
        }
    }
}

#[test]
fn plugs_and_unplugs_set_their_slot_bits_and_raise_the_ged_interrupt() {
    use abi::layout::acpi_hotplug as hp;
    let vm = vm();
    let q = |c: &str| common::qtest_cmd(&vm, c);
    assert_eq!(q("irq_mode acpi-hotplug 0 0 vmm"), "OK", "{}", q("irq_list"));
    let raised = || vm.irqs().stats(&irq::SourceId::new("acpi-hotplug", 0, 0)).unwrap().vmm_delivered;
    let wait_raised = |n: u64| {
        let t = std::time::Instant::now();
        while raised() < n && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        raised()
    };
    let read = |off: u64| common::qpci::value(&q(&format!("readl {:#x}", hp::ADDR + off)));
    assert_eq!((read(hp::UP), read(hp::DOWN)), (0, 0));
    let spec = passthru::device::parse_device("dma-engine,process=inline").unwrap();
    let a = passthru::device::attach(&vm, &spec).unwrap();
    let b = passthru::device::attach(&vm, &spec).unwrap();
    // Edge interrupts of changes close together may merge (an eventfd counts them):
    // PCNT reads every bit whatever the number of interrupts.
    let after_plugs = wait_raised(1);
    assert!(after_plugs >= 1, "the plugs raised the GED's interrupt");
    // What _EVT's PCNT reads: both slots up, and reading clears.
    assert_eq!(read(hp::UP), (1 << a.slot()) | (1 << b.slot()));
    assert_eq!(read(hp::UP), 0, "PCIU clears when read");
    vm.detach_device(b.name()).unwrap();
    assert!(wait_raised(after_plugs + 1) > after_plugs, "the unplug raised it again");
    assert_eq!(read(hp::DOWN), 1 << b.slot());
    assert_eq!(read(hp::DOWN), 0);
    // The guest's _EJ0 writes its slot's bit: acknowledged, counted.
    assert_eq!(q(&format!("writel {:#x} {:#x}", hp::ADDR + hp::EJECT, 1u32 << b.slot())), "OK");
    assert_eq!(vm.acpi_hotplug().counts(), (1 << b.slot(), 3), "3 changes announced");
    // A plug then an unplug of one slot before the guest looks: only the unplug stands.
    let c = passthru::device::attach(&vm, &spec).unwrap();
    vm.detach_device(c.name()).unwrap();
    assert_eq!((read(hp::UP), read(hp::DOWN)), (0, 1 << c.slot()));
}

#[test]
fn a_device_plugged_into_a_slot_an_unplug_is_freeing_is_announced_after_it() {
    use abi::layout::acpi_hotplug as hp;
    // Two threads (the API serves each client on its own): one unplugs a device while
    // the other plugs one, which takes the slot as soon as it is free. Whatever the
    // interleaving, a slot with a device in it ends announced as up.
    let vm = vm();
    let q = |c: &str| common::qtest_cmd(&vm, c);
    let read = |off: u64| common::qpci::value(&q(&format!("readl {:#x}", hp::ADDR + off)));
    let spec = passthru::device::parse_device("dma-engine,process=inline").unwrap();
    let mut reused = 0;
    for round in 0..60 {
        let a = passthru::device::attach(&vm, &spec).unwrap();
        let (_, _) = (read(hp::UP), read(hp::DOWN));
        let b = std::thread::scope(|s| {
            let unplug = s.spawn(|| vm.detach_device(a.name()).unwrap());
            // Staggered starts, so that some plugs land while the unplug frees the slot.
            std::thread::sleep(Duration::from_micros((round * 53 % 800) as u64));
            let b = passthru::device::attach(&vm, &spec).unwrap();
            unplug.join().unwrap();
            b
        });
        let up = read(hp::UP);
        assert_ne!(up & (1 << b.slot()), 0, "round {round}: the device at slot {} was never announced", b.slot());
        reused += usize::from(b.slot() == a.slot());
        vm.detach_device(b.name()).unwrap();
    }
    assert!(reused > 0, "the new device never took the freed slot: the race was not run");
}
