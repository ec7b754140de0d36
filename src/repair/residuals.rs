//! The residual stream entering the first patchable layer, per case. Patches live only in the layers
//! from there up, so what enters that layer is a function of the model and the case's tokens alone: it
//! is computed once (the frozen lower layers are most of a repair's forward work) and kept for every
//! later repair. The server fills it while failures are pending and reuses it for the guards each
//! repair checks; eval fills it before a repair's clock starts. Beside them, the cases' checks under
//! the live overlay (`Star::warm`), which hold while the overlay stays, and from which a check under
//! the next overlay starts.

use super::star::{CheckKey, Checked};
use crate::model::memory::sketch;
use crate::model::{Outline, PatchSet, Qwen2};
use candle_core::{Result, Tensor};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// A bounded cache of residuals by (layer, tokens), the most recently used first; and of the cases'
/// checks, which also depend on the live overlay.
#[derive(Debug)]
pub struct Residuals {
    capacity: usize,
    entries: Mutex<VecDeque<Entry>>,
    checks: Mutex<VecDeque<Kept>>,
    right: Mutex<VecDeque<Right>>,
}

/// A case the model said right when it was checked (`Checked::failing` empty): its tokens, its
/// target, and per candidate layer its activations at the target rows in the key space. Kept
/// longer than checks (a few KiB each): where new gates must stay shut (`Residuals::right_rows`).
#[derive(Debug)]
struct Right {
    tokens: Vec<u32>,
    target: Vec<u32>,
    rows: std::collections::BTreeMap<usize, Tensor>,
}

/// Right cases kept: about a day's accepted lines.
const RIGHT_KEPT: usize = 256;

/// A check and the outline of the overlay it was made under: under another overlay it is stale, but
/// a new check of its case can start from it (`Star::check`). The outline holds no patch's values, so
/// a stale check keeps no old overlay in memory.
type Kept = (CheckKey, Outline, Arc<Checked>);

/// Checks kept: a repair's guards and failures (eval gives 8 of each) and room for a few more. One
/// holds about 19 MB for a 300-token case of the default model with ten target tokens: its typical
/// rows and the logits of its target rows (most of it), then the residual entering the candidate
/// layers, their keys and values and their activations in the key space at its prompt rows.
const CHECKS_KEPT: usize = 24;

/// The residual entering `layer` for `tokens`.
#[derive(Debug)]
struct Entry {
    layer: usize,
    tokens: Vec<u32>,
    residual: Tensor,
}

impl Entry {
    fn is(&self, layer: usize, tokens: &[u32]) -> bool {
        self.layer == layer && self.tokens == tokens
    }
}

impl Default for Residuals {
    /// Room for the guards a repair checks and a few batches of failures.
    fn default() -> Self {
        Self::new(64)
    }
}

impl Residuals {
    /// Holds at most `capacity` residuals (about 1 MB each for a 300-token case of the default model).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: Mutex::new(VecDeque::new()),
            checks: Mutex::new(VecDeque::new()),
            right: Mutex::new(VecDeque::new()),
        }
    }

    /// The newest check kept of `key`'s case, with the overlay it was made under, now the most
    /// recently used (guards asked for by every repair outlive the failures of one).
    pub(super) fn latest(&self, key: &CheckKey) -> Option<(Outline, Arc<Checked>)> {
        let mut checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        let at = checks.iter().position(|(k, _, _)| k == key)?;
        let kept = checks.remove(at)?;
        let found = (kept.1.clone(), kept.2.clone());
        checks.push_front(kept);
        Some(found)
    }

    /// Keeps a check made under `set`, in place of any older one of its case.
    pub(super) fn keep_check(&self, key: CheckKey, set: &PatchSet, checked: Arc<Checked>) {
        let mut checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        checks.retain(|(k, _, _)| *k != key);
        checks.push_front((key, set.outline(), checked));
        checks.truncate(CHECKS_KEPT);
    }

    /// The residual entering `layer` at every position of `tokens` on `model` under `live`, from the
    /// cache when it holds it. `live` may only patch layers from `layer` up, or the result would
    /// depend on it: otherwise it is computed and not kept.
    pub fn entering(
        &self,
        model: &Qwen2,
        layer: usize,
        tokens: &[u32],
        live: Option<&PatchSet>,
    ) -> Result<Tensor> {
        let below_untouched = live.is_none_or(|p| (0..layer).all(|l| !p.touches(l)));
        if below_untouched {
            let mut entries = self.lock();
            if let Some(entry) = entries
                .iter()
                .position(|e| e.is(layer, tokens))
                .and_then(|i| entries.remove(i))
            {
                let residual = entry.residual.clone();
                entries.push_front(entry); // the most recently used now
                return Ok(residual);
            }
        }
        let residual = model.residual_entering(layer, tokens, &mut model.new_cache(), live)?;
        if below_untouched {
            self.keep(layer, tokens, residual.clone());
        }
        Ok(residual)
    }

    /// Keeps `residual` as the one entering `layer` for `tokens`, computed by the caller with nothing
    /// patched below `layer`.
    pub fn keep(&self, layer: usize, tokens: &[u32], residual: Tensor) {
        let mut entries = self.lock();
        // Another thread (the server's warming, or a repair) may have kept the same one meanwhile.
        if !entries.iter().any(|e| e.is(layer, tokens)) {
            entries.push_front(Entry {
                layer,
                tokens: tokens.to_vec(),
                residual,
            });
            entries.truncate(self.capacity);
        }
    }

    /// Keeps `checked`'s case among the right ones when the check found it right
    /// (`RepairSettings::right_rows`).
    pub(super) fn keep_right(&self, checked: &Checked) -> Result<()> {
        if !checked.failing.is_empty() {
            return Ok(());
        }
        let rows = checked.at_target.iter().map(|(l, z)| Ok((*l, sketch(z)?)));
        let rows = rows.collect::<Result<_>>()?;
        let tf = &checked.prepared.tf;
        let mut right = self.right.lock().unwrap_or_else(|e| e.into_inner());
        right.retain(|r| r.tokens != tf.tokens);
        right.push_front(Right {
            tokens: tf.tokens.clone(),
            target: tf.target.clone(),
            rows,
        });
        right.truncate(RIGHT_KEPT);
        Ok(())
    }

    /// Layer `layer`'s target rows of the right cases kept but those `skip` names (by tokens and
    /// target), `(rows, key width)` in the key space; None when there are none.
    pub(super) fn right_rows(
        &self,
        layer: usize,
        skip: impl Fn(&[u32], &[u32]) -> bool,
    ) -> Result<Option<Tensor>> {
        let right = self.right.lock().unwrap_or_else(|e| e.into_inner());
        let rows: Vec<&Tensor> = right
            .iter()
            .filter(|r| !skip(&r.tokens, &r.target))
            .filter_map(|r| r.rows.get(&layer))
            .collect();
        match rows.is_empty() {
            true => Ok(None),
            false => Tensor::cat(&rows, 0).map(Some),
        }
    }

    /// Checks held.
    pub fn checks_kept(&self) -> usize {
        self.checks.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Residuals held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}
