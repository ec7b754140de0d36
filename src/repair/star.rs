//! STAR, step by step as METHOD.md names them: `failure_positions`, `locate_layers`, `select_neurons`,
//! `steer`, `solve_patch` (with the guard projection), `guided_update`, `guard_check`.
//!
//! The lower layers are frozen: every case runs through the serving model once, and its residual stream
//! entering the first candidate layer is kept. Passes a gradient flows through run on dense f32 copies
//! of the upper layers, where candle can take gradients; the others (whole passes, re-solves, MINT's
//! trials) run the serving layers, a quarter of the memory traffic. After one whole pass, a case runs
//! over its *tail* only (the rows that predict its target): the prompt's keys and values in those
//! layers are kept from that pass, so each later pass costs a few rows, not the whole context. A
//! patch's effect on the prompt rows is left out of tail passes; a whole pass under the patch
//! (`Batch::refresh`) confirms the end, and is the verdict's check on the cases.

use super::steer::{row_rms, Head};
use super::targets::{same_line, teacher_forced, Case, TeacherForced};
use super::{linalg, Keys, Locate, Mode, PatchKind, RepairSettings, Residuals};
use crate::model::generate::{argmax, mask_rows};
use crate::model::{
    kv_positions, Capture, DecoderLayer, Gate, Hooks, LayerKv, LayerPatch, PatchSet, Qwen2,
    Tokenizer,
};
use candle_core::{DType, Device, Result, Tensor, Var};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

/// What a repair did. `patches` is empty when nothing needed repair or the guard refused the patch.
#[derive(Debug, Clone)]
pub struct RepairOutcome {
    pub patches: Vec<(usize, LayerPatch)>,
    /// Cases that failed (some target position wrong) before the repair.
    pub failures: usize,
    /// Of those, the cases the serving model says right at every target position with the patch.
    pub fixed: usize,
    /// Their ids.
    pub fixed_ids: Vec<String>,
    pub guard_before: f32,
    pub guard_after: f32,
    pub layers: Vec<usize>,
    pub neurons_per_layer: usize,
    /// Guided steps taken.
    pub steps: usize,
    /// Analytical solves made (STAR's; 0 for the baselines).
    pub solves: usize,
    pub seconds: f64,
    /// Why no patch came out although there were failures.
    pub refused: Option<String>,
}

/// Which method repairs: STAR, or one of the paper's baselines (METHOD.md).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Star,
    Mint,
    Sgd,
}

/// The lowercase name, as `--method` takes it and eval's JSON keys it.
impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Method::Star => "star",
            Method::Mint => "mint",
            Method::Sgd => "sgd",
        })
    }
}

/// Where a repair's patches act: per layer, the neurons patched and the gate they act behind (none
/// for an ungated patch). No columns: the patch holds a value per key, and `keyed` says per layer
/// which failure position (case, target position) each key was taken at.
pub(super) struct Sites<'a> {
    pub columns: &'a BTreeMap<usize, Vec<u32>>,
    pub gates: BTreeMap<usize, Gate>,
    pub keyed: PerLayer<Vec<(usize, usize)>>,
}

impl Sites<'_> {
    /// Per layer, a delta on that layer's columns (or values) as a patch, behind the layer's gate if
    /// it has one.
    fn patches(
        &self,
        deltas: impl IntoIterator<Item = (usize, Tensor)>,
    ) -> Result<Vec<(usize, LayerPatch)>> {
        deltas
            .into_iter()
            .map(|(l, d)| {
                let patch = match (self.columns[&l].is_empty(), self.gates.get(&l)) {
                    (true, Some(g)) => LayerPatch::values(d, g.clone())?,
                    (_, gate) => LayerPatch::new(self.columns[&l].clone(), d)?.gated(gate.cloned()),
                };
                Ok((l, patch))
            })
            .collect()
    }

    /// Layer `l`'s `patch` grown by a re-solve for the failure positions `at` (case, target
    /// position), whose activations are `z` (on the patched columns) and `whole` (every neuron),
    /// asking for `steers` `(positions, hidden)`. Its gate opens at these rows too.
    fn grow(
        &mut self,
        l: usize,
        patch: &Tensor,
        at: &[(usize, usize)],
        (z, whole): (&Tensor, &Tensor),
        steers: &Tensor,
        solve: &dyn Fn(usize, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let Some(gate) = self.gates.get_mut(&l) else {
            return patch + solve(l, z, steers)?;
        };
        if !self.columns[&l].is_empty() {
            *gate = gate.with_keys(if gate.center().is_some() { whole } else { z })?;
            return patch + solve(l, z, steers)?;
        }
        // Values: a position keyed already asks its key's value for more, a new one gets a key.
        let keyed = self.keyed.entry(l).or_default();
        let (mut old, mut old_rows, mut new_rows) = (Vec::new(), Vec::new(), Vec::new());
        for (r, site) in at.iter().enumerate() {
            match keyed.iter().position(|k| k == site) {
                Some(k) => {
                    old.push(k as u32);
                    old_rows.push(r as u32);
                }
                None => {
                    new_rows.push(r as u32);
                    keyed.push(*site);
                }
            }
        }
        let rows = |r: &[u32], of: &Tensor| -> Result<Tensor> {
            of.index_select(&Tensor::new(r, &Device::Cpu)?, 0)
        };
        let mut patch = patch.clone();
        if !old.is_empty() {
            let more = rows(&old_rows, steers)?.t()?.contiguous()?;
            patch = patch.index_add(&Tensor::new(old.as_slice(), &Device::Cpu)?, &more, 1)?;
        }
        if !new_rows.is_empty() {
            *gate = gate.with_keys(&rows(&new_rows, whole)?)?;
            patch = Tensor::cat(&[&patch, &rows(&new_rows, steers)?.t()?], 1)?.contiguous()?;
        }
        Ok(patch)
    }
}

/// Per case `i`, its positions `p`, as the (case, position) sites a steer's rows follow.
fn sites_of(positions: &[Vec<usize>]) -> Vec<(usize, usize)> {
    positions
        .iter()
        .enumerate()
        .flat_map(|(i, ps)| ps.iter().map(move |&p| (i, p)))
        .collect()
}

/// What every method starts from: the failing cases after the frozen lower layers, and dense copies of
/// the upper ones.
pub(super) struct Batch {
    pub first: usize,
    /// The candidate layers as dense copies, the live overlay's summed patches folded in.
    pub dense: Vec<DecoderLayer>,
    /// The live overlay's gated patches, which the dense copies cannot hold: passes over them run
    /// with these in `Hooks::patches`.
    pub beside_dense: PatchSet,
    pub cases: Vec<Prepared>,
    /// Per case, its failure positions.
    pub failing: Vec<Vec<usize>>,
    /// Per case, its scoring on the unpatched layers (logits, RMS, loss).
    pub scored: Vec<Scored>,
    /// Per case, what its tail-only passes start from, as of the last pass over its prompt.
    tails: RefCell<Vec<Tail>>,
    /// Per case, its check before the repair: its unpatched tail and prompt activations.
    checks: Vec<Arc<Checked>>,
    /// `Σ |z|` per candidate layer `(intermediate,)` over every row of the cases, and the rows summed:
    /// how broadly each neuron fires, in any context.
    pub breadth: PerLayer<Tensor>,
    pub rows: usize,
    /// `z` per candidate layer at a sample of the cases' prompt rows `(rows, intermediate)`: what the
    /// neurons look like in code the repair should leave alone (`settings.preserve`; the guards'
    /// prompts add theirs).
    pub typical: PerLayer<Tensor>,
}

/// A case's tail rows as the last whole pass of the dense layers left them: the residual entering each
/// candidate layer (from `first`) at those rows, so a pass from a higher layer re-runs only the layers
/// from it up, and each layer's keys and values of the rows before them.
#[derive(Debug, Clone, Default)]
struct Tail {
    inputs: Vec<Tensor>,
    prompt: Vec<LayerKv>,
}

impl Tail {
    /// Splits a whole pass over `case` (its capture of every candidate layer's input, and the keys and
    /// values it left) at the tail.
    ///
    /// The pass ran rows `from..` (at most the tail's first): its keys and values hold every row.
    fn split(
        case: &Prepared,
        capture: &mut Capture,
        kv: Vec<LayerKv>,
        layers: std::ops::Range<usize>,
        from: usize,
    ) -> Result<Self> {
        let seq = case.residual.dim(0)?;
        let tail = case.tf.row(0);
        let inputs = layers
            .map(|l| match capture.residual.remove(&l) {
                Some(x) => x.narrow(0, tail - from, seq - tail),
                None => candle_core::bail!("no residual captured"),
            })
            .collect::<Result<Vec<_>>>()?;
        let prompt = kv
            .into_iter()
            .map(|e| match e {
                Some((k, v)) if tail > 0 => {
                    Ok(Some((k.narrow(2, 0, tail)?, v.narrow(2, 0, tail)?)))
                }
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { inputs, prompt })
    }
}

impl Batch {
    /// Runs every case whole with `patches`: the tails' inputs and the prompt rows' keys and values
    /// then include the patch's effect on the prompt, which tail-only passes leave out. Called when
    /// those passes find the batch done, so that "done" holds for the whole cases. No gradient flows
    /// through a whole pass, so it runs the serving layers, not the dense copies (a third the time).
    /// Returns each case's scoring by that pass: the serving model's own, as the verdict would make it.
    ///
    /// Each case runs from the first row the patches may change (`Star::first_change`).
    pub(super) fn refresh(
        &self,
        star: &Star,
        patches: &[(usize, LayerPatch)],
    ) -> Result<Vec<Scored>> {
        let set = star.served(patches)?;
        let mut tails = Vec::with_capacity(self.cases.len());
        let mut scored = Vec::with_capacity(self.cases.len());
        for check in &self.checks {
            star.checkpoint()?;
            let from = star.first_change(self, check, patches)?;
            let (s, tail, _) =
                star.pass_from(&check.prepared, &check.tail, from, self.first, &set)?;
            scored.push(s);
            tails.push(tail);
        }
        *self.tails.borrow_mut() = tails;
        Ok(scored)
    }

    /// Which cases `scored` (a whole pass per case, as `refresh` makes) finds right at every target
    /// position.
    pub(super) fn right(&self, star: &Star, scored: &[Scored]) -> Result<Vec<bool>> {
        self.cases
            .iter()
            .zip(scored)
            .map(|(case, s)| Ok(star.failure_positions(case, &s.logits)?.is_empty()))
            .collect()
    }

    /// Rows a tail-only pass over case `i` runs.
    pub(super) fn tail_rows(&self, i: usize) -> Result<usize> {
        self.tails.borrow()[i].inputs[0].dim(0)
    }

    /// Scores the tails of cases `which` in one packed pass of the `upper` layers from `lo` up (their
    /// rows one after another, `tail_rows` each, in a capture): nothing below is patched, so the
    /// residual entering `lo` is the one captured at the start. The serving layers want the live
    /// overlay in `hooks.patches` (`Star::served`); the dense copies hold its summed patches and want
    /// the rest, `beside_dense`, there.
    pub(super) fn score_from(
        &self,
        star: &Star,
        upper: Upper,
        lo: usize,
        which: &[usize],
        hooks: &mut Hooks,
    ) -> Result<Vec<Scored>> {
        let k = lo - self.first;
        let tails = self.tails.borrow();
        let layers = match upper {
            Upper::Serving => &star.model.layers()[lo..],
            Upper::Dense => &self.dense[k..],
        };
        let mut kvs: Vec<Vec<_>> = which
            .iter()
            .map(|&i| tails[i].prompt[k..].to_vec())
            .collect();
        let mut seqs: Vec<_> = which
            .iter()
            .zip(kvs.iter_mut())
            .map(|(&i, kv)| (&self.cases[i], &tails[i].inputs[k], kv.as_mut_slice()))
            .collect();
        star.score(lo, layers, &mut seqs, hooks)
    }

    /// Where each of cases `which` starts in their packed tail rows.
    pub(super) fn offsets(&self, which: &[usize]) -> Result<Vec<usize>> {
        let mut at = 0;
        which
            .iter()
            .map(|&i| {
                let start = at;
                at += self.tail_rows(i)?;
                Ok(start)
            })
            .collect()
    }
}

/// Which copy of the upper layers a pass runs: the serving ones (quantized weights, and the quantized
/// head for its logits) when no gradient flows through it, a quarter of the memory traffic of the
/// dense f32 copies that a gradient needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Upper {
    Serving,
    Dense,
}

/// A method's patches and, when its last whole pass ran under exactly them (`Batch::refresh`), which
/// cases that pass found right: the verdict's own check on the cases, already made.
pub(super) struct Patched {
    pub patches: Vec<(usize, LayerPatch)>,
    pub verified: Option<Vec<bool>>,
}

impl From<Vec<(usize, LayerPatch)>> for Patched {
    fn from(patches: Vec<(usize, LayerPatch)>) -> Self {
        Self {
            patches,
            verified: None,
        }
    }
}

/// A steer as solved for one position: the rival it pushed against, the developer's lead over it then,
/// and the gain it was scaled by.
struct Asked {
    rival: u32,
    lead: f32,
    gain: f32,
}

impl Asked {
    /// The gain for the next steer at this position: the steer asks the lead to close to the margin,
    /// but the layers above the patch and the final norm pass on only part of it; asking for the
    /// rest divided by the part that came through (a secant step, bounded) settles it in fewer solves.
    fn next_gain(&self, row: &[f32], want: u32, margin: f32) -> f32 {
        const MAX_GAIN: f32 = 8.0;
        let asked = ((-self.lead).max(0.0) + margin) * self.gain;
        let got = row[want as usize] - row[self.rival as usize] - self.lead;
        (asked / got.max(asked / MAX_GAIN)).clamp(1.0, MAX_GAIN)
    }
}

/// A case checked on the serving model under the live overlay, before any repair: one whole pass of
/// the candidate layers, and what a repair takes from it, as a failure (its failure positions,
/// scoring, tail, how broadly each neuron fired) or as a guard (the neuron activations at its target
/// rows, for the guard projection). Both take its activations at sampled prompt rows, for `preserve`.
#[derive(Debug)]
pub(super) struct Checked {
    prepared: Prepared,
    failing: Vec<usize>,
    scored: Scored,
    tail: Tail,
    /// `Σ |z|` per candidate layer over every row.
    fires: PerLayer<Tensor>,
    /// `z` per candidate layer `(target rows, intermediate)`.
    at_target: PerLayer<Tensor>,
    typical: PerLayer<Tensor>,
    /// The residual between attention and MLP per candidate layer at the rows before the tail
    /// `(rows, hidden)`: where a gated patch would open there (`Star::first_change`).
    mid: PerLayer<Tensor>,
}

/// What a check depends on: the case's tokens, the layers from `first` up under the overlay named
/// `overlay`, and whether typical rows were sampled.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct CheckKey {
    first: usize,
    pub(super) overlay: u64,
    typical: bool,
    tokens: Vec<u32>,
}

/// A case after the frozen lower layers.
#[derive(Debug, Clone)]
pub(super) struct Prepared {
    tf: TeacherForced,
    /// The residual stream entering the first candidate layer `(seq, hidden)`.
    pub residual: Tensor,
}

/// A value per layer index.
pub(super) type PerLayer<T> = BTreeMap<usize, T>;

/// The neurons chosen per layer, and their activations `(failure positions, chosen)` per layer.
struct Selection {
    columns: BTreeMap<usize, Vec<u32>>,
    /// `z` at the failure positions on the selected columns.
    z: BTreeMap<usize, Tensor>,
    /// `z` at the failure positions, every neuron.
    whole: BTreeMap<usize, Tensor>,
}

/// Neuron attribution over some cases, per layer.
pub(super) struct Attribution {
    /// `|∂CE/∂z ⊙ z|` summed over the failure positions `(intermediate,)`.
    pub scores: PerLayer<Vec<f32>>,
    /// `z` at the failure positions `(positions, intermediate)`.
    failing: PerLayer<Tensor>,
    /// `Σ ∂CE/∂z ⊙ z` over every tail row and neuron: to first order, how much the loss would rise if
    /// the layer's MLP output were zeroed (occlusion, linearized).
    effect: PerLayer<f32>,
}

/// One scoring pass over a case: the final-normed states at its target rows (in the autograd graph),
/// their logits (not in it), and their pre-norm RMS.
#[derive(Debug, Clone)]
pub(super) struct Scored {
    hidden: Tensor,
    pub logits: Tensor,
    rms: Vec<f32>,
    target: Vec<u32>,
}

impl Scored {
    /// The mean cross-entropy of target positions `at`, as a tensor whose value is the loss and whose
    /// gradient is the loss's. The LM head stays out of the graph: candle computes a gradient for
    /// both sides of a matmul, and the head's `(vocab, hidden)` one would cost 545 MB per case for the
    /// default model, for nothing. `∂CE/∂h = (softmax(logits) − onehot(target)) W_U / n` is exact.
    ///
    /// Summed over `parts`, each a scoring and its positions: the head is read once for all of them.
    pub(super) fn loss(parts: &[(&Scored, &[usize])], head: &Tensor) -> Result<Tensor> {
        let (mut hidden, mut logits, mut targets, mut weights) = (vec![], vec![], vec![], vec![]);
        let mut value = 0.0;
        for (s, at) in parts.iter().filter(|(_, at)| !at.is_empty()) {
            let (idx, target, l) = s.rows(at)?;
            value += candle_nn::loss::cross_entropy(&l, &target)?.to_scalar::<f32>()?;
            hidden.push(s.hidden.index_select(&idx, 0)?);
            logits.push(l);
            targets.push(target);
            weights.extend(std::iter::repeat_n(1.0 / at.len() as f32, at.len()));
        }
        if hidden.is_empty() {
            return Tensor::zeros((), DType::F32, &Device::Cpu);
        }
        let (hidden, logits) = (Tensor::cat(&hidden, 0)?, Tensor::cat(&logits, 0)?);
        let target = Tensor::cat(&targets, 0)?;
        let weights = Tensor::from_vec(weights, (hidden.dim(0)?, 1), &Device::Cpu)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?;
        let grad =
            (probs.matmul(head)? - head.index_select(&target, 0)?)?.broadcast_mul(&weights)?;
        let linear = (&hidden * &grad)?.sum_all()?;
        linear.clone() + (Tensor::new(value, &Device::Cpu)? - linear.detach())?
    }

    /// The loss's value alone, for callers that take no gradient (MINT's trials, occlusion): no pass through
    /// the head beyond the logits already made.
    pub(super) fn cross_entropy(&self, at: &[usize]) -> Result<f32> {
        let (_, target, logits) = self.rows(at)?;
        candle_nn::loss::cross_entropy(&logits, &target)?.to_scalar()
    }

    /// Row indices, target tokens and logits of target positions `at`.
    fn rows(&self, at: &[usize]) -> Result<(Tensor, Tensor, Tensor)> {
        let idx: Vec<u32> = at.iter().map(|&i| i as u32).collect();
        let idx = Tensor::new(idx.as_slice(), &Device::Cpu)?;
        let target: Vec<u32> = at.iter().map(|&i| self.target[i]).collect();
        let target = Tensor::new(target.as_slice(), &Device::Cpu)?;
        let logits = self.logits.index_select(&idx, 0)?;
        Ok((idx, target, logits))
    }

    pub(super) fn all(&self) -> Vec<usize> {
        (0..self.target.len()).collect()
    }
}

/// How far below its threshold a gate's cosine, recomputed from a check's activations
/// (`DecoderLayer::neurons_on`), must stay to count as shut in the serving pass. The recomputation
/// rounds its input as the serving kernels do and agrees with them to about 1e-6; without that
/// rounding a cosine moved by up to 0.034 (tests/model_packaged.rs), which this margin still covers.
const GATE_MARGIN: f32 = 0.05;

pub struct Star<'a> {
    pub model: &'a Qwen2,
    pub tokenizer: &'a Tokenizer,
    pub head: &'a Head,
    pub settings: RepairSettings,
    /// The overlay already serving: a repair starts from the model as it serves, and its patches are
    /// summed onto this overlay.
    pub live: Option<&'a PatchSet>,
    /// Where the cases' residuals entering the first candidate layer are kept between repairs.
    pub residuals: Option<&'a Residuals>,
    /// Called between steps: the server waits there while completions run (they take priority), eval
    /// stops a repair past its deadline by returning an error.
    pub between_steps: Option<&'a (dyn Fn() -> Result<()> + Sync)>,
}

impl<'a> Star<'a> {
    pub fn new(
        model: &'a Qwen2,
        tokenizer: &'a Tokenizer,
        head: &'a Head,
        settings: RepairSettings,
    ) -> Self {
        Self {
            model,
            tokenizer,
            head,
            settings,
            live: None,
            residuals: None,
            between_steps: None,
        }
    }

    pub(super) fn checkpoint(&self) -> Result<()> {
        self.between_steps.map_or(Ok(()), |f| f())
    }

    /// The overlay the serving model would run with `patches` added to the live one.
    pub fn served(&self, patches: &[(usize, LayerPatch)]) -> Result<PatchSet> {
        super::overlay_on(self.live.cloned().unwrap_or_default(), patches)
    }

    /// The first layer that may be patched: the top `candidate_fraction` of the layers.
    pub fn first_candidate(&self) -> usize {
        self.settings.first_candidate(self.model.layers().len())
    }

    /// Checks `cases` (failures pending, or guards) under the live overlay and keeps the checks in
    /// `residuals` until the overlay changes: what a repair of or against them would run before it
    /// starts, paid before it. The server does it while they wait, eval before a repair's clock.
    pub fn warm(&self, cases: &[Case]) -> Result<()> {
        let live = self.served(&[])?;
        for c in cases {
            self.check(c, self.first_candidate(), &live)?;
        }
        Ok(())
    }

    /// A case run once through the serving model's frozen lower layers (with the live overlay): its
    /// teacher-forced tokens and the residual entering layer `first` at each of them.
    fn prepare(&self, case: &Case, first: usize) -> Result<Prepared> {
        let tf = teacher_forced(self.tokenizer, case, self.settings.context);
        let residual = match self.residuals {
            Some(r) => r.entering(self.model, first, &tf.tokens, self.live)?,
            None => self.model.residual_entering(
                first,
                &tf.tokens,
                &mut self.model.new_cache(),
                self.live,
            )?,
        };
        Ok(Prepared { tf, residual })
    }

    /// Whether the serving model, under `set` (the live overlay and `patches`, all at the first
    /// candidate layer or above), predicts the developer's line at every target position of each
    /// checked case, end of line included: a teacher-forced pass of the quantized top layers, where a
    /// greedy check would pay a decode of the whole model per token. Eval measures effectiveness by
    /// greedy completions of its own.
    fn say_targets(
        &self,
        batch: &Batch,
        checks: &[&Checked],
        patches: &[(usize, LayerPatch)],
        set: &PatchSet,
    ) -> Result<Vec<bool>> {
        checks
            .iter()
            .map(|c| {
                self.checkpoint()?;
                let from = self.first_change(batch, c, patches)?;
                let (s, _, _) = self.pass_from(&c.prepared, &c.tail, from, batch.first, set)?;
                Ok(self.failure_positions(&c.prepared, &s.logits)?.is_empty())
            })
            .collect()
    }

    /// The first row of `check`'s case that `patches` may change, up to the first of its tail: rows
    /// before the first one a gate opens at are unpatched at every layer (attention looks back
    /// only), so each gate is asked about the activations the check recorded there; an ungated patch
    /// changes every row.
    fn first_change(
        &self,
        batch: &Batch,
        check: &Checked,
        patches: &[(usize, LayerPatch)],
    ) -> Result<usize> {
        let mut first = check.prepared.tf.row(0);
        for (l, p) in patches {
            let (Some(gate), Some(mid)) = (p.gate(), check.mid.get(l)) else {
                return Ok(0);
            };
            let columns = match gate.center() {
                Some(_) => None,
                None => Some(Tensor::new(p.columns(), &Device::Cpu)?),
            };
            let z = batch.dense[l - batch.first].neurons_on(mid, columns.as_ref())?;
            if let Some(r) = gate.first_open(&z, GATE_MARGIN)? {
                first = first.min(r);
            }
        }
        Ok(first)
    }

    /// `case` checked on the serving model under `live` (the live overlay): from `residuals` when it
    /// was checked under the same overlay already (while it waited, or as a guard of the last repair:
    /// one repair's guards are mostly the next one's).
    fn check(&self, case: &Case, first: usize, live: &PatchSet) -> Result<Arc<Checked>> {
        let prepared = self.prepare(case, first)?;
        let key = CheckKey {
            first,
            overlay: live.id(),
            typical: self.samples_typical(),
            tokens: prepared.tf.tokens.clone(),
        };
        if let Some(c) = self.residuals.and_then(|r| r.check(&key)) {
            return Ok(c);
        }
        // This pass gives the activations STAR keeps its patch off: the serving layers' `z` differs
        // from the dense copies' by rounding only.
        let (scored, tail, mut capture) =
            self.pass_from(&prepared, &Tail::default(), 0, first, live)?;
        let failing = self.failure_positions(&prepared, &scored.logits)?;
        let prompt_rows = prepared.tf.row(0);
        let mid = std::mem::take(&mut capture.mid)
            .into_iter()
            .map(|(l, m)| Ok((l, m.narrow(0, 0, prompt_rows)?)))
            .collect::<Result<_>>()?;
        let rows: Vec<u32> = (0..prepared.tf.target.len())
            .map(|i| prepared.tf.row(i) as u32)
            .collect();
        let rows = Tensor::new(rows.as_slice(), &Device::Cpu)?;
        let sample = self.typical_rows(&prepared)?;
        let (mut fires, mut at_target, mut typical) =
            (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        for (l, z) in capture.neurons {
            fires.insert(l, z.abs()?.sum(0)?);
            at_target.insert(l, z.index_select(&rows, 0)?);
            if let Some(idx) = &sample {
                typical.insert(l, z.index_select(idx, 0)?);
            }
        }
        let checked = Arc::new(Checked {
            prepared,
            failing,
            scored,
            tail,
            fires,
            at_target,
            typical,
            mid,
        });
        if let Some(r) = self.residuals {
            r.keep_check(key, checked.clone());
        }
        Ok(checked)
    }

    /// A pass of the serving layers from `first` up over `case`'s rows from `from` on under `set`,
    /// the keys and values of the rows before taken from `base` (an earlier pass's tail, which `set`
    /// must leave as they are there): its scoring, its tail split off for later tail-only passes, and
    /// those layers' activations at the rows it ran. From 0, a whole pass.
    fn pass_from(
        &self,
        case: &Prepared,
        base: &Tail,
        from: usize,
        first: usize,
        set: &PatchSet,
    ) -> Result<(Scored, Tail, Capture)> {
        let n_layers = self.model.layers().len();
        let mut capture = Capture::layers(first..n_layers).with_mid();
        let mut kv: Vec<LayerKv> = match from {
            0 => vec![None; n_layers - first],
            _ => base
                .prompt
                .iter()
                .map(|e| match e {
                    Some((k, v)) => Ok(Some((k.narrow(2, 0, from)?, v.narrow(2, 0, from)?))),
                    None => candle_core::bail!("no keys before row {from}"),
                })
                .collect::<Result<_>>()?,
        };
        let rows = case
            .residual
            .narrow(0, from, case.residual.dim(0)? - from)?;
        tracing::trace!(from, rows = rows.dim(0)?, "pass");
        let scored = self
            .score(
                first,
                &self.model.layers()[first..],
                &mut [(case, &rows, &mut kv)],
                &mut Hooks {
                    patches: Some(set),
                    capture: Some(&mut capture),
                    ..Hooks::default()
                },
            )?
            .remove(0);
        let tail = Tail::split(case, &mut capture, kv, first..n_layers, from)?;
        Ok((scored, tail, capture))
    }

    /// Whether checks sample typical rows: for `preserve`, and for gates keyed on the layer (their
    /// centre and threshold).
    fn samples_typical(&self) -> bool {
        self.settings.preserve > 0.0
            || (self.settings.gate > 0.0 && self.settings.keys == Keys::Layer)
    }

    /// The prompt rows of `case` sampled for `preserve` and layer keys (`Batch::typical`,
    /// `Checked::typical`): up to 64, evenly over the rows before the tail but the first; `None` when
    /// neither wants them or there are none. The first row is the attention sink: in the top layers its `|z|²` is 30–110 times a
    /// typical row's, so it would make the metric a rank-one guard of itself.
    fn typical_rows(&self, case: &Prepared) -> Result<Option<Tensor>> {
        const ROWS: usize = 64;
        let tail = case.tf.row(0);
        let n = tail.saturating_sub(1).min(ROWS);
        if !self.samples_typical() || n == 0 {
            return Ok(None);
        }
        let rows: Vec<u32> = (0..n).map(|i| (1 + i * (tail - 1) / n) as u32).collect();
        Tensor::new(rows.as_slice(), &Device::Cpu).map(Some)
    }

    /// Runs upper `layers` (dense copies or the serving ones) over prepared cases, each `(case, its
    /// residual rows, its keys and values)`, in one packed pass: a case's rows are those after the ones
    /// its keys hold (all of them when they hold none), and its keys gain them. Scores every case's
    /// target tokens, with logits from the head of the same kind as the layers.
    pub(super) fn score(
        &self,
        first: usize,
        layers: &[DecoderLayer],
        seqs: &mut [(&Prepared, &Tensor, &mut [LayerKv])],
        hooks: &mut Hooks,
    ) -> Result<Vec<Scored>> {
        // Each case's target rows in the packed output: `row(i)` less the rows its keys hold, past
        // the cases before it.
        let (mut rows, mut counts, mut at) = (Vec::new(), Vec::new(), 0);
        for (case, residual, kv) in seqs.iter() {
            let start = kv_positions(kv)?;
            let n = case.tf.target.len();
            rows.extend((0..n).map(|i| (at + case.tf.row(i) - start) as u32));
            counts.push(n);
            at += residual.dim(0)?;
        }
        let x = Tensor::cat(&seqs.iter().map(|s| s.1).collect::<Vec<_>>(), 0)?;
        let mut packed: Vec<(usize, &mut [LayerKv])> = Vec::new();
        for (_, residual, kv) in seqs.iter_mut() {
            packed.push((residual.dim(0)?, &mut **kv));
        }
        let mut own = Capture::layers([]);
        let capture = match hooks.capture.as_deref_mut() {
            Some(c) => c,
            None => &mut own,
        };
        let mut inner = Hooks {
            patches: hooks.patches,
            capture: Some(capture),
            skip_mlp: hooks.skip_mlp,
            neuron_probes: hooks.neuron_probes,
            fired: hooks.fired.as_deref_mut(),
        };
        let normed = self
            .model
            .forward_packed(first, layers, &x, &mut packed, &mut inner)?;
        let rows = Tensor::new(rows.as_slice(), &Device::Cpu)?;
        let hidden = normed.index_select(&rows, 0)?;
        let logits = match layers.first() {
            Some(l) if !l.is_dense() => self.model.logits(&hidden)?,
            _ => hidden.detach().matmul(&self.head.weight.t()?)?,
        };
        let pre_norm = inner
            .capture
            .and_then(|c| c.final_hidden.clone())
            .ok_or_else(|| candle_core::Error::Msg("no final hidden captured".into()))?;
        let rms = row_rms(&pre_norm.index_select(&rows, 0)?.detach())?;
        let mut scored = Vec::with_capacity(seqs.len());
        let mut from = 0;
        for ((case, _, _), n) in seqs.iter().zip(counts) {
            scored.push(Scored {
                hidden: hidden.narrow(0, from, n)?,
                logits: logits.narrow(0, from, n)?,
                rms: rms[from..from + n].to_vec(),
                target: case.tf.target.clone(),
            });
            from += n;
        }
        Ok(scored)
    }

    /// A case's target-row logits as generation sees them (`mask_rows`: healing, the line's shape).
    fn decisions(&self, tf: &TeacherForced, logits: &Tensor) -> Result<Vec<Vec<f32>>> {
        let mut rows: Vec<Vec<f32>> = logits.to_vec2()?;
        mask_rows(self.tokenizer, &mut rows, &tf.target, &tf.prompt);
        Ok(rows)
    }

    /// STAR's failure positions: target indices whose top-1 token would change the line.
    pub(super) fn failure_positions(&self, case: &Prepared, logits: &Tensor) -> Result<Vec<usize>> {
        Ok(self.wrong_at(&case.tf, &self.decisions(&case.tf, logits)?))
    }

    /// The failure positions among a case's `decisions`.
    fn wrong_at(&self, tf: &TeacherForced, decisions: &[Vec<f32>]) -> Vec<usize> {
        decisions
            .iter()
            .zip(&tf.target)
            .enumerate()
            .filter(|(_, (row, want))| !same_line(self.tokenizer, argmax(row), **want))
            .map(|(i, _)| i)
            .collect()
    }

    /// STAR's layers, by `settings.locate`; with the gradient, the attribution of every candidate
    /// layer's neurons comes with them.
    fn locate_layers(&self, batch: &Batch) -> Result<(Vec<usize>, Option<Attribution>)> {
        match self.settings.locate {
            Locate::Occlusion => Ok((self.occlusion(batch)?, None)),
            Locate::Gradient => {
                let all: Vec<usize> = (0..batch.cases.len()).collect();
                let candidates: Vec<usize> =
                    (batch.first..batch.first + batch.dense.len()).collect();
                let found = self.attribution(batch, &all, &candidates)?;
                let effects = found.effect.iter().map(|(l, e)| (*l, e.abs())).collect();
                Ok((self.top_layers(effects), Some(found)))
            }
        }
    }

    /// The `settings.layers` layers of largest effect, in order.
    fn top_layers(&self, mut effects: Vec<(usize, f32)>) -> Vec<usize> {
        effects.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut layers: Vec<usize> = effects
            .iter()
            .take(self.settings.layers.max(1))
            .map(|(l, _)| *l)
            .collect();
        layers.sort_unstable();
        layers
    }

    /// Layers ranked by MLP occlusion: how far skipping a layer's MLP moves the failures' loss.
    fn occlusion(&self, batch: &Batch) -> Result<Vec<usize>> {
        let Batch {
            first,
            dense,
            cases,
            scored,
            ..
        } = batch;
        let first = *first;
        let live = self.served(&[])?;
        let all: Vec<usize> = (0..cases.len()).collect();
        let loss_with = |l: usize| -> Result<f32> {
            let mut total = 0.0;
            for s in batch.score_from(
                self,
                Upper::Serving,
                l,
                &all,
                &mut Hooks {
                    patches: Some(&live),
                    skip_mlp: &[l],
                    ..Hooks::default()
                },
            )? {
                total += s.cross_entropy(&s.all())?;
            }
            Ok(total)
        };
        let mut base = 0.0;
        for s in scored {
            base += s.cross_entropy(&s.all())?;
        }
        let mut effects = Vec::new();
        for l in first..first + dense.len() {
            self.checkpoint()?;
            effects.push((l, (loss_with(l)? - base).abs()));
        }
        Ok(self.top_layers(effects))
    }

    /// Every neuron's attribution `|∂CE/∂z ⊙ z|` summed over the failure positions of cases `which`, per
    /// layer, with the activations at those positions.
    pub(super) fn attribution(
        &self,
        batch: &Batch,
        which: &[usize],
        layers: &[usize],
    ) -> Result<Attribution> {
        self.checkpoint()?;
        let lo = layers.iter().copied().min().unwrap_or(batch.first);
        let offsets = batch.offsets(which)?;
        let seq = match which.last() {
            Some(&i) => offsets[which.len() - 1] + batch.tail_rows(i)?,
            None => 0,
        };
        let mut probes = BTreeMap::new();
        let mut vars = BTreeMap::new();
        for &l in layers {
            let m = batch.dense[l - batch.first].mlp().down().in_features();
            let v = Var::zeros((seq, m), DType::F32, &Device::Cpu)?;
            probes.insert(l, v.as_tensor().clone());
            vars.insert(l, v);
        }
        let mut capture = Capture::layers(layers.iter().copied());
        let scored = batch.score_from(
            self,
            Upper::Dense,
            lo,
            which,
            &mut Hooks {
                patches: Some(&batch.beside_dense),
                capture: Some(&mut capture),
                neuron_probes: Some(&probes),
                ..Hooks::default()
            },
        )?;
        // Only the failure positions drive attribution; in a case's tail, target position `p` is
        // row `p`.
        let mut parts = Vec::with_capacity(which.len());
        let mut failing_rows: Vec<u32> = Vec::new();
        for ((s, &i), offset) in scored.iter().zip(which).zip(&offsets) {
            parts.push((s, batch.failing[i].as_slice()));
            failing_rows.extend(batch.failing[i].iter().map(|&p| (offset + p) as u32));
        }
        let grads = Scored::loss(&parts, &self.head.weight)?.backward()?;
        let failing_rows = Tensor::new(failing_rows.as_slice(), &Device::Cpu)?;
        let mut out = Attribution {
            scores: BTreeMap::new(),
            failing: BTreeMap::new(),
            effect: BTreeMap::new(),
        };
        for &l in layers {
            let z = capture.neurons[&l].detach();
            let g = grads
                .get(vars[&l].as_tensor())
                .ok_or_else(|| candle_core::Error::Msg("no gradient for a neuron probe".into()))?;
            out.effect
                .insert(l, (g * &z)?.sum_all()?.to_scalar::<f32>()?);
            let g = g.index_select(&failing_rows, 0)?;
            let at = z.index_select(&failing_rows, 0)?;
            out.scores.insert(l, (g * &at)?.abs()?.sum(0)?.to_vec1()?);
            out.failing.insert(l, at);
        }
        Ok(out)
    }

    /// STAR's neurons: the top `neuron_fraction` of each layer by attribution, with their activations at
    /// the failure positions. With `settings.selective`, a neuron's attribution is divided by how
    /// broadly it fires (its mean `|z|` over every row, plus the layer's mean of that): a patch on a
    /// neuron moves every context the neuron fires in, so the ones that fire for these failures above
    /// all others move the least else.
    fn select_neurons(&self, batch: &Batch, found: Attribution) -> Result<Selection> {
        let mut selection = Selection {
            columns: BTreeMap::new(),
            z: BTreeMap::new(),
            whole: BTreeMap::new(),
        };
        for (l, scores) in found.scores {
            let scores = match (self.settings.selective, batch.breadth.get(&l)) {
                (true, Some(fires)) => {
                    let fires: Vec<f32> = (fires / batch.rows.max(1) as f64)?.to_vec1()?;
                    let mean = fires.iter().sum::<f32>() / fires.len().max(1) as f32;
                    scores
                        .iter()
                        .zip(&fires)
                        .map(|(s, f)| s / (f + mean))
                        .collect()
                }
                _ => scores,
            };
            let k = ((scores.len() as f32 * self.settings.neuron_fraction).ceil() as usize)
                .clamp(1, scores.len());
            let mut order: Vec<u32> = (0..scores.len() as u32).collect();
            order.sort_by(|a, b| scores[*b as usize].total_cmp(&scores[*a as usize]));
            order.truncate(k);
            order.sort_unstable();
            let idx = Tensor::new(order.as_slice(), &Device::Cpu)?;
            let z = found.failing[&l].index_select(&idx, 1)?;
            selection.z.insert(l, z);
            selection.whole.insert(l, found.failing[&l].clone());
            selection.columns.insert(l, order);
        }
        Ok(selection)
    }

    /// The steers `S` `(positions, hidden)` of the given positions of each case, each pushing the
    /// developer's token past its rival and split across `parts` layers.
    pub(super) fn steers(
        &self,
        cases: &[Scored],
        prepared: &[Prepared],
        positions: &[Vec<usize>],
        parts: usize,
    ) -> Result<Tensor> {
        let mut rows = Vec::new();
        for ((scored, case), positions) in cases.iter().zip(prepared).zip(positions) {
            let decisions = self.decisions(&case.tf, &scored.logits)?;
            for &i in positions {
                let logits = &decisions[i];
                let want = case.tf.target[i];
                let s = match self.rival(logits, want) {
                    Some(rival) => {
                        self.head
                            .steer(rival, want, logits, scored.rms[i], self.settings.margin)?
                    }
                    None => vec![0.0; self.head.weight.dim(1)?],
                };
                rows.push(
                    Tensor::new(s.as_slice(), &Device::Cpu)?.affine(1.0 / parts as f64, 0.0)?,
                );
            }
        }
        Tensor::stack(&rows, 0)
    }

    /// The best-scoring token that would change the line if chosen instead of `want` (at a failure
    /// position, the model's own top-1), among the top few; `None` when they all keep the line.
    fn rival(&self, logits: &[f32], want: u32) -> Option<u32> {
        const LOOK: usize = 8;
        let mut top: Vec<u32> = Vec::with_capacity(LOOK + 1);
        for (t, v) in logits.iter().enumerate() {
            if top.len() == LOOK && *v <= logits[top[LOOK - 1] as usize] {
                continue;
            }
            let at = top.partition_point(|&u| logits[u as usize] >= *v);
            top.insert(at, t as u32);
            top.truncate(LOOK);
        }
        top.into_iter()
            .find(|&t| !same_line(self.tokenizer, t, want))
    }

    /// Target positions not yet settled: where the developer's token does not lead its rival by half
    /// the margin. A fix that only just tips the argmax in the dense f32 copy can tip back in the
    /// quantized serving model, so the re-solves aim for a lead the quantization cannot undo.
    fn unsettled(&self, case: &Prepared, rows: &[Vec<f32>]) -> Vec<usize> {
        rows.iter()
            .zip(&case.tf.target)
            .enumerate()
            .filter(|(_, (row, want))| {
                self.rival(row, **want).is_some_and(|r| {
                    row[**want as usize] - row[r as usize] < self.settings.margin / 2.0
                })
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// What a steer with `gain` asks at a position with decisions `row`: its rival and lead now.
    fn asked(&self, row: &[f32], want: u32, gain: f32) -> Option<Asked> {
        let rival = self.rival(row, want)?;
        Some(Asked {
            rival,
            lead: row[want as usize] - row[rival as usize],
            gain,
        })
    }

    /// STAR on `failures`, checked against `guards`.
    pub fn repair(&self, failures: &[Case], guards: &[Case]) -> Result<RepairOutcome> {
        self.repair_by(Method::Star, failures, guards)
    }

    /// Repairs with `method`. Every method gets the same failing cases, the same layers (chosen by
    /// occlusion), the same verdict and the same clock, so they compare fairly.
    pub fn repair_by(
        &self,
        method: Method,
        failures: &[Case],
        guards: &[Case],
    ) -> Result<RepairOutcome> {
        let t0 = Instant::now();
        let n_layers = self.model.layers().len();
        let first = self.first_candidate();
        let live = self.served(&[])?;

        // 1. The failing cases: those with a failure position under teacher forcing, found by a whole
        // pass of the serving layers (no gradient flows through it), unless they were checked under
        // the live overlay while they waited (`warm`).
        let mut failed = Vec::new();
        let mut cases = Vec::new();
        let mut failing = Vec::new();
        let mut scored_all = Vec::new();
        let mut tails = Vec::new();
        let mut checks = Vec::new();
        let (mut breadth, mut rows): (PerLayer<Tensor>, usize) = (BTreeMap::new(), 0);
        let mut typical: PerLayer<Vec<Tensor>> = BTreeMap::new();
        for c in failures {
            self.checkpoint()?;
            let checked = self.check(c, first, &live)?;
            if checked.failing.is_empty() {
                continue;
            }
            for (l, fires) in &checked.fires {
                let fires = match breadth.remove(l) {
                    Some(t) => (t + fires)?,
                    None => fires.clone(),
                };
                breadth.insert(*l, fires);
            }
            for (l, t) in &checked.typical {
                typical.entry(*l).or_default().push(t.clone());
            }
            rows += checked.prepared.residual.dim(0)?;
            failing.push(checked.failing.clone());
            scored_all.push(checked.scored.clone());
            tails.push(checked.tail.clone());
            cases.push(checked.prepared.clone());
            checks.push(checked);
            failed.push(c.id.clone());
        }
        let mut outcome = RepairOutcome {
            patches: Vec::new(),
            failures: failed.len(),
            fixed: 0,
            fixed_ids: Vec::new(),
            guard_before: 1.0,
            guard_after: 1.0,
            layers: Vec::new(),
            neurons_per_layer: 0,
            steps: 0,
            solves: 0,
            seconds: 0.0,
            refused: None,
        };
        if cases.is_empty() {
            outcome.seconds = t0.elapsed().as_secs_f64();
            return Ok(outcome);
        }
        let mut guard_runs = Vec::with_capacity(guards.len());
        for g in guards {
            self.checkpoint()?;
            guard_runs.push(self.check(g, first, &live)?);
        }

        // 2. Where: layers by occlusion, shared by every method.
        let batch = Batch {
            first,
            dense: self.model.dense_layers(first..n_layers, self.live)?,
            beside_dense: live.gated_only(),
            cases,
            failing,
            scored: scored_all,
            tails: RefCell::new(tails),
            checks,
            breadth,
            rows,
            typical: typical
                .into_iter()
                .map(|(l, t)| Ok((l, Tensor::cat(&t, 0)?)))
                .collect::<Result<_>>()?,
        };
        let t_scored = t0.elapsed().as_secs_f64();
        let (layers, found) = self.locate_layers(&batch)?;
        outcome.layers = layers;
        let t_located = t0.elapsed().as_secs_f64();
        let patches = match method {
            Method::Star => self.star_patches(&batch, found, &guard_runs, &mut outcome)?,
            Method::Sgd => super::baselines::sgd(self, &batch, &mut outcome)?,
            Method::Mint => super::baselines::mint(self, &batch, &mut outcome)?.into(),
        };
        let t_patched = t0.elapsed().as_secs_f64();
        self.verdict(patches, &batch, &failed, &guard_runs, &mut outcome)?;
        tracing::debug!(
            ?method,
            scored = t_scored,
            located = t_located - t_scored,
            patched = t_patched - t_located,
            verdict = t0.elapsed().as_secs_f64() - t_patched,
            steps = outcome.steps,
            solves = outcome.solves,
            "repair phases, seconds"
        );
        outcome.seconds = t0.elapsed().as_secs_f64();
        Ok(outcome)
    }

    /// STAR's steps 2–4 on a batch: neurons by attribution, the steers, the analytical patch off the
    /// guard span, and the guided updates.
    fn star_patches(
        &self,
        batch: &Batch,
        found: Option<Attribution>,
        guards: &[Arc<Checked>],
        outcome: &mut RepairOutcome,
    ) -> Result<Patched> {
        let Batch {
            cases,
            failing,
            scored,
            ..
        } = batch;
        let layers = outcome.layers.clone();
        let found = match found {
            Some(mut f) => {
                f.failing.retain(|l, _| layers.contains(l));
                f.scores.retain(|l, _| layers.contains(l));
                f
            }
            None => {
                let all: Vec<usize> = (0..cases.len()).collect();
                self.attribution(batch, &all, &layers)?
            }
        };
        let values = self.settings.patch == PatchKind::Values;
        self.settings.check().map_err(candle_core::Error::Msg)?;
        let Selection {
            mut columns,
            z,
            whole,
        } = self.select_neurons(batch, found)?;
        if values {
            columns.values_mut().for_each(Vec::clear);
        }
        outcome.neurons_per_layer = columns.values().next().map_or(0, Vec::len);

        let steers = self.steers(scored, cases, failing, layers.len())?;
        // The guard activations on the selected neurons: patches and every update stay off their span.
        let mut guard_span: BTreeMap<usize, Tensor> = BTreeMap::new();
        let mut typical: PerLayer<Vec<Tensor>> = batch
            .typical
            .iter()
            .map(|(l, t)| (*l, vec![t.clone()]))
            .collect();
        for l in &layers {
            let idx = Tensor::new(columns[l].as_slice(), &Device::Cpu)?;
            let at: Vec<Tensor> = guards.iter().map(|g| g.at_target[l].clone()).collect();
            if self.settings.guard_projection && !values && !at.is_empty() {
                guard_span.insert(*l, Tensor::cat(&at, 0)?.index_select(&idx, 1)?);
            }
            let t = typical.entry(*l).or_default();
            t.extend(guards.iter().filter_map(|g| g.typical.get(l).cloned()));
        }
        let mut gates: BTreeMap<usize, Gate> = BTreeMap::new();
        for &l in &layers {
            let gate = match self.settings.keys {
                _ if self.settings.gate <= 0.0 => continue,
                Keys::Columns => Gate::on_columns(&z[&l], self.settings.gate)?,
                Keys::Layer => {
                    let mut ordinary = typical.get(&l).cloned().unwrap_or_default();
                    ordinary.extend(guards.iter().map(|g| g.at_target[&l].clone()));
                    let ordinary = match ordinary.is_empty() {
                        true => Tensor::zeros((0, whole[&l].dim(1)?), DType::F32, &Device::Cpu)?,
                        false => Tensor::cat(&ordinary, 0)?,
                    };
                    let (gap, ceiling) = (self.settings.gate_gap, self.settings.gate);
                    super::keys::on_layer(&whole[&l], &ordinary, gap, ceiling)?
                }
            };
            gates.insert(l, gate);
        }
        let off_guards = |l: usize, p: Tensor| match guard_span.get(&l) {
            Some(g) => project_off(&p, g),
            None => Ok(p),
        };
        // With `preserve`, each layer's solve runs in coordinates where the typical activations'
        // covariance is the identity: the patch that reaches the steers while moving typical rows least.
        let mut whiten: BTreeMap<usize, Tensor> = BTreeMap::new();
        if self.settings.preserve > 0.0 && !values {
            for l in &layers {
                if let Some(t) = typical.get(l).filter(|t| !t.is_empty()) {
                    let idx = Tensor::new(columns[l].as_slice(), &Device::Cpu)?;
                    let t = Tensor::cat(t, 0)?.index_select(&idx, 1)?;
                    whiten.insert(*l, whitening(&t, self.settings.preserve)?);
                }
            }
        }
        let solve = |l: usize, z: &Tensor, s: &Tensor| match whiten.get(&l) {
            Some(w) => {
                let wt = w.t()?;
                let p = solve_patch(&z.matmul(&wt)?, s)?;
                let p = match guard_span.get(&l) {
                    Some(g) => project_off(&p, &g.matmul(&wt)?)?,
                    None => p,
                };
                p.matmul(w)
            }
            None => off_guards(l, solve_patch(z, s)?),
        };
        let mut priors = BTreeMap::new();
        let mut keyed = BTreeMap::new();
        for &l in &layers {
            let prior = match values {
                // Each failure position's key asks for its own steer.
                true => steers.t()?.contiguous()?,
                false => solve(l, &z[&l], &steers)?,
            };
            priors.insert(l, prior);
            keyed.insert(l, sites_of(failing));
        }
        outcome.solves = 1;
        let mut sites = Sites {
            columns: &columns,
            gates,
            keyed,
        };
        if let Some(verified) = self.resolve(batch, &mut sites, &mut priors, outcome, &solve)? {
            // Every failure position is right over the whole cases: none is left to step on.
            return Ok(Patched {
                patches: sites.patches(priors)?,
                verified: Some(verified),
            });
        }

        // Guided optimization from the analytical patch, until every failure position is fixed.
        let deltas: BTreeMap<usize, Var> = priors
            .iter()
            .map(|(l, p)| Ok((*l, Var::from_tensor(p)?)))
            .collect::<Result<_>>()?;
        self.optimize(batch, &sites, &deltas, true, outcome, |l, d, g| {
            let update = (priors[&l].abs()? * g.sign()?)?.affine(self.settings.step as f64, 0.0)?;
            d.set(&(d.as_tensor() - off_guards(l, update)?)?)
        })
    }

    /// The analytical step again, up to `solves` times in all, on what is not settled yet: the cases
    /// run forward under the patches so far (no gradients), and each patch gains the solve for the
    /// steers of the unsettled positions, at their current activations. Forward passes only (of the
    /// serving layers), where a guided step pays a backward as well. When a whole pass finds
    /// everything settled, or everything right once the solves are spent, returns which cases it
    /// found right; `None` leaves the rest to the guided steps.
    fn resolve(
        &self,
        batch: &Batch,
        sites: &mut Sites,
        patches: &mut BTreeMap<usize, Tensor>,
        outcome: &mut RepairOutcome,
        solve: &dyn Fn(usize, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Option<Vec<bool>>> {
        let layers: Vec<usize> = patches.keys().copied().collect();
        let lo = layers.iter().copied().min().unwrap_or(batch.first);
        let cols: BTreeMap<usize, Tensor> = layers
            .iter()
            .map(|&l| Ok((l, Tensor::new(sites.columns[&l].as_slice(), &Device::Cpu)?)))
            .collect::<Result<_>>()?;
        // What each position solved last asked for: gains are learnt from how much of it came through.
        let mut asked: BTreeMap<(usize, usize), Asked> = BTreeMap::new();
        for (i, (case, positions)) in batch.cases.iter().zip(&batch.failing).enumerate() {
            let rows = self.decisions(&case.tf, &batch.scored[i].logits)?;
            for &p in positions {
                if let Some(a) = self.asked(&rows[p], case.tf.target[p], 1.0) {
                    asked.insert((i, p), a);
                }
            }
        }
        let all: Vec<usize> = (0..batch.cases.len()).collect();
        let offsets = batch.offsets(&all)?;
        // The last whole pass's scorings, while the patches are as it ran them.
        let mut whole: Option<Vec<Scored>> = None;
        loop {
            self.checkpoint()?;
            let current = sites.patches(patches.iter().map(|(l, p)| (*l, p.clone())))?;
            let set = self.served(&current)?;
            let (mut open, mut gains, mut wrong) = (Vec::new(), Vec::new(), 0);
            // The unsettled rows' activations: on the patched columns for the solve, whole for
            // gates keyed on the layer.
            let mut z: BTreeMap<usize, Vec<Tensor>> = BTreeMap::new();
            let mut keys_at: BTreeMap<usize, Vec<Tensor>> = BTreeMap::new();
            let mut capture = Capture::layers(layers.iter().copied());
            let scored = batch.score_from(
                self,
                Upper::Serving,
                lo,
                &all,
                &mut Hooks {
                    patches: Some(&set),
                    capture: Some(&mut capture),
                    ..Hooks::default()
                },
            )?;
            for (i, (case, s)) in batch.cases.iter().zip(&scored).enumerate() {
                let rows = self.decisions(&case.tf, &s.logits)?;
                wrong += self.wrong_at(&case.tf, &rows).len();
                let positions = self.unsettled(case, &rows);
                for &p in &positions {
                    let (row, want) = (&rows[p], case.tf.target[p]);
                    let gain = asked
                        .get(&(i, p))
                        .map_or(1.0, |a| a.next_gain(row, want, self.settings.margin));
                    gains.push(gain);
                    match self.asked(row, want, gain) {
                        Some(a) => asked.insert((i, p), a),
                        None => asked.remove(&(i, p)),
                    };
                }
                if !positions.is_empty() {
                    // In a case's tail, target position `p` is row `p`.
                    let rows: Vec<u32> =
                        positions.iter().map(|&p| (offsets[i] + p) as u32).collect();
                    let rows = Tensor::new(rows.as_slice(), &Device::Cpu)?;
                    for &l in &layers {
                        let at = capture.neurons[&l].index_select(&rows, 0)?;
                        z.entry(l).or_default().push(at.index_select(&cols[&l], 1)?);
                        keys_at.entry(l).or_default().push(at);
                    }
                }
                open.push(positions);
            }
            let unsettled: usize = open.iter().map(Vec::len).sum();
            tracing::debug!(solves = outcome.solves, unsettled, wrong, "re-solve");
            let out_of_solves = outcome.solves >= self.settings.solves;
            // Settled, or out of solves with every position right (the guided steps would stop at
            // once): check the cases whole.
            if unsettled == 0 || (out_of_solves && wrong == 0) {
                if let Some(w) = &whole {
                    return Ok(Some(batch.right(self, w)?));
                }
                let w = batch.refresh(self, &current)?;
                if out_of_solves {
                    let right = batch.right(self, &w)?;
                    return Ok(right.iter().all(|&r| r).then_some(right));
                }
                let mut settled = true;
                for (s, case) in w.iter().zip(&batch.cases) {
                    let rows = self.decisions(&case.tf, &s.logits)?;
                    settled &= self.unsettled(case, &rows).is_empty();
                }
                if settled {
                    return Ok(Some(batch.right(self, &w)?));
                }
                whole = Some(w);
                continue;
            }
            if out_of_solves {
                return Ok(None);
            }
            let gains = Tensor::new(gains.as_slice(), &Device::Cpu)?.unsqueeze(1)?;
            let steers = self
                .steers(&scored, &batch.cases, &open, layers.len())?
                .broadcast_mul(&gains)?;
            let at = sites_of(&open);
            for &l in &layers {
                let rows = (&Tensor::cat(&z[&l], 0)?, &Tensor::cat(&keys_at[&l], 0)?);
                let grown = sites.grow(l, &patches[&l], &at, rows, &steers, solve)?;
                patches.insert(l, grown);
            }
            outcome.solves += 1;
            whole = None;
        }
    }

    /// Steps `deltas` (one per layer, at `sites`) with `update` for `max_steps` steps, or with
    /// `stop_when_fixed` until every failure position of the batch is right; returns the patches.
    pub(super) fn optimize(
        &self,
        batch: &Batch,
        sites: &Sites,
        deltas: &BTreeMap<usize, Var>,
        stop_when_fixed: bool,
        outcome: &mut RepairOutcome,
        mut update: impl FnMut(usize, &Var, &Tensor) -> Result<()>,
    ) -> Result<Patched> {
        let patches = |detach: bool| -> Result<Vec<(usize, LayerPatch)>> {
            let tensors = deltas.iter().map(|(l, d)| {
                let t = d.as_tensor();
                (*l, if detach { t.detach() } else { t.clone() })
            });
            sites.patches(tensors)
        };
        let lo = deltas.keys().copied().min().unwrap_or(batch.first);
        let all: Vec<usize> = (0..batch.cases.len()).collect();
        // Which cases the last whole pass found right, while the patches are as it ran them.
        let mut verified = None;
        outcome.steps = self.settings.max_steps;
        for step in 0..self.settings.max_steps {
            self.checkpoint()?;
            let set = super::overlay_on(batch.beside_dense.clone(), &patches(false)?)?;
            // Every case's tail in one pass; its graph is only walked back when a case is wrong.
            let scored = batch.score_from(
                self,
                Upper::Dense,
                lo,
                &all,
                &mut Hooks {
                    patches: Some(&set),
                    ..Hooks::default()
                },
            )?;
            let mut wrong_cases = 0;
            let mut trained = Vec::with_capacity(scored.len());
            for (s, case) in scored.iter().zip(&batch.cases) {
                let wrong = self.failure_positions(case, &s.logits)?;
                trained.push(match (self.settings.mode, wrong.first()) {
                    // Every case trains, the right ones to stay right.
                    (Mode::Batch, _) => s.all(),
                    // Left to right: the first wrong token, and the ones before it so they stay right.
                    (Mode::Iterative, Some(&f)) => (0..=f).collect(),
                    (Mode::Iterative, None) => Vec::new(),
                });
                wrong_cases += usize::from(!wrong.is_empty());
            }
            if stop_when_fixed && wrong_cases == 0 {
                outcome.steps = step;
                if verified.is_some() {
                    break;
                }
                // Right over tails run without this patch: run them whole under it, and look again.
                let right = batch.right(self, &batch.refresh(self, &patches(true)?)?)?;
                let done = right.iter().all(|&r| r);
                verified = Some(right);
                if done {
                    break;
                }
                continue;
            }
            let parts: Vec<_> = scored
                .iter()
                .zip(&trained)
                .map(|(s, at)| (s, at.as_slice()))
                .collect();
            let grads = Scored::loss(&parts, &self.head.weight)?.backward()?;
            for (l, d) in deltas {
                if let Some(g) = grads.get(d.as_tensor()) {
                    update(*l, d, g)?;
                }
            }
            verified = None;
        }
        Ok(Patched {
            patches: patches(true)?,
            verified,
        })
    }

    /// Step 5, the same for every method: on the serving model with the patches, the failures whose
    /// every target position is now right and the guard pass rate before and after; a patch that fixes
    /// nothing or lowers the guard is refused (and not returned).
    fn verdict(
        &self,
        patched: Patched,
        batch: &Batch,
        failed: &[String],
        guards: &[Arc<Checked>],
        outcome: &mut RepairOutcome,
    ) -> Result<()> {
        let Patched { patches, verified } = patched;
        let set = self.served(&patches)?;
        // The guards, and the failures unless the last whole pass was under these very patches.
        let mut checks: Vec<&Checked> = guards.iter().map(|g| &**g).collect();
        if verified.is_none() {
            checks.extend(batch.checks.iter().map(|c| &**c));
        }
        let says = self.say_targets(batch, &checks, &patches, &set)?;
        let (guard_says, case_says) = says.split_at(guards.len());
        let right = verified.unwrap_or_else(|| case_says.to_vec());
        for (id, right) in failed.iter().zip(right) {
            if right {
                outcome.fixed += 1;
                outcome.fixed_ids.push(id.clone());
            }
        }
        if !guards.is_empty() {
            let kept = guard_says.iter().filter(|&&s| s).count();
            let before = guards.iter().filter(|g| g.failing.is_empty()).count();
            outcome.guard_before = before as f32 / guards.len() as f32;
            outcome.guard_after = kept as f32 / guards.len() as f32;
        }
        if outcome.guard_after + self.settings.max_guard_drop < outcome.guard_before {
            outcome.refused = Some(format!(
                "the patch lowers the guard pass rate from {:.2} to {:.2}",
                outcome.guard_before, outcome.guard_after
            ));
        } else if outcome.fixed == 0 {
            outcome.refused = Some("the patch fixes none of the failures".into());
        } else {
            outcome.patches = patches;
        }
        Ok(())
    }
}

/// `R (A Aᵀ)⁻¹` for `A` `(n, k)` and the rows of `R` `(m, n)`: the ridge-regularized solve both the patch
/// and the guard projection need, one row at a time through one Cholesky factor.
fn solve_gram(a: &Tensor, r: &Tensor) -> Result<Tensor> {
    let (n, k) = a.dims2()?;
    let gram = linalg::gram_rows(&a.flatten_all()?.to_vec1()?, n, k);
    let chol = linalg::Cholesky::new(&gram, n, 1e-6);
    let rows: Vec<Vec<f32>> = r.contiguous()?.to_vec2()?;
    let solved: Vec<f32> = rows
        .iter()
        .flat_map(|row| {
            let row: Vec<f64> = row.iter().map(|v| *v as f64).collect();
            chol.solve(&row).into_iter().map(|v| v as f32)
        })
        .collect();
    Tensor::from_vec(solved, (rows.len(), n), &Device::Cpu)
}

/// `L⁻¹` `(k, k)` for the metric `C = (1 − ρ)·Tᵀ T / mean + ρ·I`, `T` `(rows, k)` typical activations
/// scaled to a mean diagonal of 1, `ρ = 1 − preserve`: the least-norm patch in coordinates `z L⁻ᵀ`,
/// mapped back by `L⁻¹`, is the patch `P` with least `tr(P C Pᵀ)`, the energy it adds at typical rows
/// (the covariance-weighted update of ROME and MEMIT), shrunk toward the plain least norm.
pub fn whitening(typical: &Tensor, preserve: f32) -> Result<Tensor> {
    let k = typical.dim(1)?;
    let gram: Vec<f64> = typical
        .t()?
        .matmul(typical)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect();
    let mean = (0..k).map(|i| gram[i * k + i]).sum::<f64>() / k.max(1) as f64;
    let keep = f64::from(preserve.clamp(0.0, 0.999));
    let scale = keep / mean.max(f64::MIN_POSITIVE);
    let mut c: Vec<f64> = gram.iter().map(|g| g * scale).collect();
    for i in 0..k {
        c[i * k + i] += 1.0 - keep;
    }
    let inv = linalg::Cholesky::new(&c, k, 0.0).inverse_factor();
    Tensor::from_vec(
        inv.into_iter().map(|v| v as f32).collect::<Vec<_>>(),
        (k, k),
        &Device::Cpu,
    )
}

/// STAR's analytical patch: the least-norm `P` `(hidden, k)` with `P zᵢ = sᵢ` at every failure position,
/// `P = (Z⁺ S)ᵀ = Sᵀ (Z Zᵀ)⁻¹ Z` for `Z` `(N, k)` and `S` `(N, hidden)`.
pub fn solve_patch(z: &Tensor, s: &Tensor) -> Result<Tensor> {
    solve_gram(z, &s.t()?)?.matmul(z)
}

/// `P (I − Gᵀ (G Gᵀ)⁻¹ G)`: the patch with its action on the guard activations `G` `(positions, k)`
/// removed, so the guard positions' MLP outputs stay as they were (METHOD.md, "beyond the paper").
pub fn project_off(p: &Tensor, g: &Tensor) -> Result<Tensor> {
    p - solve_gram(g, &p.matmul(&g.t()?)?)?.matmul(g)?
}
