"""FSDP2 on two CUDA GPUs through NCCL, launched by torchrun as users launch it (skipped with fewer than 2 GPUs).

The CPU suite (tests/test_distributed.py) checks the same properties with gloo; here the GPU path runs for real:
bf16 weight gathers with fp32 gradient reduction, packed rows with variable-length attention, sharded
torch.distributed.checkpoint checkpoints and the consolidated final folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from train_fixtures import one_and_two_processes, run_config, straight_and_resumed, write_arithmetic

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_arithmetic(tmp_path_factory.mktemp("data"), n_train=64)


@pytest.mark.parametrize(("method", "sharding"), [("full", "shard"), ("lora", "replicate")])
def test_two_gpus_follow_the_one_gpu_loss_trajectory_and_save_an_ordinary_folder(tiny_model_dir, data_dir,
                                                                                   tmp_path, method, sharding):
    a, b = one_and_two_processes(tmp_path, tiny_model_dir, data_dir, method, sharding=sharding, compile=False)
    assert [m["supervised_tokens"] for m in a] == [m["supervised_tokens"] for m in b]
    worst = max(abs(x["loss"] - y["loss"]) / x["loss"] for x, y in zip(a, b, strict=True))
    print(f"{method}: largest relative loss difference 1 GPU vs 2 GPUs over {len(a)} steps: {worst:.2e}")
    assert worst < 2e-2  # bf16 compute: autocast on one GPU, FSDP2's bf16 gathers on two
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["processes"] == 2 and run["precision"] == "bf16" and run["plan"]["sharding"] == sharding
    assert run["plan"]["optimizer"] == "adamw_torch"
    folder = Path(run["outputs"]["adapter" if method == "lora" else "model"])
    if method == "full":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder)  # no tunesmith, no sharding: an ordinary HF folder
        assert sum(p.numel() for p in model.parameters()) > 0
    else:
        assert (folder / "adapter_model.safetensors").is_file()


def test_resume_on_two_gpus_keeps_the_loss_trajectory(tiny_model_dir, data_dir, tmp_path):
    cfg = run_config(tmp_path, tiny_model_dir, data_dir, "c", method="full", max_steps=6, sharding="shard",
                     compile=False, per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-3)
    a, b = straight_and_resumed(cfg, tmp_path, 2, "model")
    assert [m["step"] for m in b] == list(range(1, 7))
    worst = max(abs(x["loss"] - y["loss"]) / x["loss"] for x, y in zip(a, b, strict=True))
    print(f"resume on 2 GPUs: largest relative loss difference vs the uninterrupted run: {worst:.2e}")
    assert worst < 1e-3
