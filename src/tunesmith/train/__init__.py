"""Training: full fine-tuning, LoRA and QLoRA from one config, one loop."""

import sys

from .. import StageModule
from .fp8 import quantize_frozen_base
from .loop import StepSetup, TrainResult, evaluate_loss, fit, train

__all__ = ["StepSetup", "TrainResult", "evaluate_loss", "fit", "quantize_frozen_base", "train"]

sys.modules[__name__].__class__ = StageModule  # `tunesmith.train(...)` calls train() (src/tunesmith/__init__.py)
