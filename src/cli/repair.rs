//! `star-ls repair --cases FILE`: STAR on cases-JSONL files, outside the server and without touching the
//! store or the ledger: a dry run that shows what a repair would fix and keep, line by line.

use anyhow::Context;
use serde_json::json;
use star_ls::completion::ContextLimits;
use star_ls::model::{
    Capture, FiredEntries, Generation, Hooks, LayerPatch, LoadOptions, Model, PatchSet,
};
use star_ls::repair::PatchKind;
use star_ls::repair::{
    complete_case, passes, teacher_forced, Case, Head, Method, RepairOutcome, RepairSettings, Star,
};
use star_ls::store::Adapter;
use std::io::BufRead;
use std::path::Path;

/// The settings whose patches a LoRA adapter serves exactly.
const COLUMNS: &str = r#"--repair-settings '{"patch": "columns", "gate": 0}'"#;

pub fn read_cases(path: &Path) -> anyhow::Result<Vec<Case>> {
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    std::io::BufReader::new(file)
        .lines()
        .enumerate()
        .filter(|(_, l)| l.as_ref().map_or(true, |l| !l.trim().is_empty()))
        .map(|(i, l)| {
            let l = l?;
            serde_json::from_str(&l)
                .with_context(|| format!("{}:{}: not a case", path.display(), i + 1))
        })
        .collect()
}

pub struct Options<'a> {
    pub cases: &'a Path,
    /// Failures repaired: the first `limit` cases (the rest are held out and only checked).
    pub limit: Option<usize>,
    pub guards: Option<&'a Path>,
    pub settings: RepairSettings,
    pub method: Method,
    pub json: bool,
    /// Write the repair's patches here as a GGUF LoRA and compare llama.cpp's lines with it.
    pub adapter: Option<&'a Path>,
    pub threads: usize,
}

pub fn run(o: Options) -> anyhow::Result<()> {
    // Said before the repair runs: STAR's keyed patches have no LoRA form.
    let keyed = o.settings.patch == PatchKind::Values || o.settings.gate > 0.0;
    if o.adapter.is_some() && o.method == Method::Star && keyed {
        anyhow::bail!("--adapter: these settings make patches that act behind gates (the default adds one value per gate key), which no LoRA can express; repair with {COLUMNS}");
    }
    let cases = read_cases(o.cases)?;
    let guards = match o.guards {
        Some(p) => read_cases(p)?,
        None => Vec::new(),
    };
    let model = Model::load(&star_ls::env::model_path(), LoadOptions::default())?;
    let head = Head::of(&model.weights, None)?;
    let settings = o.settings;
    let star = Star::new(&model.weights, &model.tokenizer, &head, settings);
    let repaired = &cases[..o.limit.unwrap_or(cases.len()).min(cases.len())];
    let lines =
        |patches: Option<&PatchSet>, limits: ContextLimits| -> anyhow::Result<Vec<Generation>> {
            cases
                .iter()
                .chain(&guards)
                .map(|c| {
                    Ok(complete_case(
                        &model.weights,
                        &model.tokenizer,
                        c,
                        limits,
                        patches,
                    )?)
                })
                .collect()
        };
    let before = lines(None, settings.context)?;
    let outcome = star.repair_by(o.method, repaired, &guards)?;
    // Named, so that the served lines say where its gates opened.
    let named: Vec<_> = outcome
        .patches
        .iter()
        .map(|(l, p)| (*l, p.clone().named("dry run")))
        .collect();
    let set = star.served(&named)?;
    let after = lines(Some(&set), settings.context)?;
    // A repair in another window than the server's (`--repair-settings`) must open its keys there too.
    let served = match settings.context == ContextLimits::default() {
        true => after.clone(),
        false => lines(Some(&set), ContextLimits::default())?,
    };

    let all: Vec<&Case> = cases.iter().chain(&guards).collect();
    let peer = match o.adapter {
        Some(out) => Some(peer_check(&model, &all, &outcome.patches, out, o.threads)?),
        None => None,
    };
    let mut rows = report_rows(
        &model,
        &all,
        repaired.len(),
        cases.len(),
        (&outcome.patches, &set),
        [&before, &after, &served],
    )?;
    let peer_summary = peer
        .as_ref()
        .map(|p| p.add_to(&mut rows, &all, repaired.len(), [&before, &served]));
    // Keys of the first patched layer's gate (every layer of a repair keys the same positions).
    let keys = match outcome.patches.first().and_then(|(_, p)| p.gate()) {
        Some(g) => g.keys().dim(0)?,
        None => 0,
    };
    let report = json!({
        "method": o.method, "failures": outcome.failures, "fixed": outcome.fixed, "guardBefore": outcome.guard_before,
        "guardAfter": outcome.guard_after, "layers": outcome.layers,
        "neuronsPerLayer": outcome.neurons_per_layer, "keysPerLayer": keys, "steps": outcome.steps, "solves": outcome.solves,
        "seconds": outcome.seconds, "refused": outcome.refused, "cases": rows, "peer": peer_summary,
    });
    if o.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    for (r, s) in rows.iter().zip(&served) {
        println!("{}", row_text(r, s));
    }
    println!("{}", summary(o.method, &outcome, keys));
    if let Some(p) = peer_summary {
        println!("{}", PeerCheck::text(&p));
    }
    Ok(())
}

/// The report's rows: per case its role, its lines before, after and as served, and for a held-out
/// case how far the gates are from opening (`reach`).
fn report_rows(
    model: &Model,
    all: &[&Case],
    repaired: usize,
    cases: usize,
    (patches, set): (&[(usize, LayerPatch)], &PatchSet),
    [before, after, served]: [&[Generation]; 3],
) -> anyhow::Result<Vec<serde_json::Value>> {
    all.iter()
        .zip(before.iter().zip(after).zip(served))
        .enumerate()
        .map(|(i, (c, ((b, a), s)))| {
            let role = if i >= cases {
                "guard"
            } else if i < repaired {
                "repaired"
            } else {
                "held out"
            };
            let reach = match role {
                "held out" => Some(reach(model, c, patches, set)?),
                _ => None,
            };
            Ok(json!({ "id": c.id, "role": role, "target": c.target, "before": b.text, "after": a.text,
                    "passesBefore": passes(&b.text, c), "passesAfter": passes(&a.text, c),
                    "served": s.text, "passesServed": passes(&s.text, c), "openedServed": s.fired,
                    "gateReach": reach }))
        })
        .collect()
}

/// `--adapter`: llama.cpp's line for every case on the bare GGUF and with the repair's patches as
/// a LoRA adapter (its rank), to set beside ours before the repair and as served after it.
struct PeerCheck {
    rank: usize,
    bare: Vec<super::complete::Line>,
    adapted: Vec<super::complete::Line>,
}

/// The repair's patches written as a GGUF LoRA at `out`, and llama.cpp's lines without and with it.
fn peer_check(
    model: &Model,
    all: &[&Case],
    patches: &[(usize, LayerPatch)],
    out: &Path,
    threads: usize,
) -> anyhow::Result<PeerCheck> {
    let layers = star_ls::learn::ledger_layers(patches)?;
    let adapter = Adapter::stack([("the repair", layers.as_slice())], false);
    if let Some((id, why)) = adapter.left_out.first() {
        anyhow::bail!("no adapter: {id} {}; repair with {COLUMNS}", why.reason());
    }
    let path = star_ls::env::model_path();
    let rank = super::adapter::write_gguf(&adapter, &super::adapter::Base::read(&path)?, out)?;
    let limits = ContextLimits::default();
    let prompts: Vec<_> = all
        .iter()
        .map(|c| super::complete::peer_prompt(&model.tokenizer, c, limits))
        .collect::<anyhow::Result<_>>()?;
    let lines = |lora| super::complete::peer_lines(&path, threads, &prompts, 64, lora);
    Ok(PeerCheck {
        rank,
        bare: lines(None)?,
        adapted: lines(Some(out))?,
    })
}

impl PeerCheck {
    /// Each row's llama.cpp lines, and the figures: how many lines llama.cpp gives as we do, bare
    /// against ours before and with the adapter against ours as served (the same text, or both
    /// right), and how many repaired cases each gets right.
    fn add_to(
        &self,
        rows: &mut [serde_json::Value],
        all: &[&Case],
        repaired: usize,
        [before, served]: [&[Generation]; 2],
    ) -> serde_json::Value {
        let same = |a: &str, b: &str, c: &Case| a == b || (passes(a, c) && passes(b, c));
        let (mut agree_bare, mut agree, mut right_served, mut right_adapted) = (0, 0, 0, 0);
        for (i, row) in rows.iter_mut().enumerate() {
            let (bare, adapted, c) = (&self.bare[i].text, &self.adapted[i].text, all[i]);
            row["peerBare"] = json!(bare);
            row["peerAdapted"] = json!(adapted);
            agree_bare += usize::from(same(bare, &before[i].text, c));
            agree += usize::from(same(adapted, &served[i].text, c));
            if i < repaired {
                right_served += usize::from(passes(&served[i].text, c));
                right_adapted += usize::from(passes(adapted, c));
            }
        }
        json!({
            "rank": self.rank, "cases": rows.len(), "agreeBare": agree_bare, "agreeAdapted": agree,
            "repaired": repaired, "repairedRightServed": right_served,
            "repairedRightAdapted": right_adapted,
        })
    }

    fn text(p: &serde_json::Value) -> String {
        format!(
            "llama.cpp with the repair as a rank-{} LoRA: {} of {} lines as star-ls serves them \
             (bare: {} as the unpatched); repaired cases right: {} with the adapter, {} served, of {}",
            p["rank"], p["agreeAdapted"], p["cases"], p["agreeBare"],
            p["repairedRightAdapted"], p["repairedRightServed"], p["repaired"]
        )
    }
}

/// The report's last line: what the repair fixed, kept and cost.
fn summary(method: Method, outcome: &RepairOutcome, keys: usize) -> String {
    format!(
        "{:?}: fixed {} of {} failures; guard {:.2} -> {:.2}; layers {:?}, {} neurons and {} keys each; {} solves, {} steps; {:.1} s{}",
        method,
        outcome.fixed,
        outcome.failures,
        outcome.guard_before,
        outcome.guard_after,
        outcome.layers,
        outcome.neurons_per_layer,
        keys,
        outcome.solves,
        outcome.steps,
        outcome.seconds,
        outcome.refused.as_ref().map(|r| format!("; refused: {r}")).unwrap_or_default()
    )
}

/// A case's line of the report: its role, the line before and after, the target, and as served.
fn row_text(r: &serde_json::Value, served: &Generation) -> String {
    format!(
        "{:<9} {:<6} {} -> {}   (target {}; served {}{}{}{})",
        r["role"].as_str().unwrap_or_default(),
        r["id"].as_str().unwrap_or_default(),
        r["before"],
        r["after"],
        r["target"],
        r["served"],
        opened(&served.fired),
        reach_text(&r["gateReach"]),
        match &r["peerAdapted"] {
            serde_json::Value::String(_) => format!(
                "; llama.cpp {} with the adapter, {} bare",
                r["peerAdapted"], r["peerBare"]
            ),
            _ => String::new(),
        }
    )
}

/// Where the repair's gates opened while a line was served: `; opened at L19 (3 rows, keys 0 4)`.
fn opened(fired: &[FiredEntries]) -> String {
    fired
        .iter()
        .map(|f| {
            let keys: Vec<String> = f.keys.iter().map(u32::to_string).collect();
            format!(
                "; opened at L{} ({} rows, keys {})",
                f.layer,
                f.rows,
                keys.join(" ")
            )
        })
        .collect()
}

/// Per patched layer, by how much its gate's best key clears its threshold (negative: it stays
/// shut) at the row that decides `case`'s first token, in the server's window under `set`: how far
/// a held-out case of the idiom is from opening the repair's gates.
fn reach(
    model: &Model,
    case: &Case,
    patches: &[(usize, LayerPatch)],
    set: &PatchSet,
) -> anyhow::Result<Vec<(usize, f64)>> {
    let tf = teacher_forced(&model.tokenizer, case, ContextLimits::default());
    let mut capture = Capture::layers(patches.iter().map(|(l, _)| *l));
    model.weights.forward(
        &tf.tokens,
        &mut model.weights.new_cache(),
        &mut Hooks {
            patches: Some(set),
            capture: Some(&mut capture),
            ..Hooks::default()
        },
    )?;
    let mut by = Vec::new();
    for (l, p) in patches {
        if let (Some(gate), Some(z)) = (p.gate(), capture.neurons.get(l)) {
            let at = gate.scores(&z.narrow(0, tf.row(0), 1)?)?;
            let clears = f64::from(at.flatten_all()?.to_vec1::<f32>()?[0]);
            by.push((*l, (clears * 1000.0).round() / 1000.0));
        }
    }
    Ok(by)
}

/// `; gates clear by L19 -0.078, L21 -0.165`, or nothing where it was not measured.
fn reach_text(reach: &serde_json::Value) -> String {
    let by: Vec<String> = reach
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| format!("L{} {}", p[0], p[1]))
        .collect();
    match by.is_empty() {
        true => String::new(),
        false => format!("; gates clear by {}", by.join(", ")),
    }
}
