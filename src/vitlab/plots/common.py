"""Shared figure plumbing: one style, PNG + SVG output.

Figures are built as plain `matplotlib.figure.Figure` objects, never registered with pyplot: they need no
display backend (CPU boxes, SLURM nodes), a long sweep never accumulates open figures, and in a notebook a
figure shows inline exactly where it is returned or displayed."""
from __future__ import annotations

import io
import re
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure


class InlineFigure(Figure):
    """A Figure that a notebook shows as a PNG where it is a cell's value (no pyplot backend needed)."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=100)
        return buf.getvalue()


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], squeeze: bool = True):
    """(figure, axes) as pyplot.subplots makes them, with a constrained layout, outside pyplot."""
    fig = InlineFigure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def new_figure(title: str, xlabel: str, ylabel: str, size=(7.0, 4.5)) -> tuple[Figure, Axes]:
    fig, ax = subplots(figsize=size)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def save(figures: dict[str, Figure], out: str | Path, formats=("png", "svg")) -> list[Path]:
    """Write each figure as <out>/<stem>.<fmt>."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, fig in figures.items():
        for fmt in formats:
            path = out / f"{slug(stem)}.{fmt}"
            fig.savefig(path, dpi=120)
            written.append(path)
    return written
