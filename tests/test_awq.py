"""AWQ export runs on a CUDA machine (bench/awq_export.py); here: the messages when it cannot run."""

from __future__ import annotations

import importlib.util

import pytest

from tunesmith.errors import UserError
from tunesmith.export.awq import to_awq


def test_awq_without_llm_compressor_names_the_install_command(tiny_model_dir, tmp_path):
    if importlib.util.find_spec("llmcompressor") is not None:
        pytest.skip("llm-compressor is installed here")
    with pytest.raises(UserError, match="llm-compressor") as info:
        to_awq(tiny_model_dir, tmp_path / "awq")
    assert "tunesmith[awq]" in info.value.hint
    assert not (tmp_path / "awq").exists()
