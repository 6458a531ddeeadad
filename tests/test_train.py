"""The trainer: run directory anatomy, accuracy on digits, exact resume after SIGKILL, atomic checkpoints."""
import json
import os
import signal
import subprocess
import sys
import time
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


def _train_cmd(out, epochs, extra=()):
    return [sys.executable, "-m", "vitlab", "train", "--output", str(out), "--savefile", "r", "--epochs", str(epochs),
            *QUICK, "data.augment=basic", "model.drop_path_rate=0.1", "model.drop_rate=0.1", "train.ema=true",
            *extra]


def test_sigkill_then_reload_equals_uninterrupted_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    full = subprocess.run(_train_cmd(tmp_path / "a", 5), env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen(_train_cmd(tmp_path / "b", 5), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = tmp_path / "b" / "vitlab" / "r" / "checkpoints" / "last" / "trainer_state.pt"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # somewhere in epoch 2 or 3, possibly mid-write
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = subprocess.run(_train_cmd(tmp_path / "b", 5, ["--reload"]), env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in (tmp_path / "b" / "vitlab" / "r" / "train.log").read_text()
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "a" / "vitlab" / "r" / "checkpoints" / "last" / name)
        b = load_file(tmp_path / "b" / "vitlab" / "r" / "checkpoints" / "last" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ra, rb = (json.loads((tmp_path / d / "vitlab" / "r" / "results.json").read_text()) for d in "ab")
    assert ra["test_loss"] == rb["test_loss"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "vitlab" / "r" / "metrics.jsonl").read_text()
             .splitlines() if '"train_batch"' in line]
    assert steps == sorted(set(steps)), "replayed batches must not be logged twice"


def test_existing_run_needs_reload(trained_run):
    run_dir, _ = trained_run
    cfg = load_config(run_dir / "config.yaml")
    with pytest.raises(VitlabError, match="already holds a run; pass --reload"):
        train(cfg)


def test_checkpoint_swap_survives_a_crash(tmp_path, monkeypatch):
    import vitlab
    model = vitlab.create_model("vit_micro_patch2_8", depth=1)
    path = tmp_path / "last"
    ckpt.save_checkpoint(path, model, ckpt.model_metadata(model, "a: 1\n"), {"epoch": 1})
    with torch.no_grad():
        model.head.bias.add_(1.0)
    real_replace = os.replace
    calls = []

    def crash_on_second(src, dst):  # dies after `last` was moved aside, before the new one is in place
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(path, model, ckpt.model_metadata(model, "a: 1\n"), {"epoch": 2})
    monkeypatch.setattr(os, "replace", real_replace)
    survivor = ckpt.existing(path)
    assert survivor == tmp_path / "last.old"
    assert ckpt.load_trainer_state(survivor)["epoch"] == 1
    assert ckpt.resolve_checkpoint(tmp_path / "last") == survivor / "model.safetensors"
    assert not list(tmp_path.glob(".last.tmp-*")), "temporary directories are cleaned up"


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


def test_load_checkpoint_rebuilds_model(trained_run):
    run_dir, results = trained_run
    model, cfg, extra = load_checkpoint(run_dir)
    assert model.vitlab_name == "vit_micro_patch2_8" and cfg.train.epochs == 6
    assert extra["dataset_info"]["name"] == "digits"


def test_results_describe_cost_and_architecture(trained_run):
    from vitlab.stats import forward_gflops

    run_dir, results = trained_run
    assert results["architecture"] == "vit" and results["family"] == "vit"
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
