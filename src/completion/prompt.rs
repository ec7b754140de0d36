//! From text around the cursor to a fill-in-the-middle prompt, the same way for serving and for repair.

use super::crossfile::{CrossFile, Layout};
use crate::model::{generate::Prompt, Tokenizer};

/// How much context goes into a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ContextLimits {
    /// Tokens of text before the cursor.
    pub prefix_tokens: usize,
    /// Tokens of text after the cursor.
    pub suffix_tokens: usize,
}

impl Default for ContextLimits {
    fn default() -> Self {
        Self {
            prefix_tokens: 1024,
            // The suffix follows the prefix in the prompt, so each keystroke that changes the prefix's
            // tokens re-runs all of it: keep it short.
            suffix_tokens: 64,
        }
    }
}

/// `<|fim_prefix|>prefix<|fim_suffix|>suffix<|fim_middle|>`, built from ids so user text never turns into
/// markers, with the prefix's last token cut off for token healing.
///
/// The prefix window starts at a line boundary, chosen from whole lines, so typing on the last line keeps
/// the window's start (and so the prefix cache) stable.
pub fn fim_prompt(tok: &Tokenizer, prefix: &str, suffix: &str, limits: ContextLimits) -> Prompt {
    prompt_with(tok, &CrossFile::default(), prefix, suffix, limits)
}

/// `fim_prompt` with other files' chunks before the text of this one (`crossfile`): as many of
/// `cross.chunks` as fit in `cross.budget` tokens, in their order, the first nearest the cursor.
pub fn prompt_with(
    tok: &Tokenizer,
    cross: &CrossFile,
    prefix: &str,
    suffix: &str,
    limits: ContextLimits,
) -> Prompt {
    // ~3 bytes a token in code; a generous char budget first, then an exact token cut at a line start.
    let prefix = tail_lines(prefix, limits.prefix_tokens * 4);
    let mut prefix_ids = tok.encode(prefix);
    let mut skip_text = 0;
    while prefix_ids.len() > limits.prefix_tokens {
        // Drop whole leading lines until the prefix fits.
        let Some(nl) = prefix[skip_text..].find('\n') else {
            break;
        };
        skip_text += nl + 1;
        prefix_ids = tok.encode(&prefix[skip_text..]);
    }
    let heal = match prefix_ids.last() {
        Some(&id) if should_heal(tok.token_bytes(id)) => {
            prefix_ids.pop();
            tok.token_bytes(id).to_vec()
        }
        _ => Vec::new(),
    };

    let suffix = head_lines(suffix, limits.suffix_tokens * 4);
    let mut suffix_ids = tok.encode(suffix);
    suffix_ids.truncate(limits.suffix_tokens);

    let fim = tok.fim;
    let (before, within) = other_files(tok, cross);
    let mut tokens =
        Vec::with_capacity(before.len() + within.len() + prefix_ids.len() + suffix_ids.len() + 3);
    tokens.extend(before);
    tokens.push(fim.prefix);
    tokens.extend(within);
    tokens.extend(prefix_ids);
    tokens.push(fim.suffix);
    tokens.extend(suffix_ids);
    tokens.push(fim.middle);

    let cursor_line = prefix.rsplit('\n').next().unwrap_or("");
    // The prompt's text ends before the healed bytes; generation starts there.
    // Bytes: the healed token may be part of a character.
    let kept = String::from_utf8_lossy(
        prefix
            .as_bytes()
            .strip_suffix(heal.as_slice())
            .unwrap_or(prefix.as_bytes()),
    );
    let (above, line_start) = kept.rsplit_once('\n').unwrap_or(("", &kept));
    let above_indent = above
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map_or(0, crate::model::generate::indent_of);
    Prompt {
        tokens,
        heal,
        indent: crate::model::generate::indent_of(cursor_line),
        suffix_line: suffix
            .split('\n')
            .skip(1)
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_owned),
        line_start: line_start.to_owned(),
        above_indent,
    }
}

/// The tokens other files add to a prompt: before `<|fim_prefix|>` (the repo-level format) and
/// within it, before the file's own text (plain concatenation).
fn other_files(tok: &Tokenizer, cross: &CrossFile) -> (Vec<u32>, Vec<u32>) {
    let mut taken: Vec<Vec<u32>> = Vec::new();
    let mut used = 0;
    let markers = tok.fim.repo_name.zip(tok.fim.file_sep);
    let layout = match markers {
        Some(_) => cross.layout,
        None => Layout::Concat,
    };
    for chunk in &cross.chunks {
        let ids = match (layout, markers) {
            (Layout::Repo, Some((_, sep))) => {
                let mut ids = vec![sep];
                ids.extend(tok.encode(&format!("{}\n{}", chunk.path, chunk.text)));
                ids
            }
            _ => tok.encode(&format!("{}\n", chunk.text)),
        };
        if used + ids.len() > cross.budget {
            break;
        }
        used += ids.len();
        taken.push(ids);
    }
    if taken.is_empty() {
        return (Vec::new(), Vec::new());
    }
    // The most similar nearest the cursor.
    let chunks = taken.into_iter().rev().flatten();
    match (layout, markers) {
        (Layout::Repo, Some((repo, sep))) => {
            let mut ids = vec![repo];
            ids.extend(tok.encode(&format!("{}\n", cross.repo)));
            ids.extend(chunks);
            ids.push(sep);
            ids.extend(tok.encode(&format!("{}\n", cross.path)));
            (ids, Vec::new())
        }
        _ => (Vec::new(), chunks.collect()),
    }
}

/// Heal the prefix's last token when the cursor sits inside a word (`self.quan|`): there the model would
/// otherwise continue from a token boundary it never saw in training. After a space, punctuation or a
/// blank line's indentation the boundary is a natural one: healing measured worse after ` in ` (`if x
/// in |` healed to ` not in ...`), and healed indentation led the model into blank lines and runs of
/// digits (docs/completion.md, "The line's shape").
fn should_heal(last: &[u8]) -> bool {
    last.last()
        .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b >= 0x80)
}

/// The longest tail of whole lines of `text` within `max_bytes` (the cursor's partial line always kept).
fn tail_lines(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut from = text.len() - max_bytes;
    while !text.is_char_boundary(from) {
        from += 1;
    }
    match text[from..].find('\n') {
        Some(i) => &text[from + i + 1..],
        None => &text[text.rfind('\n').map_or(0, |i| i + 1)..],
    }
}

/// The longest head of `text` within `max_bytes`, cut at a line end.
fn head_lines(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    match text[..end].rfind('\n') {
        Some(i) => &text[..i + 1],
        None => &text[..end],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cut_at_line_boundaries() {
        let text = "aaaa\nbbbb\ncc";
        assert_eq!(tail_lines(text, 7), "cc");
        assert_eq!(tail_lines(text, 8), "bbbb\ncc");
        assert_eq!(tail_lines(text, 100), text);
        assert_eq!(head_lines(text, 7), "aaaa\n");
        assert_eq!(head_lines("é", 1), "");
    }

    #[test]
    fn heals_inside_words_only() {
        assert!(should_heal(b"quan"));
        assert!(should_heal("é".as_bytes()));
        assert!(!should_heal(b"    "));
        assert!(!should_heal(b":\n"));
        assert!(!should_heal(b" "));
        assert!(!should_heal(b"("));
    }
}
