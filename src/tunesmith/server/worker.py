"""Workers: processes that claim fine-tuning jobs from the store and run them through tunesmith's stages.

A worker loops: claim the oldest job that is waiting (``db.claim_job``: ``SELECT … FOR UPDATE SKIP LOCKED`` on
PostgreSQL, so workers on several machines never take the same job; one writer at a time on SQLite), validate its
files if that is still to do, then run it in a child process (``python -m tunesmith.server.jobrun``) in its own
process group, so that pause, cancel and a dying worker reach every process of the job (torchrun's included).
While the child runs, the worker renews the job's lease and watches what a client asked for:

- pause: SIGTERM to the child's group — tunesmith's training loop writes a checkpoint at the step boundary and
  stops — then status ``paused``; resume puts the job back in the queue and the next run continues from that
  checkpoint (the pipeline's train stage resumes an attempt cut off with the same inputs on its own);
- cancel: the group is stopped, status ``cancelled``;
- the lease lost (another worker took the job after this one stalled): the child is stopped, the job left alone.

Nothing is lost to a kill -9. A worker whose parent (the server) died stops its job — SIGTERM, so it checkpoints —
puts it back in the queue and exits; the restarted server's worker continues it. A worker that is itself killed
takes its job's child with it (the child asked the kernel for SIGTERM when its parent dies), and its lease runs
out: any worker then re-claims the job, which resumes from its last checkpoint; redone steps' metrics are upserted.

Each worker has its own GPU set (``settings.gpu_sets``): its jobs' runs start with CUDA_VISIBLE_DEVICES set to it
(nothing set on a CPU machine), and a set of more than one GPU trains as that many torchrun processes.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from .. import processes
from ..errors import Stopped
from ..signals import handling
from . import db
from .jobrun import EXIT_FAILED, EXIT_SUCCEEDED, jobrun_command, validate_job_files
from .settings import ServerSettings

log = logging.getLogger(__name__)

LEASE_S = 30
"""How long a claimed job stays a worker's without a heartbeat: after that, a dead worker's job is claimed again."""
HEARTBEAT_S = 2.0
"""How often a worker renews its lease (well inside ``LEASE_S``: a slow database write must not lose a job)."""
WATCH_S = 0.5
"""How often a worker reads the job for a pause or cancel request, and checks that its parent is alive."""
IDLE_S = 1.0
"""How long a worker with nothing to do waits before looking for a job again."""
STOP_TIMEOUT_S = 120.0
"""How long a job's run gets, after SIGTERM, to write its checkpoint before it is killed."""



@dataclass(frozen=True)
class WorkerOptions:
    """How one worker process runs: its identity in the store and the parent whose death ends it."""

    worker_id: str
    parent_pid: int | None = None
    """The server that started this worker; when it dies, the worker puts its job back and exits."""
    lease_s: int = LEASE_S
    once: bool = False
    """Run at most one job, then return (a worker started by hand to drain one job; tests)."""
    gpus: tuple[str, ...] = ()
    """This worker's own GPUs (CUDA_VISIBLE_DEVICES names), which its jobs train on; empty: on the CPU."""


def new_worker_id() -> str:
    """Unique across machines: the host, the process and a random part (a reused pid is a new worker)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def worker_command(settings: ServerSettings, *, gpus: tuple[str, ...], parent_pid: int | None = None) -> list[str]:
    """The ``tunesmith worker`` command line for a worker of this server: its settings whole (what a job trains
    and exports depends on them) and its own GPU set, given as the whole of its ``--gpus`` (one job's worth)."""
    command = [sys.executable, "-m", "tunesmith", "worker", "--settings", settings.model_dump_json(),
               "--gpus", ",".join(gpus) or "none", "--gpus-per-job", str(max(1, len(gpus)))]
    if parent_pid is not None:
        command += ["--parent-pid", str(parent_pid)]
    return command


def start_workers(settings: ServerSettings, gpu_sets: tuple[tuple[str, ...], ...]) -> list[processes.Child]:
    """Start one worker process per GPU set (each in its own process group, its log in
    ``<data_dir>/logs/worker-N.log``). They exit when this process dies; ``processes.stop_all`` ends them together."""
    logs = Path(settings.data_dir) / "logs"
    return [processes.start(worker_command(settings, gpus=gpus, parent_pid=os.getpid()), what=f"worker {n}",
                            log_path=logs / f"worker-{n}.log", stop_timeout_s=STOP_TIMEOUT_S + 10)
            for n, gpus in enumerate(gpu_sets, start=1)]


def jobrun_env(gpus: tuple[str, ...], environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment of a job's run on ``gpus``: this worker's, with CUDA_VISIBLE_DEVICES naming only them (the
    run and its torchrun processes see those GPUs, from index 0); None — inherited unchanged — on the CPU."""
    if not gpus:
        return None
    return {**environ, "CUDA_VISIBLE_DEVICES": ",".join(gpus)}


def run_worker(settings: ServerSettings, options: WorkerOptions) -> None:
    """Claim and run jobs until stopped (SIGTERM/SIGINT, or the parent's death)."""
    store = db.connect(settings.database_url)
    store.upgrade()  # a worker may start first, on a new database (it waits for a server doing the same)
    log.info("worker %s: waiting for jobs (%s) on %s", options.worker_id, settings.database_url.split("@")[-1],
             f"GPUs {','.join(options.gpus)}" if options.gpus else "the CPU")
    with handling(_stop, signal.SIGTERM, signal.SIGHUP):
        while _parent_alive(options):
            job = store.claim_job(worker_id=options.worker_id, lease_s=options.lease_s)
            if job is None:
                if options.once:
                    return
                time.sleep(IDLE_S)
                continue
            run_job(store, settings, job, options)
            if options.once:
                return


def run_job(store: db.Store, settings: ServerSettings, job: db.Job, options: WorkerOptions) -> None:
    """Take one claimed job as far as it goes: validate (when its files are not validated yet), run, report."""
    if job.status == "validating_files":
        problem = validate_job_files(store, settings, job)
        if problem is not None:
            _fail(store, job.id, code=problem.code, message=problem.message, param=problem.param)
            return
        store.update_job(job.id, status="queued")
        store.add_event(job.id, level="info", message="Files validated, moving job to queued state")
    if store.update_job(job.id, only_if_worker=options.worker_id, only_if_status=db.ACTIVE, status="running") is None:
        return  # cancelled (or taken over) meanwhile
    resumed = _has_checkpoint(settings, job)
    store.add_event(job.id, level="info", message="Fine-tuning job resumed from its last checkpoint" if resumed
                    else "Fine-tuning job started", data={"worker": options.worker_id, "attempt": job.attempts})
    _supervise(store, settings, job, options)


def _supervise(store: db.Store, settings: ServerSettings, job: db.Job, options: WorkerOptions) -> None:
    """Run the job's child and watch it: lease, requests, the parent; set the status the child did not set."""
    out_dir = settings.data_dir / job.out_dir
    child = processes.start(jobrun_command(settings, job.id, parent_pid=os.getpid(), gpus=len(options.gpus)),
                            what=f"the run of {job.id}", log_path=out_dir / "jobrun.log",
                            env=jobrun_env(options.gpus, os.environ), stop_timeout_s=STOP_TIMEOUT_S)
    try:
        outcome = _watch(store, job.id, child, options)
    except BaseException:
        # this worker is stopping (SIGTERM, the server gone): the run checkpoints and stops, the job waits for the
        # next worker, which continues from that checkpoint
        processes.stop(child)
        _requeue(store, job.id, options.worker_id, "The worker stopped; the job is back in the queue and will "
                 "continue from its last checkpoint")
        raise
    if outcome == "lost":
        processes.stop(child)
        log.warning("worker %s: lost the lease of %s to another worker; its run was stopped", options.worker_id,
                    job.id)
        return
    if outcome in ("pause", "cancel"):
        _signal_group(child, signal.SIGTERM)
        code = _wait(child, STOP_TIMEOUT_S)
        processes.stop(child)
        _finish_request(store, job.id, outcome, code, options.worker_id)
        return
    processes.stop(child)  # the run exited: what it may have left in its group goes too
    code = child.returncode
    if code in (EXIT_SUCCEEDED, EXIT_FAILED):
        return  # the run recorded the outcome itself
    how = f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited with {code}"
    _fail(store, job.id, code="server_error", param=None,
          message=f"The job failed: its run {how}; the server's log {out_dir.name}/jobrun.log says why")


def _watch(store: db.Store, job_id: str, child: processes.Child, options: WorkerOptions) -> str:
    """Until the child exits: ``"exited"``; or what stops it first: ``"pause"``, ``"cancel"``, ``"lost"``."""
    next_beat = time.monotonic() + HEARTBEAT_S
    while child.process.poll() is None:
        if not _parent_alive(options):
            raise Stopped("the death of the server that started this worker", signal.SIGTERM)
        job = store.get_job(job_id)
        if job is None or job.status == "cancelled":
            return "cancel"
        if job.requested == "pause":
            return "pause"
        if time.monotonic() >= next_beat:
            if not store.heartbeat(job_id, worker_id=options.worker_id, lease_s=options.lease_s):
                # the run may have just finished (and released the job): that is not a lost lease
                return "exited" if child.process.poll() is not None else "lost"
            next_beat = time.monotonic() + HEARTBEAT_S
        time.sleep(WATCH_S)
    return "exited"


def _finish_request(store: db.Store, job_id: str, request: str, code: int | None, worker_id: str) -> None:
    """After the run stopped for a cancel (the API already set ``cancelled`` and said so) or a pause."""
    if request == "cancel":
        store.update_job(job_id, requested=None, worker_id=None, lease_expires_at=None)
        return
    if code == EXIT_SUCCEEDED:
        return  # it finished before the pause reached it: done is done (the run set ``succeeded``)
    train_steps = [m.step for m in store.metrics(job_id, kind="train")]
    paused = store.update_job(job_id, only_if_status=("running",), only_if_worker=worker_id, status="paused",
                              requested=None, worker_id=None, lease_expires_at=None, estimated_finish=None)
    if paused is not None:
        store.add_event(job_id, level="info", message=f"Fine-tuning job paused after step {max(train_steps, default=0)}"
                        "; resume continues from its last checkpoint")


def _requeue(store: db.Store, job_id: str, worker_id: str, message: str) -> None:
    requeued = store.update_job(job_id, only_if_status=("running", "validating_files", "queued"),
                                only_if_worker=worker_id, status="queued", requested=None, worker_id=None,
                                lease_expires_at=None, estimated_finish=None)
    if requeued is not None:
        store.add_event(job_id, level="warn", message=message)


def _fail(store: db.Store, job_id: str, *, code: str, message: str, param: str | None) -> None:
    failed = store.update_job(job_id, only_if_status=db.ACTIVE, status="failed", finished_at=db.now(),
                              error={"code": code, "message": message, "param": param}, worker_id=None,
                              lease_expires_at=None, estimated_finish=None, requested=None)
    if failed is not None:
        store.add_event(job_id, level="error", message=message)


def _has_checkpoint(settings: ServerSettings, job: db.Job) -> bool:
    return any((settings.data_dir / job.out_dir / "train" / "checkpoints").glob("step-*"))


def _wait(child: processes.Child, timeout_s: float) -> int | None:
    deadline = time.monotonic() + timeout_s
    while child.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return child.process.returncode


def _signal_group(child: processes.Child, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):  # already gone
        os.killpg(child.pid, sig)


def _parent_alive(options: WorkerOptions) -> bool:
    # a dead parent's children are re-parented (to init or a subreaper): the parent pid changes
    return options.parent_pid is None or os.getppid() == options.parent_pid


def _stop(signum: int, _frame: object) -> None:
    raise Stopped(signal.Signals(signum).name, signum)

