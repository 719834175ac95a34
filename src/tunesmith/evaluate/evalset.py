"""The eval set: prompts and expected answers, from any of the three accepted shapes.

- a prepared folder → its ``eval.jsonl``;
- chat records ``{"messages": [...]}``: the last message is the assistant's expected answer, the ones before it
  are the prompt;
- ``{"input": ..., "expected": ...}`` records: the prompt is ``system`` (optional) + a user message made from
  ``prompt_template``. A non-string ``expected`` (a JSON object for the JSON metrics) is kept as JSON text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError, where

ROLES = ("system", "user", "assistant", "tool")


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
    """Every example of the file (or the first ``limit``); a broken line is a UserError naming file:line."""
    examples: list[EvalExample] = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if limit is not None and len(examples) >= limit:
                break
            text = _decode(raw, path, lineno)
            if not text.strip():
                continue
            examples.append(_example(_parse(text, path, lineno), path, lineno, prompt_template, system))
    if not examples:
        raise UserError(f"{path}: no examples (the file is empty)", hint="one JSON object per line")
    return examples


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    if lineno == 1:
        raw = raw.removeprefix(b"\xef\xbb\xbf")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{where(path, lineno)}: invalid UTF-8 at byte {exc.start + 1} of the line",
                        hint="save the file as UTF-8") from None
    if "\x00" in text:
        raise UserError(f"{where(path, lineno)}: NUL byte at column {text.index(chr(0)) + 1}")
    return text


def _parse(text: str, path: Path, lineno: int) -> dict[str, Any]:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where(path, lineno)}: invalid JSON at column {exc.colno}: {exc.msg}",
                        hint="one JSON object per line (JSONL)") from None
    except (RecursionError, ValueError) as exc:
        raise UserError(f"{where(path, lineno)}: unreadable JSON ({type(exc).__name__})") from None
    if not isinstance(record, dict):
        kind = "a JSON array" if isinstance(record, list) else type(record).__name__
        raise UserError(f"{where(path, lineno)}: expected a JSON object, got {kind}",
                        hint="one object per line: {\"messages\": [...]} or {\"input\": ..., \"expected\": ...}")
    return record


def _example(record: dict[str, Any], path: Path, lineno: int, template: str, system: str | None) -> EvalExample:
    if "messages" in record:
        return _chat_example(record, path, lineno)
    if "input" in record and "expected" in record:
        prompt = [{"role": "system", "content": system}] if system else []
        prompt.append({"role": "user", "content": template.replace("{input}", _as_text(record["input"]))})
        return EvalExample(lineno, prompt, _as_text(record["expected"]), record.get("tools"))
    missing = "expected" if "input" in record else "input" if "expected" in record else "messages"
    raise UserError(f"{where(path, lineno, missing)}: missing",
                    hint="each line needs `messages` (chat, last turn = expected answer) or `input` and `expected`")


def _chat_example(record: dict[str, Any], path: Path, lineno: int) -> EvalExample:
    messages = record["messages"]
    if not isinstance(messages, list) or len(messages) < 2:
        raise UserError(f"{where(path, lineno, 'messages')}: expected a list with a prompt and an answer")
    for i, msg in enumerate(messages, start=1):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES:
            role = msg.get("role") if isinstance(msg, dict) else None
            raise UserError(f"{where(path, lineno, f'messages[{i}].role')}: {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(msg.get("content"), str) and not msg.get("tool_calls"):
            raise UserError(f"{where(path, lineno, f'messages[{i}].content')}: expected a string")
    last = messages[-1]
    if last["role"] != "assistant" or not isinstance(last.get("content"), str):
        raise UserError(f"{where(path, lineno, f'messages[{len(messages)}]')}: the last message must be the "
                        "assistant's expected answer (text)")
    prompt = [{k: v for k, v in m.items() if k != "weight"} for m in messages[:-1]]
    return EvalExample(lineno, prompt, last["content"], record.get("tools"))


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
