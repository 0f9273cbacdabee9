//! Observers see exactly the domain's history, under concurrency: threads map and unmap
//! at random over a small IOVA space while others register observers and a flaky
//! observer refuses some maps. At every quiescent point each observer's view equals the
//! domain, no observer ever saw an unmap before its map or a mapping twice, and the
//! locked-memory account holds exactly the domain's pins (a refused map's rollback
//! touched only what that call added).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
use common::{PAGE, vm};
use dma::{DomainConfig, Gpa, Iova, MapObserver, Mapping, Perm};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};

const SLOTS: u64 = 12;
const THREADS: u64 = 4;
const ROUNDS: usize = 150;
const OPS_PER_ROUND: u64 = 60;

/// Mirrors the domain from what it is told; counts impossible histories.
#[derive(Default)]
struct Mirror {
    view: Mutex<BTreeMap<u64, Mapping>>,
    lies: AtomicU64,
}

impl MapObserver for Mirror {
    fn mapped(&self, maps: &[Mapping]) -> Result<(), String> {
        let mut v = self.view.lock().unwrap();
        for m in maps {
            if v.insert(m.iova.0, *m).is_some() {
                self.lies.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
    fn unmapped(&self, maps: &[Mapping]) {
        let mut v = self.view.lock().unwrap();
        for m in maps {
            if v.remove(&m.iova.0) != Some(*m) {
                self.lies.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Refuses every 7th batch it is shown (after mirroring nothing).
#[derive(Default)]
struct Flaky {
    seen: AtomicU64,
    inner: Mirror,
}

impl MapObserver for Flaky {
    fn mapped(&self, maps: &[Mapping]) -> Result<(), String> {
        if self.seen.fetch_add(1, Ordering::Relaxed) % 7 == 6 {
            return Err("flaky device".into());
        }
        self.inner.mapped(maps)
    }
    fn unmapped(&self, maps: &[Mapping]) {
        self.inner.unmapped(maps)
    }
}

fn rng(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn observers_see_the_domain_history_in_order_and_rollback_touches_only_its_own_call() {
    let vm = vm(u64::MAX);
    let d = vm.create_domain("d", DomainConfig::default());
    let flaky = Arc::new(Flaky::default());
    d.add_observer(flaky.clone()).unwrap();
    let mirrors: Arc<Mutex<Vec<Arc<Mirror>>>> = Arc::default();
    let barrier = Arc::new(Barrier::new(THREADS as usize + 1));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (d, mirrors, barrier) = (d.clone(), mirrors.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut seed = 0x9e37_79b9_7f4a_7c15 ^ (t + 1);
                for _ in 0..ROUNDS {
                    for _ in 0..OPS_PER_ROUND {
                        let r = rng(&mut seed);
                        let slot = r % SLOTS;
                        // Slot s always maps guest page s + 16: its pin is one page.
                        let (iova, gpa) = (Iova(0x10_0000 + slot * PAGE), Gpa((slot + 16) * PAGE));
                        match (r >> 8) % 16 {
                            0 if t == 0 => {
                                let m = Arc::new(Mirror::default());
                                d.add_observer(m.clone()).unwrap();
                                mirrors.lock().unwrap().push(m);
                            }
                            1..=3 => {
                                let m2 = |k: u64| Mapping {
                                    iova: Iova(0x10_0000 + ((slot + k) % SLOTS) * PAGE),
                                    gpa: Gpa((((slot + k) % SLOTS) + 16) * PAGE),
                                    size: PAGE,
                                    perm: Perm::READ,
                                };
                                let _ = d.map_many(&[m2(0), m2(1)]);
                            }
                            4..=8 => {
                                let _ = d.map(iova, gpa, PAGE, Perm::READ_WRITE);
                            }
                            9..=10 => {
                                let _ = d.unmap_exact(&[iova, Iova(iova.0 + PAGE)]);
                            }
                            _ => {
                                let _ = d.unmap(iova, PAGE);
                            }
                        }
                    }
                    barrier.wait(); // quiescent: the main thread checks
                    barrier.wait();
                }
            })
        })
        .collect();
    for round in 0..ROUNDS {
        barrier.wait();
        let domain: BTreeMap<u64, Mapping> = d.mappings().into_iter().map(|m| (m.iova.0, m)).collect();
        assert_eq!(*flaky.inner.view.lock().unwrap(), domain, "round {round}: the flaky observer's view");
        assert_eq!(flaky.inner.lies.load(Ordering::Relaxed), 0, "round {round}");
        for (i, m) in mirrors.lock().unwrap().iter().enumerate() {
            assert_eq!(*m.view.lock().unwrap(), domain, "round {round}: observer {i}'s view");
            assert_eq!(m.lies.load(Ordering::Relaxed), 0, "round {round}: observer {i} saw an impossible history");
        }
        let gpas: std::collections::BTreeSet<u64> = domain.values().map(|m| m.gpa.0).collect();
        assert_eq!(vm.account().pinned(), gpas.len() as u64 * PAGE, "round {round}: pins equal the domain's");
        barrier.wait();
    }
    for w in workers {
        w.join().unwrap();
    }
    assert!(flaky.seen.load(Ordering::Relaxed) > 100, "the flaky observer refused some maps");
    assert!(mirrors.lock().unwrap().len() > 5, "observers were added while the others worked");
}
