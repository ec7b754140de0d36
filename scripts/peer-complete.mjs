#!/usr/bin/env node
// llama.cpp's line (through node-llama-cpp, installed by scripts/install-peer) for each of the prompts
// `star-ls complete --cases FILE --peer` completes, on the same GGUF: greedy, to the first newline or
// --max-tokens, as a llama.cpp completion plugin proposes a line.
//
//   node scripts/peer-complete.mjs --model GGUF --threads T --prompts FILE.json --max-tokens N
//        [--lora ADAPTER.gguf] [--peer-dir DIR (default $CACHE/peer)]
//
// FILE.json is `[{"id": str, "tokens": [int]}]`. Prints one JSON line per prompt on stdout,
// `{"id", "text", "stop": "end_of_line"|"stop_token"|"max_tokens"}`; llama.cpp's logs go to stderr.
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { loadPeer } from "./peer-llama.mjs";

const { values: opt } = parseArgs({
  options: {
    model: { type: "string" }, threads: { type: "string" }, prompts: { type: "string" },
    "max-tokens": { type: "string" }, "peer-dir": { type: "string" }, lora: { type: "string" },
  },
});
for (const k of ["model", "threads", "prompts", "max-tokens"])
  if (opt[k] == null) throw new Error(`missing --${k}`);
const threads = Number(opt.threads), maxTokens = Number(opt["max-tokens"]);
const prompts = JSON.parse(readFileSync(opt.prompts, "utf8"));
if (!Array.isArray(prompts) || !prompts.every(p => typeof p.id === "string" && Array.isArray(p.tokens)))
  throw new Error(`${opt.prompts}: expected a JSON array of {id, tokens}`);

const { llama, model } = await loadPeer({ peerDir: opt["peer-dir"], threads, modelPath: opt.model });
const longest = Math.max(1, ...prompts.map(p => p.tokens.length));
const context = await model.createContext({
  contextSize: longest + maxTokens + 8,
  batchSize: Math.max(512, longest),
  threads: { ideal: threads, min: threads },
  sequences: 1,
  // A LoRA adapter on the base, at scale 1 (star-ls patches export --format gguf-lora).
  ...(opt.lora ? { lora: { adapters: [{ filePath: opt.lora, scale: 1 }] } } : {}),
});
const seq = context.getSequence();

for (const p of prompts) {
  await seq.clearHistory();
  const tokens = [];
  let text = "", stop = "max_tokens";
  // temperature 0 is greedy (argmax); the end-of-generation token ends the line as ours does.
  for await (const tok of seq.evaluate(p.tokens, { temperature: 0, yieldEogToken: true })) {
    if (model.isEogToken(tok)) { stop = "stop_token"; break; }
    tokens.push(tok);
    text = model.detokenize(tokens);
    const nl = text.indexOf("\n");
    if (nl >= 0) { text = text.slice(0, nl); stop = "end_of_line"; break; }
    if (tokens.length >= maxTokens) break;
  }
  console.log(JSON.stringify({ id: p.id, text, stop }));
}
await llama.dispose();
