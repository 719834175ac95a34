"""Conversations that merge and export check their artefacts on: the run's own eval data when there is some.

Parity is only as good as its inputs: prompts from the task the model was trained on exercise the weights the
adapter changed; the built-in ones are a fallback for a bare adapter folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..data.formats import is_preference
from ..errors import UserError, where
from ..records import ExportRecord, TrainRun

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
        if isinstance(record, dict) and is_preference(record):  # a preference pair: its preferred conversation
            record = {"messages": [*record["input"].get("messages", []), *record["preferred_output"]]}
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where(path, number, 'messages')}: expected a non-empty list of messages",
                            hint="use the canonical format written by `tunesmith data prepare`")
        out.append(messages)
        if len(out) >= limit:
            break
    return out


def conversations_for(run: TrainRun | None, limit: int = 4) -> list[list[dict[str, Any]]]:
    """The run's eval conversations if it had an eval file that still exists, else the built-in ones."""
    eval_file = run.existing_eval_file() if run is not None else None
    if eval_file is not None:
        found = load_conversations(eval_file, limit)
        if found:
            return found
    return [list(c) for c in BUILTIN_CONVERSATIONS[:limit]]


def trained_in(model_dir: Path) -> TrainRun | None:
    """The train run a merged model came from (its merge record names it), so exports are checked on that run's
    eval conversations; None for a model folder that merge did not write or whose run folder is gone."""
    if not (model_dir / ExportRecord.FILE).is_file():
        return None
    run_dir = ExportRecord.read(model_dir).train_run
    if run_dir is None or not (Path(run_dir) / TrainRun.FILE).is_file():
        return None
    return TrainRun.read(run_dir)


def prompt_part(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation up to (not including) its last assistant turn: what a served model is given."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            return messages[:i] or messages
    return messages
