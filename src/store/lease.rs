//! Leases: one server at a time does a thing that several servers on one data directory could each
//! start (a repair), and what the last holder left for the next (the failures its repair did not fix).
//! A holder that dies leaves a lease that expires.

use super::{Store, StoreError};
use rusqlite::{params, OptionalExtension};

/// A lease as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub holder: String,
    /// Held until then (ms since the epoch); 0 once released.
    pub expires_ms: i64,
    /// The failures the last holder's repair left unfixed.
    pub unfixed: i64,
}

impl Store {
    /// Lease `name` as it stands, if it was ever taken.
    pub fn lease(&self, name: &str) -> Result<Option<Lease>, StoreError> {
        self.conn
            .query_row(
                "SELECT holder, expires_ms, unfixed FROM leases WHERE name = ?1",
                [name],
                |r| {
                    Ok(Lease {
                        holder: r.get(0)?,
                        expires_ms: r.get(1)?,
                        unfixed: r.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.wrap(e))
    }

    /// Takes lease `name` for `holder` until `now_ms + ttl_ms`, unless another holds it unexpired;
    /// whether it is `holder`'s now.
    pub fn take_lease(
        &mut self,
        name: &str,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<bool, StoreError> {
        self.write(|tx| {
            let held: Option<(String, i64)> = tx
                .query_row(
                    "SELECT holder, expires_ms FROM leases WHERE name = ?1",
                    [name],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if held.is_some_and(|(h, until)| h != holder && until > now_ms) {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO leases (name, holder, expires_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET holder = ?2, expires_ms = ?3",
                params![name, holder, now_ms.saturating_add(ttl_ms)],
            )?;
            Ok(true)
        })
    }

    /// Gives lease `name` back, if `holder` has it, leaving `unfixed` for the next holder.
    pub fn release_lease(
        &mut self,
        name: &str,
        holder: &str,
        unfixed: i64,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE leases SET expires_ms = 0, unfixed = ?3 WHERE name = ?1 AND holder = ?2",
                params![name, holder, unfixed],
            )
            .map(drop)
            .map_err(|e| self.wrap(e))
    }

    /// SQLite's `data_version`: it changes when another connection (another server on this data
    /// directory) has committed since this one last looked.
    pub fn data_version(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(|e| self.wrap(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_one_holders_until_released_or_expired() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Store::open(dir.path(), u64::MAX).unwrap();
        let mut b = Store::open(dir.path(), u64::MAX).unwrap();
        let seen = b.data_version().unwrap();
        assert!(a.take_lease("repair", "a", 1000, 500).unwrap());
        assert_ne!(b.data_version().unwrap(), seen, "b sees a's commit");
        assert!(!b.take_lease("repair", "b", 1200, 500).unwrap());
        assert!(a.take_lease("repair", "a", 1200, 500).unwrap(), "renewed");
        a.release_lease("repair", "a", 3).unwrap();
        assert_eq!(b.lease("repair").unwrap().unwrap().unfixed, 3);
        assert!(b.take_lease("repair", "b", 1300, 500).unwrap());
        // b dies holding it: a takes it once it has expired.
        assert!(!a.take_lease("repair", "a", 1700, 500).unwrap());
        assert!(a.take_lease("repair", "a", 1801, 500).unwrap());
    }
}
