"""Experiment trackers (tensorboard, mlflow, wandb through their own libraries), the best step, early stopping and
the over-fitting warning."""

import json
from pathlib import Path

import pytest
import torch

from train_fixtures import config, metrics, write_arithmetic
from tunesmith.errors import UserError
from tunesmith.train import best, train
from tunesmith.train.tracking import check_trackers


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_arithmetic(tmp_path_factory.mktemp("data"), n_train=16, n_eval=4)


@pytest.mark.slow
def test_every_tracker_reads_back_the_logged_series_and_the_config(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config(tiny_model_dir, data_dir, method="full", max_steps=4, per_device_train_batch_size=4,
                 gradient_accumulation_steps=1, logging_steps=2, eval_strategy="steps", eval_steps=2,
                 report_to="[tensorboard,mlflow,wandb]")
    run = tmp_path / "run"
    train(cfg, out_dir=run)
    logged = [m for m in metrics(run) if m["step"] % 2 == 0]
    evals = metrics(run, "eval")

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for name in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "peak_memory_gib"):
        series = events.Scalars(f"train/{name}")
        assert [s.step for s in series] == [2, 4]
        assert [s.value for s in series] == pytest.approx([m[name] for m in logged], rel=1e-6)
    assert [s.value for s in events.Scalars("eval/eval_loss")] == pytest.approx([e["eval_loss"] for e in evals])
    (text,) = events.Tensors("config/text_summary")
    assert f"learning_rate: {cfg.train.learning_rate}" in text.tensor_proto.string_val[0].decode()

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("tunesmith").experiment_id])
    history = client.get_metric_history(found.info.run_id, "train/loss")
    assert [(h.step, h.value) for h in history] == [(m["step"], pytest.approx(m["loss"])) for m in logged]
    assert [h.value for h in client.get_metric_history(found.info.run_id, "eval/eval_token_accuracy")] == \
        pytest.approx([e["eval_token_accuracy"] for e in evals])
    assert found.data.params["train.learning_rate"] == str(cfg.train.learning_rate)
    assert found.info.status == "FINISHED"

    (offline,) = (run / "wandb").glob("offline-run-*")
    (log,) = offline.glob("run-*.wandb")
    # wandb's log is protobuf records whose history values are JSON text: each logged number is in it as written
    written = log.read_bytes()
    assert all(json.dumps(m["loss"]).encode() in written for m in logged)
    assert all(json.dumps(e["eval_loss"]).encode() in written for e in evals)
    assert b"train/grad_norm" in written and b"eval/eval_token_accuracy" in written


def test_an_unknown_or_missing_tracker_is_one_error_naming_what_to_install():
    with pytest.raises(UserError, match="unknown tracker 'comet'"):
        check_trackers(["tensorboard", "comet"])
    with pytest.raises(UserError, match="wandb is not installed") as err:
        check_trackers(["tensorboard", "wandb"], is_installed=lambda module: module != "wandb")
    assert "pip install wandb" in err.value.hint
    check_trackers(["tensorboard", "mlflow", "wandb"], is_installed=lambda module: True)


def test_a_missing_tracker_module_or_an_uncomputed_best_metric_fails_before_training(tiny_model_dir, data_dir,
                                                                                        tmp_path):
    # a tracker whose module is absent here, declared in the table the check reads
    cfg = config(tiny_model_dir, data_dir, method="full", max_steps=1, report_to="[wandb]")
    from tunesmith.train import tracking
    absent = {**tracking.LIBRARIES, "wandb": ("tunesmith_no_such_module", "wandb")}
    with pytest.raises(UserError, match="wandb is not installed"):
        tracking.check_trackers(cfg.train.report_to, libraries=absent)
    with pytest.raises(UserError, match="metric_for_best_model: 'task_bleu'"):
        train(config(tiny_model_dir, data_dir, max_steps=1, metric_for_best_model="task_bleu"),
              out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


LOSSES = [(1, 2.0), (2, 1.5), (3, 1.2), (4, 1.25), (5, 1.21), (6, 1.3)]


def test_the_best_step_moves_only_on_an_improvement_beyond_the_threshold():
    assert best.select(LOSSES[:3], greater=False) == best.Selection(3, 1.2, True, 0, False)
    after = best.select(LOSSES, greater=False, patience=3)
    assert (after.best_step, after.evaluations_since_best, after.stop) == (3, 3, True)
    assert not best.select(LOSSES[:5], greater=False, patience=3).stop
    # with a threshold of 0.4, 2.0 → 1.5 is an improvement and 1.5 → 1.2 (0.3) is not: the best stays at step 2
    assert best.select(LOSSES, greater=False, threshold=0.4).best_step == 2
    accuracy = [(s, 1 - v / 2) for s, v in LOSSES]
    assert best.select(accuracy, greater=True).best_step == 3


def test_greater_is_better_is_inferred_for_known_metrics_and_an_unknown_one_is_refused():
    assert best.greater_is_better("eval_loss", None, []) is False
    assert best.greater_is_better("eval_token_accuracy", None, []) is True
    assert best.greater_is_better("task_exact", None, ["exact"]) is True
    assert best.greater_is_better("eval_loss", True, []) is True
    with pytest.raises(UserError, match="task_exact"):
        best.greater_is_better("task_exact", None, [])


def test_overfitting_is_flagged_when_eval_loss_rises_as_train_loss_falls():
    train_curve = [(s, 3.0 - 0.3 * s) for s in range(1, 7)]
    warning = best.overfitting(train_curve, [(2, 1.0), (4, 1.1), (6, 1.3)])
    assert warning and "step 2" in warning and "step 6" in warning
    assert "num_train_epochs" in warning and "learning_rate" in warning and "early_stopping_patience" in warning
    assert best.overfitting(train_curve, [(2, 1.0), (4, 0.9), (6, 0.8)]) is None
    assert best.overfitting([(s, 1.0 + 0.1 * s) for s in range(1, 7)], [(2, 1.0), (4, 1.3)]) is None


def test_early_stopping_stops_at_the_expected_step_and_keeps_the_best_steps_weights(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunesmith.chat import TokenizedChat
    from tunesmith.config import TrainConfig
    from tunesmith.hardware.machine import Hardware
    from tunesmith.train import StepSetup, fit
    from tunesmith.train.distributed import Processes
    from tunesmith.train.model import prepare_model
    from tunesmith.train.plan import Precision, plan_training

    tcfg = TrainConfig(method="full", max_steps=20, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                       learning_rate=3e-3, warmup_ratio=0.0, logging_steps=1, eval_strategy="steps", eval_steps=1,
                       save_strategy="steps", save_steps=1, save_total_limit=1, compile=False,
                       gradient_checkpointing=False, metric_for_best_model="task_score",
                       load_best_model_at_end=True, early_stopping_patience=3)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = prepare_model(model, tcfg, plan_training(model.config, tcfg, hardware=Hardware.cpu(), world=1))
    examples = [TokenizedChat(ids, list(ids)) for ids in ([(5 * k + j) % 200 + 3 for j in range(16)]
                                                          for k in range(8))]
    # a crafted task-metric curve: best at the 3rd evaluation, then 3 without improvement → stop after step 6
    curve = iter([0.2, 0.4, 0.6, 0.5, 0.6, 0.55])
    weights_at = {}

    def scored(m):
        weights_at[len(weights_at) + 1] = {n: p.detach().clone() for n, p in m.named_parameters()}
        return {"task_score": next(curve)}

    setup = StepSetup(procs=Processes.single(torch.device("cpu")), precision=Precision(torch.float32, None),
                      optimizer="adamw_torch", pad_id=0, packed=False, fused_loss=False)
    history = fit(model=model, setup=setup, tcfg=tcfg, train_examples=examples, eval_examples=examples[:2],
                  out=tmp_path / "run", task_eval=scored)
    assert (history["steps"], history["best_step"], history["kept_step"], history["stopped_early"]) == (6, 3, 3, True)
    assert history["best_metric"] == {"task_score": 0.6}
    kept = dict(model.named_parameters())
    assert all(torch.equal(kept[n], w) for n, w in weights_at[3].items())
    assert not all(torch.equal(kept[n], w) for n, w in weights_at[6].items())
    # save_total_limit 1 kept the newest regular checkpoint and, on top of it, the best one
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-3", "step-5"]


def test_the_report_marks_the_best_step_and_shows_the_overfitting_warning(tmp_path):
    from tunesmith.records import StageRecord
    from tunesmith.report import write_report

    train_curve = [(s, 3.0 - 0.3 * s) for s in range(1, 7)]
    eval_curve = [(2, 1.0), (4, 1.1), (6, 1.3)]
    warning = best.overfitting(train_curve, eval_curve)
    (tmp_path / "train").mkdir()
    metrics_file = tmp_path / "train" / "metrics.jsonl"
    metrics_file.write_text("".join(json.dumps({"type": "train", "step": s, "loss": v, "learning_rate": 1e-3}) + "\n"
                                    for s, v in train_curve)
                            + "".join(json.dumps({"type": "eval", "step": s, "eval_loss": v}) + "\n"
                                      for s, v in eval_curve))
    result = {"method": "lora", "steps": 6, "best_step": 2, "best_metric": {"eval_loss": 1.0}, "kept_step": 6,
              "stopped_early": False, "warnings": [warning]}
    StageRecord(stage="train", key="0" * 16, status="done", seconds=1.0, summary="train done", finished=0.0,
                outputs={"run_dir": str(tmp_path / "train"), "artefact_dir": str(tmp_path / "train"),
                         "metrics_file": str(metrics_file), "result": result}).write(tmp_path / "train")
    (tmp_path / "config.json").write_text("{}")
    report = write_report(tmp_path)
    page = Path(report.html).read_text()
    assert ("<p id='best-step'>Best step: kept the weights of the last step, 6; the best eval_loss (1) was at step 2 "
            "(train.load_best_model_at_end: true keeps the best step&#x27;s).</p>") in page
    assert page.index("id='warnings'") < page.index("id='best-step'")
    assert "<b>train</b>: over-fitting: eval loss rose from 1.0000 at step 2 to 1.3000 at step 6" in page
    assert "Best step: kept the weights of the last step, 6" in Path(report.markdown).read_text()


def test_a_tracker_that_fails_mid_run_stops_it_with_one_message():
    from tunesmith.errors import RunError
    from tunesmith.train.tracking import Trackers

    class Full:
        def __init__(self):
            self.logged = []

        def log(self, metrics, step):
            if step == 2:
                raise OSError("No space left on device")
            self.logged.append((step, metrics))

        def close(self):
            pass

    full = Full()
    trackers = Trackers([full])
    trackers.log({"type": "train", "step": 1, "loss": 2.5, "epoch": 0.5}, 1)
    trackers.log({"type": "train", "step": 2, "loss": 2.0}, 2)
    with pytest.raises(RunError, match=r"a tracker failed to log \(OSError: No space left on device\)"):
        trackers.close()
    assert full.logged == [(1, {"train/loss": 2.5, "train/epoch": 0.5})]
