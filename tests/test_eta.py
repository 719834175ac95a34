"""The duration estimate `tunesmith train` prints before its first step, and the CPU warning."""

from __future__ import annotations

import torch

from tunesmith.hardware.machine import measure_matmul_flops
from tunesmith.train import eta


def test_planned_tokens_follow_epochs_or_max_steps():
    assert eta.planned_tokens(60_000, 1_000, 8, 3, None) == 180_000
    assert eta.planned_tokens(60_000, 1_000, 8, 3, 10) == 10 * 8 * 60


def test_lora_skips_the_weight_gradients_and_checkpointing_adds_a_forward():
    n = 1_000_000
    assert eta.flops_per_token(n, "full", 0.0) == 6 * n
    assert eta.flops_per_token(n, "lora", 0.0) == 4 * n
    assert eta.flops_per_token(n, "qlora", 1.0) == 6 * n
    assert eta.flops_per_token(n, "lora", 0.5) == 5 * n


def test_the_matmul_rate_is_measured_here():
    rate = measure_matmul_flops(torch.device("cpu"), torch.float32, size=256, repeats=2)
    assert 1e8 < rate < 1e14


def test_a_long_cpu_run_is_a_warning_with_what_to_change_and_a_short_one_is_not():
    long = eta.estimate(3_000_000, 135_000_000, "lora", 1.0, "cpu", 150e9)
    assert long.seconds > eta.CPU_WARN_S
    warning = eta.cpu_warning(long)
    assert warning is not None and "train.num_train_epochs" in warning and "GPU" in warning
    within = int(warning.split("train on about ")[1].split(" tokens")[0].replace(",", ""))
    assert eta.estimate(within, 135_000_000, "lora", 1.0, "cpu", 150e9).seconds <= eta.CPU_WARN_S * 1.01
    assert eta.cpu_warning(eta.estimate(60_000, 135_000_000, "lora", 1.0, "cpu", 150e9)) is None
    assert eta.cpu_warning(eta.estimate(3_000_000_000, 8e9, "lora", 1.0, "cuda", 700e12)) is None
    assert "tokens to train on" in long.message()


def test_the_run_announces_its_estimate_and_keeps_the_cpu_warning_for_its_result():
    from tunesmith.train.loop import _announce

    events = []
    long = eta.estimate(3_000_000, 135_000_000, "lora", 0.0, "cpu", 150e9)
    warnings = _announce(long.remaining(0.5), events.append)  # resumed half-way: half is left
    assert [e["event"] for e in events] == ["eta", "warning"]
    assert events[0]["tokens"] == 1_500_000 and events[0]["seconds"] == long.seconds / 2
    assert warnings == [events[1]["message"]]
    assert _announce(eta.estimate(60_000, 135_000_000, "lora", 0.0, "cpu", 150e9), events.append) == []
