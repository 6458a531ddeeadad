"""Shared figure plumbing: a headless backend, one style, PNG + SVG output."""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed (CPU boxes, SLURM nodes)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def new_figure(title: str, xlabel: str, ylabel: str, size=(7.0, 4.5)) -> tuple[Figure, "plt.Axes"]:
    fig, ax = plt.subplots(figsize=size, layout="constrained")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def save(figures: dict[str, Figure], out: str | Path, formats=("png", "svg")) -> list[Path]:
    """Write each figure as <out>/<stem>.<fmt>; figures are closed afterwards."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, fig in figures.items():
        for fmt in formats:
            path = out / f"{slug(stem)}.{fmt}"
            fig.savefig(path, dpi=120)
            written.append(path)
        plt.close(fig)
    return written
