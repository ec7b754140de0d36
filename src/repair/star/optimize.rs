//! The guided steps from the analytical patch.

use super::batch::{Batch, Patched, Upper};
use super::score::Scored;
use super::solve::Sites;
use super::{RepairOutcome, Star};
use crate::model::{Hooks, LayerPatch};
use crate::repair::Mode;
use candle_core::{Result, Tensor, Var};
use std::collections::BTreeMap;

impl Star<'_> {
    /// Steps `deltas` (one per layer, at `sites`) with `update` for `max_steps` steps, or with
    /// `stop_when_fixed` until every failure position of the batch is right; returns the patches.
    pub(in crate::repair) fn optimize(
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
            let set = crate::repair::overlay_on(batch.beside_dense.clone(), &patches(false)?)?;
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
}
