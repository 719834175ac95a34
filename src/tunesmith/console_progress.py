"""Progress for long commands, on a terminal and off one.

On a terminal: rich progress bars (redrawn in place). Off one — a log file, CI, ``nohup``, a pipe — rich draws
nothing until the end, so a command that runs for minutes looks hung. There ``LineProgress`` stands in for rich's
``Progress`` (the same ``add_task`` / ``update`` / ``console`` calls) and prints plain lines: one per task when it
starts and ends, and, while it runs, at least every ``period_s`` seconds — from a timer thread, so a slow step or a
stage that reports no counts (loading a model, merging) still shows that it is alive.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

PERIOD_S = 20.0
"""Seconds between progress lines off a terminal (under the 30 s a person or a CI log waits before worrying)."""


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float
    fields: dict[str, Any]
    started: float
    printed: float
    initial: float = 0.0
    """The count it started from (a resumed run starts at its checkpoint's step): the rate counts from here."""
    finished: bool = False


class LineProgress:
    """rich ``Progress``'s calls, printed as lines (see the module docstring)."""

    def __init__(self, console: Any, period_s: float = PERIOD_S, clock: Any = time.monotonic) -> None:
        self.console = console
        self.period_s = period_s
        self.clock = clock
        self._tasks: dict[int, _Task] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run_timer, name="tunesmith-progress", daemon=True)

    def __enter__(self) -> LineProgress:
        self._thread.start()
        return self

    def __exit__(self, exc_type: object = None, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.period_s)
        with self._lock:
            for task in self._tasks.values():
                if not task.finished:
                    task.finished = True
                    self._print(task, "done" if exc_type is None else "stopped")

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> int:
        with self._lock:
            task_id = len(self._tasks)
            now = self.clock()
            self._tasks[task_id] = task = _Task(description, total, completed, dict(fields), now, now, completed)
            self._print(task, "started")
            return task_id

    def update(self, task_id: int, *, completed: float | None = None, total: float | None = None,
               **fields: Any) -> None:
        with self._lock:
            task = self._tasks[task_id]
            if total is not None:
                task.total = total
            if completed is not None:
                task.completed = completed
            task.fields.update(fields)
            if task.total is not None and task.completed >= task.total and not task.finished:
                task.finished = True
                self._print(task, "done")
            elif self.clock() - task.printed >= self.period_s and not task.finished:
                self._print(task, None)

    def remove_task(self, task_id: int) -> None:
        """No more lines for this task (another task now shows the progress)."""
        with self._lock:
            self._tasks[task_id].finished = True

    def tick(self) -> None:
        """A line for every running task that printed nothing for ``period_s`` (the timer thread calls it)."""
        with self._lock:
            for task in self._tasks.values():
                if not task.finished and self.clock() - task.printed >= self.period_s:
                    self._print(task, None)

    def _run_timer(self) -> None:
        while not self._stop.wait(self.period_s / 4):
            self.tick()

    def _print(self, task: _Task, state: str | None) -> None:
        task.printed = now = self.clock()
        elapsed = now - task.started
        parts = [task.description]
        if task.total:
            parts.append(f"{task.completed:,.0f}/{task.total:,.0f} ({task.completed / task.total:.0%})")
        parts.append(f"{_duration(elapsed)} elapsed")
        done_here = task.completed - task.initial
        if state is None and task.total and done_here > 0:
            remaining = elapsed * (task.total - task.completed) / done_here
            parts.append(f"~{_duration(remaining)} left")
        if state is not None:
            parts.append(state)
        info = task.fields.get("info")
        if info:
            parts.append(str(info))
        self.console.print("  ".join(parts), highlight=False, soft_wrap=True)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def progress_display(console: Any, columns: tuple[Any, ...]) -> Any:
    """rich's live bars on a terminal, ``LineProgress`` elsewhere (not yet entered)."""
    if console.is_terminal:
        from rich.progress import Progress

        return Progress(*columns, console=console, transient=False)
    return LineProgress(console)
