//! A tiny random-weight qwen2 GGUF for fast model-runtime tests.
//!
//! 2 layers, hidden 64, FFN 128, 4 query heads / 2 KV heads (head_dim 16), context 512, and a gpt2
//! byte-level BPE vocabulary of the 256 byte tokens, a few merges and the qwen FIM specials.
//!
//! The weights are random but shaped so tests can steer generation: every embedding has a constant 1.0
//! in hidden dimension 0, nothing writes into that dimension (row 0 of `attn_output` and `ffn_down` is
//! zero), so after the final norm it is a near-constant ~7, and column 0 of the LM head turns it into a
//! per-token logit offset. Non-ASCII and control bytes and the specials get a large negative offset
//! (generated text is readable ASCII); `TinySpec::newline_logit` / `eos_logit` make a newline or EOS
//! likely or (by default) impossible.

#![allow(dead_code)]

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub const HIDDEN: usize = 64;
pub const FFN: usize = 128;
pub const LAYERS: usize = 2;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = HIDDEN / HEADS;
pub const CONTEXT: usize = 512;
pub const ROPE_THETA: f32 = 1_000_000.0;
pub const RMS_EPS: f32 = 1e-6;

pub const SPECIALS: [&str; 5] = [
    "<|endoftext|>",
    "<|fim_prefix|>",
    "<|fim_suffix|>",
    "<|fim_middle|>",
    "<|fim_pad|>",
];

/// Merges, in rank order (`Ġ` is a space). Enough to make `def`, ` add`, ` return` single tokens.
const MERGES: [&str; 20] = [
    "Ġ Ġ",
    "ĠĠ ĠĠ",
    "r e",
    "t u",
    "re tu",
    "retu r",
    "retur n",
    "Ġ return",
    "d e",
    "de f",
    "Ġ a",
    "Ġa d",
    "Ġad d",
    "Ġ b",
    "Ġ +",
    "Ġ =",
    "i n",
    "Ġ in",
    "o r",
    "Ġ f",
];

/// Logit offset of tokens that must never be sampled (unless a spec says otherwise).
const NEVER: f32 = -16.0;
/// Approximate value of hidden dim 0 after the final norm (x0 = 1 against ~0.058-rms other dims).
const H0: f32 = 6.0;
/// Range of `attn_output` / `ffn_down` weights: small, so the residual stays near the embedding.
const WRITE_SCALE: f32 = 0.025;

/// How matrices are stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    /// Every tensor F32. candle keeps F32 matrices dense (`QMatMul::Tensor`), so the serving model and
    /// its dense f32 copies run the very same weights and agree to float rounding.
    F32,
    /// 2-D matrices Q8_0, except `blk.1.ffn_down` which is Q5_0 (the loader's requantize path).
    Mixed,
}

#[derive(Debug, Clone)]
pub struct TinySpec {
    pub seed: u64,
    pub quant: Quant,
    /// `general.architecture` (and the prefix of the hyper-parameter keys).
    pub architecture: String,
    /// Logit offset of the `\n` byte token; the default makes a newline impossible.
    pub newline_logit: f32,
    /// Logit offset of `<|endoftext|>` (the EOS id); the default makes it impossible.
    pub eos_logit: f32,
    /// Leave out `output.weight` (the LM head is then the embedding).
    pub tied_embeddings: bool,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            seed: 0,
            quant: Quant::Mixed,
            architecture: "qwen2".into(),
            newline_logit: NEVER,
            eos_logit: NEVER,
            tied_embeddings: false,
        }
    }
}

impl TinySpec {
    /// A model that ends every line at once (its completions are empty) and that the server's repair,
    /// with its default settings, patches for a one-line failure such as `def f3(x):\n    return ` →
    /// `x + 3`: patch after patch, as long as each repair has one such failure to fix.
    #[allow(dead_code)] // not every test binary that includes this file repairs
    pub fn repairable() -> Self {
        Self {
            seed: 4,
            newline_logit: 11.0,
            ..Self::default()
        }
    }
}

/// The model before writing: f32 values of every tensor (in file order) and the dtype each is stored as.
pub struct TinyModel {
    pub spec: TinySpec,
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
    pub tensors: Vec<(String, Tensor, GgmlDType)>,
}

/// GPT-2's byte-to-char map: the vocabulary string of byte `b` is `byte_char(b)`.
pub fn byte_chars() -> Vec<char> {
    let printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut n = 0;
    (0..256u32)
        .map(|b| {
            if printable.contains(&b) {
                char::from_u32(b).unwrap()
            } else {
                n += 1;
                char::from_u32(256 + n - 1).unwrap()
            }
        })
        .collect()
}

impl TinyModel {
    pub fn new(spec: TinySpec) -> Self {
        // Vocabulary: 256 byte tokens (id = byte value), merge results, specials.
        let chars = byte_chars();
        let mut tokens: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        let mut offsets: Vec<f32> = (0..256u32)
            .map(|b| match b {
                0x0A => spec.newline_logit,
                0x20..=0x7E => 0.0,
                _ => NEVER,
            })
            .collect();
        let merges: Vec<String> = MERGES.iter().map(|m| m.to_string()).collect();
        for m in &merges {
            let merged: String = m.split(' ').collect();
            assert!(!tokens.contains(&merged), "duplicate merge result {merged}");
            tokens.push(merged);
            offsets.push(0.0);
        }
        let mut token_types = vec![1i32; tokens.len()];
        for s in SPECIALS {
            tokens.push(s.to_string());
            token_types.push(3);
            offsets.push(if s == "<|endoftext|>" {
                spec.eos_logit
            } else {
                NEVER
            });
        }
        let vocab = tokens.len();

        let mut rng = StdRng::seed_from_u64(spec.seed);
        let mut uniform = |shape: (usize, usize), a: f32| -> Vec<f32> {
            (0..shape.0 * shape.1)
                .map(|_| rng.random_range(-a..a))
                .collect()
        };
        let mat =
            |v: Vec<f32>, shape: (usize, usize)| Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
        let vec1 = |v: Vec<f32>| {
            let n = v.len();
            Tensor::from_vec(v, n, &Device::Cpu).unwrap()
        };
        let gains = |v: Vec<f32>| v.into_iter().map(|x| 1.0 + x).collect::<Vec<f32>>();
        let zero_row0 = |mut v: Vec<f32>, cols: usize| {
            v[..cols].iter_mut().for_each(|x| *x = 0.0);
            v
        };

        let q8 = |name: &str| match spec.quant {
            Quant::F32 => GgmlDType::F32,
            Quant::Mixed if name == "blk.1.ffn_down.weight" => GgmlDType::Q5_0,
            Quant::Mixed => GgmlDType::Q8_0,
        };
        let mut tensors: Vec<(String, Tensor, GgmlDType)> = Vec::new();
        let mut push = |name: String, t: Tensor, dtype: GgmlDType| tensors.push((name, t, dtype));

        let mut embd = uniform((vocab, HIDDEN), 0.1);
        for row in embd.chunks_mut(HIDDEN) {
            row[0] = 1.0;
        }
        push(
            "token_embd.weight".into(),
            mat(embd, (vocab, HIDDEN)),
            q8("token_embd.weight"),
        );
        let kv = KV_HEADS * HEAD_DIM;
        for l in 0..LAYERS {
            let p = |s: &str| format!("blk.{l}.{s}");
            push(
                p("attn_norm.weight"),
                vec1(gains(uniform((1, HIDDEN), 0.1))),
                GgmlDType::F32,
            );
            push(
                p("attn_q.weight"),
                mat(uniform((HIDDEN, HIDDEN), 0.15), (HIDDEN, HIDDEN)),
                q8(&p("attn_q.weight")),
            );
            push(
                p("attn_q.bias"),
                vec1(uniform((1, HIDDEN), 0.1)),
                GgmlDType::F32,
            );
            push(
                p("attn_k.weight"),
                mat(uniform((kv, HIDDEN), 0.15), (kv, HIDDEN)),
                q8(&p("attn_k.weight")),
            );
            push(
                p("attn_k.bias"),
                vec1(uniform((1, kv), 0.1)),
                GgmlDType::F32,
            );
            push(
                p("attn_v.weight"),
                mat(uniform((kv, HIDDEN), 0.15), (kv, HIDDEN)),
                q8(&p("attn_v.weight")),
            );
            push(
                p("attn_v.bias"),
                vec1(uniform((1, kv), 0.1)),
                GgmlDType::F32,
            );
            push(
                p("attn_output.weight"),
                mat(
                    zero_row0(uniform((HIDDEN, HIDDEN), WRITE_SCALE), HIDDEN),
                    (HIDDEN, HIDDEN),
                ),
                q8(&p("attn_output.weight")),
            );
            push(
                p("ffn_norm.weight"),
                vec1(gains(uniform((1, HIDDEN), 0.1))),
                GgmlDType::F32,
            );
            push(
                p("ffn_gate.weight"),
                mat(uniform((FFN, HIDDEN), 0.15), (FFN, HIDDEN)),
                q8(&p("ffn_gate.weight")),
            );
            push(
                p("ffn_up.weight"),
                mat(uniform((FFN, HIDDEN), 0.15), (FFN, HIDDEN)),
                q8(&p("ffn_up.weight")),
            );
            push(
                p("ffn_down.weight"),
                mat(
                    zero_row0(uniform((HIDDEN, FFN), WRITE_SCALE), FFN),
                    (HIDDEN, FFN),
                ),
                q8(&p("ffn_down.weight")),
            );
        }
        let mut norm = gains(uniform((1, HIDDEN), 0.1));
        norm[0] = 1.0;
        push("output_norm.weight".into(), vec1(norm), GgmlDType::F32);
        if !spec.tied_embeddings {
            let mut head = uniform((vocab, HIDDEN), 0.8);
            for (row, off) in head.chunks_mut(HIDDEN).zip(&offsets) {
                row[0] = off / H0;
            }
            push(
                "output.weight".into(),
                mat(head, (vocab, HIDDEN)),
                q8("output.weight"),
            );
        }
        Self {
            spec,
            tokens,
            token_types,
            merges,
            tensors,
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn token_id(&self, token: &str) -> u32 {
        self.tokens
            .iter()
            .position(|t| t == token)
            .expect("token in vocab") as u32
    }

    /// The f32 values a tensor was built with (before quantization).
    pub fn tensor(&self, name: &str) -> &Tensor {
        &self
            .tensors
            .iter()
            .find(|t| t.0 == name)
            .expect("tensor exists")
            .1
    }

    pub fn tensor_mut(&mut self, name: &str) -> &mut Tensor {
        &mut self
            .tensors
            .iter_mut()
            .find(|t| t.0 == name)
            .expect("tensor exists")
            .1
    }

    pub fn dtype(&self, name: &str) -> GgmlDType {
        self.tensors
            .iter()
            .find(|t| t.0 == name)
            .expect("tensor exists")
            .2
    }

    /// The values the file holds for `name`: quantized as stored, dequantized to f32.
    pub fn stored(&self, name: &str) -> Result<Tensor> {
        QTensor::quantize(self.tensor(name), self.dtype(name))?.dequantize(&Device::Cpu)
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        use gguf_file::Value;
        let arch = self.spec.architecture.as_str();
        let eos = self.token_id("<|endoftext|>");
        let strings =
            |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
        let metadata: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(arch.into())),
            (
                "general.name".into(),
                Value::String("star-ls tiny test model".into()),
            ),
            (format!("{arch}.block_count"), Value::U32(LAYERS as u32)),
            (format!("{arch}.context_length"), Value::U32(CONTEXT as u32)),
            (
                format!("{arch}.embedding_length"),
                Value::U32(HIDDEN as u32),
            ),
            (
                format!("{arch}.feed_forward_length"),
                Value::U32(FFN as u32),
            ),
            (
                format!("{arch}.attention.head_count"),
                Value::U32(HEADS as u32),
            ),
            (
                format!("{arch}.attention.head_count_kv"),
                Value::U32(KV_HEADS as u32),
            ),
            (format!("{arch}.rope.freq_base"), Value::F32(ROPE_THETA)),
            (
                format!("{arch}.attention.layer_norm_rms_epsilon"),
                Value::F32(RMS_EPS),
            ),
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), Value::String("qwen2".into())),
            ("tokenizer.ggml.tokens".into(), strings(&self.tokens)),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(self.token_types.iter().map(|&t| Value::I32(t)).collect()),
            ),
            ("tokenizer.ggml.merges".into(), strings(&self.merges)),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(eos)),
            ("tokenizer.ggml.padding_token_id".into(), Value::U32(eos)),
            ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        ];
        let qtensors: Vec<(String, QTensor)> = self
            .tensors
            .iter()
            .map(|(name, t, dtype)| {
                // From fresh storage: `QTensor::quantize` reads the whole buffer, ignoring a view's offset.
                let t =
                    Tensor::from_vec(t.flatten_all()?.to_vec1::<f32>()?, t.shape(), &Device::Cpu)?;
                Ok((name.clone(), QTensor::quantize(&t, *dtype)?))
            })
            .collect::<Result<_>>()?;
        let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        // Write next to the target and rename: concurrent tests never see a half-written file.
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        {
            let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            gguf_file::write(&mut w, &md, &ts)?;
            std::io::Write::flush(&mut w)?;
        }
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

/// Writes the default tiny model (Q8_0 matrices plus one Q5_0) with weights from `seed`.
pub fn write_tiny_qwen2(path: &Path, seed: u64) -> Result<TinyModel> {
    write_spec(
        path,
        TinySpec {
            seed,
            ..TinySpec::default()
        },
    )
}

pub fn write_spec(path: &Path, spec: TinySpec) -> Result<TinyModel> {
    let m = TinyModel::new(spec);
    m.write(path)?;
    Ok(m)
}

/// A path in cargo's per-target scratch directory for integration tests.
pub fn tmp_path(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("star-ls-tiny");
    std::fs::create_dir_all(&dir).expect("create test tmp dir");
    dir.join(name)
}

/// Writes `spec` under `name` once per test process and returns its path (tests share it).
pub fn cached(name: &str, spec: TinySpec) -> PathBuf {
    static WRITTEN: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    let mut g = WRITTEN.lock().unwrap_or_else(|e| e.into_inner());
    let map = g.get_or_insert_with(HashMap::new);
    if let Some(p) = map.get(name) {
        return p.clone();
    }
    let path = tmp_path(&format!("{name}.gguf"));
    write_spec(&path, spec).expect("write tiny model");
    map.insert(name.to_owned(), path.clone());
    path
}

/// Cuts `path` to `len` bytes (a truncated download).
pub fn truncate_file(path: &Path, len: u64) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(len)
}
