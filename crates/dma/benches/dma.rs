//! Criterion benchmarks of the DMA core: translate hit and miss, map+unmap, copy
//! through DmaSpace against plain memcpy, and translate cost as the domain grows.
#![allow(missing_docs, clippy::unwrap_used)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dma::bench::{BUF_GPA, BUF_IOVA, Fixture};
use dma::{Access, DmaSpace, Gpa, Iova, Perm};
use std::hint::black_box;

fn translate(c: &mut Criterion) {
    let fx = Fixture::new(200_000);
    fx.domain.map(Iova(BUF_IOVA), Gpa(BUF_GPA), 2 << 20, Perm::READ_WRITE).unwrap();
    let dev = DmaSpace::new(fx.domain.clone(), "bench");
    c.bench_function("translate/hit", |b| {
        b.iter(|| black_box(dev.translate(black_box(Iova(BUF_IOVA + 128)), 64, Access::Read).is_ok()))
    });
    let mut g = c.benchmark_group("translate/miss");
    for n in [10usize, 1000, 100_000] {
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let per = dma::bench::translate_miss(iters.max(1), n);
                std::time::Duration::from_nanos((per * iters as f64) as u64)
            })
        });
    }
    g.finish();
}

fn map_unmap(c: &mut Criterion) {
    let fx = Fixture::new(16);
    let mut g = c.benchmark_group("map_unmap");
    for size in [4096u64, 2 << 20] {
        g.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, &size| {
            b.iter(|| {
                fx.domain.map(Iova(BUF_IOVA), Gpa(BUF_GPA), size, Perm::READ_WRITE).unwrap();
                black_box(fx.domain.unmap(Iova(BUF_IOVA), size).unwrap())
            })
        });
    }
    g.finish();
}

fn copy(c: &mut Criterion) {
    let fx = Fixture::new(16);
    fx.domain.map(Iova(BUF_IOVA), Gpa(BUF_GPA), 16 << 20, Perm::READ_WRITE).unwrap();
    let dev = DmaSpace::new(fx.domain.clone(), "bench");
    let src = fx.host(BUF_GPA);
    let mut g = c.benchmark_group("copy");
    for size in [4096usize, 64 << 10, 1 << 20] {
        let mut buf = vec![0u8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("dmaspace", size), &size, |b, _| {
            b.iter(|| dev.read(Iova(BUF_IOVA), black_box(&mut buf)).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("memcpy", size), &size, |b, &size| {
            // SAFETY: src is the fixture's guest memory, valid for 16 MiB >= size.
            b.iter(|| unsafe { std::ptr::copy_nonoverlapping(black_box(src), buf.as_mut_ptr(), size) })
        });
    }
    g.finish();
}

criterion_group!(benches, translate, map_unmap, copy);
criterion_main!(benches);
