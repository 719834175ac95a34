"""What ``--model`` can name, and how each is loaded for evaluation.

``base`` (the config's model section), a train run folder (its run.json says adapter or full model, and which
base), a PEFT adapter folder, a merged / full model folder, a hub id or ``local:`` name, or a ``.gguf`` file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..errors import UserError
from ..records import TrainRun


@dataclass(frozen=True)
class ModelSpec:
    label: str
    """How reports name it: what the user wrote."""
    kind: str
    """``base`` | ``adapter`` | ``model`` (a full/merged folder or hub id) | ``gguf``."""
    model: ModelConfig
    """The base (for adapters) or the model itself; for GGUF, the HF model whose tokenizer renders prompts."""
    adapter: str | None = None
    gguf: str | None = None


def resolve_spec(spec: str, base: ModelConfig) -> ModelSpec:
    """Turn one ``--model`` value into what to load. Paths are checked now, before any model is loaded."""
    if spec == "base":
        return ModelSpec("base", "base", base)
    path = Path(spec)
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"--model {spec}: GGUF file not found")
        return ModelSpec(spec, "gguf", base, gguf=str(path))
    if path.is_dir():
        if (path / TrainRun.FILE).is_file():
            return _from_run(spec, path)
        if (path / "adapter_config.json").is_file():
            if (path.parent / TrainRun.FILE).is_file():
                return _from_run(spec, path.parent)
            return ModelSpec(spec, "adapter", _adapter_base(path, base), adapter=str(path))
        if (path / "config.json").is_file():
            return ModelSpec(spec, "model", base.model_copy(update={"name_or_path": str(path)}))
        raise UserError(f"--model {spec}: not a model, adapter or run folder (no config.json, adapter_config.json "
                        f"or {TrainRun.FILE})")
    if spec.startswith("local:") or (spec.count("/") == 1 and not spec.startswith((".", "/", "~"))):
        return ModelSpec(spec, "model", base.model_copy(update={"name_or_path": spec}))
    if path.exists():
        raise UserError(f"--model {spec}: is a file, not a model folder or a .gguf file",
                        hint="give `base`, a run folder, an adapter folder, a model folder or a .gguf file")
    raise UserError(f"--model {spec}: does not exist",
                    hint="give `base`, a run folder, an adapter folder, a model folder or a .gguf file")


def _from_run(label: str, run_dir: Path) -> ModelSpec:
    run = TrainRun.read(run_dir)
    folder = str(run.artefact(run_dir))
    if run.method == "full":
        return ModelSpec(label, "model", run.model.model_copy(update={"name_or_path": folder}))
    return ModelSpec(label, "adapter", run.base_model(), adapter=folder)


def _adapter_base(adapter: Path, fallback: ModelConfig) -> ModelConfig:
    try:
        recorded = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{adapter / 'adapter_config.json'}: not valid JSON ({exc})") from None
    name = recorded.get("base_model_name_or_path")
    if name and Path(name).is_dir():
        return fallback.model_copy(update={"name_or_path": name})
    return fallback


def load_for_eval(spec: ModelSpec) -> tuple[Any, Any]:
    """(model in eval mode on the best device, tokenizer) for the transformers backend."""
    import torch

    from ..models import load_model, resolve_model_path

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    tokenizer = load_spec_tokenizer(spec)
    model = load_model(spec.model, dtype=_dtype(spec.model.dtype, device), path=resolve_model_path(spec.model))
    model = model.to(device)
    if spec.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, spec.adapter, is_trainable=False)
    model.eval()
    return model, tokenizer


def load_spec_tokenizer(spec: ModelSpec) -> Any:
    """The tokenizer that renders prompts: an adapter's own (training saves it, chat template included), else the
    model's. For a GGUF file, the config's model — whose vocabulary llama.cpp must share to take its token ids."""
    from ..models import load_tokenizer

    if spec.adapter and (Path(spec.adapter) / "tokenizer_config.json").is_file():
        return load_tokenizer(spec.model, path=spec.adapter)
    return load_tokenizer(spec.model)


def adapter_rank(adapter: str) -> int:
    """LoRA rank of an adapter folder (vLLM must be told the largest rank it will serve)."""
    recorded = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    return int(recorded.get("r") or 8)


def _dtype(choice: str, device: Any) -> Any:
    import torch

    if choice != "auto":
        return getattr(torch, choice)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32
