"""Figures from run directories (and, for predictions, a checkpoint). Each `*_figures` / `*_figure`
function returns matplotlib Figures keyed by file stem; `save` writes them as PNG and SVG."""
from .curves import accuracy_figure, loss_figures, overlay_figure
from .common import save
from .scaling import fit_power_law, scaling_figures
from .summary import params_figure

__all__ = ["accuracy_figure", "fit_power_law", "loss_figures", "overlay_figure", "params_figure",
           "save", "scaling_figures", "all_run_figures"]


def all_run_figures(runs) -> dict:
    """Every figure that run directories alone give: (a) training and (b) validation loss per batch per
    architecture, (c) scaling laws, (d) accuracy per epoch, train-vs-val loss, parameter counts."""
    figures = {}
    figures.update(loss_figures(runs, "train_batch"))
    figures.update(loss_figures(runs, "val_batch"))
    figures.update(scaling_figures(runs))
    for name, builder in (("accuracy_per_epoch", accuracy_figure), ("train_vs_val_loss", overlay_figure),
                          ("parameters", params_figure)):
        fig = builder(runs)
        if fig is not None:
            figures[name] = fig
    return figures
