//! The few dense solves the method needs (a d×d Gram matrix for the steer, N×N for patches), in f64.
//! candle has no linear solver; these systems are symmetric positive definite once a small ridge is
//! added, so a Cholesky factorization is all it takes.

/// The Cholesky factor `L` (row-major, `n×n`, lower) of `a + ridge·I`.
#[derive(Debug, Clone)]
pub struct Cholesky {
    n: usize,
    l: Vec<f64>,
}

impl Cholesky {
    /// `a` is row-major `n×n` and symmetric; `ridge` is relative to its mean diagonal.
    pub fn new(a: &[f64], n: usize, ridge: f64) -> Self {
        let mean_diag = (0..n).map(|i| a[i * n + i]).sum::<f64>() / n.max(1) as f64;
        let lambda = ridge * mean_diag.max(f64::MIN_POSITIVE);
        let mut l = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..=i {
                let mut sum = a[i * n + j];
                for k in 0..j {
                    sum -= l[i * n + k] * l[j * n + k];
                }
                if i == j {
                    // Ridge keeps this positive; the max guards against rounding on a singular input.
                    l[i * n + i] = (sum + lambda).max(lambda.max(1e-300)).sqrt();
                } else {
                    l[i * n + j] = sum / l[j * n + j];
                }
            }
        }
        Self { n, l }
    }

    /// The factor as bytes: `n` (u64), then `L` row-major (f64), little-endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.l.len() * 8);
        out.extend_from_slice(&(self.n as u64).to_le_bytes());
        for v in &self.l {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// The factor `to_bytes` wrote, if `bytes` is one of size `n`.
    pub fn from_bytes(bytes: &[u8], n: usize) -> Option<Self> {
        let (head, body) = bytes.split_first_chunk::<8>()?;
        if u64::from_le_bytes(*head) != n as u64 || body.len() != n * n * 8 {
            return None;
        }
        let l = body
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunks")))
            .collect();
        Some(Self { n, l })
    }

    /// Solves `(a + ridge) x = b` for one right-hand side.
    pub fn solve(&self, b: &[f64]) -> Vec<f64> {
        let (n, l) = (self.n, &self.l);
        let mut y = self.lower_solve(b);
        for i in (0..n).rev() {
            for k in i + 1..n {
                y[i] -= l[k * n + i] * y[k];
            }
            y[i] /= l[i * n + i];
        }
        y
    }

    /// `L⁻¹ b`: the forward half of `solve`.
    pub fn lower_solve(&self, b: &[f64]) -> Vec<f64> {
        let (n, l) = (self.n, &self.l);
        let mut y = b.to_vec();
        for i in 0..n {
            for k in 0..i {
                y[i] -= l[i * n + k] * y[k];
            }
            y[i] /= l[i * n + i];
        }
        y
    }

    /// `L⁻¹` row-major: `a + ridge = L Lᵀ`, so `L⁻¹` whitens the metric `a` defines.
    pub fn inverse_factor(&self) -> Vec<f64> {
        let n = self.n;
        let mut inv = vec![0.0; n * n];
        for j in 0..n {
            let mut e = vec![0.0; n];
            e[j] = 1.0;
            for (i, v) in self.lower_solve(&e).into_iter().enumerate() {
                inv[i * n + j] = v;
            }
        }
        inv
    }
}

/// `a aᵀ` for row-major `a` (`rows×cols`), as f64.
pub fn gram_rows(a: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    let mut g = vec![0.0; rows * rows];
    for i in 0..rows {
        for j in 0..=i {
            let dot: f64 = (0..cols)
                .map(|k| a[i * cols + k] as f64 * a[j * cols + k] as f64)
                .sum();
            g[i * rows + j] = dot;
            g[j * rows + i] = dot;
        }
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solves_a_small_spd_system() {
        // a = [[4, 2], [2, 3]], b = [2, 1] -> x = [0.5, 0]
        let c = Cholesky::new(&[4.0, 2.0, 2.0, 3.0], 2, 0.0);
        let x = c.solve(&[2.0, 1.0]);
        assert!((x[0] - 0.5).abs() < 1e-12 && x[1].abs() < 1e-12, "{x:?}");
        assert_eq!(
            gram_rows(&[1.0, 2.0, 3.0, 4.0], 2, 2),
            [5.0, 11.0, 11.0, 25.0]
        );
    }
}
