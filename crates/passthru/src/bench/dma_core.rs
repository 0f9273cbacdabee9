//! `bench dma`: the DMA remapping core in process.

use super::*;

#[derive(Serialize, Debug)]
struct CopyFigure {
    bytes: usize,
    /// Copies per access section (1 = each copy fences on its own).
    per_section: u64,
    dmaspace_ns: f64,
    memcpy_ns: f64,
    /// memcpy time / DmaSpace time: the throughput ratio (1.0 = as fast as memcpy).
    ratio: f64,
}

#[derive(Serialize, Debug)]
struct ScaleFigure {
    mappings: usize,
    translate_miss_ns: f64,
    ratio_to_10: f64,
}

#[derive(Serialize, Debug)]
struct DmaReport {
    translate_hit_ns: f64,
    translate_hit_batched_ns: f64,
    translate_miss_ns: f64,
    map_unmap_4k_ns: f64,
    map_unmap_2m_ns: f64,
    unmap_during_copy: UnmapFigure,
    copy: Vec<CopyFigure>,
    scaling: Vec<ScaleFigure>,
}

/// Unmap latency of an unrelated mapping while a long copy runs in the same domain.
#[derive(Serialize, Debug)]
struct UnmapFigure {
    copy_mib: u64,
    median_ns: f64,
    p99_ns: f64,
    unmaps: usize,
}

pub(super) fn dma_bench(quick: bool, json: Option<PathBuf>, plot: Option<PathBuf>) -> Result<ExitCode, String> {
    let k = if quick { 10 } else { 1 };
    let hit = dma::bench::translate_hit(2_000_000 / k);
    let hit_batched = dma::bench::translate_hit_batched(2_000_000 / k);
    let miss = dma::bench::translate_miss(1_000_000 / k, 10);
    let mu4k = dma::bench::map_unmap(500_000 / k, 4096);
    let mu2m = dma::bench::map_unmap(500_000 / k, 2 << 20);
    let copy_mib = if quick { 64 } else { 512 };
    let (unmap_med, unmap_p99, unmap_n) = dma::bench::unmap_during_copy(copy_mib << 20);
    let copy: Vec<CopyFigure> =
        [(4096usize, 200_000u64, 1u64), (4096, 200_000, 8), (64 << 10, 20_000, 1), (1 << 20, 1_000, 1)]
            .into_iter()
            .map(|(bytes, iters, per_section)| {
                let (d, m) = dma::bench::copy(iters / k, bytes, per_section);
                CopyFigure { bytes, per_section, dmaspace_ns: d, memcpy_ns: m, ratio: m / d }
            })
            .collect();
    let mut scaling = Vec::new();
    let mut base = 0.0;
    let sizes = [10usize, 100, 1_000, 10_000, 100_000];
    let bar = progress(sizes.len() as u64, "translate miss as domains grow");
    for n in sizes {
        bar.inc(1);
        let ns = dma::bench::translate_miss(1_000_000 / k, n);
        if n == 10 {
            base = ns;
        }
        scaling.push(ScaleFigure { mappings: n, translate_miss_ns: ns, ratio_to_10: ns / base });
    }
    bar.finish_and_clear();
    let r = DmaReport {
        translate_hit_ns: hit,
        translate_hit_batched_ns: hit_batched,
        translate_miss_ns: miss,
        map_unmap_4k_ns: mu4k,
        map_unmap_2m_ns: mu2m,
        unmap_during_copy: UnmapFigure { copy_mib, median_ns: unmap_med, p99_ns: unmap_p99, unmaps: unmap_n },
        copy,
        scaling,
    };

    println!("passthru bench dma: in process, one run");
    // One row: the operation, its time, and its goal in ns when it has one.
    let row = |name: &str, ns: f64, max_ns: Option<f64>| {
        let g = max_ns.map(|m| format!("<= {m} ns: {}", goal(ns <= m))).unwrap_or_default();
        println!("{name:<44} {ns:>10.1}   {g}");
    };
    println!("{:<44} {:>10}   goal", "operation", "ns");
    row("translate 64 B, IOTLB hit", r.translate_hit_ns, Some(10.0));
    row("translate 64 B, IOTLB hit, inside a batch", r.translate_hit_batched_ns, None);
    row("translate 64 B, IOTLB miss (10 mappings)", r.translate_miss_ns, None);
    row("map + unmap 4 KiB", r.map_unmap_4k_ns, Some(200.0));
    row("map + unmap 2 MiB", r.map_unmap_2m_ns, None);
    let u = &r.unmap_during_copy;
    row(&format!("unmap 4 KiB while a {} MiB copy runs (median)", u.copy_mib), u.median_ns, Some(100_000.0));
    row(&format!("  same, 99th percentile ({} unmaps)", u.unmaps), u.p99_ns, None);
    println!();
    println!("{:<24} {:>12} {:>12} {:>8}   goal", "copy (per section)", "DmaSpace ns", "memcpy ns", "ratio");
    for c in &r.copy {
        let target = match c.bytes {
            4096 => Some(0.90),
            b if b == 1 << 20 => Some(0.98),
            _ => None,
        };
        let g = target.map(|t| format!(">= {t:.2}: {}", goal(c.ratio >= t))).unwrap_or_default();
        let label = format!("{} KiB (x{})", c.bytes >> 10, c.per_section);
        println!("{:<24} {:>12.1} {:>12.1} {:>8.3}   {g}", label, c.dmaspace_ns, c.memcpy_ns, c.ratio);
    }
    println!();
    println!(
        "{:<14} {:>14} {:>12}   (translate miss as the domain grows; log2 of the growth is {:.1})",
        "mappings",
        "ns",
        "x 10",
        (100_000f64 / 10.0).log2()
    );
    for s in &r.scaling {
        println!("{:<14} {:>14.1} {:>12.2}", s.mappings, s.translate_miss_ns, s.ratio_to_10);
    }
    write_json(json, &r)?;
    if let Some(path) = plot {
        let points = r.scaling.iter().map(|s| (s.mappings as f64, s.translate_miss_ns)).collect();
        crate::plot::draw(
            &path,
            &crate::plot::Chart {
                title: "translate, IOTLB miss, as the domain grows",
                x: "mappings in the domain",
                y: "ns per translate",
                log_x: true,
            },
            &[crate::plot::Series { name: "IOTLB miss".into(), points }],
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
