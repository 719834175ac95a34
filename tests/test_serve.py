"""serve: an OpenAI-compatible endpoint on loopback, from an existing server program."""

from __future__ import annotations

import importlib.util
import socket

import pytest

from tunesmith import serve
from tunesmith.errors import UserError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.gguf
def test_served_gguf_answers_a_chat_completion_on_loopback(tiny_model_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("openai")
    from openai import OpenAI

    from tunesmith.export import converter
    from tunesmith.export.gguf import to_gguf

    try:
        converter.find_converter()
    except UserError:
        pytest.skip("llama.cpp's converter is not set up: `tunesmith setup-gguf`")
    export = to_gguf(tiny_model_dir, tmp_path / "gguf", "f16", verify=False)
    plan = serve.plan(tmp_path / "gguf", port=free_port(), n_ctx=512, n_threads=1)
    assert plan.engine == "llama.cpp" and plan.host == "127.0.0.1"
    assert plan.command[plan.command.index("--host") + 1] == "127.0.0.1"

    process = serve.start(plan, tmp_path / "server.log")
    try:
        serve.wait_ready(plan, process, timeout_s=120)
        client = OpenAI(base_url=plan.base_url, api_key="unused", timeout=60)
        reply = client.chat.completions.create(model=plan.model, max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": "What is the capital of France?"}])
    finally:
        serve.stop(process)

    assert plan.model == "model-f16" and export.path.endswith("model-f16.gguf")
    assert reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str)
    assert 1 <= reply.usage.completion_tokens <= 8
    assert process.returncode is not None


def test_a_model_folder_without_vllm_says_what_to_install(tiny_model_dir):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    with pytest.raises(UserError, match="needs vLLM") as info:
        serve.plan(tiny_model_dir)
    assert "pip install vllm" in info.value.hint


def test_llama_cpp_engine_refuses_a_folder_without_gguf(tiny_model_dir):
    with pytest.raises(UserError, match=r"llama\.cpp serves GGUF"):
        serve.plan(tiny_model_dir, engine="llama.cpp")


def test_missing_artefact_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        serve.plan(tmp_path / "nothing")
