//! The model runtime on a tiny random-weight qwen2 GGUF (written by `support/tiny_model.rs`): loading and
//! its errors, the KV cache, hooks, patches, the dense/differentiable path, generation and token healing.
//!
//! Exact comparisons between the serving model and its dense f32 copies use an all-F32 tiny model
//! (`Quant::F32`): candle keeps F32 matrices dense, so both paths multiply by the very same weights and
//! differ only by float rounding (fused vs composed rms-norm and rope), hence the 1e-4 tolerances. The
//! default Q8_0/Q5_0 model runs the quantized kernels and the requantize path; against its dense copy the
//! serving path differs by Q8_0's activation quantization, checked at a looser tolerance.

#[path = "support/tiny_model.rs"]
mod tiny_model;

use candle_core::{Device, Tensor, Var};
use star_ls::completion::{fim_prompt, ContextLimits};
use star_ls::model::generate::{mask_rows, LineShape, StopReason, BLANK_LINE_FLOOR};
use star_ls::model::{
    generate, Cancel, Capture, Config, Gate, GenerateParams, Hooks, LayerPatch, LoadOptions, Model,
    ModelError, PatchSet, Prompt, StopAt,
};
use std::path::{Path, PathBuf};
use tiny_model::*;

const CODE: &str = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n";

fn f32_spec() -> TinySpec {
    TinySpec {
        seed: 7,
        quant: Quant::F32,
        ..TinySpec::default()
    }
}

fn mixed_path() -> PathBuf {
    cached(
        "mixed-seed1",
        TinySpec {
            seed: 1,
            ..TinySpec::default()
        },
    )
}

fn f32_path() -> PathBuf {
    cached("f32-seed7", f32_spec())
}

/// A model whose next token is a newline with a few percent probability (and never EOS).
fn chatty_path() -> PathBuf {
    cached(
        "chatty-seed3",
        TinySpec {
            seed: 3,
            newline_logit: 4.0,
            ..TinySpec::default()
        },
    )
}

fn load(path: &Path) -> Model {
    load_with(path, LoadOptions::default())
}

/// No padding for candle's repacked kernels: that stores every matrix, F32 ones included, as Q8_0, and
/// the F32 tiny model is there to run the very weights its dense copies hold.
fn exact() -> LoadOptions {
    LoadOptions {
        pad_for_repack: false,
        ..LoadOptions::default()
    }
}

fn load_exact(path: &Path) -> Model {
    load_with(path, exact())
}

fn load_with(path: &Path, opts: LoadOptions) -> Model {
    match Model::load(path, opts) {
        Ok(m) => m,
        Err(e) => panic!("loading {}: {e}", path.display()),
    }
}

fn load_err(path: &Path) -> ModelError {
    match Model::load(path, LoadOptions::default()) {
        Ok(_) => panic!("{} loaded but should not have", path.display()),
        Err(e) => e,
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn tensor_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &x)| if x > b.1 { (i, x) } else { b },
        )
        .0
}

fn logits_of(m: &Model, tokens: &[u32], hooks: &mut Hooks) -> Vec<f32> {
    let mut cache = m.weights.new_cache();
    m.weights.next_logits(tokens, &mut cache, hooks).unwrap()
}

fn tokens(m: &Model) -> Vec<u32> {
    let t = m.tokenizer.encode(CODE);
    assert!(t.len() > 20, "encoded {} tokens", t.len());
    t
}

/// A forward pass of `t` from an empty cache, recording `layers`.
fn captured<const N: usize>(m: &Model, t: &[u32], layers: [usize; N]) -> Capture {
    let mut cap = Capture::layers(layers);
    let mut cache = m.weights.new_cache();
    m.weights
        .forward(
            t,
            &mut cache,
            &mut Hooks {
                capture: Some(&mut cap),
                ..Hooks::default()
            },
        )
        .unwrap();
    cap
}

fn random(shape: (usize, usize), scale: f32, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| rng.random_range(-scale..scale))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn params(max_tokens: usize, temperature: f32, seed: u64) -> GenerateParams {
    GenerateParams {
        max_tokens,
        stop: StopAt::Line,
        temperature,
        top_p: 1.0,
        seed,
        chunk: 256,
    }
}

fn token_bytes(m: &Model, ids: &[u32]) -> Vec<u8> {
    ids.iter()
        .flat_map(|&i| m.tokenizer.token_bytes(i).to_vec())
        .collect()
}

// ---------------------------------------------------------------------------------------------------
// Loading

#[test]
fn loads_tiny_model_with_config_from_metadata() {
    let path = tmp_path("tiny-seed1-direct.gguf");
    let tiny = write_tiny_qwen2(&path, 1).unwrap();
    let m = load(&path);
    assert_eq!(
        m.weights.config(),
        &Config {
            vocab_size: tiny.vocab_size(),
            hidden_size: HIDDEN,
            intermediate_size: FFN,
            num_layers: LAYERS,
            num_heads: HEADS,
            num_kv_heads: KV_HEADS,
            head_dim: HEAD_DIM,
            rope_theta: ROPE_THETA,
            rms_eps: RMS_EPS as f64,
            context_length: CONTEXT,
        }
    );
    assert_eq!(m.weights.layers().len(), LAYERS);
    assert_eq!(m.path, path);
    let tok = &m.tokenizer;
    assert_eq!(tok.vocab_size(), tiny.vocab_size());
    assert_eq!(tok.fim.prefix, tiny.token_id("<|fim_prefix|>"));
    assert_eq!(tok.fim.suffix, tiny.token_id("<|fim_suffix|>"));
    assert_eq!(tok.fim.middle, tiny.token_id("<|fim_middle|>"));
    assert!(tok.is_stop(tiny.token_id("<|endoftext|>")));
    assert!(tok.is_stop(tiny.token_id("<|fim_pad|>")));
    assert!(!tok.is_stop(tiny.token_id("<|fim_middle|>")));
    assert!(!tok.is_stop(b'a' as u32));
    // Byte tokens map to their bytes; merges concatenate; specials are their own text.
    assert_eq!(tok.token_bytes(b'\n' as u32), b"\n");
    assert_eq!(tok.token_bytes(0xE4), [0xE4]);
    assert_eq!(tok.token_bytes(tiny.token_id("Ġreturn")), b" return");
    assert_eq!(
        tok.token_bytes(tiny.token_id("<|fim_prefix|>")),
        b"<|fim_prefix|>"
    );
    // The merges are used, and decoding gives the text back.
    let ids = tok.encode("def add(a, b):\n    return a + b\n");
    assert!(
        ids.contains(&tiny.token_id("def")) && ids.contains(&tiny.token_id("Ġreturn")),
        "{ids:?}"
    );
    assert_eq!(tok.decode(&ids), "def add(a, b):\n    return a + b\n");
    let text = "héllo wörld → 中文 😀";
    assert_eq!(tok.decode(&tok.encode(text)), text);
    assert!(tok.encode("").is_empty());
}

#[test]
fn special_token_text_in_user_input_is_not_a_marker() {
    let m = load(&mixed_path());
    let tok = &m.tokenizer;
    for text in [
        "<|fim_prefix|>",
        "x = '<|endoftext|>'",
        "<|fim_suffix|><|fim_middle|>",
    ] {
        let ids = tok.encode(text);
        let vocab_specials = (tok.vocab_size() - SPECIALS.len()) as u32..tok.vocab_size() as u32;
        assert!(
            ids.iter().all(|i| !vocab_specials.contains(i)),
            "{text:?} encoded to a special: {ids:?}"
        );
        assert_eq!(tok.decode(&ids), text);
    }
}

#[test]
fn tied_embeddings_use_the_embedding_as_lm_head() {
    let spec = TinySpec {
        seed: 5,
        quant: Quant::F32,
        tied_embeddings: true,
        ..TinySpec::default()
    };
    let tiny = TinyModel::new(spec.clone());
    let path = cached("tied-f32-seed5", spec);
    let m = load_exact(&path);
    let (gamma, head) = m.weights.head_dense().unwrap();
    assert_eq!(tensor_diff(&head, tiny.tensor("token_embd.weight")), 0.0);
    assert_eq!(tensor_diff(&gamma, tiny.tensor("output_norm.weight")), 0.0);
    let l = logits_of(&m, &tokens(&m), &mut Hooks::default());
    assert_eq!(l.len(), tiny.vocab_size());
    assert!(l.iter().all(|x| x.is_finite()));
}

#[test]
fn requantize_turns_q5_0_into_q8_0_and_keeps_outputs() {
    let tiny = TinyModel::new(TinySpec {
        seed: 1,
        ..TinySpec::default()
    });
    assert_eq!(
        tiny.dtype("blk.1.ffn_down.weight"),
        candle_core::quantized::GgmlDType::Q5_0
    );
    let stored = tiny.stored("blk.1.ffn_down.weight").unwrap();
    let as_stored = load_with(
        &mixed_path(),
        LoadOptions {
            requantize_q8: false,
            ..exact()
        },
    );
    let requant = load_with(
        &mixed_path(),
        LoadOptions {
            requantize_q8: true,
            ..exact()
        },
    );
    let w_exact = as_stored.weights.layers()[1]
        .mlp()
        .down()
        .dense_weight()
        .unwrap();
    let w_requant = requant.weights.layers()[1]
        .mlp()
        .down()
        .dense_weight()
        .unwrap();
    // Without requantizing, the weights are the file's Q5_0 values exactly.
    assert_eq!(tensor_diff(&w_exact, &stored), 0.0);
    // Requantized to Q8_0: changed (the path ran), but only by Q8_0 rounding (step amax/127 per block).
    let d = tensor_diff(&w_requant, &stored);
    let amax = stored
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d > 0.0, "requantize_q8 left the Q5_0 matrix untouched");
    assert!(
        d <= amax / 127.0 * 0.6,
        "requantize error {d} (amax {amax})"
    );
    // Q8_0 matrices are left alone either way.
    let q = |m: &Model| m.weights.layers()[0].mlp().down().dense_weight().unwrap();
    assert_eq!(tensor_diff(&q(&as_stored), &q(&requant)), 0.0);
    assert_eq!(
        tensor_diff(
            &q(&as_stored),
            &tiny.stored("blk.0.ffn_down.weight").unwrap()
        ),
        0.0
    );

    let t = tokens(&as_stored);
    let a = logits_of(&as_stored, &t, &mut Hooks::default());
    let b = logits_of(&requant, &t, &mut Hooks::default());
    let d = max_abs_diff(&a, &b);
    assert!(d > 0.0 && d < 0.2, "logits moved by {d}");
}

#[test]
fn padding_for_repacked_kernels_keeps_weights_and_outputs() {
    // Q8_0 blocks survive dequantize -> zero-pad -> quantize unchanged, and zero inputs meet zero columns:
    // the padded model is the same model.
    let plain = load_with(&mixed_path(), exact());
    let padded = load_with(
        &mixed_path(),
        LoadOptions {
            pad_for_repack: true,
            ..exact()
        },
    );
    for l in 0..LAYERS {
        let a = plain.weights.layers()[l]
            .mlp()
            .down()
            .dense_weight()
            .unwrap();
        let b = padded.weights.layers()[l]
            .mlp()
            .down()
            .dense_weight()
            .unwrap();
        assert_eq!(
            b.dims(),
            &[HIDDEN, FFN],
            "dense weights have the real input width"
        );
        assert_eq!(tensor_diff(&a, &b), 0.0, "layer {l}");
    }
    let (_, head_a) = plain.weights.head_dense().unwrap();
    let (_, head_b) = padded.weights.head_dense().unwrap();
    assert_eq!(tensor_diff(&head_a, &head_b), 0.0);
    // The repacked kernels quantize activations their own way (per 256-block), so the padded model's
    // rounding differs from the plain one's; against the exact f32 computation (the dense copy) both
    // are off by Q8 activation rounding, and padding must not make that markedly worse.
    let t = tokens(&plain);
    let mut cap = Capture::layers([0]);
    let mut c = plain.weights.new_cache();
    let h_plain = plain
        .weights
        .forward(
            &t,
            &mut c,
            &mut Hooks {
                capture: Some(&mut cap),
                ..Hooks::default()
            },
        )
        .unwrap();
    let mut c = padded.weights.new_cache();
    let h_padded = padded
        .weights
        .forward(&t, &mut c, &mut Hooks::default())
        .unwrap();
    let dense = padded.weights.dense_layers(0..LAYERS, None).unwrap();
    let h_dense = padded
        .weights
        .forward_from(0, &dense, &cap.residual[&0], &mut Hooks::default())
        .unwrap();
    let err_plain = tensor_diff(&h_plain, &h_dense);
    let err_padded = tensor_diff(&h_padded, &h_dense);
    assert!(
        err_plain < 0.05 && err_padded < 0.05,
        "hidden errors {err_plain} / {err_padded}"
    );
    assert!(
        err_padded < 2.0 * err_plain,
        "padding: hidden error {err_padded} vs {err_plain} unpadded"
    );
    let a = plain.weights.logits(&h_plain).unwrap();
    let b = padded.weights.logits(&h_padded).unwrap();
    let d = tensor_diff(&a, &b);
    assert!(d < 0.5, "padding moved the logits by {d}");
}

#[test]
fn missing_file_is_missing() {
    let path = tmp_path("does-not-exist.gguf");
    let _ = std::fs::remove_file(&path);
    let e = load_err(&path);
    assert!(
        matches!(&e, ModelError::Missing { path: p } if p == &path),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        !msg.contains('\n') && msg.contains("fetch-model") && msg.contains("does-not-exist"),
        "{msg}"
    );
}

#[test]
fn truncated_file_is_corrupt() {
    let full = std::fs::read(mixed_path()).unwrap();
    // Cut inside the tensor data (the header still parses) and inside the metadata.
    for (name, len) in [
        ("trunc-data.gguf", full.len() as u64 * 2 / 3),
        ("trunc-data-end.gguf", full.len() as u64 - 100),
    ] {
        let path = tmp_path(name);
        std::fs::write(&path, &full).unwrap();
        truncate_file(&path, len).unwrap();
        let e = load_err(&path);
        let msg = e.to_string();
        assert!(matches!(e, ModelError::Corrupt { .. }), "{msg}");
        assert!(msg.contains("truncated") && !msg.contains('\n'), "{msg}");
    }
    for (name, len) in [
        ("trunc-header.gguf", 100),
        ("trunc-empty.gguf", 0),
        ("trunc-magic.gguf", 3),
    ] {
        let path = tmp_path(name);
        std::fs::write(&path, &full).unwrap();
        truncate_file(&path, len).unwrap();
        let e = load_err(&path);
        let msg = e.to_string();
        assert!(matches!(e, ModelError::Corrupt { .. }), "{name}: {msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }
}

#[test]
fn wrong_architecture_is_unsupported() {
    let path = cached(
        "llama-arch",
        TinySpec {
            architecture: "llama".into(),
            ..TinySpec::default()
        },
    );
    let e = load_err(&path);
    let msg = e.to_string();
    assert!(
        matches!(&e, ModelError::UnsupportedArchitecture { arch, .. } if arch == "llama"),
        "{msg}"
    );
    assert!(
        msg.contains("`llama`") && msg.contains("qwen2") && !msg.contains('\n'),
        "{msg}"
    );
}

#[test]
fn garbage_file_is_corrupt() {
    let path = tmp_path("garbage.gguf");
    let junk: Vec<u8> = (0..10_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, junk).unwrap();
    let e = load_err(&path);
    let msg = e.to_string();
    assert!(matches!(e, ModelError::Corrupt { .. }), "{msg}");
    assert!(msg.contains("not a GGUF") && !msg.contains('\n'), "{msg}");
    // A directory is not a model either.
    let e = load_err(&tmp_path(""));
    assert!(
        matches!(e, ModelError::Corrupt { .. } | ModelError::Missing { .. }),
        "{e}"
    );
    assert!(!e.to_string().contains('\n'));
}

#[test]
fn tokenizer_larger_than_embedding_is_corrupt() {
    let mut tiny = TinyModel::new(TinySpec {
        seed: 2,
        ..TinySpec::default()
    });
    for name in ["token_embd.weight", "output.weight"] {
        let t = tiny.tensor_mut(name);
        *t = t.narrow(0, 0, 256).unwrap();
    }
    let path = tmp_path("small-embedding.gguf");
    tiny.write(&path).unwrap();
    let e = load_err(&path);
    let msg = e.to_string();
    assert!(
        matches!(e, ModelError::Corrupt { .. }) && msg.contains("tokenizer has"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------------------------------
// Forward pass and KV cache

#[test]
fn kv_cache_chunks_match_one_pass() {
    let padded = LoadOptions {
        pad_for_repack: true,
        ..LoadOptions::default()
    };
    for (path, opts) in [
        (mixed_path(), exact()),
        (mixed_path(), padded),
        (f32_path(), exact()),
    ] {
        let m = load_with(&path, opts);
        let t = tokens(&m);
        // Re-stored (requantized or padded) matrices serve a single row with the decode kernel on the
        // GGUF's own blocks, which rounds its input differently from the batch kernel: a one-token
        // chunk moves the logits by that rounding. Otherwise chunking changes nothing.
        let restored = path != f32_path();
        let whole = logits_of(&m, &t, &mut Hooks::default());
        let scale = whole.iter().fold(0f32, |a, x| a.max(x.abs()));
        let tol = |a: usize, b: usize| {
            if restored && (a == 1 || b == 1) {
                0.02 * scale
            } else {
                1e-4
            }
        };
        assert_eq!(whole.len(), m.weights.config().vocab_size);
        for split in [1, 7, t.len() / 2, t.len() - 1] {
            let mut cache = m.weights.new_cache();
            m.weights
                .next_logits(&t[..split], &mut cache, &mut Hooks::default())
                .unwrap();
            assert_eq!(cache.len(), split);
            let two = m
                .weights
                .next_logits(&t[split..], &mut cache, &mut Hooks::default())
                .unwrap();
            assert_eq!(cache.tokens(), &t[..]);
            let d = max_abs_diff(&whole, &two);
            assert!(
                d < tol(split, t.len() - split),
                "split at {split}: max diff {d}"
            );
        }
        // Token by token.
        let mut cache = m.weights.new_cache();
        let mut last = Vec::new();
        for tok in &t {
            last = m
                .weights
                .next_logits(&[*tok], &mut cache, &mut Hooks::default())
                .unwrap();
        }
        let d = max_abs_diff(&whole, &last);
        assert!(d < tol(1, 1), "token by token: max diff {d}");
        assert!(cache.bytes() > 0);
    }
}

#[test]
fn kv_cache_truncate_then_rerun_equals_fresh_run() {
    let m = load(&mixed_path());
    let t = tokens(&m);
    let other = m.tokenizer.encode(" x = 1\n");
    let mut cache = m.weights.new_cache();
    m.weights
        .next_logits(&t, &mut cache, &mut Hooks::default())
        .unwrap();
    let full_bytes = cache.bytes();
    for keep in [12, 1, 0] {
        let mut c = cache.clone();
        c.truncate(keep).unwrap();
        assert_eq!(c.len(), keep);
        assert_eq!(c.tokens(), &t[..keep]);
        assert!(c.bytes() < full_bytes);
        let rerun = m
            .weights
            .next_logits(&other, &mut c, &mut Hooks::default())
            .unwrap();
        let fresh_tokens: Vec<u32> = t[..keep].iter().chain(&other).copied().collect();
        let fresh = logits_of(&m, &fresh_tokens, &mut Hooks::default());
        let d = max_abs_diff(&rerun, &fresh);
        assert!(d < 1e-4, "truncate({keep}): max diff {d}");
    }
    // Truncating past the end is a no-op.
    let mut c = cache.clone();
    c.truncate(t.len() + 5).unwrap();
    assert_eq!(c.len(), t.len());
    assert_eq!(c.bytes(), full_bytes);
}

#[test]
fn context_overflow_is_an_error_not_a_panic() {
    let m = load(&mixed_path());
    let long: Vec<u32> = (0..CONTEXT as u32 + 1)
        .map(|i| b'a' as u32 + i % 26)
        .collect();
    let mut cache = m.weights.new_cache();
    let e = m
        .weights
        .next_logits(&long, &mut cache, &mut Hooks::default());
    assert!(e.is_err());
    assert!(e.unwrap_err().to_string().contains("exceeds"));
    // Exactly the context fits.
    let mut cache = m.weights.new_cache();
    assert!(m
        .weights
        .next_logits(&long[..CONTEXT], &mut cache, &mut Hooks::default())
        .is_ok());
    // And one more on a full cache does not.
    assert!(m
        .weights
        .next_logits(&[1], &mut cache, &mut Hooks::default())
        .is_err());
}

// ---------------------------------------------------------------------------------------------------
// Hooks

#[test]
fn capture_records_chosen_layers() {
    let m = load(&mixed_path());
    let t = tokens(&m);
    let n = t.len();
    let mut cap = Capture::layers([1]);
    let mut cache = m.weights.new_cache();
    let hidden = m
        .weights
        .forward(
            &t,
            &mut cache,
            &mut Hooks {
                capture: Some(&mut cap),
                ..Hooks::default()
            },
        )
        .unwrap();
    assert_eq!(hidden.dims(), &[n, HIDDEN]);
    assert_eq!(cap.neurons.keys().copied().collect::<Vec<_>>(), vec![1]);
    assert_eq!(cap.residual.keys().copied().collect::<Vec<_>>(), vec![1]);
    assert_eq!(cap.neurons[&1].dims(), &[n, FFN]);
    assert_eq!(cap.residual[&1].dims(), &[n, HIDDEN]);
    let fin = cap.final_hidden.as_ref().expect("final hidden recorded");
    assert_eq!(fin.dims(), &[n, HIDDEN]);
    // The forward output is the final norm of the captured last-layer output.
    let (gamma, _) = m.weights.head_dense().unwrap();
    let normed = candle_nn::ops::rms_norm_slow(fin, &gamma, RMS_EPS).unwrap();
    assert!(tensor_diff(&normed, &hidden) < 1e-4);
    // Hidden dim 0 is the tiny model's constant channel: nothing writes to it, so the residual keeps 1.0.
    let r0: Vec<f32> = cap.residual[&1]
        .narrow(1, 0, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(r0.iter().all(|x| (x - 1.0).abs() < 1e-2), "{r0:?}");

    let mut cap0 = Capture::layers([0, 1]);
    let mut cache = m.weights.new_cache();
    m.weights
        .forward(
            &t[..5],
            &mut cache,
            &mut Hooks {
                capture: Some(&mut cap0),
                ..Hooks::default()
            },
        )
        .unwrap();
    assert_eq!(cap0.neurons.len(), 2);
    assert_eq!(cap0.residual[&0].dims(), &[5, HIDDEN]);
    assert_eq!(cap0.neurons[&0].dims(), &[5, FFN]);
    // Layer 0's residual input is the token embedding (held as f16 in memory).
    let tiny = TinyModel::new(TinySpec {
        seed: 1,
        ..TinySpec::default()
    });
    let ids = Tensor::new(&t[..5], &Device::Cpu).unwrap();
    let embedded = tiny
        .stored("token_embd.weight")
        .unwrap()
        .index_select(&ids, 0)
        .unwrap();
    let d = tensor_diff(&cap0.residual[&0], &embedded);
    assert!(d < 1e-3, "residual 0 vs embedding rows: {d}");
    let z: Vec<f32> = cap0.neurons[&0].flatten_all().unwrap().to_vec1().unwrap();
    assert!(z.iter().all(|x| x.is_finite()) && z.iter().any(|x| x.abs() > 1e-3));
}

#[test]
fn captured_neurons_times_down_proj_is_the_mlp_output() {
    // With layer 1's MLP skipped, the hidden state before the final norm lacks exactly down(z_1).
    let m = load_exact(&f32_path());
    let t = tokens(&m);
    let cap = captured(&m, &t, [1]);
    let with_mlp = cap.final_hidden.clone().unwrap();
    let z = cap.neurons[&1].clone();
    let mut cap_skip = Capture::layers([1]);
    let mut c = m.weights.new_cache();
    m.weights
        .forward(
            &t,
            &mut c,
            &mut Hooks {
                capture: Some(&mut cap_skip),
                skip_mlp: &[1],
                ..Hooks::default()
            },
        )
        .unwrap();
    assert!(
        cap_skip.neurons.is_empty(),
        "a skipped MLP has no neurons to record"
    );
    let without = cap_skip.final_hidden.unwrap();
    let down = m.weights.layers()[1].mlp().down().dense_weight().unwrap();
    let mlp_out = z.matmul(&down.t().unwrap()).unwrap();
    let d = tensor_diff(&(without + mlp_out).unwrap(), &with_mlp);
    assert!(d < 1e-4, "max diff {d}");
}

#[test]
fn skip_mlp_changes_the_output() {
    let m = load(&mixed_path());
    let t = tokens(&m);
    let base = logits_of(&m, &t, &mut Hooks::default());
    let skip0 = logits_of(
        &m,
        &t,
        &mut Hooks {
            skip_mlp: &[0],
            ..Hooks::default()
        },
    );
    let skip1 = logits_of(
        &m,
        &t,
        &mut Hooks {
            skip_mlp: &[1],
            ..Hooks::default()
        },
    );
    assert!(max_abs_diff(&base, &skip0) > 1e-2);
    assert!(max_abs_diff(&base, &skip1) > 1e-2);
    assert!(max_abs_diff(&skip0, &skip1) > 1e-2);
    // Skipping a layer that does not exist changes nothing; empty hooks are a plain forward.
    let none = logits_of(
        &m,
        &t,
        &mut Hooks {
            skip_mlp: &[99],
            ..Hooks::default()
        },
    );
    assert_eq!(base, none);
    let empty = PatchSet::default();
    assert!(empty.is_empty());
    assert_eq!(base, logits_of(&m, &t, &mut Hooks::with_patches(&empty)));
}

/// Columns and a delta for a patch on `down_proj`.
fn patch(columns: &[u32], seed: u64, scale: f32) -> LayerPatch {
    LayerPatch::new(
        columns.to_vec(),
        random((HIDDEN, columns.len()), scale, seed),
    )
    .unwrap()
}

/// `ffn_down.weight[:, columns] += delta` on the builder's f32 values.
fn add_to_down(tiny: &mut TinyModel, layer: usize, p: &LayerPatch) {
    let name = format!("blk.{layer}.ffn_down.weight");
    let w: Vec<Vec<f32>> = tiny.tensor(&name).to_vec2().unwrap();
    let delta: Vec<Vec<f32>> = p.delta().to_vec2().unwrap();
    let mut w = w;
    for (row, drow) in w.iter_mut().zip(&delta) {
        for (j, &c) in p.columns().iter().enumerate() {
            row[c as usize] += drow[j];
        }
    }
    let flat: Vec<f32> = w.into_iter().flatten().collect();
    *tiny.tensor_mut(&name) = Tensor::from_vec(flat, (HIDDEN, FFN), &Device::Cpu).unwrap();
}

#[test]
fn patch_equals_model_with_edited_down_proj() {
    let base = load_exact(&f32_path());
    let t = tokens(&base);
    let p0 = patch(&[3, 17, 64, 127], 11, 0.5);
    let p1 = patch(&[0, 5], 12, 0.5);
    let set = PatchSet::default()
        .with(0, p0.clone())
        .unwrap()
        .with(1, p1.clone())
        .unwrap();
    assert_eq!(set.iter().map(|(l, _)| l).collect::<Vec<_>>(), vec![0, 1]);

    let mut tiny = TinyModel::new(f32_spec());
    add_to_down(&mut tiny, 0, &p0);
    add_to_down(&mut tiny, 1, &p1);
    let edited_path = tmp_path("f32-seed7-edited.gguf");
    tiny.write(&edited_path).unwrap();
    let edited = load_exact(&edited_path);

    let plain = logits_of(&base, &t, &mut Hooks::default());
    let patched = logits_of(&base, &t, &mut Hooks::with_patches(&set));
    let want = logits_of(&edited, &t, &mut Hooks::default());
    assert!(
        max_abs_diff(&plain, &want) > 1e-2,
        "the edit must matter for this test to mean anything"
    );
    let d = max_abs_diff(&patched, &want);
    assert!(d < 1e-4, "patched vs edited weights: max diff {d}");

    // The same through the dense path: dense copies of every layer, fed the captured embedding.
    let mut cap = Capture::layers([0]);
    let mut c = base.weights.new_cache();
    let serving = base
        .weights
        .forward(
            &t,
            &mut c,
            &mut Hooks {
                patches: Some(&set),
                capture: Some(&mut cap),
                ..Hooks::default()
            },
        )
        .unwrap();
    let dense = base.weights.dense_layers(0..LAYERS, None).unwrap();
    let x0 = cap.residual[&0].clone();
    let from_dense = base
        .weights
        .forward_from(0, &dense, &x0, &mut Hooks::with_patches(&set))
        .unwrap();
    assert!(tensor_diff(&serving, &from_dense) < 1e-4);
    let last = |h: &Tensor| -> Vec<f32> {
        let l = base
            .weights
            .logits(&h.narrow(0, h.dim(0).unwrap() - 1, 1).unwrap())
            .unwrap();
        l.squeeze(0).unwrap().to_vec1().unwrap()
    };
    let d = max_abs_diff(&last(&from_dense), &want);
    assert!(d < 1e-4, "dense patched vs edited weights: max diff {d}");

    // Upper part only: dense layer 1 from the serving model's residual at layer 1.
    let mut cap1 = Capture::layers([1]);
    let mut c = base.weights.new_cache();
    base.weights
        .forward(
            &t,
            &mut c,
            &mut Hooks {
                patches: Some(&set),
                capture: Some(&mut cap1),
                ..Hooks::default()
            },
        )
        .unwrap();
    let upper = base.weights.dense_layers(1..LAYERS, None).unwrap();
    let h = base
        .weights
        .forward_from(
            1,
            &upper,
            &cap1.residual[&1],
            &mut Hooks::with_patches(&set),
        )
        .unwrap();
    assert!(tensor_diff(&h, &serving) < 1e-4);
}

/// Serving a patch re-quantized into `down_proj` instead of as an overlay: exact when the GGUF stores
/// F32, within the block type's rounding otherwise (Q8_0, and Q5_0 on layer 1 of the mixed model).
#[test]
fn requantized_patch_serves_what_the_overlay_does() {
    let set = PatchSet::default()
        .with(0, patch(&[3, 17, 64, 127], 11, 0.5))
        .unwrap()
        .with(1, patch(&[0, 5, 90], 12, 0.5))
        .unwrap();
    // Padded for the repacked kernels on any CPU, not only where the default pads.
    let padded = LoadOptions {
        pad_for_repack: true,
        ..LoadOptions::default()
    };
    for (m, tolerance) in [
        (load_exact(&f32_path()), 1e-4),
        (load(&mixed_path()), 0.1),
        (load_with(&mixed_path(), padded), 0.1),
    ] {
        let t = tokens(&m);
        let plain = logits_of(&m, &t, &mut Hooks::default());
        let overlay = logits_of(&m, &t, &mut Hooks::with_patches(&set));
        let moved = max_abs_diff(&plain, &overlay);
        assert!(
            moved > 1e-2,
            "the patch must matter: it moved logits {moved}"
        );
        let requantized = m.weights.requantized(&set).unwrap();
        let got = requantized
            .next_logits(&t, &mut requantized.new_cache(), &mut Hooks::default())
            .unwrap();
        let d = max_abs_diff(&got, &overlay);
        assert!(
            d < tolerance * moved.max(1.0),
            "re-quantized vs overlay: max diff {d} (the patch moved logits {moved})"
        );
        // Single-token decode runs the GGUF's own blocks where they were re-stored for batches.
        let mut cache = requantized.new_cache();
        requantized
            .next_logits(&t[..t.len() - 1], &mut cache, &mut Hooks::default())
            .unwrap();
        let last = requantized
            .next_logits(&t[t.len() - 1..], &mut cache, &mut Hooks::default())
            .unwrap();
        let d = max_abs_diff(&last, &overlay);
        assert!(
            d < tolerance * moved.max(1.0),
            "decoded last token: max diff {d}"
        );
    }
}

/// The final hidden rows of `t` under `set`, from an empty cache.
fn hidden_rows(m: &Model, t: &[u32], set: &PatchSet) -> Vec<Vec<f32>> {
    let mut cache = m.weights.new_cache();
    let h = m
        .weights
        .forward(t, &mut cache, &mut Hooks::with_patches(set));
    h.unwrap().to_vec2().unwrap()
}

/// Which `rows` have cosine at least `threshold` with row 4 or 11 (computed here, not by the gate),
/// checked to be some but not all.
fn open_near_rows_4_and_11(rows: &[Vec<f32>], threshold: f32) -> Vec<bool> {
    let cosine = |a: &[f32], b: &[f32]| {
        let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
        dot(a, b) / (dot(a, a) * dot(b, b)).sqrt()
    };
    let open: Vec<bool> = rows
        .iter()
        .map(|r| [4, 11].iter().any(|&k| cosine(r, &rows[k]) >= threshold))
        .collect();
    assert!(open[4] && open[11] && open.iter().any(|o| !o), "{open:?}");
    open
}

/// A gated patch acts only at the rows whose activations on its columns point like one of its keys:
/// elsewhere the model is bit-identical to the unpatched one, where it opens it is the ungated patch.
/// It stays beside the summed patch of its layer, so re-quantized weights and dense copies hold the
/// summed one and take the gated one as an overlay.
#[test]
fn a_gated_patch_acts_only_where_its_gate_opens() {
    let m = load_exact(&f32_path());
    let t = tokens(&m);
    let last = LAYERS - 1;
    let columns = [3u32, 17, 64, 127];
    let index = Tensor::new(&columns, &Device::Cpu).unwrap();
    let zs = captured(&m, &t, [last]).neurons[&last]
        .index_select(&index, 1)
        .unwrap();
    let keys = zs
        .index_select(&Tensor::new(&[4u32, 11], &Device::Cpu).unwrap(), 0)
        .unwrap();
    let threshold = 0.9;
    let rows: Vec<Vec<f32>> = zs.to_vec2().unwrap();
    let open = open_near_rows_4_and_11(&rows, threshold);

    let ungated = patch(&columns, 21, 0.5);
    let gated = ungated
        .clone()
        .gated(Some(Gate::on_columns(&keys, threshold).unwrap()));
    let hidden = |set: &PatchSet| hidden_rows(&m, &t, set);
    let plain = hidden(&PatchSet::default());
    let full = hidden(&PatchSet::default().with(last, ungated.clone()).unwrap());
    let got = hidden(&PatchSet::default().with(last, gated.clone()).unwrap());
    for (r, &o) in open.iter().enumerate() {
        let want = if o { &full[r] } else { &plain[r] };
        assert!(got[r] == *want, "row {r} (gate open: {o})");
        assert!(!o || full[r] != plain[r], "the patch must move row {r}");
    }
    assert!(Gate::on_columns(&keys.narrow(0, 0, 0).unwrap(), threshold).is_err());

    let both = PatchSet::default()
        .with(last, ungated)
        .unwrap()
        .with(last, gated)
        .unwrap();
    assert_eq!(both.iter().count(), 2, "a gated patch is not summed");
    let rest = both.gated_only();
    assert_eq!((rest.iter().count(), rest.layer(last).is_none()), (1, true));
    let serving = m
        .weights
        .forward(
            &t,
            &mut m.weights.new_cache(),
            &mut Hooks::with_patches(&both),
        )
        .unwrap();
    let requantized = m.weights.requantized(&both).unwrap();
    let folded = requantized
        .forward(
            &t,
            &mut requantized.new_cache(),
            &mut Hooks::with_patches(&rest),
        )
        .unwrap();
    assert!(tensor_diff(&folded, &serving) < 1e-4);
    let dense = m.weights.dense_layers(0..LAYERS, Some(&both)).unwrap();
    let x0 = captured(&m, &t, [0]).residual[&0].clone();
    let from_dense = m
        .weights
        .forward_from(0, &dense, &x0, &mut Hooks::with_patches(&rest))
        .unwrap();
    assert!(tensor_diff(&from_dense, &serving) < 1e-4);
}

/// The exact tiny model, its tokens, the last layer's `z` over them, a centre (the mean of rows 1–6)
/// and keys at rows 4 and 11.
fn keyed_on_the_last_layer() -> (Model, Vec<u32>, Tensor, Tensor, Tensor) {
    let m = load_exact(&f32_path());
    let t = tokens(&m);
    let z = captured(&m, &t, [LAYERS - 1]).neurons[&(LAYERS - 1)].clone();
    let center = z.narrow(0, 1, 6).unwrap().mean(0).unwrap();
    let keys = z
        .index_select(&Tensor::new(&[4u32, 11], &Device::Cpu).unwrap(), 0)
        .unwrap();
    (m, t, z, center, keys)
}

/// A gate keyed on the layer reads every neuron's activation less its centre: at the rows whose
/// centred activation points like a centred key the patch acts as ungated, elsewhere the model is
/// bit-identical to the unpatched one.
#[test]
fn a_gate_keyed_on_the_layer_reads_the_centred_activation() {
    let (m, t, z, center, keys) = keyed_on_the_last_layer();
    let last = LAYERS - 1;
    let threshold = 0.6;
    let c: Vec<f32> = center.to_vec1().unwrap();
    let rows: Vec<Vec<f32>> = z
        .to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|r| r.iter().zip(&c).map(|(x, m)| x - m).collect())
        .collect();
    let open = open_near_rows_4_and_11(&rows, threshold);

    let ungated = patch(&[3, 17, 64, 127], 21, 0.5);
    let gate = Gate::on_layer(&keys, &center, threshold).unwrap();
    let gated = ungated.clone().gated(Some(gate));
    let hidden = |set: &PatchSet| hidden_rows(&m, &t, set);
    let plain = hidden(&PatchSet::default());
    let full = hidden(&PatchSet::default().with(last, ungated).unwrap());
    let got = hidden(&PatchSet::default().with(last, gated).unwrap());
    for (r, &o) in open.iter().enumerate() {
        let want = if o { &full[r] } else { &plain[r] };
        assert!(got[r] == *want, "row {r} (gate open: {o})");
        assert!(!o || full[r] != plain[r], "the patch must move row {r}");
    }
    let narrow = Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(Gate::on_layer(&keys, &narrow, threshold).is_err());
}

/// A patch of values adds, at each row its gate opens at, the value of the row's nearest key, and
/// nothing elsewhere: the same change wherever a context like the key's comes.
#[test]
fn a_value_patch_adds_its_nearest_keys_value() {
    let (m, t, z, center, keys) = keyed_on_the_last_layer();
    let last = LAYERS - 1;
    let gate = Gate::on_layer(&keys, &center, 0.6).unwrap();
    let values = random((HIDDEN, 2), 0.5, 31);
    let value_patch = LayerPatch::values(values.clone(), gate.clone()).unwrap();
    let scores: Vec<Vec<f32>> = (0..2)
        .map(|k| {
            let one = Gate::on_layer(&keys.narrow(0, k, 1).unwrap(), &center, 0.6).unwrap();
            one.scores(&z)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    let hidden = |set: &PatchSet| hidden_rows(&m, &t, set);
    let plain = hidden(&PatchSet::default());
    let got = hidden(&PatchSet::default().with(last, value_patch).unwrap());
    // At the last layer rows are independent: an open row is the model with its key's value
    // added at every row.
    let mut opened = 0;
    for r in 0..t.len() {
        // By how much the row clears each key's threshold.
        let (a, b) = (scores[0][r], scores[1][r]);
        if a.max(b) < 0.0 {
            assert!(got[r] == plain[r], "row {r} is shut: bit-identical");
            continue;
        }
        opened += 1;
        let k = if a >= b { 0 } else { 1 };
        let only = LayerPatch::values(
            values.narrow(1, k, 1).unwrap(),
            Gate::on_layer(&keys.narrow(0, k, 1).unwrap(), &center, -1.0).unwrap(),
        )
        .unwrap();
        let want = hidden(&PatchSet::default().with(last, only).unwrap());
        assert!(got[r] == want[r], "row {r} gets key {k}'s value");
        assert!(got[r] != plain[r]);
    }
    assert!(
        opened >= 2 && opened < t.len(),
        "{opened} of {} rows open",
        t.len()
    );
    let three = random((HIDDEN, 3), 0.5, 32);
    assert!(LayerPatch::values(three, gate).is_err(), "a value per key");
}

/// Gates keyed on one layer are scored together (one codebook per layer), yet each acts as it would
/// alone: at the last layer, where rows are independent, two value patches add each its own value
/// at the rows its gate opens at, and a row neither opens stays bit-identical.
#[test]
fn value_patches_on_one_layer_act_as_each_would_alone() {
    let (m, t, z, center, _) = keyed_on_the_last_layer();
    let last = LAYERS - 1;
    let entry = |row: usize, seed: u64| {
        let gate = Gate::on_layer(&z.narrow(0, row, 1).unwrap(), &center, 0.6).unwrap();
        LayerPatch::values(random((HIDDEN, 1), 0.5, seed), gate).unwrap()
    };
    let (a, b) = (entry(4, 41), entry(11, 42));
    let hidden = |set: &PatchSet| hidden_rows(&m, &t, set);
    let plain = hidden(&PatchSet::default());
    let only_a = hidden(&PatchSet::default().with(last, a.clone()).unwrap());
    let only_b = hidden(&PatchSet::default().with(last, b.clone()).unwrap());
    // A set that has served a pass (its codebooks built) and then gains a patch scores the new one too.
    let first = PatchSet::default().with(last, a).unwrap();
    assert!(hidden(&first) == only_a);
    let both = hidden(&first.with(last, b).unwrap());
    for r in 0..t.len() {
        let (moved_a, moved_b) = (only_a[r] != plain[r], only_b[r] != plain[r]);
        match (moved_a, moved_b) {
            (false, false) => assert!(both[r] == plain[r], "row {r}: both shut"),
            (true, false) => assert!(both[r] == only_a[r], "row {r}: only a opens"),
            (false, true) => assert!(both[r] == only_b[r], "row {r}: only b opens"),
            (true, true) => {
                // Both values added: the two changes sum (the final norm makes it approximate).
                assert!(
                    both[r] != only_a[r] && both[r] != only_b[r],
                    "row {r}: both open"
                );
            }
        }
    }
    assert!(only_a[4] != plain[4] && only_b[11] != plain[11]);
    assert!(
        (0..t.len()).any(|r| both[r] == plain[r]),
        "some row stays shut"
    );
}

/// What repair relies on to run a case only from the first row a gated patch may change: `z` on a
/// patch's neurons recomputed from the residual a pass recorded between attention and MLP
/// (`Capture::mid`, `DecoderLayer::neurons_on`, the input rounded as the quantized kernels round it)
/// agrees with the pass's own; the gate's first open row by it is where the patched model first
/// differs, and every row before is bit-identical to the unpatched model at every layer.
#[test]
fn rows_before_a_gates_first_open_row_are_unpatched() {
    let m = load(&mixed_path());
    let t = tokens(&m);
    let layer = LAYERS - 2;
    let columns = [3u32, 17, 64, 100, 127];
    let index = Tensor::new(&columns, &Device::Cpu).unwrap();
    let mut cap = Capture::layers([layer]).with_mid();
    m.weights
        .forward(
            &t,
            &mut m.weights.new_cache(),
            &mut Hooks {
                capture: Some(&mut cap),
                ..Hooks::default()
            },
        )
        .unwrap();
    let served = cap.neurons[&layer].index_select(&index, 1).unwrap();
    let dense = m.weights.dense_layers(layer..layer + 1, None).unwrap();
    let ours = dense[0].neurons_on(&cap.mid[&layer], Some(&index)).unwrap();
    let scale = served
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        tensor_diff(&ours, &served) < 1e-4 * scale,
        "recomputed z differs by {} (largest |z| {scale})",
        tensor_diff(&ours, &served)
    );

    let key_row = t.len() - 3;
    let keys = served.narrow(0, key_row, 1).unwrap();
    let gate = Gate::on_columns(&keys, 0.99).unwrap();
    let first = gate
        .first_open(&ours, 0.0)
        .unwrap()
        .expect("opens at its key's row");
    assert!(first <= key_row);
    assert_eq!(
        gate.first_open(&ours.narrow(0, 0, first).unwrap(), 0.0)
            .unwrap(),
        None
    );
    let gated = patch(&columns, 21, 0.5).gated(Some(gate));
    let plain = hidden_rows(&m, &t, &PatchSet::default());
    let got = hidden_rows(&m, &t, &PatchSet::default().with(layer, gated).unwrap());
    for r in 0..first {
        assert!(
            got[r] == plain[r],
            "row {r}, before the first open row {first}"
        );
    }
    assert!(
        got[first] != plain[first],
        "the patch must move row {first}"
    );
}

/// A patch scoped to some rows of a pass (candidates tried side by side, each on its own copy of a
/// case) acts there as the whole patch and nowhere else, and is never summed with another.
#[test]
fn a_row_scoped_patch_acts_only_at_its_rows() {
    let m = load_exact(&f32_path());
    let t = tokens(&m);
    let last = LAYERS - 1;
    let whole = patch(&[3, 17, 64], 21, 0.5);
    let scoped = whole.clone().on_rows(2..5, t.len()).unwrap();
    let hidden = |set: &PatchSet| hidden_rows(&m, &t, set);
    let plain = hidden(&PatchSet::default());
    let full = hidden(&PatchSet::default().with(last, whole.clone()).unwrap());
    let got = hidden(&PatchSet::default().with(last, scoped.clone()).unwrap());
    for r in 0..t.len() {
        let inside = (2..5).contains(&r);
        let want = if inside { &full[r] } else { &plain[r] };
        assert!(got[r] == *want, "row {r} (in scope: {inside})");
        assert!(
            !inside || full[r] != plain[r],
            "the patch must move row {r}"
        );
    }
    let both = PatchSet::default()
        .with(last, whole.clone())
        .unwrap()
        .with(last, scoped.clone())
        .unwrap();
    assert_eq!(both.iter().count(), 2, "a row-scoped patch is not summed");
    assert!(scoped.merged(&whole).is_err());
}

#[test]
fn dense_copy_of_quantized_model_tracks_serving() {
    // Q8_0 serving multiplies by Q8_0-quantized activations; the dense copy does not. The difference is
    // rounding of ~1/254 of each 32-block's max per multiplication: small against hidden states of O(1).
    let m = load(&mixed_path());
    let t = tokens(&m);
    let mut cap = Capture::layers([0]);
    let mut c = m.weights.new_cache();
    let serving = m
        .weights
        .forward(
            &t,
            &mut c,
            &mut Hooks {
                capture: Some(&mut cap),
                ..Hooks::default()
            },
        )
        .unwrap();
    let dense = m.weights.dense_layers(0..LAYERS, None).unwrap();
    let from_dense = m
        .weights
        .forward_from(0, &dense, &cap.residual[&0], &mut Hooks::default())
        .unwrap();
    let d = tensor_diff(&serving, &from_dense);
    let scale = serving
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        d > 0.0 && d < 0.03 * scale,
        "serving vs dense: max diff {d} at scale {scale}"
    );
}

#[test]
fn patch_set_with_merges_patches_on_one_layer_into_their_sum() {
    let m = load_exact(&f32_path());
    let t = tokens(&m);
    let a = patch(&[1, 2, 9], 21, 0.4);
    let b = patch(&[2, 40], 22, 0.4);
    let set = PatchSet::default()
        .with(1, a.clone())
        .unwrap()
        .with(1, b.clone())
        .unwrap();
    assert_eq!(set.iter().count(), 1);
    let merged = set.layer(1).unwrap();
    assert_eq!(merged.columns(), &[1, 2, 9, 40]);
    let md: Vec<Vec<f32>> = merged.delta().to_vec2().unwrap();
    let ad: Vec<Vec<f32>> = a.delta().to_vec2().unwrap();
    let bd: Vec<Vec<f32>> = b.delta().to_vec2().unwrap();
    for r in 0..HIDDEN {
        assert_eq!(md[r][0], ad[r][0]);
        assert!((md[r][1] - (ad[r][1] + bd[r][0])).abs() < 1e-6);
        assert_eq!(md[r][2], ad[r][2]);
        assert_eq!(md[r][3], bd[r][1]);
    }
    // Same output as applying the two patches as two edits of the weights.
    let mut tiny = TinyModel::new(f32_spec());
    add_to_down(&mut tiny, 1, &a);
    add_to_down(&mut tiny, 1, &b);
    let path = tmp_path("f32-seed7-edited-twice.gguf");
    tiny.write(&path).unwrap();
    let edited = load_exact(&path);
    let want = logits_of(&edited, &t, &mut Hooks::default());
    let got = logits_of(&m, &t, &mut Hooks::with_patches(&set));
    let d = max_abs_diff(&got, &want);
    assert!(d < 1e-4, "max diff {d}");
    // Patches on other layers are kept apart; the original set is not modified.
    let set2 = set.with(0, patch(&[7], 23, 0.4)).unwrap();
    assert_eq!(set2.iter().count(), 2);
    assert_eq!(set.iter().count(), 1);
    assert!(LayerPatch::new(vec![1, 2], random((HIDDEN, 3), 0.1, 1)).is_err());
}

// ---------------------------------------------------------------------------------------------------
// Gradients through dense copies

/// Next-token cross-entropy of the dense model from residual `x0`, with `delta` patched on `layer`.
fn dense_loss(
    m: &Model,
    layer: usize,
    columns: &[u32],
    delta: &Tensor,
    x0: &Tensor,
    targets: &Tensor,
) -> Tensor {
    let dense = m.weights.dense_layers(0..LAYERS, None).unwrap();
    let set = PatchSet::default()
        .with(
            layer,
            LayerPatch::new(columns.to_vec(), delta.clone()).unwrap(),
        )
        .unwrap();
    let h = m
        .weights
        .forward_from(0, &dense, x0, &mut Hooks::with_patches(&set))
        .unwrap();
    let (_, head) = m.weights.head_dense().unwrap();
    let logits = h.matmul(&head.t().unwrap()).unwrap();
    let n = logits.dim(0).unwrap();
    candle_nn::loss::cross_entropy(&logits.narrow(0, 0, n - 1).unwrap(), targets).unwrap()
}

fn check_gradients(layer: usize) {
    let m = load_exact(&f32_path());
    let t = tokens(&m);
    let cap = captured(&m, &t, [0]);
    let x0 = cap.residual[&0].clone();
    let targets = Tensor::new(&t[1..], &Device::Cpu).unwrap();
    let columns = [4u32, 30, 99];
    let init = random((HIDDEN, columns.len()), 0.3, 31);
    let var = Var::from_tensor(&init).unwrap();
    let loss = dense_loss(&m, layer, &columns, var.as_tensor(), &x0, &targets);
    let grads = loss.backward().unwrap();
    let g = grads
        .get(var.as_tensor())
        .expect("gradient reaches the patch delta");
    assert_eq!(g.dims(), &[HIDDEN, columns.len()]);
    let gv: Vec<Vec<f32>> = g.to_vec2().unwrap();
    assert!(gv.iter().flatten().all(|x| x.is_finite()));
    let gmax = gv.iter().flatten().fold(0f32, |a, x| a.max(x.abs()));
    assert!(gmax > 1e-4, "gradient is ~zero ({gmax})");

    // Central differences on the entries with the largest gradients, and one more.
    let mut entries: Vec<(usize, usize)> = (0..HIDDEN)
        .flat_map(|r| (0..columns.len()).map(move |c| (r, c)))
        .collect();
    entries.sort_by(|a, b| gv[b.0][b.1].abs().total_cmp(&gv[a.0][a.1].abs()));
    let mut chosen: Vec<(usize, usize)> = entries[..3].to_vec();
    chosen.push(entries[HIDDEN]);
    let eps = 1e-2f32;
    let base: Vec<Vec<f32>> = init.to_vec2().unwrap();
    for (r, c) in chosen {
        let at = |e: f32| {
            let mut d = base.clone();
            d[r][c] += e;
            let flat: Vec<f32> = d.into_iter().flatten().collect();
            let delta = Tensor::from_vec(flat, (HIDDEN, columns.len()), &Device::Cpu).unwrap();
            dense_loss(&m, layer, &columns, &delta, &x0, &targets)
                .to_scalar::<f32>()
                .unwrap()
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        let bp = gv[r][c];
        assert!(
            (fd - bp).abs() <= 2e-3 * gmax + 1e-5,
            "layer {layer} delta[{r}][{c}]: backprop {bp} vs finite difference {fd} (max |grad| {gmax})"
        );
    }
}

#[test]
fn gradients_through_last_layer_patch_match_finite_differences() {
    check_gradients(1);
}

#[test]
fn gradients_through_attention_match_finite_differences() {
    // A patch on layer 0 reaches the loss through layer 1's attention (queries and keys included).
    check_gradients(0);
}

// ---------------------------------------------------------------------------------------------------
// Generation

fn prompt_of(m: &Model, text: &str) -> Prompt {
    Prompt {
        tokens: m.tokenizer.encode(text),
        ..Prompt::default()
    }
}

#[test]
fn stop_at_line_ends_at_the_first_newline() {
    let m = load(&chatty_path());
    let prompt = prompt_of(&m, CODE);
    let mut nonempty = 0;
    for seed in 0..8 {
        let mut cache = m.weights.new_cache();
        let g = generate(
            &m.weights,
            &m.tokenizer,
            &prompt,
            &mut cache,
            None,
            &params(200, 1.0, seed),
            &Cancel::default(),
        )
        .unwrap();
        assert_eq!(g.stop, StopReason::EndOfLine, "seed {seed}: {g:?}");
        assert!(!g.text.contains('\n'));
        // The last token is the newline; everything before it is the text.
        assert_eq!(
            m.tokenizer.decode(&g.tokens),
            format!("{}\n", g.text),
            "seed {seed}"
        );
        assert_eq!(*g.tokens.last().unwrap(), b'\n' as u32);
        assert!(g.tokens.len() < 200);
        nonempty += (!g.text.is_empty()) as usize;
    }
    assert!(
        nonempty >= 4,
        "the line rule should cut after some text, not only at once"
    );
}

#[test]
fn max_tokens_is_respected() {
    let m = load(&mixed_path()); // newlines and EOS are impossible in this model
    let prompt = prompt_of(&m, CODE);
    for (max, temperature) in [(0, 0.0), (1, 0.0), (5, 0.0), (9, 0.8)] {
        let mut cache = m.weights.new_cache();
        let g = generate(
            &m.weights,
            &m.tokenizer,
            &prompt,
            &mut cache,
            None,
            &params(max, temperature, 4),
            &Cancel::default(),
        )
        .unwrap();
        assert_eq!(g.stop, StopReason::MaxTokens);
        assert_eq!(g.tokens.len(), max);
        assert_eq!(g.text, m.tokenizer.decode(&g.tokens));
        assert_eq!(g.prompt_tokens, prompt.tokens.len());
        assert_eq!(g.prefilled, prompt.tokens.len());
        // The cache holds the prompt and every generated token that was run.
        assert_eq!(cache.tokens()[..prompt.tokens.len()], prompt.tokens[..]);
        assert_eq!(cache.len(), prompt.tokens.len() + max);
    }
}

#[test]
fn greedy_generation_matches_manual_argmax_decoding() {
    let m = load(&mixed_path());
    let prompt = prompt_of(&m, CODE);
    let mut cache = m.weights.new_cache();
    let g = generate(
        &m.weights,
        &m.tokenizer,
        &prompt,
        &mut cache,
        None,
        &params(6, 0.0, 0),
        &Cancel::default(),
    )
    .unwrap();
    let mut c = m.weights.new_cache();
    let mut logits = m
        .weights
        .next_logits(&prompt.tokens, &mut c, &mut Hooks::default())
        .unwrap();
    let mut want = Vec::new();
    for _ in 0..6 {
        let next = argmax(&logits) as u32;
        want.push(next);
        logits = m
            .weights
            .next_logits(&[next], &mut c, &mut Hooks::default())
            .unwrap();
    }
    assert_eq!(g.tokens, want);
    // With a patch set, generation runs the patched model.
    let set = PatchSet::default()
        .with(1, patch(&[0, 1, 2, 3, 4, 5, 6, 7], 41, 3.0))
        .unwrap();
    let mut c = m.weights.new_cache();
    let gp = generate(
        &m.weights,
        &m.tokenizer,
        &prompt,
        &mut c,
        Some(&set),
        &params(6, 0.0, 0),
        &Cancel::default(),
    )
    .unwrap();
    let first = argmax(&logits_of(
        &m,
        &prompt.tokens,
        &mut Hooks::with_patches(&set),
    )) as u32;
    assert_eq!(gp.tokens[0], first);
}

#[test]
fn stop_token_ends_generation_without_being_emitted() {
    let path = cached(
        "eos-seed4",
        TinySpec {
            seed: 4,
            eos_logit: 5.0,
            ..TinySpec::default()
        },
    );
    let m = load(&path);
    let prompt = prompt_of(&m, CODE);
    let mut cache = m.weights.new_cache();
    let g = generate(
        &m.weights,
        &m.tokenizer,
        &prompt,
        &mut cache,
        None,
        &params(200, 1.0, 9),
        &Cancel::default(),
    )
    .unwrap();
    assert_eq!(g.stop, StopReason::StopToken, "{g:?}");
    assert!(g.tokens.iter().all(|&t| !m.tokenizer.is_stop(t)));
    assert_eq!(g.text, m.tokenizer.decode(&g.tokens));
}

#[test]
fn cancelled_generation_stops_immediately() {
    let m = load(&mixed_path());
    let prompt = prompt_of(&m, CODE);
    let cancel = Cancel::default();
    assert!(!cancel.is_cancelled());
    let other = cancel.clone();
    other.cancel();
    assert!(cancel.is_cancelled(), "clones share the flag");
    let mut cache = m.weights.new_cache();
    let g = generate(
        &m.weights,
        &m.tokenizer,
        &prompt,
        &mut cache,
        None,
        &params(50, 0.0, 0),
        &cancel,
    )
    .unwrap();
    assert_eq!(g.stop, StopReason::Cancelled);
    assert!(g.tokens.is_empty() && g.text.is_empty());
    assert!(cache.is_empty(), "a cancel before prefill runs nothing");

    // Cancelled with a warm cache: the cache keeps the shared prefix and stays consistent, and a later
    // uncancelled run from it gives what a fresh run gives.
    let mut warm = m.weights.new_cache();
    let first = generate(
        &m.weights,
        &m.tokenizer,
        &prompt,
        &mut warm,
        None,
        &params(4, 0.0, 0),
        &Cancel::default(),
    )
    .unwrap();
    let k = prompt.tokens.len() - 3;
    let other = Prompt {
        tokens: prompt.tokens[..k]
            .iter()
            .chain(&m.tokenizer.encode(" pass"))
            .copied()
            .collect(),
        ..Prompt::default()
    };
    let g = generate(
        &m.weights,
        &m.tokenizer,
        &other,
        &mut warm,
        None,
        &params(4, 0.0, 0),
        &cancel,
    )
    .unwrap();
    assert_eq!(g.stop, StopReason::Cancelled);
    assert!(g.tokens.is_empty());
    assert_eq!(warm.tokens(), &prompt.tokens[..k]);
    let again = generate(
        &m.weights,
        &m.tokenizer,
        &prompt,
        &mut warm,
        None,
        &params(4, 0.0, 0),
        &Cancel::default(),
    )
    .unwrap();
    assert_eq!(again.prefilled, 3);
    assert_eq!(again.tokens, first.tokens);

    // Cancelled from another thread while decoding: stops before max_tokens.
    let cancel = Cancel::default();
    let c2 = cancel.clone();
    let big = params(CONTEXT - prompt.tokens.len() - 1, 0.0, 0);
    let mut cache = m.weights.new_cache();
    let g = std::thread::scope(|s| {
        s.spawn(move || {
            while c2.decoded() == 0 && !c2.is_cancelled() {
                std::thread::yield_now();
            }
            c2.cancel();
        });
        let g = generate(
            &m.weights,
            &m.tokenizer,
            &prompt,
            &mut cache,
            None,
            &big,
            &cancel,
        )
        .unwrap();
        // Releases the canceller if the decode ended before its first token (the asserts fail then).
        cancel.cancel();
        g
    });
    assert_eq!(g.stop, StopReason::Cancelled, "{} tokens", g.tokens.len());
    assert!(g.tokens.len() < big.max_tokens);
    assert_eq!(g.text, m.tokenizer.decode(&g.tokens));
}

#[test]
fn second_generation_prefills_only_the_new_tokens() {
    let m = load(&mixed_path());
    let a = prompt_of(&m, CODE);
    let mut cache = m.weights.new_cache();
    let p = params(5, 0.0, 0);
    let g1 = generate(
        &m.weights,
        &m.tokenizer,
        &a,
        &mut cache,
        None,
        &p,
        &Cancel::default(),
    )
    .unwrap();
    assert_eq!(g1.prefilled, a.tokens.len());

    // The same prompt again: only the last token runs (its logits are needed), same output.
    let g2 = generate(
        &m.weights,
        &m.tokenizer,
        &a,
        &mut cache,
        None,
        &p,
        &Cancel::default(),
    )
    .unwrap();
    assert_eq!(g2.prefilled, 1);
    assert_eq!(g2.tokens, g1.tokens);

    // A prompt sharing the first k tokens then diverging.
    let k = a.tokens.len() - 6;
    let tail = m.tokenizer.encode("\ndef mul(x, y):\n    return x *");
    assert_ne!(tail[0], a.tokens[k]);
    let b = Prompt {
        tokens: a.tokens[..k].iter().chain(&tail).copied().collect(),
        ..Prompt::default()
    };
    let g3 = generate(
        &m.weights,
        &m.tokenizer,
        &b,
        &mut cache,
        None,
        &p,
        &Cancel::default(),
    )
    .unwrap();
    assert_eq!(g3.prompt_tokens, b.tokens.len());
    assert_eq!(g3.prefilled, tail.len());
    let mut fresh = m.weights.new_cache();
    let g3_fresh = generate(
        &m.weights,
        &m.tokenizer,
        &b,
        &mut fresh,
        None,
        &p,
        &Cancel::default(),
    )
    .unwrap();
    assert_eq!(g3_fresh.prefilled, b.tokens.len());
    assert_eq!(
        g3.tokens, g3_fresh.tokens,
        "reusing the cache must not change the output"
    );
}

// ---------------------------------------------------------------------------------------------------
// Token healing

fn check_healing(m: &Model, prompt: &Prompt, max_tokens: usize) -> usize {
    let mut healed_in_one = 0;
    for seed in 0..12u64 {
        let temperature = if seed == 0 { 0.0 } else { 1.5 };
        let mut cache = m.weights.new_cache();
        let g = generate(
            &m.weights,
            &m.tokenizer,
            prompt,
            &mut cache,
            None,
            &params(max_tokens, temperature, seed),
            &Cancel::default(),
        )
        .unwrap();
        let bytes = token_bytes(m, &g.tokens);
        let heal = &prompt.heal[..];
        if bytes.len() >= heal.len() {
            assert_eq!(
                &bytes[..heal.len()],
                heal,
                "seed {seed}: generated {:?}",
                String::from_utf8_lossy(&bytes)
            );
            // The text is exactly what follows the healed bytes.
            assert_eq!(g.text.as_bytes(), &bytes[heal.len()..], "seed {seed}");
        } else {
            assert!(
                heal.starts_with(&bytes),
                "seed {seed}: {bytes:?} is not a prefix of {heal:?}"
            );
            assert_eq!(g.text, "");
        }
        healed_in_one += (m.tokenizer.token_bytes(g.tokens[0]).len() >= heal.len()) as usize;
    }
    healed_in_one
}

#[test]
fn token_healing_regenerates_the_cut_bytes_and_leaves_them_out() {
    let m = load(&mixed_path()); // no newlines: text is never cut by the line rule
                                 // The natural case: the prefix's last token (` return`) cut off.
    let mut ids = m.tokenizer.encode("def add(a, b):\n    return");
    let last = ids.pop().unwrap();
    assert_eq!(m.tokenizer.token_bytes(last), b" return");
    let prompt = Prompt {
        tokens: ids.clone(),
        heal: m.tokenizer.token_bytes(last).to_vec(),
        ..Prompt::default()
    };
    check_healing(&m, &prompt, 6);

    // Healed bytes that no single token ends at: ` ret` needs `Ġ` then `r`/`re`/`retu`..., or `Ġreturn`.
    let prompt = Prompt {
        tokens: ids.clone(),
        heal: b" ret".to_vec(),
        ..Prompt::default()
    };
    let one_token = check_healing(&m, &prompt, 8);
    assert!(one_token < 12, "some seeds should heal over several tokens");

    // A budget that ends inside the healed bytes gives no text.
    let mut cache = m.weights.new_cache();
    let prompt = Prompt {
        tokens: ids,
        heal: b"   x".to_vec(),
        ..Prompt::default()
    };
    let g = generate(
        &m.weights,
        &m.tokenizer,
        &prompt,
        &mut cache,
        None,
        &params(1, 0.0, 0),
        &Cancel::default(),
    )
    .unwrap();
    assert_eq!(g.tokens.len(), 1);
    assert!(b"   x".starts_with(m.tokenizer.token_bytes(g.tokens[0])));
    assert_eq!(g.text, "");
}

#[test]
fn token_healing_with_line_stop_excludes_heal_and_newline() {
    let m = load(&chatty_path());
    let mut ids = m.tokenizer.encode("def add(a, b):\n    return");
    let last = ids.pop().unwrap();
    let heal = m.tokenizer.token_bytes(last).to_vec();
    let prompt = Prompt {
        tokens: ids,
        heal: heal.clone(),
        ..Prompt::default()
    };
    for seed in 0..6 {
        let mut cache = m.weights.new_cache();
        let g = generate(
            &m.weights,
            &m.tokenizer,
            &prompt,
            &mut cache,
            None,
            &params(200, 1.0, seed),
            &Cancel::default(),
        )
        .unwrap();
        let bytes = token_bytes(&m, &g.tokens);
        assert!(bytes.starts_with(&heal), "seed {seed}");
        assert_eq!(g.stop, StopReason::EndOfLine);
        let mut want = heal.clone();
        want.extend_from_slice(g.text.as_bytes());
        want.push(b'\n');
        assert_eq!(bytes, want, "seed {seed}");
    }
}

// ---------------------------------------------------------------------------------------------------
// The completion engine on the tiny model

#[test]
fn engine_swaps_the_patch_overlay_between_requests() {
    use star_ls::completion::{CompletionRequest, Engine, EngineConfig};
    let engine = Engine::start(
        EngineConfig {
            max_tokens: 8,
            ..EngineConfig::new(mixed_path())
        },
        |_| {},
    );
    let complete = || {
        engine
            .complete_blocking(CompletionRequest {
                document: "a.py".into(),
                prefix: "def add(a, b):\n    return ".into(),
                suffix: "\n".into(),
                stop: StopAt::Block,
                cancel: Cancel::default(),
                cross: Default::default(),
            })
            .unwrap()
            .generation
            .tokens
    };
    let before = complete();
    assert!(!before.is_empty());
    let model = engine.model().expect("loaded").expect("loads");
    let cfg = model.weights.config();
    let delta = random((cfg.hidden_size, cfg.intermediate_size), 5.0, 11);
    let patch = LayerPatch::new((0..cfg.intermediate_size as u32).collect(), delta).unwrap();
    engine.set_patches(PatchSet::default().with(cfg.num_layers - 1, patch).unwrap());
    assert_eq!(engine.patches().iter().count(), 1);
    assert_ne!(
        complete(),
        before,
        "the live overlay changes what the model proposes"
    );
    engine.set_patches(PatchSet::default());
    assert_eq!(complete(), before, "an empty overlay restores the model");
}

#[test]
fn a_packed_pass_equals_each_sequence_run_alone() {
    // Repair scores a batch's tails in one packed pass: each sequence must attend to its own keys only
    // and come out as it would alone, on the serving layers and on the dense copies alike.
    let m = load_exact(&f32_path());
    let t = tokens(&m);
    let residual = captured(&m, &t, [0]).residual.remove(&0).unwrap();
    let dense = m.weights.dense_layers(0..LAYERS, None).unwrap();
    for layers in [m.weights.layers(), dense.as_slice()] {
        // Sequence a: the whole text, its first 8 rows already in its keys; b: the first 12 rows, none.
        let prefilled = || {
            let mut kv = vec![None; LAYERS];
            let rows = residual.narrow(0, 0, 8).unwrap();
            m.weights
                .forward_after(0, layers, &rows, &mut kv, &mut Hooks::default())
                .unwrap();
            kv
        };
        let a = residual.narrow(0, 8, t.len() - 8).unwrap();
        let b = residual.narrow(0, 0, 12).unwrap();
        let mut kv_a = prefilled();
        let alone_a = m
            .weights
            .forward_after(0, layers, &a, &mut kv_a, &mut Hooks::default())
            .unwrap();
        let alone_b = m
            .weights
            .forward_from(0, layers, &b, &mut Hooks::default())
            .unwrap();
        let (mut kv_a2, mut kv_b2) = (prefilled(), vec![None; LAYERS]);
        let x = Tensor::cat(&[&a, &b], 0).unwrap();
        let packed = m
            .weights
            .forward_packed(
                0,
                layers,
                &x,
                &mut [(a.dim(0).unwrap(), &mut kv_a2), (12, &mut kv_b2)],
                &mut Hooks::default(),
            )
            .unwrap();
        let n = a.dim(0).unwrap();
        let da = tensor_diff(&packed.narrow(0, 0, n).unwrap(), &alone_a);
        let db = tensor_diff(&packed.narrow(0, n, 12).unwrap(), &alone_b);
        assert!(da < 1e-4 && db < 1e-4, "packed vs alone: {da} / {db}");
        // Each sequence's keys grew by its own rows only.
        for (kv, len) in [(&kv_a2, t.len()), (&kv_b2, 12)] {
            assert_eq!(star_ls::model::kv_positions(kv).unwrap(), len);
        }
        // Rows that do not add up to the input are refused.
        let err = m.weights.forward_packed(
            0,
            layers,
            &x,
            &mut [(3, &mut vec![None; LAYERS])],
            &mut Hooks::default(),
        );
        assert!(err.is_err());
    }
}

// ---------------------------------------------------------------------------------------------------
// The line's shape: no runaway whitespace, no blank line where the model gives a way on

/// Logits over the tokenizer's ids: `top` leads `second` by `lead`, every other token far below.
fn favouring(m: &Model, top: u32, second: u32, lead: f32) -> Vec<f32> {
    let mut l = vec![-40.0; m.tokenizer.vocab_size()];
    l[second as usize] = 0.0;
    l[top as usize] = lead;
    l
}

fn shape_at(line_start: &str, above_indent: usize) -> LineShape {
    LineShape::new(&Prompt {
        line_start: line_start.into(),
        above_indent,
        ..Prompt::default()
    })
}

#[test]
fn a_line_grows_no_whitespace_past_the_indentation_the_context_allows() {
    let m = load(&mixed_path());
    let tok = &m.tokenizer;
    let (space, x) = (b' ' as u32, b'x' as u32);
    let four = tok.encode("    ")[0];
    assert_eq!(
        tok.token_bytes(four),
        b"    ",
        "`    ` is one token of the tiny vocabulary"
    );
    let decide = |shape: &LineShape, top: u32, heal_rest: &[u8]| {
        let mut l = favouring(&m, top, x, 5.0);
        shape.mask(tok, &mut l, heal_rest);
        argmax(&l) as u32
    };
    // At column 0 of a blank line, whitespace may reach one level past the line above (4 + 4)...
    let mut shape = shape_at("", 4);
    shape.feed(b"    ");
    assert_eq!(decide(&shape, four, b""), four);
    shape.feed(b"   ");
    assert_eq!(decide(&shape, four, b""), x, "`    ` would pass column 8");
    assert_eq!(decide(&shape, space, b""), space);
    shape.feed(b" ");
    assert_eq!(decide(&shape, space, b""), x, "...and no further");
    // Where the developer left the cursor's line indented, that is its indentation: healing it
    // back may not widen it.
    let indented = shape_at("    ", 0);
    assert_eq!(decide(&indented, space, b""), x);
    let healing = LineShape::new(&Prompt {
        heal: b"    ".to_vec(),
        ..Prompt::default()
    });
    assert_eq!(
        decide(&healing, four, b"    "),
        four,
        "the healed bytes themselves"
    );
    let eight = tok.encode("        ");
    if let [eight] = eight[..] {
        assert_eq!(
            decide(&healing, eight, b"    "),
            x,
            "past them, more indentation"
        );
    }
    // After content, a run of 16 columns, a tab counting 4.
    let mut shape = indented.clone();
    shape.feed(b"x =");
    shape.feed(&[b' '; 11]);
    shape.feed(b"\t");
    assert_eq!(decide(&shape, space, b""), space);
    shape.feed(b" ");
    assert_eq!(decide(&shape, space, b""), x);
    // A line after the cursor's: one level past the line just ended (4 columns).
    shape.feed(b"\n");
    shape.feed(&[b' '; 7]);
    assert_eq!(decide(&shape, space, b""), space);
    shape.feed(b" ");
    assert_eq!(decide(&shape, space, b""), x);
}

#[test]
fn the_cursors_line_ends_blank_only_where_the_model_gives_no_way_on_a_fair_share() {
    let m = load(&mixed_path());
    let tok = &m.tokenizer;
    let (newline, x) = (b'\n' as u32, b'x' as u32);
    // With two live tokens the way on has probability 1 / (1 + e^lead): the floor's lead is this.
    let at_floor = (1.0 / BLANK_LINE_FLOOR - 1.0).ln();
    let decide = |shape: &LineShape, lead: f32, heal_rest: &[u8]| {
        let mut l = favouring(&m, newline, x, lead);
        shape.mask(tok, &mut l, heal_rest);
        argmax(&l) as u32
    };
    let blank = shape_at("    ", 4);
    assert_eq!(
        decide(&blank, at_floor - 0.5, b""),
        x,
        "a fair share: the line goes on"
    );
    assert_eq!(
        decide(&blank, at_floor + 0.5, b""),
        newline,
        "too little: it ends"
    );
    // A line with content ends where the model says.
    let mut begun = shape_at("    ", 4);
    begun.feed(b"y");
    assert_eq!(decide(&begun, at_floor - 0.5, b""), newline);
    // Lines after the cursor's (a block) end where the model says.
    let mut block = shape_at("    ", 4);
    block.feed(b"y = 1\n    ");
    assert_eq!(decide(&block, at_floor - 0.5, b""), newline);
    // The cursor's line after healed bytes that end the line above (`x = 1\n|`): judged from there.
    let mut healed = LineShape::new(&Prompt {
        line_start: "x = 1".into(),
        heal: b"\n".to_vec(),
        ..Prompt::default()
    });
    healed.feed(b"\n");
    assert_eq!(decide(&healed, at_floor - 0.5, b""), x);
}

#[test]
fn teacher_forced_decisions_are_the_ones_generation_makes() {
    // A newline the random model often prefers, so that lines end blank unless the rule steps in.
    let path = cached(
        "newline-f32-seed6",
        TinySpec {
            seed: 6,
            newline_logit: 4.0,
            quant: Quant::F32,
            ..TinySpec::default()
        },
    );
    // F32, exactly loaded: a prompt's pass and token-by-token decoding then differ by float rounding
    // only, as they do by kernel rounding on the served model.
    let m = load_exact(&path);
    let tok = &m.tokenizer;
    let mut stepped_in = 0;
    // Prompts as the server builds them: at an indentation or a line start (not healed), inside a
    // word (` ret` healed) or after the first byte of a character (healed).
    for (i, text) in [
        "def add(a, b):\n    ",
        "x = 1\n",
        "def f(x):\n    y = x\n    ",
        "if a:\n",
        "def add(a, b):\n    ret",
        "y = '中",
    ]
    .iter()
    .enumerate()
    {
        let prompt = fim_prompt(tok, text, "\n", ContextLimits::default());
        let g = generate(
            &m.weights,
            tok,
            &prompt,
            &mut m.weights.new_cache(),
            None,
            &params(12, 0.0, i as u64),
            &Cancel::default(),
        )
        .unwrap();
        // The generated tokens forced in: each row's masked argmax is the token generation chose.
        let mut forced = prompt.tokens.clone();
        forced.extend(&g.tokens);
        let hidden = m
            .weights
            .forward(&forced, &mut m.weights.new_cache(), &mut Hooks::default())
            .unwrap();
        let n = g.tokens.len();
        let rows = hidden.narrow(0, prompt.tokens.len() - 1, n).unwrap();
        let raw: Vec<Vec<f32>> = m.weights.logits(&rows).unwrap().to_vec2().unwrap();
        let mut rows = raw.clone();
        mask_rows(tok, &mut rows, &g.tokens, &prompt);
        let decided: Vec<u32> = rows.iter().map(|r| argmax(r) as u32).collect();
        assert_eq!(decided, g.tokens, "{text:?}");
        stepped_in += (argmax(&raw[0]) as u32 != g.tokens[0]) as usize;
    }
    assert!(
        stepped_in > 0,
        "the blank-line rule never changed a decision: the test shows nothing"
    );
}
