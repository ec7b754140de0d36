//! The repair engine: from failure cases (and the guard cases a repair must not break) to neuron patches
//! for the live model's overlay, by STAR (`star.rs`; ../shared/star/METHOD.md names every step).
//!
//! Architecture invariant: a pure function of (model, failure cases, guard cases, settings) → patches;
//! no I/O, no protocol, no store. Serving is untouched until the caller swaps the patches in.

mod baselines;
mod keys;
mod linalg;
mod residuals;
mod star;
mod steer;
mod targets;

pub use residuals::Residuals;
pub use star::{project_off, solve_patch, whitening, Method, RepairOutcome, Star};
pub use steer::Head;
pub use targets::{
    complete_case, greedy_case, passes, same_line, teacher_forced, text_after_cursor, Case,
    TeacherForced,
};

use crate::completion::ContextLimits;
use crate::model::{LayerPatch, PatchSet};

/// The engine's knobs; defaults follow METHOD.md's measured recipe.
#[derive(Debug, Clone, Copy, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct RepairSettings {
    /// Context used around each case: the serving window (the server passes its own), because a
    /// gate keyed on activations of a narrower window stays shut where the completion is made.
    pub context: ContextLimits,
    /// The top fraction of layers that may be patched (candidates for occlusion).
    pub candidate_fraction: f32,
    /// How the patched layers are chosen among the candidates.
    pub locate: Locate,
    /// Layers patched.
    pub layers: usize,
    /// Fraction of a layer's neurons patched, chosen by attribution.
    pub neuron_fraction: f32,
    /// Rank neurons by attribution per breadth of firing, for locality (`Star::select_neurons`).
    pub selective: bool,
    /// How far past the model's token the steer pushes the developer's, in logits.
    pub margin: f32,
    /// Analytical solves before the guided steps: each after the first re-solves, from a forward pass
    /// under the patch so far, for the positions still failing.
    pub solves: usize,
    /// `η` of the guided update `W ← W − η·|P| ⊙ sign(∇W)`.
    pub step: f32,
    pub max_steps: usize,
    /// Which target tokens the guided steps train on.
    pub mode: Mode,
    /// Weight in `[0, 1)` of the typical activations' covariance in the patch's norm: the solve prefers
    /// directions the selected neurons rarely take in ordinary code (their prompts), so the patch
    /// moves other completions less. 0 is the paper's least-norm patch.
    pub preserve: f32,
    /// The patches' gates (0: none): a patch acts only at rows whose activations point like those it
    /// was solved at (the failure positions', and the re-solves'). Least-norm patches move every row
    /// in proportion to its overlap with the failures' directions, and in real code many rows overlap
    /// some: ungated, specificity on the library set was 0.80. The cosine threshold for `keys:
    /// "columns"`; for `"layer"` the highest threshold a gate may get.
    pub gate: f32,
    /// What a gate compares: the layer's whole `down_proj` input, centred, or the patched neurons'.
    pub keys: Keys,
    /// What a patch adds where it acts: a delta on the neurons attribution chose (STAR's), or one
    /// value per key, what its failure position asked for (needs gates keyed on the layer).
    pub patch: PatchKind,
    /// Layer keys: a gate's threshold is this far above the highest cosine of the rows it must leave
    /// alone (the cases' and guards' prompts, the guards' targets), up to `gate`.
    pub gate_gap: f32,
    /// Layer keys: a threshold per key (each above the ordinary rows near it) or one per gate.
    pub gate_thresholds: GateThresholds,
    /// Before a repair, narrow the live entries that open where a failure is still wrong
    /// (`Star::narrowing`): the newer correction wins in contexts like its own.
    pub narrow: bool,
    /// New gates also stay shut at the target rows of recent cases the model said right when
    /// checked (up to 256, kept by `Residuals`), past `gate` too, but at those of lines the same as
    /// a failure's.
    pub right_rows: bool,
    /// Project patches off the span of the guard activations before optimizing.
    pub guard_projection: bool,
    /// A patch that lowers the guard pass rate by more than this is refused.
    pub max_guard_drop: f32,
    /// The SGD baseline's learning rate (its epochs are `max_steps`).
    pub sgd_learning_rate: f32,
}

impl RepairSettings {
    /// Settings that cannot work together, said before any work is done.
    pub fn check(&self) -> Result<(), String> {
        if self.patch == PatchKind::Values && (self.gate <= 0.0 || self.keys != Keys::Layer) {
            return Err(
                "patch \"values\" needs gates keyed on the layer (gate > 0, keys \"layer\"); \
                        an ungated or column-keyed patch is patch \"columns\""
                    .into(),
            );
        }
        Ok(())
    }

    /// The first layer that may be patched, of `layers`: the top `candidate_fraction` of them.
    pub fn first_candidate(&self, layers: usize) -> usize {
        let k = ((layers as f32 * self.candidate_fraction).ceil() as usize).clamp(1, layers);
        layers - k
    }
}

/// How layers are ranked for patching (METHOD.md step 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Locate {
    /// Each candidate layer's MLP skipped in turn, the failures' loss re-measured: a forward pass of the
    /// layers above per candidate and case.
    Occlusion,
    /// Occlusion to first order, `|Σ ∂CE/∂z ⊙ z|`, from the one backward pass per case that also
    /// gives every candidate neuron's attribution.
    Gradient,
}

/// What a patch's gate reads (`RepairSettings::keys`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Keys {
    /// The layer's whole `down_proj` input, centred on its typical rows; the threshold from data.
    Layer,
    /// The patched neurons' activations; the threshold is `gate`.
    Columns,
}

/// Whose highest ordinary cosine sets a threshold (`RepairSettings::gate_thresholds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GateThresholds {
    /// Each key's own (HoReN's per-key thresholds, GRACE's radius per key).
    Key,
    /// The highest of its keys', for all of them: the gates before 2026-12-07, except that keys a
    /// re-solve adds now count in it too.
    Gate,
}

/// What a patch adds where it acts (`RepairSettings::patch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PatchKind {
    /// `delta · z[columns]` on the neurons attribution chose: solved by least squares, so a context
    /// unlike the failures' gets a different change.
    Columns,
    /// The value of the nearest key: the steer its failure position asked for, the same wherever
    /// the gate opens.
    Values,
}

/// METHOD.md's two modes of guided optimization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every target token of every failure teacher-forced together.
    Batch,
    /// Token by token, left to right: each step trains on a case's first wrong token (and the ones
    /// before it).
    Iterative,
}

impl Default for RepairSettings {
    fn default() -> Self {
        Self {
            context: ContextLimits::default(),
            candidate_fraction: 0.25,
            locate: Locate::Gradient,
            layers: 3,
            neuron_fraction: 0.05,
            selective: true,
            margin: 1.0,
            solves: 3,
            step: 0.2,
            max_steps: 10,
            mode: Mode::Batch,
            preserve: 0.9,
            gate: 0.9,
            keys: Keys::Layer,
            patch: PatchKind::Values,
            gate_gap: 0.05,
            gate_thresholds: GateThresholds::Gate,
            narrow: true,
            right_rows: false,
            guard_projection: true,
            max_guard_drop: 0.0,
            sgd_learning_rate: 0.01,
        }
    }
}

/// `base` with a repair's patches summed onto it.
pub fn overlay_on(
    base: PatchSet,
    patches: &[(usize, LayerPatch)],
) -> candle_core::Result<PatchSet> {
    patches
        .iter()
        .try_fold(base, |set, (l, p)| set.with(*l, p.clone()))
}
