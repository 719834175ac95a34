"""SmolLM2-135M-Instruct on the CPU, tunesmith against plain transformers + PEFT, side by side in one run.

    python bench/smollm2_cpu.py --out bench/results/smollm2_cpu.json

train: LoRA r 16 / alpha 32 / dropout 0.05 on all seven projections, fp32, micro-batch 8, on the SQL demo's
examples; `tunesmith.train.train` against a hand-written loop over the same examples in the same order (PEFT
`get_peft_model`, right padding, `model(..., labels=...)`, `torch.optim.AdamW`). Tokens/s over the steps after the
first two (warm-up), real tokens only (padding not counted), both measured alike; the two alternate, `--rounds`
times each, so a busy moment of the machine hits both.
eval: 200 held-out demo questions, greedy, `max_new_tokens` 64, batch 25, on the base model (it writes long
answers: the most tokens): `tunesmith.evaluate.evaluate` (its generation phase, and the whole call with loading,
scoring and eval loss) against `model.generate` on left-padded batches of the same prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from tunesmith.config import load_config
from tunesmith.demo import write_demo
from tunesmith.local_model import ensure_named_model

LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-eval", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model_dir = ensure_named_model("smollm2-135m-instruct")
    work = Path(tempfile.mkdtemp(prefix="bench-smollm2-"))
    demo = write_demo(work / "data", num_train=args.steps * 8 + 8, num_eval=200)

    train_rows: dict[str, list[float]] = {"tunesmith": [], "plain_peft": []}
    for r in range(args.rounds):
        train_rows["tunesmith"].append(_tunesmith_train(model_dir, demo.train.parent, work / f"ts{r}", args.steps))
        train_rows["plain_peft"].append(_plain_train(model_dir, demo.train.parent, args.steps))
        print(f"round {r + 1}: tunesmith {train_rows['tunesmith'][-1]:.1f} tok/s, "
              f"plain PEFT {train_rows['plain_peft'][-1]:.1f} tok/s", flush=True)
    result: dict = {
        "command": "python bench/smollm2_cpu.py" + (f" --out {args.out}" if args.out else ""),
        "machine": f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
                   f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "train": {"steps": args.steps, "micro_batch": 8, "tokens_per_s": train_rows,
                  "ratio_median": statistics.median(train_rows["tunesmith"]) / statistics.median(
                      train_rows["plain_peft"])},
    }
    if not args.skip_eval:
        ts = _tunesmith_eval(model_dir, demo, work)
        plain = _plain_generate(model_dir, demo)
        result["eval"] = {"answers": 200, "max_new_tokens": 64, "batch": 25, "tunesmith": ts, "plain_generate": plain,
                          "ratio_generation": plain["seconds"] / ts["generation_seconds"]}
        print(f"eval: tunesmith generation {ts['generation_seconds']:.1f} s (whole call {ts['seconds']:.1f} s), "
              f"plain generate {plain['seconds']:.1f} s", flush=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def _tunesmith_train(model_dir: Path, data: Path, out: Path, steps: int) -> float:
    from tunesmith.train import train

    cfg = load_config(None, [f"model.name_or_path={model_dir}", f"train.dataset={data}", "train.method=lora",
                             f"train.lora.r={LORA['r']}", f"train.lora.alpha={LORA['alpha']}",
                             f"train.lora.dropout={LORA['dropout']}", f"train.max_steps={steps}",
                             "train.per_device_train_batch_size=8", "train.gradient_accumulation_steps=1",
                             "train.learning_rate=1e-3", "train.max_length=160", "train.logging_steps=1",
                             "train.eval_strategy=no", "train.save_strategy=no"])
    train(cfg, out_dir=out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_after_warmup = [r for r in rows if r.get("type") == "train" and r["step"] > 2]
    tokens = sum(r["tokens"] for r in steps_after_warmup)
    return tokens / sum(r["tokens"] / r["tokens_per_s"] for r in steps_after_warmup)


def _examples(tokenizer, data: Path):
    from tunesmith.train.dataset import tokenize_split

    return tokenize_split(data / "train.jsonl", tokenizer, 160, "drop").examples


def _plain_train(model_dir: Path, data: Path, steps: int) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.train.batching import epoch_order, step_groups

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = _examples(tokenizer, data)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    groups = step_groups(epoch_order(len(examples), 0, 0), 8)
    tokens = 0
    start = 0.0
    for step, indices in enumerate(groups[:steps], start=1):
        if step == 3:
            start = time.perf_counter()
        batch = [examples[i] for i in indices]
        width = max(len(e.input_ids) for e in batch)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in batch])
        labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in batch])
        mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 3:
            tokens += int(mask.sum())
    return tokens / (time.perf_counter() - start)


def _tunesmith_eval(model_dir: Path, demo, work: Path) -> dict:
    from tunesmith.evaluate import evaluate

    config = work / "eval.yaml"
    config.write_text(yaml.safe_dump({"model": {"name_or_path": str(model_dir)}, "eval": {
        "dataset": str(demo.eval), "metrics": [{"type": "sql_execution", "database": str(demo.database)}],
        "max_new_tokens": 64, "batch_size": 25, "bootstrap_samples": 200}}))
    cfg = load_config(config)
    marks: dict[str, float] = {}

    def on_event(event: dict) -> None:
        if event["event"] == "model":
            marks["start"] = time.perf_counter()
        elif event["event"] == "generate" and event["done"] == event["total"]:
            marks["generated"] = time.perf_counter()

    start = time.perf_counter()
    evaluate(cfg, models=["base"], out_dir=work / "eval", on_event=on_event)
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (work / "eval" / "predictions.jsonl").read_text().splitlines()]
    return {"seconds": round(seconds, 1), "generation_seconds": round(marks["generated"] - marks["start"], 1),
            "answers": len(rows)}


def _plain_generate(model_dir: Path, demo) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.chat import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [prompt_ids(tokenizer, json.loads(line)["messages"][:-1])
               for line in demo.eval.read_text().splitlines()]
    new_tokens = 0
    start = time.perf_counter()
    for i in range(0, len(prompts), 25):
        batch = prompts[i:i + 25]
        width = max(map(len, batch))
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64, do_sample=False,
                                 pad_token_id=pad)
        new_tokens += int((out[:, width:] != pad).sum())
    return {"seconds": round(time.perf_counter() - start, 1), "new_tokens": new_tokens}


if __name__ == "__main__":
    main()
