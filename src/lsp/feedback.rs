//! The server's side of capture: completions shown go to the tracker and the store; edits and the
//! `star/did*` notifications decide their outcomes; decided cases go to the store's thread.

use super::server::Server;
use super::settings::Settings;
use crate::capture::{CaseKind, Resolved};
use crate::completion::Completion;
use crate::store::{Counts, NewCase, ShownRecord, StoreHandle, StoreOp};
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tower_lsp_server::jsonrpc::{self, Result};
use tower_lsp_server::ls_types::{MessageType, Position};

/// Where a completion was asked for, as the document stood then, with the context to store.
pub struct Shown {
    pub document: String,
    pub at: usize,
    pub version: i32,
    pub position: Position,
    /// The end of the text before the cursor and the start of the text after it: about what the
    /// prompt uses, copied now so the whole document is not kept for the store.
    pub prefix: String,
    pub suffix: String,
}

impl Shown {
    pub fn new(
        document: String,
        at: usize,
        version: i32,
        position: Position,
        prefix: &str,
        suffix: &str,
    ) -> Self {
        Self {
            document,
            at,
            version,
            position,
            prefix: tail(prefix, STORED_PREFIX_BYTES).to_owned(),
            suffix: head(suffix, STORED_SUFFIX_BYTES).to_owned(),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CompletionRef {
    completion_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Correction {
    completion_id: String,
    text: String,
}

/// The context stored with each shown completion: about what the prompt uses, not the whole file.
const STORED_PREFIX_BYTES: usize = 8192;
const STORED_SUFFIX_BYTES: usize = 2048;

fn now_ms() -> i64 {
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

impl Server {
    fn store(&self) -> Option<&StoreHandle> {
        self.state.store.get()
    }

    /// Starts the store thread; its troubles reach the editor once per kind, as a warning.
    pub(super) fn start_store(&self, settings: &Settings) -> StoreHandle {
        let client = self.client.clone();
        let runtime = tokio::runtime::Handle::current();
        StoreHandle::start(
            crate::env::data_dir(),
            settings.store_max_mb.saturating_mul(1 << 20),
            move |e| {
                let client = client.clone();
                let message = format!("star-ls: feedback is not being saved ({}): {e}", e.kind());
                runtime.spawn(async move {
                    client.show_message(MessageType::WARNING, message).await;
                });
            },
        )
    }

    /// Starts following a completion (or, with `None`, a place where the model proposed nothing).
    pub(super) fn track_shown(&self, shown: Shown, completion: Option<&Completion>) {
        let mut ws = self.lock_workspace();
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
        if let (Some(c), Some(store)) = (completion, self.store()) {
            store.send(StoreOp::Shown(ShownRecord {
                id: c.id.clone(),
                document: shown.document.clone(),
                workspace: self.workspace(),
                language,
                version: shown.version,
                line: shown.position.line,
                character: shown.position.character,
                prefix: shown.prefix,
                suffix: shown.suffix,
                proposed,
                patches: self
                    .state
                    .live_patches
                    .lock()
                    .map(|p| p.clone())
                    .unwrap_or_default(),
                fired: json!(c.generation.fired),
                shown_ms: now_ms(),
            }));
        }
        self.record(resolved);
    }

    fn workspace(&self) -> String {
        self.state.workspace.get().cloned().unwrap_or_default()
    }

    /// Sends decided completions to the store.
    pub(super) fn record(&self, resolved: Vec<Resolved>) {
        let Some(store) = self.store() else {
            return;
        };
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
                workspace: self.workspace(),
                created_ms: now_ms(),
            });
            let stored = case.is_some();
            let failure = case
                .as_ref()
                .is_some_and(|c| c.case.kind == CaseKind::Failure);
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
            store.send(StoreOp::Resolved {
                completion_id: r.completion_id,
                outcome: r.outcome,
                case,
                at_ms: now_ms(),
            });
            if failure {
                self.schedule_repair();
            }
            if stored {
                self.status_changed();
            }
        }
    }

    /// The scheduler: a repair in the background once `repairThreshold` failures are pending that no
    /// repair has seen (those one could not fix do not trigger it again on their own). A repair
    /// running now takes the new ones up when it ends.
    pub(super) fn schedule_repair(&self) {
        let threshold = self.settings().repair_threshold;
        if threshold == 0 {
            return;
        }
        let server = self.clone();
        tokio::spawn(async move {
            // Counted before the lock too: holding it shows a repair running (star.status).
            let due = async || server.failures_unseen().await.is_ok_and(|n| n >= threshold);
            loop {
                if !due().await {
                    return;
                }
                let Ok(lock) = server.state.repair.try_lock() else {
                    return;
                };
                if !due().await {
                    return;
                }
                match server.repair_locked(lock).await {
                    Ok(report) => tracing::info!("scheduled repair: {report:?}"),
                    Err(e) => {
                        tracing::warn!("scheduled repair: {}", e.message);
                        return;
                    }
                }
            }
        });
    }

    /// Every `captureIdleMs / 4` (at least 100 ms), decides the completions left idle.
    pub(super) fn spawn_idle_capture(&self) {
        let server = self.clone();
        let timeout = Duration::from_millis(self.settings().capture_idle_ms);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval((timeout / 4).max(Duration::from_millis(100)));
            loop {
                tick.tick().await;
                let mut ws = server.lock_workspace();
                let resolved = ws.idle(Instant::now(), timeout);
                server.record(resolved);
            }
        });
    }

    /// Decides every open completion and waits until the store has written them (at shutdown).
    pub(super) async fn capture_all(&self) {
        {
            let mut ws = self.lock_workspace();
            let resolved = ws.decide_all();
            self.record(resolved);
        }
        if let Some(store) = self.store() {
            let (tx, rx) = oneshot::channel();
            store.send(StoreOp::Flush(Box::new(move || {
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

    pub(super) async fn store_counts(&self) -> std::result::Result<Counts, String> {
        let store = self.store().ok_or("no store")?;
        let (tx, rx) = oneshot::channel();
        store.send(StoreOp::Counts(Box::new(move |r| {
            let _ = tx.send(r);
        })));
        rx.await
            .map_err(|_| "the store thread stopped".to_owned())?
    }

    /// `star.explain`: the patches that were live when a completion was made, and their entries that
    /// opened while it was made (per patch and layer: the keys, and the rows they opened at).
    pub(super) async fn explain(&self, id: String) -> Result<Value> {
        let store = self.store().ok_or_else(jsonrpc::Error::internal_error)?;
        let (tx, rx) = oneshot::channel();
        store.send(StoreOp::Explain(
            id.clone(),
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        ));
        match rx.await {
            Ok(Ok(Some(e))) => Ok(json!(super::proto::Explanation {
                completion_id: id,
                patches: e.patches,
                fired: e.fired,
            })),
            Ok(Ok(None)) => Err(super::proto::invalid_params(format!(
                "unknown completion {id}"
            ))),
            Ok(Err(e)) => Err(jsonrpc::Error {
                code: jsonrpc::ErrorCode::InternalError,
                message: e.into(),
                data: None,
            }),
            Err(_) => Err(jsonrpc::Error::internal_error()),
        }
    }

    /// `star/didAccept`: the editor inserted the completion.
    pub async fn did_accept(&self, params: CompletionRef) {
        self.lock_workspace().accept(&params.completion_id);
    }

    /// `star/didReject`: the editor dismissed it; what the developer writes there next is the target.
    pub async fn did_reject(&self, params: CompletionRef) {
        self.lock_workspace().reject(&params.completion_id);
    }

    /// `star/didCorrect`: the developer wrote `text` in place of the completion.
    pub async fn did_correct(&self, params: Correction) {
        let mut ws = self.lock_workspace();
        match ws.correct(&params.completion_id, &params.text) {
            Some(r) => self.record(vec![r]),
            None => tracing::warn!(
                "star/didCorrect for unknown or already decided completion {}",
                params.completion_id
            ),
        }
    }
}
