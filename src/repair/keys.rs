//! Where a patch's gate comes from (`RepairSettings::keys`): keys at the activations it was solved
//! at, and a threshold from the rows it must leave alone.

use crate::model::Gate;
use candle_core::{Result, Tensor};

/// A gate keyed on a layer: `positives` `(n, intermediate)` are the failure rows it must open at,
/// `ordinary` `(r, intermediate)` rows it must leave alone. Keys are centred on the ordinary rows'
/// mean; the threshold is `gap` above their highest cosine with a key, at most `ceiling` (which it
/// is with no ordinary rows): the wider the margin a context leaves, the more new contexts of the
/// idiom open it.
pub fn on_layer(positives: &Tensor, ordinary: &Tensor, gap: f32, ceiling: f32) -> Result<Gate> {
    if ordinary.dim(0)? == 0 {
        let center = Tensor::zeros(positives.dim(1)?, positives.dtype(), positives.device())?;
        return Gate::on_layer(positives, &center, ceiling);
    }
    let gate = Gate::on_layer(positives, &ordinary.mean(0)?, ceiling)?;
    let highest: f32 = gate.scores(ordinary)?.max(0)?.squeeze(0)?.to_scalar()?;
    let threshold = (highest + gap).min(ceiling);
    tracing::debug!(keys = positives.dim(0)?, highest, threshold, "gate");
    Ok(gate.at(threshold))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rows(v: &[[f32; 3]]) -> Tensor {
        let flat: Vec<f32> = v.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (v.len(), 3), &Device::Cpu).unwrap()
    }

    #[test]
    fn the_threshold_sits_a_gap_above_the_ordinary_rows() {
        // Centred on (1, 1, 0), the ordinary rows point along ±x and the key along y.
        let ordinary = rows(&[[2.0, 1.0, 0.0], [0.0, 1.0, 0.0]]);
        let positives = rows(&[[1.0, 3.0, 0.0]]);
        let gate = on_layer(&positives, &ordinary, 0.1, 0.9).unwrap();
        assert!(
            (gate.threshold() - 0.1).abs() < 1e-6,
            "{}",
            gate.threshold()
        );
        let near = rows(&[[1.2, 2.0, 0.0], [2.0, 1.0, 0.0]]);
        let open: Vec<f32> = gate
            .scores(&near)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            open[0] >= gate.threshold() && open[1] < gate.threshold(),
            "{open:?}"
        );
    }

    #[test]
    fn the_threshold_never_passes_the_ceiling() {
        let ordinary = rows(&[[1.0, 2.9, 0.0], [1.0, -1.0, 0.0]]);
        let positives = rows(&[[1.0, 3.0, 0.0]]);
        assert_eq!(
            on_layer(&positives, &ordinary, 0.5, 0.9)
                .unwrap()
                .threshold(),
            0.9
        );
        let none = Tensor::zeros((0, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            on_layer(&positives, &none, 0.05, 0.9).unwrap().threshold(),
            0.9
        );
    }
}
