//! The developer's data through the real binary on a tiny random-weight model: the files are private, the
//! server holds no socket, `star.forget` and `star-ls forget` wipe a workspace, and past `patchMemoryMb`
//! the oldest patches stop applying.

mod client;
#[path = "support/tiny_model.rs"]
mod tiny_model;

use client::Client;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

const ROOT: &str = "file:///home/dev/proj";

fn tiny_model() -> PathBuf {
    tiny_model::cached("privacy", tiny_model::TinySpec::default())
}

fn start(data: &Path, options: Value) -> Client {
    start_on(&tiny_model(), data, options)
}

fn start_on(model: &Path, data: &Path, options: Value) -> Client {
    let mut all =
        json!({ "debounceMs": 0, "maxTokens": 8, "captureIdleMs": 600000, "repairThreshold": 0 });
    all.as_object_mut()
        .unwrap()
        .extend(options.as_object().unwrap().clone());
    Client::start_in(
        model,
        all,
        &[("STAR_LS_DATA_DIR", data.to_str().unwrap())],
        json!(ROOT),
    )
}

/// Shows a completion on `line` and corrects it to `text` with `star/didCorrect`: one failure case.
fn correct(c: &mut Client, uri: &str, line: u32, text: &str) {
    let r = c.call(
        "textDocument/inlineCompletion",
        Client::inline_params(uri, line, 0),
    );
    let id = r["items"][0]["command"]["arguments"][0].clone();
    assert!(id.is_string(), "no completion to correct: {r}");
    c.notify(
        "star/didCorrect",
        json!({ "completionId": id, "text": text }),
    );
}

fn star_ls(data: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_star-ls"))
        .args(args)
        .env("STAR_LS_DATA_DIR", data)
        .output()
        .unwrap()
}

#[test]
fn forget_wipes_the_workspace_live_and_from_the_command_line() {
    let data = client::fresh_data_dir("forget");
    let mut c = start(&data, json!({}));
    let uri = format!("{ROOT}/a.py");
    c.open(&uri, "\n\n\n");
    for line in 0..3 {
        correct(&mut c, &uri, line, &format!("value_{line} = {line}"));
    }
    assert_eq!(c.status()["failuresPending"], 3);

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700);
        for entry in std::fs::read_dir(&data).unwrap() {
            let path = entry.unwrap().path();
            assert_eq!(mode(&path), 0o600, "{}", path.display());
        }
    }

    // No network: after loading, completing and recording, the server holds no socket (its stdio are
    // pipes; the store is a file).
    let fds = std::fs::read_dir(format!("/proc/{}/fd", c.pid())).unwrap();
    let sockets: Vec<_> = fds
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .collect();
    assert!(sockets.is_empty(), "the server holds sockets: {sockets:?}");

    let gone = c.call(
        "workspace/executeCommand",
        json!({ "command": "star.forget" }),
    );
    assert_eq!(gone["cases"], 3, "{gone}");
    assert!(gone["completions"].as_u64().unwrap() >= 3, "{gone}");
    let status = c.status();
    assert_eq!(
        (&status["failuresPending"], &status["completionsRecorded"]),
        (&json!(0), &json!(0)),
        "{status}"
    );
    let r = c.request(
        "workspace/executeCommand",
        json!({ "command": "star.forget", "arguments": [7] }),
    );
    assert_eq!(r["error"]["code"], -32602, "{r}");

    correct(&mut c, &uri, 1, "after = 1");
    c.shutdown();

    // From the command line: an unknown workspace is named with the ones there are; a path or the
    // URI names this one.
    let out = star_ls(&data, &["forget", "--workspace", "/elsewhere"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(ROOT) && err.lines().count() == 1, "{err}");
    let out = star_ls(&data, &["forget", "--workspace", ROOT, "--json"]);
    assert!(out.status.success(), "{out:?}");
    let gone: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(gone["cases"], 1, "{gone}");
    let out = star_ls(&data, &["cases", "export"]);
    assert!(out.status.success() && out.stdout.is_empty(), "{out:?}");
    assert!(!star_ls(&data, &["forget"]).status.success(), "says which");
}

#[test]
fn past_patch_memory_mb_the_oldest_patches_are_evicted_and_learning_goes_on() {
    let data = client::fresh_data_dir("patch-memory");
    let model = tiny_model::cached("repairable", tiny_model::TinySpec::repairable());
    // Not even one patch fits: each new one is kept and every older one evicted.
    let mut c = start_on(&model, &data, json!({ "patchMemoryMb": 0 }));
    let mut patches = Vec::new();
    for k in 0..2 {
        c.fail_at_return(ROOT, k);
        let report = c.call(
            "workspace/executeCommand",
            json!({ "command": "star.repairNow" }),
        );
        let id = report["patchId"]
            .as_str()
            .unwrap_or_else(|| panic!("the tiny model's repair kept no patch: {report}"));
        assert_eq!(report["evicted"], json!(patches), "{report}");
        patches.push(id.to_owned());
    }
    let listed = c.call(
        "workspace/executeCommand",
        json!({ "command": "star.listPatches" }),
    );
    let live: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["id"].as_str())
        .collect();
    assert_eq!(live, [patches[1].as_str()], "{listed}");
    let status = c.status();
    assert_eq!(status["patches"], 1, "{status}");
    assert_eq!(
        status["failuresPending"], 0,
        "an evicted patch's cases were learned: they do not come back"
    );
    c.shutdown();
}

#[test]
fn nothing_is_completed_or_recorded_in_an_excluded_file() {
    let data = client::fresh_data_dir("exclude");
    let mut c = start(&data, json!({ "exclude": ["**/secrets/**"] }));
    // The store takes the server's writes in order: a count asked after a completion includes it.
    let recorded = |c: &mut Client| c.status()["completionsRecorded"].as_i64().unwrap();
    for uri in [
        format!("{ROOT}/.env"),
        format!("{ROOT}/.env.local"),
        format!("{ROOT}/deploy/server.pem"),
        format!("{ROOT}/secrets/token.py"),
    ] {
        c.open(&uri, "API_KEY=\n");
        let r = c.call(
            "textDocument/inlineCompletion",
            Client::inline_params(&uri, 0, 8),
        );
        assert_eq!(r["items"], json!([]), "{uri}: {r}");
    }
    assert_eq!(recorded(&mut c), 0);
    // The same text in an ordinary file is completed and recorded.
    let uri = format!("{ROOT}/settings.py");
    c.open(&uri, "API_KEY=\n");
    let r = c.call(
        "textDocument/inlineCompletion",
        Client::inline_params(&uri, 0, 8),
    );
    assert!(r["items"][0]["insertText"].is_string(), "{r}");
    assert_eq!(recorded(&mut c), 1);
    c.shutdown();
}
