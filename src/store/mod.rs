//! The feedback store: every completion shown, and the failure and guard cases the developer's edits
//! taught, in one SQLite file (`$STAR_LS_DATA_DIR/feedback.sqlite3`).
//!
//! Architecture invariant: the only module that touches SQLite. Every write is one transaction, so a
//! crash leaves each record whole or absent. The server never calls it on the LSP loop: it goes through
//! [`StoreHandle`], which owns the connection on its own thread.

mod adapter;
mod bundle;
mod handle;
mod lease;
mod ledger;
mod schema;

pub use adapter::{Adapter, AdapterLayer, LeftOut};
pub use bundle::{Bundle, BundleError};
pub use handle::{StoreHandle, StoreOp};
pub use lease::Lease;
pub use ledger::{patch_number, Forgotten, NarrowedGate, PatchGate, PatchLayer, PatchRecord};

use crate::capture::{CaseKind, CaseText};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

pub const FILE_NAME: &str = "feedback.sqlite3";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot write {path}: {source}")]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("no active patch {0}")]
    UnknownPatch(String),
    #[error("{path} was written by a newer star-ls (schema {found}, this one knows {known})")]
    NewerSchema {
        path: PathBuf,
        found: i64,
        known: i64,
    },
}

impl StoreError {
    /// A short name for the kind of trouble, so the editor hears about each kind once.
    pub fn kind(&self) -> &'static str {
        use rusqlite::ErrorCode::*;
        match self {
            StoreError::Sqlite {
                source: rusqlite::Error::SqliteFailure(e, _),
                ..
            } => match e.code {
                DiskFull => "disk full",
                DatabaseBusy | DatabaseLocked => "database locked",
                ReadOnly | CannotOpen | PermissionDenied => "not writable",
                DatabaseCorrupt | NotADatabase => "corrupt",
                _ => "sqlite",
            },
            StoreError::Directory { .. } => "not writable",
            _ => "sqlite",
        }
    }
}

/// A completion shown to the developer, with the context it was made from.
#[derive(Debug, Clone)]
pub struct ShownRecord {
    pub id: String,
    pub document: String,
    pub workspace: String,
    pub language: String,
    pub version: i32,
    pub line: u32,
    pub character: u32,
    pub prefix: String,
    pub suffix: String,
    pub proposed: String,
    /// Ids of the patches live when it was made (for `star.explain`).
    pub patches: Vec<String>,
    /// Their entries that opened while it was made, as the server lists them.
    pub fired: serde_json::Value,
    pub shown_ms: i64,
}

/// What `star.explain` tells of a completion.
#[derive(Debug, Clone, Serialize)]
pub struct Explained {
    /// The patches live when it was made.
    pub patches: Vec<String>,
    /// Their entries that opened while it was made; None for completions stored before it was
    /// recorded.
    pub fired: Option<serde_json::Value>,
}

/// A case to record, with where it came from.
#[derive(Debug, Clone)]
pub struct NewCase {
    pub case: CaseText,
    pub completion_id: Option<String>,
    pub language: String,
    pub document: String,
    pub workspace: String,
    pub created_ms: i64,
}

/// A stored case, as `star-ls cases export` writes it (CONTRACT.md's keys first).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredCase {
    pub id: String,
    pub language: String,
    pub prefix: String,
    pub suffix: String,
    pub target: String,
    pub group: String,
    pub kind: CaseKind,
    pub outcome: String,
    pub proposed: String,
    pub completion_id: Option<String>,
    pub document: String,
    pub workspace: String,
    pub created_ms: i64,
    /// The patch that repaired it (failure cases), if one is active.
    pub repaired_by: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    pub failures_pending: i64,
    pub guard_cases: i64,
    pub completions: i64,
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// Pages kept at most; beyond it the oldest records go first.
    max_bytes: u64,
}

impl Store {
    /// Opens (creating when missing) the store in `dir`: the directory 0700, the file 0600, WAL mode.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, StoreError> {
        create_private_dir(dir).map_err(|source| StoreError::Directory {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(FILE_NAME);
        create_private_file(&path).map_err(|source| StoreError::Directory {
            path: path.clone(),
            source,
        })?;
        let conn = Connection::open(&path).map_err(|source| StoreError::Sqlite {
            path: path.clone(),
            source,
        })?;
        let mut store = Self {
            conn,
            path,
            max_bytes,
        };
        store.setup()?;
        Ok(store)
    }

    /// Opens an existing store for reading (the CLI).
    pub fn open_read_only(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(FILE_NAME);
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(
            |source| StoreError::Sqlite {
                path: path.clone(),
                source,
            },
        )?;
        let store = Self {
            conn,
            path,
            max_bytes: u64::MAX,
        };
        schema::check_version(&store.conn, &store.path)?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn wrap(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn setup(&mut self) -> Result<(), StoreError> {
        let conn = &self.conn;
        conn.busy_timeout(std::time::Duration::from_secs(2))
            .and_then(|_| conn.pragma_update(None, "journal_mode", "WAL"))
            .and_then(|_| conn.pragma_update(None, "synchronous", "NORMAL"))
            .map_err(|e| self.wrap(e))?;
        schema::migrate(&mut self.conn, &self.path)
    }

    pub fn record_shown(&mut self, r: &ShownRecord) -> Result<(), StoreError> {
        let patches = serde_json::to_string(&r.patches).unwrap_or_else(|_| "[]".into());
        self.write(|tx| {
            tx.execute(
                "INSERT OR REPLACE INTO completions
                 (id, document, workspace, language, version, line, character, prefix, suffix, proposed,
                  patches, shown_ms, fired)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                params![
                    r.id,
                    r.document,
                    r.workspace,
                    r.language,
                    r.version,
                    r.line,
                    r.character,
                    r.prefix,
                    r.suffix,
                    r.proposed,
                    patches,
                    r.shown_ms,
                    r.fired.to_string()
                ],
            )
            .map(drop)
        })
    }

    pub fn record_outcome(
        &mut self,
        id: &str,
        outcome: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE completions SET outcome = ?2, resolved_ms = ?3 WHERE id = ?1",
                params![id, outcome, at_ms],
            )
            .map(drop)
        })
    }

    /// Records a case; `false` when the same case is already stored.
    pub fn add_case(&mut self, c: &NewCase) -> Result<bool, StoreError> {
        let digest = case_digest(c);
        let case = &c.case;
        self.write(|tx| {
            tx.execute(
                "INSERT OR IGNORE INTO cases
                 (kind, outcome, completion_id, language, document, workspace, prefix, suffix, proposed,
                  target, grp, created_ms, digest)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, '', ?11, ?12)",
                params![
                    case.kind.as_str(),
                    case.outcome.as_str(),
                    c.completion_id,
                    c.language,
                    c.document,
                    c.workspace,
                    case.prefix,
                    case.suffix,
                    case.proposed,
                    case.target,
                    c.created_ms,
                    digest
                ],
            )
            .map(|n| n == 1)
        })
    }

    /// `add_case`, and the id of the stored case (the one there already, for a case stored before).
    pub fn add_case_id(&mut self, c: &NewCase) -> Result<String, StoreError> {
        self.add_case(c)?;
        let id: i64 = self
            .conn
            .query_row(
                "SELECT id FROM cases WHERE digest = ?1",
                [case_digest(c)],
                |r| r.get(0),
            )
            .map_err(|e| self.wrap(e))?;
        Ok(format!("case-{id}"))
    }

    pub fn counts(&self) -> Result<Counts, StoreError> {
        self.conn
            .query_row(
                "SELECT
                   (SELECT count(*) FROM cases WHERE kind = 'failure' AND repaired_by IS NULL),
                   (SELECT count(*) FROM cases WHERE kind = 'guard'),
                   (SELECT count(*) FROM completions)",
                [],
                |r| {
                    Ok(Counts {
                        failures_pending: r.get(0)?,
                        guard_cases: r.get(1)?,
                        completions: r.get(2)?,
                    })
                },
            )
            .map_err(|e| self.wrap(e))
    }

    /// Stored cases, oldest first.
    pub fn cases(&self, kind: Option<CaseKind>) -> Result<Vec<StoredCase>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, language, prefix, suffix, target, grp, kind, outcome, proposed,
                        completion_id, document, workspace, created_ms, repaired_by
                 FROM cases WHERE ?1 IS NULL OR kind = ?1 ORDER BY id",
            )
            .map_err(|e| self.wrap(e))?;
        let rows = stmt
            .query_map([kind.map(CaseKind::as_str)], |r| {
                Ok(StoredCase {
                    id: format!("case-{}", r.get::<_, i64>(0)?),
                    language: r.get(1)?,
                    prefix: r.get(2)?,
                    suffix: r.get(3)?,
                    target: r.get(4)?,
                    group: r.get(5)?,
                    kind: r.get::<_, String>(6)?.parse().unwrap_or(CaseKind::Failure),
                    outcome: r.get(7)?,
                    proposed: r.get(8)?,
                    completion_id: r.get(9)?,
                    document: r.get(10)?,
                    workspace: r.get(11)?,
                    created_ms: r.get(12)?,
                    repaired_by: r.get(13)?,
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.wrap(e));
        rows
    }

    /// The patches live when a completion was made and their entries that opened; `None` for an
    /// unknown completion.
    pub fn explain(&self, id: &str) -> Result<Option<Explained>, StoreError> {
        let row: Option<(String, Option<String>)> = self
            .conn
            .query_row(
                "SELECT patches, fired FROM completions WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.wrap(e))?;
        Ok(row.map(|(patches, fired)| Explained {
            patches: serde_json::from_str(&patches).unwrap_or_default(),
            fired: fired.and_then(|f| serde_json::from_str(&f).ok()),
        }))
    }

    /// Bytes in use (free pages not counted).
    pub fn used_bytes(&self) -> Result<u64, StoreError> {
        self.conn
            .query_row(
                "SELECT (page_count - freelist_count) * page_size
                 FROM pragma_page_count, pragma_freelist_count, pragma_page_size",
                [],
                |r| r.get::<_, i64>(0).map(|n| n.max(0) as u64),
            )
            .map_err(|e| self.wrap(e))
    }

    /// Deletes the oldest records until the store fits its cap: shown completions first (they only
    /// serve `star.explain`), then cases. Returns how many rows went.
    pub fn prune(&mut self) -> Result<u64, StoreError> {
        let mut deleted = 0;
        while self.used_bytes()? > self.max_bytes {
            let n = self.write(|tx| {
                let n = tx.execute(
                    "DELETE FROM completions WHERE id IN
                     (SELECT id FROM completions ORDER BY shown_ms, rowid LIMIT 32)",
                    [],
                )?;
                if n > 0 {
                    return Ok(n);
                }
                tx.execute(
                    "DELETE FROM cases WHERE id IN (SELECT id FROM cases ORDER BY id LIMIT 64)",
                    [],
                )
            })?;
            if n == 0 {
                break;
            }
            deleted += n as u64;
        }
        if deleted > 0 {
            self.conn
                .execute_batch("PRAGMA incremental_vacuum")
                .map_err(|e| self.wrap(e))?;
        }
        Ok(deleted)
    }

    pub(crate) fn write<T>(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let path = self.path.clone();
        let wrap = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        // Immediate: a write that reads first must not find, at its first write, that another
        // server on this data directory has written meanwhile (a busy error no timeout waits out).
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(wrap)?;
        let out = f(&tx).map_err(wrap)?;
        tx.commit().map_err(wrap)?;
        Ok(out)
    }
}

/// Identical cases are stored once: the digest covers everything that makes a case what it is.
fn case_digest(c: &NewCase) -> Vec<u8> {
    let mut h = Sha256::new();
    for part in [
        c.case.kind.as_str(),
        &c.language,
        &c.case.prefix,
        &c.case.suffix,
        &c.case.target,
        &c.case.proposed,
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().to_vec()
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

/// Creates the database file 0600 before SQLite does (its WAL and shm files copy these permissions).
fn create_private_file(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path).map(drop)
}
