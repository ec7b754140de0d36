//! A bounded soak through the real binary on a tiny random-weight model: 20 000 completion requests
//! from 4 documents with rapid edits and cancellations (`STAR_LS_SOAK_REQUESTS` changes the count,
//! `STAR_LS_SOAK_MODEL` the model).
//! Asserted: no hang (every request is answered, with a result or as cancelled), no error, no panic,
//! and the server's RSS after the warm-up stays within a bound. Latencies are printed, not asserted:
//! speed is the benchmarks' business.

mod client;
#[path = "support/tiny_model.rs"]
mod tiny_model;

use client::Client;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const REQUESTS: usize = 20_000;
const DOCUMENTS: usize = 4;
/// Requests outstanding at most: an editor typing fast has a few, not thousands.
const IN_FLIGHT: usize = 8;
/// RSS growth allowed from the end of the warm-up to the end of the soak.
const RSS_GROWTH_MB: f64 = 64.0;
const HANG: Duration = Duration::from_secs(60);

fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kb / 1024.0
}

fn percentile(xs: &[f64], p: f64) -> f64 {
    let mut xs = xs.to_vec();
    xs.sort_by(f64::total_cmp);
    xs[((xs.len() - 1) as f64 * p / 100.0).round() as usize]
}

/// One open document as the client sees it (ASCII and BMP characters only, so a char is a UTF-16 unit).
struct Doc {
    uri: String,
    lines: Vec<Vec<char>>,
    version: i32,
}

impl Doc {
    fn size(&self) -> usize {
        self.lines.iter().map(|l| l.len() + 1).sum()
    }

    fn text(&self) -> String {
        let lines: Vec<String> = self.lines.iter().map(|l| l.iter().collect()).collect();
        lines.join("\n")
    }
}

#[derive(Default)]
struct Tally {
    answered: usize,
    empty: usize,
    cancelled: usize,
    errors: Vec<String>,
}

#[test]
fn twenty_thousand_requests_with_edits_and_cancellations() {
    let requests: usize = std::env::var("STAR_LS_SOAK_REQUESTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(REQUESTS);
    // `STAR_LS_SOAK_MODEL` soaks another model (the packaged one, for the figures in the notes).
    let model = std::env::var_os("STAR_LS_SOAK_MODEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tiny_model::cached("soak", tiny_model::TinySpec::default()));
    let data = client::fresh_data_dir("soak");
    let mut c = Client::start(
        &model,
        json!({ "debounceMs": 0, "maxTokens": 8, "captureIdleMs": 200, "repairThreshold": 0 }),
        &[("STAR_LS_DATA_DIR", data.to_str().unwrap())],
    );
    let mut rng = StdRng::seed_from_u64(20_000);
    let mut docs: Vec<Doc> = (0..DOCUMENTS)
        .map(|i| {
            let text = format!("import os\n\ndef f{i}(path):\n    with open(path) as f:\n        return f.read()\n\n");
            c.open(&format!("file:///soak/d{i}.py"), &text);
            Doc {
                uri: format!("file:///soak/d{i}.py"),
                lines: text.split('\n').map(|l| l.chars().collect()).collect(),
                version: 1,
            }
        })
        .collect();

    let mut pending: HashMap<i64, (Instant, usize)> = HashMap::new();
    let mut latencies: Vec<(usize, f64)> = Vec::new();
    let mut tally = Tally::default();
    let mut rss = Vec::new();
    let warmup = requests / 20;
    let started = Instant::now();
    let settle = |c: &mut Client,
                  pending: &mut HashMap<i64, (Instant, usize)>,
                  tally: &mut Tally,
                  latencies: &mut Vec<(usize, f64)>,
                  wait: Duration| {
        let Some(msg) = c.next_message(wait) else {
            return false;
        };
        let Some(id) = msg.get("id").and_then(|i| i.as_i64()) else {
            return true;
        };
        if msg.get("method").is_some() {
            return true; // the server's own request
        }
        let Some((t0, n)) = pending.remove(&id) else {
            return true;
        };
        if let Some(e) = msg.get("error") {
            if e["code"] == -32800 {
                tally.cancelled += 1;
            } else {
                tally.errors.push(msg.to_string());
            }
        } else {
            let r = &msg["result"];
            let items = r["items"].as_array().or_else(|| r.as_array());
            if r.is_null() || items.is_some_and(|i| i.is_empty()) {
                tally.empty += 1; // superseded by a newer request, or nothing to propose
            } else {
                tally.answered += 1;
                latencies.push((n, t0.elapsed().as_secs_f64() * 1e3));
            }
        }
        true
    };

    for n in 0..requests {
        // An edit: a character typed or deleted at a random place, or a new line.
        let doc = &mut docs[rng.random_range(0..DOCUMENTS)];
        let line = rng.random_range(0..doc.lines.len());
        let col = rng.random_range(0..=doc.lines[line].len());
        // Typing grows a document up to about its first size; past it, deletions shrink it again, so
        // the soak's end runs on prompts like its start's.
        let grow = doc.size() < 400;
        let (change, cursor) = match rng.random_range(0..20) {
            0 => (json!({ "text": doc.text() }), (line, col)), // whole text, as some clients send
            1..=11 if grow => {
                let ch = *b"abcdefghijklmnopqrstuvwxyz_(). =:"
                    .get(rng.random_range(0..33))
                    .unwrap() as char;
                let ch = if rng.random_bool(0.02) { 'é' } else { ch };
                doc.lines[line].insert(col, ch);
                let at = json!({ "line": line, "character": col });
                (
                    json!({ "range": { "start": at, "end": at }, "text": ch.to_string() }),
                    (line, col + 1),
                )
            }
            12 | 13 if grow => {
                let rest = doc.lines[line].split_off(col);
                doc.lines.insert(line + 1, rest);
                let at = json!({ "line": line, "character": col });
                (
                    json!({ "range": { "start": at, "end": at }, "text": "\n" }),
                    (line + 1, 0),
                )
            }
            _ if col > 0 => {
                doc.lines[line].remove(col - 1);
                let start = json!({ "line": line, "character": col - 1 });
                let end = json!({ "line": line, "character": col });
                (
                    json!({ "range": { "start": start, "end": end }, "text": "" }),
                    (line, col - 1),
                )
            }
            _ if line > 0 => {
                // Backspace at a line start joins it to the line before.
                let rest = doc.lines.remove(line);
                let prev = doc.lines[line - 1].len();
                doc.lines[line - 1].extend(rest);
                let start = json!({ "line": line - 1, "character": prev });
                let end = json!({ "line": line, "character": 0 });
                (
                    json!({ "range": { "start": start, "end": end }, "text": "" }),
                    (line - 1, prev),
                )
            }
            _ => (json!({ "text": doc.text() }), (line, col)),
        };
        doc.version += 1;
        c.notify(
            "textDocument/didChange",
            json!({ "textDocument": { "uri": doc.uri, "version": doc.version },
                    "contentChanges": [change] }),
        );
        let (l, ch) = (cursor.0 as u32, cursor.1 as u32);
        let id = if rng.random_bool(0.5) {
            c.request_async(
                "textDocument/inlineCompletion",
                Client::inline_params(&doc.uri, l, ch),
            )
        } else {
            c.request_async(
                "textDocument/completion",
                Client::completion_params(&doc.uri, l, ch),
            )
        };
        pending.insert(id, (Instant::now(), n));
        if rng.random_bool(0.1) {
            let victim = *pending.keys().next().unwrap();
            c.notify("$/cancelRequest", json!({ "id": victim }));
        }
        while settle(
            &mut c,
            &mut pending,
            &mut tally,
            &mut latencies,
            Duration::ZERO,
        ) {}
        while pending.len() >= IN_FLIGHT {
            assert!(
                settle(&mut c, &mut pending, &mut tally, &mut latencies, HANG),
                "hang: {} requests unanswered for {HANG:?} at request {n}",
                pending.len()
            );
        }
        if n + 1 == warmup || (n + 1) % (requests / 4).max(1) == 0 {
            rss.push((n + 1, rss_mb(c.pid())));
        }
    }
    while !pending.is_empty() {
        assert!(
            settle(&mut c, &mut pending, &mut tally, &mut latencies, HANG),
            "hang: {} requests never answered",
            pending.len()
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    let status = c.status();
    let err = c.shutdown();

    let window = |from: usize, to: usize| -> Vec<f64> {
        latencies
            .iter()
            .filter(|(n, _)| (from..to).contains(n))
            .map(|(_, ms)| *ms)
            .collect()
    };
    let (first, last) = (
        window(warmup, warmup + requests / 10),
        window(requests - requests / 10, requests),
    );
    eprintln!(
        "soak: {requests} requests in {seconds:.1} s: {} answered, {} empty (superseded), {} cancelled; \
         latency ms p50/p95 first tenth {:.2}/{:.2}, last tenth {:.2}/{:.2}; RSS MB {:?}; {} completions recorded",
        tally.answered,
        tally.empty,
        tally.cancelled,
        percentile(&first, 50.0),
        percentile(&first, 95.0),
        percentile(&last, 50.0),
        percentile(&last, 95.0),
        rss,
        status["completionsRecorded"],
    );
    assert!(
        tally.errors.is_empty(),
        "errors: {:?}",
        &tally.errors[..tally.errors.len().min(5)]
    );
    assert_eq!(tally.answered + tally.empty + tally.cancelled, requests);
    // The rest were superseded by a newer request for their document, or cancelled: with a slow model
    // (the packaged one) most are.
    assert!(
        tally.answered > requests / 4,
        "only {} of {requests} requests got a completion",
        tally.answered
    );
    let (start, end) = (rss[0].1, rss[rss.len() - 1].1);
    assert!(
        end <= start + RSS_GROWTH_MB,
        "RSS grew from {start:.0} MB to {end:.0} MB over the soak"
    );
    assert!(!err.contains("panicked"));
}
