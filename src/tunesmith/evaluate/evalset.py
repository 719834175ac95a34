"""The eval set: prompts and expected answers, read by the data stage's reader (``tunesmith.data.formats``).

- a prepared folder → its ``eval.jsonl``;
- chat records in any format ``tunesmith data prepare`` reads (OpenAI ``messages``, ShareGPT, alpaca,
  prompt/completion), checked by the same rules: the last message is the assistant's expected answer, the ones
  before it are the prompt;
- ``{"input": ..., "expected": ...}`` records: the prompt is ``system`` (optional) + a user message made from
  ``prompt_template``. A non-string ``expected`` (a JSON object for the JSON metrics) is kept as JSON text.

A broken line is refused with the message data prepare gives for it (file:line: field: reason), all of them at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.formats import Example, Problem, read_file, to_canonical
from ..data.validate import check_record, raise_problems
from ..errors import UserError

CHAT_KEYS = {"messages", "conversations", "instruction", "prompt", "completion"}
"""Keys by which the data stage's reader recognises a chat record (any other line with ``input`` or ``expected`` is
an eval-shaped one)."""
EVAL_KEYS = {"input", "expected", "tools", "id"}
MAX_ERRORS = 20


@dataclass(frozen=True)
class EvalExample:
    line: int
    """1-based line in the eval file (how reports and errors point at an example)."""
    messages: list[dict[str, Any]]
    """The prompt: every message before the expected answer."""
    expected: str
    tools: list[dict[str, Any]] | None = None

    @property
    def input(self) -> str:
        """The last user message: what a person reading the report wants to see as the question."""
        users = [m for m in self.messages if m.get("role") == "user"]
        return str(users[-1].get("content", "")) if users else ""

    def conversation(self) -> list[dict[str, Any]]:
        """The prompt plus the expected answer as an assistant turn (what eval loss is computed on)."""
        return [*self.messages, {"role": "assistant", "content": self.expected}]


def eval_file(dataset: str | None, train_dataset: str | None = None) -> Path:
    """The JSONL file behind ``eval.dataset`` (a prepared folder's eval.jsonl, or the file itself). Unset, the
    prepared folder of ``train.dataset`` lends its held-out eval.jsonl (never a training file)."""
    if not dataset and train_dataset and (Path(train_dataset) / "eval.jsonl").is_file():
        return Path(train_dataset) / "eval.jsonl"
    if not dataset:
        raise UserError("eval.dataset is not set",
                        hint="point it at a prepared folder (its eval.jsonl) or an eval JSONL file")
    path = Path(dataset)
    if path.is_dir():
        if not (path / "eval.jsonl").is_file():
            raise UserError(f"eval.dataset: {path} has no eval.jsonl",
                            hint="prepare the data with an eval split, or point eval.dataset at a JSONL file")
        return path / "eval.jsonl"
    if not path.is_file():
        raise UserError(f"eval.dataset: {path} does not exist")
    return path


def load_eval_set(path: Path, prompt_template: str = "{input}", system: str | None = None,
                  limit: int | None = None) -> list[EvalExample]:
    """Every example of the file (or the first ``limit``); broken lines are one UserError naming file:line."""
    examples = read_file(path, convert=_eval_record)
    for ex in examples:
        if ex.record is not None and ex.format != "eval":
            ex.problems += (check_record(ex.record, ex.source, ex.line, for_training=False, unit=ex.unit)
                            or _answer_problems(ex))
    raise_problems([p for ex in examples for p in ex.problems], MAX_ERRORS,
                   hint="fix these lines of the eval set: each is a chat record (its last message the expected "
                        "answer) or {\"input\": ..., \"expected\": ...}")
    return [_example(ex, prompt_template, system) for ex in examples[:limit]]


def _eval_record(obj: dict[str, Any]) -> tuple[dict[str, Any] | None, str, list[tuple[str | None, str]]]:
    """The data stage's conversion, plus the eval-only ``{"input", "expected"}`` shape."""
    if CHAT_KEYS & obj.keys() or not {"input", "expected"} & obj.keys():
        return to_canonical(obj)
    problems: list[tuple[str | None, str]] = [(k, "missing") for k in ("input", "expected") if k not in obj]
    problems += [(k, f"unknown key (expected {', '.join(sorted(EVAL_KEYS))})") for k in obj if k not in EVAL_KEYS]
    if obj.get("tools") is not None and not isinstance(obj["tools"], list):
        problems.append(("tools", "must be a list of tool definitions"))
    return (None if problems else obj), "eval", problems


def _answer_problems(ex: Example) -> list[Problem]:
    """The eval set's one rule beyond the data stage's: the conversation ends with the expected answer."""
    messages = ex.record["messages"]
    last = messages[-1]
    if len(messages) >= 2 and last.get("role") == "assistant" and isinstance(last.get("content"), str):
        return []
    return [Problem(ex.source, ex.line, "the last message must be the assistant's expected answer (text), after at "
                                        "least one prompt message", f"messages[{len(messages) - 1}]", ex.unit)]


def _example(ex: Example, template: str, system: str | None) -> EvalExample:
    record = ex.record
    if ex.format == "eval":
        prompt = [{"role": "system", "content": system}] if system else []
        prompt.append({"role": "user", "content": template.replace("{input}", _as_text(record["input"]))})
        return EvalExample(ex.line, prompt, _as_text(record["expected"]), record.get("tools"))
    messages = record["messages"]
    prompt = [{k: v for k, v in m.items() if k != "weight"} for m in messages[:-1]]
    return EvalExample(ex.line, prompt, messages[-1]["content"], record.get("tools"))


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
