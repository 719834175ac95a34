"""Small chat datasets and configs for training tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tunesmith.config import load_config


def write_arithmetic(folder: Path, n_train: int = 48, n_eval: int = 8, seed: int = 0) -> Path:
    """Variable-length chats: the answer restates the question, so lengths differ between examples."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for _ in range(n_train + n_eval):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        filler = " ".join(["please"] * rng.randint(0, 12))
        rows.append({"messages": [
            {"role": "system", "content": "You are a calculator."},
            {"role": "user", "content": f"What is {a} plus {b}? {filler}"},
            {"role": "assistant", "content": f"The answer is {a + b}."},
        ]})
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n_train]))
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[n_train:]))
    return folder


def config(model_dir: Path, data_dir: Path, **train):
    overrides = [f"model.name_or_path={model_dir}", f"train.dataset={data_dir}", "train.logging_steps=1",
                 "train.save_strategy=no", "train.eval_strategy=no"]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    return load_config(None, overrides)


def metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("type") == kind]
