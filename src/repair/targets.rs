//! From a case to what the model is trained to say: the FIM prompt the server would build at the case's
//! cursor, then the developer's text and the end of the line, fed in teacher-forced.

use crate::completion::{fim_prompt, ContextLimits};
use crate::model::{
    generate, Cancel, GenerateParams, Generation, KvCache, PatchSet, Prompt, Qwen2, StopAt,
    Tokenizer,
};

/// A case as the repair engine sees it (CONTRACT.md's cases-JSONL fields).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Case {
    pub id: String,
    #[serde(default)]
    pub language: String,
    pub prefix: String,
    pub suffix: String,
    pub target: String,
    #[serde(default)]
    pub group: String,
}

/// The text after the cursor when a case is completed: the rest of the target line is empty, then the
/// lines after it. Serving, repair and eval all complete a case this way.
pub fn text_after_cursor(case: &Case) -> String {
    format!("\n{}", case.suffix)
}

#[derive(Debug, Clone)]
pub struct TeacherForced {
    /// The prompt, then the target tokens but the last: one forward pass scores every target token.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// What the model must produce: the healed bytes, the developer's text, and the end of the line.
    pub target: Vec<u32>,
    /// The prompt generation would run, whose healed bytes and line shape constrain its decisions
    /// (`mask_rows`).
    pub prompt: Prompt,
}

impl TeacherForced {
    /// The row of the forward pass whose logits predict target token `i`.
    pub fn row(&self, i: usize) -> usize {
        self.prompt_len - 1 + i
    }
}

pub fn teacher_forced(tok: &Tokenizer, case: &Case, limits: ContextLimits) -> TeacherForced {
    let prompt = fim_prompt(tok, &case.prefix, &text_after_cursor(case), limits);
    let mut text = prompt.heal.clone();
    text.extend_from_slice(case.target.trim_end().as_bytes());
    // The end of the line is a target too: without it the repaired line runs on (METHOD.md).
    text.push(b'\n');
    let target = tok.encode(&String::from_utf8_lossy(&text));
    let prompt_len = prompt.tokens.len();
    let mut tokens = prompt.tokens.clone();
    tokens.extend_from_slice(&target[..target.len() - 1]);
    TeacherForced {
        tokens,
        prompt_len,
        target,
        prompt,
    }
}

/// Whether predicting `got` where the developer's text has `want` leaves the line the same: the same
/// token; or `want` ends the line and `got` ends it at the same place (`)\n` for `)\n    `: what
/// follows the newline is the next line's), or stops just before the newline (`)` for `)\n`: the line
/// ends there either way), or — where `want` is the bare end of line — stops generation.
pub fn same_line(tok: &Tokenizer, got: u32, want: u32) -> bool {
    if got == want {
        return true;
    }
    let (g, w) = (tok.token_bytes(got), tok.token_bytes(want));
    let Some(end) = w.iter().position(|&b| b == b'\n') else {
        return false;
    };
    if tok.is_stop(got) {
        return w[..end].trim_ascii().is_empty();
    }
    match g.iter().position(|&b| b == b'\n') {
        Some(g_end) => g[..g_end] == w[..end],
        None => !g.is_empty() && w[..end].trim_ascii_end() == g,
    }
}

/// The greedy line the serving model completes a case with, under `patches` (and the entries that
/// opened on the way): CONTRACT.md's pass criterion is that its text equals the target (trailing
/// whitespace ignored).
pub fn complete_case(
    model: &Qwen2,
    tok: &Tokenizer,
    case: &Case,
    limits: ContextLimits,
    patches: Option<&PatchSet>,
) -> candle_core::Result<Generation> {
    let prompt = fim_prompt(tok, &case.prefix, &text_after_cursor(case), limits);
    greedy_case(model, tok, case, &prompt, &mut model.new_cache(), patches)
}

/// `complete_case` from a `prompt` already built, reusing what `cache` holds of it.
pub fn greedy_case(
    model: &Qwen2,
    tok: &Tokenizer,
    case: &Case,
    prompt: &Prompt,
    cache: &mut KvCache,
    patches: Option<&PatchSet>,
) -> candle_core::Result<Generation> {
    let params = GenerateParams {
        // Room for the target's tokens and some: a line that runs on is wrong either way.
        max_tokens: tok.encode(&case.target).len() + 8,
        stop: StopAt::Line,
        ..GenerateParams::default()
    };
    generate(
        model,
        tok,
        prompt,
        cache,
        patches,
        &params,
        &Cancel::default(),
    )
}

pub fn passes(completion: &str, case: &Case) -> bool {
    completion.trim_end() == case.target.trim_end()
}
