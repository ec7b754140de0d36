//! The ledger's column patches as one LoRA adapter on `down_proj` (`star-ls patches export --format
//! gguf-lora|peft`). A column patch `mlp_out += delta · z[columns]` is exactly `ΔW = B·A`, `A` the
//! one-hot selector of its columns and `B` its delta, so patches stack: per layer the union of their
//! columns, deltas on a shared column summed. What a LoRA cannot express is left out and named: an
//! entry with one value per gate key (it adds a constant where its gate opens, no linear map of the
//! activation), and a gated entry unless `ungated` (served everywhere, it acts where its gate would
//! have kept it shut).

use super::PatchLayer;
use std::collections::BTreeMap;

/// One layer of the stacked adapter: `B` row-major `(hidden, columns.len())`, `A` the columns.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterLayer {
    pub layer: usize,
    pub hidden: usize,
    /// Ascending.
    pub columns: Vec<u32>,
    pub b: Vec<f32>,
}

impl AdapterLayer {
    pub fn rank(&self) -> usize {
        self.columns.len()
    }
}

/// Why an entry is not in the adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeftOut {
    /// One value per gate key (`patch: "values"`): no LoRA form.
    Values,
    /// Acts only behind its gate; `ungated` takes it in.
    Gated,
}

impl LeftOut {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Values => "adds one value per gate key, which no LoRA can express",
            Self::Gated => "acts only where its gate opens (--ungated serves it everywhere)",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Adapter {
    /// By layer, ascending.
    pub layers: Vec<AdapterLayer>,
    /// The entries taken in.
    pub ids: Vec<String>,
    pub left_out: Vec<(String, LeftOut)>,
}

impl Adapter {
    /// Ledger entries (id and layers; active, readable) stacked into one adapter.
    pub fn stack<'a>(
        entries: impl IntoIterator<Item = (&'a str, &'a [PatchLayer])>,
        ungated: bool,
    ) -> Self {
        let mut adapter = Self::default();
        let mut layers: BTreeMap<usize, (usize, BTreeMap<u32, Vec<f32>>)> = BTreeMap::new();
        for (id, entry) in entries {
            let why = if entry.iter().any(|l| l.columns.is_empty()) {
                Some(LeftOut::Values)
            } else if !ungated && entry.iter().any(|l| l.gate.is_some()) {
                Some(LeftOut::Gated)
            } else {
                None
            };
            if let Some(why) = why {
                adapter.left_out.push((id.to_owned(), why));
                continue;
            }
            adapter.ids.push(id.to_owned());
            for l in entry {
                let (_, columns) = layers
                    .entry(l.layer)
                    .or_insert_with(|| (l.hidden, BTreeMap::new()));
                let n = l.columns.len();
                for (j, &c) in l.columns.iter().enumerate() {
                    let column = columns.entry(c).or_insert_with(|| vec![0.0; l.hidden]);
                    for (h, v) in column.iter_mut().enumerate() {
                        *v += l.delta[h * n + j];
                    }
                }
            }
        }
        adapter.layers = layers
            .into_iter()
            .map(|(layer, (hidden, columns))| {
                let r = columns.len();
                let mut b = vec![0.0; hidden * r];
                for (j, delta) in columns.values().enumerate() {
                    for (h, v) in delta.iter().enumerate() {
                        b[h * r + j] = *v;
                    }
                }
                AdapterLayer {
                    layer,
                    hidden,
                    columns: columns.into_keys().collect(),
                    b,
                }
            })
            .collect();
        adapter
    }

    /// The widest layer's rank: what an engine with one rank per adapter pads every layer to.
    pub fn rank(&self) -> usize {
        self.layers
            .iter()
            .map(AdapterLayer::rank)
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PatchGate;

    fn stack(entries: &[(&str, Vec<PatchLayer>)], ungated: bool) -> Adapter {
        Adapter::stack(entries.iter().map(|(id, l)| (*id, l.as_slice())), ungated)
    }

    fn layer(layer: usize, columns: &[u32], delta: &[f32], gated: bool) -> PatchLayer {
        PatchLayer {
            layer,
            hidden: 2,
            columns: columns.to_vec(),
            delta: delta.to_vec(),
            gate: gated.then(|| PatchGate {
                keys: vec![1.0; columns.len().max(1)],
                center: None,
                threshold: 0.9,
                thresholds: Vec::new(),
            }),
        }
    }

    #[test]
    fn patches_stack_over_the_union_of_their_columns() {
        // delta (hidden 2, columns): rows are hidden units.
        let a = ("P1", vec![layer(3, &[7, 2], &[1.0, 2.0, 3.0, 4.0], false)]);
        let b = (
            "P2",
            vec![
                layer(3, &[2, 9], &[10.0, 20.0, 30.0, 40.0], false),
                layer(5, &[1], &[0.5, -0.5], false),
            ],
        );
        let adapter = stack(&[a, b], false);
        assert_eq!(adapter.ids, ["P1", "P2"]);
        assert_eq!(adapter.layers.len(), 2);
        let l3 = &adapter.layers[0];
        assert_eq!((l3.layer, l3.columns.as_slice()), (3, &[2, 7, 9][..]));
        // Column 2: P1's (2, 4) plus P2's (10, 30); column 7: P1's (1, 3); column 9: P2's (20, 40).
        assert_eq!(l3.b, [12.0, 1.0, 20.0, 34.0, 3.0, 40.0]);
        assert_eq!(adapter.layers[1].b, [0.5, -0.5]);
        assert_eq!(adapter.rank(), 3);
    }

    #[test]
    fn what_no_lora_expresses_is_named_and_left_out() {
        let values = ("P1", vec![layer(3, &[], &[1.0, 2.0], true)]);
        let gated = ("P2", vec![layer(3, &[4], &[1.0, 2.0], true)]);
        let plain = ("P3", vec![layer(3, &[5], &[3.0, 4.0], false)]);
        let records = [values, gated, plain];
        let adapter = stack(&records, false);
        assert_eq!(adapter.ids, ["P3"]);
        assert_eq!(
            adapter.left_out,
            [
                ("P1".into(), LeftOut::Values),
                ("P2".into(), LeftOut::Gated)
            ]
        );
        let ungated = stack(&records, true);
        assert_eq!(ungated.ids, ["P2", "P3"]);
        assert_eq!(ungated.left_out, [("P1".into(), LeftOut::Values)]);
        assert_eq!(ungated.layers[0].columns, [4, 5]);
    }
}
