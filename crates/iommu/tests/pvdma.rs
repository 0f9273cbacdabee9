//! Paravirtual DMA front-end: every status, the locked-memory limit (exact, over,
//! retry after unmap), all-or-nothing MAP_SG, counters, the kill policy, and arbitrary
//! registers and lists that must never panic or leak.
#![allow(clippy::unwrap_used, missing_docs)]

use abi::hcall::{Args, Ret, Status};
use abi::pvdma::{self as pv, dir};
use dma::{DomainConfig, LockedMemory, MapObserver, Mapping, VmDma};
use iommu::pvdma::{PvDma, decode};
use proptest::prelude::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const P: u64 = 4096;
const RAM: u64 = 16 << 20;

fn setup(limit: u64, max_mappings: usize) -> (Arc<VmDma>, PvDma) {
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap());
    let vm = VmDma::new(Arc::clone(&mem), LockedMemory::new(limit));
    let pv = PvDma::new(mem, None);
    pv.add_device(0, "dma0", vm.create_domain("dma0", DomainConfig { max_mappings, ..Default::default() }), true);
    pv.add_device(
        1,
        "dma1",
        vm.identity_domain("dma1").unwrap_or_else(|_| vm.create_domain("x", DomainConfig::default())),
        false,
    );
    (vm, pv)
}

fn call(pv: &PvDma, nr: u64, a: [u64; 5]) -> Ret {
    pv.call(&Args { nr, a })
}

#[test]
fn every_status_code_is_reachable() {
    let (vm, pv) = setup(1 << 20, 16);
    // Success, and the granule and SG limit come with QUERY.
    assert_eq!(call(&pv, pv::QUERY, [0; 5]), Ret::ok(1, P, pv::MAX_SG));
    // A device with another front-end, and no device at all.
    assert_eq!(call(&pv, pv::QUERY, [1, 0, 0, 0, 0]).r[0], 0);
    assert_eq!(call(&pv, pv::MAP, [1, 0x1000, P, dir::TO_DEVICE, 0]).status, Status::NotAssigned);
    assert_eq!(call(&pv, pv::MAP, [9, 0x1000, P, dir::TO_DEVICE, 0]).status, Status::NotAssigned);
    // Invalid arguments.
    for a in [
        [0, 0x1000, 0, dir::TO_DEVICE, 0],
        [0, 0x1000, P, 7, 0],
        [0, RAM, P, dir::TO_DEVICE, 0],
        [0, u64::MAX - 2, 8, 1, 0],
    ] {
        assert_eq!(call(&pv, pv::MAP, a).status, Status::InvalidArgument, "{a:x?}");
    }
    assert_eq!(call(&pv, pv::UNMAP, [0, 0x1234_5000, P, 0, 0]).status, Status::NotFound, "nothing mapped");
    assert_eq!(call(&pv, pv::MAP_SG, [0, 0, 0, dir::TO_DEVICE, 0]).status, Status::InvalidArgument, "count 0");
    assert_eq!(call(&pv, pv::MAP_SG, [0, 0, pv::MAX_SG + 1, dir::TO_DEVICE, 0]).status, Status::InvalidArgument);
    assert_eq!(
        call(&pv, pv::MAP_SG, [0, RAM - 8, 2, dir::TO_DEVICE, 0]).status,
        Status::InvalidArgument,
        "list past RAM"
    );
    assert_eq!(call(&pv, pv::BASE + 0x42, [0; 5]).status, Status::UnknownCall);
    // Over the locked-memory limit (transient).
    assert_eq!(call(&pv, pv::MAP, [0, 0, 2 << 20, dir::TO_DEVICE, 0]).status, Status::OverLockedLimit);
    // No IOVA space: the domain holds at most 16 mappings.
    for i in 0..16 {
        assert_eq!(call(&pv, pv::MAP, [0, i * P, P, dir::TO_DEVICE, 0]).status, Status::Success);
    }
    assert_eq!(call(&pv, pv::MAP, [0, 0x10_0000, P, dir::TO_DEVICE, 0]).status, Status::NoIovaSpace);
    // Busy: the device refused the mapping (its process failing a DMA_MAP).
    struct Refuse(AtomicBool);
    impl MapObserver for Refuse {
        fn mapped(&self, _m: &[Mapping]) -> Result<(), String> {
            if self.0.load(Ordering::Relaxed) { Err("device restarting".into()) } else { Ok(()) }
        }
        fn unmapped(&self, _m: &[Mapping]) {}
    }
    let d2 = vm.create_domain("dma2", DomainConfig::default());
    let refuse = Arc::new(Refuse(AtomicBool::new(false)));
    d2.add_observer(refuse.clone()).unwrap();
    pv.add_device(2, "dma2", d2, true);
    refuse.0.store(true, Ordering::Relaxed);
    assert_eq!(call(&pv, pv::MAP, [2, 0x20_0000, P, dir::FROM_DEVICE, 0]).status, Status::Busy);
    refuse.0.store(false, Ordering::Relaxed);
    assert_eq!(call(&pv, pv::MAP, [2, 0x20_0000, P, dir::FROM_DEVICE, 0]).status, Status::Success, "retry works");
    let s = pv.stats();
    for st in [
        Status::InvalidArgument,
        Status::NotAssigned,
        Status::NoIovaSpace,
        Status::OverLockedLimit,
        Status::Busy,
        Status::NotFound,
        Status::UnknownCall,
    ] {
        assert!(s.with_status(st) > 0, "{} counted: {s}", st.name());
    }
}

#[test]
fn the_locked_memory_limit_is_reached_exactly_and_a_retry_after_unmap_succeeds() {
    let (vm, pv) = setup(16 * P, 64);
    let a = call(&pv, pv::MAP, [0, 0x10_0000, 16 * P, dir::BIDIRECTIONAL, 0]);
    assert_eq!(a.status, Status::Success, "exactly the limit");
    assert_eq!(vm.account().locked(), 16 * P);
    let b = call(&pv, pv::MAP, [0, 0x20_0000, P, dir::BIDIRECTIONAL, 0]);
    assert_eq!(b.status, Status::OverLockedLimit, "one page over");
    assert_eq!(vm.account().locked(), 16 * P, "the failure took nothing");
    // Mapping pages already pinned costs nothing: a second IOVA for the same buffer.
    assert_eq!(call(&pv, pv::MAP, [0, 0x10_0000, P, dir::TO_DEVICE, 0]).status, Status::Success);
    assert_eq!(call(&pv, pv::UNMAP, [0, a.r[0], 16 * P, 0, 0]).status, Status::Success);
    let c = call(&pv, pv::MAP, [0, 0x20_0000, P, dir::BIDIRECTIONAL, 0]);
    assert_eq!(c.status, Status::Success, "retry after unmap");
    assert_eq!(vm.account().locked(), 2 * P);
}

#[test]
fn map_returns_the_iova_of_the_byte_asked_and_unmap_needs_the_same_extent() {
    let (_vm, pv) = setup(1 << 20, 64);
    let r = call(&pv, pv::MAP, [0, 0x10_0123, 0x2000, dir::TO_DEVICE, 0]);
    assert_eq!(r.status, Status::Success);
    assert_eq!(r.r[0] % P, 0x123, "offset in the page kept");
    assert!(r.r[0] >= iommu::pvdma::IOVA_BASE);
    assert_eq!(call(&pv, pv::UNMAP, [0, r.r[0], 0x1000, 0, 0]).status, Status::InvalidArgument, "a different extent");
    assert_eq!(call(&pv, pv::UNMAP, [0, r.r[0], 0x2000, 0, 0]).status, Status::Success);
    assert_eq!(
        call(&pv, pv::UNMAP, [0, r.r[0], 0x2000, 0, 0]).status,
        Status::NotFound,
        "twice: nothing there any more"
    );
}

#[test]
fn map_sg_is_all_or_nothing_and_writes_the_iovas_back() {
    let (vm, pv) = setup(64 * P, 512);
    let mem = vm.memory();
    let list = 0x80_0000u64;
    let put = |entries: &[(u64, u64)]| {
        for (i, (a, l)) in entries.iter().enumerate() {
            mem.write_obj(*a, GuestAddress(list + 16 * i as u64)).unwrap();
            mem.write_obj(*l, GuestAddress(list + 16 * i as u64 + 8)).unwrap();
        }
    };
    put(&[(0x10_0000, P), (0x20_0000, 3 * P), (0x30_0000, 100)]);
    let r = call(&pv, pv::MAP_SG, [0, list, 3, dir::FROM_DEVICE, 0]);
    assert_eq!(r, Ret::ok(3, 0, 0));
    let iovas: Vec<u64> = (0..3).map(|i| mem.read_obj(GuestAddress(list + 16 * i)).unwrap()).collect();
    assert!(iovas.iter().all(|i| *i >= iommu::pvdma::IOVA_BASE), "{iovas:x?}");
    assert_eq!(pv.device(0).unwrap().live_mappings(), 3);
    assert_eq!(call(&pv, pv::UNMAP_SG, [0, list, 3, 0, 0]), Ret::ok(3, 0, 0));
    // Over the limit in the 3rd entry: nothing stays mapped and the list is untouched.
    put(&[(0x10_0000, 32 * P), (0x20_0000, 16 * P), (0x30_0000, 32 * P)]);
    let r = call(&pv, pv::MAP_SG, [0, list, 3, dir::FROM_DEVICE, 0]);
    assert_eq!(r.status, Status::OverLockedLimit);
    assert_eq!(pv.device(0).unwrap().live_mappings(), 0);
    assert_eq!(vm.account().locked(), 0);
    assert_eq!(mem.read_obj::<u64>(GuestAddress(list)).unwrap(), 0x10_0000, "list not rewritten");
}

#[test]
fn counters_count_each_call_and_status_per_vm_and_per_device() {
    let (_vm, pv) = setup(1 << 20, 64);
    call(&pv, pv::QUERY, [0; 5]);
    let r = call(&pv, pv::MAP, [0, 0x1000, P, dir::TO_DEVICE, 0]);
    call(&pv, pv::UNMAP, [0, r.r[0], P, 0, 0]);
    call(&pv, pv::MAP, [0, 0x1000, 0, dir::TO_DEVICE, 0]);
    let s = pv.stats();
    assert_eq!((s.calls_named("query"), s.calls_named("map"), s.calls_named("unmap")), (1, 2, 1));
    assert_eq!(s.with_status(Status::Success), 3);
    assert_eq!(s.with_status(Status::InvalidArgument), 1);
    assert_eq!(s.pages, (1, 1));
    let d = pv.device(0).unwrap().stats();
    assert_eq!(d.calls_named("map"), 1, "a call that failed decoding is not charged to the device");
    assert!(s.to_string().contains("invalid_argument=1"), "{s}");
}

#[test]
fn the_kill_policy_fires_on_misuse_only() {
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap());
    let vm = VmDma::new(Arc::clone(&mem), LockedMemory::new(P));
    let killed = Arc::new(AtomicBool::new(false));
    let k = killed.clone();
    let pv = PvDma::new(mem, Some(Box::new(move |_| k.store(true, Ordering::Relaxed))));
    pv.add_device(0, "dma0", vm.create_domain("dma0", DomainConfig::default()), true);
    assert_eq!(call(&pv, pv::MAP, [0, 0, 2 * P, dir::TO_DEVICE, 0]).status, Status::OverLockedLimit);
    assert!(!killed.load(Ordering::Relaxed), "a transient failure never kills");
    let r = call(&pv, pv::MAP, [0, 0, P, dir::TO_DEVICE, 0]);
    assert_eq!(call(&pv, pv::UNMAP, [0, r.r[0], P, 0, 0]).status, Status::Success);
    assert_eq!(call(&pv, pv::UNMAP, [0, r.r[0], P, 0, 0]).status, Status::NotFound);
    assert!(!killed.load(Ordering::Relaxed), "a stale unmap is not misuse: it never kills");
    assert_eq!(call(&pv, pv::MAP, [0, 0, P, 9, 0]).status, Status::InvalidArgument);
    assert!(killed.load(Ordering::Relaxed));
}

#[test]
fn unmap_sg_tells_stale_entries_from_malformed_ones() {
    let (vm, pv) = setup(64 * P, 64);
    let mem = vm.memory();
    let list = 0x80_0000u64;
    let put = |entries: &[(u64, u64)]| {
        for (i, (a, l)) in entries.iter().enumerate() {
            mem.write_obj(*a, GuestAddress(list + 16 * i as u64)).unwrap();
            mem.write_obj(*l, GuestAddress(list + 16 * i as u64 + 8)).unwrap();
        }
    };
    let a = call(&pv, pv::MAP, [0, 0x10_0000, P, dir::TO_DEVICE, 0]).r[0];
    let b = call(&pv, pv::MAP, [0, 0x20_0000, P, dir::TO_DEVICE, 0]).r[0];
    put(&[(a, P), (0x7777_0000, P)]);
    assert_eq!(call(&pv, pv::UNMAP_SG, [0, list, 2, 0, 0]).status, Status::NotFound, "one entry names nothing");
    assert_eq!(pv.device(0).unwrap().live_mappings(), 1, "the good entry was unmapped all the same");
    put(&[(b, 3 * P), (a, P)]);
    assert_eq!(call(&pv, pv::UNMAP_SG, [0, list, 2, 0, 0]).status, Status::InvalidArgument, "wrong extent wins");
    assert_eq!(pv.device(0).unwrap().live_mappings(), 1, "b stays: its entry was malformed");
    put(&[(b, P), (b, P)]);
    assert_eq!(call(&pv, pv::UNMAP_SG, [0, list, 2, 0, 0]).status, Status::NotFound, "named twice");
    assert_eq!(pv.device(0).unwrap().live_mappings(), 0);
}

#[test]
fn unknown_call_numbers_are_counted_as_unknown_and_totals_survive_a_device() {
    let (_vm, pv) = setup(1 << 20, 64);
    for nr in [pv::BASE + 5, pv::BASE + 0x42, pv::BASE + 0xff] {
        assert_eq!(call(&pv, nr, [0; 5]).status, Status::UnknownCall);
    }
    let s = pv.stats();
    assert_eq!(s.calls_named("unmap_sg"), 0, "an unknown call is not an UNMAP_SG");
    assert_eq!(s.unknown, 3);
    assert_eq!(s.with_status(Status::UnknownCall), 3);
    let r = call(&pv, pv::MAP, [0, 0x1000, P, dir::TO_DEVICE, 0]);
    call(&pv, pv::UNMAP, [0, r.r[0], P, 0, 0]);
    let before = pv.stats();
    assert_eq!((before.calls_named("map"), before.pages), (1, (1, 1)));
    pv.remove_device(0); // the device dies
    let after = pv.stats();
    assert_eq!(after, before, "VM-wide counters never go backwards when a device goes");
    assert_eq!(call(&pv, pv::MAP, [0, 0x1000, P, dir::TO_DEVICE, 0]).status, Status::NotAssigned);
    assert_eq!(pv.stats().calls_named("map"), 2);
}

#[test]
fn a_device_that_goes_with_mappings_counts_them_unmapped() {
    let (vm, pv) = setup(1 << 20, 64);
    for k in 0..3 {
        assert_eq!(call(&pv, pv::MAP, [0, 0x1000 + k * 2 * P, 2 * P, dir::TO_DEVICE, 0]).status, Status::Success);
    }
    assert_eq!(pv.stats().pages, (6, 0));
    pv.remove_device(0); // unplugged with 3 mappings of 2 pages
    assert_eq!(pv.stats().pages, (6, 6), "the totals add up once the device is gone");
    assert_eq!(vm.account().pinned(), 0);
}

#[test]
fn restored_counters_are_checked_and_counters_wrap_instead_of_panicking() {
    let (vm, pv) = setup(1 << 20, 64);
    let r = call(&pv, pv::MAP, [0, 0x1000, P, dir::TO_DEVICE, 0]);
    assert_eq!(r.status, Status::Success);
    let saved = pv.save_device(0).unwrap();
    let fresh = |pv: &PvDma| {
        pv.remove_device(0);
        pv.add_device(0, "dma0", vm.create_domain("dma0", DomainConfig::default()), true);
    };
    // Counters at the top of their range (a crafted snapshot, checksums and all).
    let mut top = saved.clone();
    top.counters.calls[1] = u64::MAX; // MAP calls
    top.counters.statuses[Status::Success as usize] = u64::MAX - 1; // and their status (QUERY's 0 + MAP's)
    let (_, pv2) = setup(1 << 20, 64);
    fresh(&pv2);
    let e = pv2.restore_device(0, &top).unwrap_err();
    assert!(e.contains("do not match"), "{e}");
    top.counters.statuses[Status::Success as usize] = u64::MAX; // consistent now: 1 call more wraps
    let mut top_ok = top.clone();
    top_ok.counters.calls[0] = 0;
    fresh(&pv2);
    pv2.restore_device(0, &top_ok).unwrap();
    assert_eq!(call(&pv2, pv::MAP, [0, 0x3000, P, dir::TO_DEVICE, 0]).status, Status::Success);
    assert_eq!(pv2.device(0).unwrap().stats().calls_named("map"), 0, "wrapped, not a panic");
    // Pages mapped and not unmapped must be the live mappings' pages.
    let mut pages = saved.clone();
    pages.counters.pages.0 += 5;
    fresh(&pv2);
    assert!(pv2.restore_device(0, &pages).is_err());
    fresh(&pv2);
    pv2.restore_device(0, &saved).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
    /// Arbitrary registers and arbitrary list contents: no panic, every status is one
    /// the ABI defines, and pins equal the pages of what is still mapped.
    #[test]
    fn arbitrary_calls_never_panic_or_leak(
        calls in prop::collection::vec((0u64..6, any::<[u64; 5]>(), prop::collection::vec(any::<u8>(), 0..96)), 1..40)
    ) {
        let (vm, pv) = setup(64 * P, 256);
        for (which, mut a, list_bytes) in calls {
            // Steer half the arguments into plausible ranges so calls get past decoding.
            a[0] %= 3;
            if which % 2 == 0 {
                a[1] %= RAM;
                a[2] %= 8 * P + 1;
                a[3] %= 4;
            }
            vm.memory().write_slice(&list_bytes, GuestAddress(0xF0_0000)).unwrap();
            if which >= 4 {
                a[1] = 0xF0_0000;
                a[2] %= 8;
            }
            let r = pv.call(&Args { nr: pv::BASE + which, a });
            prop_assert!(Status::from_raw(r.status as u64).is_some());
            let _ = decode(&Args { nr: pv::BASE + which, a });
        }
        let d = pv.device(0).unwrap();
        let live = d.live_mappings();
        prop_assert!(vm.account().pinned() <= 64 * P);
        if live == 0 {
            prop_assert_eq!(vm.account().pinned(), 0, "no mapping left, no pin left");
        }
    }
}
