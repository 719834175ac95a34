"""The one place that loads models and tokenizers.

Safe by default: safetensors only (pickle weights refused unless ``model.allow_pickle``), no remote code unless
``model.trust_remote_code``, no network unless the name is a hub id. Every failure is a ``UserError`` that says what
to do. ``local:smollm2-135m-instruct`` (a real pretrained model from a package's GGUF) and a ``.gguf`` path are read
into an ordinary HF folder once (see ``gguf_import``); ``local:demo`` and ``local:tiny`` are small random models
built on this machine for tests (see ``local_model``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .errors import UserError

PAD_CANDIDATES = ("<pad>", "<|finetune_right_pad_id|>", "<|finetune_right_pad|>", "<|pad|>", "[PAD]", "<|fim_pad|>",
                  "<|reserved_special_token_0|>", "<unk>")
"""Existing tokens tried, in order, as a padding token distinct from end-of-sequence (no embedding resize)."""


def resolve_model_path(cfg: ModelConfig) -> str:
    """A local folder, a built ``local:`` model, or a hub id (returned as is; loading needs network)."""
    name = cfg.name_or_path
    if name.startswith("local:"):
        from .local_model import ensure_named_model

        return str(ensure_named_model(name.removeprefix("local:")))
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf" and not path.is_file():
        raise UserError(f"model.name_or_path: {name}: no such GGUF file",
                        hint="check the path (relative paths start from the current folder)")
    if path.suffix.lower() == ".gguf":
        from .gguf_import import ensure_user_gguf
        from .local_model import models_home

        return str(ensure_user_gguf(path, models_home()))
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model.name_or_path: {name} is a file, not a model folder",
                            hint="point to the folder holding config.json and the weights, or to a .gguf file")
        if not (path / "config.json").is_file():
            raise UserError(f"model.name_or_path: {name} has no config.json",
                            hint="point to a Hugging Face model folder")
        _check_weights(path, cfg.allow_pickle)
        _check_remote_code(path / "config.json", cfg.trust_remote_code, name)
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"model.name_or_path: {name} does not exist",
                        hint="give an existing local folder, or a hub id such as meta-llama/Llama-3.1-8B-Instruct")
    return name


def load_tokenizer(cfg: ModelConfig, path: str | None = None) -> Any:
    """The tokenizer with a chat template and a padding token distinct from end-of-sequence."""
    from transformers import AutoTokenizer

    path = path or resolve_model_path(cfg)
    tok = _hub_call(lambda: AutoTokenizer.from_pretrained(path, revision=cfg.revision,
                                                          trust_remote_code=cfg.trust_remote_code), path, cfg)
    if cfg.chat_template:
        template = cfg.chat_template
        if "{" not in template and Path(template).is_file():
            template = Path(template).read_text(encoding="utf-8")
        tok.chat_template = template
    if not tok.chat_template:
        raise UserError(f"{path}: the tokenizer has no chat template",
                        hint="set model.chat_template to a Jinja template (inline or a .jinja file)")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        vocab = tok.get_vocab()
        for cand in PAD_CANDIDATES:
            if cand in vocab and vocab[cand] != tok.eos_token_id:
                tok.pad_token = cand
                break
    return tok


def load_model(cfg: ModelConfig, *, dtype: Any = None, quantization: Any = None, device_map: Any = None,
               path: str | None = None, attn_implementation: str | None = None) -> Any:
    """A causal LM from ``cfg`` (safetensors only unless allowed; no remote code unless allowed)."""
    from transformers import AutoModelForCausalLM

    path = path or resolve_model_path(cfg)
    kwargs: dict[str, Any] = {
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
        "use_safetensors": None if cfg.allow_pickle else True,
    }
    if dtype is not None:
        kwargs["dtype"] = dtype
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if device_map is not None:
        kwargs["device_map"] = device_map
    attn = attn_implementation or cfg.attn_implementation
    if attn:
        kwargs["attn_implementation"] = attn
    return _hub_call(lambda: AutoModelForCausalLM.from_pretrained(path, **kwargs), path, cfg)


def model_skeleton(cfg: ModelConfig, *, dtype: Any, path: str | None = None,
                   attn_implementation: str | None = None) -> Any:
    """The model's modules with parameters on the meta device (no memory used, no weights read) and real buffers
    (the rotary tables): what each FSDP2 process shards before it receives its part of the weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = load_model_config(cfg, path)
    attn = attn_implementation or cfg.attn_implementation
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if attn:
        kwargs["attn_implementation"] = attn
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, **kwargs)


def load_model_config(cfg: ModelConfig, path: str | None = None) -> Any:
    """The architecture config only (no weights): for parameter counts and memory estimates."""
    from transformers import AutoConfig

    path = path or resolve_model_path(cfg)
    return _hub_call(lambda: AutoConfig.from_pretrained(path, revision=cfg.revision,
                                                        trust_remote_code=cfg.trust_remote_code), path, cfg)


def base_model(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (the model itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _check_weights(path: Path, allow_pickle: bool) -> None:
    safetensors = list(path.glob("*.safetensors"))
    pickles = [p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    if safetensors or allow_pickle:
        return
    if pickles:
        raise UserError(f"{path}: only pickle weights ({pickles[0].name}); pickle files can run code when loaded",
                        hint="convert the weights to safetensors, or set model.allow_pickle: true if you trust them")
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"{path}: no *.safetensors weights found", hint="point to a complete model folder")


def _check_remote_code(config_json: Path, trust: bool, name: str) -> None:
    try:
        cfg = json.loads(config_json.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{config_json}: not valid JSON ({exc})") from None
    if cfg.get("auto_map") and not trust:
        raise UserError(f"{name}: this model needs custom Python code from its repository (auto_map in config.json)",
                        hint="read that code, then set model.trust_remote_code: true if you trust it")


def _hub_call(fn: Any, path: str, cfg: ModelConfig) -> Any:
    try:
        return fn()
    except UserError:
        raise
    except OSError as exc:
        text = str(exc)
        if Path(path).exists():
            first = text.splitlines()[0] if text else type(exc).__name__
            raise UserError(f"{path}: could not load ({first})") from None
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in text.lower() or "connect" in text.lower()
        raise UserError(f"model.name_or_path: cannot load hub model {path!r}"
                        + (" — no network connection to the hub" if offline else f" ({text.splitlines()[0]})"),
                        hint="download it once where there is network (huggingface-cli download) and point "
                             "model.name_or_path to the local folder") from None
    except ValueError as exc:
        text = str(exc)
        if "trust_remote_code" in text:
            raise UserError(f"{path}: this model needs custom Python code from its repository",
                            hint="read that code, then set model.trust_remote_code: true if you trust it") from None
        raise
