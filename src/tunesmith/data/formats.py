"""Readers: raw JSONL in the common fine-tuning formats → one canonical chat record per line.

The canonical record is the OpenAI chat format: ``{"messages": [{"role", "content", "weight"?, "tool_calls"?,
"tool_call_id"?, "name"?}, ...], "tools"?: [...]}``. Accepted inputs, detected per line by their keys:

- OpenAI chat: ``messages`` (``weight`` and tool calls pass through unchanged)
- ShareGPT: ``conversations`` of ``{"from": human|user|gpt|assistant|system|tool, "value": ...}``, optional ``system``
- alpaca: ``instruction``, optional ``input``, ``output``, optional ``system``
- prompt/completion: ``prompt``, ``completion``

Preference pairs (``train.objective: dpo``) have their own canonical record, OpenAI's preference format:
``{"input": {"messages": [...], "tools"?: [...]}, "preferred_output": [assistant message],
"non_preferred_output": [assistant message]}``. Accepted inputs:

- OpenAI preference: ``input``, ``preferred_output``, ``non_preferred_output`` (unchanged)
- TRL preference: ``prompt``, ``chosen``, ``rejected``, each a list of messages or a string (a string prompt is
  one user turn, a string answer one assistant turn, rendered with the chat template like every other format);
  without ``prompt``, ``chosen`` and ``rejected`` are whole conversations that differ only in their last message

Files are read line by line in binary with a per-line byte cap, so a multi-GB single line costs bounded memory
(256 KiB) and a whole file is never parsed at once. A UTF-8 BOM, CRLF line ends and blank lines are fine.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError, where

BOM = b"\xef\xbb\xbf"
DRAIN_CHUNK = 1 << 18
"""Bytes (256 KiB) read at a time while skipping the rest of an over-long line: memory stays near this,
whatever the line's size."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one line: where (file, 1-based line, field path) and why. Never the line's text."""

    source: str
    line: int | None
    reason: str
    field: str | None = None

    def __str__(self) -> str:
        return f"{where(self.source, self.line, self.field)}: {self.reason}"


@dataclass
class Example:
    """A non-blank input line: where it came from, its canonical record (None if unreadable) and its problems."""

    source: str
    line: int
    record: dict[str, Any] | None
    format: str = ""
    problems: list[Problem] = field(default_factory=list)
    tokens: int | None = None
    """Tokenised length once counted (chat template included), so it is counted once per example."""

    @property
    def id(self) -> str:
        """``file:line`` — how reports and rejects name an example (never by its text)."""
        return f"{self.source}:{self.line}"


Converter = Callable[[dict[str, Any]], tuple[dict[str, Any] | None, str, list[tuple[str | None, str]]]]
"""A parsed line → (record, format name, [(field, reason)]): ``to_canonical``, or the eval set's, which adds its
``{"input", "expected"}`` shape to these."""


def read_file(path: str | Path, max_line_bytes: int = 16 * 2**20, max_depth: int = 32,
              convert: Converter | None = None) -> list[Example]:
    """Every non-blank line of ``path`` as an Example (canonical record + per-line problems). The one reader of
    users' data files: data prepare, train, advise and eval all read through it.

    File-level problems (missing, empty, a JSON array instead of JSONL) raise ``UserError`` at once: no line of
    such a file can be used. ``convert``: how a parsed line becomes a record (default ``to_canonical``)."""
    path = Path(path)
    source = str(path)
    if path.is_dir():
        raise UserError(f"{source}: is a folder, not a data file", hint="give the JSONL file(s) in it")
    if not path.is_file():
        raise UserError(f"{source}: data file not found", hint="check the path")
    examples: list[Example] = []
    for line_no, text in iter_lines(path, max_line_bytes):
        if isinstance(text, Problem):
            examples.append(Example(source, line_no, None, problems=[text]))
            continue
        if not examples and text.lstrip().startswith("["):
            raise UserError(f"{where(source, line_no)}: this is a JSON array; tunesmith reads JSONL (one JSON "
                            "object per line)", hint=f"convert it, e.g. jq -c '.[]' {path.name} > data.jsonl")
        if not examples and text.strip() == "{":
            raise UserError(f"{where(source, line_no)}: this is pretty-printed JSON spread over several lines; "
                            "tunesmith reads JSONL (one JSON object per line)",
                            hint=f"convert it, e.g. jq -c . {path.name} > data.jsonl")
        examples.append(parse_line(source, line_no, text, max_depth, convert))
    if not examples:
        raise UserError(f"{source}: no examples (the file is empty or only blank lines)",
                        hint="one JSON object per line, e.g. {\"messages\": [...]}")
    return examples


def iter_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, str | Problem]]:
    """(1-based line number, text without line end) for each non-blank line, or a Problem for a line that is
    too long, not UTF-8 or holds NUL bytes. Byte positions in messages count from the start of the file."""
    source = str(path)
    with open(path, "rb") as fh:
        line_no = 0
        offset = 0
        while True:
            chunk = fh.readline(max_line_bytes + 1)
            if not chunk:
                return
            line_no += 1
            start = offset
            if len(chunk) > max_line_bytes and not chunk.endswith(b"\n"):
                size = len(chunk)
                del chunk
                while more := fh.readline(DRAIN_CHUNK):
                    size += len(more)
                    if more.endswith(b"\n"):
                        break
                offset += size
                yield line_no, Problem(source, line_no, f"line is {size:,} bytes, over data.max_line_bytes "
                                                        f"({max_line_bytes:,}); it was not read")
                continue
            offset += len(chunk)
            if line_no == 1 and chunk.startswith(BOM):
                chunk = chunk[len(BOM):]
                start += len(BOM)
            nul = chunk.find(b"\x00")
            if nul >= 0:
                yield line_no, Problem(source, line_no, f"NUL byte at byte {start + nul} of the file "
                                                        f"(column {nul + 1} of the line)")
                continue
            try:
                text = chunk.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield line_no, Problem(source, line_no, f"invalid UTF-8 at byte {start + exc.start} of the file "
                                                        f"(column {exc.start + 1} of the line)",
                                       )
                continue
            text = text.rstrip("\r\n")
            if text.strip():
                yield line_no, text


def parse_line(source: str, line_no: int, text: str, max_depth: int = 32, convert: Converter | None = None) -> Example:
    """One line of JSON → an Example with its canonical record, or with the problems that prevent one."""
    def bad(reason: str, fld: str | None = None) -> Example:
        return Example(source, line_no, None, problems=[Problem(source, line_no, reason, fld)])

    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return bad(f"invalid JSON at column {exc.colno}: {exc.msg}")
    except RecursionError:
        return bad(f"JSON nested too deeply (over data.max_depth={max_depth})")
    except ValueError as exc:  # e.g. an integer with more digits than Python converts (4,300)
        return bad(f"invalid JSON value: {str(exc).split('(')[0].strip()}")
    if not isinstance(obj, dict):
        return bad(f"expected a JSON object, got {_kind(obj)}")
    if _depth_exceeds(obj, max_depth):
        return bad(f"JSON nested too deeply (over data.max_depth={max_depth})")
    record, fmt, problems = (convert or to_canonical)(obj)
    problems = [Problem(source, line_no, reason, fld) for fld, reason in problems]
    return Example(source, line_no, record if not problems else None, fmt, problems)


def to_canonical(obj: dict[str, Any]) -> tuple[dict[str, Any] | None, str, list[tuple[str | None, str]]]:
    """(canonical record, format name, [(field, reason)]) for one parsed line. The record is not validated here
    beyond what conversion needs (``validate.check_record`` does that)."""
    if "preferred_output" in obj or "non_preferred_output" in obj:
        return obj, "openai_preference", []
    if "chosen" in obj or "rejected" in obj:
        return _from_trl_preference(obj)
    if "messages" in obj:
        return obj, "openai", []
    if "conversations" in obj:
        return _from_sharegpt(obj)
    if "instruction" in obj:
        return _from_alpaca(obj)
    if "prompt" in obj or "completion" in obj:
        return _from_prompt_completion(obj)
    keys = ", ".join(f"`{k}`" for k in list(obj)[:5]) or "none"
    return None, "", [("messages", f"missing (keys found: {keys}); expected `messages` (OpenAI chat), "
                                   "`conversations` (ShareGPT), `instruction`/`output` (alpaca) or "
                                   "`prompt`/`completion`; preference pairs: `input`/`preferred_output`/"
                                   "`non_preferred_output` (OpenAI) or `prompt`/`chosen`/`rejected` (TRL)")]


PREFERENCE_KEYS = ("input", "preferred_output", "non_preferred_output")
"""The canonical preference record's keys (OpenAI's preference fine-tuning format)."""


def is_preference(record: dict[str, Any]) -> bool:
    """Whether a canonical record is a preference pair (else a chat example)."""
    return "preferred_output" in record or "non_preferred_output" in record


def _from_trl_preference(obj: dict[str, Any]) -> tuple[dict[str, Any] | None, str, list[tuple[str | None, str]]]:
    """TRL's ``prompt``/``chosen``/``rejected`` (conversational or plain text, explicit or implicit prompt) → the
    canonical preference record. Only the shape is checked here; ``validate.check_preference`` checks the rest."""
    problems = _unknown_keys(obj, {"prompt", "chosen", "rejected", "tools", "id"})
    for key in ("chosen", "rejected"):
        if key not in obj:
            problems.append((key, "missing; a preference pair needs `chosen` and `rejected` answers"))
        elif not isinstance(obj[key], str | list):
            problems.append((key, f"must be a string or a list of messages, got {_kind(obj[key])}"))
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str | list):
        problems.append(("prompt", f"must be a string or a list of messages, got {_kind(prompt)}"))
    if problems:
        return None, "trl_preference", problems
    chosen, rejected = obj["chosen"], obj["rejected"]
    if prompt is None:  # implicit prompt: two whole conversations, the prompt is what they share
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            return None, "trl_preference", [("prompt", "missing; with plain-text `chosen`/`rejected` the prompt "
                                                       "must be given as `prompt`")]
        if len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
            return None, "trl_preference", [("rejected", "without `prompt`, `chosen` and `rejected` must be the "
                                                         "same conversation up to their last (answer) message")]
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    record: dict[str, Any] = {
        "input": {"messages": [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt},
        "preferred_output": [{"role": "assistant", "content": chosen}] if isinstance(chosen, str) else chosen,
        "non_preferred_output": [{"role": "assistant", "content": rejected}] if isinstance(rejected, str)
        else rejected}
    if obj.get("tools") is not None:
        record["input"]["tools"] = obj["tools"]
    return record, "trl_preference", []


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool"}


def _from_sharegpt(obj: dict[str, Any]) -> tuple[dict[str, Any] | None, str, list[tuple[str | None, str]]]:
    problems = _unknown_keys(obj, {"conversations", "system", "tools", "id"})
    turns = obj["conversations"]
    if not isinstance(turns, list) or not turns:
        return None, "sharegpt", [*problems, ("conversations", "must be a non-empty list of turns")]
    messages: list[dict[str, Any]] = []
    system = obj.get("system")
    if system is not None:
        if not isinstance(system, str):
            problems.append(("system", f"must be a string, got {_kind(system)}"))
        elif system.strip():
            messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        fld = f"conversations[{i}]"
        if not isinstance(turn, dict):
            problems.append((fld, f"must be an object, got {_kind(turn)}"))
            continue
        problems += _unknown_keys(turn, {"from", "value", "weight"}, prefix=fld + ".")
        who = turn.get("from")
        if who not in SHAREGPT_ROLES:
            problems.append((f"{fld}.from", f"unknown speaker {_short(who)} (expected one of "
                                            f"{', '.join(SHAREGPT_ROLES)})"))
            continue
        msg = {"role": SHAREGPT_ROLES[who], "content": turn.get("value")}
        if "weight" in turn:
            msg["weight"] = turn["weight"]
        messages.append(msg)
    record: dict[str, Any] = {"messages": messages}
    if obj.get("tools") is not None:
        record["tools"] = obj["tools"]
    return (None if problems else record), "sharegpt", problems


def _from_alpaca(obj: dict[str, Any]) -> tuple[dict[str, Any] | None, str, list[tuple[str | None, str]]]:
    problems = _unknown_keys(obj, {"instruction", "input", "output", "system", "id"})
    for key in ("instruction", "output"):
        if not isinstance(obj.get(key), str):
            problems.append((key, "missing" if key not in obj else f"must be a string, got {_kind(obj[key])}"))
    for key in ("input", "system"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            problems.append((key, f"must be a string, got {_kind(obj[key])}"))
    if problems:
        return None, "alpaca", problems
    prompt = obj["instruction"] + (f"\n\n{obj['input']}" if obj.get("input", "").strip() else "")
    messages = [{"role": "system", "content": obj["system"]}] if (obj.get("system") or "").strip() else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": obj["output"]}]
    return {"messages": messages}, "alpaca", []


def _from_prompt_completion(obj: dict[str, Any]) -> tuple[dict[str, Any] | None, str, list[tuple[str | None, str]]]:
    problems = _unknown_keys(obj, {"prompt", "completion", "id"})
    for key in ("prompt", "completion"):
        if not isinstance(obj.get(key), str):
            problems.append((key, "missing" if key not in obj else f"must be a string, got {_kind(obj[key])}"))
    if problems:
        return None, "prompt_completion", problems
    return {"messages": [{"role": "user", "content": obj["prompt"]},
                         {"role": "assistant", "content": obj["completion"]}]}, "prompt_completion", []


def _unknown_keys(obj: dict[str, Any], allowed: set[str], prefix: str = "") -> list[tuple[str | None, str]]:
    return [(f"{prefix}{k}", f"unknown key (expected {', '.join(sorted(allowed))})") for k in obj if k not in allowed]


def _depth_exceeds(obj: Any, limit: int) -> bool:
    """Whether ``obj`` nests deeper than ``limit`` (iterative: a hostile line cannot exhaust the stack)."""
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, dict | list))
    return False


def _kind(value: Any) -> str:
    """A value's JSON type in words (never the value itself: it may be training text)."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    """A role/speaker name for a message: quoted if a short string, else its type."""
    if isinstance(value, str) and len(value) <= 20:
        return repr(value)
    return "missing" if value is None else _kind(value)
