"""CLI conventions, in-process through ``main(argv) -> int``: exit codes, ``--json`` errors as JSON on stdout, shell
completion, and resuming training from a named checkpoint, refused with the changed keys named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train_fixtures import write_arithmetic
from tunesmith.cli import main
from tunesmith.errors import RunError, UserError
from tunesmith.train import checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, name: str = "cfg", **values) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


# -- exit codes and --json errors ------------------------------------------------------------------------------------

def test_main_returns_zero_and_prints_the_result(tmp_path, capsys):
    assert main(["validate", str(_config(tmp_path, train={"learning_rate": 0.001})), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["learning_rate"] == 0.001


def test_a_user_error_with_json_is_one_json_object_on_stdout_with_the_usual_exit_code(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert main(["validate", str(missing), "--json"]) == UserError.exit_code == 2
    captured = capsys.readouterr()
    error = json.loads(captured.out)["error"]
    assert error["message"] == f"{missing}: config file not found"
    assert error["hint"] and error["kind"] == "user_error" and error["exit_code"] == 2
    assert "error:" not in captured.err


def test_without_json_the_same_error_is_text_on_stderr(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "error:" in captured.err and "config file not found" in captured.err


def test_a_run_error_with_json_keeps_its_exit_code_and_kind(tmp_path, capsys, monkeypatch):
    def failing(*_a, **_k):
        raise RunError("disk full while writing", hint="free disk space")

    monkeypatch.setattr("tunesmith.config.load_config", failing)
    assert main(["validate", str(_config(tmp_path)), "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == {"error": {
        "message": "disk full while writing", "hint": "free disk space", "kind": "run_error", "exit_code": 1}}


def test_json_errors_follow_the_command_that_asked_not_an_earlier_call(tmp_path, capsys):
    main(["validate", str(tmp_path / "missing.yaml"), "--json"])
    capsys.readouterr()
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().out == ""


def test_usage_mistakes_and_help_return_clicks_codes(capsys):
    assert main(["train", "--no-such-option"]) == 2
    assert main(["train", "--help"]) == 0
    assert "--from-checkpoint" in capsys.readouterr().out


def test_main_reads_the_process_arguments_when_given_none(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["tunesmith", "validate", str(tmp_path / "missing.yaml"), "--json"])
    assert main() == 2
    assert "error" in json.loads(capsys.readouterr().out)


def test_the_module_entry_point_exits_with_mains_code(tmp_path):
    run = subprocess.run([sys.executable, "-m", "tunesmith", "validate", str(tmp_path / "missing.yaml"), "--json"],
                         capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin"},
                         timeout=120)
    assert run.returncode == 2 and json.loads(run.stdout)["error"]["kind"] == "user_error"


def test_shell_completion_is_on(capsys):
    assert main(["--show-completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert "_TUNESMITH_COMPLETE" in script and "complete " in script


# -- resume: a named checkpoint; a changed config names what changed -------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    """A 3-step LoRA run that checkpointed every step (step-1, step-2; the last step is the final save)."""
    root = tmp_path_factory.mktemp("resume")
    data = write_arithmetic(root / "data", n_train=16, n_eval=4)
    train = {"dataset": str(data), "method": "lora", "learning_rate": 0.01, "max_steps": 3,
             "per_device_train_batch_size": 4, "save_strategy": "steps", "save_steps": 1, "save_total_limit": 5,
             "eval_strategy": "no", "logging_steps": 1, "deterministic": True}
    cfg = _config(root, model={"name_or_path": str(tiny_model_dir)}, train=train)
    assert main(["train", str(cfg), "--out", str(root / "run"), "--json"]) == 0
    return root, cfg, train


def test_from_checkpoint_continues_from_that_checkpoint_not_the_newest(trained_run, tmp_path):
    from tunesmith.config import load_config
    from tunesmith.train import train

    root, cfg, _ = trained_run
    run = tmp_path / "run"
    import shutil

    shutil.copytree(root / "run", run)
    events: list[dict] = []
    result = train(load_config(cfg), out_dir=run, resume=run / "checkpoints" / "step-1", on_event=events.append)
    assert [e["step"] for e in events if e["event"] == "resumed"] == [1]
    assert result.steps == 3


def test_from_checkpoint_through_the_cli_finishes_the_run(trained_run, tmp_path, capsys):
    import shutil

    root, cfg, _ = trained_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    capsys.readouterr()
    assert main(["train", str(cfg), "--out", str(run), "--from-checkpoint", str(run / "checkpoints" / "step-2"),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 3


def test_a_checkpoint_of_another_run_is_refused_naming_the_run_it_belongs_to(trained_run, tmp_path, capsys):
    root, cfg, _ = trained_run
    other = root / "run" / "checkpoints" / "step-2"
    assert main(["train", str(cfg), "--out", str(tmp_path / "new"), "--from-checkpoint", str(other), "--json"]) == 2
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["message"] == (f"--from-checkpoint {other}: not a checkpoint of this run "
                                f"(its checkpoints are in {tmp_path / 'new' / 'checkpoints'})")
    assert error["hint"] == f"pass --out {root / 'run'} to continue the run it belongs to"


def test_an_incomplete_or_missing_checkpoint_is_refused(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-4").mkdir(parents=True)
    with pytest.raises(UserError, match=r"step-4: not a complete checkpoint \(no checkpoint.json"):
        checkpoint.chosen(root, root / "step-4")
    with pytest.raises(UserError, match=r"step-9: no such checkpoint"):
        checkpoint.chosen(root, root / "step-9")
    assert checkpoint.chosen(root, True) is None  # --resume: the newest complete one, here none


def test_a_changed_config_on_resume_is_refused_naming_the_changed_keys(trained_run, capsys):
    root, _, train = trained_run
    changed = _config(root, "changed", model={"name_or_path": yaml.safe_load((root / "cfg.yaml").read_text())[
        "model"]["name_or_path"]}, train={**train, "learning_rate": 0.005, "lora": {"r": 4}})
    assert main(["train", str(changed), "--out", str(root / "run"), "--resume", "--json"]) == 2
    message = json.loads(capsys.readouterr().out)["error"]["message"]
    assert message == ("--resume: the config or data differ from those of checkpoint step-2; changed: "
                       "train.learning_rate (0.01 → 0.005); train.lora.r (16 → 4)")


def test_a_changed_data_file_is_named(trained_run, tmp_path):
    root, _, _ = trained_run
    state = json.loads((root / "run" / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    recorded = state["fingerprint_inputs"]
    assert state["fingerprint"] == checkpoint.Fingerprint(recorded["config"], recorded["model"], tuple(
        (f["path"], f["sha256"]) for f in recorded["files"])).digest
    edited = tmp_path / "train.jsonl"
    edited.write_text(Path(recorded["files"][0]["path"]).read_text() + "\n")
    now = checkpoint.fingerprint(recorded["config"], recorded["model"],
                                 [edited, Path(recorded["files"][1]["path"])])
    assert checkpoint.changes(state, now) == ["data file train.jsonl"]


def test_a_checkpoint_from_before_the_record_keeps_the_old_digest_and_message():
    import hashlib

    now = checkpoint.Fingerprint({"learning_rate": 0.01}, "tiny", (("train.jsonl", "ab" * 32),))
    # the digest as train/loop.py computed it before the inputs were recorded: old checkpoints still match
    old = hashlib.sha256(json.dumps([{"learning_rate": 0.01}, "tiny"], sort_keys=True).encode())
    old.update(("ab" * 32).encode())
    assert now.digest == old.hexdigest()[:16]
    assert checkpoint.changes({"step": 3, "fingerprint": "0" * 16}, now) == []
