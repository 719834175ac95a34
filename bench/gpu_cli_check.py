"""End-to-end check of the product path on a GPU: `tunesmith train` (the CLI, config-driven, default fast engine)
for LoRA and QLoRA (and full fine-tuning with ``--methods full``) on a ≥ 1B-parameter random-weight Llama, bf16.
Prints one JSON line per method.

    python bench/gpu_cli_check.py --work /tmp/gpucheck --json-out results.json

Weights are random and the data is synthetic (chat turns restating numbers), so the loss can fall in a few steps;
the point is that the whole user path runs on real sizes: model folder → data file → config → train → adapter.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml


def build(work: Path, tiny: bool) -> tuple[Path, Path]:
    from tunesmith.local_model import LocalModelShape, build_model

    rng = random.Random(0)
    rows = []
    for _ in range(512):
        nums = [str(rng.randint(0, 9999)) for _ in range(rng.randint(20, 400))]
        rows.append({"messages": [{"role": "user", "content": "Repeat: " + " ".join(nums)},
                                  {"role": "assistant", "content": " ".join(nums)}]})
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Llama-3.2-1B-like body (hidden 2048, 16 heads of 128 … ) with 20 layers: 1.0 B parameters with a small vocabulary
    shape = LocalModelShape(hidden_size=2048, intermediate_size=8192, num_hidden_layers=20, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=2048, max_position_embeddings=4096)
    if tiny:  # CPU smoke check of this script
        shape = LocalModelShape(vocab_size=2048, max_position_embeddings=4096)
    corpus = [r["messages"][0]["content"] for r in rows[:200]]
    model = build_model(work / "model-1b", corpus, shape=shape, vocab_size=2048)
    return model, data


def run(method: str, model: Path, data: Path, work: Path, steps: int, optim: str = "auto") -> dict:
    cfg = {"model": {"name_or_path": str(model)},
           "train": {"method": method, "dataset": str(data), "max_steps": steps,
                     "learning_rate": 1e-3 if method != "full" else 1e-4, "optim": optim,
                     "warmup_ratio": 0.0, "max_length": 2048, "logging_steps": 1, "save_strategy": "no",
                     "eval_strategy": "no"}}
    path = work / f"{method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(path), "--out", str(work / method),
                           "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"method": method, "error": proc.stderr[-2000:]}
    result = json.loads(proc.stdout)
    steps = [json.loads(x) for x in (work / method / "metrics.jsonl").read_text().splitlines()]
    run_json = json.loads((work / method / "run.json").read_text())
    return {"method": method, "wall_s": round(time.perf_counter() - start, 1), "params": result["total_params"],
            "trainable": result["trainable_params"], "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"],
            "tokens_per_s_last": steps[-1].get("tokens_per_s"), "precision": run_json["precision"],
            "packing": run_json["packing"], "optimizer": run_json["plan"]["optimizer"],
            "master_weights": run_json["plan"]["master_weights"],
            "files": sorted(p.name for p in (work / method / ("model" if method == "full" else "adapter")).iterdir())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunesmith-gpucheck"))
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (CPU smoke check of the script)")
    parser.add_argument("--methods", nargs="+", default=["lora", "qlora"], choices=["lora", "qlora", "full"])
    parser.add_argument("--full-optim", default="auto", help="train.optim for the full fine-tuning run")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    import torch

    model, data = build(args.work, args.tiny)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    out = {"bench": "gpu_cli_check", "gpu": gpu, "torch": torch.__version__,
           "results": [run(m, model, data, args.work, 2 if args.tiny else 8, args.full_optim if m == "full" else "auto")
                       for m in args.methods]}
    print(json.dumps(out), flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
