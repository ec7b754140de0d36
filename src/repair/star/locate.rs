//! Where a patch goes: the layers (occlusion, or its first-order estimate) and the neurons
//! (attribution).

use super::batch::{Batch, Upper};
use super::score::Scored;
use super::{PerLayer, Star};
use crate::model::{Capture, Hooks};
use crate::repair::Locate;
use candle_core::{DType, Device, Result, Tensor, Var};
use std::collections::BTreeMap;

/// The neurons chosen per layer, and their activations `(failure positions, chosen)` per layer.
pub(super) struct Selection {
    pub(super) columns: BTreeMap<usize, Vec<u32>>,
    /// `z` at the failure positions on the selected columns.
    pub(super) z: BTreeMap<usize, Tensor>,
    /// `z` at the failure positions, every neuron.
    pub(super) whole: BTreeMap<usize, Tensor>,
}

/// Neuron attribution over some cases, per layer.
pub(in crate::repair) struct Attribution {
    /// `|∂CE/∂z ⊙ z|` summed over the failure positions `(intermediate,)`.
    pub scores: PerLayer<Vec<f32>>,
    /// `z` at the failure positions `(positions, intermediate)`.
    pub(super) failing: PerLayer<Tensor>,
    /// `Σ ∂CE/∂z ⊙ z` over every tail row and neuron: to first order, how much the loss would rise if
    /// the layer's MLP output were zeroed (occlusion, linearized).
    pub(super) effect: PerLayer<f32>,
}

impl Star<'_> {
    /// STAR's layers, by `settings.locate`; with the gradient, the attribution of every candidate
    /// layer's neurons comes with them.
    pub(super) fn locate_layers(&self, batch: &Batch) -> Result<(Vec<usize>, Option<Attribution>)> {
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
    pub(super) fn top_layers(&self, mut effects: Vec<(usize, f32)>) -> Vec<usize> {
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
    pub(super) fn occlusion(&self, batch: &Batch) -> Result<Vec<usize>> {
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
    pub(in crate::repair) fn attribution(
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
    pub(super) fn select_neurons(&self, batch: &Batch, found: Attribution) -> Result<Selection> {
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
}
