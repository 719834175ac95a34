"""The job store on a real PostgreSQL (a throwaway cluster, tests/server/postgres.py): a job end to end through the
openai client against ``tunesmith server --database postgresql://…``; claiming under contention never hands one job
to two workers (``SELECT … FOR UPDATE SKIP LOCKED``); and two worker processes sharing one database run four jobs
through tunesmith's stages, each exactly once."""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

import pytest

from tunesmith.server import db

from .conftest import start_server
from .postgres import running_postgres
from .test_worker import EXAMPLES, events, store_for, submit, train_losses, wait_for, worker_process
from .test_worker_api import HYPER, all_events, create_job, losses, wait_status


@pytest.fixture(scope="module")
def postgres_url():
    with running_postgres() as url:
        yield url


@pytest.fixture
def database(postgres_url):
    """An empty schema for each test: the tables of the previous one dropped."""
    store = db.connect(postgres_url)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    store.close()
    return postgres_url


def test_concurrent_claims_never_hand_one_job_to_two_workers(tmp_path, database):
    store, settings = store_for(tmp_path, database)
    jobs = [submit(store, settings, EXAMPLES) for _ in range(30)]
    claimed: list[tuple[str, str]] = []
    start = threading.Barrier(6)

    def claim(worker: str) -> None:
        mine = db.connect(database)  # its own engine and connections, as a worker process has
        start.wait()
        while (job := mine.claim_job(worker_id=worker, lease_s=60)) is not None:
            claimed.append((job.id, worker))
        mine.close()

    threads = [threading.Thread(target=claim, args=(f"w{n}",)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    counts = Counter(job_id for job_id, _ in claimed)
    assert set(counts) == {j.id for j in jobs}
    assert max(counts.values()) == 1
    assert len({worker for _, worker in claimed}) > 1  # the claims were really concurrent
    holders = {j.id: j.worker_id for j in store.list_jobs(owner=None, limit=100).items}
    assert holders == dict(claimed)


@pytest.mark.slow
def test_two_workers_on_one_postgresql_run_four_jobs_each_once(tmp_path, database):
    store, settings = store_for(tmp_path, database)
    hyper = {"n_epochs": 1, "batch_size": 6, "learning_rate_multiplier": 1.0}  # 2 steps each
    jobs = [submit(store, settings, EXAMPLES, hyperparameters=hyper, seed=n) for n in range(4)]
    workers = [worker_process(settings) for _ in range(2)]
    try:
        wait_for(lambda: all(store.get_job(j.id).status in db.FINISHED for j in jobs), 400, "four finished jobs")
    finally:
        for w in workers:
            os.killpg(w.pid, signal.SIGTERM)
        for w in workers:
            w.wait(timeout=60)
    ran_by = {}
    for job in jobs:
        done = store.get_job(job.id)
        assert done.status == "succeeded", done.error
        assert done.attempts == 1
        started = [e for e in events(store, job.id) if e.message == "Fine-tuning job started"]
        assert len(started) == 1
        ran_by[job.id] = started[0].data["worker"]
        assert sorted(train_losses(store, job.id)) == [1, 2]
        assert [e.message for e in events(store, job.id)].count("The job has successfully completed") == 1
    assert len(set(ran_by.values())) == 2  # both workers ran jobs


@pytest.mark.slow
def test_a_job_succeeds_through_the_openai_client_on_postgresql(tmp_path, database):
    with start_server(tmp_path / "data", workers=1, extra=["--database", database]) as server:
        client = server.client(_strict_response_validation=True)
        job = create_job(client, tmp_path, HYPER)
        done = wait_status(client, job.id, ("succeeded", "failed", "cancelled"))
        assert done.status == "succeeded", done.error
        assert done.fine_tuned_model == f"ft:local:demo:w:{job.id}"
        messages = [e.message for e in all_events(client, job.id)]  # newest first
        assert messages[:2] == ["The job has successfully completed",
                                f"New fine-tuned model created: {done.fine_tuned_model}"]
        assert messages[-1] == f"Created fine-tuning job: {job.id}"
        assert sorted(losses(client, job.id)) == list(range(1, 10))
        names = [c.fine_tuned_model_checkpoint for c in client.fine_tuning.jobs.checkpoints.list(job.id)]
        assert names == [f"{done.fine_tuned_model}:ckpt-step-{n}" for n in (6, 3)]
    assert not (tmp_path / "data" / "tunesmith.db").exists()  # the store was PostgreSQL, not the default file
