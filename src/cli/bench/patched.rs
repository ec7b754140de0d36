//! Prefill and decode with a repair's patches: served as an overlay, re-quantized, and as patch
//! memories of `MEMORY_ENTRIES` entries.

use super::report::{MemorySpeed, Patched};
use super::speed::{bench_speed, bench_speeds};
use super::{repair_cases, round2};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use star_ls::model::{Capture, Hooks, LayerPatch, Model, PatchSet};
use star_ls::repair::{Case, Head, RepairSettings, Star};
use star_ls::store::PatchLayer;
use std::collections::BTreeMap;

/// Real code that is not the bench's prompt: where a large patch memory's other entries are keyed.
const OTHER_CODE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/cases/grouped.jsonl"
));
/// Patch memory sizes the bench serves, in entries.
const MEMORY_ENTRIES: [usize; 3] = [0, 500, 5000];
/// Runs of each memory size: their costs are a few percent, under the noise of 3 runs here.
const MEMORY_REPS: usize = 7;

/// Repairs the convention fixtures once and measures prefill and decode with the patches served as
/// an overlay and re-quantized into their layers.
pub(super) fn bench_patched(model: &Model, prompt: &[u32]) -> Result<Patched> {
    let head = Head::of(&model.weights, None)?;
    let star = Star::new(
        &model.weights,
        &model.tokenizer,
        &head,
        RepairSettings::default(),
    );
    let outcome = star.repair(&repair_cases()?, &[])?;
    if outcome.patches.is_empty() {
        bail!(
            "the bench's repair kept no patch: {}",
            outcome.refused.as_deref().unwrap_or("no reason given")
        );
    }
    let set = star.served(&outcome.patches)?;
    let overlay = bench_speed(&model.weights, prompt, Some(&set))?;
    let rest = set.gated_only();
    let requantized = bench_speed(&model.weights.requantized(&set)?, prompt, Some(&rest))?;
    let bytes: usize = star_ls::learn::ledger_layers(&outcome.patches)?
        .iter()
        .map(PatchLayer::bytes)
        .sum();
    let keys = outcome
        .patches
        .iter()
        .map(|(_, p)| p.entries())
        .sum::<usize>();
    let entry_bytes = bytes / keys.max(1);
    if outcome.patches.iter().any(|(_, p)| !p.columns().is_empty()) {
        bail!("the bench's repair made no patch of values per key");
    }
    let most = MEMORY_ENTRIES.iter().max().copied().unwrap_or(0);
    let layers: Vec<usize> = outcome.patches.iter().map(|(l, _)| *l).collect();
    let elsewhere = activations_elsewhere(model, &layers, most.div_ceil(layers.len()))?;
    let sets = MEMORY_ENTRIES
        .iter()
        .map(|&n| memory_of(&outcome.patches, &elsewhere, n))
        .collect::<Result<Vec<_>>>()?;
    let speeds = bench_speeds(
        &model.weights,
        prompt,
        &sets.iter().map(Some).collect::<Vec<_>>(),
        MEMORY_REPS,
    )?;
    // The first holds no entry: the unpatched model, measured beside the others.
    let (p0, d0) = (speeds[0].prefill_tok_s, speeds[0].decode_tok_s);
    let memory = sets
        .iter()
        .zip(&speeds)
        .map(|(set, speed)| MemorySpeed {
            entries: set.entries(),
            prefill_tok_s: round2(speed.prefill_tok_s),
            decode_tok_s: round2(speed.decode_tok_s),
            ratio_prefill: round2(speed.prefill_tok_s / p0),
            ratio_decode: round2(speed.decode_tok_s / d0),
        })
        .collect();
    Ok(Patched {
        layers: outcome.layers,
        neurons_per_layer: outcome.neurons_per_layer,
        overlay_prefill_tok_s: round2(overlay.prefill_tok_s),
        overlay_decode_tok_s: round2(overlay.decode_tok_s),
        requantized_prefill_tok_s: round2(requantized.prefill_tok_s),
        requantized_decode_tok_s: round2(requantized.decode_tok_s),
        memory,
        entry_bytes,
        entries_in_budget: star_ls::learn::Policy::default().patch_memory_bytes() as usize
            / entry_bytes.max(1),
    })
}

/// A patch memory of at least `entries` entries (none for 0): the repair's value patches, then as
/// many more as needed keyed at rows of other real code (`OTHER_CODE`'s prefixes) with the
/// repair's centres, thresholds and values: entries learned in other contexts, open at the bench's
/// prompt only where it looks like them.
fn memory_of(
    patches: &[(usize, LayerPatch)],
    elsewhere: &BTreeMap<usize, Tensor>,
    entries: usize,
) -> Result<PatchSet> {
    let mut set = PatchSet::default();
    if entries == 0 {
        return Ok(set);
    }
    let per_layer = entries
        .saturating_sub(patches.iter().map(|(_, p)| p.entries()).sum())
        .div_ceil(patches.len());
    for (l, p) in patches {
        set = set.with(*l, p.clone())?;
        let gate = p.gate().context("a value patch has a gate")?;
        let width = gate.keys().dim(0)?;
        for start in (0..per_layer).step_by(width) {
            let n = width.min(per_layer - start);
            let keyed = gate.keyed_at(&elsewhere[l].narrow(0, start, n)?)?;
            let values = p.delta().narrow(1, 0, n)?;
            set = set.with(*l, LayerPatch::values(values, keyed)?)?;
        }
    }
    Ok(set)
}

/// `rows` activations per layer of `layers`, at the last `CONTEXT` tokens of `OTHER_CODE`'s
/// prefixes in turn.
fn activations_elsewhere(
    model: &Model,
    layers: &[usize],
    rows: usize,
) -> Result<BTreeMap<usize, Tensor>> {
    const CONTEXT: usize = 256;
    let mut got: BTreeMap<usize, Vec<Tensor>> = BTreeMap::new();
    let mut n = 0;
    for line in OTHER_CODE.lines() {
        if n >= rows {
            break;
        }
        let case: Case = serde_json::from_str(line).context("fixtures/cases/grouped.jsonl")?;
        let tokens = model.tokenizer.encode(&case.prefix);
        let tokens = &tokens[tokens.len().saturating_sub(CONTEXT)..];
        let mut capture = Capture::layers(layers.iter().copied());
        model.weights.forward(
            tokens,
            &mut model.weights.new_cache(),
            &mut Hooks {
                capture: Some(&mut capture),
                ..Hooks::default()
            },
        )?;
        n += tokens.len();
        for (l, z) in capture.neurons {
            got.entry(l).or_default().push(z);
        }
    }
    if n < rows {
        bail!("fixtures/cases/grouped.jsonl gives {n} rows, {rows} wanted");
    }
    got.into_iter()
        .map(|(l, z)| Ok((l, Tensor::cat(&z, 0)?.narrow(0, 0, rows)?)))
        .collect()
}
