//! The server's side of repair: `star.repairNow`, `star.listPatches`, `star.rollback`, and the ledger's
//! patches going live when the model loads. STAR itself runs on a blocking thread, never on the LSP loop;
//! the serving model gets the new overlay in one swap, after the ledger has it.

use super::server::Server;
use crate::learn::{self, Job, RepairReport};
use crate::model::Model;
use crate::repair::{self, Case, Head, RepairSettings, Star};
use crate::store::{PatchRecord, Store, StoreOp};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio::sync::MutexGuard;
use tower_lsp_server::jsonrpc::{self, Result};
use tower_lsp_server::ls_types::MessageType;

fn internal(message: impl Into<String>) -> jsonrpc::Error {
    jsonrpc::Error {
        code: jsonrpc::ErrorCode::InternalError,
        message: message.into().into(),
        data: None,
    }
}

impl Server {
    /// Runs `f` on the store thread and waits for its answer.
    async fn with_store<T: Send + 'static, E: std::fmt::Display + Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> std::result::Result<T, E> + Send + 'static,
    ) -> Result<T> {
        let store = self.state.store.get().ok_or_else(|| internal("no store"))?;
        let (tx, rx) = oneshot::channel();
        store.send(StoreOp::With(Box::new(move |s| {
            let _ = tx.send(match s {
                Ok(s) => f(s).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            });
        })));
        match rx.await {
            Ok(r) => r.map_err(internal),
            Err(_) => Err(internal("the store thread stopped")),
        }
    }

    fn loaded_model(&self) -> Result<Arc<Model>> {
        match self.engine().and_then(|e| e.model()) {
            Some(Ok(m)) => Ok(m),
            Some(Err(e)) => Err(internal(format!("model unavailable: {e}"))),
            None => Err(internal("the model is still loading")),
        }
    }

    fn model_sha(&self) -> Result<String> {
        self.state
            .model_sha
            .get()
            .cloned()
            .ok_or_else(|| internal("the model's sha is not known yet"))
    }

    /// Puts the ledger's active patches for this model live (after load, and after every change).
    pub(super) async fn reload_overlay(&self) -> Result<usize> {
        let sha = self.model_sha()?;
        let records = self.ledger(Some(sha)).await?;
        for r in &records {
            if let Some(why) = &r.damaged {
                tracing::warn!("{} is not applied: {why}", r.id);
            }
        }
        let set = learn::overlay(&records).map_err(|e| internal(e.to_string()))?;
        if let Some(engine) = self.engine() {
            engine.set_patches(set);
        }
        let live: Vec<String> = records
            .into_iter()
            .filter(|r| r.damaged.is_none())
            .map(|r| r.id)
            .collect();
        let n = live.len();
        *self
            .state
            .live_patches
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = live;
        self.status_changed();
        Ok(n)
    }

    /// The ledger's active patches for model `sha` (all models: None), those that do not fit the
    /// loaded model marked as damaged.
    async fn ledger(&self, sha: Option<String>) -> Result<Vec<PatchRecord>> {
        let mut records = self
            .with_store(move |s| s.patches(sha.as_deref(), true))
            .await?;
        if let Ok(model) = self.loaded_model() {
            learn::check_fit(&mut records, model.weights.config());
        }
        Ok(records)
    }

    /// After the model has loaded: its sha, then the patches the ledger holds for it.
    pub(super) async fn restore_patches(&self, path: std::path::PathBuf) {
        let sha = tokio::task::spawn_blocking(move || learn::file_sha256(&path)).await;
        match sha {
            Ok(Ok(sha)) => {
                let _ = self.state.model_sha.set(sha);
                match self.reload_overlay().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!("{n} patches from the ledger are live"),
                    Err(e) => tracing::error!("could not restore patches: {}", e.message),
                }
            }
            Ok(Err(e)) => tracing::error!("could not hash the model: {e}"),
            Err(e) => tracing::error!("could not hash the model: {e}"),
        }
        // Completions waited for this; without the ledger (it could not be read) they go on bare.
        let _ = self.state.overlay_restored.set(());
    }

    /// Runs a newly stored case through the frozen lower layers in the background, after any
    /// completion in flight, and once a repair has loaded the head's factor, checks it under the live
    /// overlay: the repair that takes it up (as a failure, or as a guard) starts past that work.
    pub(super) fn warm_case(&self, case: Case) {
        let Ok(model) = self.loaded_model() else {
            return; // the first repair makes it
        };
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || {
            let engine = state.engine.get();
            engine.inspect(|e| e.wait_idle());
            let live = engine.map(|e| e.patches());
            let settings = RepairSettings::default();
            let head = state.head.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let warmed = crate::env::in_background(|| match &head {
                Some(head) => Star {
                    live: live.as_deref(),
                    residuals: Some(&state.residuals),
                    ..Star::new(&model.weights, &model.tokenizer, head, settings)
                }
                .warm(std::slice::from_ref(&case)),
                None => {
                    let tokens =
                        repair::teacher_forced(&model.tokenizer, &case, settings.context).tokens;
                    let first = settings.first_candidate(model.weights.layers().len());
                    state
                        .residuals
                        .entering(&model.weights, first, &tokens, live.as_deref())
                        .map(drop)
                }
            });
            if let Err(e) = warmed {
                tracing::warn!("could not prepare a case for repair: {e}");
            }
        });
    }

    /// `star.repairNow`: decides every open completion, then repairs the pending failures. Sent while
    /// a repair runs, it waits for that one, then repairs the failures it did not see, or answers with
    /// its report when there are none.
    pub(super) async fn repair_now(&self) -> Result<RepairReport> {
        self.capture_all().await;
        let lock = match self.state.repair.try_lock() {
            Ok(lock) => lock,
            Err(_) => {
                let lock = self.state.repair.lock().await;
                let last = self
                    .state
                    .last_repair
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                if let (Some(last), 0) = (last, self.failures_unseen().await?) {
                    drop(lock);
                    self.status_changed();
                    return Ok(last);
                }
                lock
            }
        };
        let report = self.repair_locked(lock).await;
        self.schedule_repair();
        report
    }

    /// Pending failures the last repair did not see (stored since it started).
    pub(super) async fn failures_unseen(&self) -> Result<u64> {
        let counts = self.store_counts().await.map_err(internal)?;
        let pending = counts.failures_pending.max(0) as u64;
        let seen = self.state.pending_after_repair.load(Ordering::SeqCst);
        Ok(pending.saturating_sub(seen))
    }

    /// One repair, the caller holding the repair lock: `$/progress` meanwhile, `star/status` as it
    /// starts and ends, and a `window/showMessage` that sums it up.
    pub(super) async fn repair_locked(&self, lock: MutexGuard<'_, ()>) -> Result<RepairReport> {
        self.status_changed();
        let progress = self
            .begin_progress("star-ls/repair", "repairing the model")
            .await;
        let report = self.repair_once().await;
        let unfixed = match &report {
            Ok(r) => r.unfixed() as u64,
            // Not tried again on their own: the next failure stored brings them back in.
            Err(_) => self
                .store_counts()
                .await
                .map_or(0, |c| c.failures_pending.max(0) as u64),
        };
        self.state
            .pending_after_repair
            .store(unfixed, Ordering::SeqCst);
        if let Ok(report) = &report {
            // Before the lock goes: a client that asks for star.status on seeing it gets this report.
            *self
                .state
                .last_repair
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(report.clone());
        }
        drop(lock);
        if let Some(p) = progress {
            p.finish_with_message("repair done").await;
        }
        self.status_changed();
        let report = report?;
        let message = match &report.patch_id {
            Some(id) => format!(
                "star-ls: {id} fixed {} of {} failures (guard {:.2} → {:.2}, {:.1} s)",
                report.fixed,
                report.failures,
                report.guard_before,
                report.guard_after,
                report.seconds
            ),
            None => format!(
                "star-ls: no patch ({} failures): {}",
                report.failures,
                report.refused.as_deref().unwrap_or("nothing to repair")
            ),
        };
        self.client.show_message(MessageType::INFO, message).await;
        Ok(report)
    }

    async fn repair_once(&self) -> Result<RepairReport> {
        let model = self.loaded_model()?;
        let sha = self.model_sha()?;
        let policy = self.settings().policy();
        let job = self
            .with_store(move |s| Job::pending(s, policy.repair_guards))
            .await?;
        let head_slot = self.state.head.clone();
        let head_file = crate::env::cache_dir()
            .join("heads")
            .join(format!("{sha}.chol"));
        let state = self.state.clone();
        let model_then = model.clone();
        let (outcome, head, mut job) = tokio::task::spawn_blocking(move || {
            let head = {
                let mut slot = head_slot.lock().unwrap_or_else(|e| e.into_inner());
                match slot.as_ref() {
                    Some(h) => h.clone(),
                    None => {
                        let h = Arc::new(crate::learn::head(&model.weights, &head_file)?);
                        *slot = Some(h.clone());
                        h
                    }
                }
            };
            let engine = state.engine.get();
            let live = engine.map(|e| e.patches());
            // Completions take priority: between its steps the repair waits while one is queued or running.
            let yield_to_completions = || {
                engine.inspect(|e| e.wait_idle());
                Ok(())
            };
            let star = Star {
                live: live.as_deref(),
                residuals: Some(&state.residuals),
                between_steps: Some(&yield_to_completions),
                ..Star::new(&model.weights, &model.tokenizer, &head, policy.repair)
            };
            let outcome = crate::env::in_background(|| star.repair(&job.failures, &job.guards))?;
            Ok::<_, candle_core::Error>((outcome, head, job))
        })
        .await
        .map_err(|e| internal(e.to_string()))?
        .map_err(|e| internal(crate::model::one_line(&e)))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let kept = !outcome.patches.is_empty();
        // The commit reads the failures only; the guards are warmed under the new overlay after it.
        let guards_then = std::mem::take(&mut job.guards);
        let report = self
            .with_store(move |s| {
                learn::commit(s, &sha, now, &job, &outcome, policy.patch_memory_bytes())
            })
            .await?;
        if !report.evicted.is_empty() {
            tracing::info!("over patchMemoryMb: evicted {}", report.evicted.join(", "));
        }
        if kept {
            self.reload_overlay().await?;
            self.warm_guards(model_then, head, guards_then);
        }
        Ok(report)
    }

    /// Checks `guards` under the overlay just swapped in, in the background after any completion in
    /// flight: the next repair's guards are mostly these, and it then starts past their checks.
    fn warm_guards(&self, model: Arc<Model>, head: Arc<Head>, guards: Vec<Case>) {
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || {
            let engine = state.engine.get();
            engine.inspect(|e| e.wait_idle());
            let live = engine.map(|e| e.patches());
            let star = Star {
                live: live.as_deref(),
                residuals: Some(&state.residuals),
                ..Star::new(
                    &model.weights,
                    &model.tokenizer,
                    &head,
                    RepairSettings::default(),
                )
            };
            if let Err(e) = crate::env::in_background(|| star.warm(&guards)) {
                tracing::warn!("could not check the guards under the new overlay: {e}");
            }
        });
    }

    /// `star.listPatches`: the active patches for the loaded model.
    pub(super) async fn list_patches(&self) -> Result<Value> {
        let records = self.ledger(self.state.model_sha.get().cloned()).await?;
        Ok(json!(records))
    }

    /// `star.forget ["all"]`: wipes this workspace's cases and shown completions and every patch that
    /// learned from them (or everything), and takes those patches out of the live model.
    pub(super) async fn forget(&self, arg: Option<Value>) -> Result<Value> {
        let workspace = match arg.as_ref().map(|a| a.as_str()) {
            None => Some(self.state.workspace.get().cloned().unwrap_or_default()),
            Some(Some("all")) => None,
            Some(_) => {
                return Err(super::proto::invalid_params(
                    "expected no argument (this workspace) or \"all\"",
                ))
            }
        };
        // A repair running now may be learning from the cases about to go: forget after it.
        let lock = self.state.repair.lock().await;
        let gone = self
            .with_store(move |s| s.forget(workspace.as_deref()))
            .await;
        let reloaded = match (&gone, self.state.model_sha.get()) {
            (Ok(_), Some(_)) => self.reload_overlay().await.map(drop),
            _ => Ok(()),
        };
        drop(lock);
        let gone = gone?;
        reloaded?;
        Ok(json!(gone))
    }

    /// `star.rollback [patchId | "all"]`.
    pub(super) async fn rollback(&self, arg: Option<Value>) -> Result<Value> {
        let id = match arg.as_ref().and_then(Value::as_str) {
            Some("all") => None,
            Some(id) => Some(id.to_owned()),
            None => {
                return Err(super::proto::invalid_params(
                    "expected a patch id or \"all\" as the first argument",
                ))
            }
        };
        let rolled = self.with_store(move |s| s.rollback(id.as_deref())).await?;
        self.reload_overlay().await?;
        Ok(json!({ "rolledBack": rolled }))
    }
}
