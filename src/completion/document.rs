//! Open documents: text in a rope, edited incrementally, addressed by line and UTF-16 column as LSP does.

use ropey::Rope;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PositionError {
    #[error("line {line} is past the end of the document ({lines} lines)")]
    LineOutOfRange { line: u32, lines: usize },
    #[error("range end ({end}) is before its start ({start})")]
    InvertedRange { start: usize, end: usize },
}

#[derive(Debug, Clone)]
pub struct Document {
    text: Rope,
    pub version: i32,
    pub language: String,
}

impl Document {
    pub fn new(text: &str, version: i32, language: &str) -> Self {
        Self {
            text: Rope::from_str(text),
            version,
            language: language.to_owned(),
        }
    }

    /// The char index of a 0-based line and UTF-16 column. A column past the line's end means the end of
    /// the line (LSP's rule); a column inside a surrogate pair means the character it belongs to.
    pub fn char_at(&self, line: u32, utf16_col: u32) -> Result<usize, PositionError> {
        let lines = self.text.len_lines();
        let l = line as usize;
        if l >= lines {
            // Some clients end whole-document edits one line past the last: that is the end.
            if l == lines && utf16_col == 0 {
                return Ok(self.text.len_chars());
            }
            return Err(PositionError::LineOutOfRange { line, lines });
        }
        let start = self.text.line_to_char(l);
        let line_text = self.text.line(l);
        // Exclude the line break itself: a column never lands after it.
        let mut line_chars = line_text.len_chars();
        for ending in ["\r\n", "\n", "\r"] {
            if line_chars >= ending.chars().count()
                && line_text
                    .slice(line_chars - ending.chars().count()..)
                    .chars()
                    .eq(ending.chars())
            {
                line_chars -= ending.chars().count();
                break;
            }
        }
        let line_utf16 = line_text.slice(..line_chars).len_utf16_cu();
        let col = (utf16_col as usize).min(line_utf16);
        Ok(start + line_text.utf16_cu_to_char(col))
    }

    /// The 0-based line and UTF-16 column of char index `at` (clamped to the document).
    pub fn position(&self, at: usize) -> (u32, u32) {
        let at = at.min(self.text.len_chars());
        let line = self.text.char_to_line(at);
        let start = self.text.line_to_char(line);
        let col = self.text.char_to_utf16_cu(at) - self.text.char_to_utf16_cu(start);
        (line as u32, col as u32)
    }

    /// Replaces chars `start..end` by `text`.
    pub fn replace(&mut self, start: usize, end: usize, text: &str) -> Result<(), PositionError> {
        if end < start {
            return Err(PositionError::InvertedRange { start, end });
        }
        self.text.remove(start..end);
        self.text.insert(start, text);
        Ok(())
    }

    /// The text before and after char `at`.
    pub fn split_at(&self, at: usize) -> (String, String) {
        (
            self.text.slice(..at).to_string(),
            self.text.slice(at..).to_string(),
        )
    }

    pub fn text(&self) -> String {
        self.text.to_string()
    }

    pub fn len_chars(&self) -> usize {
        self.text.len_chars()
    }

    /// The text of chars `start..end` (clamped to the document; empty when `end` is before `start`).
    pub fn slice(&self, start: usize, end: usize) -> String {
        let end = end.min(self.text.len_chars());
        // ropey panics on an inverted range: didChange slices a client's range before checking it.
        self.text.slice(start.min(end)..end).to_string()
    }

    /// The 0-based line of char index `at` (clamped to the document).
    pub fn line_of(&self, at: usize) -> usize {
        self.text.char_to_line(at.min(self.text.len_chars()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf16_columns_and_line_ends() {
        // "😀" is two UTF-16 units and one char; "é" one of each.
        let d = Document::new("a😀b\r\né\n", 1, "python");
        assert_eq!(d.char_at(0, 0), Ok(0));
        assert_eq!(d.char_at(0, 1), Ok(1));
        assert_eq!(d.char_at(0, 3), Ok(2)); // after the emoji
        assert_eq!(d.char_at(0, 2), Ok(1)); // inside the surrogate pair: the emoji itself
        assert_eq!(d.char_at(0, 99), Ok(3)); // clamped before "\r\n"
        assert_eq!(d.char_at(1, 1), Ok(6));
        assert_eq!(d.char_at(2, 0), Ok(7)); // the empty last line
        assert_eq!(d.char_at(3, 0), Ok(7)); // one past the last line: the end
        assert!(matches!(
            d.char_at(4, 0),
            Err(PositionError::LineOutOfRange { .. })
        ));
        assert_eq!(d.position(2), (0, 3));
        assert_eq!(d.position(6), (1, 1));
        assert_eq!(d.position(99), (2, 0));
    }

    #[test]
    fn incremental_edits() {
        let mut d = Document::new("def f():\n    return\n", 1, "python");
        let at = d.char_at(1, 10).unwrap();
        d.replace(at, at, " 1").unwrap();
        assert_eq!(d.text(), "def f():\n    return 1\n");
        let (s, e) = (d.char_at(0, 4).unwrap(), d.char_at(0, 5).unwrap());
        d.replace(s, e, "g").unwrap();
        assert_eq!(d.text(), "def g():\n    return 1\n");
        assert!(d.replace(5, 4, "").is_err());
        assert_eq!(d.slice(5, 4), ""); // didChange slices before replace refuses
    }

    #[test]
    fn only_lsp_line_breaks_break_lines() {
        // A form feed (a page break in Emacs-edited C and Lisp) inside line 0: LSP's line 1 is "b".
        let d = Document::new("a\u{c}x\nb", 1, "c");
        assert_eq!(d.char_at(1, 0), Ok(4));
        assert_eq!(d.position(4), (1, 0));
    }

    mod sync {
        //! Incremental sync as `did_change` does it (`char_at` twice, `slice`, `replace`) against an
        //! independent reference on a plain `String`.

        use super::*;
        use proptest::prelude::*;

        /// Multi-byte, astral (two UTF-16 units) and ASCII chars, LSP's three line endings, and the
        /// breaks Unicode has but LSP does not (U+2028, U+0085, form feed).
        const PIECES: &[&str] = &[
            "a", "b", " ", "\t", "é", "中", "😀", "𝕏", "\n", "\n", "\r\n", "\r", "ab\r\n", "",
            "\u{2028}", "\u{85}", "\u{c}",
        ];

        fn text(max: usize) -> impl Strategy<Value = String> {
            prop::collection::vec(prop::sample::select(PIECES), 0..max).prop_map(|p| p.concat())
        }

        /// LSP's lines: (start, end before the line ending) byte offsets; "\r\n", "\n" and "\r" end one.
        fn lines(text: &str) -> Vec<(usize, usize)> {
            let b = text.as_bytes();
            let (mut out, mut start, mut i) = (Vec::new(), 0, 0);
            while i < b.len() {
                match b[i] {
                    b'\n' => {
                        out.push((start, i));
                        i += 1;
                        start = i;
                    }
                    b'\r' => {
                        out.push((start, i));
                        i += if b.get(i + 1) == Some(&b'\n') { 2 } else { 1 };
                        start = i;
                    }
                    _ => i += 1,
                }
            }
            out.push((start, b.len()));
            out
        }

        /// The byte offset of an LSP position, by the Document's contract: a column past the line's end
        /// is its end, one inside a surrogate pair is the char it belongs to; a line past the last is an
        /// error, but for column 0 of the line just after it (the end of the text).
        fn offset(text: &str, line: u32, col: u32) -> Option<usize> {
            let lines = lines(text);
            let Some(&(start, end)) = lines.get(line as usize) else {
                return (line as usize == lines.len() && col == 0).then_some(text.len());
            };
            let mut units = 0;
            for (i, c) in text[start..end].char_indices() {
                if units + c.len_utf16() > col as usize {
                    return Some(start + i);
                }
                units += c.len_utf16();
            }
            Some(end)
        }

        /// An edit's positions as raw numbers, mapped onto the current text so most are valid.
        #[derive(Debug, Clone)]
        struct Edit {
            start: (u32, u32),
            end: (u32, u32),
            /// 0: inside the text; 1: columns past the line end; 2: anywhere (lines past the end too).
            wild: u8,
            whole: bool,
            text: String,
        }

        fn edit() -> impl Strategy<Value = Edit> {
            (
                (any::<u32>(), any::<u32>()),
                (any::<u32>(), any::<u32>()),
                prop_oneof![6 => Just(0u8), 2 => Just(1u8), 1 => Just(2u8)],
                prop::bool::weighted(0.05),
                text(6),
            )
                .prop_map(|(start, end, wild, whole, text)| Edit {
                    start,
                    end,
                    wild,
                    whole,
                    text,
                })
        }

        /// Where a raw position lands in `text`.
        fn place(text: &str, (line, col): (u32, u32), wild: u8) -> (u32, u32) {
            let lines = lines(text);
            match wild {
                0 | 1 => {
                    let l = line as usize % lines.len();
                    let (s, e) = lines[l];
                    let units = text[s..e].encode_utf16().count() as u32;
                    let col = if wild == 0 {
                        col % (units + 1)
                    } else {
                        units + col % 3
                    };
                    (l as u32, col)
                }
                _ => (line % (lines.len() as u32 + 2), col % 8),
            }
        }

        /// What `did_change` does with one change: the removed text, or the error that drops the document.
        fn apply(
            doc: &mut Document,
            start: (u32, u32),
            end: (u32, u32),
            text: &str,
        ) -> Result<String, PositionError> {
            let s = doc.char_at(start.0, start.1)?;
            let e = doc.char_at(end.0, end.1)?;
            let removed = doc.slice(s, e);
            doc.replace(s, e, text)?;
            Ok(removed)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn edits_match_a_plain_string(initial in text(40), edits in prop::collection::vec(edit(), 1..30)) {
                let mut doc = Document::new(&initial, 1, "python");
                let mut reference = initial.clone();
                for e in edits {
                    if e.whole {
                        doc.replace(0, doc.len_chars(), &e.text).unwrap();
                        reference = e.text.clone();
                        continue;
                    }
                    let start = place(&reference, e.start, e.wild);
                    let end = place(&reference, e.end, e.wild);
                    let want = match (offset(&reference, start.0, start.1), offset(&reference, end.0, end.1)) {
                        (Some(s), Some(e)) if s <= e => Some((s, e)),
                        _ => None,
                    };
                    let got = apply(&mut doc, start, end, &e.text);
                    match (want, got) {
                        (Some((s, e2)), Ok(removed)) => {
                            prop_assert_eq!(removed, &reference[s..e2]);
                            reference.replace_range(s..e2, &e.text);
                        }
                        (None, Err(_)) => {}
                        (want, got) => prop_assert!(false, "{:?}..{:?} in {:?}: reference {:?}, document {:?}", start, end, reference, want, got),
                    }
                    prop_assert_eq!(doc.text(), reference.clone());
                    prop_assert_eq!(doc.len_chars(), reference.chars().count());
                }
            }

            /// Every char offset not inside a "\r\n" has a position that leads back to it.
            #[test]
            fn positions_round_trip(t in text(40)) {
                let doc = Document::new(&t, 1, "python");
                let chars: Vec<char> = t.chars().collect();
                for at in 0..=chars.len() {
                    if at > 0 && chars[at - 1] == '\r' && chars.get(at) == Some(&'\n') {
                        continue;
                    }
                    let (line, col) = doc.position(at);
                    prop_assert_eq!(doc.char_at(line, col), Ok(at), "offset {} at {:?} in {:?}", at, (line, col), &t);
                    let byte = t.char_indices().nth(at).map_or(t.len(), |(b, _)| b);
                    prop_assert_eq!(offset(&t, line, col), Some(byte));
                }
            }
        }
    }
}
