"""Reads a PEFT adapter back with the safetensors package and compares each layer's B·A with the
deltas of a star-ls patch bundle of the same patches. Usage: peft_check.py ADAPTER_DIR BUNDLE.json
Prints JSON: the adapter's rank, its layers, and the largest |B·A − ΔW| over every layer."""
import json
import sys

import numpy as np
from safetensors.numpy import load_file

adapter_dir, bundle_path = sys.argv[1:]
config = json.load(open(f"{adapter_dir}/adapter_config.json"))
tensors = load_file(f"{adapter_dir}/adapter_model.safetensors")
bundle = json.load(open(bundle_path))

wanted = {}
for entry in bundle["entries"]:
    for layer in entry["layers"]:
        hidden, columns = layer["hidden"], layer["columns"]
        delta = np.array(layer["delta"], dtype=np.float32).reshape(hidden, len(columns))
        wanted.setdefault(layer["layer"], {})
        for j, c in enumerate(columns):
            wanted[layer["layer"]][c] = wanted[layer["layer"]].get(c, 0) + delta[:, j]

diff = 0.0
for l, columns in wanted.items():
    name = f"base_model.model.model.layers.{l}.mlp.down_proj"
    a, b = tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]
    assert a.shape[0] == b.shape[1] == config["r"], (a.shape, b.shape, config["r"])
    product = b.astype(np.float64) @ a.astype(np.float64)
    expected = np.zeros_like(product)
    for c, d in columns.items():
        expected[:, c] = d
    diff = max(diff, float(np.abs(product - expected).max()))

print(json.dumps({
    "rank": config["r"],
    "alpha": config["lora_alpha"],
    "targets": config["target_modules"],
    "layers": sorted(config["layers_to_transform"]),
    "bundleLayers": sorted(wanted),
    "tensors": len(tensors),
    "maxDiff": diff,
}))
