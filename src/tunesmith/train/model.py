"""Build the model to train: full weights, LoRA on a frozen base, or LoRA on a 4-bit NF4 base (QLoRA)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..compat import disable_checkpointing, enable_checkpointing
from ..config import ModelConfig, TrainConfig
from ..errors import UserError
from ..models import base_model, load_model, model_skeleton
from .adapter_dropout import fuse_adapter_dropout, fused_dropout_for
from .distributed import Processes, materialize, shard
from .offload import ActivationOffloader, offloaded_checkpoint, offloaded_layer, synchronous_offloaded_checkpoint


@dataclass(frozen=True)
class Precision:
    """Resolved numerics: the dtype weights are stored in and the autocast dtype (None = no autocast)."""

    weights: torch.dtype
    autocast: torch.dtype | None

    @property
    def name(self) -> str:
        return "bf16" if self.autocast == torch.bfloat16 else "fp16" if self.autocast == torch.float16 else "fp32"


def resolve_precision(choice: str, method: str, device: torch.device) -> Precision:
    """``auto``: bf16 autocast where the GPU has it, else fp32. Full fine-tuning keeps fp32 master weights (an
    optimizer update smaller than bf16's resolution would otherwise be lost); LoRA/QLoRA keep the frozen base in the
    autocast dtype and the adapters in fp32 (PEFT's default)."""
    has_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if choice == "auto":
        choice = "bf16" if has_bf16 else "fp32"
    if choice == "bf16" and device.type == "cuda" and not has_bf16:
        raise UserError("train.precision: bf16 is not supported by this GPU", hint="use fp16 or fp32, or auto")
    if choice == "bf16" and device.type != "cuda":
        raise UserError("train.precision: bf16 training needs a CUDA GPU here", hint="use precision: auto or fp32")
    if choice == "fp16" and device.type != "cuda":
        raise UserError("train.precision: fp16 needs a CUDA GPU", hint="use precision: auto or fp32")
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[choice]
    if method == "full" or autocast is None:
        return Precision(torch.float32, autocast)
    return Precision(autocast, autocast)


def build_model(model_cfg: ModelConfig, train_cfg: TrainConfig, device: torch.device, precision: Precision,
                attn_implementation: str | None, path: str, checkpointed_layers: int | None = None,
                offload_checkpoints: bool = False, offloaded_layers: int = 0) -> Any:
    """Load the base and make exactly the intended parameters trainable."""
    method = train_cfg.method
    quant = _bnb_config(train_cfg, precision) if method == "qlora" else None
    model = load_model(model_cfg, dtype=precision.weights, quantization=quant,
                       device_map={"": device.index or 0} if (quant is not None and device.type == "cuda") else None,
                       path=path, attn_implementation=attn_implementation)
    if quant is None:
        model.to(device)
    return prepare_model(model, train_cfg, device, checkpointed_layers, offload_checkpoints=offload_checkpoints,
                         offloaded_layers=offloaded_layers)


def build_sharded_model(model_cfg: ModelConfig, train_cfg: TrainConfig, procs: Processes, precision: Precision,
                        attn_implementation: str | None, path: str, checkpointed_layers: int | None = None,
                        replicate: bool = False, reshard_after_forward: bool = True) -> Any:
    """FSDP2: every process builds the model without memory (parameters on the meta device), shards it, then
    receives its shards from the main process — the only one that reads the weights (one CPU copy in all, not one
    per GPU: a 70B model loads on a node whose GPUs could not each hold it)."""
    skeleton = model_skeleton(model_cfg, dtype=precision.weights, path=path, attn_implementation=attn_implementation)
    # PEFT's own adapter dropout: the fused kernel (adapter_dropout.py) is not measured under FSDP2
    model = prepare_model(skeleton, train_cfg, procs.device, checkpointed_layers, compile_layers=False,
                          fused_dropout=False)
    full_state = None
    if procs.main:
        real = load_model(model_cfg, dtype=precision.weights, path=path, attn_implementation=attn_implementation)
        if train_cfg.method != "full":
            real = _add_lora(real, train_cfg)
        full_state = real.state_dict()
    shard(model, procs, train_cfg.method, precision.autocast, replicate, reshard_after_forward)
    materialize(model, procs, full_state)
    if _compiling(train_cfg, procs.device):
        compile_decoder_layers(model)  # after sharding, as measured (bench/results/scale_out.md)
    return model


def prepare_model(model: Any, train_cfg: TrainConfig, device: torch.device,
                  checkpointed_layers: int | None = None, compile_layers: bool | None = None,
                  offload_checkpoints: bool = False, fused_dropout: bool = True, offloaded_layers: int = 0) -> Any:
    """Adapters and checkpointing on an already loaded base (benchmarks build random-weight bases themselves).
    ``checkpointed_layers``: how many decoder layers recompute their activations (the plan's choice); None: all or
    none, as ``train.gradient_checkpointing`` says. ``offload_checkpoints``: their inputs wait in CPU memory.
    ``offloaded_layers``: more layers, neither recomputed nor kept, whose saved activations wait in CPU memory.
    ``fused_dropout``: on CUDA, LoRA adapters draw their input dropout inside their first product (adapter_dropout.py).
    """
    model.config.use_cache = False
    if train_cfg.method != "full":
        model = _add_lora(model, train_cfg)
        if fused_dropout and fused_dropout_for(train_cfg.method, device):
            fuse_adapter_dropout(model)
    if checkpointed_layers is None:
        checkpointed_layers = decoder_layer_count(model) if checkpointing_on(train_cfg, device) else 0
    if checkpointed_layers + offloaded_layers > 0:
        set_checkpointing(model, checkpointed_layers, offload_checkpoints, offloaded_layers)
        if train_cfg.method == "qlora":
            # the guide's QLoRA gotcha: inputs of frozen 4-bit layers must carry grad for checkpointed blocks
            model.enable_input_require_grads()
    if _compiling(train_cfg, device) if compile_layers is None else compile_layers:
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
                      offloaded_layers: int = 0) -> ActivationOffloader | None:
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
    """
    blocks = _decoder_layers(model)
    if layers + offloaded_layers > len(blocks) or min(layers, offloaded_layers) < 0:
        raise ValueError(f"{layers} checkpointed + {offloaded_layers} offloaded layers: the model has {len(blocks)}")
    if layers + offloaded_layers == 0:
        disable_checkpointing(model)
        return None
    enable_checkpointing(model)
    offloader = ActivationOffloader() if offload is True or offloaded_layers else None
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
    return trainable, total


def checkpointing_on(cfg: TrainConfig, device: torch.device) -> bool:
    """All-or-nothing checkpointing where no layer count is planned: ``auto`` = on for qlora and on GPUs."""
    if cfg.gradient_checkpointing == "auto":
        return cfg.method == "qlora" or device.type == "cuda"
    return bool(cfg.gradient_checkpointing)


def _compiling(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.compile == "auto":
        # measured on H200s for every method, one GPU and FSDP2 (bench/results/fast_engine.md, scale_out.md)
        return device.type == "cuda"
    return bool(cfg.compile)


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
