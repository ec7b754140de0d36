//! `star-ls repair --cases FILE`: STAR on cases-JSONL files, outside the server and without touching the
//! store or the ledger: a dry run that shows what a repair would fix and keep, line by line.

use anyhow::Context;
use serde_json::json;
use star_ls::completion::ContextLimits;
use star_ls::model::{LoadOptions, Model, PatchSet};
use star_ls::repair::{complete_case, passes, Case, Head, Method, RepairSettings, Star};
use std::io::BufRead;
use std::path::Path;

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
}

pub fn run(o: Options) -> anyhow::Result<()> {
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
        |patches: Option<&PatchSet>, limits: ContextLimits| -> anyhow::Result<Vec<String>> {
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
    let set = star.served(&outcome.patches)?;
    let after = lines(Some(&set), settings.context)?;
    // A repair in another window than the server's (`--repair-settings`) must open its keys there too.
    let served = match settings.context == ContextLimits::default() {
        true => after.clone(),
        false => lines(Some(&set), ContextLimits::default())?,
    };

    let rows: Vec<_> = cases
        .iter()
        .chain(&guards)
        .zip(before.iter().zip(&after).zip(&served))
        .enumerate()
        .map(|(i, (c, ((b, a), s)))| {
            let role = if i >= cases.len() {
                "guard"
            } else if i < repaired.len() {
                "repaired"
            } else {
                "held out"
            };
            json!({ "id": c.id, "role": role, "target": c.target, "before": b, "after": a,
                    "passesBefore": passes(b, c), "passesAfter": passes(a, c),
                    "served": s, "passesServed": passes(s, c) })
        })
        .collect();
    // Keys of the first patched layer's gate (every layer of a repair keys the same positions).
    let keys = match outcome.patches.first().and_then(|(_, p)| p.gate()) {
        Some(g) => g.keys().dim(0)?,
        None => 0,
    };
    let report = json!({
        "method": o.method, "failures": outcome.failures, "fixed": outcome.fixed, "guardBefore": outcome.guard_before,
        "guardAfter": outcome.guard_after, "layers": outcome.layers,
        "neuronsPerLayer": outcome.neurons_per_layer, "keysPerLayer": keys, "steps": outcome.steps, "solves": outcome.solves,
        "seconds": outcome.seconds, "refused": outcome.refused, "cases": rows,
    });
    if o.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    for r in &rows {
        println!(
            "{:<9} {:<6} {} -> {}   (target {}; served {})",
            r["role"].as_str().unwrap_or_default(),
            r["id"].as_str().unwrap_or_default(),
            r["before"],
            r["after"],
            r["target"],
            r["served"]
        );
    }
    println!(
        "{:?}: fixed {} of {} failures; guard {:.2} -> {:.2}; layers {:?}, {} neurons and {} keys each; {} solves, {} steps; {:.1} s{}",
        o.method,
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
        outcome.refused.map(|r| format!("; refused: {r}")).unwrap_or_default()
    );
    Ok(())
}
