//! The qwen2 decoder, read top to bottom: `Config`, `Attention`, `Mlp`, `DecoderLayer`, `Qwen2`. Their
//! projections are `Linear` (linear.rs) and the cache is `KvCache` (kv.rs); the passes that start or
//! stop at a layer, and the dense copies for gradient work, are in qwen2/upper.rs.
//!
//! Written after candle-transformers' `quantized_qwen2`, with three differences that matter to star-ls:
//! the KV cache lives outside the weights (`KvCache`, so many documents share one model), the forward pass
//! takes explicit `Hooks` (activation capture, MLP occlusion, the patch overlay) that cost nothing when
//! empty, and any layer can be copied to dense f32 with differentiable norm/rope paths for gradient work.

mod upper;

use super::gguf::GgufFile;
use super::hooks::{Hooks, PatchSet};
use super::kernels::{CausalSoftmax, SiluMul};
use super::kv::{KvCache, LayerKv};
use super::linear::{Linear, LoadOptions};
use super::ModelError;
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, D};
use std::path::Path;
use std::sync::Arc;

type Result<T> = std::result::Result<T, candle_core::Error>;

/// Sizes read from the GGUF metadata; nothing else in star-ls assumes a model size.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rms_eps: f64,
    pub context_length: usize,
}

impl Config {
    /// The sizes, checked against each other and against every tensor the model reads: a crafted
    /// file gets its one-line error here, not a division by zero or a kernel reading past a row.
    fn from_gguf(f: &GgufFile) -> std::result::Result<Self, ModelError> {
        let corrupt = |reason: String| ModelError::Corrupt {
            path: f.path.clone(),
            reason,
        };
        let count = |key: &str| match f.u32(key)? {
            0 => Err(corrupt(format!("metadata `{key}` is 0"))),
            n => Ok(n as usize),
        };
        let vocab_size = match f.content.tensor_infos.get("token_embd.weight") {
            Some(t) => match t.shape.dims() {
                &[vocab, _] if vocab > 0 => vocab,
                dims => {
                    return Err(corrupt(format!(
                        "tensor `token_embd.weight` has shape {dims:?}"
                    )))
                }
            },
            None => return Err(corrupt("missing tensor `token_embd.weight`".into())),
        };
        let hidden_size = count("qwen2.embedding_length")?;
        let num_heads = count("qwen2.attention.head_count")?;
        let num_kv_heads = count("qwen2.attention.head_count_kv")?;
        if hidden_size % num_heads != 0
            || num_heads % num_kv_heads != 0
            || (hidden_size / num_heads) % 2 != 0
        {
            return Err(corrupt(format!(
                "{num_heads} heads and {num_kv_heads} key-value heads do not split a hidden size of \
                 {hidden_size} into heads of an even size"
            )));
        }
        let config = Self {
            vocab_size,
            hidden_size,
            intermediate_size: count("qwen2.feed_forward_length")?,
            num_layers: count("qwen2.block_count")?,
            num_heads,
            num_kv_heads,
            head_dim: hidden_size / num_heads,
            rope_theta: f.f32("qwen2.rope.freq_base").unwrap_or(10_000.0),
            rms_eps: f.f32("qwen2.attention.layer_norm_rms_epsilon")? as f64,
            context_length: count("qwen2.context_length")?,
        };
        config.check_tensors(f)?;
        Ok(config)
    }

    /// Every tensor the model reads has the shape these sizes give it, in whole quantization
    /// blocks; layer by layer, so an absurd layer count stops at the first missing tensor.
    fn check_tensors(&self, f: &GgufFile) -> std::result::Result<(), ModelError> {
        let (h, m, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let kv = self.num_kv_heads * self.head_dim;
        let check = |name: &str, want: &[usize]| {
            let info = f
                .content
                .tensor_infos
                .get(name)
                .ok_or_else(|| ModelError::Corrupt {
                    path: f.path.clone(),
                    reason: format!("missing tensor `{name}`"),
                })?;
            let (dims, dtype) = (info.shape.dims(), info.ggml_dtype);
            let reason = if dims != want {
                format!("tensor `{name}` has shape {dims:?}, the model's sizes say {want:?}")
            } else if dims[dims.len() - 1] % dtype.block_size() != 0 {
                format!(
                    "tensor `{name}`'s rows of {} are not whole {dtype:?} blocks",
                    dims[dims.len() - 1]
                )
            } else {
                return Ok(());
            };
            Err(ModelError::Corrupt {
                path: f.path.clone(),
                reason,
            })
        };
        check("token_embd.weight", &[v, h])?;
        check("output_norm.weight", &[h])?;
        if f.has_tensor("output.weight") {
            check("output.weight", &[v, h])?;
        }
        for i in 0..self.num_layers {
            let shapes: [(&str, &[usize]); 12] = [
                ("attn_norm.weight", &[h]),
                ("attn_q.weight", &[h, h]),
                ("attn_q.bias", &[h]),
                ("attn_k.weight", &[kv, h]),
                ("attn_k.bias", &[kv]),
                ("attn_v.weight", &[kv, h]),
                ("attn_v.bias", &[kv]),
                ("attn_output.weight", &[h, h]),
                ("ffn_norm.weight", &[h]),
                ("ffn_gate.weight", &[m, h]),
                ("ffn_up.weight", &[m, h]),
                ("ffn_down.weight", &[h, m]),
            ];
            for (name, want) in shapes {
                check(&format!("blk.{i}.{name}"), want)?;
            }
        }
        Ok(())
    }
}

/// Rotary tables, shared by every layer.
#[derive(Debug, Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(cfg: &Config, max_positions: usize) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f32 / cfg.head_dim as f32))
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), &Device::Cpu)?;
        let t = Tensor::arange(0u32, max_positions as u32, &Device::Cpu)?
            .to_dtype(DType::F32)?
            .reshape((max_positions, 1))?;
        let freqs = t.matmul(&inv_freq)?;
        Ok(Self {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
        })
    }

    /// `x`: (1, heads, seq, head_dim) at absolute positions `start..start+seq`.
    fn apply(&self, x: &Tensor, start: usize, differentiable: bool) -> Result<Tensor> {
        let seq = x.dim(2)?;
        let cos = self.cos.narrow(0, start, seq)?;
        let sin = self.sin.narrow(0, start, seq)?;
        if differentiable {
            candle_nn::rotary_emb::rope_slow(x, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
        }
    }
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, differentiable: bool) -> Result<Tensor> {
    if differentiable {
        candle_nn::ops::rms_norm_slow(x, weight, eps as f32)
    } else {
        candle_nn::ops::rms_norm(x, weight, eps as f32)
    }
}

/// A norm's gain, dequantized to f32.
fn load_gain(f: &mut GgufFile, name: &str) -> std::result::Result<Tensor, ModelError> {
    let t = f.tensor(name)?;
    t.dequantize(&Device::Cpu).map_err(|e| ModelError::Corrupt {
        path: f.path.clone(),
        reason: super::one_line(&e),
    })
}

#[derive(Debug, Clone)]
pub struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(
        f: &mut GgufFile,
        p: &str,
        cfg: &Config,
        opts: LoadOptions,
    ) -> std::result::Result<Self, ModelError> {
        Ok(Self {
            q: Linear::load(f, &format!("{p}.attn_q"), true, opts)?,
            k: Linear::load(f, &format!("{p}.attn_k"), true, opts)?,
            v: Linear::load(f, &format!("{p}.attn_v"), true, opts)?,
            o: Linear::load(f, &format!("{p}.attn_output"), false, opts)?,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        })
    }

    /// `x`: the rows of one or more sequences, one after another (`spans`, in order); `kvs[i]` holds the
    /// keys/values of sequence `i` before its rows. The projections run once over every row; each
    /// sequence attends to its own keys only.
    fn forward(
        &self,
        x: &Tensor,
        spans: &[Span],
        kvs: &mut [&mut LayerKv],
        differentiable: bool,
    ) -> Result<Tensor> {
        let [q, k, v] = Linear::forward_shared(&[&self.q, &self.k, &self.v], x)?;
        // A lone sequence's rows are the whole of `q`, `k`, `v`: narrowing and `cat` then copy nothing.
        let mut ys = Vec::with_capacity(spans.len());
        let mut row = 0;
        for (span, kv) in spans.iter().zip(kvs.iter_mut()) {
            let rows = |t: &Tensor| t.narrow(0, row, span.seq);
            let (q, k, v) = (rows(&q)?, rows(&k)?, rows(&v)?);
            ys.push(self.attend(&q, &k, &v, span, kv, differentiable)?);
            row += span.seq;
        }
        self.o.forward(&Tensor::cat(&ys, 0)?)
    }

    /// One sequence's attention, from its projected rows `(seq, ·)` at positions `span.start..`; `kv`
    /// holds its keys/values before them and gains theirs. Returns `(seq, heads · head_dim)`.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        span: &Span,
        kv: &mut LayerKv,
        differentiable: bool,
    ) -> Result<Tensor> {
        let (start, seq, rope) = (span.start, span.seq, span.rope);
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |t: &Tensor, n: usize| t.reshape((1, seq, n, hd))?.transpose(1, 2);
        let q = rope.apply(&heads(q, nh)?, start, differentiable)?;
        let k = rope.apply(&heads(k, nkv)?, start, differentiable)?;
        let v = heads(v, nkv)?.contiguous()?;
        let (k, v) = match kv.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k.contiguous()?, v),
        };
        *kv = Some((k.clone(), v.clone()));
        let total = k.dim(2)?;
        // The causal softmax takes row i to sit at `start + i` of `total` keys.
        if total != start + seq {
            candle_core::bail!("{total} keys cached where {start} + {seq} positions were expected");
        }

        // Grouped-query attention without copying K/V per head: the `group` query heads that share a
        // KV head are stacked along the sequence axis.
        let group = nh / nkv;
        let q = q.contiguous()?.reshape((1, nkv, group * seq, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let att = q.matmul(&k.t()?)?;
        let att = if differentiable {
            let mut att = (att * scale)?;
            if let Some(mask) = span.mask()? {
                att = att
                    .reshape((1, nkv, group, seq, total))?
                    .broadcast_add(mask)?
                    .reshape((1, nkv, group * seq, total))?;
            }
            candle_nn::ops::softmax(&att, D::Minus1)?
        } else {
            att.apply_op1_no_bwd(&CausalSoftmax {
                scale: scale as f32,
                start,
                seq,
            })?
        };
        let y = att.matmul(&v)?; // (1, nkv, group*seq, hd)
        y.reshape((nh, seq, hd))?
            .transpose(0, 1)?
            .reshape((seq, nh * hd))
    }
}

/// Where one forward pass sits: its first absolute position, its length, the rotary tables, and the
/// causal mask that every differentiable layer shares (the serving layers' fused softmax needs none).
struct Span<'a> {
    start: usize,
    seq: usize,
    rope: &'a Rope,
    mask: std::cell::OnceCell<Tensor>,
}

impl<'a> Span<'a> {
    fn new(rope: &'a Rope, start: usize, seq: usize) -> Self {
        Self {
            start,
            seq,
            rope,
            mask: std::cell::OnceCell::new(),
        }
    }

    /// Additive `(seq, start + seq)`: row `i` sits at position `start + i`. None for a single token,
    /// which sees every position. Made on first use.
    fn mask(&self) -> Result<Option<&Tensor>> {
        let (start, seq) = (self.start, self.seq);
        if seq <= 1 {
            return Ok(None);
        }
        if let Some(mask) = self.mask.get() {
            return Ok(Some(mask));
        }
        let total = start + seq;
        let mask: Vec<f32> = (0..seq)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    if j > start + i {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (seq, total), &Device::Cpu)?;
        Ok(Some(self.mask.get_or_init(|| mask)))
    }
}

#[derive(Debug, Clone)]
pub struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn load(f: &mut GgufFile, p: &str, opts: LoadOptions) -> std::result::Result<Self, ModelError> {
        Ok(Self {
            gate: Linear::load(f, &format!("{p}.ffn_gate"), false, opts)?,
            up: Linear::load(f, &format!("{p}.ffn_up"), false, opts)?,
            down: Linear::load(f, &format!("{p}.ffn_down"), false, opts)?,
        })
    }

    /// `down_proj` input `z = silu(gate x) ⊙ (up x)`: the neuron activations STAR works on.
    fn neurons(&self, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        let [gate, up] = Linear::forward_shared(&[&self.gate, &self.up], x)?;
        match differentiable {
            true => candle_nn::ops::silu(&gate)? * up,
            false => gate.apply_op2_no_bwd(&up, &SiluMul),
        }
    }

    pub fn down(&self) -> &Linear {
        &self.down
    }
}

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    attn_norm: Tensor,
    attn: Attention,
    ffn_norm: Tensor,
    mlp: Mlp,
    eps: f64,
    /// Set on dense copies: use the slower norm/rope paths that candle can differentiate.
    differentiable: bool,
}

impl DecoderLayer {
    fn load(
        f: &mut GgufFile,
        i: usize,
        cfg: &Config,
        opts: LoadOptions,
    ) -> std::result::Result<Self, ModelError> {
        let p = format!("blk.{i}");
        Ok(Self {
            attn_norm: load_gain(f, &format!("{p}.attn_norm.weight"))?,
            attn: Attention::load(f, &p, cfg, opts)?,
            ffn_norm: load_gain(f, &format!("{p}.ffn_norm.weight"))?,
            mlp: Mlp::load(f, &p, opts)?,
            eps: cfg.rms_eps,
            differentiable: false,
        })
    }

    /// `x`: the rows of the sequences `spans` (one, or several packed), `kvs` their keys and values.
    fn forward(
        &self,
        index: usize,
        x: &Tensor,
        spans: &[Span],
        kvs: &mut [&mut LayerKv],
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        let d = self.differentiable;
        let h = rms_norm(x, &self.attn_norm, self.eps, d)?;
        let x = (self.attn.forward(&h, spans, kvs, d)? + x)?;
        if hooks.skip_mlp.contains(&index) {
            return Ok(x);
        }
        if let Some(capture) = hooks.capture.as_deref_mut() {
            capture.record_mid(index, &x);
        }
        let h = rms_norm(&x, &self.ffn_norm, self.eps, d)?;
        let mut z = self.mlp.neurons(&h, d)?;
        if let Some(probe) = hooks.neuron_probes.and_then(|p| p.get(&index)) {
            z = (z + probe)?;
        }
        if let Some(capture) = hooks.capture.as_deref_mut() {
            capture.record_neurons(index, &z);
        }
        let mut out = self.mlp.down.forward(&z)?;
        let fired = hooks.fired.as_deref_mut();
        let added = hooks
            .patches
            .map(|set| set.apply(index, &z, fired))
            .transpose()?;
        if let Some(add) = added.flatten() {
            out = (out + add)?;
        }
        out + x
    }

    pub fn mlp(&self) -> &Mlp {
        &self.mlp
    }
}

/// Token embeddings, kept as the GGUF stores them and dequantized a row at a time: rows are looked up,
/// never multiplied, so there is no reason to hold a dense copy (272 MB in f16 for the default model,
/// and f16 moved logits by up to 0.4).
#[derive(Debug)]
struct Embedding {
    dtype: GgmlDType,
    data: Vec<u8>,
    row_bytes: usize,
    hidden: usize,
}

impl Embedding {
    fn new(t: QTensor) -> Result<Self> {
        let (rows, hidden) = t.shape().dims2()?;
        let data = t.data()?.into_owned();
        Ok(Self {
            dtype: t.dtype(),
            row_bytes: data.len() / rows,
            data,
            hidden,
        })
    }

    /// The embeddings of `tokens`, `(len, hidden)` f32.
    fn rows(&self, tokens: &[u32]) -> Result<Tensor> {
        let rows = tokens
            .iter()
            .map(|&t| {
                let start = t as usize * self.row_bytes;
                let Some(raw) = self.data.get(start..start + self.row_bytes) else {
                    candle_core::bail!("token id {t} is outside the vocabulary");
                };
                qtensor_from_ggml(self.dtype, raw, vec![1, self.hidden], &Device::Cpu)?
                    .dequantize(&Device::Cpu)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&rows, 0)
    }
}

/// The model: weights only, immutable after load, shared by every request (`Arc<Qwen2>`).
#[derive(Debug)]
pub struct Qwen2 {
    config: Config,
    /// Shared with re-quantized copies (`Qwen2::requantized`).
    embed: Arc<Embedding>,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: Linear,
    rope: Rope,
}

impl Qwen2 {
    pub fn load(
        path: &Path,
        opts: LoadOptions,
    ) -> std::result::Result<(Arc<Self>, GgufFile), ModelError> {
        let mut f = GgufFile::open(path)?;
        let config = Config::from_gguf(&f)?;
        let corrupt = |e: candle_core::Error| ModelError::Corrupt {
            path: path.to_owned(),
            reason: super::one_line(&e),
        };
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            layers.push(DecoderLayer::load(&mut f, i, &config, opts)?);
        }
        let embed = Arc::new(Embedding::new(f.tensor("token_embd.weight")?).map_err(corrupt)?);
        let head_name = if f.has_tensor("output.weight") {
            "output"
        } else {
            "token_embd" // tied embeddings
        };
        let lm_head = Linear::load(&mut f, head_name, false, opts)?;
        let norm = load_gain(&mut f, "output_norm.weight")?;
        let rope = Rope::new(&config, config.context_length.min(32_768)).map_err(corrupt)?;
        Ok((
            Arc::new(Self {
                config,
                embed,
                layers,
                norm,
                lm_head,
                rope,
            }),
            f,
        ))
    }

    /// Runs a batch and a single token once so candle repacks every quantized matrix now (it does so
    /// lazily, at first use, for each of its batch and single-row kernels) rather than during the first
    /// completion.
    pub fn warm_up(&self) -> Result<()> {
        let mut cache = self.new_cache();
        self.next_logits(&[0, 1], &mut cache, &mut Hooks::default())?;
        self.next_logits(&[2], &mut cache, &mut Hooks::default())?;
        Ok(())
    }

    /// The model with each of `patches`' summed patches folded into its layer's `down_proj` and stored
    /// quantized again (`Linear::requantized`), the other weights shared: the alternative to serving
    /// patches as an overlay, for eval and bench to weigh. Gated patches cannot be folded: serve them
    /// over it as `patches.gated_only()`.
    pub fn requantized(&self, patches: &PatchSet) -> Result<Self> {
        let mut layers = self.layers.clone();
        for (l, patch) in patches.summed() {
            let layer = layers
                .get_mut(l)
                .ok_or_else(|| candle_core::Error::Msg(format!("no layer {l} to patch")))?;
            layer.mlp.down = layer.mlp.down.requantized(patch)?;
        }
        Ok(Self {
            config: self.config.clone(),
            embed: self.embed.clone(),
            layers,
            norm: self.norm.clone(),
            lm_head: self.lm_head.clone(),
            rope: self.rope.clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache {
            tokens: Vec::new(),
            layers: vec![None; self.config.num_layers],
            below: None,
        }
    }

    /// The longest context a forward pass accepts (the model's, capped by the rope table).
    pub fn max_positions(&self) -> usize {
        self.rope.cos.dims()[0]
    }

    /// Runs `tokens` after the cache's tokens and returns the final-normed hidden states `(seq, hidden)`.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        if let Some(l) = cache.below {
            candle_core::bail!(
                "a cache filled only below layer {l} cannot feed a whole forward pass"
            );
        }
        let x = self.run_layers(tokens, cache, hooks, self.layers.len())?;
        if let Some(capture) = hooks.capture.as_deref_mut() {
            capture.record_final(&x);
        }
        rms_norm(&x, &self.norm, self.config.rms_eps, false)
    }

    /// Runs `tokens` after the cache's through layers `..until` and returns the residual stream leaving
    /// them.
    fn run_layers(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        hooks: &mut Hooks,
        until: usize,
    ) -> Result<Tensor> {
        let start = cache.len();
        if start + tokens.len() > self.max_positions() {
            candle_core::bail!(
                "context of {} tokens exceeds the model's {}",
                start + tokens.len(),
                self.max_positions()
            );
        }
        if cache.layers.len() != self.layers.len() {
            cache.layers = vec![None; self.layers.len()];
        }
        let mut x = self.embed.rows(tokens)?;
        let span = Span::new(&self.rope, start, tokens.len());
        for (i, layer) in self.layers.iter().enumerate().take(until) {
            if let Some(capture) = hooks.capture.as_deref_mut() {
                capture.record_residual(i, &x);
            }
            let spans = std::slice::from_ref(&span);
            x = layer.forward(i, &x, spans, &mut [&mut cache.layers[i]], hooks)?;
        }
        cache.tokens.extend_from_slice(tokens);
        Ok(x)
    }

    /// Logits `(rows, vocab)` for final-normed hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    /// Runs `tokens` and returns the logits of the last one, as a vector.
    pub fn next_logits(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        hooks: &mut Hooks,
    ) -> Result<Vec<f32>> {
        let hidden = self.forward(tokens, cache, hooks)?;
        let last = hidden.narrow(0, hidden.dim(0)? - 1, 1)?;
        self.logits(&last)?.squeeze(0)?.to_vec1()
    }

    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// Final norm gain γ and the LM head as dense f32 (`vocab × hidden`), for the semantic steer.
    pub fn head_dense(&self) -> Result<(Tensor, Tensor)> {
        Ok((self.norm.clone(), self.lm_head.dense_weight()?))
    }
}
