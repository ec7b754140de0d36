//! `star-ls replay`: a developer writing a codebase, beside the unpatched model (`star_ls::eval::replay`):
//! a line per target on stderr, the summary on stdout, the JSON and the chart on request.

use anyhow::Context;
use rand::{rngs::StdRng, seq::index::sample, SeedableRng};
use star_ls::eval::replay::{self, code_lines, cut, Target};
use star_ls::learn::{self, Policy};
use star_ls::model::{LoadOptions, Model};
use star_ls::repair::Head;
use std::path::Path;
use std::path::PathBuf;

pub struct Options<'a> {
    pub replay: ReplayOptions,
    pub json: Option<&'a Path>,
    pub plot: Option<&'a Path>,
    /// Where the replay's store goes; default a fresh temporary directory.
    pub store: Option<&'a Path>,
    pub policy: Policy,
}

pub fn run(o: Options) -> anyhow::Result<()> {
    let targets = targets(&o.replay)?;
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
    let head = Head::of(&model.weights, None)?;
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
        let chart = super::plot::plot_replay(&report, dir)
            .map_err(|e| anyhow::anyhow!("plotting into {}: {e}", dir.display()))?;
        eprintln!("wrote {}", chart.display());
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub dir: PathBuf,
    /// Which files under `dir` are written (a glob over their paths relative to `dir`).
    pub glob: String,
    /// At most this many files, a seeded sample when there are more.
    pub max_files: usize,
    /// At most this many target lines per file, a seeded sample, in file order.
    pub lines_per_file: usize,
    pub seed: u64,
}

/// The replayed files' target lines, in the order the developer writes them.
pub fn targets(o: &ReplayOptions) -> anyhow::Result<Vec<Target>> {
    let glob = globset::Glob::new(&o.glob)
        .with_context(|| format!("--glob {:?}", o.glob))?
        .compile_matcher();
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(&o.dir).sort_by_file_name() {
        let entry = entry.with_context(|| format!("reading {}", o.dir.display()))?;
        let rel = entry.path().strip_prefix(&o.dir).unwrap_or(entry.path());
        if entry.file_type().is_file() && glob.is_match(rel) {
            files.push(rel.to_path_buf());
        }
    }
    let mut rng = StdRng::seed_from_u64(o.seed);
    if files.len() > o.max_files {
        let mut keep = sample(&mut rng, files.len(), o.max_files).into_vec();
        keep.sort_unstable();
        files = keep.into_iter().map(|i| files[i].clone()).collect();
    }
    let mut out = Vec::new();
    for rel in files {
        let path = o.dir.join(&rel);
        let Ok(text) = std::fs::read_to_string(&path) else {
            tracing::warn!("{} is not UTF-8 text: skipped", path.display());
            continue;
        };
        let lines = code_lines(&text);
        let mut picked = if lines.len() > o.lines_per_file {
            sample(&mut rng, lines.len(), o.lines_per_file).into_vec()
        } else {
            (0..lines.len()).collect()
        };
        picked.sort_unstable();
        let file = rel.to_string_lossy().into_owned();
        out.extend(picked.into_iter().map(|i| {
            let line = lines[i];
            Target {
                case: cut(&text, line, &format!("{file}:{}", line + 1)),
                file: file.clone(),
                line,
            }
        }));
    }
    Ok(out)
}
