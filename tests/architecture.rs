//! The module dependencies ARCHITECTURE.md states: every `crate::` path in `src/` names a module its
//! module may use, and the order of the list is a layering (no module uses one listed after it).

use std::collections::BTreeMap;
use std::path::Path;

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
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut used: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let module = module_of(&src, &path);
            let text = std::fs::read_to_string(&path).unwrap();
            for (i, _) in text.match_indices("crate::") {
                let name: String = text[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                let names = used.entry(module.clone()).or_default();
                if !name.is_empty() && name != module && !names.contains(&name) {
                    names.push(name);
                }
            }
        }
    }
    used
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
