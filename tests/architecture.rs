//! The module dependencies ARCHITECTURE.md states: every `crate::` path in `src/` names a module its
//! module may use, and the order of the list is a layering (no module uses one listed after it). And
//! rooms a newcomer can read whole: no file under `src/` over 700 lines, no function over 100.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use syn::visit::{self, Visit};

/// ARCHITECTURE.md's block of `module -> allowed modules` lines, in its order.
fn stated() -> Vec<(String, Vec<String>)> {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/ARCHITECTURE.md")).unwrap();
    let block = doc
        .split("```text\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("ARCHITECTURE.md has a ```text block of module dependencies");
    block
        .lines()
        .map(|l| {
            let (module, uses) = l.split_once("->").expect("`module -> modules` lines");
            (
                module.trim().to_owned(),
                uses.split_whitespace().map(str::to_owned).collect(),
            )
        })
        .collect()
}

/// The top-level module a file under `src/` belongs to (`src/lsp/server.rs` → `lsp`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

/// Every module each module's files name as `crate::NAME`.
fn used() -> BTreeMap<String, Vec<String>> {
    let src = src();
    let mut used: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for path in sources() {
        let module = module_of(&src, &path);
        let text = std::fs::read_to_string(&path).unwrap();
        // The binary's modules name the library's as `star_ls::`; `crate::{a, b::c}` names both.
        let names = used.entry(module.clone()).or_default();
        for prefix in ["crate::", "star_ls::"] {
            for (i, _) in text.match_indices(prefix) {
                let rest = &text[i + prefix.len()..];
                let paths = match rest.strip_prefix('{') {
                    Some(group) => group[..group.find('}').unwrap_or(0)].split(',').collect(),
                    None => vec![rest],
                };
                for path in paths {
                    let name: String = path
                        .trim_start()
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != module && !names.contains(&name) {
                        names.push(name);
                    }
                }
            }
        }
    }
    used
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `src/`.
fn sources() -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![src()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            match path.is_dir() {
                true => stack.push(path),
                false if path.extension().is_some_and(|e| e == "rs") => files.push(path),
                false => {}
            }
        }
    }
    files.sort();
    files
}

#[test]
fn modules_use_only_what_architecture_md_allows() {
    let stated = stated();
    let order: Vec<&str> = stated.iter().map(|(m, _)| m.as_str()).collect();
    for (i, (module, allowed)) in stated.iter().enumerate() {
        for a in allowed {
            let j = order.iter().position(|m| m == a);
            assert!(
                j.is_some_and(|j| j < i),
                "{module} may use {a}, which is not listed before it"
            );
        }
    }
    let top = ["lib", "main"]; // the crate root and the binary declare and call everything
    for (module, names) in used() {
        if top.contains(&module.as_str()) {
            continue;
        }
        let allowed = stated
            .iter()
            .find(|(m, _)| *m == module)
            .map_or(&[][..], |(_, a)| a.as_slice());
        for name in names {
            assert!(
                allowed.contains(&name),
                "src/{module} uses crate::{name}, which ARCHITECTURE.md does not allow it"
            );
        }
    }
}

const MAX_FILE_LINES: usize = 700;
const MAX_FN_LINES: usize = 100;

/// Functions outside `#[cfg(test)]` modules longer than `MAX_FN_LINES`, signature to closing brace.
#[derive(Default)]
struct LongFunctions(Vec<String>);

impl LongFunctions {
    fn check(&mut self, name: &syn::Ident, block: &syn::Block) {
        let lines = block.brace_token.span.close().end().line - name.span().start().line + 1;
        if lines > MAX_FN_LINES {
            self.0.push(format!("{name} ({lines} lines)"));
        }
    }
}

impl<'ast> Visit<'ast> for LongFunctions {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        let test_only = m.attrs.iter().any(|a| {
            a.path().is_ident("cfg") && a.parse_args::<syn::Ident>().is_ok_and(|i| i == "test")
        });
        if !test_only {
            visit::visit_item_mod(self, m);
        }
    }

    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        self.check(&f.sig.ident, &f.block);
        visit::visit_item_fn(self, f);
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        self.check(&f.sig.ident, &f.block);
        visit::visit_impl_item_fn(self, f);
    }

    fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
        if let Some(block) = &f.default {
            self.check(&f.sig.ident, block);
        }
        visit::visit_trait_item_fn(self, f);
    }
}

#[test]
fn no_file_or_function_is_too_long_to_read_whole() {
    let mut long = Vec::new();
    for path in sources() {
        let text = std::fs::read_to_string(&path).unwrap();
        let rel = path.strip_prefix(src()).unwrap().display().to_string();
        let lines = text.lines().count();
        if lines > MAX_FILE_LINES {
            long.push(format!("src/{rel}: {lines} lines"));
        }
        let mut functions = LongFunctions::default();
        functions.visit_file(&syn::parse_file(&text).unwrap());
        long.extend(
            functions
                .0
                .into_iter()
                .map(|f| format!("src/{rel}: fn {f}")),
        );
    }
    assert!(
        long.is_empty(),
        "over {MAX_FILE_LINES} lines a file, {MAX_FN_LINES} a function:\n{}",
        long.join("\n")
    );
}

/// ARCHITECTURE.md's invariants a reading of the source can check: per module, text its files never
/// hold (`None`: every module but the named one), and the files the promise leaves out.
type Promise = (
    &'static str,
    Option<&'static str>,
    &'static [&'static str],
    &'static [&'static str],
);

const PROMISES: [Promise; 6] = [
    // Only `lsp/` knows JSON-RPC or LSP types (the binary names the crate in its log filter only).
    ("lsp", None, &["use tower_lsp", "ls_types", "jsonrpc"], &[]),
    // Only `store/` touches SQLite.
    ("store", None, &["rusqlite"], &[]),
    // The repair engine: no I/O, no store, no protocol.
    (
        "repair",
        Some("repair"),
        &["fs::", "File::", "crate::store", "serde_json"],
        &[],
    ),
    // Capture: pure, no clock of its own.
    (
        "capture",
        Some("capture"),
        &["fs::", "File::", "Instant::now", "SystemTime"],
        &[],
    ),
    // Eval: no files read or written, nothing printed; its one look outside is the process's own
    // memory figures (`rss.rs`).
    (
        "eval",
        Some("eval"),
        &[
            "fs::",
            "File::",
            "println!",
            "eprintln!",
            "plotters",
            "walkdir",
        ],
        &["eval/rss.rs"],
    ),
    // The model runtime reads its file at load, nowhere else.
    (
        "model",
        Some("model"),
        &["fs::", "println!"],
        &["model/gguf.rs"],
    ),
];

#[test]
fn modules_keep_the_promises_architecture_md_makes() {
    let src = src();
    let mut broken = Vec::new();
    for path in sources() {
        let module = module_of(&src, &path);
        let text = std::fs::read_to_string(&path).unwrap();
        let rel = path.strip_prefix(&src).unwrap().display().to_string();
        for (owner, applies_to, never, except) in PROMISES {
            let applies = !except.contains(&rel.as_str())
                && match applies_to {
                    None => module != owner,
                    Some(m) => module == m,
                };
            for word in never.iter().filter(|w| applies && text.contains(**w)) {
                broken.push(format!("src/{rel} holds `{word}` ({owner})"));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}
