"""Optional fast kernels for CUDA (attention for packed rows, fused linear + cross-entropy).

Each function returns None where no fast kernel applies; the caller then uses the plain PyTorch path.
"""

from __future__ import annotations

from typing import Any


def attention_implementation(device_type: str, packing: bool) -> str | None:
    """The attention implementation to load the model with; None keeps transformers' default (sdpa)."""
    return None


def linear_cross_entropy_sum(hidden: Any, weight: Any, targets: Any) -> Any:
    """Sum of token cross-entropies from a fused kernel, or None to use the chunked PyTorch path."""
    return None
