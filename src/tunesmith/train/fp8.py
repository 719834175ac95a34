"""A LoRA run's frozen base in FP8 (``train.base_precision: fp8``): its linear layers' products on FP8 tensor cores.

A LoRA base is frozen, so each of its linear layers computes two products per step and no weight gradient:
forward ``y = x Wᵀ`` and backward ``grad_x = grad_y W``. Both run through ``torch._scaled_mm`` in float8_e4m3fn
with one scale per row of each operand, accumulated in fp32 and written in bf16:

- the weight (N outputs × K inputs) is quantised ONCE, when the base is swapped in, with one scale per output
  channel (row): it is stored in 1 byte per weight instead of bf16's 2 — the memory model counts it so
  (src/tunesmith/hardware/memory.py); its bf16 copy is dropped;
- forward: x is quantised per token (row), ``scale_a`` (M, 1) and the weight's (1, N) as ``scale_b``;
- backward: ``grad_x = (grad_y · diag(s_w)) W_q``. The weight's per-output-channel scales fold into grad_y's
  columns (the contracted dimension can carry no scale of its own), then that product is quantised per token; the
  fp8 weight needs no second scaling, only the other layout (``_scaled_mm`` takes its second operand
  column-major): a transposed copy made in backward and freed after it — one matrix at a time, 56 MiB for an 8B
  MLP projection, instead of a second stored copy of every weight (+1 byte per weight, the whole saving).

grad_y is quantised to e4m3 too, not e5m2: with one scale per row the range each row must span is its own (what
e5m2's extra exponent bits buy a tensor-wide scale), while e4m3's extra mantissa bit halves the rounding of every
element; and e4m3 × e4m3 is the pair every row-wise FP8 kernel in torch takes.

Off CUDA the same function runs with the product emulated (the fp8 operands dequantised, multiplied in fp32,
scaled as ``_scaled_mm`` scales them), so CPU tests check the quantisation, the scales, the padding, the gradients
and the wiring; on a GPU with FP8 tensor cores (compute capability 8.9+) ``_scaled_mm`` computes it. The plan
allows the option only there (src/tunesmith/train/plan.py).

It plugs in without patching PEFT: PEFT's LoRA layer calls ``self.base_layer(x)``, and ``base_layer`` becomes a
``Fp8FrozenLinear`` (linear layers of the decoder blocks that carry no adapter are replaced in their parent the
same way). Its weight is a buffer, not a parameter: saved adapters hold only the adapters, and a merge reads the
bf16 base from disk (src/tunesmith/export/merge.py warns that the merged model is the adapter on that base, not
on the FP8 base it was trained against).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448

ALIGN = 16
"""``_scaled_mm`` on CUDA needs the contracted dimension and both of the second operand's dimensions to be
multiples of 16; the token dimension is padded to one too (a zero row costs nothing and keeps every kernel's tile
choice open)."""


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` (R, C) as float8_e4m3fn with one fp32 scale per row: ``t ≈ q * scale`` with ``scale`` (R, 1), each
    row's largest |value| mapped to e4m3's largest (448), values clamped into range (a cast out of range gives NaN,
    e4m3fn has no infinity)."""
    # the constants are written out here, not read from module globals: torch.compile with dynamic shapes turns a
    # global float into a graph input, which it then fails to pass into an autograd Function's graph (torch 2.13:
    # "lift_tracked_freevar_to_input should not be called on root SubgraphTracer")
    top = torch.finfo(FP8).max
    wide = t.float()
    # 1e-12: the smallest amax a row is scaled by — an all-zero row (padding) quantises to zeros
    scale = wide.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / top
    # elementwise ops keep their input's strides: a gradient that arrives transposed would give a column-major
    # operand, and _scaled_mm takes its first one row-major only (a no-op for the usual contiguous rows)
    return (wide / scale).clamp(-top, top).to(FP8).contiguous(), scale.contiguous()


def fp8_product(a: torch.Tensor, scale_a: torch.Tensor, b_t: torch.Tensor, scale_b: torch.Tensor,
                out_dtype: torch.dtype, *, fast_accum: bool = False) -> torch.Tensor:
    """``(a * scale_a) @ (b_t * scale_b)`` for fp8 ``a`` (M, K) row-major with ``scale_a`` (M, 1) and fp8 ``b_t``
    (K, N) column-major with ``scale_b`` (1, N): ``torch._scaled_mm`` on CUDA, the same arithmetic emulated in fp32
    elsewhere. ``fast_accum``: Hopper's faster FP8 accumulation (partial sums promoted to fp32 less often); the
    emulation accumulates in fp32 either way."""
    if a.is_cuda:
        return torch._scaled_mm(a, b_t, scale_a, scale_b, out_dtype=out_dtype, use_fast_accum=fast_accum)
    return ((a.float() @ b_t.float()) * scale_a * scale_b).to(out_dtype)


class _Fp8Matmul(torch.autograd.Function):
    """``rows Wᵀ`` for 2-D ``rows`` (a multiple of 16 of them) with W frozen in fp8 (see the module docstring):
    backward gives the rows' gradient only. Shapes are prepared outside (``Fp8FrozenLinear.forward``), so that no
    size arithmetic of torch.compile's dynamic shapes happens inside the Function's own graph."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
        q, scale = quantize_rows(rows)
        # weight (N, K) row-major: its transpose is the (K, N) column-major operand, with no copy. Fast
        # accumulation in forward only, as torchao's float8 training does: the output's error does not compound,
        # while the input gradient's flows through every layer below
        out_dtype = torch.bfloat16 if rows.is_cuda else rows.dtype
        ctx.save_for_backward(weight, weight_scale)
        ctx.rows_dtype = rows.dtype
        return fp8_product(q, scale, weight.t(), weight_scale, out_dtype, fast_accum=True)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        weight, weight_scale = ctx.saved_tensors
        # grad_x = grad_y · diag(s_w) · W_q: the weight's row scales belong to the contracted dimension, so they
        # scale grad_y's columns before grad_y gets its own row scales
        q, scale = quantize_rows(grad.float() * weight_scale)
        # W_q (N, K) column-major = its transpose's memory laid out row-major: one transient copy
        column_major = weight.t().contiguous().t()
        ones = torch.ones(1, weight.shape[1], dtype=torch.float32, device=weight.device)
        out_dtype = torch.bfloat16 if grad.is_cuda else ctx.rows_dtype
        return fp8_product(q, scale, column_major, ones, out_dtype).to(ctx.rows_dtype), None, None


class Fp8FrozenLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight lives in fp8 with per-output-channel scales; its bias (if any) stays a
    parameter in the base's dtype, added after the product (trainable if LoRA's ``bias`` setting says so)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_fp8", weight)
        # (1, N), contiguous: _scaled_mm's row-wise scale_b
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        m = rows.shape[0]
        pad = -m % ALIGN
        if pad:  # zero rows quantise to zeros; their outputs are cut off again (and their gradients are zero)
            rows = torch.nn.functional.pad(rows, (0, 0, 0, pad))
        y = _Fp8Matmul.apply(rows, self.weight_fp8, self.weight_scale)
        if pad:
            y = y[:m]
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the products use, in fp32 (tests and the merge's drift measurement compare with it)."""
        return self.weight_fp8.float() * self.weight_scale.reshape(-1, 1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8"


def fp8_compatible(linear: nn.Linear) -> bool:
    """Whether ``_scaled_mm`` can take this layer's weight: both dimensions multiples of ``ALIGN``."""
    return linear.in_features % ALIGN == 0 and linear.out_features % ALIGN == 0


def quantize_frozen_base(model: Any) -> int:
    """Swap every linear layer inside the decoder blocks for a ``Fp8FrozenLinear`` — the LoRA layers' ``base_layer``
    and the un-adapted ones alike (all frozen) — and return how many; the output head and embeddings stay as they
    are. Layers whose dimensions are not multiples of 16 stay in the base's dtype. Weights are quantised one at a
    time, each bf16 weight freed as its fp8 copy replaces it."""
    from peft.tuners.lora import LoraLayer
    from transformers.modeling_layers import GradientCheckpointingLayer

    swapped = 0
    for block in [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]:
        for parent in list(block.modules()):
            if isinstance(parent, LoraLayer):
                base = parent.base_layer
                if type(base) is nn.Linear and fp8_compatible(base):
                    parent.base_layer = Fp8FrozenLinear(base)
                    swapped += 1
                continue
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and fp8_compatible(child) and not _is_adapter(parent, name):
                    setattr(parent, name, Fp8FrozenLinear(child))
                    swapped += 1
    return swapped


def _is_adapter(parent: nn.Module, name: str) -> bool:
    """An adapter's own linear layers (lora_A / lora_B entries of a ModuleDict) are trained: never swapped."""
    return isinstance(parent, nn.ModuleDict) or name.startswith("lora_")
