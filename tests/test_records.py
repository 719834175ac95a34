"""Run-folder records: each round-trips through its one writer and reader; a missing, foreign, truncated or older
record is one UserError naming the file and the command that writes it; merge, export and eval read a train run by
its fields, and a moved run folder still merges and evaluates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from records_fixtures import write_train_run
from test_export_cli import tunesmith
from train_fixtures import config, write_arithmetic
from tunesmith.config import ModelConfig
from tunesmith.errors import UserError
from tunesmith.evaluate.models import resolve_spec
from tunesmith.export.samples import BUILTIN_CONVERSATIONS, conversations_for, trained_in
from tunesmith.records import (
    DataOutputs,
    EvalOutputs,
    EvalRun,
    ExportOutputs,
    ExportRecord,
    GenerateOutputs,
    MergeOutputs,
    PreparedData,
    PreparedInput,
    ReportOutputs,
    StageRecord,
    TrainOutputs,
    TrainRun,
    versions,
)


def _chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


# --- round trips ----------------------------------------------------------------------------------------------------

def test_a_train_run_record_reads_back_equal_to_what_was_written(tmp_path, tiny_model_dir):
    written = write_train_run(tmp_path / "run", tiny_model_dir, method="qlora", eval_file=tmp_path / "eval.jsonl")
    read = TrainRun.read(tmp_path / "run")
    assert read == written
    assert read.quantization is not None and read.quantization.quant_type == "nf4"
    assert read.outputs.adapter == str(tmp_path / "run" / "adapter") and read.outputs.model is None


@pytest.mark.parametrize("record", [
    PreparedData(created="2026-01-01T00:00:00Z", inputs=[PreparedInput(path="a.jsonl", split="train+eval",
                                                                        sha256="0" * 64, examples=3)],
                 config={"data": {"eval_fraction": 0.1}}, counts={"train": 2, "eval": 1},
                 outputs={"train": "train.jsonl"}, versions=versions()),
    EvalRun(config={}, models=[{"label": "base"}], outputs={"metrics": "metrics.json"}, result={"examples": 4},
            versions=versions()),
], ids=["prepared", "eval"])
def test_prepared_data_and_eval_records_read_back_equal(tmp_path, record):
    record.write(tmp_path)
    assert type(record).read(tmp_path) == record


def test_an_export_record_keeps_the_exporters_fields_at_the_top_of_the_file(tmp_path):
    record = ExportRecord(stage="merge", kind="merged", source="run/adapter", train_run="run",
                          result={"parity": {"passed": True, "max_abs_diff": 1e-6}, "method": "lora"},
                          versions=versions())
    record.write(tmp_path)
    on_disk = json.loads((tmp_path / "export.json").read_text())
    assert on_disk["stage"] == "merge" and on_disk["parity"]["passed"] is True and "result" not in on_disk
    assert ExportRecord.read(tmp_path) == record


@pytest.mark.parametrize("outputs", [
    GenerateOutputs(generate_dir="g", files=["g/train.jsonl"], result=None),
    DataOutputs(prepared_dir="d", result={"train_examples": 3}),
    EvalOutputs(eval_dir="e", result={}),
    TrainOutputs(run_dir="t", artefact_dir="t/adapter", metrics_file="t/metrics.jsonl", result={"steps": 4}),
    MergeOutputs(model_dir="m", result={"parity": {}}),
    ExportOutputs(export_dir="x", result={"artefacts": []}),
    ReportOutputs(html="r.html", markdown="r.md"),
], ids=lambda o: type(o).__name__)
def test_a_stage_record_reads_back_with_the_outputs_of_its_own_kind(tmp_path, outputs):
    record = StageRecord(stage="train", key="0123456789abcdef", status="done", seconds=1.5, summary="done",
                         outputs=outputs, finished=1.0)
    record.write(tmp_path)
    read = StageRecord.read(tmp_path)
    assert read == record and type(read.outputs) is type(outputs)


# --- one message for a record that is not one -----------------------------------------------------------------------

def test_a_missing_train_run_record_names_the_file_and_the_command(tmp_path):
    with pytest.raises(UserError) as info:
        TrainRun.read(tmp_path)
    assert str(tmp_path / "run.json") in info.value.message and "`tunesmith train`" in info.value.message


def test_a_truncated_train_run_record_is_not_valid_json(tmp_path, tiny_model_dir):
    write_train_run(tmp_path, tiny_model_dir)
    text = (tmp_path / "run.json").read_text()
    (tmp_path / "run.json").write_text(text[: len(text) // 2])
    with pytest.raises(UserError, match=r"run\.json:\d+: not a train run record \(not valid JSON"):
        TrainRun.read(tmp_path)


def test_a_record_of_another_stage_is_foreign(tmp_path):
    EvalRun(config={}, models=[], outputs={}, result={}, versions=versions()).write(tmp_path)
    with pytest.raises(UserError, match=r"not a train run record \(field 'stage'.*— written by `tunesmith train`"):
        TrainRun.read(tmp_path)


def test_a_train_run_record_from_an_older_tunesmith_names_the_missing_field(tmp_path, tiny_model_dir):
    write_train_run(tmp_path, tiny_model_dir)
    data = json.loads((tmp_path / "run.json").read_text())
    del data["method"]
    (tmp_path / "run.json").write_text(json.dumps(data))
    with pytest.raises(UserError) as info:
        TrainRun.read(tmp_path)
    assert info.value.message == (f"{tmp_path / 'run.json'}: not a train run record (missing field 'method') — "
                                  "written by `tunesmith train`")


def test_a_broken_train_run_record_exits_2_through_the_cli_with_one_message(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    write_train_run(run, tiny_model_dir)
    data = json.loads((run / "run.json").read_text())
    del data["outputs"]
    (run / "run.json").write_text(json.dumps(data))

    (tmp_path / "eval.jsonl").write_text(json.dumps(_chat(0)) + "\n")
    cfg = tmp_path / "tunesmith.yaml"
    cfg.write_text(json.dumps({"model": {"name_or_path": str(tiny_model_dir)},
                               "eval": {"dataset": str(tmp_path / "eval.jsonl")}}))
    for proc in (tunesmith("merge", str(run)), tunesmith("eval", str(cfg), "--model", str(run))):
        assert proc.returncode == 2, proc.stderr
        assert "missing field 'outputs'" in proc.stderr and "`tunesmith train`" in proc.stderr
        assert "Traceback" not in proc.stderr


# --- readers read by fields -----------------------------------------------------------------------------------------

def test_samples_take_the_eval_file_the_run_records_and_no_other(tmp_path, tiny_model_dir):
    eval_file = tmp_path / "held-out.jsonl"
    eval_file.write_text("".join(json.dumps(_chat(i)) + "\n" for i in range(3)))
    run = write_train_run(tmp_path / "a", tiny_model_dir, eval_file=eval_file)
    assert [c[0]["content"] for c in conversations_for(run)] == ["question 0", "question 1", "question 2"]

    # a path that merely ends in eval.jsonl somewhere else in the record is not the run's eval file
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "eval.jsonl").write_text(eval_file.read_text())
    bare = write_train_run(tmp_path / "b", tiny_model_dir).model_copy(
        update={"result": {"data": {"eval": {"file": str(tmp_path / "b" / "eval.jsonl")}}}})
    assert conversations_for(bare) == [list(c) for c in BUILTIN_CONVERSATIONS]


def test_a_merged_model_names_the_train_run_it_came_from(tmp_path, tiny_model_dir):
    ExportRecord(stage="merge", kind="merged", source=str(tmp_path / "run" / "adapter"),
                 train_run=str(tmp_path / "run"), result={}, versions=versions()).write(tmp_path / "merged")
    assert trained_in(tmp_path / "merged") is None  # the run folder is gone
    written = write_train_run(tmp_path / "run", tiny_model_dir)
    assert trained_in(tmp_path / "merged") == written
    assert trained_in(tmp_path) is None  # no export record: not a merged model


def test_eval_reads_a_run_folder_by_its_record(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    write_train_run(run, tiny_model_dir)
    spec = resolve_spec(str(run), ModelConfig(name_or_path="local:tiny"))
    assert (spec.kind, spec.adapter, spec.model.name_or_path) == ("adapter", str(run / "adapter"),
                                                                   str(tiny_model_dir))
    # an eval folder's run.json is not a train run
    EvalRun(config={}, models=[], outputs={}, result={}, versions=versions()).write(tmp_path / "eval")
    (tmp_path / "eval" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="not a train run record"):
        resolve_spec(str(tmp_path / "eval"), ModelConfig())


# --- a moved run folder ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moved_run(tiny_model_dir, tmp_path_factory):
    """A LoRA run trained here, then moved elsewhere: its record still names the old paths."""
    from tunesmith.train import train

    tmp = tmp_path_factory.mktemp("moved")
    data = write_arithmetic(tmp / "data", n_train=16, n_eval=4)
    train(config(tiny_model_dir, data, method="lora", max_steps=2, per_device_train_batch_size=8,
                 gradient_accumulation_steps=1), out_dir=tmp / "before")
    shutil.move(tmp / "before", tmp / "after")
    return tmp / "after", data


def test_a_moved_run_folder_still_merges(moved_run, tmp_path):
    from tunesmith.export import merge

    run, _ = moved_run
    assert not Path(TrainRun.read(run).outputs.adapter).exists()
    result = merge(run, tmp_path / "merged", dtype="float32")
    assert result.parity.passed and result.adapter == str((run / "adapter").resolve())
    assert ExportRecord.read(tmp_path / "merged").train_run == str(run.resolve())


def test_a_moved_run_folder_still_evaluates(moved_run, tiny_model_dir, tmp_path):
    from tunesmith.config import load_config
    from tunesmith.evaluate import evaluate

    run, data = moved_run
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"eval.dataset={data}", "eval.metrics=[exact]",
                             "eval.max_new_tokens=4", "eval.bootstrap_samples=50"])
    report = evaluate(cfg, models=[str(run)], out_dir=tmp_path / "eval")
    assert report.models[0].kind == "adapter" and report.examples == 4
    assert EvalRun.read(tmp_path / "eval").result["examples"] == 4
