//! The model runtime: load a qwen2 GGUF, run it with hooks, generate completions.
//!
//! Architecture invariant: no I/O after `load`; everything here is a function of weights and inputs.

mod gemv;
pub mod generate;
mod gguf;
pub mod hooks;
mod kernels;
mod kv;
mod linear;
pub mod memory;
mod qwen2;
mod tokenizer;

pub use generate::{generate, Cancel, GenerateParams, Generation, Prompt, StopAt};
pub use gguf::GgufFile;
pub use hooks::{Capture, Fired, FiredEntries, Hooks, LayerPatch, Outline, PatchSet};
pub use kv::{kv_positions, KvCache, LayerKv};
pub use linear::{Linear, LoadOptions};
pub use memory::{Gate, Narrowed};
pub use qwen2::{Config, DecoderLayer, Mlp, Qwen2};
pub use tokenizer::{FimTokens, Tokenizer};

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A candle error on one line: without the backtrace it carries when RUST_BACKTRACE is set, context
/// joined with `: `.
pub(crate) fn one_line(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => one_line(inner),
        candle_core::Error::Context { inner, context } => format!("{context}: {}", one_line(inner)),
        e => e
            .to_string()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(": "),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("no model at {path}: run scripts/fetch-model, or point STAR_LS_MODEL at a qwen2 GGUF")]
    Missing { path: PathBuf },
    #[error("could not read model at {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("model at {path} has architecture `{arch}`; star-ls runs qwen2 models")]
    UnsupportedArchitecture { path: PathBuf, arch: String },
}

/// A loaded model and its tokenizer.
pub struct Model {
    pub weights: Arc<Qwen2>,
    pub tokenizer: Arc<Tokenizer>,
    pub path: PathBuf,
}

impl Model {
    pub fn load(path: &Path, opts: LoadOptions) -> Result<Self, ModelError> {
        let (weights, file) = Qwen2::load(path, opts)?;
        let tokenizer = Tokenizer::from_gguf(&file)?;
        weights.warm_up().map_err(|e| ModelError::Corrupt {
            path: path.to_owned(),
            reason: format!("first forward pass failed: {}", one_line(&e)),
        })?;
        if tokenizer.vocab_size() > weights.config().vocab_size {
            return Err(ModelError::Corrupt {
                path: path.to_owned(),
                reason: format!(
                    "tokenizer has {} tokens but the embedding only {}",
                    tokenizer.vocab_size(),
                    weights.config().vocab_size
                ),
            });
        }
        Ok(Self {
            weights,
            tokenizer: Arc::new(tokenizer),
            path: path.to_owned(),
        })
    }
}
