//! "How to add a front-end" for a *device* front-end, done in this file alone: when a
//! VM builds it, it plugs a PCI function of its own at a fixed slot, with one register
//! that moves every endpoint on it between two domains. Registered with one line, it
//! is chosen by `dma=switch`, shows in qtest `frontend_stats`, `--stats` and
//! `vm.counters`, is saved and restored by a snapshot, and a DMA engine observes its
//! switch: once the register write returns, the old domain is unreachable.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
use common::qpci;

use abi::dma_engine::{Descriptor, completion, op};
use abi::pci::reg;
use dma::{Domain, Endpoint, Gpa, Iova, Perm};
use iommu::Registration;
use iommu::{Context, Device, Frontend, FrontendError, Stats};
use pci::bar::{BarKind, BarSpec, Bars};
use pci::{BarWindow, ConfigSpace, PciFunction};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;
use vm_api::{ComponentError, Section, Snapshottable};
use vmm::{AccelKind, Vm, VmConfig};

/// The slot the front-end's function is plugged at.
const SLOT: u8 = 30;
/// The ring and completion records, at the same IOVA in both domains.
const RING: u64 = 0x30_0000;
const DONE: u64 = 0x31_0000;
/// Domain A maps IOVA `A_IOVA` to `A_GPA`, domain B `B_IOVA` to `B_GPA` (1 MiB each).
const A_IOVA: u64 = 0x4000_0000;
const A_GPA: u64 = 0x10_0000;
const B_IOVA: u64 = 0x5000_0000;
const B_GPA: u64 = 0x20_0000;
const MIB: u64 = 1 << 20;

struct Switch {
    domains: [Arc<Domain>; 2],
    state: Mutex<SwitchState>,
    /// Faults the DMA core reported in its domains (its fault handler).
    faults: Arc<std::sync::atomic::AtomicU64>,
}

/// Counts the faults of the front-end's domains (never blocks: one atomic add).
struct CountFaults(Arc<std::sync::atomic::AtomicU64>);

impl dma::FaultHandler for CountFaults {
    fn fault(&self, _fault: &dma::Fault) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[derive(Default)]
struct SwitchState {
    selected: usize,
    switches: u64,
    endpoints: BTreeMap<u16, Endpoint>,
}

impl Switch {
    /// Moves every endpoint to domain `to`; when this returns no access through the
    /// other one is in flight or can start.
    fn select(&self, to: usize) {
        let mut st = self.state.lock().unwrap();
        if st.selected == to {
            return;
        }
        for ep in st.endpoints.values() {
            let _ = ep.attach(Some(Arc::clone(&self.domains[to])));
        }
        st.selected = to;
        st.switches += 1;
    }
}

/// The PCI function: BAR 0 holds one register, the selected domain (0 or 1).
struct SwitchFn {
    config: Mutex<(ConfigSpace, Bars)>,
    switch: Arc<Switch>,
}

impl PciFunction for SwitchFn {
    fn name(&self) -> &str {
        "switch"
    }
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        let c = self.config.lock().unwrap();
        if (reg::BAR0..reg::BAR0 + 24).contains(&offset) && data.len() == 4 {
            data.copy_from_slice(&c.1.read(usize::from((offset - reg::BAR0) / 4)).to_le_bytes());
        } else {
            c.0.read(offset, data);
        }
    }
    fn config_write(&self, offset: u16, data: &[u8]) {
        let mut c = self.config.lock().unwrap();
        if (reg::BAR0..reg::BAR0 + 24).contains(&offset) && data.len() == 4 {
            c.1.write(usize::from((offset - reg::BAR0) / 4), u32::from_le_bytes(data.try_into().unwrap()));
        } else if offset == reg::COMMAND {
            c.0.set(offset, data);
        }
    }
    fn windows(&self) -> Vec<BarWindow> {
        let c = self.config.lock().unwrap();
        c.1.decoded(c.0.u16(reg::COMMAND))
            .into_iter()
            .map(|(s, addr)| BarWindow { bar: s.index, io: false, addr, size: s.size, mapped: Vec::new() })
            .collect()
    }
    fn bar_read(&self, _bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            data[0] = self.switch.state.lock().unwrap().selected as u8;
        }
    }
    fn bar_write(&self, _bar: u8, offset: u64, data: &[u8]) {
        if offset == 0 && !data.is_empty() {
            self.switch.select(usize::from(data[0] & 1));
        }
    }
}

impl Frontend for Switch {
    fn name(&self) -> &'static str {
        "switch"
    }
    fn attach(&self, device: &Device) -> Result<(), FrontendError> {
        let mut st = self.state.lock().unwrap();
        device
            .endpoint
            .attach(Some(Arc::clone(&self.domains[st.selected])))
            .map_err(|e| FrontendError::Refused(e.to_string()))?;
        st.endpoints.insert(device.id, device.endpoint.clone());
        Ok(())
    }
    fn detach(&self, id: u16) {
        self.state.lock().unwrap().endpoints.remove(&id);
    }
    fn stats(&self) -> Stats {
        let st = self.state.lock().unwrap();
        Stats::new()
            .total("switches", st.switches)
            .gauge("selected", st.selected as u64)
            .gauge("devices", st.endpoints.len() as u64)
            .total("faults", self.faults.load(std::sync::atomic::Ordering::Relaxed))
    }
    fn device_stats(&self, id: u16) -> Option<Stats> {
        let st = self.state.lock().unwrap();
        st.endpoints.contains_key(&id).then(|| Stats::new().gauge("selected", st.selected as u64))
    }
    fn state(&self) -> Option<&dyn Snapshottable> {
        Some(self)
    }
}

impl Snapshottable for Switch {
    fn id(&self) -> String {
        "frontend/switch".into()
    }
    fn save(&self) -> Result<Option<Section>, ComponentError> {
        let st = self.state.lock().unwrap();
        Section::new(&self.id(), 1, &(st.selected, st.switches)).map(Some)
    }
    fn restore(&self, section: &Section) -> Result<(), ComponentError> {
        let (selected, switches): (usize, u64) = section.read(&self.id(), 1)?;
        self.select(selected.min(1));
        self.state.lock().unwrap().switches = switches;
        Ok(())
    }
}

fn build(ctx: &Context) -> Result<Arc<dyn Frontend>, FrontendError> {
    let domain = |name: &str, iova: u64, gpa: u64| -> Result<Arc<Domain>, FrontendError> {
        let d = ctx.dma.create_domain(name, dma::DomainConfig::default());
        let map =
            |i, g, s| d.map(Iova(i), Gpa(g), s, Perm::READ_WRITE).map_err(|e| FrontendError::Build(e.to_string()));
        map(RING, RING, 2 * 0x1_0000)?;
        map(iova, gpa, MIB)?;
        Ok(d)
    };
    let faults = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let domains = [domain("switch-a", A_IOVA, A_GPA)?, domain("switch-b", B_IOVA, B_GPA)?];
    for d in &domains {
        d.on_fault(Some(Arc::new(CountFaults(Arc::clone(&faults)))));
    }
    let switch = Arc::new(Switch { domains, state: Mutex::new(SwitchState::default()), faults });
    let space = pci::config::Builder::new(0x1b36, 0x00ff, 0x0880, 0).build();
    let bars = Bars::new(&[BarSpec { index: 0, kind: BarKind::Mem32 { prefetch: false }, size: 0x1000 }]).unwrap();
    let function = Arc::new(SwitchFn { config: Mutex::new((space, bars)), switch: Arc::clone(&switch) });
    ctx.pci.plug_at(SLOT, function).map_err(|e| FrontendError::Build(e.to_string()))?;
    Ok(switch)
}

const REGISTRATION: Registration =
    Registration { name: "switch", help: "a device front-end of this test", build, params: &[], tools: &[] };

fn register() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| iommu::registry::register(REGISTRATION).unwrap());
}

fn config() -> VmConfig {
    let mut c = VmConfig::new(AccelKind::Qtest);
    c.memory = 32 << 20;
    c.locked_memory = Some(64 << 20);
    c.frontends = vec!["switch".into()];
    c.serial_out = Box::new(std::io::sink());
    c.err_out = Box::new(std::io::sink());
    c
}

/// Runs `d` on the engine in slot 1 (its registers at `regs`).
fn run(vm: &Vm, regs: u64, d: Descriptor) -> u32 {
    common::run_descriptor(
        &mut |c| common::qtest_cmd(vm, c),
        regs,
        RING,
        RING,
        DONE,
        Descriptor { completion: DONE, ..d },
    )
}

fn fill(dst: u64, pattern: u64) -> Descriptor {
    Descriptor { op: op::FILL, dst, len: 0x1000, pattern, ..Default::default() }
}

#[test]
fn a_device_front_end_plugs_its_function_and_its_switch_is_observed_by_a_dma_engine() {
    register();
    let vm = Vm::new(config()).unwrap();
    let q = |c: &str| common::qtest_cmd(&vm, c);
    // Its function is on the bus before any device attaches.
    assert!(q("pci_list").contains(&format!("00:{SLOT:02x}.0 1b36:00ff")), "{}", q("pci_list"));
    let spec = "dma-engine,dma=switch,process=inline";
    passthru::device::attach(&vm, &passthru::device::parse_device(spec).unwrap()).unwrap();
    qpci::enable(&mut |c| q(c), 1);
    qpci::enable(&mut |c| q(c), SLOT);
    let regs = qpci::bar(&mut |c| q(c), 1, 0);
    let switch_reg = qpci::bar(&mut |c| q(c), SLOT, 0);
    // Domain A: the engine reaches A's window; B's is not mapped.
    assert_eq!(run(&vm, regs, fill(A_IOVA, 0xaaaa)), completion::SUCCESS);
    assert_eq!(q(&format!("readq {A_GPA:#x}")), "OK 0x000000000000aaaa");
    assert_eq!(run(&vm, regs, fill(B_IOVA, 1)), completion::DMA_FAULT);
    // The engine fills A's window over and over while the guest switches to B: once
    // the register write returns, nothing more lands through A.
    assert_eq!(q(&format!("writeq {RING:#x} 0")), "OK");
    let d = Descriptor { completion: DONE, ..fill(A_IOVA, 0x5555) };
    let hex: String = d.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(q(&format!("write {RING:#x} 64 0x{hex}")), "OK");
    assert_eq!(q(&format!("writel {:#x} 100000", regs + abi::dma_engine::regs::TAIL)), "OK");
    assert_eq!(q(&format!("writel {switch_reg:#x} 1")), "OK");
    assert_eq!(q(&format!("writeq {A_GPA:#x} 0x1111")), "OK");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(q(&format!("readq {A_GPA:#x}")), "OK 0x0000000000001111", "a DMA through the old domain landed");
    assert_eq!(q(&format!("readl {switch_reg:#x}")), "OK 0x0000000000000001");
    // Stop the engine's run (a reset), then B works and A faults.
    assert_eq!(
        q(&format!("writel {:#x} {}", regs + abi::dma_engine::regs::CONTROL, abi::dma_engine::control::RESET)),
        "OK"
    );
    assert_eq!(run(&vm, regs, fill(B_IOVA, 0xbbbb)), completion::SUCCESS);
    assert_eq!(q(&format!("readq {B_GPA:#x}")), "OK 0x000000000000bbbb");
    assert_eq!(run(&vm, regs, fill(A_IOVA, 2)), completion::DMA_FAULT);
    // Its statistics, the same value everywhere.
    // The faults its domains saw (the engine's refused accesses) reached it.
    let stats = q("frontend_stats switch");
    assert!(stats.starts_with("OK switches=1 selected=1 devices=1 faults="), "{stats}");
    let faults: u64 = stats.rsplit('=').next().unwrap().parse().unwrap();
    assert!(faults >= 2, "the DMA core told the front-end of its domains' faults: {stats}");
    assert!(passthru::run::stats_report(&vm).contains("DMA front-end switch: switches=1 selected=1 devices=1"));
    let c = passthru::control::counters(&vm);
    assert_eq!(c["frontends"]["switch"]["switches"].as_u64(), Some(1));
    // A snapshot keeps the selection: restored, the engine is on B.
    let dir = std::env::temp_dir().join(format!("passthru-switch-snap-{}", std::process::id()));
    let vm2 = common::snapshot_and_restore(&vm, &dir, &[("dma0", spec)], config());
    let q2 = |c: &str| common::qtest_cmd(&vm2, c);
    assert_eq!(q2(&format!("readl {switch_reg:#x}")), "OK 0x0000000000000001");
    assert!(q2("frontend_stats switch").starts_with("OK switches=1 selected=1 devices=1"));
    assert_eq!(run(&vm2, regs, fill(B_IOVA + 0x1000, 0xcccc)), completion::SUCCESS);
    assert_eq!(run(&vm2, regs, fill(A_IOVA, 3)), completion::DMA_FAULT);
}
