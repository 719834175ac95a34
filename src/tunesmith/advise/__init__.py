"""``tunesmith advise``: the guide's decision framework with memory, time and cost estimates.

- ``catalog``: architecture configs of common models and GPUs (memory, bf16 peak, editable $/hour)
- ``memory``: exact parameter counts on the meta device and the per-method peak-memory model
- ``cost``: FLOPs per token, calibrated MFU, GPU-hours and dollars; the serving bill vs an API model
- ``decide``: the guide's rules, each with its reasoning
- ``advise``: the entry point that runs them in order and writes a starter config
"""

import sys

from .. import StageModule
from .advise import Advice, advise

__all__ = ["Advice", "advise"]

sys.modules[__name__].__class__ = StageModule  # `tunesmith.advise(...)` calls advise() (src/tunesmith/__init__.py)
