//! `star-ls cases export` (the stored cases as cases-JSONL, CONTRACT.md, on stdout) and `star-ls forget`.

use anyhow::Context;
use star_ls::capture::CaseKind;
use star_ls::store::{Store, FILE_NAME};
use std::io::Write;

pub fn export(kind: Option<CaseKind>) -> anyhow::Result<()> {
    let dir = star_ls::env::data_dir();
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

/// `star-ls forget`: wipes one workspace's cases and the patches that learned from them, or
/// everything (`workspace` None). The workspace is its root URI as the editor sent it, or a directory.
pub fn forget(workspace: Option<&str>, json: bool) -> anyhow::Result<()> {
    let dir = star_ls::env::data_dir();
    if !dir.join(FILE_NAME).exists() {
        eprintln!(
            "star-ls: nothing to forget ({} does not exist)",
            dir.join(FILE_NAME).display()
        );
        return Ok(());
    }
    let mut store = Store::open(&dir, u64::MAX)?;
    let workspace = match workspace {
        None => None,
        Some(w) => {
            let known = store.workspaces()?;
            let wanted = [w.trim_end_matches('/').to_owned(), file_uri(w)];
            let Some((uri, _)) = known
                .iter()
                .find(|(k, _)| wanted.contains(&k.trim_end_matches('/').to_owned()))
            else {
                let list: Vec<String> = known
                    .iter()
                    .map(|(k, n)| format!("{k:?} ({n} cases)"))
                    .collect();
                anyhow::bail!(
                    "no data for workspace {w}; stored workspaces: {}",
                    if list.is_empty() {
                        "none".into()
                    } else {
                        list.join(", ")
                    }
                );
            };
            Some(uri.clone())
        }
    };
    let gone = store.forget(workspace.as_deref())?;
    if json {
        println!("{}", serde_json::to_string(&gone)?);
    } else {
        println!(
            "forgot {} cases, {} shown completions and {} patches{}",
            gone.cases,
            gone.completions,
            gone.patches.len(),
            if gone.patches.is_empty() {
                String::new()
            } else {
                format!(" ({})", gone.patches.join(", "))
            }
        );
    }
    Ok(())
}

/// A directory as the `file://` URI editors send for it (unreserved bytes and `/` kept, others
/// percent-encoded); a string that already is a URI is returned as it is.
fn file_uri(path: &str) -> String {
    if path.contains("://") {
        return path.trim_end_matches('/').to_owned();
    }
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.into());
    let mut uri = String::from("file://");
    for b in abs.to_string_lossy().trim_end_matches('/').bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                uri.push(b as char)
            }
            _ => uri.push_str(&format!("%{b:02X}")),
        }
    }
    uri
}
