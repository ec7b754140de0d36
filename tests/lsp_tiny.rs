//! The real binary on a tiny random-weight model (its completions are noise, which is all capture and
//! the scheduler need): bad notifications and edits are survived; enough new failures start a repair by
//! themselves. (SIGKILL at random moments is tests/crash.rs.)

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
    let model = tiny_model();
    let data = data_dir("scheduler");
    let mut c = start_with(&model, &data, 2);
    let uri = "file:///w/s.py";
    c.open(uri, "");
    let mut version = 1;
    for line in 0..2 {
        write_line(
            &mut c,
            uri,
            &mut version,
            line,
            &format!("v{line} = {line}"),
        );
    }
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
