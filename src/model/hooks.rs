//! What the repair engine needs from a forward pass, passed explicitly and free when empty:
//! capture of `down_proj` inputs and residual streams, MLP occlusion, and the patch overlay.

use super::memory::{Codebook, Gate, Narrowed};
use candle_core::{Device, Result, Tensor, TensorId};
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

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
    /// Where to note the named patches whose gates opened (`star.explain`).
    pub fired: Option<&'a mut Fired>,
}

/// The entries that opened during some passes: per named patch and layer, each key's rows.
#[derive(Debug, Default)]
pub struct Fired(BTreeMap<(Arc<str>, usize), BTreeMap<u32, usize>>);

/// One patch's entries that opened on one layer: the keys, and the rows they opened at in all.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FiredEntries {
    pub patch: String,
    pub layer: usize,
    pub keys: Vec<u32>,
    pub rows: usize,
}

impl Fired {
    fn note(&mut self, patch: &Arc<str>, layer: usize, opened: &[(u32, u32)]) {
        let keys = self.0.entry((patch.clone(), layer)).or_default();
        for (_, k) in opened {
            *keys.entry(*k).or_default() += 1;
        }
    }

    pub fn entries(&self) -> Vec<FiredEntries> {
        self.0
            .iter()
            .map(|((patch, layer), keys)| FiredEntries {
                patch: patch.to_string(),
                layer: *layer,
                keys: keys.keys().copied().collect(),
                rows: keys.values().sum(),
            })
            .collect()
    }
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
    /// The ledger's id for it, when it has one.
    name: Option<Arc<str>>,
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
            name: None,
        })
    }

    /// One value per key of `gate` (keyed on the layer): `values` `(hidden, keys)`.
    pub fn values(values: Tensor, gate: Gate) -> Result<Self> {
        let (_, k) = values.dims2()?;
        if gate.center().is_none() || gate.keys().dim(0)? != k {
            candle_core::bail!(
                "{k} values for a gate of {} keys on the layer",
                gate.keys().dim(0)?
            );
        }
        Ok(Self {
            columns: Vec::new(),
            index: Tensor::new(&[] as &[u32], &Device::Cpu)?,
            // Gathered by key at every pass that opens it.
            delta: values.contiguous()?,
            gate: Some(gate),
            rows: None,
            name: None,
        })
    }

    /// This patch under the ledger's id `name`.
    pub fn named(self, name: &str) -> Self {
        Self {
            name: Some(name.into()),
            ..self
        }
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

    /// The ledger's id for it, when it has one.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Its entries of the patch memory: a gated patch's keys (a value patch holds a value per key;
    /// a gated column patch one delta for all of them); an ungated patch acts everywhere, as one.
    pub fn entries(&self) -> usize {
        self.gate.as_ref().map_or(1, |g| g.keys().dims()[0])
    }

    /// Whether it acts at some rows only (gated, or `on_rows`): such patches are not summed.
    fn partial(&self) -> bool {
        self.gate.is_some() || self.rows.is_some()
    }

    pub(super) fn index(&self) -> &Tensor {
        &self.index
    }

    /// Whether its gate is keyed on the layer: its layer's codebook decides where it opens.
    fn in_codebook(&self) -> bool {
        self.gate.as_ref().is_some_and(|g| g.center().is_some())
    }

    /// The overlay's contribution for neuron activations `z` `(seq, intermediate)`, when its gate is
    /// not keyed on the layer (or it has none).
    fn apply(&self, z: &Tensor) -> Result<Tensor> {
        let zs = z.index_select(&self.index, 1)?;
        let out = zs.matmul(&self.delta.t()?)?;
        let out = match &self.gate {
            Some(g) => out.broadcast_mul(&g.open(&zs)?)?,
            None => out,
        };
        self.scoped(out)
    }

    /// The contribution at the rows `opened` (row, nearest key) its codebook found its gate open
    /// at, when it has columns (or acts at some rows only): its column delta there.
    fn apply_open(&self, z: &Tensor, opened: &[(u32, u32)]) -> Result<Tensor> {
        let seq = z.dim(0)?;
        let out = match self.columns.is_empty() {
            true => {
                let (rows, values) = self.values_at(opened)?;
                Tensor::zeros((seq, self.delta.dim(0)?), z.dtype(), z.device())?
                    .index_add(&rows, &values, 0)?
            }
            false => {
                let mut open = vec![0f32; seq];
                for (r, _) in opened {
                    open[*r as usize] = 1.0;
                }
                let open = Tensor::from_vec(open, (seq, 1), &Device::Cpu)?;
                let zs = z.index_select(&self.index, 1)?;
                zs.matmul(&self.delta.t()?)?.broadcast_mul(&open)?
            }
        };
        self.scoped(out)
    }

    /// A value patch's rows `opened` (row, nearest key) and the values added there `(n, hidden)`.
    fn values_at(&self, opened: &[(u32, u32)]) -> Result<(Tensor, Tensor)> {
        let (rows, keys): (Vec<u32>, Vec<u32>) = opened.iter().copied().unzip();
        let keys = Tensor::new(keys.as_slice(), &Device::Cpu)?;
        Ok((
            Tensor::new(rows.as_slice(), &Device::Cpu)?,
            self.delta.index_select(&keys, 1)?.t()?.contiguous()?,
        ))
    }

    fn scoped(&self, out: Tensor) -> Result<Tensor> {
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

/// A patch set's contents by name (`PatchSet::outline`): what a result computed under it was
/// computed under, kept without its values.
#[derive(Debug, Clone)]
pub struct Outline {
    id: u64,
    /// Per layer, the merged ungated patch's delta.
    summed: Vec<(usize, TensorId)>,
    gated: Vec<PatchKey>,
}

impl Outline {
    /// The outlined set's `PatchSet::id`.
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// Which patch on which layer: a ledger's patch by its name and its gate's thresholds (a set built
/// again from the ledger holds new tensors; a narrowed gate opens at fewer rows), another by its
/// tensors (a clone shares them).
#[derive(Debug, Clone, PartialEq)]
enum PatchKey {
    Named(usize, Arc<str>, Vec<u32>),
    Unnamed {
        layer: usize,
        delta: TensorId,
        keys: Option<TensorId>,
        scoped: bool,
    },
}

impl PatchKey {
    fn of((layer, p): &(usize, LayerPatch)) -> Self {
        match &p.name {
            Some(name) => {
                let thresholds = p.gate.as_ref().map_or(&[][..], |g| g.thresholds());
                Self::Named(
                    *layer,
                    name.clone(),
                    thresholds.iter().map(|t| t.to_bits()).collect(),
                )
            }
            None => Self::Unnamed {
                layer: *layer,
                delta: p.delta.id(),
                keys: p.gate.as_ref().map(|g| g.keys().id()),
                scoped: p.rows.is_some(),
            },
        }
    }
}

/// A codebook and the indices in `PatchSet::gated` of its gates' patches.
type Books = (Codebook, Vec<usize>);

/// The overlay the serving model runs with: per layer at most one merged ungated patch, and the gated
/// (or row-scoped) patches each whole (their gates differ, so they cannot be summed); those keyed on
/// the layer are scored together, per layer one `Codebook`. Immutable once built; the server swaps
/// whole sets (`Arc<PatchSet>`) so requests in flight finish on the set they started with.
#[derive(Debug, Clone, Default)]
pub struct PatchSet {
    layers: BTreeMap<usize, LayerPatch>,
    gated: Vec<(usize, LayerPatch)>,
    /// Per layer with gated patches, the codebooks of its gates keyed on the layer (one per key
    /// width: sketched keys, and those of ledgers from before) and their indices in `gated`: built at
    /// the first pass that needs them, and shared with the sets `with` makes from this one until one
    /// adds a gate on that layer (a repair builds many sets, each touching a few layers).
    books: BTreeMap<usize, Arc<OnceLock<Vec<Books>>>>,
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

    /// What the overlay adds to layer `layer`'s MLP output for its neuron activations `z`
    /// `(seq, intermediate)`; None where nothing acts (the layer is then bit-identical to the
    /// unpatched one).
    pub(super) fn apply(
        &self,
        layer: usize,
        z: &Tensor,
        mut fired: Option<&mut Fired>,
    ) -> Result<Option<Tensor>> {
        let mut out = self.layers.get(&layer).map(|p| p.apply(z)).transpose()?;
        let mut add = |t: Tensor| -> Result<()> {
            out = Some(match out.take() {
                Some(o) => (o + t)?,
                None => t,
            });
            Ok(())
        };
        // Values of every open gate go in with one scatter: adding them costs by the entries that
        // open; scoring is the codebook's one product.
        let (mut rows, mut values) = (Vec::new(), Vec::new());
        for (book, members) in self.books(layer)? {
            for (opened, &i) in book.open(z)?.iter().zip(members) {
                let p = &self.gated[i].1;
                if let (Some(f), Some(name), false) =
                    (fired.as_deref_mut(), &p.name, opened.is_empty())
                {
                    f.note(name, layer, opened);
                }
                match (opened.is_empty(), p.columns.is_empty() && p.rows.is_none()) {
                    (true, _) => {}
                    (false, true) => {
                        let (r, v) = p.values_at(opened)?;
                        rows.push(r);
                        values.push(v);
                    }
                    (false, false) => add(p.apply_open(z, opened)?)?,
                }
            }
        }
        if let Some(first) = values.first() {
            let zeros = Tensor::zeros((z.dim(0)?, first.dim(1)?), z.dtype(), z.device())?;
            add(zeros.index_add(&Tensor::cat(&rows, 0)?, &Tensor::cat(&values, 0)?, 0)?)?;
        }
        for p in self.gated_at(layer).filter(|p| !p.in_codebook()) {
            add(p.apply(z)?)?;
        }
        Ok(out)
    }

    fn books(&self, layer: usize) -> Result<&[Books]> {
        let Some(slot) = self.books.get(&layer) else {
            return Ok(&[]);
        };
        if let Some(b) = slot.get() {
            return Ok(b);
        }
        let mut members: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, (l, p)) in self.gated.iter().enumerate() {
            if let Some(g) = p.gate().filter(|_| *l == layer && p.in_codebook()) {
                members.entry(g.width()).or_default().push(i);
            }
        }
        let mut books = Vec::new();
        for m in members.into_values() {
            let gates = m.iter().filter_map(|&i| self.gated[i].1.gate());
            books.push((Codebook::new(gates)?, m));
        }
        Ok(slot.get_or_init(|| books))
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
            books: self.books.clone(),
            id: if self.gated.is_empty() {
                0
            } else {
                Self::next_id()
            },
        }
    }

    /// Every patch acting everywhere, its gate dropped, as a LoRA adapter serves it; `None` when
    /// one adds a value per gate key (no ungated form).
    pub fn ungated(&self) -> Result<Option<Self>> {
        let mut set = Self::default();
        for (l, p) in self.iter() {
            if p.columns().is_empty() {
                return Ok(None);
            }
            set = set.with(l, p.clone().gated(None))?;
        }
        Ok(Some(set))
    }

    /// Every patch, the summed ones first.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &LayerPatch)> {
        self.layers
            .iter()
            .map(|(l, p)| (*l, p))
            .chain(self.gated.iter().map(|(l, p)| (*l, p)))
    }

    /// What names its contents without holding them, for `added_since`.
    pub fn outline(&self) -> Outline {
        Outline {
            id: self.id,
            summed: self.summed().map(|(l, p)| (l, p.delta.id())).collect(),
            gated: self.gated.iter().map(PatchKey::of).collect(),
        }
    }

    /// The gated patches this set holds and the set `was` outlines does not: wherever all of them
    /// stay shut, a pass under either set computes the same. None when that cannot be said: their
    /// ungated parts differ (those act everywhere), or `was` held a patch this set does not.
    pub fn added_since(&self, was: &Outline) -> Option<Vec<(usize, &LayerPatch)>> {
        let now = self.outline();
        if now.summed != was.summed || !was.gated.iter().all(|k| now.gated.contains(k)) {
            return None;
        }
        let added = self.gated.iter().zip(&now.gated);
        Some(
            added
                .filter(|(_, k)| !was.gated.contains(k))
                .map(|((l, p), _)| (*l, p))
                .collect(),
        )
    }

    /// Its entries over every layer (`LayerPatch::entries`).
    pub fn entries(&self) -> usize {
        self.iter().map(|(_, p)| p.entries()).sum()
    }

    /// This set with `patch` added on `layer` (summed with what is there unless gated or row-scoped).
    pub fn with(&self, layer: usize, patch: LayerPatch) -> Result<Self> {
        let mut next = self.clone();
        if patch.partial() {
            // Indices into `gated` stay valid: patches are only appended.
            next.books.insert(layer, Arc::default());
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

    /// This set with the named gates of `narrowed` at their new thresholds (`Narrowed`); a gate it
    /// names that this set does not hold is left out.
    pub fn narrowed(&self, narrowed: &[Narrowed]) -> Result<Self> {
        let mut next = self.clone();
        for n in narrowed {
            let held = next.gated.iter_mut().find(|(l, p)| {
                *l == n.layer && p.name.as_deref() == Some(&*n.patch) && p.gate.is_some()
            });
            if let Some((_, p)) = held {
                let narrow = |g: &Gate| g.clone().per_key(n.thresholds.clone());
                p.gate = p.gate.as_ref().map(narrow).transpose()?;
                next.books.insert(n.layer, Arc::default());
            }
        }
        next.id = Self::next_id();
        Ok(next)
    }

    fn next_id() -> u64 {
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patch(columns: &[u32], seed: f32) -> LayerPatch {
        let delta = Tensor::full(seed, (4, columns.len()), &Device::Cpu).unwrap();
        LayerPatch::new(columns.to_vec(), delta).unwrap()
    }

    fn gated(columns: &[u32], seed: f32) -> LayerPatch {
        let keys = Tensor::ones((1, columns.len()), candle_core::DType::F32, &Device::Cpu).unwrap();
        let gate = Gate::on_columns(&keys, 0.5).unwrap();
        patch(columns, seed).gated(Some(gate))
    }

    fn layers(d: Option<Vec<(usize, &LayerPatch)>>) -> Option<Vec<usize>> {
        d.map(|v| v.into_iter().map(|(l, _)| l).collect())
    }

    #[test]
    fn a_set_tells_the_gated_patches_added_since_another() {
        let (a, b) = (gated(&[0], 1.0).named("p1"), gated(&[1], 2.0).named("p2"));
        let one = PatchSet::default().with(0, a).unwrap();
        let two = one.with(1, b.clone()).unwrap();
        assert_eq!(layers(two.added_since(&one.outline())), Some(vec![1]));
        assert_eq!(layers(one.added_since(&two.outline())), None, "p2 went");
        // A set built again from the ledger: the same patches by name, new tensors.
        let again = PatchSet::default()
            .with(0, gated(&[0], 1.0).named("p1"))
            .unwrap()
            .with(1, b)
            .unwrap();
        assert_eq!(layers(again.added_since(&two.outline())), Some(vec![]));
        // Unnamed patches are the same one by their tensors: a clone's, not an equal copy's, nor
        // the same delta under another gate or unnamed.
        let c = gated(&[2], 3.0);
        let x = PatchSet::default().with(0, c.clone()).unwrap();
        let y = PatchSet::default().with(0, c.clone()).unwrap();
        assert_eq!(layers(y.added_since(&x.outline())), Some(vec![]));
        for other in [
            gated(&[2], 3.0),
            c.clone().gated(gated(&[2], 0.0).gate),
            c.clone().named("p3"),
        ] {
            let z = PatchSet::default().with(0, other).unwrap();
            assert_eq!(layers(z.added_since(&x.outline())), None);
        }
        // A patch acting everywhere parts every row.
        let everywhere = one.with(2, patch(&[3], 1.0)).unwrap();
        assert_eq!(layers(everywhere.added_since(&one.outline())), None);
    }

    #[test]
    fn a_narrowed_gate_shuts_where_it_opened_and_parts_from_the_set_before() {
        let set = PatchSet::default()
            .with(0, gated(&[0, 1], 1.0).named("p1"))
            .unwrap();
        let z = Tensor::ones((1, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let out = |s: &PatchSet| {
            let added = s.apply(0, &z, None).unwrap().unwrap();
            added
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(out(&set) > 0.0);
        let narrow = |patch: &str, layer| Narrowed {
            patch: patch.into(),
            layer,
            thresholds: vec![1.05],
        };
        let narrowed = set.narrowed(&[narrow("p1", 0)]).unwrap();
        assert_eq!(out(&narrowed), 0.0);
        assert_eq!(layers(narrowed.added_since(&set.outline())), None);
        // Built again from a ledger that holds the new thresholds: the same set.
        let stored = PatchSet::default()
            .with(0, gated(&[0, 1], 1.0).named("p1"))
            .unwrap()
            .narrowed(&[narrow("p1", 0)])
            .unwrap();
        assert_eq!(
            layers(stored.added_since(&narrowed.outline())),
            Some(vec![])
        );
        // Another patch's name, or another layer: nothing narrowed.
        for other in [narrow("p2", 0), narrow("p1", 1)] {
            assert!(out(&set.narrowed(&[other]).unwrap()) > 0.0);
        }
    }
}
