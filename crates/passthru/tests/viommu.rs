//! virtio-iommu against its specification (OASIS virtio 1.2/1.3, "IOMMU Device"):
//! every normative device requirement ("the device MUST/SHOULD ...") is checked here,
//! the sentence quoted as the check's message. The device is driven in this process
//! through a qtest VM's MMIO and guest memory (the in-process driver lays out queues
//! and requests as Linux's driver does), and a DMA engine behind it shows what its
//! domains let through.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
use common::qpci;

use abi::dma_engine::{Descriptor, completion, op};
use abi::viommu::{self as v, fault, feature, map, status};
use iommu::viommu::client::{Client, Submission};
use iommu::viommu::wire::Request;
use std::time::Duration;
use vmm::{AccelKind, Vm, VmConfig};

/// The engine's endpoint id: slot 1.
const EP: u32 = qpci::FIRST_BDF as u32;
/// The in-process driver's memory.
const DRV: u64 = 0x300_0000;
/// The engine's ring and completion record (guest-physical, and as the engine sees
/// them through the domain).
const RING_GPA: u64 = 0x20_0000;
const RING_IOVA: u64 = 0x1000_0000;
/// A data page (guest-physical, device address).
const DATA_GPA: u64 = 0x30_0000;
const DATA_IOVA: u64 = 0x2000_0000;
const PAGE: u64 = 4096;
const RW: u32 = map::READ | map::WRITE;

fn config() -> VmConfig {
    let mut c = VmConfig::new(AccelKind::Qtest);
    c.memory = 64 << 20;
    c.locked_memory = Some(256 << 20);
    c.frontends = vec!["virtio-iommu".into()];
    c.serial_out = Box::new(std::io::sink());
    c.err_out = Box::new(std::io::sink());
    c
}

/// A VM with a virtio-iommu and, when `engine` names a mode, a DMA engine behind it.
fn vm(engine: Option<&str>) -> Vm {
    let vm = Vm::new(config()).unwrap();
    if let Some(mode) = engine {
        let spec = format!("dma-engine,dma=virtio-iommu{mode}");
        passthru::device::attach(&vm, &passthru::device::parse_device(&spec).unwrap()).unwrap();
        qpci::enable(&mut |c| common::qtest_cmd(&vm, c), 1);
    }
    vm
}

fn start(vm: &Vm) -> Client<&Vm> {
    let mem = std::sync::Arc::clone(vm.ram().memory_arc());
    Client::start(vm, mem, DRV, Client::<&Vm>::linux_features()).unwrap()
}

fn attach(domain: u32, endpoint: u32) -> Request {
    Request::Attach { domain, endpoint, flags: 0, reserved: false }
}

fn mapr(domain: u32, iova: u64, gpa: u64, size: u64, flags: u32) -> Request {
    Request::Map { domain, virt_start: iova, virt_end: iova + size - 1, phys_start: gpa, flags }
}

fn unmap(domain: u32, iova: u64, size: u64) -> Request {
    Request::Unmap { domain, virt_start: iova, virt_end: iova + size - 1, reserved: false }
}

fn engine_regs(vm: &Vm) -> u64 {
    qpci::bar(&mut |c| common::qtest_cmd(vm, c), 1, 0)
}

/// Runs `d` on the engine, its ring and record through the domain at RING_IOVA.
fn run(vm: &Vm, d: Descriptor) -> u32 {
    common::run_descriptor(
        &mut |c| common::qtest_cmd(vm, c),
        engine_regs(vm),
        RING_GPA,
        RING_IOVA,
        RING_GPA + 0x800,
        Descriptor { completion: RING_IOVA + 0x800, ..d },
    )
}

/// Runs `d` on the engine bypassing translation (IOVA = guest-physical).
fn run_bypassing(vm: &Vm, d: Descriptor) -> u32 {
    common::run_descriptor(
        &mut |c| common::qtest_cmd(vm, c),
        engine_regs(vm),
        RING_GPA,
        RING_GPA,
        RING_GPA + 0x800,
        Descriptor { completion: RING_GPA + 0x800, ..d },
    )
}

fn fill(dst: u64, pattern: u64) -> Descriptor {
    Descriptor { op: op::FILL, dst, len: PAGE, pattern, ..Default::default() }
}

fn readq(vm: &Vm, gpa: u64) -> u64 {
    qpci::value(&common::qtest_cmd(vm, &format!("readq {gpa:#x}")))
}

fn stat(vm: &Vm, key: &str) -> String {
    let a = common::qtest_cmd(vm, "frontend_stats virtio-iommu");
    a.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key} in {a}"))
        .into()
}

/// Domain 1 with the engine's ring mapped: the engine can run descriptors.
fn engine_in_domain(c: &mut Client<&Vm>, domain: u32) {
    let r = c.send(&[attach(domain, EP), mapr(domain, RING_IOVA, RING_GPA, PAGE, RW)]).unwrap();
    assert!(r.iter().all(|r| r.status == Some(status::OK)), "{r:?}");
}

#[test]
fn the_function_and_its_features_are_the_specs() {
    let vm = vm(None);
    let q = |c: &str| common::qtest_cmd(&vm, c);
    let id = qpci::value(&q(&format!("readl {:#x}", qpci::cfg(v::SLOT, 0))));
    assert_eq!(id, 0x1057_1af4, "virtio vendor, modern device id 0x1040 + 23");
    let class = qpci::value(&q(&format!("readl {:#x}", qpci::cfg(v::SLOT, 8)))) >> 16;
    assert_eq!(class, 0x0806, "an IOMMU (base system peripheral)");
    let mut c = start(&vm);
    let offered = c.driver().device_features();
    assert_ne!(offered & (1 << feature::MAP_UNMAP), 0, "The device SHOULD offer feature bit VIRTIO_IOMMU_F_MAP_UNMAP.");
    assert_eq!(
        offered & (1 << feature::BYPASS),
        0,
        "New devices SHOULD NOT offer VIRTIO_IOMMU_F_BYPASS. Devices SHOULD NOT offer both VIRTIO_IOMMU_F_BYPASS and VIRTIO_IOMMU_F_BYPASS_CONFIG."
    );
    assert_ne!(offered & (1 << feature::BYPASS_CONFIG), 0);
    assert_eq!(offered & (1 << feature::MMIO), 0, "MMIO mappings are not offered");
    assert_ne!(offered & (1 << abi::virtio::F_VERSION_1), 0);
    let cfg = c.config;
    assert_ne!(cfg.page_size_mask, 0, "The device MUST set at least one bit in page_size_mask");
    assert_eq!(cfg.page_size_mask & 0xfff, 0, "the granule is 4 KiB: Linux refuses one above its page size");
    assert_eq!(cfg.page_size_mask.trailing_zeros(), 12);
    assert_eq!(cfg.input_range, v::INPUT_RANGE);
    assert_eq!(cfg.domain_range, v::DOMAIN_RANGE);
    assert_eq!(cfg.probe_size, v::PROBE_SIZE);
    assert_eq!(cfg.bypass, 1, "boot bypass (QEMU's default): endpoints work before the driver loads");
}

#[test]
fn features_ok_only_for_what_the_device_offers_with_version_1() {
    let vm = vm(None);
    let mut c = start(&vm);
    let d = c.driver();
    // Without VERSION_1 (a legacy driver): refused.
    let only_map = 1u64 << feature::MAP_UNMAP;
    assert!(d.negotiate(only_map).unwrap_err().contains("refused"));
    // A feature it does not offer (BYPASS): refused.
    d.reset(Duration::from_secs(1)).unwrap();
    d.set_status(abi::virtio::status::ACKNOWLEDGE | abi::virtio::status::DRIVER);
    d.write_features((1 << abi::virtio::F_VERSION_1) | (1 << feature::BYPASS));
    d.set_status(abi::virtio::status::ACKNOWLEDGE | abi::virtio::status::DRIVER | abi::virtio::status::FEATURES_OK);
    assert_eq!(d.status() & abi::virtio::status::FEATURES_OK, 0, "BYPASS is not offered");
    // What Linux asks: accepted.
    assert!(d.negotiate(Client::<&Vm>::linux_features()).is_ok());
    // Reset reads back 0 at once.
    d.set_status(0);
    assert_eq!(d.status(), 0);
}

#[test]
fn bypass_is_0_or_1_follows_the_driver_and_survives_device_reset() {
    let vm = vm(Some(",process=inline"));
    let mut c = start(&vm);
    // A write of 0xfe keeps bit 0 (0); of 0xff, 1.
    c.write_bypass(0xfe);
    assert_eq!(c.read_config().bypass, 0, "The device MUST NOT present a value different than 0 or 1 in bypass.");
    c.write_bypass(0xff);
    assert_eq!(c.read_config().bypass, 1, "The device MUST NOT present a value different than 0 or 1 in bypass.");
    c.write_bypass(0);
    assert_eq!(c.read_config().bypass, 0);
    // Unattached and not bypassing: the engine reaches nothing (its ring fetch faults).
    let regs = engine_regs(&vm);
    let q = |s: &str| common::qtest_cmd(&vm, s);
    assert_eq!(q(&format!("writeq {:#x} {RING_GPA:#x}", regs + abi::dma_engine::regs::RING_BASE)), "OK");
    assert_eq!(q(&format!("writel {:#x} 1", regs + abi::dma_engine::regs::RING_SIZE)), "OK");
    assert_eq!(q(&format!("writel {:#x} 1", regs + abi::dma_engine::regs::CONTROL)), "OK");
    assert_eq!(q(&format!("writel {:#x} 1", regs + abi::dma_engine::regs::TAIL)), "OK");
    let f = c.wait_faults(1, Duration::from_secs(5));
    assert!(
        !f.is_empty(),
        "The device SHOULD NOT let unattached endpoints that are not in bypass mode access the guest-physical address space."
    );
    assert_eq!(f[0].reason, fault::R_DOMAIN, "the endpoint is attached to no domain: {f:?}");
    assert_eq!(f[0].endpoint, EP, "The device SHOULD write a valid endpoint ID in endpoint.");
    assert_eq!(f[0].flags, fault::F_READ | fault::F_ADDRESS, "The device SHOULD set undefined flags to zero.");
    assert_eq!(f[0].address, RING_GPA);
    assert!(f[0].reserved_zero, "The device SHOULD set reserved and reserved1 to zero.");
    assert_eq!(f[0].used, v::size::FAULT as u32);
    // Device reset: bypass stays 0.
    let c2 = start(&vm);
    assert_eq!(c2.config.bypass, 0, "Field bypass SHOULD NOT change on device reset");
    c2.write_bypass(1);
    assert_eq!(run_bypassing(&vm, fill(DATA_GPA, 0x77)), completion::SUCCESS, "bypassing: IOVA = guest-physical");
    assert_eq!(readq(&vm, DATA_GPA), 0x77);
}

#[test]
fn an_unrecognised_request_is_returned_unwritten_with_used_length_0() {
    let vm = vm(None);
    let mut c = start(&vm);
    for kind in [0u8, 6, 0x7f, 0xff] {
        let mut readable = vec![0u8; 72];
        readable[0] = kind;
        let r = c.submit(&[Submission { readable, writable: 4 }]).unwrap();
        assert_eq!(
            (r[0].used, r[0].written.as_slice()),
            (0, &[0xa5u8; 4][..]),
            "If a request type is not recognized, the device SHOULD NOT write the buffer and SHOULD set the used length to zero."
        );
    }
    assert_eq!(stat(&vm, "unwritten"), "4");
}

#[test]
fn attach_follows_the_spec() {
    let vm = vm(Some(",process=inline"));
    let mut c = start(&vm);
    let st = |c: &mut Client<&Vm>, r: Request| c.one(r).unwrap();
    assert_eq!(
        st(&mut c, Request::Attach { domain: 1, endpoint: EP, flags: 0, reserved: true }),
        Some(status::INVAL),
        "If the reserved field of an ATTACH request is not zero, the device MUST reject the request and set status to VIRTIO_IOMMU_S_INVAL."
    );
    for flags in [2, 4, 1 << 31] {
        assert_eq!(
            st(&mut c, Request::Attach { domain: 1, endpoint: EP, flags, reserved: false }),
            Some(status::INVAL),
            "If the device does not recognize a flags bit, it MUST reject the request and set status to VIRTIO_IOMMU_S_INVAL."
        );
    }
    assert_eq!(
        st(&mut c, attach(1, 0x99)),
        Some(status::NOENT),
        "If the endpoint identified by endpoint doesn't exist, the device MUST reject the request and set status to VIRTIO_IOMMU_S_NOENT."
    );
    assert_eq!(st(&mut c, attach(v::DOMAIN_RANGE.1 + 1, EP)), Some(status::RANGE), "outside domain_range");
    // The head's reserved bytes are ignored; the tail's are written zero.
    let mut raw = iommu::viommu::wire::encode(&attach(1, EP));
    raw[1..4].copy_from_slice(&[0xff; 3]);
    let r = c.submit(&[Submission { readable: raw, writable: 4 }]).unwrap();
    assert_eq!(r[0].status, Some(status::OK), "The device MUST ignore field reserved of struct virtio_iommu_req_head");
    assert_eq!(&r[0].written[1..4], &[0, 0, 0], "SHOULD set field reserved of struct virtio_iommu_req_tail to zero.");
    assert_eq!(r[0].used, 4, "a recognised request is returned with its whole writable length");
    assert_eq!(st(&mut c, attach(1, EP)), Some(status::OK), "attaching again where it is: nothing to do");
    // Bypass domain vs paging domain.
    assert_eq!(
        st(&mut c, Request::Attach { domain: 1, endpoint: EP, flags: v::ATTACH_F_BYPASS, reserved: false }),
        Some(status::INVAL),
        "If the domain already exists and the VIRTIO_IOMMU_ATTACH_F_BYPASS flag is not consistent with that domain, the device SHOULD reject the request and set status to VIRTIO_IOMMU_S_INVAL."
    );
    // Domain 1 maps the ring and a data page: the engine works through it.
    assert_eq!(c.one(mapr(1, RING_IOVA, RING_GPA, PAGE, RW)).unwrap(), Some(status::OK));
    assert_eq!(c.one(mapr(1, DATA_IOVA, DATA_GPA, PAGE, RW)).unwrap(), Some(status::OK));
    assert_eq!(run(&vm, fill(DATA_IOVA, 0x11)), completion::SUCCESS);
    assert_eq!(readq(&vm, DATA_GPA), 0x11);
    // Moving to domain 2 without a DETACH (as Linux does): domain 1 ceases to exist.
    assert_eq!(
        st(&mut c, attach(2, EP)),
        Some(status::OK),
        "If the endpoint identified by endpoint is already attached to another domain, then the device SHOULD first detach it from that domain and attach it to the one identified by domain."
    );
    assert_eq!(
        c.one(mapr(1, 0x4000_0000, DATA_GPA, PAGE, RW)).unwrap(),
        Some(status::NOENT),
        "After all endpoints have been successfully detached from a domain, it ceases to exist"
    );
    assert_eq!(stat(&vm, "domains"), "1");
    // Domain 2 is empty: the engine cannot even read its ring.
    assert_eq!(c.one(mapr(2, RING_IOVA, RING_GPA, PAGE, RW)).unwrap(), Some(status::OK));
    assert_eq!(
        run(&vm, fill(DATA_IOVA, 0x22)),
        completion::DMA_FAULT,
        "A device that does not reject the request MUST attach the endpoint."
    );
    assert_eq!(readq(&vm, DATA_GPA), 0x11);
    // A bypass domain: IOVA = guest-physical.
    assert_eq!(
        st(&mut c, Request::Attach { domain: 3, endpoint: EP, flags: v::ATTACH_F_BYPASS, reserved: false }),
        Some(status::OK)
    );
    assert_eq!(run_bypassing(&vm, fill(DATA_GPA, 0x33)), completion::SUCCESS);
    assert_eq!(readq(&vm, DATA_GPA), 0x33);
}

#[test]
fn attach_bypass_needs_bypass_config() {
    let vm = vm(Some(",process=inline"));
    let want = Client::<&Vm>::linux_features() & !(1 << feature::BYPASS_CONFIG);
    let mem = std::sync::Arc::clone(vm.ram().memory_arc());
    let mut c = Client::start(&vm, mem, DRV, want).unwrap();
    assert_eq!(c.features & (1 << feature::BYPASS_CONFIG), 0);
    assert_eq!(
        c.one(Request::Attach { domain: 1, endpoint: EP, flags: v::ATTACH_F_BYPASS, reserved: false }).unwrap(),
        Some(status::INVAL),
        "If the device does not recognize a flags bit, it MUST reject the request and set status to VIRTIO_IOMMU_S_INVAL."
    );
    // And bypass is not writable without the feature.
    c.write_bypass(0);
    assert_eq!(c.read_config().bypass, 1);
}

#[test]
fn detach_follows_the_spec() {
    let vm = vm(Some(",process=inline"));
    let mut c = start(&vm);
    c.write_bypass(0);
    engine_in_domain(&mut c, 1);
    assert_eq!(c.one(mapr(1, DATA_IOVA, DATA_GPA, PAGE, RW)).unwrap(), Some(status::OK));
    assert_eq!(run(&vm, fill(DATA_IOVA, 0x44)), completion::SUCCESS);
    assert_eq!(
        c.one(Request::Detach { domain: 1, endpoint: 0x77 }).unwrap(),
        Some(status::NOENT),
        "If the endpoint identified by endpoint doesn't exist, then the device MUST reject the request and set status to VIRTIO_IOMMU_S_NOENT."
    );
    assert_eq!(
        c.one(Request::Detach { domain: 9, endpoint: EP }).unwrap(),
        Some(status::INVAL),
        "If the domain identified by domain doesn't exist, or if the endpoint identified by endpoint isn't attached to this domain, then the device MAY set the request status to VIRTIO_IOMMU_S_INVAL."
    );
    let mut raw = iommu::viommu::wire::encode(&Request::Detach { domain: 1, endpoint: EP });
    raw[12..20].copy_from_slice(&[0xee; 8]);
    let r = c.submit(&[Submission { readable: raw, writable: 4 }]).unwrap();
    assert_eq!(r[0].status, Some(status::OK), "The device MUST ignore reserved.");
    // Detached, bypass 0: nothing reachable, and the fault says why.
    c.faults();
    let regs = engine_regs(&vm);
    let q = |s: &str| common::qtest_cmd(&vm, s);
    assert_eq!(q(&format!("writel {:#x} 2", regs + abi::dma_engine::regs::CONTROL)), "OK");
    assert_eq!(q(&format!("writeq {:#x} {RING_IOVA:#x}", regs + abi::dma_engine::regs::RING_BASE)), "OK");
    assert_eq!(q(&format!("writel {:#x} 1", regs + abi::dma_engine::regs::RING_SIZE)), "OK");
    assert_eq!(q(&format!("writel {:#x} 1", regs + abi::dma_engine::regs::CONTROL)), "OK");
    assert_eq!(q(&format!("writel {:#x} 1", regs + abi::dma_engine::regs::TAIL)), "OK");
    let f = c.wait_faults(1, Duration::from_secs(5));
    assert_eq!(
        f.first().map(|f| (f.reason, f.address)),
        Some((fault::R_DOMAIN, RING_IOVA)),
        "The device MUST ensure that after being detached from a domain, the endpoint cannot access any mapping from that domain."
    );
    assert_eq!(stat(&vm, "domains"), "0");
}

#[test]
fn map_follows_the_spec() {
    let vm = vm(Some(",process=inline"));
    let mut c = start(&vm);
    engine_in_domain(&mut c, 1);
    let s = |c: &mut Client<&Vm>, r| c.one(r).unwrap();
    let align = "If virt_start, phys_start or (virt_end + 1) is not aligned on the page granularity, the device SHOULD reject the request and set status to VIRTIO_IOMMU_S_RANGE.";
    assert_eq!(s(&mut c, mapr(1, DATA_IOVA + 0x800, DATA_GPA, PAGE, RW)), Some(status::RANGE), "{align}");
    assert_eq!(s(&mut c, mapr(1, DATA_IOVA, DATA_GPA + 0x10, PAGE, RW)), Some(status::RANGE), "{align}");
    assert_eq!(s(&mut c, mapr(1, DATA_IOVA, DATA_GPA, PAGE - 1, RW)), Some(status::RANGE), "{align}");
    for flags in [map::MMIO | RW, 8 | RW, 1 << 31] {
        assert_eq!(
            s(&mut c, mapr(1, DATA_IOVA, DATA_GPA, PAGE, flags)),
            Some(status::INVAL),
            "If the device doesn't recognize a flags bit, it MUST reject the request and set status to VIRTIO_IOMMU_S_INVAL."
        );
    }
    assert_eq!(
        s(&mut c, mapr(7, DATA_IOVA, DATA_GPA, PAGE, RW)),
        Some(status::NOENT),
        "If domain does not exist, the device SHOULD reject the request and set status to VIRTIO_IOMMU_S_NOENT."
    );
    assert_eq!(
        s(
            &mut c,
            Request::Map {
                domain: 1,
                virt_start: DATA_IOVA + PAGE,
                virt_end: DATA_IOVA - 1,
                phys_start: DATA_GPA,
                flags: RW
            }
        ),
        Some(status::INVAL),
        "virt_end MUST be strictly greater than virt_start (a range whose end precedes its start is refused)"
    );
    assert_eq!(
        s(&mut c, mapr(1, v::MSI_REGION.0 - PAGE, DATA_GPA, 2 * PAGE, RW)),
        Some(status::INVAL),
        "The device SHOULD reject a MAP request that overlaps a RESV_MEM region."
    );
    assert_eq!(s(&mut c, mapr(1, 1 << 48, DATA_GPA, PAGE, RW)), Some(status::RANGE), "outside input_range");
    // Two pages mapped; any overlap with them is refused, nothing changes.
    assert_eq!(
        s(&mut c, mapr(1, DATA_IOVA, DATA_GPA, 2 * PAGE, map::READ)),
        Some(status::OK),
        "The device SHOULD set status to VIRTIO_IOMMU_S_OK if a request succeeds."
    );
    for (iova, size) in
        [(DATA_IOVA, PAGE), (DATA_IOVA + PAGE, PAGE), (DATA_IOVA - PAGE, 2 * PAGE), (DATA_IOVA - PAGE, 4 * PAGE)]
    {
        assert_eq!(
            s(&mut c, mapr(1, iova, DATA_GPA, size, RW)),
            Some(status::INVAL),
            "If a mapping already exists in the requested range, the device SHOULD reject the request and set status to VIRTIO_IOMMU_S_INVAL."
        );
    }
    // Read-only: the engine's write faults (and is reported: reason MAPPING, WRITE).
    c.faults();
    assert_eq!(
        run(&vm, fill(DATA_IOVA, 0x55)),
        completion::DMA_FAULT,
        "The device MUST NOT allow writes to a range mapped without the VIRTIO_IOMMU_MAP_F_WRITE flag."
    );
    let f = c.wait_faults(1, Duration::from_secs(5));
    assert_eq!(
        f.first().map(|f| (f.reason, f.flags, f.endpoint, f.address)),
        Some((fault::R_MAPPING, fault::F_WRITE | fault::F_ADDRESS, EP, DATA_IOVA))
    );
    assert_ne!(readq(&vm, DATA_GPA), 0x55);
    // The MSI doorbell is not reachable as memory.
    assert_eq!(
        run(&vm, fill(v::MSI_REGION.0, 0x66)),
        completion::DMA_FAULT,
        "The device SHOULD NOT allow accesses from the endpoint to RESV_MEM regions to affect any other component than the endpoint and the driver."
    );
    // A bypass domain takes no MAP.
    assert_eq!(
        s(&mut c, Request::Attach { domain: 5, endpoint: EP, flags: v::ATTACH_F_BYPASS, reserved: false }),
        Some(status::OK)
    );
    assert_eq!(
        s(&mut c, mapr(5, DATA_IOVA, DATA_GPA, PAGE, RW)),
        Some(status::INVAL),
        "If the domain is a bypass domain, the device SHOULD reject the request and set status to VIRTIO_IOMMU_S_INVAL."
    );
}

#[test]
fn unmap_follows_the_spec() {
    let vm = vm(Some(",process=inline"));
    let mut c = start(&vm);
    engine_in_domain(&mut c, 1);
    // Three mappings: [A, A+2P) [A+2P, A+3P) [A+4P, A+8P).
    let a = DATA_IOVA;
    let r = c
        .send(&[
            mapr(1, a, DATA_GPA, 2 * PAGE, RW),
            mapr(1, a + 2 * PAGE, DATA_GPA, PAGE, RW),
            mapr(1, a + 4 * PAGE, DATA_GPA, 4 * PAGE, RW),
        ])
        .unwrap();
    assert!(r.iter().all(|r| r.status == Some(status::OK)));
    let mappings = |vm: &Vm| stat(vm, "mappings").parse::<u64>().unwrap();
    assert_eq!(mappings(&vm), 4);
    let split = "If a mapping affected by the range is not covered in its entirety by the range (the UNMAP request would split the mapping), then the device SHOULD set the request status to VIRTIO_IOMMU_S_RANGE, and SHOULD NOT remove any mapping.";
    // Splitting the last one, after covering the others whole: nothing removed.
    assert_eq!(c.one(unmap(1, a, 6 * PAGE)).unwrap(), Some(status::RANGE), "{split}");
    assert_eq!(c.one(unmap(1, a + PAGE, PAGE)).unwrap(), Some(status::RANGE), "{split}");
    assert_eq!(mappings(&vm), 4, "{split}");
    assert_eq!(run(&vm, fill(a, 1)), completion::SUCCESS);
    assert_eq!(
        c.one(Request::Unmap { domain: 1, virt_start: a, virt_end: a + 3 * PAGE - 1, reserved: true }).unwrap(),
        Some(status::INVAL),
        "If the reserved field of an UNMAP request is not zero, the device MAY set the request status to VIRTIO_IOMMU_S_INVAL"
    );
    assert_eq!(mappings(&vm), 4);
    // Spilling over unmapped addresses removes the whole ones covered.
    assert_eq!(
        c.one(unmap(1, a - 16 * PAGE, 19 * PAGE + PAGE)).unwrap(),
        Some(status::OK),
        "If part of the range or the full range is not covered by an existing mapping, then the device SHOULD remove all mappings affected by the range and set the request status to VIRTIO_IOMMU_S_OK."
    );
    assert_eq!(mappings(&vm), 2);
    assert_eq!(run(&vm, fill(a, 2)), completion::DMA_FAULT, "unmapped means gone");
    assert_eq!(run(&vm, fill(a + 4 * PAGE, 3)), completion::SUCCESS);
    assert_eq!(c.one(unmap(1, 0, v::INPUT_RANGE.1 + 1)).unwrap(), Some(status::OK), "the whole input range");
    assert_eq!(mappings(&vm), 0);
    assert_eq!(
        c.one(unmap(9, a, PAGE)).unwrap(),
        Some(status::NOENT),
        "If domain does not exist, the device SHOULD set the request status to VIRTIO_IOMMU_S_NOENT."
    );
    assert_eq!(
        c.one(Request::Attach { domain: 5, endpoint: EP, flags: v::ATTACH_F_BYPASS, reserved: false }).unwrap(),
        Some(status::OK)
    );
    assert_eq!(
        c.one(unmap(5, a, PAGE)).unwrap(),
        Some(status::INVAL),
        "If the domain is a bypass domain, the device SHOULD reject the request and set status to VIRTIO_IOMMU_S_INVAL."
    );
}

#[test]
fn probe_follows_the_spec() {
    let vm = vm(Some(",process=inline"));
    let mut c = start(&vm);
    let r = c.send(&[Request::Probe { endpoint: EP }]).unwrap();
    assert_eq!(r[0].status, Some(status::OK));
    assert_eq!(r[0].used, v::PROBE_SIZE + 4, "Linux reads the status only when the used length is probe_size + 4");
    let p = r[0].properties();
    assert_eq!(p.len(), v::PROBE_SIZE as usize);
    let (kind, len) = (u16::from_le_bytes([p[0], p[1]]), u16::from_le_bytes([p[2], p[3]]));
    assert_eq!(kind, v::probe::T_RESV_MEM, "the first property: RESV_MEM (the reserved bits of type zero)");
    assert_eq!(
        len, 20,
        "The device MUST write the size of a property without the struct virtio_iommu_probe_property header, in bytes, into length."
    );
    assert_eq!(p[4], v::probe::RESV_MEM_T_MSI);
    assert_eq!(&p[5..8], &[0, 0, 0], "The device SHOULD set field reserved of a property to zero.");
    let start = u64::from_le_bytes(p[8..16].try_into().unwrap());
    let end = u64::from_le_bytes(p[16..24].try_into().unwrap());
    assert_eq!((start, end), v::MSI_REGION, "x86's MSI doorbell: Linux needs it, or assumes an ARM window in RAM");
    // The next property would be at 4 + length: there is none (type 0 ends the list).
    assert!(
        p[24..].iter().all(|b| *b == 0),
        "If the device doesn't fill all probe_size bytes with properties, it SHOULD fill the remaining bytes of properties with zeroes. / The device SHOULD NOT present more than one VIRTIO_IOMMU_RESV_MEM_T_MSI property per endpoint."
    );
    let mut raw = iommu::viommu::wire::encode(&Request::Probe { endpoint: EP });
    raw[8..72].fill(0xcc);
    let r = c.submit(&[Submission { readable: raw, writable: v::PROBE_SIZE + 4 }]).unwrap();
    assert_eq!(r[0].status, Some(status::OK), "The device MUST ignore field reserved of a PROBE request.");
    assert_eq!(
        c.one(Request::Probe { endpoint: 0x1234 }).unwrap(),
        Some(status::NOENT),
        "If the endpoint identified by endpoint doesn't exist, then the device SHOULD reject the request and set status to VIRTIO_IOMMU_S_NOENT."
    );
    // A properties buffer smaller than probe_size: nothing written but the status.
    let small = iommu::viommu::wire::encode(&Request::Probe { endpoint: EP });
    let r = c.submit(&[Submission { readable: small, writable: 64 + 4 }]).unwrap();
    assert_eq!(r[0].used, 68);
    assert_eq!(
        (r[0].status, &r[0].written[..64]),
        (Some(status::INVAL), &[0xa5u8; 64][..]),
        "If the properties list is smaller than probe_size, the device SHOULD NOT write any property. It SHOULD reject the request and set status to VIRTIO_IOMMU_S_INVAL."
    );
}

#[test]
fn fault_reports_are_dropped_and_counted_without_a_buffer_and_never_block() {
    let vm = vm(Some(",process=inline"));
    let mut c = start(&vm);
    engine_in_domain(&mut c, 1);
    // 64 buffers posted; 80 faults: 64 reported, the rest dropped; requests still work.
    let mut reported = 0;
    for i in 0..80u64 {
        assert_eq!(run(&vm, fill(DATA_IOVA + i * PAGE, 1)), completion::DMA_FAULT);
    }
    std::thread::sleep(Duration::from_millis(100));
    let dropped: u64 = stat(&vm, "events_dropped").parse().unwrap();
    let events: u64 = stat(&vm, "events").parse().unwrap();
    assert_eq!(events + dropped, 80, "every fault is reported or counted as dropped");
    assert_eq!(events, 64, "as many reports as buffers");
    assert_eq!(
        c.one(mapr(1, DATA_IOVA, DATA_GPA, PAGE, RW)).unwrap(),
        Some(status::OK),
        "the request queue never waited"
    );
    for f in c.faults() {
        assert_eq!((f.reason, f.endpoint), (fault::R_MAPPING, EP));
        reported += 1;
    }
    assert_eq!(reported, 64);
    // Buffers given back: the next fault is reported.
    assert_eq!(run(&vm, fill(DATA_IOVA + PAGE, 1)), completion::DMA_FAULT);
    let f = c.wait_faults(1, Duration::from_secs(5));
    assert_eq!(f.first().map(|f| f.address), Some(DATA_IOVA + PAGE));
}

/// A raw descriptor: address, length, flags, next.
type RawDesc = (u64, u32, u16, u16);

/// Publishes a raw chain (descriptors from 1000 up, out of the driver's way) on the
/// request queue; returns its head.
fn raw_chain(c: &mut Client<&Vm>, descs: &[RawDesc]) -> u16 {
    let mem = std::sync::Arc::clone(c.driver().memory());
    let q = c.driver().queue(v::REQUESTQ).unwrap();
    for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
        q.write_desc(&mem, 1000 + i as u16, *addr, *len, *flags, *next);
    }
    q.push_avail(&mem, 1000);
    q.publish(&mem);
    1000
}

#[test]
fn hostile_chains_all_come_back_and_never_stop_the_queue() {
    use abi::virtio::ring::{DESC_F_NEXT as N, DESC_F_WRITE as W};
    let vm = vm(Some(",process=inline"));
    let mut c = start(&vm);
    let mem = std::sync::Arc::clone(vm.ram().memory_arc());
    let req = 0x280_0000u64;
    let tail = req + 0x100;
    vm_memory::Bytes::write_slice(
        mem.as_ref(),
        &iommu::viommu::wire::encode(&attach(1, EP)),
        vm_memory::GuestAddress(req),
    )
    .unwrap();
    let hostile: &[(&str, &[RawDesc])] = &[
        ("too short to hold a head", &[(req, 2, N, 1001), (tail, 4, W, 0)]),
        ("no writable part", &[(req, 20, 0, 0)]),
        ("a writable part shorter than the tail", &[(req, 20, N, 1001), (tail, 2, W, 0)]),
        ("a descriptor that is its own next", &[(req, 20, N, 1000)]),
        ("a loop through the writable part", &[(req, 20, N, 1001), (tail, 4, W | N, 1001)]),
        ("a length past the end of memory", &[(req, u32::MAX, N, 1001), (tail, 4, W, 0)]),
        ("an address nothing backs", &[(0xdead_0000_0000, 20, N, 1001), (tail, 4, W, 0)]),
        ("a next past the queue", &[(req, 20, N, 5000)]),
        ("readable after writable", &[(tail, 4, W | N, 1001), (req, 20, 0, 0)]),
    ];
    for (what, descs) in hostile {
        let head = raw_chain(&mut c, descs);
        c.driver().notify(v::REQUESTQ);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let u = c.driver().queue(v::REQUESTQ).unwrap().wait_used(&mem, deadline);
        let u = u.unwrap_or_else(|| panic!("{what}: the chain never came back"));
        assert_eq!(u.head, head, "{what}");
        assert!(u.len <= 4, "{what}: used length {}", u.len);
        assert_eq!(
            c.driver().status() & abi::virtio::status::NEEDS_RESET,
            0,
            "{what}: a bad chain is not a broken queue"
        );
    }
    // The queue goes on.
    assert_eq!(c.one(attach(1, EP)).unwrap(), Some(status::OK));
    assert_eq!(c.one(mapr(1, DATA_IOVA, DATA_GPA, PAGE, RW)).unwrap(), Some(status::OK));
}

#[test]
fn a_malformed_ring_sets_needs_reset_and_notifies_a_configuration_change() {
    let vm = vm(None);
    let mem = std::sync::Arc::clone(vm.ram().memory_arc());
    let mut c =
        Client::start_with(&vm, std::sync::Arc::clone(&mem), DRV, Client::<&Vm>::linux_features(), true).unwrap();
    let q = |s: &str| common::qtest_cmd(&vm, s);
    assert_eq!(q("irq_mode viommu 2 0 vmm"), "OK", "{}", q("irq_list"));
    let config_irqs = || vm.irqs().stats(&irq::SourceId::new("viommu", 2, 0)).unwrap().vmm_delivered;
    assert_eq!(config_irqs(), 0);
    // The available index 2000 entries ahead of what the device took: not a ring.
    let avail = c.driver().queue(v::REQUESTQ).unwrap().avail;
    vm_memory::Bytes::write_obj(mem.as_ref(), 2000u16, vm_memory::GuestAddress(avail + 2)).unwrap();
    c.driver().notify(v::REQUESTQ);
    let t = std::time::Instant::now();
    while c.driver().status() & abi::virtio::status::NEEDS_RESET == 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "DEVICE_NEEDS_RESET never set");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(c.driver().isr() & 2, 2, "the ISR says: configuration change");
    // Delivered by the VMM's delivery thread: it comes, once.
    let t = std::time::Instant::now();
    while config_irqs() == 0 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(config_irqs(), 1, "the configuration-change vector fired once");
    // A reset brings it back.
    let mut c = Client::start(&vm, mem, DRV, Client::<&Vm>::linux_features()).unwrap();
    assert_eq!(c.driver().status() & abi::virtio::status::NEEDS_RESET, 0);
    assert_eq!(c.one(Request::Probe { endpoint: 0x99 }).unwrap(), Some(status::NOENT));
}

#[test]
fn its_vectors_are_interrupt_sources_switchable_on_a_live_device() {
    let vm = vm(Some(",process=inline"));
    let mem = std::sync::Arc::clone(vm.ram().memory_arc());
    let mut c = Client::start_with(&vm, mem, DRV, Client::<&Vm>::linux_features(), true).unwrap();
    let q = |s: &str| common::qtest_cmd(&vm, s);
    let list = q("irq_list");
    for n in 0..3 {
        assert!(list.contains(&format!("viommu/2/{n}=forwarded")), "{list}");
    }
    let requestq = irq::SourceId::new("viommu", 2, 1);
    let delivered = || vm.irqs().stats(&requestq).unwrap().vmm_delivered;
    assert_eq!(q("irq_mode viommu 2 1 vmm"), "OK");
    // One interrupt per kick answered (a driver that waits for each: signals that
    // come faster than the VMM takes them merge, as MSIs pending on one vector do).
    for i in 0..5u64 {
        assert_eq!(c.one(attach(1 + i as u32 % 2, EP)).unwrap(), Some(status::OK));
        let t = std::time::Instant::now();
        while delivered() < i + 1 {
            assert!(t.elapsed() < Duration::from_secs(5), "{} kicks, {} interrupts", i + 1, delivered());
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert_eq!(delivered(), 5);
    // Back to KVM while live: the VMM delivers no more.
    assert_eq!(q("irq_mode viommu 2 1 forwarded"), "OK");
    let before = delivered();
    assert_eq!(c.one(attach(1, EP)).unwrap(), Some(status::OK));
    assert_eq!(delivered(), before);
}

#[test]
fn map_and_unmap_runs_of_one_kick_reach_the_dma_core_as_one_batch() {
    let vm = vm(Some(",process=inline"));
    let mut c = start(&vm);
    assert_eq!(c.one(attach(1, EP)).unwrap(), Some(status::OK));
    let batches = |vm: &Vm| stat(vm, "batches").parse::<u64>().unwrap();
    let b0 = batches(&vm);
    let maps: Vec<Request> = (0..256).map(|i| mapr(1, DATA_IOVA + i * PAGE, DATA_GPA, PAGE, RW)).collect();
    let r = c.send(&maps).unwrap();
    assert!(r.iter().all(|r| r.status == Some(status::OK)));
    assert_eq!(batches(&vm), b0 + 1, "256 MAPs of one kick: one batch");
    assert_eq!(stat(&vm, "mappings"), "256");
    // A bad one in the middle: its own status, the rest mapped in the batch; one
    // past RAM: the batch is undone and each mapped on its own, for its own status.
    let mut mixed: Vec<Request> = (0..8).map(|i| mapr(1, 0x4000_0000 + i * PAGE, DATA_GPA, PAGE, RW)).collect();
    mixed[3] = mapr(1, DATA_IOVA, DATA_GPA, PAGE, RW);
    mixed[5] = mapr(1, 0x5000_0000, 0x10_0000_0000, PAGE, RW);
    let r = c.send(&mixed).unwrap();
    let st: Vec<Option<u8>> = r.iter().map(|r| r.status).collect();
    let ok = Some(status::OK);
    assert_eq!(st, vec![ok, ok, ok, Some(status::INVAL), ok, Some(status::FAULT), ok, ok]);
    assert_eq!(stat(&vm, "mappings"), "262");
    let b1 = batches(&vm);
    let unmaps: Vec<Request> = (0..256).map(|i| unmap(1, DATA_IOVA + i * PAGE, PAGE)).collect();
    assert!(c.send(&unmaps).unwrap().iter().all(|r| r.status == Some(status::OK)));
    assert_eq!(batches(&vm), b1 + 1, "256 UNMAPs of one kick: one batch");
    assert_eq!(stat(&vm, "mappings"), "6");
    // Another request between two runs ends the first.
    let b2 = batches(&vm);
    let r = c
        .send(&[
            mapr(1, DATA_IOVA, DATA_GPA, PAGE, RW),
            Request::Probe { endpoint: EP },
            mapr(1, DATA_IOVA + PAGE, DATA_GPA, PAGE, RW),
        ])
        .unwrap();
    assert!(r.iter().all(|r| r.status == Some(status::OK)));
    assert_eq!(batches(&vm), b2 + 2);
}

#[test]
fn requests_of_one_kick_see_the_requests_before_them() {
    // A run is batched, but each request is checked against what the ones before it
    // in the same kick did: MAP then UNMAP of one range, UNMAP then MAP, MAP twice.
    let vm = vm(Some(",process=inline"));
    let mut c = start(&vm);
    engine_in_domain(&mut c, 1);
    let a = DATA_IOVA;
    let b = DATA_IOVA + PAGE;
    let r = c
        .send(&[
            mapr(1, a, DATA_GPA, PAGE, RW),
            unmap(1, a, PAGE),
            mapr(1, a, DATA_GPA, PAGE, map::READ),
            mapr(1, b, DATA_GPA, PAGE, RW),
            mapr(1, b, DATA_GPA, PAGE, RW),
            unmap(1, b, PAGE),
            unmap(1, b, PAGE),
            mapr(1, b, DATA_GPA + PAGE, PAGE, RW),
        ])
        .unwrap();
    let st: Vec<Option<u8>> = r.iter().map(|r| r.status).collect();
    let ok = Some(status::OK);
    // The second MAP of `b` overlaps the first; an UNMAP of nothing is not an error.
    assert_eq!(st, vec![ok, ok, ok, ok, Some(status::INVAL), ok, ok, ok]);
    assert_eq!(stat(&vm, "mappings"), "3", "the ring, `a` and `b`");
    // What stands is what the last requests said: `a` read-only, `b` writable.
    assert_eq!(run(&vm, fill(a, 0x55)), completion::DMA_FAULT, "`a` was mapped again read-only");
    assert_eq!(run(&vm, fill(b, 0x66)), completion::SUCCESS);
    assert_eq!(readq(&vm, DATA_GPA + PAGE), 0x66);
    // A two-page mapping removed whole, then half of it: nothing is left to split.
    let c2 = 0x4000_0000;
    assert_eq!(c.one(mapr(1, c2, DATA_GPA, 2 * PAGE, RW)).unwrap(), ok);
    let r = c.send(&[unmap(1, c2, 2 * PAGE), unmap(1, c2, PAGE)]).unwrap();
    assert_eq!(r.iter().map(|r| r.status).collect::<Vec<_>>(), vec![ok, ok]);
    // Unless it is still there: half of a mapping is refused, and nothing removed.
    assert_eq!(c.one(mapr(1, c2, DATA_GPA, 2 * PAGE, RW)).unwrap(), ok);
    let r = c.send(&[unmap(1, b, PAGE), unmap(1, c2, PAGE)]).unwrap();
    assert_eq!(r.iter().map(|r| r.status).collect::<Vec<_>>(), vec![ok, Some(status::RANGE)]);
    assert_eq!(stat(&vm, "mappings"), "3", "the ring, `a` and the two-page one");
}

/// Starts the engine filling `iova` over and over (a ring of one descriptor, its tail
/// far ahead); returns its register base.
fn engine_fill_forever(vm: &Vm, iova: u64, pattern: u64) -> u64 {
    use abi::dma_engine::regs as r;
    let q = |s: &str| common::qtest_cmd(vm, s);
    let regs = engine_regs(vm);
    let d = Descriptor { completion: RING_IOVA + 0x800, ..fill(iova, pattern) };
    let hex: String = d.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(q(&format!("write {RING_GPA:#x} 64 0x{hex}")), "OK");
    assert_eq!(q(&format!("writel {:#x} {}", regs + r::CONTROL, abi::dma_engine::control::RESET)), "OK");
    assert_eq!(q(&format!("writeq {:#x} {RING_IOVA:#x}", regs + r::RING_BASE)), "OK");
    assert_eq!(q(&format!("writel {:#x} 1", regs + r::RING_SIZE)), "OK");
    assert_eq!(q(&format!("writel {:#x} 1", regs + r::CONTROL)), "OK");
    assert_eq!(q(&format!("writel {:#x} 1000000", regs + r::TAIL)), "OK");
    regs
}

#[test]
fn once_unmap_or_a_move_is_answered_no_dma_lands_through_the_old_mapping() {
    let vm = vm(Some(",process=inline"));
    let mut c = start(&vm);
    engine_in_domain(&mut c, 1);
    let mem = std::sync::Arc::clone(vm.ram().memory_arc());
    let marker = 0x6d61_726b_6572u64;
    let read = || vm_memory::Bytes::read_obj::<u64>(mem.as_ref(), vm_memory::GuestAddress(DATA_GPA)).unwrap();
    let write_marker = || vm_memory::Bytes::write_obj(mem.as_ref(), marker, vm_memory::GuestAddress(DATA_GPA)).unwrap();
    for round in 0..20u64 {
        // The engine fills the data page without pause; the guest unmaps it.
        assert_eq!(c.one(mapr(1, DATA_IOVA, DATA_GPA, PAGE, RW)).unwrap(), Some(status::OK));
        write_marker();
        let regs = engine_fill_forever(&vm, DATA_IOVA, 0x1000 + round);
        let t = std::time::Instant::now();
        while read() == marker {
            assert!(t.elapsed() < Duration::from_secs(5), "the engine never wrote");
            std::thread::yield_now();
        }
        assert_eq!(c.one(unmap(1, DATA_IOVA, PAGE)).unwrap(), Some(status::OK));
        write_marker();
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(read(), marker, "round {round}: a DMA through the unmapped page landed after UNMAP was answered");
        let q = |s: &str| common::qtest_cmd(&vm, s);
        assert_eq!(q(&format!("writel {:#x} 2", regs + abi::dma_engine::regs::CONTROL)), "OK");
    }
    // The same for a move: domain 2 maps the ring only.
    for round in 0..20u32 {
        let (from, to) = if round % 2 == 0 { (1, 2) } else { (2, 1) };
        let r = c.send(&[mapr(from, DATA_IOVA, DATA_GPA, PAGE, RW)]).unwrap();
        assert_eq!(r[0].status, Some(status::OK));
        write_marker();
        let regs = engine_fill_forever(&vm, DATA_IOVA, 0x2000 + u64::from(round));
        let t = std::time::Instant::now();
        while read() == marker {
            assert!(t.elapsed() < Duration::from_secs(5), "the engine never wrote");
            std::thread::yield_now();
        }
        // `to` exists only while an endpoint is in it: recreated with the ring mapped
        // right after the move (its first mapping arrives after the handover).
        let r = c.send(&[attach(to, EP), mapr(to, RING_IOVA, RING_GPA, PAGE, RW)]).unwrap();
        assert!(r.iter().all(|r| r.status == Some(status::OK)), "{r:?}");
        write_marker();
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(read(), marker, "round {round}: a DMA through the old domain landed after ATTACH was answered");
        let q = |s: &str| common::qtest_cmd(&vm, s);
        assert_eq!(q(&format!("writel {:#x} 2", regs + abi::dma_engine::regs::CONTROL)), "OK");
    }
}

#[test]
fn a_snapshot_keeps_domains_mappings_bypass_and_the_queues_where_they_were() {
    let spec = "dma-engine,dma=virtio-iommu,process=inline";
    let vm = vm(Some(",process=inline"));
    let mut c = start(&vm);
    c.write_bypass(0);
    engine_in_domain(&mut c, 3);
    assert_eq!(c.one(mapr(3, DATA_IOVA, DATA_GPA, 2 * PAGE, map::READ)).unwrap(), Some(status::OK));
    assert_eq!(c.one(mapr(3, DATA_IOVA + 4 * PAGE, DATA_GPA, PAGE, RW)).unwrap(), Some(status::OK));
    let dir = std::env::temp_dir().join(format!("passthru-viommu-snap-{}", std::process::id()));
    let vm2 = common::snapshot_and_restore(&vm, &dir, &[("dma0", spec)], config());
    let mem2 = std::sync::Arc::clone(vm2.ram().memory_arc());
    let mut c = c.moved_to(&vm2, mem2);
    assert_eq!(c.read_config().bypass, 0);
    assert_eq!(stat(&vm2, "mappings"), "3");
    let info = common::qtest_cmd(&vm2, "virtio-iommu_info domain=3");
    assert!(info.starts_with("OK kind=paging endpoints=0x8 mappings=3"), "{info}");
    // The queues go on where they were; the mappings are there with their rights.
    assert_eq!(c.one(mapr(3, DATA_IOVA, DATA_GPA, PAGE, RW)).unwrap(), Some(status::INVAL), "still mapped");
    assert_eq!(run(&vm2, fill(DATA_IOVA + 4 * PAGE, 0x99)), completion::SUCCESS);
    assert_eq!(readq(&vm2, DATA_GPA), 0x99);
    assert_eq!(run(&vm2, fill(DATA_IOVA, 1)), completion::DMA_FAULT, "read-only stays read-only");
    let f = c.wait_faults(1, Duration::from_secs(5));
    assert_eq!(
        f.first().map(|f| (f.reason, f.address)),
        Some((fault::R_MAPPING, DATA_IOVA)),
        "the event queue goes on"
    );
    assert_eq!(c.one(unmap(3, 0, v::INPUT_RANGE.1 + 1)).unwrap(), Some(status::OK));
    assert_eq!(stat(&vm2, "mappings"), "0");
}

/// Runs the `viommu` guest with the engine in `mode`; its standard output.
fn viommu_guest(mode: &str) -> String {
    let device = format!("dma-engine,dma=virtio-iommu{mode}");
    let args = ["run", "--guest", "viommu", "--memory", "64M", "--locked-memory", "64M", "--device", &device];
    let out = common::output_within(common::bin().args(args), Duration::from_secs(120));
    let (stdout, stderr) = (common::text(&out.stdout), common::text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{device}: {stdout}{stderr}");
    assert!(!stderr.contains("cannot bypass"), "64 MiB locked: boot bypass works: {stderr}");
    for line in [
        "viommu: endpoint 0x8: MSI doorbell 0xfee00000..0xfeefffff reserved",
        "viommu: 3 strict transfers in domain 1 (map, copy, unmap)",
        "viommu: moved from domain 1 to 2 without DETACH, transfers go on",
        "viommu: 4 transfers,",
    ] {
        assert!(stdout.contains(line), "{device}: {line} in {stdout}");
    }
    stdout
}

#[test]
fn the_viommu_guest_with_the_engine_in_the_vmm_sees_every_fault_reported() {
    vmm::require_kvm!();
    let out = viommu_guest(",process=inline");
    for why in ["unmapped", "read-only", "mapped only in the old domain"] {
        assert!(out.contains(&format!("({why}) faulted, memory untouched, reported")), "{why}: {out}");
    }
}

#[test]
fn the_viommu_guest_with_the_engine_in_its_own_process() {
    vmm::require_kvm!();
    for mode in ["", ",iommu-mode=messages"] {
        let out = viommu_guest(mode);
        // The device process refuses an IOVA it was never given by itself (vfio-user
        // allows DMA_READ/DMA_WRITE only of exported ranges); a write to a read-only
        // window reaches the VMM, which refuses and reports it.
        assert!(out.contains("(unmapped) faulted, memory untouched, not reported"), "{mode}: {out}");
        assert!(out.contains("(read-only) faulted, memory untouched, reported"), "{mode}: {out}");
        assert!(
            out.contains("(mapped only in the old domain) faulted, memory untouched, not reported"),
            "{mode}: {out}"
        );
    }
}

#[test]
fn the_request_queue_is_answered_before_the_notification_returns_and_waits_while_paused() {
    use abi::virtio::ring::{DESC_F_NEXT as N, DESC_F_WRITE as W};
    let vm = vm(Some(",process=inline"));
    let mut c = start(&vm);
    let mem = std::sync::Arc::clone(vm.ram().memory_arc());
    let (req, tail) = (0x280_0000u64, 0x280_0100u64);
    let write_req = |r: &Request| {
        vm_memory::Bytes::write_slice(mem.as_ref(), &iommu::viommu::wire::encode(r), vm_memory::GuestAddress(req))
            .unwrap();
    };
    let len = |r: &Request| iommu::viommu::wire::encode(r).len() as u32;
    // No ioeventfd for the request queue: the notifying thread (a vCPU, here this one)
    // runs it, so the answer is in the used ring when the write returns, as Linux's
    // driver, spinning on the ring, wants it.
    for round in 0..50u32 {
        let r = attach(1 + round % 3, EP);
        write_req(&r);
        let head = raw_chain(&mut c, &[(req, len(&r), N, 1001), (tail, 4, W, 0)]);
        c.driver().notify(v::REQUESTQ);
        let u = c.driver().queue(v::REQUESTQ).unwrap().take_used(&mem);
        assert_eq!(u.map(|u| (u.head, u.len)), Some((head, 4)), "round {round}: answered before notify returned");
    }
    // Paused, the VM's queues take no work; what was notified is answered at resume.
    let r = mapr(1 + 49 % 3, DATA_IOVA, DATA_GPA, PAGE, RW); // the domain of the last round
    write_req(&r);
    assert!(vm.pause().unwrap().is_empty());
    let head = raw_chain(&mut c, &[(req, len(&r), N, 1001), (tail, 4, W, 0)]);
    c.driver().notify(v::REQUESTQ);
    std::thread::sleep(Duration::from_millis(20));
    assert!(c.driver().queue(v::REQUESTQ).unwrap().take_used(&mem).is_none(), "no request is answered while paused");
    assert_eq!(stat(&vm, "mappings"), "0");
    vm.resume().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let u = c.driver().queue(v::REQUESTQ).unwrap().wait_used(&mem, deadline);
    assert_eq!(u.map(|u| (u.head, u.len)), Some((head, 4)), "answered at resume");
    assert_eq!(readq(&vm, tail) & 0xff, u64::from(status::OK));
    assert_eq!(stat(&vm, "mappings"), "1");
}

#[test]
fn bench_viommu_reports_every_figure() {
    let svg = std::env::temp_dir().join(format!("passthru-viommu-{}.svg", std::process::id()));
    let (table, v) =
        common::bench_json(&["viommu", "--requests", "256", "--ios", "8", "--plot", svg.to_str().unwrap()]);
    let chart = std::fs::read_to_string(&svg).unwrap();
    let _ = std::fs::remove_file(&svg);
    assert!(chart.starts_with("<svg") && chart.contains("device in the VMM") && chart.contains("device process"));
    for key in [
        "map_ns",
        "unmap_ns",
        "map_ns_kick256",
        "unmap_ns_kick256",
        "map_ns_device_process",
        "unmap_ns_device_process",
        "translate_viommu_ns",
        "translate_pvdma_ns",
    ] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key}: {table}");
    }
    // A device process answers an UNMAP only when its DMA_UNMAP is acknowledged.
    assert!(v["unmap_ns_device_process"].as_f64().unwrap() > v["unmap_ns"].as_f64().unwrap(), "{table}");
    let strict = v["strict"].as_array().unwrap();
    assert_eq!(strict.len(), 8, "4 sizes x 2 device modes: {table}");
    for s in strict {
        let (id, st) = (s["identity_ns_per_io"].as_f64().unwrap(), s["strict_ns_per_io"].as_f64().unwrap());
        assert!(id > 0.0 && st > 0.0, "{s}");
    }
    assert!(table.contains("strict 4 KiB I/O x identity, device in the VMM"), "{table}");
    assert!(table.contains("<= 300"), "the goal is shown: {table}");
}
