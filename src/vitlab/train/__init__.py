"""Training. `build` makes a run from one resolved config (data, model, EMA, loaders, optimizer); `trainer` is
the loop (epoch -> batch -> optimizer step); `rundir` the run directory's lifecycle (lock, resume, save,
finish), `signals` stopping on request, `rng` the random streams, `guards` non-finite values; `evaluate`,
`checkpoint`, `metrics`, `optim`, `distributed`, `export` as named.

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
