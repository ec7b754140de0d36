//! `patches export --format gguf-lora|peft`: the stacked column patches (`store::Adapter`) written as
//! the adapters inference servers load. Both engines take one rank per adapter, so every layer is
//! padded with zero rows of `A` and zero columns of `B` to it, which changes nothing.
//! - gguf-lora (llama.cpp's `--lora`): `blk.N.ffn_down.weight.lora_a` `(r, m)` in F16 (one-hot, so
//!   exact) and `.lora_b` `(hidden, r)` in F32; alpha = r, so llama.cpp's scale alpha / r is 1.
//! - peft (PEFT, vLLM): `adapter_model.safetensors` with `lora_A` `(r, m)` and `lora_B` `(hidden, r)`
//!   in F32 and `adapter_config.json`; r is the next rank vLLM accepts.

use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use star_ls::model::GgufFile;
use star_ls::store::{Adapter, AdapterLayer};
use std::collections::HashMap;
use std::path::Path;

/// The ranks vLLM serves (`--max-lora-rank`); PEFT reads any.
const VLLM_RANKS: [usize; 9] = [1, 8, 16, 32, 64, 128, 256, 320, 512];

/// What the adapter must fit: the base model's `down_proj` per layer.
pub struct Base {
    architecture: String,
    /// `(hidden, intermediate)` of `blk.N.ffn_down.weight`, per layer.
    down: HashMap<usize, (usize, usize)>,
}

impl Base {
    pub fn read(model: &Path) -> Result<Self> {
        let gguf = GgufFile::open(model)?;
        let architecture = gguf.string("general.architecture")?;
        let mut down = HashMap::new();
        for (name, info) in &gguf.content.tensor_infos {
            let layer = name
                .strip_prefix("blk.")
                .and_then(|n| n.strip_suffix(".ffn_down.weight"))
                .and_then(|n| n.parse().ok());
            if let (Some(layer), [hidden, intermediate]) = (layer, info.shape.dims()) {
                down.insert(layer, (*hidden, *intermediate));
            }
        }
        Ok(Self { architecture, down })
    }

    /// `A` `(rank, intermediate)` and `B` `(hidden, rank)` of `l`, zero-padded to `rank`.
    fn factors(&self, l: &AdapterLayer, rank: usize) -> Result<(Tensor, Tensor)> {
        let Some(&(hidden, m)) = self.down.get(&l.layer) else {
            bail!("the model has no layer {} for the adapter", l.layer);
        };
        if hidden != l.hidden || l.columns.iter().any(|&c| c as usize >= m) {
            bail!("layer {}'s patches do not fit the model", l.layer);
        }
        let mut a = vec![0f32; rank * m];
        for (j, &c) in l.columns.iter().enumerate() {
            a[j * m + c as usize] = 1.0;
        }
        let b = Tensor::from_vec(l.b.clone(), (hidden, l.rank()), &Device::Cpu)?;
        Ok((
            Tensor::from_vec(a, (rank, m), &Device::Cpu)?,
            b.pad_with_zeros(1, 0, rank - l.rank())?,
        ))
    }
}

fn nonempty(adapter: &Adapter) -> Result<()> {
    if adapter.layers.is_empty() {
        bail!("no patch to write as an adapter");
    }
    Ok(())
}

/// llama.cpp's GGUF LoRA adapter at `out`; its rank.
pub fn write_gguf(adapter: &Adapter, base: &Base, out: &Path) -> Result<usize> {
    nonempty(adapter)?;
    // A multiple of 32, as ggml's 32-wide quantized blocks need if the adapter is re-quantized.
    let rank = adapter.rank().div_ceil(32) * 32;
    let mut tensors = Vec::new();
    for l in &adapter.layers {
        let (a, b) = base.factors(l, rank)?;
        let name = format!("blk.{}.ffn_down.weight", l.layer);
        tensors.push((
            format!("{name}.lora_a"),
            QTensor::quantize(&a, GgmlDType::F16)?,
        ));
        tensors.push((
            format!("{name}.lora_b"),
            QTensor::quantize(&b, GgmlDType::F32)?,
        ));
    }
    let architecture = gguf_file::Value::String(base.architecture.clone());
    let metadata = [
        ("general.type", gguf_file::Value::String("adapter".into())),
        ("general.architecture", architecture),
        ("adapter.type", gguf_file::Value::String("lora".into())),
        ("adapter.lora.alpha", gguf_file::Value::F32(rank as f32)),
    ];
    let metadata: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(out).with_context(|| format!("writing {}", out.display()))?,
    );
    gguf_file::write(&mut file, &metadata, &tensors)?;
    std::io::Write::flush(&mut file).with_context(|| format!("writing {}", out.display()))?;
    Ok(rank)
}

/// A PEFT adapter directory at `out` (vLLM serves it); its rank.
pub fn write_peft(adapter: &Adapter, base: &Base, out: &Path) -> Result<usize> {
    nonempty(adapter)?;
    let Some(&rank) = VLLM_RANKS.iter().find(|&&r| r >= adapter.rank()) else {
        bail!(
            "a layer has {} patched neurons; vLLM serves LoRA ranks up to {}: export fewer patches with --ids",
            adapter.rank(),
            VLLM_RANKS[VLLM_RANKS.len() - 1]
        );
    };
    let mut tensors = HashMap::new();
    for l in &adapter.layers {
        let (a, b) = base.factors(l, rank)?;
        let name = format!("base_model.model.model.layers.{}.mlp.down_proj", l.layer);
        tensors.insert(format!("{name}.lora_A.weight"), a);
        tensors.insert(format!("{name}.lora_B.weight"), b);
    }
    std::fs::create_dir_all(out).with_context(|| format!("writing {}", out.display()))?;
    candle_core::safetensors::save(&tensors, out.join("adapter_model.safetensors"))?;
    let layers: Vec<usize> = adapter.layers.iter().map(|l| l.layer).collect();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "target_modules": ["down_proj"],
        "layers_to_transform": layers,
    });
    let path = out.join("adapter_config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&config)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(rank)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Base {
        Base {
            architecture: "qwen2".into(),
            down: HashMap::from([(3, (2, 600))]),
        }
    }

    fn adapter(columns: usize) -> Adapter {
        Adapter {
            layers: vec![AdapterLayer {
                layer: 3,
                hidden: 2,
                columns: (0..columns as u32).collect(),
                b: (0..2 * columns).map(|i| i as f32).collect(),
            }],
            ids: vec!["patch-1".into()],
            left_out: Vec::new(),
        }
    }

    #[test]
    fn the_gguf_adapter_is_what_llama_cpp_reads() {
        let out = std::env::temp_dir().join(format!("star-ls-lora-{}.gguf", std::process::id()));
        assert_eq!(write_gguf(&adapter(3), &base(), &out).unwrap(), 32);
        let mut file = std::fs::File::open(&out).unwrap();
        let content = gguf_file::Content::read(&mut file).unwrap();
        let text = |k: &str| content.metadata[k].to_string().unwrap().clone();
        assert_eq!(
            (text("general.type"), text("general.architecture")),
            ("adapter".into(), "qwen2".into())
        );
        assert_eq!(
            content.metadata["adapter.lora.alpha"].to_f32().unwrap(),
            32.0
        );
        let a = content
            .tensor(&mut file, "blk.3.ffn_down.weight.lora_a", &Device::Cpu)
            .unwrap();
        let b = content
            .tensor(&mut file, "blk.3.ffn_down.weight.lora_b", &Device::Cpu)
            .unwrap();
        assert_eq!((a.dtype(), b.dtype()), (GgmlDType::F16, GgmlDType::F32));
        // B·A is the patch: column c of ΔW is the delta of patched neuron c, zero elsewhere.
        let product = b
            .dequantize(&Device::Cpu)
            .unwrap()
            .matmul(&a.dequantize(&Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(product.dims(), [2, 600]);
        let rows: Vec<Vec<f32>> = product.to_vec2().unwrap();
        assert_eq!(rows[0][..4], [0.0, 1.0, 2.0, 0.0]);
        assert_eq!(rows[1][..4], [3.0, 4.0, 5.0, 0.0]);
        std::fs::remove_file(out).unwrap();
    }

    #[test]
    fn a_rank_past_what_vllm_serves_is_refused() {
        let out = std::env::temp_dir().join(format!("star-ls-peft-{}", std::process::id()));
        let err = write_peft(&adapter(513), &base(), &out).unwrap_err();
        assert!(format!("{err}").contains("up to 512"), "{err}");
        assert!(!out.exists());
        let wide = Base {
            down: HashMap::from([(3, (2, 10))]),
            ..base()
        };
        let err = write_gguf(&adapter(11), &wide, &out).unwrap_err();
        assert!(format!("{err}").contains("do not fit"), "{err}");
    }
}
