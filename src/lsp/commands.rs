//! `workspace/executeCommand`'s commands and the `star/did*` notifications, each one call on the host.

use super::proto::{self, invalid_params, ACCEPTED_COMMAND};
use super::server::Server;
use serde::Deserialize;
use serde_json::{json, Value};
use tower_lsp_server::jsonrpc::Result;

/// The commands the server offers (CONTRACT.md).
pub const COMMANDS: [&str; 7] = [
    ACCEPTED_COMMAND,
    "star.status",
    "star.explain",
    "star.repairNow",
    "star.listPatches",
    "star.rollback",
    "star.forget",
];

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

impl Server {
    /// Runs command `name` with its first argument.
    pub(super) async fn command(&self, name: &str, first: Option<Value>) -> Result<Option<Value>> {
        let host = self.host()?;
        let answer = match name {
            "star.status" => json!(host.status().await),
            ACCEPTED_COMMAND => {
                host.accept(&proto::completion_id_arg(first)?);
                return Ok(None);
            }
            "star.explain" => {
                let id = proto::completion_id_arg(first)?;
                match host.explain(id.clone()).await? {
                    Some(e) => json!(e),
                    None => return Err(invalid_params(format!("unknown completion {id}"))),
                }
            }
            "star.repairNow" => json!(host.repair_now().await?),
            "star.listPatches" => json!(host.patches().await?),
            // `star.rollback patchId | "all"`
            "star.rollback" => {
                let id = match first.as_ref().and_then(Value::as_str) {
                    Some("all") => None,
                    Some(id) => Some(id.to_owned()),
                    None => {
                        return Err(invalid_params(
                            "expected a patch id or \"all\" as the first argument",
                        ))
                    }
                };
                json!({ "rolledBack": host.rollback(id).await? })
            }
            // `star.forget [folder | "all"]`: a workspace folder's cases (default: the first folder's)
            // and the patches that learned from them.
            "star.forget" => {
                let workspace = match first.as_ref().map(Value::as_str) {
                    None => Some(host.first_root()),
                    Some(Some("all")) => None,
                    Some(Some(folder)) => Some(folder.to_owned()),
                    Some(None) => {
                        return Err(invalid_params(
                            "expected no argument (the first workspace folder), a folder's URI, or \"all\"",
                        ))
                    }
                };
                json!(host.forget(workspace).await?)
            }
            other => return Err(invalid_params(format!("unknown command {other}"))),
        };
        Ok(Some(answer))
    }

    /// `star/didAccept`: the editor inserted the completion.
    pub async fn did_accept(&self, params: CompletionRef) {
        if let Ok(host) = self.host() {
            host.accept(&params.completion_id);
        }
    }

    /// `star/didReject`: the editor dismissed it; what the developer writes there next is the target.
    pub async fn did_reject(&self, params: CompletionRef) {
        if let Ok(host) = self.host() {
            host.reject(&params.completion_id);
        }
    }

    /// `star/didCorrect`: the developer wrote `text` in place of the completion.
    pub async fn did_correct(&self, params: Correction) {
        if let Ok(host) = self.host() {
            host.correct(&params.completion_id, &params.text);
        }
    }
}
