"""The two kinds of failure tunesmith reports, and how the CLI turns them into exit codes.

A library function raises; it never prints and never calls ``sys.exit``. The CLI catches these at the boundary
and prints one message (no traceback unless ``--debug``):

- ``UserError``  (exit 2): bad input or config — the message names the file, line, field and the fix.
- ``RunError``   (exit 1): a runtime failure that is not the user's typo (NaN loss, out of memory, disk full).
"""

from __future__ import annotations


class TunesmithError(Exception):
    """Base class: a failure with a message meant for a person, and an optional hint saying what to do."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"


class UserError(TunesmithError):
    """Bad input: a config key, a data line, a path. Exit code 2."""

    exit_code = 2


class RunError(TunesmithError):
    """A failure during a run that is not bad input (NaN loss, out of memory, disk full). Exit code 1."""

    exit_code = 1


def where(path: object, line: int | None = None, field: str | None = None, unit: str = "line") -> str:
    """``file:line: field`` prefix used by every message that points into a user's file; ``file: row N: field``
    for a table (parquet, CSV, Arrow, a JSON array, a hub dataset), whose rows have no line."""
    out = str(path)
    if line is not None:
        out += f":{line}" if unit == "line" else f": {unit} {line}"
    if field:
        out += f": {field}"
    return out


class Interrupted(RunError):
    """The run was stopped by a signal after writing a checkpoint. Exit code 130."""

    exit_code = 130


class Stopped(TunesmithError):
    """Stopped by SIGTERM or SIGHUP (a scheduler's pre-emption, a closed terminal) outside training, which checkpoints
    on its own. Exit code 128 + the signal's number, as a shell reports a process the signal ended."""

    def __init__(self, signal_name: str, signal_number: int) -> None:
        super().__init__(f"stopped by {signal_name} before the command finished; what it had not finished writing "
                         "was not kept", hint="run the same command again")
        self.exit_code = 128 + signal_number

