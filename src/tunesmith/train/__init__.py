"""Training: full fine-tuning, LoRA and QLoRA from one config, one loop."""

from .loop import TrainResult, evaluate_loss, fit, train

__all__ = ["TrainResult", "evaluate_loss", "fit", "train"]
