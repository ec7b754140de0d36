//! llama.cpp beside us (the "peer", node-llama-cpp installed by scripts/install-peer), run through the
//! node scripts next to the sources: `bench` times it, `complete --cases --peer` compares its lines.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The peer, installed: where its scripts and its node packages are.
pub struct Peer {
    scripts: PathBuf,
    dir: String,
}

impl Peer {
    /// Installs the peer if needed (scripts/install-peer is idempotent).
    pub fn install() -> Result<Self> {
        let scripts = scripts_dir()?;
        let install = run_captured(Command::new("bash").arg(scripts.join("install-peer")))
            .context("scripts/install-peer")?;
        let dir = install
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .context("scripts/install-peer printed no peer directory")?
            .trim()
            .to_owned();
        Ok(Self { scripts, dir })
    }

    /// Runs `node scripts/<script>` on the GGUF at `model` with `threads` threads, `input` written to a
    /// temporary JSON file given as `--<input_flag>`, and `args` after: its stdout.
    pub fn run(
        &self,
        script: &str,
        model: &Path,
        threads: usize,
        (input_flag, input): (&str, &impl Serialize),
        args: &[String],
    ) -> Result<String> {
        static RUNS: AtomicUsize = AtomicUsize::new(0);
        let file = std::env::temp_dir().join(format!(
            "star-ls-peer-{}-{}.json",
            std::process::id(),
            RUNS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&file, serde_json::to_string(input)?)
            .with_context(|| format!("writing {}", file.display()))?;
        let out = run_captured(
            Command::new("node")
                .arg(self.scripts.join(script))
                .arg("--model")
                .arg(model)
                .args(["--threads", &threads.to_string()])
                .arg(format!("--{input_flag}"))
                .arg(&file)
                .args(args)
                .args(["--peer-dir", &self.dir]),
        )
        .with_context(|| format!("scripts/{script}"));
        let _ = std::fs::remove_file(&file);
        out
    }
}

/// The scripts' `--lora FILE`, for a LoRA adapter on the GGUF (nothing without one).
pub fn lora_args(lora: Option<&Path>) -> Vec<String> {
    lora.map(|l| vec!["--lora".into(), l.display().to_string()])
        .unwrap_or_default()
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
