//! Endpoints switch domains under load with the unmap-means-gone handover, observers
//! follow the switch, a blocked endpoint faults every access, and one domain serves
//! several endpoints.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
use common::{PAGE, vm};
use dma::{Access, DmaSpace, DomainConfig, Endpoint, FaultReason, Gpa, Iova, MapObserver, Mapping, Perm};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vm_memory::{Bytes, GuestAddress};

const IOVA: u64 = 0x10_0000;
const SWITCHES: u64 = 10_000;
const SENTINEL: u64 = 0x5e47_1e15_5e47_1e15;
/// Bytes each device access covers, a word at a time: most switches land mid-access.
const SPAN: u64 = 4096;

#[test]
fn no_access_succeeds_through_a_domain_after_the_switch_away_from_it_returns() {
    let vm = vm(u64::MAX);
    // Three domains map the same IOVA to three different pages.
    let pages = [0x40_0000u64, 0x50_0000, 0x60_0000];
    let domains: Vec<_> = pages
        .iter()
        .enumerate()
        .map(|(i, &gpa)| {
            let d = vm.create_domain(&format!("d{i}"), DomainConfig::default());
            d.map(Iova(IOVA), Gpa(gpa), SPAN, Perm::READ_WRITE).unwrap();
            d
        })
        .collect();
    let ep = Endpoint::new(&vm, "dev");
    ep.attach(Some(domains[0].clone())).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let device = {
        let (space, stop, writes) = (DmaSpace::of(&ep), stop.clone(), writes.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                // A long access section: the translation is held while every word of
                // the span is written one by one (never the sentinel: each is a count).
                match space.translate(Iova(IOVA), SPAN, Access::Write) {
                    Ok(t) => {
                        for slice in t.slices() {
                            for off in (0..slice.len()).step_by(8) {
                                slice.write_obj(n, off).unwrap();
                            }
                        }
                        writes.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => std::hint::spin_loop(),
                }
            }
        })
    };
    // The sentinel sits in the page's last word: a write in flight ends there.
    let last_word = SPAN - 8;
    let read = |gpa: u64| vm.memory().read_obj::<u64>(GuestAddress(gpa + last_word)).unwrap();
    let mut violations = 0;
    let mut attached: Option<usize> = Some(0);
    let mut last = 0usize;
    // A page is armed (holds the sentinel) from the switch away from its domain until
    // the switch back to it: no write may reach it meanwhile.
    let mut armed = [false; 3];
    for i in 0..SWITCHES {
        let target = if i % 97 == 0 { None } else { Some((last + 1 + (i as usize % 2)) % 3) };
        ep.attach(target.map(|t| domains[t].clone())).unwrap();
        for k in 0..3 {
            if armed[k] && Some(k) != target && read(pages[k]) != SENTINEL {
                violations += 1;
            }
        }
        if let Some(t) = target {
            armed[t] = false;
            last = t;
        }
        if let Some(a) = attached
            && Some(a) != target
        {
            // The switch away from `a` returned: nothing may land on its page now.
            vm.memory().write_obj(SENTINEL, GuestAddress(pages[a] + last_word)).unwrap();
            armed[a] = true;
        }
        attached = target;
        // Let the device write through the new domain before the next switch, so most
        // switches happen with a write in flight.
        let t = std::time::Instant::now();
        let progress = || if target.is_some() { writes.load(Ordering::Relaxed) } else { ep.faults().total() };
        let before = progress();
        while progress() == before && t.elapsed() < std::time::Duration::from_millis(100) {
            std::hint::spin_loop();
        }
    }
    stop.store(true, Ordering::Relaxed);
    device.join().unwrap();
    assert_eq!(violations, 0, "writes landed through a domain after the switch away from it returned");
    assert!(writes.load(Ordering::Relaxed) > SWITCHES / 10, "the device kept writing through the switches");
    assert!(ep.faults().total() > 0, "writes while blocked faulted");
    assert!(ep.faults().recent().iter().all(|f| f.reason == FaultReason::Blocked));
}

#[derive(Default)]
struct Log(Mutex<Vec<String>>);

impl MapObserver for Log {
    fn mapped(&self, maps: &[Mapping]) -> Result<(), String> {
        let iovas: Vec<String> = maps.iter().map(|m| format!("{:#x}", m.iova.0)).collect();
        self.0.lock().unwrap().push(format!("+{}", iovas.join(",")));
        Ok(())
    }
    fn unmapped(&self, maps: &[Mapping]) {
        let iovas: Vec<String> = maps.iter().map(|m| format!("{:#x}", m.iova.0)).collect();
        self.0.lock().unwrap().push(format!("-{}", iovas.join(",")));
    }
}

#[test]
fn observers_follow_the_endpoint_across_switches_in_batches() {
    let vm = vm(u64::MAX);
    let a = vm.create_domain("a", DomainConfig::default());
    let b = vm.create_domain("b", DomainConfig::default());
    a.map(Iova(0x1000), Gpa(0x1000), PAGE, Perm::READ).unwrap();
    a.map(Iova(0x2000), Gpa(0x2000), PAGE, Perm::READ).unwrap();
    b.map(Iova(0x9000), Gpa(0x9000), PAGE, Perm::READ).unwrap();
    let ep = Endpoint::attached(&a, "dev");
    let log = Arc::new(Log::default());
    ep.add_observer(log.clone()).unwrap();
    a.map(Iova(0x3000), Gpa(0x3000), PAGE, Perm::READ).unwrap();
    ep.attach(Some(b.clone())).unwrap();
    a.map(Iova(0x4000), Gpa(0x4000), PAGE, Perm::READ).unwrap(); // not ours any more
    b.unmap(Iova(0x9000), PAGE).unwrap();
    ep.attach(None).unwrap();
    b.map(Iova(0x8000), Gpa(0x8000), PAGE, Perm::READ).unwrap();
    ep.attach(Some(b.clone())).unwrap();
    let o: Arc<dyn MapObserver> = log.clone();
    ep.remove_observer(&o);
    assert_eq!(
        *log.0.lock().unwrap(),
        vec!["+0x1000,0x2000", "+0x3000", "-0x1000,0x2000,0x3000", "+0x9000", "-0x9000", "+0x8000", "-0x8000"]
    );
    assert_eq!(a.endpoint_count(), 0);
    assert_eq!(b.endpoint_count(), 1);
}

#[test]
fn a_refusing_observer_fails_the_switch_and_leaves_the_endpoint_blocked() {
    struct Refuse;
    impl MapObserver for Refuse {
        fn mapped(&self, _m: &[Mapping]) -> Result<(), String> {
            Err("device out of windows".into())
        }
        fn unmapped(&self, _m: &[Mapping]) {}
    }
    let vm = vm(u64::MAX);
    let a = vm.create_domain("a", DomainConfig::default());
    let b = vm.create_domain("b", DomainConfig::default());
    b.map(Iova(0x9000), Gpa(0x9000), PAGE, Perm::READ).unwrap();
    let ep = Endpoint::attached(&a, "dev");
    ep.add_observer(Arc::new(Refuse)).unwrap(); // a has no mappings: nothing to refuse
    assert!(ep.attach(Some(b.clone())).is_err());
    assert!(ep.domain().is_none(), "blocked after a failed switch");
    let dev = DmaSpace::of(&ep);
    let mut buf = [0u8; 8];
    assert_eq!(dev.read(Iova(0x9000), &mut buf).unwrap_err().reason, FaultReason::Blocked);
    assert_eq!(b.endpoint_count(), 0);
}

#[test]
fn one_domain_serves_several_endpoints_and_an_unmap_reaches_them_all() {
    let vm = vm(u64::MAX);
    let d = vm.create_domain("shared", DomainConfig::default());
    d.map(Iova(0x1000), Gpa(0x70_0000), PAGE, Perm::READ_WRITE).unwrap();
    let (e1, e2) = (Endpoint::attached(&d, "dev1"), Endpoint::attached(&d, "dev2"));
    let (s1, s2) = (DmaSpace::of(&e1), DmaSpace::of(&e2));
    s1.write(Iova(0x1000), b"from one").unwrap();
    let mut b = [0u8; 8];
    s2.read(Iova(0x1000), &mut b).unwrap();
    assert_eq!(&b, b"from one", "both see the same mapping");
    assert_eq!(d.endpoint_count(), 2);
    assert_eq!(d.accessor_count(), 2);
    d.unmap(Iova(0x1000), PAGE).unwrap();
    assert!(s1.read(Iova(0x1000), &mut b).is_err() && s2.read(Iova(0x1000), &mut b).is_err());
    assert!(s2.translate(Iova(0x1000), 8, Access::Read).is_err());
    drop((s1, e1));
    assert_eq!(d.endpoint_count(), 1, "a dropped endpoint leaves its domain");
}
