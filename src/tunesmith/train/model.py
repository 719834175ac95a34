"""Build the model to train: full weights, LoRA on a frozen base, or LoRA on a 4-bit NF4 base (QLoRA)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch

from ..compat import disable_checkpointing, enable_checkpointing
from ..config import ModelConfig, TrainConfig
from ..errors import UserError
from ..models import base_model, load_model, model_skeleton
from .adapter_dropout import fuse_adapter_dropout
from .distributed import Processes, materialize, shard
from .fp8 import FP8, quantize_frozen_base
from .fp8_training import to_fp8_training
from .offload import ActivationOffloader, offloaded_checkpoint, offloaded_layer, synchronous_offloaded_checkpoint
from .pinned import PinnedPool
from .plan import Precision, TrainPlan


def build_model(model_cfg: ModelConfig, train_cfg: TrainConfig, plan: TrainPlan, procs: Processes, *,
                attn_implementation: str | None, path: str, pinned: PinnedPool | None = None) -> Any:
    """Load the base and build it as ``plan`` says (``prepare_model``). One process reads the weights onto its
    device (QLoRA: quantized as they load). FSDP2: every process builds the model without memory (parameters on the
    meta device) and shards it, then receives its shards from the main process — the only one that reads the
    weights (one CPU copy in all, not one per GPU: a 70B model loads on a node whose GPUs could not each hold it).
    ``pinned``: the CPU memory one process's offloaded activations go to (``plan.pinned``, allocated by the caller)."""
    precision = plan.precision
    if not procs.distributed:
        quant = _bnb_config(train_cfg, precision) if train_cfg.method == "qlora" else None
        on_gpu = quant is not None and procs.device.type == "cuda"
        model = load_model(model_cfg, dtype=precision.weights, quantization=quant,
                           device_map={"": procs.device.index or 0} if on_gpu else None,
                           path=path, attn_implementation=attn_implementation)
        if quant is None:
            model.to(procs.device)
        return prepare_model(model, train_cfg, plan, pinned=pinned)
    skeleton = model_skeleton(model_cfg, dtype=precision.weights, path=path, attn_implementation=attn_implementation)
    full_state = None
    if procs.main:
        real = load_model(model_cfg, dtype=precision.weights, path=path, attn_implementation=attn_implementation)
        if train_cfg.method != "full":
            real = _add_lora(real, train_cfg)
        full_state = real.state_dict()
    return prepare_model(skeleton, train_cfg, plan, procs=procs, full_state=full_state)


def prepare_model(model: Any, train_cfg: TrainConfig, plan: TrainPlan, *, procs: Processes | None = None,
                  full_state: dict[str, torch.Tensor] | None = None, pinned: PinnedPool | None = None) -> Any:
    """The one build order, on a loaded base (benchmarks build random-weight bases themselves) or, with several
    ``procs``, on a skeleton whose weights (``full_state``, the main process's) arrive once it is sharded:
    adapters → dropout → FP8 base (LoRA) or FP8 products (full) → checkpointing and offload → shard → compile, each
    as ``plan`` decided. ``pinned``: the pool offloaded activations are copied into (``plan.pinned``'s slots,
    allocated by the caller)."""
    model.config.use_cache = False
    if train_cfg.method != "full":
        # first: the adapters are modules inside the decoder layers that checkpointing, FSDP2 and compile wrap
        model = _add_lora(model, train_cfg)
        if plan.fused_dropout:
            # each adapter draws its dropout in its first product: no mask kept for backward (adapter_dropout.py)
            fuse_adapter_dropout(model)
        if plan.fp8_base:
            # after PEFT wrapped the layers (their base_layer is what becomes FP8), before compile traces them
            quantize_frozen_base(model)
    if plan.fp8_matmuls:
        # full fine-tuning: the blocks' linear layers multiply in FP8 (the same parameters); before compile traces
        # them, and inside the layers that checkpointing re-runs
        to_fp8_training(model)
    # None: every layer, where the plan could not count them (a config without num_hidden_layers)
    layers = decoder_layer_count(model) if plan.checkpointed_layers is None else plan.checkpointed_layers
    if layers + plan.offloaded_layers > 0:
        set_checkpointing(model, layers, plan.offload_checkpoints, plan.offloaded_layers, pool=pinned)
        if train_cfg.method == "qlora":
            # the guide's QLoRA gotcha: inputs of frozen 4-bit layers must carry grad for checkpointed blocks
            model.enable_input_require_grads()
    if procs is not None and procs.distributed:
        # FSDP2 wraps the layers as they will run: adapters in place, trainable flags and checkpointing set
        shard(model, procs, train_cfg.method, plan.precision.autocast, plan.sharding == "replicate",
              plan.reshard_after_forward)
        materialize(model, procs, full_state)
    if plan.compile_layers:
        # last: checkpointing stays outside the compiled region and re-runs the compiled layer in backward; under
        # FSDP2, compiled after sharding, as measured (bench/results/scale_out.md)
        compile_decoder_layers(model)
    return model


def embeddings_to(model: Any, device: torch.device | str) -> torch.device:
    """Move the model's input-embedding module (frozen in LoRA/QLoRA) to ``device`` and say where it was: "cpu"
    keeps it in CPU memory, where ``loss_sum`` looks tokens up (the plan's ``embeddings_on_cpu``)."""
    base = base_model(model)
    embeddings = base.get_input_embeddings()
    was = embeddings.weight.device
    embeddings.to(device)
    return was


@contextmanager
def embeddings_on(model: Any, device: torch.device) -> Iterator[None]:
    """The input embeddings on ``device`` inside the block (generation looks tokens up there), back after."""
    was = embeddings_to(model, device)
    try:
        yield
    finally:
        embeddings_to(model, was)


def compile_decoder_layers(model: Any) -> None:
    """torch.compile each decoder layer (not the whole model: one small graph that all layers share, compiled once
    with dynamic sequence length, so packed rows of any length reuse it). Checkpointing stays outside the compiled
    region and re-runs the compiled layer in backward."""
    for block in _decoder_layers(model):
        block.compile(dynamic=True)


def decoder_layer_count(model: Any) -> int:
    return len(_decoder_layers(model))


def set_checkpointing(model: Any, layers: int, offload: bool | Literal["synchronous"] = False,
                      offloaded_layers: int = 0, pool: PinnedPool | None = None) -> ActivationOffloader | None:
    """Recompute the activations of ``layers`` decoder layers in backward, move ``offloaded_layers`` layers'
    activations to CPU memory and back, keep the others' in GPU memory.

    A layer kept costs ~tokens × (its activations) of memory and saves its forward recomputation (about a third of
    its training FLOPs), so on a large GPU the best policy is "as many un-checkpointed layers as fit". The layers
    recomputed or offloaded are the first ones (backward frees the kept last layers before it needs any other),
    the offloaded ones spread evenly among them so that their copies overlap the neighbours' compute. Uses
    transformers' own per-layer switch (``GradientCheckpointingLayer.gradient_checkpointing``) and its per-layer
    function. ``offload``: the checkpointed layers' inputs wait for backward in CPU memory too
    (src/tunesmith/train/offload.py); the offloader is returned. ``synchronous``: torch's ``save_on_cpu`` for the
    checkpointed inputs instead (the benchmark's control arm; what transformers ≥ 5.2x does with offload=True).
    ``pool``: the offloader's pinned memory, allocated up front (src/tunesmith/train/pinned.py).
    """
    blocks = _decoder_layers(model)
    if layers + offloaded_layers > len(blocks) or min(layers, offloaded_layers) < 0:
        raise ValueError(f"{layers} checkpointed + {offloaded_layers} offloaded layers: the model has {len(blocks)}")
    if layers + offloaded_layers == 0:
        disable_checkpointing(model)
        return None
    enable_checkpointing(model)
    offloader = ActivationOffloader(pool) if offload is True or offloaded_layers else None
    recompute = offloaded_checkpoint(offloader) if offload is True else None
    if offload == "synchronous":
        recompute = synchronous_offloaded_checkpoint()
    spread = offloaded_positions(layers + offloaded_layers, offloaded_layers)
    for i, block in enumerate(blocks):
        block.gradient_checkpointing = i < layers + offloaded_layers
        if i in spread:
            block._gradient_checkpointing_func = offloaded_layer(offloader, block)
        elif recompute is not None and i < layers + offloaded_layers:
            block._gradient_checkpointing_func = recompute
    return offloader


def offloaded_positions(layers: int, offloaded: int) -> set[int]:
    """Which of the first ``layers`` layers are offloaded whole: ``offloaded`` of them, evenly spaced."""
    return {int((j + 0.5) * layers / offloaded) for j in range(offloaded)} if offloaded else set()


def _decoder_layers(model: Any) -> list[Any]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) — 4-bit weights counted as their logical (unpacked) size, as PEFT prints them."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "quant_state") and getattr(p, "quant_state", None) is not None:
            n *= 2  # two 4-bit values per stored byte
        total += n
        if p.requires_grad:
            trainable += n
    # an FP8 base's weights are buffers (never trained, never saved with the adapter): still the model's weights
    total += sum(b.numel() for b in model.buffers() if b.dtype == FP8)
    return trainable, total


def _bnb_config(cfg: TrainConfig, precision: Precision) -> Any:
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise UserError("train.method: qlora needs bitsandbytes, which is not installed",
                        hint="pip install 'tunesmith[qlora]' (or bitsandbytes), or use method: lora") from None
    compute = {"auto": precision.autocast or torch.float32, "bfloat16": torch.bfloat16,
               "float16": torch.float16, "float32": torch.float32}[cfg.quant.compute_dtype]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant.quant_type,
                              bnb_4bit_use_double_quant=cfg.quant.double_quant, bnb_4bit_compute_dtype=compute)


def _add_lora(model: Any, cfg: TrainConfig) -> Any:
    from peft import LoraConfig, TaskType, get_peft_model

    lora = cfg.lora
    targets = lora.target_modules
    peft_cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          bias=lora.bias, target_modules=targets, use_rslora=lora.use_rslora)
    try:
        # adapters start from train.seed whatever ran before (so every process, and a rebuilt model, agree)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return get_peft_model(model, peft_cfg)
    except ValueError as exc:
        if "not found" not in str(exc) and "Target module" not in str(exc):
            raise
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(f"train.lora.target_modules: {targets} not found in this model",
                        hint=f"its linear layers are named: {', '.join(names)} (or use all-linear)") from None
