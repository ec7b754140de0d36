//! The semantic steer: the least-norm change of the final hidden state that closes the logit gap between
//! the model's token `a` and the developer's token `t`, through the norm-folded LM head
//! `Ŵ_U = W_U · diag(γ)`: `s = Ŵ_U⁺ (e_t − e_a) = (Ŵ_UᵀŴ_U)⁻¹ (û_t − û_a)`, then scaled (METHOD.md,
//! "what worked") to close the gap by `margin` past zero and multiplied by the RMS of the hidden state
//! the final norm divides by.

use super::linalg::Cholesky;
use crate::model::Qwen2;
use candle_core::{DType, Result, Tensor, D};
use sha2::{Digest, Sha256};

/// The factored head, built once per model.
pub struct Head {
    /// `W_U` as dense f32 `(vocab, hidden)`: the repair forward computes its logits with it.
    pub weight: Tensor,
    /// The final norm's gain `γ`: a row of `Ŵ_U` is a row of `W_U` times it (not stored twice).
    gamma: Vec<f64>,
    gram: Cholesky,
}

impl Head {
    /// `model`'s head, its factor from `stored` when that holds one for this head (what
    /// `factor_bytes` gave before, for the same model: the caller keys it by the model's sha256), else
    /// computed, the costly part: a pass over the whole head. Stored bytes end with the sha256 of what
    /// precedes them: torn or corrupt ones are recomputed, never trusted.
    pub fn of(model: &Qwen2, stored: Option<&[u8]>) -> Result<Self> {
        let (gamma, weight) = model.head_dense()?;
        // Contiguous: a padded serving matrix comes back as a narrowed view.
        let weight = weight.contiguous()?;
        let gamma: Vec<f64> = gamma.to_dtype(DType::F64)?.to_vec1()?;
        let hidden = weight.dim(1)?;
        let stored = stored.and_then(|bytes| {
            let (body, sum) = bytes.split_at_checked(bytes.len().checked_sub(32)?)?;
            (Sha256::digest(body).as_slice() == sum)
                .then(|| Cholesky::from_bytes(body, hidden))
                .flatten()
        });
        let gram = match stored {
            Some(gram) => gram,
            None => Self::factor(&weight, &gamma)?,
        };
        Ok(Self {
            weight,
            gamma,
            gram,
        })
    }

    /// The factor as `of` takes it back.
    pub fn factor_bytes(&self) -> Vec<u8> {
        let mut bytes = self.gram.to_bytes();
        bytes.extend_from_slice(&Sha256::digest(&bytes));
        bytes
    }

    fn factor(weight: &Tensor, gamma: &[f64]) -> Result<Cholesky> {
        let hidden = weight.dim(1)?;
        // Ŵ_UᵀŴ_U = diag(γ) (W_UᵀW_U) diag(γ): one pass over the big matrix, no folded copy.
        let mut gram: Vec<f64> = weight
            .t()?
            .matmul(weight)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1()?;
        for i in 0..hidden {
            for j in 0..hidden {
                gram[i * hidden + j] *= gamma[i] * gamma[j];
            }
        }
        Ok(Cholesky::new(&gram, hidden, 1e-6))
    }

    /// The pre-norm hidden-state change `(hidden,)` that moves the logit of `want` above that of `got`
    /// by `margin`, for a position whose logits are `logits` and whose pre-norm state has RMS `rms`.
    pub fn steer(
        &self,
        got: u32,
        want: u32,
        logits: &[f32],
        rms: f32,
        margin: f32,
    ) -> Result<Vec<f32>> {
        let row = |i: u32| -> Result<Vec<f64>> {
            let w: Vec<f32> = self.weight.get(i as usize)?.to_vec1()?;
            Ok(w.iter()
                .zip(&self.gamma)
                .map(|(w, g)| *w as f64 * g)
                .collect())
        };
        let (ut, ua) = (row(want)?, row(got)?);
        let v: Vec<f64> = ut.iter().zip(&ua).map(|(t, a)| t - a).collect();
        let x = self.gram.solve(&v);
        // How much one unit of `x` closes the gap (in normed space), and how much must close.
        let per_unit: f64 = v.iter().zip(&x).map(|(a, b)| a * b).sum();
        let gap = (logits[got as usize] - logits[want as usize]).max(0.0) as f64;
        if !gap.is_finite() {
            // Generation may not choose the developer's token here (`LineShape`): no steer reaches it.
            return Ok(vec![0.0; x.len()]);
        }
        let scale = (gap + margin as f64) / per_unit.max(f64::MIN_POSITIVE) * rms as f64;
        Ok(x.iter().map(|v| (v * scale) as f32).collect())
    }
}

/// RMS of each row of `(rows, hidden)`: what the final RMSNorm divides by.
pub fn row_rms(x: &Tensor) -> Result<Vec<f32>> {
    x.sqr()?.mean(D::Minus1)?.sqrt()?.to_vec1()
}
