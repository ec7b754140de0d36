//! The open documents and the completions followed through their edits, kept together: what
//! `didOpen`, `didChange` and `didClose` change, in the order they came (the server holds it under
//! one lock, so an edit and the tracker never see each other half-applied). Beside them, the ring of
//! the files opened, closed and edited lately, whose chunks a completion may see (`crossfile::Ring`).

use super::tracker::{Edit, Resolved, Tracker};
use crate::completion::crossfile::{Chunk, Ring};
use crate::completion::{Document, PositionError};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// One change to a document: `range` (its start and end as 0-based line and UTF-16 column) replaced
/// by `text`; no range replaces the whole text.
#[derive(Debug, Clone)]
pub struct Change {
    pub range: Option<((u32, u32), (u32, u32))>,
    pub text: String,
}

/// A change the workspace could not follow.
#[derive(Debug)]
pub enum Unfollowed {
    /// No such document is open.
    Unknown,
    /// A change did not fit the text: client and server disagree on it, so the document is
    /// dropped until reopened, its open completions decided first (`resolved`).
    Dropped {
        resolved: Vec<Resolved>,
        error: PositionError,
    },
}

#[derive(Default)]
pub struct Workspace {
    documents: HashMap<String, Document>,
    tracker: Tracker,
    /// Only when completions see other files (`with_other_files`): otherwise no file is chunked.
    ring: Option<Ring>,
    /// The document edited last: the ring takes its text once a completion is asked in another.
    edited: Option<String>,
    /// Documents whose text must never reach a prompt of another file (`open_private`).
    private: std::collections::HashSet<String>,
}

impl Workspace {
    /// A workspace that keeps the ring, for completions that see other files' chunks.
    pub fn with_other_files() -> Self {
        Self {
            ring: Some(Ring::default()),
            ..Self::default()
        }
    }

    pub fn open(&mut self, key: String, doc: Document) {
        if let Some(ring) = &mut self.ring {
            ring.add(&key, &doc.text());
        }
        self.private.remove(&key);
        self.documents.insert(key, doc);
    }

    /// Opens a document that stays out of the ring: no other file's completion sees its text.
    pub fn open_private(&mut self, key: String, doc: Document) {
        self.private.insert(key.clone());
        self.documents.insert(key, doc);
    }

    /// Other files' chunks for a completion in document `key` around `prefix`|`suffix`, the most
    /// like that text first (`Ring::for_document`: they change only when the ring does).
    pub fn other_files(&mut self, key: &str, prefix: &str, suffix: &str) -> Vec<Chunk> {
        let Some(ring) = &mut self.ring else {
            return Vec::new();
        };
        if let Some(edited) = self.edited.take_if(|e| e != key) {
            if let Some(doc) = self.documents.get(&edited) {
                ring.add(&edited, &doc.text());
            }
        }
        ring.for_document(key, prefix, suffix)
    }

    pub fn document(&self, key: &str) -> Option<&Document> {
        self.documents.get(key)
    }

    /// How many documents are open.
    pub fn open_count(&self) -> usize {
        self.documents.len()
    }

    /// Applies `changes` to document `key` in order, following each with the tracker; the document
    /// is then at `version` (applied whatever version it was at: the caller may warn of a stale one).
    /// The completions the changes decided.
    pub fn change(
        &mut self,
        key: &str,
        version: i32,
        changes: impl IntoIterator<Item = Change>,
        now: Instant,
    ) -> Result<Vec<Resolved>, Unfollowed> {
        let doc = self.documents.get_mut(key).ok_or(Unfollowed::Unknown)?;
        let mut resolved = Vec::new();
        for change in changes {
            let applied = match change.range {
                None => Ok((0, doc.len_chars())),
                Some(((l0, c0), (l1, c1))) => doc
                    .char_at(l0, c0)
                    .and_then(|s| Ok((s, doc.char_at(l1, c1)?))),
            }
            .and_then(|(s, e)| Edit::apply(doc, s, e, change.text));
            match applied {
                Ok(edit) => resolved.extend(self.tracker.edited(key, doc, edit, now)),
                Err(error) => {
                    resolved.extend(self.close(key));
                    return Err(Unfollowed::Dropped { resolved, error });
                }
            }
        }
        doc.version = version;
        if self.ring.is_some() && !self.private.contains(key) {
            self.edited = Some(key.to_owned());
        }
        Ok(resolved)
    }

    /// Decides every completion open in document `key` and closes it.
    pub fn close(&mut self, key: &str) -> Vec<Resolved> {
        if let Some(ring) = &mut self.ring {
            ring.closed(key);
        }
        match self.documents.remove(key) {
            Some(doc) => {
                let private = self.private.remove(key);
                if let Some(ring) = self.ring.as_mut().filter(|_| !private) {
                    ring.add(key, &doc.text());
                }
                self.tracker.close(key, &doc)
            }
            None => Vec::new(),
        }
    }

    /// A completion (`id`, or none where the model proposed nothing) was shown at char `at` of
    /// document `key` as it was at `version`; None when the document has moved on since (the offset
    /// no longer means the same place) or is gone.
    pub fn shown(
        &mut self,
        key: &str,
        version: i32,
        id: Option<String>,
        at: usize,
        proposed: String,
        now: Instant,
    ) -> Option<Vec<Resolved>> {
        let doc = self.documents.get(key).filter(|d| d.version == version)?;
        Some(self.tracker.shown(key, doc, id, at, proposed, now))
    }

    /// The id and the rest of a completion shown in `key` whose start the developer has typed up to
    /// char `at` of the document as it is at `version`.
    pub fn ahead(&self, key: &str, version: i32, at: usize) -> Option<(String, String)> {
        let doc = self.documents.get(key).filter(|d| d.version == version)?;
        self.tracker.ahead(key, doc, at)
    }

    /// Decides the completions typed at and then left alone for `timeout`.
    pub fn idle(&mut self, now: Instant, timeout: Duration) -> Vec<Resolved> {
        self.tracker.idle(&self.documents, now, timeout)
    }

    /// Decides every open completion, the documents staying open (at shutdown, or before a repair).
    pub fn decide_all(&mut self) -> Vec<Resolved> {
        let mut resolved = Vec::new();
        for key in self.tracker.open_documents() {
            if let Some(doc) = self.documents.get(&key) {
                resolved.extend(self.tracker.close(&key, doc));
            }
        }
        resolved
    }

    pub fn accept(&mut self, id: &str) {
        self.tracker.accept(id);
    }

    pub fn reject(&mut self, id: &str) {
        self.tracker.reject(id);
    }

    /// The developer says `text` is what they wrote in place of completion `id`: decided now.
    pub fn correct(&mut self, id: &str, text: &str) -> Option<Resolved> {
        self.documents
            .iter()
            .find_map(|(key, doc)| self.tracker.correct(key, doc, id, text))
    }
}
