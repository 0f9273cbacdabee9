//! Device DMA follows the VM's memory map: memory added later (a device's mmapped BAR,
//! more RAM) becomes reachable through a domain that maps it, and grows the dirty log;
//! memory removed is unreachable the moment its removal returns, even for a device
//! that is reading it in a loop with translations cached.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
use common::{PAGE, vm};
use dma::{DmaSpace, DomainConfig, Gpa, Iova, Perm};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use vm_api::{MemoryListener, MemoryMap, Region, RegionKind};

/// Host memory for a region, kept alive by the region.
fn host_memory(size: usize, fill: u8) -> (Arc<Vec<u8>>, *mut u8) {
    let v = Arc::new(vec![fill; size]);
    let p = v.as_ptr() as *mut u8;
    (v, p)
}

fn region(gpa: u64, size: usize, kind: RegionKind, fill: u8) -> (Region, *mut u8) {
    let (keep, host) = host_memory(size, fill);
    let keep: Arc<dyn std::any::Any + Send + Sync> = keep;
    // SAFETY: `host` points into the vector `keep` owns, valid for `size` bytes for as
    // long as the region (which holds `keep`) lives.
    (unsafe { Region::from_raw(gpa, size as u64, kind, host, None, Some(keep)) }, host)
}

const BAR: u64 = 0x1_0000_0000;
const IOVA: u64 = 0x100_0000;

#[test]
fn a_region_added_to_the_map_is_reachable_and_one_removed_is_not_from_the_moment_it_goes() {
    let vm = vm(u64::MAX);
    let map = MemoryMap::new();
    map.add_listener(Arc::clone(&vm) as Arc<dyn MemoryListener>).unwrap();
    let d = vm.create_domain("dev", DomainConfig::default());
    assert!(d.map(Iova(IOVA), Gpa(BAR), PAGE, Perm::READ_WRITE).is_err(), "not guest memory yet");
    // A peer device's BAR appears (RAM-device memory).
    let (bar, host) = region(BAR, PAGE as usize, RegionKind::RamDevice { device: "peer".into() }, 0x11);
    map.add_region(bar).unwrap();
    d.map(Iova(IOVA), Gpa(BAR), PAGE, Perm::READ_WRITE).unwrap();
    let ep = dma::Endpoint::attached(&d, "dev");
    let space = DmaSpace::of(&ep);
    let mut b = [0u8; 8];
    space.read(Iova(IOVA), &mut b).unwrap();
    assert_eq!(b, [0x11; 8], "the device reads the peer's memory");
    space.write(Iova(IOVA + 8), &[0x22; 8]).unwrap();
    // SAFETY: the region is still in the map, so its memory is alive.
    assert_eq!(unsafe { *host.add(8) }, 0x22, "and writes it");
    assert_eq!(vm.dirty().count(), 0, "device memory is not guest RAM: not dirty-logged");

    // A device reads it in a loop (translations cached) while the region leaves.
    let removed = Arc::new(AtomicBool::new(false));
    let late = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (space, removed, late, reads) = (DmaSpace::of(&ep), removed.clone(), late.clone(), reads.clone());
        std::thread::spawn(move || {
            let mut b = [0u8; 64];
            for _ in 0..200_000 {
                let after = removed.load(Ordering::Acquire);
                if space.read(Iova(IOVA), &mut b).is_ok() {
                    reads.fetch_add(1, Ordering::Relaxed);
                    if after {
                        late.fetch_add(1, Ordering::Relaxed);
                    }
                } else if after {
                    break;
                }
            }
        })
    };
    while reads.load(Ordering::Relaxed) < 1000 {
        std::thread::yield_now();
    }
    map.remove_region(BAR).unwrap();
    removed.store(true, Ordering::Release);
    reader.join().unwrap();
    assert_eq!(late.load(Ordering::Relaxed), 0, "a read that began after the removal returned succeeded");
    assert!(space.read(Iova(IOVA), &mut b).is_err(), "gone memory faults");
}

#[test]
fn ram_added_later_is_reachable_and_dirty_logged() {
    let vm = vm(u64::MAX);
    let map = MemoryMap::new();
    map.add_listener(Arc::clone(&vm) as Arc<dyn MemoryListener>).unwrap();
    let more = 0x2_0000_0000u64;
    let (ram, _host) = region(more, 2 * PAGE as usize, RegionKind::Ram, 0);
    map.add_region(ram).unwrap();
    assert!(vm.spans().contains(&(more, 2 * PAGE, true)));
    let d = vm.create_domain("dev", DomainConfig::default());
    d.map(Iova(IOVA), Gpa(more), 2 * PAGE, Perm::READ_WRITE).unwrap();
    let _ = vm.dirty().take();
    DmaSpace::new(d, "dev").write(Iova(IOVA + PAGE), &[1; 16]).unwrap();
    assert_eq!(vm.dirty().take(), vec![more + PAGE], "the dirty log grew over the new RAM");
}
