//! The runtime against the real default model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M): the tokenizer against
//! llama.cpp's ids, logits against candle-transformers' reference qwen2, and one real completion.
//!
//! The model is `STAR_LS_MODEL`, else `$STAR_LS_CACHE_DIR/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf`
//! (default cache `~/.cache/star-ls`). A missing model fails these tests: run `scripts/fetch-model`.

use candle_core::{Device, Tensor};
use star_ls::completion::{fim_prompt, prompt_with, Chunk, ContextLimits, CrossFile, Layout};
use star_ls::model::generate::StopReason;
use star_ls::model::{
    generate, Cancel, Capture, GenerateParams, Hooks, LoadOptions, Model, StopAt,
};
use std::path::PathBuf;
use std::sync::OnceLock;

fn model_path() -> PathBuf {
    let path = star_ls::env::model_path();
    assert!(
        path.is_file(),
        "the default model is missing at {}: run scripts/fetch-model (or point STAR_LS_MODEL at it)",
        path.display()
    );
    path
}

fn load(opts: LoadOptions) -> Model {
    let path = model_path();
    match Model::load(&path, opts) {
        Ok(m) => m,
        Err(e) => panic!("{e}"),
    }
}

/// The serving configuration (requantize to Q8_0), loaded once for every test in this file.
fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| load(LoadOptions::default()))
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/tokenizer")
        .join(name)
}

#[test]
fn tokenizer_matches_llama_cpp() {
    let tok = &model().tokenizer;
    let text = std::fs::read_to_string(fixture("mixed-unicode.txt")).unwrap();
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("mixed-unicode.llama-cpp.json")).unwrap(),
    )
    .unwrap();
    let want: Vec<u32> = json["ids"]
        .as_array()
        .expect("fixture has `ids`")
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert!(want.len() > 100);
    let got = tok.encode(&text);
    if got != want {
        let at = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        panic!(
            "encoding differs from llama.cpp at token {at} (ours {} tokens, llama.cpp {}):\n ours      {:?} = {:?}\n llama.cpp {:?} = {:?}",
            got.len(),
            want.len(),
            &got[at..(at + 8).min(got.len())],
            tok.decode(&got[at..(at + 8).min(got.len())]),
            &want[at..(at + 8).min(want.len())],
            tok.decode(&want[at..(at + 8).min(want.len())]),
        );
    }
    assert_eq!(
        tok.decode(&want),
        text,
        "llama.cpp's ids decode back to the text"
    );

    // Markers typed as text are text.
    let special = tok.fim.prefix;
    assert!(tok.token_bytes(special) == b"<|fim_prefix|>");
    for s in ["<|fim_prefix|>", "x = \"<|fim_prefix|>\"", "<|endoftext|>"] {
        let ids = tok.encode(s);
        assert!(
            !ids.contains(&special) && ids.iter().all(|&i| !tok.is_stop(i)),
            "{s:?} -> {ids:?}"
        );
        assert!(ids.len() > 1);
        assert_eq!(tok.decode(&ids), s);
    }
    assert!(tok.is_stop(151643), "<|endoftext|> ends a completion");
}

const PROMPT: &str = "import numpy as np\n\ndef moving_average(values, window):\n    \"\"\"Mean of each run of `window` values.\"\"\"\n    kernel = np.ones(window) /";

fn top(logits: &[f32], k: usize) -> Vec<usize> {
    let mut ids: Vec<usize> = (0..logits.len()).collect();
    ids.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    ids.truncate(k);
    ids
}

#[test]
fn logits_match_candle_transformers_qwen2() {
    use candle_transformers::models::quantized_qwen2::ModelWeights;
    let path = model_path();
    // The file's own quantized weights, as the reference runs them: no requantizing, no padding.
    let ours = load(LoadOptions {
        requantize_q8: false,
        pad_for_repack: false,
    });
    let tokens = ours.tokenizer.encode(PROMPT);
    assert!((30..=60).contains(&tokens.len()), "{} tokens", tokens.len());

    let mut cache = ours.weights.new_cache();
    let got = ours
        .weights
        .next_logits(&tokens, &mut cache, &mut Hooks::default())
        .unwrap();
    drop(ours);

    let want: Vec<f32> = {
        let mut file = std::fs::File::open(&path).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
        let mut reference = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
        let input = Tensor::new(tokens.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        reference
            .forward(&input, 0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |a, x| a.max(x.abs()));
    let diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let mean = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .sum::<f32>()
        / got.len() as f32;
    // Same weights, the same arithmetic up to float rounding (our softmax and SwiGLU are fused, on our
    // own exp). Each product quantizes its input to 8 bits per block, so a rounding difference can move
    // an input a quantization step: measured max 0.018 and mean 0.003 of the logit scale. A wrong
    // mask, rope, bias or head moves them by whole units.
    assert!(
        diff < 5e-2 * scale && mean < 1e-2 * scale,
        "max |logit diff| {diff}, mean {mean}, at logit scale {scale}"
    );
    assert_eq!(
        top(&got, 5),
        top(&want, 5),
        "same top-5 next tokens, in order"
    );

    // Serving weights (Q5_0 matrices requantized to Q8_0, padded for the repacked kernels where the CPU
    // has them): the same prediction.
    let mut cache = model().weights.new_cache();
    let served = model()
        .weights
        .next_logits(&tokens, &mut cache, &mut Hooks::default())
        .unwrap();
    assert_eq!(
        top(&served, 1),
        top(&want, 1),
        "requantize_q8 changed the next token"
    );
    let t5 = top(&want, 5);
    let common = top(&served, 5).iter().filter(|i| t5.contains(i)).count();
    assert!(
        common >= 4,
        "top-5 overlap {common}: {:?} vs {:?}",
        top(&served, 5),
        t5
    );
}

#[test]
fn completes_return_a_plus_b() {
    let m = model();
    let prompt = fim_prompt(
        &m.tokenizer,
        "def add(a, b):\n    return ",
        "",
        ContextLimits::default(),
    );
    let mut cache = m.weights.new_cache();
    let params = GenerateParams {
        max_tokens: 16,
        stop: StopAt::Line,
        temperature: 0.0,
        ..GenerateParams::default()
    };
    let g = generate(
        &m.weights,
        &m.tokenizer,
        &prompt,
        &mut cache,
        None,
        &params,
        &Cancel::default(),
    )
    .unwrap();
    assert_eq!(g.text, "a + b", "{g:?}");
    assert!(
        matches!(g.stop, StopReason::EndOfLine | StopReason::StopToken),
        "{g:?}"
    );
    assert_eq!(g.prefilled, prompt.tokens.len());
}

/// Repair decides that a gated patch leaves a case's prompt rows alone from the residual its check
/// recorded between attention and MLP, recomputing `z` on the patch's neurons only
/// (`DecoderLayer::neurons_on`, f32 weights, the input rounded as the serving kernels round it). On
/// real code, in every patchable layer, the recomputed rows point where the serving pass's do, to
/// float rounding: a cosine with any unit key differs by at most the gap measured here, far under
/// the margin repair keeps below a gate's threshold (0.05; 0.034 was the gap without the rounding).
#[test]
fn neurons_recomputed_from_mid_point_where_the_serving_ones_do() {
    let m = model();
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/bench/access_log.py"),
    )
    .unwrap();
    let mut tokens = m.tokenizer.encode(&text);
    tokens.truncate(320);
    let n_layers = m.weights.layers().len();
    let first = n_layers - n_layers / 4;
    let mut cap = Capture::layers(first..n_layers).with_mid();
    m.weights
        .forward(
            &tokens,
            &mut m.weights.new_cache(),
            &mut Hooks {
                capture: Some(&mut cap),
                ..Hooks::default()
            },
        )
        .unwrap();
    let dense = m.weights.dense_layers(first..n_layers, None).unwrap();
    let unit = |x: &Tensor| {
        let norm = (x.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap() + 1e-12).unwrap();
        x.broadcast_div(&norm).unwrap()
    };
    let mut worst: f32 = 0.0;
    for (layer, d) in (first..n_layers).zip(&dense) {
        let z = &cap.neurons[&layer];
        // A repair's share of neurons (5%): those firing most here, as attribution tends to pick.
        let fires: Vec<f32> = z.abs().unwrap().sum(0).unwrap().to_vec1().unwrap();
        let mut order: Vec<u32> = (0..fires.len() as u32).collect();
        order.sort_by(|a, b| fires[*b as usize].total_cmp(&fires[*a as usize]));
        order.truncate(fires.len() / 20);
        let columns = Tensor::new(order.as_slice(), &Device::Cpu).unwrap();
        // Row 0 (the attention sink) aside: its activations are outliers no gate is solved at.
        let rows = tokens.len() - 1;
        let mid = cap.mid[&layer].narrow(0, 1, rows).unwrap();
        let ours = d.neurons_on(&mid, Some(&columns)).unwrap();
        let served = z
            .narrow(0, 1, rows)
            .unwrap()
            .index_select(&columns, 1)
            .unwrap();
        let gap: Vec<f32> = (unit(&ours) - unit(&served))
            .unwrap()
            .sqr()
            .unwrap()
            .sum(1)
            .unwrap()
            .sqrt()
            .unwrap()
            .to_vec1()
            .unwrap();
        let most = gap.into_iter().fold(0.0, f32::max);
        eprintln!("layer {layer}: largest change of direction {most:.2e}");
        worst = worst.max(most);
    }
    assert!(worst < 1e-3, "the recomputed rows moved by {worst}");
}

/// Another file's chunk, in the repo-level format, brings a name the current file never shows.
#[test]
fn another_files_chunk_reaches_the_prompt_within_its_budget() {
    let m = model();
    let tok = &m.tokenizer;
    let chunk = |path: &str, text: &str| Chunk {
        path: path.into(),
        text: text.into(),
    };
    let helper = chunk(
        "shop/pricing.py",
        "def apply_seasonal_discount(order, rate):\n    return _DISCOUNTS.lookup(order.season).apply(order, rate)\n",
    );
    let other = chunk("shop/models.py", "class Order:\n    total: float\n");
    let (prefix, suffix) = ("from .pricing import ", "\n\ndef checkout(order, rate):\n");
    let limits = ContextLimits::default();
    let cross = |chunks: Vec<Chunk>, budget, layout| CrossFile {
        repo: "shop".into(),
        path: "shop/cart.py".into(),
        chunks,
        budget,
        layout,
    };
    let bare = fim_prompt(tok, prefix, suffix, limits);
    let none = prompt_with(
        tok,
        &cross(vec![helper.clone()], 0, Layout::Repo),
        prefix,
        suffix,
        limits,
    );
    assert_eq!(none.tokens, bare.tokens, "a budget of 0 adds nothing");

    let both = prompt_with(
        tok,
        &cross(vec![helper.clone(), other.clone()], 4096, Layout::Repo),
        prefix,
        suffix,
        limits,
    );
    let text = tok.decode(&both.tokens);
    let (head, tail) = text.split_once("<|fim_prefix|>").unwrap();
    assert!(head.starts_with("<|repo_name|>shop\n"), "{head}");
    // The most similar last, nearest the cursor; then the current file's path.
    let (models, pricing) = (
        head.find("shop/models.py").unwrap(),
        head.find("shop/pricing.py").unwrap(),
    );
    assert!(models < pricing, "{head}");
    assert!(head.ends_with("<|file_sep|>shop/cart.py\n"), "{head}");
    assert_eq!(tail, tok.decode(&bare.tokens[1..]));

    // A budget that holds the first chunk only takes it alone.
    let first = tok
        .encode(&format!("{}\n{}", helper.path, helper.text))
        .len()
        + 1;
    let one = prompt_with(
        tok,
        &cross(vec![helper.clone(), other], first, Layout::Repo),
        prefix,
        suffix,
        limits,
    );
    let one_text = tok.decode(&one.tokens);
    assert!(one_text.contains("apply_seasonal_discount") && !one_text.contains("class Order"));

    let concat = prompt_with(
        tok,
        &cross(vec![helper], 4096, Layout::Concat),
        prefix,
        suffix,
        limits,
    );
    let concat_text = tok.decode(&concat.tokens);
    assert!(
        concat_text.starts_with("<|fim_prefix|>def apply_seasonal_discount"),
        "{concat_text}"
    );

    let params = GenerateParams {
        max_tokens: 16,
        stop: StopAt::Line,
        ..GenerateParams::default()
    };
    let line = |p| {
        let mut cache = m.weights.new_cache();
        generate(
            &m.weights,
            tok,
            p,
            &mut cache,
            None,
            &params,
            &Cancel::default(),
        )
        .unwrap()
        .text
    };
    let (with, without) = (line(&both), line(&bare));
    assert!(with.contains("apply_seasonal_discount"), "{with}");
    assert!(!without.contains("apply_seasonal_discount"), "{without}");
}
