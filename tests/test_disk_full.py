"""A full disk, for real: each write site runs onto a small tmpfs until it runs out of space. Each ends in one
message naming the path and the free space, exit code 1, nothing partial left and earlier outputs intact."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gguf_fixtures import needs_gguf
from records_fixtures import write_train_run
from test_merge import make_adapter
from train_fixtures import write_arithmetic

SRC = str(Path(__file__).resolve().parents[1] / "src")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)")


class SmallDisk:
    """A tmpfs of a few hundred KB or MB: a real file system that runs out of space (or, ``ro``, refuses writes)."""

    def __init__(self, path: Path, size: str, options: str = "") -> None:
        self.path = path
        path.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(path)], check=True)

    def grow(self, size: str) -> None:
        """Free space the way an operator would: give the file system more room."""
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def files(self) -> list[str]:
        """Every file and folder on it, relative, hidden ones included."""
        return sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*"))

    def umount(self) -> None:
        subprocess.run(["umount", str(self.path)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    disks = []

    def make(size: str, options: str = "") -> SmallDisk:
        disks.append(SmallDisk(tmp_path / f"disk{len(disks)}", size, options))
        return disks[-1]

    yield make
    for disk in disks:
        disk.umount()


def tunesmith(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tunesmith", *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


def assert_one_disk_full_message(proc: subprocess.CompletedProcess, path: Path) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out, out
    assert "disk full while writing" in out and str(path) in out and " free" in out, out
    return out


def train_config(tmp_path: Path, model_dir: Path, data_dir: Path, **train) -> Path:
    body = {"model": {"name_or_path": str(model_dir)},
            "train": {"dataset": str(data_dir), "method": "full", "learning_rate": 1e-3, "max_steps": 6,
                      "per_device_train_batch_size": 4, "deterministic": True, "save_strategy": "steps",
                      "save_steps": 1, "save_total_limit": 10, "eval_strategy": "no", "logging_steps": 1, **train}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_a_checkpoint_that_does_not_fit_is_one_message_and_the_run_resumes_from_the_earlier_ones(
        tiny_model_dir, tmp_path, small_disk):
    # full fine-tuning of the tiny model: a checkpoint is ~1.7 MB (weights 0.56 MB + AdamW's two moments), so
    # three fit on 5 MB and the fourth does not
    disk = small_disk("5m")
    run = disk.path / "run"
    cfg = train_config(tmp_path, tiny_model_dir, write_arithmetic(tmp_path / "data", n_train=64))

    proc = tunesmith("train", str(cfg), "--out", str(run))

    out = assert_one_disk_full_message(proc, run / "checkpoints")
    assert "checkpoint 4" in out and "checkpoint 3 is intact" in out and "--resume" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2", "step-3"]
    assert not (run / "model").exists()

    disk.grow("20m")
    resumed = tunesmith("train", str(cfg), "--out", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (run / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize(("method", "size"), [("full", "400k"), ("lora", "48k")])
def test_a_final_save_that_does_not_fit_leaves_no_half_written_folder(method, size, tiny_model_dir, tmp_path,
                                                                      small_disk):
    # the full model is 0.56 MB of weights; the adapter folder holds a 66 KB tokenizer.json
    disk = small_disk(size)
    run = disk.path / "run"
    cfg = train_config(tmp_path, tiny_model_dir, write_arithmetic(tmp_path / "data", n_train=16), method=method,
                       max_steps=2, save_strategy="no")

    proc = tunesmith("train", str(cfg), "--out", str(run))

    assert_one_disk_full_message(proc, run / ("model" if method == "full" else "adapter"))
    assert disk.files() == ["run", "run/metrics.jsonl"]


def _chats(n: int, words: int) -> str:
    """Distinct chats (no two alike, so cleaning keeps them), ``words`` random words per question."""
    rng = random.Random(n)
    vocabulary = [f"{a}{b}{c}" for a in "bcdfg" for b in "aeiou" for c in "klmnprst"]
    return "".join(json.dumps({"messages": [
        {"role": "user", "content": " ".join(rng.choices(vocabulary, k=words))},
        {"role": "assistant", "content": " ".join(rng.choices(vocabulary, k=12))}]}) + "\n" for _ in range(n))


def test_data_prepare_that_does_not_fit_leaves_the_earlier_prepared_folder_as_it_was(tiny_model_dir, tmp_path,
                                                                                      small_disk):
    disk = small_disk("1m")
    out = disk.path / "prepared"
    (tmp_path / "small.jsonl").write_text(_chats(40, 12))
    (tmp_path / "large.jsonl").write_text(_chats(3000, 80))  # ~1.7 MB of train.jsonl: does not fit
    model = f"model.name_or_path={tiny_model_dir}"
    first = tunesmith("data", "prepare", str(tmp_path / "small.jsonl"), "--out", str(out), "--set", model)
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    proc = tunesmith("data", "prepare", str(tmp_path / "large.jsonl"), "--out", str(out), "--set", model)

    assert_one_disk_full_message(proc, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging folder, no half train.jsonl


def test_data_prepare_onto_a_read_only_file_system_is_one_message(tiny_model_dir, tmp_path, small_disk):
    disk = small_disk("1m", ",ro")
    (tmp_path / "small.jsonl").write_text(_chats(40, 12))

    proc = tunesmith("data", "prepare", str(tmp_path / "small.jsonl"), "--out", str(disk.path),
                     "--set", f"model.name_or_path={tiny_model_dir}")

    out = proc.stdout + proc.stderr
    # the --out check (paths.py) finds it before any work: a place the user can change, exit 2
    assert proc.returncode == 2 and "Traceback" not in out, out
    assert f"--out {disk.path}: cannot write there" in out and "read-only" in out, out


def test_a_merge_that_does_not_fit_leaves_no_merged_folder(tiny_model_dir, tmp_path, small_disk):
    run = tmp_path / "run"
    make_adapter(tiny_model_dir, run / "adapter")
    write_train_run(run, tiny_model_dir)
    disk = small_disk("256k")  # the merged model is 0.56 MB

    proc = tunesmith("merge", str(run), "--dtype", "float32", "--out", str(disk.path / "merged"))

    assert_one_disk_full_message(proc, disk.path / "merged")
    assert disk.files() == []


@needs_gguf
def test_a_gguf_export_that_does_not_fit_says_the_disk_is_full(tiny_model_dir, small_disk):
    disk = small_disk("128k")  # the f16 GGUF of the tiny model is ~0.3 MB

    proc = tunesmith("export", str(tiny_model_dir), "--format", "gguf", "--quant", "f16", "--no-verify",
                     "--out", str(disk.path / "gguf"))

    out = assert_one_disk_full_message(proc, disk.path / "gguf" / "model-f16.gguf")
    assert "needs about" in out
    assert [f for f in disk.files() if f.endswith((".gguf", ".partial"))] == []


def test_a_report_that_does_not_fit_leaves_the_earlier_report_as_it_was(tmp_path, small_disk):
    from tunesmith.errors import RunError
    from tunesmith.records import StageRecord
    from tunesmith.report import write_report

    StageRecord(stage="merge", key="0" * 16, status="done", seconds=1.0, summary="merge done",
                outputs={"model_dir": "m", "result": {"parity": {}, "warnings": []}}, finished=0.0).write(
        tmp_path / "merge")
    (tmp_path / "config.json").write_text("{}")
    disk = small_disk("64k")
    out = disk.path / "report"
    write_report(tmp_path, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (disk.path / "filler").write_bytes(b"\0" * (disk_free(disk.path) - 4096))  # one page left

    with pytest.raises(RunError, match="disk full while writing") as caught:
        write_report(tmp_path, out)

    assert str(out) in str(caught.value) and " free" in str(caught.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def disk_free(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize
