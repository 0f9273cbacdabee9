//! The seam every DMA front-end plugs into, proven by a front-end that exists only in
//! this file: registered by name, it is reachable from the `--device ...,dma=NAME`
//! parser, owns a hypercall block, attaches a device's endpoint to a domain it
//! programs, and shows in qtest `frontend_stats` and in `--stats`. Nothing in `vmm`,
//! `iommu` or `passthru` names it.
#![allow(clippy::unwrap_used, missing_docs)]

use abi::hcall::{Args, Ret, Status};
use dma::{Domain, Gpa, Iova, Perm, VmDma};
use iommu::frontend::{Context, Device, Frontend, Registration};
use std::collections::BTreeMap;
use std::io::BufReader;
use std::sync::{Arc, Mutex, Once};
use vmm::qtest::{self, SharedOut};
use vmm::{AccelKind, Vm, VmConfig};

/// Its hypercall block: `TOY_MAP(device, gpa)` maps one page at IOVA = gpa + 1 GiB.
const TOY_BASE: u64 = 0x7000;
const TOY_MAP: u64 = TOY_BASE;
const OFFSET: u64 = 1 << 30;

struct Toy {
    dma: Arc<VmDma>,
    devices: Mutex<BTreeMap<u16, Arc<Domain>>>,
}

impl Frontend for Toy {
    fn name(&self) -> &str {
        "toy"
    }
    fn attach(&self, device: &Device) -> Result<(), String> {
        let d = self.dma.create_domain(&device.name, dma::DomainConfig::default());
        device.endpoint.attach(Some(Arc::clone(&d))).map_err(|e| e.to_string())?;
        self.devices.lock().unwrap().insert(device.id, d);
        Ok(())
    }
    fn detach(&self, id: u16) {
        if let Some(d) = self.devices.lock().unwrap().remove(&id) {
            d.unmap_all();
        }
    }
    fn stats(&self) -> String {
        let devs = self.devices.lock().unwrap();
        format!("devices={} mappings={}", devs.len(), devs.values().map(|d| d.mapping_count()).sum::<usize>())
    }
    fn device_stats(&self, id: u16) -> Option<String> {
        self.devices.lock().unwrap().get(&id).map(|d| format!("mappings={}", d.mapping_count()))
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
            Some(Ok(())) => Ret::ok(a.a[1] + OFFSET, 0, 0),
            _ => Ret::err(Status::InvalidArgument),
        }
    }
}

fn build(ctx: &Context) -> Result<Arc<dyn Frontend>, String> {
    let toy = Arc::new(Toy { dma: Arc::clone(&ctx.dma), devices: Mutex::new(BTreeMap::new()) });
    ctx.hypercalls
        .register(TOY_BASE, Arc::clone(&toy) as Arc<dyn vm_api::HypercallHandler>)
        .map_err(|e| e.to_string())?;
    Ok(toy)
}

fn register_toy() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        iommu::frontend::register(Registration { name: "toy", help: "a front-end of this test", build, params: &[] })
            .unwrap();
    });
}

#[test]
fn a_front_end_defined_in_a_test_is_reachable_from_the_cli_qtest_and_stats() {
    register_toy();
    // The command line's parser knows it, and lists it in its errors.
    let arg = passthru::device::parse_device("dma-engine,dma=toy,process=inline").unwrap();
    let err = passthru::device::parse_device("dma-engine,dma=nope").unwrap_err();
    assert!(err.contains("identity, pvdma, tce, toy"), "{err}");
    let mut c = VmConfig::new(AccelKind::Qtest);
    c.memory = 32 << 20;
    c.serial_out = Box::new(std::io::sink());
    c.err_out = Box::new(std::io::sink());
    let vm = Vm::new(c).unwrap();
    passthru::device::attach(&vm, &arg).unwrap();
    let dev = vm.device("dma0").unwrap();
    assert_eq!(dev.frontend().name(), "toy");
    // A guest (here the qtest port) programs it through its own hypercall block; with
    // bus mastering on, the device translates through the toy's domain.
    let script = format!(
        "writew 0xe0008004 0x6\nhcall {TOY_MAP:#x} {} 0x100000\nfrontend_stats toy\nfrontend_stats toy dma0\ndev_info dma0\n",
        dev.bdf()
    );
    let out = Arc::new(Mutex::new(Vec::<u8>::new()));
    struct W(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for W {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let shared: SharedOut = Arc::new(Mutex::new(Box::new(W(Arc::clone(&out)))));
    qtest::serve(&vm, BufReader::new(script.as_bytes()), shared).unwrap();
    let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[1], format!("OK 0x0 {:#x} 0x0 0x0", 0x100000 + OFFSET), "the toy's hypercall");
    assert_eq!(lines[2], "OK devices=1 mappings=1");
    assert_eq!(lines[3], "OK mappings=1");
    assert!(
        lines[4].contains("frontend=toy") && lines[4].contains("bus_master=1") && lines[4].contains("mappings=1"),
        "{}",
        lines[4]
    );
    assert_eq!(dev.endpoint().lookup(Iova(0x100000 + OFFSET)).map(|m| m.gpa), Some(Gpa(0x100000)));
    // --stats shows it with the built-in ones.
    let stats = passthru::run::stats_report(&vm);
    assert!(stats.contains("passthru: DMA front-end toy: devices=1 mappings=1"), "{stats}");
    // A device that leaves is forgotten by it.
    vm.detach_device("dma0").unwrap();
    assert_eq!(vm.frontends().get("toy").unwrap().stats(), "devices=0 mappings=0");
    let report = passthru::run::stats_report(&vm);
    assert!(report.contains("DMA front-ends unused: identity, pvdma, tce, toy"), "{report}");
}
