//! Where a patch's gate comes from (`RepairSettings::keys`): keys at the activations it was solved
//! at, and thresholds from the rows it must leave alone.

use crate::model::Gate;
use crate::repair::star::GATE_MARGIN;
use crate::repair::GateThresholds;
use candle_core::{Result, Tensor};

/// What a gate keyed on a layer must leave alone: `ordinary` rows `(r, intermediate)` (prompts',
/// guards'), and the `conflicting` keys of live entries this repair narrowed `(n, key width)` (unit,
/// centred on their own gates' centres, which are means of ordinary rows too, so they are compared
/// as they are): where the newer correction wins, the older keeps its own context.
/// With `right`, the target rows of recent cases the model said right `(m, key width)`, in the key
/// space (`Residuals::right_rows`), kept apart the same way: a gate opening there can only spoil a
/// line.
#[derive(Debug, Clone)]
pub struct Leave {
    pub ordinary: Tensor,
    pub conflicting: Option<Tensor>,
    pub right: Option<Tensor>,
}

/// How far past a conflicting row's cosine a narrowed threshold goes: at least the shift of a
/// cosine recomputed under other patches.
pub fn narrowing_gap(gap: f32) -> f32 {
    gap.max(GATE_MARGIN)
}

/// How a gate keyed on a layer gets its thresholds: `gap` above the highest cosine of the rows it
/// must leave alone, at most `ceiling` (which it is with no such rows), per key or one for the gate.
#[derive(Debug, Clone, Copy)]
pub struct Fit {
    pub gap: f32,
    pub ceiling: f32,
    pub per: GateThresholds,
}

impl Fit {
    /// A gate keyed on a layer: `positives` `(n, intermediate)` are the failure rows it must open
    /// at, `leave` what it must leave alone. Keys are centred on the ordinary rows' mean.
    pub fn on_layer(&self, positives: &Tensor, leave: &Leave) -> Result<Gate> {
        let center = match leave.ordinary.dim(0)? {
            0 => Tensor::zeros(positives.dim(1)?, positives.dtype(), positives.device())?,
            _ => leave.ordinary.mean(0)?,
        };
        self.fit(Gate::on_layer(positives, &center, self.ceiling)?, leave)
    }

    /// `gate`'s thresholds set from `leave`: per key, its highest cosine with the ordinary rows plus
    /// the gap (a key far from every ordinary row opens to more new contexts of its idiom, one near
    /// some stays tight), or that of its nearest key for every key of the gate; then each key past
    /// the conflicting keys and right rows near it (`narrowing_gap` above its cosine with them, past
    /// the ceiling too), unless that would shut it at its own row (cosine 1): there the newer
    /// correction wins.
    pub fn fit(&self, gate: Gate, leave: &Leave) -> Result<Gate> {
        let gate = self.fit_ordinary(gate, &leave.ordinary)?;
        let mut near = vec![f32::MIN; gate.thresholds().len()];
        let mut nearer = |c: Vec<f32>| near.iter_mut().zip(c).for_each(|(n, c)| *n = n.max(c));
        if let Some(conflicting) = &leave.conflicting {
            nearer(gate.keys().matmul(&conflicting.t()?)?.max(1)?.to_vec1()?);
        }
        if let Some(right) = leave.right.as_ref().filter(|r| r.dims()[0] > 0) {
            nearer(gate.cosines(right)?.max(0)?.to_vec1()?);
        }
        let gap = narrowing_gap(self.gap);
        let thresholds = (gate.thresholds().iter().zip(near))
            .map(|(&t, c)| if c + gap < 1.0 { t.max(c + gap) } else { t })
            .collect();
        gate.per_key(thresholds)
    }

    fn fit_ordinary(&self, gate: Gate, ordinary: &Tensor) -> Result<Gate> {
        if ordinary.dim(0)? == 0 {
            return Ok(gate.at(self.ceiling));
        }
        let highest: Vec<f32> = gate.cosines(ordinary)?.max(0)?.to_vec1()?;
        let threshold = |h: f32| (h + self.gap).min(self.ceiling);
        tracing::debug!(keys = highest.len(), ?highest, "gate");
        match self.per {
            GateThresholds::Key => gate.per_key(highest.into_iter().map(threshold).collect()),
            GateThresholds::Gate => {
                Ok(gate.at(threshold(highest.into_iter().fold(f32::MIN, f32::max))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rows(v: &[[f32; 3]]) -> Tensor {
        let flat: Vec<f32> = v.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (v.len(), 3), &Device::Cpu).unwrap()
    }

    fn leave(ordinary: &Tensor) -> Leave {
        Leave {
            ordinary: ordinary.clone(),
            conflicting: None,
            right: None,
        }
    }

    fn fit(gap: f32, ceiling: f32, per: GateThresholds) -> Fit {
        Fit { gap, ceiling, per }
    }

    /// Per row, by how much it clears the gate (negative: shut).
    fn clears(gate: &Gate, v: &[[f32; 3]]) -> Vec<f32> {
        gate.scores(&rows(v))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn the_threshold_sits_a_gap_above_the_ordinary_rows() {
        // Centred on (1, 1, 0), the ordinary rows point along ±x and the key along y.
        let ordinary = rows(&[[2.0, 1.0, 0.0], [0.0, 1.0, 0.0]]);
        let positives = rows(&[[1.0, 3.0, 0.0]]);
        let gate = fit(0.1, 0.9, GateThresholds::Key)
            .on_layer(&positives, &leave(&ordinary))
            .unwrap();
        assert!(
            (gate.thresholds()[0] - 0.1).abs() < 1e-6,
            "{:?}",
            gate.thresholds()
        );
        let open = clears(&gate, &[[1.2, 2.0, 0.0], [2.0, 1.0, 0.0]]);
        assert!(open[0] >= 0.0 && open[1] < 0.0, "{open:?}");
    }

    #[test]
    fn each_key_sits_a_gap_above_the_ordinary_rows_near_it() {
        // Centred: the ordinary rows along ±x; key A along y, key B near +x.
        let ordinary = rows(&[[2.0, 1.0, 0.0], [0.0, 1.0, 0.0]]);
        let positives = rows(&[[1.0, 3.0, 0.0], [1.9, 1.0, 0.3]]);
        let per_key = fit(0.1, 0.99, GateThresholds::Key)
            .on_layer(&positives, &leave(&ordinary))
            .unwrap();
        let t = per_key.thresholds();
        assert!(
            (t[0] - 0.1).abs() < 1e-6 && (t[1] - 0.99).abs() < 1e-6,
            "{t:?}"
        );
        let per_gate = fit(0.1, 0.99, GateThresholds::Gate)
            .on_layer(&positives, &leave(&ordinary))
            .unwrap();
        assert_eq!(per_gate.thresholds(), [0.99, 0.99]);
        // A row 45° from A opens A's own radius, not the gate's; the ordinary rows open neither.
        let tried = [[1.0, 2.0, 1.0], [2.0, 1.0, 0.0], [0.0, 1.0, 0.0]];
        let (key, gate) = (clears(&per_key, &tried), clears(&per_gate, &tried));
        assert!(key[0] >= 0.0 && gate[0] < 0.0, "{key:?} {gate:?}");
        assert!(
            key[1..].iter().chain(&gate[1..]).all(|&c| c < 0.0),
            "{key:?} {gate:?}"
        );
    }

    #[test]
    fn the_threshold_never_passes_the_ceiling() {
        let ordinary = rows(&[[1.0, 2.9, 0.0], [1.0, -1.0, 0.0]]);
        let positives = rows(&[[1.0, 3.0, 0.0]]);
        let f = fit(0.5, 0.9, GateThresholds::Key);
        assert_eq!(
            f.on_layer(&positives, &leave(&ordinary))
                .unwrap()
                .thresholds(),
            [0.9]
        );
        let none = Tensor::zeros((0, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            f.on_layer(&positives, &leave(&none)).unwrap().thresholds(),
            [0.9]
        );
    }

    #[test]
    fn a_key_near_a_narrowed_one_or_a_right_row_is_raised_past_it_unless_that_shuts_its_own_row() {
        // No ordinary rows: centred on 0, every key at the ceiling. Key A along y, key B along x;
        // the narrowed entry's keys at 45° from both, and along x.
        let none = Tensor::zeros((0, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let positives = rows(&[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]);
        let h = std::f32::consts::FRAC_1_SQRT_2;
        let leave = Leave {
            ordinary: none,
            conflicting: Some(rows(&[[h, h, 0.0], [1.0, 0.0, 0.0]])),
            right: None,
        };
        let gate = fit(0.05, 0.5, GateThresholds::Gate)
            .on_layer(&positives, &leave)
            .unwrap();
        let t = gate.thresholds();
        // A: past its cosine with the 45° key; B would shut at its own row: the newer one wins.
        assert!((t[0] - (h + 0.05)).abs() < 1e-5 && t[1] == 0.5, "{t:?}");
        let opens = clears(&gate, &[[0.0, 1.0, 0.0]]);
        assert!(opens[0] >= 0.0, "{opens:?}");
        // Rows of lines the model said right are kept apart the same way (compared as activations:
        // centred, here on 0, and normalized).
        let right = Leave {
            conflicting: None,
            right: Some(rows(&[[2.0, 2.0, 0.0], [3.0, 0.0, 0.0]])),
            ..leave
        };
        let gate = fit(0.05, 0.5, GateThresholds::Gate)
            .on_layer(&positives, &right)
            .unwrap();
        assert_eq!(gate.thresholds(), t);
    }
}
