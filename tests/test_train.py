"""The trainer: run directory anatomy, accuracy on digits, atomic checkpoints (kill-and-resume and crashes inside a
save: test_reliability.py)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICK, ROOT
from vitlab.config import load_config
from vitlab.errors import VitlabError
from vitlab.train import checkpoint as ckpt
from vitlab.train import load_checkpoint, train
from vitlab.train.optim import lr_factor


def test_run_directory_anatomy(trained_run):
    run_dir, results = trained_run
    for name in ("config.yaml", "metrics.jsonl", "train.log", "results.json"):
        assert (run_dir / name).is_file(), name
    assert load_config(run_dir / "config.yaml").train.epochs == 6
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for key in ("test_top1", "test_top5", "test_loss", "params", "epochs", "train_seconds", "images_per_second"):
        assert key in saved
    assert 0 <= saved["test_top1"] <= saved["test_top5"] <= 1 and saved["epochs"] == 6
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    batches = [r for r in records if r["kind"] == "train_batch"]
    assert len(batches) == 6 * 21 and [r["step"] for r in batches] == list(range(1, 127))  # every batch
    assert len([r for r in records if r["kind"] == "epoch"]) == 6
    assert len([r for r in records if r["kind"] == "val_batch"]) == 6 * 4  # every 5th batch
    assert "epoch 6 batch 21 step 126 loss" in (run_dir / "train.log").read_text()
    for kind in ("last", "best"):
        d = run_dir / "checkpoints" / kind
        meta = ckpt.read_metadata(d / "model.safetensors")
        assert meta["model_name"] == "vit_micro_patch2_8" and json.loads(meta["model_args"])["depth"] == 2
        assert "task_name: vitlab" in meta["config"]
        state = torch.load(d / "trainer_state.pt", weights_only=True)
        assert {"optimizer", "scheduler", "scaler", "rng", "epoch", "step", "config"} <= set(state)
    assert ckpt.load_trainer_state(run_dir / "checkpoints" / "last")["epoch"] == 6


def test_tensorboard_and_digits_accuracy(tmp_path):
    """The quickstart recipe, shortened, still clears 90% on the held-out digits."""
    cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                      [f"output.dir={tmp_path}", "train.epochs=30", "output.progress=none"])
    results = train(cfg)
    assert results["test_top1"] >= 0.90, results
    assert list((cfg.run_dir / "tb").glob("events.out.tfevents.*"))


def test_existing_run_needs_reload(trained_run):
    run_dir, _ = trained_run
    cfg = load_config(run_dir / "config.yaml")
    with pytest.raises(VitlabError, match="already holds a run; pass --reload"):
        train(cfg)


def test_warmup_then_cosine():
    assert lr_factor(0, 100, 10, "cosine", 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(50, 100, 10, "constant", 0.0) == 1.0


def test_gradient_accumulation_matches_large_batch(tmp_path):
    """2 x 32 with accumulation == 1 x 64 (same data order, no dropout, no augmentation): same weights."""
    def run(name, bs, accum):
        cfg = load_config(None, QUICK + [f"output.dir={tmp_path}", f"output.savefile={name}", "train.epochs=1",
                                         f"train.batch_size={bs}", f"train.accum_steps={accum}",
                                         "optim.name=sgd", "optim.momentum=0"])
        train(cfg)
        return load_file(cfg.run_dir / "checkpoints" / "last" / "model.safetensors")
    # SGD without momentum: one step is linear in the mean gradient, so the two must agree to float precision.
    a, b = run("big", 64, 1), run("accum", 32, 2)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    # a micro-batch's record carries the optimizer step it counts towards: the two of a step share it, and the
    # epoch's record ends on the same step
    records = [json.loads(line) for line in (tmp_path / "vitlab" / "accum" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train_batch"]
    assert steps == [1 + i // 2 for i in range(len(steps))]
    assert [r["step"] for r in records if r["kind"] == "epoch"] == [steps[-1]]


def test_load_checkpoint_rebuilds_model(trained_run):
    run_dir, results = trained_run
    model, cfg, extra = load_checkpoint(run_dir)
    assert model.vitlab_name == "vit_micro_patch2_8" and cfg.train.epochs == 6
    assert extra["dataset_info"]["name"] == "digits"


def test_results_describe_cost_and_architecture(trained_run):
    from vitlab.stats import forward_gflops

    run_dir, results = trained_run
    assert results["architecture"] == "vit" and "family" not in results  # one name for what a model is
    assert results["gflops"] == pytest.approx(forward_gflops(load_checkpoint(run_dir)[0])) and results["gflops"] > 0
    assert results["peak_memory_mb"] > results["train_memory_mb"] >= 0


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux peak-RSS reset")
def test_memory_meter_measures_its_own_stretch():
    from vitlab.stats import MemoryMeter

    meter = MemoryMeter(torch.device("cpu")).start()
    big = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, touched
    del big
    first = meter.read()
    assert first["peak_memory_kind"] == "process_peak_rss" and first["train_memory_mb"] >= 60
    assert meter.start().read()["train_memory_mb"] < 30  # the earlier peak is forgotten
