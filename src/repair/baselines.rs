//! The paper's baselines, as METHOD.md describes them, on the same batch, layers and verdict as STAR
//! (`Star::repair_by`): plain SGD on the layers' `down_proj`, and MINT's one-failure-at-a-time neuron
//! patches.

use super::star::{Batch, Patched, RepairOutcome, Sites, Star, Upper};
use crate::model::{Hooks, LayerPatch};
use candle_core::{DType, Device, Result, Tensor, Var};
use std::collections::BTreeMap;

/// SGD: gradient descent on every `down_proj` column of the chosen layers (`sgd_learning_rate`),
/// cross-entropy on the target tokens `mode` picks, for all `max_steps` epochs: METHOD.md's baseline
/// has no early stop (STAR's guided steps do), so its epochs see the prompt rows as the unpatched
/// model left them and only the verdict runs the cases whole under its patch.
pub(super) fn sgd(star: &Star, batch: &Batch, outcome: &mut RepairOutcome) -> Result<Patched> {
    let hidden = star.head.weight.dim(1)?;
    let mut columns = BTreeMap::new();
    let mut deltas = BTreeMap::new();
    for &l in &outcome.layers {
        let m = batch.dense[l - batch.first].mlp().down().in_features();
        columns.insert(l, (0..m as u32).collect::<Vec<_>>());
        deltas.insert(l, Var::zeros((hidden, m), DType::F32, &Device::Cpu)?);
        outcome.neurons_per_layer = m;
    }
    let lr = star.settings.sgd_learning_rate as f64;
    let sites = Sites {
        columns: &columns,
        gates: BTreeMap::new(),
        keyed: BTreeMap::new(),
        fit: None,
    };
    star.optimize(batch, &sites, &deltas, false, outcome, |_, d, g| {
        d.set(&(d.as_tensor() - g.affine(lr, 0.0)?)?)
    })
}

/// Candidate neurons MINT tries per patch, and patches per failure.
const MINT_CANDIDATES: usize = 10;
const MINT_PATCHES: usize = 10;
/// MINT's step toward the steer: `col ← (col + f·τ) / (1 + f)`.
const MINT_FACTOR: f32 = 0.01;

/// MINT: one failure at a time. Neurons of the chosen layers are scored by gradient × activation; each
/// of the top candidates is tried as a patch moving its `down_proj` column toward the failure's steer
/// `τ`, and the one that lowers the failure's loss most is kept; up to `MINT_PATCHES` patches, until the
/// failure is fixed, and a failure still not fixed has its patches rolled back.
pub(super) fn mint(
    star: &Star,
    batch: &Batch,
    outcome: &mut RepairOutcome,
) -> Result<Vec<(usize, LayerPatch)>> {
    let layers = outcome.layers.clone();
    let downs: BTreeMap<usize, Tensor> = layers
        .iter()
        .map(|&l| Ok((l, batch.dense[l - batch.first].mlp().down().dense_weight()?)))
        .collect::<Result<_>>()?;
    // Column deltas kept so far: (layer, neuron) → (hidden,).
    let mut kept: Columns = BTreeMap::new();
    let mut steps = 0;
    for i in 0..batch.cases.len() {
        let (trial, taken) = mint_one(star, batch, i, &downs, &kept)?;
        steps += taken;
        if let Some(trial) = trial {
            kept = trial;
        }
    }
    outcome.steps = steps;
    outcome.neurons_per_layer = kept.len();
    to_patches(&kept)
}

/// Column deltas by (layer, neuron), each `(hidden,)`.
type Columns = BTreeMap<(usize, u32), Tensor>;

/// MINT on failure `i` of `batch`, on top of the columns `kept` so far at the layers of `downs` (their
/// `down_proj` weights): the columns with its patches added when they fix it (`None` when they do
/// not), and the patches tried.
fn mint_one(
    star: &Star,
    batch: &Batch,
    i: usize,
    downs: &BTreeMap<usize, Tensor>,
    kept: &Columns,
) -> Result<(Option<Columns>, usize)> {
    let layers: Vec<usize> = downs.keys().copied().collect();
    let (case, positions) = (&batch.cases[i], &batch.failing[i]);
    // τ: the failure's steer at its first failure position.
    let tau = star
        .steers(
            std::slice::from_ref(&batch.scored[i]),
            std::slice::from_ref(case),
            std::slice::from_ref(positions),
            1,
        )?
        .get(0)?;
    // Scored once on the unpatched layers: the candidates are the same for every patch.
    let scores = star.attribution(batch, &[i], &layers)?.scores;
    let mut candidates: Vec<(usize, u32, f32)> = scores
        .iter()
        .flat_map(|(l, s)| s.iter().enumerate().map(|(n, v)| (*l, n as u32, *v)))
        .collect();
    candidates.sort_by(|a, b| b.2.total_cmp(&a.2));
    candidates.truncate(MINT_CANDIDATES);
    let mut trial = kept.clone();
    let (mut best_loss, mut fixed) = mint_trials(star, batch, i, &layers, &trial, &[])?[0];
    let mut steps = 0;
    for _ in 0..MINT_PATCHES {
        if fixed {
            break;
        }
        star.checkpoint()?;
        steps += 1;
        // col + delta → (col + f·τ) / (1 + f), i.e. delta += f (τ − col) / (1 + f), with `col`
        // the column as patched so far.
        let mut tried = Vec::with_capacity(candidates.len());
        for &(l, n, _) in &candidates {
            let col = downs[&l].narrow(1, n as usize, 1)?.squeeze(1)?;
            let col = match trial.get(&(l, n)) {
                Some(d) => (col + d)?,
                None => col,
            };
            tried.push((
                (l, n),
                ((&tau - &col)? * (MINT_FACTOR / (1.0 + MINT_FACTOR)) as f64)?,
            ));
        }
        let results = mint_trials(star, batch, i, &layers, &trial, &tried)?;
        let best = tried
            .into_iter()
            .zip(results)
            .min_by(|a, b| a.1 .0.total_cmp(&b.1 .0));
        match best {
            Some(((key, step), (loss, ok))) if loss < best_loss => {
                let total = match trial.remove(&key) {
                    Some(d) => (d + step)?,
                    None => step,
                };
                trial.insert(key, total);
                best_loss = loss;
                fixed = ok;
            }
            _ => break, // no candidate helps any more
        }
    }
    Ok((fixed.then_some(trial), steps))
}

/// Failure `i`'s loss, and whether it is fixed, under the columns `base` plus, on its own copy of
/// the failure in one packed pass, each of `steps`: the trials side by side.
fn mint_trials(
    star: &Star,
    batch: &Batch,
    i: usize,
    layers: &[usize],
    base: &Columns,
    steps: &[((usize, u32), Tensor)],
) -> Result<Vec<(f32, bool)>> {
    let copies = steps.len().max(1);
    let rows = batch.tail_rows(i)?;
    let mut set = star.served(&to_patches(base)?)?;
    for (k, ((l, n), step)) in steps.iter().enumerate() {
        let patch = LayerPatch::new(vec![*n], step.unsqueeze(1)?)?
            .on_rows(k * rows..(k + 1) * rows, copies * rows)?;
        set = set.with(*l, patch)?;
    }
    let lo = layers.iter().copied().min().unwrap_or(batch.first);
    batch
        .score_from(
            star,
            Upper::Serving,
            lo,
            &vec![i; copies],
            &mut Hooks {
                patches: Some(&set),
                ..Hooks::default()
            },
        )?
        .iter()
        .map(|s| {
            let fixed = star
                .failure_positions(&batch.cases[i], &s.logits)?
                .is_empty();
            Ok((s.cross_entropy(&s.all())?, fixed))
        })
        .collect()
}

fn to_patches(deltas: &Columns) -> Result<Vec<(usize, LayerPatch)>> {
    let mut by_layer: BTreeMap<usize, (Vec<u32>, Vec<Tensor>)> = BTreeMap::new();
    for ((l, n), d) in deltas {
        let e = by_layer.entry(*l).or_default();
        e.0.push(*n);
        e.1.push(d.unsqueeze(1)?);
    }
    by_layer
        .into_iter()
        .map(|(l, (cols, ds))| Ok((l, LayerPatch::new(cols, Tensor::cat(&ds, 1)?)?)))
        .collect()
}
