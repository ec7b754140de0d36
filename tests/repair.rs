//! The STAR engine on a tiny random-weight model: a planted failure is found, repaired, and the greedy
//! completion then says what the developer wrote; a guard case keeps its completion; the analytical
//! patch and the guard projection do what their algebra promises.

#[path = "support/tiny_model.rs"]
mod tiny_model;

use candle_core::{Device, Tensor};
use star_ls::completion::fim_prompt;
use star_ls::model::generate::StopReason;
use star_ls::model::{generate, Cancel, GenerateParams, LoadOptions, Model, PatchSet, StopAt};
use star_ls::repair::{
    complete_case, project_off, solve_patch, teacher_forced, text_after_cursor, whitening, Case,
    Head, Method, RepairSettings, Residuals, Star,
};
use tiny_model::*;

fn model() -> Model {
    let path = cached(
        "repair-f32-nl9.5",
        TinySpec {
            seed: 5,
            quant: Quant::F32,
            newline_logit: 9.5,
            ..TinySpec::default()
        },
    );
    // Unpadded: the serving model then runs the very weights its dense copies hold.
    let opts = LoadOptions {
        pad_for_repack: false,
        ..LoadOptions::default()
    };
    Model::load(&path, opts).unwrap()
}

fn settings() -> RepairSettings {
    RepairSettings {
        candidate_fraction: 1.0,
        layers: 2,
        neuron_fraction: 0.5,
        max_steps: 40,
        ..RepairSettings::default()
    }
}

fn case(id: &str, prefix: &str, target: &str) -> Case {
    Case {
        id: id.into(),
        language: "python".into(),
        prefix: prefix.into(),
        suffix: "print(f(2))\n".into(),
        target: target.into(),
        group: String::new(),
    }
}

/// The largest absolute difference between two tensors of one shape.
fn max_gap(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The greedy line the serving model completes a case with, under `patches`.
fn greedy(m: &Model, c: &Case, patches: &PatchSet) -> String {
    let patches = (!patches.is_empty()).then_some(patches);
    complete_case(&m.weights, &m.tokenizer, c, settings().context, patches)
        .unwrap()
        .text
}

/// A free-running greedy line (up to 64 tokens), and why it stopped.
fn greedy_run(m: &Model, c: &Case, patches: &PatchSet) -> star_ls::model::Generation {
    let prompt = fim_prompt(
        &m.tokenizer,
        &c.prefix,
        &text_after_cursor(c),
        settings().context,
    );
    let params = GenerateParams {
        max_tokens: 64,
        stop: StopAt::Line,
        ..GenerateParams::default()
    };
    generate(
        &m.weights,
        &m.tokenizer,
        &prompt,
        &mut m.weights.new_cache(),
        (!patches.is_empty()).then_some(patches),
        &params,
        &Cancel::default(),
    )
    .unwrap()
}

/// Standard normal samples, seeded: a test's random draws are the same in every run.
fn gaussian(shape: (usize, usize), seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| {
            // Box–Muller.
            let (u, v): (f32, f32) = (rng.random_range(f32::EPSILON..1.0), rng.random());
            (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn head_of(m: &Model) -> Head {
    Head::of(&m.weights, None).unwrap()
}

/// A failure to repair and a case the model already completes as written, to guard.
fn failure_and_guard(m: &Model) -> (Case, Case) {
    (
        case("f1", "def f(x):\n    return ", "x + 1"),
        self_completed(m),
    )
}

fn patch_set(patches: &[(usize, star_ls::model::LayerPatch)]) -> PatchSet {
    patches.iter().fold(PatchSet::default(), |set, (l, p)| {
        set.with(*l, p.clone()).unwrap()
    })
}

/// A case whose target is a line the model completes by itself (ended by its own newline), in the very
/// tokens teacher forcing feeds: repair judges a case by them, and the tiny model's tokenizer splits some
/// lines otherwise than the model generates them.
fn self_completed(m: &Model) -> Case {
    [
        "def g(y):\n    y = ",
        "def g(y):\n    ",
        "z = ",
        "def h(",
        "import ",
    ]
    .iter()
    .find_map(|prefix| {
        let mut c = case("g1", prefix, "");
        let g = greedy_run(m, &c, &PatchSet::default());
        c.target = g.text;
        let fed = teacher_forced(&m.tokenizer, &c, settings().context).target;
        (g.stop == StopReason::EndOfLine && !c.target.trim().is_empty() && fed == g.tokens)
            .then_some(c)
    })
    .expect("a prefix the tiny model completes with a line of its own")
}

#[test]
fn a_planted_failure_is_found_and_repaired() {
    let m = model();
    let head = head_of(&m);
    let failure = case("f1", "def f(x):\n    return ", "x + 1");
    assert_ne!(
        greedy(&m, &failure, &PatchSet::default()),
        "x + 1",
        "the random model knows it"
    );
    let star = Star::new(&m.weights, &m.tokenizer, &head, settings());
    let out = star.repair(std::slice::from_ref(&failure), &[]).unwrap();
    assert_eq!(
        (out.failures, out.fixed, &out.refused),
        (1, 1, &None),
        "{out:?}"
    );
    assert_eq!(out.layers, [0, 1]);
    assert!(out.steps <= settings().max_steps);
    assert_eq!(greedy(&m, &failure, &patch_set(&out.patches)), "x + 1");
    let out_patches = out.patches;

    // Iterative mode (METHOD.md: token by token, left to right), the paper's literal recipe (layers
    // by occlusion, one analytical solve), STAR's column patches ungated, gated on the layer and
    // gated on their columns, and gated values at any threshold reach the same line.
    use star_ls::repair::{Keys, PatchKind};
    let columns = RepairSettings {
        patch: PatchKind::Columns,
        ..settings()
    };
    let variants = [
        RepairSettings {
            mode: star_ls::repair::Mode::Iterative,
            ..settings()
        },
        RepairSettings {
            locate: star_ls::repair::Locate::Occlusion,
            solves: 1,
            ..settings()
        },
        RepairSettings {
            gate: 0.0,
            ..columns
        },
        columns,
        RepairSettings {
            keys: Keys::Columns,
            ..columns
        },
        RepairSettings {
            gate: 0.99,
            ..settings()
        },
    ];
    for variant in variants {
        let out = Star::new(&m.weights, &m.tokenizer, &head, variant)
            .repair(std::slice::from_ref(&failure), &[])
            .unwrap();
        assert_eq!((out.failures, out.fixed), (1, 1), "{variant:?}: {out:?}");
        assert_eq!(greedy(&m, &failure, &patch_set(&out.patches)), "x + 1");
        let gated = out.patches.iter().all(|(_, p)| p.gate().is_some());
        assert_eq!(gated, variant.gate > 0.0, "{variant:?}");
    }

    // Values need a gate keyed on the layer: said, not guessed.
    let ungated_values = RepairSettings {
        gate: 0.0,
        ..settings()
    };
    let err = Star::new(&m.weights, &m.tokenizer, &head, ungated_values)
        .repair(std::slice::from_ref(&failure), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("keyed on the layer"), "{err}");

    // A case that already passes needs nothing.
    let out = star.repair(&[self_completed(&m)], &[]).unwrap();
    assert_eq!((out.failures, out.patches.len()), (0, 0));

    // A repair starts from the model as it serves: under the first patch the failure is fixed already,
    // and a new failure is repaired on top of it (the overlay then serves both patches summed).
    let live = star.served(&out_patches).unwrap();
    let on_live = Star {
        live: Some(&live),
        ..Star::new(&m.weights, &m.tokenizer, &head, settings())
    };
    let again = on_live.repair(std::slice::from_ref(&failure), &[]).unwrap();
    assert_eq!((again.failures, again.patches.len()), (0, 0), "{again:?}");
    let second = case("f2", "def g(y):\n    return ", "y + 1");
    let out = on_live.repair(std::slice::from_ref(&second), &[]).unwrap();
    assert_eq!((out.failures, out.fixed), (1, 1), "{out:?}");
    let both = on_live.served(&out.patches).unwrap();
    assert_eq!(greedy(&m, &second, &both), "y + 1");
}

#[test]
fn a_patch_never_leaves_a_guard_worse() {
    let m = model();
    let head = head_of(&m);
    let (failure, guard) = failure_and_guard(&m);
    for guard_projection in [true, false] {
        let star = Star::new(
            &m.weights,
            &m.tokenizer,
            &head,
            RepairSettings {
                guard_projection,
                ..settings()
            },
        );
        let out = star
            .repair(std::slice::from_ref(&failure), std::slice::from_ref(&guard))
            .unwrap();
        assert_eq!(out.guard_before, 1.0, "{out:?}");
        if out.patches.is_empty() {
            assert!(out.refused.is_some(), "{out:?}");
        } else {
            assert_eq!(out.guard_after, 1.0, "{out:?}");
            assert_eq!(greedy(&m, &guard, &patch_set(&out.patches)), guard.target);
        }
    }
}

#[test]
fn the_analytical_patch_hits_every_steer_and_spares_the_guard_span() {
    let z = gaussian((3, 10), 1);
    let s = gaussian((3, 6), 2);
    let p = solve_patch(&z, &s).unwrap(); // (6, 10)
    let hit = z.matmul(&p.t().unwrap()).unwrap(); // P zᵢ for every i, as rows
    let err: f32 = (hit - &s)
        .unwrap()
        .abs()
        .unwrap()
        .max_keepdim(0)
        .unwrap()
        .max(1)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(err < 1e-3, "P z = s off by {err}");

    let g = gaussian((2, 10), 3);
    let q = project_off(&p, &g).unwrap();
    let on_guard: f32 = q
        .matmul(&g.t().unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(
        on_guard < 1e-3,
        "the projected patch still moves guard rows by {on_guard}"
    );
}

/// `preserve`: the patch solved in whitened coordinates still hits every steer, and adds less at the
/// typical rows than the least-norm patch does.
#[test]
fn the_preserving_patch_hits_every_steer_and_moves_typical_rows_less() {
    let dev = Device::Cpu;
    // Typical rows that mostly use the first neurons; the failures use every neuron.
    let scale = Tensor::new(&[3f32, 3., 3., 3., 3., 0.1, 0.1, 0.1, 0.1, 0.1], &dev).unwrap();
    let typical = gaussian((40, 10), 4).broadcast_mul(&scale).unwrap();
    let z = gaussian((3, 10), 5);
    let s = gaussian((3, 6), 6);
    let w = whitening(&typical, 0.9).unwrap();
    let p = solve_patch(&z.matmul(&w.t().unwrap()).unwrap(), &s)
        .unwrap()
        .matmul(&w)
        .unwrap();
    let err = max_gap(&z.matmul(&p.t().unwrap()).unwrap(), &s);
    assert!(err < 1e-3, "P z = s off by {err}");
    let energy = |p: &Tensor| -> f32 {
        typical
            .matmul(&p.t().unwrap())
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let plain = solve_patch(&z, &s).unwrap();
    assert!(
        energy(&p) < 0.5 * energy(&plain),
        "typical rows moved by {} against {} for the least-norm patch",
        energy(&p),
        energy(&plain)
    );
}

#[test]
fn the_baselines_run_on_the_same_batch_and_verdict() {
    let m = model();
    let head = head_of(&m);
    let failure = case("f1", "def f(x):\n    return ", "x + 1");
    let star = Star::new(
        &m.weights,
        &m.tokenizer,
        &head,
        RepairSettings {
            sgd_learning_rate: 0.5,
            ..settings()
        },
    );
    for method in [Method::Sgd, Method::Mint] {
        let out = star
            .repair_by(method, std::slice::from_ref(&failure), &[])
            .unwrap();
        eprintln!("{method:?}: {out:?}");
        assert_eq!(out.failures, 1, "{method:?}");
        assert_eq!(out.layers, [0, 1], "{method:?}: the same layers as STAR");
        assert!(out.steps >= 1, "{method:?}");
        // A kept patch fixed something, and the greedy line proves it.
        if !out.patches.is_empty() {
            assert_eq!(out.fixed, 1, "{method:?}");
            assert_eq!(greedy(&m, &failure, &patch_set(&out.patches)), "x + 1");
        } else {
            assert!(out.refused.is_some());
        }
    }
    let sgd = star
        .repair_by(Method::Sgd, std::slice::from_ref(&failure), &[])
        .unwrap();
    assert_eq!(
        sgd.neurons_per_layer, FFN,
        "SGD trains every neuron of the layers"
    );
    assert_eq!(
        sgd.steps,
        settings().max_steps,
        "SGD runs all its epochs, fixed or not"
    );
}

/// The verdict's teacher-forced checks under a patch re-run only the serving layers from the patched one
/// up, over the residual captured below it (`Qwen2::forward_from`), and repair's passes only the last
/// rows after the first rows' keys and values (`Qwen2::forward_after`): every row must be the full run's.
#[test]
fn the_top_layers_over_a_captured_residual_equal_a_full_run_under_a_patch() {
    let m = model();
    let hidden = m.weights.config().hidden_size;
    let delta = Tensor::randn(0f32, 0.5, (hidden, 3), &Device::Cpu).unwrap();
    let patch = star_ls::model::LayerPatch::new(vec![1, 5, 9], delta).unwrap();
    let set = PatchSet::default().with(1, patch).unwrap();
    let c = case("r1", "def f(x):\n    y = x * 2\n    return ", "y");
    let tokens = teacher_forced(&m.tokenizer, &c, settings().context).tokens;
    let logits = |hooks: &mut star_ls::model::Hooks| {
        let h = m
            .weights
            .forward(&tokens, &mut m.weights.new_cache(), hooks)
            .unwrap();
        m.weights.logits(&h).unwrap()
    };
    let full = logits(&mut star_ls::model::Hooks::with_patches(&set));
    let unpatched = logits(&mut star_ls::model::Hooks::default());

    let residual = m
        .weights
        .residual_entering(1, &tokens, &mut m.weights.new_cache(), None)
        .unwrap();
    let top = m
        .weights
        .forward_from(
            1,
            &m.weights.layers()[1..],
            &residual,
            &mut star_ls::model::Hooks::with_patches(&set),
        )
        .unwrap();
    let top = m.weights.logits(&top).unwrap();
    // The same in two parts: the last rows after the first rows' keys and values, as repair runs a
    // case's target rows over its prompt.
    let split = tokens.len() - 3;
    let layers = &m.weights.layers()[1..];
    let mut kv = vec![None; layers.len()];
    let mut run = |x: &Tensor| {
        m.weights
            .forward_after(
                1,
                layers,
                x,
                &mut kv,
                &mut star_ls::model::Hooks::with_patches(&set),
            )
            .unwrap()
    };
    run(&residual.narrow(0, 0, split).unwrap());
    let last = run(&residual.narrow(0, split, 3).unwrap());
    let last = m.weights.logits(&last).unwrap();
    assert_eq!(top.dims(), full.dims());
    assert!(max_gap(&top, &full) < 1e-3, "gap {}", max_gap(&top, &full));
    let full_last = full.narrow(0, split, 3).unwrap();
    assert!(
        max_gap(&last, &full_last) < 1e-3,
        "gap {}",
        max_gap(&last, &full_last)
    );
    assert!(
        max_gap(&unpatched, &full) > 1e-2,
        "the patch changes the logits"
    );
}

/// The residual entering the frozen layers' top is a function of the case alone while nothing below
/// is patched: kept once per case (least recently used out first), and never taken from or put in
/// the cache under a patch below it.
#[test]
fn the_frozen_layers_run_once_per_case_and_never_under_a_patch_below() {
    let m = model();
    let w = &m.weights;
    let tokens = |target: &str| {
        let c = case("r", "def f(x):\n    y = x * 2\n    return ", target);
        teacher_forced(&m.tokenizer, &c, settings().context).tokens
    };
    let (a, b, c) = (tokens("y"), tokens("x"), tokens("x + y"));
    let cache = Residuals::new(2);
    let fresh = w
        .residual_entering(1, &a, &mut w.new_cache(), None)
        .unwrap();
    let first = cache.entering(w, 1, &a, None).unwrap();
    let same = |x: &Tensor, y: &Tensor| max_gap(x, y) < 1e-6;
    assert!(same(&first, &fresh));
    assert_eq!(
        cache.entering(w, 1, &a, None).unwrap().id(),
        first.id(),
        "kept"
    );

    let hidden = w.config().hidden_size;
    let patch = |layer| {
        let delta = Tensor::randn(0f32, 0.5, (hidden, 3), &Device::Cpu).unwrap();
        let p = star_ls::model::LayerPatch::new(vec![1, 5, 9], delta).unwrap();
        PatchSet::default().with(layer, p).unwrap()
    };
    let above = cache.entering(w, 1, &a, Some(&patch(1))).unwrap();
    assert_eq!(
        above.id(),
        first.id(),
        "a patch from the layer up leaves it"
    );
    let below = cache.entering(w, 1, &a, Some(&patch(0))).unwrap();
    assert!(!same(&below, &first), "a patch below the layer changes it");
    assert_eq!(cache.entering(w, 1, &a, None).unwrap().id(), first.id());

    cache.entering(w, 1, &b, None).unwrap();
    cache.entering(w, 1, &a, None).unwrap(); // a is now the most recent
    cache.entering(w, 1, &c, None).unwrap(); // b goes
    assert_eq!(cache.len(), 2);
    assert_eq!(cache.entering(w, 1, &a, None).unwrap().id(), first.id());

    // A cache filled only below a layer cannot feed a whole forward pass.
    let mut lower = w.new_cache();
    w.residual_entering(1, &a, &mut lower, None).unwrap();
    assert!(w
        .forward(&[1], &mut lower, &mut star_ls::model::Hooks::default())
        .is_err());
    // Made whole from the residual under a patch above, it goes on as a whole pass under that patch.
    let above = patch(1);
    let hooks = || star_ls::model::Hooks::with_patches(&above);
    assert!(
        w.finish_cache(
            1,
            &first.narrow(0, 1, a.len() - 1).unwrap(),
            &mut lower.clone(),
            None
        )
        .is_err(),
        "a residual for other positions"
    );
    // One whose upper layers already hold keys (a whole pass, then a lower-only one) is refused too.
    let mut mixed = w.new_cache();
    w.forward(&a[..2], &mut mixed, &mut hooks()).unwrap();
    w.residual_entering(1, &a[2..], &mut mixed, None).unwrap();
    assert!(w.finish_cache(1, &first, &mut mixed, None).is_err());
    w.finish_cache(1, &first, &mut lower, Some(&above)).unwrap();
    let mut whole = w.new_cache();
    w.forward(&a, &mut whole, &mut hooks()).unwrap();
    let next = |cache: &mut star_ls::model::KvCache| {
        let h = w.forward(&[1], cache, &mut hooks()).unwrap();
        w.logits(&h).unwrap()
    };
    let gap = max_gap(&next(&mut lower), &next(&mut whole));
    assert!(gap < 1e-3, "gap {gap}");
}

/// The factored head is cached on disk: a second build reads it and steers the same; a corrupt file is
/// recomputed, not trusted.
#[test]
fn the_head_factor_is_cached_and_checked() {
    let m = model();
    let file = tmp_path("head-cache").join("model-sha.chol");
    let _ = std::fs::remove_file(&file);
    let logits = vec![0.0f32; m.tokenizer.vocab_size()];
    let steer = |h: &Head| h.steer(3, 7, &logits, 1.5, 1.0).unwrap();
    let cached = || star_ls::learn::head(&m.weights, &file).unwrap();
    let fresh = steer(&head_of(&m));
    assert_eq!(steer(&cached()), fresh);
    let written = std::fs::read(&file).expect("the factor was written");
    assert_eq!(steer(&cached()), fresh);
    let mut corrupt = written.clone();
    corrupt[100] ^= 0xff;
    std::fs::write(&file, &corrupt).unwrap();
    assert_eq!(steer(&cached()), fresh);
    assert_eq!(std::fs::read(&file).unwrap(), written, "rewritten whole");
}

/// A case's check is kept while the live overlay stays (a failure's from while it waited, a guard's
/// from the last repair: the next repair's guards are mostly this one's), and a repair from the kept
/// checks decides as one that checks afresh; under another overlay, it decides so too, each case
/// checked anew from its kept check (a pass over its tail alone where the overlays' gates part only
/// there) or whole.
#[test]
fn checks_are_kept_while_the_overlay_stays() {
    let m = model();
    let head = head_of(&m);
    let (failure, guard) = failure_and_guard(&m);
    let kept = Residuals::default();
    let fresh = Star::new(&m.weights, &m.tokenizer, &head, settings());
    let cached = Star {
        residuals: Some(&kept),
        ..Star::new(&m.weights, &m.tokenizer, &head, settings())
    };
    cached.warm(&[failure.clone(), guard.clone()]).unwrap();
    assert_eq!(kept.checks_kept(), 2);
    let repair = |star: &Star, failure: &Case| {
        // The long case's repair breaks the guard: without it, its patch is kept and compared.
        let guards = match failure.id.as_str() {
            "f2" => &[][..],
            _ => std::slice::from_ref(&guard),
        };
        star.repair(std::slice::from_ref(failure), guards).unwrap()
    };
    let same = |a: &star_ls::repair::RepairOutcome, b: &star_ls::repair::RepairOutcome| {
        assert_eq!(
            (a.fixed, a.guard_before, a.guard_after, a.patches.len()),
            (b.fixed, b.guard_before, b.guard_after, b.patches.len())
        );
        for ((la, pa), (lb, pb)) in a.patches.iter().zip(&b.patches) {
            assert_eq!(la, lb);
            assert!(max_gap(pa.delta(), pb.delta()) < 1e-5);
        }
    };
    let (a, b) = (repair(&fresh, &failure), repair(&cached, &failure));
    assert_eq!(kept.checks_kept(), 2, "the same checks, not others");
    same(&a, &b);
    // Another overlay: a value keyed at one row, shut at every row before it (the failure's first
    // target row; a row late in a long prompt), or a column patch acting everywhere. The checks
    // kept are the last overlay's.
    let long = case(
        "f2",
        &format!("{}def f(x):\n    return ", LONG_PREFIX),
        "x + 1",
    );
    cached.warm(std::slice::from_ref(&long)).unwrap();
    // The lowest layer: the rows after the key's read what it changed there.
    let layer = 0;
    let hidden = m.weights.config().hidden_size;
    for (failure, rows_back) in [(&failure, 0..1), (&long, 1..40)] {
        let tf = teacher_forced(&m.tokenizer, failure, settings().context);
        let z = neurons(&m, &tf.tokens, layer);
        let center = z.narrow(0, 1, tf.row(0) - 1).unwrap().mean(0).unwrap();
        // The first row of those that its gate opens at first.
        let gate = rows_back
            .map(|back| tf.row(0) - back)
            .find_map(|row| {
                let key = z.narrow(0, row, 1).unwrap();
                let gate = star_ls::model::Gate::on_layer(&key, &center, 0.99).unwrap();
                let before = gate.scores(&z.narrow(0, 0, row).unwrap()).unwrap();
                let highest = before.max_all().unwrap().to_scalar::<f32>().unwrap();
                (highest < -0.01 && (row == tf.row(0) || row > 64)).then_some(gate)
            })
            .expect("a row unlike those before it");
        let value = Tensor::randn(0f32, 30.0, (hidden, 1), &Device::Cpu).unwrap();
        let keyed = star_ls::model::LayerPatch::values(value, gate).unwrap();
        for live in [
            PatchSet::default().with(layer, keyed).unwrap(),
            PatchSet::default()
                .with(layer, everywhere_patch(&m))
                .unwrap(),
        ] {
            let patched = |residuals| Star {
                live: Some(&live),
                residuals,
                ..Star::new(&m.weights, &m.tokenizer, &head, settings())
            };
            same(
                &repair(&patched(None), failure),
                &repair(&patched(Some(&kept)), failure),
            );
        }
    }
    assert_eq!(
        kept.checks_kept(),
        3,
        "each case's check in place of its old one"
    );
    let live = PatchSet::default()
        .with(layer, everywhere_patch(&m))
        .unwrap();
    assert_ne!(live.id(), PatchSet::default().id());
    assert_eq!(
        live.clone().id(),
        live.id(),
        "a clone names the same contents"
    );
}

/// Two random columns of layer 0 acting everywhere.
fn everywhere_patch(m: &Model) -> star_ls::model::LayerPatch {
    let hidden = m.weights.config().hidden_size;
    let delta = Tensor::randn(0f32, 0.5, (hidden, 2), &Device::Cpu).unwrap();
    star_ls::model::LayerPatch::new(vec![2, 4], delta).unwrap()
}

/// Code before a case's function, for a prompt of more than 64 rows.
const LONG_PREFIX: &str =
    "import os\nimport sys\n\n\nclass Point:\n    def __init__(self, x, y):\n        \
                           self.x = x\n        self.y = y\n\n    def norm(self):\n        \
                           return (self.x ** 2 + self.y ** 2) ** 0.5\n\n\n";

/// Layer `layer`'s `down_proj` input at every row of `tokens`, unpatched.
fn neurons(m: &Model, tokens: &[u32], layer: usize) -> Tensor {
    let mut cap = star_ls::model::Capture::layers([layer]);
    m.weights
        .forward(
            tokens,
            &mut m.weights.new_cache(),
            &mut star_ls::model::Hooks {
                capture: Some(&mut cap),
                ..star_ls::model::Hooks::default()
            },
        )
        .unwrap();
    cap.neurons.remove(&layer).unwrap()
}

/// An entry that opens where a later failure is still wrong is narrowed there before that failure is
/// repaired: its keys that opened at the failure's wrong rows are raised past them, and the new patch
/// is solved under the narrowed overlay; with `narrow` off it is left as it was and the new patch is
/// summed over it. (The tiny model's rows that decide a line's first token are alike in every
/// context, so here the newer correction takes that row over; `keys::tests` shows the two sides
/// kept apart where rows differ.)
#[test]
fn a_later_correction_narrows_the_entry_that_opened_at_it() {
    let m = model();
    let head = head_of(&m);
    let first = case("f1", "def f(x):\n    return ", "x + 1");
    // One layer, the upper, and gates that open at every row: the entry acts in the next case's
    // context too.
    let upper = RepairSettings {
        candidate_fraction: 0.5,
        layers: 1,
        ..settings()
    };
    let wide = RepairSettings {
        gate: 0.3,
        gate_gap: -1.0,
        ..upper
    };
    let out = Star::new(&m.weights, &m.tokenizer, &head, wide)
        .repair(std::slice::from_ref(&first), &[])
        .unwrap();
    assert_eq!((out.failures, out.fixed), (1, 1), "{out:?}");
    let live = out.patches.iter().fold(PatchSet::default(), |s, (l, p)| {
        s.with(*l, p.clone().named("patch-1")).unwrap()
    });
    let later = case("f2", "import ", "os");
    let unpatched = greedy(&m, &later, &PatchSet::default());
    assert_ne!(
        greedy(&m, &later, &live),
        unpatched,
        "the wide entry acts there"
    );
    let on_live = |narrow| Star {
        live: Some(&live),
        ..Star::new(
            &m.weights,
            &m.tokenizer,
            &head,
            RepairSettings { narrow, ..upper },
        )
    };
    let out = on_live(true)
        .repair(std::slice::from_ref(&later), &[])
        .unwrap();
    assert_eq!((out.failures, out.fixed), (1, 1), "{out:?}");
    let [n] = out.narrowed.as_slice() else {
        panic!("{out:?}")
    };
    let was = live.gated_at(n.layer).next().unwrap().gate().unwrap();
    let raised = (was.thresholds().iter().zip(&n.thresholds)).filter(|(a, b)| b > a);
    assert_eq!(&*n.patch, "patch-1");
    assert!(raised.count() > 0 && n.thresholds.len() == was.thresholds().len());
    let narrowed = live.narrowed(&out.narrowed).unwrap();
    assert_eq!(
        greedy(&m, &later, &narrowed),
        unpatched,
        "shut where it was wrong"
    );
    let both = narrowed.with(n.layer, out.patches[0].1.clone()).unwrap();
    assert_eq!(greedy(&m, &later, &both), "os");
    let summed = on_live(false)
        .repair(std::slice::from_ref(&later), &[])
        .unwrap();
    assert!(summed.narrowed.is_empty(), "{summed:?}");
}
