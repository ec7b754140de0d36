//! `star-ls eval` on a tiny random-weight model, through the real binary: a planted failure is found,
//! repaired and counted; the passing cases are the specificity sample; the JSON has CONTRACT.md's keys.

#[path = "support/tiny_model.rs"]
mod tiny_model;

use serde_json::Value;
use star_ls::completion::fim_prompt;
use star_ls::model::generate::StopReason;
use star_ls::model::{LoadOptions, Model};
use star_ls::repair::{greedy_case, text_after_cursor, Case, RepairSettings};
use std::process::Command;
use tiny_model::*;

fn case(id: &str, prefix: &str, target: &str, group: &str) -> Case {
    Case {
        id: id.into(),
        language: "python".into(),
        prefix: prefix.into(),
        suffix: "print(f(2))\n".into(),
        target: target.into(),
        group: group.into(),
    }
}

/// Cases whose target is the line the model completes by itself: they pass before any repair.
fn passing_cases(m: &Model) -> Vec<Case> {
    let limits = RepairSettings::default().context;
    [
        "def g(y):\n    y = ",
        "def g(y):\n    ",
        "z = ",
        "def h(",
        "import ",
        "x = 1\ny = ",
    ]
    .iter()
    .enumerate()
    .filter_map(|(i, prefix)| {
        let mut c = case(&format!("p{i}"), prefix, "", "");
        let prompt = fim_prompt(&m.tokenizer, prefix, &text_after_cursor(&c), limits);
        // Its own line, if it ends within the 8 tokens an empty target leaves room for.
        let g = greedy_case(
            &m.weights,
            &m.tokenizer,
            &c,
            &prompt,
            &mut m.weights.new_cache(),
            None,
        )
        .unwrap();
        c.target = g.text;
        (g.stop == StopReason::EndOfLine && !c.target.trim().is_empty()).then_some(c)
    })
    .collect()
}

fn number(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

/// STAR's first repair's `ungated` figures on `file` with `settings` and `"patch": patch`.
fn star_ungated(
    file: &std::path::Path,
    model: &std::path::Path,
    settings: &str,
    patch: &str,
) -> Value {
    let json = file.with_extension(format!("{patch}.json"));
    let settings = settings.replacen('{', &format!(r#"{{"patch": "{patch}", "#), 1);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_star-ls"));
    cmd.args(["eval", "--cases"])
        .arg(file)
        .args([
            "--method",
            "star",
            "--ungated",
            "--repair-settings",
            &settings,
            "--json",
        ])
        .arg(&json)
        .env("STAR_LS_MODEL", model);
    star_patched(cmd, &json)["methods"]["star"]["per_repair"][0]["ungated"].clone()
}

/// Runs an eval of STAR that writes its JSON to `json`: the report, once its first repair is
/// seen to have kept a patch.
fn star_patched(mut cmd: Command, json: &std::path::Path) -> Value {
    let out = cmd.output().expect("running star-ls eval");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
    let star = &report["methods"]["star"];
    assert_eq!(star["per_repair"][0]["status"], "patched", "{star}");
    report
}

#[test]
fn eval_finds_repairs_and_counts_a_planted_failure() {
    let model_path = cached(
        "repair-f32-nl9.5",
        TinySpec {
            seed: 5,
            quant: Quant::F32,
            newline_logit: 9.5,
            ..TinySpec::default()
        },
    );
    let m = Model::load(&model_path, LoadOptions::default()).unwrap();
    let passing = passing_cases(&m);
    assert!(passing.len() >= 2, "{passing:?}");
    // The planted failure: a line the random model does not say.
    let mut cases = vec![case("f1", "def f(x):\n    return ", "x + 1", "")];
    cases.extend(passing.iter().cloned());

    let dir = tmp_path("eval-planted");
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, cases: &[Case]| {
        let path = dir.join(name);
        let lines: Vec<String> = cases
            .iter()
            .map(|c| serde_json::to_string(c).unwrap())
            .collect();
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        path
    };
    let file = write("cases.jsonl", &cases);
    let json = dir.join("eval.json");
    let plots = dir.join("plots");
    // The repair settings the tiny model needs (two layers, all of them candidates).
    let settings =
        r#"{"candidateFraction": 1.0, "layers": 2, "neuronFraction": 0.5, "maxSteps": 40}"#;
    let out = Command::new(env!("CARGO_BIN_EXE_star-ls"))
        .args(["eval", "--cases"])
        .arg(&file)
        .args([
            "--method",
            "all",
            "--repair-settings",
            settings,
            "--requantized",
            "--ungated",
        ])
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&plots)
        .env("STAR_LS_MODEL", &model_path)
        .output()
        .expect("running star-ls eval");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("star") && stdout.contains("effectiveness"),
        "{stdout}"
    );

    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["cases"], cases.len());
    assert_eq!(report["failing_before"], 1, "{report}");
    assert_eq!(report["passing_before"], passing.len());
    assert!(report["model"].is_string());
    for method in ["star", "mint", "sgd"] {
        let m = &report["methods"][method];
        for key in [
            "effectiveness",
            "generalization",
            "specificity",
            "passing_kept",
        ] {
            let v = number(m, key);
            assert!((0.0..=1.0).contains(&v), "{method}.{key} = {v}");
        }
        for key in ["repair_seconds_mean", "repair_seconds_total", "peak_rss_mb"] {
            assert!(number(m, key) >= 0.0);
        }
        // One unit: the planted failure, a batch of one singleton; every case is in the sample
        // (fewer cases than its size), so the passing ones are its unrelated part.
        assert_eq!(m["repairs"], 1, "{method}: {m}");
        let repair = &m["per_repair"][0];
        assert_eq!(repair["cases"], 1);
        assert_eq!(repair["sampled"], passing.len(), "{method}: {repair}");
        assert_eq!(repair["passing_sampled"], passing.len());
        // Every sampled completion the patch changed is listed, with where and how near a tie.
        let changed = repair["changed"].as_array().expect("changed completions");
        let unchanged = repair["unchanged"].as_u64().unwrap() as usize;
        assert_eq!(
            changed.len(),
            passing.len() - unchanged,
            "{method}: {repair}"
        );
        for c in changed {
            assert!(c["case"].is_string() && c["decision"].is_u64(), "{c}");
            assert!(number(c, "base_lead") >= 0.0, "{c}");
        }
        let cumulative = m["cumulative"].as_array().expect("cumulative points");
        assert_eq!(cumulative.len(), 1);
        for key in ["step", "effectiveness", "specificity", "sampled"] {
            assert!(
                cumulative[0][key].is_number(),
                "{method}: {}",
                cumulative[0]
            );
        }
        // One repair: after it, the same sampled cases are unrelated as in its own measure.
        assert_eq!(
            cumulative[0]["sampled"], m["per_repair"][0]["sampled"],
            "{method}: {m}"
        );
    }
    // SGD fixes the planted failure after all its epochs (the baseline has no early stop); MINT's
    // ten neuron patches do not, so it rolls them back, and a refused repair changes nothing else.
    let sgd = &report["methods"]["sgd"];
    assert_eq!(sgd["per_repair"][0]["status"], "patched", "{sgd}");
    assert_eq!(sgd["per_repair"][0]["steps"], 40, "{sgd}");
    assert_eq!(number(sgd, "effectiveness"), 1.0, "{sgd}");
    // Its patch has no gate: served ungated, it is what it was.
    let (repair, ungated) = (&sgd["per_repair"][0], &sgd["per_repair"][0]["ungated"]);
    assert_eq!(
        (&ungated["fixed"], &ungated["unchanged"]),
        (&repair["fixed"], &repair["unchanged"]),
        "{sgd}"
    );
    assert!(stdout.contains("sgd served ungated"), "{stdout}");
    let mint = &report["methods"]["mint"];
    assert_eq!(mint["per_repair"][0]["status"], "refused", "{mint}");
    assert_eq!(mint["per_repair"][0]["steps"], 10, "{mint}");
    for (key, want) in [
        ("effectiveness", 0.0),
        ("specificity", 1.0),
        ("passing_kept", 1.0),
    ] {
        assert_eq!(number(mint, key), want, "{key}: {mint}");
    }
    // STAR repairs the planted failure, and the repair is counted.
    let star = &report["methods"]["star"];
    assert_eq!(star["per_repair"][0]["status"], "patched", "{star}");
    assert_eq!(number(star, "effectiveness"), 1.0, "{star}");
    assert_eq!(
        number(&star["cumulative"][0], "effectiveness"),
        1.0,
        "{star}"
    );
    // Served re-quantized into its layers (the tiny model stores F32), the patch fixes it as well.
    assert_eq!(star["per_repair"][0]["requantized"]["fixed"], 1, "{star}");
    assert_eq!(number(&star["requantized"], "effectiveness"), 1.0, "{star}");
    let v = number(&star["requantized"], "specificity");
    assert!((0.0..=1.0).contains(&v), "{star}");
    assert!(stdout.contains("star served re-quantized"), "{stdout}");
    for chart in ["measures.svg", "seconds.svg", "cumulative.svg"] {
        let svg = std::fs::read_to_string(plots.join(chart)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("star"), "{chart}");
    }
    // Nothing was held out: no generalization bar.
    let measures = std::fs::read_to_string(plots.join("measures.svg")).unwrap();
    assert!(
        measures.contains("specificity") && !measures.contains("generalization"),
        "{measures}"
    );

    // A list of methods runs just those; an unknown one in it is refused.
    let run = |methods: &str| {
        Command::new(env!("CARGO_BIN_EXE_star-ls"))
            .args(["eval", "--cases"])
            .arg(&file)
            .args(["--method", methods, "--repair-settings", settings, "--json"])
            .arg(&json)
            .env("STAR_LS_MODEL", &model_path)
            .output()
            .expect("running star-ls eval")
    };
    let out = run("sgd,star");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let methods: Vec<&String> = report["methods"].as_object().unwrap().keys().collect();
    assert_eq!(methods, ["sgd", "star"], "{report}");
    let out = run("star,adam");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("adam"));
    // STAR's default entries (a value per key) have no ungated form; its gated column patch has.
    assert_eq!(
        star_ungated(&file, &model_path, settings, "values"),
        Value::Null
    );
    let columns = star_ungated(&file, &model_path, settings, "columns");
    assert!(
        columns["fixed"].as_u64().is_some_and(|f| f <= 1),
        "{columns}"
    );
    assert!(
        columns["unchanged"]
            .as_u64()
            .is_some_and(|u| u as usize <= passing.len()),
        "{columns}"
    );

    // Every case in the failure's group: the repair leaves nothing of the file unrelated to it, so
    // the specificity sample comes from --unrelated (other code), all of it used.
    let grouped: Vec<Case> = cases
        .iter()
        .map(|c| Case {
            group: "g".into(),
            ..c.clone()
        })
        .collect();
    let sample_of = |unrelated: Option<&std::path::Path>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_star-ls"));
        cmd.args(["eval", "--cases"])
            .arg(write("grouped.jsonl", &grouped))
            .args(["--method", "star", "--repair-settings", settings, "--json"])
            .arg(&json)
            .env("STAR_LS_MODEL", &model_path);
        if let Some(u) = unrelated {
            cmd.arg("--unrelated").arg(u);
        }
        star_patched(cmd, &json)
    };
    let own = sample_of(None);
    assert_eq!(
        own["methods"]["star"]["cumulative"][0]["sampled"], 0,
        "{own}"
    );
    let other = write("other.jsonl", &passing);
    let with = sample_of(Some(&other));
    assert_eq!(with["cases"], grouped.len(), "{with}");
    assert_eq!(with["unrelated_cases"], passing.len(), "{with}");
    assert_eq!(
        with["guards"], own["guards"],
        "the guards do not depend on --unrelated"
    );
    let star = &with["methods"]["star"];
    assert_eq!(star["per_repair"][0]["sampled"], passing.len(), "{star}");
    assert_eq!(star["cumulative"][0]["sampled"], passing.len(), "{star}");
}
