"""The pure decisions behind a job: "auto" hyperparameters, micro-batches, names, and the config a job runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.server import jobs, schemas
from tunesmith.server.settings import ServerSettings


@pytest.mark.parametrize(("n", "epochs"), [(1, 25), (10, 10), (12, 9), (34, 3), (100, 3), (8333, 3), (8334, 2),
                                           (25_000, 1), (1_000_000, 1)])
def test_auto_epochs_keep_examples_times_epochs_in_100_to_25000(n, epochs):
    assert jobs.auto_epochs(n) == epochs


@pytest.mark.parametrize(("n", "batch"), [(1, 1), (10, 1), (16, 2), (100, 12), (128, 16), (10_000, 16)])
def test_auto_batch_is_the_guides_16_but_keeps_8_steps_an_epoch(n, batch):
    assert jobs.auto_batch_size(n) == batch


@pytest.mark.parametrize(("batch", "split"), [(1, (1, 1)), (4, (4, 1)), (6, (3, 2)), (7, (1, 7)), (16, (4, 4)),
                                              (256, (4, 64))])
def test_a_batch_is_micro_batches_of_at_most_four(batch, split):
    assert jobs.micro_batches(batch) == split
    assert split[0] * split[1] == batch


def test_given_numbers_win_and_the_legacy_field_means_supervised():
    request = schemas.CreateJobRequest(model="m", training_file="f",
                                       hyperparameters={"n_epochs": 2, "batch_size": 8})
    resolved = jobs.resolve_hyperparameters(request, 1000)
    assert (resolved.method, resolved.n_epochs, resolved.batch_size, resolved.beta) == ("supervised", 2, 8, None)
    dpo = jobs.resolve_hyperparameters(schemas.CreateJobRequest(model="m", training_file="f",
                                                                method={"type": "dpo"}), 1000)
    assert dpo.beta == jobs.DEFAULT_BETA and dpo.method_json()["dpo"]["hyperparameters"]["beta"] == 0.1
    with pytest.raises(jobs.InvalidRequest) as caught:
        jobs.resolve_hyperparameters(schemas.CreateJobRequest(
            model="m", training_file="f", method={"type": "dpo", "supervised": {}}), 10)
    assert caught.value.param == "method.supervised"


def test_names_have_four_parts_with_the_job_id_last():
    assert jobs.fine_tuned_name("local:demo", "sq", "ftjob-1") == "ft:local:demo:sq:ftjob-1"
    assert jobs.fine_tuned_name("local:demo", None, "ftjob-1") == "ft:local:demo::ftjob-1"
    assert jobs.checkpoint_name("ft:b::j", 30) == "ft:b::j:ckpt-step-30"


def test_the_job_config_trains_lora_on_the_file_as_given():
    resolved = jobs.resolve_hyperparameters(schemas.CreateJobRequest(
        model="local:demo", training_file="f", hyperparameters={"batch_size": 16, "learning_rate_multiplier": 0.5}),
        200)
    config = jobs.job_config(job_id="ftjob-1", model="local:demo", hyperparameters=resolved.hyperparameters(),
                             method=resolved.method_json(), seed=5, train_file=Path("train.jsonl"),
                             validation_file=Path("valid.jsonl"), out_dir=Path("jobs/ftjob-1"),
                             settings=ServerSettings(export_gguf=True))
    assert config.model.name_or_path == "local:demo" and config.train.method == "lora"
    assert (config.train.per_device_train_batch_size, config.train.gradient_accumulation_steps) == (4, 4)
    assert config.train.learning_rate == pytest.approx(1e-4) and config.train.num_train_epochs == 3
    assert config.data.train_files == ["train.jsonl"] and config.data.eval_file == "valid.jsonl"
    assert not config.data.short_outputs.enabled and not config.data.minhash.enabled
    assert config.pipeline.gguf == ["f16"] and config.train.seed == 5


def test_a_dpo_job_runs_tunesmiths_dpo_objective_with_the_resolved_beta():
    resolved = jobs.resolve_hyperparameters(schemas.CreateJobRequest(
        model="m", training_file="f", method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3}}}), 10)
    config = jobs.job_config(job_id="ftjob-1", model="local:demo", hyperparameters=resolved.hyperparameters(),
                             method=resolved.method_json(), seed=1, train_file=Path("t.jsonl"), validation_file=None,
                             out_dir=Path("o"), settings=ServerSettings())
    assert config.train.objective == "dpo" and config.train.dpo.beta == 0.3
