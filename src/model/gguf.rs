//! Opening a GGUF file: checks that turn a bad file into a one-line error before any tensor is read.

use super::ModelError;
use candle_core::quantized::gguf_file;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// An opened, validated GGUF: its metadata and tensor index, and a reader positioned anywhere.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: gguf_file::Content,
    pub reader: BufReader<File>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let corrupt = |reason: String| ModelError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        let file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ModelError::Missing {
                path: path.to_owned(),
            },
            _ => corrupt(e.to_string()),
        })?;
        let len = file.metadata().map_err(|e| corrupt(e.to_string()))?.len();
        let mut reader = BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader)
            .map_err(|e| corrupt(format!("not a GGUF file ({})", super::one_line(&e))))?;
        // A truncated download passes the header check; catch it here instead of mid-load.
        // In name order: the same damaged file names the same tensor every time.
        let mut infos: Vec<_> = content.tensor_infos.iter().collect();
        infos.sort_unstable_by_key(|(name, _)| name.as_str());
        for (name, info) in infos {
            // Checked: a crafted header's sizes may overflow.
            let end = info
                .shape
                .dims()
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
                .and_then(|n| {
                    let bytes = n / info.ggml_dtype.block_size() as u64;
                    bytes.checked_mul(info.ggml_dtype.type_size() as u64)
                })
                .and_then(|bytes| {
                    content
                        .tensor_data_offset
                        .checked_add(info.offset)?
                        .checked_add(bytes)
                })
                .unwrap_or(u64::MAX);
            if end > len {
                return Err(corrupt(format!(
                    "truncated: tensor `{name}` ends at byte {end} but the file has {len}"
                )));
            }
        }
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "qwen2" {
            return Err(ModelError::UnsupportedArchitecture {
                path: path.to_owned(),
                arch,
            });
        }
        Ok(Self {
            path: path.to_owned(),
            content,
            reader,
        })
    }

    pub fn u32(&self, key: &str) -> Result<u32, ModelError> {
        self.value(key)?.to_u32().map_err(|e| self.bad(key, e))
    }

    pub fn f32(&self, key: &str) -> Result<f32, ModelError> {
        self.value(key)?.to_f32().map_err(|e| self.bad(key, e))
    }

    pub fn string(&self, key: &str) -> Result<String, ModelError> {
        Ok(self
            .value(key)?
            .to_string()
            .map_err(|e| self.bad(key, e))?
            .clone())
    }

    fn value(&self, key: &str) -> Result<&gguf_file::Value, ModelError> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| ModelError::Corrupt {
                path: self.path.clone(),
                reason: format!("missing metadata `{key}`"),
            })
    }

    fn bad(&self, key: &str, e: candle_core::Error) -> ModelError {
        ModelError::Corrupt {
            path: self.path.clone(),
            reason: format!("metadata `{key}`: {}", super::one_line(&e)),
        }
    }

    pub fn tensor(&mut self, name: &str) -> Result<candle_core::quantized::QTensor, ModelError> {
        self.content
            .tensor(&mut self.reader, name, &candle_core::Device::Cpu)
            .map_err(|e| ModelError::Corrupt {
                path: self.path.clone(),
                reason: format!("tensor `{name}`: {}", super::one_line(&e)),
            })
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }
}
