//! The analytical patch: steers solved through the selected neurons (`P = (Z⁺S)ᵀ`), off the guards'
//! span, and the re-solves for what is not settled yet.

use super::batch::{Batch, Checked, Patched, Prepared, Upper};
use super::locate::{Attribution, Selection};
use super::score::{Asked, Scored};
use super::{PerLayer, RepairOutcome, Star};
use crate::model::{Capture, Gate, Hooks, LayerPatch, PatchSet};
use crate::repair::keys::{Fit, Leave};
use crate::repair::{linalg, Keys, PatchKind};
use candle_core::{DType, Device, Result, Tensor, Var};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Where a repair's patches act: per layer, the neurons patched and the gate they act behind (none
/// for an ungated patch). No columns: the patch holds a value per key, and `keyed` says per layer
/// which failure position (case, target position) each key was taken at.
pub(in crate::repair) struct Sites<'a> {
    pub columns: &'a BTreeMap<usize, Vec<u32>>,
    pub gates: BTreeMap<usize, Gate>,
    pub keyed: PerLayer<Vec<(usize, usize)>>,
    /// Gates keyed on the layer: how their thresholds are set, and per layer the rows they must
    /// leave alone (keys added by a re-solve get thresholds the same way).
    pub fit: Option<Fitted>,
}

/// How gates keyed on the layer were fit, and per layer what they must leave alone.
pub(in crate::repair) type Fitted = (Fit, PerLayer<Leave>);

impl Sites<'_> {
    /// Per layer, a delta on that layer's columns (or values) as a patch, behind the layer's gate if
    /// it has one.
    pub(super) fn patches(
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
    pub(super) fn grow(
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
        let refit = |g: Gate| match &self.fit {
            Some((fit, leave)) if g.center().is_some() => fit.fit(g, &leave[&l]),
            _ => Ok(g),
        };
        if !self.columns[&l].is_empty() {
            *gate = refit(gate.with_keys(if gate.center().is_some() { whole } else { z })?)?;
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
            *gate = refit(gate.with_keys(&rows(&new_rows, whole)?)?)?;
            patch = Tensor::cat(&[&patch, &rows(&new_rows, steers)?.t()?], 1)?.contiguous()?;
        }
        Ok(patch)
    }
}

/// What a pass under the patches so far left unsettled (`Star::unsettled_rows`).
struct Unsettled {
    scored: Vec<Scored>,
    /// Per case, its unsettled positions.
    open: Vec<Vec<usize>>,
    /// Per unsettled position, the gain of its next steer.
    gains: Vec<f32>,
    /// Failure positions still wrong, over every case.
    wrong: usize,
    /// The unsettled rows' activations per patched layer: on the patched columns for the solve,
    /// whole for gates keyed on the layer.
    z: PerLayer<Vec<Tensor>>,
    keys_at: PerLayer<Vec<Tensor>>,
}

/// Per patched layer, how a steer becomes a patch: solved off the guards' span (`guard_projection`)
/// and, with `preserve`, in coordinates where the typical activations' covariance is the identity
/// (the patch that reaches the steers while moving typical rows least).
struct Solver {
    /// The guard activations on the selected neurons: patches and every update stay off their span.
    guard_span: PerLayer<Tensor>,
    whiten: PerLayer<Tensor>,
}

impl Solver {
    fn new(
        star: &Star,
        layers: &[usize],
        columns: &PerLayer<Vec<u32>>,
        typical: &PerLayer<Vec<Tensor>>,
        guards: &[Arc<Checked>],
        values: bool,
    ) -> Result<Self> {
        let settings = &star.settings;
        let (mut guard_span, mut whiten) = (BTreeMap::new(), BTreeMap::new());
        for l in layers {
            let idx = Tensor::new(columns[l].as_slice(), &Device::Cpu)?;
            let at: Vec<Tensor> = guards.iter().map(|g| g.at_target[l].clone()).collect();
            if settings.guard_projection && !values && !at.is_empty() {
                guard_span.insert(*l, Tensor::cat(&at, 0)?.index_select(&idx, 1)?);
            }
            if let Some(t) = typical
                .get(l)
                .filter(|t| settings.preserve > 0.0 && !values && !t.is_empty())
            {
                let t = Tensor::cat(t, 0)?.index_select(&idx, 1)?;
                whiten.insert(*l, whitening(&t, settings.preserve)?);
            }
        }
        Ok(Self { guard_span, whiten })
    }

    /// Layer `l`'s patch for steers `s` `(positions, hidden)` at activations `z` `(positions, k)`.
    fn solve(&self, l: usize, z: &Tensor, s: &Tensor) -> Result<Tensor> {
        match self.whiten.get(&l) {
            Some(w) => {
                let wt = w.t()?;
                let p = solve_patch(&z.matmul(&wt)?, s)?;
                let p = match self.guard_span.get(&l) {
                    Some(g) => project_off(&p, &g.matmul(&wt)?)?,
                    None => p,
                };
                p.matmul(w)
            }
            None => self.off_guards(l, solve_patch(z, s)?),
        }
    }

    /// `p` with its action on layer `l`'s guard activations removed.
    fn off_guards(&self, l: usize, p: Tensor) -> Result<Tensor> {
        match self.guard_span.get(&l) {
            Some(g) => project_off(&p, g),
            None => Ok(p),
        }
    }
}

/// Per layer, the rows a patch should leave alone: the cases' sampled prompt rows, and at the
/// patched `layers` the guards' too.
fn typical_rows(batch: &Batch, guards: &[Arc<Checked>], layers: &[usize]) -> PerLayer<Vec<Tensor>> {
    let mut typical: PerLayer<Vec<Tensor>> = batch
        .typical
        .iter()
        .map(|(l, t)| (*l, vec![t.clone()]))
        .collect();
    for l in layers {
        let t = typical.entry(*l).or_default();
        t.extend(guards.iter().filter_map(|g| g.typical.get(l).cloned()));
    }
    typical
}

/// Per case `i`, its positions `p`, as the (case, position) sites a steer's rows follow.
pub(super) fn sites_of(positions: &[Vec<usize>]) -> Vec<(usize, usize)> {
    positions
        .iter()
        .enumerate()
        .flat_map(|(i, ps)| ps.iter().map(move |&p| (i, p)))
        .collect()
}

impl Star<'_> {
    /// STAR's steps 2–4 on a batch: neurons by attribution, the steers, the analytical patch off the
    /// guard span, and the guided updates.
    pub(super) fn star_patches(
        &self,
        batch: &Batch,
        found: Option<Attribution>,
        guards: &[Arc<Checked>],
        outcome: &mut RepairOutcome,
    ) -> Result<Patched> {
        let layers = outcome.layers.clone();
        let found = match found {
            Some(mut f) => {
                f.failing.retain(|l, _| layers.contains(l));
                f.scores.retain(|l, _| layers.contains(l));
                f
            }
            None => {
                let all: Vec<usize> = (0..batch.cases.len()).collect();
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

        let steers = self.steers(&batch.scored, &batch.cases, &batch.failing, layers.len())?;
        let typical = typical_rows(batch, guards, &layers);
        let solver = Solver::new(self, &layers, &columns, &typical, guards, values)?;
        let mut priors = BTreeMap::new();
        let mut keyed = BTreeMap::new();
        for &l in &layers {
            let prior = match values {
                // Each failure position's key asks for its own steer.
                true => steers.t()?.contiguous()?,
                false => solver.solve(l, &z[&l], &steers)?,
            };
            priors.insert(l, prior);
            keyed.insert(l, sites_of(&batch.failing));
        }
        outcome.solves = 1;
        let (gates, fit) = self.gates(batch, &layers, (&z, &whole), &typical, guards)?;
        let mut sites = Sites {
            columns: &columns,
            gates,
            keyed,
            fit,
        };
        let solve = |l: usize, z: &Tensor, s: &Tensor| solver.solve(l, z, s);
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
            d.set(&(d.as_tensor() - solver.off_guards(l, update)?)?)
        })
    }

    /// Per layer the gate its patch acts behind (none when `settings.gate` is 0), from the failure
    /// positions' activations `z` (on the patched columns) and `whole` (every neuron), and what it
    /// must leave alone: `typical` prompt rows, the guards' targets, the keys of the live entries
    /// narrowed for this repair (`Star::conflicts`), and with `right_rows` the target rows of recent
    /// cases the model said right, but `batch`'s own lines. For gates keyed on the layer, also how
    /// their thresholds were fit, and what they leave alone per layer.
    fn gates(
        &self,
        batch: &Batch,
        layers: &[usize],
        (z, whole): (&PerLayer<Tensor>, &PerLayer<Tensor>),
        typical: &PerLayer<Vec<Tensor>>,
        guards: &[Arc<Checked>],
    ) -> Result<(PerLayer<Gate>, Option<Fitted>)> {
        let mut gates = BTreeMap::new();
        if self.settings.gate <= 0.0 {
            return Ok((gates, None));
        }
        if self.settings.keys == Keys::Columns {
            for &l in layers {
                gates.insert(l, Gate::on_columns(&z[&l], self.settings.gate)?);
            }
            return Ok((gates, None));
        }
        let fit = Fit {
            gap: self.settings.gate_gap,
            ceiling: self.settings.gate,
            per: self.settings.gate_thresholds,
        };
        let mut rows = BTreeMap::new();
        for &l in layers {
            let mut ordinary = typical.get(&l).cloned().unwrap_or_default();
            ordinary.extend(guards.iter().map(|g| g.at_target[&l].clone()));
            let ordinary = match ordinary.is_empty() {
                true => Tensor::zeros((0, whole[&l].dim(1)?), DType::F32, &Device::Cpu)?,
                false => Tensor::cat(&ordinary, 0)?,
            };
            // Right cases but the failures' own, and lines the same as one of theirs.
            let skip = |tokens: &[u32], target: &[u32]| {
                let ours = |c: &Prepared| c.tf.tokens == tokens || c.tf.target == target;
                batch.cases.iter().any(ours)
            };
            let right = match (self.settings.right_rows, self.residuals) {
                (true, Some(r)) => r.right_rows(l, skip)?,
                _ => None,
            };
            let leave = Leave {
                ordinary,
                conflicting: self.conflicts.and_then(|c| c.get(&l)).cloned(),
                right,
            };
            gates.insert(l, fit.on_layer(&whole[&l], &leave)?);
            rows.insert(l, leave);
        }
        Ok((gates, Some((fit, rows))))
    }

    /// The analytical step again, up to `solves` times in all, on what is not settled yet: the cases
    /// run forward under the patches so far (no gradients), and each patch gains the solve for the
    /// steers of the unsettled positions, at their current activations. Forward passes only (of the
    /// serving layers), where a guided step pays a backward as well. When a whole pass finds
    /// everything settled, or everything right once the solves are spent, returns which cases it
    /// found right; `None` leaves the rest to the guided steps.
    pub(super) fn resolve(
        &self,
        batch: &Batch,
        sites: &mut Sites,
        patches: &mut BTreeMap<usize, Tensor>,
        outcome: &mut RepairOutcome,
        solve: &dyn Fn(usize, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Option<Vec<bool>>> {
        let layers: Vec<usize> = patches.keys().copied().collect();
        let cols: BTreeMap<usize, Tensor> = layers
            .iter()
            .map(|&l| Ok((l, Tensor::new(sites.columns[&l].as_slice(), &Device::Cpu)?)))
            .collect::<Result<_>>()?;
        let mut asked = self.first_asked(batch)?;
        let all: Vec<usize> = (0..batch.cases.len()).collect();
        let offsets = batch.offsets(&all)?;
        // The last whole pass's scorings, while the patches are as it ran them.
        let mut whole: Option<Vec<Scored>> = None;
        loop {
            self.checkpoint()?;
            let current = sites.patches(patches.iter().map(|(l, p)| (*l, p.clone())))?;
            let set = self.served(&current)?;
            let Unsettled {
                scored,
                open,
                gains,
                wrong,
                z,
                keys_at,
            } = self.unsettled_rows(batch, &set, (&layers, &cols), &offsets, &mut asked)?;
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

    /// What each failure position's first steer asks, at gain 1: later gains are learnt from how
    /// much of it came through.
    fn first_asked(&self, batch: &Batch) -> Result<BTreeMap<(usize, usize), Asked>> {
        let mut asked = BTreeMap::new();
        for (i, (case, positions)) in batch.cases.iter().zip(&batch.failing).enumerate() {
            let rows = self.decisions(&case.tf, &batch.scored[i].logits)?;
            for &p in positions {
                if let Some(a) = self.asked(&rows[p], case.tf.target[p], 1.0) {
                    asked.insert((i, p), a);
                }
            }
        }
        Ok(asked)
    }

    /// A pass of the serving layers over every case's tail under `set` (cases at `offsets` in the
    /// packed rows): the positions not settled yet, the gains their next steers take (updating
    /// `asked`), and their activations at the patched `layers` (on `cols`, and whole).
    fn unsettled_rows(
        &self,
        batch: &Batch,
        set: &PatchSet,
        (layers, cols): (&[usize], &PerLayer<Tensor>),
        offsets: &[usize],
        asked: &mut BTreeMap<(usize, usize), Asked>,
    ) -> Result<Unsettled> {
        let lo = layers.iter().copied().min().unwrap_or(batch.first);
        let all: Vec<usize> = (0..batch.cases.len()).collect();
        let mut capture = Capture::layers(layers.iter().copied());
        let scored = batch.score_from(
            self,
            Upper::Serving,
            lo,
            &all,
            &mut Hooks {
                patches: Some(set),
                capture: Some(&mut capture),
                ..Hooks::default()
            },
        )?;
        let mut out = Unsettled {
            scored: Vec::new(),
            open: Vec::new(),
            gains: Vec::new(),
            wrong: 0,
            z: BTreeMap::new(),
            keys_at: BTreeMap::new(),
        };
        for (i, (case, s)) in batch.cases.iter().zip(&scored).enumerate() {
            let rows = self.decisions(&case.tf, &s.logits)?;
            out.wrong += self.wrong_at(&case.tf, &rows).len();
            let positions = self.unsettled(case, &rows);
            for &p in &positions {
                let (row, want) = (&rows[p], case.tf.target[p]);
                let gain = asked
                    .get(&(i, p))
                    .map_or(1.0, |a| a.next_gain(row, want, self.settings.margin));
                out.gains.push(gain);
                match self.asked(row, want, gain) {
                    Some(a) => asked.insert((i, p), a),
                    None => asked.remove(&(i, p)),
                };
            }
            if !positions.is_empty() {
                // In a case's tail, target position `p` is row `p`.
                let rows: Vec<u32> = positions.iter().map(|&p| (offsets[i] + p) as u32).collect();
                let rows = Tensor::new(rows.as_slice(), &Device::Cpu)?;
                for &l in layers {
                    let at = capture.neurons[&l].index_select(&rows, 0)?;
                    out.z
                        .entry(l)
                        .or_default()
                        .push(at.index_select(&cols[&l], 1)?);
                    out.keys_at.entry(l).or_default().push(at);
                }
            }
            out.open.push(positions);
        }
        out.scored = scored;
        Ok(out)
    }
}

/// `R (A Aᵀ)⁻¹` for `A` `(n, k)` and the rows of `R` `(m, n)`: the ridge-regularized solve both the patch
/// and the guard projection need, one row at a time through one Cholesky factor.
pub(super) fn solve_gram(a: &Tensor, r: &Tensor) -> Result<Tensor> {
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
