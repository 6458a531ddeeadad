"""Bar charts of run properties (the TowerViT-vs-staged notebook shows parameter counts side by side)."""
from __future__ import annotations

from matplotlib.figure import Figure

from ..experiments.runs import Run
from .common import new_figure, plot_text


def params_figure(runs: list[Run]) -> Figure | None:
    """Parameter count per run, one bar each, labelled with the value."""
    sized = [r for r in runs if r.params]
    if not sized:
        return None
    fig, ax = new_figure("parameters per model", "", "parameters (M)", size=(max(5.0, 1.2 * len(sized)), 4.5))
    names = [plot_text(r.path.name if sum(x.label == r.label for x in sized) > 1 else r.model) for r in sized]
    bars = ax.bar(range(len(sized)), [r.params / 1e6 for r in sized])
    ax.bar_label(bars, labels=[f"{r.params / 1e6:.2f}M" for r in sized], fontsize=8)
    ax.set_xticks(range(len(sized)), names, rotation=30, ha="right", fontsize=8)
    return fig
