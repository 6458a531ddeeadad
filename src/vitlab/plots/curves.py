"""Curves over training: loss per batch by architecture (as the classic-vs-differential study plots it),
accuracy per epoch and train-vs-validation loss (as the TowerViT-vs-staged notebook does)."""
from __future__ import annotations

from collections import defaultdict

from matplotlib.figure import Figure

from ..experiments.runs import Run
from .common import new_figure, plot_text, subplots

KIND_TITLE = {"train_batch": "training loss per batch", "val_batch": "validation loss per batch"}


def by_architecture(runs: list[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        groups[r.architecture].append(r)
    return {k: sorted(v, key=lambda r: r.params or 0) for k, v in sorted(groups.items())}


def loss_figures(runs: list[Run], kind: str = "train_batch") -> dict[str, Figure]:
    """One figure per architecture, one curve per run (model size), x = optimizer step, y = cross-entropy.
    Runs without `kind` records (validation per batch needs train.val_every_n_batches) are left out."""
    figures = {}
    for arch, group in by_architecture(runs).items():
        series = [(r, r.series(kind, "step", "loss")) for r in group]
        series = [(r, recs) for r, recs in series if recs]
        if not series:
            continue
        fig, ax = new_figure(f"{arch}: {KIND_TITLE[kind]}", "batch (optimizer step)", "cross-entropy loss")
        for r, recs in series:
            ax.plot([x["step"] for x in recs], [x["loss"] for x in recs], label=_name(r, group), linewidth=0.8)
        ax.legend()
        figures[f"{kind.split('_')[0]}_loss_{arch}"] = fig
    return figures


def accuracy_figure(runs: list[Run]) -> Figure | None:
    """Validation top-1 after each epoch, one line per run."""
    series = [(r, r.series("epoch", "epoch", "val_top1")) for r in runs]
    series = [(r, recs) for r, recs in series if recs]
    if not series:
        return None
    fig, ax = new_figure("validation accuracy per epoch", "epoch", "top-1 accuracy (%)")
    for r, recs in series:
        ax.plot([x["epoch"] for x in recs], [100 * x["val_top1"] for x in recs], marker="o", markersize=3,
                label=_name(r, runs))
    ax.legend()
    return fig


def overlay_figure(runs: list[Run]) -> Figure | None:
    """Per run, mean training loss of each epoch against the validation loss after it (overfitting shows as
    the two curves parting): one panel per run, two lines each."""
    series = [(r, r.series("epoch", "epoch", "val_loss"), r.series("train_batch", "epoch", "loss")) for r in runs]
    series = [s for s in series if s[1]]
    if not series:
        return None
    cols = min(len(series), 3)
    rows = -(-len(series) // cols)
    fig, axes = subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    fig.suptitle("training vs validation loss per epoch")
    for ax, (r, epochs, batches) in zip(axes.flat, series):
        train = defaultdict(list)
        for b in batches:
            train[b["epoch"]].append(b["loss"])
        xs = [e["epoch"] for e in epochs]
        ax.plot(xs, [sum(train[x]) / len(train[x]) if train[x] else float("nan") for x in xs], label="train")
        ax.plot(xs, [e["val_loss"] for e in epochs], label="validation")
        ax.set_title(_name(r, runs), fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("cross-entropy loss")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(series):]:
        ax.set_visible(False)
    return fig


def _name(run: Run, runs: list[Run]) -> str:
    """The model's label (name and size), led by the run folder's name where several runs share it."""
    same = sum(r.label == run.label for r in runs) > 1
    return plot_text(f"{run.path.name}: {run.label}" if same else run.label)
