//! The application: what the server does, with no protocol in it (rust-analyzer's `AnalysisHost`). A
//! `Host` owns the engine, the store, the open documents with the completions followed through them,
//! and the repair service; the LSP handlers turn each message into one call on it and its answers and
//! `Event`s back into messages.
//!
//! Architecture invariant: no protocol types; the LSP loop's calls never wait on the model or the
//! store's disk (they send work and await its answer); STAR runs on tokio's blocking pool.

mod feedback;
mod repair;

pub use feedback::Shown;

use crate::capture::{Change, Unfollowed, Workspace};
use crate::completion::Layout;
use crate::completion::{CompletionRequest, CrossFile, Document, Engine, EngineConfig};
use crate::completion::{EngineError, EngineEvent, EngineStats};
use crate::learn::{Policy, RepairReport};
use crate::store::{Counts, StoreHandle, StoreOp};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// What a `Host` is started with.
pub struct Config {
    pub engine: EngineConfig,
    /// The model file as the settings named it, for `Status::model_path` (None: the default).
    pub model_path: Option<PathBuf>,
    /// Where the feedback store lives, and its size cap in bytes.
    pub data_dir: PathBuf,
    pub store_max_bytes: u64,
    /// The workspace folders the cases belong to (their root URIs), for `star-ls forget` and exports.
    pub roots: Vec<String>,
    pub policy: Policy,
    /// A shown completion untouched this long is decided.
    pub capture_idle: Duration,
    /// Tokens of other files' chunks a completion's prompt may take (0: none), and how.
    pub cross_file_tokens: usize,
    pub cross_file_layout: Layout,
    /// Files never completed, recorded or shown to another file's prompt (`Exclude`).
    pub exclude: Exclude,
}

/// The files whose text must stay out of the model and the store: `.env` files, keys. A glob with a
/// `/` matches the whole path, one without it the file's name.
#[derive(Debug, Clone)]
pub struct Exclude(globset::GlobSet);

impl Exclude {
    /// What is always excluded; settings add to it.
    pub const DEFAULTS: [&str; 4] = [".env*", "*.pem", "*.key", "id_*"];

    /// The defaults and `more`; an error names a glob that does not parse.
    pub fn with(more: &[String]) -> std::result::Result<Self, globset::Error> {
        let mut set = globset::GlobSetBuilder::new();
        for glob in Self::DEFAULTS
            .iter()
            .copied()
            .chain(more.iter().map(String::as_str))
        {
            set.add(
                globset::GlobBuilder::new(glob)
                    .literal_separator(true)
                    .build()?,
            );
        }
        Ok(Self(set.build()?))
    }

    /// Whether document `uri` (a `file:` URI or a path) is excluded.
    pub fn excludes(&self, uri: &str) -> bool {
        let path = uri.strip_prefix("file://").unwrap_or(uri);
        let name = path.rsplit('/').next().unwrap_or(path);
        self.0.is_match(name) || self.0.is_match(path)
    }
}

impl Default for Exclude {
    fn default() -> Self {
        Self::with(&[]).expect("the default globs parse")
    }
}

/// What the host tells its owner, as it happens.
#[derive(Debug, Clone)]
pub enum Event {
    /// Something `Host::status` reports changed.
    Changed,
    /// The model's lifecycle, as the engine reports it.
    Model(EngineEvent),
    /// The store cannot save feedback (once per kind of trouble).
    StoreTrouble(String),
    /// A repair began.
    RepairStarted,
    /// It ended: its report, or None when it failed (the caller of `repair_now` gets the error).
    RepairEnded(Option<RepairReport>),
}

/// Why the host could not do what was asked.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Error(String);

impl Error {
    fn new(message: impl std::fmt::Display) -> Self {
        Self(message.to_string())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// What `star.status` answers and `star/status` sends (CONTRACT.md, README's additions).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// `loading`, `ready` or why not.
    pub model: String,
    pub model_path: Option<PathBuf>,
    pub documents: usize,
    pub failures_pending: i64,
    pub guard_cases: i64,
    pub completions_recorded: i64,
    /// Why the store cannot be read, if it cannot.
    pub store_error: Option<String>,
    pub patches: usize,
    pub repair_running: bool,
    pub last_repair: Option<RepairReport>,
    pub completions: Option<EngineStats>,
}

/// What `star.explain` answers.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    pub completion_id: String,
    /// The patches live when the completion was made.
    pub patches: Vec<String>,
    /// Their entries that opened while it was made; null for completions stored before this was kept.
    pub fired: Option<serde_json::Value>,
}

/// What the editor shows: a completion's id, its text from the cursor on, and the ledger's entries
/// that fired while it was made (None for the rest of one shown before: the editor has them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    pub id: String,
    pub text: String,
    pub fired: Option<Vec<String>>,
}

pub struct Host {
    /// Itself, for the work it spawns.
    me: Weak<Host>,
    /// This server among those of one data directory (its process and start), for the store's leases.
    holder: String,
    engine: Engine,
    store: StoreHandle,
    /// The workspace folders, as the editor has them now.
    roots: Mutex<Vec<String>>,
    policy: Policy,
    model_path: Option<PathBuf>,
    cross_file_tokens: usize,
    cross_file_layout: Layout,
    exclude: Exclude,
    /// The model's lifecycle in a line (`Status::model`).
    model_status: Mutex<String>,
    /// The open documents and the completions followed through their edits.
    workspace: Mutex<Workspace>,
    repairs: repair::Repairs,
    on_event: Arc<dyn Fn(Event) + Send + Sync>,
}

impl Host {
    /// Starts the store and the engine (which loads the model, then the ledger's patches go live), the
    /// idle timer and the watch on the store. Must run inside a tokio runtime.
    pub fn start(config: Config, on_event: impl Fn(Event) + Send + Sync + 'static) -> Arc<Self> {
        let on_event: Arc<dyn Fn(Event) + Send + Sync> = Arc::new(on_event);
        let store_events = on_event.clone();
        let store = StoreHandle::start(config.data_dir, config.store_max_bytes, move |e| {
            store_events(Event::StoreTrouble(format!(
                "feedback is not being saved ({}): {e}",
                e.kind()
            )))
        });
        // The engine reports from its own thread, possibly before the host exists: through a channel.
        let (tx, mut engine_events) = tokio::sync::mpsc::unbounded_channel();
        let engine = Engine::start(config.engine, move |e| {
            let _ = tx.send(e);
        });
        let host = Arc::new_cyclic(|me| Self {
            me: me.clone(),
            holder: format!("{}-{}", std::process::id(), feedback::now_ms()),
            engine,
            store,
            roots: Mutex::new(config.roots),
            policy: config.policy,
            model_path: config.model_path,
            cross_file_tokens: config.cross_file_tokens,
            cross_file_layout: config.cross_file_layout,
            exclude: config.exclude,
            model_status: Mutex::default(),
            workspace: Mutex::new(if config.cross_file_tokens > 0 {
                Workspace::with_other_files()
            } else {
                Workspace::default()
            }),
            repairs: repair::Repairs::default(),
            on_event,
        });
        let weak = Arc::downgrade(&host);
        tokio::spawn(async move {
            while let Some(event) = engine_events.recv().await {
                let Some(host) = weak.upgrade() else { return };
                host.model_event(event);
            }
        });
        spawn_idle_capture(Arc::downgrade(&host), config.capture_idle);
        spawn_store_watch(Arc::downgrade(&host));
        host
    }

    fn emit(&self, event: Event) {
        (self.on_event)(event);
    }

    fn model_event(self: &Arc<Self>, event: EngineEvent) {
        let text = match &event {
            EngineEvent::Loading { path } => format!("loading {}", path.display()),
            EngineEvent::Loaded { path, seconds } => {
                format!("ready: {} ({seconds:.1} s)", path.display())
            }
            EngineEvent::LoadFailed { error } => format!("failed: {error}"),
        };
        tracing::info!("model {text}");
        *lock(&self.model_status) = text;
        match &event {
            EngineEvent::Loading { .. } => {}
            EngineEvent::Loaded { path, .. } => {
                let (host, path) = (self.clone(), path.clone());
                tokio::spawn(async move { host.restore_patches(path).await });
            }
            EngineEvent::LoadFailed { .. } => self.repairs.no_ledger(),
        }
        self.emit(Event::Model(event));
        self.emit(Event::Changed);
    }

    fn workspace(&self) -> MutexGuard<'_, Workspace> {
        lock(&self.workspace)
    }

    /// The workspace folder `uri` is in: the innermost one holding it, else the first (an editor may
    /// open files outside every folder), else none ("").
    pub fn workspace_of(&self, uri: &str) -> String {
        let roots = lock(&self.roots);
        let inside = |root: &&String| {
            let root = root.trim_end_matches('/');
            uri.strip_prefix(root)
                .is_some_and(|rest| rest.starts_with('/'))
        };
        roots
            .iter()
            .filter(inside)
            .max_by_key(|r| r.len())
            .or(roots.first())
            .cloned()
            .unwrap_or_default()
    }

    /// The editor's workspace folders changed.
    pub fn change_roots(&self, added: Vec<String>, removed: &[String]) {
        let mut roots = lock(&self.roots);
        roots.retain(|r| !removed.contains(r));
        for root in added {
            if !roots.contains(&root) {
                roots.push(root);
            }
        }
    }

    /// The first workspace folder ("" when there is none): `star.forget`'s default.
    pub fn first_root(&self) -> String {
        lock(&self.roots).first().cloned().unwrap_or_default()
    }

    /// Reads the open document `uri`, if it is open.
    pub fn document<R>(&self, uri: &str, read: impl FnOnce(&Document) -> R) -> Option<R> {
        self.workspace().document(uri).map(read)
    }

    /// An excluded document is followed (its edits apply) but stays out of other files' prompts.
    pub fn open(&self, uri: String, document: Document) {
        let mut ws = self.workspace();
        if self.exclude.excludes(&uri) {
            ws.open_private(uri, document);
        } else {
            ws.open(uri, document);
        }
    }

    /// Applies an editor's changes to `uri` in order, deciding the completions they settle.
    pub fn change(&self, uri: &str, version: i32, changes: impl IntoIterator<Item = Change>) {
        let mut ws = self.workspace();
        if let Some(doc) = ws.document(uri).filter(|d| version <= d.version) {
            tracing::warn!(
                "stale didChange for {uri}: version {version} after {}",
                doc.version
            );
        }
        match ws.change(uri, version, changes, Instant::now()) {
            Ok(resolved) => self.record(resolved),
            Err(Unfollowed::Unknown) => tracing::warn!("didChange for unknown document {uri}"),
            Err(Unfollowed::Dropped { resolved, error }) => {
                // The client and server now disagree on the text; say so rather than guess.
                tracing::error!("didChange for {uri} could not be applied ({error}); document dropped until reopened");
                self.record(resolved);
            }
        }
    }

    pub fn close(&self, uri: &str) {
        let mut ws = self.workspace();
        let resolved = ws.close(uri);
        self.record(resolved);
    }

    /// The editor inserted completion `id`.
    pub fn accept(&self, id: &str) {
        self.workspace().accept(id);
    }

    /// The editor dismissed it; what the developer writes there next is the target.
    pub fn reject(&self, id: &str) {
        self.workspace().reject(id);
    }

    /// The developer wrote `text` in place of completion `id`.
    pub fn correct(&self, id: &str, text: &str) {
        let mut ws = self.workspace();
        match ws.correct(id, text) {
            Some(r) => self.record(vec![r]),
            None => {
                tracing::warn!("a correction for unknown or already decided completion {id}")
            }
        }
    }

    /// The rest of a completion still shown where `shown` asks, whose start the developer typed or
    /// took a word of: the model need not run again, and its outcome stays one case.
    pub fn ahead(&self, shown: &Shown) -> Option<Proposal> {
        let (id, text) = self
            .workspace()
            .ahead(&shown.document, shown.version, shown.at)?;
        Some(Proposal {
            id,
            text,
            fired: None,
        })
    }

    /// Runs `request` where `shown` says, once the ledger's patches are live, and follows what it
    /// proposed. None when the model proposes nothing but blanks, and in an excluded document, where
    /// the model never runs and nothing is recorded.
    pub async fn complete(
        &self,
        mut request: CompletionRequest,
        shown: Shown,
    ) -> std::result::Result<Option<Proposal>, EngineError> {
        if self.exclude.excludes(&request.document) {
            return Ok(None);
        }
        if self.cross_file_tokens > 0 {
            request.cross = self.other_files(&request);
        }
        // Not before the ledger's patches are live: a job queued while the model loads would run first.
        self.repairs.wait_restored().await;
        let (tx, rx) = oneshot::channel();
        self.engine.complete(request, move |r| {
            let _ = tx.send(r);
        });
        let completion = rx
            .await
            .unwrap_or_else(|_| Err(EngineError::Inference("the model thread stopped".into())))?;
        let shown_one = (!completion.generation.text.trim().is_empty()).then_some(completion);
        self.track_shown(shown, shown_one.as_ref());
        Ok(shown_one.map(|c| {
            let mut fired: Vec<String> = c.generation.fired.into_iter().map(|f| f.patch).collect();
            fired.sort();
            fired.dedup();
            Proposal {
                id: c.id,
                text: c.generation.text,
                fired: Some(fired),
            }
        }))
    }

    /// What a completion in `request.document` sees of the files opened and edited lately, named by
    /// their paths in the workspace.
    fn other_files(&self, request: &CompletionRequest) -> CrossFile {
        let root = self.workspace_of(&request.document);
        let relative = |uri: &str| {
            let path = uri.strip_prefix(root.as_str()).unwrap_or(uri);
            path.trim_start_matches('/').to_owned()
        };
        let chunks =
            self.workspace()
                .other_files(&request.document, &request.prefix, &request.suffix);
        CrossFile {
            repo: root
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_owned(),
            path: relative(&request.document),
            chunks: chunks
                .into_iter()
                .map(|c| crate::completion::Chunk {
                    path: relative(&c.path),
                    text: c.text,
                })
                .collect(),
            budget: self.cross_file_tokens,
            layout: self.cross_file_layout,
        }
    }

    /// What `star.status` reports.
    pub async fn status(&self) -> Status {
        let (counts, store_error) = match self.counts().await {
            Ok(c) => (c, None),
            Err(e) => (Counts::default(), Some(e.0)),
        };
        Status {
            model: lock(&self.model_status).clone(),
            model_path: self.model_path.clone(),
            documents: self.workspace().open_count(),
            failures_pending: counts.failures_pending,
            guard_cases: counts.guard_cases,
            completions_recorded: counts.completions,
            store_error,
            patches: self.repairs.live_count(),
            repair_running: self.repairs.running(),
            last_repair: self.repairs.last(),
            completions: Some(self.engine.stats()),
        }
    }

    async fn counts(&self) -> Result<Counts> {
        let (tx, rx) = oneshot::channel();
        self.store.send(StoreOp::Counts(Box::new(move |r| {
            let _ = tx.send(r);
        })));
        rx.await
            .map_err(|_| Error::new("the store thread stopped"))?
            .map_err(Error)
    }

    /// The patches that were live when completion `id` was made, and their entries that opened while
    /// it was made; None for an unknown completion.
    pub async fn explain(&self, id: String) -> Result<Option<Explanation>> {
        let (tx, rx) = oneshot::channel();
        let asked = id.clone();
        self.store.send(StoreOp::Explain(
            asked,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        ));
        let explained = rx
            .await
            .map_err(|_| Error::new("the store thread stopped"))?
            .map_err(Error)?;
        Ok(explained.map(|e| Explanation {
            completion_id: id,
            patches: e.patches,
            fired: e.fired,
        }))
    }
}

/// Every `idle / 4` (at least 100 ms), decides the completions left idle.
fn spawn_idle_capture(host: Weak<Host>, idle: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(100)));
        loop {
            tick.tick().await;
            let Some(host) = host.upgrade() else { return };
            let mut ws = host.workspace();
            let resolved = ws.idle(Instant::now(), idle);
            host.record(resolved);
        }
    });
}

/// Another server on this data directory writes to the same store: every `WATCH_EVERY`, when the
/// store has changed under another connection, its patches go live here too and the status is sent.
fn spawn_store_watch(host: Weak<Host>) {
    const WATCH_EVERY: Duration = Duration::from_secs(1);
    tokio::spawn(async move {
        // The version whose patches are live here. The first look takes them up too: it may come
        // after the ledger's first read (the store was busy), and a patch written between is missed.
        let mut seen = None;
        loop {
            let Some(host) = host.upgrade() else { return };
            if let Ok(version) = host.data_version().await {
                if seen != Some(version) {
                    // Before the model's sha is known, its first ledger read is still to come.
                    let taken_up = !host.repairs.sha_known()
                        || host
                            .reload_overlay()
                            .await
                            .map_err(|e| {
                                tracing::warn!("could not take up another server's patches: {e}")
                            })
                            .is_ok();
                    host.emit(Event::Changed);
                    if taken_up {
                        seen = Some(version);
                    } // else looks again at the next tick
                }
            }
            drop(host);
            tokio::time::sleep(WATCH_EVERY).await;
        }
    });
}

/// A panic elsewhere while holding a lock must not take the server down with it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
