"""The fine-tuning jobs API through the real openai client, on a server without workers: creating a job (its
request checked at once, its "auto" hyperparameters resolved), listing, events and checkpoints with cursors, and
cancel / pause / resume against the states a worker would have set (written here into the server's store)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tunesmith.server import db


@pytest.fixture
def store(api_server):
    opened = db.connect(f"sqlite:///{api_server.data_dir.resolve() / 'tunesmith.db'}")
    yield opened
    opened.close()


@pytest.fixture
def training_file(client, chat_jsonl):
    with chat_jsonl(12).open("rb") as f:
        return client.files.create(file=f, purpose="fine-tune")


def strict(client):
    return openai.OpenAI(base_url=str(client.base_url), api_key="x", max_retries=0, _strict_response_validation=True)


def test_create_returns_validating_files_with_resolved_hyperparameters_and_the_first_events(client, training_file):
    job = strict(client).fine_tuning.jobs.create(model="local:demo", training_file=training_file.id,
                                                 suffix="squares", seed=7, metadata={"team": "a"})
    assert job.id.startswith("ftjob-") and job.status == "validating_files"
    assert job.model == "local:demo" and job.training_file == training_file.id and job.seed == 7
    # 12 examples: 3 epochs would train 36 < 100 examples, so ceil(100 / 12) = 9 epochs; batch 12 // 8 = 1
    assert job.hyperparameters.n_epochs == 9 and job.hyperparameters.batch_size == 1
    assert job.hyperparameters.learning_rate_multiplier == 1.0
    assert job.method.type == "supervised"
    assert job.method.supervised.hyperparameters.n_epochs == 9
    assert job.fine_tuned_model is None and job.finished_at is None and job.metadata == {"team": "a"}
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id)]
    assert messages == [f"Validating training file: {training_file.id}", f"Created fine-tuning job: {job.id}"]
    assert strict(client).fine_tuning.jobs.retrieve(job.id) == job


def test_numbers_given_are_kept_and_dpo_reports_its_beta(client, training_file):
    job = client.fine_tuning.jobs.create(
        model="local:demo", training_file=training_file.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 2, "batch_size": 4, "beta": 0.25}}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.25
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (2, 4)
    assert job.method.dpo.hyperparameters.learning_rate_multiplier == 1.0
    legacy = client.fine_tuning.jobs.create(model="local:demo", training_file=training_file.id,
                                            hyperparameters={"n_epochs": 1, "learning_rate_multiplier": 0.5})
    assert legacy.method.type == "supervised"
    assert legacy.hyperparameters.n_epochs == 1 and legacy.hyperparameters.learning_rate_multiplier == 0.5


@pytest.mark.parametrize(("options", "param", "code"), [
    ({"model": "gpt-4o-mini"}, "model", "model_not_found"),
    ({"training_file": "file-000000000000000000000000"}, "training_file", "invalid_file_id"),
    ({"training_file": "../../etc/passwd"}, "training_file", "invalid_file_id"),
    ({"validation_file": "file-nope"}, "validation_file", "invalid_file_id"),
    ({"suffix": "x" * 65}, "suffix", None),
    ({"seed": -1}, "seed", None),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", None),
    ({"metadata": {"k": "v" * 513}}, "metadata", None),
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", None),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 1000}}}},
     "method.supervised.hyperparameters.batch_size", None),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 3}}}}, "method.dpo.hyperparameters.beta",
     None),
    ({"method": {"type": "reinforcement"}}, "method.type", None),
    ({"method": {"type": "supervised"}, "hyperparameters": {"n_epochs": 2}}, "hyperparameters", None),
    ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, "integrations", None),
])
def test_a_bad_request_is_a_400_naming_the_field(client, training_file, options, param, code):
    request = {"model": "local:demo", "training_file": training_file.id} | options
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(**request)
    assert "literal" not in caught.value.message
    assert caught.value.param == param and caught.value.code == code, caught.value.body
    assert caught.value.type == "invalid_request_error" and caught.value.message
    assert caught.value.response.headers["x-should-retry"] == "false"


def test_a_file_of_another_purpose_cannot_be_trained_on(client, training_file, store):
    result = store.create_file(owner="local", filename="results.csv", purpose="fine-tune-results", bytes=3)
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model="local:demo", training_file=result.id)
    assert caught.value.param == "training_file" and caught.value.code == "invalid_file_purpose"


def test_list_is_newest_first_pages_with_after_and_filters_by_metadata(client, training_file):
    made = [client.fine_tuning.jobs.create(model="local:demo", training_file=training_file.id,
                                           metadata={"batch": "listing", "n": str(i)}).id for i in range(3)]
    page = client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in page.data] == made[::-1][:2] and page.has_more
    after = client.fine_tuning.jobs.list(limit=2, after=page.data[-1].id)
    assert after.data[0].id == made[0]
    tagged = client.fine_tuning.jobs.list(metadata={"batch": "listing"})
    assert [j.id for j in tagged.data] == made[::-1]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"batch": "listing", "n": "1"}).data] == [made[1]]
    assert client.fine_tuning.jobs.list(metadata={"batch": "nothing"}).data == []


def test_events_are_newest_first_and_page_back_to_older_ones(client, training_file, store):
    job = client.fine_tuning.jobs.create(model="local:demo", training_file=training_file.id)
    for step in range(1, 26):
        store.add_event(job.id, level="info", message=f"Step {step}/25: training loss=1.0", type="metrics",
                        data={"step": step, "train_loss": 1.0})
    first = client.fine_tuning.jobs.list_events(job.id)
    assert len(first.data) == 20 and first.has_more  # OpenAI's default page of 20
    assert first.data[0].message == "Step 25/25: training loss=1.0" and first.data[0].type == "metrics"
    assert first.data[0].data == {"step": 25, "train_loss": 1.0}
    every = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=7)]  # auto-pagination
    assert every == [f"Step {s}/25: training loss=1.0" for s in range(25, 0, -1)] + [
        f"Validating training file: {training_file.id}", f"Created fine-tuning job: {job.id}"]


def test_checkpoints_are_listed_newest_first_with_their_metrics(client, training_file, store):
    job = client.fine_tuning.jobs.create(model="local:demo", training_file=training_file.id)
    for step in (4, 8, 12):
        store.add_checkpoint(job.id, step_number=step, metrics={"step": step, "train_loss": 2.0 / step},
                             fine_tuned_model_checkpoint=f"ft:local:demo::{job.id}:ckpt-step-{step}",
                             path=f"jobs/{job.id}/train/checkpoints/step-{step}")
    page = strict(client).fine_tuning.jobs.checkpoints.list(job.id, limit=2)
    assert [c.step_number for c in page.data] == [12, 8] and page.has_more
    assert page.data[0].fine_tuned_model_checkpoint.endswith(":ckpt-step-12")
    assert page.data[0].metrics.train_loss == pytest.approx(2.0 / 12) and page.data[0].fine_tuning_job_id == job.id
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id, limit=1)] == [12, 8, 4]


def test_cancel_pause_and_resume_follow_the_jobs_state(client, training_file, store):
    job = client.fine_tuning.jobs.create(model="local:demo", training_file=training_file.id)
    with pytest.raises(openai.ConflictError) as caught:
        client.fine_tuning.jobs.pause(job.id)
    assert "only a running job" in caught.value.message
    assert caught.value.response.headers["x-should-retry"] == "false"

    store.update_job(job.id, status="running", worker_id="w", lease_expires_at=db.now() + 60)
    paused = client.fine_tuning.jobs.pause(job.id)
    assert store.get_job(job.id).requested == "pause" and paused.status == "running"  # the worker checkpoints first
    store.update_job(job.id, status="paused", requested=None, worker_id=None, lease_expires_at=None)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.pause(job.id)
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.resume(job.id)

    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    with pytest.raises(openai.ConflictError) as caught:
        client.fine_tuning.jobs.cancel(job.id)
    assert "already cancelled" in caught.value.message
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=3)]
    assert messages[0] == "Fine-tuning job cancelled" and messages[1].startswith("Fine-tuning job resumed")


def test_a_running_job_cancelled_stays_requested_for_its_worker(client, training_file, store):
    job = client.fine_tuning.jobs.create(model="local:demo", training_file=training_file.id)
    store.update_job(job.id, status="running", worker_id="w", lease_expires_at=db.now() + 60)
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    assert store.get_job(job.id).requested == "cancel"
    assert store.heartbeat(job.id, worker_id="w", lease_s=30) is False  # the worker learns to stop


def test_unknown_jobs_and_routes_are_404_envelopes(client, api_server):
    for call in (lambda: client.fine_tuning.jobs.retrieve("ftjob-000000000000000000000000"),
                 lambda: client.fine_tuning.jobs.cancel("ftjob-nope"),
                 lambda: client.fine_tuning.jobs.list_events("ftjob-.."),
                 lambda: client.fine_tuning.jobs.checkpoints.list("ftjob-nope")):
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        assert caught.value.code == "job_not_found"
        assert set(caught.value.body) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError) as caught:  # a path in the id: no route matches
        client.fine_tuning.jobs.list_events("../x")
    assert "Invalid URL" in caught.value.message and caught.value.body["type"] == "invalid_request_error"
    answer = httpx.get(f"{api_server.base_url}/no/such/route")
    assert answer.status_code == 404 and answer.json()["error"]["type"] == "invalid_request_error"
    wrong_method = httpx.put(f"{api_server.base_url}/fine_tuning/jobs")
    assert wrong_method.status_code == 405 and "not allowed" in wrong_method.json()["error"]["message"]


def test_a_malformed_or_incomplete_body_is_a_400_envelope(api_server):
    url = f"{api_server.base_url}/fine_tuning/jobs"
    broken = httpx.post(url, content=b'{"model": "local:demo",', headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "parse the JSON body" in broken.json()["error"]["message"]
    missing = httpx.post(url, json={"model": "local:demo"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "training_file"
    typo = httpx.post(url, json={"model": "local:demo", "training_file": "file-x", "sufix": "a"})
    assert typo.status_code == 400 and typo.json()["error"]["param"] == "sufix"


def test_models_lists_the_bases_and_succeeded_fine_tuned_models(client, training_file, store):
    assert {"local:demo", "local:smollm2-135m-instruct"} <= {m.id for m in strict(client).models.list()}
    job = client.fine_tuning.jobs.create(model="local:demo", training_file=training_file.id, suffix="sq")
    name = f"ft:local:demo:sq:{job.id}"
    store.update_job(job.id, status="succeeded", fine_tuned_model=name, finished_at=db.now())
    assert name in {m.id for m in client.models.list()}
    model = strict(client).models.retrieve(name)  # ':' in the id, as OpenAI's names have
    assert model.id == name and model.object == "model"
    assert client.models.retrieve("local:demo").owned_by == "tunesmith"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve(f"ft:local:demo:other:{job.id}")
    assert caught.value.code == "model_not_found"
