//! A small LSP client for tests: starts the real `star-ls` binary and speaks JSON-RPC over its stdio.

#![allow(dead_code)] // each test binary uses a different part of it

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

pub struct Client {
    child: Child,
    stdin: ChildStdin,
    incoming: Receiver<Value>,
    /// The server's stderr, read to its end by a thread.
    stderr: Option<std::thread::JoinHandle<String>>,
    next_id: i64,
    /// Notifications and server requests seen so far, in order.
    pub notifications: Vec<Value>,
    /// Whether the server's requests (`window/workDoneProgress/create`) get an answer.
    answers: bool,
}

/// The packaged model, where the server looks for it (tests need it: scripts/test fetches it first).
pub fn packaged_model() -> PathBuf {
    let path = star_ls::env::model_path();
    assert!(
        path.exists(),
        "no model at {}: run scripts/fetch-model",
        path.display()
    );
    path
}

/// A fresh, not yet existing data directory for one test.
pub fn fresh_data_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("star-ls-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

impl Client {
    /// The packaged model with its store in `data`, capture decided explicitly (no idle timer, no
    /// scheduled repairs); returns once the model has loaded.
    pub fn start_recording(data: &Path) -> Self {
        let mut c = Self::start(
            &packaged_model(),
            json!({ "threads": 2, "debounceMs": 0, "captureIdleMs": 600000, "repairThreshold": 0 }),
            &[("STAR_LS_DATA_DIR", data.to_str().unwrap())],
        );
        c.wait_for("model loaded", |m| {
            m["method"] == "$/progress"
                && m["params"]["token"] == "star-ls/model"
                && m["params"]["value"]["kind"] == "end"
        });
        c
    }

    /// Starts `star-ls serve` with `env` and initializes it with `options`.
    pub fn start(model: &Path, options: Value, env: &[(&str, &str)]) -> Self {
        Self::start_in(model, options, env, Value::Null)
    }

    /// As `start`, in the workspace `root_uri` (a URI string, or null).
    pub fn start_in(model: &Path, options: Value, env: &[(&str, &str)], root_uri: Value) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_star-ls"));
        cmd.arg("serve");
        Self::spawn(cmd, model, options, env, root_uri)
    }

    /// As `start`, but spawns `cmd` (a wrapper such as `unshare … sh -c '…; exec "$0" serve'
    /// <star-ls>`), which must end by exec'ing `star-ls serve` so that the child is the server.
    pub fn start_command(cmd: Command, model: &Path, options: Value, env: &[(&str, &str)]) -> Self {
        Self::spawn(cmd, model, options, env, Value::Null)
    }

    fn spawn(
        mut cmd: Command,
        model: &Path,
        options: Value,
        env: &[(&str, &str)],
        root_uri: Value,
    ) -> Self {
        cmd.env("STAR_LS_MODEL", model)
            .env("STAR_LS_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("starting star-ls");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, incoming) = mpsc::channel();
        std::thread::spawn(move || {
            while let Some(msg) = read_message(&mut stdout) {
                if tx.send(msg).is_err() {
                    break;
                }
            }
        });
        // Read as it comes, as an editor does: a full pipe would block the server's writes.
        let mut stderr = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut err = String::new();
            let _ = stderr.read_to_string(&mut err);
            err
        });
        let mut client = Self {
            child,
            stdin,
            incoming,
            stderr: Some(stderr),
            next_id: 1,
            notifications: Vec::new(),
            answers: true,
        };
        let caps = json!({ "window": { "workDoneProgress": true } });
        let init = client.request(
            "initialize",
            json!({ "processId": null, "rootUri": root_uri, "capabilities": caps, "initializationOptions": options }),
        );
        assert!(init.get("result").is_some(), "initialize failed: {init}");
        client.notify("initialized", json!({}));
        client
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stdin.write_all(bytes).unwrap();
        self.stdin.flush().unwrap();
    }

    pub fn send(&mut self, msg: &Value) {
        let body = serde_json::to_vec(msg).unwrap();
        let mut framed = format!("Content-Length: {}\r\n\r\n", body.len()).into_bytes();
        framed.extend(body);
        self.send_raw(&framed);
    }

    pub fn notify(&mut self, method: &str, params: Value) {
        self.send(&json!({ "jsonrpc": "2.0", "method": method, "params": params }));
    }

    /// Sends a request and returns its id without waiting.
    pub fn request_async(&mut self, method: &str, params: Value) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }));
        id
    }

    /// Waits for the response to `id` (the whole message: `result` or `error`).
    pub fn response(&mut self, id: i64) -> Value {
        // Answers may come out of order: one that arrived while waiting for another was kept.
        let is_answer = |m: &Value| m.get("method").is_none() && m.get("id") == Some(&json!(id));
        if let Some(i) = self.notifications.iter().position(is_answer) {
            return self.notifications.remove(i);
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let msg = match self
                .incoming
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => panic!("no response to request {id}"),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("server exited before answering {id}")
                }
            };
            if is_answer(&msg) {
                return msg;
            }
            self.handle_incoming(msg);
        }
    }

    pub fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.request_async(method, params);
        self.response(id)
    }

    /// The `result` of a request, failing the test on an error response.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let r = self.request(method, params);
        match r.get("error") {
            Some(e) => panic!("{method} failed: {e}"),
            None => r["result"].clone(),
        }
    }

    /// This client from now on leaves the server's requests unanswered, as a stuck editor would.
    pub fn never_answering(self) -> Self {
        Self {
            answers: false,
            ..self
        }
    }

    fn handle_incoming(&mut self, msg: Value) {
        // Server-to-client requests (progress tokens) get an empty success.
        if self.answers && msg.get("method").is_some() && msg.get("id").is_some() {
            let id = msg["id"].clone();
            self.send(&json!({ "jsonrpc": "2.0", "id": id, "result": null }));
        }
        self.notifications.push(msg);
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next message from the server, whatever it is (its requests answered and kept as
    /// notifications too); None if nothing comes within `timeout`.
    pub fn next_message(&mut self, timeout: Duration) -> Option<Value> {
        let msg = self.incoming.recv_timeout(timeout).ok()?;
        if msg.get("method").is_some() {
            self.handle_incoming(msg.clone());
        }
        Some(msg)
    }

    /// Waits until a notification satisfying `pred` has arrived.
    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(n) = self.notifications.iter().find(|n| pred(n)) {
            return n.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let msg = self
                .incoming
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("never saw {what}"));
            let hit = pred(&msg);
            self.handle_incoming(msg.clone());
            if hit {
                return msg;
            }
        }
    }

    pub fn open(&mut self, uri: &str, text: &str) {
        self.notify(
            "textDocument/didOpen",
            json!({ "textDocument": { "uri": uri, "languageId": "python", "version": 1, "text": text } }),
        );
    }

    /// Inserts `text` at (line, character) as an incremental change.
    pub fn insert(&mut self, uri: &str, version: i32, line: u32, character: u32, text: &str) {
        let at = json!({ "line": line, "character": character });
        self.notify(
            "textDocument/didChange",
            json!({ "textDocument": { "uri": uri, "version": version },
                    "contentChanges": [{ "range": { "start": at, "end": at }, "text": text }] }),
        );
    }

    /// Opens `{root}/f{k}.py` as `def f{k}(x): return `, asks for a completion at the end, types
    /// `x + {k}` over it and presses Enter: one failure case, which the repairable tiny model's repair
    /// fixes.
    pub fn fail_at_return(&mut self, root: &str, k: usize) {
        let uri = format!("{root}/f{k}.py");
        self.open(&uri, &format!("def f{k}(x):\n    return \n"));
        self.call(
            "textDocument/inlineCompletion",
            Self::inline_params(&uri, 1, 11),
        );
        self.insert(&uri, 2, 1, 11, &format!("x + {k}"));
        self.insert(&uri, 3, 1, 16, "\n");
    }

    pub fn completion_params(uri: &str, line: u32, character: u32) -> Value {
        json!({ "textDocument": { "uri": uri }, "position": { "line": line, "character": character } })
    }

    pub fn inline_params(uri: &str, line: u32, character: u32) -> Value {
        let mut p = Self::completion_params(uri, line, character);
        p["context"] = json!({ "triggerKind": 1 });
        p
    }

    pub fn status(&mut self) -> Value {
        self.call(
            "workspace/executeCommand",
            json!({ "command": "star.status" }),
        )
    }

    /// Kills the server with SIGKILL, as a crash would end it.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Shuts down cleanly and returns the server's stderr.
    pub fn shutdown(mut self) -> String {
        let r = self.request("shutdown", Value::Null);
        assert!(r.get("error").is_none(), "shutdown failed: {r}");
        self.exit()
    }

    /// Sends `exit` (after a `shutdown`); returns the server's stderr once it has ended, asserting a
    /// clean exit and no panic.
    pub fn exit(mut self) -> String {
        self.notify("exit", Value::Null);
        let status = self.child.wait().unwrap();
        let err = self.stderr.take().unwrap().join().unwrap();
        assert!(status.success(), "star-ls exited with {status}: {err}");
        assert!(!err.contains("panicked"), "star-ls panicked: {err}");
        err
    }
}

fn read_message(r: &mut impl BufRead) -> Option<Value> {
    let mut len = None;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some(v) = line.strip_prefix("Content-Length: ") {
            len = v.parse::<usize>().ok();
        }
    }
    let mut body = vec![0; len?];
    r.read_exact(&mut body).ok()?;
    serde_json::from_slice(&body).ok()
}
