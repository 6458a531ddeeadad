"""`vitlab collect`: one table of many runs, as Markdown and CSV.

Columns: the run, the config keys whose values differ between the runs (the sweep's axes, found rather than
declared), then results: test top-1 / top-5, parameters, GFLOPs, training img/s, peak memory during training
and the part of it that training added (see stats.MemoryMeter), epochs.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from ..names import csv_cell, printable
from .runs import Run

# Keys that always differ between runs without describing them.
IGNORED = {"output.savefile", "output.dir", "output.progress", "output.tensorboard", "output.upload", "output.loggers",
           "output.wandb_project", "output.mlflow_tracking_uri"}
RESULT_COLUMNS = [  # (header, results.json key, format)
    ("top-1 %", "test_top1", lambda v: f"{100 * v:.2f}"),
    ("top-5 %", "test_top5", lambda v: f"{100 * v:.2f}"),
    ("params (M)", "params", lambda v: f"{v / 1e6:.2f}"),
    ("GFLOPs", "gflops", lambda v: f"{v:.3f}"),
    ("img/s", "images_per_second", lambda v: f"{v:,.0f}"),
    ("peak mem (MiB)", "peak_memory_mb", lambda v: f"{v:,.0f}"),
    ("train mem (MiB)", "train_memory_mb", lambda v: f"{v:,.0f}"),
    ("epochs", "epochs", str),
]


def varying_keys(runs: list[Run]) -> list[str]:
    """Config keys (dotted) whose values are not the same in every run; model.name first. A key missing from
    a run written before that key existed counts as its default, which is what that run used."""
    from ..config import Config
    from .runs import flatten

    defaults = flatten(Config().to_dict())
    keys = sorted({k for r in runs for k in r.flat_config} - IGNORED)
    varying = [k for k in keys if len({repr(r.flat_config.get(k, defaults.get(k))) for r in runs}) > 1]
    return sorted(varying, key=lambda k: (k != "model.name", k))


def _common_root(runs: list[Run]) -> Path:
    return Path(os.path.commonpath([str(r.path.resolve()) for r in runs])) if len(runs) > 1 else \
        runs[0].path.resolve().parent


def table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of display strings; unfinished runs show their status and blank results."""
    root, keys = _common_root(runs), varying_keys(runs)
    header = ["run", *keys, "status", *(h for h, _, _ in RESULT_COLUMNS)]
    rows = []
    for r in runs:
        res = r.results or {}
        status = "done" if r.finished else f"unfinished ({len(r.records('epoch'))} epochs)"
        cells = result_cells(res, [key for _, key, _ in RESULT_COLUMNS])
        rows.append([str(r.path.resolve().relative_to(root)),
                     *(_fmt(r.flat_config.get(k), str) for k in keys), status, *cells])
    # names and values come from run directories: one line each on a terminal or in a log
    return [printable(h) for h in header], [[printable(c) for c in row] for row in rows]


def _fmt(value: Any, fmt) -> str:
    return "" if value is None else fmt(value)


def result_cells(results: dict[str, Any] | None, keys: list[str]) -> list[str]:
    """Display strings of the given results.json keys, formatted as in the collect table."""
    fmts = {key: fmt for _, key, fmt in RESULT_COLUMNS}
    return [_fmt((results or {}).get(k), fmts[k]) for k in keys]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    numeric = [all(is_number(row[i]) for row in rows if row[i]) for i in range(len(header))]
    def line(cells: list[str]) -> str:  # a `|` in a name would split its cell
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    lines = [line(header), "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += [line(row) for row in rows]
    return "\n".join(lines)


def is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def to_csv(runs: list[Run]) -> str:
    """Machine-readable twin of the table: raw values, full precision, every results.json key we show."""
    keys = varying_keys(runs)
    root = _common_root(runs)
    result_keys = [key for _, key, _ in RESULT_COLUMNS] + ["test_loss", "train_seconds", "peak_memory_kind"]
    rows = [[str(r.path.resolve().relative_to(root)), *(r.flat_config.get(k) for k in keys), r.finished,
             *((r.results or {}).get(k) for k in result_keys)] for r in runs]
    return csv_text(["run", *keys, "finished", *result_keys], rows)


def csv_text(header: list[str], rows: list[list[Any]]) -> str:
    """CSV of `rows` under `header`; text cells a spreadsheet would run as a formula are made text
    (`vitlab.names.csv_cell`)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([csv_cell(h) for h in header])
    writer.writerows([csv_cell(c) for c in row] for row in rows)
    return out.getvalue()
