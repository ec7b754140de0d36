//! Context from the developer's other files, in the manner of llama.vim's ring buffer: chunks of the
//! files opened, edited and closed lately, the ones most like the text around the cursor put before
//! the FIM prompt within a token budget (`prompt::prompt_with`).
//!
//! The chunks a document sees change only when the ring does (a file opened, closed, or left after
//! editing), never at a keystroke: they come first in the prompt, so the document's prefix cache
//! stays warm while the developer types.

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet, VecDeque};

/// Lines a chunk holds at most.
pub const CHUNK_LINES: usize = 32;

/// Chunks a ring keeps (the oldest files' go first).
pub const RING_CHUNKS: usize = 64;

/// Chunks ranked for a document: more than any budget takes.
const RANKED: usize = 16;

/// Some lines of another file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// The file's path (relative to the repository where known).
    pub path: String,
    pub text: String,
}

/// How other files go into a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Qwen2.5-Coder's repo-level format: `<|repo_name|>repo` then `<|file_sep|>path` and its text per
    /// chunk, then `<|file_sep|>` and the current file's path, before `<|fim_prefix|>`.
    #[default]
    Repo,
    /// The chunks' text, one after another, at the start of the FIM prefix.
    Concat,
}

/// What one prompt sees of other files.
#[derive(Debug, Clone, Default)]
pub struct CrossFile {
    /// The repository's name and the current file's path in it (the repo-level format names both).
    pub repo: String,
    pub path: String,
    /// The candidates, most similar first; the prompt takes them in this order while they fit.
    pub chunks: Vec<Chunk>,
    /// Tokens they may take at most; 0: none.
    pub budget: usize,
    pub layout: Layout,
}

/// `text` cut into chunks of `CHUNK_LINES` lines; chunks of blank lines only are left out.
pub fn chunks(path: &str, text: &str) -> Vec<Chunk> {
    let lines: Vec<&str> = text.lines().collect();
    lines
        .chunks(CHUNK_LINES)
        .filter(|c| c.iter().any(|l| !l.trim().is_empty()))
        .map(|c| Chunk {
            path: path.to_owned(),
            text: c.join("\n") + "\n",
        })
        .collect()
}

/// The text that chunks are compared with: the lines before the cursor (as many as a chunk holds)
/// and a few after.
fn around(prefix: &str, suffix: &str) -> String {
    let before: Vec<&str> = prefix.lines().rev().take(CHUNK_LINES).collect();
    let after = suffix.lines().take(CHUNK_LINES / 4);
    before
        .into_iter()
        .rev()
        .chain(after)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The names the text imports from other modules (Python's `from module import a, b as c`, also
/// over parenthesized lines): a chunk that defines one is what the lines using it need.
fn imported(prefix: &str) -> HashSet<&str> {
    let mut names = HashSet::new();
    let mut open = false;
    for line in prefix.lines().map(str::trim) {
        let list = match line
            .strip_prefix("from ")
            .and_then(|l| l.split_once(" import "))
        {
            Some((_, list)) => list,
            None if open => line,
            None => continue,
        };
        open = list.starts_with('(') && !list.contains(')') || open && !list.contains(')');
        for item in list.split(',') {
            let name = item.trim_matches(|c: char| c == '(' || c == ')' || c.is_whitespace());
            let name = name.split_whitespace().next().unwrap_or("");
            if name.len() >= 3 && name.chars().all(|c| c.is_alphanumeric() || c == '_') {
                names.insert(name);
            }
        }
    }
    names
}

/// Whether `chunk` defines one of `names` (`def`, `class`, or an assignment at the line's start).
fn defines(chunk: &str, names: &HashSet<&str>) -> bool {
    chunk.lines().map(str::trim_start).any(|l| {
        let l = l.strip_prefix("async ").unwrap_or(l);
        let l = l
            .strip_prefix("def ")
            .or_else(|| l.strip_prefix("class "))
            .unwrap_or(l);
        let end = l
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(l.len());
        end > 0 && names.contains(&l[..end]) && {
            let rest = l[end..].trim_start();
            rest.starts_with(['(', ':', '=', '[']) && !rest.starts_with("==")
        }
    })
}

/// The identifiers of 3 or more characters in `text`: what similarity compares.
fn words(text: &str) -> HashSet<&str> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| w.len() >= 3 && !w.starts_with(|c: char| c.is_ascii_digit()))
        .collect()
}

/// The Jaccard similarity of two word sets.
fn similarity(a: &HashSet<&str>, b: &HashSet<&str>) -> f32 {
    let common = a.intersection(b).count();
    let union = a.len() + b.len() - common;
    if union == 0 {
        0.0
    } else {
        common as f32 / union as f32
    }
}

/// `chunks` for a cursor between `prefix` and `suffix`, at most `RANKED`: those that define a name the
/// prefix imports first, then the rest, each by the Jaccard similarity of their identifiers with the
/// text around the cursor; those that share none of its identifiers are left out, ties keep their
/// order.
pub fn rank<'a>(
    chunks: impl IntoIterator<Item = &'a Chunk>,
    prefix: &str,
    suffix: &str,
) -> Vec<Chunk> {
    let here_text = around(prefix, suffix);
    let here = words(&here_text);
    let names = imported(prefix);
    let mut scored: Vec<(f32, &Chunk)> = chunks
        .into_iter()
        .map(|c| {
            let like = similarity(&here, &words(&c.text));
            let needed = if defines(&c.text, &names) { 1.0 } else { 0.0 };
            (like + needed, c)
        })
        .filter(|(s, _)| *s > 0.0)
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored
        .into_iter()
        .take(RANKED)
        .map(|(_, c)| c.clone())
        .collect()
}

/// The recent files' chunks, and for each document the ranking it was last given.
#[derive(Debug, Default)]
pub struct Ring {
    chunks: VecDeque<Chunk>,
    /// Bumped whenever `chunks` changes: a ranking made before is stale.
    generation: u64,
    ranked: HashMap<String, (u64, Vec<Chunk>)>,
}

impl Ring {
    /// Takes in `path`'s text as it is now, in place of what the ring held of it; the oldest chunks
    /// go past `RING_CHUNKS`.
    pub fn add(&mut self, path: &str, text: &str) {
        let new = chunks(path, text);
        let old: Vec<&Chunk> = self.chunks.iter().filter(|c| c.path == path).collect();
        if old.len() == new.len() && old.iter().zip(&new).all(|(a, b)| *a == b) {
            return;
        }
        self.chunks.retain(|c| c.path != path);
        self.chunks.extend(new);
        while self.chunks.len() > RING_CHUNKS {
            self.chunks.pop_front();
        }
        self.generation += 1;
    }

    /// The chunks of other files ranked for document `path` at a cursor between `prefix` and
    /// `suffix`: ranked again only when the ring has changed since, so typing does not change them.
    pub fn for_document(&mut self, path: &str, prefix: &str, suffix: &str) -> Vec<Chunk> {
        if let Some((generation, ranked)) = self.ranked.get(path) {
            if *generation == self.generation {
                return ranked.clone();
            }
        }
        let ranked = rank(
            self.chunks.iter().filter(|c| c.path != path),
            prefix,
            suffix,
        );
        self.ranked
            .insert(path.to_owned(), (self.generation, ranked.clone()));
        ranked
    }

    /// Forgets the ranking made for `path` (the document closed).
    pub fn closed(&mut self, path: &str) {
        self.ranked.remove(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_similar_chunk_comes_first_and_strangers_not_at_all() {
        let a = Chunk {
            path: "a.py".into(),
            text: "def parse_header(value):\n    return value.split(';')\n".into(),
        };
        let b = Chunk {
            path: "b.py".into(),
            text: "class Unrelated:\n    pass\n".into(),
        };
        let c = Chunk {
            path: "c.py".into(),
            text: "def parse_header(x): ...\ndef other_thing(): ...\n".into(),
        };
        let ranked = rank([&b, &c, &a], "h = parse_header(value)", "");
        assert_eq!(ranked, vec![a.clone(), c.clone()]);
        // A name the file imports brings the chunk that defines it first.
        let d = Chunk {
            path: "d.py".into(),
            text: "class Unrelated_Reader:\n    pass\n".into(),
        };
        let ranked = rank(
            [&a, &c, &d],
            "from .d import (\n    Unrelated_Reader,\n)\nh = parse_header(value)",
            "",
        );
        assert_eq!(ranked, vec![d, a, c]);
    }

    #[test]
    fn a_ranking_changes_when_the_ring_does_not_at_each_keystroke() {
        let mut ring = Ring::default();
        ring.add("lib.py", "def alpha_one():\n    pass\n");
        let first = ring.for_document("main.py", "alpha_one(", "");
        assert_eq!(first.len(), 1);
        // Typing: the text around the cursor changes, the ranking does not.
        assert_eq!(ring.for_document("main.py", "nothing alike", ""), first);
        ring.add("other.py", "def beta_two():\n    pass\n");
        let again = ring.for_document("main.py", "beta_two(", "");
        assert_eq!(again[0].path, "other.py");
        // The document's own chunks are never its context.
        ring.add("main.py", "def beta_two_main():\n    pass\n");
        assert!(ring
            .for_document("main.py", "beta_two(", "")
            .iter()
            .all(|c| c.path != "main.py"));
    }

    #[test]
    fn files_are_cut_into_chunks_of_whole_lines() {
        let text: String = (0..70).map(|i| format!("x{i} = {i}\n")).collect();
        let cut = chunks("f.py", &text);
        assert_eq!(cut.len(), 3);
        assert_eq!(cut[0].text.lines().count(), CHUNK_LINES);
        assert!(cut[2].text.starts_with("x64 = 64\n"));
        assert!(chunks("blank.py", "\n\n  \n").is_empty());
    }
}
