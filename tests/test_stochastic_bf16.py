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
    opt = _optimizer(list(model.parameters()), "adamw_8bit_bf16",
                     TrainConfig(method="full", optim="adamw_8bit_bf16", learning_rate=LR), CPU)
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
    opt = _optimizer(list(model.parameters()), cfg.optim, cfg, CPU)
    sched = _scheduler(opt, cfg, 100)
    _steps(model, opt, 5)
    checkpoint.save(tmp_path, 5, model, opt, sched, {"step": 5}, keep=None)
    _steps(model, opt, 5)
    expected = model.weight.detach().clone()

    fresh = _ones_model()
    fresh_opt = _optimizer(list(fresh.parameters()), cfg.optim, cfg, CPU)
    fresh_sched = _scheduler(fresh_opt, cfg, 100)
    checkpoint.restore(checkpoint.latest(tmp_path), fresh, fresh_opt, fresh_sched)
    restored = fresh_opt.state[fresh.weight]
    assert type(restored["exp_avg"]).__name__ == "OptimState8bit"  # not silently re-initialised
    _steps(fresh, fresh_opt, 5)
    # the same states, learning rate and random stream: bit-identical weights after the resumed steps
    assert torch.equal(fresh.weight.detach(), expected)


def _tiny_full_run(model_dir: Path, out: Path, optim: str, resume: bool = False) -> tuple[torch.nn.Module, dict]:
    from transformers import AutoModelForCausalLM

    from tunesmith.chat import TokenizedChat
    from tunesmith.hardware.machine import Hardware
    from tunesmith.train import StepSetup, fit
    from tunesmith.train.distributed import Processes
    from tunesmith.train.loss import fused_head_supported
    from tunesmith.train.model import prepare_model
    from tunesmith.train.plan import Precision, plan_training

    tcfg = TrainConfig(method="full", optim=optim, max_steps=4, per_device_train_batch_size=4,
                       gradient_accumulation_steps=2, learning_rate=3e-3, warmup_ratio=0.0, logging_steps=1,
                       eval_strategy="no", save_strategy="steps", save_steps=2, compile=False,
                       gradient_checkpointing=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    # built as the CPU's plan says; its optimizer is the loop's (the plan refuses adamw_8bit_bf16 off a bf16 GPU)
    cpu = plan_training(model.config, tcfg.model_copy(update={"optim": "auto"}), hardware=Hardware.cpu(), world=1)
    model = prepare_model(model, tcfg, cpu)
    torch.manual_seed(0)
    examples = [TokenizedChat(ids, list(ids)) for ids in
                ([(7 * k + j) % 200 + 3 for j in range(24)] for k in range(8))]
    setup = StepSetup(procs=Processes.single(CPU), precision=Precision(torch.bfloat16, torch.bfloat16),
                      optimizer=optim, pad_id=0, packed=False, fused_loss=fused_head_supported(model))
    return model, fit(model=model, setup=setup, tcfg=tcfg, train_examples=examples, eval_examples=[], out=out,
                      resume=resume)


def test_the_training_loop_runs_it_on_bf16_weights_and_logs_plain_numbers(tiny_model_dir, tmp_path: Path):
    # its learning rate is a tensor (torchao): the loop's metrics and checkpoints must still be plain JSON
    import json

    from transformers import AutoModelForCausalLM

    before = {n: p.detach().clone() for n, p in
              AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).named_parameters()}
    model, history = _tiny_full_run(tiny_model_dir, tmp_path / "run", "adamw_8bit_bf16")
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "train"]
    assert history["steps"] == 4 and len(steps) == 4
    assert all(isinstance(s["learning_rate"], float) for s in steps) and steps[0]["learning_rate"] > 0
    assert steps[-1]["loss"] < steps[0]["loss"]  # the same 8 sequences each step: it learns them
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert checkpoint.latest(tmp_path / "run" / "checkpoints").step == 2  # the last step is the final model


def test_a_checkpoint_resumes_only_under_the_optimizer_that_wrote_it(tiny_model_dir, tmp_path: Path):
    from tunesmith.errors import UserError

    _tiny_full_run(tiny_model_dir, tmp_path / "run", "adamw_8bit_bf16")
    # another optimizer cannot read its states: one message naming both, not a KeyError mid-step
    with pytest.raises(UserError, match="holds adamw_8bit_bf16 optimizer states; this run plans adamw_torch"):
        _tiny_full_run(tiny_model_dir, tmp_path / "run", "adamw_torch", resume=True)
    _, history = _tiny_full_run(tiny_model_dir, tmp_path / "run", "adamw_8bit_bf16", resume=True)
    assert history["steps"] == 4
