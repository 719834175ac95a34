"""API overhead: create job → first training step through `tunesmith server`, vs `tunesmith run` of the same config.

1. Start `tunesmith server` (one worker) with the data directory in a temporary folder; once it answers, upload a
   chat file and create a job; time from `jobs.create` to the first `Step 1/N` event.
2. Run `tunesmith run` on the config that job ran (its `config.json`), into another folder; time from the process
   start to the first train record in its `train/metrics.jsonl`.
The difference is what the service adds (validation through the data stage, the queue, the worker's child process).
Target (issue 24): ≤ 10 s.

    python bench/server_overhead.py --json-out bench/results/server_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat_file(path: Path, n: int) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i + 1}?"},
                          {"role": "assistant", "content": f"{i} plus {i + 1} is {2 * i + 1}."}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def through_server(root: Path, *, model: str, examples: int, epochs: int) -> tuple[float, Path]:
    from openai import OpenAI

    port = free_port()
    data = root / "server"
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "server", "--port", str(port), "--data-dir",
                             str(data), "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)

        def up() -> bool:
            try:
                client.models.list()
                return True
            except Exception:
                return False

        wait(up, 120, "the server")
        f = client.files.create(file=chat_file(root / "train.jsonl", examples).open("rb"), purpose="fine-tune")
        start = time.perf_counter()
        job = client.fine_tuning.jobs.create(model=model, training_file=f.id, seed=1, method={
            "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": epochs}}})
        wait(lambda: any(e.message.startswith("Step 1/")
                         for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data), 600, "step 1")
        seconds = time.perf_counter() - start
        wait(lambda: client.fine_tuning.jobs.retrieve(job.id).status in ("succeeded", "failed"), 900, "the job")
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    return seconds, data / "jobs" / job.id / "config.json"


def through_cli(root: Path, config_json: Path) -> float:
    config = json.loads(config_json.read_text())
    path = root / "cli.yaml"
    path.write_text(yaml.safe_dump(config))
    out = root / "cli-run"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "run", str(path), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "train" / "metrics.jsonl"
    wait(lambda: metrics.is_file() and '"type": "train"' in metrics.read_text(), 600, "the CLI's step 1")
    seconds = time.perf_counter() - start
    proc.wait(timeout=900)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="local:demo")
    parser.add_argument("--examples", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server_s, config_json = through_server(root, model=args.model, examples=args.examples, epochs=args.epochs)
        cli_s = through_cli(root, config_json)
    result = {"command": "python bench/server_overhead.py " + " ".join(sys.argv[1:]),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}",
              "model": args.model, "examples": args.examples,
              "server_create_to_step_1_s": round(server_s, 2), "cli_start_to_step_1_s": round(cli_s, 2),
              "overhead_s": round(server_s - cli_s, 2), "target_s": 10}
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
