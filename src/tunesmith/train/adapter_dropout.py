"""LoRA's input dropout drawn inside the adapter's first product (CUDA under bf16/fp16 autocast).

PEFT computes an adapter as ``lora_B(lora_A(dropout(x))) * scaling``: the dropout draws a mask over the whole input
(tokens × features), writes the dropped copy, and autograd keeps mask and copy for backward — once per adapter (a
Llama layer has seven; q, k, v, gate and up read the same input, each with its own mask), again when a checkpointed
layer recomputes. Measured on one H200 with the guide's dropout of 0.05 (bench/results/fast_engine.md, "Sixth run"):
the same run without dropout is 8.8% faster and 1.1 GiB lighter; the step's largest compiled kernels were all dropout.

Here ``lora_A`` draws the mask itself (src/tunesmith/train/adapter_dropout_kernels.py): a Triton kernel reads x once,
draws keep bits from Philox keyed by (seed, row, column) and accumulates the dropped x's product with Aᵀ; backward
redraws the same bits from the same seed, so nothing the size of x is stored beyond x itself (which the adapters of
one input share). Same function: each element kept with probability 1 − p and scaled by 1 / (1 − p), independently
per adapter and per call — only the random stream differs from PyTorch's, and p is applied rounded to a multiple of
2⁻¹⁶. Measured on the same run ("Seventh run"): 3.6% faster than PEFT's dropout in the same process and 1.1 GiB
lighter (the memory of the run without dropout); the plan gives it to LoRA on one GPU (QLoRA and FSDP2 runs keep
PEFT's dropout: not measured there).

It plugs in without patching PEFT: each adapter's ``lora_A`` (an ``nn.Linear``) becomes a ``DropoutLinear`` that owns
the same weight parameter (same state-dict key: saved adapters are ordinary PEFT adapters), and its ``lora_dropout``
an identity. Where no kernel applies (CPU, no autocast, Triton missing, evaluation) it computes PEFT's
``linear(dropout(x))`` itself.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MAX_RANK = 64
"""Adapters of larger rank keep PEFT's dropout: the backward kernel's per-lane [rank × 32] accumulators would spill
out of registers."""


class DropoutLinear(nn.Linear):
    """An adapter's ``lora_A`` that applies the adapter's input dropout itself (see the module docstring)."""

    def __init__(self, lora_a: nn.Linear, p: float) -> None:
        super().__init__(lora_a.in_features, lora_a.out_features, bias=False, device="meta")
        self.weight = lora_a.weight
        self.p = p
        global _OP
        if _OP is None:
            _OP = _dropout_linear_op()  # registered here, outside any traced code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return F.linear(x, self.weight)
        fused = _fused(x, self.weight, self.p)
        if fused is not None:
            return fused
        return F.linear(F.dropout(x, self.p, training=True), self.weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.p}"


def fused_dropout_available(device: torch.device) -> bool:
    """Whether the kernels can run here: Triton installed and a CUDA GPU of compute capability 8.0 or later (the
    kernels' bf16 products; measured on Hopper)."""
    return (device.type == "cuda" and torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
            and torch.cuda.get_device_capability(device) >= (8, 0))


def fusable(rank: int, p: float) -> bool:
    """Whether an adapter of this rank and dropout gets the kernel (``fuse_adapter_dropout``'s rule)."""
    return p > 0 and rank <= MAX_RANK


def fuse_adapter_dropout(model: Any) -> int:
    """Give every plain LoRA adapter with dropout a ``DropoutLinear``; returns how many. Adapters of other kinds
    (a variant such as DoRA, a bias on ``lora_A``, no dropout, rank above ``MAX_RANK``) are left to PEFT."""
    from peft.tuners.lora import LoraLayer

    fused = 0
    for layer in model.modules():
        if not isinstance(layer, LoraLayer):
            continue
        for name, dropout in layer.lora_dropout.items():
            lora_a = getattr(layer.lora_A, name, None)
            if (not isinstance(dropout, nn.Dropout) or type(lora_a) is not nn.Linear or lora_a.bias is not None
                    or not fusable(lora_a.out_features, dropout.p) or name in getattr(layer, "lora_variant", {})):
                continue
            layer.lora_A[name] = DropoutLinear(lora_a, dropout.p)
            layer.lora_dropout[name] = nn.Identity()
            # PEFT casts an adapter's input to the adapter's (fp32) dtype; under autocast the product runs in bf16
            # either way, and the kernel takes the bf16 input as it comes (no fp32 copy of it)
            layer.cast_input_dtype_enabled = False
            fused += 1
    return fused


def _fused(x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor | None:
    """The kernel's ``linear(dropout(x))`` under CUDA bf16/fp16 autocast, else None."""
    kind = x.device.type
    if kind != "cuda" or not torch.is_autocast_enabled(kind):
        return None
    low = torch.get_autocast_dtype(kind)
    if low not in (torch.bfloat16, torch.float16) or _OP is None:
        return None
    if x.dtype != low:
        x = x.to(low)
    # a fresh seed per call from torch's CUDA generator: a checkpointed layer's recomputation restores the generator
    # and so redraws the same masks, as it does for PyTorch's dropout
    seed = torch.randint(0, 2**62, (1,), device=x.device, dtype=torch.int64)
    h = _OP(x.reshape(-1, x.shape[-1]), weight, seed, p)
    return h.reshape(*x.shape[:-1], weight.shape[0])


_OP: Any = None
"""The registered ``tunesmith::dropout_linear`` op once an adapter was fused (None: no kernel, PEFT's function)."""


@cache
def _dropout_linear_op() -> Any:
    """Register the kernels as a custom op with its own backward (torch.compile traces through it); None without
    Triton."""
    try:
        from torch.library import triton_op, wrap_triton

        from . import adapter_dropout_kernels as kernels
    except ImportError:  # no Triton (or a torch without triton_op): PEFT's function, computed by DropoutLinear
        return None

    @triton_op("tunesmith::dropout_linear", mutates_args=())
    def dropout_linear(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
        return kernels.forward(x.contiguous(), weight, seed, p, launch=wrap_triton)

    @triton_op("tunesmith::dropout_linear_backward", mutates_args=())
    def dropout_linear_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor,
                                p: float) -> tuple[torch.Tensor, torch.Tensor]:
        return kernels.backward(grad.contiguous(), x.contiguous(), weight, seed, p, launch=wrap_triton)

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, weight, seed, p = inputs
        ctx.save_for_backward(x, weight, seed)
        ctx.p = p

    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        x, weight, seed = ctx.saved_tensors
        dx, dweight = dropout_linear_backward(grad, x, weight, seed, ctx.p)
        return dx, dweight, None, None

    dropout_linear.register_autograd(backward, setup_context=setup_context)
    return dropout_linear
