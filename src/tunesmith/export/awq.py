"""HF model folder → AWQ 4-bit (group 128) checkpoint in the compressed-tensors format, which vLLM loads directly.

Why llm-compressor and not AutoAWQ (the guide's ``python -m awq.entry``): AutoAWQ is deprecated upstream and stopped
at torch 2.6; llm-compressor is the maintained AWQ implementation and writes compressed-tensors, vLLM's native
quantized format. Its AWQ step runs calibration forward passes and needs a CUDA GPU.

Recipe: AWQ's activation-aware channel scaling (``AWQModifier``), then weight-only quantization with the
``W4A16_ASYM`` preset — 4-bit integers, one scale + zero point per group of 128 input channels, as in the AWQ paper
and the guide; ``lm_head`` stays in 16 bits. Calibration: the run's own conversations (rendered with the chat
template), which is what the scales should be tuned for. Verification: the written folder is reloaded with plain
transformers (its compressed-tensors integration) and its logits and greedy output compared with the original's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import RunError, UserError
from ..files import atomic_folder
from ..paths import output_folder
from ..records import ExportRecord, versions
from .gguf import refuse_run_folder

SCHEME = "W4A16_ASYM"
GROUP_SIZE = 128
INSTALL_HINT = ("pip install 'tunesmith[awq]' on a CUDA machine (llm-compressor pins transformers<=5.17; if that "
                "clashes with your environment, use a separate venv for the export)")


@dataclass(frozen=True)
class AwqCheck:
    """Reloaded AWQ model vs the original (bf16) on ``num_prompts`` conversations."""

    num_prompts: int
    top1_agreement: float
    """Fraction of positions where both pick the same next token (teacher-forced over whole conversations)."""
    mean_kl: float
    """Mean KL(original ‖ AWQ) of the next-token distributions, in nats."""
    greedy_identical: int
    greedy_agreement: float
    """Mean fraction of each greedy continuation that matches before the first differing token."""
    max_new_tokens: int


@dataclass(frozen=True)
class AwqResult:
    out_dir: str
    scheme: str
    group_size: int
    num_bits: int
    quant_method: str
    format: str
    size_bytes: int
    source_size_bytes: int
    check: AwqCheck | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        text = (f"{self.out_dir}: {self.quant_method}/{self.format}, {self.num_bits}-bit group {self.group_size}, "
                f"{self.size_bytes / 2**20:.1f} MiB (from {self.source_size_bytes / 2**20:.1f} MiB)")
        if self.check is not None:
            c = self.check
            text += (f"; vs original: top-1 {c.top1_agreement:.1%}, mean KL {c.mean_kl:.4f}, greedy "
                     f"{c.greedy_identical}/{c.num_prompts} identical ({c.greedy_agreement:.1%})")
        return text


def to_awq(model_dir: str | Path, out_dir: str | Path, *, calibration: list[list[dict[str, Any]]] | None = None,
           num_calibration_samples: int = 128, max_seq_length: int = 1024, verify: bool = True,
           max_new_tokens: int = 24) -> AwqResult:
    """Quantize ``model_dir`` with AWQ (W4A16, group 128) into ``out_dir`` and check the reloaded model."""
    refuse_run_folder(model_dir)
    oneshot, awq_modifier, quant_modifier = _require_llmcompressor()
    import torch

    if not torch.cuda.is_available():
        raise UserError("AWQ export needs a CUDA GPU (llm-compressor's AWQ calibration)",
                        hint="run it on a GPU machine, e.g. python bench/awq_export.py --model MERGED_DIR")
    source = Path(model_dir)
    if not (source / "config.json").is_file():
        raise UserError(f"{source}: not a model folder (no config.json)",
                        hint="merge the adapter first: tunesmith merge RUN_DIR --out merged/")
    out = output_folder(out_dir)
    tokenizer = _tokenizer(source)
    conversations = calibration or _default_calibration()
    dataset = _calibration_dataset(tokenizer, conversations, num_calibration_samples, max_seq_length)

    # Loaded on the CPU: llm-compressor's sequential pipeline moves one layer at a time to the GPU, so models larger
    # than GPU memory quantize too.
    model = _load(source, torch.bfloat16, device_map=None)
    recipe = [awq_modifier(duo_scaling="both"),
              quant_modifier(targets=["Linear"], scheme=SCHEME, ignore=["lm_head"])]
    try:
        oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=max_seq_length,
                num_calibration_samples=len(dataset))
    except ValueError as exc:
        raise UserError(f"{source}: llm-compressor cannot AWQ-quantize this model: {exc}",
                        hint=f"AWQ groups of {GROUP_SIZE} need every Linear input size to be a multiple of "
                             f"{GROUP_SIZE}") from None
    with atomic_folder(out, what="the AWQ model") as staging:  # a full disk leaves no half-written folder
        model.save_pretrained(staging, save_compressed=True)
        tokenizer.save_pretrained(staging)
    del model
    torch.cuda.empty_cache()

    quant = _quantization_config(out)
    check = _check(source, out, tokenizer, conversations[:8], max_new_tokens) if verify else None
    result = AwqResult(out_dir=str(out), scheme=SCHEME, group_size=quant["group_size"], num_bits=quant["num_bits"],
                       quant_method=quant["quant_method"], format=quant["format"], size_bytes=_size(out),
                       source_size_bytes=_size(source), check=check)
    ExportRecord(stage="export", kind="awq", source=str(source), result=result.to_dict(),
                 versions=versions()).write(out)
    return result


def _require_llmcompressor() -> tuple[Any, Any, Any]:
    try:
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier
    except ImportError as exc:
        raise UserError(f"AWQ export needs llm-compressor, which is not importable ({exc})",
                        hint=INSTALL_HINT) from None
    return oneshot, AWQModifier, QuantizationModifier


def _default_calibration() -> list[list[dict[str, Any]]]:
    from .samples import BUILTIN_CONVERSATIONS

    return [list(c) for c in BUILTIN_CONVERSATIONS]


def _calibration_dataset(tokenizer: Any, conversations: list[list[dict[str, Any]]], limit: int,
                         max_seq_length: int) -> Any:
    """Tokenised conversations, as in training (chat template, training segmentation), cycled up to ``limit``."""
    from datasets import Dataset

    from ..chat import tokenize_chat

    rows = [tokenize_chat(tokenizer, c).input_ids[:max_seq_length] for c in conversations]
    rows = [rows[i % len(rows)] for i in range(max(limit, 1))] if rows else []
    if not rows:
        raise UserError("AWQ calibration needs at least one conversation")
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})


def _quantization_config(out: Path) -> dict[str, Any]:
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    quant = config.get("quantization_config") or {}
    groups = quant.get("config_groups") or {}
    weights = next(iter(groups.values()), {}).get("weights") or {}
    if quant.get("quant_method") != "compressed-tensors" or weights.get("num_bits") != 4:
        raise RunError(f"{out}: llm-compressor wrote no 4-bit compressed-tensors config: {quant}")
    return {"quant_method": quant["quant_method"], "format": str(quant.get("format")),
            "group_size": int(weights.get("group_size") or 0), "num_bits": int(weights["num_bits"])}


def _check(source: Path, out: Path, tokenizer: Any, conversations: list[list[dict[str, Any]]],
           max_new_tokens: int) -> AwqCheck:
    import torch

    from ..chat import end_of_turn_ids, prompt_ids, tokenize_chat
    from .samples import prompt_part

    original = _load(source, torch.bfloat16)
    quantized = _load(out, None)
    stops = end_of_turn_ids(tokenizer)
    same = total = 0
    kl = 0.0
    identical = 0
    agreement = 0.0
    for conversation in conversations:
        ids = torch.tensor([tokenize_chat(tokenizer, conversation).input_ids], device="cuda")
        with torch.no_grad():
            p = torch.log_softmax(original(input_ids=ids).logits[0].float(), -1)
            q = torch.log_softmax(quantized(input_ids=ids).logits[0].float(), -1)
        same += int((p.argmax(-1) == q.argmax(-1)).sum())
        total += p.shape[0]
        kl += float((p.exp() * (p - q)).sum())
        prompt = torch.tensor([prompt_ids(tokenizer, prompt_part(conversation))], device="cuda")
        want = _greedy(original, prompt, stops, max_new_tokens, tokenizer.pad_token_id)
        got = _greedy(quantized, prompt, stops, max_new_tokens, tokenizer.pad_token_id)
        identical += int(want == got)
        prefix = next((k for k, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), min(len(want), len(got)))
        agreement += 1.0 if want == got else prefix / max(len(want), len(got), 1)
    n = len(conversations)
    return AwqCheck(num_prompts=n, top1_agreement=same / total, mean_kl=kl / total, greedy_identical=identical,
                    greedy_agreement=agreement / n, max_new_tokens=max_new_tokens)


def _greedy(model: Any, prompt: Any, stops: list[int], max_new_tokens: int, pad: int | None) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stops, pad_token_id=pad)
    return out[0, prompt.shape[1]:].tolist()


def _load(path: Path, dtype: Any, device_map: str | None = "cuda") -> Any:
    from ..config import ModelConfig
    from ..models import load_model

    return load_model(ModelConfig(name_or_path=str(path)), dtype=dtype if dtype is not None else "auto",
                      device_map=device_map)


def _tokenizer(source: Path) -> Any:
    from ..config import ModelConfig
    from ..models import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(source)))


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
