"""Scaling laws, as the classic-vs-differential study plots them: test accuracy against parameter count per
architecture, with the power law
err(N) = c N^(-alpha) fitted to the test error by least squares in log-log space (Kaplan et al. 2020 form)."""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from ..experiments.runs import Run
from .common import new_figure, plot_text
from .curves import by_architecture


def fit_power_law(params: list[float], accuracy: list[float]) -> tuple[float, float] | None:
    """(c, alpha) with 1 - accuracy ~= c N^-alpha; None with fewer than two distinct sizes."""
    n, err = np.asarray(params, float), 1.0 - np.asarray(accuracy, float)
    ok = err > 0
    if len(set(n[ok])) < 2:
        return None
    slope, intercept = np.polyfit(np.log(n[ok]), np.log(err[ok]), 1)
    return float(np.exp(intercept)), float(-slope)


def _series(group: list[Run]):
    done = [r for r in group if r.finished and r.params and r.results.get("test_top1") is not None]
    return [r.params for r in done], [r.results["test_top1"] for r in done]


def scaling_figures(runs: list[Run]) -> dict[str, Figure]:
    """One figure per architecture with two or more sizes (the classic-vs-differential study's two plots), and
    one with all of them
    together when there are several."""
    groups = {a: _series(g) for a, g in by_architecture(runs).items()}
    groups = {a: s for a, s in groups.items() if len(set(s[0])) >= 2}  # one size is not a scaling law
    figures = {}
    for arch, series in groups.items():
        fig, ax = new_figure(f"{arch}: scaling law", "parameters (log scale)", "test accuracy (%)")
        _draw(ax, arch, *series)
        figures[f"scaling_{arch}"] = fig
    if len(groups) > 1:
        fig, ax = new_figure("scaling laws", "parameters (log scale)", "test accuracy (%)")
        for arch, series in groups.items():
            _draw(ax, arch, *series)
        figures["scaling_all"] = fig
    return figures


def _draw(ax, arch: str, params: list[float], acc: list[float]) -> None:
    arch = plot_text(arch)
    points = ax.scatter(params, [100 * a for a in acc], label=f"{arch} runs", zorder=3)
    ax.set_xscale("log")
    fit = fit_power_law(params, acc)
    if fit is not None:
        c, alpha = fit
        xs = np.geomspace(min(params) / 1.5, max(params) * 1.5, 50)
        ax.plot(xs, 100 * (1 - c * xs ** -alpha), color=points.get_facecolor()[0], linestyle="--",
                label=f"{arch} fit: error = {c:.3g} N^-{alpha:.3f}")
    ax.legend()
