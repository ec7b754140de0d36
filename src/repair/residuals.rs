//! The residual stream entering the first patchable layer, per case. Patches live only in the layers
//! from there up, so what enters that layer is a function of the model and the case's tokens alone: it
//! is computed once (the frozen lower layers are most of a repair's forward work) and kept for every
//! later repair. The server fills it while failures are pending and reuses it for the guards each
//! repair checks; eval fills it before a repair's clock starts.

use crate::model::{PatchSet, Qwen2};
use candle_core::{Result, Tensor};
use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;

/// A bounded cache of residuals by (layer, tokens); the least recently used goes first.
#[derive(Debug)]
pub struct Residuals {
    capacity: usize,
    entries: Mutex<Entries>,
}

#[derive(Debug, Default)]
struct Entries {
    by_key: HashMap<u64, (usize, Vec<u32>, Tensor)>,
    order: VecDeque<u64>,
}

fn key(layer: usize, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    (layer, tokens).hash(&mut h);
    h.finish()
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
            entries: Mutex::new(Entries::default()),
        }
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
        let below_untouched = live.is_none_or(|p| (0..layer).all(|l| p.layer(l).is_none()));
        let k = key(layer, tokens);
        if below_untouched {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((l, t, r)) = entries.by_key.get(&k) {
                if *l == layer && t == tokens {
                    let r = r.clone();
                    // Used again: the newest now.
                    entries.order.retain(|o| *o != k);
                    entries.order.push_back(k);
                    return Ok(r);
                }
            }
        }
        let r = model.residual_entering(layer, tokens, &mut model.new_cache(), live)?;
        if below_untouched && self.capacity > 0 {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            if entries
                .by_key
                .insert(k, (layer, tokens.to_vec(), r.clone()))
                .is_none()
            {
                entries.order.push_back(k);
            }
            while entries.order.len() > self.capacity {
                if let Some(old) = entries.order.pop_front() {
                    entries.by_key.remove(&old);
                }
            }
        }
        Ok(r)
    }

    /// Residuals held.
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_key
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
