"""`tunesmith run`: stages skip when their inputs are unchanged, redo when they change, resume after an
interruption, and a failing stage is named with how to continue. Tiny model, a few steps: seconds on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.config import load_config
from tunesmith.errors import RunError, UserError
from tunesmith.pipeline import read_stage, run

EXAMPLES = [
    {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
    for a in range(6) for b in range(4)
]


def make_data(folder: Path) -> None:
    """A ``pipeline.generate`` function: writes a small chat train/eval set."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES[:20]))
    (folder / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES[20:]))


def broken_generator(folder: Path) -> None:
    raise ValueError("the generator could not reach its source")


def _config(tmp_path: Path, tiny_model_dir: Path, *extra: str):
    gen = tmp_path / "gen"
    text = f"""
out_dir: {tmp_path / "run"}
model:
  name_or_path: {tiny_model_dir}
pipeline:
  generate: tests.test_pipeline:make_data
  generate_dir: {gen}
train:
  method: full
  dataset: {gen}
  max_steps: 4
  per_device_train_batch_size: 4
  gradient_accumulation_steps: 1
  learning_rate: 0.001
  logging_steps: 1
  save_strategy: steps
  save_steps: 2
  eval_strategy: "no"
"""
    path = tmp_path / "tunesmith.yaml"
    path.write_text(text)
    return load_config(path, list(extra))


def _statuses(result) -> dict[str, str]:
    return {s.name: s.status for s in result.stages}


def test_second_run_skips_every_stage_whose_inputs_did_not_change(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir)
    first = run(cfg)
    assert _statuses(first)["generate"] == "ran"
    assert _statuses(first)["train"] == "ran"
    assert _statuses(first)["merge"] == "not needed"  # full fine-tuning already holds a whole model
    assert Path(first.report_html).is_file()
    train_record = read_stage(cfg.out_dir, "train")
    assert train_record.status == "done"

    second = run(cfg)
    assert _statuses(second)["generate"] == "up to date"
    assert _statuses(second)["train"] == "up to date"
    assert read_stage(cfg.out_dir, "train").finished == train_record.finished


def test_a_changed_training_setting_retrains_but_keeps_the_generated_data(tmp_path, tiny_model_dir):
    run(_config(tmp_path, tiny_model_dir))
    changed = run(_config(tmp_path, tiny_model_dir, "train.learning_rate=0.002"))
    assert _statuses(changed)["generate"] == "up to date"
    assert _statuses(changed)["train"] == "ran"
    assert _statuses(changed)["report"] == "ran"


def test_turning_a_stage_off_or_adding_an_export_redoes_nothing_upstream(tmp_path, tiny_model_dir):
    run(_config(tmp_path, tiny_model_dir))
    again = run(_config(tmp_path, tiny_model_dir, "pipeline.gguf=[f16]", "pipeline.skip=[export]"))
    assert _statuses(again)["generate"] == "up to date"
    assert _statuses(again)["train"] == "up to date"
    assert _statuses(again)["export"] == "skipped"


def test_edited_input_data_reruns_the_stages_that_read_it(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, "pipeline.skip=[generate]")
    make_data(tmp_path / "gen")
    run(cfg)
    with open(tmp_path / "gen" / "train.jsonl", "a") as fh:
        fh.write(json.dumps(EXAMPLES[0]) + "\n")
    again = run(cfg)
    assert _statuses(again)["generate"] == "skipped"
    assert _statuses(again)["train"] == "ran"


def test_an_interrupted_run_continues_training_from_its_checkpoint(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir)

    def stop_after_first_checkpoint(event):
        if event.get("event") == "checkpoint":
            raise KeyboardInterrupt  # what Ctrl-C does half-way through training

    with pytest.raises(KeyboardInterrupt):
        run(cfg, on_event=stop_after_first_checkpoint)
    assert read_stage(cfg.out_dir, "generate").status == "done"
    assert read_stage(cfg.out_dir, "train") is None  # not finished, so never recorded as done

    again = run(cfg)
    assert _statuses(again)["generate"] == "up to date"
    assert _statuses(again)["train"] == "resumed"
    steps = [json.loads(line)["step"] for line in
             (Path(cfg.out_dir) / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # steps 1-2 kept from the first attempt, 3-4 trained after resuming


def test_a_failing_stage_is_named_with_how_to_continue(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, "pipeline.generate=tests.test_pipeline:broken_generator")
    with pytest.raises(RunError) as info:
        run(cfg)
    assert "stage `generate` failed" in info.value.message
    assert "could not reach its source" in info.value.message
    assert "re-run the same `tunesmith run` command" in info.value.hint


def test_without_an_eval_set_the_eval_stages_are_passed_over_and_the_rest_still_runs(tmp_path, tiny_model_dir):
    make_data(tmp_path / "raw")
    cfg = _config(tmp_path, tiny_model_dir, "pipeline.generate=null", "train.method=lora", "data.eval_fraction=0",
                  f"data.train_files=[{tmp_path / 'raw' / 'train.jsonl'}]", "data.short_outputs.enabled=false")
    result = run(cfg)

    reason = "no eval set — data.eval_fraction is 0 and no eval file is given"
    outcomes = {s.name: s for s in result.stages}
    assert {n: (outcomes[n].status, outcomes[n].summary) for n in ("baseline", "eval")} == \
        {"baseline": ("not needed", reason), "eval": ("not needed", reason)}
    assert [outcomes[n].status for n in ("data", "train", "merge", "report")] == ["ran"] * 4
    assert not (Path(cfg.out_dir) / "baseline").exists()
    assert f"The eval was not run: {reason}." in Path(result.report_md).read_text()
    assert "The eval was not run: no eval set" in Path(result.report_html).read_text()


def test_every_stage_name_has_one_entry_in_the_stage_table():
    from tunesmith.config.pipeline import STAGE_NAMES
    from tunesmith.pipeline import STAGES

    assert tuple(STAGES) == STAGE_NAMES
    with pytest.raises(UserError, match=r"pipeline\.skip"):
        load_config(None, ["pipeline.skip=[evaluate]"])


@pytest.mark.slow
def test_a_two_process_train_stage_runs_under_torchrun_and_emits_the_in_process_events(tmp_path, tiny_model_dir):
    """``train_processes=2``: the train stage is two torchrun processes (FSDP2 over gloo on the CPU), the rest of
    the pipeline stays here, and the events — steps, checkpoints — arrive as the in-process stage emits them."""
    cfg = _config(tmp_path, tiny_model_dir, "train.method=lora", "pipeline.skip=[baseline,eval]")
    seen: list[dict] = []
    result = run(cfg, on_event=seen.append, train_processes=2)
    assert _statuses(result)["train"] == "ran" and _statuses(result)["merge"] == "ran"
    train_dir = tmp_path / "run" / "train"
    assert json.loads((train_dir / "run.json").read_text())["processes"] == 2
    kinds = [e["event"] for e in seen]
    start = next(e for e in seen if e["event"] == "start")
    assert start["total_steps"] == 4 and kinds.index("start") < kinds.index("step")
    assert [e["step"] for e in seen if e["event"] == "step"] == [1, 2, 3, 4]
    logged = [json.loads(x) for x in (train_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["loss"] for e in seen if e["event"] == "step"] == [m["loss"] for m in logged if m["type"] == "train"]
    checkpoints = [e for e in seen if e["event"] == "checkpoint"]
    assert [e["step"] for e in checkpoints] == [2] and Path(checkpoints[0]["path"]).is_dir()
    # the stage's record is that of the run the ranks wrote: the next stage merged its artefact
    train = next(s for s in result.stages if s.name == "train")
    assert Path(train.outputs["artefact_dir"]).is_dir() and "4 steps" in train.summary
