"""Full fine-tuning with FP8 matrix products (``train.matmul_precision: fp8``), through torchao's float8 training.

Every linear layer of the decoder blocks becomes torchao's ``Float8Linear``: its weight stays the same parameter
(bf16, or fp32 master weights, as ``train.optim`` has it — the optimizer, checkpoints and saved models see no
difference), and each of its three products — forward ``x Wᵀ``, the input gradient ``g W`` and the weight gradient
``gᵀ x`` — casts both operands to float8_e4m3fn with one scale per row (torchao's ``rowwise`` recipe, scales
rounded down to powers of two) for FP8 tensor cores, accumulating in fp32 and writing bf16. The casts live for one
product; what backward keeps is bf16's (src/tunesmith/hardware/memory.py counts it so).

Which layers: the decoder blocks' ``nn.Linear`` layers whose two dimensions are multiples of 16 (what
``torch._scaled_mm`` multiplies); the output head and the embeddings stay bf16 (the head's vocabulary-wide logits
feed the loss, and it is converted in no FP8 training recipe we know of). ``fp8_layer_names`` is that choice as a
pure function of the model, so CPU tests check it without torchao's GPU kernels. Packed rows hold any number of
tokens: the weight gradient contracts over them, so the products pad that dimension to 16 (torchao's
``pad_inner_dim``).

Off the GPU nothing here runs: the plan allows FP8 products only on a CUDA GPU with FP8 tensor cores
(src/tunesmith/train/plan.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

RECIPE = "rowwise"
"""torchao's recipe: one scale per row of each operand (``tensorwise``: one per tensor, faster on some shapes, less
accurate with outlier rows)."""

ALIGN = 16
"""``torch._scaled_mm`` multiplies FP8 matrices whose dimensions are multiples of 16."""


def fp8_layer_names(model: Any) -> list[str]:
    """The qualified names of the linear layers ``to_fp8_training`` converts: inside a decoder block, both
    dimensions multiples of ``ALIGN``."""
    return [f"{name}.{inner}" for name, block in _blocks(model) for inner, linear in block.named_modules()
            if isinstance(linear, nn.Linear) and converts(linear.in_features, linear.out_features)]


def converts(in_features: int, out_features: int) -> bool:
    """Whether a decoder block's linear layer of this shape multiplies in FP8."""
    return in_features % ALIGN == 0 and out_features % ALIGN == 0


def to_fp8_training(model: Any, *, recipe: str = RECIPE) -> int:
    """Convert the linear layers ``fp8_layer_names`` lists to torchao's ``Float8Linear`` in place (before compile,
    which traces them) and return how many. ``recipe``: torchao's recipe name (``rowwise`` or ``tensorwise``)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    # a packed row's token count is arbitrary, and the weight gradient contracts over it
    config = replace(Float8LinearConfig.from_recipe_name(recipe), pad_inner_dim=True)
    converted = 0
    for _name, block in _blocks(model):
        before = sum(isinstance(m, nn.Linear) and converts(m.in_features, m.out_features) for m in block.modules())
        convert_to_float8_training(block, config=config,
                                   module_filter_fn=lambda m, _fqn: converts(m.in_features, m.out_features))
        converted += before
    return converted


def _blocks(model: Any) -> list[tuple[str, Any]]:
    """The decoder blocks with their names: transformers' checkpointable layers, as src/tunesmith/train/model.py
    finds them."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)]
