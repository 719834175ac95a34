"""Writing outputs so that a reader never sees half of one, and one message when the disk refuses a write.

Every output is written beside its final name and renamed into place: a rename within one folder is atomic on POSIX
file systems, so an output exists whole or not at all. ``atomic_file`` and ``atomic_folder`` do that for one file or
one folder, ``atomic_files`` for a set of files that belong together (a prepared data folder). Whatever stops a
write — disk full, a quota, a read-only file system, a permission, Ctrl-C — removes what it had written; a refusal
by the storage becomes one ``RunError`` naming the path, the bytes needed when known and the free space
(``storage_error``).

Writers say "no space" in several ways: ``OSError`` with errno ENOSPC or EDQUOT (Python's own files), safetensors'
``SafetensorError`` whose text carries the OS error, and torch.save's ``RuntimeError`` from its zip writer, which
names no cause at all ("unexpected pos 576 vs 534"): that one is a full disk when the disk is full when it fails.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from .errors import RunError

NO_SPACE = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded"}
REFUSED = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
           errno.EPERM: "operation not permitted", errno.EFBIG: "the file is too large for the file system",
           errno.EIO: "an input/output error on the device"}
"""The errnos that mean the storage refused a write (the rest are bugs or belong to other checks)."""

TORCH_WRITER = ("PytorchStreamWriter", "inline_container", "unexpected pos", "file write failed")
"""What torch.save's zip writer says when a write comes up short (it does not say why)."""

FULL_BELOW = 1 << 20
"""A write that failed while less than this was free (1 MiB: tmpfs and ext4 report 0 once full) failed for space."""

HINT = "free disk space or choose another --out"


def free_space(path: str | Path) -> int:
    """Bytes free to this user on the file system that holds ``path`` (or would: its nearest existing folder)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def size(n: int) -> str:
    """``812 KiB``, ``3.2 MiB``, ``14.1 GiB``."""
    if n < 1 << 20:
        return f"{n / 1024:.0f} KiB"
    if n < 1 << 30:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**30:.1f} GiB"


def storage_error(exc: BaseException, path: str | Path, needed: int | None = None, *, what: str | None = None,
                  free_at_failure: int | None = None, hint: str = HINT) -> RunError | None:
    """``exc`` as one RunError when the storage refused writing ``path`` (``what`` names it for people:
    ``checkpoint 3``); None when ``exc`` is something else. ``free_at_failure``: the free bytes measured when the
    write failed, before its partial output was removed (decides what torch.save's silent writer error was)."""
    reason = _refusal(exc, path, free_at_failure)
    if reason is None:
        return None
    if reason in NO_SPACE.values():
        return disk_full(path, needed, what=what, hint=hint)
    thing = f"{what} ({path})" if what else str(path)
    return RunError(f"cannot write {thing}: {reason}", hint="choose another --out, or make it writable"
                    if reason in (REFUSED[errno.EROFS], REFUSED[errno.EACCES], REFUSED[errno.EPERM]) else hint)


def disk_full(path: str | Path, needed: int | None = None, *, what: str | None = None,
              hint: str = HINT) -> RunError:
    """The one message for a write of ``path`` that ran out of space: the bytes needed when known, the free space."""
    thing = f"{what} ({path})" if what else str(path)
    needs = f"needs about {size(needed)}, " if needed else ""
    return RunError(f"disk full while writing {thing}: {needs}{size(free_space(path))} free", hint=hint)


def out_of_space(log: str, free_at_failure: int) -> bool:
    """Whether a child process (llama.cpp's converter, its quantizer) that failed writing failed for space: it
    said so, or the disk was full when it stopped (its log may be cut short: the log is on the same disk)."""
    return free_at_failure < FULL_BELOW or any(words in log for words in NO_SPACE.values()) or "[Errno 28]" in log


def _refusal(exc: BaseException, path: str | Path, free_at_failure: int | None) -> str | None:
    if isinstance(exc, OSError):
        return NO_SPACE.get(exc.errno or 0) or REFUSED.get(exc.errno or 0)
    if isinstance(exc, SafetensorError | RuntimeError):
        text = str(exc)
        for code, words in (*NO_SPACE.items(), *REFUSED.items()):
            # safetensors (Rust) writes "No space left on device (os error 28)"
            if f"os error {code})" in text or (code in NO_SPACE and words in text):
                return words
        if any(mark in text for mark in TORCH_WRITER):
            free = free_space(path) if free_at_failure is None else free_at_failure
            return NO_SPACE[errno.ENOSPC] if free < FULL_BELOW else f"the writer stopped short ({text.strip()})"
    return None


@contextmanager
def storage_errors(path: str | Path, needed: int | None = None, *, what: str | None = None,
                   hint: str = HINT) -> Iterator[None]:
    """Turn a storage refusal inside the block into one RunError about ``path``; what was written stays (an
    appended log keeps its earlier lines)."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as exc:
        error = storage_error(exc, path, needed, what=what, hint=hint)
        if error is None:
            raise
        raise error from exc


@contextmanager
def writing(path: str | Path, needed: int | None = None, *, what: str | None = None,
            target: str | Path | None = None, hint: str = HINT) -> Iterator[None]:
    """Whatever stops the block removes ``path`` (a file or a folder: the partial output of the block), and a
    storage refusal becomes one RunError about ``target`` (what ``path`` was to become; default ``path``)."""
    path = Path(path)
    try:
        yield
    except BaseException as exc:
        free = free_space(path)
        remove(path)
        error = storage_error(exc, target or path, needed, what=what, free_at_failure=free, hint=hint)
        if error is None:
            raise
        raise error from exc


def remove(path: Path) -> None:
    """Delete a file or a folder tree, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def staging_name(target: Path) -> Path:
    """Where ``target`` is written before it is renamed: a hidden sibling on the same file system."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_file(target: str | Path, needed: int | None = None, *, what: str | None = None) -> Iterator[Path]:
    """A path to write ``target``'s content to; when the block ends well it is synced and renamed to ``target``,
    otherwise removed (``target`` keeps what it held)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_name(target)
    with writing(staging, needed, what=what, target=target):
        yield staging
        _fsync(staging)
        os.replace(staging, target)
        _fsync(target.parent)


@contextmanager
def atomic_folder(target: str | Path, needed: int | None = None, *, what: str | None = None) -> Iterator[Path]:
    """An empty folder to write ``target``'s files into; when the block ends well it replaces ``target`` (an older
    ``target`` is renamed aside first, then removed), otherwise it is removed and ``target`` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_name(target)
    remove(staging)
    with writing(staging, needed, what=what, target=target):
        staging.mkdir()
        yield staging
        for f in staging.rglob("*"):
            if f.is_file():
                _fsync(f)
        replace_folder(staging, target)


def replace_folder(new: Path, target: Path) -> None:
    """Rename the finished folder ``new`` to ``target``; a ``target`` already there is moved aside, then deleted,
    so at every moment ``target`` is the old folder or the new one, never a mix."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        remove(old)
        os.rename(target, old)
    os.rename(new, target)
    _fsync(target.parent)
    remove(old)


@contextmanager
def atomic_files(folder: str | Path, last: str | None = None) -> Iterator[Path]:
    """A staging folder inside ``folder`` for files that belong together; when the block ends well each file is
    renamed into ``folder`` (replacing its older version; the one named ``last``, a manifest, after the others) and
    the staging folder removed, otherwise nothing in ``folder`` changes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".staging-{os.getpid()}"
    remove(staging)
    with writing(staging, target=folder):
        staging.mkdir()
        yield staging
        written = sorted((f for f in staging.iterdir() if f.is_file()), key=lambda f: f.name == last)
        for f in written:
            _fsync(f)
        for f in written:
            os.replace(f, folder / f.name)
        _fsync(folder)
        staging.rmdir()


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path, len(text.encode("utf-8"))) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
