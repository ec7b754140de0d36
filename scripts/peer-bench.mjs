#!/usr/bin/env node
// Reference speed of llama.cpp (through node-llama-cpp, installed by scripts/install-peer) on the same
// model and the same prompt token ids star-ls is benchmarked with, so the two numbers are comparable.
//
//   node scripts/peer-bench.mjs --model GGUF --threads T --prompt-ids FILE.json --decode N
//        [--reps R (default 3)] [--lora ADAPTER.gguf] [--peer-dir DIR (default $CACHE/peer)]
//
// Prints one JSON line on stdout; everything else (llama.cpp logs, per-run numbers) goes to stderr.
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { loadPeer } from "./peer-llama.mjs";

const { values: opt } = parseArgs({
  options: {
    model: { type: "string" }, threads: { type: "string" }, "prompt-ids": { type: "string" },
    decode: { type: "string" }, reps: { type: "string", default: "3" }, "peer-dir": { type: "string" },
    lora: { type: "string" },
  },
});
for (const k of ["model", "threads", "prompt-ids", "decode"])
  if (opt[k] == null) throw new Error(`missing --${k}`);
const threads = Number(opt.threads), nDecode = Number(opt.decode), reps = Number(opt.reps);
const prompt = JSON.parse(readFileSync(opt["prompt-ids"], "utf8"));
if (!Array.isArray(prompt) || prompt.length === 0 || !prompt.every(Number.isInteger))
  throw new Error(`${opt["prompt-ids"]}: expected a non-empty JSON array of token ids`);
if (!(nDecode >= 2)) throw new Error("--decode must be at least 2");

const { llama, model } = await loadPeer({ peerDir: opt["peer-dir"], threads, modelPath: opt.model });
const context = await model.createContext({
  contextSize: prompt.length + nDecode + 64,
  batchSize: Math.max(512, prompt.length), // whole prompt in one batch, as a completion server would do it
  threads: { ideal: threads, min: threads },
  sequences: 1,
  // A LoRA adapter on the base, at scale 1 (star-ls patches export --format gguf-lora).
  ...(opt.lora ? { lora: { adapters: [{ filePath: opt.lora, scale: 1 }] } } : {}),
});
const seq = context.getSequence();
process.stderr.write(`peer-bench: ${llama.buildType} binary, threads ${context.currentThreads}, context ${context.contextSize}, ` +
  `batch ${context.batchSize}, flashAttention ${context.flashAttention}; ${llama.systemInfo.trim()}\n`);
// temperature 0 is node-llama-cpp's greedy sampler (argmax); no repeat/DRY penalties are set.
// yieldEogToken keeps generating past EOS so every run decodes exactly N tokens.
const greedy = { temperature: 0, yieldEogToken: true };

// One run from an empty KV cache: prefill = evaluating the whole prompt up to the first greedy token
// (that token comes from the prompt's last logits); decode = the N-1 single-token steps after it.
async function run(promptIds, n) {
  await seq.clearHistory();
  const tokens = [];
  const t0 = performance.now();
  let t1 = t0;
  for await (const tok of seq.evaluate(promptIds, greedy)) {
    if (tokens.length === 0) t1 = performance.now();
    tokens.push(tok);
    if (tokens.length === n) break; // break ends the generator, so no extra step is evaluated
  }
  const t2 = performance.now();
  return { prefillS: (t1 - t0) / 1e3, decodeS: (t2 - t1) / 1e3, tokens };
}

await run(prompt.slice(0, 32), 4); // warmup: page in the mmapped weights, spin up the thread pool

const runs = [];
for (let i = 0; i < reps; i++) {
  const r = await run(prompt, nDecode);
  runs.push(r);
  process.stderr.write(`peer-bench: run ${i + 1}/${reps}: prefill ${(prompt.length / r.prefillS).toFixed(1)} tok/s, ` +
    `decode ${((r.tokens.length - 1) / r.decodeS).toFixed(1)} tok/s\n`);
}
// Greedy must be deterministic; differing runs would mean the comparison ids are meaningless.
const first = JSON.stringify(runs[0].tokens);
if (runs.some(r => JSON.stringify(r.tokens) !== first)) process.stderr.write("peer-bench: WARNING: runs decoded different tokens\n");

// Median, not best: on a small shared machine the best run mostly measures luck in scheduling.
const median = xs => { const s = [...xs].sort((a, b) => a - b), m = s.length >> 1; return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2; };
const tokens = runs[0].tokens;
console.log(JSON.stringify({
  name: "llama.cpp (node-llama-cpp 3.22.1)",
  prefill_tok_s: +median(runs.map(r => prompt.length / r.prefillS)).toFixed(2),
  decode_tok_s: +median(runs.map(r => (r.tokens.length - 1) / r.decodeS)).toFixed(2),
  prompt_tokens: prompt.length,
  decoded_tokens: tokens.length,
  tokens,
}));
await llama.dispose();
