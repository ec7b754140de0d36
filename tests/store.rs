//! The feedback store on a real SQLite file: permissions, schema, deduplication, pruning, and writes
//! that survive a locked database.

use star_ls::capture::{CaseKind, CaseText, Outcome};
use star_ls::store::{NewCase, ShownRecord, Store, StoreHandle, StoreOp, FILE_NAME};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("star-ls-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir.join("data") // not yet there: the store creates it
}

fn case(target: &str, kind: CaseKind) -> NewCase {
    NewCase {
        case: CaseText {
            kind,
            outcome: match kind {
                CaseKind::Failure => Outcome::Rejected,
                CaseKind::Guard => Outcome::Accepted,
            },
            prefix: "def f(x):\n    return ".into(),
            target: target.into(),
            suffix: "\n".into(),
            proposed: "x".into(),
        },
        completion_id: Some("c1".into()),
        language: "python".into(),
        document: "file:///w/f.py".into(),
        workspace: "file:///w".into(),
        created_ms: 1,
    }
}

fn shown(id: &str, prefix_len: usize, shown_ms: i64) -> ShownRecord {
    ShownRecord {
        id: id.into(),
        document: "file:///w/f.py".into(),
        workspace: "file:///w".into(),
        language: "python".into(),
        version: 1,
        line: 1,
        character: 11,
        prefix: "x".repeat(prefix_len),
        suffix: String::new(),
        proposed: "a + b".into(),
        patches: vec!["p1".into()],
        fired: serde_json::json!([{ "patch": "p1", "layer": 20, "keys": [0, 3], "rows": 2 }]),
        shown_ms,
    }
}

#[cfg(unix)]
#[test]
fn files_are_private_and_the_schema_is_versioned() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("perm");
    let store = Store::open(&dir, 1 << 30).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(FILE_NAME)), 0o600);
    drop(store);
    let conn = rusqlite::Connection::open(dir.join(FILE_NAME)).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    let journal: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!((version, journal.as_str()), (7, "wal"));
    // A store from a newer star-ls is refused, not misread.
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let err = Store::open(&dir, 1 << 30).err().unwrap().to_string();
    assert!(err.contains("newer star-ls"), "{err}");
}

#[test]
fn identical_cases_are_stored_once_and_counted() {
    let dir = temp_dir("dedup");
    let mut store = Store::open(&dir, 1 << 30).unwrap();
    assert!(store.add_case(&case("x + 1", CaseKind::Failure)).unwrap());
    assert!(!store.add_case(&case("x + 1", CaseKind::Failure)).unwrap());
    assert!(store.add_case(&case("x + 2", CaseKind::Failure)).unwrap());
    assert!(store.add_case(&case("x", CaseKind::Guard)).unwrap());
    let counts = store.counts().unwrap();
    assert_eq!((counts.failures_pending, counts.guard_cases), (2, 1));
    let failures = store.cases(Some(CaseKind::Failure)).unwrap();
    let targets: Vec<_> = failures.iter().map(|c| c.target.as_str()).collect();
    assert_eq!(targets, ["x + 1", "x + 2"]);
    assert_eq!(failures[0].id, "case-1");
    store.record_shown(&shown("c1", 10, 1)).unwrap();
    let explained = store.explain("c1").unwrap().unwrap();
    assert_eq!(explained.patches, vec!["p1".to_owned()]);
    assert_eq!(
        explained.fired.unwrap()[0]["keys"],
        serde_json::json!([0, 3])
    );
    assert!(store.explain("nope").unwrap().is_none());
}

#[test]
fn the_size_cap_prunes_oldest_first() {
    let dir = temp_dir("prune");
    let mut store = Store::open(&dir, 256 * 1024).unwrap();
    for i in 0..200 {
        store
            .record_shown(&shown(&format!("c{i}"), 4096, i))
            .unwrap();
    }
    store.add_case(&case("x + 1", CaseKind::Failure)).unwrap();
    assert!(store.used_bytes().unwrap() > 256 * 1024);
    let deleted = store.prune().unwrap();
    assert!(deleted > 0);
    assert!(store.used_bytes().unwrap() <= 256 * 1024);
    // Shown completions go first, oldest first; the case stays.
    assert!(store.explain("c0").unwrap().is_none());
    assert!(store.explain("c199").unwrap().is_some());
    assert_eq!(store.counts().unwrap().failures_pending, 1);
}

#[test]
fn writes_wait_out_a_locked_database_and_the_trouble_is_reported_once() {
    let dir = temp_dir("locked");
    drop(Store::open(&dir, 1 << 30).unwrap());
    let locker = rusqlite::Connection::open(dir.join(FILE_NAME)).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();

    let (errors_tx, errors) = mpsc::channel();
    let handle = StoreHandle::start(dir.clone(), 1 << 30, move |e| {
        let _ = errors_tx.send(e.kind());
    });
    let resolved = |target: &str| StoreOp::Resolved {
        completion_id: None,
        outcome: Some(Outcome::Rejected),
        case: Some(case(target, CaseKind::Failure)),
        at_ms: 1,
    };
    handle.send(resolved("x + 1"));
    handle.send(resolved("x + 2"));
    assert_eq!(
        errors.recv_timeout(Duration::from_secs(30)).unwrap(),
        "database locked"
    );
    locker.execute_batch("COMMIT").unwrap();
    drop(locker);

    // The queued writes land on the next operation; nothing was lost.
    handle.send(resolved("x + 3"));
    let (tx, rx) = mpsc::channel();
    handle.send(StoreOp::Flush(Box::new(move || tx.send(()).unwrap())));
    rx.recv_timeout(Duration::from_secs(30)).unwrap();
    let store = Store::open_read_only(&dir).unwrap();
    let targets: Vec<_> = store
        .cases(None)
        .unwrap()
        .into_iter()
        .map(|c| c.target)
        .collect();
    assert_eq!(targets, ["x + 1", "x + 2", "x + 3"]);
    assert!(errors.try_recv().is_err(), "reported once");
}

#[test]
fn the_ledger_keeps_patches_and_their_cases_together() {
    use star_ls::store::{PatchGate, PatchLayer};
    let dir = temp_dir("ledger");
    let mut store = Store::open(&dir, 1 << 30).unwrap();
    store.add_case(&case("x + 1", CaseKind::Failure)).unwrap();
    store.add_case(&case("x + 2", CaseKind::Failure)).unwrap();
    let layers = vec![
        PatchLayer {
            layer: 20,
            hidden: 2,
            columns: vec![3, 9],
            delta: vec![0.5, -1.0, 2.0, 0.25],
            gate: None,
        },
        PatchLayer {
            layer: 21,
            hidden: 2,
            columns: vec![4],
            delta: vec![1.5, -0.5],
            gate: Some(PatchGate {
                keys: vec![1.0, -1.0, 1.0],
                center: None,
                threshold: 0.85,
                thresholds: vec![],
            }),
        },
        PatchLayer {
            layer: 22,
            hidden: 2,
            columns: vec![1],
            delta: vec![0.5, 0.5],
            gate: Some(PatchGate {
                keys: vec![0.6, 0.8, 0.0, 0.0, 1.0, 0.0],
                center: Some(vec![0.25, -0.5, 1.0]),
                threshold: 0.4,
                thresholds: vec![],
            }),
        },
        // Values: no columns, one value per key, a threshold per key.
        PatchLayer {
            layer: 23,
            hidden: 2,
            columns: vec![],
            delta: vec![0.5, 0.5, -1.0, 2.0],
            gate: Some(PatchGate {
                keys: vec![0.6, 0.8, 0.0, 0.0, 1.0, 0.0],
                center: Some(vec![0.25, -0.5, 1.0]),
                threshold: 0.4,
                thresholds: vec![0.4, 0.25],
            }),
        },
    ];
    let report = serde_json::json!({ "fixed": 1 });
    let id = store
        .add_patch("sha", 5, &report, &layers, &["case-1".into()])
        .unwrap();
    assert_eq!(id, "patch-1");
    assert_eq!(store.counts().unwrap().failures_pending, 1);
    let patches = store.patches(Some("sha"), true).unwrap();
    assert_eq!(patches.len(), 1);
    assert_eq!(
        (patches[0].layers.clone(), patches[0].cases.clone()),
        (layers.clone(), vec!["case-1".to_owned()])
    );
    assert!(patches[0].gated);
    let set = star_ls::learn::overlay(&patches).unwrap();
    let per_key = |l| {
        set.gated_at(l)
            .next()
            .unwrap()
            .gate()
            .unwrap()
            .thresholds()
            .to_vec()
    };
    assert_eq!(
        (per_key(22), per_key(23)),
        (vec![0.4, 0.4], vec![0.4, 0.25])
    );
    assert_eq!(patches[0].report["fixed"], 1);
    assert!(store.patches(Some("other model"), true).unwrap().is_empty());

    // A later repair narrows a gate: its keys' thresholds are stored, the highest as the gate's;
    // a layer without a gate, or a patch not active, is not narrowed.
    use star_ls::store::NarrowedGate;
    let narrow = |patch: &str, layer, thresholds: Vec<f32>| NarrowedGate {
        patch: patch.into(),
        layer,
        thresholds,
    };
    let narrowed = store
        .narrow_gates(&[
            narrow("patch-1", 23, vec![1.02, 0.25]),
            narrow("patch-1", 20, vec![0.5]),
            narrow("patch-7", 23, vec![0.5, 0.5]),
        ])
        .unwrap();
    assert_eq!(narrowed, ["patch-1"]);
    let again = store.patches(Some("sha"), true).unwrap();
    let gate = again[0].layers[3].gate.clone().unwrap();
    assert_eq!((gate.thresholds, gate.threshold), (vec![1.02, 0.25], 1.02));
    assert_eq!(again[0].layers[..3], layers[..3]);
    let set = star_ls::learn::overlay(&again).unwrap();
    let stored = set.gated_at(23).next().unwrap().gate().unwrap();
    assert_eq!(stored.thresholds(), [1.02, 0.25]);

    assert!(store.rollback(Some("patch-9")).is_err());
    assert_eq!(store.rollback(None).unwrap(), ["patch-1"]);
    assert_eq!(
        store.counts().unwrap().failures_pending,
        2,
        "its cases are pending again"
    );
    assert!(store.patches(None, true).unwrap().is_empty());
    assert_eq!(
        store.patches(None, false).unwrap().len(),
        1,
        "rolled back, not forgotten"
    );
}

/// A ledger written before gates keyed on the layer (schema 3, no `gate_center`, no `fired`) opens
/// migrated: its gates read as keyed on their columns, as they were written, and serve; its
/// completions explain their patches and say nothing of what fired.
#[test]
fn a_ledger_from_before_layer_keys_is_migrated() {
    use star_ls::store::{PatchGate, PatchLayer};
    let dir = temp_dir("migrate");
    let layers = vec![PatchLayer {
        layer: 1,
        hidden: 2,
        columns: vec![4, 7],
        delta: vec![1.5, -0.5, 0.25, 1.0],
        gate: Some(PatchGate {
            keys: vec![0.6, 0.8],
            center: None,
            threshold: 0.9,
            thresholds: vec![],
        }),
    }];
    let mut store = Store::open(&dir, 1 << 30).unwrap();
    let report = serde_json::json!({ "fixed": 1 });
    store.add_patch("sha", 5, &report, &layers, &[]).unwrap();
    store.record_shown(&shown("c1", 10, 1)).unwrap();
    drop(store);
    let conn = rusqlite::Connection::open(dir.join(FILE_NAME)).unwrap();
    conn.execute_batch(
        "ALTER TABLE patch_layers DROP COLUMN gate_center;
         ALTER TABLE patch_layers DROP COLUMN gate_thresholds;
         ALTER TABLE completions DROP COLUMN fired;
         DROP TABLE leases;
         PRAGMA user_version = 3;",
    )
    .unwrap();
    drop(conn);

    let store = Store::open(&dir, 1 << 30).unwrap();
    let patches = store.patches(Some("sha"), true).unwrap();
    assert_eq!(patches[0].layers, layers);
    let set = star_ls::learn::overlay(&patches).unwrap();
    let gate = set.gated_at(1).next().unwrap().gate().unwrap();
    assert!(gate.center().is_none() && gate.keys().dims2().unwrap() == (1, 2));
    // A completion shown before entries were noted: its patches, and nothing said of what fired.
    let explained = store.explain("c1").unwrap().unwrap();
    assert_eq!((explained.patches.len(), explained.fired), (1, None));
    drop(store);
    let conn = rusqlite::Connection::open(dir.join(FILE_NAME)).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 7);
}

/// A patch whose ledger rows were damaged on disk (a torn blob, half a gate, a neuron past the
/// model's) is listed with the reason and can be rolled back, but is left out of the overlay whole;
/// every other patch still reads and applies.
#[test]
fn a_damaged_ledger_row_leaves_the_other_patches_applied() {
    use star_ls::model::Config;
    use star_ls::store::PatchLayer;
    let dir = temp_dir("damaged");
    let mut store = Store::open(&dir, 1 << 30).unwrap();
    let layer = |layer: usize, columns: Vec<u32>| PatchLayer {
        layer,
        hidden: 2,
        delta: vec![0.5; 2 * columns.len()],
        columns,
        gate: None,
    };
    let report = serde_json::json!({ "fixed": 1 });
    for columns in [vec![3], vec![4, 5], vec![6], vec![7]] {
        store
            .add_patch("sha", 1, &report, &[layer(1, columns)], &[])
            .unwrap();
    }
    let conn = rusqlite::Connection::open(dir.join(FILE_NAME)).unwrap();
    conn.execute(
        "UPDATE patch_layers SET delta = x'00112233445566' WHERE patch_id = 2",
        [],
    )
    .unwrap();
    conn.execute(
        "UPDATE patch_layers SET gate_threshold = 0.9 WHERE patch_id = 3",
        [],
    )
    .unwrap();
    conn.execute("UPDATE patches SET report = x'ff' WHERE id = 4", [])
        .unwrap();
    conn.execute(
        "UPDATE patch_layers SET columns = x'00010000' WHERE patch_id = 4",
        [],
    )
    .unwrap();

    let mut records = store.patches(Some("sha"), true).unwrap();
    let damaged: Vec<_> = records.iter().map(|r| r.damaged.is_some()).collect();
    assert_eq!(damaged, [false, true, true, false], "{records:#?}");
    assert!(records[1].damaged.as_ref().unwrap().contains("7 bytes"));
    assert!(records[2].damaged.as_ref().unwrap().contains("half a gate"));
    assert!(records[1].layers.is_empty() && records[2].layers.is_empty());
    assert_eq!(
        records[3].report,
        serde_json::Value::Null,
        "an unreadable report is no report"
    );
    let listed = serde_json::to_value(&records).unwrap();
    assert!(listed[1]["damaged"].is_string() && listed[0].get("damaged").is_none());

    // Patch 4 reads, but neuron 256 is past a 128-neuron model's: it would fail every pass.
    let config = Config {
        vocab_size: 300,
        hidden_size: 2,
        intermediate_size: 128,
        num_layers: 2,
        num_heads: 1,
        num_kv_heads: 1,
        head_dim: 2,
        rope_theta: 1e4,
        rms_eps: 1e-6,
        context_length: 64,
    };
    star_ls::learn::check_fit(&mut records, &config);
    assert!(records[3]
        .damaged
        .as_ref()
        .unwrap()
        .contains("does not fit"));
    let set = star_ls::learn::overlay(&records).unwrap();
    let applied: Vec<Vec<u32>> = set.iter().map(|(_, p)| p.columns().to_vec()).collect();
    assert_eq!(applied, [vec![3]], "only the sound patch applies");

    assert_eq!(store.rollback(Some("patch-2")).unwrap(), ["patch-2"]);
    assert_eq!(store.patches(Some("sha"), true).unwrap().len(), 3);
}

#[test]
fn forget_wipes_a_workspace_and_the_patches_that_learned_from_it() {
    use star_ls::store::PatchLayer;
    let dir = temp_dir("forget");
    let mut store = Store::open(&dir, 1 << 30).unwrap();
    let in_workspace = |target: &str, workspace: &str| NewCase {
        workspace: workspace.into(),
        ..case(target, CaseKind::Failure)
    };
    let secret = "SECRET_TOKEN_1234567890";
    store.add_case(&in_workspace(secret, "file:///a")).unwrap(); // case-1
    store.add_case(&in_workspace("x + 2", "file:///b")).unwrap(); // case-2
    store.add_case(&in_workspace("x + 3", "file:///b")).unwrap(); // case-3
    store.record_shown(&shown("c1", 4, 1)).unwrap(); // workspace file:///w
    let layer = PatchLayer {
        layer: 1,
        hidden: 1,
        columns: vec![0],
        delta: vec![1.0],
        gate: None,
    };
    let report = serde_json::json!({});
    let mut patch = |cases: &[&str]| {
        let cases: Vec<String> = cases.iter().map(|c| c.to_string()).collect();
        store
            .add_patch("sha", 1, &report, std::slice::from_ref(&layer), &cases)
            .unwrap()
    };
    let mixed = patch(&["case-1", "case-2"]); // learned from a and b
    let only_b = patch(&["case-3"]);
    assert_eq!(store.counts().unwrap().failures_pending, 0);
    assert_eq!(
        store.workspaces().unwrap(),
        [
            ("file:///a".to_owned(), 1),
            ("file:///b".to_owned(), 2),
            ("file:///w".to_owned(), 0)
        ]
    );

    let gone = store.forget(Some("file:///a")).unwrap();
    assert_eq!((gone.cases, gone.completions), (1, 0));
    assert_eq!(gone.patches, [mixed], "a patch that learned from a goes");
    let left = store.patches(None, false).unwrap();
    assert_eq!(left.iter().map(|p| &p.id).collect::<Vec<_>>(), [&only_b]);
    let cases = store.cases(None).unwrap();
    assert_eq!(cases.len(), 2);
    assert!(cases.iter().all(|c| c.workspace == "file:///b"));
    assert_eq!(
        store.counts().unwrap().failures_pending,
        1,
        "b's case that the forgotten patch repaired is pending again"
    );
    // Nothing of the forgotten text is left in the files (secure_delete, WAL truncated).
    drop(store);
    for entry in std::fs::read_dir(&dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the forgotten case's text is still on disk"
        );
    }

    let mut store = Store::open(&dir, 1 << 30).unwrap();
    let gone = store.forget(None).unwrap();
    assert_eq!((gone.cases, gone.completions), (2, 1));
    assert_eq!(gone.patches, [only_b]);
    assert!(store.workspaces().unwrap().is_empty());
    assert!(store.patches(None, false).unwrap().is_empty());
}
