"""Signal handlers installed for the length of a block: the one mechanism behind the CLI's start-up and SIGTERM
handling and the training loop's checkpoint-then-exit flag. Signals reach only the main thread, so elsewhere the
block runs with the handlers as they are."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Handler = Callable[[int, Any], None]


@contextmanager
def handling(handler: Handler, *signals: signal.Signals) -> Iterator[None]:
    """``handler`` for ``signals`` inside the block; the previous handlers back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
