"""How ``tunesmith advise`` shows an Advice and asks for missing answers (CLI side only: the library never prints)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserError
from ..hardware.catalog import CPU, did_you_mean
from .decide import DRIVERS


def parse_drivers(values: list[str]) -> list[str]:
    """``--driver`` values (repeatable, or comma-separated), checked against the guide's drivers."""
    out: list[str] = []
    for value in values:
        for item in value.split(","):
            name = item.strip().lower()
            if not name:
                continue
            if name not in DRIVERS:
                raise UserError(f"--driver {item.strip()!r}: unknown" + did_you_mean(name, list(DRIVERS)),
                                hint=f"one of: {', '.join(DRIVERS)}")
            if name not in out:
                out.append(name)
    return out


def parse_api_price(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        price_in, price_out = (float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--api-price {text!r}: expected two numbers, IN,OUT", hint="e.g. --api-price 2.5,10") from None
    return price_in, price_out


def ask_missing(console: Any, data: Path | None, drivers: list[str], calls_per_day: int | None
                ) -> tuple[Path | None, list[str], int | None]:
    """Interactive questions for what the flags left out (only called when stdin is a terminal)."""
    from rich.prompt import Confirm, IntPrompt, Prompt

    if data is None:
        answer = Prompt.ask("Training data (chat JSONL; empty if you have none yet)", default="", console=console)
        data = Path(answer) if answer.strip() else None
    if not drivers:
        questions = {
            "format": "Is the output format or style hard to get by prompting (a JSON schema, a brand voice)?",
            "latency": "Is latency constrained (no room for long few-shot prompts)?",
            "cost": "Is cost at scale the concern (millions of calls per day)?",
            "privacy": "Must the training data stay on your infrastructure?",
            "quality": "Do you need maximum quality and have the GPU budget?",
            "simplicity": "Is operational simplicity paramount (no GPUs to run)?",
        }
        drivers = [name for name, question in questions.items() if Confirm.ask(question, default=False,
                                                                                 console=console)]
    if calls_per_day is None:
        calls_per_day = IntPrompt.ask("Calls per day (0 if unknown)", default=0, console=console) or None
    return data, drivers, calls_per_day


def render_advice(console: Any, advice: Any) -> None:
    from rich.panel import Panel
    from rich.table import Table

    decision = advice.decision
    colour = {"not_yet": "yellow", "fine_tune": "green", "openai_fine_tuning": "cyan"}[decision.verdict]
    body = "\n".join(f"• {r}" for r in decision.reasons)
    if decision.instead:
        body += "\n\n[bold]Instead:[/bold]\n" + "\n".join(f"• {i}" for i in decision.instead)
    body += f"\n\n[bold]Serve:[/bold] {decision.serve}"
    console.print(Panel(body, title=f"[bold {colour}]{advice.summary()}[/bold {colour}]", expand=False))

    if advice.dataset is not None:
        d = advice.dataset
        console.print(f"data: {d.examples:,} examples, {d.total_tokens:,} tokens ({d.tokenizer or 'estimated'}); "
                      f"length p50 {d.p50_tokens} / p90 {d.p90_tokens} / p99 {d.p99_tokens} / max {d.max_tokens}")
    if advice.memory:
        where = f"on this machine's {advice.gpu}" if advice.gpu.startswith(CPU) else \
            f"per GPU on {advice.num_gpus}× {advice.gpu}"
        table = Table(title=f"memory {where} (GiB, estimate)")
        for column in ("method", "micro-batch", "weights", "grads+optim", "activations", "peak", "+overhead",
                       "max micro-batch"):
            table.add_column(column, justify="right")
        for method, est in advice.memory.items():
            mark = " ←" if method == advice.method else ""
            table.add_row(method + mark, f"{est.micro_batch_size}×{est.seq_len}", f"{est.weights_gib:.1f}",
                          f"{est.gradients_gib + est.optimizer_gib + est.trainable_gib:.1f}",
                          f"{est.activations_gib + est.head_and_transients_gib:.1f}", f"{est.peak_allocated_gib:.1f}",
                          f"{est.total_gib:.1f}", str(advice.max_micro_batch[method]) or "—")
        console.print(table)
    if advice.training is not None:
        t = advice.training
        duration = f"{t.hours:.1f} h" if t.hours >= 1 else f"{t.hours * 60:.0f} min"
        bill = f", {t.gpu_hours:.1f} GPU-h, ${t.cost_usd:,.2f}" if t.gpu_hours else " (your own machine: no bill)"
        console.print(f"training: {t.tokens:,} tokens × {t.epochs:g} epochs at ~{t.tokens_per_s:,.0f} tok/s "
                      f"(MFU {t.mfu:.1%}, padding efficiency {t.padding_efficiency:.0%}) → {duration}{bill}")
    if advice.serving is not None:
        s = advice.serving
        console.print(f"serving {s.calls_per_day:,} calls/day: {s.api_model} ${s.api_cost_per_day:,.0f}/day vs "
                      f"{s.self_hosted_model} on {s.gpus_needed}× {s.gpu} ${s.self_hosted_cost_per_day:,.0f}/day "
                      f"→ {s.ratio:g}× " + ("cheaper self-hosted" if s.ratio >= 1 else "(the API is cheaper)"))
        console.print("  assumptions: " + "; ".join(s.assumptions), style="dim")
    for note in advice.notes:
        console.print(f"[dim]note: {note}[/dim]")
    if advice.config_path:
        console.print(f"wrote {advice.config_path} — check it with `tunesmith validate {advice.config_path}`")
