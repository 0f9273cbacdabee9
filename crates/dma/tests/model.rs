//! Random map/unmap/unmap-all/read/write/translate/dirty sequences run against the real
//! domain and a plain model (a list of mappings and a byte array); every result, error
//! kind, byte, pin count and dirty page must agree.
#![allow(clippy::unwrap_used, missing_docs)]

use dma::{Access, DmaSpace, DomainConfig, FaultReason, Gpa, Iova, LockedMemory, MapError, Perm, VmDma};
use proptest::prelude::*;
use std::collections::BTreeSet;
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const P: u64 = 4096;
const RAM_PAGES: u64 = 64;
const MAX_MAPPINGS: usize = 8;
const LIMIT_PAGES: u64 = 40;

#[derive(Clone, Debug)]
enum Op {
    Map {
        iova: u64,
        gpa: u64,
        pages: u64,
        perm: u8,
    },
    /// A batch (iova, gpa, pages, perm), all or nothing.
    MapMany {
        maps: Vec<(u64, u64, u64, u8)>,
    },
    /// Exactly the mappings starting at these IOVAs.
    UnmapExact {
        iovas: Vec<u64>,
    },
    Unmap {
        iova: u64,
        pages: u64,
    },
    UnmapAll,
    Read {
        dev: usize,
        iova: u64,
        len: u64,
    },
    Write {
        dev: usize,
        iova: u64,
        len: u64,
        seed: u8,
    },
    Translate {
        dev: usize,
        iova: u64,
        len: u64,
        write: bool,
    },
    TakeDirty,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..40u64, 0..70u64, 0..6u64, 0..4u8).prop_map(|(i, g, n, p)| Op::Map { iova: i * P, gpa: g * P, pages: n, perm: p }),
        // Batches: in IOVA order one after another (a TCE put) or anywhere.
        2 => (0..40u64, any::<bool>(), prop::collection::vec((0..3u64, 0..70u64, 0..4u64, 0..4u8), 1..6)).prop_map(
            |(start, ordered, v)| {
                let mut at = start;
                let maps = v
                    .into_iter()
                    .map(|(gap, g, n, p)| {
                        let iova = if ordered { at + gap } else { (at * 7 + gap * 13 + g) % 40 };
                        at = iova + n;
                        (iova * P, g * P, n, p)
                    })
                    .collect();
                Op::MapMany { maps }
            }
        ),
        // Runs: mappings of one size back to back in IOVA and guest memory (a TCE
        // window mapping RAM page by page), which the domain stores as one entry.
        2 => (0..40u64, 0..60u64, 1..12u64, 1..3u64, 1..4u8).prop_map(|(i, g, count, unit, p)| Op::MapMany {
            maps: (0..count).map(|k| ((i + k * unit) * P, (g + k * unit) * P, unit, p)).collect()
        }),
        2 => (0..44u64, 0..10u64).prop_map(|(i, n)| Op::Unmap { iova: i * P, pages: n }),
        2 => prop::collection::vec(0..44u64, 0..8).prop_map(|v| Op::UnmapExact { iovas: v.into_iter().map(|i| i * P).collect() }),
        1 => Just(Op::UnmapAll),
        4 => (0..2usize, 0..42 * P, 0..3 * P).prop_map(|(dev, iova, len)| Op::Read { dev, iova, len }),
        4 => (0..2usize, 0..42 * P, 0..3 * P, any::<u8>()).prop_map(|(dev, iova, len, seed)| Op::Write { dev, iova, len, seed }),
        2 => (0..2usize, 0..42 * P, 1..3 * P, any::<bool>()).prop_map(|(dev, iova, len, write)| Op::Translate { dev, iova, len, write }),
        1 => Just(Op::TakeDirty),
    ]
}

#[derive(Clone, Copy, Debug)]
struct M {
    iova: u64,
    gpa: u64,
    size: u64,
    perm: u8,
}

#[derive(Default)]
struct Model {
    maps: Vec<M>,
    mem: Vec<u8>,
    dirty: BTreeSet<u64>,
}

impl Model {
    fn pinned_pages(maps: &[M]) -> BTreeSet<u64> {
        maps.iter().flat_map(|m| (m.gpa / P)..((m.gpa + m.size) / P)).collect()
    }

    fn map(&mut self, iova: u64, gpa: u64, pages: u64, perm: u8) -> Result<(), MapError> {
        let size = pages * P;
        if pages == 0 || perm == 0 {
            return Err(MapError::InvalidArgument("any"));
        }
        if gpa + size > RAM_PAGES * P {
            return Err(MapError::BadAddress { gpa, size });
        }
        if self.maps.iter().any(|m| iova < m.iova + m.size && m.iova < iova + size) {
            return Err(MapError::Exists { iova: Iova(iova) });
        }
        if self.maps.len() >= MAX_MAPPINGS {
            return Err(MapError::NoSpace { max: MAX_MAPPINGS });
        }
        let locked = Self::pinned_pages(&self.maps).len() as u64 * P;
        let mut with = self.maps.clone();
        with.push(M { iova, gpa, size, perm });
        let after = Self::pinned_pages(&with).len() as u64 * P;
        if after > LIMIT_PAGES * P {
            return Err(MapError::NoMemory { locked, wanted: after - locked, limit: LIMIT_PAGES * P });
        }
        self.maps = with;
        Ok(())
    }

    /// A batch as `Domain::map_many` checks it: each mapping's shape and guest memory
    /// in turn, then each mapping against what is mapped (earlier ones of the batch included) and
    /// the mapping limit, then the pins of the whole batch (index 0).
    fn map_many(&mut self, maps: &[(u64, u64, u64, u8)]) -> Result<(), (usize, MapError)> {
        // Each mapping in turn: its shape, then its guest memory.
        for (i, &(_, g, n, p)) in maps.iter().enumerate() {
            if n == 0 || p == 0 {
                return Err((i, MapError::InvalidArgument("any")));
            }
            if g + n * P > RAM_PAGES * P {
                return Err((i, MapError::BadAddress { gpa: g, size: n * P }));
            }
        }
        let mut with = self.maps.clone();
        for (i, &(iova, gpa, n, perm)) in maps.iter().enumerate() {
            let size = n * P;
            if with.iter().any(|m| iova < m.iova + m.size && m.iova < iova + size) {
                return Err((i, MapError::Exists { iova: Iova(iova) }));
            }
            if with.len() >= MAX_MAPPINGS {
                return Err((i, MapError::NoSpace { max: MAX_MAPPINGS }));
            }
            with.push(M { iova, gpa, size, perm });
        }
        let locked = Self::pinned_pages(&self.maps).len() as u64 * P;
        let after = Self::pinned_pages(&with).len() as u64 * P;
        if after > LIMIT_PAGES * P {
            return Err((0, MapError::NoMemory { locked, wanted: after - locked, limit: LIMIT_PAGES * P }));
        }
        self.maps = with;
        Ok(())
    }

    fn unmap(&mut self, iova: u64, pages: u64) -> Result<u64, MapError> {
        let end = iova + pages * P;
        if pages == 0 {
            return Err(MapError::InvalidArgument("any"));
        }
        if self
            .maps
            .iter()
            .any(|m| (m.iova < iova && m.iova + m.size > iova) || (m.iova < end && m.iova + m.size > end))
        {
            return Err(MapError::InvalidArgument("any"));
        }
        let bytes = self.maps.iter().filter(|m| m.iova >= iova && m.iova < end).map(|m| m.size).sum();
        self.maps.retain(|m| !(m.iova >= iova && m.iova < end));
        Ok(bytes)
    }

    /// Guest-physical address of each byte, or the first fault.
    fn resolve(&self, iova: u64, len: u64, access: Access) -> Result<Vec<u64>, FaultReason> {
        let need = access as u8;
        let mut out = Vec::with_capacity(len as usize);
        for a in iova..iova + len {
            let m = self.maps.iter().find(|m| a >= m.iova && a < m.iova + m.size).ok_or(FaultReason::NotMapped)?;
            if m.perm & need == 0 {
                return Err(FaultReason::Permission);
            }
            out.push(m.gpa + (a - m.iova));
        }
        Ok(out)
    }
}

fn same_kind(a: &MapError, b: &MapError) -> bool {
    match (a, b) {
        (MapError::InvalidArgument(_), MapError::InvalidArgument(_)) => true,
        _ => a == b,
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let half = (RAM_PAGES / 2 * P) as usize;
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), half), (GuestAddress(half as u64), half)]).unwrap();
    let vm = VmDma::new(Arc::new(mem), LockedMemory::new(LIMIT_PAGES * P));
    let d = vm.create_domain("model", DomainConfig { max_mappings: MAX_MAPPINGS, ..Default::default() });
    let devs = [DmaSpace::new(d.clone(), "dev0"), DmaSpace::new(d.clone(), "dev1")];
    let mut model = Model { mem: vec![0; (RAM_PAGES * P) as usize], ..Default::default() };
    let mut faults = 0;

    for op in ops {
        match op {
            Op::Map { iova, gpa, pages, perm } => {
                let want = model.map(iova, gpa, pages, perm);
                let got = d.map(Iova(iova), Gpa(gpa), pages * P, Perm::new(perm & 1 != 0, perm & 2 != 0));
                match (&got, &want) {
                    (Ok(()), Ok(())) => {}
                    (Err(g), Err(w)) => {
                        prop_assert!(same_kind(g, w), "{op:?}: got {g:?} want {w:?}")
                    }
                    _ => prop_assert!(false, "{op:?}: got {got:?} want {want:?}"),
                }
            }
            Op::MapMany { ref maps } => {
                let want = model.map_many(maps);
                let batch: Vec<dma::Mapping> = maps
                    .iter()
                    .map(|&(iova, gpa, n, p)| dma::Mapping {
                        iova: Iova(iova),
                        gpa: Gpa(gpa),
                        size: n * P,
                        perm: Perm::new(p & 1 != 0, p & 2 != 0),
                    })
                    .collect();
                let got = d.map_many(&batch);
                match (&got, &want) {
                    (Ok(()), Ok(())) => {}
                    (Err((gi, g)), Err((wi, w))) => {
                        prop_assert!(gi == wi && same_kind(g, w), "{op:?}: got {got:?} want {want:?}")
                    }
                    _ => prop_assert!(false, "{op:?}: got {got:?} want {want:?}"),
                }
            }
            Op::Unmap { iova, pages } => {
                let want = model.unmap(iova, pages);
                let got = d.unmap(Iova(iova), pages * P);
                match (&got, &want) {
                    (Ok(g), Ok(w)) => prop_assert_eq!(g, w, "{:?}", op),
                    (Err(g), Err(w)) => {
                        prop_assert!(same_kind(g, w), "{op:?}: got {g:?} want {w:?}")
                    }
                    _ => prop_assert!(false, "{op:?}: got {got:?} want {want:?}"),
                }
            }
            Op::UnmapExact { ref iovas } => {
                let mut want = 0;
                for i in iovas {
                    if let Some(pos) = model.maps.iter().position(|m| m.iova == *i) {
                        want += model.maps.remove(pos).size;
                    }
                }
                let list: Vec<Iova> = iovas.iter().map(|i| Iova(*i)).collect();
                prop_assert_eq!(d.unmap_exact(&list), want, "{:?}", op);
            }
            Op::UnmapAll => {
                let want: u64 = model.maps.iter().map(|m| m.size).sum();
                model.maps.clear();
                prop_assert_eq!(d.unmap_all(), want);
            }
            Op::Read { dev, iova, len } => {
                let mut buf = vec![0x5a; len as usize];
                let got = devs[dev].read(Iova(iova), &mut buf);
                match model.resolve(iova, len, Access::Read) {
                    Ok(gpas) => {
                        prop_assert!(got.is_ok(), "{op:?}: {got:?}");
                        let want: Vec<u8> = gpas.iter().map(|g| model.mem[*g as usize]).collect();
                        prop_assert_eq!(buf, want, "{:?}", op);
                    }
                    Err(reason) => {
                        faults += 1;
                        prop_assert_eq!(got.map_err(|f| f.reason), Err(reason), "{:?}", op);
                        prop_assert!(buf.iter().all(|b| *b == 0x5a), "a failed read wrote the buffer");
                    }
                }
            }
            Op::Write { dev, iova, len, seed } => {
                let data: Vec<u8> = (0..len).map(|i| seed.wrapping_add(i as u8)).collect();
                let got = devs[dev].write(Iova(iova), &data);
                match model.resolve(iova, len, Access::Write) {
                    Ok(gpas) => {
                        prop_assert!(got.is_ok(), "{op:?}: {got:?}");
                        for (g, b) in gpas.iter().zip(&data) {
                            model.mem[*g as usize] = *b;
                            model.dirty.insert(g / P * P);
                        }
                    }
                    Err(reason) => {
                        faults += 1;
                        prop_assert_eq!(got.map_err(|f| f.reason), Err(reason), "{:?}", op);
                    }
                }
            }
            Op::Translate { dev, iova, len, write } => {
                let access = if write { Access::Write } else { Access::Read };
                let got = devs[dev].translate(Iova(iova), len, access);
                match model.resolve(iova, len, access) {
                    Ok(gpas) => {
                        let t = got.map_err(|f| TestCaseError::fail(format!("{op:?}: {f}")))?;
                        let flat: Vec<u64> = t.gpa_ranges().flat_map(|(g, n)| g..g + n).collect();
                        prop_assert_eq!(flat, gpas.clone(), "{:?}", op);
                        let total: usize = t.slices().map(|s| s.len()).sum();
                        prop_assert_eq!(total as u64, len);
                        if write {
                            model.dirty.extend(gpas.iter().map(|g| g / P * P));
                        }
                    }
                    Err(reason) => {
                        faults += 1;
                        prop_assert_eq!(got.err().map(|f| f.reason), Some(reason), "{:?}", op);
                    }
                }
            }
            Op::TakeDirty => {
                let got: BTreeSet<u64> = vm.dirty().take().into_iter().collect();
                prop_assert_eq!(got, std::mem::take(&mut model.dirty));
            }
        }
        prop_assert_eq!(vm.account().pinned(), Model::pinned_pages(&model.maps).len() as u64 * P);
        prop_assert_eq!(d.mapping_count(), model.maps.len());
        let mut listed: Vec<(u64, u64, u64)> = model.maps.iter().map(|m| (m.iova, m.gpa, m.size)).collect();
        listed.sort_unstable();
        prop_assert_eq!(
            d.mappings().iter().map(|m| (m.iova.0, m.gpa.0, m.size)).collect::<Vec<_>>(),
            listed,
            "every mapping listed as it was made"
        );
        prop_assert_eq!(d.faults().total(), faults);
    }
    // Guest memory as the model has it.
    let mut all = vec![0u8; (RAM_PAGES * P) as usize];
    vm.memory().read_slice(&mut all, GuestAddress(0)).unwrap();
    prop_assert!(all == model.mem, "guest memory differs from the model");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn domain_matches_the_model(ops in prop::collection::vec(op(), 1..80)) {
        run(ops)?;
    }
}
