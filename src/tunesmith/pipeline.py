"""``tunesmith run``: generate → data → baseline eval → train → eval → merge → export → report, from one config.

Each stage writes into ``<out_dir>/<stage>/`` and ends by writing ``stage.json``: its key, its outputs, a summary
and how long it took. The key is a hash of what the stage depends on — its config sections, the hashes of its
input files and the keys of the stages it reads from — so a re-run skips a stage whose key did not change and
redoes it (and everything downstream) when it did. ``stage.json`` is written last (atomically), so a stage cut off
half-way is never mistaken for finished; an interrupted train stage resumes from its last checkpoint.

The stage list is data: each stage names the library function it calls. Stages with nothing to do (merge after a
full fine-tune, export with no formats configured) are passed over, and ``pipeline.skip`` turns any stage off.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

from . import hooks
from .config import Config
from .errors import Interrupted, RunError, TunesmithError, UserError
from .manifest import sha256_file, write_json_atomic
from .report import stage_warnings

STAGE_FILE = "stage.json"
Event = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class StageOutcome:
    name: str
    status: str
    """``ran``, ``resumed``, ``up to date`` (skipped: nothing changed), ``skipped`` (pipeline.skip) or
    ``not needed`` (nothing to do for this config)."""
    seconds: float
    summary: str
    outputs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineResult:
    out_dir: str
    stages: list[StageOutcome]
    report_html: str | None
    report_md: str | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Context:
    """What stages hand each other: the config as it is after earlier stages filled in paths, and their records."""

    config: Config
    out: Path
    emit: Event
    records: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Stage:
    name: str
    depends: tuple[str, ...]
    """Earlier stages whose outputs this one reads (their keys are part of this one's key)."""
    sections: Callable[[Config], Any]
    """The config values the stage depends on (hashed)."""
    files: Callable[[Config], list[str]]
    """Input files the stage reads (hashed)."""
    not_needed: Callable[[Config], str | None]
    """A reason the stage has nothing to do for this config, or None."""
    run: Callable[[_Context, Path, bool], dict[str, Any]]
    """Do the work in the stage folder (``resume``: an earlier attempt was cut off); return outputs + summary."""
    adapt: Callable[[_Context, dict[str, Any]], Config] | None = None
    """The config for later stages, given this stage's outputs (e.g. train.dataset set to the prepared data)."""


def run(config: Config, out_dir: str | Path | None = None, on_event: Event | None = None) -> PipelineResult:
    """Run every stage that is out of date, in order, and write the report. Raises on the first failing stage,
    naming it; finished stages stay finished, so the same command continues where it stopped."""
    emit = on_event or (lambda _e: None)
    out = Path(out_dir) if out_dir else Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", config.model_dump(mode="json"))
    ctx = _Context(config=config, out=out, emit=emit)
    outcomes: list[StageOutcome] = []
    started = time.perf_counter()
    for stage in STAGES:
        outcome = _run_stage(stage, ctx, emit)
        outcomes.append(outcome)
        emit({"event": "stage_done", **asdict(outcome)})
        if outcome.status in ("ran", "resumed"):
            for _, message in stage_warnings({stage.name: ctx.records[stage.name]}):
                emit({"event": "warning", "stage": stage.name, "message": f"{stage.name}: {message}"})
    report = ctx.records.get("report", {}).get("outputs", {})
    return PipelineResult(str(out), outcomes, report.get("html"), report.get("markdown"),
                          round(time.perf_counter() - started, 1))


def stage_names() -> list[str]:
    return [s.name for s in STAGES]


def read_stage(out_dir: str | Path, name: str) -> dict[str, Any] | None:
    """A finished stage's record (``stage.json``), or None."""
    path = Path(out_dir) / name / STAGE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


# --- the engine ---------------------------------------------------------------------------------------------------

def _run_stage(stage: _Stage, ctx: _Context, emit: Event) -> StageOutcome:
    cfg = ctx.config
    folder = ctx.out / stage.name
    if stage.name in cfg.pipeline.skip:
        return StageOutcome(stage.name, "skipped", 0.0, "turned off by pipeline.skip")
    reason = stage.not_needed(cfg)
    if reason:
        return StageOutcome(stage.name, "not needed", 0.0, reason)

    key = _stage_key(stage, ctx)
    previous = read_stage(ctx.out, stage.name)
    if previous and previous.get("key") == key and previous.get("status") == "done" and _outputs_exist(previous):
        ctx.records[stage.name] = previous
        ctx.config = stage.adapt(ctx, previous["outputs"]) if stage.adapt else ctx.config
        return StageOutcome(stage.name, "up to date", 0.0, previous.get("summary", ""), previous["outputs"])

    attempt = folder / ".attempt.json"
    resume = _same_attempt(attempt, key)
    if not resume and folder.exists():
        shutil.rmtree(folder)  # inputs changed (or a different attempt): start the stage clean
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(attempt, {"key": key, "started": time.time()})
    emit({"event": "stage_start", "stage": stage.name, "resume": resume})

    started = time.perf_counter()
    try:
        outputs = stage.run(ctx, folder, resume)
    except Interrupted as exc:
        raise Interrupted(f"stage `{stage.name}` interrupted: {exc.message}",
                          hint=_resume_hint(ctx, stage.name)) from exc
    except TunesmithError as exc:
        kind = type(exc)
        raise kind(f"stage `{stage.name}` failed: {exc.message}",
                   hint=(exc.hint + "; then " if exc.hint else "") + _resume_hint(ctx, stage.name)) from exc
    except Exception as exc:
        raise RunError(f"stage `{stage.name}` failed: {type(exc).__name__}: {exc}",
                       hint=_resume_hint(ctx, stage.name)) from exc
    seconds = round(time.perf_counter() - started, 1)
    summary = str(outputs.pop("summary", ""))
    record = {"stage": stage.name, "key": key, "status": "done", "seconds": seconds, "summary": summary,
              "outputs": outputs, "finished": time.time()}
    write_json_atomic(folder / STAGE_FILE, record)
    attempt.unlink(missing_ok=True)
    ctx.records[stage.name] = record
    ctx.config = stage.adapt(ctx, outputs) if stage.adapt else ctx.config
    return StageOutcome(stage.name, "resumed" if resume else "ran", seconds, summary, outputs)


def _stage_key(stage: _Stage, ctx: _Context) -> str:
    cfg = ctx.config
    parts = {
        "stage": stage.name,
        "sections": stage.sections(cfg),
        "files": {f: _file_digest(Path(f)) for f in stage.files(cfg)},
        "upstream": {d: ctx.records.get(d, {}).get("key") for d in stage.depends},
    }
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _file_digest(path: Path) -> str | None:
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(child.relative_to(path)).encode())
            digest.update(sha256_file(child).encode())
        return digest.hexdigest()
    return None


def _same_attempt(attempt: Path, key: str) -> bool:
    try:
        return json.loads(attempt.read_text(encoding="utf-8")).get("key") == key
    except (OSError, json.JSONDecodeError):
        return False


def _outputs_exist(record: dict[str, Any]) -> bool:
    paths = [v for k, v in record.get("outputs", {}).items() if k.endswith(("_dir", "_file")) and v]
    return all(Path(p).exists() for p in paths)


def _resume_hint(ctx: _Context, name: str) -> str:
    done = [n for n, r in ctx.records.items() if r.get("status") == "done"]
    kept = f"finished stages ({', '.join(done)}) are kept" if done else "nothing had finished yet"
    return (f"re-run the same `tunesmith run` command to continue from stage `{name}` ({kept}; an interrupted "
            "train stage resumes from its last checkpoint)")


def _with(config: Config, section: str, **values: Any) -> Config:
    """A copy of the (frozen) config with some fields of one section replaced."""
    current = getattr(config, section)
    return config.model_copy(update={section: current.model_copy(update=values)})


def _section(config: Config, name: str) -> Any:
    value = getattr(config, name, None)
    return value.model_dump(mode="json") if value is not None else None


def _call(ref: str) -> Callable[..., Any]:
    return hooks.resolve(ref, "pipeline.generate")


def _optional(module: str, what: str) -> Any:
    """A stage module that may not be installed in this version."""
    try:
        return import_module(module)
    except ImportError as exc:
        raise RunError(f"{what} is not available ({exc})",
                       hint=f"turn the stage off with `--set pipeline.skip=[{what}]`") from None


# --- the stages ----------------------------------------------------------------------------------------------------

def _generate(ctx: _Context, folder: Path, resume: bool) -> dict[str, Any]:
    cfg = ctx.config.pipeline
    target = Path(cfg.generate_dir)
    function = _call(cfg.generate or "")
    try:
        inspect.signature(function).bind(target, **cfg.generate_options)
    except TypeError as exc:
        raise UserError(f"pipeline.generate_options: {cfg.generate} does not take these options ({exc})",
                        hint=f"see the arguments of {cfg.generate}") from None
    result = function(target, **cfg.generate_options)
    files = sorted(str(p) for p in target.rglob("*") if p.is_file())
    return {"generate_dir": str(target), "files": files, "result": _plain(result),
            "summary": f"{cfg.generate} wrote {len(files)} files to {target}"}


def _data(ctx: _Context, folder: Path, resume: bool) -> dict[str, Any]:
    data = _optional("tunesmith.data", "data")
    result = data.prepare(ctx.config, out_dir=folder)
    plain = _plain(result)
    summary = result.summary() if hasattr(result, "summary") else "prepared"
    return {"prepared_dir": str(folder), "result": plain, "summary": summary}


def _data_adapt(ctx: _Context, outputs: dict[str, Any]) -> Config:
    prepared = Path(outputs["prepared_dir"])
    cfg = _with(ctx.config, "train", dataset=str(prepared))
    if getattr(cfg, "eval", None) is not None and cfg.eval.dataset is None and (prepared / "eval.jsonl").is_file():
        cfg = _with(cfg, "eval", dataset=str(prepared / "eval.jsonl"))
    return cfg


def _evaluate(ctx: _Context, folder: Path, models: list[str]) -> dict[str, Any]:
    evaluate = _optional("tunesmith.evaluate", "eval")
    result = evaluate.evaluate(ctx.config, models=models, out_dir=folder, on_event=ctx.emit)
    summary = result.summary() if hasattr(result, "summary") else "evaluated"
    return {"eval_dir": str(folder), "result": _plain(result), "summary": summary}


def _baseline(ctx: _Context, folder: Path, resume: bool) -> dict[str, Any]:
    return _evaluate(ctx, folder, ["base"])


def _tuned_eval(ctx: _Context, folder: Path, resume: bool) -> dict[str, Any]:
    return _evaluate(ctx, folder, [ctx.records["train"]["outputs"]["run_dir"]])


def _train(ctx: _Context, folder: Path, resume: bool) -> dict[str, Any]:
    from .train import train

    has_checkpoint = resume and any((folder / "checkpoints").glob("*"))
    result = train(ctx.config, out_dir=folder, resume=has_checkpoint, on_event=ctx.emit)
    return {"run_dir": str(folder), "artefact_dir": result.artefact, "metrics_file": str(folder / "metrics.jsonl"),
            "result": result.to_dict(), "summary": result.summary()}


def _merge(ctx: _Context, folder: Path, resume: bool) -> dict[str, Any]:
    export = _optional("tunesmith.export", "merge")
    result = export.merge(ctx.records["train"]["outputs"]["run_dir"], folder / "model")
    return {"model_dir": str(folder / "model"), "result": _plain(result), "summary": result.summary()}


def _export(ctx: _Context, folder: Path, resume: bool) -> dict[str, Any]:
    gguf = _optional("tunesmith.export.gguf", "export")
    source = (ctx.records.get("merge", {}).get("outputs", {}).get("model_dir")
              or ctx.records["train"]["outputs"]["artefact_dir"])
    results = [gguf.to_gguf(source, folder, quant) for quant in ctx.config.pipeline.gguf]
    return {"export_dir": str(folder), "result": {"artefacts": [r.to_dict() for r in results]},
            "summary": "; ".join(r.summary() for r in results)}


def _report(ctx: _Context, folder: Path, resume: bool) -> dict[str, Any]:
    from .report import write_report

    result = write_report(ctx.out, folder)
    # A copy at the top of the run folder, where people look first (the page is self-contained, so it travels).
    top = ctx.out / "report.html"
    shutil.copyfile(result.html, top)
    return {"html": str(top), "markdown": result.markdown, "summary": f"report: {top}"}


def _data_files(config: Config) -> list[str]:
    data = getattr(config, "data", None)
    if data is None:
        return []
    return [*data.train_files, *([data.eval_file] if data.eval_file else [])]


def _eval_files(config: Config) -> list[str]:
    ev = getattr(config, "eval", None)
    if ev is None:
        return []
    files = [ev.dataset] if ev.dataset else []
    for metric in ev.metrics:
        files += [str(v) for k, v in metric.model_dump().items() if k in ("database", "schema_path") and v]
    return files


def _plain(value: Any) -> Any:
    """A stage result as JSON-able data (dataclass → dict)."""
    if value is None:
        return None
    if hasattr(value, "to_dict"):
        return value.to_dict()
    try:
        return json.loads(json.dumps(asdict(value), default=str))
    except TypeError:
        return json.loads(json.dumps(value, default=str))


STAGES: tuple[_Stage, ...] = (
    _Stage("generate", (), lambda c: {"generate": c.pipeline.generate, "dir": c.pipeline.generate_dir,
                                      "options": c.pipeline.generate_options}, lambda c: [],
           lambda c: None if c.pipeline.generate else "no pipeline.generate: the data already exists", _generate),
    _Stage("data", ("generate",), lambda c: {"data": _section(c, "data"), "model": _section(c, "model"),
                                             "max_length": c.train.max_length},
           _data_files, lambda c: None if _data_files(c) else "no data.train_files: train.dataset is used as is", _data,
           _data_adapt),
    _Stage("baseline", ("data",), lambda c: {"eval": _section(c, "eval"), "model": _section(c, "model")},
           _eval_files, lambda c: None if getattr(c, "eval", None) is not None else "no eval section", _baseline),
    _Stage("train", ("data",), lambda c: {"train": _section(c, "train"), "model": _section(c, "model")},
           lambda c: [c.train.dataset] if c.train.dataset else [], lambda c: None, _train),
    _Stage("eval", ("train",), lambda c: {"eval": _section(c, "eval")}, _eval_files,
           lambda c: None if getattr(c, "eval", None) is not None else "no eval section", _tuned_eval),
    _Stage("merge", ("train",), lambda c: {}, lambda c: [],
           lambda c: "full fine-tuning: the run already holds a whole model" if c.train.method == "full" else None,
           _merge),
    _Stage("export", ("train", "merge"), lambda c: {"gguf": c.pipeline.gguf}, lambda c: [],
           lambda c: None if c.pipeline.gguf else "no pipeline.gguf types configured", _export),
    _Stage("report", ("generate", "data", "baseline", "train", "eval", "merge", "export"), lambda c: {},
           lambda c: [], lambda c: None, _report),
)
