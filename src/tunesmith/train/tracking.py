"""Experiment trackers named by ``train.report_to``, each through its own library.

- ``tensorboard``: torch's ``SummaryWriter`` → event files in ``<run>/tensorboard/``.
- ``mlflow``: ``MlflowClient`` → ``MLFLOW_TRACKING_URI`` when set, else an SQLite store ``<run>/mlflow.db`` with
  artefacts in ``<run>/mlruns/`` (MLflow 3 refuses its old file store unless told otherwise, and names SQLite as
  the local replacement).
- ``wandb``: ``wandb.init`` in ``<run>/``; ``WANDB_MODE=offline`` writes the run folder without network (sync it
  later with ``wandb sync``); the project is ``WANDB_PROJECT`` or ``tunesmith``.

The loop calls ``Trackers.log`` where it writes metrics.jsonl (log steps and evaluations), so a tracker sees the
same numbers as the run folder; the trackers write from one background thread. Which trackers can run is decided
before training by ``check_trackers``, a pure function of the names and of which libraries are installed.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from ..errors import RunError, UserError
from .checkpoint import flatten

LIBRARIES: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "wandb": ("wandb", "wandb"),
}
"""Tracker name → (module it imports, package that installs it)."""


def installed(module: str) -> bool:
    """Whether ``module`` can be imported here (found, not imported)."""
    return importlib.util.find_spec(module) is not None


def check_trackers(names: Iterable[str], is_installed: Callable[[str], bool] = installed,
                   libraries: Mapping[str, tuple[str, str]] = LIBRARIES) -> None:
    """Raise one ``UserError`` naming every tracker in ``names`` that is unknown or whose library is missing.
    ``is_installed``: module name → whether it imports (tests pass the fact instead of uninstalling)."""
    names = list(names)
    unknown = [n for n in names if n not in libraries]
    if unknown:
        raise UserError(f"train.report_to: unknown tracker {', '.join(map(repr, unknown))}",
                        hint=f"use any of {', '.join(libraries)}, or leave report_to empty")
    missing = [n for n in names if not is_installed(libraries[n][0])]
    if missing:
        packages = " ".join(libraries[n][1] for n in missing)
        raise UserError(f"train.report_to: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                        "installed", hint=f"pip install {packages}, or remove {', '.join(missing)} from "
                                          "train.report_to")


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class Trackers:
    """The run's trackers as one: what the loop logs goes to each, from one background thread, so a step waits only
    for a queue put (the trackers' own writes cost 1-10 ms a record on a busy CPU: a tenth of a small model's step).
    A tracker that fails stops the run at the next log with one message; ``close`` flushes and finishes them all."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers
        self._queue: queue.SimpleQueue[tuple[dict[str, float], int] | None] = queue.SimpleQueue()
        self._failed: BaseException | None = None
        self._worker = threading.Thread(target=self._drain, name="tunesmith-trackers", daemon=True)
        if trackers:
            self._worker.start()

    def log(self, record: Mapping[str, Any], step: int) -> None:
        if not self.trackers:
            return
        self._raise_failure()
        self._queue.put((numeric(record), step))

    def close(self) -> None:
        if self._worker.is_alive():
            self._queue.put(None)
            self._worker.join()
        for tracker in self.trackers:
            tracker.close()
        self._raise_failure()

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._failed is not None:
                continue
            try:
                for tracker in self.trackers:
                    tracker.log(*item)
            except Exception as exc:  # the loop's thread reports it: a thread's exception would only be printed
                self._failed = exc

    def _raise_failure(self) -> None:
        if self._failed is not None:
            exc, self._failed = self._failed, None
            raise RunError(f"train.report_to: a tracker failed to log ({type(exc).__name__}: {exc})",
                           hint="check the tracker's settings (MLFLOW_TRACKING_URI, WANDB_MODE, disk space), or "
                                "remove it from train.report_to") from exc


def numeric(record: Mapping[str, Any]) -> dict[str, float]:
    """The record's numbers under tracker names: ``train/loss``, ``eval/eval_loss`` (step and epoch are axes)."""
    prefix = record.get("type", "train")
    return {f"{prefix}/{k}": float(v) for k, v in record.items()
            if k not in ("type", "step") and isinstance(v, int | float) and not isinstance(v, bool)}


def open_trackers(names: Iterable[str], *, out: Path, config: dict[str, Any], run_name: str) -> Trackers:
    """Start each named tracker for the run folder ``out``, with the resolved ``config`` recorded once."""
    openers = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _Wandb}
    return Trackers([openers[n](out=out, config=config, run_name=run_name) for n in names])


class _TensorBoard:
    def __init__(self, *, out: Path, config: dict[str, Any], run_name: str) -> None:
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        # TensorBoard renders text as markdown: indenting by four spaces keeps the YAML a code block
        text = "    " + yaml.safe_dump(config, sort_keys=False).replace("\n", "\n    ")
        self.writer.add_text("config", text, 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, *, out: Path, config: dict[str, Any], run_name: str) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "tunesmith")
        found = self.client.get_experiment_by_name(name)
        artefacts = None if "MLFLOW_TRACKING_URI" in os.environ else (out / "mlruns").resolve().as_uri()
        experiment = found.experiment_id if found else self.client.create_experiment(name, artifact_location=artefacts)
        self.run_id = self.client.create_run(experiment, run_name=run_name).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_dict(self.run_id, config, "config.json")

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _Wandb:
    def __init__(self, *, out: Path, config: dict[str, Any], run_name: str) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tunesmith"), name=run_name, dir=str(out),
                              config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()
