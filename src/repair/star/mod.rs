//! STAR, step by step as METHOD.md names them: `failure_positions`, `locate_layers`, `select_neurons`,
//! `steer`, `solve_patch` (with the guard projection), `guided_update`, `guard_check`.
//!
//! The lower layers are frozen: every case runs through the serving model once, and its residual stream
//! entering the first candidate layer is kept. Passes a gradient flows through run on dense f32 copies
//! of the upper layers, where candle can take gradients; the others (whole passes, re-solves, MINT's
//! trials) run the serving layers, a quarter of the memory traffic. After one whole pass, a case runs
//! over its *tail* only (the rows that predict its target): the prompt's keys and values in those
//! layers are kept from that pass, so each later pass costs a few rows, not the whole context. A
//! patch's effect on the prompt rows is left out of tail passes; a whole pass under the patch
//! (`Batch::refresh`) confirms the end, and is the verdict's check on the cases.

mod batch;
mod locate;
mod narrow;
mod optimize;
mod score;
mod solve;
mod verdict;

use crate::model::{LayerPatch, Narrowed, PatchSet, Qwen2, Tokenizer};
use crate::repair::steer::Head;
use crate::repair::targets::Case;
use crate::repair::{RepairSettings, Residuals};
pub(super) use batch::{Batch, CheckKey, Checked, Patched, Upper, GATE_MARGIN};
use candle_core::{Result, Tensor};
pub(super) use solve::Sites;
pub use solve::{project_off, solve_patch, whitening};
use std::collections::BTreeMap;
use std::time::Instant;

/// What a repair did. `patches` is empty when nothing needed repair or the guard refused the patch.
#[derive(Debug, Clone)]
pub struct RepairOutcome {
    pub patches: Vec<(usize, LayerPatch)>,
    /// Cases that failed (some target position wrong) before the repair.
    pub failures: usize,
    /// Of those, the cases the serving model says right at every target position with the patch.
    pub fixed: usize,
    /// Their ids.
    pub fixed_ids: Vec<String>,
    pub guard_before: f32,
    pub guard_after: f32,
    pub layers: Vec<usize>,
    pub neurons_per_layer: usize,
    /// Guided steps taken.
    pub steps: usize,
    /// Analytical solves made (STAR's; 0 for the baselines).
    pub solves: usize,
    pub seconds: f64,
    /// Why no patch came out although there were failures.
    pub refused: Option<String>,
    /// Live entries narrowed before the repair (`RepairSettings::narrow`): the caller keeps them
    /// so whether or not a patch comes out; the patches were solved under them.
    pub narrowed: Vec<Narrowed>,
}

impl RepairOutcome {
    /// Before any method ran, with `failures` failing cases.
    fn of(failures: usize) -> Self {
        Self {
            patches: Vec::new(),
            failures,
            fixed: 0,
            fixed_ids: Vec::new(),
            guard_before: 1.0,
            guard_after: 1.0,
            layers: Vec::new(),
            neurons_per_layer: 0,
            steps: 0,
            solves: 0,
            seconds: 0.0,
            refused: None,
            narrowed: Vec::new(),
        }
    }
}

/// Which method repairs: STAR, or one of the paper's baselines (METHOD.md).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Star,
    Mint,
    Sgd,
}

/// The lowercase name, as `--method` takes it and eval's JSON keys it.
impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Method::Star => "star",
            Method::Mint => "mint",
            Method::Sgd => "sgd",
        })
    }
}

/// A value per layer index.
pub type PerLayer<T> = BTreeMap<usize, T>;

pub struct Star<'a> {
    pub model: &'a Qwen2,
    pub tokenizer: &'a Tokenizer,
    pub head: &'a Head,
    pub settings: RepairSettings,
    /// The overlay already serving: a repair starts from the model as it serves, and its patches are
    /// summed onto this overlay.
    pub live: Option<&'a PatchSet>,
    /// Where the cases' residuals entering the first candidate layer are kept between repairs.
    pub residuals: Option<&'a Residuals>,
    /// Called between steps: the server waits there while completions run (they take priority), eval
    /// stops a repair past its deadline by returning an error.
    pub between_steps: Option<&'a (dyn Fn() -> Result<()> + Sync)>,
    /// Per layer, keys of live entries narrowed for this repair `(n, key width)`: its gates stay shut
    /// at them too (`keys::Leave`). Set by the repair itself (`Star::repair_narrowed`).
    pub conflicts: Option<&'a PerLayer<Tensor>>,
}

impl<'a> Star<'a> {
    pub fn new(
        model: &'a Qwen2,
        tokenizer: &'a Tokenizer,
        head: &'a Head,
        settings: RepairSettings,
    ) -> Self {
        Self {
            model,
            tokenizer,
            head,
            settings,
            live: None,
            residuals: None,
            between_steps: None,
            conflicts: None,
        }
    }

    pub(super) fn checkpoint(&self) -> Result<()> {
        self.between_steps.map_or(Ok(()), |f| f())
    }

    /// The overlay the serving model would run with `patches` added to the live one.
    pub fn served(&self, patches: &[(usize, LayerPatch)]) -> Result<PatchSet> {
        super::overlay_on(self.live.cloned().unwrap_or_default(), patches)
    }

    /// The first layer that may be patched: the top `candidate_fraction` of the layers.
    pub fn first_candidate(&self) -> usize {
        self.settings.first_candidate(self.model.layers().len())
    }

    /// Checks `cases` (failures pending, or guards) under the live overlay and keeps the checks in
    /// `residuals`, where checks under later overlays start from them: what a repair of or against
    /// them would run before it starts, paid before it. The server does it while they wait, eval
    /// before a repair's clock.
    pub fn warm(&self, cases: &[Case]) -> Result<()> {
        let live = self.served(&[])?;
        for c in cases {
            self.check(c, self.first_candidate(), &live)?;
        }
        Ok(())
    }

    /// STAR on `failures`, checked against `guards`.
    pub fn repair(&self, failures: &[Case], guards: &[Case]) -> Result<RepairOutcome> {
        self.repair_by(Method::Star, failures, guards)
    }

    /// Repairs with `method`. Every method gets the same failing cases, the same layers (chosen by
    /// occlusion), the same verdict and the same clock, so they compare fairly.
    pub fn repair_by(
        &self,
        method: Method,
        failures: &[Case],
        guards: &[Case],
    ) -> Result<RepairOutcome> {
        let t0 = Instant::now();
        let live = self.served(&[])?;
        // 1. The failing cases.
        let Some(batch) = self.batch(failures, &live)? else {
            return Ok(RepairOutcome {
                seconds: t0.elapsed().as_secs_f64(),
                ..RepairOutcome::of(0)
            });
        };
        if self.settings.narrow {
            let narrowed = self.narrowing(&batch, &live)?;
            if !narrowed.is_empty() {
                return self.repair_narrowed(method, failures, guards, &live, narrowed, t0);
            }
        }
        let mut outcome = RepairOutcome::of(batch.ids.len());
        let guard_runs = guards
            .iter()
            .map(|g| {
                self.checkpoint()?;
                self.check(g, batch.first, &live)
            })
            .collect::<Result<Vec<_>>>()?;

        // 2. Where: layers by occlusion, shared by every method.
        let t_scored = t0.elapsed().as_secs_f64();
        let (layers, found) = self.locate_layers(&batch)?;
        outcome.layers = layers;
        let t_located = t0.elapsed().as_secs_f64();
        let patches = match method {
            Method::Star => self.star_patches(&batch, found, &guard_runs, &mut outcome)?,
            Method::Sgd => super::baselines::sgd(self, &batch, &mut outcome)?,
            Method::Mint => super::baselines::mint(self, &batch, &mut outcome)?.into(),
        };
        let t_patched = t0.elapsed().as_secs_f64();
        self.verdict(patches, &batch, &guard_runs, &mut outcome)?;
        tracing::debug!(
            ?method,
            scored = t_scored,
            located = t_located - t_scored,
            patched = t_patched - t_located,
            verdict = t0.elapsed().as_secs_f64() - t_patched,
            steps = outcome.steps,
            solves = outcome.solves,
            "repair phases, seconds"
        );
        outcome.seconds = t0.elapsed().as_secs_f64();
        Ok(outcome)
    }

    /// The repair under the live overlay `live` with `narrowed` (from `t0`): the failures checked
    /// again (some may be right now), the patches solved and judged there.
    fn repair_narrowed(
        &self,
        method: Method,
        failures: &[Case],
        guards: &[Case],
        live: &PatchSet,
        narrowed: Vec<Narrowed>,
        t0: Instant,
    ) -> Result<RepairOutcome> {
        let conflicts = narrow::conflicting_keys(live, &narrowed)?;
        let live = live.narrowed(&narrowed)?;
        let star = Star {
            live: Some(&live),
            conflicts: Some(&conflicts),
            settings: RepairSettings {
                narrow: false,
                ..self.settings
            },
            ..*self
        };
        let mut outcome = star.repair_by(method, failures, guards)?;
        outcome.narrowed = narrowed;
        outcome.seconds = t0.elapsed().as_secs_f64();
        Ok(outcome)
    }
}
