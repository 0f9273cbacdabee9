//! Measurement harness shared by the criterion benches and `passthru bench dma`: each
//! function times one operation in a tight loop and returns nanoseconds per operation
//! (the median of several batches, so one preempted batch does not skew it).

use crate::{Access, DmaSpace, Domain, DomainConfig, Gpa, Iova, LockedMemory, Perm, VmDma};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Guest memory of the fixtures.
pub const FIXTURE_RAM: u64 = 512 << 20;
/// IOVA where the fixtures map their buffer.
pub const BUF_IOVA: u64 = 0x1_0000_0000;
/// Guest-physical address of the buffer.
pub const BUF_GPA: u64 = 0x100_0000;

/// A VM with unlimited locked memory and one domain.
pub struct Fixture {
    /// The VM's DMA state.
    pub vm: Arc<VmDma>,
    /// The domain.
    pub domain: Arc<Domain>,
}

impl Fixture {
    /// A fixture whose domain holds up to `max_mappings`.
    pub fn new(max_mappings: usize) -> Fixture {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), FIXTURE_RAM as usize)])
            .expect("fixture guest memory");
        let vm = VmDma::new(Arc::new(mem), LockedMemory::new(u64::MAX));
        let domain = vm.create_domain("bench", DomainConfig { max_mappings, ..Default::default() });
        Fixture { vm, domain }
    }

    /// Host address of guest-physical `gpa`.
    pub fn host(&self, gpa: u64) -> *mut u8 {
        self.vm.host_span(gpa).map(|(h, _, _)| h).unwrap_or(0) as *mut u8
    }
}

/// Median of `batches` timings of `iters` calls of `f`, in ns per call.
pub fn time_ns(batches: usize, iters: u64, mut f: impl FnMut()) -> f64 {
    let mut samples: Vec<f64> = (0..batches.max(1))
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_nanos() as f64 / iters as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// `translate` of 64 bytes whose translation is in the accessor's IOTLB.
pub fn translate_hit(iters: u64) -> f64 {
    let fx = Fixture::new(16);
    fx.domain.map(Iova(BUF_IOVA), Gpa(BUF_GPA), 2 << 20, Perm::READ_WRITE).expect("map");
    let dev = DmaSpace::new(fx.domain.clone(), "bench");
    let _ = dev.translate(Iova(BUF_IOVA), 64, Access::Read);
    time_ns(7, iters, || {
        let t = dev.translate(black_box(Iova(BUF_IOVA + 128)), 64, Access::Read);
        black_box(t.is_ok());
    })
}

/// `translate` of 64 bytes whose translation is in the IOTLB, inside an open
/// [`DmaSpace::batch`] (the fence paid once for many accesses).
pub fn translate_hit_batched(iters: u64) -> f64 {
    let fx = Fixture::new(16);
    fx.domain.map(Iova(BUF_IOVA), Gpa(BUF_GPA), 2 << 20, Perm::READ_WRITE).expect("map");
    let dev = DmaSpace::new(fx.domain.clone(), "bench");
    let _batch = dev.batch();
    time_ns(7, iters, || {
        let t = dev.translate(black_box(Iova(BUF_IOVA + 128)), 64, Access::Read);
        black_box(t.is_ok());
    })
}

/// `translate` of 64 bytes that misses the IOTLB (the accessor cycles through more
/// mappings than it caches), in a domain of `mappings` 4 KiB mappings (alternating
/// permissions, so that no two share a tree entry: the tree really has `mappings`).
pub fn translate_miss(iters: u64, mappings: usize) -> f64 {
    let fx = Fixture::new(mappings.max(16));
    let pages = (FIXTURE_RAM / 4096 - 1) as usize;
    for i in 0..mappings {
        let gpa = ((i % pages) as u64 + 1) * 4096;
        let perm = if i % 2 == 0 { Perm::READ } else { Perm::READ_WRITE };
        fx.domain.map(Iova(BUF_IOVA + i as u64 * 4096), Gpa(gpa), 4096, perm).expect("map");
    }
    debug_assert_eq!(fx.domain.stored_runs(), mappings);
    let dev = DmaSpace::new(fx.domain.clone(), "bench");
    // A fixed pseudo-random visiting order over all mappings (an LCG permutation).
    let order: Vec<u64> = (0..mappings as u64).map(|i| (i * 2_654_435_761) % mappings as u64).collect();
    let mut k = 0usize;
    let step = if mappings > 64 { 1 } else { 9 }; // small domains: stride past the 8-entry IOTLB
    time_ns(7, iters, || {
        k = (k + step) % order.len();
        let t = dev.translate(Iova(BUF_IOVA + order[k] * 4096), 64, Access::Read);
        black_box(t.is_ok());
    })
}

/// One map and one unmap of `size` bytes.
pub fn map_unmap(iters: u64, size: u64) -> f64 {
    let fx = Fixture::new(16);
    time_ns(7, iters, || {
        fx.domain.map(Iova(BUF_IOVA), Gpa(BUF_GPA), size, Perm::READ_WRITE).expect("map");
        black_box(fx.domain.unmap(Iova(BUF_IOVA), size).expect("unmap"));
    })
}

/// Copy of `size` bytes from guest memory into a buffer: (through DmaSpace, plain
/// memcpy of the same bytes), ns per copy, measured alternately in one run. With
/// `batch` > 1, that many copies share one access section.
pub fn copy(iters: u64, size: usize, batch: u64) -> (f64, f64) {
    let fx = Fixture::new(16);
    fx.domain.map(Iova(BUF_IOVA), Gpa(BUF_GPA), 16 << 20, Perm::READ_WRITE).expect("map");
    let dev = DmaSpace::new(fx.domain.clone(), "bench");
    let src = fx.host(BUF_GPA);
    let mut buf = vec![0u8; size];
    let mut dma = Vec::new();
    let mut raw = Vec::new();
    for _ in 0..5 {
        dma.push(
            time_ns(1, iters / batch.max(1), || {
                let _b = (batch > 1).then(|| dev.batch());
                for _ in 0..batch.max(1) {
                    dev.read(black_box(Iova(BUF_IOVA)), &mut buf).expect("read");
                    black_box(&buf);
                }
            }) / batch.max(1) as f64,
        );
        raw.push(time_ns(1, iters, || {
            // SAFETY: src is the fixture's guest memory, valid for 16 MiB >= size.
            unsafe { std::ptr::copy_nonoverlapping(black_box(src), buf.as_mut_ptr(), size) };
            black_box(&buf);
        }));
    }
    dma.sort_by(f64::total_cmp);
    raw.sort_by(f64::total_cmp);
    (dma[2], raw[2])
}

/// Unmap latency while a device thread copies `copy_bytes` through the same domain:
/// (median ns, 99th percentile ns, unmaps measured). The unmaps remove an unrelated
/// 4 KiB mapping; each waits only for the copy's current section (at most
/// [`crate::MAX_SECTION_BYTES`]), not for the whole copy.
pub fn unmap_during_copy(copy_bytes: u64) -> (f64, f64, usize) {
    let ram = copy_bytes * 2 + (4 << 20);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), ram as usize)]).expect("fixture guest memory");
    let vm = VmDma::new(Arc::new(mem), LockedMemory::new(u64::MAX));
    let domain = vm.create_domain("bench", DomainConfig::default());
    domain.map(Iova(BUF_IOVA), Gpa(0), copy_bytes * 2, Perm::READ_WRITE).expect("map");
    let spare = Iova(1 << 40);
    let spare_gpa = Gpa(copy_bytes * 2);
    let dev = DmaSpace::new(domain.clone(), "copier");
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let copier = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            // Touch the memory first so the copy runs at memory speed, then copy.
            let mut buf = vec![1u8; copy_bytes as usize];
            dev.write(Iova(BUF_IOVA), &buf).expect("fill");
            done.store(false, std::sync::atomic::Ordering::SeqCst);
            let section = crate::MAX_SECTION_BYTES as usize;
            for (i, chunk) in buf.chunks_mut(section).enumerate() {
                let off = (i * section) as u64;
                let from = dev.translate(Iova(BUF_IOVA + off), chunk.len() as u64, Access::Read).expect("src");
                let to = dev.translate(Iova(BUF_IOVA + copy_bytes + off), chunk.len() as u64, Access::Write);
                let to = to.expect("dst");
                for (s, d) in from.slices().zip(to.slices()) {
                    // SAFETY: both slices come from live translations of equal length.
                    unsafe {
                        std::ptr::copy_nonoverlapping(s.ptr_guard().as_ptr(), d.ptr_guard_mut().as_ptr(), s.len())
                    };
                }
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let mut samples = Vec::new();
    while !done.load(std::sync::atomic::Ordering::SeqCst) || samples.is_empty() {
        domain.map(spare, spare_gpa, 4096, Perm::READ_WRITE).expect("map spare");
        let t = Instant::now();
        domain.unmap(spare, 4096).expect("unmap spare");
        samples.push(t.elapsed().as_nanos() as f64);
        if copier.is_finished() && samples.len() > 1 {
            break;
        }
    }
    let _ = copier.join();
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    (samples[n / 2], samples[(n * 99 / 100).min(n - 1)], n)
}
