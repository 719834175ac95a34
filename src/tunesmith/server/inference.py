"""Chat generation for the server: a model name becomes an engine, and an engine turns messages into text.

Two engines, one interface (``Engine.generate``, a stream of ``Piece``):
- a GGUF file runs in-process through llama-cpp-python (``llama_cpp.Llama.create_chat_completion``), which formats
  the chat with the template embedded in the GGUF — the one ``tunesmith export`` wrote there;
- anything else (a merged or full model folder, or a base model with a PEFT adapter) runs through transformers, the
  prompt tokenised by ``tunesmith.chat.prompt_ids`` exactly as in training, and stops at the end-of-turn tokens.

Names are resolved by a callable the caller passes in (the service: base models from its settings, fine-tuned names
from its jobs; ``tunesmith serve``: the one artefact), so this module knows nothing of the database. The registry
keeps at most ``max_loaded`` engines (least recently used goes first). Each engine has ONE worker thread: its
requests queue there and run one at a time (a llama.cpp context and a transformers model are not safe to share
between threads), and the HTTP event loop never waits on a generation.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from ..errors import UserError

EngineKind = Literal["llama.cpp", "transformers"]
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class ModelSpec:
    """What serves one model name: the engine and the files it loads."""

    name: str
    """The name clients send as ``model``."""
    engine: EngineKind
    path: str
    """A ``.gguf`` file (llama.cpp), or a model folder / ``local:`` name / hub id (transformers; the adapter's base)."""
    adapter: str | None = None
    """A PEFT adapter folder applied on ``path`` (transformers only)."""
    n_ctx: int = 4096
    """llama.cpp context length (prompt + answer) in tokens."""
    n_threads: int | None = None
    """llama.cpp CPU threads (None: llama.cpp's default)."""


Resolver = Callable[[str], ModelSpec | None]
"""Model name → what serves it; None when the name is unknown (the API answers 404 ``model_not_found``)."""


@dataclass(frozen=True)
class Sampling:
    """The generation settings of one request, already validated (OpenAI's names and meanings)."""

    max_tokens: int | None = None
    """None: until the end of the turn or the context."""
    temperature: float = 1.0
    """0 is greedy (deterministic)."""
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass(frozen=True)
class Piece:
    """A piece of the answer as it is generated; the last one carries the finish reason and the token counts."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Cancelled(Exception):
    """The client went away: the engine stops generating at the next token."""


class Engine(Protocol):
    executor: ThreadPoolExecutor

    def generate(self, messages: list[dict[str, Any]], sampling: Sampling,
                 cancelled: threading.Event) -> Iterator[Piece]: ...


@dataclass
class Registry:
    """Loaded engines by model name, at most ``max_loaded`` of them (least recently used unloaded first)."""

    resolve: Resolver
    max_loaded: int = 2
    _engines: OrderedDict[str, Engine] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def spec(self, name: str) -> ModelSpec | None:
        return self.resolve(name)

    def engine(self, spec: ModelSpec) -> Engine:
        """The engine for ``spec``, loaded on first use (blocking: call it off the event loop)."""
        with self._lock:
            key = _key(spec)
            if key in self._engines:
                self._engines.move_to_end(key)
                return self._engines[key]
            engine = load(spec)
            self._engines[key] = engine
            while len(self._engines) > self.max_loaded:
                _, old = self._engines.popitem(last=False)
                old.executor.shutdown(wait=False)  # queued requests still finish; the engine is freed after them
            return engine

    def close(self) -> None:
        with self._lock:
            for engine in self._engines.values():
                engine.executor.shutdown(wait=False, cancel_futures=True)
            self._engines.clear()


def _key(spec: ModelSpec) -> str:
    return f"{spec.engine}|{spec.path}|{spec.adapter}"


def load(spec: ModelSpec) -> Engine:
    """Load the model ``spec`` names (seconds for a small GGUF, ~25 s for SmolLM2 through transformers)."""
    if spec.engine == "llama.cpp":
        return LlamaCppEngine.load(spec)
    return TransformersEngine.load(spec)


class LlamaCppEngine:
    """A GGUF in-process: llama.cpp formats the chat with the GGUF's own template and samples."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama.cpp")

    @classmethod
    def load(cls, spec: ModelSpec) -> LlamaCppEngine:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise UserError(f"{spec.path}: serving a GGUF needs llama-cpp-python",
                            hint="pip install 'tunesmith[gguf]'") from None
        try:
            llm = Llama(model_path=spec.path, n_ctx=spec.n_ctx, n_threads=spec.n_threads, seed=0, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise UserError(f"{spec.path}: llama.cpp could not load this GGUF file ({exc})") from None
        if not llm.metadata.get("tokenizer.chat_template"):
            raise UserError(f"{spec.path}: the GGUF file has no chat template",
                            hint="export it with tunesmith export, which embeds the model's chat template")
        return cls(llm)

    def generate(self, messages: list[dict[str, Any]], sampling: Sampling,
                 cancelled: threading.Event) -> Iterator[Piece]:
        # OpenAI's sampler has no top-k, min-p or repeat penalty: turned off so temperature/top_p mean what they say
        settings = dict(messages=messages, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                        top_p=sampling.top_p, top_k=0, min_p=0.0, repeat_penalty=1.0, stop=list(sampling.stop),
                        seed=sampling.seed, presence_penalty=sampling.presence_penalty,
                        frequency_penalty=sampling.frequency_penalty)
        stream = self.llm.create_chat_completion(stream=True, **settings)
        finish: FinishReason = "stop"
        try:
            for chunk in stream:
                if cancelled.is_set():
                    raise Cancelled
                choice = chunk["choices"][0]
                text = choice["delta"].get("content") or ""
                if choice["finish_reason"] is not None:
                    finish = "length" if choice["finish_reason"] == "length" else "stop"
                if text:
                    yield Piece(text)
        finally:
            stream.close()  # an unfinished generator would keep the context busy until it is collected
        # The stream carries no usage, and its chunks are not tokens (a multi-byte character or text held back for a
        # stop string comes out as one). The context holds the prompt and every answer token but the last sampled
        # one (llama.cpp evaluates a token only to sample the next), so it gives the count.
        prompt_tokens = self._prompt_tokens(messages)
        answer = self.llm.n_tokens - prompt_tokens + 1
        if sampling.max_tokens is not None:
            answer = min(answer, sampling.max_tokens)
        yield Piece("", finish, prompt_tokens, answer)

    def _prompt_tokens(self, messages: list[dict[str, Any]]) -> int:
        return len(self._render(messages))

    def _render(self, messages: list[dict[str, Any]]) -> list[int]:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        llm = self.llm
        formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"],
                                        eos_token=llm.detokenize([llm.token_eos()], special=True).decode(),
                                        bos_token=llm.detokenize([llm.token_bos()], special=True).decode(),
                                        add_generation_prompt=True)
        return llm.tokenize(formatter(messages=messages).prompt.encode("utf-8"), add_bos=False, special=True)


class TransformersEngine:
    """A HF model folder (or a base with a PEFT adapter) generated with ``model.generate``, streamed by
    transformers' ``TextIteratorStreamer``."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="transformers")

    @classmethod
    def load(cls, spec: ModelSpec) -> TransformersEngine:
        from ..config import ModelConfig
        from ..models import load_model, load_tokenizer, resolve_model_path

        cfg = ModelConfig(name_or_path=spec.path)
        path = resolve_model_path(cfg)
        tokenizer = load_tokenizer(cfg, path)
        model = load_model(cfg, path=path)
        if spec.adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, spec.adapter)
        model.eval()
        return cls(model, tokenizer)

    def generate(self, messages: list[dict[str, Any]], sampling: Sampling,
                 cancelled: threading.Event) -> Iterator[Piece]:
        import torch
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        from ..chat import end_of_turn_ids, prompt_ids

        tok = self.tokenizer
        prompt = prompt_ids(tok, messages)
        eot = end_of_turn_ids(tok)
        greedy = sampling.temperature == 0
        config = GenerationConfig(
            do_sample=not greedy, temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p, top_k=None, num_beams=1,
            max_new_tokens=sampling.max_tokens or self._room(len(prompt)), eos_token_id=eot,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eot[0], use_cache=True)

        class _ClientGone(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
                return cancelled.is_set()

        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, Any] = {}

        def run() -> None:
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            try:
                with torch.no_grad():
                    result["ids"] = self.model.generate(
                        input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                        generation_config=config, streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_ClientGone()]))
            except BaseException as exc:  # handed to the reading thread, which raises it
                result["error"] = exc
                streamer.end()

        # generate() pushes decoded text into the streamer from its own thread; this one reads and yields it
        worker = threading.Thread(target=run, name="generate", daemon=True)
        worker.start()
        cut = _StopStrings(sampling.stop)
        stopped_by_string = False
        for text in streamer:
            out, stopped_by_string = cut.feed(text)
            if out:
                yield Piece(out)
            if stopped_by_string:
                cancelled.set()  # ends generate() at the next token; the rest is not the answer
                break
        if stopped_by_string:
            for _ in streamer:  # drain to the streamer's end mark, so generate() finishes (its queue has no bound)
                pass
        worker.join()
        if "error" in result:
            raise result["error"]
        if cancelled.is_set() and not stopped_by_string:
            raise Cancelled
        if not stopped_by_string and (rest := cut.flush()):
            yield Piece(rest)
        new = result["ids"][0, len(prompt):].tolist()
        ended = bool(new) and new[-1] in eot
        finish: FinishReason = "stop" if ended or stopped_by_string else "length"
        yield Piece("", finish, len(prompt), len(new))

    def _room(self, prompt_len: int) -> int:
        limit = self.model.config.max_position_embeddings
        if prompt_len >= limit:
            raise UserError(f"the prompt is {prompt_len} tokens; the model's context is {limit}")
        return limit - prompt_len


class _StopStrings:
    """Cuts the answer before the first stop string (OpenAI leaves the stop string out), holding back any tail
    that could be the start of one until the next text decides it."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string was reached)."""
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        rest, self.held = self.held, ""
        return rest


def spec_for_artefact(artefact: str | Path, *, name: str | None = None, base: str | None = None,
                      n_ctx: int = 4096, n_threads: int | None = None) -> ModelSpec:
    """What serves an artefact on disk: a GGUF file (or a folder with one, as ``tunesmith export`` writes), a merged
    or full model folder, a LoRA adapter (on ``base``, default the base its config names), or a run folder (its
    export, else its merged model, else its trained model or adapter)."""
    path = Path(artefact)
    if not path.exists():
        raise UserError(f"{artefact}: not found", hint="pass a .gguf file, a model folder, a run folder or an adapter")
    found = _artefact_in(path)
    if found is None:
        raise UserError(f"{artefact}: not a GGUF file, model folder, run folder or adapter",
                        hint="pass the output of tunesmith train, merge or export")
    # a GGUF given directly (or its export folder) is named by its file, as llama.cpp names it; anything else by the
    # folder given (a run folder's name, not "adapter")
    default_name = found.stem if found.suffix == ".gguf" and found.parent in (path, path.parent) \
        else path.resolve().name
    if found.suffix == ".gguf":
        return ModelSpec(name or default_name, "llama.cpp", str(found), n_ctx=n_ctx, n_threads=n_threads)
    if (found / "adapter_config.json").is_file():
        return ModelSpec(name or default_name, "transformers", base or _adapter_base(found), adapter=str(found))
    return ModelSpec(name or default_name, "transformers", str(found))


def _artefact_in(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    ggufs = sorted(p for p in path.glob("*.gguf") if not p.name.endswith(".tmp.gguf"))
    if len(ggufs) > 1:
        raise UserError(f"{path}: holds several GGUF files ({', '.join(p.name for p in ggufs)})",
                        hint="pass the one to serve")
    if ggufs:
        return ggufs[0]
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return path
    # a run folder: what it produced last is what a user means to serve
    for inner in ("export", "merge", "train/model", "train/adapter", "model", "adapter"):
        if (path / inner).is_dir() and (found := _artefact_in(path / inner)) is not None:
            return found
    return None


def _adapter_base(adapter: Path) -> str:
    import json

    base = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adapter}: the adapter does not name its base model", hint="pass --base")
    return str(base)
