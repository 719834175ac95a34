"""Fault injection: kill -9 and resume, SIGTERM, NaN, disk full, partial checkpoints, planted pickle weights."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from train_fixtures import metrics, write_arithmetic
from tunesmith.errors import RunError, UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_arithmetic(tmp_path_factory.mktemp("data"), n_train=64)


def _config_file(tmp_path: Path, model_dir: Path, data_dir: Path, **train) -> Path:
    cfg = {"model": {"name_or_path": str(model_dir)},
           "train": {"dataset": str(data_dir), "method": "lora", "learning_rate": 1e-2, "max_steps": 10,
                     "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2, "deterministic": True,
                     "save_strategy": "steps", "save_steps": 1, "save_total_limit": 3, "eval_strategy": "no",
                     "logging_steps": 1, **train}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "tunesmith", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _run(*args: str) -> subprocess.CompletedProcess:
    proc = _cli(*args)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.stderr.read()}")
        if path.exists() and any(json.loads(x)["step"] >= step for x in path.read_text().splitlines() if x):
            return
        time.sleep(0.01)
    raise AssertionError(f"step {step} never logged")


def test_kill_9_at_several_steps_then_resume_reproduces_the_uninterrupted_losses(tiny_model_dir, data_dir, tmp_path):
    cfg = _config_file(tmp_path, tiny_model_dir, data_dir)
    done = _run("train", str(cfg), "--out", str(tmp_path / "straight"), "--json")
    assert done.returncode == 0, done.stderr
    reference = metrics(tmp_path / "straight")

    run = tmp_path / "killed"
    for kill_at in (2, 6):
        proc = _cli("train", str(cfg), "--out", str(run), *(["--resume"] if kill_at != 2 else []))
        _wait_for_step(run, kill_at, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL and not (run / "adapter").exists(), "killed after finishing"
    finished = _run("train", str(cfg), "--out", str(run), "--resume", "--json")
    assert finished.returncode == 0, finished.stderr
    resumed = metrics(run)
    assert [m["step"] for m in resumed] == list(range(1, 11))
    # same data order (same supervised-token counts per step) and the same losses, step for step
    assert [m["supervised_tokens"] for m in resumed] == [m["supervised_tokens"] for m in reference]
    for a, b in zip(resumed, reference, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), a["step"]


def test_sigterm_writes_a_checkpoint_and_exits_saying_how_to_resume(tiny_model_dir, data_dir, tmp_path):
    cfg = _config_file(tmp_path, tiny_model_dir, data_dir, save_strategy="no", max_steps=200)
    run = tmp_path / "run"
    proc = _cli("train", str(cfg), "--out", str(run))
    _wait_for_step(run, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "--resume" in err and "Traceback" not in err
    ckpts = list((run / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "checkpoint.json").is_file()


def test_nan_loss_stops_within_the_same_step_and_keeps_the_last_good_checkpoint(tiny_model_dir, data_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan-model"
    bad.mkdir()
    for f in tiny_model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(bad / "model.safetensors"))
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    cfg = _config_file(tmp_path, bad, data_dir)
    result = _run("train", str(cfg), "--out", str(tmp_path / "run"))
    assert result.returncode == 1
    assert "NaN" in result.stderr and "step 1" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "adapter").exists()


def test_partial_and_corrupt_checkpoints_are_skipped_for_the_previous_good_one(tiny_model_dir, data_dir, tmp_path):
    from tunesmith.train import checkpoint

    cfg = _config_file(tmp_path, tiny_model_dir, data_dir, max_steps=3)
    assert _run("train", str(cfg), "--out", str(tmp_path / "run")).returncode == 0
    root = tmp_path / "run" / "checkpoints"
    good = checkpoint.latest(root)
    assert good is not None and good.step == 2  # the final step writes the model, not a checkpoint
    # a write killed before its rename, and a renamed checkpoint whose file was later damaged
    (root / ".tmp-3").mkdir()
    (root / ".tmp-3" / "trainable.safetensors").write_bytes(b"partial")
    damaged = root / "step-4"
    damaged.mkdir()
    for f in good.path.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    (damaged / "states.pt").write_bytes(b"garbage")
    assert checkpoint.latest(root).step == 2


def test_disk_full_while_saving_is_a_clear_error_and_the_previous_checkpoint_still_loads(tmp_path, monkeypatch):
    from tunesmith.train import checkpoint

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    root = tmp_path / "ckpt"
    checkpoint.save(root, 1, model, opt, sched, {"step": 1}, keep=None)

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(RunError, match="disk full"):
        checkpoint.save(root, 2, model, opt, sched, {"step": 2}, keep=None)
    assert [d.name for d in root.iterdir()] == ["step-1"]
    latest = checkpoint.latest(root)
    checkpoint.restore(latest, model, opt, sched)
    assert latest.step == 1


def test_resume_with_a_changed_config_is_refused(tiny_model_dir, data_dir, tmp_path):
    cfg = _config_file(tmp_path, tiny_model_dir, data_dir, max_steps=3)
    assert _run("train", str(cfg), "--out", str(tmp_path / "run")).returncode == 0
    changed = _config_file(tmp_path, tiny_model_dir, data_dir, max_steps=3, learning_rate=5e-3)
    result = _run("train", str(changed), "--out", str(tmp_path / "run"), "--resume")
    assert result.returncode == 2
    assert "differ" in result.stderr and "on_config_change" in result.stderr


def test_pickle_weights_are_refused_without_being_executed(tiny_model_dir, tmp_path):
    from tunesmith.config import ModelConfig
    from tunesmith.models import load_model

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    torch.save({"x": Payload()}, evil / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickle"):
        load_model(ModelConfig(name_or_path=str(evil)))
    assert not marker.exists()


def test_a_config_typo_exits_2_naming_key_and_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name_or_path: local:tiny\ntrain:\n  method: lora\n  lerning_rate: 1e-4\n")
    result = _run("validate", str(bad))
    assert result.returncode == 2
    assert "bad.yaml:5" in result.stderr and "lerning_rate" in result.stderr and "learning_rate" in result.stderr
    assert "Traceback" not in result.stderr


def test_trust_remote_code_is_off_by_default(tiny_model_dir, tmp_path):
    from tunesmith.config import ModelConfig
    from tunesmith.models import resolve_model_path

    remote = tmp_path / "remote"
    remote.mkdir()
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (remote / "config.json").write_text(json.dumps(cfg))
    (remote / "model.safetensors").write_bytes((tiny_model_dir / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match="trust_remote_code"):
        resolve_model_path(ModelConfig(name_or_path=str(remote)))


@pytest.mark.parametrize("policy", ["fail", "shrink"])
def test_out_of_memory_gives_advice_or_retries_with_smaller_micro_batches(tiny_model_dir, data_dir, tmp_path,
                                                                       monkeypatch, policy):
    from train_fixtures import config
    from tunesmith.train import loop, train

    real_loss = loop.loss_sum

    def tight_memory(model, batch, *args, **kwargs):  # pretend only micro-batches of <= 2 sequences fit
        if batch.input_ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_loss(model, batch, *args, **kwargs)

    common = {"method": "full", "max_steps": 2, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}
    train(config(tiny_model_dir, data_dir, **common), out_dir=tmp_path / "roomy")
    monkeypatch.setattr(loop, "loss_sum", tight_memory)
    cfg = config(tiny_model_dir, data_dir, on_oom=policy, **common)
    if policy == "fail":
        with pytest.raises(RunError, match="out of GPU memory") as err:
            train(cfg, out_dir=tmp_path / "tight")
        assert "estimates" in err.value.message and "on_oom: shrink" in err.value.hint
        return
    train(cfg, out_dir=tmp_path / "tight")
    # the retried steps hold the same sequences, so the optimisation is unchanged
    for a, b in zip(metrics(tmp_path / "roomy"), metrics(tmp_path / "tight"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_data_inspect_shows_the_trained_on_tokens(tiny_model_dir, data_dir, tmp_path):
    cfg = _config_file(tmp_path, tiny_model_dir, data_dir)
    result = _run("data", "inspect", str(cfg), "--index", "2", "--json")
    assert result.returncode == 0, result.stderr
    view = json.loads(result.stdout)
    trained = "".join(text for text, supervised in view["segments"] if supervised)
    assert trained.startswith("The answer is ") and trained.endswith("<|im_end|>")
    assert view["line"] == 3 and view["num_supervised"] > 0


def test_a_hub_id_while_offline_is_one_message(tmp_path):
    from tunesmith.config import ModelConfig
    from tunesmith.models import load_tokenizer

    with pytest.raises(UserError, match="cannot load hub model") as err:
        load_tokenizer(ModelConfig(name_or_path="nobody-here/no-such-model"))
    assert "download it once" in err.value.hint


def test_a_model_without_chat_template_needs_one_from_the_config(tiny_model_dir, tmp_path):
    from tunesmith.config import ModelConfig
    from tunesmith.local_model import CHATML_TEMPLATE
    from tunesmith.models import load_tokenizer

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name != "chat_template.jinja":
            (bare / f.name).write_bytes(f.read_bytes())
    cfg_json = json.loads((bare / "tokenizer_config.json").read_text())
    cfg_json.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg_json))
    with pytest.raises(UserError, match="no chat template") as err:
        load_tokenizer(ModelConfig(name_or_path=str(bare)))
    assert "model.chat_template" in err.value.hint
    tok = load_tokenizer(ModelConfig(name_or_path=str(bare), chat_template=CHATML_TEMPLATE))
    assert tok.chat_template == CHATML_TEMPLATE


def test_debug_shows_the_traceback_that_is_otherwise_hidden(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  methd: lora\n")
    assert "Traceback" not in _run("validate", str(bad)).stderr
    debug = _run("--debug", "validate", str(bad))
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "UserError" in debug.stderr


def test_the_out_of_memory_estimate_uses_the_packed_row_budget_when_one_is_set(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tunesmith.config import TrainConfig
    from tunesmith.train.loop import _oom_error

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cpu = torch.device("cpu")
    rows = _oom_error(model, TrainConfig(per_device_train_batch_size=2, packed_row_tokens=5120), 2, cpu).message
    plain = _oom_error(model, TrainConfig(per_device_train_batch_size=2), 2, cpu).message
    assert "micro-batches of 1 × 5120 tokens" in rows
    assert "micro-batches of 2 × 2048 tokens" in plain
