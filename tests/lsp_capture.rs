//! Capture through the real `star-ls` binary with the packaged model: outcomes inferred from plain
//! didChange traffic and from the star/did* notifications land in the SQLite store, and
//! `star-ls cases export` gives them back as cases-JSONL.

mod client;

use client::{fresh_data_dir, Client};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

fn export(data: &Path, kind: Option<&str>) -> Vec<Value> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_star-ls"));
    cmd.args(["cases", "export"]).env("STAR_LS_DATA_DIR", data);
    if let Some(k) = kind {
        cmd.args(["--kind", k]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// An inline completion at (line, character): its text and id.
fn inline(c: &mut Client, uri: &str, line: u32, character: u32) -> (String, String) {
    let r = c.call(
        "textDocument/inlineCompletion",
        Client::inline_params(uri, line, character),
    );
    let item = &r["items"][0];
    let text = item["insertText"]
        .as_str()
        .unwrap_or_else(|| panic!("no completion at {line}:{character}: {r}"))
        .to_owned();
    let id = item["command"]["arguments"][0].as_str().unwrap().to_owned();
    (text, id)
}

#[test]
fn outcomes_from_edits_and_notifications_are_stored_and_exported() {
    let data = fresh_data_dir("capture-edits");
    let mut c = Client::start_recording(&data);
    let (add_uri, sub_uri, mul_uri) = ("file:///w/add.py", "file:///w/sub.py", "file:///w/mul.py");
    c.open(add_uri, "def add(a, b):\n    return \n");
    c.open(sub_uri, "def sub(a, b):\n    return \n\nprint(sub(3, 1))\n");
    c.open(mul_uri, "def mul(a, b):\n    return \n");

    // 1. Accepted: the editor inserts the text and runs the item's command.
    let (add, add_id) = inline(&mut c, add_uri, 1, 11);
    c.insert(add_uri, 2, 1, 11, &add);
    c.call(
        "workspace/executeCommand",
        json!({ "command": "star.accepted", "arguments": [add_id] }),
    );
    c.insert(add_uri, 3, 2, 0, "\nprint(add(1, 2))\n"); // the cursor moves on
                                                        // 2. Rejected by typing something else, then moving to another line.
    let (sub, _) = inline(&mut c, sub_uri, 1, 11);
    assert_ne!(sub, "b - a");
    c.insert(sub_uri, 2, 1, 11, "b - a");
    c.insert(sub_uri, 3, 2, 0, "\n");
    // 3. Corrected, said explicitly.
    let (mul, mul_id) = inline(&mut c, mul_uri, 1, 11);
    c.insert(mul_uri, 2, 1, 11, &mul);
    c.notify("star/didAccept", json!({ "completionId": mul_id }));
    c.notify(
        "star/didCorrect",
        json!({ "completionId": mul_id, "text": "a * b  # product" }),
    );

    let status = c.status();
    assert_eq!(status["failuresPending"], 2, "{status}");
    assert_eq!(status["guardCases"], 1, "{status}");
    let explained = c.call(
        "workspace/executeCommand",
        json!({ "command": "star.explain", "arguments": [add_id] }),
    );
    assert_eq!(explained["patches"], json!([]), "{explained}");
    c.shutdown();

    let guards = export(&data, Some("guard"));
    assert_eq!(guards.len(), 1, "{guards:?}");
    assert_eq!(guards[0]["target"], add.trim_end());
    assert_eq!(guards[0]["prefix"], "def add(a, b):\n    return ");
    assert_eq!(guards[0]["outcome"], "accepted");
    assert_eq!(guards[0]["suffix"], "\nprint(add(1, 2))\n");
    assert_eq!(guards[0]["language"], "python");

    let failures = export(&data, Some("failure"));
    let by_target = |t: &str| {
        failures
            .iter()
            .find(|f| f["target"] == t)
            .unwrap_or_else(|| panic!("no failure with target {t:?}: {failures:?}"))
    };
    let rejected = by_target("b - a");
    assert_eq!(rejected["outcome"], "rejected");
    assert_eq!(rejected["proposed"], sub.as_str());
    assert_eq!(rejected["prefix"], "def sub(a, b):\n    return ");
    assert_eq!(rejected["suffix"], "\n\nprint(sub(3, 1))\n");
    let corrected = by_target("a * b  # product");
    assert_eq!(corrected["outcome"], "corrected");
    assert_eq!(corrected["proposed"], mul.as_str());
    assert_eq!(failures.len(), 2);
    // Every line carries CONTRACT.md's keys.
    for case in guards.iter().chain(&failures) {
        for key in ["id", "language", "prefix", "suffix", "target", "group"] {
            assert!(case.get(key).is_some(), "{key} missing in {case}");
        }
    }
    let all = export(&data, None);
    assert_eq!(all.len(), 3);
}

#[test]
fn a_locked_store_is_reported_and_completion_goes_on() {
    let data = fresh_data_dir("capture-locked");
    std::fs::create_dir_all(&data).unwrap();
    // Another process holds the database: writes cannot land.
    let locker = rusqlite::Connection::open(data.join("feedback.sqlite3")).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();

    let mut c = Client::start_recording(&data);
    let uri = "file:///w/add.py";
    c.open(uri, "def add(a, b):\n    return \n");
    let (text, _) = inline(&mut c, uri, 1, 11);
    let warning = c.wait_for("a store warning", |m| {
        m["method"] == "window/showMessage"
            && m["params"]["message"]
                .as_str()
                .is_some_and(|s| s.contains("feedback is not being saved"))
    });
    assert_eq!(warning["params"]["type"], 2, "{warning}");
    let (again, _) = inline(&mut c, uri, 1, 11);
    assert_eq!(text, again, "completion keeps working");
    c.insert(uri, 2, 1, 11, &text);
    // Released before shutdown: the queued records are written then.
    locker.execute_batch("COMMIT").unwrap();
    drop(locker);
    c.shutdown();
    let guards = export(&data, Some("guard"));
    assert_eq!(guards.len(), 1, "{guards:?}");
}

/// Typing the start of a shown completion (or taking a word of it, as the editors' accept-word
/// does) is answered with its rest under its id, without running the model; the whole line kept is
/// one guard case, filed under the workspace folder that holds the document (one added after
/// initialize: one server serves every project).
#[test]
fn the_rest_of_a_completion_typed_into_is_answered_without_the_model() {
    let data = fresh_data_dir("typed-ahead");
    let mut c = Client::start_in(
        &client::packaged_model(),
        json!({ "debounceMs": 0, "multiline": "line", "captureIdleMs": 600000 }),
        &[("STAR_LS_DATA_DIR", data.to_str().unwrap())],
        json!("file:///home/dev/a"),
    );
    let folder = "file:///home/dev/b";
    c.notify(
        "workspace/didChangeWorkspaceFolders",
        json!({ "event": { "added": [{ "uri": folder, "name": "b" }], "removed": [] } }),
    );
    let uri = &format!("{folder}/add.py");
    c.open(uri, "def add(a, b):\n    return \n");
    let (text, id) = inline(&mut c, uri, 1, 11);
    let word = text.split_inclusive(' ').next().unwrap().to_owned();
    assert!(word.len() < text.len(), "one word: {text:?}");
    let runs = c.status()["completions"]["completed"].clone();

    c.insert(uri, 2, 1, 11, &word);
    let column = 11 + word.encode_utf16().count() as u32;
    let (rest, rest_id) = inline(&mut c, uri, 1, column);
    assert_eq!(format!("{word}{rest}"), text);
    assert_eq!(rest_id, id, "the rest is the same completion");
    assert_eq!(
        c.status()["completions"]["completed"],
        runs,
        "the model ran"
    );

    c.insert(uri, 3, 1, column, &rest);
    c.notify("star/didAccept", json!({ "completionId": id }));
    c.notify(
        "textDocument/didClose",
        json!({ "textDocument": { "uri": uri } }),
    );
    c.shutdown();
    let cases = export(&data, None);
    assert_eq!(cases.len(), 1, "{cases:?}");
    assert_eq!(cases[0]["kind"], "guard", "{cases:?}");
    assert_eq!(cases[0]["target"], json!(text), "{cases:?}");
    assert_eq!(cases[0]["workspace"], folder, "{cases:?}");
}
