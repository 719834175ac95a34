"""FSDP2 across two CPU processes (gloo), launched by torchrun exactly as on GPUs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from train_fixtures import metrics, write_arithmetic

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_arithmetic(tmp_path_factory.mktemp("data"), n_train=64)


def _cfg(tmp_path: Path, model_dir: Path, data_dir: Path, name: str, **train) -> Path:
    body = {"model": {"name_or_path": str(model_dir)},
            "train": {"dataset": str(data_dir), "max_steps": 4, "learning_rate": 1e-3, "warmup_ratio": 0.0,
                      "eval_strategy": "no", "save_strategy": "steps", "save_steps": 1, "logging_steps": 1,
                      "deterministic": True, **train}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _launch(nproc: int, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "tunesmith", "train", *args] if nproc > 1 else [sys.executable, "-m", "tunesmith", "train", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_two_fsdp2_processes_follow_the_single_process_loss_trajectory(tiny_model_dir, data_dir, tmp_path, method):
    # 16 sequences per optimizer step in both: 8 x 2 on one process, 4 x 2 on each of two.
    # LoRA dropout off: its random masks are drawn per process, so they differ between the layouts
    lora = {"lora": {"dropout": 0.0}} if method == "lora" else {}
    one = _cfg(tmp_path, tiny_model_dir, data_dir, "one", method=method, per_device_train_batch_size=8,
               gradient_accumulation_steps=2, **lora)
    two = _cfg(tmp_path, tiny_model_dir, data_dir, "two", method=method, per_device_train_batch_size=4,
               gradient_accumulation_steps=2, **lora)
    _finish(_launch(1, str(one), "--out", str(tmp_path / "one")))
    _finish(_launch(2, str(two), "--out", str(tmp_path / "two")))
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["supervised_tokens"] for m in a] == [m["supervised_tokens"] for m in b]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4), x["step"]
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3), x["step"]
    # the final model is an ordinary consolidated folder that transformers / PEFT load without tunesmith
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["processes"] == 2
    folder = Path(run["outputs"]["adapter" if method == "lora" else "model"])
    assert (folder / ("adapter_model.safetensors" if method == "lora" else "model.safetensors")).is_file()
    assert any(f.suffix == ".distcp" for f in (tmp_path / "two" / "checkpoints").glob("step-*/*"))


def test_resume_from_a_sharded_checkpoint_keeps_the_loss_trajectory(tiny_model_dir, data_dir, tmp_path):
    cfg = _cfg(tmp_path, tiny_model_dir, data_dir, "c", method="lora", max_steps=6, per_device_train_batch_size=4,
               gradient_accumulation_steps=2, learning_rate=1e-2)
    _finish(_launch(2, str(cfg), "--out", str(tmp_path / "straight")))
    run = tmp_path / "killed"
    proc = _launch(2, str(cfg), "--out", str(run))
    deadline = time.time() + 300
    while time.time() < deadline:
        lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
        if any(json.loads(x)["step"] >= 3 for x in lines):
            break
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (run / "adapter").exists()
    _finish(_launch(2, str(cfg), "--out", str(run), "--resume"))
    a, b = metrics(tmp_path / "straight"), metrics(run)
    assert [m["step"] for m in b] == list(range(1, 7))
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5), x["step"]
