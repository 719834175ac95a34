"""This machine's facts for the training plan, measured once per run before it is planned (``measure_hardware``):
the plan itself (src/tunesmith/train/plan.py) asks no GPU."""

from __future__ import annotations

import importlib.util

import torch

from ..hardware.catalog import GPU_ALIASES, GPUS
from ..hardware.machine import Hardware
from .adapter_dropout import fused_dropout_available
from .kernels import fused_loss_kernel_available
from .offload import host_link_rate
from .pinned import host_memory_available_gib


def measure_hardware(device: torch.device, *, host_link: bool = False) -> Hardware:
    """The GPU's name, its memory (total, and free now: another process may share it), bf16, its peak from the
    catalogue, and the kernels tunesmith runs on it; the CPU: ``Hardware.cpu()``. ``host_link`` (the plan's
    ``needs_host_link``): also the GPU→CPU link rate, on a GPU the catalogue knows (the plan times the forward from
    the catalogue's peak) — three 256 MiB copies, so only where the plan can spend it."""
    if device.type != "cuda":
        return Hardware.cpu()
    name = torch.cuda.get_device_name(device).strip().lower()
    gpu = GPUS.get(GPU_ALIASES.get(name, name))
    free, total = torch.cuda.mem_get_info(device)
    peak = gpu.bf16_tflops if gpu is not None else None
    return Hardware(device="cuda", name=name, memory_gib=total / 2**30, free_gib=free / 2**30,
                    bf16=torch.cuda.is_bf16_supported(), bf16_tflops=peak,
                    host_link_bytes_per_s=host_link_rate(device) if host_link and peak is not None else None,
                    fused_loss_kernel=fused_loss_kernel_available(),
                    fused_dropout_kernel=fused_dropout_available(device),
                    torchao=importlib.util.find_spec("torchao") is not None,
                    fp8=torch.cuda.get_device_capability(device) >= (8, 9),
                    host_memory_gib=host_memory_available_gib())
