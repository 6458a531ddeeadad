"""Reliability: non-finite losses, damaged checkpoints, one writer per run, and the one home of kill-and-resume:
a stop, a signal or a SIGKILL, then --reload, ends where the uninterrupted run does (issue 16). Bad inputs, one
line and exit 2 each, live in test_bad_inputs.py."""
import json
import math
from pathlib import Path

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
@pytest.fixture(scope="module")
def finished_two_epochs(tmp_path_factory):
    from vitlab.cli import main
    out = tmp_path_factory.mktemp("two_epochs")
    assert main(["train", "--output", str(out), "--savefile", "r", *QUICK, "train.epochs=2"]) == 0
    return out / "vitlab" / "r"


@pytest.fixture
def two_epoch_run(tmp_path, finished_two_epochs):
    """A copy of one finished two-epoch run at tmp_path/vitlab/r, for a test to damage and resume."""
    import shutil
    return Path(shutil.copytree(finished_two_epochs, tmp_path / "vitlab" / "r"))


def test_reload_falls_back_to_the_newest_intact_checkpoint_with_one_warning(tmp_path, capsys, two_epoch_run):
    run = two_epoch_run
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


def test_torn_metrics_line_does_not_block_reload(tmp_path, capsys, two_epoch_run):
    run = two_epoch_run
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train_batch", "epo')  # a kill in the middle of a write
    code, _, err = run_cli(["train", "--output", tmp_path, "--savefile", "r", "--reload", *QUICK,
                            "train.epochs=3"], capsys)
    assert code == 0, err


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
    survivor = ckpt.existing(path)  # what evaluate and --reload read instead
    assert survivor == path.parent / "last.old" and ckpt.load_trainer_state(survivor)["step"] == 1
    assert ckpt.resolve_checkpoint(path) == survivor / "model.safetensors"
    assert not list(path.parent.glob(".last.tmp-*")), "temporary directories are cleaned up"
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


# -- signals and mid-epoch checkpoints -----------------------------------------------------------------------
def weights(run, name="model.safetensors"):
    return load_file(run / "checkpoints" / "last" / name)


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


EXACT = ["data.augment=basic", "data.mixup=0.2", "model.drop_rate=0.1", "model.drop_path_rate=0.1",
         "train.ema=true", "train.batch_size=32"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The in-process run that the stopped-and-resumed ones must end bit-identical to."""
    full = Trainer(quick(tmp_path_factory.mktemp("uninterrupted"), "train.epochs=2", *EXACT))
    full.fit()
    full.release()
    return full.run_dir


@pytest.mark.parametrize("stop_at", [5, 7])  # on a metrics flush (log_every=5) and between two
def test_a_stop_mid_epoch_then_reload_equals_the_uninterrupted_run(tmp_path, stop_at, uninterrupted):
    """Augmentation, MixUp, dropout and EMA all draw randomness; the resumed run replays the data stream to
    the saved batch and puts the saved RNG states back, so it ends bit-identical."""
    import signal
    from vitlab.errors import TrainingStopped
    part = Trainer(quick(tmp_path, "train.epochs=2", *EXACT))
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
    resumed = Trainer(quick(tmp_path, "train.epochs=2", *EXACT), reload=True)
    resumed.fit()
    resumed.release()
    for name in ("model.safetensors", "ema.safetensors"):
        assert same_weights(weights(uninterrupted, name), weights(resumed.run_dir, name)), name
    assert logged_steps(resumed.run_dir) == list(range(1, logged_steps(resumed.run_dir)[-1] + 1)), \
        "every step logged once"


def logged_steps(run):
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train_batch"]


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
    """`vitlab train` in its own process (one thread: the same numbers in every process)."""
    import os
    import subprocess
    import sys

    from conftest import ROOT
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vitlab", "train", "--output", str(out), "--savefile", "r", *QUICK,
           "train.log_every=2", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(path, size=0, timeout=120):
    import time
    deadline = time.time() + timeout
    while (not path.exists() or path.stat().st_size < size) and time.time() < deadline:
        time.sleep(0.02)


@pytest.mark.parametrize("sig, code", [("SIGINT", 0), ("SIGUSR1", 75)])  # SIGTERM: the resume test below
def test_signals_save_and_exit_cleanly(tmp_path, sig, code):
    import signal
    proc = real_run(tmp_path, "train.epochs=200", "train.batch_size=8")
    wait_for(tmp_path / "vitlab" / "r" / "metrics.jsonl", 2000)
    proc.send_signal(getattr(signal, sig))
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == code, err
    assert f"{sig}" in err and "saved checkpoints/last" in err and len(err.strip().splitlines()) == 1
    state = torch.load(tmp_path / "vitlab" / "r" / "checkpoints" / "last" / "trainer_state.pt", weights_only=True)
    assert state["step"] > 0 and not (tmp_path / "vitlab" / "r" / "results.json").exists()


REAL = ["train.epochs=3", "train.batch_size=8", *EXACT[:5]]  # augmentation, MixUp, dropout, drop-path, EMA


@pytest.fixture(scope="module")
def uninterrupted_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted_process")
    full = real_run(out, *REAL)
    assert full.wait(timeout=600) == 0, full.stderr.read()
    return out / "vitlab" / "r"


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_real_signal_then_reload_equals_the_uninterrupted_run(tmp_path, sig, uninterrupted_process):
    """SIGTERM: the run saves mid-epoch and exits 0 with one line; SIGKILL: it dies wherever it is, possibly
    mid-write, after its first checkpoint. Either way --reload ends bit-identical to the uninterrupted run,
    logging every step once."""
    import signal
    import time
    run = tmp_path / "vitlab" / "r"
    part = real_run(tmp_path, *REAL)
    if sig == "SIGTERM":
        wait_for(run / "metrics.jsonl", 3000)
    else:
        wait_for(run / "checkpoints" / "last" / "trainer_state.pt")
        time.sleep(0.3)  # somewhere in epoch 2 or 3, possibly mid-write
    part.send_signal(getattr(signal, sig))
    err = part.communicate(timeout=60)[1]
    if sig == "SIGTERM":
        assert part.returncode == 0, err
        assert "SIGTERM" in err and "saved checkpoints/last" in err and len(err.strip().splitlines()) == 1
    else:
        assert part.returncode == -signal.SIGKILL
    assert not (run / "results.json").exists(), "the run finished before the signal"
    again = real_run(tmp_path, *REAL, "--reload")
    assert again.wait(timeout=600) == 0, again.stderr.read()
    assert "resumed from" in (run / "train.log").read_text()
    for name in ("model.safetensors", "ema.safetensors"):
        assert same_weights(weights(uninterrupted_process, name), weights(run, name)), name
    results = [json.loads((r / "results.json").read_text()) for r in (uninterrupted_process, run)]
    assert results[0]["test_loss"] == results[1]["test_loss"]
    assert logged_steps(run) == sorted(set(logged_steps(run))), "replayed batches must not be logged twice"


# -- a full disk -----------------------------------------------------------------------------------------------
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
    with pytest.raises(VitlabError, match="no space left on device; the previous checkpoints are intact"):
        ckpt.save_checkpoint(path, {"w": torch.zeros(2)}, {}, {"step": 2})
    assert ckpt.newest_intact(tmp_path)[0] == path and not list(tmp_path.glob(".last.tmp-*"))


FULL_DISK = {  # how each writer reports a full disk (the safetensors one was a 28-line traceback, issue 29)
    "safetensors": lambda: __import__("safetensors").SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"),
    "OSError": lambda: OSError(28, "No space left on device"),
}


@pytest.mark.parametrize("kind", sorted(FULL_DISK))
def test_a_full_disk_during_the_weights_write_is_one_line_naming_the_path(tmp_path, monkeypatch, kind):
    from vitlab.train import checkpoint as ckpt
    path = tmp_path / "checkpoints" / "last"
    ckpt.save_checkpoint(path, {"w": torch.ones(2)}, {}, {"step": 1})
    before = {f.name: f.read_bytes() for f in path.iterdir()}

    def full(*a, **k):
        raise FULL_DISK[kind]()
    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(VitlabError) as e:
        ckpt.save_checkpoint(path, {"w": torch.zeros(2)}, {}, {"step": 2})
    assert str(e.value) == (f"could not write checkpoint '{path}': no space left on device; the previous "
                            f"checkpoints are intact (free space, then --reload)")
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before and not list(path.parent.glob(".last.*"))
    with pytest.raises(VitlabError, match="no checkpoint was saved before it"):  # the first save of a run
        ckpt.save_checkpoint(tmp_path / "other" / "best", {"w": torch.zeros(2)}, {}, {"step": 2})
    with pytest.raises(VitlabError) as e:  # a LoRA run's adapter / merged weights at the end
        ckpt.save_weights(tmp_path / "adapter.safetensors", {"w": torch.zeros(2)}, {})
    assert f"could not write '{tmp_path / 'adapter.safetensors'}': no space left on device" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "other"]  # no temporary left


def test_a_full_disk_mid_training_is_one_line_and_reload_continues(tmp_path, capsys, monkeypatch):
    """Through the CLI: the disk fills at epoch 2's save; one line, exit 2; epoch 1's `last` verifies and
    --reload (space freed) finishes the run."""
    from vitlab.train import checkpoint as ckpt
    real, calls = ckpt.save_file, []

    def fills_up(*a, **k):
        calls.append(1)
        if len(calls) > 2:  # epoch 1: best and last; epoch 2: full
            raise FULL_DISK["safetensors"]()
        return real(*a, **k)
    monkeypatch.setattr(ckpt, "save_file", fills_up)
    argv = ["train", "--output", tmp_path, "--savefile", "r", *QUICK, "train.epochs=2"]
    code, out, err = run_cli(argv, capsys)
    run = tmp_path / "vitlab" / "r"
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"vitlab: error: could not write checkpoint '{run / 'checkpoints'}/") and err.endswith(
        "': no space left on device; the previous checkpoints are intact (free space, then --reload)\n")
    assert ckpt.newest_intact(run / "checkpoints")[0] is not None
    monkeypatch.undo()
    code, out, err = run_cli([*argv, "--reload"], capsys)
    assert code == 0, err
    assert json.loads((run / "results.json").read_text())["epochs"] == 2




# -- signals outside the training loop: during start-up and after the loop (issue 29) ---------------------------
def catches(pid, sig):
    """Whether process `pid` has a handler for `sig` installed (/proc/PID/status, SigCgt): `vitlab train` installs
    one for SIGTERM at the start of its `main`, before its heavy imports, data and model."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask, 16) >> (sig - 1) & 1)


def start_up_then(sig, tmp_path, env_extra=None):
    """`vitlab train` in its own process, sent `sig` as soon as its handler is installed (still importing: the
    data, model and loop come seconds later); (exit code, stderr)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", **(env_extra or {}))
    proc = subprocess.Popen([sys.executable, "-m", "vitlab", "train", "--output", str(tmp_path), "--savefile", "r",
                             *QUICK, "train.epochs=1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not catches(proc.pid, signal.SIGTERM) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    return proc.returncode, err


def test_sigterm_during_start_up_exits_75_with_one_line_and_leaves_nothing(tmp_path):
    import signal
    code, err = start_up_then(signal.SIGTERM, tmp_path)
    assert code == 75, err
    assert err.strip().splitlines() == [
        "vitlab: stopped by SIGTERM during start-up, before training began: nothing was lost; "
        "run the same command again"]
    assert not (tmp_path / "vitlab" / "r").exists()  # nothing that would refuse the same command (or --reload)


def test_sigusr1_during_start_up_requeues_the_slurm_job(tmp_path):
    import os
    import signal
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.args"}\n')
    (stub / "scontrol").chmod(0o755)
    code, err = start_up_then(signal.SIGUSR1, tmp_path / "out",
                              {"SLURM_JOB_ID": "4242", "PATH": f"{stub}:{os.environ['PATH']}"})
    assert code == 75, err
    assert err.strip().splitlines() == [
        "vitlab: stopped by SIGUSR1 (preemption) during start-up, before training began: nothing was lost; "
        "requeued SLURM job 4242"]
    assert (tmp_path / "scontrol.args").read_text() == "requeue 4242\n"
    assert not (tmp_path / "out" / "vitlab" / "r").exists()


def signal_at(monkeypatch, module, name, sig):
    """Send `sig` to this process when `module.name` is called (then call it): a signal on cue, in process."""
    import os
    real = getattr(module, name)

    def send(*a, **k):
        os.kill(os.getpid(), sig)
        return real(*a, **k)
    monkeypatch.setattr(module, name, send)


@pytest.mark.parametrize("sig, code", [("SIGTERM", 75), ("SIGINT", 130), ("SIGUSR1", 75)])
def test_a_signal_after_the_run_files_are_written_still_leaves_no_run(tmp_path, capsys, monkeypatch, sig, code):
    """The last step of start-up writes config.yaml, train.log and metrics.jsonl; a stop there removes them (a
    run directory with them is refused without --reload). SIGUSR1 under SLURM without `scontrol` on PATH: the
    failed requeue is said in the same line."""
    import signal

    from vitlab.train import summary
    signal_at(monkeypatch, summary, "opening_lines", getattr(signal, sig))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    got, out, err = run_cli(["train", "--output", tmp_path, "--savefile", "r", *QUICK, "train.epochs=1"], capsys)
    assert got == code, err
    assert len(err.strip().splitlines()) == 1 and f"stopped by {sig}" in err and "before training began" in err
    assert ("scontrol requeue 4242 failed (FileNotFoundError); run the same command again" in err) == \
        (sig == "SIGUSR1")
    assert not (tmp_path / "vitlab").exists()
    assert {s: signal.getsignal(s) for s in before} == before  # main() puts the caller's handlers back


def test_a_signal_after_the_loop_keeps_the_checkpoint_and_reload_finishes(tmp_path, capsys, monkeypatch):
    import signal

    from vitlab.train import summary
    signal_at(monkeypatch, summary, "results", signal.SIGTERM)  # testing done, results.json not yet written
    argv = ["train", "--output", tmp_path, "--savefile", "r", *QUICK, "train.epochs=1"]
    code, out, err = run_cli(argv, capsys)
    assert code == 75 and err.strip().splitlines() == [
        "vitlab: stopped by SIGTERM after training, before the run was finished (test, results.json, export): "
        "checkpoints/last holds the trained weights; finish it with --reload"]
    run = tmp_path / "vitlab" / "r"
    assert not (run / "results.json").exists() and (run / "checkpoints" / "last" / "model.safetensors").is_file()
    monkeypatch.undo()
    code, out, err = run_cli([*argv, "--reload"], capsys)
    assert code == 0, err
    assert json.loads((run / "results.json").read_text())["epochs"] == 1


def test_a_second_signal_during_the_save_is_not_caught_again():
    """The first stop signal in the loop asks for a save; a second one of the kind acts as if no handler were
    there (SIGTERM ends the process mid-save, the save is atomic), not as the handler `vitlab train` had before
    the loop."""
    import signal

    from vitlab import cli
    from vitlab.train.signals import stop_signals
    restore = cli._catch_startup_signals()
    try:
        startup = signal.getsignal(signal.SIGTERM)
        noted = []
        with stop_signals(noted.append):
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # the first signal
            assert noted == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) == startup  # after the loop: the command's handler again
    finally:
        restore()


def test_a_signal_while_the_loops_stop_unwinds_keeps_the_loops_line(monkeypatch, capsys):
    """A second stop signal that lands while `TrainingStopped` is being handled prints the loop's own line and
    code (not 'after training'), and one that escapes `_main` is still one line, not a traceback."""
    import signal

    from vitlab import cli
    from vitlab.errors import TrainingStopped

    def stopped_then_signalled(args):
        try:
            raise TrainingStopped("stopped by SIGTERM at epoch 1, batch 2: saved checkpoints/last", 0)
        except TrainingStopped:
            raise cli._StopSignal(signal.SIGTERM)

    monkeypatch.setitem(cli.COMMANDS, "evaluate", stopped_then_signalled)
    monkeypatch.setattr(cli, "parse", lambda argv: type("A", (), {"command": "evaluate"})())
    assert cli.main(["evaluate"]) == 0
    assert capsys.readouterr().err.strip().endswith("at epoch 1, batch 2: saved checkpoints/last")

    def signalled_while_printing(argv):
        raise cli._StopSignal(signal.SIGTERM)

    monkeypatch.setattr(cli, "_main", signalled_while_printing)
    monkeypatch.setattr(cli, "_stopped", lambda signum: 75)
    assert cli.main(["evaluate"]) == 75
