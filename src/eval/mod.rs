//! `star-ls eval`: the paper's comparison (STAR vs MINT vs SGD) on a cases file, by CONTRACT.md's
//! protocol. Every method starts from the same unpatched model and repairs the same units; the measures
//! are METHOD.md's (effectiveness, generalization, specificity, cumulative impact, time and memory).
//!
//! Architecture invariant: a function of (model, cases, options) → `Report`; the CLI prints, writes and
//! plots it (`cli/eval.rs`, `cli/plot.rs`).

mod probe;
pub mod replay;
mod report;
mod rss;

use probe::Probe;
pub use report::{
    median, Changed, CumulativePoint, MethodReport, RepairRecord, Report, Served, ServedShares,
    Status,
};

use crate::model::{KvCache, Model, PatchSet, Qwen2, Tokenizer};
use crate::repair::{
    complete_case, passes, Case, Head, Method, RepairOutcome, RepairSettings, Residuals, Star,
};
use rand::{rngs::StdRng, seq::index::sample, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub methods: Vec<Method>,
    /// Size of the seeded specificity sample (CONTRACT.md: default 40).
    pub sample: usize,
    /// Passing cases (outside the sample) given to every repair as its guard set, as the server gives
    /// its accepted completions; 0 for none.
    pub guards: usize,
    pub seed: u64,
    /// A repair still running after this is stopped at its next step and reported as timed out.
    pub timeout: Duration,
    /// Most points of the cumulative curve (each re-checks every case repaired so far).
    pub cumulative_points: usize,
    pub settings: RepairSettings,
    /// Also measure each patch served re-quantized into its layers (`Qwen2::requantized`) instead of
    /// as an overlay: its repaired cases and specificity sample again.
    pub requantized: bool,
    /// Also measure each column patch served without its gates, as a LoRA adapter serves it
    /// (`star-ls patches export --format gguf-lora --ungated`).
    pub ungated: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            methods: vec![Method::Star, Method::Mint, Method::Sgd],
            sample: 40,
            guards: 8,
            seed: 0,
            timeout: Duration::from_secs(600),
            cumulative_points: 8,
            settings: RepairSettings::default(),
            requantized: false,
            ungated: false,
        }
    }
}

/// What the run is doing, for a progress display.
pub enum Progress<'a> {
    /// A new stage of `total` steps.
    Stage { name: &'a str, total: usize },
    /// One step of the stage done.
    Step { message: String },
}

/// One repair of the protocol: a group's failing cases but the last (held out), or a batch of failing
/// singletons. Indices into the cases.
#[derive(Debug, Clone)]
pub struct Unit {
    pub name: String,
    pub repaired: Vec<usize>,
    pub held_out: Option<usize>,
}

/// CONTRACT.md's units: each group with at least two failing cases is repaired on all of them but the
/// last by id, which is held out; the other failing cases (singletons, and groups with one failure)
/// are repaired in batches of 8, in id order.
pub fn units(cases: &[Case], failing: &[bool]) -> Vec<Unit> {
    let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    let mut loose = Vec::new();
    for (i, c) in cases.iter().enumerate().filter(|(i, _)| failing[*i]) {
        match c.group.as_str() {
            "" => loose.push(i),
            g => groups.entry(g).or_default().push(i),
        }
    }
    let by_id = |v: &mut Vec<usize>| v.sort_by(|a, b| cases[*a].id.cmp(&cases[*b].id));
    let mut out = Vec::new();
    for (group, mut members) in groups {
        if members.len() < 2 {
            loose.extend(members);
            continue;
        }
        by_id(&mut members);
        let held_out = members.pop();
        out.push(Unit {
            name: group.to_owned(),
            repaired: members,
            held_out,
        });
    }
    by_id(&mut loose);
    for (i, batch) in loose.chunks(8).enumerate() {
        out.push(Unit {
            name: format!("singletons-{}", i + 1),
            repaired: batch.to_vec(),
            held_out: None,
        });
    }
    out
}

/// Runs the protocol on `cases` with every method of `options`. The specificity sample comes from
/// `unrelated` when given (cases of other code, never repaired), else from `cases`: on a set whose
/// every case is in a group, the groups repaired leave the cumulative run nothing unrelated.
pub fn run(
    model: &Model,
    head: &Head,
    model_name: &str,
    cases: &[Case],
    unrelated: &[Case],
    options: &EvalOptions,
    progress: &mut dyn FnMut(Progress),
) -> candle_core::Result<Report> {
    let (model, tok) = (&model.weights, &model.tokenizer);
    let settings = options.settings;
    let star = Star::new(model, tok, head, settings);
    let first = star.first_candidate();
    let model_rss_mb = rss::current_mb().unwrap_or(0.0);

    // Every case completed once on the unpatched model, shared by all methods. Past `repairable`:
    // a seeded sample of the unrelated cases, the specificity sample.
    let repairable = cases.len();
    let picked = sample(
        &mut StdRng::seed_from_u64(options.seed),
        unrelated.len(),
        options.sample.min(unrelated.len()),
    );
    let cases: Vec<Case> = cases
        .iter()
        .cloned()
        .chain(picked.iter().map(|i| Case {
            // Another file's group names mean nothing here: none may match a repaired group.
            group: String::new(),
            ..unrelated[i].clone()
        }))
        .collect();
    let cases = &cases[..];
    progress(Progress::Stage {
        name: "completing every case",
        total: cases.len(),
    });
    let mut probes = Vec::with_capacity(cases.len());
    for c in cases {
        probes.push(Probe::new(model, tok, c, settings.context, first)?);
        progress(Progress::Step {
            message: c.id.clone(),
        });
    }
    let failing: Vec<bool> = probes.iter().map(|p| !p.passes).collect();
    let units = units(&cases[..repairable], &failing[..repairable]);

    // Drawn even when the sample is the unrelated cases', so that the guards are those of a run
    // without them.
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut sampled: Vec<usize> =
        sample(&mut rng, repairable, options.sample.min(repairable)).into_vec();
    let in_sample: BTreeSet<usize> = sampled.iter().copied().collect();
    let passing_outside: Vec<usize> = (0..repairable)
        .filter(|i| !failing[*i] && !in_sample.contains(i))
        .collect();
    let guards: Vec<Case> = sample(
        &mut rng,
        passing_outside.len(),
        options.guards.min(passing_outside.len()),
    )
    .into_iter()
    .map(|j| cases[passing_outside[j]].clone())
    .collect();
    if !unrelated.is_empty() {
        sampled = (repairable..cases.len()).collect();
    }

    let protocol = Protocol {
        model,
        tok,
        cases,
        probes: &probes,
        sampled: &sampled,
        context: settings.context,
        model_rss_mb,
        residuals: Residuals::default(),
    };
    let methods = protocol.methods(&star, &units, &guards, options, progress)?;
    Ok(Report {
        model: model_name.to_owned(),
        cases: repairable,
        unrelated_cases: unrelated.len(),
        passing_before: failing[..repairable].iter().filter(|f| !**f).count(),
        failing_before: failing[..repairable].iter().filter(|f| **f).count(),
        units: units.len(),
        sample: sampled.len(),
        guards: guards.len(),
        seed: options.seed,
        methods,
    })
}

/// What every method's run shares.
struct Protocol<'a> {
    model: &'a Qwen2,
    tok: &'a Tokenizer,
    cases: &'a [Case],
    probes: &'a [Probe],
    sampled: &'a [usize],
    context: crate::completion::ContextLimits,
    model_rss_mb: f64,
    /// The cases' residuals entering the frozen layers' top, made once per unit before its repairs'
    /// clocks, and their checks on the unpatched model.
    residuals: Residuals,
}

/// The sampled cases unrelated to some repaired cases: not among them, not in their groups.
fn unrelated(cases: &[Case], sampled: &[usize], repaired: &BTreeSet<usize>) -> Vec<usize> {
    let groups: BTreeSet<&str> = repaired
        .iter()
        .map(|i| cases[*i].group.as_str())
        .filter(|g| !g.is_empty())
        .collect();
    sampled
        .iter()
        .copied()
        .filter(|i| !repaired.contains(i) && !groups.contains(cases[*i].group.as_str()))
        .collect()
}

fn share(n: usize, of: usize) -> f64 {
    if of == 0 {
        0.0
    } else {
        n as f64 / of as f64
    }
}

impl Protocol<'_> {
    /// Every method on every unit, unit by unit: a unit's cases run through the frozen layers once
    /// for all methods, whose repairs alternate through the run. Then each method's cumulative run
    /// and report.
    fn methods(
        &self,
        star: &Star,
        units: &[Unit],
        guards: &[Case],
        options: &EvalOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> candle_core::Result<BTreeMap<Method, MethodReport>> {
        let mut methods: Vec<Method> = Vec::new();
        for &m in &options.methods {
            if !methods.contains(&m) {
                methods.push(m);
            }
        }
        progress(Progress::Stage {
            name: "repairs",
            total: units.len() * methods.len(),
        });
        let mut records: BTreeMap<Method, Vec<RepairRecord>> = BTreeMap::new();
        let mut accepted: BTreeMap<Method, Vec<(usize, PatchSet)>> = BTreeMap::new();
        for (u, unit) in units.iter().enumerate() {
            // Before any clock: the server makes these passes while the failures are pending (the
            // frozen layers, whose keys and values also serve the greedy checks after).
            let lowers: Vec<KvCache> = unit
                .repaired
                .iter()
                .map(|i| self.probes[*i].lower(self.model, &self.residuals))
                .collect::<candle_core::Result<_>>()?;
            for &method in &methods {
                let (record, patches) =
                    self.repair_unit(star, method, unit, guards, lowers.clone(), options)?;
                progress(Progress::Step {
                    message: format!(
                        "{method} {}: {:?}, {} of {} fixed",
                        unit.name, record.status, record.fixed, record.cases
                    ),
                });
                if let Some(p) = patches {
                    accepted.entry(method).or_default().push((u, p));
                }
                records.entry(method).or_default().push(record);
            }
        }
        let mut reports = BTreeMap::new();
        for method in methods {
            let records = records.remove(&method).unwrap_or_default();
            let accepted = accepted.remove(&method).unwrap_or_default();
            let report = self.report(method, units, records, &accepted, options, progress)?;
            reports.insert(method, report);
        }
        Ok(reports)
    }

    /// A method's measures from its repairs' records, after its cumulative run.
    fn report(
        &self,
        method: Method,
        units: &[Unit],
        records: Vec<RepairRecord>,
        accepted: &[(usize, PatchSet)],
        options: &EvalOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> candle_core::Result<MethodReport> {
        let name = method.to_string();
        let cumulative = self.cumulative(units, accepted, options, &name, progress)?;

        let sum = |f: fn(&RepairRecord) -> usize| records.iter().map(f).sum::<usize>();
        let seconds: Vec<f64> = records.iter().map(|r| r.seconds).collect();
        let total: f64 = seconds.iter().sum();
        Ok(MethodReport {
            effectiveness: share(sum(|r| r.fixed), sum(|r| r.cases)),
            generalization: share(
                sum(|r| r.generalized as usize),
                sum(|r| r.held_out as usize),
            ),
            specificity: share(sum(|r| r.unchanged), sum(|r| r.sampled)),
            passing_kept: share(sum(|r| r.kept), sum(|r| r.passing_sampled)),
            repairs: records.len(),
            repaired_cases: sum(|r| r.cases),
            held_out_cases: sum(|r| r.held_out as usize),
            repair_seconds_mean: if records.is_empty() {
                0.0
            } else {
                total / records.len() as f64
            },
            repair_seconds_total: total,
            peak_rss_mb: records.iter().map(|r| r.peak_rss_mb).fold(0.0, f64::max),
            repair_rss_mb: records.iter().map(|r| r.repair_rss_mb).fold(0.0, f64::max),
            statuses: records.iter().fold(BTreeMap::new(), |mut m, r| {
                *m.entry(r.status).or_insert(0) += 1;
                m
            }),
            requantized: options
                .requantized
                .then(|| served_shares(&records, |r| r.requantized)),
            ungated: (options.ungated && records.iter().any(|r| r.ungated.is_some()))
                .then(|| served_shares(&records, |r| r.ungated)),
            cumulative,
            per_repair: records,
        })
    }

    /// One unit repaired from the unpatched model and measured; the patches if one was accepted.
    fn repair_unit(
        &self,
        star: &Star,
        method: Method,
        unit: &Unit,
        guards: &[Case],
        lowers: Vec<KvCache>,
        options: &EvalOptions,
    ) -> candle_core::Result<(RepairRecord, Option<PatchSet>)> {
        let failures: Vec<Case> = unit
            .repaired
            .iter()
            .map(|i| self.cases[*i].clone())
            .collect();
        let deadline = Instant::now() + options.timeout;
        let timed_out = std::sync::atomic::AtomicBool::new(false);
        let check_deadline = || {
            if Instant::now() > deadline {
                timed_out.store(true, std::sync::atomic::Ordering::SeqCst);
                candle_core::bail!("timed out after {:?}", options.timeout);
            }
            Ok(())
        };
        let bounded = Star {
            between_steps: Some(&check_deadline),
            residuals: Some(&self.residuals),
            ..Star::new(star.model, star.tokenizer, star.head, star.settings)
        };
        // The cases' checks before the clock: the server makes them while the failures are pending
        // (under the live overlay) and keeps the guards' from one repair to the next while the
        // overlay stays.
        bounded.warm(guards)?;
        bounded.warm(&failures)?;
        let rss_before = rss::current_mb().unwrap_or(0.0);
        rss::reset_peak();
        let t0 = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            bounded.repair_by(method, &failures, guards)
        }));
        let seconds = t0.elapsed().as_secs_f64();
        let peak = rss::peak_mb().unwrap_or(0.0);
        let mut record = self.record(unit, seconds, (peak - rss_before).max(0.0));
        let lowers_again =
            [options.requantized, options.ungated].map(|m| m.then(|| lowers.clone()));
        let set = match result {
            Ok(Ok(outcome)) => {
                self.judge(&bounded, outcome, &unit.repaired, lowers, &mut record)?
            }
            Ok(Err(e)) => {
                record.status = match timed_out.load(std::sync::atomic::Ordering::SeqCst) {
                    true => Status::TimedOut,
                    false => Status::Failed,
                };
                record.message = Some(crate::model::one_line(&e));
                None
            }
            Err(panic) => {
                record.status = Status::Crashed;
                record.message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
                None
            }
        };
        let record = self.measure(unit, set.as_ref(), lowers_again, record)?;
        Ok((record, set))
    }

    /// A repair's record before it is judged: patched, nothing measured yet.
    fn record(&self, unit: &Unit, seconds: f64, repair_rss_mb: f64) -> RepairRecord {
        RepairRecord {
            unit: unit.name.clone(),
            cases: unit.repaired.len(),
            held_out: unit.held_out.is_some(),
            status: Status::Patched,
            message: None,
            fixed: 0,
            generalized: false,
            sampled: 0,
            unchanged: 0,
            passing_sampled: 0,
            kept: 0,
            seconds,
            // The process peak, less what eval itself holds beyond the model (its cached residuals):
            // what a server holding the model would reach running this repair.
            peak_rss_mb: self.model_rss_mb + repair_rss_mb,
            repair_rss_mb,
            layers: Vec::new(),
            steps: 0,
            solves: 0,
            requantized: None,
            ungated: None,
            changed: Vec::new(),
        }
    }

    /// A repair's measures past its own verdict: whether the held-out case now passes, its
    /// specificity, and (given `lowers_again`) its repaired cases and specificity re-quantized and
    /// ungated.
    fn measure(
        &self,
        unit: &Unit,
        set: Option<&PatchSet>,
        [requantized, ungated]: [Option<Vec<KvCache>>; 2],
        mut record: RepairRecord,
    ) -> candle_core::Result<RepairRecord> {
        if let (Some(h), Some(set)) = (unit.held_out, set) {
            let case = &self.cases[h];
            let line = complete_case(self.model, self.tok, case, self.context, Some(set))?.text;
            record.generalized = passes(&line, case);
        }
        let repaired: BTreeSet<usize> =
            unit.repaired.iter().copied().chain(unit.held_out).collect();
        let sample = unrelated(self.cases, self.sampled, &repaired);
        if let (Some(set), Some(lowers)) = (set, requantized) {
            let model = self.model.requantized(set)?;
            let rest = set.gated_only();
            let fixed = self.fixed(&model, &unit.repaired, lowers, &rest)?;
            let unchanged = self.unchanged(&model, &sample, &rest)?;
            record.requantized = Some(Served { fixed, unchanged });
        }
        if let (Some(set), Some(lowers)) = (set, ungated) {
            if let Some(open) = set.ungated()? {
                let fixed = self.fixed(self.model, &unit.repaired, lowers, &open)?;
                let unchanged = self.unchanged(self.model, &sample, &open)?;
                record.ungated = Some(Served { fixed, unchanged });
            }
        }
        self.specificity(&sample, set, record)
    }

    /// The unit's specificity on `sample`: the completions `set` changes, and of the passing ones
    /// how many still pass.
    fn specificity(
        &self,
        sample: &[usize],
        set: Option<&PatchSet>,
        mut record: RepairRecord,
    ) -> candle_core::Result<RepairRecord> {
        // Without a patch the model is as it was, every completion unchanged.
        for &i in sample {
            let probe = &self.probes[i];
            let change = match set {
                Some(set) => probe.changed(self.model, self.tok, set)?,
                None => None,
            };
            if let Some(at) = change {
                record.changed.push(Changed {
                    case: self.cases[i].id.clone(),
                    at,
                });
            }
            let unchanged = change.is_none();
            record.sampled += 1;
            record.unchanged += unchanged as usize;
            if probe.passes {
                record.passing_sampled += 1;
                // A changed completion may still be the developer's: complete it to know.
                record.kept += match (unchanged, set) {
                    (false, Some(set)) => {
                        let line = complete_case(
                            self.model,
                            self.tok,
                            &self.cases[i],
                            self.context,
                            Some(set),
                        )?;
                        passes(&line.text, &self.cases[i]) as usize
                    }
                    _ => 1,
                };
            }
        }
        Ok(record)
    }

    /// A finished repair's patches (if the method kept one) as the overlay to measure, and its
    /// effectiveness: the repaired cases whose greedy completion on the serving model is now the
    /// developer's line (the repair's own verdict only teacher-forces them).
    fn judge(
        &self,
        star: &Star,
        outcome: RepairOutcome,
        repaired: &[usize],
        lowers: Vec<KvCache>,
        record: &mut RepairRecord,
    ) -> candle_core::Result<Option<PatchSet>> {
        record.layers = outcome.layers.clone();
        record.steps = outcome.steps;
        record.solves = outcome.solves;
        if outcome.patches.is_empty() {
            record.status = Status::Refused;
            record.message = outcome.refused;
            return Ok(None);
        }
        let set = star.served(&outcome.patches)?;
        record.fixed = self.fixed(self.model, repaired, lowers, &set)?;
        Ok(Some(set))
    }

    /// How many of the `repaired` cases `model` under `patches` completes the developer's way, each
    /// decoded from its frozen layers' keys and values (`lowers`).
    fn fixed(
        &self,
        model: &Qwen2,
        repaired: &[usize],
        lowers: Vec<KvCache>,
        patches: &PatchSet,
    ) -> candle_core::Result<usize> {
        let mut fixed = 0;
        for (i, lower) in repaired.iter().zip(lowers) {
            let case = &self.cases[*i];
            fixed += self.probes[*i].completes(model, self.tok, case, lower, patches)? as usize;
        }
        Ok(fixed)
    }

    /// How many of the `sample` cases' greedy completions `model` under `patches` leaves unchanged.
    fn unchanged(
        &self,
        model: &Qwen2,
        sample: &[usize],
        patches: &PatchSet,
    ) -> candle_core::Result<usize> {
        let mut unchanged = 0;
        for i in sample {
            unchanged += self.probes[*i].changed(model, self.tok, patches)?.is_none() as usize;
        }
        Ok(unchanged)
    }

    /// The accepted patches applied one after another to one model: after each (at most
    /// `cumulative_points` evenly spaced points), the share of the cases repaired so far that the model
    /// says right, and the share of unrelated sampled completions left unchanged.
    fn cumulative(
        &self,
        units: &[Unit],
        accepted: &[(usize, PatchSet)],
        options: &EvalOptions,
        name: &str,
        progress: &mut dyn FnMut(Progress),
    ) -> candle_core::Result<Vec<CumulativePoint>> {
        let steps = units.len();
        let points: BTreeSet<usize> = match steps {
            0 => BTreeSet::new(),
            _ => {
                let n = options.cumulative_points.clamp(1, steps);
                (1..=n).map(|k| (k * steps).div_ceil(n)).collect()
            }
        };
        progress(Progress::Stage {
            name: &format!("{name}: cumulative"),
            total: points.len(),
        });
        let mut stacked = PatchSet::default();
        let (mut said_memo, mut unchanged_memo) = (BTreeMap::new(), BTreeMap::new());
        let mut out = Vec::new();
        let mut next = accepted.iter().peekable();
        let mut repaired = BTreeSet::new();
        for (u, unit) in units.iter().enumerate() {
            while let Some((_, set)) = next.next_if(|(k, _)| *k == u) {
                for (layer, patch) in set.iter() {
                    stacked = stacked.with(layer, patch.clone())?;
                }
            }
            repaired.extend(unit.repaired.iter().copied());
            let step = u + 1;
            if !points.contains(&step) {
                continue;
            }
            let mut said = 0;
            for &i in &repaired {
                said += memoized(&mut said_memo, i, &stacked, || {
                    self.probes[i].says_target(self.model, self.tok, &stacked)
                })? as usize;
            }
            let related: BTreeSet<usize> = repaired
                .iter()
                .copied()
                .chain(units[..step].iter().flat_map(|u| u.held_out))
                .collect();
            let sample = unrelated(self.cases, self.sampled, &related);
            let mut unchanged = 0;
            for &i in &sample {
                // Under no patch at all the model is the unpatched one.
                unchanged += (stacked.is_empty()
                    || memoized(&mut unchanged_memo, i, &stacked, || {
                        Ok(self.probes[i]
                            .changed(self.model, self.tok, &stacked)?
                            .is_none())
                    })?) as usize;
            }
            out.push(CumulativePoint {
                step,
                repaired: repaired.len(),
                effectiveness: share(said, repaired.len()),
                specificity: share(unchanged, sample.len()),
                sampled: sample.len(),
            });
            progress(Progress::Step {
                message: format!("after repair {step}"),
            });
        }
        Ok(out)
    }
}

/// A cumulative check of case `case` under `stack`, made again only when the stack changed since the
/// case's last one (`memo` keeps each case's last stack and answer): a refused repair adds nothing.
fn memoized(
    memo: &mut BTreeMap<usize, (u64, bool)>,
    case: usize,
    stack: &PatchSet,
    check: impl FnOnce() -> candle_core::Result<bool>,
) -> candle_core::Result<bool> {
    if let Some(&(id, answer)) = memo.get(&case) {
        if id == stack.id() {
            return Ok(answer);
        }
    }
    let answer = check()?;
    memo.insert(case, (stack.id(), answer));
    Ok(answer)
}

/// A method's shares with its patches served otherwise (`served` of each repair's record): repairs
/// served as usual count as they do for the overlay.
fn served_shares(
    records: &[RepairRecord],
    served: impl Fn(&RepairRecord) -> Option<Served>,
) -> ServedShares {
    let (fixed, unchanged) = records.iter().fold((0, 0), |(f, u), r| match served(r) {
        Some(q) => (f + q.fixed, u + q.unchanged),
        None => (f + r.fixed, u + r.unchanged),
    });
    let sum = |f: &dyn Fn(&RepairRecord) -> usize| records.iter().map(f).sum::<usize>();
    ServedShares {
        effectiveness: share(fixed, sum(&|r| r.cases)),
        specificity: share(unchanged, sum(&|r| r.sampled)),
    }
}
