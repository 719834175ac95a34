"""FSDP2 across two CPU processes (gloo), launched by torchrun exactly as on GPUs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train_fixtures import one_and_two_processes, run_config, straight_and_resumed, write_arithmetic


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_arithmetic(tmp_path_factory.mktemp("data"), n_train=64)


@pytest.mark.parametrize(("method", "sharding", "packing"),
                         [("full", "shard", False), ("lora", "shard", False), ("lora", "replicate", True)])
def test_two_fsdp2_processes_follow_the_single_process_loss_trajectory(tiny_model_dir, data_dir, tmp_path, method,
                                                                        sharding, packing):
    # packed: the step's sequences are laid out for both processes at once, so each process's rows differ from the
    # one-process layout; sharding is ignored by the one-process run
    a, b = one_and_two_processes(tmp_path, tiny_model_dir, data_dir, method, sharding=sharding, packing=packing)
    assert [m["supervised_tokens"] for m in a] == [m["supervised_tokens"] for m in b]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4), x["step"]
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3), x["step"]
    # the final model is an ordinary consolidated folder that transformers / PEFT load without tunesmith
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["processes"] == 2 and run["plan"]["sharding"] == sharding
    folder = Path(run["outputs"]["adapter" if method == "lora" else "model"])
    assert (folder / ("adapter_model.safetensors" if method == "lora" else "model.safetensors")).is_file()
    assert any(f.suffix == ".distcp" for f in (tmp_path / "two" / "checkpoints").glob("step-*/*"))


def test_resume_from_a_sharded_checkpoint_keeps_the_loss_trajectory(tiny_model_dir, data_dir, tmp_path):
    cfg = run_config(tmp_path, tiny_model_dir, data_dir, "c", method="lora", max_steps=6,
                     per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-2)
    a, b = straight_and_resumed(cfg, tmp_path, 2, "adapter")
    assert [m["step"] for m in b] == list(range(1, 7))
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5), x["step"]


@pytest.mark.parametrize(("method", "replicate"), [("lora", True), ("full", False)])
def test_fsdp2_processes_compute_the_fused_loss_from_the_gathered_head(tiny_model_dir, tmp_path, method, replicate):
    """Under FSDP2 the loss multiplies the final hidden states by the head outside the model's forward (no logits
    tensor); the loss and every gradient equal an unwrapped model's on the same batch. Replicated LoRA leaves the
    frozen weights out of FSDP2 (plain tensors: nothing copied into gather buffers); FSDP2 manages the adapters."""
    import torch.multiprocessing as mp

    import fsdp_probe

    mp.spawn(fsdp_probe.run, args=(2, str(tiny_model_dir), str(tmp_path), method, replicate), nprocs=2)
    seen = json.loads((tmp_path / "probe.json").read_text())
    assert seen["sharded"]
    assert seen["loss"] == pytest.approx(seen["loss_alone"], rel=1e-5)
    assert seen["max_grad_diff"] < 1e-5
    assert seen["grads"] == len(seen["trainable"]) > 0
    if replicate:
        assert seen["frozen_plain"]
        assert sorted(seen["managed"]) == sorted(seen["trainable"])
        assert all("lora_" in n for n in seen["managed"])
    else:  # full fine-tuning: every weight sharded, the head's gradient included
        assert sorted(seen["managed"]) == sorted(seen["trainable"])
        assert any("lm_head" in n for n in seen["managed"])
