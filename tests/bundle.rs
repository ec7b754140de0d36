//! Patch bundles between two data directories, through the real binary on a tiny repairable model:
//! a repair made in one is exported, imported into another, and the server there completes the
//! repaired place as the first does after its repair; the developer's text goes only with
//! `--with-cases`; a damaged bundle, and one for another model, are refused with a one-line reason and
//! change nothing; an adapter export of entries no LoRA expresses is refused, naming them.

mod client;
#[path = "support/tiny_model.rs"]
mod tiny_model;

use client::Client;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Output};

const ROOT: &str = "file:///home/dev/proj";

fn star_ls(model: &Path, data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_star-ls"))
        .args(args)
        .env("STAR_LS_MODEL", model)
        .env("STAR_LS_DATA_DIR", data)
        .output()
        .unwrap()
}

fn start(model: &Path, data: &Path) -> Client {
    let mut c = Client::start_in(
        model,
        json!({ "debounceMs": 0, "maxTokens": 8, "captureIdleMs": 600000, "repairThreshold": 0 }),
        &[("STAR_LS_DATA_DIR", data.to_str().unwrap())],
        json!(ROOT),
    );
    c.wait_for("the ledger read", |m| m["method"] == "star/status");
    c
}

/// The line proposed after `return ` in a fresh copy of the document `fail_at_return` corrected.
fn proposal(c: &mut Client) -> Value {
    let uri = format!("{ROOT}/again.py");
    c.open(&uri, "def f0(x):\n    return \n");
    let r = c.call(
        "textDocument/inlineCompletion",
        Client::inline_params(&uri, 1, 11),
    );
    r["items"][0]["insertText"].clone()
}

fn patches(model: &Path, data: &Path) -> Value {
    let out = star_ls(model, data, &["patches", "list", "--json"]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_bundle_carries_a_repair_to_another_data_directory() {
    let model = tiny_model::cached("repairable", tiny_model::TinySpec::repairable());
    let (a, b) = (
        client::fresh_data_dir("bundle-a"),
        client::fresh_data_dir("bundle-b"),
    );
    let mut bare = start(&model, &b);
    let before = proposal(&mut bare);
    bare.shutdown();

    let mut c = start(&model, &a);
    c.fail_at_return(ROOT, 0);
    let report = c.call(
        "workspace/executeCommand",
        json!({ "command": "star.repairNow" }),
    );
    let id = report["patchId"]
        .as_str()
        .unwrap_or_else(|| panic!("no patch: {report}"));
    let repaired = proposal(&mut c);
    c.shutdown();
    assert_ne!(repaired, before, "the repair changed nothing to carry");

    let file = a.join("team.bundle.json");
    let file_arg = file.to_str().unwrap();
    let out = star_ls(
        &model,
        &a,
        &[
            "patches", "export", "--format", "bundle", file_arg, "--ids", id,
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        !text.contains("def f0(x)"),
        "case text without --with-cases"
    );
    let out = star_ls(&model, &b, &["patches", "import", file_arg, "--json"]);
    assert!(out.status.success(), "{out:?}");
    let listed = patches(&model, &b);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["report"]["imported"]["id"], id, "{listed}");

    let mut there = start(&model, &b);
    assert_eq!(
        proposal(&mut there),
        repaired,
        "the imported patch completes as the repair did"
    );
    there.shutdown();

    // A damaged bundle, and one for another model: refused, the ledger as it was.
    let text = std::fs::read_to_string(&file).unwrap();
    let at = text.find("\"delta\":[").unwrap() + "\"delta\":[".len();
    let digit = text[at..].find(|c: char| c.is_ascii_digit()).unwrap() + at;
    let flipped = if &text[digit..=digit] == "1" {
        "2"
    } else {
        "1"
    };
    let damaged = a.join("damaged.json");
    std::fs::write(
        &damaged,
        format!("{}{flipped}{}", &text[..digit], &text[digit + 1..]),
    )
    .unwrap();
    let other = tiny_model::cached("crash", tiny_model::TinySpec::default());
    for (model, file, why) in [
        (&model, &damaged, "damaged"),
        (&other, &file, "is for model"),
    ] {
        let out = star_ls(model, &b, &["patches", "import", file.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(why),
            "{why}: {stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
    assert_eq!(patches(&model, &b).as_array().map(Vec::len), Some(1));

    // The default repair's entries add one value per gate key: no LoRA adapter can hold them.
    for format in ["gguf-lora", "peft"] {
        let adapter = a.join(format!("adapter.{format}"));
        let args = [
            "patches",
            "export",
            "--format",
            format,
            adapter.to_str().unwrap(),
        ];
        let out = star_ls(&model, &a, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(&format!("{id} adds one value per gate key")),
            "{format}: {stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(!adapter.exists(), "{format}: nothing written");
    }

    // With the cases: the importing ledger holds the correction, repaired by the imported patch.
    let with = a.join("with-cases.json");
    let args = ["patches", "export", "--format", "bundle"];
    let out = star_ls(
        &model,
        &a,
        &[&args[..], &[with.to_str().unwrap(), "--with-cases"]].concat(),
    );
    assert!(out.status.success(), "{out:?}");
    let c = client::fresh_data_dir("bundle-c");
    let out = star_ls(&model, &c, &["patches", "import", with.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let out = star_ls(&model, &c, &["cases", "export", "--kind", "failure"]);
    let cases: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(cases.len(), 1, "{cases:?}");
    assert_eq!(
        (cases[0]["target"].as_str(), cases[0]["prefix"].as_str()),
        (Some("x + 0"), Some("def f0(x):\n    return ")),
    );
    let listed = patches(&model, &c);
    assert_eq!(listed[0]["cases"], json!([cases[0]["id"]]), "{listed}");
    assert_eq!(cases[0]["repairedBy"], listed[0]["id"]);
    // Rolled back, the imported patch leaves its correction pending, as a local one would.
    let out = star_ls(&model, &c, &["patches", "rollback", "all"]);
    assert!(out.status.success(), "{out:?}");
    let out = star_ls(&model, &c, &["cases", "export", "--kind", "failure"]);
    let case: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(case["repairedBy"], Value::Null, "{case}");
}
