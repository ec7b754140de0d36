//! The command line: clap's definition of every subcommand, each turned into one call on the
//! library, or on this module's files for the commands that are front ends only.

mod adapter;
mod bench;
mod cases;
mod complete;
mod eval;
mod patches;
mod peer;
mod plot;
mod repair;
mod replay;

use clap::{Args, Parser, Subcommand};
use star_ls::capture::CaseKind;
use star_ls::model::StopAt;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    version,
    about = "Code completion from a local LM that learns from your corrections"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

impl Cli {
    pub fn run(self) -> anyhow::Result<()> {
        match self.command.unwrap_or(Command::Serve) {
            Command::Serve => star_ls::lsp::serve(),
            Command::Complete(a) => a.run(),
            Command::Bench(a) => a.run(),
            Command::Repair(a) => a.run(),
            Command::Eval(a) => a.run(),
            Command::Replay(a) => a.run(),
            Command::Patches(a) => a.run(),
            Command::Cases(a) => a.run(),
            Command::Forget(a) => a.run(),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Serve LSP over stdio (the default).
    Serve,
    /// One completion at a 0-based LSP position (UTF-16 column), printed to stdout.
    Complete(CompleteArgs),
    /// Prefill and decode speed and warm edit latency, beside llama.cpp on the same GGUF and threads.
    Bench(BenchArgs),
    /// STAR on cases-JSONL files, as a dry run: what a repair would fix and keep (store untouched).
    Repair(RepairArgs),
    /// The paper's comparison on a cases file: STAR, MINT and SGD from the same unpatched model
    /// (CONTRACT.md's protocol); a table on stdout, JSON and SVG charts on request.
    Eval(EvalArgs),
    /// A developer writing the files under DIR line by line, completing each sampled line with the
    /// unpatched model and with one that learns as the server does: do later completions get better?
    Replay(ReplayArgs),
    /// The patch ledger: the repairs applied to the model.
    Patches(PatchesArgs),
    /// The failure and guard cases recorded from your edits.
    Cases(CasesArgs),
    /// Wipe a workspace's recorded cases and shown completions, and every patch learned from them.
    Forget(ForgetArgs),
}

#[derive(Args)]
struct CompleteArgs {
    #[arg(required_unless_present = "cases", requires_all = ["line", "character"])]
    file: Option<PathBuf>,
    #[arg(long)]
    line: Option<u32>,
    #[arg(long)]
    character: Option<u32>,
    /// Complete to the end of the block instead of the line.
    #[arg(long)]
    multiline: bool,
    #[arg(long)]
    json: bool,
    /// Instead of FILE: every case of a cases file, at its cursor as the server would; prints
    /// exact, blank and runaway counts as JSON.
    #[arg(long, conflicts_with_all = ["file", "multiline", "json"])]
    cases: Option<PathBuf>,
    /// Only the first N cases.
    #[arg(long, requires = "cases")]
    limit: Option<usize>,
    /// Also llama.cpp's line on the same GGUF and prompt (installs it when missing).
    #[arg(long, requires = "cases")]
    peer: bool,
    /// Write every case's lines here (JSON).
    #[arg(long, requires = "cases")]
    rows: Option<PathBuf>,
    #[arg(long)]
    threads: Option<usize>,
    /// With --cases: the repositories the cases' `file`s are in (`DIR/<repo>/<path>`); each case
    /// sees its repository's other files, as the server sees the files opened lately.
    #[arg(long, requires = "cases")]
    repo_root: Option<PathBuf>,
    /// Tokens of other files a prompt may take (the `crossFileTokens` setting; llama.cpp gets none).
    #[arg(long, default_value_t = 0, requires = "repo_root")]
    cross_file_tokens: usize,
    /// How other files go into the prompt (the `crossFileLayout` setting).
    #[arg(long, value_enum, default_value_t = LayoutArg::Repo)]
    cross_file_layout: LayoutArg,
    /// With --cases: ours under the ledger's live patches for this model, as the server completes.
    #[arg(long, requires = "cases")]
    patches: bool,
    /// llama.cpp with this LoRA adapter (`patches export --format gguf-lora`).
    #[arg(long, requires = "peer")]
    peer_lora: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LayoutArg {
    Repo,
    Concat,
}

impl From<LayoutArg> for star_ls::completion::Layout {
    fn from(l: LayoutArg) -> Self {
        match l {
            LayoutArg::Repo => Self::Repo,
            LayoutArg::Concat => Self::Concat,
        }
    }
}

#[derive(Args)]
struct BenchArgs {
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Also llama.cpp's speed on the bench prompt with this LoRA adapter (`patches export --format
    /// gguf-lora`), beside its speed without.
    #[arg(long)]
    peer_lora: Option<PathBuf>,
}

#[derive(Args)]
struct RepairArgs {
    #[arg(long)]
    cases: PathBuf,
    /// Repair the first N cases; the rest are held out and only checked.
    #[arg(long)]
    limit: Option<usize>,
    /// Accepted completions the repair must not break.
    #[arg(long)]
    guards: Option<PathBuf>,
    /// Do not project patches off the guard activations.
    #[arg(long)]
    no_guard_projection: bool,
    /// star, or a baseline from the paper: mint, sgd.
    #[arg(long, default_value = "star", value_parser = parse_method)]
    method: star_ls::repair::Method,
    /// Repair settings as JSON, over the defaults (e.g. '{"gate": 0}').
    #[arg(long, value_parser = parse_settings)]
    repair_settings: Option<star_ls::repair::RepairSettings>,
    #[arg(long)]
    json: bool,
    #[arg(long)]
    threads: Option<usize>,
    /// Also write the repair's patches here as a GGUF LoRA (column patches; no gates), and set
    /// llama.cpp's lines with it beside ours (installs the peer when missing).
    #[arg(long)]
    adapter: Option<PathBuf>,
}

#[derive(Args)]
struct EvalArgs {
    #[arg(long)]
    cases: PathBuf,
    /// star, mint, sgd, a comma-separated list of them (star,sgd), or all.
    #[arg(long, default_value = "all", value_parser = parse_methods)]
    method: Methods,
    #[arg(long)]
    json: Option<PathBuf>,
    /// Only the first N cases of the file.
    #[arg(long)]
    limit: Option<usize>,
    /// Draw the specificity sample from this cases file (other code, never repaired) instead
    /// of from --cases, whose groups the run repairs one by one.
    #[arg(long)]
    unrelated: Option<PathBuf>,
    /// Seeds the specificity sample (and the guard sample).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Size of the specificity sample.
    #[arg(long, default_value_t = 40)]
    sample: usize,
    /// Passing cases given to every repair as guards, as the server guards its repairs with
    /// accepted completions (0: none).
    #[arg(long, default_value_t = 8)]
    guards: usize,
    /// Seconds after which a repair is stopped and reported as timed out.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Write measures.svg, seconds.svg and cumulative.svg here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Repair settings as JSON, over the defaults (e.g. '{"layers": 2, "maxSteps": 20}').
    #[arg(long, value_parser = parse_settings)]
    repair_settings: Option<star_ls::repair::RepairSettings>,
    /// Also measure every patch served re-quantized into its layers instead of as an overlay.
    #[arg(long)]
    requantized: bool,
    /// Also measure every column patch served without its gates, as a LoRA adapter serves it.
    #[arg(long)]
    ungated: bool,
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args)]
struct ReplayArgs {
    #[arg(long)]
    dir: PathBuf,
    /// Which files, as a glob over their paths under DIR.
    #[arg(long, default_value = "**/*.py")]
    glob: String,
    /// At most this many files (a seeded sample when there are more).
    #[arg(long, default_value_t = 100)]
    max_files: usize,
    /// At most this many target lines per file (a seeded sample, in file order).
    #[arg(long, default_value_t = 12)]
    lines_per_file: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write replay.svg here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Keep the replay's store (cases and ledger) in this new directory; default: a temporary one.
    #[arg(long)]
    store: Option<PathBuf>,
    /// Repair settings as JSON, over the server's defaults (as for eval).
    #[arg(long, value_parser = parse_settings)]
    repair_settings: Option<star_ls::repair::RepairSettings>,
    /// Repair once this many failures no repair has seen are pending (the server's setting).
    #[arg(long)]
    repair_threshold: Option<u64>,
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args)]
struct PatchesArgs {
    #[command(subcommand)]
    action: PatchesAction,
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Args)]
struct CasesArgs {
    #[command(subcommand)]
    action: CasesAction,
}

#[derive(Args)]
struct ForgetArgs {
    /// The workspace: its root directory, or its URI as the editor sent it.
    #[arg(long, required_unless_present = "all", conflicts_with = "all")]
    workspace: Option<String>,
    /// Every workspace: all cases, completions and patches.
    #[arg(long)]
    all: bool,
    #[arg(long)]
    json: bool,
}

impl CompleteArgs {
    fn run(self) -> anyhow::Result<()> {
        let Self {
            file,
            line,
            character,
            multiline,
            json,
            cases,
            limit,
            peer,
            rows,
            threads,
            repo_root,
            cross_file_tokens,
            cross_file_layout,
            patches,
            peer_lora,
        } = self;
        star_ls::env::set_threads(threads);
        let stop = if multiline {
            StopAt::Block
        } else {
            StopAt::Line
        };
        match (cases, file, line, character) {
            (Some(cases), ..) => complete::run_cases(complete::CasesOptions {
                cases: &cases,
                limit,
                peer,
                json: rows.as_deref(),
                repo_root: repo_root.as_deref(),
                cross_file_tokens,
                layout: cross_file_layout.into(),
                threads: peer_threads(threads),
                patches,
                peer_lora: peer_lora.as_deref(),
            }),
            (None, Some(file), Some(line), Some(character)) => {
                complete::run(&file, line, character, stop, json)
            }
            _ => Err(anyhow::anyhow!(
                "complete needs FILE with --line and --character, or --cases FILE"
            )),
        }
    }
}

impl BenchArgs {
    fn run(self) -> anyhow::Result<()> {
        let Self {
            json,
            threads,
            peer_lora,
        } = self;
        bench::run(threads, json.as_deref(), peer_lora.as_deref())
    }
}

impl RepairArgs {
    fn run(self) -> anyhow::Result<()> {
        let Self {
            cases,
            limit,
            guards,
            no_guard_projection,
            method,
            repair_settings,
            json,
            threads,
            adapter,
        } = self;
        star_ls::env::set_threads(threads);
        repair::run(repair::Options {
            cases: &cases,
            limit,
            guards: guards.as_deref(),
            settings: {
                let s = repair_settings.unwrap_or_default();
                star_ls::repair::RepairSettings {
                    guard_projection: s.guard_projection && !no_guard_projection,
                    ..s
                }
            },
            method,
            json,
            adapter: adapter.as_deref(),
            threads: peer_threads(threads),
        })
    }
}

impl EvalArgs {
    fn run(self) -> anyhow::Result<()> {
        let Self {
            cases,
            method,
            json,
            limit,
            unrelated,
            seed,
            sample,
            guards,
            timeout,
            plot,
            repair_settings,
            requantized,
            ungated,
            threads,
        } = self;
        star_ls::env::set_threads(threads);
        eval::run(eval::Options {
            cases: &cases,
            unrelated: unrelated.as_deref(),
            json: json.as_deref(),
            limit,
            plot: plot.as_deref(),
            eval: star_ls::eval::EvalOptions {
                methods: method.0,
                seed,
                sample,
                guards,
                timeout: std::time::Duration::from_secs(timeout),
                settings: repair_settings.unwrap_or_default(),
                requantized,
                ungated,
                ..Default::default()
            },
        })
    }
}

impl ReplayArgs {
    fn run(self) -> anyhow::Result<()> {
        let Self {
            dir,
            glob,
            max_files,
            lines_per_file,
            seed,
            json,
            plot,
            store,
            repair_settings,
            repair_threshold,
            threads,
        } = self;
        star_ls::env::set_threads(threads);
        let default = star_ls::learn::Policy::default();
        replay::run(replay::Options {
            policy: star_ls::learn::Policy {
                repair: repair_settings.unwrap_or_default(),
                repair_threshold: repair_threshold.unwrap_or(default.repair_threshold),
                ..default
            },
            replay: replay::ReplayOptions {
                dir,
                glob,
                max_files,
                lines_per_file,
                seed,
            },
            json: json.as_deref(),
            plot: plot.as_deref(),
            store: store.as_deref(),
        })
    }
}

impl PatchesArgs {
    fn run(self) -> anyhow::Result<()> {
        let Self { action, json } = self;
        match action {
            PatchesAction::List => patches::list(json),
            PatchesAction::Rollback { id } => {
                patches::rollback((id != "all").then_some(id.as_str()), json)
            }
            PatchesAction::Export {
                format,
                out,
                ids,
                with_cases,
                ungated,
            } => patches::export(
                format,
                &out,
                patches::ExportOptions {
                    ids: ids.as_deref(),
                    with_cases,
                    ungated,
                    json,
                },
            ),
            PatchesAction::Import { file } => patches::import(&file, json),
        }
    }
}

impl CasesArgs {
    fn run(self) -> anyhow::Result<()> {
        let Self {
            action: CasesAction::Export { kind },
        } = self;
        cases::export(kind)
    }
}

impl ForgetArgs {
    fn run(self) -> anyhow::Result<()> {
        let Self {
            workspace, json, ..
        } = self;
        cases::forget(workspace.as_deref(), json)
    }
}

#[derive(Subcommand)]
enum PatchesAction {
    /// Every patch, rolled back ones included, oldest first.
    List,
    /// Roll back a patch by id (`patch-3`), or `all`; its cases become pending failures again.
    Rollback { id: String },
    /// Write the loaded model's active patches (or those of `--ids`) to a file a teammate imports.
    Export {
        /// `bundle`: star-ls's own file, for `star-ls patches import`; `gguf-lora` (llama.cpp) and
        /// `peft` (PEFT, vLLM; a directory): one LoRA adapter of the column patches.
        #[arg(long, value_enum)]
        format: patches::Format,
        out: PathBuf,
        /// Only these patches (`patch-3,patch-5`).
        #[arg(long, value_delimiter = ',')]
        ids: Option<Vec<String>>,
        /// Also the text of the failures each patch repaired (your code: left out by default).
        #[arg(long)]
        with_cases: bool,
        /// Adapters: also the gated column patches, served everywhere (a LoRA has no gate).
        #[arg(long)]
        ungated: bool,
    },
    /// Add a bundle's patches to this ledger (the same model only); a running server takes them up.
    Import { file: PathBuf },
}

#[derive(Subcommand)]
enum CasesAction {
    /// Print the stored cases as cases-JSONL on stdout.
    Export {
        /// Only this kind: failure (rejected or corrected completions) or guard (accepted ones).
        #[arg(long)]
        kind: Option<CaseKind>,
    },
}

/// The peer's threads: `--threads`, else every core, as ours.
fn peer_threads(threads: Option<usize>) -> usize {
    threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
}

#[derive(Clone)]
struct Methods(Vec<star_ls::repair::Method>);

fn parse_methods(s: &str) -> Result<Methods, String> {
    use star_ls::repair::Method;
    match s {
        "all" => Ok(Methods(vec![Method::Star, Method::Mint, Method::Sgd])),
        list => {
            let mut methods = list
                .split(',')
                .map(|m| parse_method(m.trim()))
                .collect::<Result<Vec<_>, _>>()?;
            methods.sort_unstable();
            methods.dedup();
            Ok(Methods(methods))
        }
    }
}

fn parse_settings(s: &str) -> Result<star_ls::repair::RepairSettings, String> {
    let settings: star_ls::repair::RepairSettings =
        serde_json::from_str(s).map_err(|e| format!("not repair settings: {e}"))?;
    settings.check()?;
    Ok(settings)
}

fn parse_method(s: &str) -> Result<star_ls::repair::Method, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("unknown method {s:?} (star, mint or sgd)"))
}
