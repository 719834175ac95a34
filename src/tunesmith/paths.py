"""Paths a user names (a config, a data file, an ``--out`` folder), checked before any work starts.

Each problem is one ``UserError`` naming the option, the path and the fix: a folder where a file is expected and
the reverse, an output folder whose place is a file or lies under one, a read-only or unwritable disk. An output
folder is checked without being created, so a command refused here has written nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError


def home() -> Path:
    """tunesmith's own cache folder (models it builds, encoders it distils): $TUNESMITH_HOME, default
    ~/.cache/tunesmith."""
    return Path(os.environ.get("TUNESMITH_HOME") or Path.home() / ".cache" / "tunesmith")


def input_file(path: str | Path, option: str, hint: str | None = None) -> Path:
    """``path`` as a file that exists: a folder or a missing path is one message naming ``option``."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        raise UserError(f"{_named(option, path)}: is a folder, not a file", hint=hint)
    raise UserError(f"{_named(option, path)}: not found", hint=hint or "check the path (relative to this folder)")


def output_folder(path: str | Path, option: str = "--out", create: bool = False) -> Path:
    """``path`` as a folder that exists or can be created, and whose files can be written; created only when
    ``create`` is set."""
    path = Path(path)
    named = _named(option, path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{named}: is a file, not a folder",
                        hint=f"choose a folder for {option}, or move the file {path} away")
    place = _nearest_existing(path)
    if not place.is_dir():
        raise UserError(f"{named}: cannot be created, {place} is a file",
                        hint=f"choose a folder for {option} that is not inside a file")
    _writable(place, named, option)
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{named}: cannot be created ({exc.strerror})",
                            hint=f"choose another folder for {option}") from None
    return path


def output_file(path: str | Path, option: str) -> Path:
    """``path`` as a file that can be written: not a folder, in a folder that exists and is writable."""
    path = Path(path)
    named = _named(option, path)
    if path.is_dir():
        raise UserError(f"{named}: is a folder, not a file", hint=f"give a file name, e.g. {path / 'config.yaml'}")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{named}: cannot be written, {parent} is a file", hint="choose a path inside a folder")
    if not parent.exists():
        raise UserError(f"{named}: the folder {parent} does not exist", hint=f"create it first (mkdir -p {parent}), "
                        "or choose a path in an existing folder")
    _writable(parent, named, option)
    return path


def _named(option: str, path: Path) -> str:
    return f"{option} {path}" if option else str(path)


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.absolute().parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _writable(folder: Path, named: str, option: str) -> None:
    if os.access(folder, os.W_OK | os.X_OK):
        return
    readonly = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    why = "is on a read-only file system" if readonly else "is not writable (permission denied)"
    raise UserError(f"{named}: cannot write there, {folder} {why}",
                    hint=f"choose a writable place for {option}" if option else "choose a writable place")
