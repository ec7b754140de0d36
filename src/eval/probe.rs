//! A case made cheap to re-check under many overlays. Patches live only in the layers a repair may
//! touch, so the residual stream entering the first of them is the same under every overlay: it is
//! captured once from the unpatched model, and each check is one teacher-forced pass through the
//! upper layers (a quarter of the model for the defaults) instead of a prefill and a decode.

use crate::completion::{fim_prompt, ContextLimits};
use crate::model::generate::{argmax, mask_rows, StopReason};
use crate::model::{Capture, Hooks, KvCache, PatchSet, Prompt, Qwen2, Tokenizer};
use crate::repair::{
    greedy_case, passes, same_line, teacher_forced, text_after_cursor, Case, Residuals,
};
use candle_core::{Result, Tensor};

/// How far the top logit of `row` leads the next one (finite: a healing mask may leave one token).
fn lead(row: &[f32]) -> f32 {
    let (mut first, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &l in row {
        if l > first {
            (first, second) = (l, first);
        } else if l > second {
            second = l;
        }
    }
    (first - second).min(f32::MAX)
}

/// Tokens fed after the prompt; decision `i` predicts `forced[i]`.
struct Forced {
    forced: Vec<u32>,
    /// The residual entering the first patchable layer at `forced[..len - 1]` (None when that is empty).
    residual: Option<Tensor>,
}

pub struct Probe {
    /// Whether the unpatched model's greedy line is the developer's.
    pub passes: bool,
    first: usize,
    prompt: Prompt,
    /// The prompt and the developer's text but its last token, as repair teacher-forces them.
    forced_tokens: Vec<u32>,
    prompt_residual: Tensor,
    /// The unpatched greedy tokens (and a stop row if a stop token ended them).
    greedy: Forced,
    /// The developer's healed text and the end of the line.
    target: Forced,
    /// The decisions the unpatched model makes along `greedy`, by this same path.
    base: Vec<u32>,
    /// By how many logits each of those decisions led the runner-up.
    base_leads: Vec<f32>,
}

/// Where a patch first changed a sampled completion.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Change {
    /// Index of the first greedy decision that differs.
    pub decision: usize,
    /// By how many logits the unpatched model's token led the runner-up there: a near tie flips under
    /// any small perturbation.
    pub base_lead: f32,
}

impl Probe {
    /// Completes `case` greedily on the unpatched model (the same line `complete_case` gives) and keeps
    /// what later checks need.
    pub fn new(
        model: &Qwen2,
        tok: &Tokenizer,
        case: &Case,
        limits: ContextLimits,
        first: usize,
    ) -> Result<Self> {
        let prompt = fim_prompt(tok, &case.prefix, &text_after_cursor(case), limits);
        let mut cache = model.new_cache();
        // A whole pass (greedy decoding goes on from its cache), keeping the residual entering `first`.
        let mut capture = Capture::layers([first]);
        model.forward(
            &prompt.tokens,
            &mut cache,
            &mut Hooks {
                capture: Some(&mut capture),
                ..Hooks::default()
            },
        )?;
        let prompt_residual = capture
            .residual
            .remove(&first)
            .ok_or_else(|| candle_core::Error::Msg(format!("no layer {first}")))?;
        let after_prompt = cache.clone();
        let g = greedy_case(model, tok, case, &prompt, &mut cache, None)?;
        let forced = |mut forced: Vec<u32>, stop_row: bool| -> Result<Forced> {
            if stop_row {
                forced.push(0); // never fed: only its decision is compared
            }
            let input = &forced[..forced.len().saturating_sub(1)];
            let residual = match input.is_empty() {
                true => None,
                false => {
                    Some(model.residual_entering(first, input, &mut after_prompt.clone(), None)?)
                }
            };
            Ok(Forced { forced, residual })
        };
        let greedy = forced(g.tokens.clone(), g.stop == StopReason::StopToken)?;
        let tf = teacher_forced(tok, case, limits);
        let target = forced(tf.target, false)?;
        let mut probe = Self {
            passes: passes(&g.text, case),
            first,
            prompt,
            forced_tokens: tf.tokens,
            prompt_residual,
            greedy,
            target,
            base: Vec::new(),
            base_leads: Vec::new(),
        };
        let rows = probe.rows(model, tok, &probe.greedy, None)?;
        probe.base = rows.iter().map(|r| argmax(r)).collect();
        probe.base_leads = rows.iter().map(|r| lead(r)).collect();
        Ok(probe)
    }

    /// The greedy decision at each forced position under `patches` (healing masks as in generation).
    fn decisions(
        &self,
        model: &Qwen2,
        tok: &Tokenizer,
        f: &Forced,
        patches: Option<&PatchSet>,
    ) -> Result<Vec<u32>> {
        let rows = self.rows(model, tok, f, patches)?;
        Ok(rows.iter().map(|r| argmax(r)).collect())
    }

    /// The logits at each forced position under `patches`, healing masks applied.
    fn rows(
        &self,
        model: &Qwen2,
        tok: &Tokenizer,
        f: &Forced,
        patches: Option<&PatchSet>,
    ) -> Result<Vec<Vec<f32>>> {
        if f.forced.is_empty() {
            return Ok(Vec::new());
        }
        let x = match &f.residual {
            Some(r) => Tensor::cat(&[&self.prompt_residual, r], 0)?,
            None => self.prompt_residual.clone(),
        };
        let hidden = model.forward_from(
            self.first,
            &model.layers()[self.first..],
            &x,
            &mut Hooks {
                patches,
                ..Hooks::default()
            },
        )?;
        let rows = hidden.narrow(0, self.prompt.tokens.len() - 1, f.forced.len())?;
        let mut rows = model.logits(&rows)?.to_vec2::<f32>()?;
        mask_rows(tok, &mut rows, &f.forced, &self.prompt);
        Ok(rows)
    }

    /// The first decision of the unpatched greedy completion that `patches` change (None: the
    /// completion is unchanged).
    pub fn changed(
        &self,
        model: &Qwen2,
        tok: &Tokenizer,
        patches: &PatchSet,
    ) -> Result<Option<Change>> {
        let got = self.decisions(model, tok, &self.greedy, Some(patches))?;
        Ok(got
            .iter()
            .zip(&self.base)
            .position(|(g, b)| g != b)
            .map(|decision| Change {
                decision,
                base_lead: self.base_leads[decision],
            }))
    }

    /// Whether under `patches` the model says the developer's text at every target position, end of
    /// line included (the criterion repair itself stops on).
    pub fn says_target(&self, model: &Qwen2, tok: &Tokenizer, patches: &PatchSet) -> Result<bool> {
        let got = self.decisions(model, tok, &self.target, Some(patches))?;
        Ok(got
            .iter()
            .zip(&self.target.forced)
            .all(|(g, w)| same_line(tok, *g, *w)))
    }

    /// The frozen lower layers run once over the case as repair teacher-forces it: the residual a
    /// repair of it starts from goes to `residuals`, and the keys and values along the prompt come
    /// back, for `completes` to decode from under any overlay.
    pub fn lower(&self, model: &Qwen2, residuals: &Residuals) -> Result<KvCache> {
        let mut cache = model.new_cache();
        let residual =
            model.residual_entering(self.first, &self.forced_tokens, &mut cache, None)?;
        residuals.keep(self.first, &self.forced_tokens, residual);
        cache.truncate(self.prompt.tokens.len() - 1)?;
        Ok(cache)
    }

    /// Whether the greedy line under `patches` is the developer's: `complete_case`, with the layers
    /// below the patches taken from `lower` (what `lower` returned) instead of run again.
    pub fn completes(
        &self,
        model: &Qwen2,
        tok: &Tokenizer,
        case: &Case,
        mut lower: KvCache,
        patches: &PatchSet,
    ) -> Result<bool> {
        let residual = self.prompt_residual.narrow(0, 0, lower.len())?;
        model.finish_cache(self.first, &residual, &mut lower, Some(patches))?;
        let g = greedy_case(model, tok, case, &self.prompt, &mut lower, Some(patches))?;
        Ok(passes(&g.text, case))
    }
}
