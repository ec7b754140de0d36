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

    pub fn set_text(&mut self, text: &str) {
        self.text = Rope::from_str(text);
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

    /// The text of chars `start..end` (clamped to the document).
    pub fn slice(&self, start: usize, end: usize) -> String {
        let len = self.text.len_chars();
        self.text.slice(start.min(len)..end.min(len)).to_string()
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
    }
}
