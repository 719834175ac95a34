"""GPU sets: each worker its own GPUs (worker k: GPUs [k·N, (k+1)·N)), too few of them one start-up error, a job's
run started with CUDA_VISIBLE_DEVICES naming its worker's set, and a set of two GPUs training as two torchrun
processes. On the CPU the "GPUs" are only names: CUDA_VISIBLE_DEVICES=0,1 hides no device there, and the two
torchrun processes train with gloo, as they would with NCCL on two GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith.errors import UserError
from tunesmith.server.jobrun import jobrun_command
from tunesmith.server.settings import ServerSettings, gpu_sets, parse_gpus
from tunesmith.server.worker import WorkerOptions, jobrun_env, run_worker, worker_command

from .test_worker import EXAMPLES, events, store_for, submit, train_losses

SRC = str(Path(__file__).parents[2] / "src")


@pytest.mark.parametrize(("gpus", "workers", "per_job", "sets"), [
    (("0", "1", "2", "3"), 4, 1, (("0",), ("1",), ("2",), ("3",))),
    (("0", "1", "2", "3"), 2, 2, (("0", "1"), ("2", "3"))),
    (("0", "1", "2", "3"), 1, 2, (("0", "1"),)),  # GPUs left over stay unused
    (("0", "1", "2", "3", "4", "5", "6", "7"), 2, 3, (("0", "1", "2"), ("3", "4", "5"))),
    (("4", "6"), 1, 2, (("4", "6"),)),  # the names listed, not indices from 0
    (("0",), 0, 1, ()),  # no workers here (they run elsewhere)
    ((), 3, 1, ((), (), ())),  # a CPU machine: every job trains on the CPU
])
def test_each_worker_gets_its_own_consecutive_gpus(gpus, workers, per_job, sets):
    assert gpu_sets(gpus, workers=workers, per_job=per_job) == sets


@pytest.mark.parametrize(("gpus", "workers", "per_job", "said"), [
    (("0", "1", "2"), 2, 2, "2 worker(s) × 2 GPU(s) need 4 GPUs, and the server has 3 GPU(s) (0,1,2)"),
    (("0",), 2, 1, "2 worker(s) × 1 GPU(s) need 2 GPUs, and the server has 1 GPU(s) (0)"),
    ((), 1, 2, "1 worker(s) × 2 GPU(s) need 2 GPUs, and the server has no GPU"),
])
def test_too_few_gpus_for_the_workers_is_one_error(gpus, workers, per_job, said):
    with pytest.raises(UserError, match="--gpus-per-job") as caught:
        gpu_sets(gpus, workers=workers, per_job=per_job)
    assert said in caught.value.message and "--workers" in caught.value.hint


def test_the_gpus_option_is_a_list_of_distinct_names():
    assert parse_gpus("0,1, 2") == ("0", "1", "2")
    assert parse_gpus("GPU-5f1c,GPU-77ab") == ("GPU-5f1c", "GPU-77ab")
    assert parse_gpus("none") == parse_gpus("") == ()
    with pytest.raises(UserError, match="GPU 1 is listed twice"):
        parse_gpus("0,1,1")
    with pytest.raises(UserError, match="an empty entry"):
        parse_gpus("0,,1")


@pytest.mark.parametrize("command", [
    ["server", "--gpus", "0,1,2", "--workers", "2", "--gpus-per-job", "2", "--port", "0"],
    ["worker", "--gpus", "0", "--gpus-per-job", "2"],
])
def test_too_few_gpus_stops_the_server_or_worker_at_start_up_with_one_message(tmp_path, command):
    done = subprocess.run([sys.executable, "-m", "tunesmith", *command, "--data-dir", str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": SRC})
    assert done.returncode == 2, done.stderr
    assert "--gpus-per-job 2" in done.stderr and "need" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()  # nothing was opened or created


def test_a_workers_command_and_its_jobs_run_carry_its_gpu_set():
    settings = ServerSettings(gpus=("0", "1", "2", "3"), gpus_per_job=2, workers=2)
    assert settings.worker_gpu_sets == (("0", "1"), ("2", "3"))
    command = worker_command(settings, gpus=("2", "3"), parent_pid=1)
    assert command[command.index("--gpus") + 1] == "2,3" and command[command.index("--gpus-per-job") + 1] == "2"
    assert worker_command(settings, gpus=())[-3:] == ["none", "--gpus-per-job", "1"]
    env = jobrun_env(("2", "3"), {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "2,3"}
    assert jobrun_env((), {"PATH": "/bin"}) is None  # the CPU: the worker's own environment, nothing set
    run = jobrun_command(settings, "ftjob-x", parent_pid=1, gpus=2)
    assert run[run.index("--gpus") + 1] == "2"


@pytest.mark.slow
def test_a_job_on_two_gpus_runs_with_them_visible_and_trains_as_two_torchrun_processes(tmp_path):
    """The worker's set reaches the job's run process (it says what CUDA_VISIBLE_DEVICES it found); its train stage
    is two processes, and the server hears of every step and checkpoint as from an in-process stage."""
    store, settings = store_for(tmp_path)
    job = submit(store, settings, EXAMPLES)
    run_worker(settings, WorkerOptions(worker_id="w1", once=True, gpus=("0", "1")))
    done = store.get_job(job.id)
    assert done.status == "succeeded", done.error
    said = [e for e in events(store, job.id) if e.message.startswith("Training on GPU")]
    assert [e.message for e in said] == ["Training on GPU(s) 0,1 (2 torchrun processes)"]
    assert said[0].data == {"cuda_visible_devices": "0,1", "train_processes": 2}
    train_dir = settings.data_dir / done.out_dir / "train"
    assert json.loads((train_dir / "run.json").read_text())["processes"] == 2
    assert sorted(train_losses(store, job.id)) == [1, 2, 3, 4]
    steps = [e.data["step"] for e in events(store, job.id) if e.type == "metrics"]
    assert steps == [1, 2, 3, 4]
    assert [c.step_number for c in store.list_checkpoints(job.id).items] == [2]


@pytest.mark.parametrize(("batch", "processes", "share"), [(16, 1, 16), (16, 2, 8), (6, 4, 2), (7, 2, 4)])
def test_a_jobs_batch_size_is_the_whole_steps_split_among_its_processes(tmp_path, batch, processes, share):
    from tunesmith.server.jobs import job_config, process_share

    assert process_share(batch, processes) == share
    config = job_config(job_id="ftjob-1", model="local:demo", method={"type": "supervised"}, seed=1,
                        hyperparameters={"batch_size": batch, "n_epochs": 1, "learning_rate_multiplier": 1.0},
                        train_file=tmp_path / "t.jsonl", validation_file=None, out_dir=tmp_path / "run",
                        settings=ServerSettings(), processes=processes)
    assert config.train.per_device_train_batch_size * config.train.gradient_accumulation_steps == share


@pytest.mark.slow
def test_a_paused_two_gpu_job_checkpoints_through_torchrun_and_resumes_with_the_same_losses(tmp_path):
    """Pause: SIGTERM goes from the job's run to torchrun's group, the ranks checkpoint at the step boundary, the
    job is ``paused`` with that checkpoint listed; resumed, it trains the rest — the losses of an unpaused run."""
    from .test_worker import wait_for

    store, settings = store_for(tmp_path)
    hyper = {"n_epochs": 6, "batch_size": 6, "learning_rate_multiplier": 1.0}  # 12 steps, a checkpoint every 2
    reference, paused = submit(store, settings, EXAMPLES, hyperparameters=hyper), \
        submit(store, settings, EXAMPLES, hyperparameters=hyper)
    gpus = WorkerOptions(worker_id="w1", once=True, gpus=("0", "1"))
    run_worker(settings, gpus)
    assert store.get_job(reference.id).status == "succeeded"

    worker = subprocess.Popen([sys.executable, "-m", "tunesmith", "worker", "--data-dir", str(settings.data_dir),
                               "--gpus", "0,1", "--gpus-per-job", "2", "--once"], start_new_session=True,
                              env={**os.environ, "PYTHONPATH": SRC})
    try:
        wait_for(lambda: store.list_checkpoints(paused.id).items, 120, "the first checkpoint")
        store.request(paused.id, "pause")
        assert worker.wait(timeout=180) == 0
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, 9)
    job = store.get_job(paused.id)
    assert job.status == "paused", job.error
    stopped_at = max(train_losses(store, paused.id))
    assert stopped_at < 12
    assert store.list_checkpoints(paused.id, limit=1).items[0].step_number == stopped_at
    store.request(paused.id, "resume")
    run_worker(settings, gpus)
    assert store.get_job(paused.id).status == "succeeded"
    assert f"Resumed from the checkpoint at step {stopped_at}" in [e.message for e in events(store, paused.id)]
    assert train_losses(store, paused.id) == pytest.approx(train_losses(store, reference.id), rel=1e-5)
