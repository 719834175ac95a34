"""Numerics and memory of a run, chosen from the memory model (src/tunesmith/hardware/memory.py) before any weight
is loaded, and reported in run.json and on the console — never a silent fall-back.

``plan_training`` is a pure function of the model's config, the train config, the machine's facts (``Hardware``,
measured once by src/tunesmith/train/measure.py or taken from the GPU catalogue) and the process count: it asks no
GPU and imports nothing to find out. ``tunesmith train`` builds the model and runs the loop as it says, and
``tunesmith advise`` asks it which optimizer full fine-tuning gets.

The ``auto`` choices made here:

- ``train.precision: auto`` — bf16 autocast where the GPU has it, else fp32 (``_precision``); full fine-tuning keeps
  fp32 master weights unless its optimizer trains bf16 weights.
- ``train.optim: auto`` — full fine-tuning keeps fp32 master weights and fp32 AdamW states when they fit on the
  GPU (16 bytes per parameter with the gradients); else, on one GPU, bf16 weights rounded stochastically with 8-bit
  states and fp32 update maths (torchao, 6 bytes per parameter; measured faster than the next choice), or fp32
  master weights with 8-bit states (bitsandbytes, 10 bytes) where torchao or bf16 is missing. LoRA and QLoRA always
  use fp32 AdamW (their trainable parameters are few).
- ``train.gradient_checkpointing: auto`` on a GPU — checkpoint only as many decoder layers as needed for the step to
  fit in ``train.memory_limit_gb`` (default: the GPU's free memory): each layer kept saves its forward recomputation
  (about a quarter of its training FLOPs), each layer checkpointed saves its activations. QLoRA, chosen to save
  memory, checkpoints every layer unless a limit is given. On the CPU nothing is checkpointed.
- ``train.embeddings_on_cpu: auto`` — LoRA/QLoRA on one GPU whose step does not fit the budget: the frozen input
  embeddings move to CPU memory (1 GiB for a 128K vocabulary), and the checkpointing choice is made again with it.
- ``train.offload_checkpoints: auto`` — one GPU whose layers must be checkpointed to fit the budget: their inputs
  wait for backward in CPU memory (all but the three in flight), and the checkpointing choice is made again with it.
- ``train.offload_layers: auto`` — of those layers, LoRA with compiled layers offloads some whole instead of
  recomputing them: as many as the GPU→CPU link can copy while forward runs (``_choose_offloaded_layers``).
- ``train.compile: auto`` — on a GPU; LoRA on one GPU draws the adapters' dropout in the fused kernel.
- pinned CPU memory — whatever the step keeps in CPU memory (offloaded inputs and layers, embedding rows) is sized
  here (src/tunesmith/train/pinned.py ``pinned_sizes``) and allocated once before the first step; a plan whose
  pinned memory exceeds PINNED_HOST_SHARE of the CPU memory available is refused.
- ``train.base_precision: auto`` — the frozen base computes in the run's precision. ``fp8`` (LoRA on one GPU with
  FP8 tensor cores, bf16 precision): the decoder blocks' linear layers stored and multiplied in FP8
  (src/tunesmith/train/fp8.py), 1 byte per weight in the memory model, so fewer layers need checkpointing.
- ``train.matmul_precision: auto`` — products in the run's precision. ``fp8`` (full fine-tuning on one GPU with
  FP8 tensor cores, bf16 precision, torchao): the decoder blocks' linear layers multiply in FP8
  (src/tunesmith/train/fp8_training.py); the weights and optimizer are as ``train.optim`` resolves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from ..config import TrainConfig
from ..errors import UserError
from ..hardware.machine import Hardware
from ..hardware.memory import (
    ALLOCATOR_SLACK,
    CUDA_CONTEXT_GIB,
    Architecture,
    MemoryEstimate,
    architecture_from_config,
    estimate_memory,
    lora_trainable_params,
)
from .adapter_dropout import fusable
from .batching import packs, row_budget
from .pinned import PinnedSizes, pinned_sizes

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

OPTIMIZER_MEMORY = {"adamw_torch": ("adamw", "mixed"), "adamw_8bit": ("adamw_8bit", "mixed"),
                    "adamw_8bit_bf16": ("adamw_8bit", "bf16")}
"""Each optimizer's terms in the memory model: its states, and full fine-tuning's weights and gradients (``mixed``:
fp32 master weights and gradients with a bf16 autocast copy; ``bf16``: bf16 weights and gradients, no copy)."""

STOCHASTIC_BF16 = "bf16, rounded stochastically"

OFFLOAD_IN_FLIGHT = 3
"""Checkpointed inputs on the GPU at once with offload_checkpoints: the one being copied and the two prefetched
(offload.PREFETCH_GROUPS)."""

FORWARD_PEAK_SHARE = 0.6
"""Share of the GPU's datasheet bf16 peak a compiled LoRA forward runs at: 8B layers at 12K-token rows on an H200
ran ~580 TFLOP/s of hardware work (bench/results/fast_engine.md), 0.59 of 989."""

OFFLOAD_LINK_SHARE = 0.9
"""Share of the forward's GPU→CPU copy time layers offloaded whole may fill. Fitted on one H200 (call 16 in
bench/results/fast_engine.md: 8B LoRA at 12,288-token rows, link 54.6 GB/s, 1.57 GiB layers): 6, 8, 10 and 12
offloaded layers ran 11,278, 11,525, 11,157 and 10,651 tokens/s; 0.9 gives 8 (the link's whole forward time: 9.4)."""

PINNED_HOST_SHARE = 0.8
"""Share of the CPU memory available when the run starts that its pinned memory may take: page-locked memory cannot
be swapped, and the process needs the rest (the dataset, the frozen embeddings when they move there)."""

HEADROOM = 0.92
"""Share of the budget the estimate may fill: the memory model's blind error on GPUs was within +25%/-5%, and
the allocator needs slack for fragmentation."""


@dataclass(frozen=True)
class Precision:
    """Resolved numerics: the dtype weights are stored in and the autocast dtype (None = no autocast)."""

    weights: torch.dtype
    autocast: torch.dtype | None

    @property
    def name(self) -> str:
        return "bf16" if self.autocast == torch.bfloat16 else "fp16" if self.autocast == torch.float16 else "fp32"


@dataclass(frozen=True)
class TrainPlan:
    optimizer: str                 # adamw_torch | adamw_8bit | adamw_8bit_bf16 — what the loop builds
    master_weights: str            # fp32 | bf16 | STOCHASTIC_BF16 (adapters: fp32) — what the optimizer updates
    precision: Precision           # the dtypes the model is built and run in
    checkpointed_layers: int | None  # decoder layers recomputed in backward; None: all (layer count unknown here)
    layers: int
    sharding: str | None           # several processes: shard | replicate; one process: None
    reshard_after_forward: bool    # FSDP2: free gathered weights after each layer's forward (gather again in backward)
    budget_gib: float | None
    estimate_gib: float | None
    reason: str
    embeddings_on_cpu: bool = False  # frozen input embeddings looked up in CPU memory
    offload_checkpoints: bool = False  # checkpointed layers' inputs kept in CPU memory until backward
    offloaded_layers: int = 0  # layers neither recomputed nor kept: their saved activations in CPU memory
    fused_dropout: bool = False  # LoRA adapters draw their input dropout in the fused kernel (adapter_dropout.py)
    compile_layers: bool = False  # each decoder layer compiled with torch.compile
    fp8_base: bool = False  # the frozen base's decoder-block linear layers stored and multiplied in FP8 (fp8.py)
    pinned: PinnedSizes | None = None  # CPU memory for what the step keeps there, allocated before step 1 (pinned.py)
    fp8_matmuls: bool = False  # full fine-tuning: the decoder-block linear layers multiply in FP8 (fp8_training.py)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "precision": self.precision.name}


def plan_training(model_config: Any, tcfg: TrainConfig, *, hardware: Hardware, world: int) -> TrainPlan:
    """Resolve ``precision``, ``optim``, ``gradient_checkpointing``, the offloading, the sharding and ``compile``
    for this model, config, machine and process count — from these arguments alone."""
    precision = _precision(tcfg.precision, tcfg.method, hardware)
    fp8_base = _fp8_base(tcfg, hardware, world, precision)
    fp8_matmuls = _fp8_matmuls(tcfg, hardware, world, precision)
    layers = int(getattr(model_config, "num_hidden_layers", 0) or 0)
    _check_configured_optimizer(tcfg, hardware, world)
    compiled = _compiles(tcfg, hardware)
    fused_dropout = _fused_dropout(tcfg, hardware, world)
    budget = _budget_gib(tcfg, hardware)
    arch = _architecture(model_config)
    if arch is None or budget is None:  # CPU, or an architecture the memory model does not know
        optimizer = "adamw_torch" if tcfg.optim == "auto" else tcfg.optim
        # layers unknown (a config without num_hidden_layers): None lets the model count its own blocks
        ckpt = (layers or None) if checkpointing_on(tcfg, hardware) else 0
        sharding = None if world == 1 else ("replicate" if tcfg.sharding == "replicate" else "shard")
        offload = tcfg.offload_checkpoints is True and _offload_checkpoints(tcfg, world, 1 if ckpt is None else ckpt)
        offloaded = 0
        if tcfg.offload_layers != "auto" and ckpt is not None:
            offloaded = _configured_offloaded_layers(tcfg, world, ckpt)[0]
            ckpt -= offloaded
        return TrainPlan(optimizer, _master_weights(tcfg, precision, optimizer), _weights_for(optimizer, precision),
                         ckpt, layers, sharding, sharding != "replicate", budget, None,
                         "no GPU memory to plan for" if budget is None else "architecture not in the memory model",
                         offload_checkpoints=offload, offloaded_layers=offloaded, fused_dropout=fused_dropout,
                         compile_layers=compiled, fp8_base=fp8_base, fp8_matmuls=fp8_matmuls)

    tokens = row_budget(row_tokens=tcfg.packed_row_tokens, batch_size=tcfg.per_device_train_batch_size,
                        max_length=tcfg.max_length, packed=packs(tcfg.packing, hardware.device),
                        pairs=tcfg.objective == "dpo")
    step = _Step(arch, model_config, tcfg, tokens, world, 1, budget, layers, _head(hardware),
                 _dropout_mask_bytes(tcfg, fused_dropout), compiled, fp8_base, fp8_matmuls)
    sharding, shard_why = _choose_sharding(step)
    step = replace(step, shards=world if sharding == "shard" else 1)
    optimizer, why = _choose_optimizer(step, hardware)
    copy_gib = _fsdp_copies_gib(step, sharding)
    ckpt, estimate, ckpt_why = _choose_checkpointing(step, optimizer, extra_gib=copy_gib)
    on_cpu = _embeddings_on_cpu(step, estimate > budget)
    if on_cpu:
        freed = _embedding_gib(model_config)
        copy_gib -= freed
        ckpt, estimate, ckpt_why = _choose_checkpointing(step, optimizer, extra_gib=copy_gib)
        ckpt_why += f"; frozen input embeddings in CPU memory (-{freed:.2f} GiB)"
    offload = False
    if _offload_checkpoints(tcfg, world, ckpt):
        moved = _choose_checkpointing(step, optimizer, extra_gib=copy_gib, offload=True)
        # auto: only if it buys something — fewer layers recomputed, or a step that did not fit
        if tcfg.offload_checkpoints is True or moved[0] < ckpt or estimate > budget:
            ckpt, estimate, ckpt_why = moved
            offload = ckpt > 0
            ckpt_why += "; checkpointed layers' inputs in CPU memory" if offload else ""
    offloaded = 0
    if tcfg.offload_layers != 0 and (ckpt or tcfg.offload_layers != "auto"):  # a count asked for is checked
        offloaded, why_offloaded = _choose_offloaded_layers(step, hardware, checkpointed=ckpt,
                                                            inputs_offloaded=offload,
                                                            layer_gib=_memory(step, "full", optimizer).layer_gib)
        if offloaded:
            # the offloaded layers' activations come back one layer ahead of their backward: while a neighbour
            # recomputes, one of them is on the GPU besides (measured: below the loss-time peak with 2 kept layers)
            with_them = _choose_checkpointing(step, optimizer, extra_gib=copy_gib, offload=offload, fixed=ckpt,
                                              offloaded=True)[1]
            if with_them > budget and tcfg.offload_layers == "auto":
                offloaded, why_offloaded = 0, "no layers offloaded whole (one arriving would not fit)"
            else:
                estimate = with_them
        ckpt -= offloaded
        ckpt_why += f"; {why_offloaded}"
    reshard, reshard_why = True, ""
    if sharding is not None:
        # keeping every layer's gathered weights (compute dtype) from forward to backward saves one gather per
        # micro-batch; only when the step is not already short of memory
        gathered = arch.total_params * 2 if sharding == "shard" else 0.0
        # measured on two H200s: at 121 of 139 GiB the allocator's churn cost more than the saved gathers
        reshard = sharding == "shard" and not (ckpt == 0 and estimate + gathered / 2**30 <= 0.8 * budget)
        if not reshard:
            estimate += gathered / 2**30
        reshard_why = f"; {sharding}" + ("" if sharding == "replicate" or reshard else
                                         ", gathered weights kept from forward to backward") + shard_why
    weights = _weights_for(optimizer, precision)
    pinned = pinned_sizes(hidden_size=arch.hidden_size, head_dim=arch.head_dim, tokens=tokens,
                          element_bytes=weights.weights.itemsize, checkpointed_inputs=ckpt if offload else 0,
                          offloaded_layers=offloaded, embedding_rows=on_cpu,
                          layer_bytes=_memory(step, "full", optimizer).layer_gib * 2**30 if offloaded else 0.0)
    _check_host_memory(pinned, hardware)
    return TrainPlan(optimizer, _master_weights(tcfg, precision, optimizer), weights,
                     ckpt, layers, sharding, reshard, round(budget, 1), round(estimate, 1),
                     f"{why}; {ckpt_why}{reshard_why}", on_cpu, offload, offloaded, fused_dropout, compiled, fp8_base,
                     pinned, fp8_matmuls=fp8_matmuls)


def planned_peak_gib(model_config: Any, tcfg: TrainConfig, *, hardware: Hardware, optimizer: str,
                     checkpointed: int) -> float:
    """The plan's estimated peak (GiB, overheads included) of a one-GPU run with ``optimizer`` and the first
    ``checkpointed`` decoder layers recomputed — what a benchmark that fixes them runs, or a test compares with a
    measured peak. No offloading; the rest as ``plan_training`` resolves it."""
    precision = _precision(tcfg.precision, tcfg.method, hardware)
    arch, budget = _architecture(model_config), _budget_gib(tcfg, hardware)
    if arch is None or budget is None:
        raise ValueError("no memory model here: the CPU, or an architecture the memory model does not know")
    fused_dropout = _fused_dropout(tcfg, hardware, 1)
    tokens = row_budget(row_tokens=tcfg.packed_row_tokens, batch_size=tcfg.per_device_train_batch_size,
                        max_length=tcfg.max_length, packed=packs(tcfg.packing, hardware.device),
                        pairs=tcfg.objective == "dpo")
    step = _Step(arch, model_config, tcfg, tokens, 1, 1, budget, arch.num_layers, _head(hardware),
                 _dropout_mask_bytes(tcfg, fused_dropout), _compiles(tcfg, hardware),
                 _fp8_base(tcfg, hardware, 1, precision), _fp8_matmuls(tcfg, hardware, 1, precision))
    return round(_choose_checkpointing(step, optimizer, fixed=checkpointed)[1], 1)


def needs_host_link(tcfg: TrainConfig, world: int) -> bool:
    """Whether the plan may spend the GPU→CPU link's rate (``Hardware.host_link_bytes_per_s``): LoRA on one GPU with
    compiled layers and ``train.offload_layers: auto`` — where offloading layers whole was measured. Elsewhere the
    rate is not measured (a copy of 256 MiB, three times)."""
    return tcfg.offload_layers == "auto" and world == 1 and tcfg.method == "lora" and tcfg.compile is not False


def checkpointing_on(tcfg: TrainConfig, hardware: Hardware) -> bool:
    """All-or-nothing checkpointing where no layer count is planned: ``auto`` = on for qlora and on GPUs."""
    if tcfg.gradient_checkpointing == "auto":
        return tcfg.method == "qlora" or hardware.device == "cuda"
    return bool(tcfg.gradient_checkpointing)


def describe(plan: TrainPlan) -> str:
    ckpt = "all layers" if plan.checkpointed_layers is None or plan.checkpointed_layers >= plan.layers else \
        f"{plan.checkpointed_layers} of {plan.layers} layers"
    if plan.checkpointed_layers == 0:
        ckpt = "none"
    est = f", estimated peak {plan.estimate_gib:.1f} of {plan.budget_gib:.1f} GiB" if plan.estimate_gib else ""
    cpu = ", input embeddings in CPU memory" if plan.embeddings_on_cpu else ""
    if plan.offload_checkpoints:
        ckpt += " (inputs in CPU memory)"
    if plan.offloaded_layers:
        ckpt += f", {plan.offloaded_layers} layers offloaded whole to CPU memory"
    pinned = f", {plan.pinned.describe()}" if plan.pinned else ""
    fp8 = ", decoder-block products in FP8" if plan.fp8_matmuls else ""
    return (f"optimizer {plan.optimizer}, master weights {plan.master_weights}{fp8}, checkpointing {ckpt}{cpu}"
            f"{est}{pinned}")


# --- choices -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    """What every memory estimate of one run shares: the model, the config, a micro-batch's tokens, the processes
    and how many of them share the weights, the budget, and how the step's loss and adapters run."""

    arch: Architecture
    model_config: Any
    tcfg: TrainConfig
    tokens: int
    world: int
    shards: int             # 1 when each GPU holds the whole model (one process, or replicated)
    budget: float
    layers: int
    head: str               # the memory model's logits policy: "fused" (Liger's kernel) or "chunked"
    mask_bytes: int         # see ``_dropout_mask_bytes``
    compiled: bool
    fp8_base: bool = False  # the frozen base in FP8 (1 byte per decoder-block weight)
    fp8_matmuls: bool = False  # full fine-tuning's decoder-block products in FP8 (torchao's float8 training)


def _precision(choice: str, method: str, hardware: Hardware) -> Precision:
    """``auto``: bf16 autocast where the GPU has it, else fp32. Full fine-tuning keeps fp32 master weights (an
    optimizer update smaller than bf16's resolution would otherwise be lost); LoRA/QLoRA keep the frozen base in the
    autocast dtype and the adapters in fp32 (PEFT's default)."""
    gpu = hardware.device == "cuda"
    has_bf16 = gpu and hardware.bf16
    if choice == "auto":
        choice = "bf16" if has_bf16 else "fp32"
    if choice == "bf16" and gpu and not has_bf16:
        raise UserError("train.precision: bf16 is not supported by this GPU", hint="use fp16 or fp32, or auto")
    if choice == "bf16" and not gpu:
        raise UserError("train.precision: bf16 training needs a CUDA GPU here", hint="use precision: auto or fp32")
    if choice == "fp16" and not gpu:
        raise UserError("train.precision: fp16 needs a CUDA GPU", hint="use precision: auto or fp32")
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[choice]
    if method == "full" or autocast is None:
        return Precision(torch.float32, autocast)
    return Precision(autocast, autocast)


def _weights_for(optimizer: str, precision: Precision) -> Precision:
    """The precision the model is built in: adamw_8bit_bf16 trains bf16 weights (no fp32 masters, no autocast
    copies); every other choice keeps ``precision``."""
    if optimizer == "adamw_8bit_bf16":
        return Precision(torch.bfloat16, torch.bfloat16)
    return precision


def _fp8_base(tcfg: TrainConfig, hardware: Hardware, world: int, precision: Precision) -> bool:
    """``train.base_precision: fp8`` where it can run (``_fp8_runs``; ``_scaled_mm``'s row-wise kernels write bf16).
    (Full fine-tuning and QLoRA are refused by the config itself.)"""
    if tcfg.base_precision != "fp8":
        return False
    _fp8_runs("base_precision", "the base computes in bf16 or fp32", "FSDP2 would shard the FP8 weights: not built",
              tcfg, hardware, world, precision)
    return True


def _fp8_matmuls(tcfg: TrainConfig, hardware: Hardware, world: int, precision: Precision) -> bool:
    """``train.matmul_precision: fp8`` where it can run (``_fp8_runs``) and torchao is installed (its float8
    training). (LoRA and QLoRA are refused by the config itself.)"""
    if tcfg.matmul_precision != "fp8":
        return False
    _fp8_runs("matmul_precision", "products in bf16 or fp32", "FP8 products under FSDP2 were not measured",
              tcfg, hardware, world, precision)
    if not hardware.torchao:
        raise UserError("train.matmul_precision: fp8 needs torchao (its float8 training)",
                        hint="pip install 'tunesmith[gpu]', or set train.matmul_precision: auto")
    return True


def _fp8_runs(setting: str, auto_means: str, why_one_gpu: str, tcfg: TrainConfig, hardware: Hardware, world: int,
              precision: Precision) -> None:
    """What every FP8 option needs, else one error before a weight loads: one CUDA GPU with FP8 tensor cores
    (compute capability 8.9+) and bf16 autocast around the FP8 products (they write bf16)."""
    if hardware.device != "cuda" or not hardware.fp8:
        where = "the CPU" if hardware.device != "cuda" else f"this GPU ({hardware.name})"
        raise UserError(f"train.{setting}: fp8 needs FP8 tensor cores (a CUDA GPU of compute capability 8.9 or "
                        f"later: L4, L40S, RTX 4090, H100, H200); {where} has none",
                        hint=f"set train.{setting}: auto ({auto_means})")
    if world > 1:
        raise UserError(f"train.{setting}: fp8 runs on one GPU ({why_one_gpu})",
                        hint=f"set train.{setting}: auto with several GPUs, or train on one")
    if precision.autocast != torch.bfloat16:
        raise UserError(f"train.{setting}: fp8 needs bf16 products around the FP8 ones; train.precision is "
                        f"{tcfg.precision} ({precision.name})", hint="set train.precision: auto or bf16")


def _compiles(tcfg: TrainConfig, hardware: Hardware) -> bool:
    if tcfg.compile == "auto":
        # measured on H200s for every method, one GPU and FSDP2 (bench/results/fast_engine.md, scale_out.md)
        return hardware.device == "cuda"
    return bool(tcfg.compile)


def _fused_dropout(tcfg: TrainConfig, hardware: Hardware, world: int) -> bool:
    """Whether the adapters draw their dropout in the fused kernel (src/tunesmith/train/adapter_dropout.py): LoRA in
    one process where the kernels run. QLoRA's measured configuration (bench/results/fast_engine.md, fifth run)
    keeps PEFT's dropout, its speed with the kernel not measured yet (bench/gpu_session.sh AB); FSDP2 runs keep it
    too (not measured there)."""
    return world == 1 and tcfg.method == "lora" and hardware.fused_dropout_kernel


def _choose_sharding(step: _Step) -> tuple[str | None, str]:
    tcfg = step.tcfg
    if step.world == 1:
        return None, ""
    if tcfg.sharding != "auto":
        return tcfg.sharding, " (as configured)"
    # replicated, each GPU holds what one GPU would (full fine-tuning: fp32 masters and AdamW states, unsharded)
    whole = _estimate(step, "full", "adamw_torch") + _fsdp_copies_gib(step, "replicate")
    if whole <= step.budget:
        return "replicate", f" (the whole run fits one GPU: {whole:.1f} GiB)"
    return "shard", f" (the whole run needs {whole:.0f} GiB on one GPU)"


def _check_configured_optimizer(tcfg: TrainConfig, hardware: Hardware, world: int) -> None:
    """An optimizer set in the config that cannot run here is one error before anything loads."""
    if tcfg.optim in ("adamw_8bit", "adamw_8bit_bf16") and world > 1:
        raise UserError(f"train.optim: {tcfg.optim} runs on one GPU only (not measured on FSDP2's sharded "
                        "parameters)", hint="use optim: auto or adamw_torch with several GPUs (the states are "
                                            "sharded, so fp32 AdamW fits where 8-bit was needed on one GPU)")
    missing = _stochastic_bf16_missing(hardware, tcfg) if tcfg.optim == "adamw_8bit_bf16" else None
    if missing:
        raise UserError(f"train.optim: adamw_8bit_bf16 {missing[0]}", hint=missing[1])


def _master_weights(tcfg: TrainConfig, precision: Precision, optimizer: str) -> str:
    """What the optimizer updates, as the plan reports it."""
    if optimizer == "adamw_8bit_bf16":
        return STOCHASTIC_BF16
    dtype = _DTYPE_NAMES.get(precision.weights, str(precision.weights))
    if tcfg.method != "full":
        frozen = "NF4" if tcfg.method == "qlora" else "FP8" if tcfg.base_precision == "fp8" else dtype
        return f"fp32 adapters on a frozen {frozen} base"
    return dtype


def _choose_optimizer(step: _Step, hardware: Hardware) -> tuple[str, str]:
    tcfg, budget, world = step.tcfg, step.budget, step.world
    if tcfg.optim != "auto":
        return tcfg.optim, f"optimizer {tcfg.optim} as configured"
    if tcfg.method != "full":
        return "adamw_torch", "fp32 AdamW for the adapters"
    fp32 = _estimate(step, "full", "adamw_torch")
    if fp32 <= budget:
        return "adamw_torch", f"fp32 AdamW fits ({fp32:.1f} GiB with every layer checkpointed)"
    if world > 1:
        raise UserError(f"full fine-tuning with fp32 AdamW needs ~{fp32:.0f} GiB per GPU on {world} GPUs; "
                        f"{budget:.0f} GiB is available", hint="use more GPUs, method: lora, or a smaller model")
    choice = "adamw_8bit" if _stochastic_bf16_missing(hardware, tcfg) else "adamw_8bit_bf16"
    eight = _estimate(step, "full", choice)
    if eight > budget:
        raise UserError(f"full fine-tuning needs ~{eight:.0f} GiB even with 8-bit AdamW; {budget:.0f} GiB is "
                        "available", hint="use method: lora or qlora, several GPUs (tunesmith train --gpus N), or a "
                                          "smaller model")
    if choice == "adamw_8bit_bf16":
        return choice, (f"fp32 AdamW needs ~{fp32:.0f} GiB > {budget:.0f}: bf16 weights rounded stochastically, "
                        f"8-bit AdamW states with fp32 update maths ({eight:.1f} GiB)")
    return choice, (f"fp32 AdamW needs ~{fp32:.0f} GiB > {budget:.0f}: 8-bit AdamW states with fp32 update maths "
                    f"on fp32 master weights ({eight:.1f} GiB; bf16 weights with stochastic rounding need a bf16 GPU "
                    "and torchao)")


def _stochastic_bf16_missing(hardware: Hardware, tcfg: TrainConfig) -> tuple[str, str] | None:
    """What adamw_8bit_bf16 lacks here (what, and the fix), or None: it needs bf16 weights — a CUDA GPU with bf16
    and train.precision auto or bf16 — and torchao."""
    if tcfg.precision not in ("auto", "bf16"):
        return (f"trains bf16 weights, but train.precision is {tcfg.precision}",
                "set train.precision: bf16 (or auto), or another optim")
    if hardware.device != "cuda" or not hardware.bf16:
        return "trains bf16 weights, which needs a CUDA GPU with bf16", "use optim: auto, adamw_torch or adamw_8bit"
    if not hardware.torchao:
        return "needs torchao", "pip install 'tunesmith[gpu]'"
    return None


def _choose_checkpointing(step: _Step, optimizer: str, *, extra_gib: float = 0.0, offload: bool = False,
                          fixed: int | None = None, offloaded: bool = False) -> tuple[int, float, str]:
    """How many layers (the first ones) not to keep for backward, the estimated peak, and why. ``extra_gib``: memory
    beyond the memory model's (FSDP2's gathered copies); ``offload``: checkpointed layers' inputs in CPU memory;
    ``fixed``: that many, only estimated; ``offloaded``: some of them are offloaded whole (one arrives during a
    neighbour's recompute)."""
    tcfg, layers, budget = step.tcfg, step.layers, step.budget
    full = _memory(step, "full", optimizer)
    none = _memory(step, "none", optimizer).total_gib + extra_gib
    # a kept layer holds its activations in place of its bf16 input; offloaded, a checkpointed layer's input leaves
    # the GPU, except the ones being copied out and back
    boundary = step.model_config.hidden_size * step.tokens * 2 / 2**30
    without_layers = full.peak_allocated_gib - full.head_and_transients_gib

    def peak(checkpointed: int) -> float:
        kept = layers - checkpointed
        moved = max(0, checkpointed - OFFLOAD_IN_FLIGHT) * boundary if offload else 0.0
        # the kept layers (the last ones) are alive from their forward to their backward, which comes before any
        # checkpointed layer's: the worst moment is either the loss with every kept layer alive, or a recomputation
        arriving = full.layer_gib if offloaded else 0.0
        worst = max(kept * full.layer_gib + full.head_gib, full.layer_backward_gib + arriving)
        allocated = without_layers - kept * boundary - moved + worst
        return allocated * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_GIB + extra_gib

    if fixed is not None:
        return fixed, peak(fixed), ""
    if tcfg.gradient_checkpointing != "auto":
        count = layers if tcfg.gradient_checkpointing else 0
        return count, peak(count) if count else none, "checkpointing as configured"
    if tcfg.method == "qlora" and tcfg.memory_limit_gb is None:
        return layers, peak(layers), ("QLoRA checkpoints every layer (set train.memory_limit_gb to trade memory "
                                      "for speed)")
    if none <= budget:
        return 0, none, "no checkpointing needed"
    if peak(layers) > budget or layers == 0:
        return layers, peak(layers), "every layer checkpointed (the step may not fit: see the estimate)"
    checkpointed = next(c for c in range(layers + 1) if peak(c) <= budget)
    kept = (f"{layers - checkpointed} layers kept un-checkpointed ({full.layer_gib:.2f} GiB each)"
            if checkpointed < layers else "every layer checkpointed")
    return checkpointed, peak(checkpointed), kept


def _choose_offloaded_layers(step: _Step, hardware: Hardware, *, checkpointed: int, inputs_offloaded: bool,
                             layer_gib: float) -> tuple[int, str]:
    """How many of the ``checkpointed`` layers to offload whole instead of recomputing, and why.

    auto: as many as the GPU→CPU link can copy in OFFLOAD_LINK_SHARE of the forward's time — the forward timed at
    FORWARD_PEAK_SHARE of the GPU's datasheet peak, the link's measured rate (``Hardware.host_link_bytes_per_s``), a
    layer's bytes from the memory model. Only where it was measured: LoRA on one GPU, compiled layers, inputs
    offloaded too."""
    tcfg = step.tcfg
    if tcfg.offload_layers != "auto":
        return _configured_offloaded_layers(tcfg, step.world, checkpointed)
    if not (needs_host_link(tcfg, step.world) and hardware.device == "cuda" and inputs_offloaded):
        return 0, "no layers offloaded whole (measured for LoRA on one GPU with compiled layers)"
    if hardware.bf16_tflops is None:
        return 0, f"no layers offloaded whole ({hardware.name} is not in the GPU catalogue; set train.offload_layers)"
    rate = hardware.host_link_bytes_per_s
    if rate is None:  # a catalogue GPU (tunesmith advise): nothing measured
        return 0, "no layers offloaded whole (the GPU→CPU link was not measured; set train.offload_layers)"
    # the decoder layers' forward: 2 FLOPs per token per weight of their linear layers
    forward_s = 2 * step.tokens * step.arch.quantizable_params / (hardware.bf16_tflops * 1e12 * FORWARD_PEAK_SHARE)
    count = min(checkpointed, int(OFFLOAD_LINK_SHARE * rate * forward_s / (layer_gib * 2**30)))
    return count, (f"{count} of them offloaded whole instead of recomputed (GPU→CPU link {rate / 1e9:.0f} GB/s; "
                   f"{layer_gib:.2f} GiB each)")


def _configured_offloaded_layers(tcfg: TrainConfig, world: int, checkpointed: int) -> tuple[int, str]:
    """``train.offload_layers`` given as a number: checked against what the plan leaves out of GPU memory."""
    if tcfg.offload_layers and world > 1:
        raise UserError("train.offload_layers runs on one GPU (not measured under FSDP2)",
                        hint="set train.offload_layers: auto (none with several GPUs)")
    if tcfg.offload_layers > checkpointed:
        raise UserError(f"train.offload_layers: {tcfg.offload_layers}, but the plan leaves only {checkpointed} "
                        "layers out of GPU memory (the others are kept)",
                        hint=f"set it to at most {checkpointed}, or auto")
    return tcfg.offload_layers, f"{tcfg.offload_layers} layers offloaded whole, as configured"


def _check_host_memory(pinned: PinnedSizes | None, hardware: Hardware) -> None:
    """The step's pinned CPU memory against what the machine has available (where measured): more than
    PINNED_HOST_SHARE of it is one error before anything loads — the offloading would fail mid-run otherwise."""
    have = hardware.host_memory_gib
    if pinned is None or have is None or pinned.total_gib <= PINNED_HOST_SHARE * have:
        return
    raise UserError(f"the plan keeps {pinned.total_gib:.1f} GiB of activations in pinned CPU memory "
                    f"({pinned.describe()}); this machine has {have:.1f} GiB of CPU memory available",
                    hint="free CPU memory, raise train.memory_limit_gb (less to offload), or set "
                         "train.offload_layers: 0 (layers offloaded whole take the most)")


def _offload_checkpoints(tcfg: TrainConfig, world: int, checkpointed: int) -> bool:
    if tcfg.offload_checkpoints is True and world > 1:
        raise UserError("train.offload_checkpoints: true runs on one GPU (not measured under FSDP2)",
                        hint="set train.offload_checkpoints: auto (off with several GPUs)")
    if tcfg.offload_checkpoints != "auto":
        return bool(tcfg.offload_checkpoints) and checkpointed > 0
    # only where the budget forced checkpointing (QLoRA without a limit checkpoints every layer by policy)
    budget_bound = tcfg.gradient_checkpointing == "auto" and not (tcfg.method == "qlora" and
                                                                  tcfg.memory_limit_gb is None)
    return world == 1 and checkpointed > 0 and budget_bound


def _fsdp_copies_gib(step: _Step, sharding: str | None) -> float:
    """Compute-dtype weights FSDP2 holds beyond the memory model's per-GPU share (src/tunesmith/train/distributed.py).
    Replicated full fine-tuning: every layer's gathered copy lives all step (measured +12 GiB on two H200s for 8B LoRA
    while its frozen weights still went through FSDP2); replicated LoRA leaves its frozen weights out of FSDP2, so
    nothing is copied. Sharded: the root's embeddings and head stay gathered from forward to backward (the loss
    reads the head)."""
    if sharding == "replicate":
        return step.arch.total_params * 2 / 2**30 if step.tcfg.method == "full" else 0.0
    if sharding == "shard":
        tied = getattr(step.model_config, "tie_word_embeddings", False)
        return (1 if tied else 2) * _embedding_gib(step.model_config)
    return 0.0


def _embedding_gib(model_config: Any) -> float:
    """One vocabulary × hidden matrix in bf16 (the input embeddings, or the output head)."""
    return model_config.vocab_size * model_config.hidden_size * 2 / 2**30


def _embeddings_on_cpu(step: _Step, short_of_memory: bool) -> bool:
    tcfg = step.tcfg
    possible = (tcfg.method != "full" and step.world == 1
                and not getattr(step.model_config, "tie_word_embeddings", False))
    if tcfg.embeddings_on_cpu == "auto":
        return possible and short_of_memory
    if tcfg.embeddings_on_cpu and not possible:
        raise UserError("train.embeddings_on_cpu: true needs method lora or qlora, one GPU, and input embeddings not "
                        "tied to the output head (they would then be trained or needed on the GPU)",
                        hint="set train.embeddings_on_cpu: auto")
    return bool(tcfg.embeddings_on_cpu)


# --- the memory model ----------------------------------------------------------------------------------------------


def _estimate(step: _Step, checkpointing: str, optimizer: str) -> float:
    """Peak GiB per GPU."""
    return _memory(step, checkpointing, optimizer).total_gib


def _memory(step: _Step, checkpointing: str, optimizer: str) -> MemoryEstimate:
    """The memory model's estimate (src/tunesmith/hardware/memory.py) for this run, its terms included;
    ``optimizer`` is one of OPTIMIZER_MEMORY's names."""
    tcfg = step.tcfg
    trainable, adapted = (0, 0)
    if tcfg.method != "full":
        trainable, adapted = lora_trainable_params(step.model_config, tcfg.lora.r, tcfg.lora.target_modules)
    return estimate_memory(step.arch, tcfg.method, 1, step.tokens, lora_r=tcfg.lora.r, lora_trainable=trainable,
                           adapted_in_features=adapted, lora_dropout=tcfg.lora.dropout, checkpointing=checkpointing,
                           logits=step.head, optimizer=OPTIMIZER_MEMORY[optimizer][0],
                           full_precision=OPTIMIZER_MEMORY[optimizer][1], shards=step.shards,
                           compiled=step.compiled, dropout_mask_bytes=step.mask_bytes, fp8_base=step.fp8_base,
                           fp8_matmuls=step.fp8_matmuls)


def _dropout_mask_bytes(tcfg: TrainConfig, fused_dropout: bool) -> int:
    """Bytes per adapted input feature the adapters' dropout keeps for backward: none where the fused kernel draws
    the mask (``_fused_dropout``), else PEFT's 1-byte mask. Measured on one H200 (bench/results/fast_engine.md,
    "Seventh run"): 8B LoRA, rows of 12,288 tokens, 2 layers kept: 18.92 GiB fused vs 20.03 GiB with PEFT's
    dropout."""
    return 0 if fused_dropout and fusable(tcfg.lora.r, tcfg.lora.dropout) else 1


def _head(hardware: Hardware) -> str:
    """How the loss meets the vocabulary: Liger's fused kernel where installed (tiles of logits; measured 20.0 GiB
    for an 8B LoRA step of 8K tokens against 20.4 estimated), else our PyTorch chunks — on one GPU and under FSDP2
    alike (src/tunesmith/train/loss.py). DPO's per-token log-probabilities take the same two paths
    (train/preference.py ``linear_logps``)."""
    return "fused" if hardware.fused_loss_kernel else "chunked"


def _architecture(model_config: Any) -> Architecture | None:
    try:
        return architecture_from_config(model_config)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _budget_gib(tcfg: TrainConfig, hardware: Hardware) -> float | None:
    if hardware.free_gib is None:  # the CPU: no GPU memory to plan for
        return None
    # what is free now (another process may share the GPU), not the card's size
    total = hardware.free_gib
    limit = min(total, tcfg.memory_limit_gb) if tcfg.memory_limit_gb else total
    return limit * HEADROOM
