"""Bad paths, bad flags and signals, command by command: one message naming the option, the path or the override and
the fix, exit 2 (1 for a runtime failure, 130 for a signal), no traceback, and nothing written."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from records_fixtures import write_train_run
from test_merge import make_adapter
from train_fixtures import write_arithmetic
from tunesmith.cli import main
from tunesmith.records import sha256_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    """A project folder with one of each bad path, a LoRA run, a full run and (as root) a read-only mount."""
    w = tmp_path_factory.mktemp("world")
    data = write_arithmetic(w / "data", n_train=16)
    (w / "cfg.yaml").write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_model_dir)},
        "train": {"dataset": str(data), "method": "lora", "max_steps": 2, "eval_strategy": "no",
                  "save_strategy": "no"}}))
    (w / "a_file.txt").write_text("hello\n")
    (w / "a_dir").mkdir()
    (w / "empty.yaml").write_text("")
    (w / "empty.jsonl").write_text("")
    (w / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (w / "list.yaml").write_text("- model\n- train\n")
    (w / "syntax.yaml").write_text("model:\n  name_or_path: [unclosed\n")
    make_adapter(tiny_model_dir, w / "lora" / "adapter")
    write_train_run(w / "lora", tiny_model_dir)
    shutil.copytree(tiny_model_dir, w / "full" / "model")
    write_train_run(w / "full", tiny_model_dir, method="full")
    (w / "ro").mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(w / "ro")], capture_output=True).returncode == 0
    yield w, mounted
    if mounted:
        subprocess.run(["umount", str(w / "ro")], check=False)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# (id, arguments with {w} for the world folder, exit code, what the message must say)
CASES = [
    # configs: missing, a folder, empty, binary, not a mapping, a YAML syntax error
    ("config-missing", "validate {w}/nope.yaml", 2, ["nope.yaml: config file not found"]),
    ("config-is-a-folder", "train {w}/a_dir", 2, ["a_dir: is a folder, not a config file"]),
    ("config-empty", "validate {w}/empty.yaml", 2, ["empty.yaml: the config file is empty", "tunesmith init"]),
    ("config-binary", "validate {w}/binary.yaml", 2, ["binary.yaml: not valid YAML"]),
    ("config-not-a-mapping", "eval {w}/list.yaml", 2, ["list.yaml:1: the config must be a mapping"]),
    ("config-yaml-syntax", "run {w}/syntax.yaml", 2, ["syntax.yaml:3: not valid YAML"]),
    # --set: the override is named, never a line of the file
    ("set-without-equals", "validate {w}/cfg.yaml --set train.learning_rate", 2,
     ["--set train.learning_rate: expected section.key=value"]),
    ("set-bad-value", "validate {w}/cfg.yaml --set train.learning_rate=abc", 2,
     ["--set train.learning_rate=abc: `train.learning_rate`", "valid number"]),
    ("set-unknown-key", "train {w}/cfg.yaml --set train.lerning_rate=1e-4", 2,
     ["--set train.lerning_rate=1e-4: unknown key", "did you mean `learning_rate`"]),
    ("set-negative", "validate {w}/cfg.yaml --set train.max_steps=-3", 2,
     ["--set train.max_steps=-3: `train.max_steps`", "greater than or equal to 1"]),
    ("set-section-to-a-value", "validate {w}/cfg.yaml --set train=3", 2, ["--set train=3: `train`"]),
    ("set-empty-key", "validate {w}/cfg.yaml --set =3", 2, ["--set =3: empty key"]),
    # an --out that is a file, lies under a file, or is on a read-only disk: refused before any work
    ("train-out-is-a-file", "train {w}/cfg.yaml --out {w}/a_file.txt", 2,
     ["--out {w}/a_file.txt: is a file, not a folder"]),
    ("train-out-under-a-file", "train {w}/cfg.yaml --out {w}/a_file.txt/run", 2,
     ["--out {w}/a_file.txt/run: cannot be created, {w}/a_file.txt is a file"]),
    ("prepare-out-is-a-file", "data prepare {w}/data/train.jsonl --out {w}/a_file.txt", 2,
     ["--out {w}/a_file.txt: is a file, not a folder"]),
    ("prepare-out-under-a-file", "data prepare {w}/data/train.jsonl --out {w}/a_file.txt/p", 2,
     ["cannot be created, {w}/a_file.txt is a file"]),
    ("eval-out-is-a-file", "eval {w}/cfg.yaml --model base --out {w}/a_file.txt", 2,
     ["--out {w}/a_file.txt: is a file"]),
    ("run-out-under-a-file", "run {w}/cfg.yaml --out {w}/a_file.txt/r", 2,
     ["cannot be created, {w}/a_file.txt is a file"]),
    ("merge-out-is-a-file", "merge {w}/lora --out {w}/a_file.txt", 2, ["--out {w}/a_file.txt: is a file"]),
    ("merge-out-under-a-file", "merge {w}/lora --out {w}/a_file.txt/m", 2,
     ["cannot be created, {w}/a_file.txt is a file"]),
    ("export-out-is-a-file", "export {w}/full/model --out {w}/a_file.txt", 2, ["--out {w}/a_file.txt: is a file"]),
    ("init-under-a-file", "init {w}/a_file.txt/t.yaml", 2, ["cannot be written, {w}/a_file.txt is a file"]),
    ("init-into-a-missing-folder", "init {w}/nope/t.yaml", 2, ["the folder {w}/nope does not exist"]),
    ("init-onto-a-folder", "init {w}/a_dir", 2, ["{w}/a_dir: is a folder, not a file"]),
    ("advise-config-under-a-file", "advise --data {w}/data/train.jsonl --model {w}/full/model --driver privacy "
     "--write-config {w}/a_file.txt/c.yaml", 2, ["--write-config {w}/a_file.txt/c.yaml: cannot be written"]),
    ("train-out-read-only", "train {w}/cfg.yaml --out {w}/ro/run", 2,
     ["--out {w}/ro/run: cannot write there, {w}/ro is on a read-only file system"]),
    ("prepare-out-read-only", "data prepare {w}/data/train.jsonl --out {w}/ro/p", 2, ["read-only file system"]),
    ("merge-out-read-only", "merge {w}/lora --out {w}/ro/m", 2, ["read-only file system"]),
    ("eval-out-read-only", "eval {w}/cfg.yaml --model base --out {w}/ro/e", 2, ["read-only file system"]),
    ("init-read-only", "init {w}/ro/t.yaml", 2, ["read-only file system"]),
    # inputs of the wrong kind: a folder where a file is expected and the reverse
    ("prepare-a-folder", "data prepare {w}/a_dir", 2, ["a_dir: is a folder, not a data file"]),
    ("prepare-empty-file", "data prepare {w}/empty.jsonl --out {w}/p", 2, ["empty.jsonl: no examples"]),
    ("advise-data-is-a-folder", "advise --data {w}/a_dir --model {w}/full/model", 2,
     ["--data {w}/a_dir: is a folder, not a file"]),
    ("eval-model-is-a-file", "eval {w}/cfg.yaml --model {w}/a_file.txt", 2,
     ["--model {w}/a_file.txt: is a file, not a model folder"]),
    ("merge-run-is-a-file", "merge {w}/a_file.txt", 2, ["{w}/a_file.txt: is a file, not a run folder"]),
    ("merge-adapter-missing", "merge {w}/lora --adapter {w}/nope --out {w}/m", 2, ["--adapter {w}/nope: not found"]),
    ("export-missing", "export {w}/nope", 2, ["{w}/nope: not found"]),
    ("export-a-file", "export {w}/a_file.txt", 2, ["{w}/a_file.txt: is a file, not a model folder"]),
    ("export-prompts-a-folder", "export {w}/full/model --prompts {w}/a_dir", 2, ["--prompts {w}/a_dir: is a folder"]),
    ("export-prompts-empty", "export {w}/full/model --prompts {w}/empty.jsonl --out {w}/x", 2,
     ["--prompts {w}/empty.jsonl: no conversations"]),
    ("from-checkpoint-missing", "train {w}/cfg.yaml --out {w}/t --from-checkpoint {w}/nope", 2,
     ["--from-checkpoint {w}/nope: no such checkpoint (nothing at that path)"]),
    # a train run folder given to export: the folder to export instead
    ("export-full-run-folder", "export {w}/full", 2,
     ["this is a train run folder; its model is {w}/full/model", "tunesmith export {w}/full/model"]),
    ("export-lora-run-folder", "export {w}/lora", 2, ["merge it first", "tunesmith merge {w}/lora"]),
    ("train-onto-a-finished-run", "train {w}/cfg.yaml --out {w}/lora", 2,
     ["--out {w}/lora: holds a finished train run (run.json)"]),
    # an FP8 base where it cannot run: the plan's refusal on the CPU, the config's for full fine-tuning
    ("fp8-base-on-the-cpu", "train {w}/cfg.yaml --out {w}/t --set train.base_precision=fp8", 2,
     ["train.base_precision: fp8 needs FP8 tensor cores", "the CPU has none", "base_precision: auto"]),
    ("fp8-base-full", "validate {w}/cfg.yaml --set train.method=full --set train.base_precision=fp8", 2,
     ["base_precision fp8 is for method lora", "matmul_precision fp8"]),
    # flags out of range or unknown
    ("gpus-zero", "train {w}/cfg.yaml --gpus 0 --out {w}/t", 2, ["--gpus"]),
    ("gpus-negative", "train {w}/cfg.yaml --gpus -1 --out {w}/t", 2, ["--gpus"]),
    ("format-unknown", "export {w}/full/model --format onnx", 2, ["--format onnx: expected gguf or awq"]),
    ("port-out-of-range", "serve {w}/full/model --port 70000 --dry-run", 2, ["--port"]),
    ("tolerance-negative", "merge {w}/lora --tolerance -1 --out {w}/m", 2, ["--tolerance"]),
    ("index-negative", "data inspect {w}/cfg.yaml --index -1", 2, ["--index"]),
]


@pytest.mark.parametrize(("args", "code", "says"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_path_or_flag_is_one_message_and_exit_code_and_nothing_written(world, capsys, args, code, says):
    w, mounted = world
    if "{w}/ro/" in args and not mounted:
        pytest.skip("a read-only tmpfs needs root")
    before = _tree(w)

    got = main(args.format(w=w).split())

    out = capsys.readouterr()
    text = out.err + out.out
    assert got == code, text
    for words in says:
        assert words.format(w=w) in text, text
    assert "Traceback" not in text
    assert text.count("error:") + text.count("Error") == 1, text
    assert _tree(w) == before, "something was written"


def test_a_set_error_does_not_point_at_a_line_of_the_config_file(world, capsys):
    w, _ = world
    assert main(["validate", str(w / "cfg.yaml"), "--set", "train.learning_rate=abc"]) == 2
    err = capsys.readouterr().err
    assert "--set train.learning_rate=abc" in err and "cfg.yaml:" not in err


def test_an_os_error_no_check_foresaw_is_one_message_not_a_traceback(world, capsys, monkeypatch):
    w, _ = world

    def refuse(*_a, **_k):
        raise PermissionError(13, "Permission denied", str(w / "cfg.yaml"))

    monkeypatch.setattr("tunesmith.config._read_yaml", refuse)
    assert main(["validate", str(w / "cfg.yaml")]) == 1
    err = capsys.readouterr().err
    assert f"{w / 'cfg.yaml'}: Permission denied" in err and "Traceback" not in err


def test_bad_out_folders_in_a_fresh_process_exit_2_without_traceback(world):
    w, _ = world
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for out in (w / "a_file.txt", w / "a_file.txt" / "run"):
        proc = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(w / "cfg.yaml"), "--out", str(out)],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert f"--out {out}" in proc.stderr and "Traceback" not in proc.stderr


# --- a planted pickle in a checkpoint ---------------------------------------------------------------------------


def test_a_planted_pickle_in_states_pt_is_refused_unexecuted_with_one_message(world, tmp_path, capsys):
    w, _ = world
    cfg = w / "cfg.yaml"
    run = tmp_path / "run"
    sets = ["--set", "train.save_strategy=steps", "--set", "train.save_steps=1", "--set", "train.max_steps=3"]
    assert main(["train", str(cfg), "--out", str(run), *sets, "--json"]) == 0
    capsys.readouterr()
    ckpt = max((run / "checkpoints").glob("step-*"))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ckpt / "states.pt").write_bytes(pickle.dumps({"optimizer": Payload()}))
    index = json.loads((ckpt / "checkpoint.json").read_text())  # the checksum matches: only unpickling can tell
    index["files"]["states.pt"] = sha256_file(ckpt / "states.pt")
    (ckpt / "checkpoint.json").write_text(json.dumps(index))

    code = main(["train", str(cfg), "--out", str(run), *sets, "--resume"])

    err = capsys.readouterr().err
    assert code == 2, err
    assert f"checkpoint {ckpt.name}" in err and "states.pt is not a plain tensor file (refused to unpickle)" in err
    assert "--from-checkpoint" in err and "Traceback" not in err
    assert not marker.exists()


# --- signals outside the step boundary --------------------------------------------------------------------------


def _train(cfg: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "tunesmith", "train", str(cfg), "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_start_up_exits_130_with_one_line_and_writes_nothing(world, tmp_path, sig):
    w, _ = world
    run = tmp_path / "run"
    proc = _train(w / "cfg.yaml", run)
    for line in proc.stderr:  # the handler is in place before this line; the model loads after it
        if "loading and planning" in line:
            break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"interrupted by {sig.name} during start-up; nothing was written" in err
    assert "Traceback" not in err
    assert not run.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_to_data_prepare_exits_with_one_line_and_leaves_no_prepared_folder(tmp_path, sig):
    rows = [{"messages": [{"role": "user", "content": f"repeat {i} {i * 7} {i * 13}"},
                          {"role": "assistant", "content": f"Here it is: {i} {i * 7} {i * 13}, and that is all."}]}
            for i in range(3000)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "prepared"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "data", "prepare", str(data), "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # the first progress line: the command runs, its handler is in place
        if "data prepare" in line:
            break
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=120)

    assert proc.returncode == 128 + sig, rest  # before: killed silently (−15 / −1)
    assert f"stopped by {sig.name} before the command finished" in rest
    assert "Traceback" not in rest
    assert not out.exists()


def test_a_second_sigint_stops_mid_step_naming_the_step_and_the_last_checkpoint(tiny_model_dir, tmp_path):
    data = write_arithmetic(tmp_path / "data", n_train=512)
    cfg = tmp_path / "slow.yaml"  # 8 × 64 = 512 sequences a step (seconds on a CPU): both signals land inside one
    cfg.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_model_dir)},
        "train": {"dataset": str(data), "method": "lora", "max_steps": 100, "per_device_train_batch_size": 8,
                  "gradient_accumulation_steps": 64, "eval_strategy": "no", "save_strategy": "steps",
                  "save_steps": 1, "logging_steps": 1}}))
    run = tmp_path / "run"
    proc = _train(cfg, run)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step-1" / "checkpoint.json").is_file():  # step 2 has begun
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)

    assert proc.returncode == 130, err
    assert f"stopped by a second SIGINT during step 2; the last checkpoint is {run / 'checkpoints' / 'step-1'}" in err
    assert "--resume" in err
    assert "Traceback" not in err
    assert all((d / "checkpoint.json").is_file() for d in (run / "checkpoints").glob("step-*"))
