"""An OpenAI-compatible endpoint for an artefact, on an existing server program (tunesmith writes no server).

- a GGUF file (or a folder holding one, as ``tunesmith export`` writes): llama-cpp-python's server
  (``python -m llama_cpp.server``), which runs on the CPU and formats chats with the GGUF's embedded chat template;
- a merged or AWQ model folder, or a LoRA adapter on its base: vLLM (``vllm serve``), where it is installed; an
  adapter is served as a LoRA module on the base, under the adapter's name.

Bound to 127.0.0.1 unless the user asks for another host: a fine-tuned model is often trained on private data.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import processes
from .errors import RunError, UserError

ENGINES = ("auto", "llama.cpp", "vllm")


@dataclass(frozen=True)
class ServePlan:
    engine: str
    model: str
    """The model name clients send (``model=`` in the OpenAI client)."""
    command: list[str]
    host: str
    port: int
    artefact: str
    notes: tuple[str, ...] = field(default=())

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "model": self.model, "command": self.command, "base_url": self.base_url,
                "artefact": self.artefact, "notes": list(self.notes)}


def plan(artefact: str | Path, *, host: str = "127.0.0.1", port: int = 8000, engine: str = "auto",
         base: str | None = None, n_ctx: int = 4096, n_threads: int | None = None) -> ServePlan:
    """Which server serves ``artefact`` and with what command line (nothing is started)."""
    if engine not in ENGINES:
        raise UserError(f"--engine {engine}: expected one of {', '.join(ENGINES)}")
    path = Path(artefact)
    if not path.exists():
        raise UserError(f"{artefact}: not found", hint="pass a .gguf file, a model folder, a run folder or an adapter")
    gguf = _gguf_file(path)
    if gguf is not None and engine in ("auto", "llama.cpp"):
        return _llama_cpp_plan(gguf, host, port, n_ctx, n_threads)
    if engine == "llama.cpp":
        raise UserError(f"{artefact}: llama.cpp serves GGUF files; this is not one",
                        hint="export it first: tunesmith export MODEL_DIR --format gguf --out DIR")
    return _vllm_plan(path, host, port, base)


def log_path(serve_plan: ServePlan) -> Path:
    """Where the server's output goes: ``serve.log`` beside the artefact (in its folder)."""
    artefact = Path(serve_plan.artefact)
    return (artefact.parent if artefact.is_file() else artefact) / "serve.log"


def start(serve_plan: ServePlan, log: str | Path) -> processes.Child:
    """Start the server as a child in its own process group, its output to ``log``; stopped when tunesmith stops."""
    return processes.start(serve_plan.command, what=f"the {serve_plan.engine} server", log_path=log)


def wait_ready(serve_plan: ServePlan, child: processes.Child, timeout_s: float = 120.0) -> None:
    """Block until ``GET /v1/models`` answers; RunError (naming the log) if the server exits or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise processes.failure(child, child.process.returncode)
        try:
            with urllib.request.urlopen(serve_plan.base_url + "/models", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise RunError(f"the {serve_plan.engine} server did not answer on {serve_plan.base_url} within {timeout_s:.0f} s",
                   hint=f"its output is in {child.log_path}")


def stop(child: processes.Child) -> None:
    """Stop the server and everything it started: SIGTERM to its group, then SIGKILL if it does not exit in time."""
    processes.stop(child)


def _gguf_file(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    found = sorted(p for p in path.glob("*.gguf") if not p.name.endswith((".tmp.gguf", ".partial")))
    if len(found) > 1:
        raise UserError(f"{path}: holds several GGUF files ({', '.join(p.name for p in found)})",
                        hint="pass the one to serve")
    return found[0] if found else None


def _llama_cpp_plan(gguf: Path, host: str, port: int, n_ctx: int, n_threads: int | None) -> ServePlan:
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("uvicorn") is None:
        raise UserError("serving a GGUF needs llama-cpp-python's server, which is not installed",
                        hint="pip install 'tunesmith[gguf]'")
    name = gguf.stem
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", name,
               "--host", host, "--port", str(port), "--n_ctx", str(n_ctx)]
    if n_threads:
        command += ["--n_threads", str(n_threads)]
    return ServePlan("llama.cpp", name, command, host, port, str(gguf),
                     ("chats are formatted with the chat template embedded in the GGUF",))


def _vllm_plan(path: Path, host: str, port: int, base: str | None) -> ServePlan:
    adapter = path / "adapter" if (path / "adapter" / "adapter_config.json").is_file() else path
    is_adapter = (adapter / "adapter_config.json").is_file()
    if not is_adapter and not (path / "config.json").is_file():
        raise UserError(f"{path}: not a GGUF, model folder, run folder or adapter",
                        hint="pass the output of tunesmith merge / export, or a run folder")
    if importlib.util.find_spec("vllm") is None:
        raise UserError(f"{path}: serving a {'LoRA adapter' if is_adapter else 'model folder'} needs vLLM, which is "
                        "not installed", hint="pip install vllm (on a CUDA machine); or export to GGUF and serve that "
                                              "with llama.cpp: tunesmith export DIR --format gguf")
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", host, "--port", str(port)]
    if is_adapter:
        config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
        base_model = base or config.get("base_model_name_or_path")
        if not base_model:
            raise UserError(f"{adapter}: the adapter does not name its base model", hint="pass --base")
        name = path.name
        command += ["--model", str(base_model), "--enable-lora", "--lora-modules", f"{name}={adapter}",
                    "--max-lora-rank", str(_lora_rank_bound(int(config.get("r") or 8)))]
        return ServePlan("vllm", name, command, host, port, str(adapter), (f"LoRA {name} on {base_model}",))
    command += ["--model", str(path), "--served-model-name", path.name]
    return ServePlan("vllm", path.name, command, host, port, str(path))


def _lora_rank_bound(rank: int) -> int:
    """vLLM accepts only these values for --max-lora-rank; the smallest that holds the adapter's rank."""
    return next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), rank)
