"""One YAML file, validated by strict frozen pydantic models. Each section lives in its own module.

``load_config(path, overrides)`` reads the file, applies ``--set section.key=value`` overrides and validates;
every problem is reported as ``file:line: key: what is wrong`` (a typo names the key, never a silent default).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import UserError
from .base import Section
from .data import DataConfig
from .eval import EvalConfig, MetricConfig, metric_name
from .model import ModelConfig
from .pipeline import PipelineConfig
from .train import GUIDE_TARGETS, PRESETS, LoraSection, QuantSection, TrainConfig

__all__ = [
    "GUIDE_TARGETS",
    "PRESETS",
    "Config",
    "DataConfig",
    "EvalConfig",
    "LoraSection",
    "MetricConfig",
    "ModelConfig",
    "PipelineConfig",
    "QuantSection",
    "Section",
    "TrainConfig",
    "dump_config",
    "load_config",
    "metric_name",
]


class Config(Section):
    """The whole tunesmith config. Every section is optional; defaults are the guide's recipe."""

    out_dir: str = "runs/tunesmith"
    """Where ``tunesmith run`` writes every stage's output (one sub-folder per stage) and the report."""

    model: ModelConfig = ModelConfig()
    """The base model."""

    data: DataConfig = DataConfig()
    """Data preparation: input files, hold-out, validation and the cleaning rules (`tunesmith data prepare`)."""

    train: TrainConfig = TrainConfig()
    """Training method and hyper-parameters."""

    eval: EvalConfig = EvalConfig()
    """Task-specific evaluation: eval set, metrics, generation."""

    pipeline: PipelineConfig = PipelineConfig()
    """What ``tunesmith run`` does first (generated data) and which stages it skips."""


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override and validate a config file. ``path=None`` gives the defaults (plus overrides)."""
    raw: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    source = str(path) if path is not None else "<defaults>"
    if path is not None:
        raw, lines = _read_yaml(Path(path))
    overridden: dict[tuple[str, ...], str] = {}
    for item in overrides:
        overridden[_apply_override(raw, item)] = item
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_format_validation(exc, source, lines, overridden),
                        hint="see `tunesmith init` for a commented config with every key") from None


def dump_config(config: Config) -> str:
    """The resolved config as YAML (what ``tunesmith validate`` prints and run.json stores)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a config file",
                        hint="give the YAML file itself (e.g. tunesmith.yaml), or create one with `tunesmith init`")
    if not path.is_file():
        raise UserError(f"{path}: config file not found", hint="check the path, or create one with `tunesmith init`")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise UserError(f"{path}: the config file is empty",
                        hint=f"write one with `tunesmith init {path} --force` (every key with its default)")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{path}{line}: not valid YAML: {problem}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise UserError(f"{path}:1: the config must be a mapping of sections (model:, train:, …)")
    lines: dict[tuple[str, ...], int] = {}
    _collect_lines(node, (), lines)
    return data, lines


def _collect_lines(node: Any, prefix: tuple[str, ...], out: dict[tuple[str, ...], int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*prefix, str(key_node.value))
            out[key] = key_node.start_mark.line + 1
            _collect_lines(value_node, key, out)
    elif isinstance(node, yaml.SequenceNode):  # list items (eval.metrics) get their own line numbers
        for i, item in enumerate(node.value):
            key = (*prefix, str(i))
            out[key] = item.start_mark.line + 1
            _collect_lines(item, key, out)


def _apply_override(raw: dict[str, Any], item: str) -> tuple[str, ...]:
    """Set one ``section.key=value`` in ``raw``; returns the keys it set (to name the override in errors)."""
    if "=" not in item:
        raise UserError(f"--set {item}: expected section.key=value", hint="e.g. --set train.learning_rate=1e-4")
    dotted, value_text = item.split("=", 1)
    keys = [k for k in dotted.strip().split(".") if k]
    if not keys:
        raise UserError(f"--set {item}: empty key", hint="e.g. --set train.learning_rate=1e-4")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text
    cursor: Any = raw
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if not isinstance(cursor, dict | list):
            raise UserError(f"--set {item}: `{'.'.join(keys[:depth])}` is a single value, not a section",
                            hint="write the whole value, or use the mapping form in the config file")
        if isinstance(cursor, list):  # a numeric key indexes a list: eval.metrics.0.database=shop.db
            if not key.isdigit() or int(key) >= len(cursor):
                raise UserError(f"--set {item}: `{'.'.join(keys[:depth])}` is a list of {len(cursor)}; "
                                f"`{key}` is not an index into it", hint=f"use 0 … {len(cursor) - 1}")
            if last:
                cursor[int(key)] = value
                break
            cursor = cursor[int(key)]
            continue
        if last:
            cursor[key] = value
            break
        nxt = cursor.get(key)
        if not isinstance(nxt, dict | list):
            nxt = {}
            cursor[key] = nxt
        cursor = nxt
    return tuple(keys)


def _format_validation(exc: ValidationError, source: str, lines: dict[tuple[str, ...], int],
                       overridden: dict[tuple[str, ...], str]) -> str:
    problems = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"] if not isinstance(p, int) or True)
        key = ".".join(loc) or "(top level)"
        item = _override_of(loc, overridden)
        line = _nearest_line(loc, lines)
        prefix = f"--set {item}" if item is not None else f"{source}:{line}" if line else source
        if err["type"] == "extra_forbidden":
            msg = f"{prefix}: unknown key `{key}`" + _suggest(loc)
        else:
            value = err.get("input")
            shown = json.dumps(value, default=str)[:80] if not isinstance(value, dict) else "a mapping"
            msg = f"{prefix}: `{key}`: {err['msg']} (got {shown})"
        problems.append(msg)
    return "invalid config:\n  " + "\n  ".join(problems)


def _override_of(loc: tuple[str, ...], overridden: dict[tuple[str, ...], str]) -> str | None:
    """The last ``--set`` that set ``loc``, a section above it, or a key below it (which made ``loc`` a mapping)."""
    found = None
    for keys, item in overridden.items():
        n = min(len(keys), len(loc))
        if keys[:n] == loc[:n]:
            found = item
    return found


def _nearest_line(loc: tuple[str, ...], lines: dict[tuple[str, ...], int]) -> int | None:
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _suggest(loc: tuple[str, ...]) -> str:
    import difflib

    model: type[Section] | None = Config
    for part in loc[:-1]:
        field = model.model_fields.get(part) if model else None
        ann = field.annotation if field else None
        model = ann if isinstance(ann, type) and issubclass(ann, Section) else None
    if model is None:
        return ""
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1)
    return f" — did you mean `{close[0]}`?" if close else ""
