//! Unmap means gone, under concurrency: device threads copy through their DmaSpaces
//! while the main thread maps and unmaps. After each unmap returns, the main thread
//! snapshots the page a device was writing and poisons the part devices read; later it
//! checks the snapshot did not change (a write landed after the unmap returned) and
//! devices check no successful read ever saw poison (a read served after the unmap
//! returned).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
use common::{PAGE, vm};
use dma::{DmaSpace, DomainConfig, Gpa, Iova, Perm};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

const SLOTS: u64 = 4;
const PAGES_PER_SLOT: u64 = 8;
const WRITE_AREA: usize = 2048;
const READ_AREA: std::ops::Range<usize> = 2048..3072;
const POISON: u8 = 0xee;
const IOVA_BASE: u64 = 0x1000_0000;

fn page_of(slot: u64, round: u64) -> u64 {
    0x40_0000 + (slot * PAGES_PER_SLOT + round % PAGES_PER_SLOT) * PAGE
}

#[test]
fn no_access_succeeds_after_its_unmap_returned() {
    let vm = vm(u64::MAX);
    let domain = vm.create_domain("stress", DomainConfig::default());
    let stop = Arc::new(AtomicBool::new(false));
    let poison_seen = Arc::new(AtomicU64::new(0));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));

    let devices: Vec<_> = (0..2u64)
        .map(|t| {
            let space = DmaSpace::new(domain.clone(), &format!("dev{t}"));
            let (stop, poison_seen, ok, failed) = (stop.clone(), poison_seen.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let data = vec![t as u8 + 1; WRITE_AREA];
                let mut buf = vec![0u8; READ_AREA.len()];
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let iova = IOVA_BASE + (i % SLOTS) * PAGE;
                    i += 1;
                    match space.write(Iova(iova), &data) {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    if space.read(Iova(iova + READ_AREA.start as u64), &mut buf).is_ok() {
                        if buf.contains(&POISON) {
                            poison_seen.fetch_add(1, Ordering::Relaxed);
                        }
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();

    let mut changed_after_unmap = 0;
    let mut pending: Vec<(u64, Vec<u8>)> = Vec::new();
    let deadline = Instant::now() + Duration::from_millis(1500);
    let mut rounds = 0u64;
    while Instant::now() < deadline {
        for slot in 0..SLOTS {
            let page = page_of(slot, rounds);
            // Before reuse, check the page's snapshot from PAGES_PER_SLOT rounds ago.
            if let Some(pos) = pending.iter().position(|(p, _)| *p == page) {
                let (_, snap) = pending.swap_remove(pos);
                let mut now = vec![0u8; WRITE_AREA];
                vm.memory().read_slice(&mut now, GuestAddress(page)).unwrap();
                if now != snap {
                    changed_after_unmap += 1;
                }
            }
            vm.memory().write_slice(&[0u8; PAGE as usize], GuestAddress(page)).unwrap();
            let iova = Iova(IOVA_BASE + slot * PAGE);
            domain.map(iova, Gpa(page), PAGE, Perm::READ_WRITE).unwrap();
            std::thread::yield_now();
            assert_eq!(domain.unmap(iova, PAGE), Ok(PAGE));
            // The unmap returned: from here nothing may touch the page through the domain.
            let mut snap = vec![0u8; WRITE_AREA];
            vm.memory().read_slice(&mut snap, GuestAddress(page)).unwrap();
            vm.memory()
                .write_slice(&[POISON; READ_AREA.end - READ_AREA.start], GuestAddress(page + READ_AREA.start as u64))
                .unwrap();
            pending.push((page, snap));
        }
        rounds += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for d in devices {
        d.join().unwrap();
    }
    for (page, snap) in pending {
        let mut now = vec![0u8; WRITE_AREA];
        vm.memory().read_slice(&mut now, GuestAddress(page)).unwrap();
        if now != snap {
            changed_after_unmap += 1;
        }
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("stress: {rounds} rounds of {SLOTS} map/unmap, {ok} accesses succeeded, {failed} faulted");
    assert!(
        rounds > 20 && ok > 100 && failed > 100,
        "the race was exercised: {rounds} rounds, {ok} ok, {failed} faulted"
    );
    assert_eq!(changed_after_unmap, 0, "device writes landed after unmap returned");
    assert_eq!(poison_seen.load(Ordering::Relaxed), 0, "device reads were served after unmap returned");
    assert_eq!(vm.account().pinned(), 0);
}
