"""Jobs end to end through the real ``openai`` client against ``tunesmith server`` with a worker: a job succeeds
(events newest first, checkpoints ``ckpt-step-N``, the results CSV), a bad file fails asynchronously with example
and message numbers, cancel mid-run, pause then resume, and kill -9 of the server mid-job: after a restart the job
completes with the loss trajectory of an uninterrupted run. Tiny random ``local:demo`` model, a few steps."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import openai
import pytest

from tunesmith.server.settings import ServerSettings
from tunesmith.server.worker import WATCH_S

from .conftest import RunningServer, start_server, write_chat_jsonl
from .test_worker import frozen_after_checkpoint, live_processes, runs_of, wait_for

HYPER = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0}
"""12 examples → 3 steps an epoch, 9 steps, checkpoints after the first two epochs (steps 3 and 6)."""
KILLED = {"n_epochs": 8, "batch_size": 4, "learning_rate_multiplier": 1.0}
"""24 steps: the kill -9 lands mid-run even on an idle machine (steps of a tiny model take 0.1-0.3 s)."""
PAUSED = {"n_epochs": 12, "batch_size": 4, "learning_rate_multiplier": 1.0}
"""36 steps, a checkpoint every 3."""
LONG = {"n_epochs": 25, "batch_size": 4, "learning_rate_multiplier": 1.0}
"""75 steps: still running when a test cancels or pauses it."""
TIMEOUT_S = 300


def create_job(client: openai.OpenAI, tmp_path: Path, hyperparameters: dict, *, name: str = "train.jsonl",
               lines: list[str] | None = None, seed: int = 7) -> object:
    path = write_chat_jsonl(tmp_path / name, 12)
    if lines is not None:
        path.write_text("".join(line + "\n" for line in lines))
    uploaded = client.files.create(file=path.open("rb"), purpose="fine-tune")
    assert client.files.wait_for_processing(uploaded.id, poll_interval=0.2).status == "processed"
    return client.fine_tuning.jobs.create(model="local:demo", training_file=uploaded.id, suffix="w", seed=seed,
                                          method={"type": "supervised",
                                                  "supervised": {"hyperparameters": hyperparameters}})


def wait_status(client: openai.OpenAI, job_id: str, statuses: tuple[str, ...], timeout_s: float = TIMEOUT_S):
    return wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status in statuses and j, timeout_s,
                    f"job {job_id} to be {' or '.join(statuses)}")


def all_events(client: openai.OpenAI, job_id: str) -> list:
    """Every event, newest first, page by page (``after`` walks back to older ones)."""
    return list(client.fine_tuning.jobs.list_events(job_id, limit=7))


def losses(client: openai.OpenAI, job_id: str) -> dict[int, float]:
    """Each step's training loss, from the metrics events (the last one written for a step wins)."""
    found: dict[int, float] = {}
    for event in reversed(all_events(client, job_id)):
        if event.type == "metrics" and "train_loss" in (event.data or {}):
            found[event.data["step"]] = event.data["train_loss"]
    return found


def first_step_seen(client: openai.OpenAI, job_id: str) -> bool:
    return any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job_id, limit=5).data)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with start_server(tmp_path_factory.mktemp("worker-api") / "data", workers=1) as running:
        yield running


@pytest.fixture(scope="module")
def finished(server: RunningServer, tmp_path_factory):
    """One job run to the end, uninterrupted: the reference the kill -9 test compares with."""
    client = server.client()
    job = create_job(client, tmp_path_factory.mktemp("reference"), HYPER)
    assert job.status == "validating_files"
    return wait_status(client, job.id, ("succeeded", "failed", "cancelled"))


@pytest.mark.slow
def test_a_job_succeeds_with_events_checkpoints_and_results(server, finished):
    client = server.client(_strict_response_validation=True)  # every response parses under the client's schema
    job = client.fine_tuning.jobs.retrieve(finished.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:local:demo:w:{job.id}"
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at and job.estimated_finish is None

    events = all_events(client, job.id)
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)
    messages = [e.message for e in reversed(events)]  # oldest first
    assert messages[:4] == [f"Created fine-tuning job: {job.id}", f"Validating training file: {job.training_file}",
                            "Files validated, moving job to queued state", "Fine-tuning job started"]
    assert messages[-2:] == [f"New fine-tuned model created: {job.fine_tuned_model}",
                             "The job has successfully completed"]
    steps = [m for m in messages if m.startswith("Step ")]
    assert [s.split(":")[0] for s in steps] == [f"Step {n}/9" for n in range(1, 10)]
    assert messages.index("Checkpoint created at step 3") > messages.index(steps[2])

    page = client.fine_tuning.jobs.checkpoints.list(job.id, limit=1)
    assert page.has_more and page.data[0].step_number == 6  # newest first
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id, limit=1))
    assert [c.fine_tuned_model_checkpoint for c in checkpoints] == [f"{job.fine_tuned_model}:ckpt-step-{n}"
                                                                    for n in (6, 3)]
    assert checkpoints[1].metrics.step == 3
    assert checkpoints[1].metrics.train_loss == pytest.approx(losses(client, job.id)[3])

    csv = client.files.content(job.result_files[0]).text.splitlines()
    assert csv[0] == "step,train_loss,train_mean_token_accuracy,valid_loss,valid_mean_token_accuracy"
    assert [int(row.split(",")[0]) for row in csv[1:]] == list(range(1, 10))
    train_losses = losses(client, job.id)
    assert [float(row.split(",")[1]) for row in csv[1:]] == pytest.approx([train_losses[n] for n in range(1, 10)],
                                                                          rel=1e-5)
    assert client.files.retrieve(job.result_files[0]).purpose == "fine-tune-results"


def test_a_succeeded_job_records_its_artefacts_in_its_own_folder(server, finished):
    from tunesmith.server.db import connect
    from tunesmith.server.settings import ServerSettings

    record = connect(ServerSettings(data_dir=server.data_dir).database_url).get_job(finished.id)
    assert record.artefacts["adapter"] == f"jobs/{finished.id}/train/adapter"
    assert (server.data_dir / record.artefacts["adapter"] / "adapter_config.json").is_file()
    assert (server.data_dir / record.artefacts["merged"] / "config.json").is_file()
    assert (server.data_dir / record.artefacts["report"]).is_file()
    assert record.worker_id is None and record.lease_expires_at is None and record.attempts == 1


def test_a_bad_training_file_fails_the_job_asynchronously_with_example_and_message_numbers(server, tmp_path):
    client = server.client()
    good = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]})
            for i in range(12)]
    good[2] = json.dumps({"messages": [{"role": "user", "content": "q"}, {"content": "where is my role?"}]})
    job = create_job(client, tmp_path, HYPER, lines=good)
    assert job.status == "validating_files"  # accepted: validation is the worker's, as OpenAI does it
    failed = wait_status(client, job.id, ("failed", "succeeded"), 120)
    assert failed.status == "failed"
    assert failed.error.code == "invalid_training_file"
    assert failed.error.param == "training_file"
    assert "Example 3, message 2" in failed.error.message
    newest = client.fine_tuning.jobs.list_events(job.id, limit=1).data[0]
    assert (newest.level, newest.message) == ("error", failed.error.message)


@pytest.mark.slow
def test_cancel_stops_a_running_job_and_its_processes(server, tmp_path):
    client = server.client()
    job = create_job(client, tmp_path, LONG)
    wait_for(lambda: first_step_seen(client, job.id), TIMEOUT_S, "the first training step")
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    wait_for(lambda: not runs_of(job.id), 60, "the job's run to stop")
    stopped = max(losses(client, job.id))
    assert stopped < 75
    time.sleep(2)
    after = client.fine_tuning.jobs.retrieve(job.id)
    assert after.status == "cancelled" and after.fine_tuned_model is None
    assert max(losses(client, job.id)) == stopped  # nothing trains on


@pytest.mark.slow
def test_pause_checkpoints_and_stops_resume_continues_to_the_end(server, tmp_path):
    """Paused while it trains: the run checkpoints the step it logged last and stops; resumed, it continues from
    that step, so every step is trained — and reported — exactly once. 36 steps (0.1-0.3 s each): the pause,
    asked for at the first step, reaches the run (within the worker's 0.5 s watch) long before its last one."""
    client = server.client()
    job = create_job(client, tmp_path, PAUSED)
    wait_for(lambda: first_step_seen(client, job.id), TIMEOUT_S, "the first training step")
    client.fine_tuning.jobs.pause(job.id)
    paused = wait_status(client, job.id, ("paused", "succeeded"), 120)
    assert paused.status == "paused", "the job finished before the pause reached it"
    assert not runs_of(job.id)
    at = max(losses(client, job.id))
    assert at < 36
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number == at  # written on the way out

    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    done = wait_status(client, job.id, ("succeeded", "failed"))
    assert done.status == "succeeded", done.error
    events = all_events(client, job.id)
    messages = [e.message for e in reversed(events)]
    assert f"Fine-tuning job paused after step {at}; resume continues from its last checkpoint" in messages
    assert f"Resumed from the checkpoint at step {at}" in messages
    steps = sorted(e.data["step"] for e in events if e.type == "metrics" and "train_loss" in (e.data or {}))
    assert steps == list(range(1, 37))  # each step reported once: none trained twice
    csv = client.files.content(done.result_files[0]).text.splitlines()
    assert [int(row.split(",")[0]) for row in csv[1:]] == list(range(1, 37))


@pytest.mark.slow
def test_kill_9_of_the_server_mid_job_loses_nothing(tmp_path):
    """The server dies by SIGKILL while its worker trains: the worker stops the run (it checkpoints) and puts the
    job back in the queue, then exits; a restarted server's worker continues from the checkpoint, and every step's
    loss equals the uninterrupted reference run's (same file, seed and hyperparameters).

    The kill lands mid-run: the test holds the store's write lock from the moment checkpoint 3 (of 24 steps) is
    listed, so the run cannot log another step, and keeps it until the worker, which checks for its parent every
    0.5 s, has had 3 s to notice the death and signal the run (24 steps take ~3 s here: without the freeze the run
    could finish its training first)."""
    data = tmp_path / "data"
    with start_server(data, workers=1) as first:
        client = first.client()
        job = create_job(client, tmp_path, KILLED)
        with frozen_after_checkpoint(ServerSettings(data_dir=data), job.id, 3):
            first.process.kill()
            first.process.wait()
            time.sleep(6 * WATCH_S)  # the worker notices within one WATCH_S; six of them, held frozen
    wait_for(lambda: not runs_of(job.id) and not _workers_of(data), 150, "the orphaned worker and run to stop")

    with start_server(data, workers=1) as second:
        client = second.client()
        done = wait_status(client, job.id, ("succeeded", "failed"))
        assert done.status == "succeeded", done.error
        messages = [e.message for e in reversed(all_events(client, job.id))]
        assert "The worker stopped; the job is back in the queue and will continue from its last checkpoint" \
            in messages
        assert any(m.startswith("Resumed from the checkpoint at step ") for m in messages)
        resumed = losses(client, job.id)
        # the same job uninterrupted, on the same server after the resumed one
        (tmp_path / "reference").mkdir()
        uninterrupted = create_job(client, tmp_path / "reference", KILLED)
        assert wait_status(client, uninterrupted.id, ("succeeded", "failed")).status == "succeeded"
        reference = losses(client, uninterrupted.id)
    assert sorted(resumed) == list(range(1, 25))
    assert resumed == pytest.approx(reference, rel=1e-5)


def _workers_of(data_dir: Path) -> list[int]:
    return live_processes(lambda args: b"worker" in args and any(str(data_dir).encode() in a for a in args))



def test_chat_with_the_fine_tuned_model_answers_as_its_merged_weights_do(server, finished):
    """`model=job.fine_tuned_model` on the same server: the adapter on its base, greedy, equals the job's own merged
    model generating the same prompt (tunesmith's generation, the chat template training used)."""
    from tunesmith.chat import prompt_ids
    from tunesmith.config import ModelConfig
    from tunesmith.evaluate.generate import generate_transformers
    from tunesmith.models import load_model, load_tokenizer

    client = server.client(_strict_response_validation=True)
    name = client.fine_tuning.jobs.retrieve(finished.id).fine_tuned_model
    assert name in [m.id for m in client.models.list().data]
    question = [{"role": "user", "content": "What is 3 plus 4?"}]
    reply = client.chat.completions.create(model=name, messages=question, max_tokens=10, temperature=0)
    assert reply.model == name
    cfg = ModelConfig(name_or_path=str(server.data_dir / "jobs" / finished.id / "merge" / "model"))
    tokenizer = load_tokenizer(cfg)
    expected = generate_transformers(load_model(cfg), tokenizer, [prompt_ids(tokenizer, question)], 10, 1)[0]
    assert reply.choices[0].message.content.strip() == expected.strip()
    assert reply.usage.completion_tokens > 0


def preference_lines(n: int) -> list[str]:
    return [json.dumps({"input": {"messages": [{"role": "user", "content": f"What is {i} plus {i + 1}?"}]},
                        "preferred_output": [{"role": "assistant", "content": f"{2 * i + 1}"}],
                        "non_preferred_output": [{"role": "assistant", "content": "I do not know."}]})
            for i in range(n)]


@pytest.mark.slow
def test_a_dpo_job_trains_on_preference_pairs_and_reports_its_rewards(server, tmp_path):
    client = server.client()
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(line + "\n" for line in preference_lines(12)))
    uploaded = client.files.create(file=path.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="local:demo", training_file=uploaded.id, seed=3, method={
        "type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 2, "batch_size": 4, "beta": 0.2}}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    done = wait_status(client, job.id, ("succeeded", "failed"))
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:local:demo::{job.id}"
    steps = [e for e in all_events(client, job.id) if e.type == "metrics" and e.message.startswith("Step ")]
    assert len(steps) == 6  # 12 pairs / 4 per step × 2 epochs
    assert all("rewards/margins" in e.data for e in steps)


def test_a_chat_file_given_to_a_dpo_job_fails_naming_the_example(server, tmp_path):
    client = server.client()
    path = write_chat_jsonl(tmp_path / "chat.jsonl", 12)
    uploaded = client.files.create(file=path.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="local:demo", training_file=uploaded.id,
                                         method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1}}})
    failed = wait_status(client, job.id, ("failed", "succeeded"), 120)
    assert failed.status == "failed"
    assert (failed.error.code, failed.error.param) == ("invalid_training_file", "training_file")
    assert "Example 1: is a chat example, where preference pairs are expected" in failed.error.message


@pytest.mark.slow
def test_sigterm_with_two_busy_workers_stops_both_at_once_and_frees_the_port(tmp_path):
    """Two workers, each training a job: SIGTERM to the server stops both workers together (each run checkpoints
    and its job goes back to the queue), the port is free and no worker or run is left, within a bound that two
    stops one after another would need on a loaded machine."""
    data = tmp_path / "data"
    with start_server(data, workers=2) as server:
        client = server.client()
        jobs = []
        for n in range(2):
            (tmp_path / f"job-{n}").mkdir()
            jobs.append(create_job(client, tmp_path / f"job-{n}", LONG))
        for job in jobs:
            wait_for(lambda job=job: first_step_seen(client, job.id), TIMEOUT_S, f"{job.id}'s first step")
        signalled = time.monotonic()
        assert server.stop() == 0, server.log()
        elapsed = time.monotonic() - signalled
    assert elapsed < 30, f"the server took {elapsed:.1f} s to stop"
    assert not _workers_of(data) and not any(runs_of(job.id) for job in jobs)
    with socket.socket() as again:  # as a server binds (SO_REUSEADDR): the client's TIME_WAIT does not count
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", server.port))
    from tunesmith.server.db import connect
    from tunesmith.server.settings import ServerSettings

    store = connect(ServerSettings(data_dir=data).database_url)
    for job in jobs:
        record = store.get_job(job.id)
        assert record.status == "queued" and record.worker_id is None  # back in the queue, for the next worker
        assert store.list_checkpoints(job.id).items  # each run checkpointed on its way out
