//! The cases a repair starts from: each checked once under the live overlay, its tail kept for
//! tail-only passes, and the batch every method works on.

use super::score::Scored;
use super::{PerLayer, Star};
use crate::model::memory::sketch;
use crate::model::{Capture, DecoderLayer, Hooks, LayerKv, LayerPatch, Outline, PatchSet};
use crate::repair::targets::{teacher_forced, Case, TeacherForced};
use crate::repair::Keys;
use candle_core::{Device, Result, Tensor};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;

/// What every method starts from: the failing cases after the frozen lower layers, and dense copies of
/// the upper ones.
pub(in crate::repair) struct Batch {
    pub first: usize,
    /// The failing cases' ids.
    pub ids: Vec<String>,
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
    pub(super) tails: RefCell<Vec<Tail>>,
    /// Per case, its check before the repair: its unpatched tail and prompt activations.
    pub(super) checks: Vec<Arc<Checked>>,
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
pub(super) struct Tail {
    pub(super) inputs: Vec<Tensor>,
    pub(super) prompt: Vec<LayerKv>,
}

impl Tail {
    /// Splits a whole pass over `case` (its capture of every candidate layer's input, and the keys and
    /// values it left) at the tail.
    ///
    /// The pass ran rows `from..` (at most the tail's first): its keys and values hold every row.
    pub(super) fn split(
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
    /// The batch of `checks`, the failing cases `ids` checked under `live` from layer `first` up: what every
    /// method starts from.
    fn of(
        star: &Star,
        first: usize,
        ids: Vec<String>,
        checks: Vec<Arc<Checked>>,
        live: &PatchSet,
    ) -> Result<Self> {
        let (mut breadth, mut rows): (PerLayer<Tensor>, usize) = (BTreeMap::new(), 0);
        let mut typical: PerLayer<Vec<Tensor>> = BTreeMap::new();
        for checked in &checks {
            for (l, blocks) in &checked.fires {
                // Over every row: the prompt's blocks and the target rows.
                let Some(at_target) = checked.at_target.get(l) else {
                    candle_core::bail!("a check without target rows on layer {l}");
                };
                let fires = (blocks.sum(0)? + at_target.abs()?.sum(0)?)?;
                let fires = match breadth.remove(l) {
                    Some(t) => (t + fires)?,
                    None => fires,
                };
                breadth.insert(*l, fires);
            }
            for (l, t) in &checked.typical {
                typical.entry(*l).or_default().push(t.clone());
            }
            rows += checked.prepared.residual.dim(0)?;
        }
        Ok(Self {
            first,
            ids,
            dense: star
                .model
                .dense_layers(first..star.model.layers().len(), star.live)?,
            beside_dense: live.gated_only(),
            cases: checks.iter().map(|c| c.prepared.clone()).collect(),
            failing: checks.iter().map(|c| c.failing.clone()).collect(),
            scored: checks.iter().map(|c| c.scored.clone()).collect(),
            tails: RefCell::new(checks.iter().map(|c| c.tail.clone()).collect()),
            checks,
            breadth,
            rows,
            typical: typical
                .into_iter()
                .map(|(l, t)| Ok((l, Tensor::cat(&t, 0)?)))
                .collect::<Result<_>>()?,
        })
    }

    /// Runs every case whole with `patches`: the tails' inputs and the prompt rows' keys and values
    /// then include the patch's effect on the prompt, which tail-only passes leave out. Called when
    /// those passes find the batch done, so that "done" holds for the whole cases. No gradient flows
    /// through a whole pass, so it runs the serving layers, not the dense copies (a third the time).
    /// Returns each case's scoring by that pass: the serving model's own, as the verdict would make it.
    ///
    /// Each case runs from the first row the patches may change (`Star::first_change`).
    pub(in crate::repair) fn refresh(
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
    pub(in crate::repair) fn right(&self, star: &Star, scored: &[Scored]) -> Result<Vec<bool>> {
        self.cases
            .iter()
            .zip(scored)
            .map(|(case, s)| Ok(star.failure_positions(case, &s.logits)?.is_empty()))
            .collect()
    }

    /// Rows a tail-only pass over case `i` runs.
    pub(in crate::repair) fn tail_rows(&self, i: usize) -> Result<usize> {
        self.tails.borrow()[i].inputs[0].dim(0)
    }

    /// Scores the tails of cases `which` in one packed pass of the `upper` layers from `lo` up (their
    /// rows one after another, `tail_rows` each, in a capture): nothing below is patched, so the
    /// residual entering `lo` is the one captured at the start. The serving layers want the live
    /// overlay in `hooks.patches` (`Star::served`); the dense copies hold its summed patches and want
    /// the rest, `beside_dense`, there.
    pub(in crate::repair) fn score_from(
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
    pub(in crate::repair) fn offsets(&self, which: &[usize]) -> Result<Vec<usize>> {
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
pub(in crate::repair) enum Upper {
    Serving,
    Dense,
}

/// A method's patches and, when its last whole pass ran under exactly them (`Batch::refresh`), which
/// cases that pass found right: the verdict's own check on the cases, already made.
pub(in crate::repair) struct Patched {
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

/// A case checked on the serving model under the live overlay, before any repair: a pass of the
/// candidate layers (whole, or from where the last check's overlay and this one part), and what a
/// repair takes from it, as a failure (its failure positions, scoring, tail, how broadly each neuron
/// fired) or as a guard (the neuron activations at its target rows, for the guard projection). Both
/// take its activations at sampled prompt rows, for `preserve`.
#[derive(Debug)]
pub(in crate::repair) struct Checked {
    pub(in crate::repair) prepared: Prepared,
    pub(in crate::repair) failing: Vec<usize>,
    pub(super) scored: Scored,
    pub(super) tail: Tail,
    /// `Σ |z|` per candidate layer over each `FIRES_BLOCK` rows before the tail `(blocks,
    /// intermediate)`: a check under another overlay that changes rows from some block on keeps
    /// the blocks before it.
    pub(super) fires: PerLayer<Tensor>,
    /// `z` per candidate layer `(target rows, intermediate)`.
    pub(in crate::repair) at_target: PerLayer<Tensor>,
    pub(super) typical: PerLayer<Tensor>,
    /// `z` per candidate layer at the rows before the tail in the key space (`memory::sketch`)
    /// `(rows, KEY_WIDTH)`: where a gate keyed on the layer opens there (`Checked::reach`).
    pub(super) keys: PerLayer<Tensor>,
    /// The residual between attention and MLP per candidate layer at the rows before the tail
    /// `(rows, hidden)`, when gates keyed on columns are solved (`RepairSettings::keys`): where
    /// such a gate would open there (`Star::first_change`).
    pub(super) mid: PerLayer<Tensor>,
}

/// Where a gated patch may act at a checked case's rows before the tail.
pub(super) enum Reach {
    /// Nowhere: its gate stays shut at every one.
    Shut,
    /// From this row on.
    From(usize),
    /// The check's keys cannot tell: the patch has no gate, or one not keyed on the layer's sketch.
    Unknown,
}

/// Rows summed together in `Checked::fires`.
const FIRES_BLOCK: usize = 64;

/// `Σ |z|` over each `FIRES_BLOCK` rows of `z` `(rows, width)`, `(blocks, width)`.
fn block_sums(z: &Tensor) -> Result<Tensor> {
    let rows = z.dim(0)?;
    let blocks = (0..rows)
        .step_by(FIRES_BLOCK)
        .map(|r| {
            z.narrow(0, r, FIRES_BLOCK.min(rows - r))?
                .abs()?
                .sum_keepdim(0)
        })
        .collect::<Result<Vec<_>>>()?;
    match blocks.is_empty() {
        true => Tensor::zeros((0, z.dim(1)?), z.dtype(), z.device()),
        false => Tensor::cat(&blocks, 0),
    }
}

/// `before` then `after`, rows after rows.
fn joined(before: Option<Tensor>, after: Tensor) -> Result<Tensor> {
    match before {
        Some(b) if after.dim(0)? > 0 => Tensor::cat(&[&b, &after], 0),
        Some(b) => Ok(b),
        None => Ok(after),
    }
}

impl Checked {
    /// Where `patch` on `layer` may act at this case's rows before the tail, from the keys the check
    /// kept: the very activations the pass's gates scored.
    pub(super) fn reach(&self, layer: usize, patch: &LayerPatch) -> Result<Reach> {
        let (Some(gate), Some(keys)) = (patch.gate(), self.keys.get(&layer)) else {
            return Ok(Reach::Unknown);
        };
        if gate.center().is_none() || gate.keys().dim(1)? != keys.dim(1)? {
            return Ok(Reach::Unknown);
        }
        Ok(match gate.first_open(keys, KEYS_MARGIN)? {
            Some(r) => Reach::From(r),
            None => Reach::Shut,
        })
    }
}

/// What a check depends on besides the overlay: the case's tokens, the layers from `first` up, and
/// what it records (typical rows, `mid`).
#[derive(Debug, PartialEq, Eq)]
pub(in crate::repair) struct CheckKey {
    pub(super) first: usize,
    pub(super) typical: bool,
    pub(super) mid: bool,
    pub(super) tokens: Vec<u32>,
}

/// A case after the frozen lower layers.
#[derive(Debug, Clone)]
pub(in crate::repair) struct Prepared {
    pub(in crate::repair) tf: TeacherForced,
    /// The residual stream entering the first candidate layer `(seq, hidden)`.
    pub residual: Tensor,
}

/// How far below its threshold a gate's cosine, recomputed from a check's activations
/// (`DecoderLayer::neurons_on`), must stay to count as shut in the serving pass. The recomputation
/// rounds its input as the serving kernels do and agrees with them to about 1e-6; without that
/// rounding a cosine moved by up to 0.034 (tests/model_packaged.rs), which this margin still covers.
pub(in crate::repair) const GATE_MARGIN: f32 = 0.05;

/// The same for a gate scored on a check's own keys: the serving pass's codebook scores them by
/// another formula (`Codebook::open`), which agrees to rounding.
pub(super) const KEYS_MARGIN: f32 = 1e-3;

impl Star<'_> {
    /// STAR's step 1: the cases of `failures` with a failure position under teacher forcing, found
    /// by a pass of the serving layers under `live` (no gradient flows through it; `check`), unless
    /// they were checked under it while they waited (`warm`). `None` when none fails.
    pub(super) fn batch(&self, failures: &[Case], live: &PatchSet) -> Result<Option<Batch>> {
        let first = self.first_candidate();
        let (mut ids, mut checks) = (Vec::new(), Vec::new());
        for c in failures {
            self.checkpoint()?;
            let checked = self.check(c, first, live)?;
            if !checked.failing.is_empty() {
                ids.push(c.id.clone());
                checks.push(checked);
            }
        }
        match checks.is_empty() {
            true => Ok(None),
            false => Batch::of(self, first, ids, checks, live).map(Some),
        }
    }

    /// A case run once through the serving model's frozen lower layers (with the live overlay): its
    /// teacher-forced tokens and the residual entering layer `first` at each of them.
    pub(super) fn prepare(&self, tf: TeacherForced, first: usize) -> Result<Prepared> {
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

    /// The first row of `check`'s case that `patches` may change, up to the first of its tail: rows
    /// before the first one a gate opens at are unpatched at every layer (attention looks back
    /// only), so each gate is asked about the activations the check recorded there; an ungated patch
    /// changes every row.
    pub(super) fn first_change(
        &self,
        batch: &Batch,
        check: &Checked,
        patches: &[(usize, LayerPatch)],
    ) -> Result<usize> {
        let mut first = check.prepared.tf.row(0);
        for (l, p) in patches {
            let opens = match check.reach(*l, p)? {
                Reach::Shut => None,
                Reach::From(r) => Some(r),
                Reach::Unknown => {
                    let (Some(gate), Some(mid)) = (p.gate(), check.mid.get(l)) else {
                        return Ok(0);
                    };
                    let columns = match gate.center() {
                        Some(_) => None,
                        None => Some(Tensor::new(p.columns(), &Device::Cpu)?),
                    };
                    let z = batch.dense[l - batch.first].neurons_on(mid, columns.as_ref())?;
                    gate.first_open(&z, GATE_MARGIN)?
                }
            };
            first = first.min(opens.unwrap_or(first));
        }
        Ok(first)
    }

    /// `case` checked on the serving model under `live` (the live overlay): from `residuals` when it
    /// was checked under the same overlay already (while it waited, or as a guard of the last repair:
    /// one repair's guards are mostly the next one's), or from its check under an earlier overlay by
    /// a pass from the first row the overlays' gates part at (`recheck`).
    pub(super) fn check(&self, case: &Case, first: usize, live: &PatchSet) -> Result<Arc<Checked>> {
        let tf = teacher_forced(self.tokenizer, case, self.settings.context);
        let key = CheckKey {
            first,
            typical: self.samples_typical(),
            mid: self.records_mid(),
            tokens: tf.tokens.clone(),
        };
        let kept = self.residuals.and_then(|r| r.latest(&key));
        if let Some((was, c)) = &kept {
            if was.id() == live.id() {
                return Ok(c.clone());
            }
        }
        let rechecked = match &kept {
            Some((was, c)) => self.recheck(c, was, first, live)?,
            None => None,
        };
        let checked = match rechecked {
            Some(c) => c,
            None => Arc::new(self.check_from(self.prepare(tf, first)?, None, 0, first, live)?),
        };
        if let Some(r) = self.residuals {
            if self.settings.right_rows {
                r.keep_right(&checked)?;
            }
            r.keep_check(key, live, checked.clone());
        }
        Ok(checked)
    }

    /// `stale`, a check of the same case under the overlay `was` outlines, brought to `live` by a
    /// pass from the first row where a patch `live` added may open: before it the two passes agree,
    /// row by row and layer by layer. None: a whole pass is due.
    fn recheck(
        &self,
        stale: &Arc<Checked>,
        was: &Outline,
        first: usize,
        live: &PatchSet,
    ) -> Result<Option<Arc<Checked>>> {
        let Some(added) = live.added_since(was) else {
            return Ok(None);
        };
        if added.is_empty() {
            return Ok(Some(stale.clone()));
        }
        let tail = stale.prepared.tf.row(0);
        let mut from = tail;
        for (l, p) in &added {
            match stale.reach(*l, p)? {
                Reach::Shut => {}
                Reach::From(r) => from = from.min(r),
                Reach::Unknown => return Ok(None),
            }
        }
        // Where the kept sums of `|z|` can be taken up.
        if from < tail {
            from -= from % FIRES_BLOCK;
        }
        tracing::debug!(
            from,
            tail,
            "a check under the new overlay runs from row `from`"
        );
        match from {
            0 => Ok(None),
            _ => self
                .check_from(stale.prepared.clone(), Some(stale), from, first, live)
                .map(|c| Some(Arc::new(c))),
        }
    }

    /// A check by a pass of the layers from `first` up over the rows from `from` (0, or the tail's
    /// first row, or a multiple of `FIRES_BLOCK` before it), what comes before taken from `stale`, a
    /// check of the case whose pass agrees with this one there.
    fn check_from(
        &self,
        prepared: Prepared,
        stale: Option<&Checked>,
        from: usize,
        first: usize,
        live: &PatchSet,
    ) -> Result<Checked> {
        // This pass gives the activations STAR keeps its patch off: the serving layers' `z` differs
        // from the dense copies' by rounding only.
        let whole = Tail::default();
        let base = stale.map_or(&whole, |s| &s.tail);
        let (scored, tail, mut capture) = self.pass_from(&prepared, base, from, first, live)?;
        let failing = self.failure_positions(&prepared, &scored.logits)?;
        let (prompt_rows, targets) = (prepared.tf.row(0), prepared.tf.target.len());
        let here = prompt_rows - from;
        let sample: Vec<u32> = match self.typical_rows(&prepared)? {
            Some(idx) => idx.to_vec1()?,
            None => Vec::new(),
        };
        let (kept_sample, new_sample) =
            sample.split_at(sample.partition_point(|&r| (r as usize) < from));
        let new_sample: Vec<u32> = new_sample.iter().map(|&r| r - from as u32).collect();
        let new_sample = Tensor::new(new_sample.as_slice(), &Device::Cpu)?;
        let mut mid = std::mem::take(&mut capture.mid);
        let mut checked = Checked {
            prepared,
            failing,
            scored,
            tail,
            fires: BTreeMap::new(),
            at_target: BTreeMap::new(),
            typical: BTreeMap::new(),
            keys: BTreeMap::new(),
            mid: BTreeMap::new(),
        };
        for (l, z) in capture.neurons {
            // A field's rows kept from `stale`.
            let before = |field: fn(&Checked) -> &PerLayer<Tensor>, rows: usize| match stale
                .and_then(|s| field(s).get(&l))
            {
                Some(t) if rows > 0 => t.narrow(0, 0, rows).map(Some),
                _ => Ok(None),
            };
            let prompt = z.narrow(0, 0, here)?;
            checked.at_target.insert(l, z.narrow(0, here, targets)?);
            let blocks = block_sums(&prompt)?;
            let kept = before(|s| &s.fires, from.div_ceil(FIRES_BLOCK))?;
            checked.fires.insert(l, joined(kept, blocks)?);
            let kept = before(|s| &s.keys, from)?;
            checked.keys.insert(l, joined(kept, sketch(&prompt)?)?);
            if !sample.is_empty() {
                let kept = before(|s| &s.typical, kept_sample.len())?;
                let typical = match new_sample.dim(0)? {
                    0 => kept.ok_or_else(|| candle_core::Error::Msg("no typical rows".into()))?,
                    _ => joined(kept, z.index_select(&new_sample, 0)?)?,
                };
                checked.typical.insert(l, typical);
            }
            if let Some(m) = mid.remove(&l) {
                let kept = before(|s| &s.mid, from)?;
                checked.mid.insert(l, joined(kept, m.narrow(0, 0, here)?)?);
            }
        }
        Ok(checked)
    }

    /// A pass of the serving layers from `first` up over `case`'s rows from `from` on under `set`,
    /// the keys and values of the rows before taken from `base` (an earlier pass's tail, which `set`
    /// must leave as they are there): its scoring, its tail split off for later tail-only passes, and
    /// those layers' activations at the rows it ran. From 0, a whole pass.
    pub(super) fn pass_from(
        &self,
        case: &Prepared,
        base: &Tail,
        from: usize,
        first: usize,
        set: &PatchSet,
    ) -> Result<(Scored, Tail, Capture)> {
        let n_layers = self.model.layers().len();
        let mut capture = Capture::layers(first..n_layers);
        if self.records_mid() {
            capture = capture.with_mid();
        }
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

    /// Whether checks record `Checked::mid`: for the gates keyed on columns these settings solve.
    fn records_mid(&self) -> bool {
        self.settings.keys == Keys::Columns && self.settings.gate > 0.0
    }

    /// Whether checks sample typical rows: for `preserve`, and for gates keyed on the layer (their
    /// centre and threshold).
    pub(super) fn samples_typical(&self) -> bool {
        self.settings.preserve > 0.0
            || (self.settings.gate > 0.0 && self.settings.keys == Keys::Layer)
    }

    /// The prompt rows of `case` sampled for `preserve` and layer keys (`Batch::typical`,
    /// `Checked::typical`): up to 64, evenly over the rows before the tail but the first; `None` when
    /// neither wants them or there are none. The first row is the attention sink: in the top layers its `|z|²` is 30–110 times a
    /// typical row's, so it would make the metric a rank-one guard of itself.
    pub(super) fn typical_rows(&self, case: &Prepared) -> Result<Option<Tensor>> {
        const ROWS: usize = 64;
        let tail = case.tf.row(0);
        let n = tail.saturating_sub(1).min(ROWS);
        if !self.samples_typical() || n == 0 {
            return Ok(None);
        }
        let rows: Vec<u32> = (0..n).map(|i| (1 + i * (tail - 1) / n) as u32).collect();
        Tensor::new(rows.as_slice(), &Device::Cpu).map(Some)
    }
}
