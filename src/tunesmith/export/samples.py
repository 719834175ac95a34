"""Conversations that merge and export check their artefacts on: the run's own eval data when there is some.

Parity is only as good as its inputs: prompts from the task the model was trained on exercise the weights the
adapter changed; the built-in ones are a fallback for a bare adapter folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError, where

BUILTIN_CONVERSATIONS: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}),
    ({"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."},
     {"role": "user", "content": "How many orders did each customer place in 2024?"},
     {"role": "assistant", "content": "SELECT customer_id, COUNT(*) FROM orders GROUP BY customer_id;"}),
    ({"role": "user", "content": 'Return JSON for Alice, 31: {"name": ..., "age": ...}'},
     {"role": "assistant", "content": '{"name": "Alice", "age": 31}'}),
    ({"role": "user", "content": "Say something about the quick brown fox."},
     {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."},
     {"role": "user", "content": "And the numbers?"},
     {"role": "assistant", "content": "0123456789 times."}),
)
"""Used when a run has no eval data: a few short chats mixing English, SQL and JSON, one of them multi-turn."""


def load_conversations(path: str | Path, limit: int) -> list[list[dict[str, Any]]]:
    """The first ``limit`` conversations (``messages`` lists) of a canonical JSONL file."""
    path = Path(path)
    out: list[list[dict[str, Any]]] = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where(path, number)}: not valid JSON ({exc.msg})") from None
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where(path, number, 'messages')}: expected a non-empty list of messages",
                            hint="use the canonical format written by `tunesmith data prepare`")
        out.append(messages)
        if len(out) >= limit:
            break
    return out


def conversations_for(run_dir: Path | None, limit: int = 4) -> list[list[dict[str, Any]]]:
    """The run's eval conversations if its manifest points to an eval file that exists, else the built-in ones."""
    eval_file = _eval_file(run_dir) if run_dir is not None else None
    if eval_file is not None:
        found = load_conversations(eval_file, limit)
        if found:
            return found
    return [list(c) for c in BUILTIN_CONVERSATIONS[:limit]]


def trained_in(model_dir: Path) -> Path | None:
    """The training run folder a merged model came from (its merge record names the adapter, inside the run
    folder or its ``adapter/``), so exports are checked on that run's eval conversations; None if unknown."""
    try:
        record = json.loads((model_dir / "export.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    adapter = record.get("adapter") if isinstance(record, dict) else None
    if not isinstance(adapter, str):
        return None
    for folder in (Path(adapter), Path(adapter).parent):
        if (folder / "run.json").is_file():
            return folder
    return None


def prompt_part(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation up to (not including) its last assistant turn: what a served model is given."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            return messages[:i] or messages
    return messages


def _eval_file(run_dir: Path) -> Path | None:
    """The eval JSONL a run was evaluated on: ``prepared/eval.jsonl`` beside it, or the path in run.json."""
    manifest = run_dir / "run.json"
    candidates: list[Path] = []
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            data = {}
        recorded = (data.get("eval") or {}).get("file") if isinstance(data.get("eval"), dict) else None
        if isinstance(recorded, str):
            candidates += [Path(recorded), run_dir / recorded]
        for value in _strings(data):
            if value.endswith("eval.jsonl"):
                candidates += [Path(value), run_dir / value]
    candidates.append(run_dir / "eval.jsonl")
    return next((p for p in candidates if p.is_file()), None)


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []
