//! `star-ls eval`: runs the protocol (`star_ls::eval`) with a progress bar on stderr, prints the table,
//! writes the JSON and the charts.

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use star_ls::eval::{self, EvalOptions, Progress};
use star_ls::model::{LoadOptions, Model};
use star_ls::repair::Head;
use std::path::Path;

pub struct Options<'a> {
    pub cases: &'a Path,
    pub unrelated: Option<&'a Path>,
    pub json: Option<&'a Path>,
    pub limit: Option<usize>,
    pub plot: Option<&'a Path>,
    pub eval: EvalOptions,
}

pub fn run(o: Options) -> anyhow::Result<()> {
    let mut cases = super::repair::read_cases(o.cases)?;
    cases.truncate(o.limit.unwrap_or(cases.len()));
    let unrelated = match o.unrelated {
        Some(p) => super::repair::read_cases(p)?,
        None => Vec::new(),
    };
    let path = star_ls::env::model_path();
    let model = Model::load(&path, LoadOptions::default())?;
    let head = Head::of(&model.weights, None)?;

    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>22} [{bar:30}] {pos}/{len} {elapsed_precise} (eta {eta}) {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    let mut on_progress = |p: Progress| match p {
        Progress::Stage { name, total } => {
            // The bar draws only on a terminal; the log says where the run is anywhere.
            tracing::info!("{name}: {total} steps");
            bar.set_prefix(name.to_owned());
            bar.set_length(total as u64);
            bar.reset();
        }
        Progress::Step { message } => {
            bar.set_message(message);
            bar.inc(1);
        }
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let report = eval::run(
        &model,
        &head,
        &name,
        &cases,
        &unrelated,
        &o.eval,
        &mut on_progress,
    )?;
    bar.finish_and_clear();

    print!("{}", report.table());
    if let Some(out) = o.json {
        std::fs::write(out, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    if let Some(dir) = o.plot {
        let written = super::plot::plot(&report, dir)
            .map_err(|e| anyhow::anyhow!("plotting into {}: {e}", dir.display()))?;
        for p in written {
            eprintln!("wrote {}", p.display());
        }
    }
    Ok(())
}
