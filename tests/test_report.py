"""The run report: built from a real (tiny) pipeline run, opened in headless Chromium, and it shows the numbers."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tunesmith.config import load_config
from tunesmith.pipeline import read_stage, run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EXAMPLES = [
    {"messages": [{"role": "user", "content": f"Say the word number {i}."},
                  {"role": "assistant", "content": f"word {i}"}]}
    for i in range(30)
]


def make_data(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES[:24]))
    (folder / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES[24:]))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("report")
    gen = tmp / "gen"
    path = tmp / "tunesmith.yaml"
    path.write_text(f"""
out_dir: {tmp / "run"}
model: {{name_or_path: {tiny_model_dir}}}
pipeline: {{generate: "tests.test_report:make_data", generate_dir: {gen}}}
train: {{method: full, dataset: {gen}, max_steps: 6, per_device_train_batch_size: 4, gradient_accumulation_steps: 1,
         learning_rate: 0.003, logging_steps: 1, eval_strategy: "no", save_strategy: "no"}}
eval: {{dataset: {gen}/eval.jsonl, metrics: [exact, contains], max_new_tokens: 6, batch_size: 6,
        bootstrap_samples: 200}}
""")
    cfg = load_config(path)
    result = run(cfg)
    return cfg, result


def _scores(out_dir: str, stage: str) -> dict[str, float]:
    doc = json.loads((Path(out_dir) / stage / "metrics.json").read_text())
    return {name: m["mean"] for name, m in doc["models"][0]["metrics"].items()}


def test_report_is_one_self_contained_html_file_with_inlined_curves(finished_run):
    _cfg, result = finished_run
    page = Path(result.report_html).read_text()
    assert not re.search(r"""(src|href)\s*=\s*['"](https?:|//|file:)""", page)  # no external assets
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == 2  # loss and learning-rate curves
    assert all(base64.b64decode(img).startswith(b"\x89PNG") for img in images)


def test_markdown_report_has_the_same_eval_numbers(finished_run):
    cfg, result = finished_run
    text = Path(result.report_md).read_text()
    base, tuned = _scores(cfg.out_dir, "baseline"), _scores(cfg.out_dir, "eval")
    assert f"| exact | {100 * base['exact']:.1f}% |" in text
    assert f"{100 * tuned['exact']:.1f}%" in text
    steps = read_stage(cfg.out_dir, "train").outputs.result["steps"]
    assert f"| steps | {steps} |" in text


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium_and_shows_the_numbers(finished_run, tmp_path):
    cfg, result = finished_run
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'ud'}"]
    url = Path(result.report_html).resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    base, tuned = _scores(cfg.out_dir, "baseline"), _scores(cfg.out_dir, "eval")
    table = dom[dom.index("id=\"metrics\""):]
    for metric in ("exact", "contains"):
        row = table[table.index(f"<td>{metric}</td>"):].split("</tr>")[0]
        assert f"{100 * base[metric]:.1f}%" in row
        assert f"{100 * tuned[metric]:.1f}%" in row
    assert "Resolved config" in dom and "transformers" in dom  # config and versions sections rendered

    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1000,1400", url], capture_output=True,
                   timeout=120, check=True)
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 20_000  # a rendered page, not blank


def test_warnings_of_any_stage_are_shown_first_in_both_reports(tmp_path):
    from tunesmith.records import StageRecord
    from tunesmith.report import write_report

    def stage(name, outputs):
        StageRecord(stage=name, key="0" * 16, status="done", seconds=1.0, summary=f"{name} done", outputs=outputs,
                    finished=0.0).write(tmp_path / name)

    stage("merge", {"model_dir": "m", "result": {"parity": {}, "warnings": ["merged in bfloat16 <lossy>"]}})
    stage("export", {"export_dir": "e", "result": {"artefacts": [
        {"quant": "f16", "warnings": []}, {"quant": "q4_0", "warnings": ["q4_0: agrees on 44% of tokens"]}]}})
    (tmp_path / "config.json").write_text("{}")
    result = write_report(tmp_path)
    page = Path(result.html).read_text()
    assert page.index("id='warnings'") < page.index("<h2>Stages</h2>")
    assert "<b>merge</b>: merged in bfloat16 &lt;lossy&gt;" in page
    assert "<b>export</b>: q4_0: agrees on 44% of tokens" in page
    markdown = Path(result.markdown).read_text()
    assert "- **export**: q4_0: agrees on 44% of tokens" in markdown


def test_the_tuned_models_remaining_mistakes_are_listed_with_their_reasons():
    from tunesmith.report import _misses

    def row(prompt, correct, reason=""):
        return {"input": prompt, "expected": "SELECT 1;", "prediction": "SELECT 2;",
                "verdicts": {"sql_execution": {"correct": correct, "reason": reason}}}

    view = {"examples": {3: row("third", False, "different results: 1 rows, as expected, but with other values"),
                         1: row("first", True), 2: row("second", False, "predicted query failed: no such table")}}
    misses, count = _misses(view, limit=1)
    assert count == 2 and [m.prompt for m in misses] == ["second"]  # eval-file order, only the wrong ones
    assert misses[0].reason == "sql_execution: predicted query failed: no such table"
    assert _misses(None) == ([], 0)
