"""The ``tunesmith`` command line: one thin command per stage.

Every command: parse → load config → call the library function → render the result (rich, or ``--json``).
Heavy libraries are imported inside command bodies so ``tunesmith --help`` is instant. User errors become one
message and exit code 2, runtime failures exit code 1; ``--debug`` shows the traceback for bug reports.

With ``--json`` a command prints one JSON object on stdout whatever happens: its result, or, when it fails with a
tunesmith error, ``{"error": {"message", "hint", "kind", "exit_code"}}`` (same exit code as without ``--json``), so
a script reads stdout alone. Usage mistakes (an unknown option) stay click's text on stderr, exit code 2.
``main(argv)`` returns the exit code instead of exiting, for in-process tests; the console script exits with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from .errors import Interrupted, RunError, Stopped, TunesmithError, UserError

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune LLMs correctly: advise → data → train → eval → merge/export → serve.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare and inspect training data.")
app.add_typer(data_app, name="data")

console = Console(stderr=True, soft_wrap=True)
_DEBUG = {"on": False}
_INVOCATION: dict[str, Any] = {"argv": [], "json": False}
"""This call of ``main``: its arguments (re-run under torchrun) and whether the command asked for ``--json``."""


def _json_mode(value: bool) -> bool:
    _INVOCATION["json"] = value  # set while parsing, so an error raised by the command body is rendered as JSON
    return value


ConfigArg = Annotated[Path, typer.Argument(help="tunesmith YAML config.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config value: section.key=value.")]
JsonOpt = Annotated[bool, typer.Option("--json", callback=_json_mode, help=(
    "Print the result as one JSON object on stdout; an error too, as {\"error\": {\"message\", \"hint\", …}}."))]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Output folder.")]
PromptsOpt = Annotated[Path | None, typer.Option(
    "--prompts", help="Chat JSONL (e.g. prepared/eval.jsonl) whose conversations the checks run on.")]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (for bug reports).")] = False) -> None:
    _DEBUG["on"] = debug or os.environ.get("TUNESMITH_DEBUG") == "1"
    import logging

    # bitsandbytes' CPU backend suggests installing `kernels`, which downloads code from a hub at run time: the
    # fallback it uses instead is correct, so its warning is only noise here
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # torchao (imported by PEFT and transformers whenever installed) reports at import that its optional compiled
    # kernels do not load for this torch, and torch warns about the enums it registers; the optimizer tunesmith uses
    # from it is plain PyTorch, so neither says anything about this run
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    # CUDA memory in growable segments (read when CUDA's allocator starts, after this): packed rows of changing
    # lengths and tensors offloaded to CPU memory otherwise fragment fixed blocks; every GPU measurement behind the
    # plan's memory model ran with it (bench/). A setting of the user's own is left as it is.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


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
          resume: Annotated[bool, typer.Option(
              "--resume", help="Continue the run in --out from its newest complete checkpoint.")] = False,
          from_checkpoint: Annotated[Path | None, typer.Option(
              "--from-checkpoint", metavar="CHECKPOINT", help="Continue from this checkpoint of the run in --out "
              "(e.g. runs/x/checkpoints/step-40) instead of the newest; implies --resume.")] = None,
          gpus: Annotated[int, typer.Option("--gpus", min=1,
                                            help="Processes/GPUs: >1 shards with FSDP2 via torchrun.")] = 1,
          events: Annotated[Path | None, typer.Option("--events", hidden=True)] = None,
          as_json: JsonOpt = False) -> None:
    """Train (full / LoRA / QLoRA, as the config says) and write a run folder."""
    from .config import load_config
    from .paths import output_folder

    cfg = load_config(config, set_ or [])
    option = "--out" if out else "out_dir"
    run_dir = output_folder(out or Path(cfg.out_dir) / "train", option)
    if not (resume or from_checkpoint) and (run_dir / "run.json").is_file():  # a finished run is not overwritten
        raise UserError(f"{option} {run_dir}: holds a finished train run (run.json); training again would replace it",
                        hint=f"choose another {option}, or remove {run_dir} first")
    if from_checkpoint is not None:  # a wrong checkpoint is refused before the model loads and the run folder is made
        from .train.checkpoint import chosen

        chosen(run_dir / "checkpoints", from_checkpoint)
    if gpus > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(_relaunch_under_torchrun(gpus, run_dir / "torchrun.log"))
    from .train import train as run_train
    from .train.launch import append_event

    with _TrainSignals(run_dir) as signals, \
            _Progress(enabled=not as_json, activity="train: loading and planning") as progress:
        # --events: a parent that launched this run under torchrun (a server job) follows rank 0's events there
        result = run_train(cfg, out_dir=out, resume=from_checkpoint or resume,
                           on_event=lambda e: (signals.on_event(e), progress.on_event(e),
                                               events is not None and append_event(events, e)))
    emit(result, as_json, lambda r: console.print(f"[green]done[/green]: {r.summary()}"))


@app.command()
def merge(run_dir: Annotated[Path | None, typer.Argument(help="Run folder from `tunesmith train` (adapter/ inside).")]
          = None,
          out: Annotated[Path | None, typer.Option("--out", help="Merged model folder (default RUN_DIR/merged).")]
          = None,
          base: Annotated[str | None, typer.Option("--base", help="Base model (default: from run.json / the adapter).")]
          = None,
          adapter: Annotated[Path | None, typer.Option("--adapter", help="PEFT adapter folder (instead of RUN_DIR).")]
          = None,
          dtype: Annotated[str | None, typer.Option(
              "--dtype", help="bfloat16 | float16 | float32 (default: the base model's own dtype).")] = None,
          tolerance: Annotated[float | None, typer.Option(
              "--tolerance", min=0.0,
              help="Allowed max |Δlogit| as a fraction of the largest logit (default per dtype).")]
          = None,
          prompts: PromptsOpt = None,
          as_json: JsonOpt = False) -> None:
    """Merge a LoRA/QLoRA adapter into its full-precision base; check logits parity against base + adapter."""
    from .errors import UserError
    from .export import merge as run_merge

    if out is None and run_dir is None:
        raise UserError("--out is required with --adapter", hint="e.g. --out merged/")
    with _Progress(enabled=not as_json, activity="merge"):
        result = run_merge(run_dir, out or run_dir / "merged", base=base, adapter=adapter, dtype=dtype,
                           tolerance=tolerance, conversations=_check_conversations(prompts))
    def render(r: Any) -> None:
        console.print(f"[green]merged[/green]: {_escape(r.summary())}")
        for warning in r.warnings:
            console.print(f"[yellow]warning[/yellow]: {_escape(warning)}")

    emit(result, as_json, render)


@app.command()
def export(model_dir: Annotated[Path, typer.Argument(help="Merged (or fully fine-tuned) model folder.")],
           format_: Annotated[str, typer.Option("--format", help="gguf | awq.")] = "gguf",
           quant: Annotated[str, typer.Option("--quant", help="GGUF type: f16, bf16, f32, q8_0, q4_k_m, q5_k_m, …")]
           = "q4_k_m",
           out: Annotated[Path | None, typer.Option("--out", help="Output folder (default MODEL_DIR-<format>).")]
           = None,
           verify: Annotated[bool, typer.Option(help="Compare the artefact's output with the HF model's.")] = True,
           prompts: PromptsOpt = None,
           as_json: JsonOpt = False) -> None:
    """Export to GGUF (llama.cpp / Ollama, with a Modelfile) or AWQ 4-bit (vLLM); checked against the HF model."""
    from .errors import UserError

    if format_ not in ("gguf", "awq"):
        raise UserError(f"--format {format_}: expected gguf or awq", hint="e.g. --format gguf --quant q8_0")
    from .export.gguf import refuse_run_folder
    from .paths import output_folder

    refuse_run_folder(model_dir)
    named = model_dir if model_dir.name not in ("", "..") else model_dir.resolve()  # `export .` has no name
    target = output_folder(out or named.with_name(f"{named.name}-{format_}"))
    with _Progress(enabled=not as_json, activity=f"export {format_}"):
        if format_ == "gguf":
            from .export.gguf import to_gguf

            result = to_gguf(model_dir, target, quant, verify=verify, conversations=_check_conversations(prompts))
        else:
            from .export.awq import to_awq

            result = to_awq(model_dir, target, verify=verify, calibration=_check_conversations(prompts, limit=512))

    def render(r: Any) -> None:
        console.print(f"[green]exported[/green]: {_escape(r.summary())}")
        for warning in getattr(r, "warnings", ()):
            console.print(f"[yellow]warning[/yellow]: {_escape(warning)}")

    emit(result, as_json, render)


@app.command("setup-gguf")
def setup_gguf(sdist: Annotated[Path | None, typer.Option(
        "--sdist", help="A downloaded llama_cpp_python-<version>.tar.gz (default: download it with pip).")] = None,
               as_json: JsonOpt = False) -> None:
    """Fetch llama.cpp's HF→GGUF converter matching the installed llama-cpp-python (once per version)."""
    from .export.converter import setup_converter

    path = setup_converter(sdist)
    emit({"converter": str(path)}, as_json, lambda r: console.print(f"[green]ready[/green]: {r['converter']}"))


@app.command()
def serve(artefact: Annotated[Path, typer.Argument(help="GGUF file/folder, merged model folder, run or adapter.")],
          host: Annotated[str, typer.Option("--host", help="Address to bind; 0.0.0.0 exposes the model.")]
          = "127.0.0.1",
          port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
          name: Annotated[str | None, typer.Option("--name", help="The model name clients send (default: the "
                                                                   "artefact's file or folder name).")] = None,
          base: Annotated[str | None, typer.Option("--base", help="Base model for an adapter (default: the one "
                                                                   "its adapter_config.json names).")] = None,
          n_ctx: Annotated[int, typer.Option("--n-ctx", min=16, help="Context length for a GGUF (tokens).")] = 4096,
          threads: Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads for a GGUF.")] = None,
          dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would serve it, start nothing.")]
          = False,
          as_json: JsonOpt = False) -> None:
    """Serve one model on an OpenAI-compatible chat-completions endpoint (llama.cpp for GGUF, else transformers)."""
    from . import serve as serving

    serve_plan = serving.plan(artefact, host=host, port=port, name=name, base=base, n_ctx=n_ctx, n_threads=threads)
    if dry_run:
        emit(serve_plan.to_dict(), as_json, lambda r: console.print(
            f"{r['model']}: {r['engine']} on {r['path']}{' + ' + r['adapter'] if r['adapter'] else ''} at "
            f"{r['base_url']}"))
        return
    console.print(f"loading [bold]{_escape(serve_plan.spec.name)}[/bold] ({serve_plan.spec.engine})")
    serving.run(serve_plan, on_ready=lambda: console.print(
        f"serving [bold]{_escape(serve_plan.spec.name)}[/bold] on {serve_plan.base_url} (Ctrl-C stops it)"))


class _TrainSignals:
    """SIGTERM/SIGINT to `tunesmith train` outside its loop — loading the model before it, saving the result after
    it — as one message and exit 130, instead of a silent kill (SIGTERM) or a bare exit (Ctrl-C). Inside the loop
    its own handler (train/loop.py) checkpoints at the step boundary first."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.looped = False
        """The loop has started: after it, the run's checkpoints are what a resume continues from."""
        self._handling = contextlib.ExitStack()

    def __enter__(self) -> _TrainSignals:
        import signal

        from .signals import handling

        self._handling.enter_context(handling(self._handle, signal.SIGTERM, signal.SIGINT))
        return self

    def __exit__(self, *exc: object) -> None:
        self._handling.close()

    def on_event(self, event: dict[str, Any]) -> None:
        self.looped = self.looped or event["event"] == "start"

    def _handle(self, signum: int, _frame: Any) -> None:
        import signal

        from .train.checkpoint import newest_sealed

        name = signal.Signals(signum).name
        if not self.looped:
            raise Interrupted(f"interrupted by {name} during start-up; nothing was written",
                              hint="run the same command again")
        last = newest_sealed(self.run_dir / "checkpoints")
        raise Interrupted(f"interrupted by {name} while the trained model was being saved; "
                          + (f"the last checkpoint is {last}" if last else "no checkpoint was written"),
                          hint="continue with the same command plus --resume" if last else
                          "run the same command again to start over")


def _relaunch_under_torchrun(n: int, log: Path) -> int:
    """Re-run this same command as ``n`` torchrun processes (one per GPU); the config is identical. Their output
    is shown and kept in ``log`` (in the run folder)."""
    from . import processes
    from .train.launch import torchrun

    argv: list[str] = []
    skip = False
    for arg in _INVOCATION["argv"]:
        if skip or arg.startswith("--gpus="):
            skip = False
            continue
        if arg == "--gpus":
            skip = True
            continue
        argv.append(arg)
    cmd = torchrun(n, *argv)
    # its own process group, stopped on SIGTERM/Ctrl-C here (torchrun passes SIGTERM on: the workers checkpoint)
    with processes.running(cmd, what="torchrun", log_path=log, stop_timeout_s=120.0,
                           echo=(sys.stdout.buffer, sys.stderr.buffer)) as child:
        code = processes.wait(child)
    if code != 0:
        raise processes.failure(child, code)
    return 0


class _Progress:
    """Library events (train steps, eval generations, pipeline stages) as progress: rich bars on a terminal, a plain
    line at least every 20 s elsewhere (``console_progress``). The library itself never prints."""

    def __init__(self, enabled: bool, activity: str | None = None) -> None:
        self.enabled = enabled
        self.activity = activity
        """A task with no counts shown for the whole command (data prepare, merge, export: elapsed time only)."""
        self.bar: Any = None
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _Progress:
        if self.enabled:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with ours
            self._open()
            if self.activity:
                self.tasks["stage"] = self.bar.add_task(self.activity, total=None, info="")
        return self

    def __exit__(self, *exc: object) -> None:
        self._close(*exc)

    def _open(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from .console_progress import progress_display

        self.bar = progress_display(console, (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                              TimeElapsedColumn(), TimeRemainingColumn(),
                                              TextColumn("{task.fields[info]}")))
        self.bar.__enter__()

    def _close(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*(exc or (None, None, None)))
            self.bar = None
            self.tasks = {}

    def _print(self, text: str) -> None:
        (self.bar.console if self.bar is not None else console).print(text)

    def on_event(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        kind = event["event"]
        if kind == "stage_start":
            self._close()
            self._open()
            self.tasks["stage"] = self.bar.add_task(
                f"{event['stage']}" + (" (resuming)" if event.get("resume") else ""), total=None, info="")
        elif kind == "stage_done":
            self._close()
            console.print(f"  {event['name']}: {event['status']} ({event['seconds']:.1f} s) {event['summary']}")
        elif kind == "warning":
            self._print(f"[yellow]warning:[/yellow] {_escape(event['message'])}")
        elif self.bar is None:
            return
        elif kind == "start":
            self._finish("stage")
            self.tasks["train"] = self.bar.add_task("train", total=event["total_steps"], completed=event["start_step"],
                                                    info="")
        elif kind == "step" and "train" in self.tasks:
            info = f"loss {event['loss']:.4f}  lr {event['learning_rate']:.2e}"
            if "tokens_per_s" in event:
                info += f"  {event['tokens_per_s']:,.0f} tok/s"
            self.bar.update(self.tasks["train"], completed=event["step"], info=info)
        elif kind == "eval":
            # DPO's evaluation scores pairs: its win-rate instead of a token accuracy
            score = f"win-rate {event['eval_win_rate']:.0%}" if "eval_win_rate" in event else \
                f"token accuracy {event['eval_token_accuracy']:.3f}"
            self._print(f"step {event['step']}: eval loss {event['eval_loss']:.4f}, {score}")
        elif kind in ("checkpoint", "resumed"):
            self._print(f"{kind} at step {event['step']}: {event['path']}")
        elif kind in ("plan", "eta", "pinned"):
            self._print(f"plan: {event['message']}")
        elif kind == "model":
            self._finish("stage")
            self.tasks[f"eval {event['model']}"] = self.bar.add_task(f"eval {event['model']}",
                                                                     total=event["examples"], info="")
        elif kind == "generate" and f"eval {event['model']}" in self.tasks:
            self.bar.update(self.tasks[f"eval {event['model']}"], completed=event["done"])

    def _finish(self, name: str) -> None:
        """A task with no counts stops once a task with counts takes over (the counted one shows progress)."""
        if name in self.tasks:
            self.bar.remove_task(self.tasks.pop(name))


server_app = typer.Typer(help="The self-hosted, OpenAI-compatible fine-tuning service (docs/server.md).")
app.add_typer(server_app, name="server")
keys_app = typer.Typer(no_args_is_help=True, help="API keys of the service (stored hashed in its database).")
server_app.add_typer(keys_app, name="keys")
DataDirOpt = Annotated[Path, typer.Option("--data-dir", help="The service's folder: database, files, job runs.")]
DatabaseOpt = Annotated[str | None, typer.Option("--database", help="Job store URL (default: sqlite:///DATA_DIR/"
                                                                   "tunesmith.db; or postgresql://USER@HOST/DB).")]
GpusOpt = Annotated[str | None, typer.Option("--gpus", metavar="0,1,…", help="GPUs the workers share out, by index "
                                             "(default: every visible CUDA device; none: train on the CPU).")]
GpusPerJobOpt = Annotated[int, typer.Option("--gpus-per-job", min=1, help="GPUs each job trains on; >1: its train "
                                            "stage runs as that many torchrun processes (FSDP2).")]


def _gpus(option: str | None) -> tuple[str, ...]:
    from .server.settings import parse_gpus, visible_gpus

    return visible_gpus() if option is None else parse_gpus(option)


@server_app.callback(invoke_without_command=True)
def server(ctx: typer.Context,
           host: Annotated[str, typer.Option("--host", help="Address to bind; anything but loopback needs API "
                                                           "keys.")] = "127.0.0.1",
           port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port (0: a free one).")] = 8000,
           data_dir: DataDirOpt = Path("tunesmith-server"), database: DatabaseOpt = None,
           workers: Annotated[int, typer.Option("--workers", min=0, help="Worker processes to start (0: run "
                                                                         "`tunesmith worker` elsewhere).")] = 1,
           model: Annotated[list[str] | None, typer.Option("--model", help="A base model to offer besides "
                                                                           "local:demo and local:smollm2-135m-instruct "
                                                                           "(repeatable).")] = None,
           require_keys: Annotated[bool, typer.Option("--require-keys", help="Require API keys on loopback "
                                                                             "too.")] = False,
           max_upload_mb: Annotated[int, typer.Option("--max-upload-mb", min=1, help="Largest upload, in "
                                                                                     "MiB.")] = 512,
           export_gguf: Annotated[bool, typer.Option("--export-gguf", help="Jobs also export a GGUF (f16) for "
                                                                           "llama.cpp serving.")] = False,
           gpus: GpusOpt = None, gpus_per_job: GpusPerJobOpt = 1) -> None:
    """Run the service: files, fine-tuning jobs, models and chat completions under /v1, the dashboard at /."""
    if ctx.invoked_subcommand is not None:
        return
    from .server.main import serve as run_server
    from .server.settings import DEFAULT_BASE_MODELS, ServerSettings

    settings = ServerSettings(host=host, port=port, data_dir=data_dir, database=database, workers=workers,
                              base_models=tuple(dict.fromkeys([*DEFAULT_BASE_MODELS, *(model or [])])),
                              require_keys=require_keys, max_upload_bytes=max_upload_mb * 2**20,
                              export_gguf=export_gguf, gpus=_gpus(gpus), gpus_per_job=gpus_per_job)
    run_server(settings, on_ready=lambda url: console.print(
        f"tunesmith server on {url}/v1 (dashboard {url}/), {workers} worker(s), data in {data_dir}; "
        "Ctrl-C stops it", highlight=False))
    console.print("tunesmith server stopped")


def _key_store(data_dir: Path, database: str | None) -> Any:
    from .server.main import open_store
    from .server.settings import ServerSettings

    return open_store(ServerSettings(data_dir=data_dir, database=database))


@keys_app.command("create")
def keys_create(name: Annotated[str, typer.Argument(help="Who or what the key is for.")],
                data_dir: DataDirOpt = Path("tunesmith-server"), database: DatabaseOpt = None,
                as_json: JsonOpt = False) -> None:
    """Make an API key; its secret is shown once (only its hash is stored)."""
    key, secret = _key_store(data_dir, database).create_api_key(name=name)
    emit({"id": key.id, "name": key.name, "key": secret}, as_json, lambda r: console.print(
        f"API key {r['id']} ({_escape(r['name'])}):\n{r['key']}\nkeep it now: it is not shown again", highlight=False))


@keys_app.command("list")
def keys_list(data_dir: DataDirOpt = Path("tunesmith-server"), database: DatabaseOpt = None,
              as_json: JsonOpt = False) -> None:
    """The keys, without their secrets."""
    keys = [{"id": k.id, "name": k.name, "created_at": k.created_at, "revoked_at": k.revoked_at}
            for k in _key_store(data_dir, database).list_api_keys()]
    emit({"keys": keys}, as_json, lambda r: console.print("\n".join(
        f"{k['id']}  {_escape(k['name'])}{'  (revoked)' if k['revoked_at'] else ''}" for k in r["keys"])
        or "no API keys", highlight=False))


@keys_app.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(help="The key's id or name.")],
                data_dir: DataDirOpt = Path("tunesmith-server"), database: DatabaseOpt = None) -> None:
    """Revoke a key: requests with it are refused from now on."""
    revoked = _key_store(data_dir, database).revoke_api_key(key=key)
    if revoked is None:
        raise UserError(f"no live API key with id or name {key!r}", hint="tunesmith server keys list shows them")
    console.print(f"revoked {revoked.id} ({_escape(revoked.name)})", highlight=False)


@app.command("run")
def run_pipeline(config: ConfigArg, set_: SetOpt = None, out: OutOpt = None, as_json: JsonOpt = False) -> None:
    """The whole pipeline: data → baseline eval → train → eval → merge → export → report. Re-running skips finished
    stages whose inputs did not change, and continues an interrupted run where it stopped."""
    from transformers.utils import logging as hf_logging

    from .config import load_config
    from .pipeline import run

    hf_logging.disable_progress_bar()  # model-loading bars would bury the stage lines
    cfg = load_config(config, set_ or [])
    with _Progress(enabled=not as_json) as progress:
        result = run(cfg, out_dir=out, on_event=progress.on_event)
    emit(result, as_json, _render_run)


def _render_run(result: Any) -> None:
    from rich.table import Table

    table = Table("stage", "status", "seconds", "summary", title=f"tunesmith run → {result.out_dir}")
    for s in result.stages:
        table.add_row(s.name, s.status, f"{s.seconds:.1f}", s.summary)
    console.print(table)
    console.print(f"total {result.seconds:.1f} s; report: {result.report_html}")


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
    with _Progress(enabled=not as_json, activity="data prepare"):
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


@app.command()
def advise(
    data: Annotated[Path | None, typer.Option("--data", help="Chat JSONL to count (examples, tokens, "
                                              "lengths).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Catalogue name, hub id, model folder or "
                                              "config.json.")] = None,
    gpu: Annotated[str | None, typer.Option("--gpu", help="GPU name from the catalogue (detected if omitted).")] = None,
    gpus: Annotated[int, typer.Option("--gpus", min=1, help="Number of GPUs.")] = 1,
    calls_per_day: Annotated[int | None, typer.Option("--calls-per-day", min=0, help="Expected inference calls "
                                                      "per day (for the serving bill).")] = None,
    driver: Annotated[list[str] | None, typer.Option("--driver", help="Why fine-tune: format, latency, cost, "
                                                     "privacy, quality, simplicity (repeatable).")] = None,
    domain_shift: Annotated[bool, typer.Option("--domain-shift", help="The data is far from the model's "
                                               "pre-training domain.")] = False,
    epochs: Annotated[float, typer.Option("--epochs", min=0.01)] = 3.0,
    max_length: Annotated[int, typer.Option("--max-length", min=8)] = 2048,
    price_per_hour: Annotated[float | None, typer.Option("--price-per-hour", help="Your $/GPU-hour (overrides "
                                                         "the catalogue's assumption).")] = None,
    api_model: Annotated[str, typer.Option("--api-model", help="API model to compare serving costs with.")] = "gpt-4o",
    api_price: Annotated[str | None, typer.Option("--api-price", help="API $ per million tokens: IN,OUT.")] = None,
    write_config: Annotated[Path | None, typer.Option("--write-config", help="Write a starter tunesmith config "
                                                      "for the recommendation.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Should you fine-tune? Which method, model and GPU; memory, time, dollars; how to serve it."""
    from .advise import advise as run_advise
    from .advise.render import ask_missing, parse_api_price, parse_drivers, render_advice

    drivers = parse_drivers(driver or [])
    if sys.stdin.isatty() and not as_json and (data is None or not drivers):
        data, drivers, calls_per_day = ask_missing(console, data, drivers, calls_per_day)
    result = run_advise(data, model, gpu, gpus, calls_per_day=calls_per_day, drivers=drivers,
                        domain_shift=domain_shift, epochs=epochs, max_length=max_length,
                        price_per_hour=price_per_hour, api_model=api_model, api_prices=parse_api_price(api_price),
                        write_config=write_config)
    emit(result, as_json, lambda r: render_advice(Console(), r))


@data_app.command("inspect")
def data_inspect(config: ConfigArg, set_: SetOpt = None,
                 index: Annotated[int, typer.Option(min=0, help="Which example (0-based) of the training data.")] = 0,
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


def _check_conversations(path: Path | None, limit: int = 8) -> Any:
    """The conversations a merge/export check runs on: the first ``limit`` of ``--prompts``, else the defaults."""
    if path is None:
        return None
    from .export.samples import load_conversations
    from .paths import input_file

    hint = "a chat JSONL file, one {\"messages\": [...]} per line (e.g. prepared/eval.jsonl)"
    found = load_conversations(input_file(path, "--prompts", hint=hint), limit)
    if not found:
        raise UserError(f"--prompts {path}: no conversations (the file is empty)", hint=hint)
    return found


@app.command("eval")
def eval_(config: ConfigArg,
          model: Annotated[list[str] | None, typer.Option(
              "--model", help="base, a run folder, an adapter folder, a model folder or a .gguf file; repeat to "
                              "compare (the first is the baseline). Default: eval.models.")] = None,
          set_: SetOpt = None, out: OutOpt = None, as_json: JsonOpt = False) -> None:
    """Score models on the task's eval set; two or more give a side-by-side comparison and report."""
    from .config import load_config
    from .evaluate import evaluate

    cfg = load_config(config, set_ or [])
    with _Progress(enabled=not as_json, activity="eval: loading") as progress:
        report = evaluate(cfg, models=model or None, out_dir=out, on_event=progress.on_event)
    emit(report, as_json, _render_eval)


def _render_eval(report: Any) -> None:
    from rich.table import Table

    table = Table(title=f"{report.dataset}: {report.examples} examples (mean [95% CI] right/total)")
    table.add_column("metric")
    for m in report.models:
        table.add_column(m.label)
    for metric in report.models[0].metrics:
        cells = []
        for m in report.models:
            s = m.metrics[metric]
            ci = f" [{s.ci_low:.2f}, {s.ci_high:.2f}]" if s.ci_low is not None else ""
            cells.append(f"{s.mean:.3f}{ci} {s.correct}/{s.total}")
        table.add_row(metric, *cells)
    if any(m.loss for m in report.models):
        table.add_row("eval loss", *[f"{m.loss['loss']:.4f}" if m.loss else "n/a" for m in report.models])
    console.print(table)
    for m in report.models:
        for metric, s in m.metrics.items():
            if s.errors:
                console.print(f"[yellow]warning:[/yellow] {m.label} / {metric}: the metric failed on {s.errors} of "
                              f"{s.total} examples (counted wrong), e.g. {_escape(s.first_error or '')}")
    for c in report.comparisons:
        console.print(f"{c['after']} vs {c['before']} on {c['metric']}: {c['delta']:+.3f}, "
                      f"{len(c['fixed'])} wrong→right, {len(c['broken'])} right→wrong")
    console.print(f"[green]report[/green]: {report.files['report_html']}")


@app.command()
def worker(data_dir: Annotated[Path, typer.Option("--data-dir", help="The server's data folder (uploaded files, job "
                                                  "run folders): shared with the server.")] = Path("tunesmith-server"),
           database: Annotated[str | None, typer.Option(
               "--database", metavar="URL", help="The server's job store (default: the SQLite file in --data-dir; "
               "postgresql://USER@HOST/DB to share one store between machines).")] = None,
           lease_s: Annotated[int, typer.Option("--lease-s", min=5, help="Seconds a job stays this worker's without "
                                                "a heartbeat; after that another worker re-claims it.")] = 30,
           once: Annotated[bool, typer.Option("--once", help="Run at most one job, then exit.")] = False,
           gpus: GpusOpt = None, gpus_per_job: GpusPerJobOpt = 1,
           settings_json: Annotated[str | None, typer.Option("--settings", hidden=True)] = None,
           parent_pid: Annotated[int | None, typer.Option("--parent-pid", hidden=True)] = None) -> None:
    """Run fine-tuning jobs from a server's job store, one at a time, until stopped (SIGTERM or Ctrl-C checkpoint
    the running job and put it back in the queue)."""
    from .server.settings import ServerSettings, gpu_sets
    from .server.worker import WorkerOptions, new_worker_id, run_worker

    # one worker: its jobs train on the first --gpus-per-job of --gpus (a server gives each of its own its set)
    own = gpu_sets(_gpus(gpus), workers=1, per_job=gpus_per_job)[0]
    # a server's own workers get its settings whole; a worker started by hand, the store and the folder
    settings = ServerSettings.model_validate_json(settings_json) if settings_json else \
        ServerSettings(data_dir=data_dir, database=database)
    run_worker(settings, WorkerOptions(worker_id=new_worker_id(), parent_pid=parent_pid, lease_s=lease_s, once=once,
                                       gpus=own))


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` (default: the process's arguments) and return its exit code: 0, a tunesmith error
    as one message (or one JSON object under ``--json``) and its code, click's own for usage mistakes."""
    import warnings

    from . import compat

    if compat.peft_warns_on_wrap(compat.installed("peft")):
        # PEFT reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: noise for a user
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    args = sys.argv[1:] if argv is None else list(argv)
    _INVOCATION.update(argv=args, json=False)
    _DEBUG["on"] = False
    try:
        with _stop_on_signals():
            app(args=args, prog_name="tunesmith")
    except SystemExit as exc:  # click ends every command this way (0 included), and --help, --show-completion
        if _by_ctrl_c(exc):  # typer turns Ctrl-C into a bare exit 130
            _report_error(Interrupted("interrupted by SIGINT (Ctrl-C)", hint="run the same command again"))
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except TunesmithError as exc:
        if _DEBUG["on"]:
            raise
        _report_error(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    except Exception as exc:  # not turned into a message by a stage: still one message; --debug gives the traceback
        if _DEBUG["on"]:
            raise
        error = _unexpected_error(exc)
        _report_error(error)
        return error.exit_code
    return 0


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP end a command with one message and exit 128 + the signal (Python's default would end it
    silently): the signal becomes ``Stopped`` where the command is, so its ``finally`` blocks run — child processes
    are stopped (processes.py), partial outputs removed (files.py). Training installs its own handler over this one
    (a checkpoint, then exit 130). Ctrl-C stays KeyboardInterrupt."""
    import signal

    from .signals import handling

    def stop(signum: int, _frame: Any) -> None:
        raise Stopped(signal.Signals(signum).name, signum)

    with handling(stop, signal.SIGTERM, signal.SIGHUP):
        yield


def _unexpected_error(exc: Exception) -> TunesmithError:
    """An error no stage turned into a message: a write the storage refused (disk full, read-only), another refusal
    of the system (a path checked earlier may have changed since), or a bug in tunesmith."""
    import errno

    from .files import storage_error

    # permission refused: a read as likely as a write, so the system's own words, not "cannot write"
    refused_access = isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM)
    if isinstance(exc, (OSError, RuntimeError)) and not refused_access:
        error = storage_error(exc, (exc.filename if isinstance(exc, OSError) else None) or Path.cwd())
        if error is not None:
            return error
    if isinstance(exc, OSError):
        return RunError(_os_message(exc), hint="check the path and the disk; --debug shows where it happened")
    return RunError(f"internal error: {type(exc).__name__}: {exc}",
                    hint="this is a bug in tunesmith: run the same command with --debug and report the traceback")


def _by_ctrl_c(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _os_message(exc: OSError) -> str:
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{' → '.join(paths) or 'a file'}: {exc.strerror or exc}"


def _report_error(exc: TunesmithError) -> None:
    if _INVOCATION["json"]:
        kind = "user_error" if isinstance(exc, UserError) else "run_error"
        emit({"error": {"message": exc.message, "hint": exc.hint, "kind": kind, "exit_code": exc.exit_code}}, True)
        return
    console.print(f"[bold red]error:[/bold red] {_escape(exc.message)}")
    if exc.hint:
        console.print(f"  [yellow]fix:[/yellow] {_escape(exc.hint)}")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
