//! `star-ls bench`: our speed against llama.cpp's (the "peer", through scripts/peer-bench.mjs) on the same
//! GGUF, thread count and prompt token ids, plus what only we have: edit latency with a warm prefix cache.
//!
//! Every number printed is measured here; when the peer cannot run, its figures are `null` with the reason.

mod edits;
mod patched;
mod peer_bench;
mod report;
mod speed;

use report::Machine;

use anyhow::{bail, Context, Result};
use star_ls::completion::{crossfile, CrossFile, Engine, EngineConfig, EngineEvent};
use star_ls::model::Model;
use star_ls::repair::Case;
use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use edits::{bench_edits, bench_edits_during_repair, TYPED};
use patched::bench_patched;
use peer_bench::run_peer;
use report::{assemble, print_table, Measured};
use speed::{bench_cold, bench_speed, cold_prompt};

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
/// `OTHER_FILES` as the server would give them to a completion in `DOCUMENT`, ranked around its end.
fn other_file() -> CrossFile {
    let chunks: Vec<_> = OTHER_FILES
        .iter()
        .flat_map(|(path, text)| crossfile::chunks(path, text))
        .collect();
    CrossFile {
        repo: "bench".into(),
        path: "access_log.py".into(),
        chunks: crossfile::rank(&chunks, DOCUMENT, ""),
        budget: CROSS_FILE_TOKENS,
        layout: Default::default(),
    }
}

/// The failures STAR repairs, again and again, while edit latency is measured under a repair.
const REPAIR_CASES: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/cases/conventions.jsonl"
));
/// Other files a developer has open while typing into `DOCUMENT`, for edit latency with their chunks.
const OTHER_FILES: [(&str, &str); 2] = [
    (
        "inventory.py",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/python/inventory.py"
        )),
    ),
    ("prompt.py", PROMPT),
];
/// What edit latency with other files' chunks allows them (`crossFileTokens`).
const CROSS_FILE_TOKENS: usize = 1024;
/// Tokens decoded after the prompt; the first comes from the prompt's logits, so DECODE - 1 single-token
/// steps are timed (peer-bench counts the same way).
const DECODE: usize = 64;
const COLD_PROMPT: usize = 700;
const COLD_DECODE: usize = 32;
/// A 1-minute load average at the start above this means other work is competing for the cores.
const BUSY_LOAD: f64 = 1.0;

/// The bench; with `peer_lora`, llama.cpp also runs the bench prompt with that LoRA adapter.
pub fn run(threads: usize, json_out: Option<&Path>, peer_lora: Option<&Path>) -> Result<()> {
    // Before anything touches candle: its thread pool reads RAYON_NUM_THREADS once.
    star_ls::env::set_threads(Some(threads));
    let load_start = load_average();
    if let Some(load) = load_start.filter(|l| *l >= BUSY_LOAD) {
        tracing::warn!("bench: the machine is busy (load {load:.2}); figures will be unreliable");
    }
    let model_path = star_ls::env::model_path();
    // One model for everything: the engine's. A second copy would only inflate the RSS figure.
    let (engine, model) = start_engine(&model_path)?;

    let prompt = model.tokenizer.encode(PROMPT);
    tracing::info!(tokens = prompt.len(), "bench: prefill and decode");
    let speed = bench_speed(&model.weights, &prompt, None)?;

    tracing::info!(edits = TYPED.len(), "bench: edit latency");
    let edits = bench_edits(&engine, Duration::ZERO, &CrossFile::default())?;
    tracing::info!(
        tokens = CROSS_FILE_TOKENS,
        "bench: edit latency with another file's chunks"
    );
    let with_context = bench_edits(&engine, Duration::ZERO, &other_file())?;

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
    let peer = run_peer(&model_path, threads, (&prompt, &cold_ids), peer_lora);
    if let Err(e) = &peer {
        tracing::warn!("bench: peer unavailable: {e:#}");
    }

    let measured = Measured {
        threads,
        machine: machine(load_start, load_average()),
        prompt_tokens: prompt.len(),
        speed,
        edits,
        with_context,
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

fn repair_cases() -> Result<Vec<Case>> {
    REPAIR_CASES
        .lines()
        .map(serde_json::from_str)
        .collect::<serde_json::Result<Vec<Case>>>()
        .context("fixtures/cases/conventions.jsonl")
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
        let xs: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&xs, 50.0), 10.0);
        assert_eq!(percentile(&xs, 95.0), 19.0);
        assert_eq!(percentile(&[5.0], 95.0), 5.0);
    }
}
