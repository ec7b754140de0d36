//! Fused element-wise kernels of the serving pass: the attention's scaled causal softmax and SwiGLU's
//! `silu(gate) · up`, each one pass over memory on an `exp` the compiler vectorizes. candle runs each as
//! several passes (scale, mask, softmax; silu, product) with a scalar `expf` per element. They have no
//! backward: repair's dense copies keep candle's differentiable ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Error, Layout, Result, Shape};
use rayon::prelude::*;

/// `e^x` within 3e-7 relative, branch-free so that loops over it vectorize. Below -86 it gives about
/// e^-86 (nothing, beside the 1 a softmax row's maximum contributes).
#[inline(always)]
fn exp(x: f32) -> f32 {
    // Adding and subtracting 1.5 · 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    // ln 2 in two parts (Cody and Waite), so that `x − k ln 2` stays exact for large `k`.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-86.0, 88.0);
    // `k` = x / ln 2 rounded, also as an integer in the low bits of `rounded`: `as i32` would cost a
    // scalar saturating conversion per element.
    let rounded = x * std::f32::consts::LOG2_E + ROUND;
    let k = rounded - ROUND;
    // e^x = 2^k · e^r, with r in [-ln 2 / 2, ln 2 / 2]; e^r from its Taylor series to degree 7.
    let r = (x - k * LN2_HI) - k * LN2_LO;
    const C: [f32; 7] = [
        1.0,
        0.5,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        1.0 / 5040.0,
    ];
    let p = 1.0 + r * C.iter().rev().fold(0.0, |acc, &c| c + r * acc);
    let times_2_to_k = rounded.to_bits().wrapping_sub(ROUND.to_bits()) << 23;
    f32::from_bits(p.to_bits().wrapping_add(times_2_to_k))
}

/// Elements from which a kernel splits its work across threads: below, a decoded token's rows, the
/// hand-off would cost more than the work.
const PARALLEL_FROM: usize = 1 << 16;

/// Lanes of the reductions below: wide enough for the compiler to keep them in vector registers.
const LANES: usize = 16;

fn reduce(xs: &[f32], init: f32, op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder().iter().fold(init, |a, &x| op(a, x));
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = op(*a, x);
        }
    }
    acc.into_iter().fold(rest, op)
}

fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::Msg("fused kernel input not contiguous".into()))?;
    Ok(&storage.as_slice::<f32>()?[start..end])
}

/// `softmax(scale · s)` over the last axis of attention scores `(.., rows, keys)`, where row `r` is the
/// query at position `start + r % seq` and sees the keys up to it; later keys get exactly 0.
pub struct CausalSoftmax {
    pub scale: f32,
    pub start: usize,
    pub seq: usize,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous(storage, layout)?;
        let keys = layout.dims().last().copied().unwrap_or(1).max(1);
        let mut dst = vec![0f32; src.len()];
        let row = |(r, (s, d)): (usize, (&[f32], &mut [f32]))| {
            let seen = (self.start + r % self.seq + 1).min(keys);
            let (s, d) = (&s[..seen], &mut d[..seen]);
            let max = reduce(s, f32::NEG_INFINITY, f32::max);
            for (o, &v) in d.iter_mut().zip(s) {
                *o = exp((v - max) * self.scale);
            }
            let inv = 1.0 / reduce(d, 0.0, |a, b| a + b);
            d.iter_mut().for_each(|o| *o *= inv);
        };
        match src.len() < PARALLEL_FROM {
            true => src
                .chunks(keys)
                .zip(dst.chunks_mut(keys))
                .enumerate()
                .for_each(row),
            false => src
                .par_chunks(keys)
                .zip(dst.par_chunks_mut(keys))
                .enumerate()
                .with_min_len(16)
                .for_each(row),
        }
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

/// `silu(gate) ⊙ up` for two tensors of one shape: SwiGLU's neuron activations.
pub struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if gate_layout.shape() != up_layout.shape() {
            return Err(Error::Msg("silu-mul of tensors of different shapes".into()));
        }
        let (g, u) = (contiguous(gate, gate_layout)?, contiguous(up, up_layout)?);
        let mut dst = vec![0f32; g.len()];
        let run = |(d, (g, u)): (&mut [f32], (&[f32], &[f32]))| {
            for ((o, &g), &u) in d.iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + exp(-g)) * u;
            }
        };
        match g.len() < PARALLEL_FROM {
            true => run((&mut dst, (g, u))),
            false => dst
                .par_chunks_mut(PARALLEL_FROM / 4)
                .zip(
                    g.par_chunks(PARALLEL_FROM / 4)
                        .zip(u.par_chunks(PARALLEL_FROM / 4)),
                )
                .for_each(run),
        }
        Ok((CpuStorage::F32(dst), gate_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn exp_is_within_3e7_of_libm_over_the_range_softmax_uses() {
        for i in -86_000..=88_000 {
            let x = i as f32 / 1000.0;
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            assert!(
                ((got - want) / want).abs() < 3e-7,
                "exp({x}) = {got}, not {want}"
            );
        }
        assert!(exp(-1e4) < 1e-37 && exp(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn the_fused_kernels_equal_candles_ops() {
        let dev = Device::Cpu;
        // Small enough for one thread, and large enough to split.
        for (seq, start) in [(5, 3), (64, 100)] {
            softmax_equals_candles(seq, start);
        }
        for rows in [3, 300] {
            let g = Tensor::randn(0f32, 4.0, (rows, 1000), &dev).unwrap();
            let u = Tensor::randn(0f32, 1.0, (rows, 1000), &dev).unwrap();
            let fused = g.apply_op2_no_bwd(&u, &SiluMul).unwrap();
            let plain = (candle_nn::ops::silu(&g).unwrap() * &u).unwrap();
            let gap = (fused - plain).unwrap().abs().unwrap().max_all().unwrap();
            assert!(gap.to_scalar::<f32>().unwrap() < 1e-5);
        }
    }

    fn softmax_equals_candles(seq: usize, start: usize) {
        let dev = Device::Cpu;
        let keys = start + seq;
        // Seven heads' rows stacked, as grouped-query attention stacks them.
        let s = Tensor::randn(0f32, 3.0, (1, 7 * seq, keys), &dev).unwrap();
        let scale = 0.125;
        let fused = s
            .apply_op1_no_bwd(&CausalSoftmax { scale, start, seq })
            .unwrap();
        let mask: Vec<f32> = (0..7 * seq)
            .flat_map(|r| {
                (0..keys).map(move |j| {
                    if j > start + r % seq {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (1, 7 * seq, keys), &dev).unwrap();
        let plain =
            candle_nn::ops::softmax_last_dim(&((s * scale as f64).unwrap() + mask).unwrap())
                .unwrap();
        let gap = (fused - plain).unwrap().abs().unwrap().max_all().unwrap();
        assert!(gap.to_scalar::<f32>().unwrap() < 1e-6, "seq {seq}");
    }
}
