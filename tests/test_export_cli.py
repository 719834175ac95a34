"""The merge / export / serve commands: one JSON object with --json, one message and exit 2 for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from records_fixtures import write_train_run
from test_merge import make_adapter

SRC = str(Path(__file__).resolve().parents[1] / "src")


def tunesmith(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "tunesmith", *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


def test_merge_command_prints_one_json_object_with_the_parity(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    make_adapter(tiny_model_dir, run / "adapter")
    write_train_run(run, tiny_model_dir)

    proc = tunesmith("merge", str(run), "--dtype", "float32", "--json")

    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["out_dir"] == str(run / "merged")
    assert result["parity"]["passed"] is True
    assert (run / "merged" / "model.safetensors").is_file()


def test_merge_of_a_run_without_adapter_exits_2_with_one_message(tmp_path):
    (tmp_path / "run").mkdir()

    proc = tunesmith("merge", str(tmp_path / "run"))

    assert proc.returncode == 2
    assert "error:" in proc.stderr and "no adapter_config.json" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_dry_run_binds_loopback_by_default(tmp_path):
    gguf = tmp_path / "model-f16.gguf"
    gguf.write_bytes(b"GGUF")

    proc = tunesmith("serve", str(gguf), "--port", "8123", "--dry-run", "--json")

    if proc.returncode == 2 and "llama-cpp-python" in proc.stderr:
        return  # the server is not installed here; its message is the behaviour
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["base_url"] == "http://127.0.0.1:8123/v1"
    assert plan["engine"] == "llama.cpp"
