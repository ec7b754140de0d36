//! `star-ls patches list|rollback|export|import`: the patch ledger from the command line. A running
//! server takes up a rollback or an import made here within a second (it watches the store).

use anyhow::Context;
use star_ls::learn::RepairReport;
use star_ls::store::{Adapter, Bundle, PatchRecord, Store, FILE_NAME};
use std::io::Write;
use std::path::Path;

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

/// What `star-ls patches export` writes.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A star-ls patch bundle (JSON): every entry's layers and report, and the repaired cases' text
    /// with `--with-cases`.
    Bundle,
    /// One LoRA adapter for llama.cpp (`llama-server --lora FILE`): the column patches, stacked.
    GgufLora,
    /// One LoRA adapter for PEFT and vLLM (a directory): the column patches, stacked.
    Peft,
}

/// The sha256 of the model `STAR_LS_MODEL` (or the default one) names: patches are for it only.
fn model_sha() -> anyhow::Result<String> {
    let path = star_ls::env::model_path();
    star_ls::learn::file_sha256(&path)
        .with_context(|| format!("reading the model {}", path.display()))
}

/// The loaded model's active patches, as the server applies them: `complete --cases --patches`.
pub fn live(config: &star_ls::model::Config) -> anyhow::Result<star_ls::model::PatchSet> {
    match open()? {
        Some(store) => Ok(star_ls::learn::serving(&store, &model_sha()?, config)?.0),
        None => Ok(Default::default()),
    }
}

/// What `export` was asked for beside the format and the file.
pub struct ExportOptions<'a> {
    pub ids: Option<&'a [String]>,
    pub with_cases: bool,
    pub ungated: bool,
    pub json: bool,
}

/// Writes the loaded model's active patches (only `ids`, when given) to `out`.
pub fn export(format: Format, out: &Path, o: ExportOptions) -> anyhow::Result<()> {
    if o.with_cases && format != Format::Bundle {
        anyhow::bail!("--with-cases goes with --format bundle: an adapter holds no cases");
    }
    if o.ungated && format == Format::Bundle {
        anyhow::bail!("--ungated goes with an adapter format: a bundle keeps every gate");
    }
    let sha = model_sha()?;
    let Some(store) = open()? else {
        anyhow::bail!("no patches to export");
    };
    let mut records = store.patches(Some(&sha), true)?;
    if let Some(ids) = o.ids {
        if let Some(unknown) = ids.iter().find(|id| !records.iter().any(|r| &r.id == *id)) {
            anyhow::bail!("no active patch {unknown} for this model");
        }
        records.retain(|r| ids.contains(&r.id));
    }
    if let Some(r) = records.iter().find(|r| r.damaged.is_some()) {
        anyhow::bail!(
            "{} cannot be read from the ledger: roll it back or leave it out with --ids",
            r.id
        );
    }
    if format != Format::Bundle {
        return export_adapter(format, out, &records, o);
    }
    let cases = match o.with_cases {
        true => store.cases(Some(star_ls::capture::CaseKind::Failure))?,
        false => Vec::new(),
    };
    let bundle = Bundle::of(&sha, &records, &cases);
    std::fs::write(out, serde_json::to_vec(&bundle)?)
        .with_context(|| format!("writing {}", out.display()))?;
    let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
    let n_cases: usize = bundle.entries.iter().map(|e| e.cases.len()).sum();
    if o.json {
        println!(
            "{}",
            serde_json::json!({ "exported": ids, "cases": n_cases, "file": out })
        );
    } else {
        println!(
            "exported {} patches ({}) and {n_cases} cases to {}",
            ids.len(),
            ids.join(", "),
            out.display()
        );
    }
    Ok(())
}

/// `records` stacked into one LoRA adapter at `out`; the entries no LoRA expresses are named.
fn export_adapter(
    format: Format,
    out: &Path,
    records: &[PatchRecord],
    o: ExportOptions,
) -> anyhow::Result<()> {
    let entries = records.iter().map(|r| (r.id.as_str(), r.layers.as_slice()));
    let adapter = Adapter::stack(entries, o.ungated);
    let left: Vec<String> = adapter
        .left_out
        .iter()
        .map(|(id, why)| format!("{id} {}", why.reason()))
        .collect();
    if adapter.layers.is_empty() {
        anyhow::bail!(
            "no patch to write as an adapter{}",
            match left.is_empty() {
                true => String::new(),
                false => format!(": {}", left.join("; ")),
            }
        );
    }
    let base = super::adapter::Base::read(&star_ls::env::model_path())?;
    let rank = match format {
        Format::GgufLora => super::adapter::write_gguf(&adapter, &base, out)?,
        _ => super::adapter::write_peft(&adapter, &base, out)?,
    };
    let layers: Vec<usize> = adapter.layers.iter().map(|l| l.layer).collect();
    if o.json {
        let left_out: Vec<_> = adapter
            .left_out
            .iter()
            .map(|(id, why)| serde_json::json!({ "id": id, "why": why.reason() }))
            .collect();
        println!(
            "{}",
            serde_json::json!({ "exported": adapter.ids, "rank": rank, "layers": layers,
                                "leftOut": left_out, "file": out })
        );
    } else {
        println!(
            "exported {} patches ({}) as one rank-{rank} LoRA on layers {layers:?} to {}",
            adapter.ids.len(),
            adapter.ids.join(", "),
            out.display()
        );
        for l in left {
            println!("left out: {l}");
        }
    }
    Ok(())
}

/// Adds the patches of bundle `file` to the ledger, after checking it is whole and for this model.
pub fn import(file: &Path, json: bool) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let bundle = Bundle::read(&bytes).with_context(|| file.display().to_string())?;
    bundle.check_model(&model_sha()?)?;
    let dir = star_ls::env::data_dir();
    let mut store = Store::open(&dir, u64::MAX)?;
    let ids = store.import(&bundle, &file.display().to_string())?;
    if json {
        println!("{}", serde_json::json!({ "imported": ids }));
    } else {
        println!("imported {} patches as {}", ids.len(), ids.join(", "));
    }
    Ok(())
}
