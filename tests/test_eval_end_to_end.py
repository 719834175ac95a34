"""``evaluate()`` and ``tunesmith eval`` end to end: a tiny model trained here beats its base; reports list both."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunesmith.config import load_config
from tunesmith.evaluate import evaluate, task_eval

# a task a 2-layer model learns in seconds: four questions, four fixed answers
PAIRS = [("What sound does a cat make?", "meow"), ("What sound does a dog make?", "woof"),
         ("What sound does a cow make?", "moo"), ("What sound does a duck make?", "quack")]


def _chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prepared")
    (folder / "train.jsonl").write_text("".join(json.dumps(_chat(q, a)) + "\n" for q, a in PAIRS * 8))
    # a leading blank line: reports must name eval-file lines (2..5), not list positions
    (folder / "eval.jsonl").write_text("\n" + "".join(json.dumps(_chat(q, a)) + "\n" for q, a in PAIRS))
    return folder


def _config(model_dir, data, *extra):
    return load_config(None, [
        f"model.name_or_path={model_dir}", f"train.dataset={data}", f"eval.dataset={data}",
        "train.per_device_train_batch_size=8", "train.gradient_accumulation_steps=1", "train.warmup_ratio=0",
        "train.lr_scheduler_type=constant", "train.save_strategy='no'", "train.eval_strategy='no'",
        "eval.max_new_tokens=8", "eval.bootstrap_samples=200", *extra])


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, prepared, tmp_path_factory):
    from tunesmith.train import train

    # full fine-tuning: every weight moves, so a random tiny model truly learns the four answers
    cfg = _config(tiny_model_dir, prepared, "train.method=full", "train.max_steps=60", "train.learning_rate=3e-3")
    return train(cfg, out_dir=tmp_path_factory.mktemp("runs") / "full")


def test_the_tuned_model_beats_its_base_and_the_report_lists_both(tiny_model_dir, prepared, full_run, tmp_path):
    cfg = _config(tiny_model_dir, prepared, "eval.metrics=[exact, contains]")
    report = evaluate(cfg, models=["base", full_run.run_dir], out_dir=tmp_path / "eval")

    base, tuned = report.models
    assert (base.label, tuned.label) == ("base", full_run.run_dir)
    assert tuned.kind == "model"
    assert tuned.metrics["exact"].mean > base.metrics["exact"].mean
    assert tuned.metrics["exact"].correct == len(PAIRS)  # answers match exactly: generation stopped at end-of-turn
    assert tuned.loss["loss"] < base.loss["loss"] and tuned.loss["token_accuracy"] > base.loss["token_accuracy"]
    exact = next(c for c in report.comparisons if c["metric"] == "exact")
    assert exact["delta"] > 0 and sorted(exact["fixed"]) == [2, 3, 4, 5] and exact["broken"] == []

    rows = [json.loads(line) for line in Path(report.files["predictions"]).read_text().splitlines()]
    assert len(rows) == 2 * len(PAIRS) and {r["model"] for r in rows} == {"base", full_run.run_dir}
    assert all({"input", "expected", "prediction", "verdicts"} <= r.keys() for r in rows)
    assert {r["prediction"] for r in rows if r["model"] != "base"} == {a for _, a in PAIRS}
    saved = json.loads(Path(report.files["metrics"]).read_text())
    assert [m["label"] for m in saved["models"]] == ["base", full_run.run_dir]
    assert saved["models"][1]["metrics"]["exact"]["ci_low"] is not None
    md = Path(report.files["report_md"]).read_text()
    assert "| exact |" in md and full_run.run_dir in md and "wrong → right: 4" in md
    assert "- line 5: **input** What sound does a duck make?" in md
    manifest = json.loads(Path(report.out_dir, "run.json").read_text())
    assert manifest["stage"] == "eval" and manifest["outputs"]["metrics"] == report.files["metrics"]
    page = Path(report.files["report_html"]).read_text()
    assert "data:image/png;base64," in page and "quack" in page
    assert Path(report.files["chart"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_adapter_is_found_from_its_run_folder_or_its_own_folder(tiny_model_dir, prepared, tmp_path):
    from tunesmith.train import train

    cfg = _config(tiny_model_dir, prepared, "train.method=lora", "train.max_steps=3", "train.learning_rate=1e-2",
                  "eval.metrics=[exact]")
    run = train(cfg, out_dir=tmp_path / "lora")
    report = evaluate(cfg, models=["base", run.run_dir, f"{run.run_dir}/adapter"], out_dir=tmp_path / "eval")
    base, from_run, from_folder = report.models
    assert from_run.kind == from_folder.kind == "adapter"
    assert from_run.loss == from_folder.loss
    assert from_run.loss["loss"] != pytest.approx(base.loss["loss"], abs=1e-6)  # the adapter is applied


def test_predictions_that_break_metrics_and_a_raising_scorer_never_abort_the_run(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    db = tmp_path / "shop.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (x INTEGER)")
    conn.commit()
    conn.close()
    (tmp_path / "picky_scorer.py").write_text("def score(prediction, expected):\n    raise KeyError('boom')\n")
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "sql.jsonl"
    data.write_text("".join(json.dumps({"input": f"count rows {i}", "expected": "SELECT count(*) FROM t"}) + "\n"
                            for i in range(3)))
    cfg = load_config(None, [
        f"model.name_or_path={tiny_model_dir}", f"eval.dataset={data}", "eval.max_new_tokens=6",
        "eval.eval_loss=false", f"eval.metrics=[{{type: sql_execution, database: {db}}}, json_valid, "
        "{type: custom, function: 'picky_scorer:score'}]"])
    report = evaluate(cfg, out_dir=tmp_path / "eval")
    (base,) = report.models
    assert base.metrics["sql_execution"].correct == 0 and base.metrics["sql_execution"].errors == 0
    assert base.metrics["json_valid"].total == 3
    assert base.metrics["score"].errors == 3
    assert "picky_scorer:score raised KeyError" in base.metrics["score"].first_error
    rows = [json.loads(line) for line in Path(report.files["predictions"]).read_text().splitlines()]
    assert all(not r["verdicts"]["sql_execution"]["correct"] and r["verdicts"]["sql_execution"]["reason"]
               for r in rows)


def test_task_eval_scores_a_small_sample_for_the_training_loop(tiny_model_dir, full_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = json.loads(Path(full_run.run_dir, "run.json").read_text())["outputs"]["model"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    scores = task_eval(model, AutoTokenizer.from_pretrained(model_dir), [_chat(q, a) for q, a in PAIRS],
                       ["exact", {"type": "regex", "pattern": r"(m\w+)"}], max_new_tokens=8)
    assert scores["task_exact"] == 1.0
    assert scores["task_regex"] == 0.5  # meow and moo match the pattern; woof and quack do not
    assert model.training  # left as the training loop had it


def test_the_cli_writes_the_report_and_prints_one_json_object(tiny_model_dir, prepared, tmp_path):
    from tunesmith.cli import app

    config = tmp_path / "tunesmith.yaml"
    # no eval.dataset: the prepared training folder's held-out eval.jsonl is used
    config.write_text(f"model:\n  name_or_path: {tiny_model_dir}\ntrain:\n  dataset: {prepared}\n"
                      "eval:\n  max_new_tokens: 4\n  metrics: [exact, json_valid]\n")
    result = CliRunner().invoke(app, ["eval", str(config), "--model", "base", "--out", str(tmp_path / "out"),
                                      "--set", "eval.limit=2", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["examples"] == 2 and payload["models"][0]["label"] == "base"
    assert payload["dataset"] == str(prepared / "eval.jsonl")
    assert set(payload["models"][0]["metrics"]) == {"exact", "json_valid"}
    assert (tmp_path / "out" / "report.html").is_file()


def test_a_missing_sqlite_file_stops_the_cli_with_one_clear_message(tiny_model_dir, prepared, tmp_path):
    import os
    import subprocess
    import sys

    import tunesmith

    config = tmp_path / "tunesmith.yaml"
    config.write_text(f"model:\n  name_or_path: {tiny_model_dir}\neval:\n  dataset: {prepared}\n"
                      "  metrics:\n    - type: sql_execution\n      database: nowhere/shop.sqlite\n")
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "eval", str(config), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(tunesmith.__file__).parents[1])})
    assert proc.returncode == 2
    assert "eval.metrics[0].database: SQLite file nowhere/shop.sqlite does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def _gguf_converter():
    """llama.cpp's converter where `tunesmith setup-gguf` keeps it (or $TUNESMITH_GGUF_CONVERTER); None if absent."""
    import os

    llama_cpp = pytest.importorskip("llama_cpp")
    if os.environ.get("TUNESMITH_GGUF_CONVERTER"):
        return Path(os.environ["TUNESMITH_GGUF_CONVERTER"])
    home = Path(os.environ.get("TUNESMITH_HOME") or Path.home() / ".cache" / "tunesmith")
    path = home / f"llama.cpp-{llama_cpp.__version__}" / "convert_hf_to_gguf.py"
    return path if path.is_file() else None


@pytest.mark.gguf
@pytest.mark.slow
def test_a_gguf_export_scores_like_the_hf_model_it_came_from(tiny_model_dir, prepared, full_run, tmp_path):
    import subprocess
    import sys

    converter = _gguf_converter()
    if converter is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py is not set up (tunesmith setup-gguf)")
    model_dir = json.loads(Path(full_run.run_dir, "run.json").read_text())["outputs"]["model"]
    gguf = tmp_path / "tuned-f32.gguf"
    subprocess.run([sys.executable, str(converter), model_dir, "--outfile", str(gguf), "--outtype", "f32"],
                   check=True, capture_output=True, timeout=300)
    cfg = _config(tiny_model_dir, prepared, "eval.metrics=[exact]")
    report = evaluate(cfg, models=[model_dir, str(gguf)], out_dir=tmp_path / "eval")
    hf, ggml = report.models
    assert ggml.kind == "gguf" and ggml.loss is None
    assert ggml.metrics["exact"].correct == hf.metrics["exact"].correct == len(PAIRS)
    rows = [json.loads(line) for line in Path(report.files["predictions"]).read_text().splitlines()]
    assert [r["prediction"] for r in rows if r["model"] == str(gguf)] == [a for _, a in PAIRS]


def test_task_eval_inside_the_training_loop_runs_under_its_mixed_precision(tiny_model_dir, tmp_path):
    # bf16 base + fp32 adapters, as on a GPU: the loop keeps adapter inputs bf16, so generation must run under the
    # loop's autocast (found on an H200: task eval during training stopped the run with a dtype error)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.chat import TokenizedChat
    from tunesmith.config import TrainConfig
    from tunesmith.hardware.machine import Hardware
    from tunesmith.train import StepSetup, fit
    from tunesmith.train.distributed import Processes
    from tunesmith.train.loss import fused_head_supported
    from tunesmith.train.model import prepare_model
    from tunesmith.train.plan import Precision, plan_training

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tcfg = TrainConfig(method="lora", max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                       eval_strategy="steps", eval_steps=1, save_strategy="no", logging_steps=1, compile=False,
                       gradient_checkpointing=False)
    device = torch.device("cpu")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model = prepare_model(model, tcfg, plan_training(model.config, tcfg, hardware=Hardware.cpu(), world=1))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    ids = [tok(tok.apply_chat_template(_chat(q, a)["messages"], tokenize=False))["input_ids"] for q, a in PAIRS]
    examples = [TokenizedChat(i, list(i)) for i in ids]
    calls = []

    def scored(m):
        calls.append(1)
        return task_eval(m, tok, [_chat(q, a) for q, a in PAIRS[:2]], ["exact"], max_new_tokens=4)

    setup = StepSetup(procs=Processes.single(device), precision=Precision(torch.bfloat16, torch.bfloat16),
                      optimizer="adamw_torch", pad_id=tok.pad_token_id, packed=False,
                      fused_loss=fused_head_supported(model))
    history = fit(model=model, setup=setup, tcfg=tcfg, train_examples=examples, eval_examples=examples,
                  out=tmp_path / "run", task_eval=scored)
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "eval"]
    assert history["steps"] == 2 and len(calls) == 2 and all("task_exact" in e for e in evals)
