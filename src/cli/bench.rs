//! `star-ls bench`: our speed against llama.cpp's (the "peer", through scripts/peer-bench.mjs) on the same
//! GGUF, thread count and prompt token ids, plus what only we have: edit latency with a warm prefix cache.
//!
//! Every number printed is measured here; when the peer cannot run, its figures are `null` with the reason.

use crate::completion::{CompletionRequest, Document, Engine, EngineConfig, EngineEvent};
use crate::model::{
    generate::argmax, Cancel, GenerateParams, Hooks, KvCache, Model, PatchSet, Qwen2, StopAt,
};
use crate::repair::{overlay_on, Case, Head, RepairSettings, Star};
use crate::store::PatchLayer;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;
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
/// The failures STAR repairs, again and again, while edit latency is measured under a repair.
const REPAIR_CASES: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/cases/conventions.jsonl"
));

const REPS: usize = 3;
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
    /// The overlay with the repair's patches added `full_overlay_copies` times, as many as the
    /// default `patchMemoryMb` keeps live: gated patches are not summed into one per layer, so each
    /// costs its own pass.
    pub full_overlay_copies: usize,
    pub full_overlay_prefill_tok_s: f64,
    pub full_overlay_decode_tok_s: f64,
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
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    let mut tokens = Vec::new();
    for rep in 0..=REPS {
        let run = greedy_run(model, prompt, DECODE, prompt.len(), patches)?;
        let (p, d) = (
            prompt.len() as f64 / run.prefill_s,
            (DECODE - 1) as f64 / run.decode_s,
        );
        if rep == 0 {
            // Warmup: pages in the weights, spins up the thread pool.
            tracing::info!("bench: warmup: prefill {p:.1} tok/s, decode {d:.1} tok/s");
            continue;
        }
        tracing::info!("bench: run {rep}/{REPS}: prefill {p:.1} tok/s, decode {d:.1} tok/s");
        if tokens.is_empty() {
            tokens = run.tokens;
        } else if tokens != run.tokens {
            tracing::warn!("bench: greedy runs decoded different tokens");
        }
        prefill.push(p);
        decode.push(d);
    }
    Ok(Speed {
        prefill_tok_s: median(prefill),
        decode_tok_s: median(decode),
        tokens,
    })
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
    let budget = crate::learn::Policy::default().patch_memory_bytes() as usize;
    let copies = (budget / bytes.max(1)).max(1);
    let mut full = PatchSet::default();
    for _ in 0..copies {
        full = overlay_on(full, &outcome.patches)?;
    }
    let full = bench_speed(&model.weights, prompt, Some(&full))?;
    Ok(Patched {
        layers: outcome.layers,
        neurons_per_layer: outcome.neurons_per_layer,
        overlay_prefill_tok_s: round2(overlay.prefill_tok_s),
        overlay_decode_tok_s: round2(overlay.decode_tok_s),
        requantized_prefill_tok_s: round2(requantized.prefill_tok_s),
        requantized_decode_tok_s: round2(requantized.decode_tok_s),
        full_overlay_copies: copies,
        full_overlay_prefill_tok_s: round2(full.prefill_tok_s),
        full_overlay_decode_tok_s: round2(full.decode_tok_s),
    })
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
    let scripts = scripts_dir()?;
    let install = run_captured(Command::new("bash").arg(scripts.join("install-peer")))
        .context("scripts/install-peer")?;
    let peer_dir = install
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .context("scripts/install-peer printed no peer directory")?
        .trim()
        .to_owned();
    let main = peer_bench(&scripts, model, threads, &peer_dir, prompt, DECODE)?;
    let cold = peer_bench(&scripts, model, threads, &peer_dir, cold, COLD_DECODE)?;
    Ok(PeerResults { main, cold })
}

fn peer_bench(
    scripts: &Path,
    model: &Path,
    threads: usize,
    peer_dir: &str,
    ids: &[u32],
    decode: usize,
) -> Result<PeerRun> {
    let ids_file = std::env::temp_dir().join(format!(
        "star-ls-bench-{}-{}.json",
        std::process::id(),
        ids.len()
    ));
    std::fs::write(&ids_file, serde_json::to_string(ids)?)
        .with_context(|| format!("writing {}", ids_file.display()))?;
    let out = run_captured(
        Command::new("node")
            .arg(scripts.join("peer-bench.mjs"))
            .arg("--model")
            .arg(model)
            .args(["--threads", &threads.to_string()])
            .arg("--prompt-ids")
            .arg(&ids_file)
            .args(["--decode", &decode.to_string()])
            .args(["--peer-dir", peer_dir]),
    )
    .context("scripts/peer-bench.mjs");
    let _ = std::fs::remove_file(&ids_file);
    let out = out?;
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

/// Runs a command to completion; its stdout on success, an error with the tail of its stderr otherwise.
fn run_captured(cmd: &mut Command) -> Result<String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .output()
        .with_context(|| format!("could not run `{program}`"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in stderr.lines() {
        tracing::debug!("{program}: {line}");
    }
    if !out.status.success() {
        let lines: Vec<&str> = stderr.lines().collect();
        let tail = lines[lines.len().saturating_sub(5)..].join("\n");
        bail!("`{program}` failed ({}): {tail}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The repository's `scripts/`: next to the sources this binary was built from, else under the current dir.
fn scripts_dir() -> Result<PathBuf> {
    let candidates = [
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts"),
        std::env::current_dir()?.join("scripts"),
    ];
    candidates
        .iter()
        .find(|d| d.join("peer-bench.mjs").is_file())
        .cloned()
        .context("no scripts/peer-bench.mjs next to the sources or in the current directory")
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
    println!(
        "  the same patches x{:<3}     prefill / decode tok/s: overlay {:.1} / {:.1}",
        p.full_overlay_copies, p.full_overlay_prefill_tok_s, p.full_overlay_decode_tok_s
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
