"""Built-in catalogue: architecture configs of common open models, and GPUs with memory, peak and price.

Model entries are the ``config.json`` values published with each model (only the fields that change the parameter
count and the memory model; everything else keeps the transformers default), so ``transformers.AutoConfig.for_model``
can rebuild the architecture and the meta device can count its parameters exactly — no weights are downloaded.
``params`` is the published total (the safetensors parameter count shown on each model page); the tests check that
the config rebuilds exactly that number.

GPU entries: memory as sold, dense bf16 tensor TFLOP/s from the vendor datasheet (without sparsity), and an
on-demand $/hour that is an EDITABLE ASSUMPTION (cloud prices move; override with ``--price-per-hour``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from ..errors import UserError

_LLAMA3 = {"model_type": "llama", "vocab_size": 128256, "num_key_value_heads": 8, "rope_theta": 500000.0,
           "max_position_embeddings": 131072, "rms_norm_eps": 1e-5}
_QWEN25 = {"model_type": "qwen2", "rope_theta": 1000000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6}

MODELS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {**_LLAMA3, "hub_id": "meta-llama/Llama-3.2-1B", "params": 1_235_814_400,
                     "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "head_dim": 64, "tie_word_embeddings": True},
    "llama-3.2-3b": {**_LLAMA3, "hub_id": "meta-llama/Llama-3.2-3B", "params": 3_212_749_824,
                     "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                     "num_attention_heads": 24, "head_dim": 128, "tie_word_embeddings": True},
    "llama-3.1-8b": {**_LLAMA3, "hub_id": "meta-llama/Llama-3.1-8B", "params": 8_030_261_248,
                     "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "tie_word_embeddings": False},
    "llama-3.1-70b": {**_LLAMA3, "hub_id": "meta-llama/Llama-3.1-70B", "params": 70_553_706_496,
                      "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                      "num_attention_heads": 64, "tie_word_embeddings": False},
    "qwen2.5-0.5b": {**_QWEN25, "hub_id": "Qwen/Qwen2.5-0.5B", "params": 494_032_768,
                     "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "qwen2.5-1.5b": {**_QWEN25, "hub_id": "Qwen/Qwen2.5-1.5B", "params": 1_543_714_304,
                     "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "qwen2.5-3b": {**_QWEN25, "hub_id": "Qwen/Qwen2.5-3B", "params": 3_085_938_688,
                   "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                   "num_attention_heads": 16, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "qwen2.5-7b": {**_QWEN25, "hub_id": "Qwen/Qwen2.5-7B", "params": 7_615_616_512,
                   "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False},
    "qwen2.5-14b": {**_QWEN25, "hub_id": "Qwen/Qwen2.5-14B", "params": 14_770_033_664,
                    "vocab_size": 152064, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 48,
                    "num_attention_heads": 40, "num_key_value_heads": 8, "tie_word_embeddings": False},
    "qwen2.5-32b": {**_QWEN25, "hub_id": "Qwen/Qwen2.5-32B", "params": 32_763_876_352,
                    "vocab_size": 152064, "hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64,
                    "num_attention_heads": 40, "num_key_value_heads": 8, "tie_word_embeddings": False},
    "qwen2.5-72b": {**_QWEN25, "hub_id": "Qwen/Qwen2.5-72B", "params": 72_706_203_648,
                    "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "tie_word_embeddings": False},
    "qwen3-8b": {"model_type": "qwen3", "hub_id": "Qwen/Qwen3-8B", "params": 8_190_735_360,
                 "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                 "tie_word_embeddings": False, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
                 "rms_norm_eps": 1e-6},
    "mistral-7b-v0.3": {"model_type": "mistral", "hub_id": "mistralai/Mistral-7B-v0.3", "params": 7_248_023_552,
                        "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                        "head_dim": 128, "tie_word_embeddings": False, "rope_theta": 1000000.0,
                        "max_position_embeddings": 32768, "sliding_window": None, "rms_norm_eps": 1e-5},
    "gemma-2-2b": {"model_type": "gemma2", "hub_id": "google/gemma-2-2b", "params": 2_614_341_888,
                   "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                   "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                   "tie_word_embeddings": True},
    "gemma-2-9b": {"model_type": "gemma2", "hub_id": "google/gemma-2-9b", "params": 9_241_705_984,
                   "vocab_size": 256000, "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
                   "tie_word_embeddings": True},
    "phi-3-mini": {"model_type": "phi3", "hub_id": "microsoft/Phi-3-mini-4k-instruct", "params": 3_821_079_552,
                   "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "tie_word_embeddings": False,
                   "max_position_embeddings": 4096},
}
"""name → config.json fields (+ ``hub_id`` and the published ``params``, which are not config fields)."""

INSTRUCT_IDS: dict[str, str] = {
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B-Instruct", "llama-3.2-3b": "meta-llama/Llama-3.2-3B-Instruct",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-70b": "meta-llama/Llama-3.1-70B-Instruct",
    **{f"qwen2.5-{s}": f"Qwen/Qwen2.5-{s.upper()}-Instruct" for s in ("0.5b", "1.5b", "3b", "7b", "14b", "32b", "72b")},
    "qwen3-8b": "Qwen/Qwen3-8B", "mistral-7b-v0.3": "mistralai/Mistral-7B-Instruct-v0.3",
    "gemma-2-2b": "google/gemma-2-2b-it", "gemma-2-9b": "google/gemma-2-9b-it",
    "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
}
"""The chat (instruct) checkpoint of each entry: what a starter config fine-tunes (it ships a chat template).
Instruct variants share their base model's architecture."""

ALIASES: dict[str, str] = {hub.lower(): name for name, hub in INSTRUCT_IDS.items()}
ALIASES["meta-llama/llama-3.3-70b-instruct"] = "llama-3.1-70b"  # same architecture, newer weights


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gb: float
    """Memory as sold (the marketing number)."""
    memory_gib: float
    """Memory the driver reports (nvidia-smi total ÷ 1024): what the memory estimate is compared with."""
    bf16_tflops: float
    """Dense bf16 tensor-core peak from the datasheet (no sparsity)."""
    price_per_hour: float
    """On-demand $/GPU-hour: an editable assumption, not a quote."""
    bf16: bool = True
    """bf16 arithmetic in hardware (full fine-tuning's bf16-weight optimizer needs it)."""
    fp8: bool = False
    """FP8 tensor cores (compute capability 8.9 or later: Ada and Hopper): a LoRA base's products in FP8."""
    cpu: bool = False
    """This machine's CPU (``this_cpu``): ``bf16_tflops`` then holds its measured fp32 matmul rate."""


GPUS: dict[str, Gpu] = {g.name: g for g in (
    Gpu("t4", 16, 15.0, 65, 0.35, bf16=False),  # no bf16 tensor cores; 65 = fp16 peak, bf16 runs emulated
    Gpu("a10g", 24, 22.5, 70, 1.00),         # AWS g5; the A10G runs below the A10's 125 (≈70 quoted; verify)
    Gpu("l4", 24, 22.5, 121, 0.80, fp8=True),
    Gpu("rtx-3090", 24, 24.0, 35.6, 0.30),   # GeForce: 71 with fp16 accumulate; bf16 training accumulates in fp32
    Gpu("rtx-4090", 24, 24.0, 82.6, 0.45, fp8=True),  # GeForce: 165 with fp16 accumulate, 82.6 with fp32 (training)
    Gpu("l40s", 48, 45.0, 362, 1.10, fp8=True),
    Gpu("a100-40gb", 40, 40.0, 312, 1.30),
    Gpu("a100-80gb", 80, 80.0, 312, 1.80),
    Gpu("h100-80gb", 80, 79.6, 989, 2.50, fp8=True),
    Gpu("h200", 141, 140.4, 989, 3.50, fp8=True),
)}
"""Built-in GPUs. Prices are EDITABLE ASSUMPTIONS (late-2026 on-demand cloud ballpark); pass your own."""

GPU_ALIASES = {"a100": "a100-80gb", "h100": "h100-80gb", "3090": "rtx-3090", "4090": "rtx-4090",
               "nvidia h200": "h200", "nvidia h100 80gb hbm3": "h100-80gb", "nvidia a10g": "a10g",
               "nvidia l4": "l4", "nvidia a100-sxm4-80gb": "a100-80gb", "nvidia a100-sxm4-40gb": "a100-40gb",
               "nvidia geforce rtx 4090": "rtx-4090", "nvidia geforce rtx 3090": "rtx-3090"}


def model_names() -> list[str]:
    return list(MODELS)


def lookup_model(name: str) -> dict[str, Any] | None:
    """A catalogue entry by name, hub id or instruct hub id (case-insensitive); None when unknown."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in MODELS:
        return MODELS[key]
    for entry_name, entry in MODELS.items():
        if entry["hub_id"].lower() == key:
            return MODELS[entry_name]
    return None


def config_dict(entry: dict[str, Any]) -> dict[str, Any]:
    """The config.json fields of an entry (without the catalogue's own keys)."""
    return {k: v for k, v in entry.items() if k not in ("hub_id", "params")}


CPU = "cpu"
"""``--gpu cpu``: this machine's CPU, measured (see ``this_cpu``)."""


def lookup_gpu(name: str) -> Gpu:
    """A GPU by catalogue name, a common short name or the name ``nvidia-smi`` reports, or ``cpu`` for this
    machine's CPU; UserError when unknown."""
    key = name.strip().lower().replace("_", "-")
    key = GPU_ALIASES.get(key, key)
    if key == CPU:
        return this_cpu()
    if key in GPUS:
        return GPUS[key]
    raise UserError(f"--gpu {name!r}: not in the GPU catalogue" + did_you_mean(key, [*GPUS, CPU]),
                    hint=f"known: {', '.join(GPUS)}, or cpu for this machine's CPU")


def this_cpu() -> Gpu:
    """This machine's CPU as a training device: its memory, and its fp32 matrix-multiply rate measured now (~0.3 s)
    in ``bf16_tflops`` (CPUs train in fp32). No price: it is a machine you have."""
    import os

    import torch

    from .machine import measure_matmul_flops

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    rate = measure_matmul_flops(torch.device("cpu"), torch.float32) / 1e12
    return Gpu(f"{CPU} ({cores} cores)", round(memory * 2**30 / 1e9, 1), round(memory, 1), rate, 0.0, bf16=False,
               cpu=True)


def did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name.lower(), choices, n=3, cutoff=0.4)
    return f" — did you mean {', '.join(close)}?" if close else ""
