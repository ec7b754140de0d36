//! The language server: LSP requests and notifications in, one call on the application's `Host`
//! each, and its answers and events out as messages. Every handler does its document work
//! synchronously (so edits apply in arrival order) and awaits only the host's answer.

use super::proto;
use super::settings::{Multiline, Settings};
use crate::application::{self, Event, Host, Proposal, Shown};
use crate::capture::Change;
use crate::completion::{CompletionRequest, Document, EngineConfig, EngineError};
use crate::model::{Cancel, StopAt};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tower_lsp_server::jsonrpc::{self, Result};
use tower_lsp_server::ls_types::*;
use tower_lsp_server::{Client, LanguageServer};

#[derive(Clone)]
pub struct Server {
    pub(super) client: Client,
    pub(super) state: Arc<State>,
}

#[derive(Default)]
pub(super) struct State {
    settings: OnceLock<Settings>,
    /// The application, from `initialize` on.
    host: OnceLock<Arc<Host>>,
    /// Its events until `initialized` starts the task that turns them into messages.
    events: Mutex<Option<mpsc::UnboundedReceiver<Event>>>,
    /// Signalled whenever what `star.status` reports changes.
    status_changed: tokio::sync::Notify,
    /// Whether the client shows `$/progress` (`window.workDoneProgress`).
    pub(super) shows_progress: OnceLock<bool>,
    /// Per document and method: the newest request's number and its cancel switch. A newer request
    /// supersedes an older one of the same method only, so a client asking for both an inline completion
    /// and a completion list at one keystroke gets both.
    latest: Mutex<HashMap<(String, &'static str), Newest>>,
    next_request: std::sync::atomic::AtomicU64,
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

    /// The application; a request before `initialize` is invalid.
    pub(super) fn host(&self) -> Result<&Arc<Host>> {
        self.state
            .host
            .get()
            .ok_or_else(jsonrpc::Error::invalid_request)
    }

    pub(super) fn settings(&self) -> Settings {
        self.state.settings.get().cloned().unwrap_or_default()
    }

    /// Runs a completion at `pos` in `uri`; `None` when superseded by a newer request or cancelled.
    async fn complete_at(
        &self,
        method: &'static str,
        uri: &Uri,
        pos: Position,
        stop: Option<StopAt>,
    ) -> Result<Option<(Proposal, String, Position)>> {
        let host = self.host()?.clone();
        let key = uri.as_str().to_owned();
        let (prefix, suffix, word_start, at, version) = host
            .document(&key, |doc| {
                let at = proto::offset(doc, pos)?;
                let (prefix, suffix) = doc.split_at(at);
                let word_chars = proto::word_before(&prefix).chars().count();
                let word_start = proto::position(doc, at - word_chars);
                Ok::<_, jsonrpc::Error>((prefix, suffix, word_start, at, doc.version))
            })
            .ok_or_else(|| proto::invalid_params(format!("unknown document {key}")))??;
        let shown = Shown::new(
            key.clone(),
            (at, pos.line, pos.character),
            version,
            &prefix,
            &suffix,
        );
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
        let word = proto::word_before(&prefix).to_owned();
        if let Some(rest) = host.ahead(&shown) {
            return Ok(Some((rest, word, word_start)));
        }
        let debounce = self.settings().debounce_ms;
        if debounce > 0 {
            tokio::time::sleep(Duration::from_millis(debounce)).await;
        }
        if cancel.is_cancelled() {
            return Ok(None);
        }
        let request = CompletionRequest {
            document: key,
            prefix,
            suffix,
            stop,
            cancel,
            cross: Default::default(),
        };
        match host.complete(request, shown).await {
            Ok(Some(c)) => Ok(Some((c, word, word_start))),
            Ok(None) | Err(EngineError::Cancelled) => Ok(None),
            Err(e) => Err(proto::internal(e)),
        }
    }

    /// Sends `star/status` after each change, so clients need not poll. One task reads the status
    /// after the change was signalled, so the last notification always shows the state as it is now.
    async fn publish_status(self, host: Arc<Host>) {
        loop {
            self.state.status_changed.notified().await;
            let status = host.status().await;
            self.client
                .send_notification::<proto::StarStatus>(status)
                .await;
        }
    }
}

/// What star-ls serves: incremental sync, both completion kinds, its commands, workspace folders.
fn capabilities() -> ServerCapabilities {
    ServerCapabilities {
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
            commands: super::commands::COMMANDS.map(str::to_owned).to_vec(),
            ..ExecuteCommandOptions::default()
        }),
        // One server for every project the editor opens: cases are kept by folder.
        workspace: Some(WorkspaceServerCapabilities {
            workspace_folders: Some(WorkspaceFoldersServerCapabilities {
                supported: Some(true),
                change_notifications: Some(OneOf::Left(true)),
            }),
            file_operations: None,
        }),
        ..ServerCapabilities::default()
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
        let roots: Vec<String> = match &params.workspace_folders {
            Some(folders) if !folders.is_empty() => {
                folders.iter().map(|f| f.uri.as_str().to_owned()).collect()
            }
            _ => params
                .root_uri
                .iter()
                .map(|u| u.as_str().to_owned())
                .collect(),
        };
        let _ = self.state.shows_progress.set(
            params
                .capabilities
                .window
                .as_ref()
                .and_then(|w| w.work_done_progress)
                .unwrap_or(false),
        );
        if self.state.host.get().is_none() {
            let mut engine = EngineConfig::new(
                settings
                    .model_path
                    .clone()
                    .unwrap_or_else(crate::env::model_path),
            );
            engine.max_tokens = settings.max_tokens.clamp(1, 1024);
            engine.limits = settings.context;
            engine.temperature = settings.temperature;
            let config = application::Config {
                engine,
                model_path: settings.model_path.clone(),
                data_dir: crate::env::data_dir(),
                store_max_bytes: settings.store_max_mb.saturating_mul(1 << 20),
                roots,
                policy: settings.policy(),
                capture_idle: Duration::from_millis(settings.capture_idle_ms),
                cross_file_tokens: settings.cross_file_tokens,
                cross_file_layout: settings.cross_file_layout,
                exclude: application::Exclude::with(&settings.exclude).unwrap_or_default(),
            };
            let (tx, rx) = mpsc::unbounded_channel();
            let state = Arc::downgrade(&self.state);
            let host = Host::start(config, move |event| match event {
                Event::Changed => {
                    if let Some(state) = state.upgrade() {
                        state.status_changed.notify_one();
                    }
                }
                event => {
                    let _ = tx.send(event);
                }
            });
            let _ = self.state.host.set(host);
            *self.state.events.lock().unwrap_or_else(|e| e.into_inner()) = Some(rx);
        }
        let _ = self.state.settings.set(settings);

        Ok(InitializeResult {
            server_info: Some(ServerInfo {
                name: "star-ls".into(),
                version: Some(env!("CARGO_PKG_VERSION").into()),
            }),
            capabilities: capabilities(),
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
        if let (Some(events), Ok(host)) = (events, self.host()) {
            tokio::spawn(self.clone().report_events(events));
            tokio::spawn(self.clone().publish_status(host.clone()));
        }
    }

    async fn shutdown(&self) -> Result<()> {
        if let Ok(host) = self.host() {
            host.decide_all().await;
        }
        Ok(())
    }

    async fn did_open(&self, params: DidOpenTextDocumentParams) {
        let d = params.text_document;
        if let Ok(host) = self.host() {
            host.open(
                d.uri.as_str().to_owned(),
                Document::new(&d.text, d.version, &d.language_id),
            );
        }
    }

    async fn did_change(&self, params: DidChangeTextDocumentParams) {
        let changes = params.content_changes.into_iter().map(|c| Change {
            range: c.range.map(|r| {
                (
                    (r.start.line, r.start.character),
                    (r.end.line, r.end.character),
                )
            }),
            text: c.text,
        });
        if let Ok(host) = self.host() {
            let uri = params.text_document.uri;
            host.change(uri.as_str(), params.text_document.version, changes);
        }
    }

    async fn did_change_workspace_folders(&self, params: DidChangeWorkspaceFoldersParams) {
        if let Ok(host) = self.host() {
            let uris = |folders: Vec<WorkspaceFolder>| -> Vec<String> {
                folders
                    .into_iter()
                    .map(|f| f.uri.as_str().to_owned())
                    .collect()
            };
            host.change_roots(uris(params.event.added), &uris(params.event.removed));
        }
    }

    async fn did_close(&self, params: DidCloseTextDocumentParams) {
        let key = params.text_document.uri.as_str();
        if let Ok(host) = self.host() {
            host.close(key);
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
        self.command(&params.command, params.arguments.into_iter().next())
            .await
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
