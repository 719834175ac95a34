"""Small data builders shared by the tests/test_data_*.py files (lexically distinct examples, JSONL writers)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def words(seed: int, n: int) -> str:
    """``n`` pseudo-words from a seeded generator: two different seeds share almost no word 3-grams."""
    rng = random.Random(seed)
    return " ".join("".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 8))) for _ in range(n))


def chat(i: int, answer_words: int = 30) -> dict[str, Any]:
    """A distinct two-turn example; its answer is far above 20 tokens for the tiny tokenizer."""
    return {"messages": [{"role": "user", "content": f"question {i}: {words(i, 8)}"},
                         {"role": "assistant", "content": words(10_000 + i, answer_words)}]}


def write_jsonl(path: Path, rows: list[Any], newline: str = "\n") -> Path:
    """Rows (dicts, or raw strings written as they are) as a JSONL file."""
    with open(path, "w", encoding="utf-8", newline="") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + newline)
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def config(model_dir: Path, **data: Any) -> dict[str, Any]:
    """Config values for prepare(): the tiny test model, the embedding pass off unless asked (it loads a real
    sentence model), and no minimum example count unless given."""
    values: dict[str, Any] = {"embedding": {"enabled": False}, "min_examples": 1, **data}
    return {"model": {"name_or_path": str(model_dir)}, "data": values}
