"""What an eval writes: predictions.jsonl, metrics.json (bootstrap 95% intervals and counts), report.md and
report.html with a bar chart of every model per metric, and the examples that flipped against the first model."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_files, write_json_atomic
from .evalset import EvalExample
from .metrics import Verdict


@dataclass(frozen=True)
class MetricSummary:
    mean: float
    """Mean score over the examples (for right/wrong metrics: accuracy)."""
    ci_low: float | None
    ci_high: float | None
    correct: int
    """Examples scored fully right."""
    total: int
    errors: int
    """Examples the metric could not judge (its scorer raised, the expected answer was unusable) — counted wrong."""
    first_error: str | None = None


@dataclass(frozen=True)
class ModelRun:
    """One model's answers and verdicts, in eval-set order (verdicts[metric][i] for example i)."""

    label: str
    kind: str
    predictions: list[str]
    verdicts: dict[str, list[Verdict]]
    loss: dict[str, float] | None
    seconds: float


def bootstrap_ci(scores: Sequence[float], samples: int, seed: int) -> tuple[float | None, float | None]:
    """Percentile bootstrap 95% interval of the mean (resampling examples with replacement)."""
    if samples <= 0 or len(scores) == 0:
        return None, None
    values = np.asarray(scores, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_difference(a: Sequence[float], b: Sequence[float], samples: int, seed: int) -> dict[str, Any]:
    """Mean of b − a with a paired bootstrap interval (the same resampled examples for both models)."""
    diff = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    low, high = bootstrap_ci(diff.tolist(), samples, seed)
    return {"delta": float(diff.mean()) if len(diff) else 0.0, "ci_low": low, "ci_high": high}


def summarise(verdicts: Sequence[Verdict], samples: int, seed: int) -> MetricSummary:
    scores = [v.score for v in verdicts]
    low, high = bootstrap_ci(scores, samples, seed)
    errors = [v.reason for v in verdicts if v.error]
    return MetricSummary(float(np.mean(scores)) if scores else 0.0, low, high, sum(v.correct for v in verdicts),
                         len(verdicts), len(errors), errors[0] if errors else None)


def flips(before: Sequence[Verdict], after: Sequence[Verdict]) -> dict[str, list[int]]:
    """Indices of examples that went wrong → right and right → wrong between two models."""
    return {"fixed": [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if not a.correct and b.correct],
            "broken": [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a.correct and not b.correct]}


def write_report(out: Path, dataset: str, examples: Sequence[EvalExample], runs: Sequence[ModelRun],
                 summaries: dict[str, dict[str, MetricSummary]], comparisons: list[dict[str, Any]],
                 max_flips: int) -> dict[str, Path]:
    """Write every output file into ``out`` — all of them or, when a write fails, none; flips in ``comparisons``
    are eval-file line numbers."""
    names = {"predictions": "predictions.jsonl", "metrics": "metrics.json", "chart": "chart.png",
             "report_md": "report.md", "report_html": "report.html"}
    with atomic_files(out) as staging:
        files = {role: staging / name for role, name in names.items()}
        write_predictions(files["predictions"], examples, runs)
        write_json_atomic(files["metrics"], metrics_payload(dataset, len(examples), runs, summaries, comparisons))
        bar_chart(files["chart"], runs, summaries)
        files["report_md"].write_text(markdown(dataset, examples, runs, summaries, comparisons, files["chart"].name,
                                               max_flips), encoding="utf-8")
        files["report_html"].write_text(html_page(dataset, examples, runs, summaries, comparisons, files["chart"],
                                                  max_flips), encoding="utf-8")
    return {role: out / name for role, name in names.items()}


def write_predictions(path: Path, examples: Sequence[EvalExample], runs: Sequence[ModelRun]) -> None:
    """One line per (model, example): the prompt, the expected and predicted answers, each metric's verdict."""
    with open(path, "w", encoding="utf-8") as fh:
        for run in runs:
            for i, ex in enumerate(examples):
                row = {"model": run.label, "line": ex.line, "input": ex.input, "messages": ex.messages,
                       "expected": ex.expected, "prediction": run.predictions[i],
                       "verdicts": {name: {"score": v[i].score, "correct": v[i].correct, "reason": v[i].reason,
                                           **({"error": True} if v[i].error else {})}
                                    for name, v in run.verdicts.items()}}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def metrics_payload(dataset: str, n: int, runs: Sequence[ModelRun], summaries: dict[str, dict[str, MetricSummary]],
                    comparisons: list[dict[str, Any]]) -> dict[str, Any]:
    return {"dataset": dataset, "examples": n,
            "models": [{"label": r.label, "kind": r.kind, "seconds": round(r.seconds, 3), "loss": r.loss,
                        "metrics": {m: asdict(s) for m, s in summaries[r.label].items()}} for r in runs],
            "comparisons": comparisons}


def bar_chart(path: Path, runs: Sequence[ModelRun], summaries: dict[str, dict[str, MetricSummary]]) -> None:
    """Grouped bars: one group per metric, one bar per model, 95% interval as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric_names = list(summaries[runs[0].label])
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(metric_names) * max(1, len(runs) / 2)), 3.2), dpi=110)
    for k, run in enumerate(runs):
        s = [summaries[run.label][m] for m in metric_names]
        means = [x.mean for x in s]
        err = [[x.mean - (x.ci_low if x.ci_low is not None else x.mean) for x in s],
               [(x.ci_high if x.ci_high is not None else x.mean) - x.mean for x in s]]
        xs = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(metric_names))]
        ax.bar(xs, means, width, yerr=err, capsize=3, label=run.label)
    ax.set_xticks(range(len(metric_names)), metric_names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (95% CI)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path, bbox_inches="tight")  # keeps the legend placed outside the axes
    plt.close(fig)


def markdown(dataset: str, examples: Sequence[EvalExample], runs: Sequence[ModelRun],
             summaries: dict[str, dict[str, MetricSummary]], comparisons: list[dict[str, Any]], chart: str,
             max_flips: int) -> str:
    """The report as Markdown: scores table (with deltas), chart, and the flipped examples on the first metric."""
    lines = ["# Evaluation report", "", f"Eval set: `{dataset}` — {len(examples)} examples. Scores are means over the "
             "examples with a bootstrap 95% confidence interval; (right/total) in brackets.", ""]
    lines += _md_table(_score_rows(runs, summaries, comparisons))
    lines += ["", f"![scores per metric]({chart})", ""]
    for comp in _flip_sections(comparisons, summaries, runs):
        lines += [f"## {comp['after']} vs {comp['before']} on `{comp['metric']}`", ""]
        for key, title in (("fixed", "wrong → right"), ("broken", "right → wrong")):
            idx = comp[key]
            lines += [f"### {title}: {len(idx)}", ""]
            for line in idx[:max_flips]:
                i = _index_of(examples, line)
                ex = examples[i]
                lines += [f"- line {ex.line}: **input** {_one_line(ex.input)}",
                          f"  - expected: `{_one_line(ex.expected)}`",
                          f"  - {comp['before']}: `{_one_line(_prediction(runs, comp['before'], i))}`",
                          f"  - {comp['after']}: `{_one_line(_prediction(runs, comp['after'], i))}`"]
            if len(idx) > max_flips:
                lines.append(f"- … and {len(idx) - max_flips} more (see predictions.jsonl)")
            lines.append("")
    return "\n".join(lines) + "\n"


def html_page(dataset: str, examples: Sequence[EvalExample], runs: Sequence[ModelRun],
              summaries: dict[str, dict[str, MetricSummary]], comparisons: list[dict[str, Any]], chart_png: Path,
              max_flips: int) -> str:
    esc = html.escape
    rows = _score_rows(runs, summaries, comparisons)
    table = "<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in rows[0]) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows[1:]) + "</table>"
    # the chart is embedded, so the page is one self-contained file to share
    image = base64.b64encode(chart_png.read_bytes()).decode("ascii")
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>tunesmith eval</title><style>",
             "body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}"
             "pre{white-space:pre-wrap;background:#f6f6f6;padding:.4em;margin:.2em 0}",
             "</style></head><body><h1>Evaluation report</h1>",
             f"<p>Eval set <code>{esc(dataset)}</code> — {len(examples)} examples. Means with bootstrap 95% "
             "confidence intervals; (right/total) in brackets.</p>", table,
             f"<p><img alt='scores per metric' src='data:image/png;base64,{image}'></p>"]
    for comp in _flip_sections(comparisons, summaries, runs):
        parts.append(f"<h2>{esc(comp['after'])} vs {esc(comp['before'])} on <code>{esc(comp['metric'])}</code></h2>")
        for key, title in (("fixed", "wrong → right"), ("broken", "right → wrong")):
            parts.append(f"<h3>{title}: {len(comp[key])}</h3>")
            for line in comp[key][:max_flips]:
                i = _index_of(examples, line)
                ex = examples[i]
                parts.append(f"<p>line {ex.line}</p><pre>{esc(ex.input)}</pre>"
                             f"<p>expected</p><pre>{esc(ex.expected)}</pre>"
                             f"<p>{esc(comp['before'])}</p><pre>{esc(_prediction(runs, comp['before'], i))}</pre>"
                             f"<p>{esc(comp['after'])}</p><pre>{esc(_prediction(runs, comp['after'], i))}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _flip_sections(comparisons: list[dict[str, Any]], summaries: dict[str, dict[str, MetricSummary]],
                   runs: Sequence[ModelRun]) -> list[dict[str, Any]]:
    # flips are listed for the first metric only: one list of examples per model pair stays readable
    first = next(iter(summaries[runs[0].label]))
    return [c for c in comparisons if c["metric"] == first]


def _score_rows(runs: Sequence[ModelRun], summaries: dict[str, dict[str, MetricSummary]],
                comparisons: list[dict[str, Any]]) -> list[list[str]]:
    header = ["metric", *[r.label for r in runs]]
    deltas = {(c["after"], c["metric"]): c for c in comparisons}
    delta_for = {c["metric"] for c in comparisons}
    show_delta = len(runs) == 2
    if show_delta:
        header.append(f"Δ {runs[1].label} − {runs[0].label}")
    rows = [header]
    for metric in summaries[runs[0].label]:
        row = [metric, *[_cell(summaries[r.label][metric]) for r in runs]]
        if show_delta:
            d = deltas.get((runs[1].label, metric)) if metric in delta_for else None
            row.append(_delta(d) if d else "")
        rows.append(row)
    for key, title in (("loss", "eval loss"), ("perplexity", "perplexity"), ("token_accuracy", "token accuracy")):
        if any(r.loss for r in runs):
            row = [title, *[f"{r.loss[key]:.4f}" if r.loss else "n/a" for r in runs]]
            rows.append([*row, ""] if show_delta else row)
    return rows


def _cell(s: MetricSummary) -> str:
    ci = f" [{s.ci_low:.3f}, {s.ci_high:.3f}]" if s.ci_low is not None else ""
    err = f", {s.errors} errors" if s.errors else ""
    return f"{s.mean:.3f}{ci} ({s.correct}/{s.total}{err})"


def _delta(d: dict[str, Any]) -> str:
    ci = f" [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]" if d.get("ci_low") is not None else ""
    return f"{d['delta']:+.3f}{ci}"


def _md_table(rows: list[list[str]]) -> list[str]:
    def cells(r: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in r) + " |"

    return [cells(rows[0]), "|" + "---|" * len(rows[0]), *[cells(r) for r in rows[1:]]]


def _index_of(examples: Sequence[EvalExample], line: int) -> int:
    return next(k for k, ex in enumerate(examples) if ex.line == line)


def _prediction(runs: Sequence[ModelRun], label: str, i: int) -> str:
    return next(r.predictions[i] for r in runs if r.label == label)


def _one_line(text: str, n: int = 160) -> str:
    flat = " ".join(text.split()).replace("`", "'")
    return flat if len(flat) <= n else flat[: n - 1] + "…"
