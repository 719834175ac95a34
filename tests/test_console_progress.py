"""Progress off a terminal: plain lines, at least one every period while a task runs, even with no updates."""

from __future__ import annotations

import io
import time

from rich.console import Console

from tunesmith.console_progress import LineProgress, progress_display


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=200), out


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_task_with_no_updates_still_prints_a_line_every_period():
    console, out = _console()
    clock = _Clock()
    progress = LineProgress(console, period_s=20, clock=clock)
    progress.add_task("merge", total=None, info="")
    for now in (5, 19, 21, 30, 41.5, 61.6):
        clock.now = now
        progress.tick()
    progress.__exit__(None, None, None)
    lines = out.getvalue().splitlines()
    assert lines == ["merge  0s elapsed  started", "merge  21s elapsed", "merge  42s elapsed", "merge  1m02s elapsed",
                     "merge  1m02s elapsed  done"]


def test_the_timer_thread_prints_while_the_command_works():
    console, out = _console()
    with LineProgress(console, period_s=0.05) as progress:
        progress.add_task("export", total=None, info="")
        deadline = time.monotonic() + 10
        while out.getvalue().count("elapsed\n") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert out.getvalue().count("elapsed\n") >= 2


def test_a_resumed_task_estimates_what_is_left_from_its_own_rate():
    console, out = _console()
    clock = _Clock()
    progress = LineProgress(console, period_s=20, clock=clock)
    task = progress.add_task("train", total=1000, completed=900, info="")
    clock.now = 30
    progress.update(task, completed=930)  # 30 steps in 30 s since the resume: 70 left, ~70 s
    assert out.getvalue().splitlines()[-1] == "train  930/1,000 (93%)  30s elapsed  ~1m10s left"


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
