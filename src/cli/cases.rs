//! `star-ls cases export`: the stored cases as cases-JSONL (CONTRACT.md) on stdout.

use crate::capture::CaseKind;
use crate::store::{Store, FILE_NAME};
use anyhow::Context;
use std::io::Write;

pub fn export(kind: Option<CaseKind>) -> anyhow::Result<()> {
    let dir = crate::env::data_dir();
    if !dir.join(FILE_NAME).exists() {
        eprintln!(
            "star-ls: no feedback recorded yet ({} does not exist)",
            dir.join(FILE_NAME).display()
        );
        return Ok(());
    }
    let store = Store::open_read_only(&dir)?;
    let cases = store.cases(kind)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for case in &cases {
        serde_json::to_writer(&mut out, case)?;
        out.write_all(b"\n")?;
    }
    out.flush().context("writing to stdout")?;
    Ok(())
}
