"""Task metrics: each a small function ``(prediction, expected, options) -> Verdict``.

A prediction that breaks a metric (invalid JSON, SQL with a syntax error, a query that runs too long) is a wrong
answer with a reason — never an exception that aborts the run. Problems with the metric's own setup (a missing
SQLite file, an unreadable schema, a scorer that cannot be imported) are found by ``build_scorer`` before any
generation starts, and are ``UserError``s.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from .. import hooks
from ..errors import UserError

TRAILING_PUNCTUATION = ".!?;,:"


@dataclass(frozen=True)
class Verdict:
    """One metric's judgement of one prediction: a score in [0, 1] (1 = right) and why."""

    score: float
    reason: str = ""
    error: bool = False
    """True when the metric could not judge for a reason other than the prediction (e.g. a scorer raised)."""

    @property
    def correct(self) -> bool:
        return self.score >= 1.0


Scorer = Callable[[str, str], Verdict]


# --- text ---------------------------------------------------------------------------------------------------------

def normalise(text: str, ignore_case: bool = True, collapse_whitespace: bool = True,
              strip_trailing_punctuation: bool = True) -> str:
    """The comparison form of an answer: optionally lower-cased, whitespace collapsed, trailing punctuation cut."""
    if collapse_whitespace:
        text = " ".join(text.split())
    if strip_trailing_punctuation:
        text = text.rstrip().rstrip(TRAILING_PUNCTUATION).rstrip()
    if ignore_case:
        text = text.casefold()
    return text


def exact_match(prediction: str, expected: str, ignore_case: bool = True, collapse_whitespace: bool = True,
                strip_trailing_punctuation: bool = True) -> Verdict:
    norm = partial(normalise, ignore_case=ignore_case, collapse_whitespace=collapse_whitespace,
                   strip_trailing_punctuation=strip_trailing_punctuation)
    got, want = norm(prediction), norm(expected)
    return Verdict(1.0, "equal") if got == want else Verdict(0.0, f"{_clip(got)!r} != {_clip(want)!r}")


def contains(prediction: str, expected: str, ignore_case: bool = True) -> Verdict:
    got, want = (prediction.casefold(), expected.casefold()) if ignore_case else (prediction, expected)
    want = want.strip()
    if want in got:
        return Verdict(1.0, "found")
    return Verdict(0.0, f"{_clip(expected.strip())!r} not in the prediction")


def regex_match(prediction: str, expected: str, pattern: re.Pattern[str], group: int | str = 0,
                ignore_case: bool = True) -> Verdict:
    found = pattern.search(prediction)
    if found is None:
        return Verdict(0.0, f"pattern {pattern.pattern!r} not found in the prediction")
    got = found.group(group) or ""
    in_expected = pattern.search(expected)
    want = (in_expected.group(group) or "") if in_expected else expected
    return exact_match(got, want, ignore_case=ignore_case)


# --- JSON ---------------------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[^\n`]*\r?\n(.*?)(?:\r?\n[ \t]*)?```", re.DOTALL)
_OPEN_FENCE = re.compile(r"```[^\n`]*\r?\n(.*)\Z", re.DOTALL)


def strip_code_fence(text: str) -> str:
    """The body of the first Markdown code block anywhere in the text, or the whole text when it has none.

    Chat models wrap SQL and JSON in code blocks and often say something around them ("Here is the query:
    ```sql … ``` It returns …"): the block is the answer. A block left open (the answer was cut at
    ``max_new_tokens``) counts from its opening line to the end."""
    fenced = _FENCE.search(text)
    if fenced:
        return fenced.group(1).strip()
    opened = _OPEN_FENCE.search(text)
    return opened.group(1).rstrip("`").strip() if opened else text.strip()  # cut inside its closing fence


def parse_json(text: str) -> tuple[Any, str | None]:
    """(value, None) or (None, why it is not JSON). Deep nesting and huge numbers are errors, not crashes."""
    try:
        return json.loads(strip_code_fence(text)), None
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
    except (ValueError, RecursionError) as exc:
        return None, f"unreadable JSON: {type(exc).__name__}"


def json_valid(prediction: str, expected: str) -> Verdict:
    _, problem = parse_json(prediction)
    return Verdict(0.0, problem) if problem else Verdict(1.0, "valid JSON")


def json_schema_valid(prediction: str, expected: str, validator: Any) -> Verdict:
    value, problem = parse_json(prediction)
    if problem:
        return Verdict(0.0, problem)
    error = next(iter(sorted(validator.iter_errors(value), key=lambda e: list(e.path))), None)
    if error is None:
        return Verdict(1.0, "matches the schema")
    at = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return Verdict(0.0, f"schema violation at {at}: {_clip(error.message, 120)}")


def json_fields_match(prediction: str, expected: str, fields: list[str] | None = None) -> Verdict:
    """Fraction of the expected JSON's fields that the prediction has with equal values (key order is irrelevant:
    objects compare as mappings)."""
    want, problem = parse_json(expected)
    if problem:
        return Verdict(0.0, f"expected answer is not JSON ({problem})", error=True)
    got, problem = parse_json(prediction)
    if problem:
        return Verdict(0.0, problem)
    want_fields = {f: _lookup(want, f) for f in fields} if fields else _leaves(want)
    if not want_fields:
        return Verdict(1.0 if got == want else 0.0, "equal" if got == want else "values differ")
    wrong = [f for f, v in want_fields.items() if not _json_equal(_lookup(got, f), v)]
    score = 1.0 - len(wrong) / len(want_fields)
    if not wrong:
        return Verdict(1.0, f"all {len(want_fields)} fields equal")
    return Verdict(score, f"{len(wrong)} of {len(want_fields)} fields differ: {', '.join(wrong[:5])}")


_MISSING = object()


def _lookup(value: Any, dotted: str) -> Any:
    for part in dotted.split(".") if dotted else []:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    # objects are walked field by field; a list is one field (its order matters)
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_leaves(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value} if prefix else {}


def _json_equal(a: Any, b: Any) -> bool:
    # 1 and 1.0 are the same JSON number; True and 1 are not the same JSON value
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a is not _MISSING and a == b


# --- SQL ----------------------------------------------------------------------------------------------------------

_ORDER_BY = re.compile(r"\border\s+by\b", re.IGNORECASE)
_STRING_LITERAL = re.compile(r"'(?:[^']|'')*'")


def sql_execution_match(prediction: str, expected: str, database: Path, timeout_s: float = 5.0,
                        max_rows: int = 10_000) -> Verdict:
    """Run both queries on the database and compare result sets: as lists when the expected query orders its
    rows (ORDER BY), as multisets otherwise. Column names are not compared (aliases may differ)."""
    want, problem = _run_query(database, expected, timeout_s, max_rows)
    if problem:
        return Verdict(0.0, f"the expected query failed: {problem}", error=True)
    got, problem = _run_query(database, strip_code_fence(prediction), timeout_s, max_rows)
    if problem:
        return Verdict(0.0, f"predicted query failed: {problem}")
    ordered = bool(_ORDER_BY.search(_STRING_LITERAL.sub("''", expected)))
    same = got == want if ordered else Counter(got) == Counter(want)
    if same:
        return Verdict(1.0, f"same {len(got)} rows" + (" in the same order" if ordered else ""))
    if len(got) == len(want):
        detail = " in another order (it matters: the expected query has ORDER BY)" \
            if ordered and Counter(got) == Counter(want) else " with other values"
        return Verdict(0.0, f"different results: {len(got)} rows, as expected, but{detail}")
    return Verdict(0.0, f"different results: {len(got)} rows vs {len(want)} expected"
                        + (" (order matters: the expected query has ORDER BY)" if ordered else ""))


def _run_query(database: Path, sql: str, timeout_s: float, max_rows: int) -> tuple[list[tuple], str | None]:
    if not sql.strip().strip(";").strip():
        return [], "empty query"
    # read-only, writes refused, no ATTACH: a predicted `DROP TABLE` or `ATTACH 'x.db'` cannot change anything
    conn = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    try:
        conn.execute("PRAGMA query_only = ON")
        conn.set_authorizer(_deny_attach)
        # called every N SQLite VM instructions; a non-zero return interrupts the query
        conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
        rows = conn.execute(sql).fetchmany(max_rows + 1)
    except sqlite3.Error as exc:
        if time.monotonic() > deadline:
            return [], f"stopped after the {timeout_s:g} s time limit"
        return [], f"{type(exc).__name__}: {exc}"
    except (ValueError, OverflowError, MemoryError) as exc:  # e.g. a NUL character in the SQL text
        return [], f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    if len(rows) > max_rows:
        return [], f"more than {max_rows} rows"
    return [tuple(_sql_value(v) for v in row) for row in rows], None


def _deny_attach(action: int, *_args: Any) -> int:
    return sqlite3.SQLITE_DENY if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH) else sqlite3.SQLITE_OK


def _sql_value(v: Any) -> Any:
    # SUM/AVG over rows in a different order may differ in the last bits
    return round(v, 9) if isinstance(v, float) and math.isfinite(v) else v


# --- custom -------------------------------------------------------------------------------------------------------

def custom_score(prediction: str, expected: str, function: Callable[..., Any], label: str,
                 mode: str = "scorer") -> Verdict:
    try:
        result = function(prediction) if mode == "extract_answer" else function(prediction, expected)
    except Exception as exc:  # a user's scorer: any failure is reported with the example, never a crash
        return Verdict(0.0, f"{label} raised {type(exc).__name__}: {_clip(str(exc), 160)}", error=True)
    if mode == "extract_answer":
        if not isinstance(result, str):
            return Verdict(0.0, f"{label} returned {type(result).__name__}, expected str", error=True)
        return exact_match(result, expected)
    return _as_verdict(result, label)


def _as_verdict(result: Any, label: str) -> Verdict:
    reason = ""
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], str):
        result, reason = result
    if isinstance(result, bool):
        return Verdict(float(result), reason or ("right" if result else "wrong"))
    if isinstance(result, int | float) and 0.0 <= float(result) <= 1.0:
        return Verdict(float(result), reason or f"score {float(result):.3g}")
    return Verdict(0.0, f"{label} returned {_clip(repr(result), 60)}; expected a bool, a number in [0, 1] or "
                        "(score, reason)", error=True)


# --- building scorers from options --------------------------------------------------------------------------------

def build_scorer(kind: str, options: dict[str, Any], field: str = "eval.metrics") -> Scorer:
    """A ``(prediction, expected) -> Verdict`` function for one metric, its resources checked now (not after
    an hour of generation)."""
    if kind == "exact":
        return partial(exact_match, **options)
    if kind == "contains":
        return partial(contains, **options)
    if kind == "regex":
        try:
            pattern = re.compile(options["pattern"])
        except re.error as exc:
            raise UserError(f"{field}.pattern: not a valid regular expression: {exc}") from None
        group = options.get("group", 0)
        known = group <= pattern.groups if isinstance(group, int) else group in pattern.groupindex
        if not known:
            raise UserError(f"{field}.group: the pattern has no group {group!r}")
        return partial(regex_match, pattern=pattern, group=group, ignore_case=options.get("ignore_case", True))
    if kind == "json_valid":
        return json_valid
    if kind == "json_schema":
        return partial(json_schema_valid, validator=_schema_validator(Path(options["schema_path"]), field))
    if kind == "json_fields":
        return partial(json_fields_match, fields=options.get("fields"))
    if kind == "sql_execution":
        database = Path(options["database"])
        if database.suffix.lower() == ".sql":
            database = _database_from_script(database, field)
        _check_database(database, field)
        return partial(sql_execution_match, database=database, timeout_s=options.get("timeout_s", 5.0),
                       max_rows=options.get("max_rows", 10_000))
    if kind == "custom":
        function = hooks.resolve(options["function"], f"{field}.function")
        return partial(custom_score, function=function, label=options["function"], mode=options.get("mode", "scorer"))
    raise UserError(f"{field}: unknown metric type {kind!r}")


def _schema_validator(path: Path, field: str) -> Any:
    import jsonschema

    if not path.is_file():
        raise UserError(f"{field}.schema_path: {path} does not exist")
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: the schema is not valid JSON ({exc})") from None
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise UserError(f"{path}: not a valid JSON Schema: {exc.message}") from None
    return cls(schema)


def _database_from_script(script: Path, field: str) -> Path:
    """A throw-away SQLite file built from a ``.sql`` script (schema + rows), so an eval set can ship as text."""
    import atexit
    import shutil
    import tempfile

    if not script.is_file():
        raise UserError(f"{field}.database: SQL script {script} does not exist")
    folder = Path(tempfile.mkdtemp(prefix="tunesmith-sql-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    target = folder / f"{script.stem}.sqlite"
    conn = sqlite3.connect(target)
    try:
        conn.executescript(script.read_text(encoding="utf-8"))
        conn.commit()
    except (sqlite3.Error, UnicodeDecodeError) as exc:
        raise UserError(f"{script}: the SQL script failed: {exc}",
                        hint="the script must build the database from scratch (CREATE TABLE …; INSERT …)") from None
    finally:
        conn.close()
    return target


def _check_database(path: Path, field: str) -> None:
    if not path.is_file():
        raise UserError(f"{field}.database: SQLite file {path} does not exist",
                        hint="point it at the database the queries should run on")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise UserError(f"{field}.database: {path} is not a readable SQLite database ({exc})") from None


def _clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
