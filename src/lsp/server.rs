//! The language server: LSP requests and notifications in, core calls out. Every handler does its
//! document work synchronously (so edits apply in arrival order) and awaits only the engine's answer.

use super::proto::{self, ACCEPTED_COMMAND};
use super::settings::{Multiline, Settings};
use crate::capture::{Change, Unfollowed, Workspace};
use crate::completion::{
    Completion, CompletionRequest, Document, Engine, EngineConfig, EngineError, EngineEvent,
};
use crate::model::{Cancel, StopAt};
use crate::store::StoreHandle;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tower_lsp_server::jsonrpc::{self, Result};
use tower_lsp_server::ls_types::*;
use tower_lsp_server::{Client, LanguageServer, NotCancellable, OngoingProgress, Unbounded};

#[derive(Clone)]
pub struct Server {
    pub(super) client: Client,
    pub(super) state: Arc<State>,
}

#[derive(Default)]
pub(super) struct State {
    settings: OnceLock<Settings>,
    pub(super) engine: OnceLock<Engine>,
    events: Mutex<Option<mpsc::UnboundedReceiver<EngineEvent>>>,
    /// The open documents and the completions followed through their edits.
    workspace_docs: Mutex<Workspace>,
    pub(super) store: OnceLock<StoreHandle>,
    /// The workspace the cases belong to (its root URI), for `star-ls forget` and exports.
    pub(super) workspace: OnceLock<String>,
    /// The loaded model file's sha256: the ledger's patches apply to this model only.
    pub(super) model_sha: OnceLock<String>,
    /// The factored LM head for the semantic steer, built by the first repair.
    pub(super) head: Arc<Mutex<Option<Arc<crate::repair::Head>>>>,
    /// Cases run through the frozen lower layers, kept for repairs (`repair::Residuals`).
    pub(super) residuals: crate::repair::Residuals,
    /// Held while a repair (or `star.forget`) runs: one at a time, and a `star.repairNow` sent
    /// meanwhile waits for it instead of failing.
    pub(super) repair: tokio::sync::Mutex<()>,
    /// Failures the last repair saw and left unfixed: the scheduler counts new ones past these.
    pub(super) pending_after_repair: std::sync::atomic::AtomicU64,
    /// Signalled whenever what `star.status` reports changes.
    status_changed: tokio::sync::Notify,
    /// Whether the client shows `$/progress` (`window.workDoneProgress`).
    pub(super) shows_progress: OnceLock<bool>,
    pub(super) last_repair: Mutex<Option<crate::learn::RepairReport>>,
    /// Ids of the patches in the live overlay (recorded with each completion, for `star.explain`).
    pub(super) live_patches: Mutex<Vec<String>>,
    /// Set once the ledger's patches for the loaded model are live, or cannot be: completions wait for
    /// it, so that after a restart none is served (and recorded) without them.
    pub(super) overlay_restored: tokio::sync::SetOnce<()>,
    /// Per document and method: the newest request's number and its cancel switch. A newer request
    /// supersedes an older one of the same method only, so a client asking for both an inline completion
    /// and a completion list at one keystroke gets both.
    latest: Mutex<HashMap<(String, &'static str), Newest>>,
    next_request: std::sync::atomic::AtomicU64,
    model_status: Mutex<String>,
}

/// A request's number and its cancel switch.
type Newest = (u64, Cancel);

/// Cancels the engine job when the handler's future is dropped (`$/cancelRequest` drops it).
struct CancelOnDrop(Cancel);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl Server {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            state: Arc::default(),
        }
    }

    pub(super) fn engine(&self) -> Option<&Engine> {
        self.state.engine.get()
    }

    pub(super) fn settings(&self) -> Settings {
        self.state.settings.get().cloned().unwrap_or_default()
    }

    pub(super) fn lock_workspace(&self) -> std::sync::MutexGuard<'_, Workspace> {
        // A panic elsewhere while holding the lock must not take the server down with it.
        self.state
            .workspace_docs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Runs a completion at `pos` in `uri`; `None` when superseded by a newer request or cancelled.
    async fn complete_at(
        &self,
        method: &'static str,
        uri: &Uri,
        pos: Position,
        stop: Option<StopAt>,
    ) -> Result<Option<(Completion, String, Position)>> {
        let key = uri.as_str().to_owned();
        let (prefix, suffix, word_start, at, version) = {
            let ws = self.lock_workspace();
            let doc = ws
                .document(&key)
                .ok_or_else(|| proto::invalid_params(format!("unknown document {key}")))?;
            let at = proto::offset(doc, pos)?;
            let (prefix, suffix) = doc.split_at(at);
            let word_chars = proto::word_before(&prefix).chars().count();
            let word_start = proto::position(doc, at - word_chars);
            (prefix, suffix, word_start, at, doc.version)
        };
        let shown = super::feedback::Shown::new(key.clone(), at, version, pos, &prefix, &suffix);
        let stop = stop.unwrap_or_else(|| auto_stop(&prefix, &suffix));

        let cancel = Cancel::default();
        let _guard = CancelOnDrop(cancel.clone());
        let number = self
            .state
            .next_request
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some((_, older)) = self
            .state
            .latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((key.clone(), method), (number, cancel.clone()))
        {
            older.cancel();
        }
        let debounce = self.settings().debounce_ms;
        if debounce > 0 {
            tokio::time::sleep(Duration::from_millis(debounce)).await;
        }
        if cancel.is_cancelled() {
            return Ok(None);
        }
        let Some(engine) = self.state.engine.get() else {
            return Err(jsonrpc::Error::invalid_request());
        };
        // Not before the ledger's patches are live: a job queued while the model loads would run first.
        self.state.overlay_restored.wait().await;
        let word = proto::word_before(&prefix).to_owned();
        let (tx, rx) = oneshot::channel();
        engine.complete(
            CompletionRequest {
                document: key,
                prefix,
                suffix,
                stop,
                cancel,
            },
            move |r| {
                let _ = tx.send(r);
            },
        );
        match rx.await {
            Ok(Ok(c)) if c.generation.text.trim().is_empty() => {
                self.track_shown(shown, None);
                Ok(None)
            }
            Ok(Ok(c)) => {
                self.track_shown(shown, Some(&c));
                Ok(Some((c, word, word_start)))
            }
            Ok(Err(EngineError::Cancelled)) => Ok(None),
            Ok(Err(e)) => Err(jsonrpc::Error {
                code: jsonrpc::ErrorCode::InternalError,
                message: e.to_string().into(),
                data: None,
            }),
            Err(_) => Err(jsonrpc::Error::internal_error()),
        }
    }

    async fn status(&self) -> proto::Status {
        let settings = self.settings();
        let model = self
            .state
            .model_status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        let engine = self.state.engine.get();
        let patches = self.state.live_patches.lock().map_or(0, |p| p.len());
        let last_repair = self.state.last_repair.lock().ok().and_then(|r| r.clone());
        let documents = self.lock_workspace().open_count();
        let (counts, store_error) = match self.store_counts().await {
            Ok(c) => (c, None),
            Err(e) => (Default::default(), Some(e)),
        };
        proto::Status {
            model,
            model_path: settings.model_path,
            documents,
            failures_pending: counts.failures_pending,
            guard_cases: counts.guard_cases,
            completions_recorded: counts.completions,
            store_error,
            patches,
            repair_running: self.state.repair.try_lock().is_err(),
            last_repair,
            completions: engine.map(Engine::stats),
        }
    }

    /// Something `star.status` reports changed: `star/status` goes out (`publish_status`).
    pub(super) fn status_changed(&self) {
        self.state.status_changed.notify_one();
    }

    /// Sends `star/status` after each change, so clients need not poll. One task reads the status
    /// after the change was signalled, so the last notification always shows the state as it is now.
    async fn publish_status(self) {
        loop {
            self.state.status_changed.notified().await;
            let status = self.status().await;
            self.client
                .send_notification::<proto::StarStatus>(status)
                .await;
        }
    }

    /// Starts a `$/progress` report if the client shows them. Bounded: a client that never answers
    /// `window/workDoneProgress/create` must not hold up what waits on the progress.
    pub(super) async fn begin_progress(
        &self,
        token: &str,
        message: &str,
    ) -> Option<OngoingProgress<Unbounded, NotCancellable>> {
        if !self.state.shows_progress.get().copied().unwrap_or(false) {
            return None;
        }
        let token = ProgressToken::String(token.into());
        let created = tokio::time::timeout(
            Duration::from_secs(2),
            self.client.create_work_done_progress(token.clone()),
        );
        match created.await {
            Ok(Ok(())) => Some(
                self.client
                    .progress(token, "star-ls")
                    .with_message(message)
                    .begin()
                    .await,
            ),
            _ => None, // the client does not do progress; logs still say it
        }
    }

    /// Forwards model-load events to the editor: `$/progress` while loading, a message if it fails.
    async fn report_model_events(self, mut events: mpsc::UnboundedReceiver<EngineEvent>) {
        let mut progress = self.begin_progress("star-ls/model", "loading model").await;
        while let Some(event) = events.recv().await {
            let text = match &event {
                EngineEvent::Loading { path } => format!("loading {}", path.display()),
                EngineEvent::Loaded { path, seconds } => {
                    format!("ready: {} ({seconds:.1} s)", path.display())
                }
                EngineEvent::LoadFailed { error } => format!("failed: {error}"),
            };
            tracing::info!("model {text}");
            if let Ok(mut s) = self.state.model_status.lock() {
                *s = text.clone();
            }
            match event {
                EngineEvent::Loading { .. } => {}
                EngineEvent::Loaded { path, .. } => {
                    if let Some(p) = progress.take() {
                        p.finish_with_message(text).await;
                    }
                    let server = self.clone();
                    tokio::spawn(async move { server.restore_patches(path).await });
                }
                EngineEvent::LoadFailed { error } => {
                    let _ = self.state.overlay_restored.set(());
                    if let Some(p) = progress.take() {
                        p.finish_with_message("model failed to load").await;
                    }
                    self.client
                        .show_message(MessageType::ERROR, format!("star-ls: {error}"))
                        .await;
                }
            }
        }
    }
}

/// Inline completions run to the end of the block on a blank line, else to the end of the line.
fn auto_stop(prefix: &str, suffix: &str) -> StopAt {
    let line_before = prefix.rsplit('\n').next().unwrap_or("");
    let line_after = suffix.split('\n').next().unwrap_or("");
    if line_before.trim().is_empty() && line_after.trim().is_empty() {
        StopAt::Block
    } else {
        StopAt::Line
    }
}

impl LanguageServer for Server {
    async fn initialize(&self, params: InitializeParams) -> Result<InitializeResult> {
        let (settings, warning) = Settings::from_options(params.initialization_options);
        if let Some(w) = warning {
            tracing::warn!("{w}");
            self.client
                .show_message(MessageType::WARNING, format!("star-ls: {w}"))
                .await;
        }
        crate::env::set_threads(settings.threads);
        #[allow(deprecated)] // root_uri: older clients send only it
        let workspace = params
            .workspace_folders
            .as_ref()
            .and_then(|f| f.first())
            .map(|f| f.uri.as_str().to_owned())
            .or_else(|| params.root_uri.as_ref().map(|u| u.as_str().to_owned()))
            .unwrap_or_default();
        let _ = self.state.workspace.set(workspace);
        let _ = self.state.shows_progress.set(
            params
                .capabilities
                .window
                .as_ref()
                .and_then(|w| w.work_done_progress)
                .unwrap_or(false),
        );
        let _ = self.state.store.set(self.start_store(&settings));
        let mut config = EngineConfig::new(
            settings
                .model_path
                .clone()
                .unwrap_or_else(crate::env::model_path),
        );
        config.max_tokens = settings.max_tokens.clamp(1, 1024);
        config.limits = settings.context;
        config.temperature = settings.temperature;
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = self.state.engine.set(Engine::start(config, move |e| {
            let _ = tx.send(e);
        }));
        *self.state.events.lock().unwrap_or_else(|e| e.into_inner()) = Some(rx);
        let _ = self.state.settings.set(settings);

        Ok(InitializeResult {
            server_info: Some(ServerInfo {
                name: "star-ls".into(),
                version: Some(env!("CARGO_PKG_VERSION").into()),
            }),
            capabilities: ServerCapabilities {
                // Options rather than a bare kind: a bare kind makes some clients (Neovim) send
                // didSave, which we do not need.
                text_document_sync: Some(TextDocumentSyncCapability::Options(
                    TextDocumentSyncOptions {
                        open_close: Some(true),
                        change: Some(TextDocumentSyncKind::INCREMENTAL),
                        ..TextDocumentSyncOptions::default()
                    },
                )),
                completion_provider: Some(CompletionOptions::default()),
                inline_completion_provider: Some(OneOf::Left(true)),
                execute_command_provider: Some(ExecuteCommandOptions {
                    commands: vec![
                        ACCEPTED_COMMAND.into(),
                        "star.status".into(),
                        "star.explain".into(),
                        "star.repairNow".into(),
                        "star.listPatches".into(),
                        "star.rollback".into(),
                        "star.forget".into(),
                    ],
                    ..ExecuteCommandOptions::default()
                }),
                ..ServerCapabilities::default()
            },
            offset_encoding: None, // UTF-16, LSP's default
        })
    }

    async fn initialized(&self, _: InitializedParams) {
        let events = self
            .state
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        // Only the first `initialized` starts these: a client that repeats it must not pile up tasks.
        if let Some(events) = events {
            tokio::spawn(self.clone().report_model_events(events));
            self.spawn_idle_capture();
            tokio::spawn(self.clone().publish_status());
        }
    }

    async fn shutdown(&self) -> Result<()> {
        self.capture_all().await;
        Ok(())
    }

    async fn did_open(&self, params: DidOpenTextDocumentParams) {
        let d = params.text_document;
        self.lock_workspace().open(
            d.uri.as_str().to_owned(),
            Document::new(&d.text, d.version, &d.language_id),
        );
    }

    async fn did_change(&self, params: DidChangeTextDocumentParams) {
        let key = params.text_document.uri.as_str().to_owned();
        let version = params.text_document.version;
        let changes = params.content_changes.into_iter().map(|c| Change {
            range: c.range.map(|r| {
                (
                    (r.start.line, r.start.character),
                    (r.end.line, r.end.character),
                )
            }),
            text: c.text,
        });
        let mut ws = self.lock_workspace();
        if let Some(doc) = ws.document(&key).filter(|d| version <= d.version) {
            tracing::warn!(
                "stale didChange for {key}: version {version} after {}",
                doc.version
            );
        }
        match ws.change(&key, version, changes, std::time::Instant::now()) {
            Ok(resolved) => self.record(resolved),
            Err(Unfollowed::Unknown) => tracing::warn!("didChange for unknown document {key}"),
            Err(Unfollowed::Dropped { resolved, error }) => {
                // The client and server now disagree on the text; say so rather than guess.
                tracing::error!("didChange for {key} could not be applied ({error}); document dropped until reopened");
                self.record(resolved);
            }
        }
    }

    async fn did_close(&self, params: DidCloseTextDocumentParams) {
        let key = params.text_document.uri.as_str();
        {
            let mut ws = self.lock_workspace();
            let resolved = ws.close(key);
            self.record(resolved);
        }
        self.state
            .latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(doc, _), (_, cancel)| {
                if doc == key {
                    cancel.cancel();
                }
                doc != key
            });
    }

    async fn completion(&self, params: CompletionParams) -> Result<Option<CompletionResponse>> {
        let p = params.text_document_position;
        let Some((c, word, start)) = self
            .complete_at(
                "textDocument/completion",
                &p.text_document.uri,
                p.position,
                Some(StopAt::Line),
            )
            .await?
        else {
            return Ok(None);
        };
        let pos = Position::new(
            start.line,
            start.character + word.encode_utf16().count() as u32,
        );
        Ok(Some(CompletionResponse::List(CompletionList {
            // The text changes with every keystroke: ask again rather than filter this list.
            is_incomplete: true,
            items: vec![proto::completion_item(&c, &word, start, pos)],
        })))
    }

    async fn execute_command(&self, params: ExecuteCommandParams) -> Result<Option<Value>> {
        let first = params.arguments.first().cloned();
        match params.command.as_str() {
            "star.status" => Ok(Some(json!(self.status().await))),
            ACCEPTED_COMMAND => {
                let id = proto::completion_id_arg(first)?;
                self.lock_workspace().accept(&id);
                Ok(None)
            }
            "star.explain" => self
                .explain(proto::completion_id_arg(first)?)
                .await
                .map(Some),
            "star.repairNow" => self.repair_now().await.map(|r| Some(json!(r))),
            "star.listPatches" => self.list_patches().await.map(Some),
            "star.rollback" => self.rollback(first).await.map(Some),
            "star.forget" => self.forget(first).await.map(Some),
            other => Err(proto::invalid_params(format!("unknown command {other}"))),
        }
    }
}

impl Server {
    /// `textDocument/inlineCompletion` (LSP 3.18), routed as a custom method.
    pub async fn inline_completion(
        &self,
        params: InlineCompletionParams,
    ) -> Result<Option<InlineCompletionResponse>> {
        let p = params.text_document_position;
        let stop = match self.settings().multiline {
            Multiline::Auto => None,
            Multiline::Line => Some(StopAt::Line),
            Multiline::Block => Some(StopAt::Block),
        };
        let Some((c, word, start)) = self
            .complete_at(
                "textDocument/inlineCompletion",
                &p.text_document.uri,
                p.position,
                stop,
            )
            .await?
        else {
            return Ok(Some(InlineCompletionResponse::List(InlineCompletionList {
                items: vec![],
            })));
        };
        let pos = Position::new(
            start.line,
            start.character + word.encode_utf16().count() as u32,
        );
        Ok(Some(InlineCompletionResponse::List(InlineCompletionList {
            items: vec![proto::inline_item(&c, pos)],
        })))
    }
}
