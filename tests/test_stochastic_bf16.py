"""Full fine-tuning's one-GPU optimizer ``adamw_8bit_bf16`` (src/tunesmith/train/loop.py ``_optimizer``): torchao's
8-bit AdamW with fp32 update maths on bf16 weights rounded stochastically. Runs on the CPU (the update is
compiled once per parameter shape)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tunesmith.config import TrainConfig
from tunesmith.train import checkpoint
from tunesmith.train.loop import _optimizer, _scheduler

pytest.importorskip("torchao")

CPU = torch.device("cpu")
LR = 1e-4
STEPS = 60


def _ones_model() -> torch.nn.Module:
    model = torch.nn.Linear(256, 64, bias=False).to(torch.bfloat16)  # 16,384 weights: 8-bit states (≥ 4096)
    with torch.no_grad():
        model.weight.fill_(1.0)
    return model


def _steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, n: int) -> None:
    for _ in range(n):
        # a constant gradient: Adam's normalised update is lr per step, 1/39 of bf16's spacing below 1.0 (2^-8)
        model.weight.grad = torch.ones_like(model.weight)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_updates_below_bf16_resolution_are_kept_in_expectation_and_states_are_8bit():
    torch.manual_seed(0)
    model = _ones_model()
    opt = _optimizer(list(model.parameters()), TrainConfig(method="full", optim="adamw_8bit_bf16",
                                                           learning_rate=LR), CPU)
    _steps(model, opt, STEPS)
    w = model.weight.detach().float()
    assert model.weight.dtype == torch.bfloat16
    # fp32 maths would give 1 - 60e-4 = 0.994; stochastic rounding lands there on average
    assert abs(w.mean().item() - (1 - STEPS * LR)) < 5e-4, w.mean().item()
    assert w.min().item() < 1.0 and w.max().item() <= 1.0
    state = opt.state[model.weight]
    assert type(state["exp_avg"]).__name__ == "OptimState8bit"
    assert state["exp_avg"].codes.dtype == torch.uint8 and state["exp_avg_sq"].codes.dtype == torch.uint8

    # the control: the same AdamW rounding to nearest loses every update (what pure-bf16 training does silently)
    plain = _ones_model()
    control = torch.optim.AdamW(plain.parameters(), lr=LR, weight_decay=0.0)
    _steps(plain, control, STEPS)
    assert torch.equal(plain.weight.detach().float(), torch.ones_like(w))


def test_its_states_survive_a_checkpoint_and_the_resumed_steps_match(tmp_path: Path):
    cfg = TrainConfig(method="full", optim="adamw_8bit_bf16", learning_rate=LR, warmup_ratio=0.0)
    torch.manual_seed(0)
    model = _ones_model()
    opt = _optimizer(list(model.parameters()), cfg, CPU)
    sched = _scheduler(opt, cfg, 100)
    _steps(model, opt, 5)
    checkpoint.save(tmp_path, 5, model, opt, sched, {"step": 5}, keep=None)
    _steps(model, opt, 5)
    expected = model.weight.detach().clone()

    fresh = _ones_model()
    fresh_opt = _optimizer(list(fresh.parameters()), cfg, CPU)
    fresh_sched = _scheduler(fresh_opt, cfg, 100)
    checkpoint.restore(checkpoint.latest(tmp_path), fresh, fresh_opt, fresh_sched)
    restored = fresh_opt.state[fresh.weight]
    assert type(restored["exp_avg"]).__name__ == "OptimState8bit"  # not silently re-initialised
    _steps(fresh, fresh_opt, 5)
    # the same states, learning rate and random stream: bit-identical weights after the resumed steps
    assert torch.equal(fresh.weight.detach(), expected)
