//! Scoring a pass over the cases' target rows, and the steers that ask for the developer's tokens.

use super::batch::Prepared;
use super::Star;
use crate::model::generate::{argmax, mask_rows};
use crate::model::{kv_positions, Capture, DecoderLayer, Hooks, LayerKv};
use crate::repair::steer::row_rms;
use crate::repair::targets::{same_line, TeacherForced};
use candle_core::{DType, Device, Result, Tensor};

/// A steer as solved for one position: the rival it pushed against, the developer's lead over it then,
/// and the gain it was scaled by.
pub(super) struct Asked {
    pub(super) rival: u32,
    pub(super) lead: f32,
    pub(super) gain: f32,
}

impl Asked {
    /// The gain for the next steer at this position: the steer asks the lead to close to the margin,
    /// but the layers above the patch and the final norm pass on only part of it; asking for the
    /// rest divided by the part that came through (a secant step, bounded) settles it in fewer solves.
    pub(super) fn next_gain(&self, row: &[f32], want: u32, margin: f32) -> f32 {
        const MAX_GAIN: f32 = 8.0;
        let asked = ((-self.lead).max(0.0) + margin) * self.gain;
        let got = row[want as usize] - row[self.rival as usize] - self.lead;
        (asked / got.max(asked / MAX_GAIN)).clamp(1.0, MAX_GAIN)
    }
}

/// One scoring pass over a case: the final-normed states at its target rows (in the autograd graph),
/// their logits (not in it), and their pre-norm RMS.
#[derive(Debug, Clone)]
pub(in crate::repair) struct Scored {
    pub(super) hidden: Tensor,
    pub logits: Tensor,
    pub(super) rms: Vec<f32>,
    pub(super) target: Vec<u32>,
}

impl Scored {
    /// The mean cross-entropy of target positions `at`, as a tensor whose value is the loss and whose
    /// gradient is the loss's. The LM head stays out of the graph: candle computes a gradient for
    /// both sides of a matmul, and the head's `(vocab, hidden)` one would cost 545 MB per case for the
    /// default model, for nothing. `∂CE/∂h = (softmax(logits) − onehot(target)) W_U / n` is exact.
    ///
    /// Summed over `parts`, each a scoring and its positions: the head is read once for all of them.
    pub(in crate::repair) fn loss(parts: &[(&Scored, &[usize])], head: &Tensor) -> Result<Tensor> {
        let (mut hidden, mut logits, mut targets, mut weights) = (vec![], vec![], vec![], vec![]);
        let mut value = 0.0;
        for (s, at) in parts.iter().filter(|(_, at)| !at.is_empty()) {
            let (idx, target, l) = s.rows(at)?;
            value += candle_nn::loss::cross_entropy(&l, &target)?.to_scalar::<f32>()?;
            hidden.push(s.hidden.index_select(&idx, 0)?);
            logits.push(l);
            targets.push(target);
            weights.extend(std::iter::repeat_n(1.0 / at.len() as f32, at.len()));
        }
        if hidden.is_empty() {
            return Tensor::zeros((), DType::F32, &Device::Cpu);
        }
        let (hidden, logits) = (Tensor::cat(&hidden, 0)?, Tensor::cat(&logits, 0)?);
        let target = Tensor::cat(&targets, 0)?;
        let weights = Tensor::from_vec(weights, (hidden.dim(0)?, 1), &Device::Cpu)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?;
        let grad =
            (probs.matmul(head)? - head.index_select(&target, 0)?)?.broadcast_mul(&weights)?;
        let linear = (&hidden * &grad)?.sum_all()?;
        linear.clone() + (Tensor::new(value, &Device::Cpu)? - linear.detach())?
    }

    /// The loss's value alone, for callers that take no gradient (MINT's trials, occlusion): no pass through
    /// the head beyond the logits already made.
    pub(in crate::repair) fn cross_entropy(&self, at: &[usize]) -> Result<f32> {
        let (_, target, logits) = self.rows(at)?;
        candle_nn::loss::cross_entropy(&logits, &target)?.to_scalar()
    }

    /// Row indices, target tokens and logits of target positions `at`.
    pub(super) fn rows(&self, at: &[usize]) -> Result<(Tensor, Tensor, Tensor)> {
        let idx: Vec<u32> = at.iter().map(|&i| i as u32).collect();
        let idx = Tensor::new(idx.as_slice(), &Device::Cpu)?;
        let target: Vec<u32> = at.iter().map(|&i| self.target[i]).collect();
        let target = Tensor::new(target.as_slice(), &Device::Cpu)?;
        let logits = self.logits.index_select(&idx, 0)?;
        Ok((idx, target, logits))
    }

    pub(in crate::repair) fn all(&self) -> Vec<usize> {
        (0..self.target.len()).collect()
    }
}

impl Star<'_> {
    /// Runs upper `layers` (dense copies or the serving ones) over prepared cases, each `(case, its
    /// residual rows, its keys and values)`, in one packed pass: a case's rows are those after the ones
    /// its keys hold (all of them when they hold none), and its keys gain them. Scores every case's
    /// target tokens, with logits from the head of the same kind as the layers.
    pub(in crate::repair) fn score(
        &self,
        first: usize,
        layers: &[DecoderLayer],
        seqs: &mut [(&Prepared, &Tensor, &mut [LayerKv])],
        hooks: &mut Hooks,
    ) -> Result<Vec<Scored>> {
        // Each case's target rows in the packed output: `row(i)` less the rows its keys hold, past
        // the cases before it.
        let (mut rows, mut counts, mut at) = (Vec::new(), Vec::new(), 0);
        for (case, residual, kv) in seqs.iter() {
            let start = kv_positions(kv)?;
            let n = case.tf.target.len();
            rows.extend((0..n).map(|i| (at + case.tf.row(i) - start) as u32));
            counts.push(n);
            at += residual.dim(0)?;
        }
        let x = Tensor::cat(&seqs.iter().map(|s| s.1).collect::<Vec<_>>(), 0)?;
        let mut packed: Vec<(usize, &mut [LayerKv])> = Vec::new();
        for (_, residual, kv) in seqs.iter_mut() {
            packed.push((residual.dim(0)?, &mut **kv));
        }
        let mut own = Capture::layers([]);
        let capture = match hooks.capture.as_deref_mut() {
            Some(c) => c,
            None => &mut own,
        };
        let mut inner = Hooks {
            patches: hooks.patches,
            capture: Some(capture),
            skip_mlp: hooks.skip_mlp,
            neuron_probes: hooks.neuron_probes,
            fired: hooks.fired.as_deref_mut(),
        };
        let normed = self
            .model
            .forward_packed(first, layers, &x, &mut packed, &mut inner)?;
        let rows = Tensor::new(rows.as_slice(), &Device::Cpu)?;
        let hidden = normed.index_select(&rows, 0)?;
        let logits = match layers.first() {
            Some(l) if !l.is_dense() => self.model.logits(&hidden)?,
            _ => hidden.detach().matmul(&self.head.weight.t()?)?,
        };
        let pre_norm = inner
            .capture
            .and_then(|c| c.final_hidden.clone())
            .ok_or_else(|| candle_core::Error::Msg("no final hidden captured".into()))?;
        let rms = row_rms(&pre_norm.index_select(&rows, 0)?.detach())?;
        let mut scored = Vec::with_capacity(seqs.len());
        let mut from = 0;
        for ((case, _, _), n) in seqs.iter().zip(counts) {
            scored.push(Scored {
                hidden: hidden.narrow(0, from, n)?,
                logits: logits.narrow(0, from, n)?,
                rms: rms[from..from + n].to_vec(),
                target: case.tf.target.clone(),
            });
            from += n;
        }
        Ok(scored)
    }

    /// A case's target-row logits as generation sees them (`mask_rows`: healing, the line's shape).
    pub(super) fn decisions(&self, tf: &TeacherForced, logits: &Tensor) -> Result<Vec<Vec<f32>>> {
        let mut rows: Vec<Vec<f32>> = logits.to_vec2()?;
        mask_rows(self.tokenizer, &mut rows, &tf.target, &tf.prompt);
        Ok(rows)
    }

    /// STAR's failure positions: target indices whose top-1 token would change the line.
    pub(in crate::repair) fn failure_positions(
        &self,
        case: &Prepared,
        logits: &Tensor,
    ) -> Result<Vec<usize>> {
        Ok(self.wrong_at(&case.tf, &self.decisions(&case.tf, logits)?))
    }

    /// The failure positions among a case's `decisions`.
    pub(super) fn wrong_at(&self, tf: &TeacherForced, decisions: &[Vec<f32>]) -> Vec<usize> {
        decisions
            .iter()
            .zip(&tf.target)
            .enumerate()
            .filter(|(_, (row, want))| !same_line(self.tokenizer, argmax(row), **want))
            .map(|(i, _)| i)
            .collect()
    }

    /// The steers `S` `(positions, hidden)` of the given positions of each case, each pushing the
    /// developer's token past its rival and split across `parts` layers.
    pub(in crate::repair) fn steers(
        &self,
        cases: &[Scored],
        prepared: &[Prepared],
        positions: &[Vec<usize>],
        parts: usize,
    ) -> Result<Tensor> {
        let mut rows = Vec::new();
        for ((scored, case), positions) in cases.iter().zip(prepared).zip(positions) {
            let decisions = self.decisions(&case.tf, &scored.logits)?;
            for &i in positions {
                let logits = &decisions[i];
                let want = case.tf.target[i];
                let s = match self.rival(logits, want) {
                    Some(rival) => {
                        self.head
                            .steer(rival, want, logits, scored.rms[i], self.settings.margin)?
                    }
                    None => vec![0.0; self.head.weight.dim(1)?],
                };
                rows.push(
                    Tensor::new(s.as_slice(), &Device::Cpu)?.affine(1.0 / parts as f64, 0.0)?,
                );
            }
        }
        Tensor::stack(&rows, 0)
    }

    /// The best-scoring token that would change the line if chosen instead of `want` (at a failure
    /// position, the model's own top-1), among the top few; `None` when they all keep the line.
    pub(super) fn rival(&self, logits: &[f32], want: u32) -> Option<u32> {
        const LOOK: usize = 8;
        let mut top: Vec<u32> = Vec::with_capacity(LOOK + 1);
        for (t, v) in logits.iter().enumerate() {
            if top.len() == LOOK && *v <= logits[top[LOOK - 1] as usize] {
                continue;
            }
            let at = top.partition_point(|&u| logits[u as usize] >= *v);
            top.insert(at, t as u32);
            top.truncate(LOOK);
        }
        top.into_iter()
            .find(|&t| !same_line(self.tokenizer, t, want))
    }

    /// Target positions not yet settled: where the developer's token does not lead its rival by half
    /// the margin. A fix that only just tips the argmax in the dense f32 copy can tip back in the
    /// quantized serving model, so the re-solves aim for a lead the quantization cannot undo.
    pub(super) fn unsettled(&self, case: &Prepared, rows: &[Vec<f32>]) -> Vec<usize> {
        rows.iter()
            .zip(&case.tf.target)
            .enumerate()
            .filter(|(_, (row, want))| {
                self.rival(row, **want).is_some_and(|r| {
                    row[**want as usize] - row[r as usize] < self.settings.margin / 2.0
                })
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// What a steer with `gain` asks at a position with decisions `row`: its rival and lead now.
    pub(super) fn asked(&self, row: &[f32], want: u32, gain: f32) -> Option<Asked> {
        let rival = self.rival(row, want)?;
        Some(Asked {
            rival,
            lead: row[want as usize] - row[rival as usize],
            gain,
        })
    }
}
