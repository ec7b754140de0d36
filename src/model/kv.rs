//! The KV cache: per layer, the keys and values of the positions a sequence has seen, held apart from
//! the weights (`Qwen2::new_cache`).

use candle_core::Tensor;

type Result<T> = std::result::Result<T, candle_core::Error>;

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
    pub(super) tokens: Vec<u32>,
    pub(super) layers: Vec<LayerKv>,
    /// Set when only the layers below it were run (`Qwen2::residual_entering`).
    pub(super) below: Option<usize>,
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
