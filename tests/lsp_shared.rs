//! Two real servers on one data directory (one developer's windows): a repair or a rollback in one is
//! served by the other without a restart, and one repairs while the other's repair holds the store's
//! lease only once it is given back.

mod client;
#[path = "support/tiny_model.rs"]
mod tiny_model;

use client::Client;
use serde_json::{json, Value};
use std::path::Path;

const ROOT: &str = "file:///home/dev/proj";

fn start(data: &Path) -> Client {
    let model = tiny_model::cached("repairable", tiny_model::TinySpec::repairable());
    Client::start_in(
        &model,
        json!({ "debounceMs": 0, "maxTokens": 8, "captureIdleMs": 600000, "repairThreshold": 0 }),
        &[("STAR_LS_DATA_DIR", data.to_str().unwrap())],
        json!(ROOT),
    )
}

fn command(c: &mut Client, name: &str, args: Value) -> Value {
    c.call(
        "workspace/executeCommand",
        json!({ "command": name, "arguments": args }),
    )
}

/// Waits for a `star/status` that shows `n` live patches.
fn wait_for_patches(c: &mut Client, n: u64) {
    c.wait_for(&format!("star/status with {n} patches"), |m| {
        m["method"] == "star/status" && m["params"]["patches"] == n
    });
}

#[test]
fn a_repair_and_a_rollback_in_one_window_are_served_in_the_other() {
    let data = client::fresh_data_dir("shared-live");
    let (mut a, mut b) = (start(&data), start(&data));
    for c in [&mut a, &mut b] {
        c.wait_for("the ledger read", |m| m["method"] == "star/status");
    }
    a.fail_at_return(ROOT, 0);
    let report = command(&mut a, "star.repairNow", json!([]));
    let id = report["patchId"]
        .as_str()
        .unwrap_or_else(|| panic!("no patch: {report}"));
    wait_for_patches(&mut b, 1);
    let listed = command(&mut b, "star.listPatches", json!([]));
    assert_eq!(listed[0]["id"], id, "{listed}");

    command(&mut b, "star.rollback", json!(["all"]));
    wait_for_patches(&mut a, 0);
    a.shutdown();
    b.shutdown();
}

#[test]
fn a_repair_waits_while_another_window_holds_the_lease_then_takes_it() {
    let data = client::fresh_data_dir("shared-lease");
    let mut b = start(&data);
    b.fail_at_return(ROOT, 1);
    // Another server is repairing: it holds the lease (until 2100, unless it gives it back).
    let db = rusqlite::Connection::open(data.join("feedback.sqlite3")).unwrap();
    let far = 4_102_444_800_000_i64; // 2100-01-01
    db.execute(
        "INSERT INTO leases (name, holder, expires_ms) VALUES ('repair', 'other-server', ?1)",
        [far],
    )
    .unwrap();
    let asked = b.request_async(
        "workspace/executeCommand",
        json!({ "command": "star.repairNow" }),
    );
    b.wait_for("the repair under way", |m| {
        m["method"] == "star/status" && m["params"]["repairRunning"] == true
    });
    let holder = |db: &rusqlite::Connection| -> String {
        db.query_row("SELECT holder FROM leases WHERE name = 'repair'", [], |r| {
            r.get(0)
        })
        .unwrap()
    };
    assert_eq!(holder(&db), "other-server");
    // The other server's repair ends, leaving one failure it could not fix.
    db.execute("UPDATE leases SET expires_ms = 0, unfixed = 1", [])
        .unwrap();
    let report = b.response(asked);
    assert!(report["result"]["failures"].is_u64(), "{report}");
    assert!(
        holder(&db).starts_with(&format!("{}-", b.pid())),
        "the repair ran under its own lease"
    );
    b.shutdown();
}
