"""Decisions about a fine-tuning job, made once by pure functions: the request checked and its ``"auto"``
hyperparameters resolved, the fine-tuned model's name, and the tunesmith config the job runs.

The ``"auto"`` rules (reported back in the job's ``hyperparameters`` and ``method``):
- ``n_epochs``: 3, the OpenAI cookbook's default, moved so that examples × epochs lies in [100, 25,000] (small
  sets get more passes, huge ones fewer), within [1, 25];
- ``batch_size``: the guide's 16 sequences per optimizer step (4 per micro-batch × 4 accumulated), but at most an
  eighth of the examples, so an epoch has at least 8 steps (10 examples → 1; 128 or more → 16);
- ``learning_rate_multiplier``: 1, i.e. the guide's recommended LoRA learning rate (2e-4); a multiplier scales it;
- ``beta`` (DPO): 0.1, the DPO paper's and TRL's default.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..config import PRESETS, Config
from . import schemas
from .settings import ServerSettings

DEFAULT_EPOCHS = 3
MIN_TRAINED_EXAMPLES, MAX_TRAINED_EXAMPLES = 100, 25_000
MAX_AUTO_EPOCHS = 25
GUIDE_BATCH = 16
MICRO_BATCH = 4
MIN_STEPS_PER_EPOCH = 8
DEFAULT_BETA = 0.1
PRESET = "recommended"
BASE_LEARNING_RATE: float = PRESETS[PRESET]["learning_rate"]
CLEANING_FILTERS = ("exact_dedup", "minhash", "embedding", "short_outputs", "leakage")


class InvalidRequest(Exception):
    """A create-job request that cannot run as asked: the API answers 400 with this message and ``param``."""

    def __init__(self, message: str, *, param: str | None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass(frozen=True)
class Resolved:
    """A job's method and hyperparameters with every ``"auto"`` replaced by the number it stands for."""
    method: Literal["supervised", "dpo"]
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    beta: float | None

    def hyperparameters(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "learning_rate_multiplier": self.learning_rate_multiplier,
                "n_epochs": self.n_epochs}

    def method_json(self) -> dict[str, Any]:
        hyper = self.hyperparameters() | ({"beta": self.beta} if self.method == "dpo" else {})
        return {"type": self.method, self.method: {"hyperparameters": hyper}}


def requested_hyperparameters(request: schemas.CreateJobRequest) -> tuple[Literal["supervised", "dpo"],
                                                                             schemas.Hyperparameters]:
    """The method and the hyperparameters the client asked for, from ``method`` or the deprecated top-level
    ``hyperparameters`` (supervised only); both at once is ambiguous and refused."""
    method = request.method
    if method is not None and request.hyperparameters is not None:
        raise InvalidRequest("Give hyperparameters either in method or at the top level (deprecated), not both",
                             param="hyperparameters")
    if method is None:
        return "supervised", request.hyperparameters or schemas.Hyperparameters()
    other = "dpo" if method.type == "supervised" else "supervised"
    if getattr(method, other) is not None:
        raise InvalidRequest(f"method.type is {method.type!r} but method.{other} is given", param=f"method.{other}")
    if method.type == "supervised":
        return "supervised", (method.supervised or schemas.SupervisedMethod()).hyperparameters
    return "dpo", (method.dpo or schemas.DpoMethod()).hyperparameters


def auto_epochs(n_examples: int) -> int:
    """3 epochs, moved so that ``n_examples × epochs`` lies in [100, 25,000], within [1, 25]."""
    n = max(n_examples, 1)
    if n * DEFAULT_EPOCHS < MIN_TRAINED_EXAMPLES:
        return min(MAX_AUTO_EPOCHS, math.ceil(MIN_TRAINED_EXAMPLES / n))
    if n * DEFAULT_EPOCHS > MAX_TRAINED_EXAMPLES:
        return max(1, MAX_TRAINED_EXAMPLES // n)
    return DEFAULT_EPOCHS


def auto_batch_size(n_examples: int) -> int:
    """The guide's 16 sequences per step, at most an eighth of the examples (an epoch keeps ≥ 8 steps)."""
    return max(1, min(GUIDE_BATCH, n_examples // MIN_STEPS_PER_EPOCH))


def resolve_hyperparameters(request: schemas.CreateJobRequest, n_examples: int) -> Resolved:
    """Every ``"auto"`` of the request replaced by its number for a training file of ``n_examples`` lines."""
    method, asked = requested_hyperparameters(request)
    beta = asked.beta if isinstance(asked, schemas.DpoHyperparameters) else "auto"
    return Resolved(
        method=method,
        n_epochs=auto_epochs(n_examples) if asked.n_epochs == "auto" else asked.n_epochs,
        batch_size=auto_batch_size(n_examples) if asked.batch_size == "auto" else asked.batch_size,
        learning_rate_multiplier=1.0 if asked.learning_rate_multiplier == "auto" else asked.learning_rate_multiplier,
        beta=(DEFAULT_BETA if beta == "auto" else beta) if method == "dpo" else None)


def fine_tuned_name(base: str, suffix: str | None, job_id: str) -> str:
    """``ft:{base}:{suffix}:{job id}``; without a suffix the field stays empty (``ft:{base}::{job id}``), so the
    name always has the same four parts and the job id is always the last."""
    return f"ft:{base}:{suffix or ''}:{job_id}"


def checkpoint_name(fine_tuned: str, step: int) -> str:
    return f"{fine_tuned}:ckpt-step-{step}"


def new_seed() -> int:
    return secrets.randbelow(schemas.MAX_SEED + 1)


def micro_batches(batch_size: int) -> tuple[int, int]:
    """``batch_size`` sequences per step as (per-micro-batch, accumulated micro-batches): micro-batches of up to
    the guide's 4, the largest such divisor of ``batch_size`` (16 → 4 × 4, 6 → 3 × 2, 7 → 1 × 7)."""
    per_device = max(d for d in range(1, MICRO_BATCH + 1) if batch_size % d == 0)
    return per_device, batch_size // per_device


def process_share(batch_size: int, processes: int) -> int:
    """Each training process's sequences per step: OpenAI's ``batch_size`` is the whole step's, so the processes
    split it; one that does not divide evenly is rounded up (a step then holds ``processes × share`` sequences)."""
    return -(-batch_size // processes)


def job_config(*, job_id: str, model: str, hyperparameters: dict[str, Any], method: dict[str, Any], seed: int,
               train_file: Path, validation_file: Path | None, out_dir: Path, settings: ServerSettings,
               processes: int = 1) -> Config:
    """The tunesmith config a job runs (what ``tunesmith run`` would read): LoRA with the guide's recommended
    preset on the base model, trained on the prepared training file, evaluated against the base, merged, and
    exported to GGUF when the server exports GGUF. ``processes``: the train stage's (one per GPU), which share
    each step's ``batch_size`` sequences (``process_share``)."""
    per_device, accumulate = micro_batches(process_share(int(hyperparameters["batch_size"]), processes))
    train: dict[str, Any] = {
        "method": "lora", "preset": PRESET, "num_train_epochs": hyperparameters["n_epochs"],
        "per_device_train_batch_size": per_device, "gradient_accumulation_steps": accumulate,
        "learning_rate": BASE_LEARNING_RATE * float(hyperparameters["learning_rate_multiplier"]), "seed": seed,
    }
    if method["type"] == "dpo":
        train |= {"objective": "dpo", "dpo": {"beta": method["dpo"]["hyperparameters"]["beta"]}}
    # OpenAI trains on the file as given, and holds nothing out unless a validation file is named: the data stage
    # validates every line (a bad one fails the job with its example and message numbers) but its cleaning
    # filters, which would silently drop a client's examples, are off.
    data: dict[str, Any] = {"train_files": [str(train_file)], "seed": seed, "eval_fraction": 0,
                            **{name: {"enabled": False} for name in CLEANING_FILTERS}}
    if validation_file is not None:
        data["eval_file"] = str(validation_file)
    return Config.model_validate({
        "out_dir": str(out_dir),
        "model": {"name_or_path": model},
        "data": data,
        "train": train,
        "pipeline": {"gguf": ["f16"] if settings.export_gguf else []},
    })
