"""The run report: one self-contained HTML file (pictures inlined as base64 PNG, no external assets) and Markdown.

It reads only what the stages wrote under the run folder (``<stage>/stage.json`` and the files they name), so it
can be rebuilt at any time with ``write_report(run_dir)`` (``tunesmith run`` also says which stages it passed over,
and why). Sections: the data, the training curves (loss and
learning rate from ``metrics.jsonl``), base vs tuned eval metrics with 95% intervals and the examples that flipped,
the artefacts with their parity checks, and the resolved config with library versions.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config.pipeline import STAGE_NAMES
from .files import atomic_files
from .records import StageRecord, versions


@dataclass(frozen=True)
class ReportResult:
    html: str
    markdown: str
    images: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MetricRow:
    name: str
    base: float | None
    base_ci: tuple[float, float] | None
    tuned: float | None
    tuned_ci: tuple[float, float] | None


@dataclass(frozen=True)
class Flip:
    prompt: str
    expected: str
    base: str
    tuned: str
    direction: str
    """``fixed`` (base wrong, tuned right) or ``broken`` (base right, tuned wrong)."""


@dataclass(frozen=True)
class Miss:
    """An eval example the tuned model still gets wrong, with the metric's reason."""

    prompt: str
    expected: str
    prediction: str
    reason: str


@dataclass(frozen=True)
class ReportData:
    title: str
    stages: list[dict[str, Any]]
    data: dict[str, Any] | None
    train: dict[str, Any] | None
    curves: dict[str, list[tuple[float, float]]]
    metrics: list[MetricRow]
    num_eval: int | None
    flips: list[Flip]
    flip_counts: dict[str, int]
    """How many examples went wrong → right (``fixed``) and right → wrong (``broken``), all of them."""
    artefacts: list[dict[str, Any]]
    config_yaml: str
    versions: dict[str, str]
    warnings: list[tuple[str, str]] = field(default_factory=list)
    """(stage, message) for every warning a stage's result carries (a lossy merge, a GGUF that drifts …)."""
    misses: list[Miss] = field(default_factory=list)
    """The first examples the tuned model (else the base) still gets wrong."""
    miss_count: int = 0
    eval_not_run: str | None = None
    """Why the eval stages were passed over (no eval set), when they were."""


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, *,
                 passed_over: dict[str, str] | None = None) -> ReportResult:
    """Collect the stages' outputs under ``run_dir`` and write ``report.html`` and ``report.md`` to ``out_dir``.
    ``passed_over``: stages this run had nothing to do for, with the reason (their old records are not shown)."""
    run = Path(run_dir)
    out = Path(out_dir) if out_dir else run / "report"
    data = collect(run, passed_over or {})
    images = _plots(data.curves, data.train.get("chosen") if data.train else None)
    with atomic_files(out) as staging:  # all the report's files or, when a write fails, none
        (staging / "report.html").write_text(render_html(data, images), encoding="utf-8")
        for name, png in images.items():
            (staging / f"{name}.png").write_bytes(png)
        (staging / "report.md").write_text(render_markdown(data, list(images)), encoding="utf-8")
    return ReportResult(str(out / "report.html"), str(out / "report.md"), [str(out / f"{n}.png") for n in images])


# --- collecting -----------------------------------------------------------------------------------------------------

def collect(run: Path, passed_over: dict[str, str]) -> ReportData:
    records = {name: StageRecord.read(run / name) for name in STAGE_NAMES
               if name not in passed_over and (run / name / StageRecord.FILE).is_file()}
    config = _read_json(run / "config.json") or {}
    train = records.get("train")
    curves = _curves(Path(train.outputs.metrics_file)) if train else {}
    base_eval, tuned_eval = _eval_view(records.get("baseline")), _eval_view(records.get("eval"))
    metrics = _metric_rows(base_eval, tuned_eval)
    flips = _flips(base_eval, tuned_eval)
    flip_counts = _flip_counts(base_eval, tuned_eval)
    num_eval = (tuned_eval or base_eval or {}).get("n")
    stages = [{"name": n, "seconds": records[n].seconds, "summary": records[n].summary} if n in records else
              {"name": n, "seconds": 0.0, "summary": f"not needed: {passed_over[n]}"}
              for n in STAGE_NAMES if n != "report" and (n in records or n in passed_over)]
    title = f"tunesmith run — {config.get('model', {}).get('name_or_path', '?')}"
    return ReportData(title, stages, _data_view(records), _train_view(train), curves, metrics, num_eval, flips,
                      flip_counts, _artefacts(records), yaml.safe_dump(config, sort_keys=False), versions(),
                      stage_warnings(records), *_misses(tuned_eval or base_eval),
                      eval_not_run=passed_over.get("eval") or passed_over.get("baseline"))


def stage_warnings(records: dict[str, StageRecord]) -> list[tuple[str, str]]:
    """Every ``warnings`` list of strings anywhere in each stage's outputs, in stage order, without repeats."""
    out: list[tuple[str, str]] = []
    for name, record in records.items():
        for message in _warning_texts(record.outputs.model_dump(mode="json")):
            if (name, message) not in out:
                out.append((name, message))
    return out


def _warning_texts(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [w for w in node.get("warnings") or () if isinstance(w, str)] \
            if isinstance(node.get("warnings"), list | tuple) else []
        return found + [w for k, v in node.items() if k != "warnings" for w in _warning_texts(v)]
    if isinstance(node, list | tuple):
        return [w for v in node for w in _warning_texts(v)]
    return []


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _curves(path: Path) -> dict[str, list[tuple[float, float]]]:
    curves: dict[str, list[tuple[float, float]]] = {"loss": [], "learning_rate": [], "eval_loss": []}
    if not path.is_file():
        return curves
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by an interruption
        step = rec.get("step")
        if step is None:
            continue
        if rec.get("type", "train") == "train":
            for key in ("loss", "learning_rate"):
                if isinstance(rec.get(key), int | float):
                    curves[key].append((step, float(rec[key])))
        elif rec.get("type") == "eval" and isinstance(rec.get("eval_loss"), int | float):
            curves["eval_loss"].append((step, float(rec["eval_loss"])))
    return curves


def _data_view(records: dict[str, StageRecord]) -> dict[str, Any] | None:
    rec = records.get("data") or records.get("generate")
    if not rec:
        return None
    # Counts people read; per-rule timings stay in the data stage's own report.
    numbers = {k: v for k, v in _flat_numbers(rec.outputs.result).items() if not k.startswith(("timings", "cpu_s"))}
    lengths = Path(rec.outputs.prepared_dir) / "lengths.png" if rec.stage == "data" else None  # its length plot
    return {"stage": rec.stage, "summary": rec.summary, "numbers": numbers,
            "lengths_png": lengths.read_bytes() if lengths is not None and lengths.is_file() else None}


def _train_view(rec: StageRecord | None) -> dict[str, Any] | None:
    if not rec:
        return None
    result = rec.outputs.result
    keep = ("method", "steps", "epochs", "train_loss", "eval_loss", "eval_token_accuracy", "eval_win_rate",
            "tokens_per_s", "trainable_params", "total_params", "best_step", "kept_step")
    return {"summary": rec.summary, "seconds": rec.seconds,
            "numbers": {k: result[k] for k in keep if result.get(k) is not None}, "chosen": _chosen(result)}


def _chosen(result: dict[str, Any]) -> dict[str, Any] | None:
    """The best evaluation and which step's weights the run kept, as a sentence and the step to mark on the curve
    (None for a run without evaluations, or from before runs recorded them)."""
    best_step, kept = result.get("best_step"), result.get("kept_step")
    if best_step is None or kept is None:
        return None
    [(metric, value)] = result["best_metric"].items()
    stopped = f"; early stopping ended the run at step {result['steps']}" if result.get("stopped_early") else ""
    if kept == best_step:
        text = f"kept the weights of step {kept}, the best {metric} ({value:.4g}){stopped}"
    else:
        text = (f"kept the weights of the last step, {kept}; the best {metric} ({value:.4g}) was at step "
                f"{best_step} (train.load_best_model_at_end: true keeps the best step's){stopped}")
    return {"step": best_step, "kept": kept == best_step, "text": text}


def _eval_view(rec: StageRecord | None) -> dict[str, Any] | None:
    """Scores and per-example verdicts of the (one) model an eval stage scored: its ``metrics.json`` and
    ``predictions.jsonl``."""
    if not rec:
        return None
    folder = Path(rec.outputs.eval_dir)
    doc = _read_json(folder / "metrics.json") or {}
    models = doc.get("models") or [{}]
    scores = {}
    for name, value in (models[0].get("metrics") or {}).items():
        ci = (value["ci_low"], value["ci_high"]) if value.get("ci_low") is not None else None
        scores[name] = (float(value["mean"]), ci)
    examples: dict[int, dict[str, Any]] = {}
    preds = folder / "predictions.jsonl"
    if preds.is_file():
        for line in preds.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            examples[row["line"]] = row
    return {"scores": scores, "examples": examples, "n": doc.get("examples") or len(examples) or None,
            "label": models[0].get("label")}


def _metric_rows(base: dict[str, Any] | None, tuned: dict[str, Any] | None) -> list[MetricRow]:
    names = list(dict.fromkeys([*(base or {}).get("scores", {}), *(tuned or {}).get("scores", {})]))
    rows = []
    for name in names:
        b = (base or {}).get("scores", {}).get(name)
        t = (tuned or {}).get("scores", {}).get(name)
        rows.append(MetricRow(name, b[0] if b else None, b[1] if b else None, t[0] if t else None, t[1] if t else None))
    return rows


def _correct(row: dict[str, Any]) -> bool:
    """Right by every metric."""
    verdicts = row.get("verdicts") or {}
    return bool(verdicts) and all(v.get("correct") for v in verdicts.values())


def _flip_counts(base: dict[str, Any] | None, tuned: dict[str, Any] | None) -> dict[str, int]:
    counts = {"fixed": 0, "broken": 0}
    if base and tuned:
        for line, t in tuned["examples"].items():
            b = base["examples"].get(line)
            if b is not None and _correct(b) != _correct(t):
                counts["fixed" if _correct(t) else "broken"] += 1
    return counts


def _flips(base: dict[str, Any] | None, tuned: dict[str, Any] | None, limit: int = 10) -> list[Flip]:
    """Examples whose verdict changed between the base and the tuned model, matched by eval-file line."""
    if not base or not tuned:
        return []
    out: list[Flip] = []
    for line, t in sorted(tuned["examples"].items()):
        b = base["examples"].get(line)
        if b is None or _correct(b) == _correct(t):
            continue
        direction = "fixed" if _correct(t) else "broken"
        if sum(f.direction == direction for f in out) >= limit:
            continue
        out.append(Flip(str(t.get("input", "")), str(t.get("expected", "")), str(b.get("prediction", "")),
                        str(t.get("prediction", "")), direction))
    return out


def _misses(view: dict[str, Any] | None, limit: int = 8) -> tuple[list[Miss], int]:
    """The first ``limit`` wrong answers of a model's eval (by eval-file line), and how many there are."""
    if not view:
        return [], 0
    wrong = [row for _, row in sorted(view["examples"].items()) if not _correct(row)]
    misses = []
    for row in wrong[:limit]:
        reasons = [f"{name}: {v.get('reason', '')}" for name, v in (row.get("verdicts") or {}).items()
                   if not v.get("correct")]
        misses.append(Miss(str(row.get("input", "")), str(row.get("expected", "")), str(row.get("prediction", "")),
                           "; ".join(reasons)))
    return misses, len(wrong)


def _artefacts(records: dict[str, StageRecord]) -> list[dict[str, Any]]:
    out = []
    train = records.get("train")
    if train:
        full = train.outputs.result.get("method") == "full"
        out.append({"name": "fine-tuned model (HF folder)" if full else "LoRA adapter (PEFT folder)",
                    "path": train.outputs.artefact_dir,
                    "check": "evaluated directly by the eval stage" if records.get("eval") else "—"})
    merge = records.get("merge")
    if merge:
        out.append({"name": "merged model (HF folder)", "path": merge.outputs.model_dir,
                    "check": _merge_check(merge.outputs.result.get("parity") or {})})
    export = records.get("export")
    if export:
        for item in export.outputs.result.get("artefacts", []):
            out.append({"name": f"GGUF {item.get('quant', '')}", "path": item.get("path"),
                        "check": _gguf_check(item.get("check"))})
    return out


def _merge_check(parity: dict[str, Any]) -> str:
    if not parity:
        return "no parity check recorded"
    verdict = "passed" if parity.get("passed") else "FAILED"
    return (f"logits parity vs base + adapter {verdict}: max |Δlogit| {parity.get('max_abs_diff', float('nan')):.2e}"
            f" ≤ {parity.get('tolerance', float('nan')):.2e}, top-1 agreement "
            f"{100 * parity.get('top1_agreement', 0):.1f}%")


def _gguf_check(check: dict[str, Any] | None) -> str:
    if not check:
        return "not checked"
    return (f"llama.cpp vs HF greedy output: {check.get('identical')}/{check.get('num_prompts')} identical, "
            f"agreement {100 * check.get('agreement', 0):.1f}%")


def _flat_numbers(value: Any, prefix: str = "", depth: int = 0) -> dict[str, Any]:
    """Scalar fields of a stage result, dotted, for a compact table."""
    out: dict[str, Any] = {}
    if isinstance(value, dict) and depth < 3:
        for k, v in value.items():
            out.update(_flat_numbers(v, f"{prefix}{k}.", depth + 1))
    elif isinstance(value, int | float) and not isinstance(value, bool):
        out[prefix.rstrip(".")] = value
    return out


# --- pictures -------------------------------------------------------------------------------------------------------

def _plots(curves: dict[str, list[tuple[float, float]]], chosen: dict[str, Any] | None = None) -> dict[str, bytes]:
    if not curves.get("loss"):
        return {}
    import matplotlib

    matplotlib.use("Agg")  # no display; the non-interactive backend writes PNG bytes
    import matplotlib.pyplot as plt

    images: dict[str, bytes] = {}
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=110)
    steps, losses = zip(*curves["loss"], strict=True)
    ax.plot(steps, losses, label="train loss", color="#2563eb", linewidth=1.4)
    if curves.get("eval_loss"):
        es, el = zip(*curves["eval_loss"], strict=True)
        ax.plot(es, el, "o-", label="eval loss", color="#dc2626")
    if chosen is not None:
        ax.axvline(chosen["step"], color="#111827", linestyle="--", linewidth=1,
                   label=f"best step {chosen['step']}" + (" (kept)" if chosen["kept"] else ""))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per supervised token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    images["loss"] = _png(fig)
    if curves.get("learning_rate"):
        fig, ax = plt.subplots(figsize=(6.4, 2.6), dpi=110)
        s, lr = zip(*curves["learning_rate"], strict=True)
        ax.plot(s, lr, color="#059669")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("learning rate")
        ax.grid(alpha=0.3)
        images["learning_rate"] = _png(fig)
    plt.close("all")
    return images


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --- rendering ------------------------------------------------------------------------------------------------------

def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _ci(ci: tuple[float, float] | None) -> str:
    return "" if not ci else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


CSS = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:980px;color:#111;
padding:0 1rem}
h1{font-size:1.6rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.3rem .6rem;text-align:left;
vertical-align:top}th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre,code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px}pre{background:#f7f7f7;padding:.8rem;
overflow:auto}.fixed{color:#047857}.broken{color:#b91c1c}.big{font-size:1.25rem;font-weight:600}
td code{word-break:break-all;white-space:pre-wrap}
.bar{height:14px;background:#2563eb;display:inline-block;vertical-align:middle}.bar.base{background:#9ca3af}
.warnings li{background:#fffbeb;border-left:4px solid #d97706;padding:.3rem .6rem;margin:.3rem 0;list-style:none}
"""


def render_html(d: ReportData, images: dict[str, bytes]) -> str:
    e = html.escape
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(d.title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{e(d.title)}</h1>"]
    headline = [r for r in d.metrics if r.base is not None and r.tuned is not None]
    if headline:
        r = headline[0]
        parts.append(f"<p class='big' id='headline'>{e(r.name)}: base {_pct(r.base)} → tuned {_pct(r.tuned)}"
                     f"{f' on {d.num_eval} held-out examples' if d.num_eval else ''}</p>")
    if d.warnings:
        parts.append("<h2 id='warnings'>Warnings</h2><ul class='warnings'>")
        parts += [f"<li><b>{e(stage)}</b>: {e(message)}</li>" for stage, message in d.warnings]
        parts.append("</ul>")
    parts.append("<h2>Stages</h2><table><tr><th>stage</th><th>seconds</th><th>summary</th></tr>")
    for s in d.stages:
        parts.append(f"<tr><td>{e(s['name'])}</td><td class='num'>{s['seconds']:.1f}</td>"
                     f"<td>{e(s['summary'])}</td></tr>")
    parts.append("</table>")

    parts.append("<h2>Data</h2>")
    if d.data:
        parts.append(f"<p>{e(d.data['summary'])}</p>" + _kv_table(d.data["numbers"]))
        if d.data.get("lengths_png"):
            b64 = base64.b64encode(d.data["lengths_png"]).decode()
            parts.append(f"<p><img alt='example lengths' src='data:image/png;base64,{b64}'></p>")
    else:
        parts.append("<p>No data stage ran.</p>")

    parts.append("<h2>Training</h2>")
    if d.train:
        parts.append(f"<p>{e(d.train['summary'])}</p>" + _kv_table(d.train["numbers"]))
        if d.train.get("chosen"):
            parts.append(f"<p id='best-step'>Best step: {e(d.train['chosen']['text'])}.</p>")
        for name in ("loss", "learning_rate"):
            if name in images:
                b64 = base64.b64encode(images[name]).decode()
                parts.append(f"<p><img alt='{name} curve' src='data:image/png;base64,{b64}'></p>")
    else:
        parts.append("<p>No train stage ran.</p>")

    parts.append("<h2>Evaluation: base vs tuned</h2>")
    if d.metrics:
        parts.append("<table id='metrics'><tr><th>metric</th><th>base</th><th>95% CI</th><th>tuned</th>"
                     "<th>95% CI</th><th></th></tr>")
        for r in d.metrics:
            bars = "".join(f"<span class='bar {cls}' style='width:{int(150 * v)}px' title='{cls}'></span><br>"
                           for cls, v in (("base", r.base), ("tuned", r.tuned)) if v is not None)
            parts.append(f"<tr><td>{e(r.name)}</td><td class='num'>{_pct(r.base)}</td><td>{_ci(r.base_ci)}</td>"
                         f"<td class='num'>{_pct(r.tuned)}</td><td>{_ci(r.tuned_ci)}</td><td>{bars}</td></tr>")
        parts.append("</table>")
        if d.num_eval:
            parts.append(f"<p>{d.num_eval} eval examples; intervals are bootstrap 95% confidence intervals.</p>")
    elif d.eval_not_run:
        parts.append(f"<p id='eval-not-run'>The eval was not run: {e(d.eval_not_run)}.</p>")
    else:
        parts.append("<p>No eval stage ran.</p>")
    if d.flips:
        parts.append(f"<h3>Examples that flipped: {d.flip_counts['fixed']} fixed (wrong → right), "
                     f"{d.flip_counts['broken']} broken (right → wrong); the first of each shown</h3>"
                     "<table><tr><th></th><th>question</th><th>expected</th><th>base</th><th>tuned</th></tr>")
        for f in d.flips:
            mark = "✔ fixed" if f.direction == "fixed" else "✘ broken"
            parts.append(f"<tr><td class='{f.direction}'>{mark}</td><td>{e(f.prompt)}</td><td><code>{e(f.expected)}"
                         f"</code></td><td><code>{e(_short(f.base))}</code></td><td><code>{e(_short(f.tuned))}</code>"
                         "</td></tr>")
        parts.append("</table>")

    if d.misses:
        parts.append(f"<h3 id='misses'>Still wrong: {d.miss_count} of {d.num_eval or '?'}; the first shown</h3>"
                     "<table><tr><th>question</th><th>expected</th><th>answer</th><th>why it is wrong</th></tr>")
        for m in d.misses:
            parts.append(f"<tr><td>{e(m.prompt)}</td><td><code>{e(m.expected)}</code></td>"
                         f"<td><code>{e(_short(m.prediction))}</code></td><td>{e(m.reason)}</td></tr>")
        parts.append("</table>")

    parts.append("<h2>Artefacts</h2>")
    if d.artefacts:
        parts.append("<table><tr><th>artefact</th><th>path</th><th>check</th></tr>")
        for a in d.artefacts:
            parts.append(f"<tr><td>{e(str(a['name']))}</td><td><code>{e(str(a['path']))}</code></td>"
                         f"<td>{e(a['check'])}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p>No artefacts.</p>")

    parts.append("<h2>Resolved config</h2>" f"<pre>{e(d.config_yaml)}</pre>")
    parts.append("<h2>Versions</h2>" + _kv_table(d.versions))
    parts.append("</body></html>")
    return "\n".join(parts)


def _kv_table(values: dict[str, Any]) -> str:
    if not values:
        return ""
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td class='num'>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in values.items())
    return f"<table>{rows}</table>"


def render_markdown(d: ReportData, image_names: list[str]) -> str:
    lines = [f"# {d.title}", ""]
    headline = [r for r in d.metrics if r.base is not None and r.tuned is not None]
    if headline:
        r = headline[0]
        lines += [f"**{r.name}: base {_pct(r.base)} → tuned {_pct(r.tuned)}**", ""]
    if d.warnings:
        lines += ["## Warnings", "", *(f"- **{stage}**: {message}" for stage, message in d.warnings), ""]
    lines += ["## Stages", "", "| stage | seconds | summary |", "|---|---:|---|"]
    lines += [f"| {s['name']} | {s['seconds']:.1f} | {_md(s['summary'])} |" for s in d.stages]
    lines += ["", "## Data", ""]
    if d.data:
        lines += [d.data["summary"], "", *_md_kv(d.data["numbers"])]
    lines += ["", "## Training", ""]
    if d.train:
        lines += [d.train["summary"], "", *_md_kv(d.train["numbers"]), ""]
        if d.train.get("chosen"):
            lines += [f"Best step: {d.train['chosen']['text']}.", ""]
        lines += [f"![{n}]({n}.png)" for n in image_names]
    lines += ["", "## Evaluation: base vs tuned", ""]
    if d.eval_not_run:
        lines += [f"The eval was not run: {d.eval_not_run}.", ""]
    lines += ["| metric | base | 95% CI | tuned | 95% CI |", "|---|---:|---|---:|---|"]
    lines += [f"| {r.name} | {_pct(r.base)} | {_ci(r.base_ci)} | {_pct(r.tuned)} | {_ci(r.tuned_ci)} |"
              for r in d.metrics]
    if d.flips:
        lines += ["", f"### Examples that flipped: {d.flip_counts['fixed']} fixed, {d.flip_counts['broken']} broken",
                  "", "| | question | expected | base | tuned |",
                  "|---|---|---|---|---|"]
        lines += [f"| {f.direction} | {_md(f.prompt)} | `{_md(f.expected)}` | `{_md(_short(f.base))}` | "
                  f"`{_md(_short(f.tuned))}` |" for f in d.flips]
    if d.misses:
        lines += ["", f"### Still wrong: {d.miss_count} of {d.num_eval or '?'}", "",
                  "| question | expected | answer | why it is wrong |", "|---|---|---|---|"]
        lines += [f"| {_md(m.prompt)} | `{_md(m.expected)}` | `{_md(_short(m.prediction))}` | {_md(m.reason)} |"
                  for m in d.misses]
    lines += ["", "## Artefacts", "", "| artefact | path | check |", "|---|---|---|"]
    lines += [f"| {a['name']} | `{a['path']}` | {_md(a['check'])} |" for a in d.artefacts]
    lines += ["", "## Resolved config", "", "```yaml", d.config_yaml.rstrip(), "```", "", "## Versions", "",
              *_md_kv(d.versions), ""]
    return "\n".join(lines)


def _short(text: str, n: int = 160) -> str:
    return text if len(text) <= n else text[:n] + " …"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_kv(values: dict[str, Any]) -> list[str]:
    if not values:
        return []
    return ["| | |", "|---|---:|", *[f"| {k} | {_fmt(v)} |" for k, v in values.items()]]
