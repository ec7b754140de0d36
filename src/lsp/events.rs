//! The host's events as the editor sees them: `$/progress` while the model loads and while a repair
//! runs, and a `window/showMessage` for a failed load, store trouble, and each repair's outcome.

use super::server::Server;
use crate::application::Event;
use crate::completion::EngineEvent;
use std::time::Duration;
use tokio::sync::mpsc;
use tower_lsp_server::ls_types::{MessageType, ProgressToken};
use tower_lsp_server::{NotCancellable, OngoingProgress, Unbounded};

type Progress = OngoingProgress<Unbounded, NotCancellable>;

impl Server {
    /// Turns the host's events into messages, in order, from `initialized` on.
    pub(super) async fn report_events(self, mut events: mpsc::UnboundedReceiver<Event>) {
        let mut loading = self.begin_progress("star-ls/model", "loading model").await;
        let mut repairing = None;
        while let Some(event) = events.recv().await {
            match event {
                Event::Changed | Event::Model(EngineEvent::Loading { .. }) => {}
                Event::Model(EngineEvent::Loaded { path, seconds }) => {
                    if let Some(p) = loading.take() {
                        let text = format!("ready: {} ({seconds:.1} s)", path.display());
                        p.finish_with_message(text).await;
                    }
                }
                Event::Model(EngineEvent::LoadFailed { error }) => {
                    if let Some(p) = loading.take() {
                        p.finish_with_message("model failed to load").await;
                    }
                    self.message(MessageType::ERROR, error).await;
                }
                Event::StoreTrouble(trouble) => self.message(MessageType::WARNING, trouble).await,
                Event::RepairStarted => {
                    repairing = self
                        .begin_progress("star-ls/repair", "repairing the model")
                        .await;
                }
                Event::RepairEnded(report) => {
                    if let Some(p) = repairing.take() {
                        p.finish_with_message("repair done").await;
                    }
                    let Some(r) = report else { continue };
                    let summary = match &r.patch_id {
                        Some(id) => format!(
                            "{id} fixed {} of {} failures (guard {:.2} → {:.2}, {:.1} s)",
                            r.fixed, r.failures, r.guard_before, r.guard_after, r.seconds
                        ),
                        None => format!(
                            "no patch ({} failures): {}",
                            r.failures,
                            r.refused.as_deref().unwrap_or("nothing to repair")
                        ),
                    };
                    self.message(MessageType::INFO, summary).await;
                }
            }
        }
    }

    async fn message(&self, kind: MessageType, text: String) {
        self.client
            .show_message(kind, format!("star-ls: {text}"))
            .await;
    }

    /// Starts a `$/progress` report if the client shows them. Bounded: a client that never answers
    /// `window/workDoneProgress/create` must not hold up what waits on the progress.
    async fn begin_progress(&self, token: &str, message: &str) -> Option<Progress> {
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
}
