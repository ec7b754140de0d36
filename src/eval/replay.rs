//! `star-ls replay`: a developer writing a codebase line by line, beside the unpatched model
//! (CONTRACT.md). At each sampled line both models complete it; what the learning model proposes is
//! accepted (a guard) when it is the real line and corrected otherwise (a failure), stored in a real
//! store and repaired as the server does (`learn`, the server's default policy), synchronously, so a
//! replay is deterministic. The headline measure of the product: do later completions get better?
//!
//! Architecture invariant: a function of (model, store, lines, policy) → `ReplayReport`; the CLI
//! finds the lines on disk (`cli/replay.rs`, through `code_lines` and `cut`) and writes the report.

use crate::capture::{CaseKind, CaseText, Outcome};
use crate::completion::ContextLimits;
use crate::learn::{self, Job, Policy, RepairReport};
use crate::model::{KvCache, Model, PatchSet, Prompt, Qwen2, Tokenizer};
use crate::repair::{greedy_case, passes, teacher_forced, Case, Head, Residuals, Star};
use crate::store::{NewCase, Store};
use candle_core::Tensor;
use serde::Serialize;
use std::path::Path;

/// One line the developer writes: the case its completion is judged by.
#[derive(Debug, Clone)]
pub struct Target {
    /// The file, relative to the replayed directory.
    pub file: String,
    /// 0-based line number.
    pub line: usize,
    pub case: Case,
}

/// The 0-based numbers of `text`'s lines a replay may target: code, not blank, not a comment, not
/// inside a docstring or other triple-quoted string, 12–100 characters after the indentation.
pub fn code_lines(text: &str) -> Vec<usize> {
    let mut quote: Option<&str> = None;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let body = line.trim();
        let was_inside = quote.is_some();
        for q in ["\"\"\"", "'''"] {
            if quote.is_none_or(|open| open == q) && body.matches(q).count() % 2 == 1 {
                quote = if quote.is_some() { None } else { Some(q) };
            }
        }
        let in_string =
            was_inside || quote.is_some() || body.starts_with("\"\"\"") || body.starts_with("'''");
        let width = body.chars().count();
        if !in_string && !body.starts_with('#') && (12..=100).contains(&width) {
            out.push(i);
        }
    }
    out
}

/// The case at line `line` of `text`: the cursor after its indentation, the rest of the line the
/// target, the lines after it the suffix (cases-JSONL's layout).
pub fn cut(text: &str, line: usize, id: &str) -> Case {
    let start: usize = text.split_inclusive('\n').take(line).map(str::len).sum();
    let rest = &text[start..];
    let end = rest.find('\n').map_or(text.len(), |e| start + e);
    let indent = text[start..end].len() - text[start..end].trim_start().len();
    Case {
        id: id.to_owned(),
        language: "python".into(),
        prefix: text[..start + indent].to_owned(),
        suffix: text.get(end + 1..).unwrap_or_default().to_owned(),
        target: text[start + indent..end].trim_end().to_owned(),
        group: String::new(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    /// The model's file name (the caller's to fill in).
    pub model: String,
    pub files: usize,
    pub lines: usize,
    pub repairs: usize,
    pub repair_seconds_total: f64,
    /// Over the repairs, the median of a repair's seconds per failure it took up new.
    pub repair_seconds_per_failure: f64,
    /// Every repair, in order.
    pub repair_log: Vec<RepairRow>,
    /// Entries of the patch memory live at the end (`PatchSet::entries`).
    pub entries_live: usize,
    pub baseline_pass: f64,
    pub repaired_pass: f64,
    /// The line the first patch served (None: no repair kept a patch).
    pub first_repaired_line: Option<usize>,
    pub after_first_repair: AfterFirstRepair,
    pub curve: Vec<CurvePoint>,
    pub rows: Vec<Row>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AfterFirstRepair {
    pub lines: usize,
    pub baseline_pass: f64,
    pub repaired_pass: f64,
    /// Right only with what was learned.
    pub gained: usize,
    /// Right only without it.
    pub lost: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct CurvePoint {
    pub line: usize,
    pub baseline_pass: f64,
    pub repaired_pass: f64,
}

/// One repair of a replay.
#[derive(Debug, Clone, Serialize)]
pub struct RepairRow {
    /// The line written last before it (1-based).
    pub line: usize,
    /// Failures it was given: those no repair had seen, and those earlier ones left unfixed.
    pub pending: usize,
    pub new: usize,
    /// Of those pending, the ones wrong under teacher forcing, and the ones it fixed.
    pub failing: usize,
    pub fixed: usize,
    pub kept: bool,
    /// Older patches it narrowed (`RepairReport::narrowed`).
    pub narrowed: usize,
    pub seconds: f64,
}

/// One written line: the two proposals and what the learning model had by then.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub id: String,
    pub target: String,
    pub baseline: String,
    pub repaired: String,
    pub patches_live: usize,
}

/// Most points of `curve`.
const CURVE_POINTS: usize = 50;

/// Writes `targets` in order, learning as the server does under `policy`. `model_sha` keys the
/// ledger; `on_line` hears of each line written.
pub fn run(
    model: &Model,
    model_sha: &str,
    head: &Head,
    store: &mut Store,
    targets: &[Target],
    policy: &Policy,
    mut on_line: impl FnMut(&Row),
) -> anyhow::Result<ReplayReport> {
    let (weights, tok) = (&model.weights, &model.tokenizer);
    let limits = ContextLimits::default();
    let residuals = Residuals::default();
    let mut live = PatchSet::default();
    let mut seen = 0usize; // failures the last repair was given and left unfixed
    let mut log = Vec::new();
    let mut first_repaired_line = None;
    let mut patches_live = 0;
    let mut rows: Vec<Row> = Vec::with_capacity(targets.len());
    let first = policy.repair.first_candidate(weights.layers().len());
    for (i, t) in targets.iter().enumerate() {
        let line = Written::new(weights, &t.case, tok, limits, first, &residuals)?;
        let baseline = line.complete(weights, tok, &t.case, None)?;
        let repaired = match live.is_empty() {
            true => baseline.clone(),
            false => line.complete(weights, tok, &t.case, Some(&live))?,
        };
        let right = passes(&repaired, &t.case);
        store.add_case(&written(i, t, &repaired, right))?;
        let row = Row {
            id: t.case.id.clone(),
            target: t.case.target.clone(),
            baseline,
            repaired,
            patches_live,
        };
        on_line(&row);
        rows.push(row);
        let pending = store.counts()?.failures_pending.max(0) as usize;
        if right
            || policy.repair_threshold == 0
            || pending < seen + policy.repair_threshold as usize
        {
            continue;
        }
        let star = Star {
            live: Some(&live),
            residuals: Some(&residuals),
            ..Star::new(weights, tok, head, policy.repair)
        };
        let report = repair(&star, store, model_sha, i, policy)?;
        log.push(RepairRow {
            line: i + 1,
            pending: report.pending,
            new: report.pending.saturating_sub(seen),
            failing: report.failures,
            fixed: report.fixed,
            kept: report.patch_id.is_some(),
            narrowed: report.narrowed.len(),
            seconds: report.seconds,
        });
        seen = report.unfixed();
        tracing::info!(line = i + 1, ?report, "replay repair");
        if report.changed_overlay() {
            (live, patches_live) = learn::serving(store, model_sha, weights.config())?;
            if (0..first).any(|l| live.touches(l)) {
                anyhow::bail!(
                    "a patch below layer {first}: the lines' frozen layers would not be frozen"
                );
            }
            first_repaired_line.get_or_insert(i + 1);
        }
    }
    Ok(summarize(
        targets,
        rows,
        log,
        live.entries(),
        first_repaired_line,
    ))
}

/// A line being written, its case run once through the layers no repair patches: both models
/// complete it from there, and a repair of it starts from there too (kept in `Residuals`, as the
/// server's `warm_case` does for each failure it stores, outside the repair's clock).
struct Written {
    first: usize,
    prompt: Prompt,
    /// The residual entering layer `first` at the prompt and the developer's line.
    residual: Tensor,
    /// The keys and values of the layers below `first` along the prompt but its last token.
    lower: KvCache,
}

impl Written {
    fn new(
        model: &Qwen2,
        case: &Case,
        tok: &Tokenizer,
        limits: ContextLimits,
        first: usize,
        residuals: &Residuals,
    ) -> anyhow::Result<Self> {
        let tf = teacher_forced(tok, case, limits);
        let mut lower = model.new_cache();
        let residual = model.residual_entering(first, &tf.tokens, &mut lower, None)?;
        residuals.keep(first, &tf.tokens, residual.clone());
        lower.truncate(tf.prompt_len - 1)?;
        Ok(Self {
            first,
            prompt: tf.prompt,
            residual,
            lower,
        })
    }

    /// The greedy first line under `patches` (which act from layer `first` up), as `complete_case`
    /// makes it.
    fn complete(
        &self,
        model: &Qwen2,
        tok: &Tokenizer,
        case: &Case,
        patches: Option<&PatchSet>,
    ) -> anyhow::Result<String> {
        let mut cache = self.lower.clone();
        let residual = self.residual.narrow(0, 0, cache.len())?;
        model.finish_cache(self.first, &residual, &mut cache, patches)?;
        Ok(greedy_case(model, tok, case, &self.prompt, &mut cache, patches)?.text)
    }
}

/// Line `i` as the server stores it: a guard when the learning model proposed the developer's line
/// (accepted), a failure otherwise (corrected).
fn written(i: usize, t: &Target, proposed: &str, right: bool) -> NewCase {
    NewCase {
        case: CaseText {
            kind: if right {
                CaseKind::Guard
            } else {
                CaseKind::Failure
            },
            outcome: if right {
                Outcome::Accepted
            } else {
                Outcome::Corrected
            },
            prefix: t.case.prefix.clone(),
            target: t.case.target.clone(),
            suffix: t.case.suffix.clone(),
            proposed: proposed.to_owned(),
        },
        completion_id: None,
        language: t.case.language.clone(),
        document: t.file.clone(),
        workspace: String::new(),
        created_ms: i as i64,
    }
}

/// The store's pending failures repaired by `star` and committed as the server commits them, at
/// line `i`.
fn repair(
    star: &Star,
    store: &mut Store,
    model_sha: &str,
    i: usize,
    policy: &Policy,
) -> anyhow::Result<RepairReport> {
    let job = Job::pending(store, policy.repair_guards)?;
    let outcome = star.repair(&job.failures, &job.guards)?;
    let report = learn::commit(
        store,
        model_sha,
        i as i64,
        &job,
        &outcome,
        policy.patch_memory_bytes(),
    )?;
    Ok(report)
}

fn summarize(
    targets: &[Target],
    rows: Vec<Row>,
    repair_log: Vec<RepairRow>,
    entries_live: usize,
    first_repaired_line: Option<usize>,
) -> ReplayReport {
    let right: Vec<(bool, bool)> = targets
        .iter()
        .zip(&rows)
        .map(|(t, r)| (passes(&r.baseline, &t.case), passes(&r.repaired, &t.case)))
        .collect();
    let share = |n: usize, of: usize| if of == 0 { 0.0 } else { n as f64 / of as f64 };
    let count =
        |rs: &[(bool, bool)], f: fn(&(bool, bool)) -> bool| rs.iter().filter(|r| f(r)).count();
    let after = first_repaired_line.map_or(&right[right.len()..], |l| &right[l..]);
    let n = right.len();
    let every = n.div_ceil(CURVE_POINTS).max(1);
    let curve = (1..=n)
        .filter(|k| k % every == 0 || *k == n)
        .map(|k| CurvePoint {
            line: k,
            baseline_pass: share(count(&right[..k], |r| r.0), k),
            repaired_pass: share(count(&right[..k], |r| r.1), k),
        })
        .collect();
    let files = targets
        .iter()
        .map(|t| t.file.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let per_failure = repair_log
        .iter()
        .map(|r| r.seconds / r.new.max(1) as f64)
        .collect();
    ReplayReport {
        model: String::new(),
        files,
        lines: n,
        repairs: repair_log.len(),
        repair_seconds_total: repair_log.iter().map(|r| r.seconds).sum(),
        repair_seconds_per_failure: super::median(per_failure).unwrap_or(0.0),
        repair_log,
        entries_live,
        baseline_pass: share(count(&right, |r| r.0), n),
        repaired_pass: share(count(&right, |r| r.1), n),
        first_repaired_line,
        after_first_repair: AfterFirstRepair {
            lines: after.len(),
            baseline_pass: share(count(after, |r| r.0), after.len()),
            repaired_pass: share(count(after, |r| r.1), after.len()),
            gained: count(after, |r| r.1 && !r.0),
            lost: count(after, |r| r.0 && !r.1),
        },
        curve,
        rows,
    }
}

impl ReplayReport {
    /// The figures as a few lines of text.
    pub fn summary(&self) -> String {
        let a = &self.after_first_repair;
        format!(
            "{} lines of {} files, {} repairs ({:.1} s, median {:.2} s a new failure), {} entries live at the end\n\
             exact: unpatched {:.3}, learning {:.3}\n\
             after the first repair (line {}): {} lines, unpatched {:.3}, learning {:.3}, gained {}, lost {}\n",
            self.lines,
            self.files,
            self.repairs,
            self.repair_seconds_total,
            self.repair_seconds_per_failure,
            self.entries_live,
            self.baseline_pass,
            self.repaired_pass,
            self.first_repaired_line.map_or("-".into(), |l| l.to_string()),
            a.lines,
            a.baseline_pass,
            a.repaired_pass,
            a.gained,
            a.lost,
        )
    }
}

/// Where a replay's store lives: a fresh directory, never the developer's own data.
pub fn fresh_store(dir: &Path) -> anyhow::Result<Store> {
    if dir.join(crate::store::FILE_NAME).exists() {
        anyhow::bail!(
            "{} already holds a store: a replay starts from nothing",
            dir.display()
        );
    }
    Ok(Store::open(dir, u64::MAX)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_code_lines_of_12_to_100_characters() {
        let text = "\"\"\"Docstring that is long enough.\n\
                    value = compute(it, that)\n\
                    \"\"\"\n\
                    import os.path as osp\n\
                    # a comment that is long enough\n\
                    x = 1\n\
                    def f(a):\n    \"\"\"One line docstring here.\"\"\"\n    return osp.join(a, 'b')\n";
        let lines: Vec<&str> = code_lines(text)
            .into_iter()
            .map(|i| text.lines().nth(i).unwrap().trim())
            .collect();
        assert_eq!(lines, ["import os.path as osp", "return osp.join(a, 'b')"]);
    }

    #[test]
    fn a_cut_puts_the_cursor_after_the_indentation() {
        let c = cut("def f(a):\n    return a + 1  \nprint(f(2))\n", 1, "m.py:2");
        assert_eq!(c.prefix, "def f(a):\n    ");
        assert_eq!(c.target, "return a + 1");
        assert_eq!(c.suffix, "print(f(2))\n");
        let last = cut("x = 1\ny = compute(x)", 1, "m.py:2");
        assert_eq!(
            (last.target.as_str(), last.suffix.as_str()),
            ("y = compute(x)", "")
        );
    }
}
