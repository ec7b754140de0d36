//! `star-ls replay` through the real binary on a tiny model that the server's repair patches: the
//! developer's lines are completed by the unpatched and the learning model, failures are repaired as
//! the server does (once 4 new ones are pending), what is learned serves the lines after, and the same replay
//! twice gives the same lines.

#[path = "support/tiny_model.rs"]
mod tiny_model;

use serde_json::Value;
use std::path::Path;
use std::process::Command;

/// Eight files with one target line each, the same idiom (`def` lines are under 12 characters).
fn write_corpus(dir: &Path) {
    std::fs::create_dir_all(dir.join("pkg")).unwrap();
    for k in 0..8 {
        let body = format!("def f{k}(x):\n    return x + 1\n");
        std::fs::write(dir.join(format!("pkg/m{k}.py")), body).unwrap();
    }
    // Not matched by the default glob, and a docstring and a comment that are never targets.
    std::fs::write(dir.join("notes.txt"), "return x + 100 and more\n").unwrap();
    std::fs::write(
        dir.join("pkg/z.py"),
        "\"\"\"A module docstring that is long.\n\nreturn x + 100 in a docstring\n\"\"\"\n# a comment that is long enough\n",
    )
    .unwrap();
}

fn replay(model: &Path, corpus: &Path, out: &Path) -> Value {
    let run = Command::new(env!("CARGO_BIN_EXE_star-ls"))
        .args(["replay", "--dir"])
        .arg(corpus)
        .arg("--json")
        .arg(out)
        .env("STAR_LS_MODEL", model)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    serde_json::from_slice(&std::fs::read(out).unwrap()).unwrap()
}

#[test]
fn a_replay_learns_from_its_failures_and_repeats_itself() {
    // Its completions end at once; a repair of four `return x + 1` lines keeps a patch that makes
    // one of the next four right (found by trying seeds).
    let model = tiny_model::cached(
        "replay",
        tiny_model::TinySpec {
            seed: 4,
            newline_logit: 14.0,
            ..tiny_model::TinySpec::default()
        },
    );
    let dir = std::env::temp_dir().join(format!("star-ls-replay-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_corpus(&dir.join("src"));
    let a = replay(&model, &dir.join("src"), &dir.join("a.json"));

    assert_eq!(
        (a["files"].as_u64(), a["lines"].as_u64()),
        (Some(8), Some(8)),
        "{a}"
    );
    let rows = a["rows"].as_array().unwrap();
    let ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids[0], "pkg/m0.py:2");
    assert_eq!(ids[7], "pkg/m7.py:2");
    // The unpatched model ends every line at once: the first four lines are failures, and the
    // fourth starts a repair. The three failures after the line its patch gets right are too few
    // for another.
    assert!(rows.iter().all(|r| r["baseline"] == ""), "{a}");
    assert_eq!(a["baseline_pass"], 0.0);
    assert_eq!(a["repairs"], 1, "{a}");
    let first = a["first_repaired_line"]
        .as_u64()
        .expect("a repair kept a patch") as usize;
    assert_eq!(first, 4, "the fourth failure starts the first repair");
    // What it learned serves the lines after it, and only those.
    assert!(rows[..first].iter().all(|r| r["patches_live"] == 0));
    assert!(rows[first..]
        .iter()
        .all(|r| r["patches_live"].as_u64() >= Some(1)));
    let after = &a["after_first_repair"];
    assert_eq!(after["lines"], 8 - first as u64);
    let right = |key: &str, rs: &[Value]| {
        rs.iter()
            .filter(|r| r[key].as_str().unwrap().trim_end() == r["target"])
            .count()
    };
    assert_eq!(after["gained"], right("repaired", &rows[first..]) as u64);
    assert!(after["gained"].as_u64() >= Some(1), "{a}");
    assert_eq!(after["lost"], 0);
    let last = a["curve"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["line"], 8);
    assert_eq!(last["repaired_pass"], a["repaired_pass"]);
    assert_eq!(
        a["repaired_pass"].as_f64().unwrap(),
        right("repaired", rows) as f64 / 8.0
    );
    // Entries are keys, at least one per failure learned (a count of patches would say 1).
    assert!(a["entries_live"].as_u64() >= Some(4), "{a}");

    let b = replay(&model, &dir.join("src"), &dir.join("b.json"));
    assert_eq!(a["rows"], b["rows"], "a replay is deterministic");
    let _ = std::fs::remove_dir_all(&dir);
}
