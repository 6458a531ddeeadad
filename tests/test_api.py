"""The Python API (vitlab.api): `vitlab.train(config, **overrides)` and `vitlab.compare([...])` return run
objects with results, metrics as records and DataFrames, and figures; the notebook built on it
(examples/tower_vs_staged.ipynb) is executed by a slow test."""
import os

import pytest
import yaml
from matplotlib.figure import Figure

import vitlab
from conftest import MNIST_DIR, ROOT
from vitlab.api import TrainedRun

pd = pytest.importorskip("pandas")
QUIET = {"progress": "none", "tensorboard": False}


def test_train_returns_the_run_with_metrics_and_figures(tmp_path):
    run = vitlab.train(None, data={"dataset": "digits", "augment": "none"}, epochs=3, lr=3e-3,
                       model__name="vit_micro_patch2_8",
                       **{"model.depth": 1, "train.batch_size": 64}, output={"dir": str(tmp_path), **QUIET})
    assert isinstance(run, TrainedRun) and run.path.parent.parent == tmp_path
    assert run.results["test_top1"] > 0.3 and run.results["epochs"] == 3
    batches = run.frame()
    assert list(batches.columns[:4]) == ["kind", "epoch", "batch", "step"] and len(batches) == len(run.batches) > 0
    assert list(run.frame("epoch")["epoch"]) == [1, 2, 3]
    figures = run.figures()
    assert {"accuracy_per_epoch", "train_vs_val_loss"} <= set(figures)
    assert all(isinstance(f, Figure) for f in figures.values())
    assert figures["accuracy_per_epoch"]._repr_png_().startswith(b"\x89PNG")  # what a notebook shows inline
    assert "test_top1" in run._repr_html_() and (run.checkpoint / "model.safetensors").is_file()
    assert "command: vitlab.train(None, " in (run.path / "train.log").read_text()


def test_keyword_overrides_name_one_key_or_say_which():
    from vitlab.api import _pairs
    assert _pairs({"epochs": 3, "optim__lr": 0.1, "data": {"dataset": "mnist"}, "model.depth": 2}) == [
        ("train.epochs", 3), ("optim.lr", 0.1), ("data.dataset", "mnist"), ("model.depth", 2)]
    with pytest.raises(vitlab.VitlabError, match="model and optim"):
        _pairs({"name": "adamw"})


def test_vitlab_train_is_callable_and_still_the_training_package():
    assert callable(vitlab.train) and vitlab.train.Trainer.__name__ == "Trainer"
    assert callable(vitlab.train.train)


def test_compare_returns_a_table_and_every_runs_records(tmp_path):
    configs = []
    for name in ("vit_micro_patch2_8", "diff_vit_micro_patch2_8"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"model": {"name": name, "depth": 1}, "data": {"dataset": "digits",
                                        "num_workers": 0}, "train": {"batch_size": 64}, "output": QUIET}))
        configs.append(path)
    comparison = vitlab.compare(configs, epochs=1, output=tmp_path / "cmp", optim__lr=3e-3)
    table = comparison.table()
    assert list(table["model"]) == ["vit_micro_patch2_8", "diff_vit_micro_patch2_8"]
    assert table["test_top1"].between(0, 1).all() and (table["params"] > 0).all()
    assert set(comparison.frame()["run"]) == {"vit_micro_patch2_8", "diff_vit_micro_patch2_8"}
    assert all(r.config["optim"]["lr"] == 3e-3 for r in comparison.runs)


@pytest.mark.slow
@pytest.mark.skipif(not (MNIST_DIR / "MNIST" / "raw").is_dir(), reason="needs ../shared/data/MNIST")
def test_example_notebook_executes(tmp_path, monkeypatch):
    """examples/tower_vs_staged.ipynb end to end in a real Jupyter kernel: no error, the table renders as
    HTML and the figures as inline PNGs."""
    nbclient, nbformat = pytest.importorskip("nbclient"), pytest.importorskip("nbformat")
    monkeypatch.setenv("VITLAB_OUTPUT", str(tmp_path))
    monkeypatch.setenv("VITLAB_DATA", str(MNIST_DIR))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    notebook = nbformat.read(ROOT / "examples" / "tower_vs_staged.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "examples")}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("test_top1" in h and "tower_vit_patch7_28" in h for h in html)
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2
    assert sorted(p.name for p in (tmp_path / "notebook_tower_vs_staged").iterdir() if p.is_dir()) == \
        ["staged_mnist", "tower_mnist"]
