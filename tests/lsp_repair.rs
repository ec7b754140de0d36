//! The whole loop through the real `star-ls` binary with the packaged model: corrections typed over
//! completions are recorded, `star.repairNow` patches the live model, the next completion says what the
//! developer wrote, the patch survives a restart (the ledger), and rolling it back undoes it.

mod client;

use client::{fresh_data_dir, Client};
use serde_json::{json, Value};
use std::path::Path;

const HYPOT: &str = "import math\n\n\ndef hypotenuse(a: float, b: float) -> float:\n    \"\"\"Length of the hypotenuse of a right triangle with legs a and b.\"\"\"\n    return \n";
const DISTANCE: &str =
    "import math\n\n\ndef distance(p, q):\n    dx = q[0] - p[0]\n    dy = q[1] - p[1]\n    return \n";

/// `star-ls patches ARGS --json` on the test's store.
fn patches_cli(data: &Path, args: &[&str]) -> (bool, Value) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_star-ls"))
        .arg("patches")
        .args(args)
        .arg("--json")
        .env("STAR_LS_DATA_DIR", data)
        .output()
        .unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.success(), json)
}

fn inline(c: &mut Client, uri: &str, line: u32, character: u32) -> (String, String) {
    let r = c.call(
        "textDocument/inlineCompletion",
        Client::inline_params(uri, line, character),
    );
    let item = &r["items"][0];
    (
        item["insertText"].as_str().unwrap_or_default().to_owned(),
        item["command"]["arguments"][0]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

fn command(c: &mut Client, name: &str, args: Value) -> Value {
    c.call(
        "workspace/executeCommand",
        json!({ "command": name, "arguments": args }),
    )
}

/// Types `text` over the completion at (line, character), then goes to the next line: a failure case.
fn correct(c: &mut Client, uri: &str, doc: &str, line: u32, character: u32, text: &str) -> String {
    c.open(uri, doc);
    let (proposed, _) = inline(c, uri, line, character);
    c.insert(uri, 2, line, character, text);
    c.insert(uri, 3, line, character + text.len() as u32, "\n");
    proposed
}

#[test]
fn corrections_repair_the_live_model_persistently_and_roll_back() {
    let data = fresh_data_dir("repair");
    let mut c = Client::start_recording(&data);
    let before = correct(
        &mut c,
        "file:///w/hypot.py",
        HYPOT,
        5,
        11,
        "math.hypot(a, b)",
    );
    assert!(before.contains("sqrt"), "{before}");
    correct(
        &mut c,
        "file:///w/dist.py",
        DISTANCE,
        6,
        11,
        "math.hypot(dx, dy)",
    );
    // A guard: an accepted completion.
    c.open("file:///w/add.py", "def add(a, b):\n    return \n");
    let (add, add_id) = inline(&mut c, "file:///w/add.py", 1, 11);
    c.insert("file:///w/add.py", 2, 1, 11, &add);
    command(&mut c, "star.accepted", json!([add_id]));
    c.notify(
        "textDocument/didClose",
        json!({ "textDocument": { "uri": "file:///w/add.py" } }),
    );
    let status = c.status();
    assert_eq!(
        (
            status["failuresPending"].as_u64(),
            status["guardCases"].as_u64()
        ),
        (Some(2), Some(1)),
        "{status}"
    );

    let report = command(&mut c, "star.repairNow", json!([]));
    let patch = report["patchId"]
        .as_str()
        .unwrap_or_else(|| panic!("no patch: {report}"))
        .to_owned();
    assert_eq!(report["failures"], 2, "{report}");
    assert!(report["fixed"].as_u64().unwrap() >= 1, "{report}");
    assert!(
        report["guardAfter"].as_f64() >= report["guardBefore"].as_f64(),
        "{report}"
    );
    let status = c.status();
    assert_eq!(status["patches"], 1, "{status}");
    assert_eq!(status["lastRepair"]["patchId"], patch.as_str());
    assert_eq!(
        status["failuresPending"].as_u64(),
        Some(2 - report["fixed"].as_u64().unwrap())
    );

    // The live model now completes the way the developer writes.
    c.open("file:///w/hypot2.py", HYPOT);
    let r = c.call(
        "textDocument/inlineCompletion",
        Client::inline_params("file:///w/hypot2.py", 5, 11),
    );
    let (after, id) = (
        &r["items"][0]["insertText"],
        &r["items"][0]["command"]["arguments"][0],
    );
    assert_eq!(after, "math.hypot(a, b)", "{r}");
    // The item names the patch whose entries fired, for the editor to show beside it.
    assert_eq!(
        r["items"][0]["command"]["arguments"][1],
        json!({ "fired": [patch] }),
        "{r}"
    );
    let id = id.as_str().unwrap().to_owned();
    let explained = command(&mut c, "star.explain", json!([id]));
    assert_eq!(explained["patches"], json!([patch]), "{explained}");
    // Its entries opened where the developer's correction was learned: named, with their keys.
    let fired = explained["fired"].as_array().expect("fired entries");
    assert!(!fired.is_empty(), "{explained}");
    for f in fired {
        assert_eq!(f["patch"], patch.as_str(), "{explained}");
        assert!(f["rows"].as_u64() >= Some(1) && !f["keys"].as_array().unwrap().is_empty());
    }
    let listed = command(&mut c, "star.listPatches", json!([]));
    assert_eq!(listed[0]["id"], patch.as_str(), "{listed}");
    c.shutdown();
    let (ok, listed) = patches_cli(&data, &["list"]);
    assert!(ok);
    assert_eq!(
        (listed[0]["id"].as_str(), listed[0]["active"].as_bool()),
        (Some(patch.as_str()), Some(true))
    );
    let (ok, _) = patches_cli(&data, &["rollback", "patch-99"]);
    assert!(!ok, "an unknown patch is an error");

    // A restart re-applies the ledger; rolling back undoes the patch.
    let mut c = Client::start_recording(&data);
    c.open("file:///w/hypot3.py", HYPOT);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while c.status()["patches"] != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the ledger was not re-applied"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(
        inline(&mut c, "file:///w/hypot3.py", 5, 11).0,
        "math.hypot(a, b)"
    );
    let rolled = command(&mut c, "star.rollback", json!(["all"]));
    assert_eq!(rolled["rolledBack"], json!([patch]));
    assert_eq!(inline(&mut c, "file:///w/hypot3.py", 5, 11).0, before);
    let last = c.status()["completions"]["last"].clone();
    assert_eq!(
        last["prefilled"], last["promptTokens"],
        "keys and values made under the patch are not reused without it: {last}"
    );
    assert_eq!(c.status()["failuresPending"], 2);
    c.shutdown();
    let (_, listed) = patches_cli(&data, &["list"]);
    assert_eq!(listed[0]["active"], false, "rolled back, still listed");
}
