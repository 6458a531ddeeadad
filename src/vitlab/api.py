"""The Python API for notebooks and scripts: what `vitlab train` and `vitlab compare` do, returning objects.

    import vitlab
    run = vitlab.train("configs/quickstart.yaml", epochs=2, lr=3e-3)   # or {"train.epochs": 2}, train__epochs=2
    run.results["test_top1"]; run.frame()                                 # per-batch metrics as a DataFrame
    run.figures()["accuracy_per_epoch"]                                   # a matplotlib Figure, shown inline
    cmp = vitlab.compare(["configs/tower_vit/tower_mnist.yaml", "configs/tower_vit/staged_mnist.yaml"], epochs=1)
    cmp.table()                                                           # the TowerViT-vs-staged table as a DataFrame

Overrides are keyword arguments: `section.key` spelled with `__` (`optim__lr=1e-3`), a section as a dict
(`optim={"lr": 1e-3}`), `**{"optim.lr": 1e-3}`, or a bare key that names one field of one section
(`epochs=2` is `train.epochs`; `model.*` arguments always need their section).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .config import Config, read_yaml
from .errors import VitlabError
from .experiments.runs import Run, load_run


class TrainedRun:
    """A finished (or interrupted) run directory: its results, metrics, figures and files."""

    def __init__(self, run: Run):
        self._run = run

    @classmethod
    def load(cls, path: str | Path) -> "TrainedRun":
        return cls(load_run(Path(path)))

    @property
    def path(self) -> Path:
        return self._run.path

    @property
    def config(self) -> dict[str, Any]:
        return self._run.config

    @property
    def results(self) -> dict[str, Any]:
        """results.json (test top-1/top-5/loss, parameters, GFLOPs, img/s, peak memory, ...); {} if unfinished."""
        return self._run.results or {}

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last"

    def records(self, kind: str = "train_batch") -> list[dict[str, Any]]:
        """metrics.jsonl rows of one kind: train_batch, val_batch, epoch or test."""
        return self._run.records(kind)

    @property
    def batches(self) -> list[dict[str, Any]]:
        return self.records("train_batch")

    @property
    def epochs(self) -> list[dict[str, Any]]:
        return self.records("epoch")

    def frame(self, kind: str = "train_batch"):
        """The records of `kind` as a pandas DataFrame (one row per batch or epoch)."""
        return _pandas().DataFrame.from_records(self.records(kind))

    def figures(self) -> dict[str, Any]:
        """This run's figures (loss per batch, accuracy per epoch, train vs validation loss): matplotlib
        Figures, each shown inline when it is a cell's value."""
        from .plots import all_run_figures
        return all_run_figures([self._run])

    def _repr_html_(self) -> str:
        keys = ("model", "dataset", "test_top1", "test_top5", "params", "epochs", "images_per_second")
        from html import escape  # names and values come from the run directory (docs/design.md, threat model)
        cells = "".join(f"<tr><th>{k}</th><td>{escape(str(self.results[k]))}</td></tr>" for k in keys
                        if k in self.results)
        return f"<b>vitlab run</b> <code>{escape(str(self.path))}</code><table>{cells}</table>"

    def __repr__(self) -> str:
        top1 = self.results.get("test_top1")
        return f"TrainedRun({str(self.path)!r}" + (f", test_top1={top1:.4f})" if top1 is not None else ")")


class Comparison:
    """Several runs on the same data and budget (`vitlab compare`)."""

    def __init__(self, runs: list[TrainedRun], root: Path):
        self.runs, self.path = runs, root

    def table(self):
        """One row per model: the `vitlab compare` table (top-1, epochs, parameters, memory, img/s) as a
        DataFrame, numbers unformatted."""
        from .experiments.compare import COLUMNS
        rows = [{"model": r.results.get("model", r.path.name), "config": r.path.name,
                 **{key: r.results.get(key) for _, key in COLUMNS[1:]}} for r in self.runs]
        return _pandas().DataFrame.from_records(rows)

    def frame(self, kind: str = "train_batch"):
        """Every run's records of `kind` in one DataFrame, with a `run` column."""
        pd = _pandas()
        return pd.concat([r.frame(kind).assign(run=r.path.name) for r in self.runs], ignore_index=True)

    def figures(self) -> dict[str, Any]:
        from .plots import all_run_figures
        return all_run_figures([r._run for r in self.runs])

    def __repr__(self) -> str:
        return f"Comparison({[r.path.name for r in self.runs]}, path={str(self.path)!r})"


def train(config: str | Path | dict | Config | None = None, **overrides: Any) -> TrainedRun:
    """Train `config` (a YAML path, a nested dict, a Config, or None for the defaults) with `overrides`, in
    this process; return the run. Resuming is explicit: `reload=True`."""
    from .resolve import build
    from .train.trainer import train as run_training

    reload = bool(overrides.pop("reload", False))
    cfg = build(_tree(config), _pairs(overrides))
    run_training(cfg, reload=reload, command=f"vitlab.train({_describe(config)}, {_kwargs(overrides)})")
    return TrainedRun.load(cfg.run_dir)


def compare(configs: list[str | Path], epochs: int | None = None, output: str | Path = "output/compare",
            **overrides: Any) -> Comparison:
    """Train each config (its own process, as `vitlab compare` does; finished runs are read, not retrained)
    with the same epoch budget and overrides; return the runs. Their directories are <output>/<config name>."""
    from .experiments.compare import run_comparison

    root = Path(output)
    runs = run_comparison([str(c) for c in configs], epochs, root, dict(_pairs(overrides)))
    return Comparison([TrainedRun(r) for r in runs], root)


def _pandas():
    try:
        import pandas
    except ImportError:
        raise VitlabError("metrics as DataFrames need pandas: pip install 'vitlab[notebook]' (records() and "
                          "batches/epochs give the same rows as dicts)") from None
    return pandas


def _tree(config) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Config):
        import yaml
        return yaml.safe_load(config.dump())
    if isinstance(config, dict):
        return config
    return read_yaml(config)


def _pairs(overrides: dict[str, Any]) -> list[tuple[str, Any]]:
    """Keyword overrides as (section.key, value) pairs."""
    defaults = Config()
    sections = {f.name: {g.name for g in dataclasses.fields(getattr(defaults, f.name))}
                for f in dataclasses.fields(defaults) if dataclasses.is_dataclass(getattr(defaults, f.name))}
    pairs = []
    for key, value in overrides.items():
        key = key.replace("__", ".")
        if key in sections and isinstance(value, dict):
            pairs += [(f"{key}.{k}", v) for k, v in value.items()]
        elif "." in key or key not in {k for keys in sections.values() for k in keys}:
            pairs.append((key, value))  # a full key, or a top-level one (task_name); build() checks it
        else:
            owners = [s for s, keys in sections.items() if key in keys]
            if len(owners) > 1:
                raise VitlabError(f"override '{key}' is a key of {' and '.join(owners)}; name one, e.g. "
                                  f"{owners[0]}__{key}=...")
            pairs.append((f"{owners[0]}.{key}", value))
    return pairs


def _describe(config) -> str:
    return repr(str(config)) if isinstance(config, (str, Path)) else type(config).__name__ if config else "None"


def _kwargs(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in overrides.items())
