//! Single-row matrix × vector products straight on the GGUF's Q5_0 and Q8_0 blocks, for decoding.
//!
//! Decoding one token reads every weight once, so its speed is the memory bandwidth divided by the bytes
//! per weight. candle has fast kernels only for Q8_0 at input widths that are multiples of 256, which
//! means re-storing the default model's Q5_0 matrices at 8.5 bits a weight (and padding 896 to 1024);
//! these kernels read the 5.5-bit originals instead. Prefill, where compute dominates, keeps candle's
//! repacked int8 kernels.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor};
use half::f16;

const BLOCK: usize = 32;

/// A quantized matrix `(rows, cols)` kept as the GGUF stores it, for `gemv`.
#[derive(Debug)]
pub struct RawMatrix {
    kind: Kind,
    data: Vec<u8>,
    rows: usize,
    cols: usize,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Q5_0,
    Q8_0,
}

impl Kind {
    fn block_bytes(self) -> usize {
        match self {
            Kind::Q5_0 => 22, // f16 scale, 32 high bits, 16 bytes of low nibbles
            Kind::Q8_0 => 34, // f16 scale, 32 signed bytes
        }
    }
}

/// Whether this CPU runs the kernels (x86-64 with AVX2 and FMA).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl RawMatrix {
    /// A copy of `t`'s blocks, when it is a Q5_0 or Q8_0 matrix these kernels take.
    pub fn new(t: &QTensor) -> Result<Option<Self>> {
        let kind = match t.dtype() {
            GgmlDType::Q5_0 => Kind::Q5_0,
            GgmlDType::Q8_0 => Kind::Q8_0,
            _ => return Ok(None),
        };
        let (rows, cols) = t.shape().dims2()?;
        if cols % BLOCK != 0 || !available() {
            return Ok(None);
        }
        Ok(Some(Self {
            kind,
            data: t.data()?.into_owned(),
            rows,
            cols,
        }))
    }

    /// `W x` for one input row `x` `(1, cols)`: `(1, rows)`.
    pub fn gemv(&self, x: &Tensor) -> Result<Tensor> {
        let x: Vec<f32> = x.flatten_all()?.to_vec1()?;
        if x.len() != self.cols {
            candle_core::bail!(
                "gemv: input of {} for a matrix of {} columns",
                x.len(),
                self.cols
            );
        }
        let xq = quantize_row(&x);
        let row_bytes = self.cols / BLOCK * self.kind.block_bytes();
        let mut y = vec![0f32; self.rows];
        let out = OutPtr(y.as_mut_ptr());
        // candle's own worker pool: a second pool would spin against it for the same cores.
        candle_core::utils::barrier_pool().execute_chunked(self.rows, |range| {
            for r in range {
                let row = &self.data[r * row_bytes..(r + 1) * row_bytes];
                // SAFETY: the pool hands out disjoint row ranges, each below `self.rows`.
                unsafe { *out.at(r) = dot(self.kind, row, &xq) };
            }
        });
        Tensor::from_vec(y, (1, self.rows), &Device::Cpu)
    }
}

/// The output buffer, shared by the workers that each write their own rows.
struct OutPtr(*mut f32);

// SAFETY: workers write disjoint elements, and the buffer outlives the parallel call.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `i` must be in bounds, and no other thread may write it meanwhile.
    unsafe fn at(&self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}

/// The input quantized like ggml's Q8_0: per block of 32, a scale and 32 signed bytes.
struct QuantizedRow {
    scales: Vec<f32>,
    quants: Vec<i8>,
}

fn quantize_row(x: &[f32]) -> QuantizedRow {
    let mut scales = Vec::with_capacity(x.len() / BLOCK);
    let mut quants = Vec::with_capacity(x.len());
    for block in x.chunks(BLOCK) {
        let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = max / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        // ggml rounds the scale through f16 when it stores it; do the same so results match llama.cpp.
        scales.push(f16::from_f32(d).to_f32());
        quants.extend(block.iter().map(|v| (v * inv).round() as i8));
    }
    QuantizedRow { scales, quants }
}

fn dot(kind: Kind, row: &[u8], x: &QuantizedRow) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `RawMatrix::new` only builds matrices when the CPU has AVX2 and FMA.
        unsafe {
            match kind {
                Kind::Q5_0 => avx2::dot_q5_0(row, x),
                Kind::Q8_0 => avx2::dot_q8_0(row, x),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kind, row, x);
        unreachable!("RawMatrix is only built on x86-64")
    }
}

/// The same products in plain Rust: the reference the SIMD kernels are tested against.
#[cfg(test)]
fn dot_reference(kind: Kind, row: &[u8], x: &QuantizedRow) -> f32 {
    let bb = kind.block_bytes();
    let mut sum = 0f32;
    for (b, block) in row.chunks(bb).enumerate() {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        let xs = &x.quants[b * BLOCK..(b + 1) * BLOCK];
        let mut acc = 0i32;
        for (j, &xq) in xs.iter().enumerate() {
            let w = match kind {
                Kind::Q8_0 => block[2 + j] as i8 as i32,
                Kind::Q5_0 => {
                    let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                    let nibble = if j < 16 {
                        block[6 + j] & 0x0F
                    } else {
                        block[6 + j - 16] >> 4
                    };
                    (nibble as i32 | (((qh >> j) & 1) as i32) << 4) - 16
                }
            };
            acc += w * xq as i32;
        }
        sum += d * x.scales[b] * acc as f32;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! ggml's AVX2 formulation: widen the weights to signed bytes, multiply with `maddubs` on |w| and
    //! sign-adjusted x, sum pairs with `madd`, scale the block's integer sum by both scales.

    use super::{QuantizedRow, BLOCK};
    use half::f16;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block_dot(w: __m256i, x: __m256i) -> __m256 {
        let aw = _mm256_sign_epi8(w, w);
        let sx = _mm256_sign_epi8(x, w);
        let pairs = _mm256_maddubs_epi16(aw, sx);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), pairs))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q8_0(row: &[u8], x: &QuantizedRow) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (b, block) in row.chunks_exact(34).enumerate() {
            let d = f16::from_le_bytes([block[0], block[1]]).to_f32() * x.scales[b];
            let w = _mm256_loadu_si256(block.as_ptr().add(2) as *const __m256i);
            let xv = _mm256_loadu_si256(x.quants.as_ptr().add(b * BLOCK) as *const __m256i);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), block_dot(w, xv), acc);
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q5_0(row: &[u8], x: &QuantizedRow) -> f32 {
        let low = _mm256_set1_epi8(0x0F);
        let shuffle = _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0x0000000000000000,
        );
        let bit = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
        let mut acc = _mm256_setzero_ps();
        for (b, block) in row.chunks_exact(22).enumerate() {
            let d = f16::from_le_bytes([block[0], block[1]]).to_f32() * x.scales[b];
            let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
            // Low nibbles are elements 0..16, high nibbles 16..32.
            let qs = _mm_loadu_si128(block.as_ptr().add(6) as *const __m128i);
            let nibbles = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(qs, 4), qs), low);
            // Byte j is all ones where bit j of qh is set.
            let bits = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), shuffle);
            let set = _mm256_cmpeq_epi8(_mm256_or_si256(bits, bit), _mm256_set1_epi64x(-1));
            // (nibble | bit << 4) - 16: where the bit is clear that is nibble | 0xF0 as a signed byte.
            let w = _mm256_or_si256(
                nibbles,
                _mm256_andnot_si256(set, _mm256_set1_epi8(0xF0u8 as i8)),
            );
            let xv = _mm256_loadu_si256(x.quants.as_ptr().add(b * BLOCK) as *const __m256i);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), block_dot(w, xv), acc);
        }
        hsum(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_match_the_reference_and_the_dequantized_product() {
        if !available() {
            return;
        }
        use rand::{Rng, SeedableRng};
        let (rows, cols) = (70, 96);
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut normal = |n: usize, scale: f32| -> Vec<f32> {
            // A sum of uniforms: near-normal, seeded, so the test is the same on every run.
            (0..n)
                .map(|_| scale * ((0..4).map(|_| rng.random::<f32>()).sum::<f32>() - 2.0))
                .collect()
        };
        let w = Tensor::from_vec(normal(rows * cols, 0.5), (rows, cols), &Device::Cpu).unwrap();
        let xs = normal(cols, 1.0);
        let x = Tensor::from_vec(xs.clone(), (1, cols), &Device::Cpu).unwrap();
        let xq = quantize_row(&xs);
        for dtype in [GgmlDType::Q5_0, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let m = RawMatrix::new(&q).unwrap().unwrap();
            let got: Vec<f32> = m
                .gemv(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let dense: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let row_bytes = cols / BLOCK * m.kind.block_bytes();
            for r in 0..rows {
                let wr = &dense[r * cols..(r + 1) * cols];
                let exact: f32 = wr.iter().zip(&xs).map(|(a, b)| a * b).sum();
                // Rounding x to 8 bits moves each term by at most |w_i| * (its block's max |x|) / 254.
                let bound: f32 = wr
                    .iter()
                    .enumerate()
                    .map(|(i, a)| {
                        let block = &xs[i / BLOCK * BLOCK..(i / BLOCK + 1) * BLOCK];
                        a.abs() * block.iter().fold(0f32, |m, v| m.max(v.abs()))
                    })
                    .sum();
                let reference =
                    dot_reference(m.kind, &m.data[r * row_bytes..(r + 1) * row_bytes], &xq);
                assert!(
                    (got[r] - reference).abs() < 1e-5 * bound + 1e-6,
                    "{dtype:?} row {r}"
                );
                assert!(
                    (got[r] - exact).abs() < bound / 200.0 + 1e-4,
                    "{dtype:?} row {r}"
                );
            }
        }
    }
}
