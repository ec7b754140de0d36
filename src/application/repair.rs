//! The repair service: the scheduler, `repair_now`, the ledger's patches going live, rollback and
//! forget. STAR runs on a blocking thread between completions; the serving model gets the new overlay
//! in one swap, after the ledger has it. One repair runs at a time, under `Repairs::lock`.

use super::{lock, Error, Event, Host, Result};
use crate::learn::{self, Job, RepairReport};
use crate::model::Model;
use crate::repair::{self, Case, Head, Residuals, Star};
use crate::store::{Forgotten, PatchRecord, Store, StoreOp};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{oneshot, MutexGuard};

/// The repair service's state.
#[derive(Default)]
pub(super) struct Repairs {
    /// The loaded model file's sha256: the ledger's patches apply to this model only.
    model_sha: OnceLock<String>,
    /// The factored LM head for the semantic steer, built by the first repair.
    head: Mutex<Option<Arc<Head>>>,
    /// Cases run through the frozen lower layers, kept for repairs.
    residuals: Residuals,
    /// Held while a repair (or a forget) runs: one at a time, and a `repair_now` meanwhile waits.
    /// Across the servers of one data directory, the store's lease `REPAIR_LEASE` does the same.
    lock: tokio::sync::Mutex<()>,
    last: Mutex<Option<RepairReport>>,
    /// Ids of the patches in the live overlay.
    live: Mutex<Vec<String>>,
    /// Held from reading the ledger to putting its patches live: two reloads (after this server's
    /// repair, and on another's write) never put an older read live over a newer one.
    reloading: tokio::sync::Mutex<()>,
    /// Set once the ledger's patches for the loaded model are live, or cannot be: completions wait for
    /// it, so that after a restart none is served (and recorded) without them.
    restored: tokio::sync::SetOnce<()>,
}

/// The store's lease on repairing: one server of a data directory repairs at a time.
const REPAIR_LEASE: &str = "repair";
/// How long a lease lasts unless renewed: a server that dies mid-repair holds up the others this long.
const LEASE_MS: i64 = 60_000;
/// While a repair runs, its lease is renewed this often.
const RENEW_EVERY: Duration = Duration::from_secs(20);
/// A server that waits for another's repair looks again this often.
const LEASE_POLL: Duration = Duration::from_millis(500);

/// What a repair leaves pending for the scheduler to count new failures past.
enum Left {
    /// Those it was given and did not fix.
    Unfixed(i64),
    /// All pending failures (it failed).
    AllPending,
    /// What the last repair left, of what is still pending (none ran).
    AsBefore,
}

impl Repairs {
    pub(super) async fn wait_restored(&self) {
        self.restored.wait().await;
    }

    /// Completions go on bare: the model did not load, or the ledger could not be read.
    pub(super) fn no_ledger(&self) {
        let _ = self.restored.set(());
    }

    pub(super) fn live_ids(&self) -> Vec<String> {
        lock(&self.live).clone()
    }

    pub(super) fn live_count(&self) -> usize {
        lock(&self.live).len()
    }

    pub(super) fn running(&self) -> bool {
        self.lock.try_lock().is_err()
    }

    pub(super) fn last(&self) -> Option<RepairReport> {
        lock(&self.last).clone()
    }

    pub(super) fn sha_known(&self) -> bool {
        self.model_sha.get().is_some()
    }
}

impl Host {
    /// Runs `f` on the store thread and waits for its answer.
    async fn with_store<T: Send + 'static, E: std::fmt::Display + Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> std::result::Result<T, E> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.store.send(StoreOp::With(Box::new(move |s| {
            let _ = tx.send(match s {
                Ok(s) => f(s).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            });
        })));
        match rx.await {
            Ok(r) => r.map_err(Error),
            Err(_) => Err(Error::new("the store thread stopped")),
        }
    }

    /// The store's `data_version`: it moves when another server has written to it.
    pub(super) async fn data_version(&self) -> Result<i64> {
        self.with_store(|s| s.data_version()).await
    }

    fn loaded_model(&self) -> Result<Arc<Model>> {
        match self.engine.model() {
            Some(Ok(m)) => Ok(m),
            Some(Err(e)) => Err(Error::new(format!("model unavailable: {e}"))),
            None => Err(Error::new("the model is still loading")),
        }
    }

    fn model_sha(&self) -> Result<String> {
        self.repairs
            .model_sha
            .get()
            .cloned()
            .ok_or_else(|| Error::new("the model's sha is not known yet"))
    }

    /// Puts the ledger's active patches for this model live (after load, after every change, and
    /// when another server on this data directory has written), unless they are live already.
    pub(super) async fn reload_overlay(&self) -> Result<usize> {
        let _reloading = self.repairs.reloading.lock().await;
        let records = self.ledger(Some(self.model_sha()?)).await?;
        let live: Vec<String> = records
            .iter()
            .filter(|r| r.damaged.is_none())
            .map(|r| r.id.clone())
            .collect();
        let n = live.len();
        if *lock(&self.repairs.live) == live && self.repairs.restored.get().is_some() {
            return Ok(n);
        }
        for r in &records {
            if let Some(why) = &r.damaged {
                tracing::warn!("{} is not applied: {why}", r.id);
            }
        }
        self.engine
            .set_patches(learn::overlay(&records).map_err(Error::new)?);
        *lock(&self.repairs.live) = live;
        self.emit(Event::Changed);
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
    pub(super) async fn restore_patches(&self, path: PathBuf) {
        let sha = tokio::task::spawn_blocking(move || learn::file_sha256(&path)).await;
        match sha {
            Ok(Ok(sha)) => {
                let _ = self.repairs.model_sha.set(sha);
                match self.reload_overlay().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!("{n} patches from the ledger are live"),
                    Err(e) => tracing::error!("could not restore patches: {e}"),
                }
            }
            Ok(Err(e)) => tracing::error!("could not hash the model: {e}"),
            Err(e) => tracing::error!("could not hash the model: {e}"),
        }
        self.repairs.no_ledger();
    }

    /// Runs a newly stored case through the frozen lower layers in the background, after any
    /// completion in flight, and once a repair has loaded the head's factor, checks it under the live
    /// overlay: the repair that takes it up (as a failure, or as a guard) starts past that work.
    pub(super) fn warm_case(&self, case: Case) {
        let (Ok(model), Some(host)) = (self.loaded_model(), self.me.upgrade()) else {
            return; // the first repair makes it
        };
        let settings = self.policy.repair;
        tokio::task::spawn_blocking(move || {
            host.engine.wait_idle();
            let live = host.engine.patches();
            let residuals = &host.repairs.residuals;
            let head = lock(&host.repairs.head).clone();
            let warmed = crate::env::in_background(|| match &head {
                Some(head) => Star {
                    live: Some(&live),
                    residuals: Some(residuals),
                    ..Star::new(&model.weights, &model.tokenizer, head, settings)
                }
                .warm(std::slice::from_ref(&case)),
                None => {
                    let tokens =
                        repair::teacher_forced(&model.tokenizer, &case, settings.context).tokens;
                    let first = settings.first_candidate(model.weights.layers().len());
                    residuals
                        .entering(&model.weights, first, &tokens, Some(&live))
                        .map(drop)
                }
            });
            if let Err(e) = warmed {
                tracing::warn!("could not prepare a case for repair: {e}");
            }
        });
    }

    /// Decides every open completion, then repairs the pending failures. Asked while a repair runs, it
    /// waits for that one, then repairs the failures it did not see, or answers with its report when
    /// there are none.
    pub async fn repair_now(&self) -> Result<RepairReport> {
        self.decide_all().await;
        let lock = match self.repairs.lock.try_lock() {
            Ok(lock) => lock,
            Err(_) => {
                let lock = self.repairs.lock.lock().await;
                if let (Some(last), 0) = (self.repairs.last(), self.failures_unseen().await?) {
                    drop(lock);
                    self.emit(Event::Changed);
                    return Ok(last);
                }
                lock
            }
        };
        let report = self.repair_locked(lock, None).await;
        self.schedule_repair();
        report?.ok_or_else(|| Error::new("no repair ran"))
    }

    /// Pending failures the last repair (of any server on this data directory) did not see.
    async fn failures_unseen(&self) -> Result<u64> {
        let (counts, lease) = self
            .with_store(|s| {
                Ok::<_, crate::store::StoreError>((s.counts()?, s.lease(REPAIR_LEASE)?))
            })
            .await?;
        let unfixed = lease.map_or(0, |l| l.unfixed);
        Ok(counts.failures_pending.saturating_sub(unfixed).max(0) as u64)
    }

    /// Takes the store's repair lease, waiting while another server holds it, and keeps it renewed
    /// until the returned task is aborted.
    async fn take_lease(&self) -> Result<tokio::task::JoinHandle<()>> {
        loop {
            let holder = self.holder.clone();
            let now = super::feedback::now_ms();
            let taken = self
                .with_store(move |s| s.take_lease(REPAIR_LEASE, &holder, now, LEASE_MS))
                .await?;
            if taken {
                break;
            }
            tokio::time::sleep(LEASE_POLL).await;
        }
        let (store, holder) = (self.store.clone(), self.holder.clone());
        Ok(tokio::spawn(async move {
            loop {
                tokio::time::sleep(RENEW_EVERY).await;
                let holder = holder.clone();
                store.send(StoreOp::With(Box::new(move |s| {
                    if let Ok(s) = s {
                        let now = super::feedback::now_ms();
                        if let Err(e) = s.take_lease(REPAIR_LEASE, &holder, now, LEASE_MS) {
                            tracing::warn!("could not renew the repair lease: {e}");
                        }
                    }
                })));
            }
        }))
    }

    /// The scheduler: a repair in the background once `repair_threshold` failures are pending that
    /// no repair has seen (those one could not fix do not trigger it again on their own). A repair
    /// running now takes the new ones up when it ends.
    pub(super) fn schedule_repair(&self) {
        let threshold = self.policy.repair_threshold;
        let Some(host) = self.me.upgrade().filter(|_| threshold > 0) else {
            return;
        };
        tokio::spawn(async move {
            // Counted before the lock too: holding it shows a repair running (`Status`).
            let due = async || host.failures_unseen().await.is_ok_and(|n| n >= threshold);
            loop {
                if !due().await {
                    return;
                }
                let Ok(lock) = host.repairs.lock.try_lock() else {
                    return;
                };
                if !due().await {
                    return;
                }
                match host.repair_locked(lock, Some(threshold)).await {
                    Ok(None) => return, // another server's repair took them up
                    Ok(Some(report)) => tracing::info!("scheduled repair: {report:?}"),
                    Err(e) => {
                        tracing::warn!("scheduled repair: {e}");
                        return;
                    }
                }
            }
        });
    }

    /// One repair, the caller holding the repair lock, under the store's lease (waiting for another
    /// server's repair first), between `Event::RepairStarted` and `Event::RepairEnded`. With
    /// `threshold` (the scheduler), none when fewer unseen failures than it are left once the lease is
    /// ours.
    async fn repair_locked(
        &self,
        held: MutexGuard<'_, ()>,
        threshold: Option<u64>,
    ) -> Result<Option<RepairReport>> {
        self.emit(Event::RepairStarted);
        self.emit(Event::Changed);
        let renewing = self.take_lease().await?;
        if let Some(t) = threshold {
            if self.failures_unseen().await? < t {
                renewing.abort();
                self.release_lease(Left::AsBefore).await;
                drop(held);
                self.emit(Event::RepairEnded(None));
                self.emit(Event::Changed);
                return Ok(None);
            }
        }
        let report = self.repair_once().await;
        renewing.abort();
        self.release_lease(match &report {
            Ok(r) => Left::Unfixed(r.unfixed() as i64),
            // Not tried again on their own: the next failure stored brings them back in.
            Err(_) => Left::AllPending,
        })
        .await;
        if let Ok(report) = &report {
            // Before the lock goes: a client that asks for the status on seeing it gets this report.
            *lock(&self.repairs.last) = Some(report.clone());
        }
        drop(held);
        self.emit(Event::RepairEnded(report.as_ref().ok().cloned()));
        self.emit(Event::Changed);
        report.map(Some)
    }

    /// Gives the repair lease back, saying what the scheduler is to count new failures past.
    async fn release_lease(&self, left: Left) {
        let holder = self.holder.clone();
        let released = self
            .with_store(move |s| {
                let unfixed = match left {
                    Left::Unfixed(n) => n,
                    Left::AllPending => s.counts()?.failures_pending,
                    // Cases forgotten since are no longer pending: no more than are.
                    Left::AsBefore => s
                        .lease(REPAIR_LEASE)?
                        .map_or(0, |l| l.unfixed)
                        .min(s.counts()?.failures_pending),
                };
                s.release_lease(REPAIR_LEASE, &holder, unfixed)
            })
            .await;
        if let Err(e) = released {
            tracing::warn!("could not release the repair lease: {e}");
        }
    }

    async fn repair_once(&self) -> Result<RepairReport> {
        let model = self.loaded_model()?;
        let sha = self.model_sha()?;
        let policy = self.policy;
        let job = self
            .with_store(move |s| Job::pending(s, policy.repair_guards))
            .await?;
        let head_file = crate::env::cache_dir()
            .join("heads")
            .join(format!("{sha}.chol"));
        let host = self
            .me
            .upgrade()
            .ok_or_else(|| Error::new("shutting down"))?;
        let model_then = model.clone();
        let (outcome, head, mut job) = tokio::task::spawn_blocking(move || {
            let head = host.head(&model, &head_file)?;
            let live = host.engine.patches();
            // Completions take priority: between its steps the repair waits while one is queued or running.
            let yield_to_completions = || {
                host.engine.wait_idle();
                Ok(())
            };
            let star = Star {
                live: Some(&live),
                residuals: Some(&host.repairs.residuals),
                between_steps: Some(&yield_to_completions),
                ..Star::new(&model.weights, &model.tokenizer, &head, policy.repair)
            };
            let outcome = crate::env::in_background(|| star.repair(&job.failures, &job.guards))?;
            Ok::<_, candle_core::Error>((outcome, head, job))
        })
        .await
        .map_err(Error::new)?
        .map_err(|e| Error::new(crate::model::one_line(&e)))?;
        // The commit reads the failures only; the guards are warmed under the new overlay after it.
        let guards_then = std::mem::take(&mut job.guards);
        let now = super::feedback::now_ms();
        let report = self
            .with_store(move |s| {
                learn::commit(s, &sha, now, &job, &outcome, policy.patch_memory_bytes())
            })
            .await?;
        if !report.evicted.is_empty() {
            tracing::info!("over patchMemoryMb: evicted {}", report.evicted.join(", "));
        }
        if report.changed_overlay() {
            self.reload_overlay().await?;
            self.warm_guards(model_then, head, guards_then);
        }
        Ok(report)
    }

    /// The factored LM head, built (or read from `file`) by the first repair and kept.
    fn head(&self, model: &Model, file: &std::path::Path) -> candle_core::Result<Arc<Head>> {
        let mut slot = lock(&self.repairs.head);
        if let Some(h) = slot.as_ref() {
            return Ok(h.clone());
        }
        let h = Arc::new(learn::head(&model.weights, file)?);
        *slot = Some(h.clone());
        Ok(h)
    }

    /// Checks `guards` under the overlay just swapped in, in the background after any completion in
    /// flight: the next repair's guards are mostly these, and it then starts past their checks.
    fn warm_guards(&self, model: Arc<Model>, head: Arc<Head>, guards: Vec<Case>) {
        let Some(host) = self.me.upgrade() else {
            return;
        };
        let settings = self.policy.repair;
        tokio::task::spawn_blocking(move || {
            host.engine.wait_idle();
            let live = host.engine.patches();
            let star = Star {
                live: Some(&live),
                residuals: Some(&host.repairs.residuals),
                ..Star::new(&model.weights, &model.tokenizer, &head, settings)
            };
            if let Err(e) = crate::env::in_background(|| star.warm(&guards)) {
                tracing::warn!("could not check the guards under the new overlay: {e}");
            }
        });
    }

    /// The active patches for the loaded model.
    pub async fn patches(&self) -> Result<Vec<PatchRecord>> {
        self.ledger(self.repairs.model_sha.get().cloned()).await
    }

    /// Wipes the cases and shown completions of `workspace` (a folder's root URI; None: all of them)
    /// and every patch that learned from them, and takes those patches out of the live model.
    pub async fn forget(&self, workspace: Option<String>) -> Result<Forgotten> {
        // A repair running now (here, or in another window) may be learning from the cases about to
        // go: forget after it.
        let lock = self.repairs.lock.lock().await;
        let renewing = self.take_lease().await?;
        let gone = self
            .with_store(move |s| s.forget(workspace.as_deref()))
            .await;
        renewing.abort();
        self.release_lease(Left::AsBefore).await;
        let reloaded = match (&gone, self.repairs.model_sha.get()) {
            (Ok(_), Some(_)) => self.reload_overlay().await.map(drop),
            _ => Ok(()),
        };
        drop(lock);
        let gone = gone?;
        reloaded?;
        Ok(gone)
    }

    /// Rolls back patch `id` (all: None); the ids rolled back.
    pub async fn rollback(&self, id: Option<String>) -> Result<Vec<String>> {
        let rolled = self.with_store(move |s| s.rollback(id.as_deref())).await?;
        self.reload_overlay().await?;
        Ok(rolled)
    }
}
