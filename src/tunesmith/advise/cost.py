"""Training time and cost, and the serving bill at the user's call volume.

Training: tokens × epochs × FLOPs per token ÷ (GPU bf16 peak × MFU), with

    full fine-tuning  6·N' + 12·L·q·s          (forward 2N', data-gradient 2N', weight-gradient 2N')
    LoRA / QLoRA      4·N' + 12·L·q·s + 6·n     (frozen weights need no weight gradient; n = adapter params)

N' = parameters used in matmuls (all but the input embedding, plus the LM head), L layers, q = attention width,
s = sequence length; attention counted non-causally (the torchtitan / llm-foundry / NeMo convention);
recomputation from activation checkpointing is NOT model work and is not counted (it lowers the MFU instead).

MFU is not assumed: it comes from ``CALIBRATION``, one row per measured run, each with its source. A run on
variable-length data wastes compute on padding, so the measured fixed-length MFU is scaled by the padding
efficiency of the user's own length distribution, raised to an exponent fitted on the measured variable-length run.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any

from ..hardware.memory import Architecture


@dataclass(frozen=True)
class Calibration:
    engine: str
    method: str
    tokens_per_s: float
    """Real (non-padding) tokens per second per GPU, as measured."""
    flops_per_token: float
    peak_tflops: float
    """The datasheet peak the MFU is taken against."""
    fixed_length: bool
    source: str

    @property
    def mfu(self) -> float:
        return self.tokens_per_s * self.flops_per_token / (self.peak_tflops * 1e12)


_RECIPE_SRC = ("bench seed_recipe.py on 1× H200 (docs/performance.md): Llama-3.1-8B shape, bf16, SDPA, TRL defaults "
             "incl. gradient checkpointing, batch 4 × GA 4 × 2048")
CALIBRATION: tuple[Calibration, ...] = (
    Calibration("recipe", "lora", 6918, 33.2e9, 989, True, _RECIPE_SRC + ", LoRA r16 all-linear, every row 2048"),
    Calibration("recipe", "lora", 2166, 33.2e9, 989, False, _RECIPE_SRC + ", LoRA, --varlen (log-normal lengths)"),
    Calibration("recipe", "qlora", 7534, 33.2e9, 989, True, _RECIPE_SRC + ", QLoRA NF4, every row 2048"),
    Calibration("recipe", "qlora", 2109, 33.2e9, 989, False, _RECIPE_SRC + ", QLoRA, --varlen"),
    Calibration("recipe", "full", 7259, 48.2e9, 989, True, _RECIPE_SRC.replace("batch 4 × GA 4", "batch 1 × GA 16")
                + ", full fine-tuning, pure bf16 (weights and AdamW states)"),
)
"""Every measured run the time model is calibrated on — the ONE place to add tunesmith's own engine numbers."""

VARLEN_LENGTHS = {"median": 2048 / 5, "sigma": 0.8, "min": 32, "max": 2048, "seed": 0, "batch": 4}
"""The length distribution of the measured ``--varlen`` runs (seed_recipe.py), to fit the padding exponent."""

MULTI_GPU_EFFICIENCY = 0.92
"""Data-parallel scaling per GPU beyond the first (an assumption; published FSDP runs lose 3–8%)."""


@dataclass(frozen=True)
class TrainingEstimate:
    method: str
    tokens: int
    """Real tokens per epoch."""
    epochs: float
    flops_per_token: float
    mfu: float
    """Effective model-FLOPs utilisation used (calibrated, padding included)."""
    padding_efficiency: float
    tokens_per_s: float
    """All GPUs together."""
    hours: float
    gpu_hours: float
    cost_usd: float
    calibration: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def flops_per_token(arch: Architecture, method: str, seq_len: float, lora_params: int = 0) -> float:
    attention = 12 * arch.num_layers * arch.q_dim * seq_len
    if method == "full":
        return 6 * arch.matmul_params + attention
    return 4 * arch.matmul_params + attention + 6 * lora_params


def padding_efficiency(lengths: list[int], batch_size: int, max_length: int, samples: int = 2000,
                       seed: int = 0) -> float:
    """Real tokens ÷ computed tokens when random batches are padded to their longest row."""
    if not lengths:
        return 1.0
    clipped = [min(n, max_length) for n in lengths]
    rng = random.Random(seed)
    real = padded = 0
    for _ in range(samples):
        batch = [rng.choice(clipped) for _ in range(batch_size)]
        real += sum(batch)
        padded += max(batch) * batch_size
    return real / padded


def _seed_varlen_lengths(n: int = 4000) -> list[int]:
    spec = VARLEN_LENGTHS
    rng = random.Random(spec["seed"])
    return [int(min(spec["max"], max(spec["min"], rng.lognormvariate(math.log(spec["median"]), spec["sigma"]))))
            for _ in range(n)]


def calibrated_mfu(method: str, engine: str = "recipe", pad_eff: float = 1.0,
                   packing: bool = False) -> tuple[float, str]:
    """MFU for ``method`` at a padding efficiency, and a sentence naming the measurements it comes from.

    mfu = mfu_fixed × pad_eff ** k, where k makes the formula reproduce the measured variable-length run. With
    packing the padding efficiency is 1 (no padding), which is the best case the fixed-length runs measured.
    """
    rows = _rows(engine, method) or _rows(engine, "lora")
    if not rows:
        raise KeyError(f"no calibration for engine {engine!r}, method {method!r}")
    fixed = next(r for r in rows if r.fixed_length)
    if packing or pad_eff >= 0.999:
        return fixed.mfu, fixed.source
    # The padding exponent: the method's own variable-length run, else LoRA's (the same trainer and collator).
    varlen = next((r for r in rows if not r.fixed_length), None)
    pair = (fixed, varlen) if varlen else _fixed_and_varlen(engine)
    if pair is None:
        return fixed.mfu * pad_eff, f"{fixed.source}; scaled by the padding efficiency"
    ref_eff = padding_efficiency(_seed_varlen_lengths(), VARLEN_LENGTHS["batch"], VARLEN_LENGTHS["max"])
    k = math.log(pair[1].mfu / pair[0].mfu) / math.log(ref_eff)
    return fixed.mfu * pad_eff**k, f"{fixed.source}; padding exponent {k:.2f} from: {pair[1].source}"


def _fixed_and_varlen(engine: str) -> tuple[Calibration, Calibration] | None:
    for method in ("lora", "qlora", "full"):
        rows = _rows(engine, method)
        fixed = next((r for r in rows if r.fixed_length), None)
        varlen = next((r for r in rows if not r.fixed_length), None)
        if fixed and varlen:
            return fixed, varlen
    return None


def _rows(engine: str, method: str) -> list[Calibration]:
    return [c for c in CALIBRATION if c.engine == engine and c.method == method]


def estimate_training(arch: Architecture, method: str, tokens: int, epochs: float, seq_len: float, *,
                      peak_tflops: float, price_per_hour: float, num_gpus: int = 1, lora_params: int = 0,
                      pad_eff: float = 1.0, packing: bool = False, engine: str = "recipe") -> TrainingEstimate:
    """Hours and dollars to train ``tokens`` real tokens for ``epochs`` on ``num_gpus`` GPUs."""
    fpt = flops_per_token(arch, method, seq_len, lora_params)
    mfu, source = calibrated_mfu(method, engine, pad_eff, packing)
    gpus_effective = 1 + (num_gpus - 1) * MULTI_GPU_EFFICIENCY
    tokens_per_s = peak_tflops * 1e12 * mfu / fpt * gpus_effective
    seconds = tokens * epochs / tokens_per_s
    gpu_hours = seconds / 3600 * num_gpus
    return TrainingEstimate(method=method, tokens=tokens, epochs=epochs, flops_per_token=fpt, mfu=round(mfu, 4),
                            padding_efficiency=round(1.0 if packing else pad_eff, 3),
                            tokens_per_s=round(tokens_per_s, 1), hours=round(seconds / 3600, 3),
                            gpu_hours=round(gpu_hours, 3), cost_usd=round(gpu_hours * price_per_hour, 2),
                            calibration=source)


# -- serving ------------------------------------------------------------------------------------------------------

API_PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o-mini-fine-tuned": (0.30, 1.20),
}
"""$ per million (input, output) tokens. EDITABLE ASSUMPTIONS: OpenAI's list prices as published in 2024–25;
check the current price list and pass your own (``--api-price IN,OUT``)."""

OPENAI_TRAINING_PER_MTOK = {"gpt-4o-mini": 3.00, "gpt-4o": 25.00}
"""$ per million training tokens (tokens × epochs) of OpenAI fine-tuning. EDITABLE ASSUMPTIONS: list prices as
published in 2024–25."""

SERVING_MFU = {"prefill": 0.50, "decode": 0.25}
"""ASSUMED utilisation of a continuously batching server (vLLM) at high load: prefill is large matmuls, decode
at large batch is about half as efficient. Replace with a measured number for your model and GPU."""

PEAK_TO_MEAN = 2.0
"""ASSUMED ratio of peak to mean traffic: self-hosted capacity is sized for the peak, an API bills the mean."""


@dataclass(frozen=True)
class ServingComparison:
    calls_per_day: int
    input_tokens_per_call: float
    output_tokens_per_call: float
    api_model: str
    api_cost_per_day: float
    self_hosted_model: str
    gpu: str
    gpus_needed: int
    self_hosted_cost_per_day: float
    ratio: float
    """API cost ÷ self-hosted cost: how many times cheaper self-hosting is (below 1: the API is cheaper)."""
    assumptions: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


WEIGHTS_SHARE_OF_SERVING_MEMORY = 0.7
"""ASSUMED: weights may take 70% of a serving GPU's memory; the rest is KV cache for the batch (vLLM's default
gpu_memory_utilization is 0.9 of the card)."""


def compare_serving(arch: Architecture, calls_per_day: int, input_tokens: float, output_tokens: float, *,
                    gpu_name: str, peak_tflops: float, price_per_hour: float, memory_gib: float,
                    api_model: str = "gpt-4o", api_prices: tuple[float, float] | None = None) -> ServingComparison:
    """Daily cost of ``calls_per_day`` on a large API model vs the fine-tuned model self-hosted on ``gpu_name``."""
    price_in, price_out = api_prices or API_PRICES_PER_MTOK[api_model]
    api = calls_per_day * (input_tokens * price_in + output_tokens * price_out) / 1e6
    # A forward pass costs 2·N' FLOPs per token, prompt and generated alike.
    flops = 2 * arch.matmul_params
    gpu_seconds = calls_per_day * flops * (input_tokens / SERVING_MFU["prefill"]
                                           + output_tokens / SERVING_MFU["decode"]) / (peak_tflops * 1e12)
    # One replica needs enough GPUs to hold the bf16 weights (tensor parallel); replicas are added for throughput.
    per_replica = math.ceil(arch.total_params * 2 / 2**30 / (memory_gib * WEIGHTS_SHARE_OF_SERVING_MEMORY))
    gpus = max(1, math.ceil(gpu_seconds * PEAK_TO_MEAN / 86400))
    gpus = math.ceil(gpus / per_replica) * per_replica
    hosted = gpus * 24 * price_per_hour
    return ServingComparison(
        calls_per_day=calls_per_day, input_tokens_per_call=input_tokens, output_tokens_per_call=output_tokens,
        api_model=api_model, api_cost_per_day=round(api, 2), self_hosted_model=arch.name, gpu=gpu_name,
        gpus_needed=gpus, self_hosted_cost_per_day=round(hosted, 2), ratio=round(api / hosted, 2),
        assumptions=(
            f"{api_model} at ${price_in}/M input and ${price_out}/M output tokens (editable list prices)",
            f"{gpu_name} at ${price_per_hour}/h (editable), {peak_tflops:g} TFLOP/s bf16 peak",
            f"server utilisation {SERVING_MFU['prefill']:.0%} prefill / {SERVING_MFU['decode']:.0%} decode "
            f"(assumed, vLLM-style continuous batching)",
            f"capacity sized for {PEAK_TO_MEAN:g}× the mean traffic; at least one replica always on",
            f"bf16 weights on {per_replica} GPU(s) per replica (weights ≤ "
            f"{WEIGHTS_SHARE_OF_SERVING_MEMORY:.0%} of each GPU's memory, the rest for the KV cache)",
        ),
    )
