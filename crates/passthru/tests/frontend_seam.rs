//! "How to add a front-end", done in this file alone: a front-end with a hypercall
//! block, registered with one line, is reachable from the `--device ...,dma=NAME`
//! parser, attaches a device's endpoint to a domain it programs, shows in qtest
//! `frontend_stats`, `--stats` and `vm.counters`, and is saved and restored by a
//! snapshot (its own typed, versioned section). Nothing in `vmm`, `iommu` or
//! `passthru` names it.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use abi::hcall::{Args, Ret, Status};
use dma::{Domain, Gpa, Iova, Perm, VmDma};
use iommu::Registration;
use iommu::{Context, Device, Frontend, FrontendError, Stats};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Once};
use vm_api::{ComponentError, Section, Snapshottable};
use vmm::{AccelKind, Vm, VmConfig};

/// Its hypercall block: `TOY_MAP(device, gpa)` maps one page at IOVA = gpa + 1 GiB.
const TOY_BASE: u64 = 0x7000;
const TOY_MAP: u64 = TOY_BASE;
const OFFSET: u64 = 1 << 30;

struct Toy {
    dma: Arc<VmDma>,
    devices: Mutex<BTreeMap<u16, Arc<Domain>>>,
    maps: std::sync::atomic::AtomicU64,
}

/// What a snapshot holds of it: each device's pages, and its counter.
#[derive(serde::Serialize, serde::Deserialize)]
struct ToyState {
    pages: BTreeMap<u16, Vec<u64>>,
    maps: u64,
}

impl Frontend for Toy {
    fn name(&self) -> &'static str {
        "toy"
    }
    fn attach(&self, device: &Device) -> Result<(), FrontendError> {
        let d = self.dma.create_domain(&device.name, dma::DomainConfig::default());
        device.endpoint.attach(Some(Arc::clone(&d))).map_err(|e| FrontendError::Refused(e.to_string()))?;
        self.devices.lock().unwrap().insert(device.id, d);
        Ok(())
    }
    fn detach(&self, id: u16) {
        if let Some(d) = self.devices.lock().unwrap().remove(&id) {
            d.unmap_all();
        }
    }
    fn stats(&self) -> Stats {
        let devs = self.devices.lock().unwrap();
        Stats::new()
            .gauge("devices", devs.len() as u64)
            .gauge("mappings", devs.values().map(|d| d.mapping_count() as u64).sum())
            .total("maps", self.maps.load(std::sync::atomic::Ordering::Relaxed))
    }
    fn device_stats(&self, id: u16) -> Option<Stats> {
        self.devices.lock().unwrap().get(&id).map(|d| Stats::new().gauge("mappings", d.mapping_count() as u64))
    }
    fn state(&self) -> Option<&dyn Snapshottable> {
        Some(self)
    }
}

impl Snapshottable for Toy {
    fn id(&self) -> String {
        "frontend/toy".into()
    }
    fn save(&self) -> Result<Option<Section>, ComponentError> {
        let pages = self
            .devices
            .lock()
            .unwrap()
            .iter()
            .map(|(id, d)| (*id, d.mappings().iter().map(|m| m.gpa.0).collect()))
            .collect();
        Section::new(&self.id(), 1, &ToyState { pages, maps: self.maps.load(std::sync::atomic::Ordering::Relaxed) })
            .map(Some)
    }
    fn restore(&self, section: &Section) -> Result<(), ComponentError> {
        let s: ToyState = section.read(&self.id(), 1)?;
        let devs = self.devices.lock().unwrap();
        for (id, pages) in s.pages {
            let d = devs.get(&id).ok_or_else(|| ComponentError::new(self.id(), format!("no device {id:#x}")))?;
            for gpa in pages {
                d.map(Iova(gpa + OFFSET), Gpa(gpa), 4096, Perm::READ_WRITE)
                    .map_err(|e| ComponentError::new(self.id(), e.to_string()))?;
            }
        }
        self.maps.store(s.maps, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

impl vm_api::HypercallHandler for Toy {
    fn name(&self) -> &str {
        "toy"
    }
    fn call(&self, a: &Args) -> Ret {
        if a.nr != TOY_MAP {
            return Ret::err(Status::UnknownCall);
        }
        let Ok(id) = u16::try_from(a.a[0]) else { return Ret::err(Status::InvalidArgument) };
        let Some(d) = self.devices.lock().unwrap().get(&id).cloned() else { return Ret::err(Status::NotAssigned) };
        match a.a[1].checked_add(OFFSET).map(|iova| d.map(Iova(iova), Gpa(a.a[1]), 4096, Perm::READ_WRITE)) {
            Some(Ok(())) => {
                self.maps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ret::ok(a.a[1] + OFFSET, 0, 0)
            }
            _ => Ret::err(Status::InvalidArgument),
        }
    }
}

const REGISTRATION: Registration = Registration {
    name: "toy",
    help: "a front-end of this test",
    build: |ctx: &Context| {
        let toy = Arc::new(Toy {
            dma: Arc::clone(&ctx.dma),
            devices: Mutex::new(BTreeMap::new()),
            maps: std::sync::atomic::AtomicU64::new(0),
        });
        ctx.hypercalls
            .register(TOY_BASE, Arc::clone(&toy) as Arc<dyn vm_api::HypercallHandler>)
            .map_err(|e| FrontendError::Build(e.to_string()))?;
        Ok(toy)
    },
    params: &[],
    tools: &[],
};

fn register_toy() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| iommu::registry::register(REGISTRATION).unwrap());
}

fn config() -> VmConfig {
    let mut c = VmConfig::new(AccelKind::Qtest);
    c.memory = 32 << 20;
    c.serial_out = Box::new(std::io::sink());
    c.err_out = Box::new(std::io::sink());
    c
}

#[test]
fn a_front_end_defined_in_a_test_is_reachable_from_the_cli_qtest_stats_and_snapshots() {
    register_toy();
    // The command line's parser knows it, and lists it in its errors.
    let spec = "dma-engine,dma=toy,process=inline";
    let arg = passthru::device::parse_device(spec).unwrap();
    let err = passthru::device::parse_device("dma-engine,dma=nope").unwrap_err();
    assert!(err.contains("identity, pvdma, tce, virtio-iommu, toy"), "{err}");
    let vm = Vm::new(config()).unwrap();
    assert!(vm.frontends().get("toy").is_none(), "built only in a VM that uses it");
    passthru::device::attach(&vm, &arg).unwrap();
    let dev = vm.device("dma0").unwrap();
    assert_eq!(dev.frontend().name(), "toy");
    assert!(vm.frontends().get("pvdma").is_none(), "front-ends no device uses are not built");
    // A guest (here the qtest port) programs it through its own hypercall block; with
    // bus mastering on, the device translates through the toy's domain.
    let q = |c: &str| common::qtest_cmd(&vm, c);
    assert_eq!(q("writew 0xe0008004 0x6"), "OK");
    assert_eq!(
        q(&format!("hcall {TOY_MAP:#x} {} 0x100000", dev.bdf())),
        format!("OK 0x0 {:#x} 0x0 0x0", 0x100000 + OFFSET)
    );
    assert_eq!(q("frontend_stats toy"), "OK devices=1 mappings=1 maps=1");
    assert_eq!(q("frontend_stats toy dma0"), "OK mappings=1");
    let info = q("dev_info dma0");
    assert!(
        info.contains("frontend=toy") && info.contains("bus_master=1") && info.contains("frontend.mappings=1"),
        "{info}"
    );
    assert_eq!(dev.endpoint().lookup(Iova(0x100000 + OFFSET)).map(|m| m.gpa), Some(Gpa(0x100000)));
    // --stats and vm.counters show it from the same value: a gauge and a total.
    let stats = passthru::run::stats_report(&vm);
    assert!(stats.contains("passthru: DMA front-end toy: devices=1 mappings=1 maps=1"), "{stats}");
    let c = passthru::control::counters(&vm);
    assert_eq!(
        (c["frontends"]["toy"]["maps"].as_u64(), c["frontend_kinds"]["toy"]["mappings"].as_str()),
        (Some(1), Some("gauge"))
    );
    // A snapshot saves its section; a new VM gets the device and the mapping back.
    let dir = std::env::temp_dir().join(format!("passthru-toy-snap-{}", std::process::id()));
    let vm2 = common::snapshot_and_restore(&vm, &dir, &[("dma0", spec)], config());
    let dev2 = vm2.device("dma0").unwrap();
    assert_eq!(dev2.endpoint().lookup(Iova(0x100000 + OFFSET)).map(|m| m.gpa), Some(Gpa(0x100000)), "restored");
    assert_eq!(common::qtest_cmd(&vm2, "frontend_stats toy"), "OK devices=1 mappings=1 maps=1");
    // A device that leaves is forgotten by it.
    vm.detach_device("dma0").unwrap();
    assert_eq!(vm.frontends().get("toy").unwrap().stats().words(), "devices=0 mappings=0 maps=1");
}
