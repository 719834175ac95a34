"""``evaluate()``: score one or more models on a task-specific eval set, and compare them.

Reads top to bottom: metrics (checked before anything slow) → eval set → for each model: load, generate, score,
eval loss → statistics and flips against the first model → predictions.jsonl, metrics.json, report.md/.html.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import StageModule
from ..config import Config, MetricConfig, metric_name
from ..errors import UserError
from ..paths import output_folder
from ..records import EvalRun, versions
from .evalset import EvalExample, eval_file, load_eval_set
from .generate import encode_prompts, generate_llama_cpp, generate_transformers, generate_vllm, vllm_available
from .loss import answer_loss
from .metrics import Scorer, build_scorer
from .models import ModelSpec, adapter_rank, load_for_eval, load_spec_tokenizer, resolve_spec
from .report import MetricSummary, ModelRun, flips, paired_difference, summarise, write_report

__all__ = ["EvalReport", "MetricSummary", "evaluate", "task_eval"]

Event = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class ModelScores:
    label: str
    kind: str
    metrics: dict[str, MetricSummary]
    loss: dict[str, float] | None
    seconds: float


@dataclass(frozen=True)
class EvalReport:
    out_dir: str
    dataset: str
    examples: int
    models: list[ModelScores]
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    """For each model after the first and each metric: delta with paired-bootstrap CI, and flip counts."""
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        parts = []
        for m in self.models:
            scores = ", ".join(f"{k} {s.mean:.3f} ({s.correct}/{s.total})" for k, s in m.metrics.items())
            parts.append(f"{m.label}: {scores}")
        return "; ".join(parts) + f" → {self.files.get('report_md', self.out_dir)}"


def evaluate(config: Config, models: Sequence[str] | None = None, out_dir: str | Path | None = None,
             on_event: Event | None = None) -> EvalReport:
    """Evaluate each model (``models``, else ``config.eval.models``) on ``config.eval.dataset`` and write a report."""
    ecfg = config.eval
    out = output_folder(out_dir or Path(config.out_dir) / "eval", "--out" if out_dir else "out_dir")
    emit = on_event or (lambda _e: None)

    scorers = build_scorers(ecfg.metrics)
    path = eval_file(ecfg.dataset, config.train.dataset)
    examples = load_eval_set(path, ecfg.prompt_template, ecfg.system, ecfg.limit)
    specs = [resolve_spec(s, config.model) for s in (list(models) if models else ecfg.models)]
    _check_unique([s.label for s in specs])

    runs = []
    for spec in specs:
        emit({"event": "model", "model": spec.label, "kind": spec.kind, "examples": len(examples)})
        start = time.perf_counter()
        predictions, loss = _generate(spec, examples, ecfg.backend, ecfg.max_new_tokens, ecfg.batch_size,
                                      ecfg.eval_loss, lambda done, total, s=spec: emit(
                                          {"event": "generate", "model": s.label, "done": done, "total": total}))
        verdicts = {name: [score(p, ex.expected) for p, ex in zip(predictions, examples, strict=True)]
                    for name, score in scorers.items()}
        runs.append(ModelRun(spec.label, spec.kind, predictions, verdicts, loss, time.perf_counter() - start))

    summaries = {r.label: {m: summarise(v, ecfg.bootstrap_samples, ecfg.seed) for m, v in r.verdicts.items()}
                 for r in runs}
    comparisons = _compare(runs, ecfg.bootstrap_samples, ecfg.seed)

    comparisons = _with_lines(comparisons, examples)  # flips as eval-file line numbers from here on

    files = write_report(out, str(path), examples, runs, summaries, comparisons, ecfg.max_flips_shown)
    result = EvalReport(str(out), str(path), len(examples),
                        [ModelScores(r.label, r.kind, summaries[r.label], r.loss, round(r.seconds, 3)) for r in runs],
                        comparisons, {k: str(v) for k, v in files.items()})
    EvalRun(config=config.model_dump(mode="json"), models=[asdict(s) for s in specs], outputs=result.files,
            result=result.to_dict(), versions=versions()).write(out)
    return result


def task_eval(model: Any, tokenizer: Any, records: Sequence[dict[str, Any] | EvalExample],
              metrics: Sequence[Any], max_new_tokens: int = 64, batch_size: int = 8) -> dict[str, float]:
    """Periodic task eval during training, on a small sample: ``{"task_<metric>": mean score}``.

    ``records`` are canonical chat records (the last assistant turn is the expected answer) or ``EvalExample``s;
    ``metrics`` are metric names (``"exact"``), mappings (``{"type": "regex", "pattern": ...}``) or metric
    configs. The model is left in the train/eval mode it was in.
    """
    from pydantic import TypeAdapter, ValidationError

    try:
        specs = TypeAdapter(list[MetricConfig]).validate_python(
            [{"type": m} if isinstance(m, str) else m for m in metrics])
    except ValidationError as exc:
        raise UserError(f"task eval metrics: {exc.errors()[0]['msg']}") from None
    scorers = build_scorers(specs)
    examples = [r if isinstance(r, EvalExample) else _record_example(r, k) for k, r in enumerate(records, start=1)]
    predictions = generate_transformers(model, tokenizer, encode_prompts(tokenizer, examples), max_new_tokens,
                                        batch_size)
    out = {}
    for name, score in scorers.items():
        verdicts = [score(p, ex.expected) for p, ex in zip(predictions, examples, strict=True)]
        out[f"task_{name}"] = sum(v.score for v in verdicts) / max(len(verdicts), 1)
    return out


def build_scorers(metrics: Sequence[Any]) -> dict[str, Scorer]:
    """Metric label → scorer, with every metric's resources (database, schema, function) checked now."""
    return {metric_name(m): build_scorer(m.type, m.model_dump(exclude={"type", "name"}), f"eval.metrics[{i}]")
            for i, m in enumerate(metrics)}


def _generate(spec: ModelSpec, examples: list[EvalExample], backend: str, max_new_tokens: int, batch_size: int,
              with_loss: bool, progress: Callable[[int, int], None]) -> tuple[list[str], dict[str, float] | None]:
    """Answers (and, for HF models, the answer loss) of one model; the model is freed before returning."""
    chosen = _backend(spec, backend)
    if chosen == "llama_cpp":
        if spec.gguf is None:
            raise UserError(f"eval.backend llama_cpp: {spec.label} is not a .gguf file",
                            hint="use backend auto, or export the model to GGUF first")
        answers = generate_llama_cpp(spec.gguf, load_spec_tokenizer(spec), examples, max_new_tokens,
                                     progress=progress)
        return answers, None
    if spec.gguf is not None:
        raise UserError(f"eval.backend {chosen}: {spec.label} is a GGUF file", hint="use backend auto or llama_cpp")
    predictions = None
    if chosen == "vllm":  # pragma: no cover - GPU machines with vLLM only
        from ..models import resolve_model_path

        tokenizer = load_spec_tokenizer(spec)
        predictions = generate_vllm(resolve_model_path(spec.model), spec.adapter, tokenizer,
                                    encode_prompts(tokenizer, examples), max_new_tokens,
                                    max_lora_rank=_vllm_rank(adapter_rank(spec.adapter)) if spec.adapter else 16)
        progress(len(examples), len(examples))
        if not with_loss:
            return predictions, None
    model, tokenizer = load_for_eval(spec)
    try:
        if predictions is None:
            predictions = generate_transformers(model, tokenizer, encode_prompts(tokenizer, examples),
                                                max_new_tokens, batch_size, progress)
        loss = answer_loss(model, tokenizer, examples, batch_size) if with_loss else None
    finally:
        del model
        gc.collect()
        _empty_cuda_cache()
    return predictions, loss


def _vllm_rank(r: int) -> int:
    # vLLM accepts only a few max_lora_rank values (powers of two from 8): the smallest one that fits r
    return max(8, 1 << (r - 1).bit_length())


def _backend(spec: ModelSpec, choice: str) -> str:
    if choice != "auto":
        if choice == "vllm" and not vllm_available():
            raise UserError("eval.backend vllm: vLLM is not installed or there is no GPU",
                            hint="use backend auto or transformers")
        return choice
    if spec.gguf is not None:
        return "llama_cpp"
    return "vllm" if vllm_available() else "transformers"


def _compare(runs: list[ModelRun], samples: int, seed: int) -> list[dict[str, Any]]:
    out = []
    first = runs[0]
    for run in runs[1:]:
        for metric, after in run.verdicts.items():
            before = first.verdicts[metric]
            diff = paired_difference([v.score for v in before], [v.score for v in after], samples, seed)
            out.append({"before": first.label, "after": run.label, "metric": metric, **diff,
                        **flips(before, after)})
    return out


def _with_lines(comparisons: list[dict[str, Any]], examples: list[EvalExample]) -> list[dict[str, Any]]:
    """Flip indices as eval-file line numbers (what a person can look up in the eval file)."""
    return [{**c, "fixed": [examples[i].line for i in c["fixed"]], "broken": [examples[i].line for i in c["broken"]]}
            for c in comparisons]


def _record_example(record: dict[str, Any], k: int) -> EvalExample:
    messages = record.get("messages") if isinstance(record, dict) else None
    if not messages or messages[-1].get("role") != "assistant":
        raise UserError(f"task eval record {k}: needs messages ending with the assistant's expected answer")
    return EvalExample(k, [{kk: v for kk, v in m.items() if kk != "weight"} for m in messages[:-1]],
                       str(messages[-1].get("content", "")), record.get("tools"))


def _check_unique(labels: list[str]) -> None:
    seen = set()
    for label in labels:
        if label in seen:
            raise UserError(f"--model {label} is given twice")
        seen.add(label)


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()

sys.modules[__name__].__class__ = StageModule  # `tunesmith.evaluate(...)` calls evaluate() (src/tunesmith/__init__.py)
