"""One FSDP2 process of tests/test_distributed.py's layout checks (started by torch.multiprocessing, gloo on the CPU).

Each process builds the same tiny model twice — one copy left alone, one wrapped by FSDP2 as the training loop wraps
it — runs the same micro-batch through both with the loss the loop uses, and writes what it saw to a JSON file:
which parameters FSDP2 manages, the two losses, and the largest gradient difference.
"""

from __future__ import annotations

import copy
import json
import os
import random
from pathlib import Path

import torch
import torch.distributed as dist


def run(rank: int, world: int, model_dir: str, out_dir: str, method: str, replicate: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("PROBE_PORT", "29533"))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _probe(rank, world, model_dir, Path(out_dir), method, replicate)
    finally:
        dist.destroy_process_group()


def _probe(rank: int, world: int, model_dir: str, out: Path, method: str, replicate: bool) -> None:
    from transformers import AutoModelForCausalLM

    from tunesmith.chat import IGNORE_INDEX, TokenizedChat
    from tunesmith.config import TrainConfig
    from tunesmith.hardware.machine import Hardware
    from tunesmith.train.batching import micro_batches
    from tunesmith.train.distributed import Processes, is_sharded, shard
    from tunesmith.train.loss import loss_sum
    from tunesmith.train.model import prepare_model
    from tunesmith.train.plan import plan_training

    torch.manual_seed(0)
    tcfg = TrainConfig(method=method, lora={"dropout": 0.0}, gradient_checkpointing=False, compile=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = prepare_model(model, tcfg, plan_training(model.config, tcfg, hardware=Hardware.cpu(), world=1))
    with torch.no_grad():  # adapters away from the identity, so every adapter weight gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    alone = copy.deepcopy(model)
    procs = Processes(rank, world, 0, torch.device("cpu"))
    shard(model, procs, method, None, replicate=replicate)

    rng = random.Random(1)
    seqs = [[rng.randrange(3, 500) for _ in range(rng.randint(5, 30))] for _ in range(4)]
    examples = [TokenizedChat(s, [IGNORE_INDEX] * 3 + s[3:]) for s in seqs]
    batch = micro_batches(examples, range(4), 4, 64, 0, False)[0]  # every process: the same batch
    ref, _ = loss_sum(alone, batch, fused=True)
    ref.backward()
    got, _ = loss_sum(model, batch, fused=True)
    got.backward()

    managed = [n for n, p in model.named_parameters() if hasattr(p, "to_local")]
    frozen_plain = all(not hasattr(p, "to_local") for p in model.parameters() if not p.requires_grad)
    theirs = dict(alone.named_parameters())
    diff = 0.0
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        diff = max(diff, (grad - theirs[name].grad).abs().max().item())
    if rank == 0:
        (out / "probe.json").write_text(json.dumps({
            "sharded": is_sharded(model), "managed": managed, "frozen_plain": frozen_plain,
            "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
            "loss": got.item(), "loss_alone": ref.item(), "max_grad_diff": diff,
            "grads": sum(p.grad is not None for p in model.parameters())}))
