//! Map/unmap semantics (VFIO type1 v2), access checks, fault and dirty logs,
//! locked-memory accounting across domains, identity domains.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
use common::{MIB, PAGE, vm};
use dma::{Access, DmaSpace, DomainConfig, FaultReason, Gpa, Iova, MapError, PageSizes, Perm};
use vm_memory::{Bytes, GuestAddress};

#[test]
fn malformed_maps_are_invalid_and_change_nothing() {
    let vm = vm(u64::MAX);
    let d = vm.create_domain("d", DomainConfig::default());
    let inval = |r: Result<(), MapError>| matches!(r, Err(MapError::InvalidArgument(_)));
    assert!(inval(d.map(Iova(0x1000), Gpa(0), 0, Perm::READ)), "zero size");
    assert!(inval(d.map(Iova(0x1000), Gpa(0), PAGE, Perm::NONE)), "no permission");
    assert!(inval(d.map(Iova(0x1800), Gpa(0), PAGE, Perm::READ)), "iova misaligned");
    assert!(inval(d.map(Iova(0x1000), Gpa(0x800), PAGE, Perm::READ)), "gpa misaligned");
    assert!(inval(d.map(Iova(0x1000), Gpa(0), 0x1800, Perm::READ)), "size misaligned");
    assert!(inval(d.map(Iova(1 << 48), Gpa(0), PAGE, Perm::READ)), "outside the 48-bit aperture");
    assert!(inval(d.map(Iova((1 << 48) - PAGE), Gpa(0), 2 * PAGE, Perm::READ)), "straddles the aperture");
    assert!(inval(d.map(Iova(u64::MAX - PAGE + 1), Gpa(0), 2 * PAGE, Perm::READ)), "wraps");
    assert!(inval(d.map(Iova(0xfee0_0000), Gpa(0), PAGE, Perm::WRITE)), "MSI window is reserved");
    assert!(inval(d.map(Iova(0xfed0_0000), Gpa(0), 2 * MIB, Perm::WRITE)), "overlaps the MSI window");
    assert_eq!(
        d.map(Iova(0), Gpa(32 * MIB), PAGE, Perm::READ),
        Err(MapError::BadAddress { gpa: 32 * MIB, size: PAGE }),
        "past the end of guest memory"
    );
    assert_eq!(d.mapping_count(), 0);
    assert_eq!(vm.account().locked(), 0);
}

#[test]
fn granule_follows_the_page_size_bitmap() {
    let vm = vm(u64::MAX);
    let cfg = DomainConfig {
        page_sizes: PageSizes::new(PageSizes::SZ_64K | PageSizes::SZ_2M).unwrap(),
        ..Default::default()
    };
    let d = vm.create_domain("d", cfg);
    assert_eq!(d.granule(), 64 << 10);
    assert!(matches!(d.map(Iova(0), Gpa(0), PAGE, Perm::READ), Err(MapError::InvalidArgument(_))));
    d.map(Iova(0), Gpa(0), 64 << 10, Perm::READ).unwrap();
}

#[test]
fn any_overlap_is_exists_and_max_mappings_is_no_space() {
    let vm = vm(u64::MAX);
    let d = vm.create_domain("d", DomainConfig { max_mappings: 2, ..Default::default() });
    d.map(Iova(0x10000), Gpa(0), 4 * PAGE, Perm::READ_WRITE).unwrap();
    for (iova, size) in
        [(0x10000, 4 * PAGE), (0xf000, 2 * PAGE), (0x13000, 4 * PAGE), (0x11000, PAGE), (0x8000, 0x20000)]
    {
        assert_eq!(
            d.map(Iova(iova), Gpa(0), size, Perm::READ),
            Err(MapError::Exists { iova: Iova(iova) }),
            "{iova:#x}+{size:#x}"
        );
    }
    d.map(Iova(0x14000), Gpa(0), PAGE, Perm::READ).unwrap(); // adjacent above: fine
    assert_eq!(d.map(Iova(0x20000), Gpa(0), PAGE, Perm::READ), Err(MapError::NoSpace { max: 2 }));
    assert_eq!(d.mapping_count(), 2);
}

#[test]
fn unmap_removes_whole_mappings_never_splits_and_reports_bytes() {
    let vm = vm(u64::MAX);
    let d = vm.create_domain("d", DomainConfig::default());
    d.map(Iova(0x10000), Gpa(0), 2 * PAGE, Perm::READ).unwrap();
    d.map(Iova(0x12000), Gpa(0x100000), 2 * PAGE, Perm::READ).unwrap();
    d.map(Iova(0x20000), Gpa(0x200000), PAGE, Perm::READ).unwrap();
    let before = d.mappings();
    let split = Err(MapError::InvalidArgument("unmap would split a mapping"));
    assert_eq!(d.unmap(Iova(0x11000), 2 * PAGE), split, "starts inside a mapping");
    assert_eq!(d.unmap(Iova(0x10000), 3 * PAGE), split, "ends inside a mapping");
    assert_eq!(d.mappings(), before, "a refused unmap changes nothing");
    assert_eq!(d.unmap(Iova(0x30000), PAGE), Ok(0), "nothing mapped there");
    assert_eq!(d.unmap(Iova(0xf000), 6 * PAGE), Ok(4 * PAGE), "two whole mappings, gaps around them");
    assert_eq!(d.mapping_count(), 1);
    assert!(matches!(d.unmap(Iova(0x20000), 0), Err(MapError::InvalidArgument(_))));
    assert_eq!(d.unmap_all(), PAGE);
    assert_eq!(d.unmap_all(), 0);
    assert_eq!(vm.account().locked(), 0);
}

#[test]
fn a_1gib_map_is_one_mapping_and_one_page_table_entry() {
    let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 30)]).unwrap();
    let vm = dma::VmDma::new(std::sync::Arc::new(mem), dma::LockedMemory::new(u64::MAX));
    let d = vm.create_domain("d", DomainConfig::default());
    d.map(Iova(1 << 30), Gpa(1 << 30), 1 << 30, Perm::READ_WRITE).unwrap();
    assert_eq!((d.mapping_count(), d.page_entries()), (1, 1));
    d.map(Iova(0), Gpa(0x1000), 2 << 20, Perm::READ).unwrap(); // gpa misaligned for 2 MiB
    assert_eq!(d.page_entries(), 1 + 512);
}

#[test]
fn accesses_are_checked_whole_and_faults_touch_nothing() {
    let vm = vm(u64::MAX);
    let d = vm.create_domain("d", DomainConfig::default());
    vm.memory().write_slice(&[0xaa; 0x3000], GuestAddress(0x5000)).unwrap();
    d.map(Iova(0x100000), Gpa(0x5000), PAGE, Perm::READ_WRITE).unwrap();
    d.map(Iova(0x101000), Gpa(0x6000), PAGE, Perm::READ).unwrap();
    let dev = DmaSpace::new(d.clone(), "dev0");

    dev.write(Iova(0x100ff0), &[1; 16]).unwrap();
    let mut buf = [0u8; 32];
    dev.read(Iova(0x100ff0), &mut buf).unwrap(); // spans both mappings
    assert_eq!(&buf[..16], &[1; 16]);
    assert_eq!(&buf[16..], &[0xaa; 16]);

    // A write that spans into the read-only mapping writes nothing at all.
    let e = dev.write(Iova(0x100ff8), &[2; 16]).unwrap_err();
    assert_eq!((e.reason, e.access, e.iova, e.len), (FaultReason::Permission, Access::Write, Iova(0x100ff8), 16));
    let mut after = [0u8; 16];
    vm.memory().read_slice(&mut after, GuestAddress(0x5ff8)).unwrap();
    assert_eq!(after, [1, 1, 1, 1, 1, 1, 1, 1, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa]);

    // A read running past the mappings reads nothing.
    let mut big = [0x55u8; 64];
    let e = dev.read(Iova(0x101fe0), &mut big).unwrap_err();
    assert_eq!(e.reason, FaultReason::NotMapped);
    assert_eq!(big, [0x55; 64]);
    assert_eq!(dev.read(Iova(u64::MAX - 3), &mut [0; 8]).unwrap_err().reason, FaultReason::Overflow);

    let log = d.faults().recent();
    assert_eq!(d.faults().total(), 3);
    assert_eq!(&*log[0].device, "dev0");
    assert_eq!(log[1].reason, FaultReason::NotMapped);
}

#[test]
fn the_fault_log_is_bounded_but_counts_everything() {
    let vm = vm(u64::MAX);
    let d = vm.create_domain("d", DomainConfig::default());
    let dev = DmaSpace::new(d.clone(), "noisy");
    for i in 0..300u64 {
        assert!(dev.read(Iova(i * PAGE), &mut [0; 4]).is_err());
    }
    assert_eq!(d.faults().total(), 300);
    let recent = d.faults().recent();
    assert_eq!(recent.len(), 256);
    assert_eq!(recent[0].iova, Iova(44 * PAGE), "oldest kept is #44");
}

/// The domain's owner hears of its faults through the handler it set, at most
/// FAULT_REPORTS_PER_SECOND a second (the rest are counted, never queued), and nothing
/// once it clears it.
#[test]
fn faults_reach_the_domains_handler_rate_limited() {
    struct Count(std::sync::Mutex<Vec<dma::Fault>>);
    impl dma::FaultHandler for Count {
        fn fault(&self, f: &dma::Fault) {
            self.0.lock().unwrap().push(f.clone());
        }
    }
    let vm = vm(u64::MAX);
    let d = vm.create_domain("d", DomainConfig::default());
    let h = std::sync::Arc::new(Count(std::sync::Mutex::new(Vec::new())));
    d.on_fault(Some(h.clone()));
    let dev = DmaSpace::new(d.clone(), "noisy");
    assert!(dev.write(Iova(0x5000), &[1; 8]).is_err());
    {
        let got = h.0.lock().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].iova, got[0].access, &*got[0].device), (Iova(0x5000), Access::Write, "noisy"));
    }
    // A flood within one second: the handler hears the first FAULT_REPORTS_PER_SECOND.
    let n = dma::FAULT_REPORTS_PER_SECOND + 500;
    let t = std::time::Instant::now();
    for _ in 0..n {
        let _ = dev.read(Iova(0x5000), &mut [0; 4]);
    }
    if t.elapsed() < std::time::Duration::from_millis(900) {
        let heard = h.0.lock().unwrap().len() as u64;
        assert!(heard <= dma::FAULT_REPORTS_PER_SECOND, "{heard}");
        assert_eq!(heard + d.faults_unreported(), n + 1, "every fault heard or counted");
    }
    assert_eq!(d.faults().total(), n + 1, "all logged");
    d.on_fault(None);
    let before = h.0.lock().unwrap().len();
    std::thread::sleep(std::time::Duration::from_millis(1100)); // a new second
    let _ = dev.read(Iova(0x5000), &mut [0; 4]);
    assert_eq!(h.0.lock().unwrap().len(), before, "a cleared handler hears nothing");
}

#[test]
fn translate_yields_host_slices_split_at_host_discontiguity() {
    let vm = vm(u64::MAX);
    let d = vm.create_domain("d", DomainConfig::default());
    // Guest-physical 15 MiB..17 MiB spans the two host mappings of the fixture.
    d.map(Iova(0x4000_0000), Gpa(15 * MIB), 2 * MIB, Perm::READ_WRITE).unwrap();
    let dev = DmaSpace::new(d.clone(), "dev");
    let t = dev.translate(Iova(0x4000_0000 + MIB - 8), 16, Access::Write).unwrap();
    assert_eq!(t.slice_count(), 2);
    assert_eq!(t.gpa_ranges().collect::<Vec<_>>(), vec![(16 * MIB - 8, 8), (16 * MIB, 8)]);
    for s in t.slices() {
        s.write_slice(&[7; 8], 0).unwrap();
    }
    drop(t);
    let mut b = [0u8; 16];
    vm.memory().read_slice(&mut b, GuestAddress(16 * MIB - 8)).unwrap();
    assert_eq!(b, [7; 16]);
    assert!(vm.dirty().is_dirty(16 * MIB - 8) && vm.dirty().is_dirty(16 * MIB));
}

#[test]
fn unmap_invalidates_cached_translations() {
    let vm = vm(u64::MAX);
    let d = vm.create_domain("d", DomainConfig::default());
    d.map(Iova(0x10000), Gpa(0x10000), PAGE, Perm::READ_WRITE).unwrap();
    let dev = DmaSpace::new(d.clone(), "dev");
    dev.read(Iova(0x10000), &mut [0; 8]).unwrap(); // now cached
    assert_eq!(d.unmap(Iova(0x10000), PAGE), Ok(PAGE));
    assert_eq!(dev.read(Iova(0x10000), &mut [0; 8]).unwrap_err().reason, FaultReason::NotMapped);
    // Remapped elsewhere: the accessor sees the new target, not the cached one.
    vm.memory().write_slice(&[9; 8], GuestAddress(0x20000)).unwrap();
    d.map(Iova(0x10000), Gpa(0x20000), PAGE, Perm::READ).unwrap();
    let mut b = [0u8; 8];
    dev.read(Iova(0x10000), &mut b).unwrap();
    assert_eq!(b, [9; 8]);
}

#[test]
fn device_writes_mark_guest_pages_dirty_and_reads_do_not() {
    let vm = vm(u64::MAX);
    let d = vm.create_domain("d", DomainConfig::default());
    d.map(Iova(0), Gpa(0x800000), 4 * PAGE, Perm::READ_WRITE).unwrap();
    let dev = DmaSpace::new(d.clone(), "dev");
    dev.read(Iova(0), &mut [0; 4 * 4096]).unwrap();
    assert_eq!(vm.dirty().count(), 0);
    dev.write(Iova(PAGE + 100), &[1; 5000]).unwrap(); // pages 1 and 2
    assert_eq!(vm.dirty().take(), vec![0x801000, 0x802000], "guest-physical, not IOVA");
    assert_eq!(vm.dirty().count(), 0);
}

#[test]
fn a_page_mapped_in_two_domains_and_twice_in_one_is_counted_once() {
    let vm = vm(16 * PAGE);
    let a = vm.create_domain("a", DomainConfig::default());
    let b = vm.create_domain("b", DomainConfig::default());
    a.map(Iova(0), Gpa(0x100000), 8 * PAGE, Perm::READ).unwrap();
    a.map(Iova(0x100000), Gpa(0x100000), 8 * PAGE, Perm::READ).unwrap(); // same pages, second IOVA
    b.map(Iova(0x5000), Gpa(0x104000), 8 * PAGE, Perm::WRITE).unwrap(); // half overlaps
    assert_eq!(vm.account().pinned(), 12 * PAGE);
    a.unmap_all();
    assert_eq!(vm.account().pinned(), 8 * PAGE, "b still pins its 8 pages");
    drop(b);
    assert_eq!(vm.account().pinned(), 0, "a dropped domain releases its pins");
}

#[test]
fn the_limit_is_reached_exactly_and_an_over_limit_map_leaves_no_trace() {
    let vm = vm(8 * PAGE);
    let d = vm.create_domain("d", DomainConfig::default());
    d.map(Iova(0), Gpa(0), 6 * PAGE, Perm::READ).unwrap();
    d.map(Iova(0x10000), Gpa(0x10000), 2 * PAGE, Perm::READ).unwrap();
    assert_eq!(vm.account().locked(), vm.account().limit());
    let e = d.map(Iova(0x20000), Gpa(0x20000), PAGE, Perm::READ).unwrap_err();
    assert_eq!(e, MapError::NoMemory { locked: 8 * PAGE, wanted: PAGE, limit: 8 * PAGE });
    assert!(e.to_string().contains("raise it with"), "{e}");
    assert_eq!(d.lookup(Iova(0x20000)), None, "no mapping left behind");
    assert_eq!(d.mapping_count(), 2);
    assert_eq!(vm.account().locked(), 8 * PAGE);
    // Retry after an unmap succeeds: the error was transient.
    d.unmap(Iova(0x10000), 2 * PAGE).unwrap();
    d.map(Iova(0x20000), Gpa(0x20000), PAGE, Perm::READ).unwrap();
    assert_eq!(vm.account().locked(), 7 * PAGE);
}

#[test]
fn tce_style_charges_share_the_account_with_pins() {
    let vm = vm(4 * PAGE);
    let d = vm.create_domain("d", DomainConfig::default());
    vm.account().charge(3 * PAGE).unwrap();
    assert!(matches!(d.map(Iova(0), Gpa(0), 2 * PAGE, Perm::READ), Err(MapError::NoMemory { .. })));
    d.map(Iova(0), Gpa(0), PAGE, Perm::READ).unwrap();
}

#[test]
fn the_identity_domain_maps_all_ram_at_its_guest_address() {
    let vm = vm(u64::MAX);
    let d = vm.identity_domain("identity").unwrap();
    assert_eq!(vm.account().pinned(), 32 * MIB);
    vm.memory().write_slice(b"identity", GuestAddress(0x0123_4000)).unwrap();
    let dev = DmaSpace::new(d.clone(), "dev");
    let mut b = [0u8; 8];
    dev.read(Iova(0x0123_4000), &mut b).unwrap();
    assert_eq!(&b, b"identity");
    assert_eq!(dev.read(Iova(32 * MIB), &mut b).unwrap_err().reason, FaultReason::NotMapped);
}

#[test]
fn the_identity_domain_needs_a_limit_covering_ram() {
    let vm = vm(8 << 20);
    assert!(matches!(vm.identity_domain("identity"), Err(MapError::NoMemory { .. })));
}

#[test]
fn dropping_an_accessor_unregisters_it() {
    let vm = vm(u64::MAX);
    let d = vm.create_domain("d", DomainConfig::default());
    let a = DmaSpace::new(d.clone(), "a");
    let b = a.try_clone();
    assert_eq!(d.accessor_count(), 2);
    drop(a);
    drop(b);
    assert_eq!(d.accessor_count(), 0);
}

#[derive(Default)]
struct Recorder {
    log: std::sync::Mutex<Vec<String>>,
    refuse_iova: Option<u64>,
}

impl dma::MapObserver for Recorder {
    fn mapped(&self, maps: &[dma::Mapping]) -> Result<(), String> {
        if maps.iter().any(|m| Some(m.iova.0) == self.refuse_iova) {
            return Err("device said no".into());
        }
        self.log.lock().unwrap().extend(maps.iter().map(|m| format!("+{:#x}", m.iova.0)));
        Ok(())
    }
    fn unmapped(&self, maps: &[dma::Mapping]) {
        self.log.lock().unwrap().extend(maps.iter().map(|m| format!("-{:#x}", m.iova.0)));
    }
}

#[test]
fn observers_see_every_map_and_unmap_and_a_refusal_undoes_the_map() {
    let vm = vm(u64::MAX);
    let d = vm.create_domain("d", DomainConfig::default());
    d.map(Iova(0x1000), Gpa(0x1000), PAGE, Perm::READ).unwrap();
    let rec = std::sync::Arc::new(Recorder { refuse_iova: Some(0x9000), ..Default::default() });
    d.add_observer(rec.clone()).unwrap();
    d.map(Iova(0x2000), Gpa(0x2000), PAGE, Perm::READ).unwrap();
    let refused = d.map(Iova(0x9000), Gpa(0x9000), PAGE, Perm::READ);
    assert_eq!(refused, Err(MapError::Rejected("device said no".into())));
    assert_eq!(d.lookup(Iova(0x9000)), None, "the refused mapping is gone");
    assert_eq!(vm.account().pinned(), 2 * PAGE, "and so is its pin");
    d.unmap(Iova(0x1000), PAGE).unwrap();
    let o: std::sync::Arc<dyn dma::MapObserver> = rec.clone();
    d.remove_observer(&o);
    assert_eq!(*rec.log.lock().unwrap(), vec!["+0x1000", "+0x2000", "-0x1000", "-0x2000"]);
}

#[test]
fn replace_counts_released_pins_and_a_refusal_changes_nothing() {
    let vm = vm(2 * PAGE);
    let d = vm.create_domain("d", DomainConfig { max_mappings: 3, ..Default::default() });
    let m = |iova: u64, gpa: u64| dma::Mapping { iova: Iova(iova), gpa: Gpa(gpa), size: PAGE, perm: Perm::READ };
    d.map_many(&[m(0x1000, 0x1000), m(0x2000, 0x2000)]).unwrap();
    // At the limit, an entry rewritten to another page fits: the old pin is released first.
    d.replace(&[Iova(0x2000)], &[m(0x2000, 0x7000)]).unwrap();
    assert_eq!(d.lookup(Iova(0x2000)).map(|x| x.gpa), Some(Gpa(0x7000)));
    assert_eq!(vm.account().pinned(), 2 * PAGE);
    // Two pages for one: over the limit, nothing changes.
    let e = d.replace(&[Iova(0x2000)], &[m(0x2000, 0x8000), m(0x3000, 0x9000)]).unwrap_err();
    assert!(matches!(e.error, MapError::NoMemory { .. }) && !e.lost_old, "{e:?}");
    assert_eq!(d.mappings(), vec![m(0x1000, 0x1000), m(0x2000, 0x7000)]);
    // A new mapping overlapping one that stays: nothing changes.
    let e = d.replace(&[Iova(0x2000)], &[m(0x1000, 0x7000)]).unwrap_err();
    assert_eq!((e.index, e.error, e.lost_old), (0, MapError::Exists { iova: Iova(0x1000) }, false));
    assert_eq!(d.mappings(), vec![m(0x1000, 0x1000), m(0x2000, 0x7000)]);
    assert_eq!(vm.account().pinned(), 2 * PAGE);
    // An observer refusing the new mapping after the old one left: neither stays.
    let rec = std::sync::Arc::new(Recorder { refuse_iova: Some(0x4000), ..Default::default() });
    d.add_observer(rec.clone()).unwrap();
    let e = d.replace(&[Iova(0x2000)], &[m(0x4000, 0x1000)]).unwrap_err();
    assert!(e.lost_old, "{e:?}");
    assert_eq!(d.mappings(), vec![m(0x1000, 0x1000)]);
    assert_eq!(vm.account().pinned(), PAGE, "the old pin and the new one both released");
    assert_eq!(*rec.log.lock().unwrap(), vec!["+0x1000", "+0x2000", "-0x2000"]);
}

#[test]
fn map_many_is_all_or_nothing_and_unmap_exact_removes_only_what_it_names() {
    let vm = vm(8 * PAGE);
    let d = vm.create_domain("d", DomainConfig::default());
    let m = |iova: u64, gpa: u64, pages: u64| dma::Mapping {
        iova: Iova(iova),
        gpa: Gpa(gpa),
        size: pages * PAGE,
        perm: Perm::READ,
    };
    d.map(Iova(0x50000), Gpa(0x50000), PAGE, Perm::READ).unwrap();
    // The third mapping clashes with an existing one: nothing of the batch stays.
    let e = d.map_many(&[m(0x10000, 0x10000, 1), m(0x20000, 0x20000, 1), m(0x50000, 0x60000, 1)]).unwrap_err();
    assert_eq!(e, (2, MapError::Exists { iova: Iova(0x50000) }));
    assert_eq!((d.mapping_count(), vm.account().pinned()), (1, PAGE));
    // Over the limit as a whole: nothing stays either.
    assert!(matches!(
        d.map_many(&[m(0x10000, 0x10000, 4), m(0x20000, 0x20000, 4)]),
        Err((0, MapError::NoMemory { .. }))
    ));
    assert_eq!((d.mapping_count(), vm.account().pinned()), (1, PAGE));
    d.map_many(&[m(0x10000, 0x10000, 2), m(0x20000, 0x20000, 2)]).unwrap();
    assert_eq!((d.mapping_count(), vm.account().pinned()), (3, 5 * PAGE));
    assert_eq!(d.unmap_exact(&[Iova(0x10000), Iova(0x30000), Iova(0x20000)]), 4 * PAGE, "unknown IOVAs skipped");
    assert_eq!(d.mappings(), vec![m(0x50000, 0x50000, 1)]);
    assert_eq!(vm.account().pinned(), PAGE);
    d.map_many(&[m(0x10000, 0x10000, 1), m(0x20000, 0x20000, 1)]).unwrap();
    assert_eq!(d.mappings_upto(2), vec![m(0x10000, 0x10000, 1), m(0x20000, 0x20000, 1)], "the first two by IOVA");
}

#[test]
fn a_write_translation_marks_its_pages_dirty_after_the_write_so_no_take_loses_it() {
    let vm = vm(u64::MAX);
    let d = vm.create_domain("d", DomainConfig::default());
    d.map(Iova(0x10000), Gpa(0x40000), PAGE, Perm::READ_WRITE).unwrap();
    let dev = DmaSpace::new(d.clone(), "dev");
    let _ = vm.dirty().take();
    {
        let t = dev.translate(Iova(0x10000), 8, Access::Write).unwrap();
        // Migration takes the log while the device holds the translation...
        assert!(vm.dirty().take().is_empty(), "nothing written yet");
        for s in t.slices() {
            s.write_slice(b"written!", 0).unwrap();
        }
        // ...and the write completes afterwards.
    }
    assert_eq!(vm.dirty().take(), vec![0x40000], "the write is reported by the next take");
    let mut b = [0u8; 8];
    vm.memory().read_slice(&mut b, GuestAddress(0x40000)).unwrap();
    assert_eq!(&b, b"written!");
}

#[test]
fn long_accesses_are_checked_whole_then_copied_in_bounded_sections() {
    let vm = vm(u64::MAX);
    let d = vm.create_domain("d", DomainConfig::default());
    // 3 MiB + 4 KiB across the two host mappings of the fixture.
    let len = 3 * MIB + PAGE;
    d.map(Iova(1 << 32), Gpa(14 * MIB), len, Perm::READ_WRITE).unwrap();
    let dev = DmaSpace::new(d.clone(), "dev");
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    dev.write(Iova(1 << 32), &data).unwrap();
    let mut back = vec![0u8; len as usize];
    dev.read(Iova(1 << 32), &mut back).unwrap();
    assert!(back == data, "the chunked copy round-trips");
    assert_eq!(vm.dirty().count(), len / PAGE, "every page written is dirty");
    // One byte too many: refused whole, nothing written, one fault.
    let before = d.faults().total();
    let poison = vec![0xeeu8; len as usize + 1];
    let f = dev.write(Iova(1 << 32), &poison).unwrap_err();
    assert_eq!((f.iova, f.reason), (Iova(1 << 32), FaultReason::NotMapped));
    assert_eq!(d.faults().total(), before + 1);
    dev.read(Iova(1 << 32), &mut back).unwrap();
    assert!(back == data, "a refused long write changed nothing");
    assert!(dev.read(Iova(1 << 32), &mut vec![0u8; len as usize + 1]).is_err());
    assert_eq!(dma::MAX_SECTION_BYTES, MIB);
}
