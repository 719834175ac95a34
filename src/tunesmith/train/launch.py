"""The train stage as torchrun processes: ``tunesmith train --gpus N``'s launch, driven from a parent that reports.

A job (or a pipeline) given more than one GPU trains as ``torchrun --standalone --nproc-per-node N -m tunesmith
train CONFIG --out RUN --json --events RUN/events.jsonl [--resume]`` — the same command, FSDP2 included, that
``tunesmith train --gpus N`` relaunches itself as — while the rest of the pipeline stays in the parent. Rank 0
appends every event its training loop emits to the events file; the parent reads the file as it grows and hands
the events on, so its ``on_event`` sees exactly what an in-process train stage would have emitted (step, eval,
checkpoint, resumed, warnings), as they happen.

torchrun runs in its own process group. A stop signal in the parent (a pause, a cancel) stops that group: SIGTERM
reaches torchrun and its ranks, whose loop writes a checkpoint at the step boundary and exits; the events written
meanwhile (that checkpoint) are still handed on before the stop goes on up.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import processes
from .loop import TrainResult

Event = Callable[[dict[str, Any]], None]

EVENTS = "events.jsonl"
"""Rank 0's events, one JSON object a line, in the run folder."""
CONFIG = "torchrun-config.json"
"""The config the ranks train with (the pipeline's, as its earlier stages left it), in the run folder."""
LOG = "torchrun.log"
STOP_TIMEOUT_S = 120.0
"""How long the ranks get, after SIGTERM, to write their checkpoint (as ``tunesmith train --gpus``)."""
POLL_S = 0.2
"""How often the parent reads the events file while the ranks train."""


def torchrun(processes: int, *tunesmith_args: str) -> list[str]:
    """``tunesmith ARGS`` as ``processes`` torchrun processes on this machine (one per GPU)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "-m", "tunesmith", *tunesmith_args]


def torchrun_command(*, processes: int, config_file: Path, run_dir: Path, resume: bool) -> list[str] | None:
    """The command that trains as ``processes`` torchrun processes, or None: one process trains in-process (one GPU,
    or the CPU)."""
    if processes <= 1:
        return None
    return torchrun(processes, "train", str(config_file), "--out", str(run_dir), "--json",
                    "--events", str(run_dir / EVENTS), *(["--resume"] if resume else []))


def append_event(path: Path, event: dict[str, Any]) -> None:
    """One event as one line; written whole, then flushed, so the reader never sees half of one."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(event, default=str) + "\n")


def run_torchrun(command: list[str], *, run_dir: Path, emit: Event) -> TrainResult:
    """Run ``command`` (``torchrun_command``) to its end, handing its events to ``emit`` as they are written; the
    run's result as run.json records it. A failed run is a RunError quoting torchrun's log."""
    events = _Tail(run_dir / EVENTS)
    events.path.unlink(missing_ok=True)  # an earlier attempt's events were handed on by that attempt
    try:
        with processes.running(command, what="torchrun", log_path=run_dir / LOG,
                               stop_timeout_s=STOP_TIMEOUT_S) as child:
            while child.process.poll() is None:
                for event in events.read():
                    emit(event)
                time.sleep(POLL_S)
    finally:  # a stop too: the ranks' last events (the checkpoint they wrote on SIGTERM) are reported
        for event in events.read():
            emit(event)
    if child.returncode != 0:
        raise processes.failure(child, child.returncode)
    result = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["result"]
    return TrainResult(**{**result, "warnings": tuple(result["warnings"])})


class _Tail:
    """The complete lines added to a file since the last read."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        complete = chunk[:chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]
