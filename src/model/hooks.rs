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
    /// Whether to record `mid` too.
    mid_too: bool,
    /// `z_l`, the `down_proj` input `(seq, intermediate)`, per layer.
    pub neurons: BTreeMap<usize, Tensor>,
    /// The residual stream entering layer `l` `(seq, hidden)`, per layer.
    pub residual: BTreeMap<usize, Tensor>,
    /// The residual stream between layer `l`'s attention and its MLP `(seq, hidden)`, per layer: what
    /// `z_l` is a function of, row by row (`DecoderLayer::neurons_on`).
    pub mid: BTreeMap<usize, Tensor>,
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

    /// This capture recording `mid` as well.
    pub fn with_mid(self) -> Self {
        Self {
            mid_too: true,
            ..self
        }
    }

    pub(super) fn record_mid(&mut self, layer: usize, x: &Tensor) {
        if self.mid_too && self.layers.contains(&layer) {
            self.mid.insert(layer, x.clone());
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

/// What one layer's MLP output gains, at every row or, gated, only at the rows its gate opens at:
/// a dense delta on some `down_proj` columns, `mlp_out += delta · z[columns]` (STAR's patch), or with
/// no columns one value per gate key, `mlp_out += delta[:, k]` at a row whose nearest key is `k`
/// (a keyed memory in the manner of GRACE: what a failure position asked for, wherever a context
/// like it comes again).
#[derive(Debug, Clone)]
pub struct LayerPatch {
    columns: Vec<u32>,
    index: Tensor,
    /// `(hidden, columns.len())` or, with no columns, `(hidden, keys)`; f32.
    delta: Tensor,
    gate: Option<Gate>,
    /// `(rows, 1)`, 0/1: the rows of one packed pass it acts at (`on_rows`), else every row.
    rows: Option<Tensor>,
}

/// Opens a patch at the rows whose activations have cosine at least `threshold` with one of `keys`
/// (the activations it was solved at): elsewhere the layer is exactly as unpatched.
///
/// A gate keyed on the layer (`center` set) compares the whole `down_proj` input, centred on the
/// layer's typical activation: late-layer activations are anisotropic, so raw cosines crowd near 1,
/// and a few patched neurons say little about the context. A gate keyed on the patch's columns
/// (`center` none) is what ledgers written before 2026-12-06 hold.
#[derive(Debug, Clone)]
pub struct Gate {
    /// `(keys, width)`, rows of unit norm: width `intermediate` keyed on the layer, else the patch's
    /// columns.
    keys: Tensor,
    /// `(1, intermediate)`.
    center: Option<Tensor>,
    threshold: f32,
}

impl Gate {
    /// Keyed on the patch's columns: `keys` `(n, columns)`, activations there; at least one.
    pub fn on_columns(keys: &Tensor, threshold: f32) -> Result<Self> {
        Self::build(keys, None, threshold)
    }

    /// Keyed on the layer: `keys` `(n, intermediate)`, whole activations, compared after subtracting
    /// `center` `(intermediate,)`.
    pub fn on_layer(keys: &Tensor, center: &Tensor, threshold: f32) -> Result<Self> {
        Self::build(keys, Some(center.clone()), threshold)
    }

    fn build(keys: &Tensor, center: Option<Tensor>, threshold: f32) -> Result<Self> {
        let raw = Self::stored(keys, center.as_ref(), threshold)?;
        let keys = match &raw.center {
            Some(c) => unit_rows(&keys.broadcast_sub(c)?)?,
            None => unit_rows(keys)?,
        };
        Ok(Self { keys, ..raw })
    }

    /// A gate as `keys()`, `center()` and `threshold()` describe it (unit keys, centred already).
    pub fn stored(keys: &Tensor, center: Option<&Tensor>, threshold: f32) -> Result<Self> {
        if keys.dims2()?.0 == 0 {
            candle_core::bail!("a gate needs at least one key");
        }
        let center = center.map(|c| c.reshape((1, ()))).transpose()?;
        if let Some(c) = &center {
            if c.dim(1)? != keys.dim(1)? {
                candle_core::bail!("a gate's centre does not fit its keys");
            }
        }
        Ok(Self {
            keys: keys.clone(),
            center,
            threshold,
        })
    }

    /// This gate opening also at rows like `more` `(n, width)`, activations as the gate reads them.
    pub fn with_keys(&self, more: &Tensor) -> Result<Self> {
        let more = Self::build(more, self.center.clone(), self.threshold)?;
        Ok(Self {
            keys: Tensor::cat(&[&self.keys, &more.keys], 0)?,
            ..more
        })
    }

    /// This gate at another threshold.
    pub fn at(self, threshold: f32) -> Self {
        Self { threshold, ..self }
    }

    /// `(keys, width)`, rows of unit norm (centred first when keyed on the layer).
    pub fn keys(&self) -> &Tensor {
        &self.keys
    }

    /// `(1, intermediate)` when keyed on the layer.
    pub fn center(&self) -> Option<&Tensor> {
        self.center.as_ref()
    }

    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    /// `(seq, 1)`: 1 at the rows of `z` `(seq, width)` the gate opens, else 0. No gradient flows
    /// through it.
    fn open(&self, z: &Tensor) -> Result<Tensor> {
        self.scores(z)?
            .ge(self.threshold as f64)?
            .to_dtype(candle_core::DType::F32)
    }

    /// The first row of `z` `(seq, width)` the gate might open at, for activations computed another
    /// way than the pass's own (with other rounding): the first within `margin` of the threshold.
    /// None: it stays shut at every row.
    pub fn first_open(&self, z: &Tensor, margin: f32) -> Result<Option<usize>> {
        if z.dim(0)? == 0 {
            return Ok(None);
        }
        let cos: Vec<f32> = self.scores(z)?.squeeze(1)?.to_vec1()?;
        Ok(cos.iter().position(|&c| c >= self.threshold - margin))
    }

    /// `(seq, 1)`: each row of `z` `(seq, width)`'s largest cosine with a key.
    pub fn scores(&self, z: &Tensor) -> Result<Tensor> {
        self.cosines(z)?.max_keepdim(1)
    }

    /// `(seq, keys)`: 1 at each row's nearest key where the gate opens, else 0. No gradient flows
    /// through it.
    fn nearest(&self, z: &Tensor) -> Result<Tensor> {
        let cos = self.cosines(z)?;
        let best = cos.max_keepdim(1)?;
        let open = best
            .ge(self.threshold as f64)?
            .to_dtype(candle_core::DType::F32)?;
        cos.broadcast_ge(&best)?
            .to_dtype(candle_core::DType::F32)?
            .broadcast_mul(&open)
    }

    /// `(seq, keys)`: each row of `z` `(seq, width)`'s cosine with each key.
    fn cosines(&self, z: &Tensor) -> Result<Tensor> {
        let z = z.detach();
        let z = match &self.center {
            Some(c) => z.broadcast_sub(c)?,
            None => z,
        };
        unit_rows(&z)?.matmul(&self.keys.t()?)
    }
}

fn unit_rows(x: &Tensor) -> Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(1)?.sqrt()? + 1e-12)?;
    x.broadcast_div(&norm)
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
            gate: None,
            rows: None,
        })
    }

    /// One value per key of `gate` (keyed on the layer): `values` `(hidden, keys)`.
    pub fn values(values: Tensor, gate: Gate) -> Result<Self> {
        let (_, k) = values.dims2()?;
        if gate.center.is_none() || gate.keys.dim(0)? != k {
            candle_core::bail!(
                "{k} values for a gate of {} keys on the layer",
                gate.keys.dim(0)?
            );
        }
        Ok(Self {
            columns: Vec::new(),
            index: Tensor::new(&[] as &[u32], &Device::Cpu)?,
            delta: values,
            gate: Some(gate),
            rows: None,
        })
    }

    /// This patch, applied only where `gate` opens.
    pub fn gated(self, gate: Option<Gate>) -> Self {
        Self { gate, ..self }
    }

    pub fn columns(&self) -> &[u32] {
        &self.columns
    }

    pub fn delta(&self) -> &Tensor {
        &self.delta
    }

    /// This patch acting only at rows `range` of a packed pass of `len` rows: candidate patches tried
    /// side by side in one pass, each on its own copy of a case. Such a patch is never stored.
    pub fn on_rows(self, range: std::ops::Range<usize>, len: usize) -> Result<Self> {
        let mask: Vec<f32> = (0..len).map(|r| range.contains(&r) as u8 as f32).collect();
        Ok(Self {
            rows: Some(Tensor::from_vec(mask, (len, 1), &Device::Cpu)?),
            ..self
        })
    }

    pub fn gate(&self) -> Option<&Gate> {
        self.gate.as_ref()
    }

    /// Whether it acts at some rows only (gated, or `on_rows`): such patches are not summed.
    fn partial(&self) -> bool {
        self.gate.is_some() || self.rows.is_some()
    }

    pub(super) fn index(&self) -> &Tensor {
        &self.index
    }

    /// The overlay's contribution for neuron activations `z` `(seq, intermediate)`.
    pub(super) fn apply(&self, z: &Tensor) -> Result<Tensor> {
        let out = match &self.gate {
            Some(g) if self.columns.is_empty() => g.nearest(z)?.matmul(&self.delta.t()?)?,
            gate => {
                let zs = z.index_select(&self.index, 1)?;
                let out = zs.matmul(&self.delta.t()?)?;
                match gate {
                    Some(g) => {
                        let read = if g.center.is_some() { z } else { &zs };
                        out.broadcast_mul(&g.open(read)?)?
                    }
                    None => out,
                }
            }
        };
        match &self.rows {
            Some(mask) => out.broadcast_mul(mask),
            None => Ok(out),
        }
    }

    /// The sum of two patches acting at every row on the same layer, columns merged.
    pub fn merged(&self, other: &LayerPatch) -> Result<Self> {
        if self.partial() || other.partial() {
            candle_core::bail!("gated or row-scoped patches are not summed");
        }
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

/// The overlay the serving model runs with: per layer at most one merged ungated patch, and the gated
/// (or row-scoped) patches each whole (their gates differ, so they cannot be summed). Immutable once built;
/// the server swaps whole sets (`Arc<PatchSet>`) so requests in flight finish on the set they started with.
#[derive(Debug, Clone, Default)]
pub struct PatchSet {
    layers: BTreeMap<usize, LayerPatch>,
    gated: Vec<(usize, LayerPatch)>,
    /// Names these contents: a set and its clones share it, every set built by `with` gets a new one
    /// (the empty set's is 0). Results computed under an overlay are kept by it (`repair::Residuals`).
    id: u64,
}

impl PatchSet {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty() && self.gated.is_empty()
    }

    /// The gated patches on `layer`.
    pub fn gated_at(&self, layer: usize) -> impl Iterator<Item = &LayerPatch> {
        self.gated
            .iter()
            .filter(move |(l, _)| *l == layer)
            .map(|(_, p)| p)
    }

    /// Whether any patch sits on `layer`.
    pub fn touches(&self, layer: usize) -> bool {
        self.layers.contains_key(&layer) || self.gated_at(layer).next().is_some()
    }

    /// The merged ungated patch on `layer`: the part of the overlay that can be folded into weights.
    pub fn layer(&self, layer: usize) -> Option<&LayerPatch> {
        self.layers.get(&layer)
    }

    /// The ungated patches, one merged per layer.
    pub fn summed(&self) -> impl Iterator<Item = (usize, &LayerPatch)> {
        self.layers.iter().map(|(l, p)| (*l, p))
    }

    /// The gated patches alone: what stays an overlay over weights that hold the summed ones.
    pub fn gated_only(&self) -> Self {
        Self {
            layers: BTreeMap::new(),
            gated: self.gated.clone(),
            id: if self.gated.is_empty() {
                0
            } else {
                Self::next_id()
            },
        }
    }

    /// Every patch, the summed ones first.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &LayerPatch)> {
        self.layers
            .iter()
            .map(|(l, p)| (*l, p))
            .chain(self.gated.iter().map(|(l, p)| (*l, p)))
    }

    /// This set with `patch` added on `layer` (summed with what is there unless gated or row-scoped).
    pub fn with(&self, layer: usize, patch: LayerPatch) -> Result<Self> {
        let mut next = self.clone();
        if patch.partial() {
            next.gated.push((layer, patch));
            next.id = Self::next_id();
            return Ok(next);
        }
        let merged = match next.layers.get(&layer) {
            Some(existing) => existing.merged(&patch)?,
            None => patch,
        };
        next.layers.insert(layer, merged);
        next.id = Self::next_id();
        Ok(next)
    }

    fn next_id() -> u64 {
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}
