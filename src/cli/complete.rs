//! `star-ls complete FILE --line L --character C`: one completion without an editor;
//! `star-ls complete --cases FILE [--peer]`: every case's line, beside llama.cpp's.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use star_ls::completion::crossfile::{self, Chunk, CrossFile, Layout};
use star_ls::completion::{prompt_with, CompletionRequest, Document, Engine, EngineConfig};
use star_ls::model::generate::StopReason;
use star_ls::model::{generate, Cancel, GenerateParams, Model, StopAt};
use star_ls::repair::{passes, text_after_cursor, Case};
use std::path::Path;

pub fn run(file: &Path, line: u32, character: u32, stop: StopAt, json: bool) -> Result<()> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("could not read {}", file.display()))?;
    let doc = Document::new(&text, 0, "");
    let at = doc
        .char_at(line, character)
        .with_context(|| format!("position {line}:{character} in {}", file.display()))?;
    let (prefix, suffix) = doc.split_at(at);
    let engine = Engine::start(EngineConfig::new(star_ls::env::model_path()), |e| {
        tracing::debug!(?e, "model")
    });
    let completion = engine.complete_blocking(CompletionRequest {
        document: file.display().to_string(),
        prefix,
        suffix,
        stop,
        cancel: Cancel::default(),
        cross: Default::default(),
    })?;
    if json {
        println!("{}", serde_json::to_string(&completion)?);
    } else {
        println!("{}", completion.generation.text);
    }
    Ok(())
}

/// What `complete --cases` compares per case: our line, and llama.cpp's on the same prompt.
#[derive(Debug, Serialize)]
struct Row {
    id: String,
    target: String,
    ours: Line,
    peer: Option<Line>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Line {
    pub(super) text: String,
    stop: StopReason,
}

impl Line {
    fn blank(&self) -> bool {
        self.text.trim().is_empty()
    }

    /// Spent the whole token budget and ended in whitespace: a runaway, not a line.
    fn runaway(&self) -> bool {
        self.stop == StopReason::MaxTokens && self.text.trim_end() != self.text
    }
}

/// The figures over every row, ours and the peer's.
#[derive(Debug, Default, Serialize)]
struct Summary {
    cases: usize,
    exact: usize,
    blank: usize,
    runaway: usize,
    peer_exact: Option<usize>,
    peer_blank: Option<usize>,
    peer_runaway: Option<usize>,
    /// Where the peer proposes a line: how often, and how often ours is blank there.
    peer_has_line: Option<usize>,
    blank_where_peer_has_line: Option<usize>,
}

pub struct CasesOptions<'a> {
    pub cases: &'a Path,
    pub limit: Option<usize>,
    pub peer: bool,
    pub json: Option<&'a Path>,
    /// Where the cases' repositories are, for their other files.
    pub repo_root: Option<&'a Path>,
    pub cross_file_tokens: usize,
    pub layout: Layout,
    pub threads: usize,
    /// Ours under the ledger's live patches (as the server completes), not the unpatched model.
    pub patches: bool,
    /// The peer with this LoRA adapter (`patches export --format gguf-lora`).
    pub peer_lora: Option<&'a Path>,
}

/// Completes every case of a cases file with the line the server proposes at its cursor (the
/// engine's context limits, token budget and line rules; the unpatched model) and, with `peer`,
/// llama.cpp's on the same GGUF and prompt, unhealed (llama.cpp does not heal: its budget does not
/// spend the healing tokens ours does), then counts exact, blank and runaway lines for both. With a
/// repository root, ours sees the case's repository's other files (the peer does not).
pub fn run_cases(o: CasesOptions) -> Result<()> {
    let mut cases = super::repair::read_cases(o.cases)?;
    cases.truncate(o.limit.unwrap_or(cases.len()));
    let others = match o.repo_root {
        Some(root) => Some(Repositories::read(o.cases, root, cases.len())?),
        None => None,
    };
    let config = EngineConfig::new(star_ls::env::model_path());
    let model = Model::load(&config.model_path, config.load)?;
    let (weights, tok) = (&model.weights, &model.tokenizer);
    let patches = match o.patches {
        true => Some(super::patches::live(weights.config())?),
        false => None,
    };
    let params = GenerateParams {
        max_tokens: config.max_tokens,
        ..GenerateParams::default()
    };
    let mut rows = Vec::with_capacity(cases.len());
    let mut peer_prompts = Vec::with_capacity(cases.len());
    for (i, c) in cases.iter().enumerate() {
        let after = text_after_cursor(c);
        let cross = match &others {
            Some(repos) => repos.cross_file(i, c, &after, o.cross_file_tokens, o.layout),
            None => CrossFile::default(),
        };
        let prompt = prompt_with(tok, &cross, &c.prefix, &after, config.limits);
        let g = generate(
            weights,
            tok,
            &prompt,
            &mut weights.new_cache(),
            patches.as_ref(),
            &params,
            &Cancel::default(),
        )?;
        tracing::debug!(id = c.id, text = g.text, stop = ?g.stop, "ours");
        peer_prompts.push(peer_prompt(tok, c, config.limits)?);
        rows.push(Row {
            id: c.id.clone(),
            target: c.target.clone(),
            ours: Line {
                text: g.text,
                stop: g.stop,
            },
            peer: None,
        });
    }
    if o.peer {
        let lines = peer_lines(
            &config.model_path,
            o.threads,
            &peer_prompts,
            params.max_tokens,
            o.peer_lora,
        )?;
        for (row, line) in rows.iter_mut().zip(lines) {
            row.peer = Some(line);
        }
    }
    let summary = summarize(&cases, &rows);
    println!("{}", serde_json::to_string(&summary)?);
    if let Some(out) = o.json {
        let doc = serde_json::json!({"summary": summary, "rows": rows});
        std::fs::write(out, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

/// The cases' repositories, cut into chunks: what each case may see of its other files.
struct Repositories {
    /// Per case: its repository's name and its file's path in it.
    files: Vec<(String, String)>,
    /// Per repository: the chunks of all its files.
    chunks: std::collections::HashMap<String, Vec<Chunk>>,
}

impl Repositories {
    /// Reads the `file` field (`<repo>/<path>`) of the first `n` cases of `cases`, and the files of
    /// each repository named, under `root`.
    fn read(cases: &Path, root: &Path, n: usize) -> Result<Self> {
        #[derive(Deserialize)]
        struct Named {
            file: Option<String>,
        }
        let text = std::fs::read_to_string(cases)
            .with_context(|| format!("reading {}", cases.display()))?;
        let mut files = Vec::with_capacity(n);
        for (i, line) in text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .take(n)
            .enumerate()
        {
            let named: Named = serde_json::from_str(line)?;
            let file = named.file.with_context(|| {
                format!(
                    "{}:{}: no `file` to find its repository by",
                    cases.display(),
                    i + 1
                )
            })?;
            let (repo, path) = file.split_once('/').with_context(|| {
                format!("{}:{}: `file` is not <repo>/<path>", cases.display(), i + 1)
            })?;
            files.push((repo.to_owned(), path.to_owned()));
        }
        let mut chunks = std::collections::HashMap::new();
        for (repo, _) in &files {
            if chunks.contains_key(repo) {
                continue;
            }
            let dir = root.join(repo);
            let mut all = Vec::new();
            for entry in walkdir::WalkDir::new(&dir).sort_by_file_name() {
                let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "py") {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    let rel = path
                        .strip_prefix(&dir)
                        .unwrap_or(path)
                        .display()
                        .to_string();
                    all.extend(crossfile::chunks(&rel, &text));
                }
            }
            if all.is_empty() {
                bail!("no .py files in {}", dir.display());
            }
            chunks.insert(repo.clone(), all);
        }
        Ok(Self { files, chunks })
    }

    /// What case `i` sees: its repository's other files, ranked around its cursor.
    fn cross_file(
        &self,
        i: usize,
        case: &Case,
        after: &str,
        budget: usize,
        layout: Layout,
    ) -> CrossFile {
        let (repo, path) = &self.files[i];
        let others = self.chunks[repo].iter().filter(|c| &c.path != path);
        CrossFile {
            repo: repo.clone(),
            path: path.clone(),
            chunks: crossfile::rank(others, &case.prefix, after),
            budget,
            layout,
        }
    }
}

fn summarize(cases: &[Case], rows: &[Row]) -> Summary {
    let count =
        |f: &dyn Fn(&Case, &Row) -> bool| cases.iter().zip(rows).filter(|(c, r)| f(c, r)).count();
    let with_peer = rows.iter().all(|r| r.peer.is_some());
    let peer = |f: &dyn Fn(&Case, &Line, &Line) -> bool| {
        with_peer.then(|| count(&|c, r| r.peer.as_ref().is_some_and(|p| f(c, &r.ours, p))))
    };
    Summary {
        cases: rows.len(),
        exact: count(&|c, r| passes(&r.ours.text, c)),
        blank: count(&|_, r| r.ours.blank()),
        runaway: count(&|_, r| r.ours.runaway()),
        peer_exact: peer(&|c, _, p| passes(&p.text, c)),
        peer_blank: peer(&|_, _, p| p.blank()),
        peer_runaway: peer(&|_, _, p| p.runaway()),
        peer_has_line: peer(&|_, _, p| !p.blank()),
        blank_where_peer_has_line: peer(&|_, ours, p| !p.blank() && ours.blank()),
    }
}

/// `case`'s prompt for llama.cpp, `{id, tokens}`: the server's FIM prompt without its cross-file
/// context, unhealed (the healed bytes put back as text before the suffix marker).
pub(super) fn peer_prompt(
    tok: &star_ls::model::Tokenizer,
    case: &Case,
    limits: star_ls::completion::ContextLimits,
) -> Result<serde_json::Value> {
    let bare = prompt_with(
        tok,
        &CrossFile::default(),
        &case.prefix,
        &text_after_cursor(case),
        limits,
    );
    let mut unhealed = bare.tokens.clone();
    let at = unhealed
        .iter()
        .position(|t| *t == tok.fim.suffix)
        .context("a FIM prompt without its suffix marker")?;
    let heal = tok.encode(&String::from_utf8_lossy(&bare.heal));
    unhealed.splice(at..at, heal);
    Ok(serde_json::json!({"id": case.id, "tokens": unhealed}))
}

/// llama.cpp's line for each prompt (scripts/peer-complete.mjs), in order.
pub(super) fn peer_lines(
    model: &Path,
    threads: usize,
    prompts: &[serde_json::Value],
    max_tokens: usize,
    lora: Option<&Path>,
) -> Result<Vec<Line>> {
    let mut args = vec!["--max-tokens".into(), max_tokens.to_string()];
    args.extend(super::peer::lora_args(lora));
    let out = super::peer::Peer::install()?.run(
        "peer-complete.mjs",
        model,
        threads,
        ("prompts", &prompts),
        &args,
    )?;
    let lines: Vec<Line> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<serde_json::Result<_>>()
        .context("parsing peer-complete's lines")?;
    if lines.len() != prompts.len() {
        bail!(
            "peer-complete answered {} of {} prompts",
            lines.len(),
            prompts.len()
        );
    }
    Ok(lines)
}
