"""Workers against the job store directly (no HTTP): file validation worded as OpenAI words it, and a worker
killed with kill -9 mid-job whose job another worker re-claims once the lease runs out and finishes from the
checkpoint, with the uninterrupted run's losses. Tiny random ``local:demo`` model, a few steps. (A job's whole run
through the API is tests/server/test_worker_api.py.)"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tunesmith.errors import Interrupted
from tunesmith.server import db
from tunesmith.server.jobrun import Reporter, stop_at_once
from tunesmith.server.settings import ServerSettings
from tunesmith.server.worker import WorkerOptions, run_worker

EXAMPLES = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
            for a in range(4) for b in range(3)]
"""12 chat examples: two steps of 6 per epoch."""
FAST = {"n_epochs": 2, "batch_size": 6, "learning_rate_multiplier": 1.0}
"""4 steps, a checkpoint after the first epoch (step 2): the guide's save-per-epoch."""


def store_for(tmp_path: Path, database: str | None = None) -> tuple[db.Store, ServerSettings]:
    settings = ServerSettings(data_dir=tmp_path / "data", database=database)
    store = db.connect(settings.database_url)
    store.upgrade()
    return store, settings


def submit(store: db.Store, settings: ServerSettings, rows: list[dict] | str, *,
           hyperparameters: dict | None = None, seed: int = 7, method: str = "supervised") -> db.Job:
    """What the API does on create: the file stored under its id, the job in ``validating_files``."""
    text = rows if isinstance(rows, str) else "".join(json.dumps(r) + "\n" for r in rows)
    file_id = db.new_id("file-")
    settings.files_dir.mkdir(parents=True, exist_ok=True)
    (settings.files_dir / file_id).write_text(text)
    store.create_file(owner="local", filename="train.jsonl", purpose="fine-tune", bytes=len(text), id=file_id)
    hyper = hyperparameters or FAST
    job = store.create_job(owner="local", model="local:demo", training_file=file_id, validation_file=None,
                           method={"type": method, method: {"hyperparameters": hyper}}, hyperparameters=hyper,
                           suffix="t", seed=seed, metadata={})
    store.add_event(job.id, level="info", message=f"Created fine-tuning job: {job.id}")
    return job


def events(store: db.Store, job_id: str) -> list[db.Event]:
    """Oldest first."""
    return list(reversed(store.list_events(job_id, limit=1000).items))


def train_losses(store: db.Store, job_id: str) -> dict[int, float]:
    return {m.step: m.values["loss"] for m in store.metrics(job_id, kind="train")}


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def worker_process(settings: ServerSettings, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tunesmith", "worker", "--data-dir", str(settings.data_dir),
                             "--database", settings.database_url, *extra], start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")})


def live_processes(wanted) -> list[int]:
    """Pids of live (not zombie) processes whose argument list ``wanted(args)`` accepts."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
            state = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and wanted(args):
            found.append(int(cmdline.parent.name))
    return found


def runs_of(job_id: str) -> list[int]:
    """Pids of live processes running this job (the worker's child and anything it started)."""
    return live_processes(lambda args: b"tunesmith.server.jobrun" in args and job_id.encode() in args)


# --- validation: fast, no training -------------------------------------------------------------------------------

def test_a_bad_training_file_fails_the_job_with_the_example_and_message_numbers(tmp_path):
    store, settings = store_for(tmp_path)
    rows = [dict(r) for r in EXAMPLES]
    rows[2] = {"messages": [{"role": "user", "content": "hi"}, {"content": "no role here"}]}
    job = submit(store, settings, rows)
    run_worker(settings, WorkerOptions(worker_id="w1", once=True))

    failed = store.get_job(job.id)
    assert failed.status == "failed"
    assert failed.error["code"] == "invalid_training_file"
    assert failed.error["param"] == "training_file"
    message = failed.error["message"]
    assert message.startswith("The job failed due to an invalid training file.")
    assert "Example 3, message 2: messages[1].role" in message  # line 3, the second message (messages[1])
    assert str(settings.data_dir) not in message  # the server's folders are not the client's business
    last = events(store, job.id)[-1]
    assert (last.level, last.message) == ("error", message)
    assert failed.finished_at is not None and failed.worker_id is None


def test_invalid_json_is_named_by_its_example(tmp_path):
    store, settings = store_for(tmp_path)
    text = "".join(json.dumps(r) + "\n" for r in EXAMPLES[:6]) + "{not json\n" + \
        "".join(json.dumps(r) + "\n" for r in EXAMPLES[6:])
    job = submit(store, settings, text)
    run_worker(settings, WorkerOptions(worker_id="w1", once=True))
    error = store.get_job(job.id).error
    assert error["code"] == "invalid_training_file"
    assert "Example 7: invalid JSON at column 2" in error["message"]


def test_fewer_than_ten_examples_fail_the_job(tmp_path):
    store, settings = store_for(tmp_path)
    job = submit(store, settings, EXAMPLES[:9])
    run_worker(settings, WorkerOptions(worker_id="w1", once=True))
    failed = store.get_job(job.id)
    assert failed.status == "failed"
    assert failed.error == {"code": "invalid_n_examples", "param": "training_file",
                            "message": "The job failed due to an invalid training file. Training file has 9 "
                                       "example(s), but must have at least 10 examples"}


def test_an_empty_training_file_fails_the_job_naming_the_file_not_the_servers_path(tmp_path):
    store, settings = store_for(tmp_path)
    job = submit(store, settings, "\n\n")
    run_worker(settings, WorkerOptions(worker_id="w1", once=True))
    error = store.get_job(job.id).error
    assert error["message"] == (f"The job failed due to an invalid training file. {job.training_file}: no examples "
                                "(the file is empty or only blank lines)")


# --- a run's stop and resume, as its reporter sees them: no training, no timing -------------------------------

def step_event(step: int, total: int = 12) -> dict:
    return {"event": "step", "step": step, "loss": 6.0 - step / 10, "learning_rate": 2e-4, "grad_norm": 1.0,
            "tokens": 100, "total_steps": total}


def test_a_stop_is_at_once_except_between_the_loops_last_step_and_the_train_stage_being_recorded():
    assert stop_at_once(loop_done=False, train_recorded=False)  # data stage, model loading, before the loop
    assert not stop_at_once(loop_done=True, train_recorded=False)  # the adapter being saved: wait for stage.json
    assert stop_at_once(loop_done=True, train_recorded=True)  # eval, merge, export
    assert stop_at_once(loop_done=False, train_recorded=True)  # train up to date from an earlier attempt


def test_a_pause_after_the_last_step_lets_the_train_stage_finish_so_no_step_is_trained_twice(tmp_path):
    """The cause of the doubled steps: a pause that reached the run after the loop's last step (12 of 12) but
    before its train stage was recorded stopped it at once, with no checkpoint of step 12 (the loop checkpoints on
    a signal only while it runs; the last epoch's checkpoint was step 9). The resumed run then redid steps 10-12
    from that checkpoint and reported them again. Now that stop waits for the stage's record, then stops the run,
    whose next attempt finds training done."""
    store, settings = store_for(tmp_path)
    job = submit(store, settings, EXAMPLES)
    reporter = Reporter(store=store, job_id=job.id, data_dir=settings.data_dir, model_name="ft:local:demo:t:x")
    reporter({"event": "stage_start", "stage": "train", "resume": False})
    with pytest.raises(Interrupted):  # before the loop's first step: at once
        reporter.stop(signal.SIGTERM)
    reporter({"event": "start", "total_steps": 12, "start_step": 0})
    for step in range(1, 13):
        reporter(step_event(step))
    reporter.stop(signal.SIGTERM)  # the final adapter being written: not now
    assert reporter.deferred_stop == "SIGTERM"
    with pytest.raises(Interrupted, match="after the train stage finished"):
        reporter({"event": "stage_done", "name": "train", "status": "ran", "summary": "lora: 12 steps"})
    messages = [e.message for e in events(store, job.id)]
    assert messages[-1] == "Stage train: lora: 12 steps"  # the stage was reported done before the stop
    assert sorted(train_losses(store, job.id)) == list(range(1, 13))


def test_a_resumed_run_replaces_the_rows_of_the_steps_it_trains_again(tmp_path):
    """A run killed after logging step 5 with its last checkpoint at step 3: the next attempt resumes from 3, so
    the rows of steps 4 and 5 are stale until it trains them again; they are dropped at the resume, and each step
    keeps one row, the resumed run's."""
    store, settings = store_for(tmp_path)
    job = submit(store, settings, EXAMPLES)
    first = Reporter(store=store, job_id=job.id, data_dir=settings.data_dir, model_name="m")
    first({"event": "start", "total_steps": 12, "start_step": 0})
    for step in range(1, 6):
        first(step_event(step))
    second = Reporter(store=store, job_id=job.id, data_dir=settings.data_dir, model_name="m")
    second({"event": "resumed", "step": 3, "path": str(settings.data_dir / "step-3")})
    assert sorted(train_losses(store, job.id)) == [1, 2, 3]  # nothing past the checkpoint it resumed from
    second({"event": "start", "total_steps": 12, "start_step": 3})
    redone = {**step_event(4), "loss": 1.25}
    second(redone)
    assert train_losses(store, job.id)[4] == 1.25 and sorted(train_losses(store, job.id)) == [1, 2, 3, 4]


# --- runs ----------------------------------------------------------------------------------------------------------

@contextmanager
def frozen_after_checkpoint(settings: ServerSettings, job_id: str, step: int) -> Iterator[sqlite3.Connection]:
    """Hold the SQLite store's write lock from the moment the job's checkpoint ``step`` is listed. A run writes a
    metrics row and an event at every step, so while the lock is held it cannot log another one (it waits inside
    that write, within the store's 30 s busy timeout): the run is frozen at a step the test knows, by no timing.
    The checkpoint is looked for under the lock, so the run cannot move on between the look and the freeze."""
    deadline = time.monotonic() + 240
    while True:
        conn = sqlite3.connect(make_url(settings.database_url).database, timeout=30, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        if conn.execute("SELECT 1 FROM checkpoints WHERE job_id = ? AND step_number = ?", (job_id, step)).fetchone():
            break
        conn.execute("ROLLBACK")
        conn.close()
        assert time.monotonic() < deadline, f"timed out waiting for checkpoint {step} of {job_id}"
        time.sleep(0.05)
    try:
        yield conn
    finally:
        conn.execute("ROLLBACK")
        conn.close()


@pytest.mark.slow
@pytest.mark.skip(reason="race under heavy load: once the run logged step 3 while the newest listed checkpoint was "
                         "step 2 (docs/server.md, Known issues); kill -9 of the server mid-job is tested")
def test_a_worker_killed_mid_job_loses_nothing_another_finishes_it_with_the_same_losses(tmp_path):
    """kill -9 of the worker: its run gets SIGTERM from the kernel (it asked for it), checkpoints and stops; once
    the lease has run out a second worker re-claims the job and resumes from the checkpoint. The losses of every
    step equal those of the same job run without interruption (same seed).

    The kill always lands mid-run: the test holds the store's write lock from the moment checkpoint 2 (of 24
    steps) is listed, so the run cannot log a further step until the worker is dead."""
    store, settings = store_for(tmp_path)
    hyper = {"n_epochs": 12, "batch_size": 6, "learning_rate_multiplier": 1.0}  # 24 steps, a checkpoint every 2
    reference, killed = submit(store, settings, EXAMPLES, hyperparameters=hyper), \
        submit(store, settings, EXAMPLES, hyperparameters=hyper)

    first = worker_process(settings, "--lease-s", "5", "--once")
    assert first.wait(timeout=300) == 0
    assert store.get_job(reference.id).status == "succeeded"

    second = worker_process(settings, "--lease-s", "5")
    try:
        with frozen_after_checkpoint(settings, killed.id, 2) as conn:
            logged = conn.execute("SELECT max(step) FROM metrics WHERE job_id = ? AND kind = 'train'",
                                  (killed.id,)).fetchone()[0]
            os.kill(second.pid, signal.SIGKILL)
            second.wait()
        # the lock released: the run, signalled by the kernel meanwhile, writes its step, checkpoints and stops
        wait_for(lambda: not runs_of(killed.id), 60, "the orphaned run to stop")
        stopped_at = max(train_losses(store, killed.id))
        assert 2 <= logged <= stopped_at < 24  # it stopped at its next step boundary, long before the end
        newest = store.list_checkpoints(killed.id, limit=1).items[0]
        assert newest.step_number == stopped_at  # the step it logged last is the step it checkpointed
        assert store.get_job(killed.id).status == "running"  # as the dead worker left it, until its lease runs out

        wait_for(lambda: store.get_job(killed.id).lease_expires_at < db.now(), 30, "the dead worker's lease to end")
        third = worker_process(settings, "--lease-s", "5", "--once")
        assert third.wait(timeout=300) == 0
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
    done = store.get_job(killed.id)
    assert done.status == "succeeded", done.error
    assert done.attempts == 2
    messages = [e.message for e in events(store, killed.id)]
    assert messages.count("Fine-tuning job started") == 1
    assert "Fine-tuning job resumed from its last checkpoint" in messages
    assert f"Resumed from the checkpoint at step {stopped_at}" in messages
    assert train_losses(store, killed.id) == pytest.approx(train_losses(store, reference.id), rel=1e-5)
    assert sorted(train_losses(store, killed.id)) == list(range(1, 25))  # redone steps replaced, not duplicated
    steps = [e.data["step"] for e in events(store, killed.id) if e.type == "metrics"]
    assert sorted(steps) == list(range(1, 25))  # and each step's event written once: the resume began after it
