//! The store's own thread: callers send operations and never wait on SQLite. Writes that fail (a locked
//! database, a full disk) are kept in memory and retried, and each kind of trouble is reported once.

use super::{Counts, Explained, NewCase, ShownRecord, Store, StoreError};
use crate::capture::Outcome;
use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

type Reply<T> = Box<dyn FnOnce(Result<T, String>) + Send>;
type Job = Box<dyn FnOnce(Result<&mut Store, StoreError>) + Send>;

pub enum StoreOp {
    Shown(ShownRecord),
    /// A completion's outcome, and the case it taught if any.
    Resolved {
        completion_id: Option<String>,
        outcome: Option<Outcome>,
        case: Option<NewCase>,
        at_ms: i64,
    },
    Counts(Reply<Counts>),
    /// The patches live when a completion was made.
    Explain(String, Reply<Option<Explained>>),
    /// Answers once every write sent before it has been tried.
    Flush(Box<dyn FnOnce() + Send>),
    /// Runs on the store thread with the open store (or why it cannot be opened): reads and writes
    /// whose caller wants the answer, such as the patch ledger's.
    With(Job),
}

/// Writes waiting for the database to take them again; beyond this many the oldest are dropped (and
/// that is logged).
const MAX_QUEUED: usize = 4096;
const RETRY_EVERY: Duration = Duration::from_secs(5);
const PRUNE_EVERY_WRITES: u32 = 64;

#[derive(Clone)]
pub struct StoreHandle {
    ops: mpsc::Sender<StoreOp>,
}

impl StoreHandle {
    /// Starts the store thread on `dir`. `on_error` hears about each kind of trouble once.
    pub fn start(
        dir: PathBuf,
        max_bytes: u64,
        on_error: impl Fn(&StoreError) + Send + 'static,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("star-ls-store".into())
            .spawn(move || {
                Worker {
                    dir,
                    max_bytes,
                    store: None,
                    queued: VecDeque::new(),
                    reported: HashSet::new(),
                    on_error: Box::new(on_error),
                    writes: 0,
                }
                .run(rx)
            })
            .expect("spawning the store thread");
        Self { ops: tx }
    }

    pub fn send(&self, op: StoreOp) {
        if self.ops.send(op).is_err() {
            tracing::error!("the store thread has stopped; a record was not written");
        }
    }
}

struct Worker {
    dir: PathBuf,
    max_bytes: u64,
    store: Option<Store>,
    queued: VecDeque<StoreOp>,
    reported: HashSet<&'static str>,
    on_error: Box<dyn Fn(&StoreError) + Send>,
    writes: u32,
}

impl Worker {
    fn run(mut self, ops: mpsc::Receiver<StoreOp>) {
        loop {
            let timeout = if self.queued.is_empty() {
                Duration::from_secs(3600)
            } else {
                RETRY_EVERY
            };
            match ops.recv_timeout(timeout) {
                Ok(op) => {
                    self.retry_queued();
                    self.handle(op);
                }
                Err(RecvTimeoutError::Timeout) => self.retry_queued(),
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        self.retry_queued();
        if !self.queued.is_empty() {
            tracing::error!(
                "{} feedback records could not be written before exit",
                self.queued.len()
            );
        }
    }

    fn store(&mut self) -> Result<&mut Store, StoreError> {
        if self.store.is_none() {
            self.store = Some(Store::open(&self.dir, self.max_bytes)?);
        }
        Ok(self.store.as_mut().expect("opened above"))
    }

    fn handle(&mut self, op: StoreOp) {
        match op {
            StoreOp::Counts(reply) => {
                let r = self.store().and_then(|s| s.counts());
                reply(r.map_err(|e| e.to_string()));
            }
            StoreOp::Explain(id, reply) => {
                let r = self.store().and_then(|s| s.explain(&id));
                reply(r.map_err(|e| e.to_string()));
            }
            StoreOp::Flush(reply) => reply(),
            StoreOp::With(f) => f(self.store()),
            op => {
                if let Err(e) = self.write(&op) {
                    self.report(&e);
                    if self.queued.len() == MAX_QUEUED {
                        self.queued.pop_front();
                        tracing::error!("feedback write queue full: the oldest record was dropped");
                    }
                    self.queued.push_back(op);
                }
            }
        }
    }

    fn retry_queued(&mut self) {
        while let Some(op) = self.queued.pop_front() {
            if self.write(&op).is_err() {
                self.queued.push_front(op);
                return;
            }
        }
    }

    /// Applies a write (the caller queues it again on failure).
    fn write(&mut self, op: &StoreOp) -> Result<(), StoreError> {
        let result = match self.store() {
            Err(e) => Err(e),
            Ok(store) => match op {
                StoreOp::Shown(r) => store.record_shown(r),
                StoreOp::Resolved {
                    completion_id,
                    outcome,
                    case,
                    at_ms,
                } => write_resolved(
                    store,
                    completion_id.as_deref(),
                    *outcome,
                    case.as_ref(),
                    *at_ms,
                ),
                _ => Ok(()),
            },
        };
        match result {
            Ok(()) => {
                self.writes += 1;
                if self.writes.is_multiple_of(PRUNE_EVERY_WRITES) {
                    self.prune();
                }
                Ok(())
            }
            Err(e) => {
                // A handle that failed may be stale (file deleted, permissions changed): reopen next time.
                self.store = None;
                Err(e)
            }
        }
    }

    fn prune(&mut self) {
        if let Ok(store) = self.store() {
            match store.prune() {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!("feedback store over its size cap: {n} oldest records pruned")
                }
                Err(e) => self.report(&e),
            }
        }
    }

    fn report(&mut self, e: &StoreError) {
        tracing::warn!("feedback store: {e}");
        if self.reported.insert(e.kind()) {
            (self.on_error)(e);
        }
    }
}

fn write_resolved(
    store: &mut Store,
    completion_id: Option<&str>,
    outcome: Option<Outcome>,
    case: Option<&NewCase>,
    at_ms: i64,
) -> Result<(), StoreError> {
    if let Some(case) = case {
        if !store.add_case(case)? {
            tracing::debug!("duplicate case not stored again");
        }
    }
    if let (Some(id), Some(outcome)) = (completion_id, outcome) {
        store.record_outcome(id, outcome.as_str(), at_ms)?;
    }
    Ok(())
}
