"""``Hardware``: what the training plan (src/tunesmith/train/plan.py) knows of the machine — measured once on the
machine that trains (src/tunesmith/train/measure.py), or taken from the GPU catalogue where nothing is measured
(``tunesmith advise``). The plan reads these facts and nothing else, so the same inputs give the same plan."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal

from .catalog import Gpu


@dataclass(frozen=True)
class Hardware:
    device: Literal["cuda", "cpu"]
    """Where the run trains: a CUDA GPU or the CPU."""
    name: str
    """The GPU as the driver reports it (lower case) or the catalogue names it; ``cpu`` for the CPU."""
    memory_gib: float | None
    """The GPU's memory as the driver reports it; None on the CPU (no GPU memory to plan for)."""
    free_gib: float | None
    """GPU memory free when measured (another process may hold the rest): the plan's budget. The catalogue's: all."""
    bf16: bool
    """bf16 arithmetic in hardware (bf16 autocast, and full fine-tuning's bf16-weight optimizer)."""
    bf16_tflops: float | None
    """Dense bf16 peak from the GPU catalogue; None for a GPU the catalogue does not know (and the CPU)."""
    host_link_bytes_per_s: float | None = None
    """GPU→CPU copy rate into pinned memory; measured only where the plan may spend it on layers offloaded whole
    (src/tunesmith/train/plan.py ``needs_host_link``), None elsewhere."""
    fused_loss_kernel: bool = False
    """Liger's fused linear + cross-entropy kernel runs here (src/tunesmith/train/kernels.py)."""
    fused_dropout_kernel: bool = False
    """The adapters' fused dropout kernels run here (src/tunesmith/train/adapter_dropout.py)."""
    torchao: bool = False
    """torchao is installed (full fine-tuning's 8-bit AdamW on bf16 weights, and its FP8 products)."""
    fp8: bool = False
    """FP8 tensor cores: compute capability 8.9 or later (``train.base_precision: fp8``)."""
    host_memory_gib: float | None = None
    """CPU memory available when measured (what pinned CPU memory for offloaded activations may take); None where
    not measured (the catalogue, the CPU)."""

    @classmethod
    def cpu(cls) -> Hardware:
        """The CPU: no GPU memory to plan for, no bf16, none of the GPU kernels."""
        return cls(device="cpu", name="cpu", memory_gib=None, free_gib=None, bf16=False, bf16_tflops=None)

    @classmethod
    def from_catalog(cls, gpu: Gpu) -> Hardware:
        """A catalogue GPU as a machine with tunesmith[gpu] installed measures it: its memory all free, and the
        kernels of tunesmith[gpu] (Liger's loss, torchao). The fused dropout's Triton kernels need compute capability
        8.0, which every catalogue GPU with bf16 has (the T4, 7.5, has neither). No link rate: nothing measured."""
        if gpu.cpu:
            return cls.cpu()
        return cls(device="cuda", name=gpu.name, memory_gib=gpu.memory_gib, free_gib=gpu.memory_gib, bf16=gpu.bf16,
                   bf16_tflops=gpu.bf16_tflops, fused_loss_kernel=True, fused_dropout_kernel=gpu.bf16, torchao=True,
                   fp8=gpu.fp8)


def measure_matmul_flops(device: Any, dtype: Any, size: int | None = None, repeats: int = 4) -> float:
    """Sustained FLOP/s of a ``size``² matrix multiply on ``device`` (best of ``repeats`` after one warm-up);
    ``size`` 1024 on a CPU, 4096 on a GPU (smaller products there measure kernel launches, not arithmetic)."""
    import torch

    size = size or (4096 if device.type == "cuda" else 1024)

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = math.inf
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        (a @ b).sum().item()
        if i:
            best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best
