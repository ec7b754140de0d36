//! Capture's side of the host: completions shown go to the tracker and the store; decided cases go to
//! the store's thread, are prepared for repair, and may start one.

use super::{Event, Host};
use crate::capture::{CaseKind, Resolved};
use crate::completion::Completion;
use crate::store::{NewCase, ShownRecord, StoreOp};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Where a completion was asked for, as the document stood then, with the context to store.
pub struct Shown {
    pub document: String,
    /// The cursor: a char offset, and its line and UTF-16 column.
    pub at: usize,
    pub line: u32,
    pub character: u32,
    pub version: i32,
    /// The end of the text before the cursor and the start of the text after it: about what the
    /// prompt uses, copied now so the whole document is not kept for the store.
    pub prefix: String,
    pub suffix: String,
}

impl Shown {
    pub fn new(
        document: String,
        (at, line, character): (usize, u32, u32),
        version: i32,
        prefix: &str,
        suffix: &str,
    ) -> Self {
        Self {
            document,
            at,
            line,
            character,
            version,
            prefix: tail(prefix, STORED_PREFIX_BYTES).to_owned(),
            suffix: head(suffix, STORED_SUFFIX_BYTES).to_owned(),
        }
    }
}

/// The context stored with each shown completion: about what the prompt uses, not the whole file.
const STORED_PREFIX_BYTES: usize = 8192;
const STORED_SUFFIX_BYTES: usize = 2048;

pub(super) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn tail(s: &str, max: usize) -> &str {
    let mut from = s.len().saturating_sub(max);
    while !s.is_char_boundary(from) {
        from += 1;
    }
    &s[from..]
}

fn head(s: &str, max: usize) -> &str {
    let mut to = s.len().min(max);
    while !s.is_char_boundary(to) {
        to -= 1;
    }
    &s[..to]
}

impl Host {
    /// Starts following a completion (or, with `None`, a place where the model proposed nothing).
    pub(super) fn track_shown(&self, shown: Shown, completion: Option<&Completion>) {
        let mut ws = self.workspace();
        let proposed = completion.map_or(String::new(), |c| c.generation.text.clone());
        let Some(resolved) = ws.shown(
            &shown.document,
            shown.version,
            completion.map(|c| c.id.clone()),
            shown.at,
            proposed.clone(),
            Instant::now(),
        ) else {
            return;
        };
        let language = ws
            .document(&shown.document)
            .map_or(String::new(), |d| d.language.clone());
        if let Some(c) = completion {
            self.store.send(StoreOp::Shown(ShownRecord {
                id: c.id.clone(),
                workspace: self.workspace_of(&shown.document),
                document: shown.document,
                language,
                version: shown.version,
                line: shown.line,
                character: shown.character,
                prefix: shown.prefix,
                suffix: shown.suffix,
                proposed,
                patches: self.repairs.live_ids(),
                fired: serde_json::json!(c.generation.fired),
                shown_ms: now_ms(),
            }));
        }
        self.record(resolved);
    }

    /// Sends decided completions to the store; each case is prepared for repair, and a failure may
    /// start one.
    pub(super) fn record(&self, resolved: Vec<Resolved>) {
        for r in resolved {
            tracing::debug!(
                completion = ?r.completion_id,
                outcome = ?r.outcome,
                case = ?r.case.as_ref().map(|c| (c.kind, &c.target)),
                "completion decided"
            );
            let case = r.case.map(|case| NewCase {
                case,
                completion_id: r.completion_id.clone(),
                language: r.language.clone(),
                document: r.document.clone(),
                workspace: self.workspace_of(&r.document),
                created_ms: now_ms(),
            });
            if let Some(c) = &case {
                self.warm_case(crate::repair::Case {
                    id: String::new(),
                    language: c.language.clone(),
                    prefix: c.case.prefix.clone(),
                    suffix: c.case.suffix.clone(),
                    target: c.case.target.clone(),
                    group: String::new(),
                });
            }
            let stored = case.is_some();
            let failure = case
                .as_ref()
                .is_some_and(|c| c.case.kind == CaseKind::Failure);
            self.store.send(StoreOp::Resolved {
                completion_id: r.completion_id,
                outcome: r.outcome,
                case,
                at_ms: now_ms(),
            });
            if failure {
                self.schedule_repair();
            }
            if stored {
                self.emit(Event::Changed);
            }
        }
    }

    /// Decides every open completion and waits until the store has written them (before a repair,
    /// and at shutdown).
    pub async fn decide_all(&self) {
        {
            let mut ws = self.workspace();
            let resolved = ws.decide_all();
            self.record(resolved);
        }
        let (tx, rx) = oneshot::channel();
        self.store.send(StoreOp::Flush(Box::new(move || {
            let _ = tx.send(());
        })));
        if tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .is_err()
        {
            tracing::error!("the feedback store did not finish writing within 10 s");
        }
    }
}
