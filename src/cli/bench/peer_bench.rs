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
}

/// Installs the peer if needed and runs it on the bench prompt and on the cold prompt.
pub(super) fn run_peer(
    model: &Path,
    threads: usize,
    prompt: &[u32],
    cold: &[u32],
) -> Result<PeerResults> {
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
