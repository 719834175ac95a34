"""``tunesmith run``: generate → data → baseline eval → train → eval → merge → export → report, from one config.

Each stage writes into ``<out_dir>/<stage>/`` and ends by writing ``stage.json`` (a ``StageRecord``): its key, its
outputs, a summary and how long it took. The key is a hash of what the stage depends on — its config sections, the
hashes of its input files and the keys of the stages it reads from — so a re-run skips a stage whose key did not
change and redoes it (and everything downstream) when it did. ``stage.json`` is written last (atomically), so a
stage cut off half-way is never mistaken for finished; an interrupted train stage resumes from its last checkpoint.

The stage list is data: each stage names the library function it calls. Stages with nothing to do (the eval stages
without an eval set, merge after a full fine-tune, export with no formats configured) are passed over with the
reason, and ``pipeline.skip`` turns any stage off.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from . import hooks
from .config import Config
from .config.pipeline import STAGE_NAMES, StageName
from .errors import Interrupted, RunError, Stopped, TunesmithError, UserError
from .paths import output_folder
from .records import (
    DataOutputs,
    EvalOutputs,
    ExportOutputs,
    GenerateOutputs,
    MergeOutputs,
    ReportOutputs,
    StageOutputs,
    StageRecord,
    TrainOutputs,
    sha256_file,
    write_json_atomic,
)
from .report import stage_warnings

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
    records: dict[StageName, StageRecord] = field(default_factory=dict)
    passed_over: dict[StageName, str] = field(default_factory=dict)
    """Stages with nothing to do for this config, and why (the report says so)."""
    train_processes: int = 1
    """Processes the train stage runs as: more than one, torchrun's (``train.launch``), else this one."""


def _no_inputs(config: Config) -> list[str]:
    return []


def _no_sections(config: Config) -> dict[str, Any]:
    return {}


def _always_needed(config: Config) -> str | None:
    return None


@dataclass(frozen=True, kw_only=True)
class _Stage:
    run: Callable[[_Context, Path, bool], tuple[StageOutputs, str]]
    """Do the work in the stage folder (``resume``: an earlier attempt was cut off); return outputs and summary."""
    depends: tuple[StageName, ...] = ()
    """Earlier stages whose outputs this one reads (their keys are part of this one's key)."""
    sections: Callable[[Config], Any] = _no_sections
    """The config values the stage depends on (hashed)."""
    files: Callable[[Config], list[str]] = _no_inputs
    """Input files the stage reads (hashed)."""
    not_needed: Callable[[Config], str | None] = _always_needed
    """A reason the stage has nothing to do for this config, or None."""
    adapt: Callable[[Config, Any], Config] | None = None
    """The config for later stages, given this stage's outputs (e.g. train.dataset set to the prepared data)."""


def run(config: Config, out_dir: str | Path | None = None, on_event: Event | None = None, *,
        train_processes: int = 1) -> PipelineResult:
    """Run every stage that is out of date, in order, and write the report. Raises on the first failing stage,
    naming it; finished stages stay finished, so the same command continues where it stopped.
    ``train_processes``: more than one trains as that many torchrun processes (one per GPU, FSDP2), the events
    handed to ``on_event`` as the in-process stage emits them."""
    from .train.tracking import check_trackers

    emit = on_event or (lambda _e: None)
    check_trackers(config.train.report_to)  # a missing tracker is found before the data stage, not after it
    out = output_folder(out_dir or config.out_dir, "--out" if out_dir else "out_dir", create=True)
    write_json_atomic(out / "config.json", config.model_dump(mode="json"))
    ctx = _Context(config=config, out=out, emit=emit, train_processes=train_processes)
    outcomes: list[StageOutcome] = []
    started = time.perf_counter()
    for name in STAGE_NAMES:
        outcome = _run_stage(name, STAGES[name], ctx)
        outcomes.append(outcome)
        emit({"event": "stage_done", **asdict(outcome)})
        if outcome.status in ("ran", "resumed"):
            for _, message in stage_warnings({name: ctx.records[name]}):
                emit({"event": "warning", "stage": name, "message": f"{name}: {message}"})
    report = ctx.records.get("report")
    return PipelineResult(str(out), outcomes, report.outputs.html if report else None,
                          report.outputs.markdown if report else None, round(time.perf_counter() - started, 1))


def read_stage(out_dir: str | Path, name: StageName) -> StageRecord | None:
    """A finished stage's record (``stage.json``), or None: not finished, or a record this tunesmith cannot read
    (written by another version), so the stage is done again."""
    folder = Path(out_dir) / name
    if not (folder / StageRecord.FILE).is_file():
        return None
    try:
        return StageRecord.read(folder)
    except UserError:
        return None


# --- the engine ---------------------------------------------------------------------------------------------------

def _run_stage(name: StageName, stage: _Stage, ctx: _Context) -> StageOutcome:
    folder = ctx.out / name
    if name in ctx.config.pipeline.skip:
        return StageOutcome(name, "skipped", 0.0, "turned off by pipeline.skip")
    reason = stage.not_needed(ctx.config)
    if reason:
        ctx.passed_over[name] = reason
        return StageOutcome(name, "not needed", 0.0, reason)

    key = _stage_key(name, stage, ctx)
    previous = read_stage(ctx.out, name)
    if previous and previous.key == key and all(Path(p).exists() for p in previous.outputs.paths()):
        return _finished(stage, ctx, previous, "up to date")

    attempt = folder / ".attempt.json"
    resume = _same_attempt(attempt, key)
    if not resume and folder.exists():
        shutil.rmtree(folder)  # inputs changed (or a different attempt): start the stage clean
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(attempt, {"key": key, "started": time.time()})
    ctx.emit({"event": "stage_start", "stage": name, "resume": resume})

    started = time.perf_counter()
    try:
        outputs, summary = stage.run(ctx, folder, resume)
    except Interrupted as exc:
        raise Interrupted(f"stage `{name}` interrupted: {exc.message}", hint=_resume_hint(ctx, name)) from exc
    except Stopped:
        raise  # already says what happened and exits 128 + the signal (its own constructor)
    except TunesmithError as exc:
        kind = type(exc)
        raise kind(f"stage `{name}` failed: {exc.message}",
                   hint=(exc.hint + "; then " if exc.hint else "") + _resume_hint(ctx, name)) from exc
    except Exception as exc:
        raise RunError(f"stage `{name}` failed: {type(exc).__name__}: {exc}", hint=_resume_hint(ctx, name)) from exc
    record = StageRecord(stage=name, key=key, status="done", seconds=round(time.perf_counter() - started, 1),
                         summary=summary, outputs=outputs, finished=time.time())
    record.write(folder)
    attempt.unlink(missing_ok=True)
    return _finished(stage, ctx, record, "resumed" if resume else "ran")


def _finished(stage: _Stage, ctx: _Context, record: StageRecord, status: str) -> StageOutcome:
    """Hand a finished stage's outputs on to the later stages."""
    ctx.records[record.stage] = record
    if stage.adapt:
        ctx.config = stage.adapt(ctx.config, record.outputs)
    seconds = 0.0 if status == "up to date" else record.seconds
    return StageOutcome(record.stage, status, seconds, record.summary, record.outputs.model_dump(mode="json"))


def _stage_key(name: StageName, stage: _Stage, ctx: _Context) -> str:
    cfg = ctx.config
    parts = {
        "stage": name,
        "sections": stage.sections(cfg),
        "files": {f: _file_digest(Path(f)) for f in stage.files(cfg)},
        "upstream": {d: ctx.records[d].key if d in ctx.records else None for d in stage.depends},
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


def _resume_hint(ctx: _Context, name: str) -> str:
    kept = f"finished stages ({', '.join(ctx.records)}) are kept" if ctx.records else "nothing had finished yet"
    return (f"re-run the same `tunesmith run` command to continue from stage `{name}` ({kept}; an interrupted "
            "train stage resumes from its last checkpoint)")


def _call(ref: str) -> Callable[..., Any]:
    return hooks.resolve(ref, "pipeline.generate")


# --- the stages ----------------------------------------------------------------------------------------------------

def _generate(ctx: _Context, folder: Path, resume: bool) -> tuple[GenerateOutputs, str]:
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
    # whatever the user's function returns, as JSON (a dataclass as its fields)
    plain = json.loads(json.dumps(asdict(result) if is_dataclass(result) else result, default=str))
    return (GenerateOutputs(generate_dir=str(target), files=files, result=plain),
            f"{cfg.generate} wrote {len(files)} files to {target}")


def _data(ctx: _Context, folder: Path, resume: bool) -> tuple[DataOutputs, str]:
    from .data import prepare

    result = prepare(ctx.config, out_dir=folder)
    return DataOutputs(prepared_dir=str(folder), result=result.to_dict()), result.summary()


def _data_adapt(config: Config, outputs: DataOutputs) -> Config:
    """Train on the prepared folder; evaluate on its held-out split unless eval.dataset names another."""
    train = config.train.model_copy(update={"dataset": outputs.prepared_dir})
    held_out = _held_out(outputs.prepared_dir)
    # DPO's held-out split is preference pairs, which the train stage scores; generation needs a chat eval set
    scored = config.eval.dataset is None and held_out and config.train.objective == "sft"
    ev = config.eval.model_copy(update={"dataset": str(held_out)}) if scored else config.eval
    return config.model_copy(update={"train": train, "eval": ev})


def _held_out(folder: str | None) -> Path | None:
    """The eval.jsonl of a prepared (or generated) folder, if it holds any examples."""
    path = Path(folder) / "eval.jsonl" if folder else None
    return path if path is not None and path.is_file() and path.stat().st_size > 0 else None


def _no_eval_set(config: Config) -> str | None:
    """Why the eval stages have nothing to score, or None: eval.dataset, or the training data's held-out split."""
    if config.train.objective == "dpo" and not config.eval.dataset:
        return ("preference tuning: the train stage scores the held-out pairs (eval loss and win-rate); set "
                "eval.dataset to a chat eval set for task metrics")
    if config.eval.dataset or _held_out(config.train.dataset):
        return None
    data = config.data
    if data.train_files and data.eval_fraction == 0 and data.eval_file is None:
        return "no eval set — data.eval_fraction is 0 and no eval file is given"
    return (f"no eval set — eval.dataset is not given and train.dataset ({config.train.dataset}) holds no "
            "eval.jsonl with examples")


def _evaluate(ctx: _Context, folder: Path, models: list[str]) -> tuple[EvalOutputs, str]:
    from .evaluate import evaluate

    result = evaluate(ctx.config, models=models, out_dir=folder, on_event=ctx.emit)
    return EvalOutputs(eval_dir=str(folder), result=result.to_dict()), result.summary()


def _baseline(ctx: _Context, folder: Path, resume: bool) -> tuple[EvalOutputs, str]:
    return _evaluate(ctx, folder, ["base"])


def _tuned_eval(ctx: _Context, folder: Path, resume: bool) -> tuple[EvalOutputs, str]:
    return _evaluate(ctx, folder, [ctx.records["train"].outputs.run_dir])


def _train(ctx: _Context, folder: Path, resume: bool) -> tuple[TrainOutputs, str]:
    from .train import train
    from .train.launch import CONFIG, run_torchrun, torchrun_command

    has_checkpoint = resume and any((folder / "checkpoints").glob("*"))
    command = torchrun_command(processes=ctx.train_processes, config_file=folder / CONFIG, run_dir=folder,
                               resume=has_checkpoint)
    if command is None:
        result = train(ctx.config, out_dir=folder, resume=has_checkpoint, on_event=ctx.emit)
    else:  # the ranks read the config as the earlier stages left it (train.dataset: the prepared data)
        write_json_atomic(folder / CONFIG, ctx.config.model_dump(mode="json"))
        result = run_torchrun(command, run_dir=folder, emit=ctx.emit)
    return (TrainOutputs(run_dir=str(folder), artefact_dir=result.artefact, metrics_file=str(folder / "metrics.jsonl"),
                         result=result.to_dict()), result.summary())


def _merge(ctx: _Context, folder: Path, resume: bool) -> tuple[MergeOutputs, str]:
    from .export import merge

    result = merge(ctx.records["train"].outputs.run_dir, folder / "model")
    return MergeOutputs(model_dir=str(folder / "model"), result=result.to_dict()), result.summary()


def _export(ctx: _Context, folder: Path, resume: bool) -> tuple[ExportOutputs, str]:
    from .export.gguf import to_gguf

    merged = ctx.records.get("merge")
    source = merged.outputs.model_dir if merged else ctx.records["train"].outputs.artefact_dir
    results = [to_gguf(source, folder, quant) for quant in ctx.config.pipeline.gguf]
    return (ExportOutputs(export_dir=str(folder), result={"artefacts": [r.to_dict() for r in results]}),
            "; ".join(r.summary() for r in results))


def _report(ctx: _Context, folder: Path, resume: bool) -> tuple[ReportOutputs, str]:
    from .report import write_report

    result = write_report(ctx.out, folder, passed_over=ctx.passed_over)
    # A copy at the top of the run folder, where people look first (the page is self-contained, so it travels).
    top = ctx.out / "report.html"
    shutil.copyfile(result.html, top)
    return ReportOutputs(html=str(top), markdown=result.markdown), f"report: {top}"


def _data_files(config: Config) -> list[str]:
    return [*config.data.train_files, *([config.data.eval_file] if config.data.eval_file else [])]


def _eval_files(config: Config) -> list[str]:
    ev = config.eval
    files = [ev.dataset] if ev.dataset else []
    for metric in ev.metrics:
        files += [str(v) for k, v in metric.model_dump().items() if k in ("database", "schema_path") and v]
    return files


STAGES: dict[StageName, _Stage] = {
    "generate": _Stage(
        sections=lambda c: {"generate": c.pipeline.generate, "dir": c.pipeline.generate_dir,
                            "options": c.pipeline.generate_options},
        not_needed=lambda c: None if c.pipeline.generate else "no pipeline.generate: the data already exists",
        run=_generate),
    "data": _Stage(
        depends=("generate",),
        sections=lambda c: {"data": c.data.model_dump(mode="json"), "model": c.model.model_dump(mode="json"),
                            "max_length": c.train.max_length, "objective": c.train.objective},
        files=_data_files,
        not_needed=lambda c: None if _data_files(c) else "no data.train_files: train.dataset is used as is",
        run=_data, adapt=_data_adapt),
    "baseline": _Stage(
        depends=("data",),
        sections=lambda c: {"eval": c.eval.model_dump(mode="json"), "model": c.model.model_dump(mode="json")},
        files=_eval_files, not_needed=_no_eval_set, run=_baseline),
    "train": _Stage(
        depends=("data",),
        sections=lambda c: {"train": c.train.model_dump(mode="json"), "model": c.model.model_dump(mode="json")},
        files=lambda c: [c.train.dataset] if c.train.dataset else [],
        run=_train),
    "eval": _Stage(
        depends=("train",),
        sections=lambda c: {"eval": c.eval.model_dump(mode="json")},
        files=_eval_files, not_needed=_no_eval_set, run=_tuned_eval),
    "merge": _Stage(
        depends=("train",),
        not_needed=lambda c: "full fine-tuning: the run already holds a whole model" if c.train.method == "full"
        else None,
        run=_merge),
    "export": _Stage(
        depends=("train", "merge"),
        sections=lambda c: {"gguf": c.pipeline.gguf},
        not_needed=lambda c: None if c.pipeline.gguf else "no pipeline.gguf types configured",
        run=_export),
    "report": _Stage(
        depends=("generate", "data", "baseline", "train", "eval", "merge", "export"),
        run=_report),
}
"""Every stage of ``STAGE_NAMES``, which gives the order they run in."""
