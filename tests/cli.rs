//! The `star-ls` command line: one completion without an editor, every case of a file, and errors.

mod client;

use std::process::Command;

fn star_ls(model: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_star-ls"))
        .args(args)
        .env("STAR_LS_MODEL", model)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("running star-ls")
}

fn fixture(name: &str) -> String {
    format!("{}/fixtures/python/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn complete_prints_one_completion() {
    let out = star_ls(
        &client::packaged_model(),
        &[
            "complete",
            &fixture("demo.py"),
            "--line",
            "5",
            "--character",
            "11",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "math.sqrt(a**2 + b**2)"
    );
}

#[test]
fn bad_models_and_positions_fail_with_one_line() {
    let dir = std::env::temp_dir().join(format!("star-ls-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let truncated = dir.join("truncated.gguf");
    let bytes = std::fs::read(client::packaged_model()).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let garbage = dir.join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a model").unwrap();
    let file = fixture("demo.py");
    let at = [
        "complete",
        file.as_str(),
        "--line",
        "5",
        "--character",
        "11",
    ];
    for (model, args, expect) in [
        (dir.join("missing.gguf"), &at[..], "scripts/fetch-model"),
        (truncated, &at[..], "truncated"),
        (garbage, &at[..], "not a GGUF file"),
        (
            client::packaged_model(),
            &[
                "complete",
                file.as_str(),
                "--line",
                "999",
                "--character",
                "0",
            ][..],
            "past the end",
        ),
    ] {
        let out = star_ls(&model, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{model:?} succeeded");
        assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
        assert!(err.contains(expect), "{model:?}: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn repair_dry_run_reports_what_a_patch_would_fix() {
    let cases = format!("{}/fixtures/cases/hypot.jsonl", env!("CARGO_MANIFEST_DIR"));
    let out = star_ls(
        &client::packaged_model(),
        &["repair", "--cases", &cases, "--limit", "1", "--json"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (report["failures"].as_u64(), report["fixed"].as_u64()),
        (Some(1), Some(1)),
        "{report}"
    );
    let rows = report["cases"].as_array().unwrap();
    assert_eq!(rows[0]["role"], "repaired");
    assert_eq!(rows[0]["after"], "math.hypot(a, b)");
    assert_eq!(rows[1]["role"], "held out");
    // The repaired line is served through the repair's gates; the held-out one is told how far it is
    // from opening them, at each patched layer.
    assert!(
        !rows[0]["openedServed"].as_array().unwrap().is_empty(),
        "{report}"
    );
    assert_eq!(
        rows[1]["gateReach"].as_array().map(Vec::len),
        report["layers"].as_array().map(Vec::len),
        "{report}"
    );
    assert!(report["seconds"].as_f64().unwrap() > 0.0);
}

#[test]
fn repair_rejects_a_malformed_cases_file() {
    let path = std::env::temp_dir().join(format!("star-ls-bad-cases-{}.jsonl", std::process::id()));
    std::fs::write(
        &path,
        "{\"id\": \"a\", \"prefix\": \"x\", \"suffix\": \"\", \"target\": \"y\"}\nnot json\n",
    )
    .unwrap();
    let out = star_ls(
        &client::packaged_model(),
        &["repair", "--cases", path.to_str().unwrap()],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(":2: not a case"), "{err}");
}

/// Repair settings that cannot work together are refused before anything is loaded, by name:
/// values per key with no gate, or with a gate on the patched columns.
#[test]
fn repair_settings_that_cannot_work_together_are_refused() {
    for settings in [r#"{"gate": 0}"#, r#"{"keys": "columns"}"#] {
        for command in ["repair", "eval", "replay"] {
            let args = match command {
                "replay" => vec![command, "--dir", ".", "--repair-settings", settings],
                _ => vec![
                    command,
                    "--cases",
                    "none.jsonl",
                    "--repair-settings",
                    settings,
                ],
            };
            let out = star_ls(std::path::Path::new("/nonexistent.gguf"), &args);
            assert!(!out.status.success(), "{command} {settings}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains(r#"patch "values" needs gates keyed on the layer"#),
                "{command} {settings}: {err}"
            );
        }
    }
    // Each is fine as STAR's column patch.
    let out = star_ls(
        std::path::Path::new("/nonexistent.gguf"),
        &[
            "repair",
            "--cases",
            "none.jsonl",
            "--repair-settings",
            r#"{"gate": 0, "patch": "columns"}"#,
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("needs gates"), "{err}");
}

#[test]
fn complete_cases_counts_exact_blank_and_runaway_lines() {
    let cases = format!("{}/fixtures/cases/guards.jsonl", env!("CARGO_MANIFEST_DIR"));
    let rows = std::env::temp_dir().join(format!("star-ls-cli-rows-{}.json", std::process::id()));
    let out = star_ls(
        &client::packaged_model(),
        &[
            "complete",
            "--cases",
            &cases,
            "--rows",
            rows.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The guards are lines the model completes by itself.
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["cases"], 4, "{summary}");
    assert_eq!(summary["exact"], 4, "{summary}");
    assert_eq!(
        (summary["blank"].as_u64(), summary["runaway"].as_u64()),
        (Some(0), Some(0))
    );
    assert!(
        summary["peer_exact"].is_null(),
        "no peer was asked for: {summary}"
    );
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&rows).unwrap()).unwrap();
    let rows_ = doc["rows"].as_array().unwrap();
    assert_eq!(rows_.len(), 4);
    let said: Vec<&str> = rows_
        .iter()
        .map(|r| r["ours"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        said,
        ["a + b", "a * b", "math.pi * r ** 2", "math.sqrt(x)"],
        "{doc}"
    );
    assert!(
        rows_.iter().all(|r| r["ours"]["stop"] == "end_of_line"),
        "{doc}"
    );
    let _ = std::fs::remove_file(&rows);

    // FILE and --cases are one or the other.
    let out = star_ls(
        &client::packaged_model(),
        &["complete", "--cases", &cases, &fixture("demo.py")],
    );
    assert!(!out.status.success());
}
