//! The keyed patch memory: gates that let a patch act only in contexts like those it was solved at,
//! and per layer one codebook that scores every gate keyed on the layer with one product per pass,
//! so thousands of entries cost about what one does.

use candle_core::{DType, Device, Result, Tensor};
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

/// Width of the space gates keyed on the layer compare in. A layer's `down_proj` input (4,864
/// neurons in Qwen2.5-Coder-0.5B) is hashed down to this many values, a count sketch (each neuron
/// adds, with a sign, to one bucket): inner products survive it in expectation, and a key costs
/// 1 KiB instead of 19, so 5,000 of them are one small product per pass. A narrower layer is
/// compared as it is.
pub const KEY_WIDTH: usize = 256;

/// The width keys of a layer `width` neurons wide have.
pub fn key_width(width: usize) -> usize {
    width.min(KEY_WIDTH)
}

/// `x` `(rows, width)` in the key space: hashed to `KEY_WIDTH` values if wider, else itself. Linear,
/// and the same function of a neuron's index on every machine and in every release: ledgers hold
/// keys in this space. No gradient flows through it.
pub fn sketch(x: &Tensor) -> Result<Tensor> {
    let (rows, width) = x.dims2()?;
    if width <= KEY_WIDTH {
        return Ok(x.clone());
    }
    let hashed = hashing(width);
    let x = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; rows * KEY_WIDTH];
    for (row, to) in x.chunks_exact(width).zip(out.chunks_exact_mut(KEY_WIDTH)) {
        for (v, &(bucket, sign)) in row.iter().zip(hashed.iter()) {
            to[bucket as usize] += sign * v;
        }
    }
    Tensor::from_vec(out, (rows, KEY_WIDTH), &Device::Cpu)
}

/// Per neuron of a layer, its bucket and sign.
type Hashing = Arc<Vec<(u32, f32)>>;

/// The hashing of a layer `width` wide.
fn hashing(width: usize) -> Hashing {
    static BY_WIDTH: OnceLock<Mutex<BTreeMap<usize, Hashing>>> = OnceLock::new();
    let mut cache = BY_WIDTH
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    // splitmix64, written out: a library's seeded generator may change its stream between
    // versions, and keys already stored must keep their meaning.
    let mix = |i: u64| {
        let mut x = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    };
    cache
        .entry(width)
        .or_insert_with(|| {
            let hashed = (0..width as u64).map(mix).map(|h| {
                let sign = if h >> 63 == 1 { -1.0 } else { 1.0 };
                ((h % KEY_WIDTH as u64) as u32, sign)
            });
            Arc::new(hashed.collect())
        })
        .clone()
}

/// A ledger patch's gate on one layer with its keys' thresholds raised, so that it stays shut at rows
/// where it opened and the model was wrong (`repair::Star` narrows the live entries so before it
/// repairs): where a later correction says a context wants something else, the entry gives it up.
#[derive(Debug, Clone, PartialEq)]
pub struct Narrowed {
    pub patch: Arc<str>,
    pub layer: usize,
    /// Every key's threshold, the raised ones and the others.
    pub thresholds: Vec<f32>,
}

/// Opens a patch at the rows whose activations have cosine with one of `keys` (the activations it was
/// solved at) at least that key's threshold: elsewhere the layer is exactly as unpatched. A row
/// takes the key it clears by most (its nearest, where thresholds are equal).
///
/// A gate keyed on the layer (`center` set) compares the whole `down_proj` input in the key space
/// (`sketch`), centred on the layer's typical activation: late-layer activations are anisotropic, so
/// raw cosines crowd near 1, and a few patched neurons say little about the context. A gate keyed
/// on the patch's columns (`center` none) is what ledgers written before 2026-12-06 hold.
#[derive(Debug, Clone)]
pub struct Gate {
    /// `(keys, width)`, rows of unit norm: `key_width` of the layer keyed on the layer, else the
    /// patch's columns.
    keys: Tensor,
    /// `(1, key_width)`.
    center: Option<Tensor>,
    /// Per key (HoReN's per-key thresholds, GRACE's radius per key).
    thresholds: Vec<f32>,
}

impl Gate {
    /// Keyed on the patch's columns: `keys` `(n, columns)`, activations there; at least one.
    pub fn on_columns(keys: &Tensor, threshold: f32) -> Result<Self> {
        Self::stored(&unit_rows(keys)?, None, threshold)
    }

    /// Keyed on the layer: `keys` `(n, intermediate)`, whole activations, compared after subtracting
    /// `center` `(intermediate,)`.
    pub fn on_layer(keys: &Tensor, center: &Tensor, threshold: f32) -> Result<Self> {
        if center.elem_count() != keys.dim(1)? {
            candle_core::bail!("a gate's centre does not fit its keys");
        }
        let center = sketch(&center.reshape((1, ()))?)?;
        let keys = unit_rows(&sketch(keys)?.broadcast_sub(&center)?)?;
        Self::stored(&keys, Some(&center), threshold)
    }

    /// A gate as `keys()`, `center()` and `threshold()` describe it (unit keys, centred already).
    /// Keys wider than `KEY_WIDTH` are those of a ledger written before 204406f: they compare with
    /// the whole activation, unsketched, as their thresholds were set.
    pub fn stored(keys: &Tensor, center: Option<&Tensor>, threshold: f32) -> Result<Self> {
        Self::stored_per_key(keys, center, vec![threshold; keys.dims2()?.0])
    }

    /// `stored` with a threshold per key.
    pub fn stored_per_key(
        keys: &Tensor,
        center: Option<&Tensor>,
        thresholds: Vec<f32>,
    ) -> Result<Self> {
        let n = keys.dims2()?.0;
        if n == 0 {
            candle_core::bail!("a gate needs at least one key");
        }
        if thresholds.len() != n {
            candle_core::bail!("a gate of {n} keys has {} thresholds", thresholds.len());
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
            thresholds,
        })
    }

    /// Activations `z` `(rows, width)` as this gate compares them: centred, in the keys' space (the
    /// sketch, unless the keys are as wide as `z`).
    fn query(&self, z: &Tensor) -> Result<Tensor> {
        match &self.center {
            Some(c) => in_space(z, c.dim(1)?)?.broadcast_sub(c),
            None => Ok(z.clone()),
        }
    }

    /// How many values a key has.
    pub(super) fn width(&self) -> usize {
        self.keys.dims()[1]
    }

    /// This gate opening also at rows like `more` `(n, width)`, activations as the gate reads them
    /// (on its columns, or the whole layer), each new key at this gate's highest threshold.
    pub fn with_keys(&self, more: &Tensor) -> Result<Self> {
        let more = self.keyed_at(more)?;
        Ok(Self {
            keys: Tensor::cat(&[&self.keys, &more.keys], 0)?,
            thresholds: [self.thresholds.as_slice(), &more.thresholds].concat(),
            ..more
        })
    }

    /// A gate with this one's centre, keyed at `rows` `(n, width)` alone, each key at this gate's
    /// highest threshold.
    pub fn keyed_at(&self, rows: &Tensor) -> Result<Self> {
        let keys = unit_rows(&self.query(rows)?)?;
        let top = self.top_threshold();
        Ok(Self {
            thresholds: vec![top; keys.dim(0)?],
            keys,
            center: self.center.clone(),
        })
    }

    /// This gate with every key at `threshold`.
    pub fn at(self, threshold: f32) -> Self {
        let thresholds = vec![threshold; self.thresholds.len()];
        Self { thresholds, ..self }
    }

    /// This gate with a threshold per key.
    pub fn per_key(self, thresholds: Vec<f32>) -> Result<Self> {
        Self::stored_per_key(&self.keys, self.center.as_ref(), thresholds)
    }

    /// `(keys, width)`, rows of unit norm (sketched and centred first when keyed on the layer).
    pub fn keys(&self) -> &Tensor {
        &self.keys
    }

    /// `(1, key_width)` when keyed on the layer.
    pub fn center(&self) -> Option<&Tensor> {
        self.center.as_ref()
    }

    /// Per key.
    pub fn thresholds(&self) -> &[f32] {
        &self.thresholds
    }

    /// The highest of its keys' thresholds.
    pub fn top_threshold(&self) -> f32 {
        self.thresholds.iter().copied().fold(f32::MIN, f32::max)
    }

    /// `(seq, 1)`: 1 at the rows of `z` `(seq, width)` the gate opens, else 0. No gradient flows
    /// through it.
    pub(super) fn open(&self, z: &Tensor) -> Result<Tensor> {
        self.scores(z)?.ge(0.0)?.to_dtype(DType::F32)
    }

    /// The first row of `z` `(seq, width)` the gate might open at, for activations computed another
    /// way than the pass's own (with other rounding): the first within `margin` of a threshold.
    /// None: it stays shut at every row.
    pub fn first_open(&self, z: &Tensor, margin: f32) -> Result<Option<usize>> {
        if z.dim(0)? == 0 {
            return Ok(None);
        }
        let by: Vec<f32> = self.scores(z)?.squeeze(1)?.to_vec1()?;
        Ok(by.iter().position(|&b| b >= -margin))
    }

    /// `(seq, 1)`: by how much each row of `z` `(seq, width)` clears the key it clears most (its
    /// cosine with the key less the key's threshold; negative where the gate stays shut).
    pub fn scores(&self, z: &Tensor) -> Result<Tensor> {
        let t = Tensor::new(self.thresholds.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        self.cosines(z)?.broadcast_sub(&t)?.max_keepdim(1)
    }

    /// `(seq, keys)`: each row of `z` `(seq, width)`'s cosine with each key.
    pub fn cosines(&self, z: &Tensor) -> Result<Tensor> {
        unit_rows(&self.query(&z.detach())?)?.matmul(&self.keys.t()?)
    }
}

/// `z` `(rows, width)` in a key space `width` wide: sketched if narrower than `z`.
fn in_space(z: &Tensor, width: usize) -> Result<Tensor> {
    if width < z.dim(1)? {
        sketch(z)
    } else {
        Ok(z.clone())
    }
}

fn unit_rows(x: &Tensor) -> Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(1)?.sqrt()? + 1e-12)?;
    x.broadcast_div(&norm)
}

/// Every gate keyed on one layer, scored together: one product of the pass's activations (in the
/// key space) with all keys and centres, then per gate the rows it opens at. The cosine with a key
/// `k` of a gate centred on `c` is `(s·k − c·k) / |s − c|`, and `|s − c|² = |s|² − 2 s·c + |c|²`,
/// so no gate needs its own pass over the activations.
#[derive(Debug, Clone)]
pub(super) struct Codebook {
    /// `(key_width, keys + gates)`: every gate's keys, then every gate's centre.
    table: Tensor,
    /// Per gate, its keys' columns in `table`.
    spans: Vec<Range<usize>>,
    /// Per key, `c·k` with its gate's centre.
    key_center: Vec<f32>,
    /// Per gate, `|c|²`.
    center_sq: Vec<f32>,
    /// Per key, its threshold.
    thresholds: Vec<f32>,
}

impl Codebook {
    /// Gates keyed on the layer (with a centre), at least one, all of one width.
    pub(super) fn new<'a>(gates: impl IntoIterator<Item = &'a Gate>) -> Result<Self> {
        let (mut keys, mut centers, mut spans) = (Vec::new(), Vec::new(), Vec::new());
        let (mut key_center, mut center_sq, mut thresholds) = (Vec::new(), Vec::new(), Vec::new());
        let mut n = 0;
        for g in gates {
            let Some(c) = &g.center else {
                candle_core::bail!("a codebook holds gates keyed on the layer");
            };
            let k = g.keys.dim(0)?;
            spans.push(n..n + k);
            n += k;
            key_center.extend(g.keys.matmul(&c.t()?)?.flatten_all()?.to_vec1::<f32>()?);
            center_sq.push(c.sqr()?.sum_all()?.to_scalar::<f32>()?);
            thresholds.extend_from_slice(&g.thresholds);
            keys.push(g.keys.clone());
            centers.push(c.clone());
        }
        keys.extend(centers);
        // `cat` refuses no gates, and keys of different widths.
        let table = Tensor::cat(&keys, 0)?.t()?.contiguous()?;
        Ok(Self {
            table,
            spans,
            key_center,
            center_sq,
            thresholds,
        })
    }

    /// Per gate, the rows of `z` `(seq, intermediate)` it opens at, each with its nearest key (the
    /// key's index within the gate; the first of keys tied), in row order.
    pub(super) fn open(&self, z: &Tensor) -> Result<Vec<Vec<(u32, u32)>>> {
        let mut opened = vec![Vec::new(); self.spans.len()];
        let s = in_space(&z.detach(), self.table.dim(0)?)?;
        let dots: Vec<Vec<f32>> = s.matmul(&self.table)?.to_vec2()?;
        let sq: Vec<f32> = s.sqr()?.sum(1)?.to_vec1()?;
        let n_keys = self.key_center.len();
        for (r, (dot, sq)) in dots.iter().zip(sq).enumerate() {
            for (g, span) in self.spans.iter().enumerate() {
                let norm = (sq - 2.0 * dot[n_keys + g] + self.center_sq[g])
                    .max(0.0)
                    .sqrt()
                    + 1e-12;
                // The key the row clears by most.
                let best = span
                    .clone()
                    .map(|k| (k, (dot[k] - self.key_center[k]) / norm - self.thresholds[k]))
                    .fold((span.start, f32::NEG_INFINITY), |a, b| {
                        if b.1 > a.1 {
                            b
                        } else {
                            a
                        }
                    });
                if best.1 >= 0.0 {
                    opened[g].push((r as u32, (best.0 - span.start) as u32));
                }
            }
        }
        Ok(opened)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(rows: usize, width: usize, seed: u64) -> Tensor {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..rows * width)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        Tensor::from_vec(v, (rows, width), &Device::Cpu).unwrap()
    }

    fn scores(gate: &Gate, z: &Tensor) -> Vec<f32> {
        gate.scores(z)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn the_sketch_keeps_inner_products_roughly() {
        let x = random(40, 4864, 1);
        let s = sketch(&x).unwrap();
        assert_eq!(s.dims(), &[40, KEY_WIDTH]);
        // Cosines between random rows (about 0) and of a row with itself (1) stay apart.
        let cos = |m: &Tensor| {
            let u = unit_rows(m).unwrap();
            u.matmul(&u.t().unwrap()).unwrap().to_vec2::<f32>().unwrap()
        };
        let (full, small) = (cos(&x), cos(&s));
        for i in 0..40 {
            assert!((small[i][i] - 1.0).abs() < 1e-4);
            for j in 0..i {
                assert!((small[i][j] - full[i][j]).abs() < 0.3, "{i},{j}");
            }
        }
        let narrow = random(3, 100, 2);
        assert_eq!(
            sketch(&narrow).unwrap().to_vec2::<f32>().unwrap(),
            narrow.to_vec2::<f32>().unwrap()
        );
    }

    #[test]
    fn a_codebook_opens_where_each_gate_alone_would() {
        let z = random(30, 4864, 3);
        let gates: Vec<Gate> = (0..3)
            .map(|g| {
                let keys = z.narrow(0, 5 * g, 2).unwrap();
                let center = random(1, 4864, 10 + g as u64).squeeze(0).unwrap();
                // A threshold per key: the second key's lower.
                let t = 0.3 + 0.1 * g as f32;
                Gate::on_layer(&keys, &center, t)
                    .unwrap()
                    .per_key(vec![t, t - 0.25])
                    .unwrap()
            })
            .collect();
        let book = Codebook::new(&gates).unwrap();
        let opened = book.open(&z).unwrap();
        for (g, gate) in gates.iter().enumerate() {
            let alone = scores(gate, &z);
            let rows: Vec<u32> = opened[g].iter().map(|(r, _)| *r).collect();
            let want: Vec<u32> = (0..30u32).filter(|&r| alone[r as usize] >= 0.0).collect();
            assert_eq!(rows, want, "gate {g}");
            // Each key's own row opens its gate at that key.
            assert!(
                opened[g].contains(&(5 * g as u32, 0))
                    && opened[g].contains(&(5 * g as u32 + 1, 1))
            );
        }
    }

    #[test]
    fn keys_as_wide_as_the_layer_compare_unsketched() {
        // A gate of a ledger written before keys were sketched compares where its threshold was set.
        let z = random(6, 4864, 4);
        let center = random(1, 4864, 5);
        let centred = unit_rows(&z.broadcast_sub(&center).unwrap()).unwrap();
        let old = Gate::stored(&centred.narrow(0, 0, 2).unwrap(), Some(&center), 0.5).unwrap();
        let got = scores(&old, &z);
        let cos = centred
            .matmul(&centred.narrow(0, 0, 2).unwrap().t().unwrap())
            .unwrap();
        let want: Vec<f32> = cos.max(1).unwrap().to_vec1().unwrap();
        // Scores are by how much a row clears the threshold.
        for (g, w) in got.iter().zip(&want) {
            assert!((g + 0.5 - w).abs() < 1e-4, "{got:?} {want:?}");
        }
        // And a codebook of such gates scores them the same way.
        let book = Codebook::new([&old]).unwrap();
        let rows: Vec<u32> = book.open(&z).unwrap()[0].iter().map(|(r, _)| *r).collect();
        let expect: Vec<u32> = (0..6u32).filter(|&r| want[r as usize] >= 0.5).collect();
        assert_eq!(rows, expect);
    }

    /// Ledgers hold keys in the sketch's space: its hashing must never change.
    #[test]
    fn the_sketch_is_pinned() {
        let h = hashing(4864);
        let first: Vec<(u32, f32)> = h.iter().take(6).copied().collect();
        assert_eq!(first, PINNED);
        let a = random(2, 4864, 6);
        let b = random(2, 4864, 7);
        let sum = sketch(&(&a + &b).unwrap()).unwrap();
        let apart = (sketch(&a).unwrap() + sketch(&b).unwrap()).unwrap();
        let d = (sum - apart).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-4);
    }

    /// splitmix64 of 0..6, bucket = hash mod 256, sign = the top bit (checked against a Python
    /// implementation of splitmix64 when pinned).
    const PINNED: [(u32, f32); 6] = [
        (175, -1.0),
        (193, -1.0),
        (206, -1.0),
        (237, 1.0),
        (202, 1.0),
        (90, 1.0),
    ];
}
