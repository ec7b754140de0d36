//! The live model's repair served by another engine: a correction repaired through the real server
//! (packaged model, repair settings whose patches a LoRA expresses) is exported as a GGUF LoRA that
//! llama.cpp (node-llama-cpp, the bench's peer) loads beside the same GGUF, and as a PEFT adapter the
//! `safetensors` package reads back; llama.cpp with the adapter completes the case the developer's
//! way, without it not, and B·A equals the ledger's deltas.

mod client;

use client::{fresh_data_dir, packaged_model, Client};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

const HYPOT: &str = "import math\n\n\ndef hypotenuse(a: float, b: float) -> float:\n    \"\"\"Length of the hypotenuse of a right triangle with legs a and b.\"\"\"\n    return \n";

/// `star-ls ARGS` on the test's store; its stdout, after checking it succeeded.
fn star_ls(data: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_star-ls"))
        .args(args)
        .env("STAR_LS_MODEL", packaged_model())
        .env("STAR_LS_DATA_DIR", data)
        .output()
        .unwrap();
    assert!(out.status.success(), "star-ls {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The summary `complete --cases` prints (its first line).
fn complete(data: &Path, cases: &Path, more: &[&str]) -> Value {
    let mut args = vec!["complete", "--cases", cases.to_str().unwrap(), "--peer"];
    args.extend(more);
    let out = star_ls(data, &args);
    serde_json::from_str(out.lines().next().unwrap()).unwrap()
}

/// The repository's script `name`, run for the last line it prints (an installed tool's path).
fn installed(name: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name);
    let out = Command::new("bash").arg(script).output().unwrap();
    assert!(out.status.success(), "{name}: {out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    stdout.lines().last().unwrap().trim().to_owned()
}

#[test]
fn llama_cpp_serves_the_repair_as_a_lora_adapter() {
    let data = fresh_data_dir("adapter");
    let mut c = Client::start(
        &packaged_model(),
        json!({ "threads": 2, "debounceMs": 0, "captureIdleMs": 600000, "repairThreshold": 0,
                "repair": { "patch": "columns", "gate": 0 } }),
        &[("STAR_LS_DATA_DIR", data.to_str().unwrap())],
    );
    let uri = "file:///w/hypot.py";
    c.open(uri, HYPOT);
    let r = c.call(
        "textDocument/inlineCompletion",
        Client::inline_params(uri, 5, 11),
    );
    let proposed = r["items"][0]["insertText"].as_str().unwrap_or_default();
    assert!(!proposed.contains("hypot"), "{r}");
    let wanted = "math.hypot(a, b)";
    c.insert(uri, 2, 5, 11, wanted);
    c.insert(uri, 3, 5, 11 + wanted.len() as u32, "\n");
    let report = c.call(
        "workspace/executeCommand",
        json!({ "command": "star.repairNow" }),
    );
    let id = report["patchId"]
        .as_str()
        .unwrap_or_else(|| panic!("no patch: {report}"))
        .to_owned();
    c.shutdown();

    let cases = data.join("failures.jsonl");
    let failures = star_ls(&data, &["cases", "export", "--kind", "failure"]);
    std::fs::write(&cases, &failures).unwrap();
    assert_eq!(failures.lines().count(), 1, "{failures}");

    let lora = data.join("repair.lora.gguf");
    let lora_arg = lora.to_str().unwrap();
    let exported: Value = serde_json::from_str(&star_ls(
        &data,
        &[
            "patches",
            "export",
            "--format",
            "gguf-lora",
            lora_arg,
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(exported["exported"], json!([id]), "{exported}");
    assert_eq!(exported["leftOut"], json!([]), "{exported}");

    // star-ls under its ledger and llama.cpp under the adapter both complete the developer's way;
    // llama.cpp on the bare GGUF does not.
    let with = complete(
        &data,
        &cases,
        &["--patches", "--peer-lora", lora_arg, "--threads", "2"],
    );
    assert_eq!(
        (with["exact"].as_u64(), with["peer_exact"].as_u64()),
        (Some(1), Some(1)),
        "{with}"
    );
    let bare = complete(&data, &cases, &["--threads", "2"]);
    assert_eq!(
        (bare["exact"].as_u64(), bare["peer_exact"].as_u64()),
        (Some(0), Some(0)),
        "{bare}"
    );

    // The dry run writes its own repair as an adapter and sets llama.cpp's lines beside ours.
    let dry = data.join("dry.lora.gguf");
    let columns = r#"{"patch": "columns", "gate": 0}"#;
    let cases_arg = cases.to_str().unwrap();
    let args = [
        "repair",
        "--cases",
        cases_arg,
        "--threads",
        "2",
        "--adapter",
    ];
    let report: Value = serde_json::from_str(&star_ls(
        &data,
        &[
            &args[..],
            &[
                dry.to_str().unwrap(),
                "--repair-settings",
                columns,
                "--json",
            ],
        ]
        .concat(),
    ))
    .unwrap();
    let peer = &report["peer"];
    assert_eq!(
        (
            peer["repairedRightAdapted"].as_u64(),
            peer["agreeAdapted"].as_u64()
        ),
        (Some(1), Some(1)),
        "{report}"
    );
    assert_eq!(report["cases"][0]["peerAdapted"], wanted, "{report}");
    // The default repair's entries have no LoRA form: said, and nothing written.
    let out = Command::new(env!("CARGO_BIN_EXE_star-ls"))
        .args(args)
        .arg(data.join("values.gguf"))
        .env("STAR_LS_MODEL", packaged_model())
        .env("STAR_LS_DATA_DIR", &data)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("adds one value per gate key"),
        "{stderr}"
    );
    assert!(!data.join("values.gguf").exists());

    // The PEFT adapter, read back with the safetensors package, is the ledger's deltas.
    let peft = data.join("peft");
    star_ls(
        &data,
        &[
            "patches",
            "export",
            "--format",
            "peft",
            peft.to_str().unwrap(),
        ],
    );
    let bundle = data.join("repair.bundle.json");
    star_ls(
        &data,
        &[
            "patches",
            "export",
            "--format",
            "bundle",
            bundle.to_str().unwrap(),
        ],
    );
    let check = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/peft_check.py");
    let out = Command::new(installed("install-python"))
        .arg(check)
        .args([&peft, &bundle])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let read: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(read["layers"], read["bundleLayers"], "{read}");
    assert_eq!(read["targets"], json!(["down_proj"]), "{read}");
    assert_eq!(read["alpha"], read["rank"], "{read}");
    assert!(read["maxDiff"].as_f64().unwrap() <= 1e-6, "{read}");
}
