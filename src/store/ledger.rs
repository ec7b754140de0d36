//! The patch ledger: accepted repairs with their deltas, written in one transaction together with the
//! marks on the cases they repaired, so the ledger and the cases never disagree.

use super::{Store, StoreError};
use rusqlite::params;
use serde::{Deserialize, Serialize};

/// One layer of a patch: `mlp_out += delta · z[columns]`, `delta` row-major `(hidden, columns.len())`;
/// with no columns, one value per gate key, `delta` `(hidden, keys)` (`model::LayerPatch`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchLayer {
    pub layer: usize,
    pub hidden: usize,
    pub columns: Vec<u32>,
    pub delta: Vec<f32>,
    pub gate: Option<PatchGate>,
}

impl PatchLayer {
    /// What it holds in memory and in the ledger (columns, delta, keys), the measure of
    /// `patchMemoryMb` (`Store::evict_over` sums the same in SQL).
    pub fn bytes(&self) -> usize {
        let gate = self.gate.as_ref().map_or(0, |g| {
            g.keys.len() + g.center.as_ref().map_or(0, Vec::len) + g.thresholds.len()
        });
        4 * (self.columns.len() + self.delta.len() + gate)
    }
}

/// A gated layer's gate: it opens at rows whose activations have cosine at least a key's threshold
/// with that row of `keys` (unit rows, row-major): the whole layer's activations less `center` when
/// it has one, else those on `columns` (the gates written before 2026-12-06).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchGate {
    pub keys: Vec<f32>,
    pub center: Option<Vec<f32>>,
    /// Every key's threshold, or the highest of them where `thresholds` has them.
    pub threshold: f32,
    /// Per key; empty in gates written before 2026-12-07 (every key at `threshold`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub thresholds: Vec<f32>,
}

impl PatchGate {
    /// How many values each key has.
    pub fn width(&self, columns: usize) -> usize {
        self.center.as_ref().map_or(columns, Vec::len)
    }

    /// Each key's threshold.
    pub fn per_key(&self, columns: usize) -> Vec<f32> {
        match self.thresholds.is_empty() {
            true => vec![self.threshold; self.keys.len() / self.width(columns).max(1)],
            false => self.thresholds.clone(),
        }
    }

    /// Why these keys, centre and thresholds make no gate over `columns` patched neurons.
    pub fn misfit(&self, columns: usize) -> Option<String> {
        let width = self.width(columns);
        let keys = self.keys.len() / width.max(1);
        if width == 0 || self.keys.is_empty() || !self.keys.len().is_multiple_of(width) {
            return Some(format!(
                "a gate of {} key values {width} wide",
                self.keys.len()
            ));
        }
        let finite = self.threshold.is_finite() && self.thresholds.iter().all(|t| t.is_finite());
        if !finite || !(self.thresholds.is_empty() || self.thresholds.len() == keys) {
            return Some(format!(
                "a gate of {keys} keys with thresholds {} and {:?}",
                self.threshold, self.thresholds
            ));
        }
        None
    }
}

/// New thresholds for a stored gate: every key's, in the order of its keys.
#[derive(Debug, Clone, PartialEq)]
pub struct NarrowedGate {
    pub patch: String,
    pub layer: usize,
    pub thresholds: Vec<f32>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PatchRecord {
    pub id: String,
    pub model_sha: String,
    pub created_ms: i64,
    pub active: bool,
    /// The repair's report (failures, fixed, guard figures, seconds, ...), as the server made it.
    pub report: serde_json::Value,
    #[serde(skip)]
    pub layers: Vec<PatchLayer>,
    /// Whether its layers are gated (act only near the activations they were solved at).
    pub gated: bool,
    /// The case ids this patch repaired.
    pub cases: Vec<String>,
    /// Why this patch cannot be applied (its layers unreadable in the ledger, or not fitting the
    /// model): it is listed, and can be rolled back, but the others apply without it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub damaged: Option<String>,
}

/// `"patch-7"` ↔ 7.
pub fn patch_number(id: &str) -> Option<i64> {
    id.strip_prefix("patch-")?.parse().ok()
}

fn case_number(id: &str) -> Option<i64> {
    id.strip_prefix("case-")?.parse().ok()
}

/// One `patch_layers` row, checked for the shapes its blobs must have.
fn layer_from_row(r: &rusqlite::Row) -> Result<PatchLayer, String> {
    let text = |e: rusqlite::Error| e.to_string();
    let layer: i64 = r.get(0).map_err(text)?;
    let hidden: i64 = r.get(1).map_err(text)?;
    let floats = |i: usize| -> Result<Option<Vec<u8>>, String> {
        let b: Option<Vec<u8>> = r.get(i).map_err(text)?;
        match b {
            Some(b) if b.len() % 4 != 0 => Err(format!("column {i} holds {} bytes", b.len())),
            b => Ok(b),
        }
    };
    let (columns, delta, keys, center) = (floats(2)?, floats(3)?, floats(4)?, floats(6)?);
    let per_key = floats(7)?;
    let threshold: Option<f64> = r.get(5).map_err(text)?;
    let (Some(columns), Some(delta)) = (columns, delta) else {
        return Err("no columns or delta".into());
    };
    let columns = from_bytes(&columns, u32::from_le_bytes);
    let delta = from_bytes(&delta, f32::from_le_bytes);
    let (Ok(layer), Ok(hidden)) = (usize::try_from(layer), usize::try_from(hidden)) else {
        return Err(format!("layer {layer}, hidden {hidden}"));
    };
    let gate = match (keys, threshold) {
        (None, None) => None,
        (Some(k), Some(t)) => {
            let gate = PatchGate {
                keys: from_bytes(&k, f32::from_le_bytes),
                center: center.map(|c| from_bytes(&c, f32::from_le_bytes)),
                threshold: t as f32,
                thresholds: per_key.map_or_else(Vec::new, |b| from_bytes(&b, f32::from_le_bytes)),
            };
            if let Some(why) = gate.misfit(columns.len()) {
                return Err(format!("layer {layer}: {why}"));
            }
            Some(gate)
        }
        // Half a gate: serving the patch ungated would move every row.
        _ => return Err(format!("layer {layer}: half a gate")),
    };
    // No columns: one value per key of a gate keyed on the layer.
    let inputs = match &gate {
        Some(g) if columns.is_empty() && g.center.is_some() => g.keys.len() / g.width(0),
        _ => columns.len(),
    };
    if inputs == 0 || delta.len() != hidden * inputs {
        return Err(format!(
            "layer {layer}: a delta of {} values for {hidden} × {inputs} inputs",
            delta.len(),
        ));
    }
    Ok(PatchLayer {
        layer,
        hidden,
        columns,
        delta,
        gate,
    })
}

fn to_bytes<T: Copy>(values: &[T], f: impl Fn(T) -> [u8; 4]) -> Vec<u8> {
    values.iter().flat_map(|v| f(*v)).collect()
}

fn from_bytes<T>(bytes: &[u8], f: impl Fn([u8; 4]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(4)
        .map(|b| f([b[0], b[1], b[2], b[3]]))
        .collect()
}

impl Store {
    /// Records an accepted patch and marks `cases` as repaired by it; returns its id.
    pub fn add_patch(
        &mut self,
        model_sha: &str,
        created_ms: i64,
        report: &serde_json::Value,
        layers: &[PatchLayer],
        cases: &[String],
    ) -> Result<String, StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO patches (model_sha, created_ms, report) VALUES (?1, ?2, ?3)",
                params![model_sha, created_ms, report.to_string()],
            )?;
            let id = tx.last_insert_rowid();
            for l in layers {
                tx.execute(
                    "INSERT INTO patch_layers
                       (patch_id, layer, hidden, columns, delta, gate_keys, gate_threshold,
                        gate_center, gate_thresholds)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    params![
                        id,
                        l.layer as i64,
                        l.hidden as i64,
                        to_bytes(&l.columns, u32::to_le_bytes),
                        to_bytes(&l.delta, f32::to_le_bytes),
                        l.gate.as_ref().map(|g| to_bytes(&g.keys, f32::to_le_bytes)),
                        l.gate.as_ref().map(|g| g.threshold as f64),
                        l.gate
                            .as_ref()
                            .and_then(|g| g.center.as_ref())
                            .map(|c| to_bytes(c, f32::to_le_bytes)),
                        l.gate
                            .as_ref()
                            .filter(|g| !g.thresholds.is_empty())
                            .map(|g| to_bytes(&g.thresholds, f32::to_le_bytes)),
                    ],
                )?;
            }
            for c in cases.iter().filter_map(|c| case_number(c)) {
                tx.execute(
                    "UPDATE cases SET repaired_by = ?1 WHERE id = ?2",
                    params![format!("patch-{id}"), c],
                )?;
            }
            Ok(format!("patch-{id}"))
        })
    }

    /// Raises the thresholds of active patches' gates (`NarrowedGate`), each in its patch's layer;
    /// returns the ids of the patches narrowed.
    pub fn narrow_gates(&mut self, gates: &[NarrowedGate]) -> Result<Vec<String>, StoreError> {
        let mut ids: Vec<String> = self.write(|tx| {
            let mut ids = Vec::new();
            for g in gates {
                let Some(n) = patch_number(&g.patch) else {
                    continue;
                };
                let highest = g.thresholds.iter().copied().fold(f32::MIN, f32::max);
                let changed = tx.execute(
                    "UPDATE patch_layers SET gate_thresholds = ?1, gate_threshold = ?2
                     WHERE patch_id = ?3 AND layer = ?4 AND gate_keys IS NOT NULL
                       AND patch_id IN (SELECT id FROM patches WHERE active = 1)",
                    params![
                        to_bytes(&g.thresholds, f32::to_le_bytes),
                        highest as f64,
                        n,
                        g.layer as i64
                    ],
                )?;
                if changed > 0 {
                    ids.push(g.patch.clone());
                }
            }
            Ok(ids)
        })?;
        ids.sort_by_key(|id| patch_number(id));
        ids.dedup();
        Ok(ids)
    }

    /// Patches oldest first: for one model, or all; active ones only, or all.
    pub fn patches(
        &self,
        model_sha: Option<&str>,
        active_only: bool,
    ) -> Result<Vec<PatchRecord>, StoreError> {
        let read = || -> rusqlite::Result<Vec<PatchRecord>> {
            let mut stmt = self.conn.prepare(
                "SELECT id, model_sha, created_ms, active, report FROM patches
                 WHERE (?1 IS NULL OR model_sha = ?1) AND (?2 = 0 OR active = 1) ORDER BY id",
            )?;
            let mut records = stmt
                .query_map(params![model_sha, active_only as i64], |r| {
                    let report: Option<String> = r.get(4).ok().flatten();
                    Ok(PatchRecord {
                        id: format!("patch-{}", r.get::<_, i64>(0)?),
                        model_sha: r.get(1)?,
                        created_ms: r.get(2)?,
                        active: r.get::<_, i64>(3)? != 0,
                        report: report
                            .and_then(|r| serde_json::from_str(&r).ok())
                            .unwrap_or_default(),
                        layers: Vec::new(),
                        gated: false,
                        cases: Vec::new(),
                        damaged: None,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut layers = self.conn.prepare(
                "SELECT layer, hidden, columns, delta, gate_keys, gate_threshold, gate_center,
                        gate_thresholds
                 FROM patch_layers
                 WHERE patch_id = ?1 ORDER BY layer",
            )?;
            let mut cases = self
                .conn
                .prepare("SELECT id FROM cases WHERE repaired_by = ?1 ORDER BY id")?;
            for rec in &mut records {
                let n = patch_number(&rec.id).unwrap_or_default();
                let read: Vec<Result<PatchLayer, String>> = layers
                    .query_map([n], |r| Ok(layer_from_row(r)))?
                    .collect::<rusqlite::Result<_>>()?;
                // A patch applies whole or not at all.
                match read.into_iter().collect::<Result<Vec<_>, _>>() {
                    Ok(l) => rec.layers = l,
                    Err(why) => rec.damaged = Some(format!("unreadable in the ledger: {why}")),
                }
                rec.gated = rec.layers.iter().any(|l| l.gate.is_some());
                rec.cases = cases
                    .query_map([&rec.id], |r| Ok(format!("case-{}", r.get::<_, i64>(0)?)))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
            }
            Ok(records)
        };
        read().map_err(|e| self.wrap(e))
    }

    /// Rolls back one active patch (`Some(id)`) or all of them: they stop applying, and the cases
    /// they repaired are pending again. Returns the ids rolled back.
    pub fn rollback(&mut self, id: Option<&str>) -> Result<Vec<String>, StoreError> {
        let number = match id {
            Some(id) => Some(patch_number(id).ok_or_else(|| StoreError::UnknownPatch(id.into()))?),
            None => None,
        };
        let ids = self.write(|tx| {
            let ids: Vec<i64> = {
                let mut stmt = tx.prepare(
                    "SELECT id FROM patches WHERE active = 1 AND (?1 IS NULL OR id = ?1)",
                )?;
                let ids = stmt
                    .query_map([number], |r| r.get(0))?
                    .collect::<rusqlite::Result<Vec<i64>>>()?;
                ids
            };
            for n in &ids {
                tx.execute("UPDATE patches SET active = 0 WHERE id = ?1", [n])?;
                tx.execute(
                    "UPDATE cases SET repaired_by = NULL WHERE repaired_by = ?1",
                    [format!("patch-{n}")],
                )?;
            }
            Ok(ids)
        })?;
        if let (Some(id), true) = (id, ids.is_empty()) {
            return Err(StoreError::UnknownPatch(id.into()));
        }
        Ok(ids.into_iter().map(|n| format!("patch-{n}")).collect())
    }

    /// Keeps model `sha`'s active patches within `budget` bytes of deltas, columns and keys: the oldest
    /// stop applying until the rest fit, the newest always kept. Unlike a rollback, the cases they
    /// repaired stay marked (they were learned; a repair of them again would evict again). Returns the
    /// ids evicted, oldest first.
    pub fn evict_over(&mut self, sha: &str, budget: u64) -> Result<Vec<String>, StoreError> {
        let ids = self.write(|tx| {
            let sizes: Vec<(i64, i64)> = {
                let mut stmt = tx.prepare(
                    "SELECT p.id, SUM(length(l.columns) + length(l.delta)
                                     + coalesce(length(l.gate_keys), 0)
                                     + coalesce(length(l.gate_center), 0))
                     FROM patches p JOIN patch_layers l ON l.patch_id = p.id
                     WHERE p.active = 1 AND p.model_sha = ?1 GROUP BY p.id ORDER BY p.id",
                )?;
                let sizes = stmt
                    .query_map([sha], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                sizes
            };
            let mut total: i64 = sizes.iter().map(|(_, b)| b).sum();
            let mut evicted = Vec::new();
            for (id, bytes) in sizes.iter().take(sizes.len().saturating_sub(1)) {
                if total <= budget as i64 {
                    break;
                }
                tx.execute("UPDATE patches SET active = 0 WHERE id = ?1", [id])?;
                total -= bytes;
                evicted.push(*id);
            }
            Ok(evicted)
        })?;
        Ok(ids.into_iter().map(|n| format!("patch-{n}")).collect())
    }

    /// Wipes one workspace's data (`Some(root URI)`) or everyone's: its shown completions, its cases,
    /// and every patch that learned from any of its cases (other workspaces' cases those patches
    /// repaired become pending again). Deleted content is overwritten and the WAL truncated, so the
    /// developer's text does not linger in free pages.
    pub fn forget(&mut self, workspace: Option<&str>) -> Result<Forgotten, StoreError> {
        self.conn
            .pragma_update(None, "secure_delete", "ON")
            .map_err(|e| self.wrap(e))?;
        let forgotten = self.write(|tx| {
            let patches: Vec<i64> = {
                let mut stmt = tx.prepare(
                    "SELECT id FROM patches WHERE ?1 IS NULL OR EXISTS (
                       SELECT 1 FROM cases
                       WHERE cases.repaired_by = 'patch-' || patches.id AND cases.workspace = ?1)",
                )?;
                let ids = stmt
                    .query_map([workspace], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                ids
            };
            for n in &patches {
                tx.execute("DELETE FROM patch_layers WHERE patch_id = ?1", [n])?;
                tx.execute("DELETE FROM patches WHERE id = ?1", [n])?;
                tx.execute(
                    "UPDATE cases SET repaired_by = NULL WHERE repaired_by = ?1",
                    [format!("patch-{n}")],
                )?;
            }
            let cases = tx.execute(
                "DELETE FROM cases WHERE ?1 IS NULL OR workspace = ?1",
                [workspace],
            )?;
            let completions = tx.execute(
                "DELETE FROM completions WHERE ?1 IS NULL OR workspace = ?1",
                [workspace],
            )?;
            Ok(Forgotten {
                cases: cases as u64,
                completions: completions as u64,
                patches: patches.into_iter().map(|n| format!("patch-{n}")).collect(),
            })
        })?;
        self.conn
            .execute_batch("PRAGMA incremental_vacuum")
            .and_then(|_| {
                self.conn
                    .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            })
            .map_err(|e| self.wrap(e))?;
        Ok(forgotten)
    }

    /// The workspaces with stored data, and how many cases each has.
    pub fn workspaces(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let read = || -> rusqlite::Result<Vec<(String, u64)>> {
            let mut stmt = self.conn.prepare(
                "SELECT workspace, sum(n) FROM (
                   SELECT workspace, 1 AS n FROM cases
                   UNION ALL SELECT workspace, 0 FROM completions)
                 GROUP BY workspace ORDER BY workspace",
            )?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
                .collect();
            rows
        };
        read().map_err(|e| self.wrap(e))
    }
}

/// What `Store::forget` deleted.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Forgotten {
    pub cases: u64,
    pub completions: u64,
    pub patches: Vec<String>,
}
