"""Progress off a terminal: plain lines, at least one every period while a task runs, even with no updates."""

from __future__ import annotations

import io
import time

from rich.console import Console

from tunesmith.console_progress import LineProgress, progress_display


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=200), out


def test_a_task_with_no_updates_still_prints_a_line_every_period():
    console, out = _console()
    with LineProgress(console, period_s=0.2) as progress:
        progress.add_task("merge", total=None, info="")
        time.sleep(0.9)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("merge") and lines[0].endswith("started")
    assert sum(1 for line in lines if line.endswith("elapsed")) >= 3  # the timer's lines, between the two
    assert lines[-1].endswith("done")


def test_counted_tasks_show_counts_remaining_time_and_finish_once():
    console, out = _console()
    with LineProgress(console, period_s=0.05) as progress:
        task = progress.add_task("train", total=10, info="")
        for step in range(1, 11):
            time.sleep(0.02)
            progress.update(task, completed=step, info=f"loss {1 / step:.3f}")
    text = out.getvalue()
    assert "train  10/10 (100%)" in text and text.count("10/10") == 1
    assert "left" in text and "loss 0.100" in text


def test_a_task_cut_short_by_an_error_says_stopped():
    console, out = _console()
    try:
        with LineProgress(console, period_s=5) as progress:
            progress.add_task("export", total=None, info="")
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert out.getvalue().splitlines()[-1].endswith("stopped")


def test_a_terminal_gets_rich_bars_and_anything_else_gets_lines():
    from rich.progress import Progress

    console, _ = _console()
    assert isinstance(progress_display(console, ()), LineProgress)
    terminal = Console(file=io.StringIO(), force_terminal=True)
    assert isinstance(progress_display(terminal, ()), Progress)
