// What scripts/peer-bench.mjs and scripts/peer-complete.mjs share: llama.cpp through node-llama-cpp,
// installed by scripts/install-peer, on the CPU only.
import { homedir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

// The prebuilt CPU llama.cpp on `threads` threads, and the GGUF at `modelPath` loaded in it.
export async function loadPeer({ peerDir, threads, modelPath }) {
  // Same directory rule as scripts/install-peer; import by file path since the peer is not on NODE_PATH.
  const cache = process.env.STAR_LS_CACHE_DIR ||
    join(process.env.XDG_CACHE_HOME || join(homedir(), ".cache"), "star-ls");
  const dir = peerDir ?? join(cache, "peer");
  const { getLlama, LlamaLogLevel } = await import(
    pathToFileURL(join(dir, "node_modules/node-llama-cpp/dist/index.js")).href);
  const llama = await getLlama({
    gpu: false, build: "never", // prebuilt CPU binary only: never fall back to compiling llama.cpp
    maxThreads: threads,
    logLevel: LlamaLogLevel.warn, logger: (level, msg) => process.stderr.write(`llama.cpp[${level}]: ${msg}\n`),
  });
  const model = await llama.loadModel({ modelPath, gpuLayers: 0 });
  return { llama, model };
}
