"""Eval generation throughput: answers per second by batch size, and whether every batch size gives the same answers.

    OMP_NUM_THREADS=2 python bench/eval_generation.py --prompts 64 --max-new-tokens 32 --out bench/results/x.json

Uses the ``local:tiny`` model (2 layers, hidden 64; built on this machine, random weights): the numbers show the
batching overhead and gain of the left-padded transformers path, not a real model's speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from tunesmith.config import ModelConfig
from tunesmith.evaluate.evalset import EvalExample
from tunesmith.evaluate.generate import encode_prompts, generate_transformers
from tunesmith.models import load_model, load_tokenizer

QUESTIONS = ["What is the capital of France?", "Write a query to find the top 10 customers by revenue.",
             "Return JSON with name and age.", "How many orders did each customer place in 2024?",
             "The quick brown fox jumps over the lazy dog.", "Hi"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    cfg = ModelConfig(name_or_path="local:tiny")
    tokenizer = load_tokenizer(cfg)
    # random weights rarely produce the end-of-turn token: nearly every prompt generates max_new_tokens
    model = load_model(cfg, dtype=torch.float32).eval()
    examples = [EvalExample(i + 1, [{"role": "user", "content": " ".join([QUESTIONS[i % len(QUESTIONS)]] *
                                                                         (1 + i % 4))}], "")
                for i in range(args.prompts)]
    prompts = encode_prompts(tokenizer, examples)
    rows, reference = [], None
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        generate_transformers(model, tokenizer, prompts[:bs], args.max_new_tokens, bs)  # warm-up
        start = time.perf_counter()
        answers = generate_transformers(model, tokenizer, prompts, args.max_new_tokens, bs)
        seconds = time.perf_counter() - start
        reference = reference or answers
        rows.append({"batch_size": bs, "seconds": round(seconds, 3), "answers_per_s": round(len(prompts) / seconds, 2),
                     "same_answers_as_batch_1": answers == reference})
        print(f"batch {bs:3d}: {len(prompts) / seconds:8.2f} answers/s  ({seconds:.2f} s)  "
              f"same answers as batch {rows[0]['batch_size']}: {answers == reference}")
    result = {"bench": "eval_generation", "model": "local:tiny", "prompts": len(prompts),
              "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
              "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(),
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "torch": torch.__version__, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
