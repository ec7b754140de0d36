//! The qwen2 decoder, read top to bottom: `Config`, `Linear`, `Attention`, `Mlp`, `DecoderLayer`, `Qwen2`.
//!
//! Written after candle-transformers' `quantized_qwen2`, with three differences that matter to star-ls:
//! the KV cache lives outside the weights (`KvCache`, so many documents share one model), the forward pass
//! takes explicit `Hooks` (activation capture, MLP occlusion, the patch overlay) that cost nothing when
//! empty, and any layer can be copied to dense f32 with differentiable norm/rope paths for gradient work.

use super::gemv::RawMatrix;
use super::gguf::GgufFile;
use super::hooks::{Hooks, LayerPatch, PatchSet};
use super::kernels::{CausalSoftmax, SiluMul};
use super::ModelError;
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};
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
    fn from_gguf(f: &GgufFile) -> std::result::Result<Self, ModelError> {
        let hidden_size = f.u32("qwen2.embedding_length")? as usize;
        let num_heads = f.u32("qwen2.attention.head_count")? as usize;
        let vocab_size = f
            .content
            .tensor_infos
            .get("token_embd.weight")
            .map(|t| t.shape.dims()[0])
            .ok_or_else(|| ModelError::Corrupt {
                path: f.path.clone(),
                reason: "missing tensor `token_embd.weight`".into(),
            })?;
        Ok(Self {
            vocab_size,
            hidden_size,
            intermediate_size: f.u32("qwen2.feed_forward_length")? as usize,
            num_layers: f.u32("qwen2.block_count")? as usize,
            num_heads,
            num_kv_heads: f.u32("qwen2.attention.head_count_kv")? as usize,
            head_dim: hidden_size / num_heads,
            rope_theta: f.f32("qwen2.rope.freq_base").unwrap_or(10_000.0),
            rms_eps: f.f32("qwen2.attention.layer_norm_rms_epsilon")? as f64,
            context_length: f.u32("qwen2.context_length")? as usize,
        })
    }
}

/// How the serving weights are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Re-quantize Q5_0/Q5_1/Q4_0 matrices to Q8_0 at load: candle has SIMD kernels for Q8_0 but only a
    /// scalar one for Q5_0, which most of the default model's matrices use.
    pub requantize_q8: bool,
    /// Zero-pad the input dimension of matrices to a multiple of 256 (as Q8_0): candle's repacked int8
    /// kernels (AVX-512 VNNI), several times faster than its generic ones, only take such shapes, and
    /// qwen2's hidden sizes (896, 1536) are not. Inputs are padded with zeros to match.
    pub pad_for_repack: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            requantize_q8: true,
            pad_for_repack: has_int8_dot_product(),
        }
    }
}

fn has_int8_dot_product() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Input block of candle's repacked kernels (`QK_K`).
const REPACK_K: usize = 256;

/// `y = x Wᵀ + b`. Quantized for serving; `QMatMul::Tensor` (dense f32) in gradient copies.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: QMatMul,
    bias: Option<Tensor>,
    /// The real input width; the stored weight may be zero-padded past it (`LoadOptions::pad_for_repack`).
    in_features: usize,
    /// The GGUF's own blocks, for single-row products, when `weight` was re-stored for batch kernels.
    decode: Option<Arc<RawMatrix>>,
    /// The block type the serving matmul multiplies by (None for float weights); dense copies keep it.
    kernel: Option<GgmlDType>,
    /// The block type the GGUF stores, and how the serving weights were made from it: what a
    /// re-quantized patch is stored as (`Linear::requantized`).
    stored: GgmlDType,
    opts: LoadOptions,
}

impl Linear {
    /// Input width (neurons, for `down_proj`), as the model defines it (before any padding).
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    fn load(
        f: &mut GgufFile,
        name: &str,
        bias: bool,
        opts: LoadOptions,
    ) -> std::result::Result<Self, ModelError> {
        let path = f.path.clone();
        let corrupt = |e: candle_core::Error| ModelError::Corrupt {
            path: path.clone(),
            reason: format!("{name}: {}", super::one_line(&e)),
        };
        let w = f.tensor(&format!("{name}.weight"))?;
        let bias = match bias {
            true => Some(
                f.tensor(&format!("{name}.bias"))?
                    .dequantize(&Device::Cpu)
                    .map_err(corrupt)?,
            ),
            false => None,
        };
        Self::new(w, bias, opts).map_err(corrupt)
    }

    /// Serving weights from the GGUF's blocks `w`, held as `opts` says.
    fn new(w: QTensor, bias: Option<Tensor>, opts: LoadOptions) -> Result<Self> {
        let in_features = w.shape().dims()[1];
        let stored = w.dtype();
        let quantized = !matches!(stored, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        let pad = if opts.pad_for_repack && quantized {
            in_features.next_multiple_of(REPACK_K) - in_features
        } else {
            0
        };
        let restore = pad > 0 || (opts.requantize_q8 && needs_requantize(stored));
        let decode = match restore {
            true => RawMatrix::new(&w)?.map(Arc::new),
            false => None,
        };
        let w = if restore {
            let dense = w.dequantize(&Device::Cpu)?.pad_with_zeros(1, 0, pad)?;
            QTensor::quantize(&dense, GgmlDType::Q8_0)?
        } else {
            w
        };
        Ok(Self {
            kernel: quantized.then(|| w.dtype()),
            weight: QMatMul::from_qtensor(w)?,
            bias,
            in_features,
            decode,
            stored,
            opts,
        })
    }

    /// This weight with `patch` folded into its columns and quantized again to the GGUF's block type,
    /// served as the loaded weights are: no overlay left, but the whole matrix is rounded again (by
    /// candle's quantizers, not the ones that made the GGUF), so the patch and every other weight pick
    /// up rounding; a real patch has a column in about every block anyway. Starts from the serving
    /// weight (for re-stored matrices, its Q8_0 copy of the GGUF's blocks: within half a Q8_0 step).
    pub fn requantized(&self, patch: &LayerPatch) -> Result<Self> {
        let w = self
            .dense_weight()?
            .index_add(patch.index(), patch.delta(), 1)?;
        let q = QTensor::quantize(&w, self.stored)?;
        Self::new(q, self.bias.clone(), self.opts)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match (&self.decode, self.padding(), &self.weight) {
            (Some(raw), _, _) if x.dim(0)? == 1 => raw.gemv(x)?,
            (_, _, QMatMul::Tensor(w)) => x.contiguous()?.apply_op1(FrozenWeight(w.clone()))?,
            (_, 0, _) => self.weight.forward(x)?,
            (_, pad, _) => self.weight.forward(&x.pad_with_zeros(D::Minus1, 0, pad)?)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// Several projections of the same input. When they are all quantized alike, candle runs them as one
    /// fused kernel: the input is quantized once and the threads are dispatched once.
    fn forward_shared<const N: usize>(linears: &[&Linear; N], x: &Tensor) -> Result<[Tensor; N]> {
        if x.dim(0)? == 1 && linears.iter().all(|l| l.decode.is_some()) {
            return Ok(linears
                .map(|l| l.forward(x))
                .into_iter()
                .collect::<Result<Vec<_>>>()?
                .try_into()
                .expect("one output per projection"));
        }
        let pad = linears[0].padding();
        let weights: Option<Vec<&QTensor>> = linears
            .iter()
            .map(|l| match &l.weight {
                QMatMul::QTensor(q) if l.padding() == pad => Some(q.as_ref()),
                _ => None,
            })
            .collect();
        let fused = match weights {
            Some(ws) => QTensor::gemv_fused_shared_lhs(&ws, &x.pad_with_zeros(D::Minus1, 0, pad)?)?,
            None => None,
        };
        let outs: Vec<Tensor> = match fused {
            Some(outs) => outs
                .into_iter()
                .zip(linears)
                .map(|(y, l)| match &l.bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                })
                .collect::<Result<_>>()?,
            None => linears
                .iter()
                .map(|l| l.forward(x))
                .collect::<Result<_>>()?,
        };
        Ok(outs.try_into().expect("one output per projection"))
    }

    /// `x` rounded as the serving kernels round a batch's input to this weight before their integer
    /// products: to Q8_K rows in candle's repacked kernels (K-quants, and Q8_0 with AVX-512 VNNI),
    /// else to Q8_0 blocks; unrounded for float weights.
    fn rounded_input(&self, x: &Tensor) -> Result<Tensor> {
        let to = match self.kernel {
            None => return Ok(x.clone()),
            Some(GgmlDType::Q8_0) if has_int8_dot_product() => GgmlDType::Q8K,
            Some(t) if t.block_size() == 32 => GgmlDType::Q8_0,
            Some(_) => GgmlDType::Q8K,
        };
        let k = x.dim(1)?;
        let block = to.block_size();
        let padded = x.pad_with_zeros(1, 0, k.next_multiple_of(block) - k)?;
        QTensor::quantize(&padded, to)?
            .dequantize(&Device::Cpu)?
            .narrow(1, 0, k)
    }

    fn padding(&self) -> usize {
        match &self.weight {
            QMatMul::QTensor(q) => q.shape().dims()[1] - self.in_features,
            _ => 0,
        }
    }

    /// The weight as a dense, contiguous f32 `(out, in)` tensor (without the padding: a view of the
    /// padded one would keep all of it alive).
    pub fn dense_weight(&self) -> Result<Tensor> {
        let w = match &self.weight {
            QMatMul::QTensor(q) => q.dequantize(&Device::Cpu)?,
            QMatMul::Tensor(t) => t.clone(),
            QMatMul::TensorF16(t) => t.to_dtype(DType::F32)?,
        };
        w.narrow(1, 0, self.in_features)?.contiguous()
    }

    fn to_dense(&self) -> Result<Self> {
        Ok(Self {
            weight: QMatMul::Tensor(self.dense_weight()?),
            bias: self.bias.clone(),
            in_features: self.in_features,
            decode: None,
            kernel: self.kernel,
            stored: self.stored,
            opts: self.opts,
        })
    }
}

/// `x Wᵀ` for a dense weight that is never trained: its backward gives the input's gradient only. A
/// plain matmul's backward also computes and sums the weight's gradient, which repair never reads:
/// for the dense upper layers that is a weight-sized product, buffer and add per projection and pass.
struct FrozenWeight(Tensor);

impl candle_core::CustomOp1 for FrozenWeight {
    fn name(&self) -> &'static str {
        "frozen-weight-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("frozen-weight input not contiguous".into()))?;
        let x = Tensor::from_slice(
            &storage.as_slice::<f32>()?[start..end],
            layout.shape(),
            &Device::Cpu,
        )?;
        let y = x.broadcast_matmul(&self.0.t()?)?;
        let shape = y.shape().clone();
        let data = y.flatten_all()?.to_vec1::<f32>()?;
        Ok((candle_core::CpuStorage::F32(data), shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.broadcast_matmul(&self.0)?))
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

    /// `z` on neurons `columns` only (all of them for none), from `mid` (the residual between this layer's attention and its
    /// MLP, as `Capture::mid` records it), in f32 from the weights as this layer holds them: the
    /// serving kernels quantize their input, so on a quantized layer this differs from the pass's
    /// own `z` by that rounding. Rows are independent: any subset of a pass's rows can be given.
    pub fn neurons_on(&self, mid: &Tensor, columns: Option<&Tensor>) -> Result<Tensor> {
        let h = rms_norm(mid, &self.ffn_norm, self.eps, false)?;
        let rows = |l: &Linear| -> Result<Tensor> {
            let w = l.dense_weight()?;
            let w = match columns {
                Some(c) => w.index_select(c, 0)?,
                None => w,
            };
            l.rounded_input(&h)?.matmul(&w.t()?)
        };
        let (gate, up) = (rows(&self.mlp.gate)?, rows(&self.mlp.up)?);
        candle_nn::ops::silu(&gate)? * up
    }

    /// Whether this is a dense copy that gradients flow through (`Qwen2::dense_layers`).
    pub fn is_dense(&self) -> bool {
        self.differentiable
    }

    /// A dense f32 copy with differentiable paths; `patch` (the live overlay's summed one, if any) folded
    /// into its `down_proj`, so gradient work starts from the model as it serves.
    fn to_dense(&self, patch: Option<&LayerPatch>) -> Result<Self> {
        let a = &self.attn;
        let mut down = self.mlp.down.to_dense()?;
        if let Some(p) = patch {
            down.weight =
                QMatMul::Tensor(down.dense_weight()?.index_add(p.index(), p.delta(), 1)?);
        }
        Ok(Self {
            attn_norm: self.attn_norm.clone(),
            attn: Attention {
                q: a.q.to_dense()?,
                k: a.k.to_dense()?,
                v: a.v.to_dense()?,
                o: a.o.to_dense()?,
                ..a.clone()
            },
            ffn_norm: self.ffn_norm.clone(),
            mlp: Mlp {
                gate: self.mlp.gate.to_dense()?,
                up: self.mlp.up.to_dense()?,
                down,
            },
            eps: self.eps,
            differentiable: true,
        })
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

/// How many positions per-layer keys and values (`(1, heads, positions, head_dim)`, `None` for none) hold.
pub fn kv_positions(kv: &[LayerKv]) -> Result<usize> {
    match kv.iter().flatten().next() {
        Some((k, _)) => k.dim(2),
        None => Ok(0),
    }
}

/// One layer's keys and values `(1, kv heads, positions, head dim)` of a sequence; `None` before any.
pub type LayerKv = Option<(Tensor, Tensor)>;

/// Keys and values of the tokens seen so far, per layer, with the tokens themselves so a later prompt
/// can reuse the longest common prefix.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    tokens: Vec<u32>,
    layers: Vec<LayerKv>,
    /// Set when only the layers below it were run (`Qwen2::residual_entering`).
    below: Option<usize>,
}

impl KvCache {
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Forget every position from `len` on.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.tokens.len() {
            return Ok(());
        }
        self.tokens.truncate(len);
        for kv in &mut self.layers {
            *kv = match kv.take() {
                Some((k, v)) if len > 0 => Some((k.narrow(2, 0, len)?, v.narrow(2, 0, len)?)),
                _ => None,
            };
        }
        Ok(())
    }

    /// Bytes held by the cached keys and values.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * 4)
            .sum()
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
        let linear = |f: &mut GgufFile, name: &str, bias: bool| Linear::load(f, name, bias, opts);
        let dense = |f: &mut GgufFile, name: &str| -> std::result::Result<Tensor, ModelError> {
            f.tensor(name)?.dequantize(&Device::Cpu).map_err(corrupt)
        };

        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = format!("blk.{i}");
            layers.push(DecoderLayer {
                attn_norm: dense(&mut f, &format!("{p}.attn_norm.weight"))?,
                attn: Attention {
                    q: linear(&mut f, &format!("{p}.attn_q"), true)?,
                    k: linear(&mut f, &format!("{p}.attn_k"), true)?,
                    v: linear(&mut f, &format!("{p}.attn_v"), true)?,
                    o: linear(&mut f, &format!("{p}.attn_output"), false)?,
                    num_heads: config.num_heads,
                    num_kv_heads: config.num_kv_heads,
                    head_dim: config.head_dim,
                },
                ffn_norm: dense(&mut f, &format!("{p}.ffn_norm.weight"))?,
                mlp: Mlp {
                    gate: linear(&mut f, &format!("{p}.ffn_gate"), false)?,
                    up: linear(&mut f, &format!("{p}.ffn_up"), false)?,
                    down: linear(&mut f, &format!("{p}.ffn_down"), false)?,
                },
                eps: config.rms_eps,
                differentiable: false,
            });
        }
        let embed = Arc::new(Embedding::new(f.tensor("token_embd.weight")?).map_err(corrupt)?);
        let head_name = if f.has_tensor("output.weight") {
            "output"
        } else {
            "token_embd" // tied embeddings
        };
        let lm_head = linear(&mut f, head_name, false)?;
        let norm = dense(&mut f, "output_norm.weight")?;
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

    /// Runs `tokens` after `cache` under `patches` through the layers below `layer` only, and returns
    /// the residual stream entering `layer` at each of them: what the layers from `layer` up start
    /// from, whatever is patched there. The cache then holds only those layers: it can feed more of
    /// these calls, not a whole forward pass.
    pub fn residual_entering(
        &self,
        layer: usize,
        tokens: &[u32],
        cache: &mut KvCache,
        patches: Option<&PatchSet>,
    ) -> Result<Tensor> {
        if layer > self.layers.len() || cache.below.is_some_and(|l| l < layer) {
            candle_core::bail!("no residual entering layer {layer} from this cache");
        }
        let x = self.run_layers(
            tokens,
            cache,
            &mut Hooks {
                patches,
                ..Hooks::default()
            },
            layer,
        )?;
        cache.below = Some(layer);
        Ok(x)
    }

    /// Makes whole a cache that `residual_entering(layer, ..)` filled: runs the layers from `layer` up
    /// over `residual`, what entered `layer` at the cache's positions, under `patches`. Generation
    /// then goes on from it as from a whole pass, and the frozen layers below ran once for any number
    /// of overlays.
    pub fn finish_cache(
        &self,
        layer: usize,
        residual: &Tensor,
        cache: &mut KvCache,
        patches: Option<&PatchSet>,
    ) -> Result<()> {
        let upper_empty = cache.layers.iter().skip(layer).all(Option::is_none);
        if cache.below != Some(layer) || !upper_empty || residual.dim(0)? != cache.len() {
            candle_core::bail!("the cache does not end at layer {layer} for these positions");
        }
        self.forward_after(
            layer,
            &self.layers[layer..],
            residual,
            &mut cache.layers[layer..],
            &mut Hooks {
                patches,
                ..Hooks::default()
            },
        )?;
        cache.below = None;
        Ok(())
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

    /// Dense f32 copies of layers `range`, with differentiable norm and rope, for gradient work, with the
    /// `live` overlay's summed patches folded in (its gated ones still go in `Hooks::patches`).
    pub fn dense_layers(
        &self,
        range: std::ops::Range<usize>,
        live: Option<&PatchSet>,
    ) -> Result<Vec<DecoderLayer>> {
        range
            .map(|i| self.layers[i].to_dense(live.and_then(|p| p.layer(i))))
            .collect()
    }

    /// Runs dense (or serving) `layers`, numbered from `first`, over residual-stream input `x` at
    /// positions `0..seq` with no cache, then the final norm: the upper part of the model, as repair
    /// needs it, fed with residuals captured once from the serving model.
    pub fn forward_from(
        &self,
        first: usize,
        layers: &[DecoderLayer],
        x: &Tensor,
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        self.forward_after(first, layers, x, &mut vec![None; layers.len()], hooks)
    }

    /// `forward_from` for the positions after those whose keys and values `kv` holds (one entry per
    /// layer, `None` for none); `kv` gains the new positions'. Repair runs a case's few target rows
    /// this way over its prompt's keys and values, computed once.
    pub fn forward_after(
        &self,
        first: usize,
        layers: &[DecoderLayer],
        x: &Tensor,
        kv: &mut [LayerKv],
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        let rows = x.dim(0)?;
        self.forward_packed(first, layers, x, &mut [(rows, kv)], hooks)
    }

    /// `forward_after` over several sequences at once: `x` holds their rows one after another, and
    /// `seqs[i]` is sequence `i`'s row count and its keys and values per layer. Every weight is read
    /// once for all of them (repair scores a batch's tails this way); attention stays per sequence.
    pub fn forward_packed(
        &self,
        first: usize,
        layers: &[DecoderLayer],
        x: &Tensor,
        seqs: &mut [(usize, &mut [LayerKv])],
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        let mut spans = Vec::with_capacity(seqs.len());
        for (rows, kv) in seqs.iter() {
            if kv.len() != layers.len() {
                candle_core::bail!("{} key/value entries for {} layers", kv.len(), layers.len());
            }
            spans.push(Span::new(&self.rope, kv_positions(kv)?, *rows));
        }
        if spans.iter().map(|s| s.seq).sum::<usize>() != x.dim(0)? {
            candle_core::bail!("the sequences' rows do not add up to the input's");
        }
        let mut x = x.clone();
        for (j, layer) in layers.iter().enumerate() {
            if let Some(capture) = hooks.capture.as_deref_mut() {
                capture.record_residual(first + j, &x);
            }
            let mut kvs: Vec<_> = seqs.iter_mut().map(|(_, kv)| &mut kv[j]).collect();
            x = layer.forward(first + j, &x, &spans, &mut kvs, hooks)?;
        }
        if let Some(capture) = hooks.capture.as_deref_mut() {
            capture.record_final(&x);
        }
        rms_norm(&x, &self.norm, self.config.rms_eps, true)
    }

    /// Final norm gain γ and the LM head as dense f32 (`vocab × hidden`), for the semantic steer.
    pub fn head_dense(&self) -> Result<(Tensor, Tensor)> {
        Ok((self.norm.clone(), self.lm_head.dense_weight()?))
    }
}

fn needs_requantize(dtype: GgmlDType) -> bool {
    matches!(
        dtype,
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1
    )
}
