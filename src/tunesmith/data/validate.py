"""Structural validation of canonical chat records — the bar is OpenAI's file validation.

Each problem names the file, the 1-based line, the field (``messages[2].role``: message index 2, counted from 0
as in the JSON) and what is wrong; never the training text. ``check_record`` returns the problems of one record;
``raise_problems`` turns a list of them into one ``UserError`` (up to a cap, then "and N more"). ``read_numbered``
is what every later reader of a user's file calls (train, advise): read in any accepted format, then checked here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from .formats import Problem, _kind, _short, read_file

ROLES = ("system", "user", "assistant", "tool")
RECORD_KEYS = {"messages", "tools", "parallel_tool_calls"}
MESSAGE_KEYS = {"role", "content", "weight", "tool_calls", "tool_call_id", "name"}
ROLE_ALIASES = {"bot": "assistant", "gpt": "assistant", "model": "assistant", "ai": "assistant",
                "human": "user", "developer": "system", "function": "tool"}
"""Roles other tools or datasets use, and the canonical role they probably mean (only suggested, never applied:
guessing a role silently would train on the wrong turns)."""


def check_record(record: dict[str, Any], source: str, line: int, for_training: bool = True) -> list[Problem]:
    """Every structural problem of one canonical record (an empty list when it is fine to train on).
    ``for_training=False`` (an eval set): no rule about what there is to learn from, the structure only."""
    out: list[Problem] = []

    def add(reason: str, fld: str | None = None) -> None:
        out.append(Problem(source, line, reason, fld))

    for key in record:
        if key not in RECORD_KEYS:
            add(f"unknown key (expected {', '.join(sorted(RECORD_KEYS))})", key)
    if "tools" in record and not isinstance(record["tools"], list):
        add(f"must be a list of tool definitions, got {_kind(record['tools'])}", "tools")
    messages = record.get("messages")
    if not isinstance(messages, list):
        add(f"must be a list of messages, got {_kind(messages)}", "messages")
        return out
    if not messages:
        add("is empty; an example needs at least a user and an assistant message", "messages")
        return out
    assistants = trained = 0
    roles_ok = True  # "no assistant message" follows from a broken role; report only the cause
    for i, msg in enumerate(messages):
        fld = f"messages[{i}]"
        if not isinstance(msg, dict):
            add(f"must be an object with role and content, got {_kind(msg)}", fld)
            roles_ok = False
            continue
        for key in msg:
            if key not in MESSAGE_KEYS:
                add(f"unknown key (expected {', '.join(sorted(MESSAGE_KEYS))})", f"{fld}.{key}")
        role = msg.get("role")
        if "role" not in msg:
            add("missing", f"{fld}.role")
            roles_ok = False
        elif role not in ROLES:
            add(f"unknown role {_short(role)}{_role_hint(role)}", f"{fld}.role")
            roles_ok = False
        has_calls = role == "assistant" and bool(msg.get("tool_calls"))
        content = msg.get("content")
        if "content" not in msg and not has_calls:
            add("missing", f"{fld}.content")
        elif content is None and not has_calls:
            add("is null; only an assistant message with tool_calls may have no content", f"{fld}.content")
        elif content is not None and not isinstance(content, str):
            add(f"must be a string, got {_kind(content)}", f"{fld}.content")
        elif isinstance(content, str) and not content.strip() and not has_calls:
            add("is empty", f"{fld}.content")
        if "tool_calls" in msg:
            if role != "assistant":
                add("only assistant messages make tool calls", f"{fld}.tool_calls")
            elif not isinstance(msg["tool_calls"], list):
                add(f"must be a list, got {_kind(msg['tool_calls'])}", f"{fld}.tool_calls")
        if "weight" in msg:
            weight = msg["weight"]
            if role != "assistant":
                add("only assistant messages have a weight", f"{fld}.weight")
            elif type(weight) is not int or weight not in (0, 1):
                add(f"must be 0 or 1, got {weight!r}" if isinstance(weight, int | float) else
                    f"must be 0 or 1, got {_kind(weight)}", f"{fld}.weight")
        if role == "assistant":
            assistants += 1
            trained += msg.get("weight", 1) != 0
    if not roles_ok or not for_training:
        return out
    if assistants == 0:
        add("no assistant message: nothing to learn from", "messages")
    elif trained == 0:
        add("every assistant message has weight 0: nothing to learn from", "messages")
    return out


SKIP_HINT = ("fix these lines, or set data.on_bad_lines: skip (--skip-bad-lines) to write them to rejects.jsonl "
             "and go on")


def raise_problems(problems: Sequence[Problem], max_errors: int, hint: str = SKIP_HINT) -> None:
    """One UserError listing up to ``max_errors`` problems (with how many lines they span), or nothing."""
    if not problems:
        return
    lines = {(p.source, p.line) for p in problems}
    shown = [str(p) for p in problems[:max_errors]]
    more = len(problems) - len(shown)
    text = f"{len(problems)} problem(s) in {len(lines)} line(s):\n  " + "\n  ".join(shown)
    if more:
        text += f"\n  … and {more} more"
    raise UserError(text, hint=hint)


def read_examples(path: str | Path, max_errors: int = 20) -> list[dict[str, Any]]:
    """Canonical chat records of one JSONL file (a prepared split or a raw file in any supported format), read
    line by line and validated. Any structural problem raises one UserError listing ``file:line: field: reason``."""
    return [record for _, record in read_numbered(path, max_errors)]


def read_numbered(path: str | Path, max_errors: int = 20,
                  hint: str = SKIP_HINT) -> list[tuple[int, dict[str, Any]]]:
    """Like ``read_examples``, with each record's 1-based line number (for messages about later stages)."""
    examples = read_file(path)
    for ex in examples:
        if ex.record is not None:
            ex.problems += check_record(ex.record, ex.source, ex.line)
    raise_problems([p for ex in examples for p in ex.problems], max_errors, hint)
    return [(ex.line, ex.record) for ex in examples if ex.record is not None]


def _role_hint(role: Any) -> str:
    if not isinstance(role, str):
        return f" (expected one of {', '.join(ROLES)})"
    guess = role.lower() if role.lower() in ROLES else ROLE_ALIASES.get(role.lower())
    return f" — did you mean {guess!r}?" if guess else f" (expected one of {', '.join(ROLES)})"
