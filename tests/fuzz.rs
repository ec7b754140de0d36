//! Protocol fuzzing of the real binary on a tiny random-weight model: thousands of malformed, mistyped
//! and out-of-order messages from a seeded generator, mixed with real editing traffic. Every request
//! the server can read is answered (with the error code the protocol asks for, where it is certain),
//! nothing panics, and a real completion still comes back afterwards. After `shutdown`, requests are
//! refused with InvalidRequest and `exit` ends the server cleanly.

mod client;
#[path = "support/tiny_model.rs"]
mod tiny_model;

use client::Client;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The defaults; `STAR_LS_FUZZ_SEED` and `STAR_LS_FUZZ_MESSAGES` override them to explore further.
const SEED: u64 = 0x5EED_2025;
const MESSAGES: usize = 20_000;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;

/// The documents the traffic is about; the last one is never opened.
const URIS: &[&str] = &[
    "file:///fuzz/a.py",
    "file:///fuzz/b.rs",
    "file:///fuzz/%F0%9F%98%80/c%20d.py",
    "untitled:Untitled-1",
    "file:///fuzz/never-opened.py",
];

/// Text pieces: multi-byte and astral chars (two UTF-16 units), every line ending and Unicode's
/// other line breaks, NUL and BOM, special-token lookalikes and a header lookalike.
#[rustfmt::skip]
const PIECES: &[&str] = &[
    "a", "x", "def ", "f(", ")", ":", " ", "    ", "\t", "return ", "1", "\n", "\n", "\r\n", "\r",
    "é", "中", "😀", "𝕏", "\u{0}", "\u{feff}", "\u{2028}", "\u{85}", "\u{c}", "\"", "\\", "}", "{",
    "<|endoftext|>", "<|fim_middle|>", "Content-Length: 5",
];

/// A placeholder replaced by a raw JSON escape (a lone surrogate) after serialization.
const ESCAPE: &str = "@@ESCAPE@@";

fn start(tag: &str) -> Client {
    let model = tiny_model::cached("fuzz", tiny_model::TinySpec::default());
    let data = client::fresh_data_dir(tag);
    Client::start(
        &model,
        json!({ "debounceMs": 0, "maxTokens": 8, "captureIdleMs": 600000, "repairThreshold": 0 }),
        &[("STAR_LS_DATA_DIR", data.to_str().unwrap())],
    )
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = format!("Content-Length: {}\r\n\r\n", body.len()).into_bytes();
    out.extend_from_slice(body);
    out
}

/// What the answer to a request must be.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// A result or an error, whichever.
    Any,
    Ok,
    Error(i64),
}

/// One message's body and the answer it is due (None: a notification, a message the transport drops,
/// or one whose answer cannot be matched to it).
struct Body {
    bytes: Vec<u8>,
    due: Option<(Value, Expect)>,
}

impl Body {
    fn json(msg: &Value, due: Option<(Value, Expect)>) -> Self {
        Self {
            bytes: serde_json::to_vec(msg).unwrap(),
            due,
        }
    }

    fn dropped(bytes: impl Into<Vec<u8>>) -> Self {
        Self {
            bytes: bytes.into(),
            due: None,
        }
    }
}

struct Fuzzer {
    rng: StdRng,
    next_id: i64,
    versions: HashMap<String, i32>,
    /// Ids of requests due any answer, the targets of `$/cancelRequest`.
    cancellable: Vec<Value>,
    /// Completion ids the server has handed out, for the capture notifications and commands.
    completions: Vec<String>,
    repairs: u32,
    initialized: u32,
    /// The previous message broke the framing: the next one is framed plainly so the stream can
    /// resynchronise on its header.
    resync: bool,
    // What the test has seen.
    sent: usize,
    dropped_by_transport: usize,
    odd_frames: usize,
    broken_frames: usize,
    due: HashMap<String, (Expect, String)>,
    answered: usize,
    stray_answers: usize,
    wrong: Vec<String>,
}

impl Fuzzer {
    fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            next_id: 1_000_000,
            versions: HashMap::new(),
            cancellable: Vec::new(),
            completions: Vec::new(),
            repairs: 0,
            initialized: 0,
            resync: false,
            sent: 0,
            dropped_by_transport: 0,
            odd_frames: 0,
            broken_frames: 0,
            due: HashMap::new(),
            answered: 0,
            stray_answers: 0,
            wrong: Vec::new(),
        }
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.random_bool(p)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.rng.random_range(0..items.len())]
    }

    fn text(&mut self, max_pieces: usize) -> String {
        let n = self.rng.random_range(0..=max_pieces);
        (0..n).map(|_| *self.pick(PIECES)).collect()
    }

    fn garbage(&mut self, max: usize) -> Vec<u8> {
        // Any bytes but a newline or a colon: garbage never looks like a header line.
        let n = self.rng.random_range(1..=max);
        (0..n)
            .map(|_| loop {
                let b: u8 = self.rng.random();
                if b != b'\n' && b != b':' {
                    break b;
                }
            })
            .collect()
    }

    fn uri(&mut self) -> String {
        if self.chance(0.9) {
            return self.pick(URIS).to_string();
        }
        let odd = [
            "file:///fuzz/unknown.py",
            "http://example.com/x.py",
            "not a uri",
            "",
            "file://",
            "file:///fuzz/%ZZ",
            "file:///fuzz/a.py?query#frag",
        ];
        self.pick(&odd).to_string()
    }

    /// A fresh request id: mostly numbers, some negative, some strings, one in a while huge.
    fn id(&mut self) -> Value {
        self.next_id += 1;
        let n = self.next_id;
        match self.rng.random_range(0..20) {
            0..=2 => json!(-n),
            3..=5 => json!(format!("fz-{n}")),
            6 => json!(format!("{n}")), // a string that reads as a number: not the number
            7 if n % 7 == 0 => json!(i64::MAX - n),
            _ => json!(n),
        }
    }

    fn position(&mut self) -> Value {
        let (line, character) = match self.rng.random_range(0..10) {
            0 => (u32::MAX, self.rng.random_range(0..5)),
            1 => (self.rng.random_range(0..4), u32::MAX),
            2 => (u32::MAX, u32::MAX),
            _ => (self.rng.random_range(0..7), self.rng.random_range(0..25)),
        };
        json!({ "line": line, "character": character })
    }

    /// A position no server can read: negative, fractional, huge, mistyped or missing numbers.
    fn bad_position(&mut self) -> Value {
        let bad = [
            json!(-1),
            json!(1e30),
            json!(1.5),
            json!("3"),
            json!(null),
            json!(4_294_967_296u64),
            json!([1]), // a Position reads from [line, character]: one is short
            json!({}),
        ];
        let v = self.pick(&bad).clone();
        match self.rng.random_range(0..4) {
            0 => json!({ "line": v, "character": 0 }),
            1 => json!({ "line": 0, "character": v }),
            2 => json!({ "line": 0 }),
            _ => v,
        }
    }

    /// The next version of `uri`: mostly up, sometimes back or sideways, one in a while extreme.
    fn version(&mut self, uri: &str) -> i32 {
        let last = *self.versions.get(uri).unwrap_or(&0);
        let v = match self.rng.random_range(0..20) {
            0..=2 => last.saturating_sub(self.rng.random_range(0..3)),
            3 => *self.pick(&[i32::MAX, i32::MIN, 0, -1]),
            _ => last.saturating_add(1),
        };
        self.versions.insert(uri.to_owned(), v);
        v
    }

    fn request(&mut self, method: &str, params: Value, expect: Expect) -> Body {
        let id = self.id();
        if expect == Expect::Any {
            self.cancellable.push(id.clone());
        }
        let mut msg = json!({ "jsonrpc": "2.0", "id": id, "method": method });
        if !params.is_null() || self.chance(0.5) {
            msg["params"] = params;
        }
        Body::json(&msg, Some((id, expect)))
    }

    fn notification(&mut self, method: &str, params: Value) -> Body {
        Body::json(
            &json!({ "jsonrpc": "2.0", "method": method, "params": params }),
            None,
        )
    }

    fn change(&mut self) -> Value {
        if self.chance(0.1) {
            return json!({ "text": self.text(30) });
        }
        let (start, end) = (self.position(), self.position());
        // Small positions mostly, so that many edits apply; end before start now and then.
        let (start, end) = if self.chance(0.7) {
            let l = self.rng.random_range(0..4u32);
            let (a, b) = (
                self.rng.random_range(0..12u32),
                self.rng.random_range(0..12u32),
            );
            let (a, b) = if self.chance(0.8) {
                (a.min(b), a.max(b))
            } else {
                (a.max(b), a.min(b))
            };
            (
                json!({ "line": l, "character": a }),
                json!({ "line": l + u32::from(self.chance(0.2)), "character": b }),
            )
        } else {
            (start, end)
        };
        json!({ "range": { "start": start, "end": end }, "text": self.text(6) })
    }

    fn inline_params(&mut self, uri: &str, position: Value) -> Value {
        json!({ "textDocument": { "uri": uri }, "position": position,
                "context": { "triggerKind": *self.pick(&[1, 2, 2, 99]) } })
    }

    fn completion_id(&mut self) -> Value {
        if !self.completions.is_empty() && self.chance(0.5) {
            let id = self.pick(&self.completions.clone()).clone();
            return json!(id);
        }
        self.pick(&[
            json!("nope"),
            json!(""),
            json!(42),
            json!(null),
            json!({}),
            json!(["x"]),
        ])
        .clone()
    }

    /// One message body, valid or not.
    fn body(&mut self) -> Body {
        let uri = self.uri();
        match self.rng.random_range(0..100) {
            // Real editing traffic, so the state machine has something to chew on.
            0..=7 => {
                let text = if self.chance(0.01) {
                    self.text(50_000)
                } else {
                    self.text(60)
                };
                let uri = if uri == URIS[URIS.len() - 1] {
                    URIS[0].to_owned()
                } else {
                    uri
                };
                let version = self.version(&uri);
                let language = self.pick(&["python", "rust", "", "😀"]).to_string();
                self.notification(
                    "textDocument/didOpen",
                    json!({ "textDocument": { "uri": uri, "languageId": language,
                                              "version": version, "text": text } }),
                )
            }
            8..=21 => {
                let changes: Vec<Value> = (0..self.rng.random_range(0..4))
                    .map(|_| self.change())
                    .collect();
                let version = self.version(&uri);
                self.notification(
                    "textDocument/didChange",
                    json!({ "textDocument": { "uri": uri, "version": version },
                            "contentChanges": changes }),
                )
            }
            22..=23 => self.notification(
                "textDocument/didClose",
                json!({ "textDocument": { "uri": uri } }),
            ),
            24..=31 => {
                let position = self.position();
                let params = self.inline_params(&uri, position);
                self.request("textDocument/inlineCompletion", params, Expect::Any)
            }
            32..=35 => {
                let position = self.position();
                self.request(
                    "textDocument/completion",
                    json!({ "textDocument": { "uri": uri }, "position": position }),
                    Expect::Any,
                )
            }
            36..=37 => self.request(
                "workspace/executeCommand",
                json!({ "command": "star.status" }),
                Expect::Ok,
            ),
            // Not JSON: dropped by the transport, so no answer is due.
            38..=43 => {
                self.dropped_by_transport += 1;
                let valid = serde_json::to_vec(&json!({ "jsonrpc": "2.0", "id": self.id(),
                    "method": "textDocument/completion",
                    "params": { "textDocument": { "uri": uri }, "position": self.position() } }))
                .unwrap();
                match self.rng.random_range(0..10) {
                    0 => Body::dropped(self.garbage(200)),
                    1 => {
                        let cut = self.rng.random_range(1..valid.len());
                        Body::dropped(&valid[..cut])
                    }
                    2 => Body::dropped(
                        &br#"{"jsonrpc":"2.0","method":"initialized","params":{},}"#[..],
                    ),
                    3 => Body::dropped(&b"{'jsonrpc':'2.0','method':'x'}"[..]),
                    4 => Body::dropped(&br#"{"jsonrpc":"2.0","id":NaN,"method":"x"}"#[..]),
                    5 => Body::dropped([&b"\xEF\xBB\xBF"[..], &valid].concat()),
                    6 => {
                        // Invalid UTF-8 inside a string.
                        let mut v = valid.clone();
                        let at = v.iter().position(|&b| b == b'/').unwrap();
                        v.insert(at, 0xFF);
                        Body::dropped(v)
                    }
                    7 => Body::dropped("[".repeat(self.rng.random_range(200..5000))),
                    8 => Body::dropped([&valid[..], &valid[..]].concat()),
                    _ => Body::dropped([&valid[..], &self.garbage(10)].concat()),
                }
            }
            // JSON, but no JSON-RPC message: dropped by the transport too.
            44..=48 => {
                self.dropped_by_transport += 1;
                let id = self.id();
                let shapes = [
                    json!({}),
                    json!([]),
                    json!(42),
                    json!("textDocument/completion"),
                    json!(null),
                    json!(true),
                    json!([{ "jsonrpc": "2.0", "id": id, "method": "shutdown" }]),
                    json!({ "jsonrpc": "1.0", "id": id, "method": "shutdown" }),
                    json!({ "jsonrpc": 2, "method": "initialized", "params": {} }),
                    json!({ "id": id, "method": "textDocument/completion" }),
                    json!({ "jsonrpc": "2.0", "id": id, "method": 7 }),
                    json!({ "jsonrpc": "2.0", "id": id, "method": null }),
                    json!({ "jsonrpc": "2.0", "id": 1.5, "method": "textDocument/completion" }),
                    json!({ "jsonrpc": "2.0", "id": {}, "method": "shutdown" }),
                    json!({ "jsonrpc": "2.0", "id": [1], "method": "shutdown" }),
                    json!({ "jsonrpc": "2.0", "id": true, "method": "shutdown" }),
                    json!({ "jsonrpc": "2.0", "id": u64::MAX, "method": "shutdown" }),
                    json!({ "jsonrpc": "2.0", "id": 5, "error": 5, "method": 1 }),
                ];
                let shape = self.pick(&shapes).clone();
                Body::json(&shape, None)
            }
            // Raw JSON escapes: lone surrogates are not JSON text (dropped); a pair is an emoji.
            49..=52 => {
                let escape = *self.pick(&[
                    r"\ud800",
                    r"\udfff",
                    r"\ud83dx",
                    r"\ude00\ud83d",
                    r"\ud83d\ude00",
                ]);
                let pair = escape == r"\ud83d\ude00";
                if !pair {
                    self.dropped_by_transport += 1;
                }
                let mut body = match self.rng.random_range(0..3) {
                    0 => self.notification(
                        "textDocument/didOpen",
                        json!({ "textDocument": { "uri": uri, "languageId": "python",
                                "version": 1, "text": format!("a{ESCAPE}b\n😀{ESCAPE}") } }),
                    ),
                    1 => self.notification(
                        "textDocument/didChange",
                        json!({ "textDocument": { "uri": uri, "version": 1 },
                                "contentChanges": [{ "text": format!("x = '{ESCAPE}'\n") }] }),
                    ),
                    _ => {
                        let params = json!({ "command": format!("star.{ESCAPE}") });
                        let expect = if pair {
                            Expect::Error(INVALID_PARAMS)
                        } else {
                            Expect::Any
                        };
                        self.request("workspace/executeCommand", params, expect)
                    }
                };
                let text = String::from_utf8(body.bytes).unwrap();
                body.bytes = text.replace(ESCAPE, escape).into_bytes();
                if !pair {
                    body.due = None;
                }
                body
            }
            // Methods nobody registered, and standard ones this server does not implement.
            53..=57 => {
                let (method, expect) = *self.pick(&[
                    ("fuzz/nope", Some(Expect::Error(METHOD_NOT_FOUND))),
                    ("", Some(Expect::Error(METHOD_NOT_FOUND))),
                    ("textDocument/fuzz", Some(Expect::Error(METHOD_NOT_FOUND))),
                    (
                        "TEXTDOCUMENT/COMPLETION",
                        Some(Expect::Error(METHOD_NOT_FOUND)),
                    ),
                    (
                        "textDocument/completion ",
                        Some(Expect::Error(METHOD_NOT_FOUND)),
                    ),
                    ("star/unknown", Some(Expect::Error(METHOD_NOT_FOUND))),
                    // tower-lsp-server swallows the MethodNotFound of `$/` requests (LSP says to
                    // send it): no answer comes.
                    ("$/fuzz", None),
                    ("$/setTrace", None),
                    ("textDocument/hover", Some(Expect::Any)),
                    ("textDocument/definition", Some(Expect::Any)),
                    ("workspace/didChangeConfiguration", Some(Expect::Any)),
                    ("textDocument/didSave", Some(Expect::Any)),
                ]);
                let params = self
                    .pick(&[json!({}), json!(null), json!([1]), json!("x")])
                    .clone();
                if self.chance(0.5) {
                    return self.notification(method, params);
                }
                let mut body = self.request(method, params, expect.unwrap_or(Expect::Any));
                if expect.is_none() {
                    body.due = None;
                }
                body
            }
            // Notifications sent as requests: InvalidRequest. Requests sent as notifications: ignored.
            58..=61 => {
                let position = self.position();
                if self.chance(0.5) {
                    let method = *self.pick(&[
                        "textDocument/didOpen",
                        "textDocument/didChange",
                        "textDocument/didClose",
                        "star/didAccept",
                        "star/didReject",
                        "star/didCorrect",
                        "initialized",
                        "$/cancelRequest",
                    ]);
                    let params = json!({ "textDocument": { "uri": uri }, "completionId": "x" });
                    self.request(method, params, Expect::Error(INVALID_REQUEST))
                } else {
                    let (method, params) = *self.pick(&[
                        ("textDocument/completion", 0),
                        ("textDocument/inlineCompletion", 1),
                        ("workspace/executeCommand", 2),
                        ("initialize", 3),
                    ]);
                    let params = match params {
                        0 => json!({ "textDocument": { "uri": uri }, "position": position }),
                        1 => self.inline_params(&uri, position),
                        2 => json!({ "command": "star.status" }),
                        _ => json!({ "capabilities": {} }),
                    };
                    self.notification(method, params)
                }
            }
            // Requests whose params have the wrong type altogether.
            62..=67 => {
                let method = *self.pick(&[
                    "textDocument/completion",
                    "textDocument/inlineCompletion",
                    "workspace/executeCommand",
                ]);
                let (params, expect) = self
                    .pick(&[
                        (json!("params"), Expect::Error(INVALID_PARAMS)),
                        (json!(5), Expect::Error(INVALID_PARAMS)),
                        (json!(true), Expect::Error(INVALID_PARAMS)),
                        (json!(null), Expect::Error(INVALID_PARAMS)),
                        (json!({}), Expect::Error(INVALID_PARAMS)),
                        (json!([uri, 0, 0]), Expect::Any),
                        (json!([]), Expect::Any),
                    ])
                    .clone();
                let id = self.id();
                let mut msg = json!({ "jsonrpc": "2.0", "id": id, "method": method });
                if !params.is_null() || self.chance(0.5) {
                    msg["params"] = params; // absent or null: both lack the params
                }
                if expect == Expect::Any {
                    self.cancellable.push(id.clone());
                }
                Body::json(&msg, Some((id, expect)))
            }
            // Positions and documents no server can read; absurd but well-typed positions.
            68..=72 => {
                let inline = self.chance(0.5);
                let method = if inline {
                    "textDocument/inlineCompletion"
                } else {
                    "textDocument/completion"
                };
                let (position, expect) = if self.chance(0.3) {
                    (self.position(), Expect::Any)
                } else {
                    (self.bad_position(), Expect::Error(INVALID_PARAMS))
                };
                let document = match self.rng.random_range(0..5) {
                    0 => json!(uri),
                    1 => json!({ "uri": 5 }),
                    2 => json!({}),
                    _ => json!({ "uri": uri }),
                };
                let expect = if document.get("uri").is_some_and(Value::is_string) {
                    expect
                } else {
                    Expect::Error(INVALID_PARAMS)
                };
                let mut params = json!({ "textDocument": document, "position": position });
                if inline {
                    params["context"] = json!({ "triggerKind": 1 });
                }
                self.request(method, params, expect)
            }
            // Editing notifications of the wrong shape: ignored.
            73..=77 => {
                let version = self.version(&uri);
                let bad = [
                    json!({ "textDocument": { "uri": uri, "version": version, "text": 5, "languageId": "python" } }),
                    json!({ "textDocument": { "uri": uri, "version": "1", "text": "", "languageId": "python" } }),
                    json!({ "textDocument": { "uri": uri, "version": 4_294_967_296u64 },
                            "contentChanges": [{ "text": "x" }] }),
                    json!({ "textDocument": { "uri": uri, "version": version },
                            "contentChanges": { "text": "x" } }),
                    json!({ "textDocument": { "uri": uri, "version": version },
                            "contentChanges": [{ "range": { "start": self.bad_position(),
                                                            "end": self.position() }, "text": "x" }] }),
                    json!({ "textDocument": { "uri": uri, "version": version },
                            "contentChanges": [{ "range": null, "text": "whole" }] }),
                    json!({ "textDocument": { "uri": uri, "version": version },
                            "contentChanges": [{ "range": { "start": { "line": 0, "character": 0 } },
                                                 "text": "x" }] }),
                    json!({ "textDocument": { "uri": uri, "version": version },
                            "contentChanges": [{ "range": { "start": self.position(), "end": self.position() } }] }),
                    json!({ "textDocument": uri }),
                    json!("textDocument"),
                    json!([uri]),
                    json!(null),
                ];
                let method = *self.pick(&[
                    "textDocument/didOpen",
                    "textDocument/didChange",
                    "textDocument/didClose",
                ]);
                let params = self.pick(&bad).clone();
                self.notification(method, params)
            }
            // Commands: unknown ones, bad arguments, real ones with junk.
            78..=83 => {
                let id = self.completion_id();
                let named = id.is_string();
                let (params, expect) = match self.rng.random_range(0..14) {
                    0 => (
                        json!({ "command": "star.nope" }),
                        Expect::Error(INVALID_PARAMS),
                    ),
                    1 => (json!({ "command": "" }), Expect::Error(INVALID_PARAMS)),
                    2 => (
                        json!({ "command": "STAR.STATUS" }),
                        Expect::Error(INVALID_PARAMS),
                    ),
                    3 => (json!({ "command": 5 }), Expect::Error(INVALID_PARAMS)),
                    4 => (
                        json!({ "command": "star.status", "arguments": "x" }),
                        Expect::Error(INVALID_PARAMS),
                    ),
                    5 => (
                        json!({ "command": *self.pick(&["star.accepted", "star.explain"]),
                                "arguments": self.pick(&[json!([]), json!([5]), json!([null]),
                                                         json!([{}]), json!([[]])]).clone() }),
                        Expect::Error(INVALID_PARAMS),
                    ),
                    6 => (
                        json!({ "command": "star.accepted", "arguments": [id] }),
                        if named {
                            Expect::Ok
                        } else {
                            Expect::Error(INVALID_PARAMS)
                        },
                    ),
                    7 => (
                        json!({ "command": "star.explain", "arguments": [id, 1, 2] }),
                        if named {
                            Expect::Any
                        } else {
                            Expect::Error(INVALID_PARAMS)
                        },
                    ),
                    8 => (
                        json!({ "command": "star.rollback",
                                "arguments": self.pick(&[json!([]), json!([5]), json!([null])]).clone() }),
                        Expect::Error(INVALID_PARAMS),
                    ),
                    9 => (
                        json!({ "command": "star.rollback", "arguments": [*self.pick(&["nope", "all", ""])] }),
                        Expect::Any,
                    ),
                    10 => (
                        json!({ "command": "star.listPatches", "arguments": [1] }),
                        Expect::Any,
                    ),
                    11 => (
                        json!({ "command": "star.status", "arguments": [null, {}, "x"] }),
                        Expect::Ok,
                    ),
                    12 if self.repairs < 2 => {
                        self.repairs += 1;
                        (json!({ "command": "star.repairNow" }), Expect::Any)
                    }
                    _ => (json!({ "command": "star.status" }), Expect::Ok),
                };
                self.request("workspace/executeCommand", params, expect)
            }
            // The capture notifications, mostly with ids nobody handed out.
            84..=87 => {
                let id = self.completion_id();
                let method = *self.pick(&["star/didAccept", "star/didReject", "star/didCorrect"]);
                let params = match self.rng.random_range(0..5) {
                    0 => json!({ "completionId": id, "text": 5 }),
                    1 => json!(id),
                    2 => json!({}),
                    _ => json!({ "completionId": id, "text": self.text(8) }),
                };
                self.notification(method, params)
            }
            // Cancellations: of requests in flight, of unknown ids, of nothing readable.
            88..=91 => {
                let id = if !self.cancellable.is_empty() && self.chance(0.5) {
                    let n = self.cancellable.len();
                    self.cancellable[self.rng.random_range(n.saturating_sub(5)..n)].clone()
                } else {
                    self.pick(&[
                        json!(123_456_789),
                        json!(-3),
                        json!("nope"),
                        json!(null),
                        json!(1.5),
                        json!(1u64 << 40),
                        json!({}),
                    ])
                    .clone()
                };
                let params = if self.chance(0.9) {
                    json!({ "id": id })
                } else {
                    json!([id])
                };
                self.notification("$/cancelRequest", params)
            }
            // Answers to server requests that were never made.
            92..=94 => {
                let id = json!(self.rng.random_range(500_000..600_000));
                let msg = match self.rng.random_range(0..3) {
                    0 => json!({ "jsonrpc": "2.0", "id": id, "result": { "x": [1, 2] } }),
                    1 => json!({ "jsonrpc": "2.0", "id": id,
                                 "error": { "code": -32800, "message": "cancelled" } }),
                    _ => json!({ "jsonrpc": "2.0", "id": null, "result": null }),
                };
                Body::json(&msg, None)
            }
            // Lifecycle out of order: initialize again, initialized again.
            95..=96 => {
                if self.chance(0.8) || self.initialized >= 3 {
                    let params = json!({ "processId": null, "rootUri": null, "capabilities": {},
                                         "initializationOptions": { "maxTokens": 1 } });
                    self.request("initialize", params, Expect::Error(INVALID_REQUEST))
                } else {
                    self.initialized += 1;
                    self.notification("initialized", json!({}))
                }
            }
            // A request with a null id: its answer cannot be told from others'.
            _ => {
                let msg = json!({ "jsonrpc": "2.0", "id": null, "method": "workspace/executeCommand",
                                  "params": { "command": "star.status" } });
                Body::json(&msg, None)
            }
        }
    }

    /// Frames `body`: mostly plainly, sometimes in odd but readable ways, sometimes wrongly (then the
    /// message is lost and no answer is due; the stream must resynchronise on the next header).
    fn message(&mut self) -> (Vec<u8>, Option<(Value, Expect)>) {
        if !self.resync && self.chance(0.03) {
            // Garbage between frames.
            self.resync = true;
            self.broken_frames += 1;
            let mut g = self.garbage(64);
            if self.chance(0.5) {
                g.extend_from_slice(b"\r\n");
            }
            return (g, None);
        }
        let Body { bytes: body, due } = self.body();
        let n = body.len();
        if self.resync {
            self.resync = false;
            return (frame(&body), due);
        }
        let roll = self.rng.random_range(0..100);
        if roll < 75 {
            return (frame(&body), due);
        }
        self.odd_frames += 1;
        if roll < 88 {
            // Readable: the message arrives.
            let header = match self.rng.random_range(0..11) {
                0 => format!("content-length: {n}\r\n\r\n"),
                1 => format!(
                    "Content-Type: application/vscode-jsonrpc; charset=utf-8\r\nContent-Length: {n}\r\n\r\n"
                ),
                2 => format!("Content-Length: {n}\r\nContent-Type: text/garbage\r\n\r\n"),
                3 => format!("X-Fuzz: yes\r\nContent-Length: {n}\r\n\r\n"),
                4 => format!("Content-Length: {n}\n\n"),
                5 => format!("a line of garbage\r\nContent-Length: {n}\r\n\r\n"),
                6 => format!("garbage with no newline Content-Length: {n}\r\n\r\n"),
                7 => format!("\r\n\r\n\r\nContent-Length: {n}\r\n\r\n"),
                8 => format!("Content-Length:{n}   \r\n\r\n"),
                9 => format!("Content-Length: +{n}\r\n\r\n"),
                _ => format!("Content-Length: 999\r\nContent-Length: {n}\r\n\r\n"),
            };
            let mut out = header.into_bytes();
            out.extend_from_slice(&body);
            return (out, due);
        }
        if roll < 90 || body.contains(&b'\n') {
            // Whitespace after the body, counted in the length: still JSON.
            let mut out = format!("Content-Length: {}\r\n\r\n", n + 2).into_bytes();
            out.extend_from_slice(&body);
            out.extend_from_slice(b"\r\n");
            return (out, due);
        }
        // Broken framing: the message is lost.
        self.resync = true;
        self.odd_frames -= 1;
        self.broken_frames += 1;
        let header = match self.rng.random_range(0..9) {
            0 => "Content-Type: application/vscode-jsonrpc; charset=utf-8\r\n\r\n".to_owned(),
            1 => format!(
                "Content-Length: {}\r\n\r\n",
                self.pick(&[
                    "-5",
                    "abc",
                    "",
                    "1.5",
                    "0x10",
                    "99999999999999999999999",
                    "１２"
                ])
            ),
            2 => format!(
                "Content-Length: {}\r\n\r\n",
                n - self.rng.random_range(1..=n)
            ),
            3 => "Content-Length: 0\r\n\r\n".to_owned(),
            4 => {
                // Longer than the body: the padding after it makes up the difference, then some.
                let k = self.rng.random_range(1..2000);
                let mut out = format!("Content-Length: {}\r\n\r\n", n + k).into_bytes();
                out.extend_from_slice(&body);
                out.extend(std::iter::repeat_n(b'#', k + self.rng.random_range(0..20)));
                if self.chance(0.5) {
                    out.extend_from_slice(b"\r\n");
                }
                return (out, None);
            }
            5 => format!(
                "Content-Length: {}\r\n\r\n",
                self.rng.random_range((64 << 20) + 1..1u64 << 50)
            ),
            6 => format!("Content-Length: {n}\r\n"), // no blank line
            7 => format!("Content-Length: {n}\r\nContent-Length: nope\r\n\r\n"),
            _ => "\r\n".to_owned(), // no header at all
        };
        let mut out = header.into_bytes();
        out.extend_from_slice(&body);
        (out, None)
    }

    fn send(&mut self, c: &mut Client) {
        let (bytes, due) = self.message();
        if let Some((id, expect)) = due {
            let key = id.to_string();
            assert!(!self.due.contains_key(&key), "id {key} reused");
            let what = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
            self.due.insert(key, (expect, what));
        }
        c.send_raw(&bytes);
        self.sent += 1;
    }

    /// Takes in whatever the server has said within `wait`.
    fn drain(&mut self, c: &mut Client, wait: Duration) {
        let mut wait = wait;
        while let Some(msg) = c.next_message(wait) {
            wait = Duration::ZERO;
            self.absorb(msg);
        }
    }

    fn absorb(&mut self, msg: Value) {
        if msg.get("method").is_some() {
            return; // a notification, or a server request (the client answers those)
        }
        // Completion ids, for the capture notifications and commands.
        let items = msg["result"]["items"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for item in items {
            let id = item["command"]["arguments"][0]
                .as_str()
                .or_else(|| item["data"]["completionId"].as_str());
            if let Some(id) = id {
                self.completions.push(id.to_owned());
            }
        }
        let key = msg["id"].to_string();
        let Some((expect, what)) = self.due.remove(&key) else {
            self.stray_answers += 1;
            return;
        };
        self.answered += 1;
        let ok = match expect {
            Expect::Any => msg.get("result").is_some() || msg.get("error").is_some(),
            Expect::Ok => msg.get("result").is_some(),
            Expect::Error(code) => msg["error"]["code"] == json!(code),
        };
        if !ok {
            self.wrong
                .push(format!("expected {expect:?}, got {msg}\n  for: {what}"));
        }
    }
}

#[test]
fn thousands_of_bad_messages_are_survived() {
    let began = Instant::now();
    let mut c = start("fuzz");
    let seed = env_or("STAR_LS_FUZZ_SEED", SEED);
    let messages = env_or("STAR_LS_FUZZ_MESSAGES", MESSAGES);
    let mut f = Fuzzer::new(seed);
    while f.sent < messages {
        f.send(&mut c);
        if f.sent.is_multiple_of(20) {
            f.drain(&mut c, Duration::ZERO);
            // Keep the requests in flight bounded, as an editor would.
            let deadline = Instant::now() + Duration::from_secs(30);
            while f.due.len() > 64 && Instant::now() < deadline {
                f.drain(&mut c, Duration::from_millis(50));
            }
            if f.due.len() > 64 {
                break; // the server has stopped answering: the report below says what is missing
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f.due.is_empty() && Instant::now() < deadline {
        f.drain(&mut c, Duration::from_millis(100));
    }
    eprintln!(
        "fuzz: seed {seed:#x}: {} messages sent, all answers in at {:.1} s: {} requests answered \
         as due ({} answers to untracked ids), {} bodies not JSON-RPC, {} odd but readable frames, \
         {} broken frames or garbage, {} completion ids seen",
        f.sent,
        began.elapsed().as_secs_f64(),
        f.answered,
        f.stray_answers,
        f.dropped_by_transport,
        f.odd_frames,
        f.broken_frames,
        f.completions.len()
    );
    let unanswered: Vec<String> = f
        .due
        .iter()
        .take(5)
        .map(|(id, (_, what))| format!("{id}: {what}"))
        .collect();
    assert!(
        f.due.is_empty(),
        "{} requests never answered, e.g.:\n{}",
        f.due.len(),
        unanswered.join("\n")
    );
    assert!(
        f.wrong.is_empty(),
        "{} wrong answers, e.g.:\n{}",
        f.wrong.len(),
        f.wrong[..f.wrong.len().min(5)].join("\n")
    );

    // Still serving: a real completion on a fresh document, and the status.
    let uri = "file:///fuzz/after.py";
    c.open(uri, "def add(a, b):\n    return a + b\n\nprint(add(1, ");
    let r = c.call(
        "textDocument/inlineCompletion",
        Client::inline_params(uri, 3, 13),
    );
    let items = r["items"].as_array().expect("inline items");
    assert!(
        !items.is_empty()
            && items[0]["insertText"]
                .as_str()
                .is_some_and(|t| !t.is_empty()),
        "{r}"
    );
    let status = c.status();
    assert!(status["documents"].as_u64().unwrap() >= 1, "{status}");
    assert!(status["completions"].is_object(), "{status}");
    c.shutdown(); // asserts a clean exit and no panic
    eprintln!("fuzz: done in {:.1} s", began.elapsed().as_secs_f64());
}

#[test]
fn requests_after_shutdown_are_refused() {
    let mut c = start("fuzz-shutdown");
    let uri = "file:///fuzz/s.py";
    c.open(uri, "x = 1\n");
    let in_flight = c.request_async(
        "textDocument/inlineCompletion",
        Client::inline_params(uri, 1, 0),
    );
    let shutdown = c.request_async("shutdown", Value::Null);
    let refused: Vec<(&str, Value)> = vec![
        (
            "textDocument/inlineCompletion",
            Client::inline_params(uri, 1, 0),
        ),
        (
            "textDocument/completion",
            Client::completion_params(uri, 0, 5),
        ),
        (
            "workspace/executeCommand",
            json!({ "command": "star.status" }),
        ),
        (
            "workspace/executeCommand",
            json!({ "command": "star.nope" }),
        ),
        ("workspace/executeCommand", json!("not params")),
        ("shutdown", Value::Null),
        ("initialize", json!({ "capabilities": {} })),
        ("textDocument/hover", Client::completion_params(uri, 0, 0)),
        ("star/didAccept", json!({ "completionId": "x" })),
    ];
    // Right behind `shutdown` (it takes effect on arrival), and again after its answer.
    let early: Vec<i64> = refused
        .iter()
        .map(|(m, p)| c.request_async(m, p.clone()))
        .collect();
    let mut answers = answers(&mut c, [in_flight, shutdown].iter().chain(&early));
    let r = &answers[&shutdown];
    assert!(r.get("error").is_none(), "shutdown failed: {r}");
    let r = &answers[&in_flight];
    assert!(r.get("result").is_some() || r.get("error").is_some(), "{r}");
    // Edits and bad traffic after shutdown are ignored.
    c.insert(uri, 2, 0, 0, "y = 2\n");
    c.notify(
        "textDocument/didChange",
        json!({ "textDocument": { "uri": uri, "version": 3 },
                "contentChanges": [{ "range": { "start": { "line": 1, "character": 0 },
                                                "end": { "line": 0, "character": 0 } }, "text": "" }] }),
    );
    c.send_raw(b"Content-Length: 2\r\n\r\n{}garbage");
    let late: Vec<i64> = refused
        .iter()
        .map(|(m, p)| c.request_async(m, p.clone()))
        .collect();
    let unknown = c.request_async("fuzz/unknown", json!({}));
    answers.extend(self::answers(&mut c, late.iter().chain([&unknown])));
    for (id, (method, _)) in early.iter().chain(&late).zip(refused.iter().cycle()) {
        let r = &answers[id];
        assert_eq!(
            r["error"]["code"],
            json!(INVALID_REQUEST),
            "{method} after shutdown: {r}"
        );
    }
    let r = &answers[&unknown];
    assert_eq!(r["error"]["code"], json!(METHOD_NOT_FOUND), "{r}");
    c.exit();
}

/// The answers to `ids`, in whatever order they come (`Client::response` sets aside the others).
fn answers<'a>(c: &mut Client, ids: impl IntoIterator<Item = &'a i64>) -> HashMap<i64, Value> {
    let mut want: Vec<i64> = ids.into_iter().copied().collect();
    let mut got = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !want.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(msg) = c.next_message(left) else {
            panic!("no answer to requests {want:?}");
        };
        if msg.get("method").is_some() {
            continue;
        }
        if let Some(i) = want.iter().position(|id| msg["id"] == json!(id)) {
            got.insert(want.swap_remove(i), msg);
        }
    }
    got
}
