//! The report: our figures beside the peer's, as JSON and as a table.

use super::edits::Edits;
use super::peer_bench::PeerResults;
use super::speed::Speed;
use super::{percentile, round2, BUSY_LOAD, COLD_DECODE, COLD_PROMPT, DECODE};
use anyhow::Result;
use serde::Serialize;

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
    /// The same edits with another file's chunks before the prompt (`crossFileTokens` 1024).
    pub edit_latency_with_context_ms_p50: f64,
    pub edit_latency_with_context_ms_p95: f64,
    pub edit_with_context_prompt_tokens_mean: f64,
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
    /// With `--peer-lora`: the same prompt with the adapter, and its speeds / the bare peer's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraFigures>,
}

#[derive(Debug, Serialize)]
pub struct LoraFigures {
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub ratio_prefill: f64,
    pub ratio_decode: f64,
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

/// Everything measured on our side.
pub(super) struct Measured {
    pub(super) threads: usize,
    pub(super) machine: Machine,
    pub(super) prompt_tokens: usize,
    pub(super) speed: Speed,
    pub(super) edits: Edits,
    pub(super) with_context: Edits,
    pub(super) during_repair: Vec<f64>,
    pub(super) cold_ms: f64,
    pub(super) rss_mb: f64,
    pub(super) rss_end_mb: f64,
    pub(super) patched: Patched,
}

pub(super) fn assemble(m: Measured, peer: Result<PeerResults>) -> Report {
    let Measured {
        threads,
        machine,
        prompt_tokens,
        speed,
        edits,
        with_context,
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
        edit_latency_with_context_ms_p50: round2(percentile(&with_context.latencies_ms, 50.0)),
        edit_latency_with_context_ms_p95: round2(percentile(&with_context.latencies_ms, 95.0)),
        edit_with_context_prompt_tokens_mean: round2(mean(&with_context.prompt_tokens)),
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
            lora: p.lora.map(|l| LoraFigures {
                prefill_tok_s: l.prefill_tok_s,
                decode_tok_s: l.decode_tok_s,
                ratio_prefill: ratio(l.prefill_tok_s, p.main.prefill_tok_s),
                ratio_decode: ratio(l.decode_tok_s, p.main.decode_tok_s),
            }),
            name: p.main.name,
            prefill_tok_s: p.main.prefill_tok_s,
            decode_tok_s: p.main.decode_tok_s,
        }),
        peer_error,
        ours,
    }
}

pub(super) fn print_table(r: &Report) {
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
    print_edits(&r.ours);
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
    if let Some(l) = peer.and_then(|p| p.lora.as_ref()) {
        println!(
            "peer with the LoRA adapter  prefill / decode tok/s: {:.1} / {:.1} ({:.2}x / {:.2}x its speed without)",
            l.prefill_tok_s, l.decode_tok_s, l.ratio_prefill, l.ratio_decode
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

/// The edit-latency lines of the table: alone, with another file's chunks, during a repair.
fn print_edits(o: &Ours) {
    println!(
        "edit latency p50 / p95      {:.1} / {:.1} ms  ({:.1} of {:.1} prompt tokens prefilled per edit, {:.1} generated)",
        o.edit_latency_ms_p50,
        o.edit_latency_ms_p95,
        o.edit_prefilled_mean,
        o.edit_prompt_tokens_mean,
        o.edit_generated_mean
    );
    println!(
        "  with another file         {:.1} / {:.1} ms  ({:.1} prompt tokens)",
        o.edit_latency_with_context_ms_p50,
        o.edit_latency_with_context_ms_p95,
        o.edit_with_context_prompt_tokens_mean
    );
    println!(
        "  during a repair           {:.1} / {:.1} ms  ({:.2}x / {:.2}x without)",
        o.edit_latency_during_repair_ms_p50,
        o.edit_latency_during_repair_ms_p95,
        o.repair_slowdown_p50,
        o.repair_slowdown_p95
    );
}
