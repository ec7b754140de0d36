//! The patch ledger: accepted repairs with their deltas, written in one transaction together with the
//! marks on the cases they repaired, so the ledger and the cases never disagree.

use super::{Store, StoreError};
use rusqlite::params;
use serde::Serialize;

/// One layer of a patch: `mlp_out += delta · z[columns]`, `delta` row-major `(hidden, columns.len())`.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchLayer {
    pub layer: usize,
    pub hidden: usize,
    pub columns: Vec<u32>,
    pub delta: Vec<f32>,
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
    /// The case ids this patch repaired.
    pub cases: Vec<String>,
}

/// `"patch-7"` ↔ 7.
pub fn patch_number(id: &str) -> Option<i64> {
    id.strip_prefix("patch-")?.parse().ok()
}

fn case_number(id: &str) -> Option<i64> {
    id.strip_prefix("case-")?.parse().ok()
}

fn to_bytes<T: Copy>(values: &[T], f: impl Fn(T) -> [u8; 4]) -> Vec<u8> {
    values.iter().flat_map(|v| f(*v)).collect()
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
                    "INSERT INTO patch_layers (patch_id, layer, hidden, columns, delta)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        id,
                        l.layer as i64,
                        l.hidden as i64,
                        to_bytes(&l.columns, u32::to_le_bytes),
                        to_bytes(&l.delta, f32::to_le_bytes)
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
                    let report: String = r.get(4)?;
                    Ok(PatchRecord {
                        id: format!("patch-{}", r.get::<_, i64>(0)?),
                        model_sha: r.get(1)?,
                        created_ms: r.get(2)?,
                        active: r.get::<_, i64>(3)? != 0,
                        report: serde_json::from_str(&report).unwrap_or_default(),
                        layers: Vec::new(),
                        cases: Vec::new(),
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut layers = self.conn.prepare(
                "SELECT layer, hidden, columns, delta FROM patch_layers WHERE patch_id = ?1
                 ORDER BY layer",
            )?;
            let mut cases = self
                .conn
                .prepare("SELECT id FROM cases WHERE repaired_by = ?1 ORDER BY id")?;
            for rec in &mut records {
                let n = patch_number(&rec.id).unwrap_or_default();
                rec.layers = layers
                    .query_map([n], |r| {
                        let columns: Vec<u8> = r.get(2)?;
                        let delta: Vec<u8> = r.get(3)?;
                        Ok(PatchLayer {
                            layer: r.get::<_, i64>(0)? as usize,
                            hidden: r.get::<_, i64>(1)? as usize,
                            columns: columns
                                .chunks_exact(4)
                                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                                .collect(),
                            delta: delta
                                .chunks_exact(4)
                                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                                .collect(),
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
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
