//! The model cut at a layer, as repair runs it: the layers below run once to the residual entering it
//! (`Qwen2::residual_entering`), and the layers from it up run over that residual, as served or as dense
//! f32 copies that gradients flow through, over one sequence or several packed; and a layer's neurons
//! recomputed from a captured residual (`DecoderLayer::neurons_on`).

use super::{rms_norm, Attention, DecoderLayer, Mlp, Qwen2, Result, Span};
use crate::model::hooks::{Hooks, LayerPatch, PatchSet};
use crate::model::kv::{kv_positions, KvCache, LayerKv};
use crate::model::linear::Linear;
use candle_core::Tensor;

impl Qwen2 {
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
}

impl DecoderLayer {
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
        Ok(Self {
            attn_norm: self.attn_norm.clone(),
            attn: Attention {
                q: a.q.to_dense(None)?,
                k: a.k.to_dense(None)?,
                v: a.v.to_dense(None)?,
                o: a.o.to_dense(None)?,
                ..a.clone()
            },
            ffn_norm: self.ffn_norm.clone(),
            mlp: Mlp {
                gate: self.mlp.gate.to_dense(None)?,
                up: self.mlp.up.to_dense(None)?,
                down: self.mlp.down.to_dense(patch)?,
            },
            eps: self.eps,
            differentiable: true,
        })
    }
}
