//! `star-ls bench`: our speed against llama.cpp's (the "peer", through scripts/peer-bench.mjs) on the same
//! GGUF, thread count and prompt token ids, plus what only we have: edit latency with a warm prefix cache.
//!
//! Every number printed is measured here; when the peer cannot run, its figures are `null` with the reason.

use super::peer;
use crate::completion::{CompletionRequest, Document, Engine, EngineConfig, EngineEvent};
use crate::model::{
    generate::argmax, Cancel, Capture, GenerateParams, Hooks, KvCache, LayerPatch, Model, PatchSet,
    Qwen2, StopAt,
};
use crate::repair::{Case, Head, RepairSettings, Star};
use crate::store::PatchLayer;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// The prefill/decode prompt: a small Python class, ending where a new method begins.
const PROMPT: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/bench/prompt.py"
));
/// A longer Python module: the document typed into, and the source of the cold 700-token prompt.
const DOCUMENT: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/bench/access_log.py"
));
/// The edit cursor goes on a new line after this text in `DOCUMENT` (inside `LatencyReport.alerts`).
const EDIT_ANCHOR: &str = "if stats.count < 20:\n                continue\n";
const EDIT_INDENT: &str = "            ";
/// Typed one character per edit: the start of a plausible next statement at the cursor.
const TYPED: &str = "rate = stats.error_r";
/// Rounds of `TYPED` typed while STAR repairs.
const REPAIR_ROUNDS: usize = 4;
/// Between an answer and the next keystroke while STAR repairs: the repair runs in these gaps, as it
/// does between a developer's keystrokes, so each request arrives in the middle of a repair step.
const KEYSTROKE_GAP: Duration = Duration::from_millis(150);
/// Real code that is not the bench's prompt: where a large patch memory's other entries are keyed.
const OTHER_CODE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/cases/grouped.jsonl"
));
/// The failures STAR repairs, again and again, while edit latency is measured under a repair.
const REPAIR_CASES: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/cases/conventions.jsonl"
));

const REPS: usize = 3;
/// Patch memory sizes the bench serves, in entries.
const MEMORY_ENTRIES: [usize; 3] = [0, 500, 5000];
/// Runs of each memory size: their costs are a few percent, under the noise of 3 runs here.
const MEMORY_REPS: usize = 7;
/// Tokens decoded after the prompt; the first comes from the prompt's logits, so DECODE - 1 single-token
/// steps are timed (peer-bench counts the same way).
const DECODE: usize = 64;
const COLD_PROMPT: usize = 700;
const COLD_DECODE: usize = 32;
/// A 1-minute load average at the start above this means other work is competing for the cores.
const BUSY_LOAD: f64 = 1.0;

#[derive(Debug, Serialize)]
pub struct Report {
    pub threads: usize,
    pub machine: Machine,
    pub prompt_tokens: usize,
    pub ours: Ours,
    pub peer: Option<PeerFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_error: Option<String>,
    pub ratio_decode: Option<f64>,
    pub ratio_prefill: Option<f64>,
    /// Leading greedy tokens on which we and the peer agree (out of `DECODE`).
    pub tokens_agree: Option<usize>,
    pub cold_700: Cold,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    /// 1-minute load average when the bench started and when it ended (the end includes the bench's
    /// own threads): other work on the machine skews every figure, and a shared box is the usual
    /// reason two runs disagree.
    pub load_start: Option<f64>,
    pub load_end: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Ours {
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub edit_latency_ms_p50: f64,
    pub edit_latency_ms_p95: f64,
    /// Mean prompt tokens actually run per edit (the rest came from the prefix cache).
    pub edit_prefilled_mean: f64,
    pub edit_prompt_tokens_mean: f64,
    pub edit_generated_mean: f64,
    /// The same edits while STAR repairs in the background, as the server runs it (the repair waits
    /// at its checkpoints while a completion is queued or running).
    pub edit_latency_during_repair_ms_p50: f64,
    pub edit_latency_during_repair_ms_p95: f64,
    /// During a repair / without: p50 and p95.
    pub repair_slowdown_p50: f64,
    pub repair_slowdown_p95: f64,
    /// Peak resident memory (VmHWM) before the repair phase, MiB.
    pub rss_mb: f64,
    /// Resident memory at the end (VmRSS), MiB.
    pub rss_end_mb: f64,
    /// The same prefill and decode with a STAR repair's patches served, both ways.
    pub patched: Patched,
}

/// A repair of the convention fixtures, served as an overlay (quantized weights plus a dense delta
/// on the patched columns) and re-quantized into its layers (`Qwen2::requantized`).
#[derive(Debug, Serialize)]
pub struct Patched {
    pub layers: Vec<usize>,
    pub neurons_per_layer: usize,
    pub overlay_prefill_tok_s: f64,
    pub overlay_decode_tok_s: f64,
    pub requantized_prefill_tok_s: f64,
    pub requantized_decode_tok_s: f64,
    /// Prefill and decode with a patch memory of `MEMORY_ENTRIES` entries, measured in one run.
    pub memory: Vec<MemorySpeed>,
    /// Bytes one entry (a key, its value and its share of its gate's centre) takes in memory and
    /// the ledger, and how many the default `patchMemoryMb` holds.
    pub entry_bytes: usize,
    pub entries_in_budget: usize,
}

/// The speed of a patch memory of `entries` entries (keys with their values, over all patched
/// layers) against the unpatched model measured beside it.
#[derive(Debug, Serialize)]
pub struct MemorySpeed {
    pub entries: usize,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    /// Against 0 entries: memory / unpatched.
    pub ratio_prefill: f64,
    pub ratio_decode: f64,
}

#[derive(Debug, Serialize)]
pub struct PeerFigures {
    pub name: String,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
}

/// A cold completion: empty cache, `COLD_PROMPT` tokens prefilled, `COLD_DECODE` tokens decoded.
#[derive(Debug, Serialize)]
pub struct Cold {
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub ours_ms: f64,
    pub peer_ms: Option<f64>,
    /// ours / peer.
    pub ratio: Option<f64>,
}

/// What scripts/peer-bench.mjs prints.
#[derive(Debug, Deserialize)]
struct PeerRun {
    name: String,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    tokens: Vec<u32>,
}

pub fn run(threads: usize, json_out: Option<&Path>) -> Result<()> {
    // Before anything touches candle: its thread pool reads RAYON_NUM_THREADS once.
    crate::env::set_threads(Some(threads));
    let load_start = load_average();
    if let Some(load) = load_start.filter(|l| *l >= BUSY_LOAD) {
        tracing::warn!("bench: the machine is busy (load {load:.2}); figures will be unreliable");
    }
    let model_path = crate::env::model_path();
    // One model for everything: the engine's. A second copy would only inflate the RSS figure.
    let (engine, model) = start_engine(&model_path)?;

    let prompt = model.tokenizer.encode(PROMPT);
    tracing::info!(tokens = prompt.len(), "bench: prefill and decode");
    let speed = bench_speed(&model.weights, &prompt, None)?;

    tracing::info!(edits = TYPED.len(), "bench: edit latency");
    let edits = bench_edits(&engine, Duration::ZERO)?;

    let cold_ids = cold_prompt(&model)?;
    tracing::info!(tokens = cold_ids.len(), "bench: cold completion");
    let cold_ms = bench_cold(&model.weights, &cold_ids)?;
    // Before the repair phase: its dense layer copies are repair memory, not serving memory.
    let (rss_end_mb, rss_mb) = memory().context("reading /proc/self/status")?;

    tracing::info!("bench: prefill and decode with a repair's patches");
    let patched = bench_patched(&model, &prompt)?;

    tracing::info!("bench: edit latency during a repair");
    let during_repair = bench_edits_during_repair(&engine, &model)?;
    drop(engine);

    tracing::info!("bench: peer (llama.cpp)");
    let peer = run_peer(&model_path, threads, &prompt, &cold_ids);
    if let Err(e) = &peer {
        tracing::warn!("bench: peer unavailable: {e:#}");
    }

    let measured = Measured {
        threads,
        machine: machine(load_start, load_average()),
        prompt_tokens: prompt.len(),
        speed,
        edits,
        during_repair,
        cold_ms,
        rss_mb,
        rss_end_mb,
        patched,
    };
    let report = assemble(measured, peer);
    print_table(&report);
    if let Some(path) = json_out {
        let json = serde_json::to_string_pretty(&report).context("serializing the report")?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Starts the completion engine and waits for its model.
fn start_engine(model_path: &Path) -> Result<(Engine, Arc<Model>)> {
    let (tx, rx) = mpsc::channel();
    let engine = Engine::start(EngineConfig::new(model_path.to_owned()), move |event| {
        let _ = tx.send(event);
    });
    loop {
        match rx
            .recv()
            .context("the model thread stopped while loading")?
        {
            EngineEvent::Loading { path } => tracing::info!("bench: loading {}", path.display()),
            EngineEvent::Loaded { seconds, .. } => {
                tracing::info!("bench: model loaded in {seconds:.1}s");
                break;
            }
            EngineEvent::LoadFailed { error } => bail!("loading {}: {error}", model_path.display()),
        }
    }
    // The worker sends `Loaded` just before it publishes the model to `Engine::model`: wait for that too.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match engine.model() {
            Some(Ok(model)) => return Ok((engine, model)),
            Some(Err(e)) => bail!("loading {}: {e}", model_path.display()),
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            None => bail!("the engine reported its model loaded but never published it"),
        }
    }
}

struct Speed {
    prefill_tok_s: f64,
    decode_tok_s: f64,
    /// The greedy tokens of the first measured run.
    tokens: Vec<u32>,
}

/// Prefill and decode throughput: median of `REPS` runs after one warmup, each from an empty cache.
fn bench_speed(model: &Qwen2, prompt: &[u32], patches: Option<&PatchSet>) -> Result<Speed> {
    let mut speeds = bench_speeds(model, prompt, &[patches], REPS)?;
    Ok(speeds.remove(0))
}

/// `bench_speed` for several overlays, their runs interleaved (one of each per round): a machine
/// that slows down or speeds up during the bench shifts them alike, so their ratios hold.
fn bench_speeds(
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
            prefill_tok_s: median(p),
            decode_tok_s: median(d),
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

struct Edits {
    latencies_ms: Vec<f64>,
    prefilled: Vec<usize>,
    prompt_tokens: Vec<usize>,
    generated: Vec<usize>,
}

/// Types `TYPED` one character at a time on a new line in `DOCUMENT`, asking for a line completion after
/// each keystroke as an editor would (`gap` after each answer), and times request → answer.
fn bench_edits(engine: &Engine, gap: Duration) -> Result<Edits> {
    let anchor = DOCUMENT
        .find(EDIT_ANCHOR)
        .context("the edit anchor is missing from fixtures/bench/access_log.py")?
        + EDIT_ANCHOR.len();
    let mut doc = Document::new(DOCUMENT, 0, "python");
    let line_start = DOCUMENT[..anchor].chars().count();
    doc.replace(line_start, line_start, &format!("{EDIT_INDENT}\n"))?;
    let mut cursor = line_start + EDIT_INDENT.chars().count();
    let name = "bench://access_log.py";

    // Warm the prefix cache on the untouched line, as the editor's first request would have.
    complete_at(engine, &doc, cursor, name).context("warmup completion")?;

    let mut out = Edits {
        latencies_ms: Vec::new(),
        prefilled: Vec::new(),
        prompt_tokens: Vec::new(),
        generated: Vec::new(),
    };
    for ch in TYPED.chars() {
        std::thread::sleep(gap);
        doc.replace(cursor, cursor, ch.encode_utf8(&mut [0; 4]))?;
        cursor += 1;
        let t0 = Instant::now();
        let completion = complete_at(engine, &doc, cursor, name)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let g = &completion.generation;
        tracing::debug!(ms, prefilled = g.prefilled, text = %g.text, "bench: edit");
        out.latencies_ms.push(ms);
        out.prefilled.push(g.prefilled);
        out.prompt_tokens.push(g.prompt_tokens);
        out.generated.push(g.tokens.len());
    }
    Ok(out)
}

/// Repairs the convention fixtures once and measures prefill and decode with the patches served as
/// an overlay and re-quantized into their layers.
fn bench_patched(model: &Model, prompt: &[u32]) -> Result<Patched> {
    let (gamma, weight) = model.weights.head_dense()?;
    let head = Head::new(&gamma, weight)?;
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
    let bytes: usize = crate::learn::ledger_layers(&outcome.patches)?
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
        entries_in_budget: crate::learn::Policy::default().patch_memory_bytes() as usize
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

fn repair_cases() -> Result<Vec<Case>> {
    REPAIR_CASES
        .lines()
        .map(serde_json::from_str)
        .collect::<serde_json::Result<Vec<Case>>>()
        .context("fixtures/cases/conventions.jsonl")
}

/// `bench_edits` again while STAR repairs `REPAIR_CASES` over and over on another thread, yielding at
/// its checkpoints exactly as the server's repair does. Returns the edit latencies, ms.
fn bench_edits_during_repair(engine: &Engine, model: &Model) -> Result<Vec<f64>> {
    let cases = repair_cases()?;
    let (gamma, weight) = model.weights.head_dense()?;
    let head = Head::new(&gamma, weight)?;
    let done = AtomicBool::new(false);
    let repairing = AtomicBool::new(false);
    let yield_to_completions = || {
        repairing.store(true, Ordering::SeqCst);
        if done.load(Ordering::SeqCst) {
            candle_core::bail!("the bench is over");
        }
        engine.wait_idle();
        Ok(())
    };
    let star = Star {
        between_steps: Some(&yield_to_completions),
        ..Star::new(
            &model.weights,
            &model.tokenizer,
            &head,
            RepairSettings::default(),
        )
    };
    std::thread::scope(|scope| {
        let repairs = scope.spawn(|| {
            let mut n = 0;
            while !done.load(Ordering::SeqCst) {
                // Ends with an error when the bench is over, mid-repair.
                if crate::env::in_background(|| star.repair(&cases, &[])).is_ok() {
                    n += 1;
                }
            }
            n
        });
        while !repairing.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Several rounds, so the typing spans the repair's phases: checking the cases, occlusion,
        // gradient steps.
        let mut latencies = Vec::new();
        let typed = (0..REPAIR_ROUNDS).try_for_each(|_| {
            latencies.extend(bench_edits(engine, KEYSTROKE_GAP)?.latencies_ms);
            anyhow::Ok(())
        });
        done.store(true, Ordering::SeqCst);
        let finished = repairs.join().unwrap_or(0);
        tracing::info!("bench: {finished} repairs finished while typing");
        typed.map(|()| latencies)
    })
}

fn complete_at(
    engine: &Engine,
    doc: &Document,
    cursor: usize,
    name: &str,
) -> Result<crate::completion::Completion> {
    let (prefix, suffix) = doc.split_at(cursor);
    let completion = engine.complete_blocking(CompletionRequest {
        document: name.to_owned(),
        prefix,
        suffix,
        stop: StopAt::Line,
        cancel: Cancel::default(),
    })?;
    Ok(completion)
}

/// The first `COLD_PROMPT` tokens of `DOCUMENT`.
fn cold_prompt(model: &Model) -> Result<Vec<u32>> {
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
fn bench_cold(model: &Qwen2, prompt: &[u32]) -> Result<f64> {
    let chunk = GenerateParams::default().chunk;
    let mut times = Vec::new();
    for rep in 1..=REPS {
        let run = greedy_run(model, prompt, COLD_DECODE, chunk, None)?;
        let ms = (run.prefill_s + run.decode_s) * 1e3;
        tracing::info!("bench: cold run {rep}/{REPS}: {ms:.0} ms");
        times.push(ms);
    }
    Ok(median(times))
}

/// (VmRSS, VmHWM) of this process in MiB.
fn memory() -> Result<(f64, f64)> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| -> Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} line"))?;
        let kib: f64 = line
            .trim_start_matches(name)
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("parsing `{line}`"))?;
        Ok(kib / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// The 1-minute load average, from /proc/loadavg.
fn load_average() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

fn machine(load_start: Option<f64>, load_end: Option<f64>) -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    Machine {
        cpu,
        cores,
        load_start,
        load_end,
    }
}

struct PeerResults {
    main: PeerRun,
    cold: PeerRun,
}

/// Installs the peer if needed and runs it on the bench prompt and on the cold prompt.
fn run_peer(model: &Path, threads: usize, prompt: &[u32], cold: &[u32]) -> Result<PeerResults> {
    let peer = peer::Peer::install()?;
    let main = peer_bench(&peer, model, threads, prompt, DECODE)?;
    let cold = peer_bench(&peer, model, threads, cold, COLD_DECODE)?;
    Ok(PeerResults { main, cold })
}

fn peer_bench(
    peer: &peer::Peer,
    model: &Path,
    threads: usize,
    ids: &[u32],
    decode: usize,
) -> Result<PeerRun> {
    let out = peer.run(
        "peer-bench.mjs",
        model,
        threads,
        ("prompt-ids", &ids),
        &["--decode".into(), decode.to_string()],
    )?;
    let line = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .context("peer-bench printed nothing")?;
    let run: PeerRun = serde_json::from_str(line)
        .with_context(|| format!("parsing peer-bench output `{line}`"))?;
    if !(run.prefill_tok_s > 0.0 && run.decode_tok_s > 0.0) {
        bail!("peer-bench reported non-positive speeds: {line}");
    }
    Ok(run)
}

/// Everything measured on our side.
struct Measured {
    threads: usize,
    machine: Machine,
    prompt_tokens: usize,
    speed: Speed,
    edits: Edits,
    during_repair: Vec<f64>,
    cold_ms: f64,
    rss_mb: f64,
    rss_end_mb: f64,
    patched: Patched,
}

fn assemble(m: Measured, peer: Result<PeerResults>) -> Report {
    let Measured {
        threads,
        machine,
        prompt_tokens,
        speed,
        edits,
        during_repair,
        cold_ms,
        rss_mb,
        rss_end_mb,
        patched,
    } = m;
    let mean = |xs: &[usize]| xs.iter().sum::<usize>() as f64 / xs.len().max(1) as f64;
    let (p50, p95) = (
        percentile(&edits.latencies_ms, 50.0),
        percentile(&edits.latencies_ms, 95.0),
    );
    let (repair_p50, repair_p95) = (
        percentile(&during_repair, 50.0),
        percentile(&during_repair, 95.0),
    );
    let ours = Ours {
        prefill_tok_s: round2(speed.prefill_tok_s),
        decode_tok_s: round2(speed.decode_tok_s),
        edit_latency_ms_p50: round2(p50),
        edit_latency_ms_p95: round2(p95),
        edit_latency_during_repair_ms_p50: round2(repair_p50),
        edit_latency_during_repair_ms_p95: round2(repair_p95),
        repair_slowdown_p50: round2(repair_p50 / p50),
        repair_slowdown_p95: round2(repair_p95 / p95),
        edit_prefilled_mean: round2(mean(&edits.prefilled)),
        edit_prompt_tokens_mean: round2(mean(&edits.prompt_tokens)),
        edit_generated_mean: round2(mean(&edits.generated)),
        rss_mb: round2(rss_mb),
        rss_end_mb: round2(rss_end_mb),
        patched,
    };
    let (peer, peer_error) = match peer {
        Ok(p) => (Some(p), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let ratio = |a: f64, b: f64| round2(a / b);
    let peer_cold_ms = peer.as_ref().map(|p| {
        // peer-bench's figures are medians of per-run rates, so these invert back to median times.
        1e3 * (COLD_PROMPT as f64 / p.cold.prefill_tok_s
            + (COLD_DECODE - 1) as f64 / p.cold.decode_tok_s)
    });
    Report {
        threads,
        machine,
        prompt_tokens,
        ratio_decode: peer
            .as_ref()
            .map(|p| ratio(ours.decode_tok_s, p.main.decode_tok_s)),
        ratio_prefill: peer
            .as_ref()
            .map(|p| ratio(ours.prefill_tok_s, p.main.prefill_tok_s)),
        tokens_agree: peer.as_ref().map(|p| {
            speed
                .tokens
                .iter()
                .zip(&p.main.tokens)
                .take_while(|(a, b)| a == b)
                .count()
        }),
        cold_700: Cold {
            prompt_tokens: COLD_PROMPT,
            decode_tokens: COLD_DECODE,
            ours_ms: round2(cold_ms),
            peer_ms: peer_cold_ms.map(round2),
            ratio: peer_cold_ms.map(|p| ratio(cold_ms, p)),
        },
        peer: peer.map(|p| PeerFigures {
            name: p.main.name,
            prefill_tok_s: p.main.prefill_tok_s,
            decode_tok_s: p.main.decode_tok_s,
        }),
        peer_error,
        ours,
    }
}

fn print_table(r: &Report) {
    let peer = r.peer.as_ref();
    let opt = |x: Option<f64>, digits: usize| {
        x.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
    };
    let load = |l: Option<f64>| opt(l, 2);
    println!(
        "star-ls bench: {} ({} cores), {} threads, prompt {} tokens, load {} -> {}",
        r.machine.cpu,
        r.machine.cores,
        r.threads,
        r.prompt_tokens,
        load(r.machine.load_start),
        load(r.machine.load_end)
    );
    if r.machine.load_start.is_some_and(|l| l >= BUSY_LOAD) {
        println!("WARNING: the machine was busy when the bench started: the figures below are unreliable");
    }
    println!("peer: {}", peer.map_or("unavailable", |p| p.name.as_str()));
    println!(
        "{:<28} {:>12} {:>12} {:>10}",
        "", "star-ls", "peer", "ours/peer"
    );
    let row = |label: &str, ours: f64, theirs: Option<f64>, ratio: Option<f64>| {
        println!(
            "{label:<28} {ours:>12.1} {:>12} {:>10}",
            opt(theirs, 1),
            opt(ratio, 2)
        );
    };
    row(
        "prefill tok/s",
        r.ours.prefill_tok_s,
        peer.map(|p| p.prefill_tok_s),
        r.ratio_prefill,
    );
    row(
        "decode tok/s",
        r.ours.decode_tok_s,
        peer.map(|p| p.decode_tok_s),
        r.ratio_decode,
    );
    row(
        &format!(
            "cold {}+{} tokens, ms",
            r.cold_700.prompt_tokens, r.cold_700.decode_tokens
        ),
        r.cold_700.ours_ms,
        r.cold_700.peer_ms,
        r.cold_700.ratio,
    );
    println!(
        "edit latency p50 / p95      {:.1} / {:.1} ms  ({:.1} of {:.1} prompt tokens prefilled per edit, {:.1} generated)",
        r.ours.edit_latency_ms_p50,
        r.ours.edit_latency_ms_p95,
        r.ours.edit_prefilled_mean,
        r.ours.edit_prompt_tokens_mean,
        r.ours.edit_generated_mean
    );
    println!(
        "  during a repair           {:.1} / {:.1} ms  ({:.2}x / {:.2}x without)",
        r.ours.edit_latency_during_repair_ms_p50,
        r.ours.edit_latency_during_repair_ms_p95,
        r.ours.repair_slowdown_p50,
        r.ours.repair_slowdown_p95
    );
    let p = &r.ours.patched;
    println!(
        "with a repair's patches     prefill / decode tok/s: overlay {:.1} / {:.1}, re-quantized {:.1} / {:.1} (layers {:?}, {} neurons each)",
        p.overlay_prefill_tok_s,
        p.overlay_decode_tok_s,
        p.requantized_prefill_tok_s,
        p.requantized_decode_tok_s,
        p.layers,
        p.neurons_per_layer
    );
    for m in &p.memory {
        println!(
            "  a patch memory of {:>5} entries  prefill / decode tok/s: {:.1} / {:.1} ({:.2}x / {:.2}x)",
            m.entries, m.prefill_tok_s, m.decode_tok_s, m.ratio_prefill, m.ratio_decode
        );
    }
    println!(
        "  one entry                 {} bytes; the default patchMemoryMb holds {}",
        p.entry_bytes, p.entries_in_budget
    );
    println!(
        "peak RSS                    {:.1} MiB (end {:.1} MiB)",
        r.ours.rss_mb, r.ours.rss_end_mb
    );
    match (r.tokens_agree, &r.peer_error) {
        (Some(n), _) => println!("greedy tokens agreeing      {n} / {DECODE}"),
        (None, Some(e)) => println!("peer unavailable: {e}"),
        (None, None) => {}
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let m = xs.len() / 2;
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[m],
        _ => (xs[m - 1] + xs[m]) / 2.0,
    }
}

/// Nearest-rank percentile (p95 of 20 samples is the 19th smallest).
fn percentile(xs: &[f64], p: f64) -> f64 {
    let mut s = xs.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_statistics() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        let xs: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&xs, 50.0), 10.0);
        assert_eq!(percentile(&xs, 95.0), 19.0);
        assert_eq!(percentile(&[5.0], 95.0), 5.0);
    }

    #[test]
    fn edit_anchor_is_in_the_document_once() {
        assert_eq!(DOCUMENT.matches(EDIT_ANCHOR).count(), 1);
        assert_eq!(TYPED.chars().count(), 20);
    }
}
