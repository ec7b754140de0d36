//! Narrowing the live entries (the "a conflicting one narrows both"): an entry whose gate
//! opens at a row where a failing case is still wrong gave that context what another one wanted.
//! The developer's newer correction wins there: the entry's keys that opened are raised past that
//! row, so it stays shut in contexts like it and keeps acting in those it was solved at.

use super::batch::{Batch, KEYS_MARGIN};
use super::{PerLayer, Star};
use crate::model::memory::KEY_WIDTH;
use crate::model::{Narrowed, PatchSet};
use crate::repair::keys::narrowing_gap;
use candle_core::{Result, Tensor};

impl Star<'_> {
    /// The live overlay's named gates keyed on the layer, each with the thresholds that shut it at
    /// every failure position of `batch` (the rows the model is wrong at, checked under `live`) that
    /// it opens at: such a key's threshold goes `narrowing_gap` above the row's cosine. Gates that
    /// open at none are left out.
    pub(super) fn narrowing(&self, batch: &Batch, live: &PatchSet) -> Result<Vec<Narrowed>> {
        let gap = narrowing_gap(self.settings.gate_gap);
        let mut narrowed = Vec::new();
        for (layer, patch) in live.iter() {
            let (Some(name), Some(gate)) = (patch.name(), patch.gate()) else {
                continue;
            };
            if gate.center().is_none() {
                // Keyed on its columns (a ledger from before 2026-12-06): not narrowed.
                continue;
            }
            let mut thresholds = gate.thresholds().to_vec();
            for (check, failing) in batch.checks.iter().zip(&batch.failing) {
                let Some(z) = check.at_target.get(&layer).filter(|_| !failing.is_empty()) else {
                    continue;
                };
                let rows: Vec<u32> = failing.iter().map(|&p| p as u32).collect();
                let rows = z.index_select(&Tensor::new(rows.as_slice(), z.device())?, 0)?;
                for cosines in gate.cosines(&rows)?.to_vec2::<f32>()? {
                    for (t, c) in thresholds.iter_mut().zip(cosines) {
                        if c >= *t - KEYS_MARGIN {
                            *t = t.max(c + gap);
                        }
                    }
                }
            }
            if thresholds != gate.thresholds() {
                tracing::debug!(name, layer, ?thresholds, "narrowed");
                narrowed.push(Narrowed {
                    patch: name.into(),
                    layer,
                    thresholds,
                });
            }
        }
        Ok(narrowed)
    }
}

/// Per layer, the keys of `live`'s gates that `narrowed` raised, for the new gates to leave alone.
pub(super) fn conflicting_keys(live: &PatchSet, narrowed: &[Narrowed]) -> Result<PerLayer<Tensor>> {
    let mut keys: PerLayer<Vec<Tensor>> = PerLayer::new();
    for n in narrowed {
        let held = live.gated_at(n.layer).find(|p| p.name() == Some(&*n.patch));
        let Some(gate) = held.and_then(|p| p.gate()) else {
            continue;
        };
        if gate.keys().dim(1)? > KEY_WIDTH {
            // Unsketched (a ledger from before 204406f): not in the new keys' space.
            continue;
        }
        let raised: Vec<u32> = (gate.thresholds().iter().zip(&n.thresholds))
            .enumerate()
            .filter(|(_, (was, now))| now > was)
            .map(|(k, _)| k as u32)
            .collect();
        let raised = Tensor::new(raised.as_slice(), gate.keys().device())?;
        keys.entry(n.layer)
            .or_default()
            .push(gate.keys().index_select(&raised, 0)?);
    }
    keys.into_iter()
        .map(|(l, k)| Ok((l, Tensor::cat(&k, 0)?)))
        .collect()
}
