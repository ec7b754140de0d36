//! The server's side of repair: `star.repairNow`, `star.listPatches`, `star.rollback`, and the ledger's
//! patches going live when the model loads. STAR itself runs on a blocking thread, never on the LSP loop;
//! the serving model gets the new overlay in one swap, after the ledger has it.

use super::server::Server;
use crate::capture::CaseKind;
use crate::model::Model;
use crate::repair::{self, Case, Head, RepairSettings, Star};
use crate::store::{Store, StoreError, StoreOp};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::oneshot;
use tower_lsp_server::jsonrpc::{self, Result};
use tower_lsp_server::ls_types::{MessageType, ProgressToken};

fn internal(message: impl Into<String>) -> jsonrpc::Error {
    jsonrpc::Error {
        code: jsonrpc::ErrorCode::InternalError,
        message: message.into().into(),
        data: None,
    }
}

/// The sha256 of a file, hex: patches are only ever applied to the model they were made for.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

impl Server {
    /// Runs `f` on the store thread and waits for its answer.
    async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> std::result::Result<T, StoreError> + Send + 'static,
    ) -> Result<T> {
        let store = self.state.store.get().ok_or_else(|| internal("no store"))?;
        let (tx, rx) = oneshot::channel();
        store.send(StoreOp::With(Box::new(move |s| {
            let _ = tx.send(s.and_then(f));
        })));
        match rx.await {
            Ok(r) => r.map_err(|e| internal(e.to_string())),
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
        let records = self
            .with_store(move |s| s.patches(Some(&sha), true))
            .await?;
        let set = repair::overlay(&records).map_err(|e| internal(e.to_string()))?;
        if let Some(engine) = self.engine() {
            engine.set_patches(set);
        }
        *self
            .state
            .live_patches
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = records.iter().map(|r| r.id.clone()).collect();
        Ok(records.len())
    }

    /// After the model has loaded: its sha, then the patches the ledger holds for it.
    pub(super) async fn restore_patches(&self, path: std::path::PathBuf) {
        let sha = tokio::task::spawn_blocking(move || file_sha256(&path)).await;
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

    /// `star.repairNow`: STAR on the pending failures, checked against the guard cases; an accepted
    /// patch goes to the ledger, then live.
    pub(super) async fn repair_now(&self) -> Result<Value> {
        if self.state.repair_running.swap(true, Ordering::SeqCst) {
            return Err(internal("a repair is already running"));
        }
        let token = ProgressToken::String("star-ls/repair".into());
        let progress = match self.client.create_work_done_progress(token.clone()).await {
            Ok(()) => Some(
                self.client
                    .progress(token, "star-ls")
                    .with_message("repairing the model")
                    .begin()
                    .await,
            ),
            Err(_) => None,
        };
        let report = self.repair_once().await;
        if let Ok(counts) = self.store_counts().await {
            let pending = counts.failures_pending.max(0) as u64;
            self.state
                .pending_after_repair
                .store(pending, Ordering::SeqCst);
        }
        self.state.repair_running.store(false, Ordering::SeqCst);
        if let Some(p) = progress {
            p.finish_with_message("repair done").await;
        }
        let report = report?;
        let message = match report["patchId"].as_str() {
            Some(id) => format!(
                "star-ls: {id} fixed {} of {} failures (guard {:.2} → {:.2}, {:.1} s)",
                report["fixed"],
                report["failures"],
                report["guardBefore"].as_f64().unwrap_or(1.0),
                report["guardAfter"].as_f64().unwrap_or(1.0),
                report["seconds"].as_f64().unwrap_or(0.0)
            ),
            None => format!(
                "star-ls: no patch ({} failures): {}",
                report["failures"],
                report["refused"].as_str().unwrap_or("nothing to repair")
            ),
        };
        // Before the message: a client that asks for star.status on seeing it gets this report.
        *self
            .state
            .last_repair
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(report.clone());
        self.client.show_message(MessageType::INFO, message).await;
        Ok(report)
    }

    async fn repair_once(&self) -> Result<Value> {
        let model = self.loaded_model()?;
        let sha = self.model_sha()?;
        let live = self
            .state
            .live_patches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        let (max_patches, max_guards) = {
            let s = self.settings();
            (s.max_patches, s.repair_guards)
        };
        let stored = self.with_store(|s| s.cases(None)).await?;
        let failures: Vec<Case> = stored
            .iter()
            .filter(|c| c.kind == CaseKind::Failure && c.repaired_by.is_none())
            .map(Case::from)
            .collect();
        // The newest guards: each one costs the repair a pass, and each narrows the room the patch
        // is solved in (60 guards left too little to fix anything in a measured repair).
        let mut guards: Vec<Case> = stored
            .iter()
            .rev()
            .filter(|c| c.kind == CaseKind::Guard)
            .take(max_guards)
            .map(Case::from)
            .collect();
        guards.reverse();
        if live >= max_patches {
            return Ok(json!({
                "patchId": null,
                "failures": failures.len(),
                "fixed": 0,
                "refused": format!(
                    "{live} patches are live, the limit (maxPatches) is {max_patches}: \
                     roll some back (star.rollback) or raise maxPatches"
                ),
            }));
        }
        let head_slot = self.state.head.clone();
        let head_file = crate::env::cache_dir()
            .join("heads")
            .join(format!("{sha}.chol"));
        let state = self.state.clone();
        let (model_then, guards_then) = (model.clone(), guards.clone());
        let (outcome, head) = tokio::task::spawn_blocking(move || {
            let head = {
                let mut slot = head_slot.lock().unwrap_or_else(|e| e.into_inner());
                match slot.as_ref() {
                    Some(h) => h.clone(),
                    None => {
                        let (gamma, weight) = model.weights.head_dense()?;
                        let h = Arc::new(Head::cached(&gamma, weight, &head_file)?);
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
                ..Star::new(
                    &model.weights,
                    &model.tokenizer,
                    &head,
                    RepairSettings::default(),
                )
            };
            let outcome = crate::env::in_background(|| star.repair(&failures, &guards))?;
            Ok::<_, candle_core::Error>((outcome, head))
        })
        .await
        .map_err(|e| internal(e.to_string()))?
        .map_err(|e| internal(crate::model::one_line(&e)))?;
        let mut report = json!({
            "patchId": null,
            "failures": outcome.failures,
            "fixed": outcome.fixed,
            "guardBefore": outcome.guard_before,
            "guardAfter": outcome.guard_after,
            "seconds": outcome.seconds,
            "layers": outcome.layers,
            "neuronsPerLayer": outcome.neurons_per_layer,
            "steps": outcome.steps,
            "solves": outcome.solves,
            "refused": outcome.refused,
        });
        if outcome.patches.is_empty() {
            return Ok(report);
        }
        let layers =
            repair::ledger_layers(&outcome.patches).map_err(|e| internal(e.to_string()))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let stored_report = report.clone();
        let fixed = outcome.fixed_ids.clone();
        let id = self
            .with_store(move |s| s.add_patch(&sha, now, &stored_report, &layers, &fixed))
            .await?;
        report["patchId"] = json!(id);
        self.reload_overlay().await?;
        self.warm_guards(model_then, head, guards_then);
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
        let sha = self.state.model_sha.get().cloned();
        let records = self
            .with_store(move |s| s.patches(sha.as_deref(), true))
            .await?;
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
        // A repair running now may be learning from the cases about to go: not both at once.
        if self.state.repair_running.swap(true, Ordering::SeqCst) {
            return Err(internal(
                "a repair is running: forget after it has finished",
            ));
        }
        let gone = self
            .with_store(move |s| s.forget(workspace.as_deref()))
            .await;
        let reloaded = match (&gone, self.state.model_sha.get()) {
            (Ok(_), Some(_)) => self.reload_overlay().await.map(drop),
            _ => Ok(()),
        };
        self.state.repair_running.store(false, Ordering::SeqCst);
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
