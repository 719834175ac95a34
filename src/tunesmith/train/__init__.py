"""Training: full fine-tuning, LoRA and QLoRA from one config, one loop."""

from .loop import StepSetup, TrainResult, evaluate_loss, fit, train

__all__ = ["StepSetup", "TrainResult", "evaluate_loss", "fit", "train"]
