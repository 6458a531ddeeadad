"""`vitlab compare CONFIG...`: several models on the same data and budget, one table (the small-dataset ViT project's
README table: model, accuracy, epochs, parameters, peak memory, img/s). Each config trains in its own run directory
<output>/<config name> (finished runs are collected, not retrained), through the sweep's local launcher."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import read_yaml
from ..errors import VitlabError
from ..names import atomic_write, safe_name
from ..presets import config_file
from ..resolve import build
from .collect import csv_text, markdown, result_cells
from .runs import Run, load_run
from .sweep import Point, Sweep, run_local

COLUMNS = [("model", None), ("top-1 %", "test_top1"), ("epochs", "epochs"), ("params (M)", "params"),
           ("peak mem (MiB)", "peak_memory_mb"), ("train mem (MiB)", "train_memory_mb"), ("img/s", "images_per_second")]


def comparison(configs: list[str], epochs: int | None, overrides: dict[str, Any] | None = None) -> Sweep:
    """Every config as a point of one sweep, with the same epoch budget and `overrides` ({key: value})."""
    fixed = {**(overrides or {}), **({"train.epochs": epochs} if epochs else {})}
    points, datasets = [], {}
    for c in configs:
        path = config_file(c)  # a file, or a preset's name
        cfg = build(read_yaml(path), list(fixed.items()))
        datasets[path.name] = cfg.data.dataset
        points.append(Point(safe_name(path.stem, f"config '{c}': its file name names its run, and",
                                      "vit_small"), {}, base=path))
    if len(set(datasets.values())) > 1:
        raise VitlabError("compare trains every model on the same data, but the configs name "
                          + ", ".join(f"{k}: {v}" for k, v in datasets.items()) + "; pass configs of one dataset")
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise VitlabError(f"two configs share a file name ({', '.join(sorted(n for n in names if names.count(n) > 1))}"
                          f"); their runs would share a directory, rename one")
    return Sweep("compare", points[0].base, fixed, points)


def run_comparison(configs: list[str], epochs: int | None, root: Path,
                   overrides: dict[str, Any] | None = None) -> list[Run]:
    sweep = comparison(configs, epochs, overrides)
    run_local(sweep, root)
    return [load_run(root / p.name) for p in sweep.points]


def comparison_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    keys = [k for _, k in COLUMNS[1:]]
    return [h for h, _ in COLUMNS], [[r.model, *result_cells(r.results, keys)] for r in runs]


def comparison_outputs(runs: list[Run], root: Path) -> str:
    """Write compare.md and compare.csv into `root`; return the Markdown."""
    header, rows = comparison_table(runs)
    md = markdown(header, rows)
    atomic_write(root / "compare.md", md + "\n")
    rows = [[r.model, r.path.name, *((r.results or {}).get(k) for _, k in COLUMNS[1:])] for r in runs]
    atomic_write(root / "compare.csv", csv_text(["model", "config", *(k for _, k in COLUMNS[1:])], rows))
    return md
