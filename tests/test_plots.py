"""Every figure of `vitlab plot`, built from fabricated run directories (and one real checkpoint), checked
for what it draws and for a non-blank image file."""
import math

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from test_experiments import fake_run, family  # noqa: F401  (fixture)
from vitlab.experiments import find_runs
from vitlab.plots import (accuracy_figure, all_run_figures, fit_power_law, loss_figures, overlay_figure,
                          params_figure, save, scaling_figures)
from vitlab.plots.predictions import confusion_figure, prediction_figures, sample_grid_figure


def test_figures_stay_outside_pyplot(family):  # noqa: F811
    """No figure is registered with pyplot: nothing accumulates over a sweep, and a notebook shows a figure
    only where it is returned."""
    import matplotlib.pyplot as plt
    before = plt.get_fignums()
    figures = all_run_figures(find_runs([family]))
    assert figures and plt.get_fignums() == before


def assert_drawn(path, min_bytes=5_000):
    assert path.is_file() and path.stat().st_size > min_bytes
    pixels = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert pixels.std() > 5, f"{path.name} looks blank"


def test_loss_per_batch_one_figure_per_architecture_one_curve_per_size(family):  # noqa: F811
    runs = find_runs([family])
    train = loss_figures(runs, "train_batch")
    assert set(train) == {"train_loss_vit", "train_loss_diff_vit"}
    ax = train["train_loss_vit"].axes[0]
    assert len(ax.lines) == 3 and ax.get_title() == "vit: training loss per batch"
    assert [line.get_label() for line in ax.lines] == [f"vit_micro_patch7_28 ({p:.2f}M)" for p in (0.1, 0.2, 0.4)]
    assert len(ax.lines[0].get_xdata()) == 30 and ax.get_xlabel().startswith("batch")
    val = loss_figures(runs, "val_batch")
    assert set(val) == {"val_loss_vit", "val_loss_diff_vit"} and len(val["val_loss_vit"].axes[0].lines) == 3
    assert len(val["val_loss_vit"].axes[0].lines[0].get_xdata()) == 6


def test_validation_curves_skip_runs_without_them(tmp_path):
    fake_run(tmp_path / "a", val_batches=False)
    assert loss_figures(find_runs([tmp_path]), "val_batch") == {}


def test_power_law_fit_recovers_exponent():
    params = [1e5, 3e5, 1e6, 3e6]
    c, alpha = fit_power_law(params, [1 - 4.0 * n ** -0.25 for n in params])
    assert alpha == pytest.approx(0.25, abs=1e-9) and c == pytest.approx(4.0, rel=1e-9)
    assert fit_power_law([1e5, 1e5], [0.9, 0.8]) is None  # one size: nothing to fit


def test_scaling_figures_log_axis_fit_in_legend(family):  # noqa: F811
    figs = scaling_figures(find_runs([family]))
    assert set(figs) == {"scaling_vit", "scaling_diff_vit", "scaling_all"}
    ax = figs["scaling_vit"].axes[0]
    assert ax.get_xscale() == "log" and len(ax.collections) == 1 and len(ax.lines) == 1
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[1] == "vit fit: error = 2 N^-0.300"
    both = figs["scaling_all"].axes[0]
    assert len(both.collections) == 2 and len(both.lines) == 2


def test_no_scaling_law_from_one_size(tmp_path):
    fake_run(tmp_path / "a", params=1000, acc=0.9)
    fake_run(tmp_path / "b", params=1000, acc=0.8)
    fake_run(tmp_path / "c", arch="rev_vit", params=2000)
    assert scaling_figures(find_runs([tmp_path])) == {}


def test_comparison_figures(family):  # noqa: F811
    runs = find_runs([family])
    acc = accuracy_figure(runs).axes[0]
    assert len(acc.lines) == 6 and list(acc.lines[0].get_xdata()) == [1, 2, 3]
    overlay = overlay_figure(runs)
    panels = [ax for ax in overlay.axes if ax.get_visible()]
    assert len(panels) == 6 and all(len(ax.lines) == 2 for ax in panels)
    train_mean = panels[0].lines[0].get_ydata()
    assert not any(math.isnan(v) for v in train_mean)
    bars = params_figure(runs).axes[0]
    assert len(bars.patches) == 6 and sorted(p.get_height() for p in bars.patches)[-1] == pytest.approx(0.4)


def test_plot_command_writes_png_and_svg(family, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "plots"
    code, stdout, _ = run_cli(["plot", family, "--out", out], capsys)
    assert code == 0 and "10 figures (20 files)" in stdout
    for stem in ("train_loss_vit", "val_loss_diff_vit", "scaling_all", "accuracy_per_epoch", "train_vs_val_loss",
                 "parameters"):
        assert_drawn(out / f"{stem}.png")
        assert (out / f"{stem}.svg").read_text().lstrip().startswith("<?xml")
    assert len(all_run_figures(find_runs([family]))) == 10


def test_prediction_grid_and_confusion_matrix(trained_run, tmp_path):
    run_dir, results = trained_run
    figs = prediction_figures(run_dir)
    stem = run_dir.name
    grid, confusion = figs[f"predictions_{stem}"], figs[f"confusion_{stem}"]
    shown = [ax for ax in grid.axes if ax.images]
    assert len(shown) == 16
    titles = [ax.get_title() for ax in shown]
    assert all(" / " in t for t in titles)
    ax = confusion.axes[0]
    matrix = ax.images[0].get_array()
    assert matrix.shape == (10, 10) and np.allclose(matrix.sum(axis=1), 1)
    assert f"{100 * results['test_top1']:.2f}%" in ax.get_title()  # the same test set as results.json
    for path in save(figs, tmp_path):
        if path.suffix == ".png":
            assert_drawn(path)


def test_sample_grid_marks_mistakes_red():
    import torch
    images = torch.rand(4, 1, 8, 8)
    fig = sample_grid_figure(images, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 3]), list("abcd"), "m")
    colors = [ax.title.get_color() for ax in fig.axes if ax.images]
    assert colors == ["black", "black", "red", "black"]
    conf = confusion_figure(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 3]), list("abcd"), "m")
    assert conf.axes[0].images[0].get_array()[2, 0] == 1.0 and "75.00%" in conf.axes[0].get_title()
