"""Structural validation of canonical chat records — the bar is OpenAI's file validation.

Each problem names the file, the 1-based line, the field (``messages[2].role``: message index 2, counted from 0
as in the JSON) and what is wrong; never the training text. ``check_record`` returns the problems of one record;
``raise_problems`` turns a list of them into one ``UserError`` (up to a cap, then "and N more"). ``read_numbered``
is what every later reader of a user's file calls (train, advise): read in any accepted format, then checked here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from .formats import PREFERENCE_KEYS, Problem, _kind, _short, is_preference, read_file

ROLES = ("system", "user", "assistant", "tool")
RECORD_KEYS = {"messages", "tools", "parallel_tool_calls"}
MESSAGE_KEYS = {"role", "content", "weight", "tool_calls", "tool_call_id", "name"}
ROLE_ALIASES = {"bot": "assistant", "gpt": "assistant", "model": "assistant", "ai": "assistant",
                "human": "user", "developer": "system", "function": "tool"}
"""Roles other tools or datasets use, and the canonical role they probably mean (only suggested, never applied:
guessing a role silently would train on the wrong turns)."""


def check_record(record: dict[str, Any], source: str, line: int, for_training: bool = True,
                 unit: str = "line") -> list[Problem]:
    """Every structural problem of one canonical record (an empty list when it is fine to train on).
    ``for_training=False`` (an eval set): no rule about what there is to learn from, the structure only.
    ``unit``: ``line`` (JSONL) or ``row`` (a table), as the example's messages count it."""
    out: list[Problem] = []

    def add(reason: str, fld: str | None = None) -> None:
        out.append(Problem(source, line, reason, fld, unit))

    if is_preference(record):
        return [Problem(source, line, "is a preference pair (preferred and non-preferred answers), where chat "
                                      "examples are expected; set train.objective: dpo to train on preference "
                                      "pairs, or give a chat file", None, unit)]
    for key in record:
        if key not in RECORD_KEYS:
            add(f"unknown key (expected {', '.join(sorted(RECORD_KEYS))})", key)
    tool_names = _check_tools(record.get("tools"), add) if record.get("tools") is not None else None
    parallel = record.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        add(f"must be true or false, got {_kind(parallel)}", "parallel_tool_calls")
    messages = record.get("messages")
    if not isinstance(messages, list):
        add(f"must be a list of messages, got {_kind(messages)}", "messages")
        return out
    if not messages:
        add("is empty; an example needs at least a user and an assistant message", "messages")
        return out
    assistants = trained = 0
    calls = _Calls()
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
        has_calls = role == "assistant" and isinstance(msg.get("tool_calls"), list) and bool(msg["tool_calls"])
        bad_calls = role == "assistant" and msg.get("tool_calls") is not None and not isinstance(msg["tool_calls"],
                                                                                                 list)
        content = msg.get("content")
        if "content" not in msg and not (has_calls or bad_calls):
            add("missing", f"{fld}.content")
            calls.broken |= role == "assistant"  # a lost tool call, perhaps: its tool messages would echo this
        elif content is None and not (has_calls or bad_calls):
            add("is null; only an assistant message with tool_calls may have no content", f"{fld}.content")
            calls.broken |= role == "assistant"
        elif content is not None and not isinstance(content, str):
            add(f"must be a string, got {_kind(content)}", f"{fld}.content")
        elif isinstance(content, str) and not content.strip() and not has_calls:
            add("is empty", f"{fld}.content")
        if "tool_calls" in msg:
            if role != "assistant":
                add("only assistant messages make tool calls", f"{fld}.tool_calls")
            elif bad_calls:
                add(f"must be a list, got {_kind(msg['tool_calls'])}", f"{fld}.tool_calls")
                calls.broken = True
        if role in ROLES and role != "tool":
            calls.unanswered(add)  # the calls before this message that no tool message answered
        if has_calls:
            calls.make(i, msg["tool_calls"], tool_names, parallel is not False, add)
        if role == "tool":
            calls.answer(i, msg, add)
        elif "tool_call_id" in msg:
            add("only tool messages answer a tool call", f"{fld}.tool_call_id")
        if "name" in msg and not isinstance(msg["name"], str):
            add(f"must be a string, got {_kind(msg['name'])}", f"{fld}.name")
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


OUTPUT_KEYS = {"role", "content"}


def check_preference(record: dict[str, Any], source: str, line: int, unit: str = "line") -> list[Problem]:
    """Every structural problem of one canonical preference record: the prompt (``input``) is checked like a chat
    record's messages and must end where an answer follows; each output is exactly one assistant message with
    text; the two outputs differ (an identical pair teaches nothing and only adds noise to the loss)."""
    if not is_preference(record):
        return [Problem(source, line, "is a chat example, where preference pairs are expected (train.objective: "
                                      "dpo): give `input`/`preferred_output`/`non_preferred_output` or `prompt`/"
                                      "`chosen`/`rejected`, or set train.objective: sft", None, unit)]
    out: list[Problem] = []

    def add(reason: str, fld: str | None = None) -> None:
        out.append(Problem(source, line, reason, fld, unit))

    for key in record:
        if key not in PREFERENCE_KEYS:
            add(f"unknown key (expected {', '.join(PREFERENCE_KEYS)})", key)
    prompt = record.get("input")
    if not isinstance(prompt, dict):
        add("missing" if "input" not in record else f"must be an object with messages, got {_kind(prompt)}",
            "input")
    else:
        out += [Problem(p.source, p.line, p.reason, f"input.{p.field}" if p.field else "input", unit)
                for p in check_record(prompt, source, line, for_training=False, unit=unit)]
        messages = prompt.get("messages")
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
                and messages[-1].get("role") == "assistant":
            add("ends with an assistant message; the prompt ends with the turn the two outputs answer (a user or "
                "tool message)", f"input.messages[{len(messages) - 1}].role")
    answers = [_check_output(record, key, add) for key in ("preferred_output", "non_preferred_output")]
    if answers[0] is not None and answers[0] == answers[1]:
        add("is the same as preferred_output: a pair of equal answers teaches no preference",
            "non_preferred_output")
    return out


def _check_output(record: dict[str, Any], key: str, add: Callable[[str, str | None], None]) -> str | None:
    """The answer text of one output (None when it has problems, each added)."""
    output = record.get(key)
    if key not in record:
        add("missing", key)
        return None
    if not isinstance(output, list) or len(output) != 1:
        got = f"{len(output)} messages" if isinstance(output, list) else _kind(output)
        add(f"must be a list of one assistant message, got {got}", key)
        return None
    msg, fld = output[0], f"{key}[0]"
    if not isinstance(msg, dict):
        add(f"must be an object with role and content, got {_kind(msg)}", fld)
        return None
    ok = True
    for k in msg:
        if k not in OUTPUT_KEYS:
            add(f"unknown key (expected {', '.join(sorted(OUTPUT_KEYS))})", f"{fld}.{k}")
            ok = False
    if msg.get("role") != "assistant":
        add(f"must be 'assistant' (the answer to the prompt), got {_short(msg.get('role'))}", f"{fld}.role")
        ok = False
    content = msg.get("content")
    if not isinstance(content, str):
        add("missing" if "content" not in msg else f"must be a string, got {_kind(content)}", f"{fld}.content")
        return None
    if not content.strip():
        add("is empty", f"{fld}.content")
        return None
    return content if ok else None


SKIP_HINT = ("fix these lines, or set data.on_bad_lines: skip (--skip-bad-lines) to write them to rejects.jsonl "
             "and go on")


def raise_problems(problems: Sequence[Problem], max_errors: int, hint: str = SKIP_HINT) -> None:
    """One UserError listing up to ``max_errors`` problems (with how many lines they span), or nothing."""
    if not problems:
        return
    lines = {(p.source, p.line) for p in problems}
    shown = [str(p) for p in problems[:max_errors]]
    more = len(problems) - len(shown)
    units = "line(s)" if all(p.unit == "line" for p in problems) else "row(s)" if all(
        p.unit == "row" for p in problems) else "line(s) or row(s)"
    text = f"{len(problems)} problem(s) in {len(lines)} {units}:\n  " + "\n  ".join(shown)
    if more:
        text += f"\n  … and {more} more"
    raise UserError(text, hint=hint)


def read_examples(path: str | Path, max_errors: int = 20) -> list[dict[str, Any]]:
    """Canonical chat records of one JSONL file (a prepared split or a raw file in any supported format), read
    line by line and validated. Any structural problem raises one UserError listing ``file:line: field: reason``."""
    return [record for _, record in read_numbered(path, max_errors)]


def read_numbered(path: str | Path, max_errors: int = 20, hint: str = SKIP_HINT,
                  preference: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """Like ``read_examples``, with each record's 1-based line number (for messages about later stages).
    ``preference``: the file holds preference pairs (``check_preference``), else chat examples."""
    examples = read_file(path)
    check = check_preference if preference else check_record
    for ex in examples:
        if ex.record is not None:
            ex.problems += check(ex.record, ex.source, ex.line, unit=ex.unit)
    raise_problems([p for ex in examples for p in ex.problems], max_errors, hint)
    return [(ex.line, ex.record) for ex in examples if ex.record is not None]


TOOL_KEYS = {"type", "function"}
FUNCTION_KEYS = {"name", "description", "parameters", "strict"}
CALL_KEYS = {"id", "type", "function"}
CALL_FUNCTION_KEYS = {"name", "arguments"}


def _check_tools(tools: Any, add: Callable[[str, str | None], None]) -> set[str] | None:
    """The function names ``tools`` defines (None when it is not a list), adding a problem for each bad entry.
    A definition is ``{"type": "function", "function": {"name", "description"?, "parameters"?}}``."""
    if not isinstance(tools, list):
        add(f"must be a list of tool definitions, got {_kind(tools)}", "tools")
        return None
    names: dict[str, int] = {}
    complete = True  # with a broken definition, a call to a name not found may well be a call to that one
    for t, tool in enumerate(tools):
        fld = f"tools[{t}]"
        if not isinstance(tool, dict):
            add(f'must be an object {{"type": "function", "function": {{...}}}}, got {_kind(tool)}', fld)
            complete = False
            continue
        _unknown(tool, TOOL_KEYS, fld, add)
        if tool.get("type") != "function":
            add(f'must be "function", got {_short(tool.get("type"))}', f"{fld}.type")
        function = tool.get("function")
        if not isinstance(function, dict):
            add("missing" if "function" not in tool else f"must be an object, got {_kind(function)}",
                f"{fld}.function")
            complete = False
            continue
        _unknown(function, FUNCTION_KEYS, f"{fld}.function", add)
        name = function.get("name")
        if not _is_name(name):
            add(_name_problem(function), f"{fld}.function.name")
            complete = False
        elif name in names:
            add(f"defines {_fn(name)} a second time (first in tools[{names[name]}])", f"{fld}.function.name")
        else:
            names[name] = t
        if function.get("description") is not None and not isinstance(function["description"], str):
            add(f"must be a string, got {_kind(function['description'])}", f"{fld}.function.description")
        if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            add(f"must be a JSON Schema object, got {_kind(function['parameters'])}", f"{fld}.function.parameters")
    return set(names) if complete else None


class _Calls:
    """The tool calls of one conversation as its messages are checked in order: which ids were made, which the
    tool messages answered, which are still waiting for an answer."""

    def __init__(self) -> None:
        self.made: dict[str, tuple[str, str | None]] = {}
        """call id → (field of the call, the function it calls)"""
        self.answered: dict[str, int] = {}
        self.pending: list[str] = []
        self.broken = False
        """Whether a call without a usable id was reported: a tool message answering an unknown id is its echo."""

    def make(self, index: int, calls: list[Any], tool_names: set[str] | None, parallel: bool,
             add: Callable[[str, str | None], None]) -> None:
        base = f"messages[{index}].tool_calls"
        if len(calls) > 1 and not parallel:
            add(f"makes {len(calls)} calls in one message, but parallel_tool_calls is false", base)
        for c, call in enumerate(calls):
            fld = f"{base}[{c}]"
            if not isinstance(call, dict):
                add(f'must be an object {{"id", "type": "function", "function": {{"name", "arguments"}}}}, '
                    f"got {_kind(call)}", fld)
                self.broken = True
                continue
            _unknown(call, CALL_KEYS, fld, add)
            if "type" in call and call["type"] != "function":
                add(f'must be "function", got {_short(call["type"])}', f"{fld}.type")
            function = call.get("function")
            name = None
            if not isinstance(function, dict):
                add("missing" if "function" not in call else f"must be an object, got {_kind(function)}",
                    f"{fld}.function")
            else:
                _unknown(function, CALL_FUNCTION_KEYS, f"{fld}.function", add)
                name = function.get("name")
                if not _is_name(name):
                    add(_name_problem(function), f"{fld}.function.name")
                    name = None
                elif tool_names is not None and name not in tool_names:
                    defined = ", ".join(_fn(n) for n in sorted(tool_names)[:10]) or "none"
                    add(f"calls {_fn(name)}, which tools does not define (defined: {defined})", f"{fld}.function.name")
                _check_arguments(function, f"{fld}.function.arguments", add)
            call_id = call.get("id")
            if not isinstance(call_id, str) or not call_id.strip():
                add("missing; each call needs an id that its tool message answers in tool_call_id"
                    if "id" not in call else f"must be a non-empty string, got {_kind(call_id)}", f"{fld}.id")
                self.broken = True
            elif call_id in self.made:
                add(f"repeats the id of {self.made[call_id][0]}; each call needs its own id", f"{fld}.id")
            else:
                self.made[call_id] = (fld, name)
                self.pending.append(call_id)

    def answer(self, index: int, msg: dict[str, Any], add: Callable[[str, str | None], None]) -> None:
        fld = f"messages[{index}].tool_call_id"
        call_id = msg.get("tool_call_id")
        if isinstance(call_id, str) and call_id in self.made and call_id not in self.answered:
            self.answered[call_id] = index
            self.pending.remove(call_id)
            called, name = self.made[call_id][1], msg.get("name")
            if isinstance(name, str) and called is not None and name != called:
                add(f"is {_fn(name)}, but the call it answers ({self.made[call_id][0]}) calls {_fn(called)}",
                    f"messages[{index}].name")
            return
        if "tool_call_id" not in msg and not self.made and not self.broken:
            return  # tool use written as text (ShareGPT has no tool_calls): no structured call to answer
        # a bad id is taken as the answer to the first call still waiting: that call is not reported a second time
        waiting = f" ({self.made[self.pending.pop(0)][0]} is waiting for an answer)" if self.pending else ""
        if "tool_call_id" not in msg:
            add(f"missing; a tool message names the id of the call it answers{waiting}", fld)
        elif not isinstance(call_id, str):
            add(f"must be a string, got {_kind(call_id)}{waiting}", fld)
        elif call_id in self.answered:
            add(f"answers a call that messages[{self.answered[call_id]}] already answered{waiting}", fld)
        elif waiting or not self.broken:
            add(f"answers no call: no earlier assistant message made a tool call with this id{waiting}", fld)

    def unanswered(self, add: Callable[[str, str | None], None]) -> None:
        for call_id in self.pending:
            add("has no answer: a tool message with its id must follow before the conversation goes on",
                self.made[call_id][0])
        self.pending = []


def _check_arguments(function: dict[str, Any], fld: str, add: Callable[[str, str | None], None]) -> None:
    """``arguments`` is a string holding a JSON object, as OpenAI's format has it."""
    if "arguments" not in function:
        add('missing (a JSON object as a string, e.g. "{}")', fld)
        return
    arguments = function["arguments"]
    if not isinstance(arguments, str):
        add(f"must be a string holding a JSON object, got {_kind(arguments)} (OpenAI's format: the object written "
            "as JSON text, e.g. with json.dumps)", fld)
        return
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError as exc:
        add(f"is not valid JSON (column {exc.colno}: {exc.msg})", fld)
        return
    except (RecursionError, ValueError):
        add("is not valid JSON", fld)
        return
    if not isinstance(value, dict):
        add(f"must be a JSON object, got {_kind(value)}", fld)


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _name_problem(function: dict[str, Any]) -> str:
    if "name" not in function:
        return "missing"
    return "is empty" if isinstance(function["name"], str) else f"must be a string, got {_kind(function['name'])}"


def _fn(name: str) -> str:
    """A function's name for a message: quoted when it is a plausible identifier (never a paragraph of text)."""
    return repr(name) if len(name) <= 64 else f"a {len(name)}-character name"


def _unknown(obj: dict[str, Any], allowed: set[str], fld: str, add: Callable[[str, str | None], None]) -> None:
    for key in obj:
        if key not in allowed:
            add(f"unknown key (expected {', '.join(sorted(allowed))})", f"{fld}.{key}")


def _role_hint(role: Any) -> str:
    if not isinstance(role, str):
        return f" (expected one of {', '.join(ROLES)})"
    guess = role.lower() if role.lower() in ROLES else ROLE_ALIASES.get(role.lower())
    return f" — did you mean {guess!r}?" if guess else f" (expected one of {', '.join(ROLES)})"
