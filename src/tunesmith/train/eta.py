"""How long a run will take, said before its first step: the tokens it will process × the FLOPs each costs ÷ the
matrix-multiply rate measured on this device a moment before, scaled by how much of that rate training reaches.

The measurement takes ~0.3 s. ``EFFICIENCY`` is the one calibration: the share of the measured matmul rate that a
training step sustains (small matrices, attention, the optimizer, data handling). The figures behind it are in
docs/demo.md. The estimate is rough (±50%): the progress bar's remaining time, from the real steps, takes over once
training starts. On a CPU a long estimate is a warning with what to change, since the default recipe (3 epochs of
the guide's SFT settings) can mean hours there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

CPU_WARN_S = 30 * 60
"""A CPU run estimated longer than this gets a warning naming what to change."""

EFFICIENCY = {"cpu": 0.28, "cuda": 0.5}
"""Share of the measured matmul rate a training step sustains, per device type. CPU: SmolLM2-135M LoRA on two
cores trained 177 tokens/s (0.54 GFLOP a token) against a measured 337 GFLOP/s matmul (docs/demo.md). CUDA: not
calibrated yet — a round guess; the first steps' measured speed replaces it in the progress bar."""


@dataclass(frozen=True)
class Eta:
    tokens: int
    """Tokens the run will process: the training set's tokens × epochs, or ``max_steps`` × the mean step."""
    flops_per_token: float
    matmul_flops: float
    """The measured matrix-multiply rate on this device, in the run's weight dtype (FLOP/s)."""
    seconds: float
    device: str

    def remaining(self, fraction: float) -> Eta:
        """The estimate for the part of the run still to do (a resumed run)."""
        return replace(self, tokens=round(self.tokens * fraction), seconds=self.seconds * fraction)

    def message(self) -> str:
        return (f"{self.tokens:,} tokens to train on; estimated {_duration(self.seconds)} on this {self.device} "
                f"(measured {self.matmul_flops / 1e9:,.0f} GFLOP/s matmul × {EFFICIENCY.get(self.device, 0.5):.0%}, "
                f"{self.flops_per_token / 1e9:.2f} GFLOP per token)")


def planned_tokens(dataset_tokens: int, examples: int, sequences_per_step: int, epochs: float,
                   max_steps: int | None) -> int:
    """Tokens a run processes: whole epochs of the dataset, or ``max_steps`` steps of the mean example length."""
    if max_steps:
        return round(max_steps * sequences_per_step * dataset_tokens / max(examples, 1))
    return round(dataset_tokens * epochs)


def flops_per_token(parameters: int, method: str, recomputed: float) -> float:
    """Forward 2N; backward 4N with weight gradients (full), 2N without (LoRA/QLoRA: only activation gradients
    flow through the frozen weights); the ``recomputed`` share of layers (activation checkpointing) runs its
    forward once more."""
    forward = 2.0 * parameters
    backward = (4.0 if method == "full" else 2.0) * parameters
    return forward * (1.0 + recomputed) + backward


def estimate(tokens: int, parameters: int, method: str, recomputed: float, device_type: str,
             matmul_flops: float) -> Eta:
    per_token = flops_per_token(parameters, method, recomputed)
    rate = matmul_flops * EFFICIENCY.get(device_type, 0.5)
    return Eta(tokens=tokens, flops_per_token=per_token, matmul_flops=matmul_flops,
               seconds=tokens * per_token / rate, device=device_type)


def cpu_warning(eta: Eta) -> str | None:
    """What to change when a CPU run would take longer than ``CPU_WARN_S``; None otherwise."""
    if eta.device != "cpu" or eta.seconds <= CPU_WARN_S:
        return None
    return (f"this run would take about {_duration(eta.seconds)} on the CPU: to finish within 30 minutes, train on "
            f"about {max(1, int(eta.tokens * CPU_WARN_S / eta.seconds)):,} tokens instead — fewer examples or epochs "
            "(train.num_train_epochs, train.max_steps), a shorter train.max_length — use method lora on a smaller "
            "model, or a GPU")


def _duration(seconds: float) -> str:
    minutes = seconds / 60
    if minutes < 1:
        return f"{seconds:.0f} s"
    if minutes < 90:
        return f"{minutes:.0f} min"
    return f"{minutes / 60:.1f} h"
