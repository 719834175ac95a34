"""The job store's schema migrations and its metrics read: a database of the first schema is brought forward in
place (its rows kept) with the metrics (job_id, step) index, and a job's points come back oldest step first."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import inspect

from tunesmith.server import db

MIGRATIONS = Path(db.__file__).with_name("migrations")


def first_schema_store(path: Path) -> db.Store:
    """A store as tunesmith's first schema (revision 0001) made it."""
    store = db.connect(f"sqlite:///{path}")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with store.engine.execution_options(writes=True).begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
    return store


def new_job(store: db.Store) -> db.Job:
    return store.create_job(owner="local", model="local:demo", training_file="file-x", validation_file=None,
                            method={"type": "supervised"}, hyperparameters={}, suffix=None, seed=1, metadata={})


def test_a_first_schema_store_is_brought_forward_with_the_metrics_step_index_and_keeps_its_rows(tmp_path):
    old = first_schema_store(tmp_path / "t.db")
    assert "ix_metrics_job_id_step" not in {i["name"] for i in inspect(old.engine).get_indexes("metrics")}
    job = new_job(old)
    old.upsert_metric(job.id, kind="train", step=1, values={"loss": 2.5})
    old.close()

    store = db.connect(f"sqlite:///{tmp_path / 't.db'}")
    store.upgrade()
    indexes = {i["name"]: i["column_names"] for i in inspect(store.engine).get_indexes("metrics")}
    assert indexes["ix_metrics_job_id_step"] == ["job_id", "step"]
    assert [(m.step, m.values) for m in store.metrics(job.id)] == [(1, {"loss": 2.5})]


def test_metrics_come_oldest_step_first_with_train_and_eval_interleaved_and_one_row_per_step(tmp_path):
    store = db.connect(f"sqlite:///{tmp_path / 't.db'}")
    store.upgrade()
    job, other = new_job(store), new_job(store)
    for step in (3, 1, 2):
        store.upsert_metric(job.id, kind="train", step=step, values={"loss": float(step)})
    store.upsert_metric(job.id, kind="eval", step=2, values={"eval_loss": 9.0})
    store.upsert_metric(job.id, kind="train", step=2, values={"loss": 0.5})  # a resumed run's redone step
    store.upsert_metric(other.id, kind="train", step=1, values={"loss": 7.0})
    assert [(m.step, m.kind, m.values) for m in store.metrics(job.id)] == [
        (1, "train", {"loss": 1.0}), (2, "eval", {"eval_loss": 9.0}), (2, "train", {"loss": 0.5}),
        (3, "train", {"loss": 3.0})]
    assert [m.step for m in store.metrics(job.id, kind="train")] == [1, 2, 3]
    assert store.drop_metrics_after(job.id, step=1) == 3
    assert [m.step for m in store.metrics(job.id)] == [1] and len(store.metrics(other.id)) == 1
