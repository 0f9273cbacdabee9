//! The identity front-end as a memory listener: it follows RAM and RAM-device regions
//! as they come and go, refuses misaligned RAM, skips misaligned device memory with a
//! report, survives a BAR it cannot map, fails its devices (and only them) when RAM
//! cannot be mapped at run time, and keeps devices out of RAM beyond the DMA window.
#![allow(clippy::unwrap_used, missing_docs)]

use dma::{Endpoint, Iova, LockedMemory, MapObserver, Mapping, VmDma};
use iommu::frontend::{Context, Device, Frontend};
use iommu::identity::Identity;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vm_api::{HypercallRegistry, MemoryListener, MemoryMap, Region, RegionKind};
use vm_memory::{GuestAddress, GuestMemoryMmap};

const MIB: u64 = 1 << 20;

struct Machine {
    vm: Arc<VmDma>,
    map: Arc<MemoryMap>,
    identity: Arc<Identity>,
    /// Host memory of regions added by the test (kept alive here too).
    _keep: Vec<Arc<Vec<u8>>>,
}

fn machine(limit: u64, window: std::ops::Range<u64>) -> Machine {
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 * MIB as usize)]).unwrap());
    let vm = VmDma::new(Arc::clone(&mem), LockedMemory::new(limit));
    let map = Arc::new(MemoryMap::new());
    map.add_listener(Arc::clone(&vm) as Arc<dyn MemoryListener>).unwrap();
    let mut ctx =
        Context::standalone(Arc::clone(&vm), mem, Arc::clone(&map), Arc::new(HypercallRegistry::new())).unwrap();
    ctx.dma_window = window;
    let identity = Identity::new(&ctx);
    Machine { vm, map, identity, _keep: Vec::new() }
}

impl Machine {
    fn add(&mut self, gpa: u64, size: u64, kind: RegionKind) -> Result<(), vm_api::memory::MapError> {
        let v = Arc::new(vec![0u8; size as usize]);
        let host = v.as_ptr() as *mut u8;
        self._keep.push(Arc::clone(&v));
        let keep: Arc<dyn std::any::Any + Send + Sync> = v;
        // SAFETY: `host` points into `v`, kept alive by the region and by the machine.
        let r = unsafe { Region::from_raw(gpa, size, kind, host, None, Some(keep)) };
        self.map.add_region(r)
    }

    fn ram(&mut self, gpa: u64, size: u64) -> Result<(), vm_api::memory::MapError> {
        self.add(gpa, size, RegionKind::Ram)
    }

    fn bar(&mut self, gpa: u64, size: u64) -> Result<(), vm_api::memory::MapError> {
        self.add(gpa, size, RegionKind::RamDevice { device: "peer".into() })
    }

    fn stat(&self, key: &str) -> u64 {
        let s = self.identity.stats();
        match s.get(key) {
            Some(iommu::StatValue::Total(n) | iommu::StatValue::Gauge(n)) => *n,
            _ => panic!("{key} in {s}"),
        }
    }
}

/// A device on the identity front-end; `failed` says whether it was failed.
fn device(m: &Machine, id: u16) -> (Endpoint, Arc<AtomicBool>) {
    let ep = Endpoint::new(&m.vm, &format!("dev{id}"));
    let failed = Arc::new(AtomicBool::new(false));
    let f = Arc::clone(&failed);
    let dev = Device {
        id,
        name: format!("dev{id}"),
        endpoint: ep.clone(),
        fail: Arc::new(move |_| f.store(true, Ordering::SeqCst)),
        params: vec![],
    };
    m.identity.attach(&dev).unwrap();
    (ep, failed)
}

fn mapped(ep: &Endpoint, gpa: u64) -> bool {
    ep.lookup(Iova(gpa)).is_some()
}

#[test]
fn regions_are_mapped_and_unmapped_as_the_map_changes() {
    let mut m = machine(u64::MAX, 0..1 << 48);
    m.ram(0, 16 * MIB).unwrap(); // the VM's RAM, as the VMM adds it
    let (ep, _) = device(&m, 8);
    assert!(mapped(&ep, 0x1000), "RAM present at attach is mapped (replay)");
    assert_eq!(m.vm.account().pinned(), 16 * MIB, "pinned once");
    let (ep2, _) = device(&m, 16);
    assert_eq!(m.vm.account().pinned(), 16 * MIB, "a second device shares the domain: no second pin");
    // RAM hot-add and a BAR appear; a BAR moves; RAM goes away.
    m.ram(1 << 32, 2 * MIB).unwrap();
    m.bar(0xc001_0000, 0xe000).unwrap();
    assert!(mapped(&ep, 1 << 32) && mapped(&ep2, 0xc001_0000), "hot-added RAM and the BAR are reachable");
    assert_eq!(m.vm.account().pinned(), 18 * MIB, "BAR memory is not pinned: it is not guest RAM");
    m.map.remove_region(0xc001_0000).unwrap();
    m.bar(0xc040_0000, 0xe000).unwrap();
    assert!(!mapped(&ep, 0xc001_0000) && mapped(&ep, 0xc040_0000), "the moved BAR left its old address");
    m.map.remove_region(1 << 32).unwrap();
    assert!(!mapped(&ep, 1 << 32));
    assert_eq!(m.vm.account().pinned(), 16 * MIB, "hot-removed RAM unpinned");
    assert_eq!(m.stat("regions"), 2);
    m.identity.detach(8);
    m.identity.detach(16);
    assert_eq!(m.vm.account().pinned(), 0, "the last device gone: nothing pinned");
    m.bar(0xc080_0000, 0x1000).unwrap(); // nobody listens any more
    assert_eq!(m.stat("regions"), 0);
}

#[test]
fn misaligned_ram_is_refused_and_misaligned_device_memory_is_skipped_and_reported() {
    let mut m = machine(u64::MAX, 0..1 << 48);
    m.ram(0, 16 * MIB).unwrap();
    let (ep, failed) = device(&m, 8);
    let e = m.ram(1 << 32, 0x1800).unwrap_err();
    assert!(e.to_string().contains("refused"), "{e}");
    assert!(!m.vm.spans().iter().any(|s| s.0 == 1 << 32), "the misaligned RAM never became guest memory");
    m.bar(0xc000_0800, 0x800).unwrap(); // device memory, misaligned: accepted, skipped
    assert_eq!(m.stat("skipped_unaligned"), 1);
    assert!(!mapped(&ep, 0xc000_0800), "DMA to it faults");
    assert!(m.identity.device_stats(8).unwrap().words().contains("0xc0000800"), "{:?}", m.identity.device_stats(8));
    assert!(!failed.load(Ordering::SeqCst), "never fatal");
}

/// A device process at its window limit: it refuses maps beyond `room`.
struct Limited {
    room: AtomicU64,
}

impl MapObserver for Limited {
    fn mapped(&self, maps: &[Mapping]) -> Result<(), String> {
        let n = maps.len() as u64;
        if self.room.load(Ordering::SeqCst) < n {
            return Err("the device holds all the windows it accepts".into());
        }
        self.room.fetch_sub(n, Ordering::SeqCst);
        Ok(())
    }
    fn unmapped(&self, maps: &[Mapping]) {
        self.room.fetch_add(maps.len() as u64, Ordering::SeqCst);
    }
}

#[test]
fn a_bar_that_cannot_be_mapped_is_reported_and_the_vm_goes_on() {
    let mut m = machine(u64::MAX, 0..1 << 48);
    m.ram(0, 16 * MIB).unwrap();
    let (ep, failed) = device(&m, 8);
    // The device takes exactly the RAM window it has.
    ep.add_observer(Arc::new(Limited { room: AtomicU64::new(1) })).unwrap();
    m.bar(0xc001_0000, 0x1000).unwrap();
    assert_eq!(m.stat("bar_map_failures"), 1);
    assert_eq!(m.stat("p2p_unavailable"), 1);
    assert!(!mapped(&ep, 0xc001_0000));
    assert!(!failed.load(Ordering::SeqCst), "a BAR failure fails nobody");
    assert!(mapped(&ep, 0x1000), "RAM still reachable");
}

#[test]
fn ram_that_cannot_be_mapped_at_run_time_fails_the_devices_not_the_vmm() {
    let mut m = machine(17 * MIB, 0..1 << 48);
    m.ram(0, 16 * MIB).unwrap();
    let (_ep, failed) = device(&m, 8);
    m.ram(1 << 32, 2 * MIB).unwrap(); // over the locked-memory limit
    assert_eq!(m.stat("ram_map_failures"), 1);
    let t = std::time::Instant::now();
    while !failed.load(Ordering::SeqCst) {
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "the device was not failed");
        std::thread::yield_now();
    }
    assert!(m.vm.spans().iter().any(|s| s.0 == 1 << 32), "the RAM itself was added: the VM goes on");
}

#[test]
fn the_first_attach_over_the_locked_memory_limit_is_refused_naming_the_fix() {
    let mut m = machine(8 * MIB, 0..1 << 48);
    m.ram(0, 16 * MIB).unwrap();
    let ep = Endpoint::new(&m.vm, "dev");
    let dev = Device { id: 8, name: "dev".into(), endpoint: ep, fail: Arc::new(|_| {}), params: vec![] };
    let e = m.identity.attach(&dev).unwrap_err();
    assert!(matches!(&e, iommu::FrontendError::Refused(w) if w.contains("pass --locked-memory 16M")), "{e}");
    assert_eq!(m.vm.account().pinned(), 0, "nothing left pinned");
    assert_eq!(m.stat("devices"), 0);
}

#[test]
fn ram_outside_the_dma_window_is_unreachable_and_reported() {
    let mut m = machine(u64::MAX, 0..8 * MIB);
    m.ram(0, 16 * MIB).unwrap();
    m.ram(1 << 32, MIB).unwrap();
    let (ep, _) = device(&m, 8);
    assert!(mapped(&ep, 0x1000) && !mapped(&ep, 12 * MIB) && !mapped(&ep, 1 << 32));
    assert_eq!(m.stat("outside_window"), 2, "one region crosses the edge, one is outside");
    assert_eq!(m.vm.account().pinned(), 8 * MIB, "only what devices can reach is pinned");
}

#[test]
fn hot_added_ram_is_mapped_by_both_devices_domains_concurrently_with_their_use() {
    // Two devices share the identity domain; one thread hot-adds and removes RAM while
    // another reads through both devices: no panic, and the final state is exact.
    let m = Arc::new(Mutex::new(machine(u64::MAX, 0..1 << 48)));
    m.lock().unwrap().ram(0, 16 * MIB).unwrap();
    let (ep, _) = device(&m.lock().unwrap(), 8);
    let (ep2, _) = device(&m.lock().unwrap(), 16);
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (s1, s2, stop) = (dma::DmaSpace::of(&ep), dma::DmaSpace::of(&ep2), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut b = [0u8; 64];
            while !stop.load(Ordering::Acquire) {
                s1.read(Iova(0x1000), &mut b).unwrap();
                let _ = s2.read(Iova(1 << 32), &mut b);
            }
        })
    };
    for _ in 0..200 {
        let mut g = m.lock().unwrap();
        g.ram(1 << 32, MIB).unwrap();
        assert!(mapped(&ep, 1 << 32) && mapped(&ep2, 1 << 32));
        g.map.remove_region(1 << 32).unwrap();
    }
    stop.store(true, Ordering::Release);
    reader.join().unwrap();
    assert_eq!(m.lock().unwrap().vm.account().pinned(), 16 * MIB);
}

/// Attach and detach racing on real threads: the last device's detach releases the
/// domain under the same lock an attach joins it under, so a device attached while
/// another leaves always finds RAM mapped (never a domain emptied under it).
#[test]
fn attach_and_detach_racing_never_strand_a_device() {
    let mut m = machine(u64::MAX, 0..1 << 48);
    m.ram(0, 16 * MIB).unwrap();
    let (identity, vm) = (Arc::clone(&m.identity), Arc::clone(&m.vm));
    let stranded = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..2u16)
        .map(|t| {
            let (identity, vm, stranded) = (Arc::clone(&identity), Arc::clone(&vm), Arc::clone(&stranded));
            std::thread::spawn(move || {
                for i in 0..50_000u32 {
                    let id = 8 * (t + 1);
                    let ep = Endpoint::new(&vm, &format!("dev{id}"));
                    let fail: iommu::FailDevice = Arc::new(|_| {});
                    let d = Device { id, name: format!("dev{id}"), endpoint: ep.clone(), fail, params: vec![] };
                    identity.attach(&d).unwrap();
                    // Attached: guest RAM is reachable through it, whatever the other
                    // thread's device does meanwhile.
                    if ep.lookup(Iova(0x1000 * u64::from(i % 16))).is_none() {
                        stranded.fetch_add(1, Ordering::Relaxed);
                    }
                    identity.detach(id);
                    ep.close();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(stranded.load(Ordering::Relaxed), 0, "attaches that found RAM unmapped");
    assert_eq!(vm.account().pinned(), 0, "the last detach released every pin");
}
