"""Chat completions through `tunesmith serve`, read by the real openai client: a tiny GGUF (llama.cpp in-process)
and a tiny HF folder (transformers); answers at temperature 0 equal each engine's own greedy output."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx
import pytest

from gguf_fixtures import needs_gguf

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(artefact: Path, port: int, log: Path) -> subprocess.Popen:
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, "-m", "tunesmith", "serve", str(artefact), "--port", str(port),
                                "--n-ctx", "512", "--threads", "1"], stdout=log.open("w"), stderr=subprocess.STDOUT,
                               env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                return process
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise AssertionError(f"tunesmith serve did not answer: {log.read_text()}")


def stop_serve(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def gguf_file(tiny_model_dir, tmp_path_factory):
    from tunesmith.export.gguf import to_gguf

    return Path(to_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf"), "f16", verify=False).path)


@pytest.fixture(scope="module")
def gguf_server(gguf_file, tmp_path_factory):
    port = free_port()
    process = start_serve(gguf_file, port, tmp_path_factory.mktemp("serve") / "serve.log")
    yield port, process
    stop_serve(process)


def client_for(port: int):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120,
                  _strict_response_validation=True)


def streamed(client, model: str, **kwargs) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in client.chat.completions.create(model=model, messages=QUESTION, stream=True, **kwargs):
        assert chunk.object == "chat.completion.chunk"
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    return text, finish


@needs_gguf
def test_gguf_answers_equal_llama_cpp_greedy_streamed_or_not(gguf_server, gguf_file):
    from llama_cpp import Llama

    port, _ = gguf_server
    client = client_for(port)
    assert [m.id for m in client.models.list().data] == ["model-f16"]
    reply = client.chat.completions.create(model="model-f16", messages=QUESTION, max_tokens=12, temperature=0)
    text, finish = streamed(client, "model-f16", max_tokens=12, temperature=0)

    llm = Llama(model_path=str(gguf_file), n_ctx=512, n_threads=1, seed=0, verbose=False)
    direct = llm.create_chat_completion(messages=QUESTION, max_tokens=12, temperature=0, top_k=0, min_p=0.0,
                                        repeat_penalty=1.0)
    expected = direct["choices"][0]["message"]["content"]
    assert expected  # a tiny random model still says something: an empty answer would match trivially
    assert reply.choices[0].message.content == expected
    assert text == expected
    assert reply.choices[0].finish_reason == finish == direct["choices"][0]["finish_reason"]
    assert reply.usage.prompt_tokens == direct["usage"]["prompt_tokens"]
    assert 1 <= reply.usage.completion_tokens <= 12


@needs_gguf
def test_bad_requests_are_400_envelopes_and_an_unknown_model_404(gguf_server):
    import openai

    port, _ = gguf_server
    client = client_for(port)
    raw = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", content=b'{"model": "model-f16", ',
                     headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.headers["x-should-retry"] == "false"
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}
    assert "could not parse the JSON body" in raw.json()["error"]["message"]

    with pytest.raises(openai.BadRequestError) as missing:
        client.post("/chat/completions", cast_to=object, body={"model": "model-f16"})
    assert missing.value.code == "missing_required_parameter" and missing.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as empty:
        client.chat.completions.create(model="model-f16", messages=[])
    assert empty.value.code == "empty_array"
    with pytest.raises(openai.BadRequestError) as role:
        client.chat.completions.create(model="model-f16", messages=[{"role": "robot", "content": "hi"}])
    assert role.value.param == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as tools:
        client.chat.completions.create(model="model-f16", messages=QUESTION, logprobs=True)
    assert tools.value.code == "unsupported_parameter" and tools.value.param == "logprobs"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="nope", messages=QUESTION)
    assert unknown.value.code == "model_not_found"


@needs_gguf
def test_a_hundred_concurrent_completions_all_answer(gguf_server, tmp_path):
    from openai import AsyncOpenAI

    port, _ = gguf_server

    async def one(client, k: int) -> float:
        started = time.perf_counter()
        reply = await client.chat.completions.create(
            model="model-f16", max_tokens=8, temperature=0,
            messages=[{"role": "user", "content": f"Question number {k}?"}])
        assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens >= 1
        return time.perf_counter() - started

    async def load() -> list[float]:
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=300,
                             http_client=None)
        async with client:
            return await asyncio.gather(*(one(client, k) for k in range(100)))

    latencies = sorted(asyncio.run(load()))
    assert len(latencies) == 100  # gather raises on the first failed request: no errors
    p50, p95 = latencies[49], latencies[94]
    print(f"100 concurrent chat completions: p50 {p50:.2f} s, p95 {p95:.2f} s, max {latencies[-1]:.2f} s")
    (tmp_path / "load.json").write_text(json.dumps({"n": 100, "p50_s": p50, "p95_s": p95}))
    assert p50 <= p95 <= latencies[-1]


@needs_gguf
def test_sigterm_stops_serve_and_frees_the_port(gguf_file, tmp_path):
    port = free_port()
    process = start_serve(gguf_file, port, tmp_path / "serve.log")
    try:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    finally:
        stop_serve(process)
    assert code == 128 + signal.SIGTERM, (tmp_path / "serve.log").read_text()
    with socket.socket() as s:
        # as a server binds (SO_REUSEADDR): the client's closed connections in TIME_WAIT do not count, a listener does
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # raises if anything still listens there


def test_hf_folder_answers_equal_transformers_greedy_streamed_or_not(tiny_model_dir, tmp_path):
    from tunesmith.chat import prompt_ids
    from tunesmith.config import ModelConfig
    from tunesmith.evaluate.generate import generate_transformers
    from tunesmith.models import load_model, load_tokenizer

    port = free_port()
    process = start_serve(tiny_model_dir, port, tmp_path / "serve.log")
    try:
        client = client_for(port)
        name = client.models.list().data[0].id
        reply = client.chat.completions.create(model=name, messages=QUESTION, max_tokens=12, temperature=0)
        text, finish = streamed(client, name, max_tokens=12, temperature=0)
    finally:
        stop_serve(process)
    cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg)
    expected = generate_transformers(model, tokenizer, [prompt_ids(tokenizer, QUESTION)], 12, 1)[0]
    assert expected
    assert reply.choices[0].message.content.strip() == expected
    assert text.strip() == expected
    assert reply.choices[0].finish_reason == finish
    assert reply.usage.prompt_tokens == len(prompt_ids(tokenizer, QUESTION))
