//! Settings from `initializationOptions`, all optional, camelCase as editors write them.

use crate::completion::ContextLimits;
use crate::learn::RepairSettings;
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Settings {
    /// A qwen2 GGUF; default `STAR_LS_MODEL`, then the fetched model in the cache.
    pub model_path: Option<PathBuf>,
    /// Tokens a completion may run to.
    pub max_tokens: usize,
    /// Context around the cursor, in tokens.
    pub context: ContextLimits,
    /// Threads for inference; default: all cores.
    pub threads: Option<usize>,
    /// Wait this long after a request before running the model; a newer request for the same document
    /// in the meantime replaces it.
    pub debounce_ms: u64,
    /// Inline completions: `auto` runs to the end of the block on an empty line, else to the end of
    /// the line; `line` and `block` force one.
    pub multiline: Multiline,
    /// Sampling temperature; 0 is greedy.
    pub temperature: f32,
    /// A shown completion untouched this long is decided (accepted, rejected or corrected).
    pub capture_idle_ms: u64,
    /// The feedback store's size cap; beyond it the oldest records are pruned.
    pub store_max_mb: u64,
    /// Repair in the background once this many new failures are pending; 0: only on `star.repairNow`.
    pub repair_threshold: u64,
    /// The live patches' memory (deltas, columns, keys) at most, in MiB: past it the oldest stop
    /// applying (evicted) so that learning never stops.
    pub patch_memory_mb: u64,
    /// Guard cases (accepted completions) a repair checks, the newest first.
    pub repair_guards: usize,
    /// Tokens of the files opened and edited lately that a completion's prompt may take, the chunks
    /// most like the text around the cursor first; 0 turns it off.
    pub cross_file_tokens: usize,
    /// How they go into the prompt: `repo` (Qwen2.5-Coder's repo-level format) or `concat`.
    pub cross_file_layout: crate::completion::Layout,
    /// Globs of files never completed or recorded, beside the defaults (`.env*`, `*.pem`, `*.key`,
    /// `id_*`); one with a `/` matches the whole path.
    pub exclude: Vec<String>,
    /// The repair engine's settings (`RepairSettings`, camelCase; unset keys keep their defaults);
    /// its window is `context`. `{"patch": "columns", "gate": 0}` makes patches that a LoRA
    /// adapter serves exactly (`star-ls patches export --format gguf-lora`).
    pub repair: RepairSettings,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Multiline {
    Auto,
    Line,
    Block,
}

impl Default for Settings {
    fn default() -> Self {
        let policy = crate::learn::Policy::default();
        Self {
            model_path: None,
            max_tokens: 64,
            context: ContextLimits::default(),
            threads: None,
            debounce_ms: 30,
            multiline: Multiline::Auto,
            temperature: 0.0,
            capture_idle_ms: 8000,
            store_max_mb: 256,
            repair_threshold: policy.repair_threshold,
            patch_memory_mb: policy.patch_memory_mb,
            repair_guards: policy.repair_guards,
            cross_file_tokens: 0,
            cross_file_layout: crate::completion::Layout::default(),
            exclude: Vec::new(),
            repair: policy.repair,
        }
    }
}

impl Settings {
    /// Reads `initializationOptions`; a malformed value is reported and the defaults used.
    pub fn from_options(options: Option<serde_json::Value>) -> (Self, Option<String>) {
        let read = match options {
            None | Some(serde_json::Value::Null) => return (Self::default(), None),
            Some(v) => Self::read(v),
        };
        match read {
            Ok(s) => (s, None),
            Err(e) => (
                Self::default(),
                Some(format!("ignoring initializationOptions: {e}")),
            ),
        }
    }

    /// `initializationOptions` read and checked: why not, when they cannot be used.
    fn read(v: serde_json::Value) -> Result<Self, String> {
        if v["repair"].get("context").is_some() {
            return Err(
                "repair.context: a repair works in the completion's window, `context`".into(),
            );
        }
        let s = serde_json::from_value::<Self>(v).map_err(|e| e.to_string())?;
        crate::application::Exclude::with(&s.exclude).map_err(|e| format!("exclude: {e}"))?;
        s.repair.check().map_err(|e| format!("repair: {e}"))?;
        Ok(s)
    }
}

impl Settings {
    /// The learning policy these settings give (`star-ls replay` runs the default one).
    pub fn policy(&self) -> crate::learn::Policy {
        let mut policy = crate::learn::Policy {
            repair_threshold: self.repair_threshold,
            repair_guards: self.repair_guards,
            patch_memory_mb: self.patch_memory_mb,
            repair: self.repair,
        };
        // Repairs key their gates where completions are made.
        policy.repair.context = self.context;
        policy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn repairs_work_in_the_completion_window() {
        let options = json!({ "context": { "prefixTokens": 300, "suffixTokens": 20 } });
        let (s, err) = Settings::from_options(Some(options));
        assert_eq!(err, None);
        let window = s.policy().repair.context;
        assert_eq!((window.prefix_tokens, window.suffix_tokens), (300, 20));
    }

    #[test]
    fn repair_settings_reach_the_policy_and_bad_ones_are_named() {
        let options = json!({ "repair": { "patch": "columns", "gate": 0 } });
        let (s, err) = Settings::from_options(Some(options));
        assert_eq!(err, None);
        let repair = s.policy().repair;
        assert_eq!(
            (serde_json::to_value(repair.patch).unwrap(), repair.gate),
            (json!("columns"), 0.0)
        );
        for (bad, named) in [
            (json!({ "patchKind": "columns" }), "patchKind"),
            (json!({ "gate": 0 }), "patch \"values\" needs gates"),
            (
                json!({ "context": { "prefixTokens": 10 } }),
                "repair.context",
            ),
        ] {
            let (s, err) = Settings::from_options(Some(json!({ "repair": bad })));
            let err = err.unwrap();
            assert!(err.contains(named), "{err}");
            assert_eq!(
                serde_json::to_value(s.repair.patch).unwrap(),
                json!("values")
            );
        }
    }

    #[test]
    fn an_unknown_context_key_is_named() {
        let options = json!({ "context": { "prefixTokenz": 300 } });
        let (s, err) = Settings::from_options(Some(options));
        assert!(err.unwrap().contains("prefixTokenz"));
        assert_eq!(s.context.prefix_tokens, 1024);
    }
}
