"""Fixtures for the service's tests: a real ``tunesmith server`` in a subprocess on a free loopback port, the
``openai`` client pointed at it, and a writer of small chat JSONL files.

``start_server`` is a context manager for tests that need their own server (other flags, a kill, a restart);
``api_server`` is one server per module with no workers (jobs stay where the API put them) for the API tests.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def client(self, api_key: str = "unused", **options: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=30, **options)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal the server and wait for it; its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def server_command(*, port: int, data_dir: Path, workers: int, extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "tunesmith", "server", "--port", str(port), "--data-dir", str(data_dir),
            "--workers", str(workers), *extra]


@contextmanager
def start_server(data_dir: Path, *, workers: int = 0, extra: Sequence[str] = (), port: int | None = None,
                 env: dict[str, str] | None = None) -> Iterator[RunningServer]:
    """``tunesmith server`` on a free port (or ``port``), ready to serve; stopped with SIGTERM afterwards."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"{data_dir.name}-server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(server_command(port=port, data_dir=data_dir, workers=workers, extra=extra),
                                   stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "400", **(env or {})})
    running = RunningServer(process, port, data_dir, log_path)
    try:
        wait_ready(running)
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(90)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_ready(server: RunningServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"the server exited with {server.process.returncode}:\n{server.log()}")
        try:
            # any HTTP answer (401 included) means uvicorn serves
            httpx.get(f"{server.url}/v1/models", timeout=2)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError(f"the server did not answer within {START_TIMEOUT_S} s:\n{server.log()}")


def chat_example(i: int) -> dict[str, object]:
    return {"messages": [{"role": "system", "content": "You answer with the number's square."},
                         {"role": "user", "content": f"What is {i} squared?"},
                         {"role": "assistant", "content": f"{i} squared is {i * i}."}]}


def write_chat_jsonl(path: Path, n: int = 12, *, start: int = 1) -> Path:
    """``n`` small, distinct chat examples, one JSON object per line."""
    path.write_text("".join(json.dumps(chat_example(i)) + "\n" for i in range(start, start + n)), encoding="utf-8")
    return path


@pytest.fixture
def chat_jsonl(tmp_path):
    """A writer: ``chat_jsonl(n=12, name="train.jsonl") -> Path``."""
    def write(n: int = 12, name: str = "train.jsonl", start: int = 1) -> Path:
        return write_chat_jsonl(tmp_path / name, n, start=start)
    return write


@pytest.fixture(scope="module")
def api_server(tmp_path_factory) -> Iterator[RunningServer]:
    """One server per test module, no workers: jobs stay in ``validating_files`` unless a test moves them."""
    with start_server(tmp_path_factory.mktemp("server") / "data", workers=0) as running:
        yield running


@pytest.fixture
def client(api_server) -> openai.OpenAI:
    return api_server.client()
