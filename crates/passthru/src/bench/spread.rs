//! Several runs of a benchmark: each figure's median and spread (min..max), and a
//! goal's verdict only when the whole spread is on one side of it (this machine is
//! shared and noisy: one run's number decides nothing).

use serde::Serialize;

/// What a figure must do.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    /// At most this.
    AtMost(f64),
    /// At least this.
    AtLeast(f64),
}

impl Goal {
    fn text(self) -> String {
        match self {
            Goal::AtMost(t) => format!("<= {t}"),
            Goal::AtLeast(t) => format!(">= {t}"),
        }
    }
}

/// The verdict on a goal for values spread over `min..=max`: met when every run met
/// it, MISSED when none did, "within noise" when the runs disagree.
pub fn verdict(goal: Goal, min: f64, max: f64) -> &'static str {
    match goal {
        Goal::AtMost(t) if max <= t => "met",
        Goal::AtMost(t) if min > t => "MISSED",
        Goal::AtLeast(t) if min >= t => "met",
        Goal::AtLeast(t) if max < t => "MISSED",
        _ => "within noise",
    }
}

/// One figure of one run.
#[derive(Clone, Debug)]
pub struct Fig {
    /// What it measures (unique within a benchmark).
    pub name: String,
    /// Its unit.
    pub unit: &'static str,
    /// Its value.
    pub value: f64,
    /// Its goal, if it has one.
    pub goal: Option<Goal>,
}

impl Fig {
    /// A figure without a goal.
    pub fn new(name: impl Into<String>, unit: &'static str, value: f64) -> Fig {
        Fig { name: name.into(), unit, value, goal: None }
    }

    /// The same, held to `goal`.
    pub fn goal(self, goal: Goal) -> Fig {
        Fig { goal: Some(goal), ..self }
    }
}

/// A figure over the runs.
#[derive(Clone, Debug, Serialize)]
pub struct Spread {
    /// What it measures.
    pub name: String,
    /// Its unit.
    pub unit: &'static str,
    /// Median of the runs.
    pub median: f64,
    /// Smallest and largest.
    pub min: f64,
    /// See `min`.
    pub max: f64,
    /// Every run's value, in order.
    pub values: Vec<f64>,
    /// Its goal.
    pub goal: Option<Goal>,
    /// met, MISSED or within noise (with a goal).
    pub verdict: Option<&'static str>,
}

fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Each figure over `runs` (by name, in the first run's order); values that are not
/// numbers (a figure a run could not measure) are left out.
pub fn spreads(runs: &[Vec<Fig>]) -> Vec<Spread> {
    let Some(first) = runs.first() else { return Vec::new() };
    first
        .iter()
        .map(|f| {
            let values: Vec<f64> = runs
                .iter()
                .filter_map(|r| r.iter().find(|g| g.name == f.name).map(|g| g.value))
                .filter(|v| v.is_finite())
                .collect();
            let mut sorted = values.clone();
            sorted.sort_by(f64::total_cmp);
            let (min, max) = (sorted.first().copied().unwrap_or(f64::NAN), sorted.last().copied().unwrap_or(f64::NAN));
            let verdict = f.goal.filter(|_| !sorted.is_empty()).map(|g| verdict(g, min, max));
            Spread {
                name: f.name.clone(),
                unit: f.unit,
                median: median(&sorted),
                min,
                max,
                values,
                goal: f.goal,
                verdict,
            }
        })
        .collect()
}

fn num(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else if v == 0.0 {
        "0".into()
    } else {
        // Three significant digits however small (a ratio of 0.0003 is not 0.000).
        let decimals = (2 - v.abs().log10().floor() as i32).clamp(3, 9) as usize;
        format!("{v:.decimals$}")
    }
}

/// The figures as a table: median, spread, unit, and each goal's verdict.
pub fn table(spreads: &[Spread], runs: usize) -> String {
    let width = spreads.iter().map(|s| s.name.len()).max().unwrap_or(10).max(10);
    let mut o =
        format!("{:<width$} {:>12} {:>23} {:<10} goal\n", "figure", "median", format!("spread of {runs}"), "unit");
    for s in spreads {
        let spread = if s.values.len() > 1 { format!("{} .. {}", num(s.min), num(s.max)) } else { String::new() };
        let goal = match (s.goal, s.verdict) {
            (Some(g), Some(v)) => format!("{}: {v}", g.text()),
            _ => String::new(),
        };
        o += &format!("{:<width$} {:>12} {:>23} {:<10} {goal}\n", s.name, num(s.median), spread, s.unit);
    }
    o
}

/// The median of figure `name`.
pub fn median_of(spreads: &[Spread], name: &str) -> Option<f64> {
    spreads.iter().find(|s| s.name == name).map(|s| s.median).filter(|v| v.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verdict_needs_the_whole_spread_on_one_side() {
        assert_eq!(verdict(Goal::AtMost(10.0), 7.0, 9.9), "met");
        assert_eq!(verdict(Goal::AtMost(10.0), 9.0, 11.0), "within noise");
        assert_eq!(verdict(Goal::AtMost(10.0), 10.1, 15.0), "MISSED");
        assert_eq!(verdict(Goal::AtLeast(0.9), 0.91, 0.99), "met");
        assert_eq!(verdict(Goal::AtLeast(0.9), 0.8, 0.95), "within noise");
        let runs: Vec<Vec<Fig>> = [3.0, 1.0, 2.0, f64::NAN]
            .iter()
            .map(|v| vec![Fig::new("x", "ns", *v).goal(Goal::AtMost(2.5)), Fig::new("y", "ns", 5.0)])
            .collect();
        let s = spreads(&runs);
        assert_eq!((s[0].median, s[0].min, s[0].max, s[0].values.len()), (2.0, 1.0, 3.0, 3), "NaN left out");
        assert_eq!(s[0].verdict, Some("within noise"));
        assert_eq!((s[1].verdict, median_of(&s, "y")), (None, Some(5.0)));
        assert!(table(&s, 4).contains("1.00 .. 3.00"));
        assert_eq!(
            (num(0.034), num(0.000_34), num(0.0), num(12.345), num(1234.5)),
            ("0.0340".into(), "0.000340".into(), "0".into(), "12.35".into(), "1234".into())
        );
    }
}
