"""Training: trainer, optimizers and schedules, checkpoints, metrics, evaluation."""
from .evaluate import evaluate, load_checkpoint, predict
from .trainer import Trainer, train

__all__ = ["Trainer", "evaluate", "load_checkpoint", "predict", "train"]
