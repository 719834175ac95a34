"""One fine-tuning job's run, in its own process: ``python -m tunesmith.server.jobrun JOB_ID --settings JSON``.

The worker starts it (worker.py) and watches it; it runs tunesmith's own stages on the job's files —
``tunesmith.pipeline.run`` (data prepare → baseline eval → train → eval → merge → export → report) into the job's
run folder ``<data_dir>/jobs/<id>/`` — and writes what happens into the store as it happens: metrics rows (upserted
by step, so steps redone after a resume replace their first run's), OpenAI-shaped events ("Step 3/30: training
loss=1.23"), a checkpoints row per saved checkpoint. On success it sets the fine-tuned model's name, the artefacts
and a results CSV (a ``fine-tune-results`` file); on a failure, the job's ``error``.

Stopped by SIGTERM (a pause, a cancel, its worker stopping or dying), the training loop writes a checkpoint at the
step boundary and the run exits with ``EXIT_STOPPED``; the next run of the job continues from that checkpoint,
because the pipeline resumes a train stage cut off with unchanged inputs on its own. Outside the loop the run stops
at once, but for one window (``stop_at_once``): after the loop's last step and before the train stage is recorded,
where stopping would make the next run redo steps; there the stop waits for the stage's record.

This module also holds the validation of a job's files (``validate_job_files``), which the worker runs before a
job is queued: tunesmith's own reader and validator (those of ``tunesmith data prepare``), the failure worded as
OpenAI words it — ``invalid_training_file``, "Example N, message M".
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import io
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import Interrupted, TunesmithError, UserError
from ..signals import handling
from . import db
from .settings import ServerSettings

EXIT_SUCCEEDED, EXIT_FAILED, EXIT_STOPPED = 0, 3, 4
"""The run's exit codes, read by the worker: succeeded (recorded), failed (recorded), stopped by a signal."""

MIN_EXAMPLES = 10
"""OpenAI's minimum for a training file (the guide: improvements show from 50–100 examples)."""
PROBLEMS_SHOWN = 5
"""Problems quoted in a failed validation's message (then how many more there are)."""


def jobrun_command(settings: ServerSettings, job_id: str, *, parent_pid: int, gpus: int = 0) -> list[str]:
    """``gpus``: how many GPUs the worker gave the run (CUDA_VISIBLE_DEVICES names them); more than one trains as
    that many torchrun processes."""
    return [sys.executable, "-m", "tunesmith.server.jobrun", job_id, "--settings", settings.model_dump_json(),
            "--parent-pid", str(parent_pid), "--gpus", str(gpus)]


# --- validation ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileProblem:
    """Why a job's file cannot be trained on: the job's ``error`` as OpenAI shapes it."""

    code: str
    message: str
    param: str


def validate_job_files(store: db.Store, settings: ServerSettings, job: db.Job) -> FileProblem | None:
    """The first problem of the job's training or validation file, or None when both can be trained on."""
    for param, file_id in (("training_file", job.training_file), ("validation_file", job.validation_file)):
        if file_id is None:
            continue
        record = store.get_file(file_id)
        if record is None:
            return FileProblem(f"invalid_{param}", f"The job failed: {param} {file_id} was deleted", param)
        problem = check_file(settings.files_dir / record.storage_name, file_id=file_id, param=param,
                             preference=job.method.get("type") == "dpo")
        if problem is not None:
            return problem
    return None


def check_file(path: Path, *, file_id: str, param: str, preference: bool = False) -> FileProblem | None:
    """The file read and checked line by line as ``tunesmith data prepare`` reads it — chat examples, or preference
    pairs for a DPO job — the problems worded by example (the 1-based line of the JSONL file) and message (1-based,
    within ``messages``)."""
    from ..data.formats import read_file
    from ..data.validate import check_preference, check_record

    which = "training" if param == "training_file" else "validation"
    lead = f"The job failed due to an invalid {which} file."
    try:
        examples = read_file(path)
    except UserError as exc:  # the whole file is unreadable (empty, a JSON array, …); its path is ours, not theirs
        return FileProblem(f"invalid_{param}", f"{lead} {exc.message.replace(str(path), file_id)}", param)
    for ex in examples:
        if ex.record is not None:
            ex.problems += check_preference(ex.record, ex.source, ex.line) if preference else \
                check_record(ex.record, ex.source, ex.line, for_training=param == "training_file")
    bad = [ex for ex in examples if ex.problems]
    if bad:
        shown = [_worded(ex.line, p.field, p.reason) for ex in bad[:PROBLEMS_SHOWN] for p in ex.problems[:1]]
        more = f" (and {len(bad) - len(shown)} more examples with problems)" if len(bad) > len(shown) else ""
        return FileProblem(f"invalid_{param}", f"{lead} Invalid file format. {'; '.join(shown)}{more}", param)
    if param == "training_file" and len(examples) < MIN_EXAMPLES:
        return FileProblem("invalid_n_examples", f"{lead} Training file has {len(examples)} example(s), but must "
                           f"have at least {MIN_EXAMPLES} examples", param)
    return None


def _worded(line: int, field: str | None, reason: str) -> str:
    message = re.search(r"messages\[(\d+)\]", field or "")  # a pair's prompt: input.messages[i]
    where = f"Example {line}" + (f", message {int(message.group(1)) + 1}" if message else "")
    return f"{where}: {field}: {reason}" if field else f"{where}: {reason}"


# --- the run ------------------------------------------------------------------------------------------------------

def run(store: db.Store, settings: ServerSettings, job: db.Job, *, gpus: int = 0) -> None:
    """Run the job's stages, reporting as they go; record success. Raises what the pipeline raises. ``gpus``: the
    GPUs CUDA_VISIBLE_DEVICES gives this run; more than one: the train stage runs as that many processes."""
    from ..pipeline import run as run_pipeline
    from .jobs import fine_tuned_name, job_config, process_share

    out_dir = settings.data_dir / job.out_dir
    processes = max(1, gpus)
    config = job_config(job_id=job.id, model=job.model, hyperparameters=job.hyperparameters, method=job.method,
                        seed=job.seed, train_file=_stored(store, settings, job.training_file),
                        validation_file=_stored(store, settings, job.validation_file) if job.validation_file
                        else None, out_dir=out_dir, settings=settings, processes=processes)
    name = fine_tuned_name(job.model, job.suffix, job.id)
    reporter = Reporter(store=store, job_id=job.id, data_dir=settings.data_dir, model_name=name)
    if gpus:  # read in this process: the GPUs the job trains on, as its worker set them
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        store.add_event(job.id, level="info", message=f"Training on GPU(s) {visible}"
                        + (f" ({processes} torchrun processes)" if processes > 1 else ""),
                        data={"cuda_visible_devices": visible, "train_processes": processes})
        batch = int(job.hyperparameters["batch_size"])
        if batch % processes:
            store.add_event(job.id, level="warn", message=f"batch_size {batch} does not divide among {processes} "
                            f"GPUs: each step trains on {processes * process_share(batch, processes)} sequences")
    # outside the training loop (which checkpoints first), a stop signal is the reporter's to time
    with handling(lambda signum, _frame: reporter.stop(signum), signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        result = run_pipeline(config, out_dir=out_dir, on_event=reporter, train_processes=processes)

    train = next(s for s in result.stages if s.name == "train")
    merge = next(s for s in result.stages if s.name == "merge")
    export = next(s for s in result.stages if s.name == "export")
    artefacts: dict[str, Any] = {"adapter": _relative(train.outputs["artefact_dir"], settings.data_dir)}
    if merge.outputs:
        artefacts["merged"] = _relative(merge.outputs["model_dir"], settings.data_dir)
    if export.outputs:
        artefacts["gguf"] = [_relative(a["path"], settings.data_dir) for a in export.outputs["result"]["artefacts"]]
    if result.report_html:
        artefacts["report"] = _relative(result.report_html, settings.data_dir)
    metrics = store.metrics(job.id)
    results = _results_file(store, settings, job, metrics)
    trained = sum(int(m.values.get("tokens", 0)) for m in metrics if m.kind == "train")
    done = store.update_job(job.id, only_if_status=("running",), status="succeeded", fine_tuned_model=name,
                            finished_at=db.now(), trained_tokens=trained, estimated_finish=None,
                            result_files=[results.id], artefacts=artefacts, worker_id=None, lease_expires_at=None)
    if done is not None:
        store.add_event(job.id, level="info", message=f"New fine-tuned model created: {name}")
        store.add_event(job.id, level="info", message="The job has successfully completed")


def _stored(store: db.Store, settings: ServerSettings, file_id: str) -> Path:
    record = store.get_file(file_id)
    if record is None:
        raise UserError(f"file {file_id} was deleted before the job ran", hint="upload it again and create a new job")
    return (settings.files_dir / record.storage_name).resolve()


class Reporter:
    """The pipeline's events → the store: metrics rows, events, checkpoints, the estimated finish."""

    def __init__(self, *, store: db.Store, job_id: str, data_dir: Path, model_name: str) -> None:
        self.store, self.job_id, self.data_dir, self.model_name = store, job_id, data_dir, model_name
        self.total_steps = 0
        self.started: tuple[int, float] | None = None
        """The first step this run trained, and when: the estimated finish is measured from it."""
        self.last_train: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.loop_done = False
        """The training loop logged its last step (or stopped early): its own checkpoint-on-signal is over."""
        self.train_recorded = False
        """The train stage is recorded as finished (its ``stage.json``): a resume no longer redoes any step."""
        self.deferred_stop: str | None = None
        """A signal that arrived between those two moments, acted on once the train stage is recorded."""

    def stop(self, signum: int) -> None:
        """A stop signal outside the training loop: at once, or — between the loop's last step and the train stage
        being recorded — once the stage is recorded (``stop_at_once``)."""
        name = signal.Signals(signum).name
        if stop_at_once(loop_done=self.loop_done, train_recorded=self.train_recorded):
            raise Interrupted(f"stopped by {name}", hint="the job's next run continues from here")
        self.deferred_stop = name

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "start":
            self.total_steps = int(event["total_steps"])
            self.loop_done = self.total_steps == int(event["start_step"])  # resumed at its last step
        elif kind == "step":
            self._step(event)
            self.loop_done = int(event["step"]) >= self.total_steps
        elif kind == "early_stop":
            self.loop_done = True
        elif kind == "eval":
            self._eval(event)
        elif kind == "checkpoint":
            self._checkpoint(event)
        elif kind == "resumed":
            # the steps after the checkpoint are trained again: rows an earlier attempt wrote for them (a run killed
            # before it checkpointed) are dropped, so the job never shows a step the resumed run has not redone
            self.store.drop_metrics_after(self.job_id, step=int(event["step"]))
            self._say("info", f"Resumed from the checkpoint at step {event['step']}")
        elif kind == "warning":
            self._say("warn", self._plain(event["message"]))
        elif kind == "stage_start" and event["stage"] in ("data", "train", "eval", "merge", "export"):
            self._say("info", f"Stage {event['stage']}: " + ("continuing" if event["resume"] else "started"))
        elif kind == "stage_done" and event["status"] in ("ran", "resumed"):
            # the data, train and eval summaries speak of the job; merge's names the server's model cache
            said = self._plain(event["summary"]) if event["name"] in ("data", "train", "eval") else "done"
            self._say("info", f"Stage {event['name']}: {said}")
        if kind == "stage_done" and event["name"] == "train":
            self.train_recorded = True
            if self.deferred_stop is not None:
                raise Interrupted(f"stopped by {self.deferred_stop} after the train stage finished",
                                  hint="the job's next run continues with the stages after training")

    def _step(self, event: dict[str, Any]) -> None:
        step, loss = int(event["step"]), float(event["loss"])
        rewards = {k: event[k] for k in event if k.startswith("rewards/")}  # a DPO job's chosen/rejected rewards
        values = {k: event[k] for k in ("loss", "learning_rate", "grad_norm", "tokens", "supervised_tokens",
                                         "tokens_per_s", "epoch") if k in event} | rewards
        self.store.upsert_metric(self.job_id, kind="train", step=step, values=values)
        self.last_train = {"step": step, "train_loss": loss}
        data = {"step": step, "train_loss": loss, "total_steps": self.total_steps,
                "learning_rate": event["learning_rate"], "grad_norm": event["grad_norm"], **rewards}
        self.store.add_event(self.job_id, level="info", type="metrics", data=data,
                             message=f"Step {step}/{self.total_steps}: training loss={loss:.2f}")
        now = time.time()
        if self.started is None:
            self.started = (step, now)
        elif step > self.started[0]:
            per_step = (now - self.started[1]) / (step - self.started[0])
            self.store.update_job(self.job_id, only_if_status=("running",),
                                  estimated_finish=int(now + per_step * (self.total_steps - step)))

    def _eval(self, event: dict[str, Any]) -> None:
        step = int(event["step"])
        values = {k: v for k, v in event.items() if k not in ("event", "step")}
        self.store.upsert_metric(self.job_id, kind="eval", step=step, values=values)
        self.last_eval = {"valid_loss": event.get("eval_loss"),
                          "valid_mean_token_accuracy": event.get("eval_token_accuracy")}
        if event.get("eval_loss") is not None:
            self.store.add_event(self.job_id, level="info", type="metrics", data={"step": step, **self.last_eval},
                                 message=f"Step {step}/{self.total_steps}: validation loss={event['eval_loss']:.2f}")

    def _checkpoint(self, event: dict[str, Any]) -> None:
        from .jobs import checkpoint_name

        step = int(event["step"])
        metrics = {"step": step, **({"train_loss": self.last_train["train_loss"]}
                                    if self.last_train.get("step") == step else {}),
                   **{k: v for k, v in self.last_eval.items() if v is not None}}
        self.store.add_checkpoint(self.job_id, step_number=step, metrics=metrics,
                                  fine_tuned_model_checkpoint=checkpoint_name(self.model_name, step),
                                  path=_relative(event["path"], self.data_dir))
        self._say("info", f"Checkpoint created at step {step}")

    def _say(self, level: str, message: str) -> None:
        self.store.add_event(self.job_id, level=level, message=message)  # type: ignore[arg-type]

    def _plain(self, text: str) -> str:
        return _plain(text, self.data_dir)


def _plain(text: str, data_dir: Path) -> str:
    """Paths in the server's data folder written as the job's own (``jobs/<id>/…``): the folder is the server's."""
    return text.replace(f"{data_dir.resolve()}/", "").replace(f"{data_dir}/", "")


def stop_at_once(*, loop_done: bool, train_recorded: bool) -> bool:
    """Whether a stop signal that reaches the run outside the training loop stops it where it is.

    Inside the loop the loop handles it (a checkpoint of the step just logged, then the exit). After the loop's
    last step, the loop writes no checkpoint (its adapter is the stage's output), so a stop there — while the
    adapter is saved, before ``stage.json`` — would leave a stage that a resume redoes from the last epoch's
    checkpoint, training (and reporting) the steps after it a second time. There the stop waits for the stage to be
    recorded, a matter of seconds. Everywhere else (the data stage, model loading, eval, merge, export) it is at
    once: nothing there is logged by step."""
    return not loop_done or train_recorded


RESULT_COLUMNS = ("step", "train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy")
"""OpenAI's results CSV columns: one row per step."""


def _results_file(store: db.Store, settings: ServerSettings, job: db.Job, metrics: list[db.Metric]) -> db.File:
    evals = {m.step: m.values for m in metrics if m.kind == "eval"}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(RESULT_COLUMNS)
    for m in (m for m in metrics if m.kind == "train"):
        ev = evals.get(m.step, {})
        writer.writerow([m.step, _number(m.values.get("loss")), "", _number(ev.get("eval_loss")),
                         _number(ev.get("eval_token_accuracy"))])
    from ..files import write_text_atomic

    file_id = db.new_id("file-")
    write_text_atomic(settings.files_dir / file_id, buffer.getvalue())
    return store.create_file(owner=job.owner, filename=f"{job.id}-results.csv", purpose="fine-tune-results",
                             bytes=(settings.files_dir / file_id).stat().st_size, id=file_id)


def _number(value: Any) -> str:
    return "" if value is None else f"{float(value):.6g}"


def _relative(path: str, data_dir: Path) -> str:
    return os.path.relpath(Path(path).resolve(), data_dir.resolve())


# --- the process --------------------------------------------------------------------------------------------------

def _interrupt(signum: int, _frame: Any) -> None:
    raise Interrupted(f"stopped by {signal.Signals(signum).name}", hint="the job's next run continues from here")


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGTERM when the worker dies (even by kill -9), so no orphan trains the job while another
    worker runs it again: SIGTERM makes the training loop checkpoint and stop."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1  # <linux/prctl.h>
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # the worker died before the request took effect
        sys.exit(EXIT_STOPPED)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunesmith.server.jobrun")
    parser.add_argument("job_id")
    parser.add_argument("--settings", required=True, help="the server's settings, as JSON")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--gpus", type=int, default=0, help="GPUs in CUDA_VISIBLE_DEVICES (0: the CPU)")
    args = parser.parse_args(argv)
    _die_with_parent(args.parent_pid)
    settings = ServerSettings.model_validate_json(args.settings)
    store = db.connect(settings.database_url)
    job = store.get_job(args.job_id)
    if job is None:
        return EXIT_FAILED
    # before the pipeline starts (and after it ends), a stop signal stops the run where it is
    with handling(_interrupt, signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        try:
            run(store, settings, job, gpus=args.gpus)
        except Interrupted:
            return EXIT_STOPPED
        except TunesmithError as exc:
            _record_failure(store, job, _plain(exc.message, settings.data_dir))
            return EXIT_FAILED
        except Exception as exc:  # a bug: still the job's one error message, the traceback in the run's log
            import traceback

            traceback.print_exc()
            _record_failure(store, job, _plain(f"internal error: {type(exc).__name__}: {exc}", settings.data_dir))
            return EXIT_FAILED
    return EXIT_SUCCEEDED


def _record_failure(store: db.Store, job: db.Job, message: str) -> None:
    """A failed stage as the job's error: the data stage's refusal is the training file's fault, others are ours."""
    data_stage = message.startswith("stage `data` failed")
    code, param = ("invalid_training_file", "training_file") if data_stage else ("server_error", None)
    text = (f"The job failed due to an invalid training file. {message}" if data_stage else
            f"The job failed: {message}")
    failed = store.update_job(job.id, only_if_status=db.ACTIVE, status="failed", finished_at=db.now(),
                              error={"code": code, "message": text, "param": param}, estimated_finish=None,
                              worker_id=None, lease_expires_at=None)
    if failed is not None:
        store.add_event(job.id, level="error", message=text)


if __name__ == "__main__":
    sys.exit(main())
