"""The data report: what was read, held out, rejected (per rule, with a few examples each), token lengths, roles
and turns — as report.json (machines), report.md and report.html (people), and a length histogram (lengths.png).

report.json names examples only by ``file:line`` and field. The Markdown/HTML reports add a short snippet of a few
dropped examples so a person can judge a rule at a glance; they stay next to the data they describe.
"""

from __future__ import annotations

import html
import json
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXAMPLES_PER_RULE = 5
SNIPPET_CHARS = 80


def length_stats(lengths: Sequence[int]) -> dict[str, Any]:
    """count, total, min, mean, p50/p90/p99 and max of token lengths."""
    if not lengths:
        return {"count": 0}
    ordered = sorted(lengths)

    def pct(p: float) -> int:
        return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]

    return {"count": len(ordered), "total": sum(ordered), "min": ordered[0],
            "mean": round(statistics.fmean(ordered), 1), "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
            "max": ordered[-1]}


def role_counts(records: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Messages per role over all records."""
    return dict(Counter(m["role"] for r in records for m in r["messages"]).most_common())


def turn_counts(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Assistant turns per example: how many examples have 1, 2, … turns, and messages per example."""
    turns = Counter(sum(m["role"] == "assistant" for m in r["messages"]) for r in records)
    messages = [len(r["messages"]) for r in records]
    return {"assistant_turns": {str(k): v for k, v in sorted(turns.items())},
            "messages_mean": round(statistics.fmean(messages), 2) if messages else 0,
            "messages_max": max(messages, default=0),
            "with_tools": sum(1 for r in records if r.get("tools")),
            "with_tool_calls": sum(1 for r in records if any(m.get("tool_calls") for m in r["messages"]))}


def snippet(record: dict[str, Any] | None) -> str:
    """The opening of the first user message, for people reading the report (never for logs or errors)."""
    if not record:
        return ""
    for msg in record.get("messages", []):
        if isinstance(msg, dict) and msg.get("role") == "user" and isinstance(msg.get("content"), str):
            text = " ".join(msg["content"].split())
            return text if len(text) <= SNIPPET_CHARS else text[:SNIPPET_CHARS - 1] + "…"
    return ""


def plot_lengths(train: Sequence[int], eval_: Sequence[int], max_length: int | None, path: Path) -> None:
    """Histogram of tokens per example (train and eval), with the max_length limit drawn in."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    both = [*train, *eval_]
    lo, top = (min(both), max(both)) if both else (0, 1)
    span = (lo, max(top, lo + 1))
    bins = min(50, max(5, top - lo + 1))
    if train:
        ax.hist(train, bins=bins, range=span, alpha=0.8, label=f"train ({len(train):,})", color="#3b6ea5")
    if eval_:  # an outline: the eval split is ~5% of the size and would hide under the train bars
        ax.hist(eval_, bins=bins, range=span, histtype="step", linewidth=2, label=f"eval ({len(eval_):,})",
                color="#e08a2c")
    if max_length and max_length <= 1.25 * top:
        ax.axvline(max_length, color="#b22222", linestyle="--", label=f"max_length {max_length:,}")
    elif max_length:  # far to the right of every example: say so instead of squashing the bars into a sliver
        ax.plot([], [], " ", label=f"max_length {max_length:,} (off the chart)")
    ax.set_xlabel("tokens per example (chat template included)")
    ax.set_ylabel("examples")
    ax.set_title("Token lengths of the prepared examples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_reports(report: dict[str, Any], snippets: dict[str, str], out_dir: Path) -> dict[str, str]:
    """report.json, report.md and report.html in ``out_dir``; returns their paths by name."""
    paths = {"report_json": out_dir / "report.json", "report_md": out_dir / "report.md",
             "report_html": out_dir / "report.html"}
    paths["report_json"].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    paths["report_md"].write_text(render_markdown(report, snippets), encoding="utf-8")
    paths["report_html"].write_text(render_html(report, snippets), encoding="utf-8")
    return {k: str(v) for k, v in paths.items()}


def _rule_rows(report: dict[str, Any]) -> list[tuple[str, int, str]]:
    rows = []
    for name, rule in report["rules"].items():
        note = rule.get("note", "")
        if not rule.get("enabled", True):
            note = note or "off"
        rows.append((name, rule.get("count", 0), note))
    return rows


def render_markdown(report: dict[str, Any], snippets: dict[str, str]) -> str:
    c = report["counts"]
    out = ["# Data preparation report", "",
           f"{c['read']:,} examples read from {len(report['inputs'])} file(s); {c['eval']:,} eval and "
           f"{c['train']:,} train examples written; {c['rejected']:,} rejected (each in rejects.jsonl with its "
           "reason).", "",
           "## Inputs", "", "| file | split | examples | sha256 |", "|---|---|---:|---|"]
    for item in report["inputs"]:
        out.append(f"| {item['path']} | {item['split']} | {item['examples']:,} | `{item['sha256'][:16]}…` |")
    out += ["", f"Hold-out: {report['holdout']['description']}", "", "## Rules", "",
            "| rule | examples | note |", "|---|---:|---|"]
    out += [f"| {name} | {count:,} | {note} |" for name, count, note in _rule_rows(report)]
    for name, rule in report["rules"].items():
        for key, title in (("examples", name), ("truncated_examples", f"{name}: truncated, kept")):
            if rule.get(key):
                out += ["", f"### {title}", ""]
                for ex in rule[key]:
                    snip = snippets.get(ex["id"], "")
                    out.append(f"- `{ex['id']}`: {ex['reason']}" + (f' — "{_md_escape(snip)}"' if snip else ""))
    out += ["", "## Token lengths", "", "![token lengths](lengths.png)", "",
            "| split | count | min | mean | p50 | p90 | p99 | max |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for split, st in report["lengths"]["splits"].items():
        if st.get("count"):
            out.append(f"| {split} | {st['count']:,} | {st['min']} | {st['mean']} | {st['p50']} | {st['p90']} | "
                       f"{st['p99']} | {st['max']} |")
    out += ["", f"max_length: {report['lengths']['max_length']} (tokenizer of `{report['model']}`)", "",
            "## Roles and turns", "", "| split | " + " | ".join(("system", "user", "assistant", "tool")) + " |",
            "|---|---:|---:|---:|---:|"]
    for split, roles in report["roles"].items():
        out.append(f"| {split} | " + " | ".join(f"{roles.get(r, 0):,}" for r in ("system", "user", "assistant",
                                                                                     "tool")) + " |")
    for split, turns in report["turns"].items():
        dist = ", ".join(f"{k} turn(s): {v:,}" for k, v in turns["assistant_turns"].items())
        out.append(f"\n{split}: {dist}; {turns['messages_mean']} messages per example on average "
                   f"(max {turns['messages_max']}); {turns['with_tool_calls']:,} with tool calls.")
    sp = report["special_tokens"]
    out += ["", "## Special-token text in content", "",
            f"{sp['examples']:,} example(s) contain the text of a special token ({', '.join(sp['tokens']) or 'none'}"
            "). Allowed: it is tokenised as plain characters, never as the control token.", ""]
    return "\n".join(out)


def render_html(report: dict[str, Any], snippets: dict[str, str]) -> str:
    e = html.escape
    c = report["counts"]
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>tunesmith data report</title><style>",
             "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;color:#222}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}"
             "td.n{text-align:right}code{background:#f4f4f4}</style></head><body>",
             "<h1>Data preparation report</h1>",
             f"<p>{c['read']:,} examples read; <b>{c['train']:,} train</b>, <b>{c['eval']:,} eval</b>, "
             f"{c['rejected']:,} rejected (each in <code>rejects.jsonl</code> with its reason).</p>",
             f"<p>Hold-out: {e(report['holdout']['description'])}</p>",
             "<h2>Rules</h2><table><tr><th>rule</th><th>examples</th><th>note</th></tr>"]
    parts += [f"<tr><td>{e(n)}</td><td class='n'>{k:,}</td><td>{e(note)}</td></tr>" for n, k, note in
              _rule_rows(report)]
    parts.append("</table>")
    for name, rule in report["rules"].items():
        for key, title in (("examples", name), ("truncated_examples", f"{name}: truncated, kept")):
            if rule.get(key):
                parts.append(f"<h3>{e(title)}</h3><ul>")
                for ex in rule[key]:
                    snip = snippets.get(ex["id"], "")
                    parts.append(f"<li><code>{e(ex['id'])}</code>: {e(ex['reason'])}"
                                 + (f" — <q>{e(snip)}</q>" if snip else "") + "</li>")
                parts.append("</ul>")
    parts += ["<h2>Token lengths</h2><img src='lengths.png' alt='token length histogram' width='640'>",
              "<table><tr><th>split</th><th>count</th><th>min</th><th>mean</th><th>p50</th><th>p90</th><th>p99</th>"
              "<th>max</th></tr>"]
    for split, st in report["lengths"]["splits"].items():
        if st.get("count"):
            parts.append(f"<tr><td>{split}</td>" + "".join(
                f"<td class='n'>{st[k]:,}</td>" for k in ("count", "min", "mean", "p50", "p90", "p99", "max"))
                + "</tr>")
    parts.append(f"</table><p>max_length {report['lengths']['max_length']} "
                 f"(tokenizer of <code>{e(report['model'])}</code>)</p>")
    parts.append("<h2>Roles</h2><table><tr><th>split</th><th>system</th><th>user</th><th>assistant</th>"
                 "<th>tool</th></tr>")
    for split, roles in report["roles"].items():
        parts.append(f"<tr><td>{split}</td>" + "".join(
            f"<td class='n'>{roles.get(r, 0):,}</td>" for r in ("system", "user", "assistant", "tool")) + "</tr>")
    parts.append("</table>")
    sp = report["special_tokens"]
    parts.append(f"<p>{sp['examples']:,} example(s) contain special-token text "
                 f"({e(', '.join(sp['tokens']) or 'none')}); tokenised as plain characters.</p></body></html>")
    return "\n".join(parts)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")
