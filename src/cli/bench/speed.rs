//! Prefill and decode throughput from an empty cache, and a cold completion's wall time.

use super::{COLD_DECODE, COLD_PROMPT, DECODE, DOCUMENT};
use anyhow::{bail, Result};
use star_ls::eval::median;
use star_ls::model::{generate::argmax, GenerateParams, Hooks, KvCache, Model, PatchSet, Qwen2};
use std::time::Instant;

const REPS: usize = 3;

pub(super) struct Speed {
    pub(super) prefill_tok_s: f64,
    pub(super) decode_tok_s: f64,
    /// The greedy tokens of the first measured run.
    pub(super) tokens: Vec<u32>,
}

/// Prefill and decode throughput: median of `REPS` runs after one warmup, each from an empty cache.
pub(super) fn bench_speed(
    model: &Qwen2,
    prompt: &[u32],
    patches: Option<&PatchSet>,
) -> Result<Speed> {
    let mut speeds = bench_speeds(model, prompt, &[patches], REPS)?;
    Ok(speeds.remove(0))
}

/// `bench_speed` for several overlays, their runs interleaved (one of each per round): a machine
/// that slows down or speeds up during the bench shifts them alike, so their ratios hold.
pub(super) fn bench_speeds(
    model: &Qwen2,
    prompt: &[u32],
    sets: &[Option<&PatchSet>],
    reps: usize,
) -> Result<Vec<Speed>> {
    let mut prefill = vec![Vec::new(); sets.len()];
    let mut decode = vec![Vec::new(); sets.len()];
    let mut tokens = vec![Vec::new(); sets.len()];
    for rep in 0..=reps {
        for (i, patches) in sets.iter().enumerate() {
            let run = greedy_run(model, prompt, DECODE, prompt.len(), *patches)?;
            let (p, d) = (
                prompt.len() as f64 / run.prefill_s,
                (DECODE - 1) as f64 / run.decode_s,
            );
            if rep == 0 {
                // Warmup: pages in the weights, spins up the thread pool.
                tracing::info!("bench: warmup {i}: prefill {p:.1} tok/s, decode {d:.1} tok/s");
                continue;
            }
            tracing::info!(
                "bench: run {rep}/{reps} of {i}: prefill {p:.1} tok/s, decode {d:.1} tok/s"
            );
            if tokens[i].is_empty() {
                tokens[i] = run.tokens;
            } else if tokens[i] != run.tokens {
                tracing::warn!("bench: greedy runs decoded different tokens");
            }
            prefill[i].push(p);
            decode[i].push(d);
        }
    }
    Ok(prefill
        .into_iter()
        .zip(decode)
        .zip(tokens)
        .map(|((p, d), tokens)| Speed {
            prefill_tok_s: median(p).unwrap_or(f64::NAN),
            decode_tok_s: median(d).unwrap_or(f64::NAN),
            tokens,
        })
        .collect())
}

struct GreedyRun {
    prefill_s: f64,
    decode_s: f64,
    tokens: Vec<u32>,
}

/// From an empty cache: runs `prompt` in chunks of `chunk` tokens, then decodes `n` greedy tokens (EOS
/// ignored). The first token comes from the prompt's logits; the `n - 1` single-token steps are the decode.
fn greedy_run(
    model: &Qwen2,
    prompt: &[u32],
    n: usize,
    chunk: usize,
    patches: Option<&PatchSet>,
) -> Result<GreedyRun> {
    let hooks = || Hooks {
        patches,
        ..Hooks::default()
    };
    let mut cache: KvCache = model.new_cache();
    let t0 = Instant::now();
    let mut logits = Vec::new();
    for part in prompt.chunks(chunk.max(1)) {
        logits = model.next_logits(part, &mut cache, &mut hooks())?;
    }
    let t1 = Instant::now();
    let mut tokens = vec![argmax(&logits)];
    while tokens.len() < n {
        let last = tokens[tokens.len() - 1];
        logits = model.next_logits(&[last], &mut cache, &mut hooks())?;
        tokens.push(argmax(&logits));
    }
    let t2 = Instant::now();
    Ok(GreedyRun {
        prefill_s: (t1 - t0).as_secs_f64(),
        decode_s: (t2 - t1).as_secs_f64(),
        tokens,
    })
}

/// The first `COLD_PROMPT` tokens of `DOCUMENT`.
pub(super) fn cold_prompt(model: &Model) -> Result<Vec<u32>> {
    let mut ids = model.tokenizer.encode(DOCUMENT);
    if ids.len() < COLD_PROMPT {
        bail!(
            "fixtures/bench/access_log.py is {} tokens; the cold bench needs {COLD_PROMPT}",
            ids.len()
        );
    }
    ids.truncate(COLD_PROMPT);
    Ok(ids)
}

/// Median wall time (ms) of a cold completion: empty cache, prompt prefilled in the engine's chunk size,
/// `COLD_DECODE` tokens decoded.
pub(super) fn bench_cold(model: &Qwen2, prompt: &[u32]) -> Result<f64> {
    let chunk = GenerateParams::default().chunk;
    let mut times = Vec::new();
    for rep in 1..=REPS {
        let run = greedy_run(model, prompt, COLD_DECODE, chunk, None)?;
        let ms = (run.prefill_s + run.decode_s) * 1e3;
        tracing::info!("bench: cold run {rep}/{REPS}: {ms:.0} ms");
        times.push(ms);
    }
    Ok(median(times).unwrap_or(f64::NAN))
}
