"""The ``tunesmith`` command line: one thin command per stage.

Every command: parse → load config → call the library function → render the result (rich, or ``--json``).
Heavy libraries are imported inside command bodies so ``tunesmith --help`` is instant. User errors become one
message and exit code 2, runtime failures exit code 1; ``--debug`` shows the traceback for bug reports.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from .errors import TunesmithError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune LLMs correctly: advise → data → train → eval → merge/export → serve.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare and inspect training data.")
app.add_typer(data_app, name="data")

console = Console(stderr=True, soft_wrap=True)
_DEBUG = {"on": False}

ConfigArg = Annotated[Path, typer.Argument(help="tunesmith YAML config.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config value: section.key=value.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Output folder.")]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (for bug reports).")] = False) -> None:
    _DEBUG["on"] = debug or os.environ.get("TUNESMITH_DEBUG") == "1"


def emit(result: Any, as_json: bool, render: Any = None) -> None:
    """Print a command's result: one JSON object on stdout, or a rich rendering on stderr."""
    if as_json:
        payload = result if isinstance(result, dict) else result.to_dict()
        sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    elif render is not None:
        render(result)


@app.command()
def init(path: Annotated[Path, typer.Argument(help="Where to write the starter config.")] = Path("tunesmith.yaml"),
         force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False) -> None:
    """Write a commented starter config with every key and its default."""
    from .config.starter import write_starter

    write_starter(path, force=force)
    console.print(f"wrote {path} — edit it, then `tunesmith validate {path}`")


@app.command()
def validate(config: ConfigArg, set_: SetOpt = None, as_json: JsonOpt = False) -> None:
    """Validate a config and print it fully resolved (presets and defaults applied)."""
    from .config import dump_config, load_config

    cfg = load_config(config, set_ or [])
    if as_json:
        emit(cfg.model_dump(mode="json"), True)
    else:
        sys.stdout.write(dump_config(cfg))


@app.command()
def train(config: ConfigArg, set_: SetOpt = None, out: OutOpt = None,
          resume: Annotated[bool, typer.Option("--resume", help="Continue from the last complete checkpoint.")] = False,
          as_json: JsonOpt = False) -> None:
    """Train (full / LoRA / QLoRA, as the config says) and write a run folder."""
    from .config import load_config
    from .train import train as run_train

    cfg = load_config(config, set_ or [])
    with _TrainProgress(enabled=not as_json) as progress:
        result = run_train(cfg, out_dir=out, resume=resume, on_event=progress.on_event)
    emit(result, as_json, lambda r: console.print(f"[green]done[/green]: {r.summary()}"))


class _TrainProgress:
    """A rich progress bar fed by the training loop's events (the library itself never prints)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> _TrainProgress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"), console=console, transient=False)
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def on_event(self, event: dict[str, Any]) -> None:
        if self.bar is None:
            return
        kind = event["event"]
        if kind == "start":
            self.task = self.bar.add_task("train", total=event["total_steps"], completed=event["start_step"], info="")
        elif kind == "step" and self.task is not None:
            info = f"loss {event['loss']:.4f}  lr {event['learning_rate']:.2e}"
            if "tokens_per_s" in event:
                info += f"  {event['tokens_per_s']:,.0f} tok/s"
            self.bar.update(self.task, completed=event["step"], info=info)
        elif kind == "eval":
            self.bar.console.print(f"step {event['step']}: eval loss {event['eval_loss']:.4f}, "
                                   f"token accuracy {event['eval_token_accuracy']:.3f}")
        elif kind in ("checkpoint", "resumed"):
            self.bar.console.print(f"{kind} at step {event['step']}: {event['path']}")
        elif kind == "warning":
            self.bar.console.print(f"[yellow]warning:[/yellow] {event['message']}")


@data_app.command("prepare")
def data_prepare(
    paths: Annotated[list[Path] | None, typer.Argument(
        help="[CONFIG.yaml] [FILES.jsonl...]: a config (its data.train_files), JSONL files, or both.")] = None,
    set_: SetOpt = None, out: OutOpt = None,
    eval_file: Annotated[Path | None, typer.Option("--eval-file", help="A separate eval set (no hold-out).")] = None,
    skip_bad_lines: Annotated[bool, typer.Option("--skip-bad-lines",
                                                 help="Write bad lines to rejects.jsonl instead of stopping.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Validate, hold out, clean and report: raw JSONL → prepared/ (train.jsonl, eval.jsonl, rejects, report)."""
    from transformers.utils import logging as hf_logging

    from .config import load_config
    from .data import prepare

    hf_logging.disable_progress_bar()  # model-loading bars would bury the summary below
    paths = paths or []
    config = paths[0] if paths and paths[0].suffix in (".yaml", ".yml") else None
    files = paths[1:] if config else paths
    overrides = [*(set_ or []), *(["data.on_bad_lines=skip"] if skip_bad_lines else [])]
    result = prepare(load_config(config, overrides), files=files, out_dir=out, eval_file=eval_file)
    emit(result, as_json, _render_prepared)


def _render_prepared(r: Any) -> None:
    from rich.table import Table

    table = Table("rule", "removed", box=None, padding=(0, 2))
    for rule, count in r.removed_by_rule.items():
        table.add_row(rule, f"{count:,}")
    console.print(table)
    console.print(f"[green]prepared[/green]: {r.train_examples:,} train, {r.eval_examples:,} eval, "
                  f"{r.rejected:,} rejected → {_escape(r.out_dir)}\n  report: {_escape(r.files['report_md'])}")


@data_app.command("inspect")
def data_inspect(config: ConfigArg, set_: SetOpt = None,
                 index: Annotated[int, typer.Option(help="Which example (0-based) of the training data.")] = 0,
                 as_json: JsonOpt = False) -> None:
    """Show one training example as the model sees it, supervised (trained-on) tokens highlighted."""
    from .config import load_config
    from .train.dataset import inspect_example

    cfg = load_config(config, set_ or [])
    view = inspect_example(cfg, index)
    if as_json:
        emit(view, True)
        return
    from rich.text import Text

    text = Text()
    for piece, supervised in view["segments"]:
        text.append(piece, style="bold green" if supervised else "dim")
    console.print(f"example {index}: {view['num_tokens']} tokens, {view['num_supervised']} supervised "
                  "([bold green]green[/bold green] = trained on)")
    Console().print(text)


def main() -> None:
    """Entry point: run the app, turning tunesmith errors into one message and an exit code."""
    try:
        app()
    except TunesmithError as exc:
        if _DEBUG["on"]:
            raise
        console.print(f"[bold red]error:[/bold red] {_escape(exc.message)}")
        if exc.hint:
            console.print(f"  [yellow]fix:[/yellow] {_escape(exc.hint)}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
