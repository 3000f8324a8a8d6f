//! One report for every benchmark: each bench binary appends its figures as JSON lines to
//! the file `$AGENTGATE_BENCH_REPORT` names (when set), and `agentgate-env bench-report`
//! prints them as one table (`scripts/bench.sh` runs them all).

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One figure: a measurement against its baseline from the same run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Figure {
    /// The area: `postgres`, `kubernetes`, `ssh`, `audit`, `operator`, `statement`.
    pub suite: String,
    /// What was measured, e.g. `pgbench -S, simple, 8 clients: everything on`.
    pub name: String,
    /// The unit of `value` and `baseline`, e.g. `tps`, `MiB/s`, `ms p99`.
    pub unit: String,
    /// The measurement (the median of the rounds).
    pub value: f64,
    /// What it is compared with, measured in the same run (e.g. direct access), if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<f64>,
    /// `value / baseline` (or as the bench defines it), the figure to read across machines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// The lowest and highest ratio (or value) over the rounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<(f64, f64)>,
    /// The target, as text (e.g. `≥ 0.90`), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Whether the target is met, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub met: Option<bool>,
    /// More about the figure (e.g. latency percentiles next to a throughput).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Figure {
    /// A figure with no baseline.
    pub fn new(suite: &str, name: &str, unit: &str, value: f64) -> Self {
        Self {
            suite: suite.into(),
            name: name.into(),
            unit: unit.into(),
            value,
            baseline: None,
            ratio: None,
            spread: None,
            target: None,
            met: None,
            detail: None,
        }
    }

    /// With a note shown next to the figure.
    pub fn detail(mut self, text: impl Into<String>) -> Self {
        self.detail = Some(text.into());
        self
    }

    /// With a baseline; the ratio is `value / baseline`.
    pub fn against(mut self, baseline: f64) -> Self {
        self.baseline = Some(baseline);
        if baseline != 0.0 {
            self.ratio = Some(self.value / baseline);
        }
        self
    }

    /// With the ratio's spread over the rounds.
    pub fn spread(mut self, low: f64, high: f64) -> Self {
        self.spread = Some((low, high));
        self
    }

    /// With a target and whether it is met.
    pub fn target(mut self, text: &str, met: bool) -> Self {
        self.target = Some(text.into());
        self.met = Some(met);
        self
    }

    /// Appends the figure to `$AGENTGATE_BENCH_REPORT`, if set. A bench run by hand just
    /// prints its own table.
    pub fn report(&self) {
        let Some(path) = std::env::var_os("AGENTGATE_BENCH_REPORT") else {
            return;
        };
        let line = match serde_json::to_string(self) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("bench report: {e}");
                return;
            }
        };
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = written {
            eprintln!("bench report: cannot append to {}: {e}", path.display());
        }
    }
}

/// Median, lowest and highest of `values` (NaN for none).
pub fn median_spread(values: &[f64]) -> (f64, f64, f64) {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (mid, v[0], v[v.len() - 1])
}

fn num(v: f64) -> String {
    if !v.is_finite() {
        "—".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The figures in `path` as one Markdown table, grouped by suite in the order they ran.
pub fn render(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let figures: Vec<Figure> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| format!("{}: {e}: {l}", path.display())))
        .collect::<Result<_, _>>()?;
    let mut out = String::from(
        "| suite | benchmark | baseline | agentgate | ratio (spread) | target | detail |\n|---|---|---|---|---|---|---|\n",
    );
    for f in &figures {
        let ratio = match (f.ratio, f.spread) {
            (Some(r), Some((lo, hi))) => format!("{} ({}–{})", num(r), num(lo), num(hi)),
            (Some(r), None) => num(r),
            (None, _) => "—".into(),
        };
        let target = match (&f.target, f.met) {
            (Some(t), Some(true)) => format!("{t}: met"),
            (Some(t), Some(false)) => format!("{t}: **not met**"),
            (Some(t), None) => t.clone(),
            (None, _) => String::new(),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} {} | {ratio} | {target} | {} |\n",
            f.suite,
            f.name,
            f.baseline.map(num).unwrap_or_else(|| "—".into()),
            num(f.value),
            f.unit,
            f.detail.as_deref().unwrap_or(""),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_render_as_one_table() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("report.jsonl");
        let lines = [
            Figure::new("ssh", "scp 1 GiB", "MiB/s", 122.7)
                .against(153.3)
                .spread(0.78, 0.82)
                .target("≥ 0.8", true),
            Figure::new("operator", "grant expiry lag", "ms p99", 310.0).target("≤ 1000 ms", true),
        ]
        .iter()
        .map(|f| serde_json::to_string(f).expect("json"))
        .collect::<Vec<_>>()
        .join("\n");
        std::fs::write(&path, lines).expect("write");
        let table = render(&path).expect("render");
        assert!(
            table.contains(
                "| ssh | scp 1 GiB | 153 | 123 MiB/s | 0.80 (0.78–0.82) | ≥ 0.8: met |  |"
            ),
            "{table}"
        );
        assert!(
            table.contains(
                "| operator | grant expiry lag | — | 310 ms p99 | — | ≤ 1000 ms: met |  |"
            ),
            "{table}"
        );
        assert_eq!(median_spread(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
    }
}
