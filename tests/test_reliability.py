"""Reliability: non-finite losses, bad inputs as one line, damaged checkpoints, one writer per run (issue 16)."""
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICK, run_cli
from vitlab.config import load_config
from vitlab.errors import TrainingDiverged, VitlabError
from vitlab.train import train
from vitlab.train.trainer import Trainer


def quick(tmp_path, *extra):
    return load_config(None, QUICK + [f"output.dir={tmp_path}", "train.log_every=5", *extra])


def poison_from(trainer, step, only_one=False):
    """Make the model's output NaN from optimizer step `step` (or at that step only): a divergence on cue."""
    state = {"on": False}
    set_progress = trainer.model.set_progress

    def watch(current, total):
        state["on"] = current == step if only_one else current >= step
        set_progress(current, total)

    trainer.model.set_progress = watch
    trainer.model.register_forward_hook(lambda m, i, out: out * math.nan if state["on"] else None)


def finite(path):
    return all(torch.isfinite(t).all() for t in load_file(path).values())


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", ".nan"])
def test_non_finite_numbers_are_rejected_for_every_float_key(value):
    for key in ("optim.lr", "optim.weight_decay", "data.mixup", "model.drop_rate"):
        with pytest.raises(VitlabError, match="finite"):
            cfg = load_config(None, [f"{key}={value}"])
            if key.startswith("model."):
                from vitlab.resolve import resolve_config
                resolve_config(cfg)


@pytest.mark.parametrize("override, words", [
    ("optim.weight_decay=-1", "optim.weight_decay"), ("output.savefile=", "savefile"),
    ("output.savefile=a/b", "savefile"), ("data.mixup=-1", "data.mixup"), ("optim.betas=[2,3]", "betas"),
    ("data.img_size=-8", "data.img_size"), ("optim.label_smoothing=1.5", "label_smoothing")])
def test_nonsense_values_are_one_line_and_exit_2(tmp_path, capsys, override, words):
    code, out, err = run_cli(["train", "--output", tmp_path, *QUICK, override], capsys)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing was written


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(quick(tmp_path, "train.epochs=3"))
    steps = trainer.steps_per_epoch
    poison_from(trainer, steps + 3)  # epoch 2 turns to NaN
    with pytest.raises(TrainingDiverged, match=rf"epoch 2, batch 4 \(step {steps + 4}\)"):
        trainer.fit()
    last = trainer.run_dir / "checkpoints" / "last"
    state = torch.load(last / "trainer_state.pt", weights_only=True)
    assert state["epoch"] == 1 and finite(last / "model.safetensors")  # epoch 1's weights, untouched
    assert TrainingDiverged("x").exit_code == 3


def test_a_diverging_cli_run_exits_3_with_one_line(tmp_path, capsys):
    code, out, err = run_cli(["train", "--output", tmp_path, *QUICK, "optim.lr=1e6", "train.epochs=2"], capsys)
    assert code == 3, err
    assert "not finite" in err or "loss is" in err
    assert len(err.strip().splitlines()) == 1
    last = tmp_path / "vitlab" / "run_01" / "checkpoints" / "last"
    assert not last.exists() or finite(last / "model.safetensors")


def test_skip_nonfinite_steps_drops_a_bad_step_and_trains_on(tmp_path):
    trainer = Trainer(quick(tmp_path, "train.epochs=1", "train.skip_nonfinite_steps=2"))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    poison_from(trainer, 2, only_one=True)
    results = trainer.fit()
    assert trainer.skipped_steps == 1 and math.isfinite(results["test_loss"])
    assert finite(trainer.run_dir / "checkpoints" / "last" / "model.safetensors")
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert "skipped step 3" in (trainer.run_dir / "train.log").read_text()


def test_too_many_non_finite_steps_stop_the_run(tmp_path):
    trainer = Trainer(quick(tmp_path, "train.epochs=1", "train.skip_nonfinite_steps=2"))
    poison_from(trainer, 1)
    with pytest.raises(TrainingDiverged, match="3 non-finite steps"):
        trainer.fit()
    assert not (trainer.run_dir / "checkpoints" / "last").exists()


def test_best_only_from_finite_validation_losses(tmp_path, monkeypatch):
    from vitlab.train import trainer as trainer_module
    real = trainer_module.evaluate
    monkeypatch.setattr(trainer_module, "evaluate", lambda *a, **k: {**real(*a, **k), "loss": math.nan})
    trainer = Trainer(quick(tmp_path, "train.epochs=1"))
    trainer.fit()
    assert not (trainer.run_dir / "checkpoints" / "best").exists()
    assert (trainer.run_dir / "checkpoints" / "last").exists()



# -- damaged checkpoints -------------------------------------------------------------------------------------
def two_epoch_run(tmp_path, capsys, name="r"):
    code, _, err = run_cli(["train", "--output", tmp_path, "--savefile", name, *QUICK, "train.epochs=2"], capsys)
    assert code == 0, err
    return tmp_path / "vitlab" / name


def test_reload_falls_back_to_the_newest_intact_checkpoint_with_one_warning(tmp_path, capsys):
    run = two_epoch_run(tmp_path, capsys)
    ckpts = run / "checkpoints"
    (ckpts / "last" / "model.safetensors").write_bytes((ckpts / "last" / "model.safetensors").read_bytes()[:100])
    (ckpts / ".last.tmp-stale").mkdir()  # a kill mid-save left an unfinished temporary
    (ckpts / ".last.tmp-stale" / "model.safetensors").write_bytes(b"partial")
    code, out, err = run_cli(["train", "--output", tmp_path, "--savefile", "r", "--reload", *QUICK,
                              "train.epochs=3"], capsys)
    assert code == 0, err
    log = (run / "train.log").read_text()
    assert "skipped damaged checkpoints: last (model.safetensors does not match its digest" in log
    assert "resuming from best" in log and "resumed from" in log
    assert not (ckpts / ".last.tmp-stale").exists()  # stale temporaries cleaned at start
    assert (ckpts / "last.damaged").is_dir()  # kept for inspection, out of the save path
    state = torch.load(ckpts / "last" / "trainer_state.pt", weights_only=True)
    assert state["epoch"] == 3


def test_reload_without_any_intact_checkpoint_is_one_line(tmp_path, capsys):
    run = two_epoch_run(tmp_path, capsys)
    for name in ("last", "best"):
        (run / "checkpoints" / name / "trainer_state.pt").write_bytes(b"")
    code, _, err = run_cli(["train", "--output", tmp_path, "--savefile", "r", "--reload", *QUICK], capsys)
    assert code == 2 and "no intact checkpoint" in err and len(err.strip().splitlines()) == 1


def test_torn_metrics_line_does_not_block_reload(tmp_path, capsys):
    run = two_epoch_run(tmp_path, capsys)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train_batch", "epo')  # a kill in the middle of a write
    code, _, err = run_cli(["train", "--output", tmp_path, "--savefile", "r", "--reload", *QUICK,
                            "train.epochs=3"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("damage", ["flip", "empty", "truncate"])
def test_evaluate_names_a_damaged_checkpoint_in_one_line(tmp_path, capsys, damage):
    run = two_epoch_run(tmp_path, capsys)
    f = run / "checkpoints" / "best" / "model.safetensors"
    data = bytearray(f.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF
    f.write_bytes(b"" if damage == "empty" else bytes(data if damage == "flip" else data[:len(data) // 2]))
    for target in (run / "checkpoints" / "best", f):
        code, _, err = run_cli(["evaluate", "--checkpoint", target, "--dataset", "digits"], capsys)
        assert code == 2 and "damaged" in err and len(err.strip().splitlines()) == 1


def test_two_crashes_inside_saves_never_leave_no_checkpoint(tmp_path, monkeypatch):
    from vitlab.train import checkpoint as ckpt
    path = tmp_path / "checkpoints" / "last"
    weights = {"w": torch.ones(3)}
    ckpt.save_checkpoint(path, weights, {}, {"step": 1})
    real = ckpt.os.replace

    def crash_on(n):
        calls = {"n": 0}

        def replace(a, b):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt  # killed here
            real(a, b)
        return replace

    monkeypatch.setattr(ckpt.os, "replace", crash_on(2))  # 1st crash: between the two renames
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(path, {"w": 2 * torch.ones(3)}, {}, {"step": 2})
    assert not path.exists() and ckpt.newest_intact(path.parent)[0].name == "last.old"
    monkeypatch.setattr(ckpt.os, "replace", crash_on(1))  # 2nd crash, in the next save, before its swap
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(path, {"w": 3 * torch.ones(3)}, {}, {"step": 3})
    found, skipped = ckpt.newest_intact(path.parent)
    assert found is not None and found.name == "last.old" and not skipped
    monkeypatch.setattr(ckpt.os, "replace", real)
    ckpt.save_checkpoint(path, {"w": 4 * torch.ones(3)}, {}, {"step": 4})
    assert ckpt.newest_intact(path.parent)[0].name == "last" and not (path.parent / "last.old").exists()


# -- one writer per run --------------------------------------------------------------------------------------
def test_a_second_training_into_a_locked_run_is_refused_with_the_holders_pid(tmp_path, capsys):
    import os

    from vitlab.train.runlock import RunLock
    run = tmp_path / "vitlab" / "run_01"
    lock = RunLock(run)
    code, _, err = run_cli(["train", "--output", tmp_path, *QUICK, "train.epochs=1"], capsys)
    assert code == 2 and f"pid {os.getpid()}" in err and len(err.strip().splitlines()) == 1
    lock.release()
    code, _, err = run_cli(["train", "--output", tmp_path, *QUICK, "train.epochs=1"], capsys)
    assert code == 0, err


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, capsys):
    run = tmp_path / "vitlab" / "run_01"
    run.mkdir(parents=True)
    (run / ".lock").write_text("999999\n")  # its process is gone: the kernel holds no lock on the file
    code, _, err = run_cli(["train", "--output", tmp_path, *QUICK, "train.epochs=1"], capsys)
    assert code == 0, err


def test_a_refused_start_leaves_no_run_directory(tmp_path, capsys):
    code, _, err = run_cli(["train", "--output", tmp_path, *QUICK, "data.dataset=imagefolder",
                            f"data.data_dir={tmp_path / 'missing'}"], capsys)
    assert code == 2 and not (tmp_path / "vitlab").exists()


# -- signals and mid-epoch checkpoints -----------------------------------------------------------------------
def weights(run, name="model.safetensors"):
    return load_file(run / "checkpoints" / "last" / name)


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


EXACT = ["data.augment=basic", "data.mixup=0.2", "model.drop_rate=0.1", "model.drop_path_rate=0.1",
         "train.ema=true", "train.batch_size=32"]


@pytest.mark.parametrize("stop_at", [5, 7])
def test_a_stop_mid_epoch_then_reload_equals_the_uninterrupted_run(tmp_path, stop_at):
    """Augmentation, MixUp, dropout and EMA all draw randomness; the resumed run replays the data stream to
    the saved batch and puts the saved RNG states back, so it ends bit-identical."""
    import signal
    from vitlab.errors import TrainingStopped
    full = Trainer(quick(tmp_path / "a", "train.epochs=2", *EXACT))
    full.fit()
    full.release()
    part = Trainer(quick(tmp_path / "b", "train.epochs=2", *EXACT))
    set_progress = part.model.set_progress

    def stop_when(step, total):
        if step == stop_at:
            part._stop_signal = signal.SIGTERM  # as the handler would: the loop stops after this step
        set_progress(step, total)
    part.model.set_progress = stop_when
    with pytest.raises(TrainingStopped, match="SIGTERM at epoch 1, batch"):
        part.fit()
    part.release()
    state = torch.load(part.run_dir / "checkpoints" / "last" / "trainer_state.pt", weights_only=True)
    assert state["batch_in_epoch"] == stop_at + 1 and state["epoch"] == 0
    resumed = Trainer(quick(tmp_path / "b", "train.epochs=2", *EXACT), reload=True)
    resumed.fit()
    resumed.release()
    for name in ("model.safetensors", "ema.safetensors"):
        assert same_weights(weights(full.run_dir, name), weights(resumed.run_dir, name)), name
    steps = [r["step"] for r in map(__import__("json").loads, (resumed.run_dir / "metrics.jsonl").read_text()
                                    .splitlines()) if r["kind"] == "train_batch"]
    assert steps == list(range(1, steps[-1] + 1)), "every step logged once"


def test_checkpoint_every_n_steps_writes_mid_epoch_checkpoints(tmp_path):
    trainer = Trainer(quick(tmp_path, "train.epochs=1", "train.checkpoint_every_n_steps=4"))
    saved = []
    save = trainer.save
    trainer.save = lambda name: (saved.append((name, trainer.step, trainer.batch_in_epoch)), save(name))
    trainer.fit()
    mids = [s for s in saved if s[2]]
    assert mids and all(step % 4 == 0 and batch == step for _, step, batch in mids)
    assert saved[-1] == ("last", trainer.step, 0)  # the epoch end resets the position


def real_run(out, *extra):
    import os
    import subprocess
    import sys

    from conftest import ROOT
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vitlab", "train", "--output", str(out), "--savefile", "r", *QUICK,
           "train.log_every=2", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig, code", [("SIGTERM", 0), ("SIGINT", 0), ("SIGUSR1", 75)])
def test_signals_save_and_exit_cleanly(tmp_path, sig, code):
    import signal
    import time
    proc = real_run(tmp_path, "train.epochs=200", "train.batch_size=8")
    metrics = tmp_path / "vitlab" / "r" / "metrics.jsonl"
    deadline = time.time() + 120
    while (not metrics.exists() or metrics.stat().st_size < 2000) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == code, err
    assert f"{sig}" in err and "saved checkpoints/last" in err and len(err.strip().splitlines()) == 1
    state = torch.load(tmp_path / "vitlab" / "r" / "checkpoints" / "last" / "trainer_state.pt", weights_only=True)
    assert state["step"] > 0 and not (tmp_path / "vitlab" / "r" / "results.json").exists()


def test_a_real_sigterm_then_reload_equals_the_uninterrupted_run(tmp_path):
    import signal
    import time
    extra = ["train.epochs=3", "train.batch_size=8", *EXACT[:4]]
    full = real_run(tmp_path / "a", *extra)
    assert full.wait(timeout=600) == 0, full.stderr.read()
    part = real_run(tmp_path / "b", *extra)
    metrics = tmp_path / "b" / "vitlab" / "r" / "metrics.jsonl"
    deadline = time.time() + 120
    while (not metrics.exists() or metrics.stat().st_size < 3000) and time.time() < deadline:
        time.sleep(0.05)
    part.send_signal(signal.SIGTERM)
    assert part.wait(timeout=60) == 0
    assert not (tmp_path / "b" / "vitlab" / "r" / "results.json").exists(), "it finished before the signal"
    again = real_run(tmp_path / "b", *extra, "--reload")
    assert again.wait(timeout=600) == 0, again.stderr.read()
    assert same_weights(weights(tmp_path / "a" / "vitlab" / "r"), weights(tmp_path / "b" / "vitlab" / "r"))


# -- bad inputs: one line, exit 2 ------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, words", [
    (["data.val_fraction=0"], "val split of digits is empty; raise data.val_fraction"),
    (["data.test_fraction=0"], "test split of digits is empty; raise data.test_fraction"),
    (["model.drop_rate=2"], "model.drop_rate' is a probability"),
    (["model.drop_path_rate=1.5"], "model.drop_path_rate' is a probability"),
    (["train.device=tpu"], "train.device 'tpu'"),
    (["model.pretrained=empty.safetensors"], "cannot be read as .safetensors"),
    (["model.pretrained=evil.pth"], "holds Python objects besides tensors"),
    (["data.dataset=imagefolder", "data.data_dir=afile"], "is a file, not a folder"),
    (["--output", "afile"], "a file is in the way"),
])
def test_bad_training_inputs(tmp_path, capsys, monkeypatch, extra, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty.safetensors").write_bytes(b"")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"w": Evil()}, tmp_path / "evil.pth")
    code, out, err = run_cli(["train", *QUICK, "train.epochs=1", *extra], capsys)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert "pwned" not in out + err


def test_a_yaml_section_that_is_not_a_mapping(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("model: 5\n")
    code, _, err = run_cli(["train", "--config", tmp_path / "bad.yaml", "--output", tmp_path], capsys)
    assert code == 2 and "config section 'model' must be a mapping" in err


def test_changed_optimization_on_resume_is_refused(tmp_path, capsys):
    two_epoch_run(tmp_path, capsys)
    code, _, err = run_cli(["train", "--output", tmp_path, "--savefile", "r", "--reload", *QUICK,
                            "optim.lr=0.5", "train.epochs=3"], capsys)
    assert code == 2 and "optim.lr: 0.003 -> 0.5" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["train", "--output", tmp_path, "--savefile", "r", "--reload", *QUICK,
                            "train.epochs=3"], capsys)  # a longer run is allowed: the schedule is rebuilt
    assert code == 0, err


def test_a_full_disk_during_a_save_says_so_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from vitlab.train import checkpoint as ckpt
    path = tmp_path / "last"
    ckpt.save_checkpoint(path, {"w": torch.ones(2)}, {}, {"step": 1})

    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0\nmore lines")
    monkeypatch.setattr(ckpt.torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("U", "total used free")(10, 10, 0))
    with pytest.raises(VitlabError, match="no space left on the device"):
        ckpt.save_checkpoint(path, {"w": torch.zeros(2)}, {}, {"step": 2})
    assert ckpt.newest_intact(tmp_path)[0] == path and not list(tmp_path.glob(".last.tmp-*"))


def test_analysis_and_prediction_inputs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = two_epoch_run(tmp_path, capsys)
    (tmp_path / "afile").write_text("x")
    from PIL import Image
    Image.new("L", (64, 64), 128).save(tmp_path / "big.png")  # any photo size: resized like evaluation
    (tmp_path / "trunc.png").write_bytes((tmp_path / "big.png").read_bytes()[:60])
    rel = run.relative_to(tmp_path)
    code, out, err = run_cli(["predict", "--checkpoint", rel, "big.png", "--topk", "20"], capsys)
    assert code == 0 and out.startswith("big.png:"), err
    cases = [(["predict", "--checkpoint", rel, "trunc.png"], "cannot be decoded"),
             (["predict", "--checkpoint", rel, "."], "is a folder"),
             (["predict", "--checkpoint", rel, "--topk", "-1", "big.png"], "positive integer"),
             (["evaluate", "--checkpoint", rel, "--batch-size", "0"], "positive integer"),
             (["plot", rel, "--out", "afile"], "a file is in the way"),
             (["report", rel, "--out", "."], "that is a folder")]
    for argv, words in cases:
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (argv, err)
    code, out, err = run_cli(["collect", rel], capsys)  # one run, a relative path
    assert code == 0, err
    (run / "results.json").write_text("{torn")
    code, _, err = run_cli(["collect", rel], capsys)
    assert code == 2 and "not valid JSON" in err
