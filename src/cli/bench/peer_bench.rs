//! llama.cpp on the same prompts, through scripts/peer-bench.mjs.

use super::{COLD_DECODE, DECODE};
use crate::cli::peer;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

/// What scripts/peer-bench.mjs prints.
#[derive(Debug, Deserialize)]
pub(super) struct PeerRun {
    pub(super) name: String,
    pub(super) prefill_tok_s: f64,
    pub(super) decode_tok_s: f64,
    pub(super) tokens: Vec<u32>,
}

pub(super) struct PeerResults {
    pub(super) main: PeerRun,
    pub(super) cold: PeerRun,
    /// The bench prompt again with a LoRA adapter (`bench --peer-lora`).
    pub(super) lora: Option<PeerRun>,
}

/// Installs the peer if needed and runs it on the bench prompt and on the cold prompt, and with
/// `lora` on the bench prompt again.
pub(super) fn run_peer(
    model: &Path,
    threads: usize,
    (prompt, cold): (&[u32], &[u32]),
    lora: Option<&Path>,
) -> Result<PeerResults> {
    let peer = peer::Peer::install()?;
    let main = peer_bench(&peer, model, threads, prompt, DECODE, None)?;
    let cold = peer_bench(&peer, model, threads, cold, COLD_DECODE, None)?;
    let lora = lora
        .map(|l| peer_bench(&peer, model, threads, prompt, DECODE, Some(l)))
        .transpose()?;
    Ok(PeerResults { main, cold, lora })
}

fn peer_bench(
    peer: &peer::Peer,
    model: &Path,
    threads: usize,
    ids: &[u32],
    decode: usize,
    lora: Option<&Path>,
) -> Result<PeerRun> {
    let mut args = vec!["--decode".into(), decode.to_string()];
    args.extend(peer::lora_args(lora));
    let out = peer.run(
        "peer-bench.mjs",
        model,
        threads,
        ("prompt-ids", &ids),
        &args,
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
