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

JSONL files are read line by line in binary with a per-line byte cap, so a multi-GB single line costs bounded
memory (256 KiB) and a whole file is never parsed at once. A UTF-8 BOM, CRLF line ends and blank lines are fine.

Tables — ``.parquet``, ``.csv``, ``.arrow``, a ``.json`` file holding one JSON array, a ``save_to_disk`` folder and
a hub dataset id (``org/name``) — are read through the ``datasets`` library (memory-mapped Arrow) and each row goes
through the same conversion and validation, its problems numbered by row (``train.parquet: row 17: ...``).
``columns`` renames a table's columns to the names above (``{messages: conversations}``: the chat is in the
column ``conversations``); a column that no format reads is an error unless listed in ``ignore_columns``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config.data import FORMAT_KEYS
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
    unit: str = "line"
    """What ``line`` counts: ``line`` of a JSONL file or ``row`` of a table (1-based either way)."""

    def __str__(self) -> str:
        return f"{where(self.source, self.line, self.field, self.unit)}: {self.reason}"


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
    unit: str = "line"
    """What ``line`` counts: ``line`` (JSONL) or ``row`` (a table)."""

    @property
    def id(self) -> str:
        """``file:line`` (``file: row N`` for a table) — how reports and rejects name an example (never by its
        text)."""
        return where(self.source, self.line, unit=self.unit)


Converter = Callable[[dict[str, Any]], tuple[dict[str, Any] | None, str, list[tuple[str | None, str]]]]
"""A parsed line → (record, format name, [(field, reason)]): ``to_canonical``, or the eval set's, which adds its
``{"input", "expected"}`` shape to these."""


TABLE_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
"""File suffix → the ``datasets`` builder that reads it (a ``.json`` array is read by its ``json`` builder)."""
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class TableSource:
    """How to read tables: the column mapping and, for hub ids and ``save_to_disk`` dataset dicts, which split and
    revision."""

    columns: dict[str, str] = field(default_factory=dict)
    """Format name → the table's column holding it (``{"messages": "conversations"}``)."""
    ignore_columns: tuple[str, ...] = ()
    split: str = "train"
    revision: str | None = None


def read_file(path: str | Path, max_line_bytes: int = 16 * 2**20, max_depth: int = 32,
              convert: Converter | None = None, table: TableSource = TableSource()) -> list[Example]:
    """Every non-blank line (or table row) of ``path`` as an Example (canonical record + its problems). The one
    reader of users' data: data prepare, train, advise and eval all read through it. ``path``: a JSONL file, a
    table file or ``save_to_disk`` folder, or a hub dataset id (``table`` says which split, and the columns).

    File-level problems (missing, empty, pretty-printed JSON, an unreadable table) raise ``UserError`` at once: no
    line of such a file can be used. ``convert``: how a parsed line becomes a record (default ``to_canonical``)."""
    path = Path(path)
    source = str(path)
    if path.is_dir():
        if not _saved_dataset(path):
            raise UserError(f"{source}: is a folder, not a data file",
                            hint="give the JSONL file(s) in it, or a folder written by datasets' save_to_disk")
        return _read_table(source, max_depth, convert, table)
    if not path.exists():
        if path.suffix in (".jsonl", ".json", *TABLE_SUFFIXES) or not HUB_ID.fullmatch(source):
            raise UserError(f"{source}: data file not found", hint="check the path")
        return _read_table(source, max_depth, convert, table)
    if not path.is_file():
        raise UserError(f"{source}: data file not found", hint="check the path")
    if path.suffix in TABLE_SUFFIXES or (path.suffix == ".json" and _starts_with(path, b"[")):
        return _read_table(source, max_depth, convert, table)
    examples: list[Example] = []
    for line_no, text in iter_lines(path, max_line_bytes):
        if isinstance(text, Problem):
            examples.append(Example(source, line_no, None, problems=[text]))
            continue
        if not examples and text.lstrip().startswith("["):
            raise UserError(f"{where(source, line_no)}: this is a JSON array; a .jsonl file holds one JSON "
                            "object per line", hint=f"rename it to {path.stem}.json (read as an array), or "
                                                    f"convert it: jq -c '.[]' {path.name} > data.jsonl")
        if not examples and text.strip() == "{":
            raise UserError(f"{where(source, line_no)}: this is pretty-printed JSON spread over several lines; "
                            "tunesmith reads JSONL (one JSON object per line)",
                            hint=f"convert it, e.g. jq -c . {path.name} > data.jsonl")
        examples.append(parse_line(source, line_no, text, max_depth, convert))
    if not examples:
        raise UserError(f"{source}: no examples (the file is empty or only blank lines)",
                        hint="one JSON object per line, e.g. {\"messages\": [...]}")
    return examples


def _starts_with(path: Path, prefix: bytes) -> bool:
    """Whether the file's first non-blank bytes (after a BOM) are ``prefix``."""
    with open(path, "rb") as fh:
        head = fh.read(4096).removeprefix(BOM).lstrip()
    return head.startswith(prefix)


def _saved_dataset(folder: Path) -> bool:
    """A folder ``Dataset.save_to_disk`` (state.json) or ``DatasetDict.save_to_disk`` (dataset_dict.json) wrote."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _read_table(source: str, max_depth: int, convert: Converter | None, table: TableSource) -> list[Example]:
    """Each row of a table as an Example, numbered from 1; columns renamed by ``table.columns`` first."""
    rows = _load_table(source, table)
    renamed = {column: name for name, column in table.columns.items()}
    missing = [c for c in renamed if c not in rows.column_names]
    if missing:
        raise UserError(f"{source}: data.columns names {', '.join(map(repr, missing))}, not a column of this "
                        f"table (its columns: {', '.join(rows.column_names)})", hint="fix data.columns")
    kept = [c for c in rows.column_names if c not in table.ignore_columns]
    unread = [c for c in kept if renamed.get(c, c) not in FORMAT_KEYS]
    if unread:
        raise UserError(f"{source}: column(s) {', '.join(map(repr, unread))} are not read by any chat format "
                        f"(messages, conversations, instruction/input/output, prompt/completion)",
                        hint="map them to those names with data.columns (e.g. data.columns: {messages: "
                             f"{unread[0]}}}), or list them in data.ignore_columns")
    if not len(rows):
        raise UserError(f"{source}: no examples (the table has no rows)", hint="check the file or the split")
    examples = []
    for row_no, row in enumerate(rows.select_columns(kept), start=1):
        obj = {renamed.get(k, k): v for k, v in _without_nulls(row).items()}
        if _depth_exceeds(obj, max_depth):
            problem = Problem(source, row_no, f"JSON nested too deeply (over data.max_depth={max_depth})",
                              unit="row")
            examples.append(Example(source, row_no, None, problems=[problem], unit="row"))
            continue
        record, fmt, problems = (convert or to_canonical)(obj)
        found = [Problem(source, row_no, reason, fld, "row") for fld, reason in problems]
        examples.append(Example(source, row_no, record if not found else None, fmt, found, unit="row"))
    return examples


def _load_table(source: str, table: TableSource) -> Any:
    """The table as a ``datasets.Dataset``; a file it cannot parse, or a hub id that cannot be fetched (offline,
    private, misspelt), is one UserError."""
    import datasets

    datasets.disable_progress_bars()  # a library function does not print; the CLI shows its own progress
    path = Path(source)
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(source)
            if isinstance(loaded, datasets.DatasetDict):
                if table.split not in loaded:
                    raise UserError(f"{source}: no split {table.split!r} in this saved dataset (its splits: "
                                    f"{', '.join(loaded)})", hint="set data.split (or data.eval_split)")
                loaded = loaded[table.split]
            return loaded
        if path.exists():
            builder = TABLE_SUFFIXES.get(path.suffix, "json")
            return datasets.load_dataset(builder, data_files=source, split="train")
        return datasets.load_dataset(source, split=table.split, revision=table.revision)
    except UserError:
        raise
    except ConnectionError as exc:
        offline = "offline" in str(exc).lower() or os.environ.get("HF_HUB_OFFLINE") == "1"
        raise UserError(f"{source}: the hub dataset {source!r} could not be fetched"
                        + (" (offline mode: HF_HUB_OFFLINE=1) and is not in the local datasets cache" if offline
                           else f" ({exc})"),
                        hint="run once with network access to cache it, or save it to a local file (parquet, "
                             "JSONL) and give that path") from None
    except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as exc:
        raise UserError(f"{source}: not a local file, and no hub dataset of that name ({exc})",
                        hint="check the path or the dataset id (org/name)") from None
    except ValueError as exc:  # a split or revision that the dataset does not have
        raise UserError(f"{source}: {str(exc).splitlines()[0]}", hint="check data.split / data.revision") from None
    except (datasets.exceptions.DatasetGenerationError, OSError) as exc:
        cause = exc.__cause__ or exc
        raise UserError(f"{source}: cannot be read as a table ({str(cause).splitlines()[0]})",
                        hint="check the file is complete and of the type its suffix says") from None


def _without_nulls(value: Any) -> Any:
    """The value with null object fields removed: Arrow gives every row every field of its column's schema
    (a message without ``weight`` comes back with ``weight: None``), which the row never held."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


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
