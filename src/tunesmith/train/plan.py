"""Numerics and memory of a run, chosen from the memory model (src/tunesmith/hardware/memory.py) before any weight
is loaded, and reported in run.json and on the console — never a silent fall-back.

The ``auto`` choices made here:

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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..config import TrainConfig
from ..errors import UserError
from .model import Precision, checkpointing_on

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

HEADROOM = 0.92
"""Share of the budget the estimate may fill: the memory model's blind error on GPUs was within +25%/-5%, and
the allocator needs slack for fragmentation."""


@dataclass(frozen=True)
class TrainPlan:
    optimizer: str                 # adamw_torch | adamw_8bit | adamw_8bit_bf16
    master_weights: str            # fp32 | bf16 | STOCHASTIC_BF16 (adapters: fp32) — what the optimizer updates
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_training(model_config: Any, tcfg: TrainConfig, device: torch.device, world: int,
                  weights_dtype: torch.dtype, gpu_gib: float | None = None) -> TrainPlan:
    """Resolve ``optim`` and ``gradient_checkpointing`` for this model, micro-batch, GPU and process count.
    ``gpu_gib``: the GPU memory available (the device's free memory when None)."""
    layers = int(getattr(model_config, "num_hidden_layers", 0) or 0)
    _check_configured_optimizer(tcfg, device, world)
    budget = _budget_gib(tcfg, device, gpu_gib)
    arch = _architecture(model_config)
    if arch is None or budget is None:  # CPU, or an architecture the memory model does not know
        optimizer = "adamw_torch" if tcfg.optim == "auto" else tcfg.optim
        master = _master_weights(tcfg, weights_dtype, optimizer)
        # layers unknown (a config without num_hidden_layers): None lets the model count its own blocks
        ckpt = (layers or None) if checkpointing_on(tcfg, device) else 0
        sharding = None if world == 1 else ("replicate" if tcfg.sharding == "replicate" else "shard")
        offload = tcfg.offload_checkpoints is True and _offload_checkpoints(tcfg, world, 1 if ckpt is None else ckpt)
        offloaded = 0
        if tcfg.offload_layers != "auto" and ckpt is not None:
            offloaded = _configured_offloaded_layers(tcfg, world, ckpt)[0]
            ckpt -= offloaded
        return TrainPlan(optimizer, master, ckpt, layers, sharding, sharding != "replicate", budget, None,
                         "no GPU memory to plan for" if budget is None else "architecture not in the memory model",
                         offload_checkpoints=offload, offloaded_layers=offloaded)

    # a packed row's budget, or a padded micro-batch
    tokens = tcfg.packed_row_tokens or tcfg.per_device_train_batch_size * tcfg.max_length
    sharding, shard_why = _choose_sharding(arch, model_config, tcfg, tokens, world, budget)
    shards = world if sharding == "shard" else 1
    optimizer, why = _choose_optimizer(arch, model_config, tcfg, tokens, world, shards, budget, device)
    master = _master_weights(tcfg, weights_dtype, optimizer)
    copy_gib = _fsdp_copies_gib(arch, model_config, tcfg, sharding)
    masks = _dropout_mask_bytes(tcfg, device, world)
    ckpt, estimate, ckpt_why = _choose_checkpointing(arch, model_config, tcfg, tokens, shards, budget,
                                                     optimizer, layers, copy_gib, mask_bytes=masks)
    on_cpu = _embeddings_on_cpu(model_config, tcfg, world, estimate > budget)
    if on_cpu:
        freed = _embedding_gib(model_config)
        copy_gib -= freed
        ckpt, estimate, ckpt_why = _choose_checkpointing(arch, model_config, tcfg, tokens, shards, budget,
                                                         optimizer, layers, copy_gib, mask_bytes=masks)
        ckpt_why += f"; frozen input embeddings in CPU memory (-{freed:.2f} GiB)"
    offload = False
    if _offload_checkpoints(tcfg, world, ckpt):
        moved = _choose_checkpointing(arch, model_config, tcfg, tokens, shards, budget, optimizer, layers,
                                      copy_gib, offload=True, mask_bytes=masks)
        # auto: only if it buys something — fewer layers recomputed, or a step that did not fit
        if tcfg.offload_checkpoints is True or moved[0] < ckpt or estimate > budget:
            ckpt, estimate, ckpt_why = moved
            offload = ckpt > 0
            ckpt_why += "; checkpointed layers' inputs in CPU memory" if offload else ""
    offloaded = 0
    if tcfg.offload_layers != 0 and (ckpt or tcfg.offload_layers != "auto"):  # a count asked for is checked
        offloaded, why_offloaded = _choose_offloaded_layers(arch, tcfg, tokens, device, world, ckpt, offload,
                                                            _memory(arch, model_config, tcfg, tokens, shards,
                                                                    "full", optimizer, masks).layer_gib)
        if offloaded:
            # the offloaded layers' activations come back one layer ahead of their backward: while a neighbour
            # recomputes, one of them is on the GPU besides (measured: below the loss-time peak with 2 kept layers)
            with_them = _choose_checkpointing(arch, model_config, tcfg, tokens, shards, budget, optimizer, layers,
                                              copy_gib, offload=offload, mask_bytes=masks, fixed=ckpt,
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
    return TrainPlan(optimizer, master, ckpt, layers, sharding, reshard, round(budget, 1), round(estimate, 1),
                     f"{why}; {ckpt_why}{reshard_why}", on_cpu, offload, offloaded)


def weights_precision(plan: TrainPlan, precision: Precision) -> Precision:
    """The precision the model is built in: adamw_8bit_bf16 trains bf16 weights (no fp32 masters, no autocast
    copies); every other choice keeps ``precision``."""
    if plan.optimizer == "adamw_8bit_bf16":
        return Precision(torch.bfloat16, torch.bfloat16)
    return precision


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
    return f"optimizer {plan.optimizer}, master weights {plan.master_weights}, checkpointing {ckpt}{cpu}{est}"


# --- choices -------------------------------------------------------------------------------------------------------


def _choose_sharding(arch: Any, model_config: Any, tcfg: TrainConfig, tokens: int, world: int,
                     budget: float) -> tuple[str | None, str]:
    if world == 1:
        return None, ""
    if tcfg.sharding != "auto":
        return tcfg.sharding, " (as configured)"
    # replicated, each GPU holds what one GPU would (full fine-tuning: fp32 masters and AdamW states, unsharded)
    whole = (_estimate(arch, model_config, tcfg, tokens, 1, "full", "adamw_torch")
             + _fsdp_copies_gib(arch, model_config, tcfg, "replicate"))
    if whole <= budget:
        return "replicate", f" (the whole run fits one GPU: {whole:.1f} GiB)"
    return "shard", f" (the whole run needs {whole:.0f} GiB on one GPU)"


def _check_configured_optimizer(tcfg: TrainConfig, device: torch.device, world: int) -> None:
    """An optimizer set in the config that cannot run here is one error before anything loads."""
    if tcfg.optim in ("adamw_8bit", "adamw_8bit_bf16") and world > 1:
        raise UserError(f"train.optim: {tcfg.optim} runs on one GPU only (not measured on FSDP2's sharded "
                        "parameters)", hint="use optim: auto or adamw_torch with several GPUs (the states are "
                                            "sharded, so fp32 AdamW fits where 8-bit was needed on one GPU)")
    missing = _stochastic_bf16_missing(device, tcfg) if tcfg.optim == "adamw_8bit_bf16" else None
    if missing:
        raise UserError(f"train.optim: adamw_8bit_bf16 {missing[0]}", hint=missing[1])


def _master_weights(tcfg: TrainConfig, weights_dtype: torch.dtype, optimizer: str) -> str:
    """What the optimizer updates, as the plan reports it."""
    if optimizer == "adamw_8bit_bf16":
        return STOCHASTIC_BF16
    dtype = _DTYPE_NAMES.get(weights_dtype, str(weights_dtype))
    if tcfg.method != "full":
        return f"fp32 adapters on a frozen {'NF4' if tcfg.method == 'qlora' else dtype} base"
    return dtype


def _choose_optimizer(arch: Any, model_config: Any, tcfg: TrainConfig, tokens: int, world: int, shards: int,
                      budget: float, device: torch.device) -> tuple[str, str]:
    if tcfg.optim != "auto":
        return tcfg.optim, f"optimizer {tcfg.optim} as configured"
    if tcfg.method != "full":
        return "adamw_torch", "fp32 AdamW for the adapters"
    fp32 = _estimate(arch, model_config, tcfg, tokens, shards, "full", "adamw_torch")
    if fp32 <= budget:
        return "adamw_torch", f"fp32 AdamW fits ({fp32:.1f} GiB with every layer checkpointed)"
    if world > 1:
        raise UserError(f"full fine-tuning with fp32 AdamW needs ~{fp32:.0f} GiB per GPU on {world} GPUs; "
                        f"{budget:.0f} GiB is available", hint="use more GPUs, method: lora, or a smaller model")
    choice = "adamw_8bit" if _stochastic_bf16_missing(device, tcfg) else "adamw_8bit_bf16"
    eight = _estimate(arch, model_config, tcfg, tokens, shards, "full", choice)
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


def _stochastic_bf16_missing(device: torch.device, tcfg: TrainConfig) -> tuple[str, str] | None:
    """What adamw_8bit_bf16 lacks here (what, and the fix), or None: it needs bf16 weights — a CUDA GPU with bf16
    and train.precision auto or bf16 — and torchao."""
    import importlib.util

    if tcfg.precision not in ("auto", "bf16"):
        return (f"trains bf16 weights, but train.precision is {tcfg.precision}",
                "set train.precision: bf16 (or auto), or another optim")
    if device.type != "cuda" or not torch.cuda.is_bf16_supported():
        return "trains bf16 weights, which needs a CUDA GPU with bf16", "use optim: auto, adamw_torch or adamw_8bit"
    if importlib.util.find_spec("torchao") is None:
        return "needs torchao", "pip install 'tunesmith[gpu]'"
    return None


def _choose_checkpointing(arch: Any, model_config: Any, tcfg: TrainConfig, tokens: int, shards: int,
                          budget: float, optimizer: str, layers: int, extra_gib: float = 0.0, offload: bool = False,
                          mask_bytes: int = 1, fixed: int | None = None, offloaded: bool = False
                          ) -> tuple[int, float, str]:
    """How many layers (the first ones) not to keep for backward, the estimated peak, and why. ``fixed``: that many,
    only estimated; ``offloaded``: some of them are offloaded whole (one arrives during a neighbour's recompute)."""
    from ..hardware.memory import ALLOCATOR_SLACK, CUDA_CONTEXT_GIB

    full = _memory(arch, model_config, tcfg, tokens, shards, "full", optimizer, mask_bytes)
    none = _memory(arch, model_config, tcfg, tokens, shards, "none", optimizer, mask_bytes).total_gib + extra_gib
    # a kept layer holds its activations in place of its bf16 input; offloaded, a checkpointed layer's input leaves
    # the GPU, except the ones being copied out and back
    boundary = model_config.hidden_size * tokens * 2 / 2**30
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


def _choose_offloaded_layers(arch: Any, tcfg: TrainConfig, tokens: int, device: torch.device, world: int,
                             checkpointed: int, inputs_offloaded: bool, layer_gib: float) -> tuple[int, str]:
    """How many of the ``checkpointed`` layers to offload whole instead of recomputing, and why.

    auto: as many as the GPU→CPU link can copy in OFFLOAD_LINK_SHARE of the forward's time — the forward timed at
    FORWARD_PEAK_SHARE of the GPU's datasheet peak, the link measured now (offload.host_link_rate), a layer's bytes
    from the memory model. Only where it was measured: LoRA on one GPU, compiled layers, inputs offloaded too."""
    if tcfg.offload_layers != "auto":
        return _configured_offloaded_layers(tcfg, world, checkpointed)
    name = _cuda_gpu_name(device)
    if not (world == 1 and name is not None and tcfg.method == "lora" and inputs_offloaded
            and tcfg.compile is not False):
        return 0, "no layers offloaded whole (measured for LoRA on one GPU with compiled layers)"
    from ..hardware.catalog import GPU_ALIASES, GPUS
    from .offload import host_link_rate

    gpu = GPUS.get(GPU_ALIASES.get(name, name))
    if gpu is None:
        return 0, f"no layers offloaded whole ({name} is not in the GPU catalogue; set train.offload_layers)"
    rate = host_link_rate(device)
    # the decoder layers' forward: 2 FLOPs per token per weight of their linear layers
    forward_s = 2 * tokens * arch.quantizable_params / (gpu.bf16_tflops * 1e12 * FORWARD_PEAK_SHARE)
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


def _cuda_gpu_name(device: torch.device) -> str | None:
    """The GPU's name as the driver reports it, lower case; None off CUDA."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(device).strip().lower()


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


def _fsdp_copies_gib(arch: Any, model_config: Any, tcfg: TrainConfig, sharding: str | None) -> float:
    """Compute-dtype weights FSDP2 holds beyond the memory model's per-GPU share (src/tunesmith/train/distributed.py).
    Replicated full fine-tuning: every layer's gathered copy lives all step (measured +12 GiB on two H200s for 8B LoRA
    while its frozen weights still went through FSDP2); replicated LoRA leaves its frozen weights out of FSDP2, so
    nothing is copied. Sharded: the root's embeddings and head stay gathered from forward to backward (the loss
    reads the head)."""
    if sharding == "replicate":
        return arch.total_params * 2 / 2**30 if tcfg.method == "full" else 0.0
    if sharding == "shard":
        return (1 if getattr(model_config, "tie_word_embeddings", False) else 2) * _embedding_gib(model_config)
    return 0.0


def _embedding_gib(model_config: Any) -> float:
    """One vocabulary × hidden matrix in bf16 (the input embeddings, or the output head)."""
    return model_config.vocab_size * model_config.hidden_size * 2 / 2**30


def _embeddings_on_cpu(model_config: Any, tcfg: TrainConfig, world: int, short_of_memory: bool) -> bool:
    possible = tcfg.method != "full" and world == 1 and not getattr(model_config, "tie_word_embeddings", False)
    if tcfg.embeddings_on_cpu == "auto":
        return possible and short_of_memory
    if tcfg.embeddings_on_cpu and not possible:
        raise UserError("train.embeddings_on_cpu: true needs method lora or qlora, one GPU, and input embeddings not "
                        "tied to the output head (they would then be trained or needed on the GPU)",
                        hint="set train.embeddings_on_cpu: auto")
    return bool(tcfg.embeddings_on_cpu)


# --- the memory model ----------------------------------------------------------------------------------------------


def _estimate(arch: Any, model_config: Any, tcfg: TrainConfig, tokens: int, shards: int,
              checkpointing: str, optimizer: str) -> float:
    """Peak GiB per GPU; ``shards`` is 1 when each GPU holds the whole model (one process, or replicated)."""
    return _memory(arch, model_config, tcfg, tokens, shards, checkpointing, optimizer).total_gib


def _memory(arch: Any, model_config: Any, tcfg: TrainConfig, tokens: int, shards: int,
            checkpointing: str, optimizer: str, mask_bytes: int = 1) -> Any:
    """The memory model's estimate (src/tunesmith/hardware/memory.py) for this run, its terms included;
    ``optimizer`` is one of OPTIMIZER_MEMORY's names; ``mask_bytes``: see ``_dropout_mask_bytes``."""
    from ..hardware.memory import estimate_memory, lora_trainable_params

    trainable, adapted = (0, 0)
    if tcfg.method != "full":
        trainable, adapted = lora_trainable_params(model_config, tcfg.lora.r, tcfg.lora.target_modules)
    est = estimate_memory(arch, tcfg.method, 1, tokens, lora_r=tcfg.lora.r, lora_trainable=trainable,
                          adapted_in_features=adapted, lora_dropout=tcfg.lora.dropout, checkpointing=checkpointing,
                          logits=_head(), optimizer=OPTIMIZER_MEMORY[optimizer][0],
                          full_precision=OPTIMIZER_MEMORY[optimizer][1], shards=shards,
                          compiled=tcfg.compile is not False, dropout_mask_bytes=mask_bytes)
    return est


def _dropout_mask_bytes(tcfg: TrainConfig, device: torch.device, world: int) -> int:
    """Bytes per adapted input feature the adapters' dropout keeps for backward: none where the fused kernel draws
    the mask (src/tunesmith/train/adapter_dropout.py; one process — FSDP2 runs keep PEFT's dropout), else PEFT's
    1-byte mask. Measured on one H200 (bench/results/fast_engine.md, "Seventh run"): 8B LoRA, rows of 12,288
    tokens, 2 layers kept: 18.92 GiB fused vs 20.03 GiB with PEFT's dropout."""
    from .adapter_dropout import fused_dropout_applies

    fused = world == 1 and fused_dropout_applies(tcfg.method, tcfg.lora.r, tcfg.lora.dropout, device)
    return 0 if fused else 1


def _head() -> str:
    """How the loss meets the vocabulary: Liger's fused kernel where installed (tiles of logits; measured 20.0 GiB
    for an 8B LoRA step of 8K tokens against 20.4 estimated), else our PyTorch chunks — on one GPU and under FSDP2
    alike (src/tunesmith/train/loss.py)."""
    from .kernels import fused_loss_kernel_available

    return "fused" if fused_loss_kernel_available() else "chunked"


def _architecture(model_config: Any) -> Any:
    from ..hardware.memory import architecture_from_config

    try:
        return architecture_from_config(model_config)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _budget_gib(tcfg: TrainConfig, device: torch.device, gpu_gib: float | None) -> float | None:
    if device.type != "cuda":
        return None
    # what is free now (another process may share the GPU), not the card's size
    total = gpu_gib or torch.cuda.mem_get_info(device)[0] / 2**30
    limit = min(total, tcfg.memory_limit_gb) if tcfg.memory_limit_gb else total
    return limit * HEADROOM
