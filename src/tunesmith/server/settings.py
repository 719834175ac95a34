"""What one ``tunesmith server`` (and its workers) runs with: decided once from the command line, then read only."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..errors import UserError

DEFAULT_BASE_MODELS: tuple[str, ...] = ("local:demo", "local:smollm2-135m-instruct")
MAX_UPLOAD_BYTES = 512 * 2**20
"""OpenAI's per-file limit for fine-tuning uploads (512 MB)."""


def parse_gpus(text: str) -> tuple[str, ...]:
    """``--gpus 0,1,2,3`` as the device names CUDA_VISIBLE_DEVICES takes (indices or GPU UUIDs); "" or ``none``: no
    GPU (jobs train on the CPU)."""
    if text.strip().lower() in ("", "none"):
        return ()
    names = tuple(name.strip() for name in text.split(","))
    if any(not name for name in names):
        raise UserError(f"--gpus {text}: an empty entry", hint="list the GPUs by index, comma-separated: --gpus 0,1")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserError(f"--gpus {text}: GPU {', '.join(repeated)} is listed twice",
                        hint="list each GPU once: two jobs on one GPU would share its memory")
    return names


def visible_gpus() -> tuple[str, ...]:
    """The default of ``--gpus``: every CUDA device this process may use — CUDA_VISIBLE_DEVICES' own names where it
    is set (a job's narrower set is then taken from them, not from indices the driver would read differently),
    else each device's index; none on a machine without CUDA."""
    import torch

    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return tuple(name.strip() for name in listed.split(",") if name.strip())[:count]
    return tuple(str(i) for i in range(count))


def gpu_sets(gpus: tuple[str, ...], *, workers: int, per_job: int) -> tuple[tuple[str, ...], ...]:
    """Each worker's own GPUs: worker k (from 0) gets ``gpus[k·per_job : (k+1)·per_job]``, so no two jobs share a
    GPU. No GPUs at all with one per job: every worker trains on the CPU (empty sets). Too few GPUs is a UserError
    (it is found at start-up, before any job runs)."""
    if not gpus and per_job == 1:
        return ((),) * workers
    needed = workers * per_job
    if len(gpus) < needed:
        have = f"{len(gpus)} GPU(s) ({','.join(gpus)})" if gpus else "no GPU"
        raise UserError(f"--gpus-per-job {per_job}: {workers} worker(s) × {per_job} GPU(s) need {needed} GPUs, and "
                        f"the server has {have}",
                        hint="lower --workers or --gpus-per-job, or list more GPUs with --gpus")
    return tuple(gpus[k * per_job:(k + 1) * per_job] for k in range(workers))


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServerSettings(BaseModel):
    """Plain fields only (the derived ones are properties), so ``model_dump_json`` / ``model_validate_json`` carry
    the settings to a worker process unchanged."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    """Address to listen on. Anything but loopback requires API keys."""

    port: int = Field(8000, ge=0, le=65535)
    """TCP port (0: any free port)."""

    data_dir: Path = Path("tunesmith-server")
    """Holds the SQLite database, uploaded files (``files/<id>``), job run folders (``jobs/<id>``) and logs."""

    database: str | None = None
    """SQLAlchemy URL of the job store; None: ``sqlite:///<data_dir>/tunesmith.db``."""

    workers: int = Field(1, ge=0)
    """Worker processes the server starts (0: run ``tunesmith worker`` elsewhere against the same database)."""

    max_upload_bytes: int = Field(MAX_UPLOAD_BYTES, ge=1)
    """Largest accepted upload; a larger one is refused with HTTP 413."""

    require_keys: bool = False
    """Require API keys even on loopback (always required on any other address)."""

    base_models: tuple[str, ...] = DEFAULT_BASE_MODELS
    """Model names a job may fine-tune and chat may use: what tunesmith's ``model.name_or_path`` accepts."""

    export_gguf: bool = False
    """Jobs also export a GGUF (f16) for llama.cpp serving."""

    gpus: tuple[str, ...] = ()
    """The GPUs the server's workers share out (CUDA_VISIBLE_DEVICES names); empty: jobs train on the CPU."""

    gpus_per_job: int = Field(1, ge=1)
    """GPUs each worker's jobs train on; more than one: the train stage runs as that many torchrun processes."""

    @property
    def worker_gpu_sets(self) -> tuple[tuple[str, ...], ...]:
        """Each of the server's workers' own GPUs (``gpu_sets``); a UserError when there are too few."""
        return gpu_sets(self.gpus, workers=self.workers, per_job=self.gpus_per_job)

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{self.data_dir.resolve() / 'tunesmith.db'}"

    @property
    def api_keys_required(self) -> bool:
        return self.require_keys or not is_loopback(self.host)

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"
