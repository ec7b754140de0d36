//! The tokenizer embedded in the GGUF (`tokenizer.ggml.*`), built by candle, plus what completion needs
//! on top: the raw bytes of every token (for token healing and streaming text out), the FIM ids, and
//! stop ids. User text is always encoded as text: a `<|fim_prefix|>` typed in a file is not a marker.

use super::gguf::GgufFile;
use super::ModelError;
use candle_core::quantized::tokenizer::TokenizerFromGguf;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bytes: Vec<Vec<u8>>,
    pub fim: FimTokens,
    /// Tokens that end a completion: EOS, end of text, FIM end/pad, file separator.
    stop: Vec<u32>,
    /// The tokens made of spaces and tabs alone, with their width in columns (a tab is 4): the
    /// only ones the line's shape limits once no healed bytes remain, looked at each decode step.
    blank_runs: Vec<(u32, usize)>,
}

#[derive(Debug, Clone, Copy)]
pub struct FimTokens {
    pub prefix: u32,
    pub suffix: u32,
    pub middle: u32,
    /// The repo-level format's markers, where the vocabulary has them (`<|repo_name|>`,
    /// `<|file_sep|>`).
    pub repo_name: Option<u32>,
    pub file_sep: Option<u32>,
}

impl Tokenizer {
    pub fn from_gguf(f: &GgufFile) -> Result<Self, ModelError> {
        let corrupt = |reason: String| ModelError::Corrupt {
            path: f.path.clone(),
            reason,
        };
        let mut inner = tokenizers::Tokenizer::from_gguf(&f.content)
            .map_err(|e| corrupt(format!("tokenizer: {}", super::one_line(&e))))?;
        inner.set_encode_special_tokens(true);
        // llama.cpp does not normalize: keep the text's code points as they are.
        inner
            .with_normalizer(None::<tokenizers::NormalizerWrapper>)
            .map_err(|e| corrupt(format!("tokenizer: {e}")))?;
        let vocab = inner.get_vocab_size(true);
        let byte_of = byte_decoder();
        let bytes: Vec<Vec<u8>> = (0..vocab as u32)
            .map(|id| {
                let tok = inner.id_to_token(id).unwrap_or_default();
                // Special tokens are plain strings; ordinary ones use GPT-2's byte-to-char map.
                tok.chars()
                    .map(|c| byte_of.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_else(|| tok.into_bytes())
            })
            .collect();
        let id = |name: &str| {
            inner.token_to_id(name).ok_or_else(|| {
                corrupt(format!(
                    "the vocabulary has no `{name}` token: not a FIM code model"
                ))
            })
        };
        let fim = FimTokens {
            prefix: id("<|fim_prefix|>")?,
            suffix: id("<|fim_suffix|>")?,
            middle: id("<|fim_middle|>")?,
            repo_name: inner.token_to_id("<|repo_name|>"),
            file_sep: inner.token_to_id("<|file_sep|>"),
        };
        let mut stop: Vec<u32> = [
            "<|endoftext|>",
            "<|im_end|>",
            "<|fim_pad|>",
            "<|file_sep|>",
            "<|repo_name|>",
        ]
        .iter()
        .filter_map(|t| inner.token_to_id(t))
        .collect();
        if let Ok(eos) = f.u32("tokenizer.ggml.eos_token_id") {
            stop.push(eos);
        }
        let blank_runs = bytes
            .iter()
            .enumerate()
            .filter_map(|(id, b)| Some((id as u32, blank_width(b)?)))
            .collect();
        Ok(Self {
            inner,
            bytes,
            fim,
            stop,
            blank_runs,
        })
    }

    pub fn encode(&self, text: &str) -> Vec<u32> {
        if text.is_empty() {
            return Vec::new();
        }
        // Encoding plain text with a BPE model cannot fail; an error here is a broken tokenizer.
        self.inner
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default()
    }

    /// The raw bytes of one token (UTF-8 may be split across tokens).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.bytes
            .get(id as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The tokens made of spaces and tabs alone, and their widths in columns.
    pub fn blank_runs(&self) -> &[(u32, usize)] {
        &self.blank_runs
    }

    pub fn is_stop(&self, id: u32) -> bool {
        self.stop.contains(&id)
    }

    pub fn vocab_size(&self) -> usize {
        self.bytes.len()
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| self.token_bytes(i).iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// GPT-2's byte-level alphabet, inverted: the char each byte is written as in the vocabulary.
fn byte_decoder() -> std::collections::HashMap<char, u8> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    printable
        .into_iter()
        .zip(chars)
        .map(|(b, c)| (char::from_u32(c).expect("valid code point"), b as u8))
        .collect()
}

/// The width in columns of `bytes` made of spaces and tabs alone (a tab is 4); None for any other
/// text, and for no text.
pub(super) fn blank_width(bytes: &[u8]) -> Option<usize> {
    if bytes.is_empty() {
        return None;
    }
    bytes.iter().try_fold(0, |cols, c| match c {
        b' ' => Some(cols + 1),
        b'\t' => Some(cols + 4),
        _ => None,
    })
}
