//! Follows every completion shown through the edits that come after it, and decides its outcome when the
//! developer is done with it: when they edit or ask for a completion on another line, write past the
//! lines the proposal covers, close the document, go idle, or say so explicitly.
//!
//! Each completion owns a *region*: the text typed (or inserted) at its position since it was shown. Edits
//! before the region shift it, edits inside or at its end grow or shrink it, and an edit that changes the
//! text just before the position abandons it (its context is gone).

use super::outcome::{compare, judge, CaseKind, CaseText, Outcome, Verdict};
use crate::completion::{Document, PositionError};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// One text change in chars: `removed` (which started at `start`) was replaced by `inserted`.
#[derive(Debug, Clone)]
pub struct Edit {
    pub start: usize,
    pub removed: String,
    pub inserted: String,
}

impl Edit {
    /// Replaces chars `start..end` of `doc` by `text`: the edit, as the tracker follows it.
    pub fn apply(
        doc: &mut Document,
        start: usize,
        end: usize,
        text: String,
    ) -> Result<Self, PositionError> {
        let removed = doc.slice(start, end);
        doc.replace(start, end, &text)?;
        Ok(Self {
            start,
            removed,
            inserted: text,
        })
    }
}

/// A completion whose outcome is decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub document: String,
    /// The document's language, as its editor named it.
    pub language: String,
    /// `None` for a place where the model proposed nothing (no id was shown).
    pub completion_id: Option<String>,
    pub outcome: Option<Outcome>,
    pub case: Option<CaseText>,
}

#[derive(Debug)]
struct Tracked {
    id: Option<String>,
    anchor: usize,
    end: usize,
    proposed: String,
    /// Explicitly accepted, or the whole proposal was in the region at some point.
    accepted: bool,
    rejected: bool,
    touched: Instant,
}

impl Tracked {
    fn lines(&self, doc: &Document) -> (usize, usize) {
        (doc.line_of(self.anchor), doc.line_of(self.end))
    }

    /// The developer wrote past the lines the proposal covers, or ended a line where they wrote
    /// something else than it (Enter after typing over it): the outcome cannot change any more.
    fn settled(&self, doc: &Document) -> bool {
        let (first, last) = self.lines(doc);
        if last - first > self.proposed.matches('\n').count() {
            return true;
        }
        let region = doc.slice(self.anchor, self.end);
        matches!(compare(&self.proposed, &region), Verdict::Diverged { line } if line < last - first)
    }
}

#[derive(Debug)]
pub struct Tracker {
    documents: HashMap<String, Vec<Tracked>>,
    /// Open completions kept per document; the oldest is decided when a new one would exceed it.
    pub max_per_document: usize,
}

impl Default for Tracker {
    fn default() -> Self {
        Self {
            documents: HashMap::new(),
            max_per_document: 32,
        }
    }
}

impl Tracker {
    /// A completion was shown at char `at`; completions open on other lines are decided (the cursor moved).
    pub fn shown(
        &mut self,
        key: &str,
        doc: &Document,
        id: Option<String>,
        at: usize,
        proposed: String,
        now: Instant,
    ) -> Vec<Resolved> {
        let line = doc.line_of(at);
        let mut resolved = self.resolve(key, doc, |t| {
            let (first, last) = t.lines(doc);
            line < first || line > last
        });
        let open = self.documents.entry(key.to_owned()).or_default();
        open.push(Tracked {
            id,
            anchor: at,
            end: at,
            proposed,
            accepted: false,
            rejected: false,
            touched: now,
        });
        if open.len() > self.max_per_document {
            let oldest = open.remove(0);
            resolved.extend(decide(key, doc, vec![oldest]));
        }
        resolved
    }

    /// Follows one change, already applied to `doc`.
    pub fn edited(&mut self, key: &str, doc: &Document, edit: Edit, now: Instant) -> Vec<Resolved> {
        let Some(open) = self.documents.get_mut(key) else {
            return Vec::new();
        };
        let (start, removed, inserted) = trim_common(&edit);
        if removed == 0 && inserted == 0 {
            return Vec::new();
        }
        let old_end = start + removed;
        let delta = inserted as isize - removed as isize;
        let shift = |x: usize| x.saturating_add_signed(delta);
        let edit_lines = (doc.line_of(start), doc.line_of(start + inserted));
        let mut abandoned = Vec::new();
        for (i, t) in open.iter_mut().enumerate() {
            if old_end < t.anchor {
                t.anchor = shift(t.anchor);
                t.end = shift(t.end);
            } else if start < t.anchor {
                abandoned.push(i); // the text just before the completion changed
                continue;
            } else if start <= t.end {
                t.end = if old_end > t.end {
                    start + inserted
                } else {
                    shift(t.end)
                };
                t.touched = now;
                if !t.proposed.is_empty() && doc.slice(t.anchor, t.end) == t.proposed {
                    t.accepted = true;
                }
            }
        }
        for i in abandoned.into_iter().rev() {
            open.remove(i);
        }
        self.resolve(key, doc, |t| {
            let (first, last) = t.lines(doc);
            edit_lines.1 < first || edit_lines.0 > last || t.settled(doc)
        })
    }

    /// The id and unwritten rest of a completion still open with its region ending at `at`, when the
    /// developer typed (or took a word of) its start and nothing else; not one they dismissed.
    pub fn ahead(&self, key: &str, doc: &Document, at: usize) -> Option<(String, String)> {
        self.documents.get(key)?.iter().rev().find_map(|t| {
            let id =
                t.id.as_ref()
                    .filter(|_| !t.rejected && t.anchor < at && t.end == at)?;
            let rest = t
                .proposed
                .strip_prefix(doc.slice(t.anchor, t.end).as_str())?;
            (!rest.trim().is_empty()).then(|| (id.clone(), rest.to_owned()))
        })
    }

    pub fn accept(&mut self, id: &str) {
        if let Some(t) = self.find(id) {
            t.accepted = true;
        }
    }

    /// The editor dismissed it; it stays open to learn what the developer writes instead.
    pub fn reject(&mut self, id: &str) {
        if let Some(t) = self.find(id) {
            t.rejected = true;
        }
    }

    /// The developer says `text` is what they wrote in place of the proposal: decided now.
    pub fn correct(&mut self, key: &str, doc: &Document, id: &str, text: &str) -> Option<Resolved> {
        let open = self.documents.get_mut(key)?;
        let i = open.iter().position(|t| t.id.as_deref() == Some(id))?;
        let t = open.remove(i);
        let case = judge(
            &doc.slice(0, t.anchor),
            text,
            &doc.slice(t.end, doc.len_chars()),
            &t.proposed,
            true,
        );
        Some(Resolved {
            document: key.to_owned(),
            language: doc.language.clone(),
            completion_id: t.id,
            outcome: Some(case.as_ref().map_or(Outcome::Rejected, |c| c.outcome)),
            case,
        })
    }

    /// Decides the completions the developer typed at and then left alone for `timeout`. One nobody
    /// typed at stays open (until the cursor leaves, the document closes or newer ones push it out):
    /// looking at a proposal for a while is not a verdict, and edits may reach us late.
    pub fn idle(
        &mut self,
        documents: &HashMap<String, Document>,
        now: Instant,
        timeout: Duration,
    ) -> Vec<Resolved> {
        let keys: Vec<String> = self.documents.keys().cloned().collect();
        let mut resolved = Vec::new();
        for key in keys {
            match documents.get(&key) {
                Some(doc) => resolved.extend(self.resolve(&key, doc, |t| {
                    t.end > t.anchor && now.saturating_duration_since(t.touched) >= timeout
                })),
                None => {
                    self.documents.remove(&key);
                }
            }
        }
        resolved
    }

    /// Decides every completion of a document (closed, or the server is shutting down).
    pub fn close(&mut self, key: &str, doc: &Document) -> Vec<Resolved> {
        self.resolve(key, doc, |_| true)
    }

    pub fn open_documents(&self) -> Vec<String> {
        self.documents.keys().cloned().collect()
    }

    fn find(&mut self, id: &str) -> Option<&mut Tracked> {
        self.documents
            .values_mut()
            .flatten()
            .find(|t| t.id.as_deref() == Some(id))
    }

    fn resolve(
        &mut self,
        key: &str,
        doc: &Document,
        mut done: impl FnMut(&Tracked) -> bool,
    ) -> Vec<Resolved> {
        let Some(open) = self.documents.get_mut(key) else {
            return Vec::new();
        };
        let (finished, kept): (Vec<_>, Vec<_>) = open.drain(..).partition(|t| done(t));
        *open = kept;
        if open.is_empty() {
            self.documents.remove(key);
        }
        decide(key, doc, finished)
    }
}

/// Judges finished completions. Typing a line one key at a time shows a completion at nearly every
/// key; of those on one line only the earliest failure and the earliest guard are kept, or one
/// developer line would count as many cases.
fn decide(key: &str, doc: &Document, mut finished: Vec<Tracked>) -> Vec<Resolved> {
    finished.sort_by_key(|t| t.anchor);
    let mut seen: Vec<(CaseKind, usize)> = Vec::new();
    finished
        .into_iter()
        .map(|t| {
            let mut case = judge(
                &doc.slice(0, t.anchor),
                &doc.slice(t.anchor, t.end),
                &doc.slice(t.end, doc.len_chars()),
                &t.proposed,
                t.accepted,
            );
            let outcome = match &case {
                Some(c) => Some(c.outcome),
                None if t.rejected => Some(Outcome::Rejected),
                None => None,
            };
            if let Some(c) = &case {
                let line = (c.kind, c.prefix.matches('\n').count());
                if seen.contains(&line) {
                    case = None;
                } else {
                    seen.push(line);
                }
            }
            Resolved {
                document: key.to_owned(),
                language: doc.language.clone(),
                completion_id: t.id,
                outcome,
                case,
            }
        })
        .collect()
}

/// The edit without the text it leaves as it was (editors may resend a whole line, or replace the word
/// before the cursor by itself plus a completion): `(start, removed chars, inserted chars)`.
fn trim_common(edit: &Edit) -> (usize, usize, usize) {
    let (r, i): (Vec<char>, Vec<char>) = (
        edit.removed.chars().collect(),
        edit.inserted.chars().collect(),
    );
    let head = r.iter().zip(&i).take_while(|(a, b)| a == b).count();
    let tail = r[head..]
        .iter()
        .rev()
        .zip(i[head..].iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    (
        edit.start + head,
        r.len() - head - tail,
        i.len() - head - tail,
    )
}
