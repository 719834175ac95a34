"""``POST /v1/chat/completions``: OpenAI's chat completions (and their streaming) for the models a ``Registry``
resolves, shared by ``tunesmith server`` and ``tunesmith serve``.

The body is read and validated here, not by FastAPI's own body parsing: OpenAI answers a malformed body, a missing
or empty ``messages`` and an unknown argument with 400 and its error envelope ``{"error": {message, type, param,
code}}`` — which the ``openai`` client turns into ``BadRequestError`` — where FastAPI would answer 422 in its own
shape. An argument this server cannot honour (tools, logprobs, n > 1) is refused by name, never silently ignored.

Streaming is server-sent events: ``data: {chat.completion.chunk}`` lines, then ``data: [DONE]``. Generation runs on
the engine's own thread; the pieces cross to the event loop through an asyncio queue, and a client that goes away
stops the generation at the next token.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import TunesmithError
from .inference import Cancelled, Piece, Registry, Sampling

NO_RETRY = {"x-should-retry": "false"}
"""The openai client retries 408/409/429/5xx unless told not to; a retry of these answers cannot help."""


def error_response(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    """OpenAI's error envelope. (Local to the chat half until the service's shared helper takes its place.)"""
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=NO_RETRY)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """An assistant turn's calls, earlier in the conversation (passed to the chat template as they are)."""
    tool_call_id: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates take it: text content; ``developer`` is the newer name of ``system``."""
        content = self.content if not isinstance(self.content, list) else "".join(p.text for p in self.content)
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class ChatRequest(_Strict):
    model: str
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = None
    n: Literal[1] | None = None
    stream: bool | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    user: str | None = None
    """An end-user id for the operator's logs; it changes nothing in the answer."""

    @field_validator("messages")
    @classmethod
    def _content_present(cls, messages: list[Message]) -> list[Message]:
        for i, m in enumerate(messages):
            if m.content is None and not (m.role == "assistant" and m.tool_calls):
                raise ValueError(f"messages[{i}].content is missing (only an assistant turn with tool_calls may "
                                 "omit it)")
        return messages

    def sampling(self) -> Sampling:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return Sampling(max_tokens=self.max_completion_tokens or self.max_tokens,
                        temperature=1.0 if self.temperature is None else self.temperature,
                        top_p=1.0 if self.top_p is None else self.top_p, stop=stop, seed=self.seed,
                        presence_penalty=self.presence_penalty or 0.0,
                        frequency_penalty=self.frequency_penalty or 0.0)


_UNSUPPORTED = {
    "tools": "tool calling", "tool_choice": "tool calling", "functions": "function calling",
    "function_call": "function calling", "logprobs": "logprobs", "top_logprobs": "logprobs",
    "response_format": "structured output", "logit_bias": "logit_bias", "stream_options": "stream_options (usage "
    "in a stream)", "audio": "audio", "modalities": "modalities", "prediction": "predicted outputs",
    "parallel_tool_calls": "tool calling",
}
"""OpenAI arguments this server does not implement: refused by name, so a client never believes they took effect."""


def parse_request(body: bytes) -> ChatRequest | JSONResponse:
    """The validated request, or the 400 envelope naming what is wrong (the first problem, as OpenAI does)."""
    try:
        raw = json.loads(body)
    except json.JSONDecodeError as exc:
        return error_response(400, f"We could not parse the JSON body of your request ({exc.msg} at line {exc.lineno}"
                              f" column {exc.colno}). The body must be one JSON object.")
    except UnicodeDecodeError:
        return error_response(400, "We could not parse the JSON body of your request (it is not UTF-8).")
    if not isinstance(raw, dict):
        return error_response(400, "The request body must be a JSON object.")
    for name in raw:
        if name in _UNSUPPORTED and raw[name] not in (None, False, []):
            return error_response(400, f"'{name}' is not supported by this server ({_UNSUPPORTED[name]})",
                                  param=name, code="unsupported_parameter")
    cleaned = {k: v for k, v in raw.items() if k not in _UNSUPPORTED}
    try:
        return ChatRequest.model_validate(cleaned)
    except ValidationError as exc:
        return _validation_error(exc)


def _validation_error(exc: ValidationError) -> JSONResponse:
    first = exc.errors()[0]
    param = _param(first["loc"])
    kind = first["type"]
    if kind == "missing":
        return error_response(400, f"Missing required parameter: '{param}'.", param=param,
                              code="missing_required_parameter")
    if kind == "extra_forbidden":
        return error_response(400, f"Unrecognized request argument supplied: {param}", param=param,
                              code="unknown_parameter")
    if kind == "too_short" and param == "messages":
        return error_response(400, "Invalid 'messages': empty array. Expected an array with minimum length 1.",
                              param=param, code="empty_array")
    reason = first["msg"].removeprefix("Value error, ")
    return error_response(400, f"Invalid value for '{param}': {reason}.", param=param, code="invalid_value")


def _param(loc: Sequence[int | str]) -> str:
    # pydantic's location of a union member names the member type too ("content", "str"): those parts are dropped
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[TextPart]", "int", "float", "bool", "list[str]", "literal['text']") or \
                part.startswith(("constrained-", "function-")):
            continue
        else:
            out += f".{part}" if out else part
    return out


def router(registry: Registry, *, dependencies: Sequence[Any] = ()) -> APIRouter:
    """The chat-completions route over ``registry``; ``dependencies`` (the service's API-key check) guard it."""
    api = APIRouter(dependencies=[Depends(d) for d in dependencies])

    @api.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        parsed = parse_request(await request.body())
        if isinstance(parsed, JSONResponse):
            return parsed
        spec = registry.spec(parsed.model)
        if spec is None:
            return error_response(404, f"The model `{parsed.model}` does not exist or you do not have access to it.",
                                  param="model", code="model_not_found")
        loop = asyncio.get_running_loop()
        try:
            engine = await loop.run_in_executor(None, registry.engine, spec)
        except TunesmithError as exc:
            return error_response(500, f"The model `{parsed.model}` could not be loaded: {exc}", type="server_error")
        messages = [m.for_template() for m in parsed.messages]
        completion_id = f"chatcmpl-{secrets.token_hex(12)}"
        created = int(time.time())
        pieces = _pieces(loop, engine, messages, parsed.sampling())
        if parsed.stream:
            return StreamingResponse(_sse(pieces, completion_id, created, parsed.model),
                                     media_type="text/event-stream", headers={"cache-control": "no-cache"})
        text: list[str] = []
        try:
            async for piece in pieces:
                text.append(piece.text)
                last = piece
        except TunesmithError as exc:
            return error_response(400, str(exc))
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": created, "model": parsed.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text), "refusal": None},
                         "finish_reason": last.finish_reason, "logprobs": None}],
            "usage": {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
                      "total_tokens": last.prompt_tokens + last.completion_tokens}})

    return api


async def _pieces(loop: asyncio.AbstractEventLoop, engine: Any, messages: list[dict[str, Any]],
                  sampling: Sampling) -> AsyncIterator[Piece]:
    """The engine's pieces, generated on its thread (queued behind that model's other requests) and handed over
    one by one; leaving the loop early (the client went away) stops the generation."""
    queue: asyncio.Queue[Piece | BaseException | None] = asyncio.Queue()
    cancelled = threading.Event()

    def produce() -> None:
        try:
            if cancelled.is_set():  # the client left while the request waited its turn
                return
            for piece in engine.generate(messages, sampling, cancelled):
                loop.call_soon_threadsafe(queue.put_nowait, piece)
        except Cancelled:
            pass
        except BaseException as exc:  # raised again on the event loop, where the response is written
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    # not awaited: the engine's thread ends the generation on its own once ``cancelled`` is set
    loop.run_in_executor(engine.executor, produce)
    try:
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancelled.set()


async def _sse(pieces: AsyncIterator[Piece], completion_id: str, created: int, model: str) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for piece in pieces:
            if piece.text:
                yield chunk({"content": piece.text})
            if piece.finish_reason is not None:
                yield chunk({}, piece.finish_reason)
    except TunesmithError as exc:
        # the status line is already sent: the error travels as an event, which the openai client raises
        error = {"message": str(exc), "type": "invalid_request_error", "param": None, "code": None}
        yield f"data: {json.dumps({'error': error})}\n\n"
        return
    yield "data: [DONE]\n\n"
