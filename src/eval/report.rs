//! What `star-ls eval` reports: CONTRACT.md's JSON keys (and more), and the table printed on stdout.

use super::probe::Change;
use crate::repair::Method;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub model: String,
    pub cases: usize,
    /// Cases of other code the specificity sample was drawn from (0: from `cases`).
    pub unrelated_cases: usize,
    pub passing_before: usize,
    pub failing_before: usize,
    /// Repairs per method: groups with a held-out case, then batches of failing singletons.
    pub units: usize,
    /// Cases in the specificity sample.
    pub sample: usize,
    /// Passing cases given to every repair as guards.
    pub guards: usize,
    pub seed: u64,
    pub methods: BTreeMap<Method, MethodReport>,
}

/// How one repair ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// A patch came out and was applied.
    Patched,
    /// The method's verdict kept no patch (it fixed nothing, or lowered the guard).
    Refused,
    /// The method returned an error.
    Failed,
    /// The method panicked.
    Crashed,
    /// Still running at the deadline.
    TimedOut,
}

#[derive(Debug, Clone, Serialize)]
pub struct MethodReport {
    /// Share of repaired cases whose greedy line is the developer's after their repair.
    pub effectiveness: f64,
    /// Share of held-out cases (same group, not repaired on) that pass after their group's repair.
    pub generalization: f64,
    /// Share of unrelated sampled cases whose greedy completion the repair leaves unchanged.
    pub specificity: f64,
    /// Share of unrelated sampled cases that passed before and still pass.
    pub passing_kept: f64,
    pub repairs: usize,
    pub repaired_cases: usize,
    pub held_out_cases: usize,
    pub repair_seconds_mean: f64,
    pub repair_seconds_total: f64,
    /// Highest resident set a process holding the model reaches during one of the repairs.
    pub peak_rss_mb: f64,
    /// The most a repair added to the resident set.
    pub repair_rss_mb: f64,
    /// Repairs by how they ended: crashes and timeouts are counted here, never dropped.
    pub statuses: BTreeMap<Status, usize>,
    /// With `--requantized`: the patches served re-quantized into their layers instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requantized: Option<ServedShares>,
    /// With `--ungated`: the column patches served without their gates, as a LoRA adapter serves
    /// them; `None` when no repair kept one (a patch of per-key values has no ungated form).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ungated: Option<ServedShares>,
    pub cumulative: Vec<CumulativePoint>,
    pub per_repair: Vec<RepairRecord>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CumulativePoint {
    /// Repairs applied so far.
    pub step: usize,
    /// Cases repaired so far.
    pub repaired: usize,
    /// Share of them the model says right (teacher-forced) with every patch so far.
    pub effectiveness: f64,
    /// Share of the unrelated sampled completions still unchanged.
    pub specificity: f64,
    /// How many sampled cases were unrelated to every repair so far: late in a run nearly every
    /// failing case has been repaired, and this sample shrinks to the ones that passed before.
    pub sampled: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct RepairRecord {
    pub unit: String,
    pub cases: usize,
    pub held_out: bool,
    pub status: Status,
    pub message: Option<String>,
    pub fixed: usize,
    pub generalized: bool,
    pub sampled: usize,
    pub unchanged: usize,
    pub passing_sampled: usize,
    pub kept: usize,
    pub seconds: f64,
    pub peak_rss_mb: f64,
    pub repair_rss_mb: f64,
    pub layers: Vec<usize>,
    /// Guided (or SGD) steps, and analytical solves (STAR's).
    pub steps: usize,
    pub solves: usize,
    /// With `--requantized`, for a repair that kept a patch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requantized: Option<Served>,
    /// With `--ungated`, for a repair that kept a column patch: served without its gates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ungated: Option<Served>,
    /// The sampled completions the patch changed, and where.
    pub changed: Vec<Changed>,
}

/// A sampled unrelated completion a repair changed, and where (near ties flip under any small
/// perturbation).
#[derive(Debug, Clone, Serialize)]
pub struct Changed {
    pub case: String,
    #[serde(flatten)]
    pub at: Change,
}

/// One patch served otherwise than as its gated overlay: re-quantized into its layers
/// (`Qwen2::requantized`), or without its gates.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Served {
    /// Repaired cases whose greedy line is the developer's.
    pub fixed: usize,
    /// Sampled unrelated completions left unchanged.
    pub unchanged: usize,
}

/// A method's effectiveness and specificity with every patch served re-quantized, or ungated
/// (repairs that kept none count as they do for the overlay).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ServedShares {
    pub effectiveness: f64,
    pub specificity: f64,
}

/// A lead (in logits) under which the table calls a changed decision a near tie.
const NEAR_TIE: f32 = 0.5;

impl Report {
    /// The summary table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{}: {} cases, {} pass before, {} fail; {} repairs per method, specificity sample {}{}, {} guards, seed {}",
            self.model,
            self.cases,
            self.passing_before,
            self.failing_before,
            self.units,
            self.sample,
            match self.unrelated_cases {
                0 => String::new(),
                n => format!(" (of {n} unrelated cases)"),
            },
            self.guards,
            self.seed
        );
        let _ = writeln!(
            out,
            "{:<6} {:>13} {:>14} {:>11} {:>12} {:>9} {:>9} {:>8}  repairs",
            "method",
            "effectiveness",
            "generalization",
            "specificity",
            "passing kept",
            "s/repair",
            "total s",
            "peak MB",
        );
        for (method, m) in &self.methods {
            let statuses: Vec<String> = m
                .statuses
                .iter()
                .map(|(s, n)| format!("{n} {s:?}"))
                .collect();
            // A share over no case (no held-out case in a set without groups, no sampled case that
            // passed before): nothing was measured, whatever the JSON's 0 says.
            let measured = |share: f64, over: usize| match over {
                0 => "-".to_string(),
                _ => format!("{share:.3}"),
            };
            let passing: usize = m.per_repair.iter().map(|r| r.passing_sampled).sum();
            let _ = writeln!(
                out,
                "{:<6} {:>13.3} {:>14} {:>11.3} {:>12} {:>9.1} {:>9.1} {:>8.0}  {}",
                method,
                m.effectiveness,
                measured(m.generalization, m.held_out_cases),
                m.specificity,
                measured(m.passing_kept, passing),
                m.repair_seconds_mean,
                m.repair_seconds_total,
                m.peak_rss_mb,
                statuses.join(", ").to_lowercase()
            );
        }
        self.served_and_changed(&mut out);
        if let Some(star) = self.methods.get(&Method::Star) {
            for (method, m) in self.methods.iter().filter(|(k, _)| **k != Method::Star) {
                if star.repair_seconds_mean > 0.0 {
                    let _ = writeln!(
                        out,
                        "star vs {}: {:.2}x its speed per repair, effectiveness {:+.3}",
                        method,
                        m.repair_seconds_mean / star.repair_seconds_mean,
                        star.effectiveness - m.effectiveness
                    );
                }
            }
        }
        out
    }

    /// Per method, its shares served otherwise, and how near a tie the completions it changed were.
    fn served_and_changed(&self, out: &mut String) {
        for (method, m) in &self.methods {
            for (how, shares) in [("re-quantized", m.requantized), ("ungated", m.ungated)] {
                if let Some(q) = shares {
                    let _ = writeln!(
                        out,
                        "{method} served {how}: effectiveness {:.3}, specificity {:.3}",
                        q.effectiveness, q.specificity
                    );
                }
            }
        }
        for (method, m) in &self.methods {
            let mut leads: Vec<f32> = m
                .per_repair
                .iter()
                .flat_map(|r| r.changed.iter().map(|c| c.at.base_lead))
                .collect();
            if !leads.is_empty() {
                leads.sort_by(f32::total_cmp);
                let _ = writeln!(
                    out,
                    "{}: {} sampled completions changed; the unpatched lead at the first changed token: median {:.2} logits, under {NEAR_TIE} in {}",
                    method,
                    leads.len(),
                    leads[leads.len() / 2],
                    leads.iter().filter(|&&l| l < NEAR_TIE).count()
                );
            }
        }
    }
}

/// The median of `xs`, the mean of the middle two for an even count; None when there are none.
pub fn median(mut xs: Vec<f64>) -> Option<f64> {
    xs.sort_by(f64::total_cmp);
    let m = xs.len() / 2;
    match xs.len() {
        0 => None,
        n if n % 2 == 1 => Some(xs[m]),
        _ => Some((xs[m - 1] + xs[m]) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn the_median_of_an_even_count_is_the_middle_twos_mean() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(Vec::new()), None);
    }
}
