//! Translation between LSP types and the core's texts, offsets and completions (`from_proto`/`to_proto`).

use crate::application::Proposal;
use crate::completion::Document;
use serde_json::json;
use tower_lsp_server::jsonrpc;
use tower_lsp_server::ls_types::{
    Command, CompletionItem, CompletionItemKind, CompletionTextEdit, InlineCompletionItem,
    Position, Range, TextEdit,
};

/// `star/status`: the server's status, sent whenever it changes (CONTRACT.md).
pub enum StarStatus {}

impl tower_lsp_server::ls_types::notification::Notification for StarStatus {
    type Params = crate::application::Status;
    const METHOD: &'static str = "star/status";
}

/// A failure of the application's, as a JSON-RPC internal error.
pub fn internal(e: impl std::fmt::Display) -> jsonrpc::Error {
    jsonrpc::Error {
        code: jsonrpc::ErrorCode::InternalError,
        message: e.to_string().into(),
        data: None,
    }
}

impl From<crate::application::Error> for jsonrpc::Error {
    fn from(e: crate::application::Error) -> Self {
        internal(e)
    }
}

/// The command an inline item carries: the editor runs it after inserting the item.
pub const ACCEPTED_COMMAND: &str = "star.accepted";

pub fn invalid_params(message: impl Into<String>) -> jsonrpc::Error {
    jsonrpc::Error::invalid_params(message.into())
}

/// The completion id a command names as its first argument.
pub fn completion_id_arg(arg: Option<serde_json::Value>) -> jsonrpc::Result<String> {
    match arg {
        Some(serde_json::Value::String(id)) => Ok(id),
        _ => Err(invalid_params(
            "expected a completion id as the first argument",
        )),
    }
}

/// The char offset of an LSP position, or an `InvalidParams` error that says why.
pub fn offset(doc: &Document, pos: Position) -> jsonrpc::Result<usize> {
    doc.char_at(pos.line, pos.character)
        .map_err(|e| invalid_params(e.to_string()))
}

pub fn position(doc: &Document, offset: usize) -> Position {
    let (line, character) = doc.position(offset);
    Position::new(line, character)
}

/// The identifier characters just before the cursor: editors filter completion items by them.
pub fn word_before(prefix: &str) -> &str {
    let start = prefix
        .char_indices()
        .rev()
        .take_while(|(_, c)| c.is_alphanumeric() || *c == '_')
        .last()
        .map_or(prefix.len(), |(i, _)| i);
    &prefix[start..]
}

/// A completion list item. It replaces the word before the cursor (`start..pos`) with that word plus
/// the completion, so editors that filter by the typed word keep it.
pub fn completion_item(c: &Proposal, word: &str, start: Position, pos: Position) -> CompletionItem {
    let text = format!("{word}{}", c.text);
    CompletionItem {
        label: text.lines().next().unwrap_or_default().trim().to_owned(),
        kind: Some(CompletionItemKind::TEXT),
        detail: Some("star-ls".into()),
        filter_text: Some(text.clone()),
        text_edit: Some(CompletionTextEdit::Edit(TextEdit::new(
            Range::new(start, pos),
            text,
        ))),
        data: Some(json!({ "completionId": c.id })),
        ..CompletionItem::default()
    }
}

/// An inline item; its command's arguments are `[completionId]`, and `{fired}` after it (the patches
/// whose entries opened while it was made) when the completion is new.
pub fn inline_item(c: &Proposal, pos: Position) -> InlineCompletionItem {
    let mut arguments = vec![json!(c.id)];
    if let Some(fired) = &c.fired {
        arguments.push(json!({ "fired": fired }));
    }
    InlineCompletionItem {
        insert_text: c.text.clone(),
        filter_text: None,
        range: Some(Range::new(pos, pos)),
        command: Some(Command::new(
            "Accept completion".into(),
            ACCEPTED_COMMAND.into(),
            Some(arguments),
        )),
        insert_text_format: None,
    }
}
