//! `star-ls patches list|rollback`: the patch ledger from the command line. A running server picks up a
//! rollback made here at its next start; `star.rollback` does it live.

use star_ls::learn::RepairReport;
use star_ls::store::{PatchRecord, Store, FILE_NAME};
use std::io::Write;

fn open() -> anyhow::Result<Option<Store>> {
    let dir = star_ls::env::data_dir();
    if !dir.join(FILE_NAME).exists() {
        eprintln!(
            "star-ls: no feedback recorded yet ({} does not exist)",
            dir.join(FILE_NAME).display()
        );
        return Ok(None);
    }
    Ok(Some(Store::open(&dir, u64::MAX)?))
}

fn print(records: &[PatchRecord], json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, records)?;
        writeln!(out)?;
        return Ok(());
    }
    for r in records {
        // Ledgers of every version kept these names; a field an old report lacks reads as 0.
        let report: RepairReport = serde_json::from_value(r.report.clone()).unwrap_or_default();
        let layers: Vec<String> = r
            .layers
            .iter()
            .map(|l| format!("{}:{}", l.layer, l.columns.len()))
            .collect();
        writeln!(
            out,
            "{:<10} {:<8} model {}  layers:neurons {}{}  fixed {}/{}  guard {} -> {}  cases {}{}",
            r.id,
            if r.active { "active" } else { "rolled back" },
            &r.model_sha[..r.model_sha.len().min(12)],
            layers.join(","),
            if r.gated { " gated" } else { "" },
            report.fixed,
            report.failures,
            report.guard_before,
            report.guard_after,
            r.cases.join(","),
            r.damaged
                .as_ref()
                .map(|why| format!("  NOT APPLIED: {why}"))
                .unwrap_or_default()
        )?;
    }
    Ok(())
}

/// Every patch, rolled back ones included, oldest first.
pub fn list(json: bool) -> anyhow::Result<()> {
    let Some(store) = open()? else {
        return print(&[], json);
    };
    print(&store.patches(None, false)?, json)
}

/// Rolls back one patch (`Some(id)`) or all.
pub fn rollback(id: Option<&str>, json: bool) -> anyhow::Result<()> {
    let Some(mut store) = open()? else {
        anyhow::bail!("no patches to roll back");
    };
    let rolled = store.rollback(id)?;
    if json {
        println!("{}", serde_json::json!({ "rolledBack": rolled }));
    } else if rolled.is_empty() {
        println!("no active patches");
    } else {
        println!("rolled back {}", rolled.join(", "));
    }
    Ok(())
}
