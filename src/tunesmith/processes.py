"""Child processes tunesmith starts (llama.cpp's server and converter, pip, torchrun): each in its own process group
with its output in a named log file, and stopped — with everything it started — when tunesmith stops.

- Own group (``start_new_session=True``): a terminal's Ctrl-C reaches tunesmith alone, and ``stop`` signals the
  child's whole group (a server's workers, the converter's helpers) without signalling tunesmith itself.
- While a child runs, SIGTERM and SIGHUP, which would kill tunesmith outright and orphan the child, raise
  ``SystemExit(128 + signal)`` instead (SIGINT already raises ``KeyboardInterrupt``), so the ``with``/``finally``
  blocks that stop children run; an ``atexit`` hook stops any child still registered when the interpreter exits.
  A handler the program installed itself (the training loop's checkpoint-then-exit) is left alone.
- ``stop``: SIGTERM to the group, up to ``stop_timeout_s`` for all of it to exit, then SIGKILL; a second signal
  during that wait kills at once. ``stop_all`` does the same for several children at once (one wait for all).
- A non-zero exit is a RunError naming the log file, with its last lines.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import RunError

TAIL_LINES = 12
"""Lines of a failed child's log quoted in the error message."""


@dataclass(frozen=True)
class Child:
    """A started child process and where its output goes."""

    what: str
    """What it is, for messages: "llama.cpp's converter", "the llama.cpp server"."""
    process: subprocess.Popen[bytes]
    log_path: Path
    stop_timeout_s: float
    """How long ``stop`` waits after SIGTERM before SIGKILL (torchrun needs time for its workers' checkpoints)."""
    copiers: tuple[threading.Thread, ...] = ()
    """The threads copying stdout and stderr to the log and to ``echo``, when there are any."""

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode


def start(command: Sequence[str], *, what: str, log_path: str | Path, env: Mapping[str, str] | None = None,
          stop_timeout_s: float = 10.0, echo: tuple[IO[bytes], IO[bytes]] | None = None) -> Child:
    """Start ``command`` in its own process group, stdout and stderr to ``log_path`` — and, with ``echo``, each to
    its own stream too (this process's stdout and stderr, say: torchrun's training progress); stdin is closed."""
    log_path = Path(log_path)
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "wb")  # noqa: SIM115 — handed to the child, then closed here
    except OSError as exc:
        raise RunError(f"{log_path}: cannot write the log of {what} ({exc.strerror})",
                       hint="make the folder writable, or choose another output folder") from None
    try:
        process = subprocess.Popen(list(command), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE if echo is not None else log,
                                   stderr=subprocess.PIPE if echo is not None else subprocess.STDOUT,
                                   env=dict(env) if env is not None else None, start_new_session=True)
    except OSError as exc:
        log.close()
        raise RunError(f"cannot start {what}: {command[0]}: {exc.strerror}") from None
    log.close()  # the child holds its own descriptor, or each copier opens the log to append
    copiers: tuple[threading.Thread, ...] = ()
    if echo is not None:
        copiers = tuple(threading.Thread(target=_copy, args=(pipe, log_path, stream), daemon=True)
                        for pipe, stream in ((process.stdout, echo[0]), (process.stderr, echo[1])))
        for copier in copiers:
            copier.start()
    child = Child(what, process, log_path, stop_timeout_s, copiers)
    _register(child)
    return child


def wait(child: Child) -> int:
    """Block until the child exits; its exit code (what it left running in its group is stopped by ``stop``)."""
    code = child.process.wait()
    for copier in child.copiers:
        copier.join()
    return code


def stop(child: Child) -> None:
    """Stop the child's whole process group: SIGTERM, up to ``stop_timeout_s``, then SIGKILL. Safe to repeat."""
    stop_all([child])


def stop_all(children: Sequence[Child]) -> None:
    """Stop several children's groups at once: SIGTERM to every group first, then one wait for all of them (the
    longest ``stop_timeout_s``), then SIGKILL to what is left. N workers that each need seconds to checkpoint stop
    in the time of the slowest, not of their sum. Safe to repeat."""
    try:
        alive = [c for c in children if _group_alive(c.pid, c.process)]
        for child in alive:
            _signal_group(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + max((c.stop_timeout_s for c in alive), default=0.0)
        while time.monotonic() < deadline:
            alive = [c for c in alive if _group_alive(c.pid, c.process)]
            if not alive:
                break
            time.sleep(0.05)
    finally:  # also when a second signal cuts the wait short: what is left is killed now
        for child in children:
            if _group_alive(child.pid, child.process):
                _signal_group(child.pid, signal.SIGKILL)
        for child in children:
            child.process.wait()
            for copier in child.copiers:
                copier.join(timeout=5)
            _unregister(child)


@contextmanager
def running(command: Sequence[str], **options: Any) -> Iterator[Child]:
    """``start`` for the duration of a ``with`` block; the group is stopped when the block ends, however it ends."""
    child = start(command, **options)
    try:
        yield child
    finally:
        stop(child)


def run(command: Sequence[str], *, what: str, log_path: str | Path, env: Mapping[str, str] | None = None) -> None:
    """Run ``command`` to completion (a converter, a download); RunError naming the log if it exits non-zero."""
    with running(command, what=what, log_path=log_path, env=env) as child:
        code = wait(child)
    if code != 0:
        raise failure(child, code)


def failure(child: Child, code: int) -> RunError:
    """The error for a child that exited with ``code``: what it was, the log file, its last lines (unless they
    were shown as it ran)."""
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    tail = log_tail(child.log_path)
    if child.copiers:  # its output was shown as it ran: the log is named, not quoted again
        last = " (shown above)" if tail else " (it wrote nothing)"
    else:
        last = f"; its last lines:\n{tail}" if tail else " (it wrote nothing)"
    return RunError(f"{child.what} {how}; its output is in {child.log_path}{last}",
                    hint=f"read {child.log_path} for the cause")


def log_tail(path: str | Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a log (at most 64 KiB read from its end)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


# --- the group, the registry and the signals ----------------------------------------------------------------------

_LIVE: dict[int, Child] = {}
_REPLACED: dict[int, Any] = {}
_TURNED_INTO_EXIT = (signal.SIGTERM, signal.SIGHUP)


def _group_alive(pgid: int, leader: subprocess.Popen[bytes]) -> bool:
    """Whether any process of the group still runs. Zombies do not count: an exited grandchild stays one for as
    long as nobody reaps it (under a container's init, that can be forever), and signal 0 still reaches it."""
    leader.poll()  # reap the leader once it exits
    if sys.platform != "linux":
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # a member we may not signal (it changed user): still alive
            return True
        return True
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # "pid (comm) state ppid pgrp …": comm may hold spaces and parentheses, so split after the last ")"
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _copy(source: IO[bytes], log_path: Path, echo: IO[bytes]) -> None:
    """One pipe to the log and to ``echo``; the log is kept even when ``echo`` goes away (a closed terminal). Both
    copiers append to the log (O_APPEND: each write lands whole at the end), whole lines only, so the two pipes'
    lines never interleave mid-line (an unbuffered stderr sends a line's text and its newline in two writes)."""
    echoing = True
    pending = b""
    with source, open(log_path, "ab") as log:
        for chunk in iter(lambda: source.read1(65536), b""):
            lines, sep, pending = (pending + chunk).rpartition(b"\n")
            if sep:
                log.write(lines + b"\n")
                log.flush()
            if echoing:
                try:
                    echo.write(chunk)
                    echo.flush()
                except OSError:
                    echoing = False
        if pending:  # a last line without its newline
            log.write(pending)
            log.flush()


def _register(child: Child) -> None:
    if not _LIVE and threading.current_thread() is threading.main_thread():
        for sig in _TURNED_INTO_EXIT:
            # an ignored signal stays ignored, a handler of the program's own stays in place
            if signal.getsignal(sig) is signal.SIG_DFL:
                _REPLACED[sig] = signal.signal(sig, _exit_on_signal)
    _LIVE[child.pid] = child


def _unregister(child: Child) -> None:
    _LIVE.pop(child.pid, None)
    if not _LIVE and threading.current_thread() is threading.main_thread():
        for sig, previous in _REPLACED.items():
            if signal.getsignal(sig) is _exit_on_signal:
                signal.signal(sig, previous)
        _REPLACED.clear()


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


@atexit.register
def _stop_all() -> None:
    for child in list(_LIVE.values()):
        stop(child)
