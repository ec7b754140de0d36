//! What the server learns from, as one sequence that the server and `star-ls replay` both run: the
//! pending failures and the newest guards are read from the store (`Job::pending`), repaired off the
//! store's thread (`repair::Star`), and an accepted patch is written to the ledger within the memory
//! budget (`commit`), from which the live overlay is built (`overlay`).
//!
//! Architecture invariant: the only module that knows both the repair engine and the store; no
//! protocol, no threads of its own.

use crate::capture::CaseKind;
use crate::model::memory::key_width;
use crate::model::Qwen2;
use crate::model::{Config, Gate, LayerPatch, PatchSet};
/// The engine's settings a `Policy` carries (the server's `repair` setting).
pub use crate::repair::RepairSettings;
use crate::repair::{Case, Head, RepairOutcome};
use crate::store::{
    NarrowedGate, PatchGate, PatchLayer, PatchRecord, Store, StoreError, StoredCase,
};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;

/// When the server repairs, on what, and how much it keeps: the settings of the same names
/// (`repairThreshold`, `repairGuards`, `patchMemoryMb`), which `star-ls replay` runs with too.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Repair once this many failures are pending that no repair has seen; 0: only when asked.
    pub repair_threshold: u64,
    /// Guard cases a repair checks, the newest first.
    pub repair_guards: usize,
    /// The live patches' memory at most, MiB: past it the oldest are evicted.
    pub patch_memory_mb: u64,
    /// The engine's settings (the server runs the defaults; `star-ls replay` can try others).
    pub repair: RepairSettings,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            repair_threshold: 4,
            repair_guards: 8,
            patch_memory_mb: 128,
            repair: RepairSettings::default(),
        }
    }
}

impl Policy {
    pub fn patch_memory_bytes(&self) -> u64 {
        self.patch_memory_mb.saturating_mul(1 << 20)
    }
}

/// The cases one repair works on.
#[derive(Debug, Clone, Default)]
pub struct Job {
    /// Every failure no active patch has repaired.
    pub failures: Vec<Case>,
    /// The newest guard cases, oldest first: each costs the repair a pass, and each narrows the room
    /// the patch is solved in (60 guards left too little to fix anything in a measured repair).
    pub guards: Vec<Case>,
}

impl Job {
    pub fn pending(store: &Store, max_guards: usize) -> Result<Self, StoreError> {
        let stored = store.cases(None)?;
        let failures = stored
            .iter()
            .filter(|c| c.kind == CaseKind::Failure && c.repaired_by.is_none())
            .map(Case::from)
            .collect();
        let mut guards: Vec<Case> = stored
            .iter()
            .rev()
            .filter(|c| c.kind == CaseKind::Guard)
            .take(max_guards)
            .map(Case::from)
            .collect();
        guards.reverse();
        Ok(Self { failures, guards })
    }
}

/// What a repair did: `star.repairNow`'s answer, and what the ledger keeps with a patch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RepairReport {
    /// The ledger's id of the patch kept, if one was.
    pub patch_id: Option<String>,
    /// The stored failures no patch had repaired when it started: all of them were given to it.
    pub pending: usize,
    /// Those of them the model got wrong when the repair checked them (teacher-forced, in the
    /// repair's context window); the others it already says right there.
    pub failures: usize,
    pub fixed: usize,
    pub guard_before: f32,
    pub guard_after: f32,
    pub seconds: f64,
    pub layers: Vec<usize>,
    pub neurons_per_layer: usize,
    pub steps: usize,
    pub solves: usize,
    /// Why no patch was kept although there were failures.
    pub refused: Option<String>,
    /// Older patches that stopped applying to keep the live ones within `patchMemoryMb`.
    pub evicted: Vec<String>,
    /// Older patches whose gates were narrowed: they opened where a failure was still wrong.
    pub narrowed: Vec<String>,
}

impl RepairReport {
    /// Whether the ledger's live patches changed: one added, or older ones narrowed.
    pub fn changed_overlay(&self) -> bool {
        self.patch_id.is_some() || !self.narrowed.is_empty()
    }

    /// The failures it was given and did not fix: they stay pending, and the scheduler counts new
    /// ones past them. A refused patch fixed none (`fixed` still says what it would have fixed).
    pub fn unfixed(&self) -> usize {
        match self.refused {
            Some(_) => self.pending,
            None => self.pending.saturating_sub(self.fixed),
        }
    }
}

impl From<&RepairOutcome> for RepairReport {
    fn from(o: &RepairOutcome) -> Self {
        Self {
            patch_id: None,
            pending: 0,
            failures: o.failures,
            fixed: o.fixed,
            guard_before: o.guard_before,
            guard_after: o.guard_after,
            seconds: o.seconds,
            layers: o.layers.clone(),
            neurons_per_layer: o.neurons_per_layer,
            steps: o.steps,
            solves: o.solves,
            refused: o.refused.clone(),
            evicted: Vec::new(),
            narrowed: Vec::new(),
        }
    }
}

/// Writes a repair of `job` to the ledger: the live gates it narrowed, and an accepted patch (marking
/// the cases it fixed), evicting the oldest patches of model `sha` past `budget` bytes. The report,
/// with the patch's id and what was narrowed and evicted. The live overlay changed when it names a
/// patch or a narrowed one (`RepairReport::changed_overlay`).
pub fn commit(
    store: &mut Store,
    sha: &str,
    now_ms: i64,
    job: &Job,
    outcome: &RepairOutcome,
    budget: u64,
) -> Result<RepairReport, CommitError> {
    let mut report = RepairReport {
        pending: job.failures.len(),
        ..RepairReport::from(outcome)
    };
    let narrowed: Vec<NarrowedGate> = outcome
        .narrowed
        .iter()
        .map(|n| NarrowedGate {
            patch: n.patch.to_string(),
            layer: n.layer,
            thresholds: n.thresholds.clone(),
        })
        .collect();
    report.narrowed = store.narrow_gates(&narrowed)?;
    if outcome.patches.is_empty() {
        return Ok(report);
    }
    let layers = ledger_layers(&outcome.patches)?;
    let stored = serde_json::to_value(&report).unwrap_or_default();
    let id = store.add_patch(sha, now_ms, &stored, &layers, &outcome.fixed_ids)?;
    report.evicted = store.evict_over(sha, budget)?;
    report.patch_id = Some(id);
    Ok(report)
}

/// Reading or writing the ledger's patches.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("could not read the patch: {0}")]
    Patch(#[from] candle_core::Error),
}

impl From<&StoredCase> for Case {
    fn from(c: &StoredCase) -> Self {
        Self {
            id: c.id.clone(),
            language: c.language.clone(),
            prefix: c.prefix.clone(),
            suffix: c.suffix.clone(),
            target: c.target.clone(),
            group: c.group.clone(),
        }
    }
}

/// A repair's patches as the ledger stores them.
pub fn ledger_layers(patches: &[(usize, LayerPatch)]) -> candle_core::Result<Vec<PatchLayer>> {
    patches
        .iter()
        .map(|(layer, p)| {
            let (hidden, _) = p.delta().dims2()?;
            Ok(PatchLayer {
                layer: *layer,
                hidden,
                columns: p.columns().to_vec(),
                delta: p.delta().flatten_all()?.to_vec1()?,
                gate: match p.gate() {
                    Some(g) => Some(PatchGate {
                        keys: g.keys().flatten_all()?.to_vec1()?,
                        center: g.center().map(|c| c.flatten_all()?.to_vec1()).transpose()?,
                        threshold: g.top_threshold(),
                        thresholds: g.thresholds().to_vec(),
                    }),
                    None => None,
                },
            })
        })
        .collect()
}

/// Marks the ledger's records whose layers do not fit `config` as damaged: a neuron or width out of
/// range would make every pass under them fail, a layer out of range would move nothing.
pub fn check_fit(records: &mut [PatchRecord], config: &Config) {
    for rec in records.iter_mut().filter(|r| r.damaged.is_none()) {
        let misfit = rec.layers.iter().find_map(|l| {
            let wide = l
                .columns
                .iter()
                .any(|&c| c as usize >= config.intermediate_size)
                || l.gate
                    .as_ref()
                    .and_then(|g| g.center.as_ref())
                    .is_some_and(|c| {
                        // Sketched, or as wide as the layer (a ledger of 2026-12-06).
                        let m = config.intermediate_size;
                        c.len() != key_width(m) && c.len() != m
                    });
            (l.layer >= config.num_layers || l.hidden != config.hidden_size || wide).then(|| {
                format!(
                    "layer {} (hidden {}, neurons up to {:?}) does not fit the model",
                    l.layer,
                    l.hidden,
                    l.columns.iter().max()
                )
            })
        });
        if misfit.is_some() {
            rec.damaged = misfit;
        }
    }
}

/// The overlay the store's active patches for `model_sha` serve on a model of `config` (those that
/// do not fit it left out, as the server leaves them), and how many patches they are.
pub fn serving(
    store: &Store,
    model_sha: &str,
    config: &Config,
) -> Result<(PatchSet, usize), CommitError> {
    let mut records = store.patches(Some(model_sha), true)?;
    check_fit(&mut records, config);
    Ok((overlay(&records)?, records.len()))
}

/// The overlay the ledger's active patches make, the ungated summed in the order they were accepted;
/// damaged ones left out.
pub fn overlay(records: &[PatchRecord]) -> candle_core::Result<PatchSet> {
    let mut set = PatchSet::default();
    let usable = records.iter().filter(|r| r.damaged.is_none());
    for (id, layer) in usable.flat_map(|r| r.layers.iter().map(move |l| (&r.id, l))) {
        let n = layer.columns.len();
        // `(hidden, columns)`, or `(hidden, keys)` for values.
        let inputs = layer.delta.len() / layer.hidden.max(1);
        let delta = Tensor::from_vec(layer.delta.clone(), (layer.hidden, inputs), &Device::Cpu)?;
        let gate = match &layer.gate {
            Some(g) => {
                let width = g.width(n).max(1);
                let keys =
                    Tensor::from_vec(g.keys.clone(), (g.keys.len() / width, width), &Device::Cpu)?;
                let center = g
                    .center
                    .as_ref()
                    .map(|c| Tensor::new(c.as_slice(), &Device::Cpu))
                    .transpose()?;
                Some(Gate::stored_per_key(&keys, center.as_ref(), g.per_key(n))?)
            }
            None => None,
        };
        let patch = match gate {
            Some(g) if n == 0 => LayerPatch::values(delta, g)?,
            gate => LayerPatch::new(layer.columns.clone(), delta)?.gated(gate),
        };
        set = set.with(layer.layer, patch.named(id))?;
    }
    Ok(set)
}

/// `model`'s factored head (`Head::of`), its factor kept in `file` (keyed by the model's sha256):
/// read from there when it holds this head's, else computed and written there for next time.
pub fn head(model: &Qwen2, file: &Path) -> candle_core::Result<Head> {
    let stored = std::fs::read(file).ok();
    let head = Head::of(model, stored.as_deref())?;
    let bytes = head.factor_bytes();
    if stored.as_deref() != Some(bytes.as_slice()) {
        if let Err(e) = write_atomically(file, &bytes) {
            tracing::warn!(
                "could not cache the LM head factor in {}: {e}",
                file.display()
            );
        }
    }
    Ok(head)
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The sha256 of a file, hex: patches are only ever applied to the model they were made for.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::RepairReport;

    #[test]
    fn a_refused_patch_leaves_every_failure_pending() {
        let kept = RepairReport {
            pending: 4,
            failures: 4,
            fixed: 3,
            ..RepairReport::default()
        };
        assert_eq!(kept.unfixed(), 1);
        let refused = RepairReport {
            refused: Some("the patch lowers the guard pass rate from 1.00 to 0.75".into()),
            ..kept
        };
        assert_eq!(refused.unfixed(), 4);
    }
}
