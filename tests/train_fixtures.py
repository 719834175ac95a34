"""Small chat datasets and configs for training tests."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tunesmith.config import load_config


def write_arithmetic(folder: Path, n_train: int = 48, n_eval: int = 8, seed: int = 0) -> Path:
    """Variable-length chats: the answer restates the question, so lengths differ between examples."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for _ in range(n_train + n_eval):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        filler = " ".join(["please"] * rng.randint(0, 12))
        rows.append({"messages": [
            {"role": "system", "content": "You are a calculator."},
            {"role": "user", "content": f"What is {a} plus {b}? {filler}"},
            {"role": "assistant", "content": f"The answer is {a + b}."},
        ]})
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n_train]))
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[n_train:]))
    return folder


def config(model_dir: Path, data_dir: Path, **train):
    overrides = [f"model.name_or_path={model_dir}", f"train.dataset={data_dir}", "train.logging_steps=1",
                 "train.save_strategy=no", "train.eval_strategy=no"]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    return load_config(None, overrides)


def metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("type") == kind]


ROOT = Path(__file__).resolve().parents[1]


def run_config(tmp_path: Path, model_dir: Path, data_dir: Path, name: str, **train) -> Path:
    """A YAML config for a short CLI run that logs and checkpoints every step."""
    body = {"model": {"name_or_path": str(model_dir)},
            "train": {"dataset": str(data_dir), "max_steps": 4, "learning_rate": 1e-3, "warmup_ratio": 0.0,
                      "eval_strategy": "no", "save_strategy": "steps", "save_steps": 1, "logging_steps": 1,
                      "deterministic": True, **train}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def one_and_two_processes(tmp_path: Path, model_dir: Path, data_dir: Path, method: str,
                          **train) -> tuple[list[dict], list[dict]]:
    """The same 16 sequences per optimizer step on one process (8 × 2) and on two (4 × 2 each), launched as users
    launch them: the two runs' train metrics. LoRA dropout is off (its masks are drawn per process)."""
    lora = {"lora": {"dropout": 0.0}} if method == "lora" else {}
    one = run_config(tmp_path, model_dir, data_dir, "one", method=method, per_device_train_batch_size=8,
                     gradient_accumulation_steps=2, **lora, **train)
    two = run_config(tmp_path, model_dir, data_dir, "two", method=method, per_device_train_batch_size=4,
                     gradient_accumulation_steps=2, **lora, **train)
    finish(launch_train(1, str(one), "--out", str(tmp_path / "one")))
    finish(launch_train(2, str(two), "--out", str(tmp_path / "two")))
    return metrics(tmp_path / "one"), metrics(tmp_path / "two")


def launch_train(nproc: int, *args: str) -> subprocess.Popen:
    """``tunesmith train ARGS`` as its own process group: one process, or ``nproc`` under torchrun."""
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "tunesmith", "train", *args] if nproc > 1 else [sys.executable, "-m", "tunesmith", "train", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def kill_after_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> None:
    """SIGKILL the whole launch (torchrun and its workers) once ``step`` is logged: no clean shutdown."""
    deadline = time.time() + timeout
    metrics_file = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        lines = metrics_file.read_text().splitlines() if metrics_file.exists() else []
        if any(json.loads(x)["step"] >= step for x in lines):
            break
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def straight_and_resumed(cfg: Path, tmp_path: Path, nproc: int, final: str, kill_at: int = 3
                         ) -> tuple[list[dict], list[dict]]:
    """Train ``cfg`` uninterrupted, then again killed (SIGKILL) after step ``kill_at`` and resumed; return both
    runs' train metrics. The killed run must not have written its final ``final`` folder."""
    finish(launch_train(nproc, str(cfg), "--out", str(tmp_path / "straight")))
    run = tmp_path / "killed"
    kill_after_step(launch_train(nproc, str(cfg), "--out", str(run)), run, kill_at)
    assert not (run / final).exists()
    finish(launch_train(nproc, str(cfg), "--out", str(run), "--resume"))
    return metrics(tmp_path / "straight"), metrics(run)


def tiny_lora_model(layers: int = 2, dropout: float = 0.1):
    """A random 2-layer-ish Llama (hidden 64) with LoRA r 4 on all seven projections, as prepare_model builds it on
    the CPU, in training mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.config import TrainConfig
    from tunesmith.hardware.machine import Hardware
    from tunesmith.train.model import prepare_model
    from tunesmith.train.plan import plan_training

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=256)
    tcfg = TrainConfig(method="lora", gradient_checkpointing=False, compile=False,
                       lora={"r": 4, "alpha": 8, "dropout": dropout})
    cpu = plan_training(cfg, tcfg, hardware=Hardware.cpu(), world=1)
    return prepare_model(LlamaForCausalLM(cfg), tcfg, cpu).train()


def seeded_loss_and_grads(model, ids):
    """Loss and the trainable parameters' gradients of one forward/backward on ``ids``, dropout seeded alike."""
    import torch

    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
