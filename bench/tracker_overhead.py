"""Benchmark: what ``train.report_to`` costs the training loop, per tracker, on a tiny model on the CPU.

The tiny model's steps are short (tens of milliseconds), so a tracker's cost shows at its largest here; a real
model's steps take seconds. Each tracker (and all three together) is opened as ``train()`` opens it and wrapped in
a timer that measures the time the loop's thread spends inside ``Trackers.log`` (a queue put: the trackers write
from their own thread); the step time is the run's wall time less that. Overhead = time in the trackers / step
time, with a record logged every step
(``logging_steps: 1``, the worst case) and every 10 (the default). A run without trackers gives the plain step time
for comparison: the wall time per step of each run is in the table too, but on a shared machine the difference
between runs is noise of several percent (and the trackers' thread competes for the same cores), which is why the
in-loop timer is the measurement.

Usage: OMP_NUM_THREADS=1 PYTHONPATH=src python bench/tracker_overhead.py [--steps 60]
Writes bench/results/tracker_overhead.json and bench/results/tracker_overhead.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Timed:
    """The run's trackers, with the time the loop spends in ``log`` (and the calls) counted."""

    def __init__(self, trackers) -> None:
        self.trackers = trackers
        self.seconds = 0.0
        self.calls = 0

    def log(self, record, step) -> None:
        start = time.perf_counter()
        self.trackers.log(record, step)
        self.seconds += time.perf_counter() - start
        self.calls += 1

    def close(self) -> None:
        self.trackers.close()


def one_run(model_dir: Path, examples, names: list[str], logging_steps: int, steps: int, out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.config import TrainConfig
    from tunesmith.hardware.machine import Hardware
    from tunesmith.train import StepSetup, fit, tracking
    from tunesmith.train.distributed import Processes
    from tunesmith.train.model import prepare_model
    from tunesmith.train.plan import Precision, plan_training

    tcfg = TrainConfig(method="full", max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                       learning_rate=1e-3, logging_steps=logging_steps, eval_strategy="no", save_strategy="no",
                       compile=False, gradient_checkpointing=False, report_to=names)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = prepare_model(model, tcfg, plan_training(model.config, tcfg, hardware=Hardware.cpu(), world=1))
    setup = StepSetup(procs=Processes.single(torch.device("cpu")), precision=Precision(torch.float32, None),
                      optimizer="adamw_torch", pad_id=0, packed=False, fused_loss=False)
    opened = time.perf_counter()
    trackers = Timed(tracking.open_trackers(names, out=out, config={"train": tcfg.model_dump(mode="json")},
                                            run_name=out.name))
    opened = time.perf_counter() - opened
    start = time.perf_counter()
    fit(model=model, setup=setup, tcfg=tcfg, train_examples=examples, eval_examples=[], out=out, trackers=trackers)
    wall = time.perf_counter() - start
    closing = time.perf_counter()
    trackers.close()
    closing = time.perf_counter() - closing
    step_s = (wall - trackers.seconds) / steps
    return {"trackers": names, "logging_steps": logging_steps, "steps": steps, "wall_s": wall,
            "wall_step_ms": 1000 * wall / steps, "step_ms": 1000 * step_s,
            "in_trackers_ms_per_step": 1000 * trackers.seconds / steps,
            "per_log_call_ms": 1000 * trackers.seconds / max(trackers.calls, 1),
            "overhead_pct": 100 * trackers.seconds / (wall - trackers.seconds), "open_s": opened,
            "close_s": closing}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    sys.path.insert(0, str(ROOT / "src"))
    from tunesmith.chat import TokenizedChat
    from tunesmith.local_model import TINY_CORPUS, build_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("WANDB_DIR", tmp)
        model_dir = build_model(Path(tmp) / "tiny", list(TINY_CORPUS) * 20, vocab_size=512)
        examples = [TokenizedChat(ids, list(ids)) for ids in ([(7 * k + j) % 500 + 3 for j in range(64)]
                                                              for k in range(32))]
        sets = [[], ["tensorboard"], ["mlflow"], ["wandb"], ["tensorboard", "mlflow", "wandb"]]
        for logging_steps in (1, 10):
            for n, names in enumerate(sets):
                out = Path(tmp) / f"run-{logging_steps}-{n}"
                rows.append(one_run(model_dir, examples, names, logging_steps, args.steps, out))
                print(json.dumps(rows[-1]), flush=True)
    plain = {r["logging_steps"]: r["step_ms"] for r in rows if not r["trackers"]}
    doc = {"benchmark": "tracker_overhead", "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
           "cpus": os.cpu_count(), "python": platform.python_version(), "model": "tiny Llama (2 layers, hidden 64)",
           "batch": "4 sequences × 64 tokens, full fine-tuning, fp32 on the CPU", "rows": rows,
           "plain_step_ms": plain, "target_pct": 2.0,
           "max_overhead_pct_default_logging": max(r["overhead_pct"] for r in rows
                                                   if r["trackers"] and r["logging_steps"] == 10),
           "max_overhead_pct_every_step": max(r["overhead_pct"] for r in rows
                                              if r["trackers"] and r["logging_steps"] == 1)}
    results = ROOT / "bench" / "results"
    (results / "tracker_overhead.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# Tracker overhead (tiny model, CPU)", "",
             f"`OMP_NUM_THREADS=1 PYTHONPATH=src python bench/tracker_overhead.py --steps {args.steps}` on "
             f"{doc['cpus']} CPUs ({doc['date']}); {doc['batch']}. Overhead = time the loop spent inside the "
             "trackers' `log` / the rest of the step time.", "",
             "| trackers | logging_steps | wall ms/step | step ms | in trackers ms/step | per log call ms | overhead "
             "| open s | close s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {', '.join(r['trackers']) or 'none'} | {r['logging_steps']} | {r['wall_step_ms']:.1f} | "
                     f"{r['step_ms']:.1f} | "
                     f"{r['in_trackers_ms_per_step']:.3f} | {r['per_log_call_ms']:.3f} | {r['overhead_pct']:.2f}% | "
                     f"{r['open_s']:.2f} | {r['close_s']:.2f} |")
    lines += ["", f"Largest overhead: {doc['max_overhead_pct_default_logging']:.2f}% with the default logging_steps "
              f"(10), {doc['max_overhead_pct_every_step']:.2f}% logging every step; target ≤ 2%.",
              f"Median plain step: {statistics.median(plain.values()):.1f} ms.", ""]
    (results / "tracker_overhead.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
