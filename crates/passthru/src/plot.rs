//! `passthru bench NAME --plot FILE.svg`: the series a benchmark measures, drawn as
//! an SVG line chart with plotters (no font files needed: the SVG carries text).

use plotters::prelude::*;
use std::path::Path;

/// One line of a chart: a name and its (x, y) points.
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Points, x ascending.
    pub points: Vec<(f64, f64)>,
}

/// A chart: title, axis labels, log-scaled x when the sizes span decades (y is
/// log-scaled by itself when the values span 100x or more).
pub struct Chart<'a> {
    /// Title.
    pub title: &'a str,
    /// X axis label.
    pub x: &'a str,
    /// Y axis label.
    pub y: &'a str,
    /// Plot x on a log2 scale.
    pub log_x: bool,
}

/// Line colours, far apart from each other and from the white background (plotters'
/// palettes include pale yellows that vanish on it).
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(0, 0, 0),
];

/// Whether y values spanning `lo..=hi` (positive) are better read on a log scale.
fn wants_log_y(lo: f64, hi: f64) -> bool {
    lo > 0.0 && hi / lo >= 100.0
}

/// Draws `series` into `path` (SVG, 900x540).
pub fn draw(path: &Path, chart: &Chart<'_>, series: &[Series]) -> Result<(), String> {
    let fail = |e: &dyn std::fmt::Display| format!("plotting {}: {e}", path.display());
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.points.iter().copied()).collect();
    if all.is_empty() {
        return Err(format!("plotting {}: nothing was measured", path.display()));
    }
    let tx = |x: f64| if chart.log_x { x.max(1e-9).log2() } else { x };
    let (x0, x1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(tx(p.0)), b.max(tx(p.0))));
    let (ylo, yhi) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let log_y = wants_log_y(ylo, yhi);
    let ty = move |y: f64| if log_y { y.max(1e-12).log10() } else { y };
    let (y0, y1) = if log_y { (ty(ylo).floor(), ty(yhi).ceil()) } else { (0.0, yhi * 1.1) };
    let (x1, y1) = (if x1 > x0 { x1 } else { x0 + 1.0 }, if y1 > y0 { y1 } else { y0 + 1.0 });
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut c = ChartBuilder::on(&root)
        .caption(chart.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| fail(&e))?;
    let log_x = chart.log_x;
    let x_label = move |v: &f64| {
        if !log_x {
            return format!("{v}");
        }
        let b = v.exp2();
        match b {
            b if b >= (1u64 << 30) as f64 => format!("{:.0}G", b / (1u64 << 30) as f64),
            b if b >= (1u64 << 20) as f64 => format!("{:.0}M", b / (1u64 << 20) as f64),
            b if b >= 1024.0 => format!("{:.0}K", b / 1024.0),
            b => format!("{b:.0}"),
        }
    };
    let y_label = move |v: &f64| {
        let y = if log_y { 10f64.powf(*v) } else { *v };
        match y.abs() {
            a if a >= 100.0 || a == 0.0 => format!("{y:.0}"),
            a if a >= 1.0 => format!("{y:.1}"),
            _ => format!("{y:.3}"),
        }
    };
    let y_desc = if log_y { format!("{} (log scale)", chart.y) } else { chart.y.to_string() };
    c.configure_mesh()
        .x_desc(chart.x)
        .y_desc(y_desc)
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label)
        .draw()
        .map_err(|e| fail(&e))?;
    for (i, s) in series.iter().enumerate() {
        let color = COLOURS[i % COLOURS.len()].to_rgba();
        let pts: Vec<(f64, f64)> = s.points.iter().map(|p| (tx(p.0), ty(p.1))).collect();
        c.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| fail(&e))?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        c.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled()))).map_err(|e| fail(&e))?;
    }
    c.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_an_svg_with_every_series_named() {
        let path = std::env::temp_dir().join(format!("passthru-plot-{}.svg", std::process::id()));
        let s = |n: &str, k: f64| Series {
            name: n.into(),
            points: vec![(4096.0, k), (65536.0, 2.0 * k), (1048576.0, 3.0 * k)],
        };
        draw(
            &path,
            &Chart { title: "t", x: "bytes", y: "ratio", log_x: true },
            &[s("in process", 1.0), s("messages", 0.5)],
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(
            svg.starts_with("<svg") && svg.contains("in process") && svg.contains("messages") && svg.contains("64K")
        );
        assert!(draw(&path, &Chart { title: "t", x: "x", y: "y", log_x: false }, &[]).is_err());
        // Values spanning decades go on a log axis, and it says so.
        draw(&path, &Chart { title: "t", x: "x", y: "ns", log_x: false }, &[s("wide", 1.0), s("narrow", 400.0)])
            .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(svg.contains("ns (log scale)"), "{svg}");
        assert!(wants_log_y(0.5, 60.0) && !wants_log_y(0.5, 40.0) && !wants_log_y(0.0, 1e6));
    }
}
