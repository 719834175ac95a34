"""``tunesmith advise``: the guide's decision framework with memory, time and cost estimates.

- ``tunesmith.hardware``: the model and GPU catalogue and the peak-memory model it shares with ``train``
- ``cost``: FLOPs per token, calibrated MFU, GPU-hours and dollars; the serving bill vs an API model
- ``decide``: the guide's rules, each with its reasoning
- ``advise``: the entry point that runs them in order and writes a starter config
"""

import sys

from .. import StageModule
from .advise import Advice, advise

__all__ = ["Advice", "advise"]

sys.modules[__name__].__class__ = StageModule  # `tunesmith.advise(...)` calls advise() (src/tunesmith/__init__.py)
