//! `star-ls complete FILE --line L --character C`: one completion without an editor.

use crate::completion::{CompletionRequest, Document, Engine, EngineConfig};
use crate::model::{Cancel, StopAt};
use anyhow::{Context, Result};
use std::path::Path;

pub fn run(file: &Path, line: u32, character: u32, stop: StopAt, json: bool) -> Result<()> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("could not read {}", file.display()))?;
    let doc = Document::new(&text, 0, "");
    let at = doc
        .char_at(line, character)
        .with_context(|| format!("position {line}:{character} in {}", file.display()))?;
    let (prefix, suffix) = doc.split_at(at);
    let engine = Engine::start(EngineConfig::new(crate::env::model_path()), |e| {
        tracing::debug!(?e, "model")
    });
    let completion = engine.complete_blocking(CompletionRequest {
        document: file.display().to_string(),
        prefix,
        suffix,
        stop,
        cancel: Cancel::default(),
    })?;
    if json {
        println!("{}", serde_json::to_string(&completion)?);
    } else {
        println!("{}", completion.generation.text);
    }
    Ok(())
}
