//! Edit latency: typing into a document with a warm prefix cache, alone and while STAR repairs.

use super::{repair_cases, DOCUMENT};
use anyhow::{Context, Result};
use star_ls::completion::{CompletionRequest, CrossFile, Document, Engine};
use star_ls::model::{Cancel, Model, StopAt};
use star_ls::repair::{Head, RepairSettings, Star};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The edit cursor goes on a new line after this text in `DOCUMENT` (inside `LatencyReport.alerts`).
const EDIT_ANCHOR: &str = "if stats.count < 20:\n                continue\n";
const EDIT_INDENT: &str = "            ";
/// Typed one character per edit: the start of a plausible next statement at the cursor.
pub(super) const TYPED: &str = "rate = stats.error_r";
/// Rounds of `TYPED` typed while STAR repairs.
const REPAIR_ROUNDS: usize = 4;
/// Between an answer and the next keystroke while STAR repairs: the repair runs in these gaps, as it
/// does between a developer's keystrokes, so each request arrives in the middle of a repair step.
const KEYSTROKE_GAP: Duration = Duration::from_millis(150);

pub(super) struct Edits {
    pub(super) latencies_ms: Vec<f64>,
    pub(super) prefilled: Vec<usize>,
    pub(super) prompt_tokens: Vec<usize>,
    pub(super) generated: Vec<usize>,
}

/// Types `TYPED` one character at a time on a new line in `DOCUMENT`, asking for a line completion after
/// each keystroke as an editor would (`gap` after each answer, `cross` the other files' chunks it
/// sees), and times request → answer.
pub(super) fn bench_edits(engine: &Engine, gap: Duration, cross: &CrossFile) -> Result<Edits> {
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
    complete_at(engine, &doc, cursor, name, cross).context("warmup completion")?;

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
        let completion = complete_at(engine, &doc, cursor, name, cross)?;
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

/// `bench_edits` again while STAR repairs `REPAIR_CASES` over and over on another thread, yielding at
/// its checkpoints exactly as the server's repair does. Returns the edit latencies, ms.
pub(super) fn bench_edits_during_repair(engine: &Engine, model: &Model) -> Result<Vec<f64>> {
    let cases = repair_cases()?;
    let head = Head::of(&model.weights, None)?;
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
                if star_ls::env::in_background(|| star.repair(&cases, &[])).is_ok() {
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
            latencies
                .extend(bench_edits(engine, KEYSTROKE_GAP, &CrossFile::default())?.latencies_ms);
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
    cross: &CrossFile,
) -> Result<star_ls::completion::Completion> {
    let (prefix, suffix) = doc.split_at(cursor);
    let completion = engine.complete_blocking(CompletionRequest {
        document: name.to_owned(),
        prefix,
        suffix,
        stop: StopAt::Line,
        cancel: Cancel::default(),
        cross: cross.clone(),
    })?;
    Ok(completion)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_anchor_is_in_the_document_once() {
        assert_eq!(DOCUMENT.matches(EDIT_ANCHOR).count(), 1);
        assert_eq!(TYPED.chars().count(), 20);
    }
}
