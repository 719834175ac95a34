"""``model:`` — which base model to load and how (the one place model loading is configured)."""

from __future__ import annotations

from typing import Literal

from .base import Section


class ModelConfig(Section):
    name_or_path: str = "local:tiny"
    """A local folder with config.json + safetensors, a hub id (needs network), or ``local:demo`` — the small
    model tunesmith builds on this machine for the demo (random weights, untrained)."""

    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin; ignored for local folders."""

    trust_remote_code: bool = False
    """Run Python code shipped with a hub repository. Off: such models are refused with a message."""

    allow_pickle: bool = False
    """Allow loading ``.bin`` / ``.pt`` pickle weights. Off: only safetensors are loaded (pickle can execute code)."""

    chat_template: str | None = None
    """A Jinja chat template (inline text or a path to a ``.jinja`` file) for models that ship none."""

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Weights dtype for loading. ``auto``: bf16 on GPUs that support it, else fp32."""

    attn_implementation: str | None = None
    """Attention kernel passed to transformers (``sdpa``, ``eager``, ``flex_attention``…). None: tunesmith picks."""
