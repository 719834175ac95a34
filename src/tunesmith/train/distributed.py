"""Multi-process training on PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``), launched by torchrun.

Nothing here is a distributed engine of our own: parameters, gradients and optimizer states are sharded by FSDP2,
checkpoints are written by ``torch.distributed.checkpoint`` (sharded, resharding on load). This module only
holds the process facts the loop needs and the few collectives it calls (token counts, step layout).

Launch: ``tunesmith train CONFIG --gpus N`` (re-executes itself under torchrun) or
``torchrun --nproc-per-node N -m tunesmith train CONFIG``. CPU processes use gloo (tests), GPUs use NCCL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import UserError
from ..models import base_model


@dataclass(frozen=True)
class Processes:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @classmethod
    def single(cls, device: torch.device) -> Processes:
        """One process on ``device``, without torchrun (benchmarks and tests that call the loop themselves)."""
        return cls(0, 1, 0, device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_processes() -> Processes:
    """This process's place: a single process, or one of torchrun's WORLD_SIZE processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
            torch.device("cpu")
        return Processes.single(device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        # generous: the other processes wait in the first broadcast while the main one reads the checkpoint
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    return Processes(dist.get_rank(), dist.get_world_size(), local, device)


def shard(model: Any, procs: Processes, method: str, compute_dtype: torch.dtype | None = None,
          replicate: bool = False, reshard_after_forward: bool = True) -> Any:
    """Wrap each decoder layer and the whole model with FSDP2.

    ``replicate=False``: parameters, gradients and optimizer states are split across the processes (each layer's
    weights gathered when it runs). ``replicate=True``: every process holds the whole model and only gradients are
    averaged (FSDP2's hybrid layout with one shard per replica), for a run that fits one GPU, like LoRA of an 8B
    model; there the frozen weights are left out of FSDP2 altogether (``ignored_params``): plain tensors on every
    GPU, used where they are — no per-layer copy into gather buffers, no memory for those copies.
    ``reshard_after_forward=False`` keeps each layer's gathered weights from its forward to its backward (one gather
    per micro-batch instead of two, for the memory of the unsharded weights). The root (embeddings, final norm,
    head) always stays gathered from forward to backward, as FSDP2 does by default: the loss multiplies the final
    hidden states by the head's weight outside the model's forward (src/tunesmith/train/loss.py).
    With a compute dtype (bf16 on GPUs), FSDP2's mixed precision gathers weights in that dtype and reduces gradients
    in fp32: full fine-tuning keeps fp32 master weights and fp32 optimizer maths in the shards, LoRA's bf16 base and
    fp32 adapters share one gathered dtype."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if method == "qlora":
        raise UserError("train.method: qlora cannot be sharded across processes (4-bit bitsandbytes weights are "
                        "not FSDP2-shardable)", hint="use method: lora with several GPUs, or qlora on one GPU")
    mesh = init_device_mesh(procs.device.type, (procs.world, 1), mesh_dim_names=("replicate", "shard")) \
        if replicate else init_device_mesh(procs.device.type, (procs.world,))
    block_names = set(getattr(base_model(model), "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise UserError(f"cannot find the repeated blocks of {type(base_model(model)).__name__} to shard",
                        hint="train this architecture on one GPU")
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype else \
        MixedPrecisionPolicy()
    frozen = {p for p in model.parameters() if not p.requires_grad} if replicate else None
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward,
                    ignored_params=frozen)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False, ignored_params=frozen)
    return model


def is_sharded(model: Any) -> bool:
    """True for a model wrapped by FSDP2 (its own forward must run: it gathers weights and drives the collectives)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def materialize(model: Any, procs: Processes, full_state: dict[str, torch.Tensor] | None) -> None:
    """Give a sharded skeleton (parameters on the meta device) real storage on this process's device and fill each
    process's shards from ``full_state``, which only the main process holds (read once, broadcast tensor by tensor
    by torch.distributed.checkpoint): no process ever holds a second full copy of the weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    allocate(model, procs.device)
    set_model_state_dict(model, full_state if procs.main else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def allocate(model: Any, device: torch.device) -> None:
    """Uninitialised storage on ``device`` for a model (sharded or not) whose parameters are on the meta device.
    Buffers (rotary tables) were built for real in the skeleton and are kept."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])


def sum_all(value: float | int, procs: Processes) -> float:
    if not procs.distributed:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device(procs))
    dist.all_reduce(t)
    return float(t.item())


def max_all(value: int | float, procs: Processes) -> int | float:
    if not procs.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device(procs))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return type(value)(t.item())


def barrier(procs: Processes) -> None:
    if procs.distributed:
        dist.barrier()


def set_gradient_sync(model: Any, enabled: bool) -> None:
    """Skip FSDP2's gradient reduce-scatter on all but the last micro-batch of a step."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def full_state_dict(model: Any, procs: Processes) -> dict[str, torch.Tensor] | None:
    """The consolidated (unsharded) state dict on the main process, for saving an ordinary HF folder."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if procs.main else None


def _comm_device(procs: Processes) -> torch.device:
    return procs.device if procs.device.type == "cuda" else torch.device("cpu")

