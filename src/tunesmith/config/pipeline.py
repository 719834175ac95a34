"""``pipeline:`` — what ``tunesmith run`` does beyond the stage sections: data to generate first, stages to skip."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import Field

from .base import Section

StageName = Literal["generate", "data", "baseline", "train", "eval", "merge", "export", "report"]
"""The stages of ``tunesmith run``, in the order they run: the one list of their names."""

STAGE_NAMES: tuple[StageName, ...] = get_args(StageName)


class PipelineConfig(Section):
    generate: str | None = None
    """``module:function`` run first, called with one argument: the folder to write into (``generate_dir``). For
    data that is made rather than given — the SQL demo builds its database and chat examples this way
    (``tunesmith.demo:write_demo``). A function of your project (a module under the working directory) or of
    tunesmith; the standard library, builtins and installed packages are refused. None: the data already exists."""

    generate_options: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for ``generate`` after the folder, e.g. ``{num_train: 1200}`` for the SQL demo."""

    generate_dir: str = "data/generated"
    """Where ``generate`` writes; the other sections' paths point into it (e.g. ``eval.dataset``)."""

    gguf: list[str] = Field(default_factory=list)
    """GGUF files to export at the end (llama.cpp / Ollama), by type: ``f16``, ``q8_0``, ``q4_k_m``…; each is
    checked against the HF model's greedy output by llama.cpp itself. Empty: no export (needs the ``gguf``
    extra: llama-cpp-python)."""

    skip: list[StageName] = Field(default_factory=list)
    """Stages not to run, e.g. ``[baseline]`` to save time or ``[export]`` without llama.cpp installed. Stages with
    nothing to do are passed over anyway, with the reason (baseline and eval without an eval set, merge after full
    fine-tuning, export with no formats configured)."""
