"""``tunesmith serve MODEL``: one model on an OpenAI-compatible endpoint — the chat-completions half of
``tunesmith server`` (same request validation, same answers), in this process.

MODEL is a GGUF file (or a folder holding one, as ``tunesmith export`` writes: llama.cpp in-process), a merged or full
model folder, a LoRA adapter (on its base), or a run folder (transformers). uvicorn serves it here, in the
foreground: SIGTERM or Ctrl-C ends the requests in flight, closes the port and exits — no child process is left
behind. (tunesmith no longer starts vLLM for model folders: a GPU deployment is better served by vLLM's own
``vllm serve``, which this command would only have wrapped.)

Bound to 127.0.0.1 unless the user asks for another host: a fine-tuned model is often trained on private data.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .server.inference import ModelSpec, Registry, spec_for_artefact


@dataclass(frozen=True)
class ServePlan:
    spec: ModelSpec
    host: str
    port: int

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.spec.name, "engine": self.spec.engine, "path": self.spec.path,
                "adapter": self.spec.adapter, "base_url": self.base_url}


def plan(artefact: str | Path, *, host: str = "127.0.0.1", port: int = 8000, name: str | None = None,
         base: str | None = None, n_ctx: int = 4096, n_threads: int | None = None) -> ServePlan:
    """What serves ``artefact`` and where (nothing is loaded or started)."""
    return ServePlan(spec_for_artefact(artefact, name=name, base=base, n_ctx=n_ctx, n_threads=n_threads), host, port)


def create_app(registry: Registry, names: tuple[str, ...], on_ready: Callable[[], None] | None = None) -> Any:
    """The chat route plus ``GET /v1/models`` for the models served (clients list models before they chat)."""
    from fastapi import FastAPI

    from .server import chat_api

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if on_ready is not None:
            on_ready()
        yield

    app = FastAPI(title="tunesmith serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.include_router(chat_api.router(registry))
    created = int(time.time())

    def model_object(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "tunesmith"}

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_object(n) for n in names]}

    @app.get("/v1/models/{model:path}", response_model=None)
    def retrieve_model(model: str) -> Any:
        if model not in names:
            return chat_api.error_response(404, f"The model `{model}` does not exist or you do not have access to "
                                                "it.", param="model", code="model_not_found")
        return model_object(model)

    return app


def run(serve_plan: ServePlan, *, on_ready: Callable[[], None] | None = None) -> None:
    """Load the model, then serve it until SIGTERM / SIGINT (uvicorn's handlers; it re-raises the signal after its
    graceful shutdown, so the CLI reports it as any stopped command)."""
    import uvicorn

    _check_port_free(serve_plan.host, serve_plan.port)
    spec = serve_plan.spec
    registry = Registry(resolve=lambda name: spec if name == spec.name else None, max_loaded=1)
    registry.engine(spec)  # loaded before the port opens: a broken artefact is a message, not a 500 later
    app = create_app(registry, (spec.name,), on_ready)
    config = uvicorn.Config(app, host=serve_plan.host, port=serve_plan.port, log_level="warning",
                            timeout_graceful_shutdown=10, lifespan="on")
    try:
        uvicorn.Server(config).run()
    finally:
        registry.close()


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})",
                            hint="pick another --port, or stop what is listening on it") from None
