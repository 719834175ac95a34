"""Shared fixtures: tiny models built locally in the test session (no hub, ever)."""

from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU, Triton kernels (the adapters' dropout, src/tunesmith/train/adapter_dropout_kernels.py) run in
# Triton's interpreter on CPU tensors. Triton reads the flag when a kernel is decorated — when triton is first
# imported (transformers imports it), so it is set here, before any test module imports anything.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer Llama (hidden 64) with a freshly trained byte-fallback BPE tokenizer and a ChatML template."""
    from tunesmith.local_model import TINY_CORPUS, build_model

    return build_model(tmp_path_factory.mktemp("models") / "tiny", list(TINY_CORPUS) * 20, vocab_size=512)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)
