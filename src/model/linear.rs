//! `Linear`, the projection every layer is made of: quantized for serving, dense f32 for gradient work,
//! and the ways its product is run (single-row kernel, fused shared-input kernels, frozen dense weight).

use super::gemv::RawMatrix;
use super::gguf::GgufFile;
use super::hooks::LayerPatch;
use super::ModelError;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};
use std::sync::Arc;

type Result<T> = std::result::Result<T, candle_core::Error>;

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

    pub(super) fn load(
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
        let q = QTensor::quantize(&self.patched_weight(patch)?, self.stored)?;
        Self::new(q, self.bias.clone(), self.opts)
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
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
    pub(super) fn forward_shared<const N: usize>(
        linears: &[&Linear; N],
        x: &Tensor,
    ) -> Result<[Tensor; N]> {
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
    pub(super) fn rounded_input(&self, x: &Tensor) -> Result<Tensor> {
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

    /// `dense_weight` with `patch` folded into its columns.
    fn patched_weight(&self, patch: &LayerPatch) -> Result<Tensor> {
        self.dense_weight()?
            .index_add(patch.index(), patch.delta(), 1)
    }

    /// A dense f32 copy, with `patch` folded in if given.
    pub(super) fn to_dense(&self, patch: Option<&LayerPatch>) -> Result<Self> {
        let weight = match patch {
            Some(p) => self.patched_weight(p)?,
            None => self.dense_weight()?,
        };
        Ok(Self {
            weight: QMatMul::Tensor(weight),
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

fn needs_requantize(dtype: GgmlDType) -> bool {
    matches!(
        dtype,
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1
    )
}
