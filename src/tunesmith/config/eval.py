"""``eval:`` — the task-specific eval set, the metrics that score it, and how answers are generated.

Each metric is one entry of ``metrics`` with a ``type`` and its own options; several run at once on the same
predictions. A bare name (``- exact``) is shorthand for ``- type: exact`` with default options.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from .base import Section


class ExactMetric(Section):
    type: Literal["exact"] = "exact"
    name: str | None = None
    """Label in reports (default: the type). Needed only when one type is used twice."""
    ignore_case: bool = True
    """Compare case-insensitively."""
    collapse_whitespace: bool = True
    """Strip both ends and treat any run of whitespace as one space."""
    strip_trailing_punctuation: bool = True
    """Ignore trailing ``. ! ? ; , :`` (``Paris.`` equals ``Paris``)."""


class ContainsMetric(Section):
    type: Literal["contains"] = "contains"
    name: str | None = None
    """Label in reports (default: the type)."""
    ignore_case: bool = True
    """Search case-insensitively."""


class RegexMetric(Section):
    type: Literal["regex"] = "regex"
    name: str | None = None
    """Label in reports (default: the type)."""
    pattern: str
    """Python regular expression searched in the prediction. The matched ``group`` is the answer, compared with
    the expected text (normalised like ``exact``). If the pattern also matches the expected text, the same group
    is taken from it, so ``expected: "The answer is 42"`` and a prediction ``... answer is 42`` agree."""
    group: int | str = 0
    """Group number or name to extract (0: the whole match)."""
    ignore_case: bool = True
    """Compare the extracted answers case-insensitively (the pattern itself is case-sensitive unless it says
    ``(?i)``)."""


class JsonValidMetric(Section):
    type: Literal["json_valid"] = "json_valid"
    name: str | None = None
    """Label in reports (default: the type)."""


class JsonSchemaMetric(Section):
    type: Literal["json_schema"] = "json_schema"
    name: str | None = None
    """Label in reports (default: the type)."""
    schema_path: str
    """A JSON Schema file the prediction must satisfy (any draft ``jsonschema`` supports; default 2020-12)."""


class JsonFieldsMetric(Section):
    type: Literal["json_fields"] = "json_fields"
    name: str | None = None
    """Label in reports (default: the type)."""
    fields: list[str] | None = None
    """Dotted paths to compare (``customer.id``). None: every leaf of the expected JSON. The score is the
    fraction of fields equal; an example counts as right only when all are."""


class SqlExecutionMetric(Section):
    type: Literal["sql_execution"] = "sql_execution"
    name: str | None = None
    """Label in reports (default: the type)."""
    database: str
    """SQLite database file both queries run on (opened read-only: a predicted ``DROP TABLE`` cannot harm it),
    or a ``.sql`` script (CREATE TABLE …; INSERT …) that builds a temporary one."""
    timeout_s: float = Field(5.0, gt=0)
    """Per-query time limit; a query running longer is stopped and counted wrong."""
    max_rows: int = Field(10_000, ge=1)
    """Rows fetched per query at most (bounded memory for a runaway cross join)."""


class CustomMetric(Section):
    type: Literal["custom"] = "custom"
    name: str | None = None
    """Label in reports (default: the function's name)."""
    function: str
    """``module:function``: a function of your project (a module under the working directory, e.g. ``my_scorers.py``
    next to the config) or of tunesmith; the standard library, builtins and installed packages are refused, since
    the function is called with the model's output (docs/reliability.md). As a ``scorer`` it is called
    ``f(prediction, expected)`` and returns a bool, a score in [0, 1], or ``(score, reason)``. As
    ``extract_answer`` it is called ``f(prediction)`` and returns the answer text, then compared like ``exact``."""
    mode: Literal["scorer", "extract_answer"] = "scorer"
    """How ``function`` is used."""


MetricConfig = Annotated[
    ExactMetric | ContainsMetric | RegexMetric | JsonValidMetric | JsonSchemaMetric | JsonFieldsMetric
    | SqlExecutionMetric | CustomMetric,
    Field(discriminator="type"),
]


class EvalConfig(Section):
    dataset: str | None = None
    """The eval set: a prepared folder (its eval.jsonl), a chat JSONL whose last assistant turn is the expected
    answer, or a JSONL of ``{"input": ..., "expected": ...}`` records (rendered with ``prompt_template``).
    Unset: the eval.jsonl of the prepared folder in ``train.dataset``."""

    prompt_template: str = "{input}"
    """User message for ``{input, expected}`` records; ``{input}`` is replaced by the record's input."""

    system: str | None = None
    """System message for ``{input, expected}`` records (chat records keep their own)."""

    models: list[str] = Field(default_factory=lambda: ["base"])
    """What to evaluate: ``base`` (the model section), a train run folder, a PEFT adapter folder, a merged model
    folder, or a ``.gguf`` file. Two or more: a side-by-side comparison against the first."""

    metrics: list[MetricConfig] = Field(default_factory=lambda: [ExactMetric()])
    """Metrics, each a ``type`` with its own options: exact, contains, regex, json_valid, json_schema, json_fields,
    sql_execution, custom."""

    backend: Literal["auto", "transformers", "vllm", "llama_cpp"] = "auto"
    """Generation engine. ``auto``: llama.cpp for .gguf files, vLLM when installed and a GPU is present,
    transformers otherwise."""

    max_new_tokens: int = Field(256, ge=1)
    """Longest generated answer, in tokens (the guide's 256). Generation also stops at the end-of-turn token."""

    batch_size: int = Field(8, ge=1)
    """Prompts generated together (left-padded)."""

    limit: int | None = Field(None, ge=1)
    """Evaluate only the first N examples (a quick look)."""

    eval_loss: bool = True
    """Also compute loss, perplexity and mean token accuracy of the expected answers (not for GGUF models)."""

    bootstrap_samples: int = Field(1000, ge=0)
    """Bootstrap resamples for the 95% confidence intervals (0: no intervals)."""

    seed: int = 0
    """Seed of the bootstrap resampling (generation is greedy and needs none)."""

    max_flips_shown: int = Field(10, ge=0)
    """Examples per direction (wrong→right, right→wrong) shown in the report."""

    @field_validator("metrics", mode="before")
    @classmethod
    def _bare_names(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"type": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> EvalConfig:
        seen: set[str] = set()
        for metric in self.metrics:
            label = metric_name(metric)
            if label in seen:
                raise ValueError(f"two metrics are named {label!r}; give one a distinct `name`")
            seen.add(label)
        return self


def metric_name(metric: Any) -> str:
    """The label a metric has in reports: its ``name``, else the custom function's name, else its type."""
    if metric.name:
        return metric.name
    if metric.type == "custom":
        return metric.function.rsplit(":", 1)[-1]
    return metric.type
