"""What one ``tunesmith server`` (and its workers) runs with: decided once from the command line, then read only."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_BASE_MODELS: tuple[str, ...] = ("local:demo", "local:smollm2-135m-instruct")
MAX_UPLOAD_BYTES = 512 * 2**20
"""OpenAI's per-file limit for fine-tuning uploads (512 MB)."""


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
