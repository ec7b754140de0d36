//! The schema, as an ordered list of migrations; `PRAGMA user_version` counts those applied.

use super::StoreError;
use rusqlite::Connection;
use std::path::Path;

/// Append only: a released migration never changes.
const MIGRATIONS: &[&str] = &[
    // 1: shown completions and the cases they taught.
    "CREATE TABLE completions (
        id TEXT PRIMARY KEY,
        document TEXT NOT NULL,
        workspace TEXT NOT NULL,
        language TEXT NOT NULL,
        version INTEGER NOT NULL,
        line INTEGER NOT NULL,
        character INTEGER NOT NULL,
        prefix TEXT NOT NULL,
        suffix TEXT NOT NULL,
        proposed TEXT NOT NULL,
        patches TEXT NOT NULL,
        shown_ms INTEGER NOT NULL,
        outcome TEXT,
        resolved_ms INTEGER
     );
     CREATE INDEX completions_shown ON completions (shown_ms);
     CREATE TABLE cases (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL CHECK (kind IN ('failure', 'guard')),
        outcome TEXT NOT NULL,
        completion_id TEXT,
        language TEXT NOT NULL,
        document TEXT NOT NULL,
        workspace TEXT NOT NULL,
        prefix TEXT NOT NULL,
        suffix TEXT NOT NULL,
        proposed TEXT NOT NULL,
        target TEXT NOT NULL,
        grp TEXT NOT NULL DEFAULT '',
        created_ms INTEGER NOT NULL,
        digest BLOB NOT NULL UNIQUE,
        repaired_by TEXT
     );
     CREATE INDEX cases_pending ON cases (kind, repaired_by);",
    // 2: the patch ledger: each accepted repair, its per-layer deltas, and the cases it repaired.
    "CREATE TABLE patches (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        model_sha TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        active INTEGER NOT NULL DEFAULT 1,
        report TEXT NOT NULL
     );
     CREATE TABLE patch_layers (
        patch_id INTEGER NOT NULL REFERENCES patches (id),
        layer INTEGER NOT NULL,
        hidden INTEGER NOT NULL,
        columns BLOB NOT NULL,
        delta BLOB NOT NULL,
        PRIMARY KEY (patch_id, layer)
     );",
    // 3: gated patch layers: the unit keys the gate compares activations with, and its threshold
    // (both NULL for an ungated layer).
    "ALTER TABLE patch_layers ADD COLUMN gate_keys BLOB;
     ALTER TABLE patch_layers ADD COLUMN gate_threshold REAL;",
    // 4: gates keyed on the whole layer: the centre their keys and queries are taken from (NULL for a
    // gate keyed on the patch's columns, as every gate before it).
    "ALTER TABLE patch_layers ADD COLUMN gate_center BLOB;",
    // 5: the ledger's entries that opened while a completion was made (JSON, for `star.explain`;
    // NULL before it was recorded).
    "ALTER TABLE completions ADD COLUMN fired TEXT;",
    // 6: leases between the servers of one data directory (`lease.rs`).
    "CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_ms INTEGER NOT NULL,
        unfixed INTEGER NOT NULL DEFAULT 0
     );",
    // 7: a threshold per key (f32 each; NULL: every key at `gate_threshold`, as before it).
    "ALTER TABLE patch_layers ADD COLUMN gate_thresholds BLOB;",
];

fn version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

pub fn check_version(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let found = version(conn).map_err(|source| StoreError::Sqlite {
        path: path.to_owned(),
        source,
    })?;
    let known = MIGRATIONS.len() as i64;
    if found > known {
        return Err(StoreError::NewerSchema {
            path: path.to_owned(),
            found,
            known,
        });
    }
    Ok(())
}

/// Brings the schema up to date, each migration in its own transaction with its version bump.
pub fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    check_version(conn, path)?;
    let wrap = |source| StoreError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let from = version(conn).map_err(wrap)?;
    if from == 0 {
        // Must precede the first table; lets pruning give pages back to the file system.
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
            .map_err(wrap)?;
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(from as usize) {
        let tx = conn.transaction().map_err(wrap)?;
        tx.execute_batch(sql).map_err(wrap)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)
            .map_err(wrap)?;
        tx.commit().map_err(wrap)?;
    }
    Ok(())
}
