//! The completion engine: one worker thread owns the model's use, keeps a prefix cache per document, and
//! answers requests in order; callers never wait on inference (they get a callback).
//!
//! Architecture invariant: this module knows nothing of LSP; it speaks in documents, texts and ids.

use super::crossfile::CrossFile;
use super::prompt::{prompt_with, ContextLimits};
use crate::model::{
    generate::{generate, Generation, StopReason},
    Cancel, GenerateParams, KvCache, LoadOptions, Model, ModelError, PatchSet, StopAt,
};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model_path: PathBuf,
    pub load: LoadOptions,
    pub limits: ContextLimits,
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    /// Documents whose prefix cache is kept (least recently used dropped first).
    pub cached_documents: usize,
}

impl EngineConfig {
    pub fn new(model_path: PathBuf) -> Self {
        Self {
            model_path,
            load: LoadOptions::default(),
            limits: ContextLimits::default(),
            max_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            cached_documents: 4,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("model unavailable: {0}")]
    ModelUnavailable(String),
    #[error("cancelled")]
    Cancelled,
    #[error("inference failed: {0}")]
    Inference(String),
}

/// What the engine tells its owner about the model's lifecycle.
#[derive(Debug, Clone)]
pub enum EngineEvent {
    Loading { path: PathBuf },
    Loaded { path: PathBuf, seconds: f64 },
    LoadFailed { error: String },
}

pub struct CompletionRequest {
    /// Which document: selects the prefix cache.
    pub document: String,
    pub prefix: String,
    pub suffix: String,
    pub stop: StopAt,
    pub cancel: Cancel,
    /// Other files' chunks to put before the document's text (none: the default).
    pub cross: CrossFile,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Completion {
    pub id: String,
    #[serde(flatten)]
    pub generation: Generation,
}

/// The model once loading has finished (`None` while it loads), or why it could not load.
type ModelSlot = Arc<Mutex<Option<Result<Arc<Model>, String>>>>;

type Reply = Box<dyn FnOnce(Result<Completion, EngineError>) + Send>;

struct Job {
    request: CompletionRequest,
    reply: Reply,
}

/// What the engine has done so far, for `star.status` and tests.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EngineStats {
    pub completed: u64,
    pub cancelled: u64,
    pub failed: u64,
    /// The last finished or cancelled generation.
    pub last: Option<GenerationStats>,
    /// Tokens decoded so far by the completion running now; none when none runs.
    pub decoding: Option<usize>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub prefilled: usize,
    pub generated: usize,
    pub stop: StopReason,
    pub prefill_ms: f64,
    pub decode_ms: f64,
}

impl From<&Generation> for GenerationStats {
    fn from(g: &Generation) -> Self {
        Self {
            prompt_tokens: g.prompt_tokens,
            prefilled: g.prefilled,
            generated: g.tokens.len(),
            stop: g.stop.clone(),
            prefill_ms: g.prefill_ms,
            decode_ms: g.decode_ms,
        }
    }
}

/// Handle to the worker. Cheap to share; dropping the last handle stops the worker after its current job.
pub struct Engine {
    jobs: mpsc::Sender<Job>,
    /// Requests sent and not yet answered.
    in_flight: Arc<AtomicUsize>,
    patches: Arc<RwLock<Arc<PatchSet>>>,
    model: ModelSlot,
    stats: Arc<Mutex<EngineStats>>,
    /// The running completion's handle.
    running: Running,
}

/// The completion the worker runs now, if any.
type Running = Arc<Mutex<Option<Cancel>>>;

impl Engine {
    /// Starts the worker, which loads the model first; requests sent meanwhile wait for it.
    pub fn start(config: EngineConfig, on_event: impl Fn(EngineEvent) + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let patches = Arc::new(RwLock::new(Arc::new(PatchSet::default())));
        let model = Arc::new(Mutex::new(None));
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        let running = Running::default();
        let worker = Worker {
            config,
            stats: stats.clone(),
            running: running.clone(),
            patches: patches.clone(),
            caches: VecDeque::new(),
            ids: IdGen::new(),
        };
        let slot = model.clone();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let answered = in_flight.clone();
        std::thread::Builder::new()
            .name("star-ls-model".into())
            .spawn(move || worker.run(rx, slot, &answered, on_event))
            .expect("spawning the model thread");
        Self {
            jobs: tx,
            in_flight,
            patches,
            model,
            stats,
            running,
        }
    }

    pub fn complete(
        &self,
        request: CompletionRequest,
        reply: impl FnOnce(Result<Completion, EngineError>) + Send + 'static,
    ) {
        let job = Job {
            request,
            reply: Box::new(reply),
        };
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if let Err(mpsc::SendError(job)) = self.jobs.send(job) {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            (job.reply)(Err(EngineError::ModelUnavailable(
                "the model thread has stopped".into(),
            )));
        }
    }

    /// `complete`, waiting for the answer (for the CLI).
    pub fn complete_blocking(&self, request: CompletionRequest) -> Result<Completion, EngineError> {
        let (tx, rx) = mpsc::channel();
        self.complete(request, move |r| {
            let _ = tx.send(r);
        });
        rx.recv().unwrap_or_else(|_| {
            Err(EngineError::ModelUnavailable(
                "the model thread has stopped".into(),
            ))
        })
    }

    /// Blocks while a completion is queued or running: background work (repair) calls it between its
    /// steps, so completions keep priority.
    pub fn wait_idle(&self) {
        while self.in_flight.load(Ordering::SeqCst) > 0 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// The loaded model, once loading has finished (None while loading).
    pub fn model(&self) -> Option<Result<Arc<Model>, String>> {
        self.model.lock().ok().and_then(|m| m.clone())
    }

    /// Replaces the live patch overlay; requests already running finish on the old one.
    pub fn set_patches(&self, patches: PatchSet) {
        if let Ok(mut p) = self.patches.write() {
            *p = Arc::new(patches);
        }
    }

    pub fn patches(&self) -> Arc<PatchSet> {
        self.patches.read().map(|p| p.clone()).unwrap_or_default()
    }

    pub fn stats(&self) -> EngineStats {
        let decoding = self
            .running
            .lock()
            .ok()
            .and_then(|r| r.as_ref().map(Cancel::decoded));
        EngineStats {
            decoding,
            ..self.stats.lock().map(|s| s.clone()).unwrap_or_default()
        }
    }
}

struct Worker {
    config: EngineConfig,
    stats: Arc<Mutex<EngineStats>>,
    running: Running,
    patches: Arc<RwLock<Arc<PatchSet>>>,
    /// Per recently used document, its KV cache and the overlay it was made under.
    caches: VecDeque<(String, u64, KvCache)>,
    ids: IdGen,
}

impl Worker {
    fn run(
        mut self,
        jobs: mpsc::Receiver<Job>,
        slot: ModelSlot,
        in_flight: &AtomicUsize,
        on_event: impl Fn(EngineEvent),
    ) {
        let path = self.config.model_path.clone();
        on_event(EngineEvent::Loading { path: path.clone() });
        let t0 = Instant::now();
        let loaded = Model::load(&path, self.config.load)
            .map(Arc::new)
            .map_err(|e: ModelError| e.to_string());
        // Publish the model before announcing it, so whoever reacts to the event finds it.
        if let Ok(mut s) = slot.lock() {
            *s = Some(loaded.clone());
        }
        match &loaded {
            Ok(_) => on_event(EngineEvent::Loaded {
                path,
                seconds: t0.elapsed().as_secs_f64(),
            }),
            Err(error) => on_event(EngineEvent::LoadFailed {
                error: error.clone(),
            }),
        }
        for job in jobs {
            let result = match &loaded {
                Ok(model) => {
                    self.set_running(Some(job.request.cancel.clone()));
                    let served = self.serve(model, &job.request);
                    self.set_running(None);
                    served
                }
                Err(e) => Err(EngineError::ModelUnavailable(e.clone())),
            };
            (job.reply)(result);
            in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn set_running(&self, cancel: Option<Cancel>) {
        if let Ok(mut r) = self.running.lock() {
            *r = cancel;
        }
    }

    fn serve(&mut self, model: &Model, req: &CompletionRequest) -> Result<Completion, EngineError> {
        if req.cancel.is_cancelled() {
            self.stats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .cancelled += 1;
            return Err(EngineError::Cancelled);
        }
        let prompt = prompt_with(
            &model.tokenizer,
            &req.cross,
            &req.prefix,
            &req.suffix,
            self.limits(model, req.cross.budget),
        );
        let patches = self.patches.read().map(|p| p.clone()).unwrap_or_default();
        let mut cache = self.take_cache(&req.document, patches.id(), model);
        let params = GenerateParams {
            max_tokens: self.config.max_tokens,
            stop: req.stop,
            temperature: self.config.temperature,
            top_p: self.config.top_p,
            ..GenerateParams::default()
        };
        let result = generate(
            &model.weights,
            &model.tokenizer,
            &prompt,
            &mut cache,
            (!patches.is_empty()).then_some(&*patches),
            &params,
            &req.cancel,
        );
        let stats_handle = self.stats.clone();
        let mut stats = stats_handle.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(generation) => {
                self.put_cache(&req.document, patches.id(), cache);
                stats.last = Some(GenerationStats::from(&generation));
                if generation.stop == StopReason::Cancelled {
                    stats.cancelled += 1;
                    return Err(EngineError::Cancelled);
                }
                stats.completed += 1;
                tracing::debug!(
                    prompt = generation.prompt_tokens,
                    prefilled = generation.prefilled,
                    generated = generation.tokens.len(),
                    prefill_ms = generation.prefill_ms,
                    decode_ms = generation.decode_ms,
                    "completion"
                );
                Ok(Completion {
                    id: self.ids.next(),
                    generation,
                })
            }
            // A failed forward pass leaves the cache in an unknown state: drop it.
            Err(e) => {
                stats.failed += 1;
                Err(EngineError::Inference(crate::model::one_line(&e)))
            }
        }
    }

    /// The configured context limits, shrunk to fit the model's context with room for the answer and
    /// `other_files` tokens of other files.
    fn limits(&self, model: &Model, other_files: usize) -> ContextLimits {
        let mut limits = self.config.limits;
        let room = model
            .weights
            .max_positions()
            // + the three FIM markers, and the repo-level format's own (a repo and a path: some 32).
            .saturating_sub(
                self.config.max_tokens + 3 + other_files + 32 * usize::from(other_files > 0),
            );
        if limits.prefix_tokens + limits.suffix_tokens > room {
            limits.suffix_tokens = limits.suffix_tokens.min(room / 8);
            limits.prefix_tokens = room - limits.suffix_tokens;
        }
        limits
    }

    /// The document's cache, if it was made under the overlay named `overlay`: the keys and values of
    /// the layers above a patch depend on it.
    fn take_cache(&mut self, doc: &str, overlay: u64, model: &Model) -> KvCache {
        let i = self.caches.iter().position(|(d, _, _)| d == doc);
        match i.and_then(|i| self.caches.remove(i)) {
            Some((_, made, c)) if made == overlay => c,
            _ => model.weights.new_cache(),
        }
    }

    fn put_cache(&mut self, doc: &str, overlay: u64, cache: KvCache) {
        self.caches.push_front((doc.to_owned(), overlay, cache));
        self.caches.truncate(self.config.cached_documents.max(1));
    }
}

/// Completion ids unique across restarts: the start time, then a counter.
struct IdGen {
    epoch: u64,
    next: u64,
}

impl IdGen {
    fn new() -> Self {
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Self { epoch, next: 0 }
    }

    fn next(&mut self) -> String {
        self.next += 1;
        format!("{:x}-{}", self.epoch, self.next)
    }
}
