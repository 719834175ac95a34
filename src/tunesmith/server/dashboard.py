"""The web dashboard at ``/``: the jobs list and one page per job (live loss curves, events, checkpoints, base vs
tuned metrics with the examples that flipped, downloads).

The two pages are fixed HTML shells from ``static/`` that hold no job data; the browser fills them from the JSON
endpoints under ``/dashboard/api/``, which sit behind the same API-key dependency as ``/v1`` and show a key only its
own jobs. The loss chart is uPlot, vendored in ``static/vendor/uplot/`` (no CDN: the server may have no network).

Downloads are named by what they are (``adapter``, ``merged``, ``gguf-1``, ``report``), never by a path: the file
served is one the worker recorded in the job's ``artefacts``, and it must lie inside the job's own folder.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from ..records import StageRecord
from ..report import collect
from .db import Job, Store

STATIC_FILES = {"dashboard.css": "text/css", "dashboard.js": "text/javascript",
                "vendor/uplot/uPlot.iife.min.js": "text/javascript", "vendor/uplot/uPlot.min.css": "text/css"}
"""What ``/dashboard/static/`` serves: this list, not whatever a request names."""
# The pages load only this server's own scripts and styles; nothing inline, nothing from elsewhere.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'",
                "X-Content-Type-Options": "nosniff"}
EVENTS_SHOWN = 200
CHECKPOINTS_SHOWN = 100
JOBS_SHOWN = 200
ZIP_BLOCK = 1 << 20

ARTEFACT_LABELS = {"adapter": "LoRA adapter (PEFT folder, zip)", "merged": "merged model (Hugging Face folder, zip)",
                   "gguf": "GGUF for llama.cpp", "report": "run report (HTML)"}


def router(*, store: Store, data_dir: Path, owner: Callable[..., str | None]) -> APIRouter:
    """The dashboard's routes. ``owner`` is the API's auth dependency: the caller's key id (None when the server
    needs no keys and every job is shown)."""
    static = {name: resources.files(__package__).joinpath("static", name).read_bytes() for name in STATIC_FILES}
    pages = {name: resources.files(__package__).joinpath("static", name).read_bytes()
             for name in ("index.html", "job.html")}
    eval_views = EvalViews()
    api = APIRouter(include_in_schema=False)

    @api.get("/")
    def jobs_page() -> Response:
        return Response(pages["index.html"], media_type="text/html", headers=PAGE_HEADERS)

    @api.get("/jobs/{job_id}")
    def job_page(job_id: str) -> Response:
        return Response(pages["job.html"], media_type="text/html", headers=PAGE_HEADERS)

    @api.get("/dashboard/static/{name:path}")
    def static_file(name: str) -> Response:
        if name not in static:
            raise HTTPException(404, f"No dashboard file {name!r}")
        return Response(static[name], media_type=STATIC_FILES[name], headers={"Cache-Control": "max-age=3600"})

    @api.get("/dashboard/api/jobs")
    def jobs(key: str | None = Depends(owner)) -> JSONResponse:
        page = store.list_jobs(owner=key, limit=JOBS_SHOWN)
        return JSONResponse({"data": [job_summary(j) for j in page.items], "has_more": page.has_more})

    @api.get("/dashboard/api/jobs/{job_id}")
    def job(job_id: str, key: str | None = Depends(owner)) -> JSONResponse:
        found = _job(store, job_id, key)
        return JSONResponse(job_view(store=store, job=found, data_dir=data_dir, eval_views=eval_views))

    @api.get("/dashboard/jobs/{job_id}/download/{name}")
    def download(job_id: str, name: str, key: str | None = Depends(owner)) -> Response:
        found = downloads(_job(store, job_id, key), data_dir).get(name)
        if found is None:
            raise HTTPException(404, f"Job {job_id} has no {name!r} to download")
        if found.path.is_file():
            return FileResponse(found.path, filename=found.filename)
        return StreamingResponse(zipped(found.path), media_type="application/zip",
                                 headers={"Content-Disposition": f'attachment; filename="{found.filename}"'})

    return api


def _job(store: Store, job_id: str, key: str | None) -> Job:
    found = store.get_job(job_id, owner=key)
    if found is None:
        raise HTTPException(404, f"No fine-tuning job {job_id!r}")
    return found


# --- the JSON the pages draw ----------------------------------------------------------------------------------------

def job_summary(job: Job) -> dict[str, Any]:
    return {"id": job.id, "status": job.status, "model": job.model, "created_at": job.created_at,
            "finished_at": job.finished_at, "fine_tuned_model": job.fine_tuned_model}


def job_view(*, store: Store, job: Job, data_dir: Path, eval_views: EvalViews) -> dict[str, Any]:
    """Everything the job page shows, in one response (a poll is one request)."""
    events = store.list_events(job.id, limit=EVENTS_SHOWN).items
    checkpoints = store.list_checkpoints(job.id, limit=CHECKPOINTS_SHOWN).items
    return {"job": {**job_summary(job), "method": {"type": job.method["type"]},
                    "hyperparameters": job.hyperparameters, "suffix": job.suffix, "error": job.error,
                    "trained_tokens": job.trained_tokens},
            "metrics": curves(store, job.id),
            "events": [{"created_at": e.created_at, "level": e.level, "message": e.message} for e in events],
            "checkpoints": [{"step_number": c.step_number, "metrics": c.metrics,
                             "fine_tuned_model_checkpoint": c.fine_tuned_model_checkpoint} for c in checkpoints],
            "eval": eval_views.get(data_dir / job.out_dir),
            "artefacts": [{"name": d.label, "filename": d.filename,
                           "href": f"/dashboard/jobs/{job.id}/download/{d.key}"}
                          for d in downloads(job, data_dir).values()]}


def curves(store: Store, job_id: str) -> dict[str, dict[str, list[Any]]]:
    """The loss curves as columns, what uPlot draws: train loss by step, eval loss by step (only these: the job's
    JSON is fetched every two seconds while it runs, and 10,000 steps of every metric would treble it)."""
    train: dict[str, list[Any]] = {"step": [], "loss": []}
    evals: dict[str, list[Any]] = {"step": [], "eval_loss": []}
    for m in store.metrics(job_id):
        if m.kind == "train":
            train["step"].append(m.step)
            train["loss"].append(m.values.get("loss"))
        else:
            evals["step"].append(m.step)
            evals["eval_loss"].append(m.values.get("eval_loss"))
    return {"train": train, "eval": evals}


class EvalViews:
    """Base vs tuned metrics and flipped examples of finished runs, read once per eval record (the job page polls
    every two seconds; the eval files change only when the eval stage writes them again)."""

    def __init__(self) -> None:
        self._cache: dict[Path, tuple[int, dict[str, Any] | None]] = {}

    def get(self, run_dir: Path) -> dict[str, Any] | None:
        record = run_dir / "eval" / StageRecord.FILE
        if not record.is_file():
            return None
        stamp = record.stat().st_mtime_ns
        cached = self._cache.get(run_dir)
        if cached is None or cached[0] != stamp:
            cached = (stamp, eval_view(run_dir))
            self._cache[run_dir] = cached
        return cached[1]


def eval_view(run_dir: Path) -> dict[str, Any] | None:
    """What the run report shows of the eval stages (the same reader: ``report.collect``)."""
    data = collect(run_dir, {})
    if not data.metrics:
        return None
    return {"metrics": [asdict(m) for m in data.metrics], "flips": [asdict(f) for f in data.flips],
            "flip_counts": data.flip_counts, "num_eval": data.num_eval}


# --- downloads ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Download:
    key: str
    """What the download's URL names: ``adapter``, ``merged``, ``gguf-1`` (one per exported GGUF), ``report``."""
    label: str
    path: Path
    filename: str
    """``ftjob-…-adapter.zip``, ``ftjob-…-model-f16.gguf``, ``ftjob-…-report.html``: what the browser saves."""


def downloads(job: Job, data_dir: Path) -> dict[str, Download]:
    """The job's artefacts as the worker recorded them (paths relative to the data dir), those that exist and lie
    inside the job's own folder (anything else is a corrupt record and is not served)."""
    recorded = job.artefacts
    entries = [("adapter", ARTEFACT_LABELS["adapter"], recorded.get("adapter")),
               ("merged", ARTEFACT_LABELS["merged"], recorded.get("merged")),
               *[(f"gguf-{i}", f"{ARTEFACT_LABELS['gguf']} ({Path(p).name})", p)
                 for i, p in enumerate(recorded.get("gguf", []), start=1)],
               ("report", ARTEFACT_LABELS["report"], recorded.get("report"))]
    job_dir = (data_dir / job.out_dir).resolve()
    out = {}
    for key, label, relative in entries:
        if not relative:
            continue
        path = (data_dir / relative).resolve()
        if path.is_relative_to(job_dir) and path.exists():
            name = f"{job.id}-{path.name}" if path.is_file() else f"{job.id}-{key}.zip"
            out[key] = Download(key, label, path, name)
    return out


def zipped(folder: Path) -> Iterator[bytes]:
    """The folder as a zip, produced while it is sent: a merged model is hundreds of MB, so it is never held in
    memory or written to disk whole. Stored, not deflated: safetensors weights do not compress."""
    sink = _Chunks()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            with open(path, "rb") as src, archive.open(str(path.relative_to(folder)), "w", force_zip64=True) as dst:
                while block := src.read(ZIP_BLOCK):
                    dst.write(block)
                    if chunk := sink.take():
                        yield chunk
    yield sink.take()  # the last entry's descriptor and the central directory, written as the archive closes


class _Chunks(io.RawIOBase):
    """A write-only stream that hands its bytes out as they come (zipfile writes data descriptors to it, since it
    cannot seek back)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out
