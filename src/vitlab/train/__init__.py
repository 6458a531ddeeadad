"""Training: trainer, optimizers and schedules, checkpoints, metrics, evaluation.

The package is also callable: `vitlab.train(config, **overrides)` is the notebook API's `vitlab.api.train`
(it returns a TrainedRun); its names (`vitlab.train.Trainer`, `vitlab.train.train`, ...) stay as they are."""
import sys
import types

from .evaluate import evaluate, load_checkpoint, predict
from .trainer import Trainer, train

__all__ = ["Trainer", "evaluate", "load_checkpoint", "predict", "train"]


class _CallablePackage(types.ModuleType):
    def __call__(self, config=None, **overrides):
        from ..api import train as train_run
        return train_run(config, **overrides)


sys.modules[__name__].__class__ = _CallablePackage
