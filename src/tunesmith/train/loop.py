"""``train()``: one loop for full fine-tuning, LoRA and QLoRA.

Reads top to bottom: seed → tokenizer and data → model → optimizer and schedule → (resume) → steps → save.
Each optimizer step's loss is the sum of token losses over the step's supervised tokens divided by their count
(across micro-batches and processes), so batch 8 × accumulation 1 and batch 1 × accumulation 8 give the same
gradients on variable-length data.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import signals
from ..chat import TokenizedChat
from ..config import Config, TrainConfig, dump_config
from ..config.eval import metric_name
from ..config.train import DpoSection
from ..errors import Interrupted, RunError, UserError
from ..files import atomic_folder, storage_errors, write_text_atomic
from ..gguf_import import imported_source
from ..hardware.machine import measure_matmul_flops
from ..models import base_model, load_model_config, load_tokenizer, resolve_model_path
from ..records import TrainFiles, TrainRun, versions
from . import best, checkpoint, preference, tracking
from .batching import epoch_order, micro_batches, packs, step_groups
from .dataset import PreferencePair, TokenizedSplit, read_records, split_paths, tokenize_preferences, tokenize_split
from .distributed import Processes, barrier, full_state_dict, init_processes, max_all, set_gradient_sync, sum_all
from .eta import Eta, cpu_warning, estimate, planned_tokens
from .kernels import attention_implementation
from .loss import fused_head_supported, loss_sum
from .measure import measure_hardware
from .model import build_model, count_parameters, embeddings_on, embeddings_to
from .pinned import PinnedPool
from .plan import OPTIMIZER_MEMORY, Precision, TrainPlan, describe, needs_host_link, plan_training

Event = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TrainResult:
    run_dir: str
    method: str
    steps: int
    epochs: float
    train_loss: float | None
    eval_loss: float | None
    eval_token_accuracy: float | None
    tokens_per_s: float
    trainable_params: int
    total_params: int
    artefact: str
    data: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    """What the run warned about as it went (a long CPU run, a shrunk micro-batch): the report lists them."""
    objective: str = "sft"
    eval_win_rate: float | None = None
    """DPO: the share of held-out pairs whose preferred answer has the higher implicit reward."""
    best_step: int | None = None
    """The step of the best evaluation by ``train.metric_for_best_model`` (None: no evaluation)."""
    best_metric: dict[str, float] | None = None
    """``{metric_for_best_model: its value}`` at ``best_step``."""
    kept_step: int | None = None
    """The step whose weights are the run's adapter/model: ``best_step`` with ``load_best_model_at_end``, else the
    last step."""
    stopped_early: bool = False
    """Early stopping ended the run before its planned steps."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        ev = f", eval loss {self.eval_loss:.4f}" if self.eval_loss is not None else ""
        if self.eval_win_rate is not None:
            ev += f", eval win-rate {self.eval_win_rate:.0%}"
        tl = f"{self.train_loss:.4f}" if self.train_loss is not None else "n/a"
        objective = "" if self.objective == "sft" else f" {self.objective}"
        return (f"{self.method}{objective}: {self.steps} steps, train loss {tl}{ev}, "
                f"{self.tokens_per_s:,.0f} tokens/s; "
                f"{self.trainable_params:,} of {self.total_params:,} parameters trained → {self.artefact}")


def train(config: Config, out_dir: str | Path | None = None, resume: bool | str | Path = False,
          on_event: Event | None = None) -> TrainResult:
    """Train as ``config.train`` says and write a run folder (adapter/ or model/, checkpoints/, metrics, run.json).
    ``resume``: True continues from the newest complete checkpoint, a path from that checkpoint of this run."""
    tcfg = config.train
    out = Path(out_dir) if out_dir else Path(config.out_dir) / "train"
    # before anything slow: a tracker that cannot start or a best-model metric no evaluation computes is a typo
    tracking.check_trackers(tcfg.report_to)
    best.greater_is_better(tcfg.metric_for_best_model, tcfg.greater_is_better,
                           [metric_name(m) for m in config.eval.metrics] if tcfg.task_eval_samples else [])
    _seed_everything(tcfg.seed, tcfg.deterministic)
    procs = init_processes()
    device = procs.device
    emit = (on_event or (lambda _e: None)) if procs.main else (lambda _e: None)

    model_path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(config.model, path=model_path)
    train_file, eval_file = split_paths(tcfg.dataset)
    tokenize = tokenize_preferences if tcfg.objective == "dpo" else tokenize_split
    train_split = tokenize(train_file, tokenizer, tcfg.max_length, tcfg.overlong)
    eval_split = tokenize(eval_file, tokenizer, tcfg.max_length, "truncate") if eval_file else None
    if not train_split.examples:
        raise UserError(f"{train_file}: no trainable examples (after dropping {train_split.dropped_overlong} over "
                        f"max_length and {train_split.dropped_unsupervised} with no supervised tokens)",
                        hint="check the data with `tunesmith data prepare`, or raise train.max_length")

    packed = packs(tcfg.packing, device.type)
    fingerprint = _fingerprint(tcfg, config.model.name_or_path, [train_file, eval_file])
    hardware = measure_hardware(device, host_link=needs_host_link(tcfg, procs.world))
    plan = plan_training(load_model_config(config.model, model_path), tcfg, hardware=hardware, world=procs.world)
    emit({"event": "plan", "message": describe(plan), **plan.to_dict()})
    precision = plan.precision
    # what offloading keeps in CPU memory, page-locked once now rather than during the first steps
    pinned = PinnedPool(plan.pinned) if plan.pinned is not None else None
    if pinned is not None:
        emit({"event": "pinned", "message": f"{plan.pinned.describe()}: allocated in {pinned.reserve_s:.1f} s",
              **pinned.stats()})
    attn = attention_implementation(device.type, packed)
    model = build_model(config.model, tcfg, plan, procs, attn_implementation=attn, path=model_path, pinned=pinned)
    if plan.embeddings_on_cpu:
        embeddings_to(model, "cpu")
    trainable, total = count_parameters(model)
    eta = _estimate(train_split, tcfg, plan, parameters=total, device=device, world=procs.world) \
        if procs.main else None

    dpo = tcfg.objective == "dpo"
    task_eval = _task_eval(config, tokenizer, eval_file) if eval_file and tcfg.task_eval_samples and not dpo \
        else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    setup = StepSetup(procs=procs, precision=precision, optimizer=plan.optimizer, pad_id=pad_id, packed=packed,
                      fused_loss=fused_head_supported(model), preference=tcfg.dpo if dpo else None, pinned=pinned)
    train_examples, eval_examples = train_split.examples, eval_split.examples if eval_split else []
    if dpo and not preference.uses_adapters_as_reference(model):
        train_examples, eval_examples = _reference_logps(model, setup, tcfg, train_examples, eval_examples, out,
                                                         resume, emit)
    trackers = tracking.open_trackers(tcfg.report_to, out=out, config=config.model_dump(mode="json"),
                                      run_name=out.resolve().name) if procs.main else tracking.Trackers([])
    try:
        history = fit(model=model, setup=setup, tcfg=tcfg, train_examples=train_examples,
                      eval_examples=eval_examples, out=out, resume=resume,
                      fingerprint=fingerprint, emit=emit, task_eval=task_eval, eta=eta, trackers=trackers)
    finally:
        trackers.close()

    artefact = _save_final(model, tokenizer, tcfg.method, out, precision, procs)
    if not procs.main:
        return TrainResult(str(out), tcfg.method, history["steps"], history["epochs"], history["train_loss"],
                           history["eval_loss"], history["eval_token_accuracy"], history["tokens_per_s"],
                           trainable, total, str(artefact))
    data = {"train": {**train_split.stats, "file": str(train_file), "dropped_overlong": train_split.dropped_overlong,
                      "truncated": train_split.truncated, "dropped_unsupervised": train_split.dropped_unsupervised},
            "eval": {**eval_split.stats, "file": str(eval_file)} if eval_split else None}
    result = TrainResult(str(out), tcfg.method, history["steps"], history["epochs"], history["train_loss"],
                         history["eval_loss"], history["eval_token_accuracy"], history["tokens_per_s"],
                         trainable, total, str(artefact), data, tuple(history["warnings"]), tcfg.objective,
                         history["eval_win_rate"], best_step=history["best_step"], best_metric=history["best_metric"],
                         kept_step=history["kept_step"], stopped_early=history["stopped_early"])
    full = tcfg.method == "full"
    TrainRun(model=config.model, base_model_path=model_path, base_model_source=imported_source(Path(model_path)),
             method=tcfg.method, quantization=tcfg.quant if tcfg.method == "qlora" else None,
             fp8_base=plan.fp8_base,
             train_file=str(Path(train_file).resolve()),
             eval_file=str(Path(eval_file).resolve()) if eval_file else None,
             outputs=TrainFiles(adapter=None if full else str(artefact), model=str(artefact) if full else None,
                                metrics=str(out / METRICS)),
             config=config.model_dump(mode="json"), config_yaml=dump_config(config), precision=precision.name,
             packing=packed, device=device.type, processes=procs.world, plan=plan.to_dict(),
             fingerprint=fingerprint.digest, result=result.to_dict(), versions=versions()).write(out)
    return result


METRICS = "metrics.jsonl"
REFERENCE = "reference_logps.json"
"""DPO with full fine-tuning: the initial weights' log-probs of every pair, written once so a resumed run keeps
the same reference (the weights it resumes from are no longer the initial ones)."""


def _reference_logps(model: Any, setup: StepSetup, tcfg: TrainConfig, train_pairs: list[PreferencePair],
                     eval_pairs: list[PreferencePair], out: Path, resume: bool | str | Path, emit: Event
                     ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """The pairs with their reference log-probs: computed with the initial weights before the first step, or read
    back from the run folder on resume."""
    path = out / REFERENCE
    if resume and path.is_file():
        saved = json.loads(path.read_text())
        if len(saved["train"]) != len(train_pairs) or len(saved["eval"]) != len(eval_pairs):
            raise UserError(f"{path}: holds reference log-probs of other data than this run's",
                            hint="resume with the original data, or start a new run in another --out folder")
        return ([replace(p, reference=tuple(r)) for p, r in zip(train_pairs, saved["train"], strict=True)],
                [replace(p, reference=tuple(r)) for p, r in zip(eval_pairs, saved["eval"], strict=True)])
    start = time.perf_counter()
    train_pairs, eval_pairs = (preference.precompute(model, pairs, setup=setup,
                                                     micro_size=tcfg.per_device_train_batch_size,
                                                     max_length=tcfg.max_length)
                               for pairs in (train_pairs, eval_pairs))
    if setup.procs.main:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"train": [p.reference for p in train_pairs],
                                            "eval": [p.reference for p in eval_pairs]}))
    emit({"event": "reference", "message": f"reference log-probs of {len(train_pairs) + len(eval_pairs)} pairs "
                                           f"computed with the initial weights in {time.perf_counter() - start:.1f} s",
          "pairs": len(train_pairs) + len(eval_pairs)})
    return train_pairs, eval_pairs


def _estimate(split: TokenizedSplit, tcfg: TrainConfig, plan: TrainPlan, *, parameters: int, device: torch.device,
              world: int) -> Eta:
    """The whole run's token count and duration, from the matmul rate measured now in the dtype the layers compute
    in (bf16 under autocast, else the weights' dtype)."""
    precision = plan.precision
    tokens = planned_tokens(split.stats["tokens"], split.stats["examples"],
                            tcfg.per_device_train_batch_size * tcfg.gradient_accumulation_steps * world,
                            tcfg.num_train_epochs, tcfg.max_steps)
    recomputed = 1.0 if plan.checkpointed_layers is None else plan.checkpointed_layers / max(plan.layers, 1)
    return estimate(tokens // world, parameters, tcfg.method, recomputed, device.type,
                    measure_matmul_flops(device, precision.autocast or precision.weights))


def _announce(eta: Eta, emit: Event) -> list[str]:
    """The estimate as an event before the first step (of what is left, after a resume); on a CPU a long run is
    also a warning with what to change. Returns the warnings for the run's result."""
    emit({"event": "eta", "message": eta.message(), "tokens": eta.tokens, "seconds": eta.seconds})
    warning = cpu_warning(eta)
    if warning:
        emit({"event": "warning", "message": warning})
    return [warning] if warning else []


@dataclass(frozen=True)
class StepSetup:
    """How every step of a run computes, fixed before the first: built once by ``train()`` from the plan (or by a
    benchmark or a test around a model built by hand) and handed to the loop's calls."""

    procs: Processes
    precision: Precision
    optimizer: str
    """The plan's optimizer (adamw_torch | adamw_8bit | adamw_8bit_bf16): what the loop builds and checkpoints."""
    pad_id: int
    packed: bool
    """Examples packed into rows with per-example positions (batching.py), else padded micro-batches."""
    fused_loss: bool
    """The loss over the head in chunks, never the whole logits (loss.py): where ``fused_head_supported(model)``;
    one process and FSDP2 alike. Benchmarks force either path."""
    loss_kernel: bool = True
    """With ``fused_loss``: Liger's kernel where installed, else our PyTorch chunks (benchmarks ablate it)."""
    preference: DpoSection | None = None
    """None: the supervised token loss over chat examples; the ``train.dpo`` settings: the DPO loss over
    preference pairs (preference.py), each pair's two sequences in one micro-batch."""
    pinned: PinnedPool | None = None
    """The run's pinned CPU memory (the plan's ``pinned``, allocated before the first step): the offloader's slots
    (given to the model's offloaded layers when built) and the buffers input-embedding rows are looked up into."""

    @property
    def device(self) -> torch.device:
        return self.procs.device


def fit(*, model: Any, setup: StepSetup, tcfg: TrainConfig,
        train_examples: list[TokenizedChat] | list[PreferencePair],
        eval_examples: list[TokenizedChat] | list[PreferencePair], out: Path, resume: bool | str | Path = False,
        fingerprint: checkpoint.Fingerprint | None = None, emit: Event = lambda _e: None,
        task_eval: Callable[[Any], dict[str, float]] | None = None, eta: Eta | None = None,
        trackers: tracking.Trackers | None = None) -> dict[str, Any]:
    """The optimisation loop on pre-tokenised examples. Usable directly by benchmarks with a model built by hand.
    ``eta``: the whole run's estimate, announced for the steps left once a resume has found its step.
    ``trackers``: receive each logged train record and each evaluation."""
    procs, device, precision = setup.procs, setup.device, setup.precision
    per_step = tcfg.per_device_train_batch_size * tcfg.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(train_examples) / (per_step * procs.world))
    total_steps = tcfg.max_steps or math.ceil(tcfg.num_train_epochs * steps_per_epoch)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, setup.optimizer, tcfg, device)
    scheduler = _scheduler(optimizer, tcfg, total_steps)

    out.mkdir(parents=True, exist_ok=True)
    ckpt_root = out / "checkpoints"
    step = 0
    if resume:
        step = _resume(ckpt_root, model, optimizer, scheduler, fingerprint, tcfg, emit, procs, resume,
                       setup.optimizer)
    elif checkpoint.latest(ckpt_root) is not None:
        raise UserError(f"{out} already holds checkpoints of a run",
                        hint="pass --resume to continue it, or choose another --out folder")
    barrier(procs)
    if procs.main:
        _truncate_metrics(out / METRICS, step)
    log = (lambda rec: _append(out / METRICS, rec)) if procs.main else (lambda _rec: None)
    trackers = trackers or tracking.Trackers([])
    # evaluations so far (those before a resume's step come from metrics.jsonl), for the best step and early stop
    evaluations = _past_evaluations(out / METRICS, step) if step else {}
    selection: best.Selection | None = None

    warnings = _announce(eta.remaining(1 - step / total_steps), emit) if eta is not None else []
    micro_size = tcfg.per_device_train_batch_size
    stop = _SignalFlag(ckpt_root)
    emit({"event": "start", "total_steps": total_steps, "start_step": step, "steps_per_epoch": steps_per_epoch,
          "examples": len(train_examples), "packed": setup.packed, "fused_loss": setup.fused_loss,
          "precision": precision.name})
    window_tokens, window_start = 0, time.perf_counter()
    total_tokens, run_start = 0, time.perf_counter()
    last_loss: float | None = None
    eval_metrics: dict[str, float] = {}
    with stop, _adapter_inputs_in_compute_dtype(model, precision):
        while step < total_steps:
            stop.step = step + 1
            epoch, in_epoch = divmod(step, steps_per_epoch)
            indices = step_groups(epoch_order(len(train_examples), tcfg.seed, epoch),
                                  per_step * procs.world)[in_epoch]
            model.train()
            while True:
                try:
                    batches, real, n_targets, step_loss, step_metrics = _objective_step(
                        model, setup=setup, tcfg=tcfg, examples=train_examples, indices=indices,
                        micro_size=micro_size)
                    break
                except torch.OutOfMemoryError:
                    optimizer.zero_grad(set_to_none=True)
                    _free_cuda(device)
                    if tcfg.on_oom != "shrink" or micro_size == 1 or procs.distributed:
                        raise _oom_error(model, tcfg, micro_size, device, setup.optimizer) from None
                    micro_size //= 2  # same sequences in the step, smaller micro-batches: same optimisation
                    warnings.append(f"out of memory at step {step + 1}: retried with micro-batches of {micro_size}")
                    emit({"event": "warning", "message": warnings[-1]})
            if not math.isfinite(step_loss):  # a non-finite micro-batch loss makes the sum non-finite
                raise _nan_error(step + 1, "loss", ckpt_root)
            grad_norm = _clip(params, tcfg.max_grad_norm)
            if not math.isfinite(grad_norm):
                raise _nan_error(step + 1, "gradient norm", ckpt_root)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens = int(sum_all(sum(b.num_tokens for b in batches[:real]), procs))
            window_tokens += tokens
            total_tokens += tokens
            last_loss = step_loss / n_targets
            record = {"type": "train", "step": step, "epoch": round(step / steps_per_epoch, 4), "loss": last_loss,
                      "learning_rate": float(scheduler.get_last_lr()[0]), "grad_norm": grad_norm,
                      "tokens": tokens, "supervised_tokens": n_targets, **step_metrics}
            logged = step % tcfg.logging_steps == 0 or step == total_steps
            if logged:
                _sync(device)
                now = time.perf_counter()
                record["tokens_per_s"] = window_tokens / max(now - window_start, 1e-9)
                record["peak_memory_gib"] = _peak_memory_gib(device)
                window_tokens, window_start = 0, now
            log(record)
            if logged:
                trackers.log(record, step)
            emit({"event": "step", **record, "total_steps": total_steps})

            end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
            if eval_examples and _due(tcfg.eval_strategy, tcfg.eval_steps, step, end_of_epoch):
                evaluate = preference.evaluate if setup.preference is not None else evaluate_loss
                eval_metrics = evaluate(model, eval_examples, setup=setup, tcfg=tcfg)
                if task_eval is not None:
                    # generation as the training forward runs: bf16 autocast over fp32 adapters (whose inputs the
                    # loop leaves in bf16), the tokens looked up on the GPU
                    with embeddings_on(model, device), _autocast(device, precision):
                        eval_metrics |= task_eval(model)
                eval_record = {"type": "eval", "step": step, "epoch": record["epoch"], **eval_metrics}
                log(eval_record)
                trackers.log(eval_record, step)
                emit({"event": "eval", "step": step, **eval_metrics})
                evaluations[step] = eval_metrics
                selection = _select(evaluations, tcfg)
            early_stop = selection is not None and selection.stop
            # a new best is kept on disk until the end (unless this is the last step: its weights stay in memory)
            keep_best = (tcfg.load_best_model_at_end and selection is not None and selection.latest_is_best
                         and selection.best_step == step and step < total_steps)
            if stop.raised or keep_best or (step < total_steps and not early_stop
                                            and _due(tcfg.save_strategy, tcfg.save_steps, step, end_of_epoch)):
                path = checkpoint.save(ckpt_root, step, model, optimizer, scheduler,
                                       {"step": step, **(fingerprint.to_state() if fingerprint else {}),
                                        "optimizer": setup.optimizer},
                                       tcfg.save_total_limit, procs, best=selection.best_step if selection else None)
                emit({"event": "checkpoint", "step": step, "path": str(path)})
            if stop.raised:
                raise Interrupted(f"stopped by {stop.raised} after step {step}; checkpoint written",
                                  hint="continue with the same command plus --resume")
            if early_stop:
                warnings.append(f"early stopping after step {step}: {tcfg.metric_for_best_model} did not improve "
                                f"for {tcfg.early_stopping_patience} evaluations (best at step "
                                f"{selection.best_step})")
                emit({"event": "early_stop", "step": step, "best_step": selection.best_step,
                      "message": warnings[-1]})
                break
    _sync(device)
    elapsed = time.perf_counter() - run_start
    kept = step
    if tcfg.load_best_model_at_end and selection is not None and selection.best_step != step:
        kept = selection.best_step
        checkpoint.restore(checkpoint.chosen(ckpt_root, ckpt_root / f"step-{kept}"), model, optimizer, scheduler,
                           procs)
        eval_metrics = evaluations[kept]
        emit({"event": "best", "step": kept, "message": f"kept the weights of step {kept} (the best "
                                                        f"{tcfg.metric_for_best_model})"})
    if procs.main and (warning := best.overfitting(*_loss_curves(out / METRICS))):
        warnings.append(warning)
        emit({"event": "warning", "message": warning})
    return {"steps": step, "epochs": round(step / steps_per_epoch, 4), "train_loss": last_loss,
            "eval_loss": eval_metrics.get("eval_loss"), "eval_token_accuracy": eval_metrics.get("eval_token_accuracy"),
            "tokens_per_s": total_tokens / max(elapsed, 1e-9), "warnings": warnings,
            "eval_win_rate": eval_metrics.get("eval_win_rate"),
            "best_step": selection.best_step if selection else None,
            "best_metric": {tcfg.metric_for_best_model: selection.best_value} if selection else None,
            "kept_step": kept, "stopped_early": selection is not None and selection.stop}


def _objective_step(model: Any, *, setup: StepSetup, tcfg: TrainConfig,
                    examples: list[TokenizedChat] | list[PreferencePair], indices: list[int], micro_size: int
                    ) -> tuple[list[Any], int, int, float, dict[str, float]]:
    """One step's forwards and backwards for the run's objective: (micro-batches, how many are this process's
    own, the loss's divisor — supervised tokens for SFT, pairs for DPO —, the summed loss, metrics to log)."""
    if setup.preference is not None:
        return preference.accumulate(model, setup=setup, dpo=setup.preference, pairs=examples, indices=indices,
                                     micro_size=micro_size, max_length=tcfg.max_length,
                                     row_tokens=_row_tokens(tcfg, micro_size))
    batches, real, n_targets, step_loss = _accumulate(model, setup=setup, examples=examples, indices=indices,
                                                      micro_size=micro_size, max_length=tcfg.max_length,
                                                      row_tokens=_row_tokens(tcfg, micro_size))
    return batches, real, n_targets, step_loss, {}



def _select(evaluations: dict[int, dict[str, float]], tcfg: TrainConfig) -> best.Selection:
    """The best step so far and whether to stop, by ``train.metric_for_best_model``."""
    metric = tcfg.metric_for_best_model
    latest = evaluations[max(evaluations)]
    tasks = [k.removeprefix("task_") for k in latest if k.startswith("task_")]
    greater = best.greater_is_better(metric, tcfg.greater_is_better, tasks)
    if metric not in latest:
        raise UserError(f"train.metric_for_best_model: {metric!r} is not among this evaluation's metrics "
                        f"({', '.join(latest)})", hint="choose one of those")
    return best.select([(s, m[metric]) for s, m in sorted(evaluations.items()) if metric in m], greater=greater,
                       patience=tcfg.early_stopping_patience, threshold=tcfg.early_stopping_threshold)


def _past_evaluations(path: Path, step: int) -> dict[int, dict[str, float]]:
    """Evaluations in metrics.jsonl up to ``step`` (a resume's), by step: every process reads them, so every
    process makes the same early-stopping decision."""
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    return {r["step"]: {k: v for k, v in r.items() if k not in ("type", "step", "epoch")}
            for r in records if r.get("type") == "eval" and r["step"] <= step}


def _loss_curves(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, train loss) and (step, eval loss) of the whole run, resumed parts included."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
    return ([(r["step"], r["loss"]) for r in records if r.get("type") == "train"],
            [(r["step"], r["eval_loss"]) for r in records if r.get("type") == "eval" and "eval_loss" in r])


def _peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or on the CPU this process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _row_tokens(tcfg: TrainConfig, micro_size: int) -> int | None:
    """``train.packed_row_tokens``, scaled down with the micro-batch when ``on_oom: shrink`` halved it (never below
    one sequence of ``max_length``); None: the default ``micro_size × max_length``."""
    if tcfg.packed_row_tokens is None:
        return None
    return max(tcfg.max_length, tcfg.packed_row_tokens * micro_size // tcfg.per_device_train_batch_size)


def _accumulate(model: Any, *, setup: StepSetup, examples: list[TokenizedChat], indices: list[int], micro_size: int,
                max_length: int, row_tokens: int | None) -> tuple[list[Any], int, float, float]:
    """Forward and backward over one step's micro-batches; gradients are left summed in ``.grad``. Returns the
    micro-batches, how many of them are this process's own, and the step's supervised tokens and summed loss over
    every process."""
    procs, pad_id, packed = setup.procs, setup.pad_id, setup.packed
    batches = micro_batches(examples, indices, micro_size, max_length, pad_id, packed, procs.rank, procs.world,
                            row_tokens)
    # every process runs the same number of micro-batches (FSDP2 gathers weights in each forward): a process with
    # fewer (only when the step has fewer sequences than rows) runs the step's shortest sequence with zero weight
    real = len(batches)
    n_micro = max_all(real, procs)
    if real < n_micro:
        shortest = min(indices, key=lambda i: len(examples[i].input_ids))
        batches += micro_batches(examples, [shortest], 1, max_length, pad_id, packed) * (n_micro - real)
    n_targets = sum_all(sum(b.num_targets for b in batches[:real]), procs)
    # the step's loss is summed on the GPU and read once at the end: reading it per micro-batch would make the CPU
    # wait for each backward before preparing the next micro-batch
    step_loss = torch.zeros((), device=setup.device)
    for i, batch in enumerate(batches):
        set_gradient_sync(model, i == n_micro - 1)
        with _autocast(setup.device, setup.precision):
            loss, _ = loss_sum(model, batch.to(setup.device), setup.fused_loss, setup.loss_kernel,
                               pinned=setup.pinned)
        weight = procs.world / n_targets if i < real else 0.0  # FSDP2 averages gradients over processes
        (loss * weight).backward()
        if i < real:
            step_loss += loss.detach().float()
    # a non-finite loss on any process stays non-finite in the sum: every process stops at the same step
    return batches, real, n_targets, sum_all(step_loss.item(), procs)


def _oom_error(model: Any, tcfg: TrainConfig, micro_size: int, device: torch.device,
               optimizer_name: str = "adamw_torch") -> RunError:
    """Out of GPU memory: say what the memory model expected (with the plan's ``optimizer_name``) and what to
    change."""
    from ..hardware.memory import architecture_from_config, estimate_memory

    have = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    detail = ""
    try:
        base = base_model(model)
        arch = architecture_from_config(base.config)
        row = _row_tokens(tcfg, micro_size)  # a packed row's own budget, when one is set
        batch, length = (1, row) if row else (micro_size, tcfg.max_length)
        optimizer, weights = OPTIMIZER_MEMORY[optimizer_name]
        est = estimate_memory(arch, tcfg.method, batch, length,
                              checkpointing="full" if tcfg.gradient_checkpointing is not False else "none",
                              optimizer=optimizer, full_precision=weights, lora_r=tcfg.lora.r)
        detail = f" (the memory model estimates {est.total_gib:.1f} GiB for micro-batches of {batch} × " \
                 f"{length} tokens" + (f"; this GPU has {have:.1f} GiB)" if have else ")")
    except (AttributeError, KeyError, TypeError, ValueError):  # an architecture the model does not know
        detail = ""
    return RunError(f"out of GPU memory{detail}",
                    hint="lower train.per_device_train_batch_size (the step keeps its sequences if you raise "
                         "gradient_accumulation_steps to match), set train.gradient_checkpointing: true, lower "
                         "train.max_length, use method: qlora (full fine-tuning on one GPU: optim: adamw_8bit_bf16) "
                         "— or set train.on_oom: shrink to retry with smaller micro-batches automatically")


def _free_cuda(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def evaluate_loss(model: Any, examples: list[TokenizedChat], *, setup: StepSetup, tcfg: TrainConfig
                  ) -> dict[str, float]:
    """Mean token loss, perplexity and next-token accuracy over the supervised tokens of ``examples``."""
    procs, pad_id, device = setup.procs, setup.pad_id, setup.device
    model.eval()
    total = correct = 0.0
    count = 0
    batches = micro_batches(examples, range(len(examples)), tcfg.per_device_train_batch_size, tcfg.max_length,
                            pad_id, False, procs.rank, procs.world)
    real = len(batches)
    batches += micro_batches(examples, [0], 1, tcfg.max_length, pad_id, False) * (max_all(real, procs) - real)
    for i, batch in enumerate(batches):
        with _autocast(device, setup.precision):
            loss, right = loss_sum(model, batch.to(device), fused=False)
        if i < real:
            total += loss.item()
            correct += right.item()
            count += batch.num_targets
    total, correct, count = sum_all(total, procs), sum_all(correct, procs), sum_all(count, procs)
    mean = total / max(count, 1)
    return {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50)),
            "eval_token_accuracy": correct / max(count, 1)}


def _task_eval(config: Config, tokenizer: Any, eval_file: Path) -> Callable[[Any], dict[str, float]]:
    """Generation-based task metrics on the first ``train.task_eval_samples`` eval examples."""
    from ..evaluate import task_eval

    records = []
    for _, record in read_records(eval_file):
        records.append(record)
        if len(records) == config.train.task_eval_samples:
            break
    metrics = [m.model_dump() for m in config.eval.metrics]
    return lambda model: task_eval(model, tokenizer, records, metrics, config.eval.max_new_tokens,
                                   config.eval.batch_size)


def _resume(root: Path, model: Any, optimizer: Any, scheduler: Any, fingerprint: checkpoint.Fingerprint | None,
            tcfg: TrainConfig, emit: Event, procs: Processes, wanted: bool | str | Path, planned: str) -> int:
    ckpt = checkpoint.chosen(root, wanted)
    if ckpt is None:
        raise UserError(f"--resume: no complete checkpoint in {root}",
                        hint="run without --resume to start, or point --out at the interrupted run's folder")
    written_by = ckpt.state.get("optimizer", planned)  # checkpoints before this key: as planned now
    if written_by != planned:  # whatever on_config_change says: one optimizer's states do not load into another
        raise UserError(f"--resume: checkpoint {ckpt.path.name} holds {written_by} optimizer states; this run "
                        f"plans {planned}", hint=f"set train.optim: {written_by} to resume it")
    if fingerprint is not None and ckpt.state.get("fingerprint") != fingerprint.digest:
        changed = checkpoint.changes(ckpt.state, fingerprint)
        message = (f"--resume: the config or data differ from those of checkpoint {ckpt.path.name}"
                   + (f"; changed: {'; '.join(changed)}" if changed else ""))
        if tcfg.on_config_change == "refuse":
            raise UserError(message, hint="resume with the original config and data, or set "
                                          "train.on_config_change: warn to continue anyway")
        emit({"event": "warning", "message": message})
    checkpoint.restore(ckpt, model, optimizer, scheduler, procs)
    emit({"event": "resumed", "step": ckpt.step, "path": str(ckpt.path)})
    return ckpt.step


def _save_final(model: Any, tokenizer: Any, method: str, out: Path, precision: Precision,
                procs: Processes) -> Path:
    """An ordinary HF folder (full) or PEFT adapter folder, consolidated from shards when there are several
    processes; full weights are stored in the training compute dtype (bf16 on GPUs) like the base they came from."""
    target = out / ("model" if method == "full" else "adapter")
    state = full_state_dict(model, procs) if procs.distributed else None
    if not procs.main:
        barrier(procs)
        return target
    cast = precision.autocast if method == "full" else None
    if state is not None and cast is not None:
        state = {k: v.to(cast) if v.is_floating_point() else v for k, v in state.items()}
    elif cast is not None:
        model = model.to(cast)
    # written beside and renamed: a full disk leaves the run without a half-written adapter/ or model/
    with atomic_folder(target, _saved_bytes(model, state, method == "full")) as staging:
        model.save_pretrained(staging, safe_serialization=True,
                              **({"state_dict": state} if state is not None else {}))
        tokenizer.save_pretrained(staging)
    barrier(procs)
    return target


def _saved_bytes(model: Any, state: dict[str, torch.Tensor] | None, full: bool) -> int | None:
    """About what the final save writes: every weight (full) or the trainable ones (an adapter); unknown for an
    adapter taken from a consolidated state, which holds the frozen weights too."""
    if full:
        tensors = state.values() if state is not None else model.parameters()
        return sum(t.numel() * t.element_size() for t in tensors)
    if state is not None:
        return None
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def _optimizer(params: list[torch.nn.Parameter], name: str, cfg: TrainConfig, device: torch.device
               ) -> torch.optim.Optimizer:
    """The plan's optimizer ``name`` over ``params``, with the config's learning rate and weight decay."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if name == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("train.optim: adamw_8bit needs bitsandbytes", hint="pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate)
    if name == "adamw_8bit_bf16":
        from torchao.optim import AdamW8bit  # the plan checked that it is installed

        # its update compiles once per parameter shape; the same hyper-parameters as the other AdamWs
        return AdamW8bit(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8, bf16_stochastic_round=True)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=device.type == "cuda")


def _scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> Any:
    from transformers import get_scheduler

    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _clip(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """Global gradient norm (clipped to ``max_norm``). FSDP2's gradients are DTensors: the norm is taken on each
    process's local shards with torch's own helpers and summed over the shard group once — the same number as
    ``clip_grad_norm_`` on the DTensors, without dispatching hundreds of small DTensor ops every step."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not isinstance(grads[0], DTensor):
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
        return float(norm)
    local = [g.to_local() for g in grads]
    squares = torch.nn.utils.get_total_norm(local, 2.0).float() ** 2
    mesh, placements = grads[0].device_mesh, grads[0].placements
    for dim, placement in enumerate(placements):
        if placement.is_shard() and mesh.size(dim) > 1:
            torch.distributed.all_reduce(squares, group=mesh.get_group(dim))
    total = float(squares.sqrt())
    if max_norm and total > max_norm:
        torch._foreach_mul_(grads, max_norm / (total + 1e-6))  # one op over the list (DTensor's foreach rule)
    return total


def _nan_error(step: int, what: str, ckpt_root: Path) -> RunError:
    last = checkpoint.latest(ckpt_root)
    kept = f"the last good checkpoint is {last.path}" if last else "no checkpoint was written before it"
    return RunError(f"the {what} became NaN/inf at step {step}; training stopped before applying it ({kept})",
                    hint="lower train.learning_rate, keep train.max_grad_norm set, use precision bf16 rather than "
                         "fp16, and check the data for empty or extreme examples")


def _due(strategy: str, every: int, step: int, end_of_epoch: bool) -> bool:
    return (strategy == "epoch" and end_of_epoch) or (strategy == "steps" and step % every == 0)


def _adapter_inputs_in_compute_dtype(model: Any, precision: Precision) -> Any:
    """Under autocast, stop PEFT copying each adapted layer's input to the fp32 adapter dtype: lora_A casts it
    straight back to bf16 under autocast, so the copy changes no matmul but costs ~1 GB of memory traffic per
    block per 8K-token pass (7 adapted layers × input read/write in fp32, forward and backward). PEFT's own switch,
    scoped to the loop; adapter weights and optimizer states stay fp32."""
    if precision.autocast is None or not hasattr(model, "peft_config"):
        return contextlib.nullcontext()
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model)


def _autocast(device: torch.device, precision: Precision) -> Any:
    if precision.autocast is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=precision.autocast)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def _fingerprint(cfg: TrainConfig, model_name: str, files: list[Path | None]) -> checkpoint.Fingerprint:
    # what changes the optimisation; logging/saving cadence may change on resume
    # and which step is kept or when to stop may too (and leave older runs' fingerprints unchanged)
    relevant = cfg.model_dump(mode="json", exclude={"logging_steps", "save_strategy", "save_steps",
                                                     "save_total_limit", "on_config_change", "report_to",
                                                     "metric_for_best_model", "greater_is_better",
                                                     "load_best_model_at_end", "early_stopping_patience",
                                                     "early_stopping_threshold"})
    return checkpoint.fingerprint(relevant, model_name, files)


def _append(path: Path, record: dict[str, Any]) -> None:
    with storage_errors(path), open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, forget metrics logged after the checkpoint (those steps are about to be redone)."""
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


class _SignalFlag:
    """Turns SIGTERM/SIGINT into a flag checked at the next step boundary (checkpoint, then exit). A second signal
    stops at once, without that checkpoint: ``Interrupted`` naming the step and the checkpoint a resume starts from."""

    def __init__(self, ckpt_root: Path) -> None:
        self.raised: str | None = None
        self.step = 0
        """The step in progress (the loop sets it), for the message of a second signal."""
        self._ckpt_root = ckpt_root
        self._handling = contextlib.ExitStack()

    def __enter__(self) -> _SignalFlag:
        self._handling.enter_context(signals.handling(self._handle, signal.SIGTERM, signal.SIGINT))
        return self

    def __exit__(self, *exc: object) -> None:
        self._handling.close()

    def _handle(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.raised:  # a second signal: stop now, mid-step; a half-written checkpoint stays a .tmp- folder
            last = checkpoint.newest_sealed(self._ckpt_root)
            if last is None:
                raise Interrupted(f"stopped by a second {name} during step {self.step}; no checkpoint was written",
                                  hint="run the same command again to start over")
            raise Interrupted(f"stopped by a second {name} during step {self.step}; the last checkpoint is {last}",
                              hint="continue with the same command plus --resume")
        self.raised = name
