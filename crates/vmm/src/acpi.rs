//! ACPI tables that describe the machine the way Linux reads it, built with rust-vmm
//! `acpi_tables`: RSDP, XSDT, FADT (hardware-reduced), MADT, MCFG, DSDT (the PCI host
//! bridge with its windows and INTx routing, COM1) and, when devices sit behind the
//! virtio-iommu, VIOT. They are built from the VM as it is (a hot-plugged device
//! behind the virtio-iommu is in the next build) and written below 1 MiB, where the
//! e820 map reserves them.

use abi::{layout, pci, ports};
use acpi_tables::{Aml, aml, fadt, gas, mcfg::MCFG, rsdp::Rsdp, sdt::Sdt, viot, xsdt::XSDT};

/// Where the RSDP goes (the BIOS area Linux also scans), and the tables after it.
pub const RSDP_ADDR: u64 = 0x000e_0000;
/// Where the tables the RSDP points to start.
pub const TABLES_ADDR: u64 = 0x000e_1000;
/// One past the last byte the tables may use (the end of the BIOS area).
pub const TABLES_END: u64 = 0x0010_0000;

const OEM_ID: [u8; 6] = *b"PSTHRU";
const OEM_TABLE: [u8; 8] = *b"PASSTHRU";
const OEM_REVISION: u32 = 1;

/// What the tables describe that changes with the VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Machine {
    /// The virtio-iommu's requester id and those of the devices behind it.
    pub viommu: Option<(u16, Vec<u16>)>,
}

/// The tables: the RSDP and each table with the guest-physical address it is built for.
#[derive(Clone, Debug)]
pub struct Tables {
    /// The RSDP (at [`RSDP_ADDR`]).
    pub rsdp: Vec<u8>,
    /// Each table's signature, address and bytes, XSDT first.
    pub tables: Vec<([u8; 4], u64, Vec<u8>)>,
}

impl Tables {
    /// A table by signature.
    pub fn get(&self, signature: &[u8; 4]) -> Option<&[u8]> {
        self.tables.iter().find(|t| &t.0 == signature).map(|t| t.2.as_slice())
    }

    /// Bytes in all.
    pub fn size(&self) -> usize {
        self.rsdp.len() + self.tables.iter().map(|t| t.2.len()).sum::<usize>()
    }
}

fn bytes(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

/// The DSDT: the PCI host bridge (ECAM, bus 0) with the windows passthru places BARs
/// in and its INTx routing, and COM1.
fn dsdt() -> Vec<u8> {
    // _CRS of the host bridge: bus 0, the configuration ports, the I/O window, the
    // 32-bit and 64-bit memory windows.
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let cf8 = aml::IO::new(pci::CONFIG_ADDRESS, pci::CONFIG_ADDRESS, 1, 8);
    let io_end = u16::try_from(pci::IO_BASE + pci::IO_SIZE - 1).unwrap_or(u16::MAX);
    let io = aml::AddressSpace::new_io(pci::IO_BASE as u16, io_end, None);
    let mem32 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        pci::MMIO32_BASE as u32,
        (pci::MMIO32_BASE + pci::MMIO32_SIZE - 1) as u32,
        None,
    );
    let mem64 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        pci::MMIO64_BASE,
        pci::MMIO64_BASE + pci::MMIO64_SIZE - 1,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &cf8, &io, &mem32, &mem64]);
    // _PRT: every slot's four pins onto GSIs 16-19 as passthru swizzles them.
    let entries: Vec<(u32, u8, u32)> = (0..pci::SLOTS)
        .flat_map(|slot| {
            (1..=4u8).map(move |pin| ((u32::from(slot) << 16) | 0xffff, pin - 1, pci::intx_gsi(slot, pin)))
        })
        .collect();
    let zero = 0u8;
    let packages: Vec<aml::Package<'_>> =
        entries.iter().map(|(addr, pin, gsi)| aml::Package::new(vec![addr, pin, &zero, gsi])).collect();
    let prt_entries: Vec<&dyn Aml> = packages.iter().map(|p| p as &dyn Aml).collect();
    let prt = aml::Package::new(prt_entries);
    // Hot-plug: one device per slot (its _ADR, _SUN and _EJ0), and PCNT, which the GED's
    // _EVT calls: it reads which slots came and went (reading clears) and notifies each.
    let slots: Vec<Vec<u8>> = (1..pci::SLOTS).map(slot_device).collect();
    let pcnt = pcnt_method();
    let pci0 = bytes(&aml::Device::new(
        "PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_ADR".into(), &zero),
            &aml::Name::new("_SEG".into(), &zero),
            &aml::Name::new("_UID".into(), &zero),
            &aml::Name::new("_BBN".into(), &zero),
            &aml::Name::new("_CRS".into(), &crs),
            &aml::Name::new("_PRT".into(), &prt),
            &RawAml(slots.concat()),
            &RawAml(pcnt),
        ],
    ));
    // The ECAM window, reserved as a motherboard resource (Linux checks MCFG's area).
    let ecam = aml::Memory32Fixed::new(false, pci::ECAM_BASE as u32, pci::ECAM_SIZE as u32);
    let ecam_crs = aml::ResourceTemplate::new(vec![&ecam]);
    let res = bytes(&aml::Device::new(
        "RES0".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new("_UID".into(), &zero),
            &aml::Name::new("_CRS".into(), &ecam_crs),
        ],
    ));
    let com1_io = aml::IO::new(ports::SERIAL_COM1, ports::SERIAL_COM1, 1, ports::SERIAL_LEN as u8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, ports::SERIAL_GSI);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1 = bytes(&aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &zero),
            &aml::Name::new("_CRS".into(), &com1_crs),
        ],
    ));
    let sb = aml::Scope::raw("\\_SB_".into(), [pci0, res, com1, hotplug_registers(), ged()].concat());
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, OEM_REVISION);
    t.append_slice(&sb);
    t.update_checksum();
    t.as_slice().to_vec()
}

/// AML already built.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// `Sxx`, slot `s` of the host bridge: `_ADR`, `_SUN`, and `_EJ0` writing its bit to
/// the eject register.
fn slot_device(s: u8) -> Vec<u8> {
    let adr = u32::from(s) << 16;
    let sun = u32::from(s);
    let bit = 1u32 << s;
    let b0ej = aml::Path::new("\\_SB_.PHPR.B0EJ");
    let eject = aml::Store::new(&b0ej, &bit);
    let ej0 = aml::Method::new("_EJ0".into(), 1, false, vec![&eject]);
    bytes(&aml::Device::new(
        format!("S{s:02X}_").as_str().into(),
        vec![&aml::Name::new("_ADR".into(), &adr), &aml::Name::new("_SUN".into(), &sun), &ej0],
    ))
}

/// `PCNT`: the slots plugged get a device check (1), those unplugged an eject request
/// (3), as Linux's acpiphp expects.
fn pcnt_method() -> Vec<u8> {
    let up = aml::Local(0);
    let down = aml::Local(1);
    let (pciu, pcid) = (aml::Path::new("\\_SB_.PHPR.PCIU"), aml::Path::new("\\_SB_.PHPR.PCID"));
    let read_up = aml::Store::new(&up, &pciu);
    let read_down = aml::Store::new(&down, &pcid);
    let mut body: Vec<Vec<u8>> = vec![bytes(&read_up), bytes(&read_down)];
    for s in 1..pci::SLOTS {
        let bit = 1u32 << s;
        let name = aml::Path::new(&format!("S{s:02X}_"));
        for (reg, event) in [(&up, 1u8), (&down, 3u8)] {
            let test = aml::And::new(&aml::ZERO, reg, &bit);
            let notify = aml::Notify::new(&name, &event);
            body.push(bytes(&aml::If::new(&test, vec![&notify])));
        }
    }
    let raw = RawAml(body.concat());
    bytes(&aml::Method::new("PCNT".into(), 0, true, vec![&raw]))
}

/// `\_SB.PHPR`: the hot-plug registers (`abi::layout::acpi_hotplug`) as a region.
fn hotplug_registers() -> Vec<u8> {
    use abi::layout::acpi_hotplug as hp;
    let addr = hp::ADDR as u32;
    let len = hp::LEN as u32;
    let mem = aml::Memory32Fixed::new(true, addr, len);
    let crs = aml::ResourceTemplate::new(vec![&mem]);
    let region = aml::OpRegion::new("PCST".into(), aml::OpRegionSpace::SystemMemory, &addr, &len);
    let field = aml::Field::new(
        "PCST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![
            aml::FieldEntry::Named(*b"PCIU", 32),
            aml::FieldEntry::Named(*b"PCID", 32),
            aml::FieldEntry::Named(*b"B0EJ", 32),
        ],
    );
    let zero = 0u8;
    let sta = 0x0bu8; // present, enabled, functioning; not shown in the UI
    bytes(&aml::Device::new(
        "PHPR".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A06")),
            &aml::Name::new("_UID".into(), &zero),
            &aml::Name::new("_STA".into(), &sta),
            &aml::Name::new("_CRS".into(), &crs),
            &region,
            &field,
        ],
    ))
}

/// `\_SB.GED_`: the Generic Event Device; its interrupt means "slots changed".
fn ged() -> Vec<u8> {
    use abi::layout::acpi_hotplug as hp;
    let irq = aml::Interrupt::new(true, true, false, false, hp::GSI);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let call = aml::MethodCall::new("\\_SB_.PCI0.PCNT".into(), vec![]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&call]);
    let zero = 0u8;
    bytes(&aml::Device::new(
        "GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &zero),
            &aml::Name::new("_CRS".into(), &crs),
            &evt,
        ],
    ))
}

/// The FADT: a hardware-reduced platform (no PM timer, no SCI, no legacy ports) whose
/// reset register is passthru's exit port: a guest that resets ends the VM (status 0).
fn fadt(dsdt: u64) -> Vec<u8> {
    let mut f = fadt::FADTBuilder::new(OEM_ID, OEM_TABLE, OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(fadt::Flags::HwReducedAcpi)
        .flag(fadt::Flags::ResetRegSup)
        .flag(fadt::Flags::Headless)
        .preferred_pm_profile(fadt::PmProfile::EnterpriseServer);
    f.reset_reg = gas::GAS::new(gas::AddressSpace::SystemIo, 8, 0, gas::AccessSize::ByteAccess, u64::from(ports::EXIT));
    f.reset_value = 0;
    bytes(&f.finalize())
}

/// The MADT: the boot CPU's local APIC and the I/O APIC. ISA interrupts are identity
/// mapped onto the I/O APIC's first pins (no source overrides: passthru has no PIT and
/// routes IRQ n to GSI n); the 8259 PICs exist (in-kernel irqchip), hence PCAT_COMPAT.
fn madt() -> Vec<u8> {
    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE, OEM_REVISION);
    t.write_u32(36, layout::LAPIC_ADDR as u32);
    t.write_u32(40, 1); // PCAT_COMPAT
    // Processor local APIC: type 0, length 8, UID 0, APIC id 0, enabled.
    t.append_slice(&[0, 8, 0, 0, 1, 0, 0, 0]);
    // I/O APIC: type 1, length 12, id 0, address, GSI base 0.
    let mut io = vec![1, 12, 0, 0];
    io.extend_from_slice(&(layout::IOAPIC_ADDR as u32).to_le_bytes());
    io.extend_from_slice(&0u32.to_le_bytes());
    t.append_slice(&io);
    t.update_checksum();
    t.as_slice().to_vec()
}

fn mcfg() -> Vec<u8> {
    let mut m = MCFG::new(OEM_ID, OEM_TABLE, OEM_REVISION);
    // The ECAM window covers bus 0 (1 MiB).
    let last_bus = u8::try_from((pci::ECAM_SIZE >> 20).saturating_sub(1)).unwrap_or(0);
    m.add_ecam(pci::ECAM_BASE, 0, 0, last_bus);
    bytes(&m)
}

/// The VIOT: the virtio-iommu (a virtio-pci function) and each endpoint behind it.
fn viot(iommu: u16, endpoints: &[u16]) -> Vec<u8> {
    let dev = |bdf: u16| viot::PciDevice::new(0, (bdf >> 8) as u8, ((bdf >> 3) & 0x1f) as u8, (bdf & 7) as u8);
    let mut v = viot::VIOT::new(OEM_ID, OEM_TABLE, OEM_REVISION);
    let handle = v.add_virtio_pci_iommu(viot::VirtIoPciIommu::new(dev(iommu)));
    for ep in endpoints {
        v.add_pci_range(viot::PciRange::new(dev(*ep), dev(*ep), &handle));
    }
    bytes(&v)
}

/// Builds every table for `m`, laid out from [`TABLES_ADDR`].
pub fn build(m: &Machine) -> Tables {
    let mut next = TABLES_ADDR;
    let mut place = |len: usize| {
        let at = next;
        next = (next + len as u64).next_multiple_of(16);
        at
    };
    let dsdt = dsdt();
    let dsdt_at = place(dsdt.len());
    let fadt = fadt(dsdt_at);
    let fadt_at = place(fadt.len());
    let madt = madt();
    let madt_at = place(madt.len());
    let mcfg = mcfg();
    let mcfg_at = place(mcfg.len());
    let mut tables = vec![
        (*b"DSDT", dsdt_at, dsdt),
        (*b"FACP", fadt_at, fadt),
        (*b"APIC", madt_at, madt),
        (*b"MCFG", mcfg_at, mcfg),
    ];
    if let Some((iommu, eps)) = &m.viommu
        && !eps.is_empty()
    {
        let v = viot(*iommu, eps);
        let at = place(v.len());
        tables.push((*b"VIOT", at, v));
    }
    // The XSDT lists every table but the DSDT (the FADT points to it).
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, OEM_REVISION);
    for (sig, at, _) in &tables {
        if sig != b"DSDT" {
            xsdt.add_entry(*at);
        }
    }
    let xsdt = bytes(&xsdt);
    let xsdt_at = place(xsdt.len());
    tables.insert(0, (*b"XSDT", xsdt_at, xsdt));
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_at));
    Tables { rsdp, tables }
}

/// Whether `data` sums to 0 mod 256 (an ACPI checksum).
pub fn checksum_ok(data: &[u8]) -> bool {
    data.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_fits_below_1_mib_sums_to_zero_and_is_listed() {
        let t = build(&Machine { viommu: Some((pci::bdf(0, 31, 0), vec![pci::bdf(0, 1, 0), pci::bdf(0, 2, 0)])) });
        assert!(checksum_ok(&t.rsdp[..20]) && checksum_ok(&t.rsdp), "RSDP checksums");
        for (sig, at, data) in &t.tables {
            assert!(checksum_ok(data), "{}", String::from_utf8_lossy(sig));
            assert_eq!(&data[..4], sig);
            assert_eq!(u32::from_le_bytes(data[4..8].try_into().unwrap()) as usize, data.len());
            assert!(*at >= TABLES_ADDR && at + data.len() as u64 <= TABLES_END);
        }
        let xsdt = t.get(b"XSDT").unwrap();
        let listed: Vec<u64> = xsdt[36..].chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        let want: Vec<u64> = t.tables.iter().filter(|x| &x.0 != b"XSDT" && &x.0 != b"DSDT").map(|x| x.1).collect();
        assert_eq!(listed, want);
        assert!(t.get(b"VIOT").is_some());
        assert!(build(&Machine::default()).get(b"VIOT").is_none(), "no virtio-iommu, no VIOT");
    }
}
