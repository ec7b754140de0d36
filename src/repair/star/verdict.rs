//! Step 5, the same for every method: the cases and guards on the serving model with the patches.

use super::batch::{Batch, Checked, Patched};
use super::{RepairOutcome, Star};
use crate::model::{LayerPatch, PatchSet};
use candle_core::Result;
use std::sync::Arc;

impl Star<'_> {
    /// Whether the serving model, under `set` (the live overlay and `patches`, all at the first
    /// candidate layer or above), predicts the developer's line at every target position of each
    /// checked case, end of line included: a teacher-forced pass of the quantized top layers, where a
    /// greedy check would pay a decode of the whole model per token. Eval measures effectiveness by
    /// greedy completions of its own.
    pub(super) fn say_targets(
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

    /// Step 5, the same for every method: on the serving model with the patches, the failures whose
    /// every target position is now right and the guard pass rate before and after; a patch that fixes
    /// nothing or lowers the guard is refused (and not returned).
    pub(super) fn verdict(
        &self,
        patched: Patched,
        batch: &Batch,
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
        for (id, right) in batch.ids.iter().zip(right) {
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
