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

from ..names import atomic_write, printable


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


def plot_text(text: object) -> str:
    """A name (run, model, architecture, class) as figure text, shown as written: every `$` escaped, so
    matplotlib's mathtext never parses it (`$\\frac{` would break the drawing), control characters escaped,
    and a leading `_` (which a legend hides) kept visible behind a zero-width space."""
    text = printable(text).replace("$", r"\$")
    return "\u200b" + text if text.startswith("_") else text


def new_figure(title: str, xlabel: str, ylabel: str, size=(7.0, 4.5)) -> tuple[Figure, Axes]:
    """A figure with one axes; `title` may hold names (shown literally, `plot_text`)."""
    fig, ax = subplots(figsize=size)
    ax.set_title(plot_text(title))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def save(figures: dict[str, Figure], out: str | Path, formats=("png", "svg")) -> list[Path]:
    """Write each figure as <out>/<stem>.<fmt>, each file whole or not at all."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, fig in figures.items():
        for fmt in formats:
            buf = io.BytesIO()
            fig.savefig(buf, format=fmt, dpi=120)
            written.append(atomic_write(out / f"{slug(stem)}.{fmt}", buf.getvalue()))
    return written
