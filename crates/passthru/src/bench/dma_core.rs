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

pub(super) fn dma_bench(
    quick: bool,
    runs: u32,
    json: Option<PathBuf>,
    plot: Option<PathBuf>,
) -> Result<ExitCode, String> {
    let title = format!("passthru bench dma: in process{}", if quick { ", quick" } else { "" });
    let (_, spreads) = repeat(&title, runs, json, || Ok(measure(quick)), figures)?;
    if let Some(path) = plot {
        let points = SIZES
            .iter()
            .filter_map(|n| spread::median_of(&spreads, &miss_name(*n)).map(|ns| (*n as f64, ns)))
            .collect();
        plot_to(
            &path,
            &crate::plot::Chart {
                title: "translate, IOTLB miss, as the domain grows",
                x: "mappings in the domain",
                y: "ns per translate (median of the runs)",
                log_x: true,
            },
            &[crate::plot::Series { name: "IOTLB miss".into(), points }],
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Domain sizes the translate miss is measured at.
const SIZES: [usize; 5] = [10, 100, 1_000, 10_000, 100_000];

fn miss_name(mappings: usize) -> String {
    format!("translate 64 B, IOTLB miss, {mappings} mappings")
}

fn figures(r: &DmaReport) -> Vec<Fig> {
    let u = &r.unmap_during_copy;
    let mut v = vec![
        Fig::new("translate 64 B, IOTLB hit", "ns", r.translate_hit_ns).goal(Goal::AtMost(10.0)),
        Fig::new("translate 64 B, IOTLB hit, inside a batch", "ns", r.translate_hit_batched_ns),
        Fig::new("map + unmap 4 KiB", "ns", r.map_unmap_4k_ns).goal(Goal::AtMost(200.0)),
        Fig::new("map + unmap 2 MiB", "ns", r.map_unmap_2m_ns),
        Fig::new(format!("unmap 4 KiB during a {} MiB copy, median", u.copy_mib), "ns", u.median_ns)
            .goal(Goal::AtMost(100_000.0)),
        Fig::new(format!("unmap 4 KiB during a {} MiB copy, p99", u.copy_mib), "ns", u.p99_ns),
    ];
    for c in &r.copy {
        let f = Fig::new(format!("copy {} KiB (x{}) / memcpy", c.bytes >> 10, c.per_section), "ratio", c.ratio);
        v.push(match (c.bytes, c.per_section) {
            (4096, 1) => f.goal(Goal::AtLeast(0.90)),
            (b, 1) if b == 1 << 20 => f.goal(Goal::AtLeast(0.98)),
            _ => f,
        });
    }
    for s in &r.scaling {
        v.push(Fig::new(miss_name(s.mappings), "ns", s.translate_miss_ns));
    }
    if let Some(last) = r.scaling.last() {
        v.push(Fig::new(format!("miss at {} / miss at 10", last.mappings), "ratio", last.ratio_to_10));
    }
    v
}

fn measure(quick: bool) -> DmaReport {
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
    let mut base = f64::NAN;
    for n in SIZES {
        let ns = dma::bench::translate_miss(1_000_000 / k, n);
        if n == SIZES[0] {
            base = ns;
        }
        scaling.push(ScaleFigure { mappings: n, translate_miss_ns: ns, ratio_to_10: ns / base });
    }
    DmaReport {
        translate_hit_ns: hit,
        translate_hit_batched_ns: hit_batched,
        translate_miss_ns: miss,
        map_unmap_4k_ns: mu4k,
        map_unmap_2m_ns: mu2m,
        unmap_during_copy: UnmapFigure { copy_mib, median_ns: unmap_med, p99_ns: unmap_p99, unmaps: unmap_n },
        copy,
        scaling,
    }
}
