//! A crafted or damaged GGUF never panics the loader: the tiny model's header (metadata and tensor
//! table) mutated at seeded places, 10,000 times; each file either loads, and runs its first forward
//! pass, or gives the one-line error that names it. One case in 100 also goes through the real
//! binary (`star-ls complete`), which exits 0 or 1 with that line, never with a panic.

#[path = "support/tiny_model.rs"]
mod tiny_model;

use candle_core::quantized::gguf_file;
use rand::{rngs::StdRng, Rng, SeedableRng};
use star_ls::model::{LoadOptions, Model};
use std::os::unix::fs::FileExt;

const CASES: u64 = 10_000;
/// Every this many cases, the binary too.
const THROUGH_BINARY: u64 = 100;

/// Values that sit at the edges of what a count, a size or an offset may be.
const EDGES: [u64; 9] = [0, 1, 2, 3, 255, 0x7fff_ffff, 0xffff_ffff, 1 << 40, u64::MAX];

/// Where the sizes live: each `qwen2.*` metadata value, and each tensor's entry in the table (its
/// rank, dimensions, type and offset follow its name). The tokenizer's strings fill most of the
/// header; mutations aimed only at random would seldom reach these.
fn sizes_at(header: &[u8], tensors: &[&String]) -> Vec<usize> {
    let printable = |b: &u8| b.is_ascii_graphic();
    let mut at = Vec::new();
    for (i, _) in header
        .windows(6)
        .enumerate()
        .filter(|(_, w)| w == b"qwen2.")
    {
        // The key, then its value's type (4 bytes), then the value.
        at.push(i + header[i..].iter().take_while(|b| printable(b)).count() + 4);
    }
    for name in tensors {
        // The table's entry: the name after its length (`output.weight` is also the end of
        // `blk.N.attn_output.weight`).
        let entry = [&(name.len() as u64).to_le_bytes()[..], name.as_bytes()].concat();
        let last = header
            .windows(entry.len())
            .rposition(|w| w == entry)
            .unwrap();
        at.push(last + entry.len());
    }
    // The table is a hash map: sorted, the same seed mutates the same places in every run.
    at.sort_unstable();
    at
}

/// `header` with one to four seeded changes, half of them near a size (`sizes_at`): a byte set at
/// random, or an edge value written over four or eight bytes (a count, a length, a dimension, a
/// type, an offset).
fn mutate(header: &[u8], sizes: &[usize], rng: &mut StdRng) -> Vec<u8> {
    let mut h = header.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let at = match rng.random_bool(0.5) {
            true => {
                (sizes[rng.random_range(0..sizes.len())] + rng.random_range(0..24)).min(h.len() - 1)
            }
            false => rng.random_range(0..h.len()),
        };
        if rng.random_bool(0.5) {
            h[at] = rng.random();
            continue;
        }
        let value = EDGES[rng.random_range(0..EDGES.len())].to_le_bytes();
        let width = if rng.random_bool(0.5) { 4 } else { 8 };
        let end = (at + width).min(h.len());
        h[at..end].copy_from_slice(&value[..end - at]);
    }
    h
}

#[test]
fn a_mutated_header_loads_or_names_the_file_in_one_line_and_never_panics() {
    let base = tiny_model::cached("fuzz", tiny_model::TinySpec::default());
    let bytes = std::fs::read(&base).unwrap();
    let content = gguf_file::Content::read(&mut std::io::Cursor::new(&bytes)).unwrap();
    let header = &bytes[..content.tensor_data_offset as usize];
    let sizes = sizes_at(header, &content.tensor_infos.keys().collect::<Vec<_>>());
    let path = tiny_model::tmp_path("fuzzed.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let code = tiny_model::tmp_path("fuzzed.py").display().to_string();
    std::fs::write(&code, "x = 1\n").unwrap();
    let (mut loaded, mut refused) = (0, 0);
    for seed in 0..CASES {
        let mutated = mutate(header, &sizes, &mut StdRng::seed_from_u64(seed));
        // The same length each time: every case overwrites the whole header of the one before.
        file.write_all_at(&mutated, 0).unwrap();
        let result = std::panic::catch_unwind(|| Model::load(&path, LoadOptions::default()))
            .unwrap_or_else(|_| panic!("seed {seed}: the loader panicked"));
        let refusal = match result {
            Ok(_) => {
                loaded += 1;
                None
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(&path.display().to_string()) && !msg.contains('\n'),
                    "seed {seed}: {msg}"
                );
                refused += 1;
                Some(msg)
            }
        };
        if seed % THROUGH_BINARY == 0 {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_star-ls"))
                .args(["complete", &code, "--line", "0", "--character", "4"])
                .env("STAR_LS_MODEL", &path)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!err.contains("panicked"), "seed {seed}: {err}");
            match &refusal {
                None => assert!(out.status.success(), "seed {seed}: {err}"),
                Some(msg) => assert!(
                    out.status.code() == Some(1)
                        && err
                            .trim()
                            .lines()
                            .last()
                            .is_some_and(|l| l.contains(msg.as_str())),
                    "seed {seed}: {:?} {err}",
                    out.status
                ),
            }
        }
    }
    eprintln!("{loaded} loaded, {refused} refused");
    assert!(refused > CASES / 2, "most mutations break the header");
}
