//! The real binary on a tiny random-weight model (its completions are noise, which is all capture and
//! the scheduler need): bad notifications and edits are survived; enough new failures start a repair by
//! themselves, and `star.repairNow` during one waits for it; a line is decided when Enter ends it and
//! when `star.repairNow` comes; a client that never answers the server's progress requests blocks no
//! repair; an unknown setting is named. (SIGKILL at random moments is
//! tests/crash.rs.)

mod client;
#[path = "support/tiny_model.rs"]
mod tiny_model;

use client::Client;
use serde_json::json;
use std::path::{Path, PathBuf};

fn tiny_model() -> PathBuf {
    tiny_model::cached("crash", tiny_model::TinySpec::default())
}

fn data_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("star-ls-crash-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn start(model: &Path, data: &Path) -> Client {
    start_with(model, data, 0)
}

fn start_with(model: &Path, data: &Path, repair_threshold: u64) -> Client {
    Client::start(
        model,
        json!({ "debounceMs": 0, "maxTokens": 8, "captureIdleMs": 600000,
                "repairThreshold": repair_threshold }),
        &[("STAR_LS_DATA_DIR", data.to_str().unwrap())],
    )
}

fn stored(c: &mut Client) -> u64 {
    let s = c.status();
    s["failuresPending"].as_u64().unwrap() + s["guardCases"].as_u64().unwrap()
}

/// Writes one line at the end of the document after asking for a completion there, then starts the
/// next line: one decided case (a failure, or a guard if the noise model guessed it).
fn write_line(c: &mut Client, uri: &str, version: &mut i32, line: u32, text: &str) {
    // Waited for: a completion that arrives after the next keystroke is stale and not followed.
    c.call(
        "textDocument/inlineCompletion",
        Client::inline_params(uri, line, 0),
    );
    *version += 1;
    c.insert(uri, *version, line, 0, text);
    *version += 1;
    c.insert(uri, *version, line, text.len() as u32, "\n");
}

/// A server that repairs once two new failures are pending, after two lines that are failures.
fn two_failures_with_threshold_2(name: &str) -> Client {
    let mut c = start_with(&tiny_model(), &data_dir(name), 2);
    let uri = format!("file:///w/{name}.py");
    c.open(&uri, "");
    let mut version = 1;
    for line in 0..2 {
        write_line(
            &mut c,
            &uri,
            &mut version,
            line,
            &format!("v{line} = {line}"),
        );
    }
    c
}

#[test]
fn bad_capture_traffic_is_survived() {
    let model = tiny_model();
    let data = data_dir("bad");
    let mut c = start(&model, &data);
    let uri = "file:///w/a.py";
    c.open(uri, "x = 1\n");
    // Unknown completion ids, for notifications and commands.
    c.notify("star/didAccept", json!({ "completionId": "nope" }));
    c.notify("star/didReject", json!({ "completionId": 42 }));
    c.notify(
        "star/didCorrect",
        json!({ "completionId": "nope", "text": "y" }),
    );
    let r = c.request(
        "workspace/executeCommand",
        json!({ "command": "star.explain", "arguments": ["nope"] }),
    );
    assert_eq!(r["error"]["code"], -32602, "{r}");
    let r = c.request(
        "workspace/executeCommand",
        json!({ "command": "star.accepted", "arguments": [] }),
    );
    assert_eq!(r["error"]["code"], -32602, "{r}");
    // A stale version, a closed document, a huge insertion, a non-UTF-8-looking path.
    c.insert(uri, 0, 0, 0, "# stale\n");
    c.notify(
        "textDocument/didClose",
        json!({ "textDocument": { "uri": uri } }),
    );
    c.insert(uri, 5, 0, 0, "after close");
    let odd = "file:///w/%FF%FE/b%20c.py";
    c.open(odd, "");
    c.request_async(
        "textDocument/inlineCompletion",
        Client::inline_params(odd, 0, 0),
    );
    c.insert(odd, 2, 0, 0, &"z = 1 # long\n".repeat(20_000));
    // Still serving and recording.
    let mut version = 2;
    write_line(&mut c, odd, &mut version, 20_000, "w = 2");
    let r = c.call(
        "textDocument/inlineCompletion",
        Client::inline_params(odd, 20_001, 0),
    );
    assert!(r["items"].is_array(), "{r}");
    assert!(stored(&mut c) >= 1);
    let err = c.shutdown();
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn enough_new_failures_start_a_repair() {
    let mut c = two_failures_with_threshold_2("scheduler");
    // The repair reports when done: with a patch, or why not.
    let shown = c.wait_for("the scheduled repair's report", |m| {
        m["method"] == "window/showMessage"
            && m["params"]["message"]
                .as_str()
                .is_some_and(|s| s.contains("failures"))
    });
    let status = c.status();
    assert!(
        status["lastRepair"]["failures"].as_u64().is_some(),
        "{status} {shown}"
    );
    assert_eq!(status["repairRunning"], false);
    c.shutdown();
}

fn command(c: &mut Client, name: &str) -> serde_json::Value {
    c.call(
        "workspace/executeCommand",
        json!({ "command": name, "arguments": [] }),
    )
}

#[test]
fn repair_now_while_a_repair_runs_waits_for_it_and_status_is_pushed() {
    let mut c = two_failures_with_threshold_2("wait");
    // The second failure started a repair; two more asked for at once run into it.
    let first = c.request_async(
        "workspace/executeCommand",
        json!({ "command": "star.repairNow" }),
    );
    let second = c.request_async(
        "workspace/executeCommand",
        json!({ "command": "star.repairNow" }),
    );
    for id in [first, second] {
        let r = c.response(id);
        assert!(r["result"]["failures"].as_u64().is_some(), "{r}");
    }
    // Pushed, not polled: the newest star/status shows it done.
    c.wait_for("star/status once it is done", |m| {
        m["method"] == "star/status"
            && m["params"]["repairRunning"] == false
            && !m["params"]["lastRepair"].is_null()
    });
    assert_eq!(c.status()["repairRunning"], false);
    c.shutdown();
}

#[test]
fn a_client_that_never_answers_progress_requests_blocks_no_repair() {
    // It says it shows progress, then leaves every `window/workDoneProgress/create` unanswered.
    let data = data_dir("stuck");
    let mut c = start(&tiny_model(), &data).never_answering();
    let uri = "file:///w/stuck.py";
    c.open(uri, "");
    let mut version = 1;
    write_line(&mut c, uri, &mut version, 0, "v0 = 0");
    for _ in 0..2 {
        let r = command(&mut c, "star.repairNow");
        assert!(r["failures"].as_u64().is_some(), "{r}");
    }
    // The repairs' progress is asked for beside them; both ended without an answer to it.
    c.wait_for("a repair's progress request", |m| {
        m["method"] == "window/workDoneProgress/create" && m["params"]["token"] == "star-ls/repair"
    });
    let forgot = c.call(
        "workspace/executeCommand",
        json!({ "command": "star.forget", "arguments": ["all"] }),
    );
    assert!(!forgot.is_null(), "{forgot}");
    assert_eq!(c.status()["repairRunning"], false);
    c.shutdown();
}

#[test]
fn a_line_typed_over_a_completion_is_decided_at_enter_and_at_repair_now() {
    let model = tiny_model();
    let data = data_dir("enter");
    let mut c = Client::start(
        &model,
        json!({ "debounceMs": 0, "maxTokens": 8, "captureIdleMs": 600000,
                "repairThreshold": 0, "multiline": "block" }),
        &[("STAR_LS_DATA_DIR", data.to_str().unwrap())],
    );
    let uri = "file:///w/e.py";
    c.open(uri, "def f():\n    \n");
    c.call(
        "textDocument/inlineCompletion",
        Client::inline_params(uri, 1, 4),
    );
    c.insert(uri, 2, 1, 4, "return 10");
    assert_eq!(stored(&mut c), 0, "still typing the line");
    // Enter, with the editor's indentation: decided now, not after captureIdleMs.
    c.insert(uri, 3, 1, 13, "\n    ");
    assert_eq!(c.status()["failuresPending"], 1);

    // A line still being typed when star.repairNow comes is decided first, and repaired.
    c.call(
        "textDocument/inlineCompletion",
        Client::inline_params(uri, 2, 4),
    );
    c.insert(uri, 4, 2, 4, "return 20");
    let report = command(&mut c, "star.repairNow");
    assert_eq!(report["failures"], 2, "{report}");
    c.shutdown();
}

#[test]
fn an_unknown_setting_is_named_and_the_defaults_used() {
    let model = tiny_model();
    let data = data_dir("unknown-setting");
    let mut c = Client::start(
        &model,
        json!({ "maxPatches": 3 }),
        &[("STAR_LS_DATA_DIR", data.to_str().unwrap())],
    );
    c.wait_for("a warning naming the key", |m| {
        m["method"] == "window/showMessage"
            && m["params"]["message"]
                .as_str()
                .is_some_and(|s| s.contains("unknown field `maxPatches`"))
    });
    c.shutdown();
}
