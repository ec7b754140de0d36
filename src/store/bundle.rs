//! A patch bundle: ledger entries as a self-describing, versioned JSON document a teammate's star-ls
//! imports (`star-ls patches export --format bundle`, `star-ls patches import`). It holds the model's
//! sha256, and per entry its layers (columns, deltas, gate keys and thresholds) and its repair's report;
//! the text of the cases it repaired only when asked (`--with-cases`). A sha256 over its contents makes
//! a damaged file refused rather than half applied.
//! Floats are JSON numbers: serde_json writes an f32 in its shortest exact form, so they read back
//! bit for bit.

use super::{NewCase, PatchLayer, PatchRecord, Store, StoreError, StoredCase};
use crate::capture::{CaseKind, CaseText, Outcome};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `format` a bundle names, and the one `version` this star-ls reads and writes.
pub const FORMAT: &str = "star-ls patch bundle";
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Entry {
    /// Its id in the ledger it came from.
    pub id: String,
    pub created_ms: i64,
    pub report: serde_json::Value,
    pub layers: Vec<PatchLayer>,
    /// The failures it repaired, with `--with-cases`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cases: Vec<BundleCase>,
}

/// A repaired failure as a bundle carries it: what the developer wrote instead of the proposal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BundleCase {
    pub language: String,
    pub document: String,
    pub outcome: Outcome,
    pub prefix: String,
    pub suffix: String,
    pub proposed: String,
    pub target: String,
    pub created_ms: i64,
}

impl BundleCase {
    /// `None` for a stored outcome this star-ls does not know.
    fn of(c: &StoredCase) -> Option<Self> {
        Some(Self {
            language: c.language.clone(),
            document: c.document.clone(),
            outcome: c.outcome.parse().ok()?,
            prefix: c.prefix.clone(),
            suffix: c.suffix.clone(),
            proposed: c.proposed.clone(),
            target: c.target.clone(),
            created_ms: c.created_ms,
        })
    }

    fn stored(&self) -> NewCase {
        NewCase {
            case: CaseText {
                kind: CaseKind::Failure,
                outcome: self.outcome,
                prefix: self.prefix.clone(),
                target: self.target.clone(),
                suffix: self.suffix.clone(),
                proposed: self.proposed.clone(),
            },
            completion_id: None,
            language: self.language.clone(),
            document: self.document.clone(),
            workspace: String::new(),
            created_ms: self.created_ms,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Bundle {
    pub format: String,
    pub version: u32,
    pub model_sha: String,
    pub entries: Vec<Entry>,
    /// Of the JSON of `(format, version, model_sha, entries)`.
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("not a star-ls patch bundle: {0}")]
    Malformed(String),
    #[error("a bundle of version {0}; this star-ls reads version {VERSION}")]
    Version(u32),
    #[error("the bundle is damaged: its contents do not match its sha256")]
    Damaged,
    #[error("entry {entry}, layer {layer}: {why}")]
    Shape {
        entry: String,
        layer: usize,
        why: String,
    },
    #[error("the bundle is for model {bundle}…, not this one ({model}…)")]
    OtherModel { bundle: String, model: String },
}

fn digest(format: &str, version: u32, model_sha: &str, entries: &[Entry]) -> String {
    let json = serde_json::to_vec(&(format, version, model_sha, entries))
        .expect("a bundle's contents are JSON");
    Sha256::digest(json)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Bundle {
    /// The active ledger `records` of model `model_sha`, each with the text of the cases it repaired
    /// found among `cases` (none: no case text).
    pub fn of(model_sha: &str, records: &[PatchRecord], cases: &[StoredCase]) -> Self {
        let entries: Vec<Entry> = records
            .iter()
            .map(|r| Entry {
                id: r.id.clone(),
                created_ms: r.created_ms,
                report: r.report.clone(),
                layers: r.layers.clone(),
                cases: cases
                    .iter()
                    .filter(|c| r.cases.contains(&c.id))
                    .filter_map(BundleCase::of)
                    .collect(),
            })
            .collect();
        Self {
            sha256: digest(FORMAT, VERSION, model_sha, &entries),
            format: FORMAT.into(),
            version: VERSION,
            model_sha: model_sha.into(),
            entries,
        }
    }

    /// Reads a bundle, checking its format, version, sha256 and every layer's shape.
    pub fn read(json: &[u8]) -> Result<Self, BundleError> {
        let b: Bundle =
            serde_json::from_slice(json).map_err(|e| BundleError::Malformed(e.to_string()))?;
        if b.format != FORMAT {
            return Err(BundleError::Malformed(format!("format {:?}", b.format)));
        }
        if b.version != VERSION {
            return Err(BundleError::Version(b.version));
        }
        if digest(&b.format, b.version, &b.model_sha, &b.entries) != b.sha256 {
            return Err(BundleError::Damaged);
        }
        for e in &b.entries {
            for l in &e.layers {
                if let Some(why) = l.gate.as_ref().and_then(|g| g.misfit(l.columns.len())) {
                    return Err(BundleError::Shape {
                        entry: e.id.clone(),
                        layer: l.layer,
                        why,
                    });
                }
                let width = match &l.gate {
                    Some(g) if l.columns.is_empty() => g.keys.len() / g.width(0).max(1),
                    _ => l.columns.len(),
                };
                if l.delta.len() != l.hidden * width {
                    return Err(BundleError::Shape {
                        entry: e.id.clone(),
                        layer: l.layer,
                        why: format!("{} deltas for {} rows of {width}", l.delta.len(), l.hidden),
                    });
                }
            }
        }
        Ok(b)
    }

    /// Refused unless it is for the model whose sha256 is `model_sha`.
    pub fn check_model(&self, model_sha: &str) -> Result<(), BundleError> {
        if self.model_sha == model_sha {
            return Ok(());
        }
        Err(BundleError::OtherModel {
            bundle: self.model_sha.chars().take(12).collect(),
            model: model_sha.chars().take(12).collect(),
        })
    }
}

impl Store {
    /// Adds the bundle's entries to the ledger as new patches (rolled back like any other), their
    /// reports marked `imported` with where they came from, and the cases an entry carries as
    /// failures it repaired (pending again if it is rolled back); their ids here.
    pub fn import(&mut self, bundle: &Bundle, from: &str) -> Result<Vec<String>, StoreError> {
        let mut ids = Vec::new();
        for e in &bundle.entries {
            let mut report = e.report.clone();
            if let Some(map) = report.as_object_mut() {
                map.insert(
                    "imported".into(),
                    serde_json::json!({ "from": from, "id": e.id }),
                );
            }
            let mut cases = Vec::with_capacity(e.cases.len());
            for c in &e.cases {
                cases.push(self.add_case_id(&c.stored())?);
            }
            ids.push(self.add_patch(
                &bundle.model_sha,
                e.created_ms,
                &report,
                &e.layers,
                &cases,
            )?);
        }
        Ok(ids)
    }
}
