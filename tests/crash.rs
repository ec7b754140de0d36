//! Crash safety through the real binary on tiny random-weight models. SIGKILL at random moments (while
//! cases are written, while a repair runs, around the ledger write and the overlay swap that end it,
//! during a rollback) loses no committed case or patch, leaves no half-finished repair behind, keeps
//! `PRAGMA integrity_check` "ok", and after a restart the live overlay is the ledger's. A full disk and
//! a read-only data directory are reported once, clearly, while completions go on.

mod client;
#[path = "support/tiny_model.rs"]
mod tiny_model;

use client::Client;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rusqlite::Connection;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Noise without newlines: every completion is a few readable characters (nothing to repair).
fn noise_model() -> PathBuf {
    tiny_model::cached("crash", tiny_model::TinySpec::default())
}

/// `TinySpec::repairable`: one-line failures it repairs, patch after patch.
fn repairable_model() -> PathBuf {
    tiny_model::cached("crash-repairable", tiny_model::TinySpec::repairable())
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("star-ls-crash-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn options() -> Value {
    json!({ "debounceMs": 0, "maxTokens": 8, "captureIdleMs": 600000, "repairThreshold": 0,
            "threads": 1 })
}

fn sha256_hex(path: &Path) -> String {
    Sha256::digest(std::fs::read(path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn command(c: &mut Client, name: &str, args: Value) -> Value {
    c.call(
        "workspace/executeCommand",
        json!({ "command": name, "arguments": args }),
    )
}

/// Asks for a completion at the end of `line` and types `text` there, then a newline: the completion
/// is decided, one case (a failure unless the model said just that).
fn write_line(c: &mut Client, uri: &str, version: &mut i32, line: u32, at: u32, text: &str) {
    // Waited for: a completion that arrives after the next keystroke is stale and not followed.
    c.call(
        "textDocument/inlineCompletion",
        Client::inline_params(uri, line, at),
    );
    *version += 1;
    c.insert(uri, *version, line, at, text);
    *version += 1;
    c.insert(uri, *version, line, at + text.len() as u32, "\n");
}

/// Reads the server's messages (answering its requests) until `deadline`, or until `stop` holds for
/// one; that one is returned.
fn pump(c: &mut Client, deadline: Instant, stop: impl Fn(&Value) -> bool) -> Option<Value> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        if let Some(m) = c.next_message(left) {
            if stop(&m) {
                return Some(m);
            }
        }
    }
}

fn is_response(m: &Value, id: i64) -> bool {
    m.get("method").is_none() && m["id"] == id
}

fn open_db(data: &Path) -> Connection {
    Connection::open(data.join("feedback.sqlite3")).unwrap()
}

fn ids(conn: &Connection, sql: &str) -> BTreeSet<String> {
    let mut stmt = conn.prepare(sql).unwrap();
    let rows = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    rows
}

fn count(conn: &Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// Case ids with their digests: what a committed case is.
fn cases(conn: &Connection) -> BTreeMap<String, Vec<u8>> {
    let mut stmt = conn
        .prepare("SELECT 'case-' || id, digest FROM cases")
        .unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    rows
}

/// Patch number → active, the whole ledger.
fn ledger(conn: &Connection) -> BTreeMap<i64, bool> {
    let mut stmt = conn.prepare("SELECT id, active FROM patches").unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? != 0)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    rows
}

/// The active patches' ids, oldest first.
fn active(ledger: &BTreeMap<i64, bool>) -> Vec<String> {
    ledger
        .iter()
        .filter(|(_, a)| **a)
        .map(|(n, _)| format!("patch-{n}"))
        .collect()
}

fn number(id: &str) -> i64 {
    id.strip_prefix("patch-").unwrap().parse().unwrap()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Trial {
    /// Cases being written.
    Writes,
    /// A repair running: killed at a random moment of it.
    Repair,
    /// A repair near its end: its ledger write, the overlay swap, the reply.
    Swap,
    /// A rollback of the newest active patch.
    Rollback,
}

use Trial::*;

/// 20 trials: 6 while writing cases, 6 during repairs, 4 around the ledger write and swap, 4 rollbacks
/// (a rollback with no active patch to roll back is a swap trial instead).
const SCHEDULE: [Trial; 20] = [
    Writes, Repair, Swap, Repair, Rollback, Writes, Repair, Swap, Rollback, Writes, Repair, Swap,
    Writes, Rollback, Repair, Swap, Writes, Repair, Rollback, Writes,
];

/// What the test knows was committed before each kill.
#[derive(Default)]
struct Committed {
    cases: BTreeMap<String, Vec<u8>>,
    /// Patches a `star.repairNow` reply named.
    reported: BTreeSet<String>,
    /// Patches rolled back: a `star.rollback` reply named them, or the ledger says so.
    rolled_back: BTreeSet<String>,
    /// The ledger as last seen: rows never disappear, and a patch once inactive stays so.
    ledger: BTreeMap<i64, bool>,
}

/// What the kill interrupted, settled by what the file says afterwards.
struct Interrupted {
    trial: usize,
    kind: Trial,
    replied: bool,
    after_ms: u128,
    /// Whether the repair's progress had begun, and ended, when the kill came.
    began: bool,
    ended: bool,
    /// The patch a rollback trial was rolling back.
    target: Option<String>,
}

/// The file as the crash left it (the server is down): whole, nothing committed lost, no trace of a
/// half-finished repair. Returns what the ledger's new rows say about the interrupted trial.
fn check_file(data: &Path, sha: &str, known: &mut Committed, what: &Interrupted) -> String {
    let t = what.trial;
    let conn = open_db(data);
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok", "after trial {t}");
    let fk = count(&conn, "SELECT count(*) FROM pragma_foreign_key_check");
    assert_eq!(fk, 0, "after trial {t}: dangling foreign keys");

    let now = cases(&conn);
    for (id, digest) in &known.cases {
        assert_eq!(
            now.get(id),
            Some(digest),
            "after trial {t}: committed case {id} lost or changed"
        );
    }
    let ledger = ledger(&conn);
    let rolling = (what.kind == Rollback).then(|| number(what.target.as_ref().unwrap()));
    for (n, was_active) in &known.ledger {
        let is = ledger.get(n).copied();
        assert!(is.is_some(), "after trial {t}: patch-{n} left the ledger");
        assert!(
            is == Some(*was_active) || (*was_active && rolling == Some(*n)),
            "after trial {t}: patch-{n} went from active={was_active} to {is:?}"
        );
    }
    for id in &known.reported {
        let is = ledger.get(&number(id)).copied();
        let rolled = known.rolled_back.contains(id) || rolling == Some(number(id));
        assert!(
            is == Some(true) || (rolled && is == Some(false)),
            "after trial {t}: reported patch {id} not active: {ledger:?}"
        );
    }
    for id in &known.rolled_back {
        assert_eq!(
            ledger.get(&number(id)),
            Some(&false),
            "after trial {t}: {id}"
        );
    }
    let models = ids(&conn, "SELECT DISTINCT model_sha FROM patches");
    assert!(
        models.iter().all(|m| m == sha),
        "after trial {t}: {models:?}"
    );

    // No trace of a half-finished repair: a patch is whole with its layers, the cases it repaired
    // point at it, and nothing points at a patch that is not active.
    let no_layers = ids(
        &conn,
        "SELECT 'patch-' || id FROM patches p
         WHERE NOT EXISTS (SELECT 1 FROM patch_layers l WHERE l.patch_id = p.id)",
    );
    assert!(no_layers.is_empty(), "after trial {t}: {no_layers:?}");
    let orphans = count(
        &conn,
        "SELECT count(*) FROM patch_layers l
         WHERE NOT EXISTS (SELECT 1 FROM patches p WHERE p.id = l.patch_id)",
    );
    assert_eq!(orphans, 0, "after trial {t}: layers without a patch");
    let torn = count(
        &conn,
        // A column patch: `hidden × columns` floats of delta; a patch of values (no columns): one
        // `hidden` value per key of its centred gate.
        "SELECT count(*) FROM patch_layers
         WHERE length(columns) % 4 != 0
            OR (length(columns) > 0 AND length(delta) != hidden * length(columns))
            OR (length(columns) = 0 AND (gate_center IS NULL
                OR length(delta) * length(gate_center) != 4 * hidden * length(gate_keys)))",
    );
    assert_eq!(torn, 0, "after trial {t}: a patch layer of the wrong size");
    let dangling = ids(
        &conn,
        "SELECT 'case-' || id || ' → ' || repaired_by FROM cases c WHERE repaired_by IS NOT NULL
         AND NOT EXISTS (SELECT 1 FROM patches p WHERE 'patch-' || p.id = c.repaired_by AND p.active)",
    );
    assert!(
        dangling.is_empty(),
        "after trial {t}: cases marked by no active patch: {dangling:?}"
    );
    let unmarked = ids(
        &conn,
        "SELECT 'patch-' || id FROM patches p WHERE active
         AND NOT EXISTS (SELECT 1 FROM cases c WHERE c.repaired_by = 'patch-' || p.id)",
    );
    assert!(
        unmarked.is_empty(),
        "after trial {t}: active patches that repaired nothing: {unmarked:?}"
    );

    let new: Vec<String> = ledger
        .keys()
        .filter(|n| !known.ledger.contains_key(*n))
        .map(|n| format!("patch-{n}"))
        .collect();
    let outcome = match what.kind {
        Writes => "while writing cases".to_owned(),
        Repair | Swap => {
            assert!(new.len() <= 1, "after trial {t}: {new:?}");
            match (new.first(), what.replied) {
                (Some(id), true) => format!("after the reply ({id})"),
                (None, true) => "after the reply (no patch)".to_owned(),
                (Some(id), false) if what.ended => {
                    format!("after {id} was written and went live, before the reply")
                }
                (Some(id), false) => format!("after {id} was written, before the reply"),
                (None, false) if what.ended => "after a repair without a patch ended".to_owned(),
                (None, false) if what.began => "during the repair (nothing written)".to_owned(),
                (None, false) => "during the repair, as it began (nothing written)".to_owned(),
            }
        }
        Rollback => {
            assert!(new.is_empty(), "after trial {t}: {new:?}");
            let target = what.target.clone().unwrap();
            if !ledger[&number(&target)] {
                known.rolled_back.insert(target.clone());
            }
            match (ledger[&number(&target)], what.replied) {
                (true, _) => format!("before the rollback of {target} was written"),
                (false, false) => format!("after the rollback of {target}, before the reply"),
                (false, true) => format!("after the reply (rolled back {target})"),
            }
        }
    };
    known.cases = now;
    known.ledger = ledger;
    outcome
}

/// The ledger's active patches with their gates' thresholds (a later repair may narrow them), and
/// the cases they repaired (prefix, suffix), newest patch first.
fn active_cases(data: &Path) -> (Ledger, Vec<(String, String)>) {
    if !data.join("feedback.sqlite3").exists() {
        return Default::default();
    }
    let conn = open_db(data);
    let mut stmt = conn
        .prepare(
            "SELECT l.patch_id, l.layer, l.gate_thresholds FROM patch_layers l
             JOIN patches p ON p.id = l.patch_id WHERE p.active ORDER BY l.patch_id, l.layer",
        )
        .unwrap();
    let gates = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    let active = Ledger {
        ids: active(&ledger(&conn)).into_iter().collect(),
        gates,
    };
    let mut stmt = conn
        .prepare(
            "SELECT c.prefix, c.suffix FROM cases c
             JOIN patches p ON c.repaired_by = 'patch-' || p.id
             WHERE p.active ORDER BY p.id DESC, c.id",
        )
        .unwrap();
    let cases = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    (active, cases)
}

/// What the live model completes at each case (in a fresh document each), and the first item's id.
fn fingerprint(c: &mut Client, cases: &[(String, String)], tag: &str) -> (Vec<String>, Value) {
    let mut texts = Vec::new();
    let mut first = Value::Null;
    for (i, (prefix, suffix)) in cases.iter().enumerate() {
        let uri = format!("file:///w/{tag}-{i}.py");
        let line = prefix.matches('\n').count() as u32;
        let col = prefix.rsplit('\n').next().unwrap().len() as u32;
        c.open(&uri, &format!("{prefix}\n{suffix}"));
        let r = c.call(
            "textDocument/inlineCompletion",
            Client::inline_params(&uri, line, col),
        );
        if i == 0 {
            first = r["items"][0]["command"]["arguments"][0].clone();
        }
        texts.push(
            r["items"][0]["insertText"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
        );
    }
    (texts, first)
}

/// The active patches and, per patch and layer, its gate's thresholds as stored.
#[derive(Debug, Default, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Ledger {
    ids: BTreeSet<String>,
    gates: Vec<(i64, i64, Option<Vec<u8>>)>,
}

/// What the live model completed at the active patches' cases, by the ledger's active patches and
/// their thresholds, as first seen: live right after a repair's swap, or after a restart.
type Seen = BTreeMap<Ledger, Vec<String>>;

fn same_as_seen(seen: &mut Seen, active: Ledger, texts: Vec<String>, when: &str) {
    match seen.get(&active) {
        Some(before) => assert_eq!(
            &texts, before,
            "{when}: the model under {:?} completes differently than it did before",
            active.ids
        ),
        None => {
            seen.insert(active, texts);
        }
    }
}

/// Starts the server and checks that its overlay is the ledger's active patches for this model, from
/// its very first completion on: that one, asked for at once (while the model may still be loading)
/// at the newest active patch's case, proposes something (the bare model proposes nothing there) and
/// `star.explain` names exactly the active patches; the active patches' cases complete as they did
/// when this set of patches was live before; star.status and star.listPatches agree with the file.
fn start_checked(model: &Path, data: &Path, cache: &Path, trial: usize, seen: &mut Seen) -> Client {
    let (active, cases) = active_cases(data);
    let mut c = Client::start(
        model,
        options(),
        &[
            ("STAR_LS_DATA_DIR", data.to_str().unwrap()),
            ("STAR_LS_CACHE_DIR", cache.to_str().unwrap()),
        ],
    );
    let (texts, first) = fingerprint(&mut c, &cases, &format!("restart{trial}"));
    if !cases.is_empty() {
        assert!(
            !texts[0].is_empty(),
            "trial {trial}: the first completion after the restart is the bare model's (ledger: \
             {active:?})"
        );
        let explained = command(&mut c, "star.explain", json!([first]));
        let live: BTreeSet<String> = explained["patches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(live, active.ids, "trial {trial}: star.explain");
    }
    same_as_seen(seen, active.clone(), texts, &format!("restart {trial}"));
    c.wait_for("model loaded", |m| {
        m["method"] == "$/progress"
            && m["params"]["token"] == "star-ls/model"
            && m["params"]["value"]["kind"] == "end"
    });
    let status = c.status();
    assert_eq!(
        status["patches"].as_u64(),
        Some(active.ids.len() as u64),
        "trial {trial}: the live overlay is not the ledger's {active:?}: {status}"
    );
    let listed: BTreeSet<String> = command(&mut c, "star.listPatches", json!([]))
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, active.ids, "trial {trial}");
    let conn = open_db(data);
    assert_eq!(
        status["failuresPending"].as_i64().unwrap(),
        count(
            &conn,
            "SELECT count(*) FROM cases WHERE kind = 'failure' AND repaired_by IS NULL"
        ),
        "trial {trial}: {status}"
    );
    c
}

/// One failure the repair can fix, different for each `k` < 40: `def f{k}(v):` then `return v + {k % 10}`
/// typed over what the model proposed (`v` is x, a, b or y).
fn add_failure(c: &mut Client, k: usize) {
    let v = ["x", "a", "b", "y"][k / 10 % 4];
    let uri = format!("file:///w/f{k}.py");
    c.open(&uri, &format!("def f{k}({v}):\n    return \n"));
    let mut version = 1;
    write_line(c, &uri, &mut version, 1, 11, &format!("{v} + {}", k % 10));
}

#[test]
fn sigkill_while_writing_repairing_swapping_or_rolling_back_loses_nothing_committed() {
    let t0 = Instant::now();
    let model = repairable_model();
    let sha = sha256_hex(&model);
    let data = scratch_dir("kill");
    let cache = scratch_dir("kill-cache");
    let mut rng = StdRng::seed_from_u64(20);
    let mut known = Committed::default();
    // A repair's and a rollback's time from request to reply, as last measured: kills are timed
    // against them.
    let mut repair_ms = 80.0f64;
    let mut rollback_ms = 0.5f64;
    let mut outcomes: Vec<(Trial, String)> = Vec::new();
    let mut last: Option<Interrupted> = None;
    let mut seen = Seen::new();
    for (trial, &plan) in SCHEDULE.iter().enumerate() {
        if let Some(what) = last.take() {
            let outcome = check_file(&data, &sha, &mut known, &what);
            eprintln!(
                "trial {}: {:?}, killed {} ms in: {outcome}",
                what.trial, what.kind, what.after_ms
            );
            outcomes.push((what.kind, outcome));
        }
        let mut kind = plan;
        let target = if plan == Rollback {
            let newest = active(&known.ledger).into_iter().next_back();
            if newest.is_none() {
                kind = Swap; // nothing to roll back yet
            }
            newest
        } else {
            None
        };
        if matches!(kind, Repair | Swap) && data.join("feedback.sqlite3").exists() {
            // Each repair gets one fresh failure to fix: the tiny model's repair fixes one line, not a
            // batch, so pending failures left by earlier trials (their repair killed, or the
            // noise lines written) are retired first, while no server has the file open.
            let conn = open_db(&data);
            let retired = ids(
                &conn,
                "SELECT 'case-' || id FROM cases WHERE kind = 'failure' AND repaired_by IS NULL",
            );
            conn.execute(
                "DELETE FROM cases WHERE kind = 'failure' AND repaired_by IS NULL",
                [],
            )
            .unwrap();
            known.cases.retain(|id, _| !retired.contains(id));
        }

        let mut c = start_checked(&model, &data, &cache, trial, &mut seen);
        let mut what = Interrupted {
            trial,
            kind,
            replied: false,
            began: false,
            ended: false,
            after_ms: 0,
            target: target.clone(),
        };
        match kind {
            Writes => {
                let uri = format!("file:///w/t{trial}.py");
                c.open(&uri, "");
                let mut version = 1;
                let mut line = 0;
                let before = known.cases.len();
                // Lines until one case is decided: a proposal running over several lines is decided
                // only by writing past them (the tiny model may propose a run of blank lines).
                while known.cases.len() == before {
                    assert!(line < 16, "trial {trial}: no case written in {line} lines");
                    write_line(
                        &mut c,
                        &uri,
                        &mut version,
                        line,
                        0,
                        &format!("x{line} = {trial}"),
                    );
                    line += 1;
                    // star.status is answered after the writes sent before it: these are committed.
                    c.status();
                    known.cases = cases(&open_db(&data));
                }
                // More writes in flight, then SIGKILL among them.
                for _ in 0..rng.random_range(1..5) {
                    write_line(&mut c, &uri, &mut version, line, 0, &format!("y{line} = 1"));
                    line += 1;
                }
                let ms = rng.random_range(0..30);
                std::thread::sleep(Duration::from_millis(ms));
                what.after_ms = ms as u128;
            }
            Repair | Swap => {
                add_failure(&mut c, trial);
                let pending = c.status()["failuresPending"].as_u64();
                assert_eq!(pending, Some(1), "trial {trial}");
                known.cases = cases(&open_db(&data));
                // Repair: anywhere in it. Swap: near its end, or right when its progress ends (after
                // the ledger write and the swap, before the reply).
                let on_end = kind == Swap && rng.random_bool(0.5);
                let delay = match kind {
                    Repair => rng.random_range(0.0..1.0) * repair_ms,
                    _ if on_end => 10.0 * repair_ms,
                    _ => rng.random_range(0.75..1.25) * repair_ms,
                };
                let sent = Instant::now();
                let id = c.request_async(
                    "workspace/executeCommand",
                    json!({ "command": "star.repairNow" }),
                );
                let stop = pump(
                    &mut c,
                    sent + Duration::from_micros((delay * 1000.0) as u64),
                    |m| {
                        is_response(m, id)
                            || (on_end
                                && m["method"] == "$/progress"
                                && m["params"]["token"] == "star-ls/repair"
                                && m["params"]["value"]["kind"] == "end")
                    },
                );
                what.after_ms = sent.elapsed().as_millis();
                let progress = |kind: &str| {
                    c.notifications.iter().any(|m| {
                        m["method"] == "$/progress"
                            && m["params"]["token"] == "star-ls/repair"
                            && m["params"]["value"]["kind"] == kind
                    })
                };
                (what.began, what.ended) = (progress("begin"), progress("end"));
                if let Some(reply) = stop.filter(|m| is_response(m, id)) {
                    what.replied = true;
                    repair_ms = sent.elapsed().as_secs_f64() * 1000.0;
                    let report = &reply["result"];
                    assert!(report.is_object(), "trial {trial}: {reply}");
                    if let Some(p) = report["patchId"].as_str() {
                        known.reported.insert(p.to_owned());
                        // The overlay just swapped in, before the kill: a restart must serve the same.
                        let (active, cases) = active_cases(&data);
                        let (texts, _) = fingerprint(&mut c, &cases, &format!("swapped{trial}"));
                        same_as_seen(&mut seen, active, texts, &format!("trial {trial}"));
                    }
                } else {
                    repair_ms = repair_ms.max(delay);
                }
            }
            Rollback => {
                let target = target.unwrap();
                let ms = rng.random_range(0.0..1.0) * rollback_ms;
                let sent = Instant::now();
                let id = c.request_async(
                    "workspace/executeCommand",
                    json!({ "command": "star.rollback", "arguments": [target] }),
                );
                let stop = pump(
                    &mut c,
                    sent + Duration::from_micros((ms * 1000.0) as u64),
                    |m| is_response(m, id),
                );
                what.after_ms = sent.elapsed().as_millis();
                if let Some(reply) = stop {
                    what.replied = true;
                    rollback_ms = sent.elapsed().as_secs_f64() * 1000.0;
                    assert_eq!(
                        reply["result"]["rolledBack"],
                        json!([target]),
                        "trial {trial}"
                    );
                    known.rolled_back.insert(target.clone());
                } else {
                    rollback_ms = rollback_ms.max(ms);
                }
            }
        }
        c.kill();
        last = Some(what);
    }
    let what = last.take().unwrap();
    let outcome = check_file(&data, &sha, &mut known, &what);
    eprintln!(
        "trial {}: {:?}, killed {} ms in: {outcome}",
        what.trial, what.kind, what.after_ms
    );
    outcomes.push((what.kind, outcome));
    let c = start_checked(&model, &data, &cache, SCHEDULE.len(), &mut seen);
    c.shutdown();

    let tally = |f: &dyn Fn(&(Trial, String)) -> bool| outcomes.iter().filter(|o| f(o)).count();
    eprintln!(
        "{} trials in {:.1} s: {} while writing cases, {} during a repair, {} between the ledger \
         write and the reply, {} after a repair ended; rollbacks: {} before written, {} after \
         written before the reply, {} after the reply; {} patches reported, {} rolled back",
        outcomes.len(),
        t0.elapsed().as_secs_f64(),
        tally(&|o| o.0 == Writes),
        tally(&|o| o.1.starts_with("during the repair")),
        tally(&|o| o.0 != Rollback && o.1.contains("before the reply")),
        tally(&|o| o.0 != Rollback
            && (o.1.starts_with("after the reply") || o.1.starts_with("after a repair"))),
        tally(&|o| o.1.starts_with("before the rollback")),
        tally(&|o| o.0 == Rollback && o.1.contains("before the reply")),
        tally(&|o| o.0 == Rollback && o.1.starts_with("after the reply")),
        known.reported.len(),
        known.rolled_back.len(),
    );
    assert!(
        !known.ledger.is_empty(),
        "no repair committed a patch: the trials never reached the ledger"
    );
    let _ = std::fs::remove_dir_all(&data);
    let _ = std::fs::remove_dir_all(&cache);
}

/// Runs `script` with `sh` as root of a new user and mount namespace (`unshare -rm`), with `$0` the
/// star-ls binary and `$1` the data directory; the test fails, saying why, if that is not possible here.
fn namespaced(script: &str, data: &Path) -> Command {
    let probe = Command::new("unshare")
        .args([
            "-rm",
            "sh",
            "-c",
            "mount -t tmpfs -o size=64k tmpfs \"$1\"",
            "sh",
        ])
        .arg(data)
        .output();
    match probe {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "this test needs `unshare -rm` (a user and mount namespace) to mount a small or \
             read-only file system; it failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!("this test needs `unshare` (util-linux) to run: {e}"),
    }
    let mut cmd = Command::new("unshare");
    cmd.args(["-rm", "sh", "-c", script])
        .arg(env!("CARGO_BIN_EXE_star-ls"))
        .arg(data);
    cmd
}

fn start_namespaced(script: &str, data: &Path) -> Client {
    let mut c = Client::start_command(
        namespaced(script, data),
        &noise_model(),
        options(),
        &[("STAR_LS_DATA_DIR", data.to_str().unwrap())],
    );
    c.wait_for("model loaded", |m| {
        m["method"] == "$/progress"
            && m["params"]["token"] == "star-ls/model"
            && m["params"]["value"]["kind"] == "end"
    });
    c
}

fn store_warnings(c: &Client) -> Vec<String> {
    c.notifications
        .iter()
        .filter(|m| m["method"] == "window/showMessage")
        .filter_map(|m| m["params"]["message"].as_str())
        .filter(|s| s.contains("feedback"))
        .map(str::to_owned)
        .collect()
}

/// Completions at the end of `lines` lines of `uri`, each with a long text before it (so each stored
/// completion takes pages), until the store has complained or `max` have been asked for. Every one
/// is answered with an item.
fn complete_until_warned(c: &mut Client, uri: &str, lines: &mut u32, max: u32) {
    for _ in 0..max {
        if !store_warnings(c).is_empty() {
            return;
        }
        let r = c.call(
            "textDocument/inlineCompletion",
            Client::inline_params(uri, *lines, 0),
        );
        assert!(
            r["items"][0]["insertText"]
                .as_str()
                .is_some_and(|t| !t.is_empty()),
            "no completion: {r}"
        );
        // The next line: a decided completion, and a new place to complete.
        let text = format!("v{lines} = '{}'\n", "z".repeat(4000));
        c.insert(uri, *lines as i32 + 2, *lines, 0, &text);
        *lines += 1;
        // star.status waits for the writes sent before it.
        c.status();
    }
}

/// The server still completes and answers star.status, and has said once what is wrong with the store.
fn still_serving(c: &mut Client, uri: &str, lines: &mut u32, kind: &str, data: &Path) {
    let warnings = store_warnings(c);
    assert_eq!(
        warnings.len(),
        1,
        "one warning about the store: {warnings:?}"
    );
    let w = &warnings[0];
    eprintln!("{w}");
    assert!(
        w.to_lowercase().contains(kind) && w.contains(data.to_str().unwrap()),
        "the warning should name the trouble ({kind}) and {}: {w}",
        data.display()
    );
    for _ in 0..3 {
        let r = c.call(
            "textDocument/inlineCompletion",
            Client::inline_params(uri, *lines, 0),
        );
        assert!(r["items"][0]["insertText"].is_string(), "{r}");
        c.insert(uri, *lines as i32 + 2, *lines, 0, "w = 1\n");
        *lines += 1;
    }
    let status = c.status();
    assert!(
        status["model"].as_str().unwrap().starts_with("ready"),
        "{status}"
    );
    assert_eq!(store_warnings(c).len(), 1, "reported once");
}

/// Starts the server under `script` with its data in `data`, completes until the store's trouble is
/// reported (within `within` completions), and checks it names `kind` and keeps serving.
fn reported_and_serving(script: &str, data: &Path, within: u32, kind: &str) {
    let mut c = start_namespaced(script, data);
    let uri = "file:///w/trouble.py";
    c.open(uri, "");
    let mut lines = 0;
    complete_until_warned(&mut c, uri, &mut lines, within);
    still_serving(&mut c, uri, &mut lines, kind, data);
    c.shutdown();
}

#[test]
fn a_full_disk_is_reported_once_and_completions_go_on() {
    let data = scratch_dir("full");
    std::fs::create_dir_all(&data).unwrap();
    // A 256 KiB tmpfs: the store fills it within a few completions.
    reported_and_serving(
        "mount -t tmpfs -o size=256k,mode=700 tmpfs \"$1\" && exec \"$0\" serve",
        &data,
        60,
        "disk full",
    );
    // Full from the start: no room even to create the store.
    reported_and_serving(
        "mount -t tmpfs -o size=64k,mode=700 tmpfs \"$1\" \
         && { head -c 1M /dev/zero > \"$1/filler\" 2>/dev/null; exec \"$0\" serve; }",
        &data,
        5,
        "disk full",
    );
    let _ = std::fs::remove_dir_all(&data);
}

#[test]
fn a_read_only_data_dir_is_reported_once_and_completions_go_on() {
    // An empty read-only file system.
    let data = scratch_dir("ro-empty");
    std::fs::create_dir_all(&data).unwrap();
    reported_and_serving(
        "mount -t tmpfs -o ro tmpfs \"$1\" && exec \"$0\" serve",
        &data,
        5,
        "read-only",
    );
    let _ = std::fs::remove_dir_all(&data);

    // A store with cases in it, its directory then bound read-only onto itself.
    let data = scratch_dir("ro-store");
    let mut c = Client::start(
        &noise_model(),
        options(),
        &[("STAR_LS_DATA_DIR", data.to_str().unwrap())],
    );
    let uri = "file:///w/ro.py";
    c.open(uri, "");
    let mut lines = 0;
    complete_until_warned(&mut c, uri, &mut lines, 3);
    assert!(store_warnings(&c).is_empty());
    c.shutdown();
    reported_and_serving(
        "mount --bind \"$1\" \"$1\" && mount -o remount,bind,ro \"$1\" && exec \"$0\" serve",
        &data,
        5,
        "read-only",
    );
    let _ = std::fs::remove_dir_all(&data);
}
