"""Whether llama.cpp's runtime and its HF→GGUF converter are here (GGUF tests skip otherwise)."""

from __future__ import annotations

import pytest

from tunesmith.errors import UserError
from tunesmith.export import converter


def gguf_ready() -> bool:
    try:
        import llama_cpp  # noqa: F401

        converter.find_converter()
    except (ImportError, UserError):
        return False
    return True


needs_gguf = pytest.mark.skipif(not gguf_ready(),
                                reason="llama-cpp-python or its converter is missing: `tunesmith setup-gguf`")
