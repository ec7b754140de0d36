#!/usr/bin/env node
// Ground-truth token ids from llama.cpp (through node-llama-cpp, see scripts/install-peer) for a text file,
// so star-ls's own tokenizer can be checked against them byte for byte.
//
//   node scripts/tokenizer-fixture.mjs                       # regenerates fixtures/tokenizer/mixed-unicode.llama-cpp.json
//   node scripts/tokenizer-fixture.mjs --text F --out O.json [--bare] [--model GGUF] [--peer-dir DIR]
//
// --bare writes just the id array (the --prompt-ids format of scripts/peer-bench.mjs).
import { readFileSync, writeFileSync } from "node:fs";
import { homedir } from "node:os";
import { basename, dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { parseArgs } from "node:util";

const repo = join(dirname(fileURLToPath(import.meta.url)), "..");
const cache = process.env.STAR_LS_CACHE_DIR ||
  join(process.env.XDG_CACHE_HOME || join(homedir(), ".cache"), "star-ls");
const MODEL = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
const { values: opt } = parseArgs({
  options: {
    text: { type: "string", default: join(repo, "fixtures/tokenizer/mixed-unicode.txt") },
    out: { type: "string" }, bare: { type: "boolean", default: false },
    model: { type: "string", default: join(cache, "models", MODEL) },
    "peer-dir": { type: "string", default: join(cache, "peer") },
  },
});
const out = opt.out ?? opt.text.replace(/\.txt$/, "") + ".llama-cpp.json";

const { getLlama, LlamaLogLevel } = await import(
  pathToFileURL(join(opt["peer-dir"], "node_modules/node-llama-cpp/dist/index.js")).href);
const llama = await getLlama({
  gpu: false, build: "never", logLevel: LlamaLogLevel.warn,
  logger: (level, msg) => process.stderr.write(`llama.cpp[${level}]: ${msg}\n`),
});
// vocabOnly: the tokenizer needs only the GGUF metadata, not the weights.
const model = await llama.loadModel({ modelPath: opt.model, gpuLayers: 0, vocabOnly: true });

// Read as UTF-8 without any newline translation: \r\n and lone \r are part of what is being tested.
const text = readFileSync(opt.text, "utf8");
// specialTokens=false: "<|fim_prefix|>" etc. in the text must come out as plain text pieces.
// The addon calls common_tokenize(vocab, text, add_special=false, parse_special), so no BOS is added either.
const ids = Array.from(model.tokenize(text, false));
if (model.detokenize(ids, false) !== text) process.stderr.write("tokenizer-fixture: WARNING: ids do not detokenize to the text\n");

const source = `llama.cpp via node-llama-cpp 3.22.1 (llama.cpp release ${llama.llamaCppRelease?.release ?? "?"}): ` +
  `model.tokenize(text, false) on ${basename(opt.text)} (UTF-8, read verbatim) with ${basename(opt.model)}; ` +
  `no special-token parsing, no BOS. Regenerate: node scripts/tokenizer-fixture.mjs`;
writeFileSync(out, (opt.bare ? JSON.stringify(ids) : JSON.stringify({ source, ids })) + "\n");
process.stderr.write(`tokenizer-fixture: ${ids.length} ids -> ${out}\n`);
await llama.dispose();
