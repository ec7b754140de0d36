//! Generation: prefill what the cache lacks, then decode token by token under the stop rules, with
//! token healing at the cursor and cancellation between tokens.

use super::{Fired, FiredEntries, Hooks, KvCache, PatchSet, Qwen2, Tokenizer};
use candle_core::Result;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Set from any thread to stop a generation between two tokens (or two prefill chunks).
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed)
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Where a completion ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StopAt {
    /// The end of the current line.
    Line,
    /// The end of the block begun at the cursor: a line indented less than `indent`, or a blank line
    /// after at least one full line.
    Block,
}

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub stop: StopAt,
    /// 0 is greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    /// Prefill chunk: bounds attention memory and how long a cancel waits.
    pub chunk: usize,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 64,
            stop: StopAt::Line,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            chunk: 256,
        }
    }
}

/// A prompt ready to run: token ids plus what the output must start with and where it must end.
#[derive(Debug, Clone, Default)]
pub struct Prompt {
    pub tokens: Vec<u32>,
    /// Bytes cut from the end of the prefix at a token boundary: the first generated tokens must
    /// re-produce them, and they are not part of the completion.
    pub heal: Vec<u8>,
    /// Indentation (in columns) of the line the cursor is on, for block stops.
    pub indent: usize,
    /// The first non-blank line after the cursor's line, trimmed: generating it again means the
    /// completion ran into the suffix.
    pub suffix_line: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    EndOfLine,
    EndOfBlock,
    Suffix,
    StopToken,
    MaxTokens,
    Cancelled,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    /// Prompt tokens actually run; the rest came from the cache.
    pub prefilled: usize,
    pub stop: StopReason,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    /// The ledger's entries that opened at the rows this generation ran (rows from the cache were
    /// counted by the generation that ran them).
    pub fired: Vec<FiredEntries>,
}

/// Runs `prompt` on `model`, reusing the longest common prefix of `cache`, and decodes a completion.
pub fn generate(
    model: &Qwen2,
    tokenizer: &Tokenizer,
    prompt: &Prompt,
    cache: &mut KvCache,
    patches: Option<&PatchSet>,
    params: &GenerateParams,
    cancel: &Cancel,
) -> Result<Generation> {
    let t0 = Instant::now();
    let common = cache
        .tokens()
        .iter()
        .zip(&prompt.tokens)
        .take_while(|(a, b)| a == b)
        .count()
        // At least one token must run to get logits.
        .min(prompt.tokens.len().saturating_sub(1));
    cache.truncate(common)?;
    let mut out = Generation {
        text: String::new(),
        tokens: Vec::new(),
        prompt_tokens: prompt.tokens.len(),
        prefilled: prompt.tokens.len() - common,
        stop: StopReason::MaxTokens,
        prefill_ms: 0.0,
        decode_ms: 0.0,
        fired: Vec::new(),
    };
    let mut fired = Fired::default();
    fn hooks<'a>(patches: Option<&'a PatchSet>, fired: &'a mut Fired) -> Hooks<'a> {
        Hooks {
            patches,
            fired: Some(fired),
            ..Hooks::default()
        }
    }
    let mut logits = Vec::new();
    for chunk in prompt.tokens[common..].chunks(params.chunk.max(1)) {
        if cancel.is_cancelled() {
            out.stop = StopReason::Cancelled;
            return Ok(out);
        }
        logits = model.next_logits(chunk, cache, &mut hooks(patches, &mut fired))?;
    }
    let t1 = Instant::now();
    out.prefill_ms = (t1 - t0).as_secs_f64() * 1e3;

    let mut rng = StdRng::seed_from_u64(params.seed);
    let mut bytes: Vec<u8> = Vec::new();
    let mut decoder = LineRules::new(prompt);
    while out.tokens.len() < params.max_tokens {
        if cancel.is_cancelled() {
            out.stop = StopReason::Cancelled;
            break;
        }
        let healing = bytes.len() < prompt.heal.len();
        if healing {
            mask_to_heal(tokenizer, &mut logits, &prompt.heal[bytes.len()..]);
        }
        let next = sample(&logits, params, &mut rng);
        if tokenizer.is_stop(next) {
            out.stop = StopReason::StopToken;
            break;
        }
        out.tokens.push(next);
        bytes.extend_from_slice(tokenizer.token_bytes(next));
        if bytes.len() >= prompt.heal.len() {
            if let Some(reason) = decoder.feed(&bytes[prompt.heal.len()..], params.stop) {
                out.stop = reason;
                break;
            }
        }
        logits = model.next_logits(&[next], cache, &mut hooks(patches, &mut fired))?;
    }
    let body = bytes.get(prompt.heal.len()..).unwrap_or(&[]);
    let body = &body[..decoder.cut.unwrap_or(body.len()).min(body.len())];
    out.text = utf8_prefix(body);
    out.decode_ms = t1.elapsed().as_secs_f64() * 1e3;
    out.fired = fired.entries();
    Ok(out)
}

/// The longest valid UTF-8 prefix (a token budget can end inside a character).
fn utf8_prefix(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(e) => String::from_utf8_lossy(&bytes[..e.valid_up_to()]).into_owned(),
    }
}

/// Keep only tokens consistent with the bytes still to heal: the token is a prefix of them, or
/// starts with all of them.
pub fn mask_to_heal(tokenizer: &Tokenizer, logits: &mut [f32], rest: &[u8]) {
    for (id, l) in logits.iter_mut().enumerate() {
        let b = tokenizer.token_bytes(id as u32);
        let ok = !b.is_empty() && (rest.starts_with(b) || b.starts_with(rest));
        if !ok {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Teacher-forced decision rows as generation sees them: `rows[i]` predicts `forced[i]`, and while the
/// forced tokens have not yet re-produced `heal`, a row keeps only tokens consistent with what is left.
pub fn mask_rows_to_heal(
    tokenizer: &Tokenizer,
    rows: &mut [Vec<f32>],
    forced: &[u32],
    heal: &[u8],
) {
    let mut consumed = 0;
    for (row, token) in rows.iter_mut().zip(forced) {
        if consumed >= heal.len() {
            break;
        }
        mask_to_heal(tokenizer, row, &heal[consumed..]);
        consumed += tokenizer.token_bytes(*token).len();
    }
}

/// The greedy choice: the first token with the highest logit.
pub fn argmax(logits: &[f32]) -> u32 {
    logits
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &l)| {
            if l > best.1 {
                (i, l)
            } else {
                best
            }
        })
        .0 as u32
}

fn sample(logits: &[f32], p: &GenerateParams, rng: &mut StdRng) -> u32 {
    if p.temperature <= 0.0 {
        return argmax(logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l - max) / p.temperature).exp()))
        .filter(|(_, w)| *w > 0.0)
        .collect();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f32 = probs.iter().map(|x| x.1).sum();
    let mut kept = 0.0;
    let cut = probs
        .iter()
        .position(|(_, w)| {
            kept += w / total;
            kept >= p.top_p
        })
        .map_or(probs.len(), |i| i + 1);
    probs.truncate(cut);
    let mass: f32 = probs.iter().map(|x| x.1).sum();
    let mut r = rng.random::<f32>() * mass;
    for (id, w) in &probs {
        r -= w;
        if r <= 0.0 {
            return *id;
        }
    }
    probs.last().map_or_else(|| argmax(logits), |x| x.0)
}

/// Stop rules over the completion text as it grows.
struct LineRules<'a> {
    prompt: &'a Prompt,
    /// Byte length of the text to keep, once a rule fired.
    cut: Option<usize>,
}

impl<'a> LineRules<'a> {
    fn new(prompt: &'a Prompt) -> Self {
        Self { prompt, cut: None }
    }

    fn feed(&mut self, text: &[u8], stop: StopAt) -> Option<StopReason> {
        let first_nl = text.iter().position(|&b| b == b'\n')?;
        if stop == StopAt::Line {
            self.cut = Some(first_nl);
            return Some(StopReason::EndOfLine);
        }
        // Block: judge each complete line after the first.
        let mut start = first_nl + 1;
        let mut full_lines = 0;
        while let Some(len) = text[start..].iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&text[start..start + len]);
            let end_before = start - 1;
            if line.trim().is_empty() {
                if full_lines > 0 {
                    self.cut = Some(end_before);
                    return Some(StopReason::EndOfBlock);
                }
            } else {
                if self.prompt.suffix_line.as_deref() == Some(line.trim()) {
                    self.cut = Some(end_before);
                    return Some(StopReason::Suffix);
                }
                if indent_of(&line) < self.prompt.indent {
                    self.cut = Some(end_before);
                    return Some(StopReason::EndOfBlock);
                }
                full_lines += 1;
            }
            start += len + 1;
        }
        None
    }
}

/// Columns of leading whitespace (a tab counts 4).
pub fn indent_of(line: &str) -> usize {
    line.chars()
        .take_while(|c| c.is_whitespace())
        .map(|c| if c == '\t' { 4 } else { 1 })
        .sum()
}
