"""``tunesmith init``: a starter YAML written from the config models themselves, so each key's comment is the
field's docstring (documented once, never out of date)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from ..errors import UserError
from ..files import write_text_atomic
from ..paths import output_file


def starter_text() -> str:
    from . import Config

    lines = ["# tunesmith config. Every key is optional; the defaults are the recipe of the guide The Fine-Tuning "
             "Decision.",
             "# The model below ships offline (no hub, no GPU needed); for real work put a hub id or a folder there.",
             "# Validate with `tunesmith validate FILE`; override any key with --set section.key=value.", ""]
    _emit(Config(), lines, indent=0)
    return "\n".join(lines) + "\n"


def write_starter(path: Path, force: bool = False) -> None:
    output_file(path, "")
    if path.exists() and not force:
        raise UserError(f"{path} already exists", hint="pass --force to overwrite it, or choose another path")
    write_text_atomic(path, starter_text())


def _emit(model: BaseModel, lines: list[str], indent: int) -> None:
    pad = " " * indent
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        for doc_line in textwrap.wrap(" ".join((field.description or "").split()), 100 - indent):
            lines.append(f"{pad}# {doc_line}")
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            _emit(value, lines, indent + 2)
        else:
            lines.append(f"{pad}{name}: {_scalar(value)}")
        if indent == 0:
            lines.append("")


def _scalar(value: Any) -> str:
    from pydantic_core import to_jsonable_python

    # lists of sub-models (eval.metrics) are written as plain mappings
    value = to_jsonable_python(value, exclude_none=True)
    dumped = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return dumped.removesuffix("\n...").removesuffix("...").strip()
