//! What the repair engine needs from a forward pass, passed explicitly and free when empty:
//! capture of `down_proj` inputs and residual streams, MLP occlusion, and the patch overlay.

use candle_core::{Device, Result, Tensor};
use std::collections::BTreeMap;

/// Per-forward switches. `Hooks::default()` is a plain forward pass.
#[derive(Default)]
pub struct Hooks<'a> {
    /// Neuron patches added to `down_proj` outputs.
    pub patches: Option<&'a PatchSet>,
    /// Where to record activations.
    pub capture: Option<&'a mut Capture>,
    /// Layers whose MLP output is zeroed (the residual passes through): occlusion for layer ranking.
    pub skip_mlp: &'a [usize],
    /// Zero tensors added to `z_l` `(seq, intermediate)` per layer: make them `Var`s and their gradient
    /// is `∂loss/∂z_l`, which candle does not keep for intermediate tensors (neuron attribution).
    pub neuron_probes: Option<&'a BTreeMap<usize, Tensor>>,
}

impl<'a> Hooks<'a> {
    pub fn with_patches(patches: &'a PatchSet) -> Self {
        Self {
            patches: Some(patches),
            ..Self::default()
        }
    }
}

/// Activations recorded at chosen layers, for every position of the forward pass that filled it.
#[derive(Debug, Default)]
pub struct Capture {
    layers: Vec<usize>,
    /// `z_l`, the `down_proj` input `(seq, intermediate)`, per layer.
    pub neurons: BTreeMap<usize, Tensor>,
    /// The residual stream entering layer `l` `(seq, hidden)`, per layer.
    pub residual: BTreeMap<usize, Tensor>,
    /// The last layer's output before the final norm `(seq, hidden)`.
    pub final_hidden: Option<Tensor>,
}

impl Capture {
    pub fn layers(layers: impl IntoIterator<Item = usize>) -> Self {
        Self {
            layers: layers.into_iter().collect(),
            ..Self::default()
        }
    }

    pub(super) fn record_neurons(&mut self, layer: usize, z: &Tensor) {
        if self.layers.contains(&layer) {
            self.neurons.insert(layer, z.clone());
        }
    }

    pub(super) fn record_residual(&mut self, layer: usize, x: &Tensor) {
        if self.layers.contains(&layer) {
            self.residual.insert(layer, x.clone());
        }
    }

    pub(super) fn record_final(&mut self, x: &Tensor) {
        self.final_hidden = Some(x.clone());
    }
}

/// A dense delta on some `down_proj` columns of one layer: `mlp_out += delta · z[columns]`.
#[derive(Debug, Clone)]
pub struct LayerPatch {
    columns: Vec<u32>,
    index: Tensor,
    /// `(hidden, columns.len())`, f32.
    delta: Tensor,
}

impl LayerPatch {
    pub fn new(columns: Vec<u32>, delta: Tensor) -> Result<Self> {
        let (_, k) = delta.dims2()?;
        if k != columns.len() {
            candle_core::bail!("patch delta has {k} columns for {} neurons", columns.len());
        }
        Ok(Self {
            index: Tensor::new(columns.as_slice(), &Device::Cpu)?,
            columns,
            delta,
        })
    }

    pub fn columns(&self) -> &[u32] {
        &self.columns
    }

    pub fn delta(&self) -> &Tensor {
        &self.delta
    }

    pub(super) fn index(&self) -> &Tensor {
        &self.index
    }

    /// The overlay's contribution for neuron activations `z` `(seq, intermediate)`.
    pub(super) fn apply(&self, z: &Tensor) -> Result<Tensor> {
        z.index_select(&self.index, 1)?.matmul(&self.delta.t()?)
    }

    /// The sum of two patches on the same layer, columns merged.
    pub fn merged(&self, other: &LayerPatch) -> Result<Self> {
        let mut columns = self.columns.clone();
        for c in &other.columns {
            if !columns.contains(c) {
                columns.push(*c);
            }
        }
        let hidden = self.delta.dim(0)?;
        let mut cols: Vec<Tensor> = Vec::with_capacity(columns.len());
        for c in &columns {
            let mut col = Tensor::zeros((hidden, 1), candle_core::DType::F32, &Device::Cpu)?;
            for p in [self, other] {
                if let Some(j) = p.columns.iter().position(|x| x == c) {
                    col = (col + p.delta.narrow(1, j, 1)?)?;
                }
            }
            cols.push(col);
        }
        Self::new(columns, Tensor::cat(&cols, 1)?)
    }
}

/// The overlay the serving model runs with: at most one merged patch per layer. Immutable once built;
/// the server swaps whole sets (`Arc<PatchSet>`) so requests in flight finish on the set they started with.
#[derive(Debug, Clone, Default)]
pub struct PatchSet {
    layers: BTreeMap<usize, LayerPatch>,
    /// Names these contents: a set and its clones share it, every set built by `with` gets a new one
    /// (the empty set's is 0). Results computed under an overlay are kept by it (`repair::Residuals`).
    id: u64,
}

impl PatchSet {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    pub fn layer(&self, layer: usize) -> Option<&LayerPatch> {
        self.layers.get(&layer)
    }

    pub fn iter(&self) -> impl Iterator<Item = (usize, &LayerPatch)> {
        self.layers.iter().map(|(l, p)| (*l, p))
    }

    /// This set with `patch` added on `layer` (summed with what is there).
    pub fn with(&self, layer: usize, patch: LayerPatch) -> Result<Self> {
        let mut next = self.clone();
        let merged = match next.layers.get(&layer) {
            Some(existing) => existing.merged(&patch)?,
            None => patch,
        };
        next.layers.insert(layer, merged);
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        next.id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(next)
    }
}
