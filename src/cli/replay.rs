//! `star-ls replay`: a developer writing a codebase, beside the unpatched model (`star_ls::eval::replay`):
//! a line per target on stderr, the summary on stdout, the JSON and the chart on request.

use anyhow::Context;
use star_ls::eval::replay::{self, ReplayOptions};
use star_ls::learn::{self, Policy};
use star_ls::model::{LoadOptions, Model};
use star_ls::repair::Head;
use std::path::Path;

pub struct Options<'a> {
    pub replay: ReplayOptions,
    pub json: Option<&'a Path>,
    pub plot: Option<&'a Path>,
    /// Where the replay's store goes; default a fresh temporary directory.
    pub store: Option<&'a Path>,
    pub policy: Policy,
}

pub fn run(o: Options) -> anyhow::Result<()> {
    let targets = replay::targets(&o.replay)?;
    if targets.is_empty() {
        anyhow::bail!(
            "no target lines in files matching {:?} under {}",
            o.replay.glob,
            o.replay.dir.display()
        );
    }
    let path = star_ls::env::model_path();
    let model = Model::load(&path, LoadOptions::default())?;
    let sha = learn::file_sha256(&path).with_context(|| format!("hashing {}", path.display()))?;
    let (gamma, weight) = model.weights.head_dense()?;
    let head = Head::new(&gamma, weight)?;
    let scratch = tempfile::Builder::new()
        .prefix("star-ls-replay")
        .tempdir()?;
    let dir = o.store.unwrap_or(scratch.path());
    let mut store = replay::fresh_store(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let total = targets.len();
    let mut written = 0;
    let mut report = replay::run(
        &model,
        &sha,
        &head,
        &mut store,
        &targets,
        &o.policy,
        |row| {
            written += 1;
            let mark = |s: &str| if s.trim_end() == row.target { "=" } else { "x" };
            eprintln!(
                "{written}/{total} {} [{}{} {} patches] {:?}",
                row.id,
                mark(&row.baseline),
                mark(&row.repaired),
                row.patches_live,
                row.target
            );
        },
    )?;
    report.model = name;
    print!("{}", report.summary());
    if let Some(out) = o.json {
        std::fs::write(out, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    if let Some(dir) = o.plot {
        let chart = star_ls::eval::plot_replay(&report, dir)
            .map_err(|e| anyhow::anyhow!("plotting into {}: {e}", dir.display()))?;
        eprintln!("wrote {}", chart.display());
    }
    Ok(())
}
