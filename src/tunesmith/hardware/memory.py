"""Peak GPU memory of one training step, per method (full / LoRA / QLoRA), from the architecture config alone.

Parameter counts are exact: the model is built on the meta device (no memory, no weights) and PEFT wraps it there,
so every count is what ``model.parameters()`` would report for the real model.

The estimate is comparable with ``torch.cuda.max_memory_allocated()`` (the tensors alive at the worst moment);
the CUDA context and allocator slack come on top as a fixed overhead when deciding whether a run fits.

    peak = persistent + checkpoints + max(one layer's backward, the LM head's backward)     (checkpointing on)
    peak = persistent + every layer's saved activations + max(…)                           (checkpointing off)

- persistent: base weights (bf16; NF4 + double-quantized constants + the bf16 parts bitsandbytes does not
  quantize; or, for an FP8 base, 1 byte per decoder-block weight + the bf16 rest), trainable parameters, their
  gradients and the AdamW states.
- saved activations per token per layer: the byte counts below were MEASURED on the CPU with
  ``torch.autograd.graph.saved_tensors_hooks`` on Llama-architecture models under bf16 autocast, varying one width
  at a time (tests/test_advise_memory.py re-measures them). CUDA's fused dropout keeps a 1-byte mask where the CPU
  keeps an input-dtype noise tensor, so the dropout term takes the mask size as a parameter.
- the LM head, three policies: ``fused`` — TRL ≥ 1.16's fused head scores 4,096-token × 32,768-vocab bf16 tiles
  and never builds the logits (what the guide's recipe ran); ``chunked`` — tunesmith's loss: 4,096 tokens at a time
  over the whole vocabulary, recomputed in backward (bf16 logits, fp32 log-softmax, bf16 and fp32 gradients:
  12 bytes × vocab per token of the chunk, calibrated on a GPU measurement); ``full`` — the plain transformers
  loss over the whole micro-batch (12 bytes × vocab per token at its backward: 12.6 GB at 8,192 tokens × 128,256 vocab).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Literal

GIB = 2**30

Method = Literal["full", "lora", "qlora"]
Checkpointing = Literal["none", "full"]
LogitsPolicy = Literal["fused", "chunked", "full"]

CUDA_CONTEXT_GIB = 0.75
"""CUDA context + cuBLAS workspaces: memory the driver holds that max_memory_allocated never shows."""

ALLOCATOR_SLACK = 0.05
"""The caching allocator's fragmentation: reserved memory runs a few percent above the allocated peak."""

COMPILED_LAYER_SHARE = 0.85
"""LoRA/QLoRA decoder layers compiled with torch.compile keep less than the eager measurements below give (the
compiler saves bf16 where eager keeps fp32 copies, and recomputes cheap elementwise results). Measured on 8B runs on
an H200 (bench/results/fast_engine.md): un-checkpointed and compiled at 8K-token rows 70.4 GiB allocated against
81.1 eager (0.84 of the layers' eager activations); with checkpointing the compiled layers keep less still (a kept
layer at 12,288 tokens cost 1.94-2.20 GiB against 2.84 eager), so 0.85 overestimates those peaks by at most 0.5 GiB
(every-layer-checkpointed LoRA/QLoRA steps of 8K-12K tokens) rather than underestimate the un-checkpointed ones.
Full fine-tuning's compiled layers: ``COMPILED_FULL_SHARE``."""

COMPILED_FULL_SHARE = 0.38
COMPILED_FULL_LAYER_WEIGHT_BYTES = 1.1
"""Full fine-tuning on one GPU with compiled decoder layers: each layer kept for backward saves 0.38 of the eager
bytes per token below, plus 1.1 bytes per weight of the layer whatever the tokens (0.226 GiB for an 8B layer; not
traced to a named tensor — the compiled graph keeps buffers of the weights' size for its backward). Fitted on the
8B runs of bench/results/scale_out/call13_1xH200_T.jsonl, call14_1xH200_V.jsonl and call7_2xH200_H.jsonl at each
run's largest packed row (the benchmark's chat lengths fill rows of 4,096 / 8,192 / 12,288 tokens to at most 3,604
/ 6,896 / 10,687), max_memory_allocated measured → modelled: bf16 weights + torchao 8-bit AdamW 62.73 → 63.5
(3,604 tokens), 70.70 → 71.2 (6,896), 79.06 → 79.1 (10,687, one layer checkpointed); fp32 master weights +
8-bit AdamW 108.36 → 107.4 (3,604), 99.86 → 99.1 (6,896, 15 layers checkpointed). With fp32 master weights the
compiled layer keeps its own bf16 copy of its weights for backward (2 bytes per weight, counted with the layer: a
checkpointed layer recomputes it), not autocast's cached copy of every weight. With the eager terms the plan gave
these runs 77.2 / 103.1 / 126.7 GiB and 124.3 / 127.1 GiB. FSDP2's compiled full fine-tuning keeps the eager
terms: its gathered and reduced buffers, not modelled, fill what they over-count (8B on two H200s: 103.5 planned,
97.0-98.9 measured)."""

COMPILED_NO_MASK_SHARE = 0.63
"""The same for compiled LoRA/QLoRA layers whose adapters keep no dropout mask (dropout drawn inside lora_A on CUDA,
src/tunesmith/train/adapter_dropout.py, or no dropout): no masks and no dropped input copies saved. Measured on an
H200 (bench/results/fast_engine.md, seventh run): 8B LoRA at 12,288-token rows, a third kept layer added 1.47 GiB
(18.92 → 20.39 GiB) — with the 0.09 GiB input it replaces, 1.56 of the 2.49 GiB the eager measurements give."""

NF4_BYTES_PER_PARAM = 0.5
NF4_BLOCK = 64
"""bitsandbytes NF4 stores one absmax per 64 weights: fp32 (4 bytes), or with double quantization an 8-bit code
plus one fp32 second-level constant per 256 blocks."""

FUSED_HEAD_TILE = (4096, 32768)
"""TRL's fused LM head projects 4,096 tokens × 32,768 vocabulary entries at a time (trl.kernels.chunked_logprob)."""

CHUNK_TOKENS = 4096
"""tunesmith's chunked loss (train/loss.py): tokens per chunk, each over the whole vocabulary."""


@dataclass(frozen=True)
class Architecture:
    """What the memory and FLOP models need from a model, counted exactly on the meta device."""

    name: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    total_params: int
    """Every parameter (tied embeddings counted once), as ``sum(p.numel() for p in model.parameters())``."""
    embedding_params: int
    """The input embedding table."""
    quantizable_params: int
    """Weights of the linear layers inside the decoder blocks: what bitsandbytes stores in 4 bits (it keeps the
    embeddings, the LM head, norms and biases in bf16)."""
    matmul_params: int
    """N' of the FLOP model: every parameter used in a matmul — all but the input embedding, plus the LM head
    (which, when tied, is the embedding table used a second time)."""
    linear_targets: tuple[str, ...]
    """Names of the linear modules in a block (``q_proj``, … or ``qkv_proj`` …): what LoRA can target."""
    plain_output_head: bool = True
    """Logits are exactly ``hidden @ lm_head.weight.T`` (no soft-capping or scaling): a chunked or fused loss can
    replace the full logits. Gemma 2's soft-capping makes tunesmith fall back to the full logits."""

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MemoryEstimate:
    method: str
    micro_batch_size: int
    seq_len: int
    checkpointing: str
    logits: str
    trainable_params: int
    weights_gib: float
    trainable_gib: float
    """Trainable parameters' own copy: fp32 adapters (PEFT upcasts them) plus their bf16 autocast copies; for
    full fine-tuning with fp32 master weights, the bf16 autocast copy of every weight."""
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    """Saved activations: checkpoints, plus every layer (checkpointing off) or one recomputed layer (on)."""
    head_and_transients_gib: float
    """The worst backward moment beyond saved activations: the LM head's tiles or logits, or a layer's gradients."""
    layer_gib: float
    """One decoder layer's saved activations (what keeping it un-checkpointed costs, its input included)."""
    layer_backward_gib: float
    """A checkpointed layer's backward: its recomputed activations and the gradients alive meanwhile."""
    head_gib: float
    """The LM head's worst moment (tiles or logits and their gradients)."""
    peak_allocated_gib: float
    """Comparable with torch.cuda.max_memory_allocated()."""
    overhead_gib: float
    """CUDA context and allocator slack."""
    total_gib: float
    """What the GPU must have: peak_allocated + overhead."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def architecture_from_config(config: Any, name: str | None = None) -> Architecture:
    """Count a transformers config's parameters by building the model on the meta device."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings()
    quantizable, targets = 0, []
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head:
            quantizable += module.weight.numel()
            short = module_name.rsplit(".", 1)[-1]
            if short not in targets:
                targets.append(short)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    tied = bool(getattr(text, "tie_word_embeddings", False))
    return Architecture(
        name=name or getattr(text, "name_or_path", "") or text.model_type,
        model_type=text.model_type, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers, num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim,
        vocab_size=text.vocab_size, tie_word_embeddings=tied, total_params=total, embedding_params=embed,
        quantizable_params=quantizable, matmul_params=total - embed + (embed if tied else 0),
        linear_targets=tuple(targets),
        plain_output_head=not (getattr(text, "final_logit_softcapping", None) or getattr(text, "logit_scale", None)),
    )


def lora_trainable_params(config: Any, r: int, target_modules: list[str] | str) -> tuple[int, int]:
    """(trainable parameters, input features adapted per layer) of a LoRA on ``config``, counted by PEFT itself on
    the meta model — exactly what ``print_trainable_parameters`` reports for the real one."""
    return _lora_count(_config_key(config), r, tuple(target_modules) if isinstance(target_modules, list)
                       else target_modules)


@lru_cache(maxsize=64)
def _lora_count(key: tuple[str, str], r: int, targets: tuple[str, ...] | str) -> tuple[int, int]:
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(key[0], **_json_loads(key[1]))
    # PEFT asks the model a deprecated question on wrapping; the warning is not the user's business
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = AutoModelForCausalLM.from_config(config)
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=(
            list(targets) if isinstance(targets, tuple) else targets)))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    layer0 = [m for n, m in peft_model.named_modules() if ".layers.0." in n and hasattr(m, "lora_A")]
    adapted_in = sum(m.in_features for m in layer0)
    return trainable, adapted_in


def _config_key(config: Any) -> tuple[str, str]:
    import json

    data = config.to_diff_dict() if hasattr(config, "to_diff_dict") else dict(config)
    data = {k: v for k, v in data.items() if k not in ("transformers_version", "architectures", "model_type")}
    return config.model_type, json.dumps(data, sort_keys=True, default=str)


def _json_loads(text: str) -> dict[str, Any]:
    import json

    return json.loads(text)


def layer_activation_bytes_per_token(arch: Architecture, method: Method, lora_r: int = 16,
                                     adapted_in_features: int = 0, lora_dropout: float = 0.05,
                                     dropout_mask_bytes: int = 1) -> float:
    """Bytes one decoder layer saves for backward, per token, in bf16 autocast training (SDPA attention).

    Measured (saved-tensor hooks, Llama blocks): full fine-tuning saves 16·d + 8·i + 4·q + 4·kv + 4·heads bytes
    (norm inputs in fp32, projections and the SwiGLU product in bf16, the attention's fp32 log-sum-exp per head).
    LoRA adds the bf16 copies of the adapters' inputs (2·d + 2·q), the adapter activations (24·r) and, with
    dropout, one mask per adapted input feature (1 byte on CUDA; 4 on the CPU, where dropout keeps fp32 noise).
    QLoRA saves the same as LoRA: bitsandbytes' 4-bit matmul keeps the quantized weight, not its input.
    """
    d, i = arch.hidden_size, arch.intermediate_size
    full = 16 * d + 8 * i + 4 * arch.q_dim + 4 * arch.kv_dim + 4 * arch.num_heads + 8
    if method == "full":
        return full
    dropout = dropout_mask_bytes * adapted_in_features if lora_dropout > 0 else 0
    return full + 2 * d + 2 * arch.q_dim + 24 * lora_r + dropout


def estimate_memory(arch: Architecture, method: Method, micro_batch_size: int, seq_len: int, *,
                    lora_r: int = 16, lora_trainable: int = 0, adapted_in_features: int = 0,
                    lora_dropout: float = 0.05, checkpointing: Checkpointing = "full",
                    logits: LogitsPolicy = "chunked", optimizer: Literal["adamw", "adamw_8bit"] = "adamw",
                    full_precision: Literal["bf16", "mixed"] = "bf16", dropout_mask_bytes: int = 1,
                    double_quant: bool = True, shards: int = 1, compiled: bool = False,
                    fp8_base: bool = False, fp8_matmuls: bool = False) -> MemoryEstimate:
    """Peak memory of one training step with ``micro_batch_size`` rows of ``seq_len`` tokens (padded or packed).

    ``full_precision``: ``bf16`` keeps weights, gradients and AdamW states in bf16 (what the guide's code does: it
    loads the model in bf16); ``mixed`` keeps fp32 master weights, fp32 gradients and fp32 states (16 bytes/param).
    ``shards``: full or LoRA fine-tuning over that many GPUs with FSDP2, as tunesmith trains (weights, gradients
    and states split evenly, one block gathered at a time; the estimate is per GPU). QLoRA is not shardable
    (bitsandbytes 4-bit weights): it trains on one GPU. ``compiled``: the decoder layers run under torch.compile
    (``COMPILED_LAYER_SHARE`` of the eager activations for LoRA/QLoRA). ``fp8_base``: LoRA whose frozen
    decoder-block linear layers are stored in FP8 (src/tunesmith/train/fp8.py). ``fp8_matmuls``: full fine-tuning
    whose decoder-block linear layers compute in FP8 (src/tunesmith/train/fp8_training.py): torchao 0.18 saves the
    same bf16 input and the weight itself for backward (``matmul_with_hp_or_float8_args.forward``), so the saved
    activations are bf16's; its FP8 casts live for one product (counted in a layer's backward below), and fp32
    master weights are cast straight to FP8, so no bf16 copy of a block weight exists.
    """
    n, tokens = arch.total_params, micro_batch_size * seq_len
    d, i, v = arch.hidden_size, arch.intermediate_size, arch.vocab_size
    # a decoder block's weights (norms included): all but the embeddings and the head
    block = (n - arch.embedding_params * (1 if arch.tie_word_embeddings else 2)) / arch.num_layers
    compiled_full = compiled and method == "full" and shards == 1  # COMPILED_FULL_SHARE

    # -- persistent: weights, trainable copy, gradients, optimizer states --------------------------------------
    if method == "full":
        trainable = n
        param_bytes = 4 if full_precision == "mixed" else 2
        weights = n * param_bytes
        # fp32 master weights: autocast keeps a bf16 copy of every weight for the forward — compiled layers keep
        # their own with their activations (COMPILED_FULL_SHARE), so only the head's is cached
        trainable_copy = 0.0
        if full_precision == "mixed":
            trainable_copy = v * d * 2.0 if compiled_full else n * 2.0
            if fp8_matmuls and not compiled_full:  # the block weights go to FP8 without a bf16 copy
                trainable_copy -= arch.quantizable_params * 2.0
        gradients = n * param_bytes
        state_bytes = 2 if optimizer == "adamw_8bit" else (8 if full_precision == "mixed" else 2 * param_bytes)
        optimizer_states = n * state_bytes
    else:
        trainable = lora_trainable
        if method == "qlora":
            q = arch.quantizable_params
            constants = q / NF4_BLOCK * (1 + 4 / 256) if double_quant else q / NF4_BLOCK * 4
            weights = q * NF4_BYTES_PER_PARAM + constants + (n - q) * 2
        elif fp8_base:
            # one e4m3 byte per block weight, stored once (backward transposes one matrix at a time, below) — not
            # 2 × 1 byte for a second stored layout, which would save nothing against bf16's 2 bytes; the fp32 scale
            # per output channel (43,008 per 8B layer: 5.5 MB in all) is below this estimate's resolution
            q = arch.quantizable_params
            weights = q * 1 + (n - q) * 2
        else:
            weights = n * 2
        trainable_copy = trainable * (4 + 2)  # PEFT upcasts adapters to fp32; autocast caches a bf16 copy
        gradients = trainable * 4
        optimizer_states = trainable * (2 if optimizer == "adamw_8bit" else 8)
    if shards > 1 and method != "qlora":
        # FSDP2 keeps 1/shards of everything, and gathers one block's full weights at a time (plus the next one,
        # prefetched) in the compute dtype.
        block = (arch.total_params - arch.embedding_params * (1 if arch.tie_word_embeddings else 2)) / arch.num_layers
        weights, trainable_copy = weights / shards + 2 * block * 2, trainable_copy / shards
        gradients, optimizer_states = gradients / shards, optimizer_states / shards

    # -- saved activations ------------------------------------------------------------------------------------
    per_layer = layer_activation_bytes_per_token(arch, method, lora_r, adapted_in_features, lora_dropout,
                                                 dropout_mask_bytes) * tokens
    if compiled and method != "full":
        no_mask = dropout_mask_bytes == 0 or lora_dropout == 0
        per_layer *= COMPILED_NO_MASK_SHARE if no_mask else COMPILED_LAYER_SHARE
    if compiled_full:
        per_layer = per_layer * COMPILED_FULL_SHARE + block * COMPILED_FULL_LAYER_WEIGHT_BYTES
        if full_precision == "mixed" and not fp8_matmuls:
            per_layer += block * 2  # the layer's bf16 copy of its fp32 weights, saved for its backward
    outside_layers = 6 * d * tokens  # embedding output, final norm (fp32 input + bf16 output)
    if checkpointing == "full":
        activations = arch.num_layers * 2 * d * tokens + outside_layers  # each block's bf16 input
        layer_backward = per_layer
    else:
        activations = arch.num_layers * per_layer + outside_layers
        layer_backward = 0.0
    # Gradients alive while one block runs backward: its output's and the MLP's widest.
    layer_backward += (4 * d + 4 * i) * tokens

    # -- the LM head's worst moment ------------------------------------------------------------------------------
    head_trainable = method == "full"
    if logits == "fused":
        tile_tokens, tile_vocab = FUSED_HEAD_TILE
        head = min(tokens, tile_tokens) * min(v, tile_vocab) * 2 + tokens * d * (4 + 2)
        if head_trainable:  # fp32 weight-gradient accumulator, then its cast to the parameter dtype
            head += v * d * (4 + 2)
    elif logits == "chunked":
        # 12 bytes per logit of a chunk at its backward: calibrated on the H200 1B runs
        # (bench/results/advise_vs_measured.md), where 14 (bf16 + fp32 copy + log-softmax + gradient) overshot both
        # LoRA and QLoRA by the same 2 bytes x chunk x vocabulary: one fp32 buffer is freed before the gradient exists
        head = min(tokens, CHUNK_TOKENS) * v * (2 + 4 + 2 + 4) + tokens * d * 2
    else:
        head = tokens * v * (2 + 4 + 2 + 4)  # bf16 logits, fp32 log-softmax kept, its fp32 gradient, bf16 cast
    if method == "qlora":  # one dequantized bf16 weight (the largest block matrix) at a time
        layer_backward += max(d * i, d * arch.q_dim) * 2
    if fp8_matmuls and method == "full":
        # one product's FP8 operands at a time, the widest (an MLP projection): the output gradient in its two
        # layouts and the input for the weight gradient (T × i bytes each), their copies padded to 16 tokens
        # (torchao's pad_inner_dim: 2 more), and the weight's two layouts; eager adds fp32 copies of |·| (8 more)
        layer_backward += tokens * i * (5 if compiled else 13) + 2 * d * i
    if fp8_base and method == "lora":
        # backward's transposed fp8 copy of the largest block matrix, and the widest gradient quantised to fp8;
        # eager also materialises its fp32 scaled copy and |·| (8 bytes per element), compiled code fuses them
        layer_backward += max(d * i, d * arch.q_dim) + tokens * i * (1 if compiled else 9)

    peak = weights + trainable_copy + gradients + optimizer_states + activations + max(layer_backward, head)
    peak_gib = peak / GIB
    overhead = CUDA_CONTEXT_GIB + ALLOCATOR_SLACK * peak_gib
    return MemoryEstimate(
        method=method, micro_batch_size=micro_batch_size, seq_len=seq_len, checkpointing=checkpointing,
        logits=logits, trainable_params=trainable, weights_gib=_r(weights), trainable_gib=_r(trainable_copy),
        gradients_gib=_r(gradients), optimizer_gib=_r(optimizer_states), activations_gib=_r(activations),
        head_and_transients_gib=_r(max(layer_backward, head)), layer_gib=_r(per_layer),
        layer_backward_gib=_r(layer_backward), head_gib=_r(head), peak_allocated_gib=round(peak_gib, 3),
        overhead_gib=round(overhead, 3), total_gib=round(peak_gib + overhead, 3),
    )


def largest_micro_batch(arch: Architecture, method: Method, seq_len: int, memory_gib: float,
                        limit: int = 1024, **kwargs: Any) -> int:
    """The largest micro-batch (rows of ``seq_len``) whose estimate fits in ``memory_gib``; 0 if none does."""
    if estimate_memory(arch, method, 1, seq_len, **kwargs).total_gib > memory_gib:
        return 0
    lo, hi = 1, limit
    while lo < hi:  # memory grows monotonically with the batch: bisect
        mid = (lo + hi + 1) // 2
        if estimate_memory(arch, method, mid, seq_len, **kwargs).total_gib <= memory_gib:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _r(nbytes: float) -> float:
    return round(nbytes / GIB, 6)  # ~1 KB resolution: exact enough to compare tiny models byte for byte
