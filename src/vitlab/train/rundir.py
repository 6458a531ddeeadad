"""A run directory's lifecycle, `<output>/<task_name>/<savefile>/`:

1. claimed: one writer holds `.lock`; a start refused before anything was written leaves no trace;
2. resumed (`--reload`): the newest checkpoint whose digests verify, with the trainer state it holds;
3. opened: metrics.jsonl truncated to the checkpoint, config.yaml, the logger;
4. saved: `checkpoints/{last,best}` (atomic, see `checkpoint`), every epoch and mid-epoch on request;
5. finished: results.json, and a LoRA run's adapter and merged weights.
Stopping on a signal is `signals`; what a checkpoint's trainer state holds is `save_state` / `load_state`.

A run directory is not trusted: vitlab never follows a symbolic link there (its own files, `checkpoints/`,
`tb/`, `.lock`), reads and hashes nothing outside it, and never replaces an earlier run's files by starting
over: without --reload a directory holding any of them is refused, and with --reload a run that evidently
saved checkpoints which are gone (results.json, or an epoch in metrics.jsonl) is refused too, instead of
quietly restarting it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..config import Config, LoraConfig
from ..errors import VitlabError
from ..names import atomic_write
from ..untrusted import regular
from ..layers.lora import adapter_state_dict, merged_state_dict
from . import checkpoint as ckpt
from .distributed import all_gather_object, full_state, load_full_state
from .metrics import RunLogger, kept_on_resume
from .rng import rng_state, seed_all, set_rng_state
from .runlock import RunLock
from .trackers import open_trackers


# what a run writes at its top level: any of them means an earlier run (or its remains) is there
RUN_FILES = ("results.json", "metrics.jsonl", "train.log", "config.yaml", "adapter.safetensors",
             "merged.safetensors", "trackers.json")
RUN_FOLDERS = ("checkpoints", "tb", "csv", "wandb")  # tb, csv, wandb: the trackers' (vitlab.train.trackers)


def check_run_files(path: Path) -> None:
    """One line when the run directory holds a symbolic link, folder, FIFO or device where vitlab reads or
    writes its own files (appending train.log through a link would write outside the directory)."""
    if not path.is_dir():
        return
    for name in (*RUN_FILES, ".lock", *RUN_FOLDERS):
        p = path / name
        if p.is_symlink():
            raise VitlabError(f"'{p}' is a symbolic link; vitlab does not follow links in a run directory: "
                              f"remove it, or pass --savefile NAME for a new run")
        if name in RUN_FOLDERS:
            if p.exists() and not p.is_dir():
                raise VitlabError(f"'{p}' is not a folder; remove it, or pass --savefile NAME for a new run")
        elif p.exists():
            regular(p, "run file")


class RunDirectory:
    """Claims `path` for this process (rank 0 writes; other ranks only read checkpoints)."""

    def __init__(self, path: Path, writer: bool):
        self.path, self.checkpoints = path, path / "checkpoints"
        self._created = next((p for p in [path, *path.parents][::-1] if not p.exists()), None)
        check_run_files(path)  # before the lock: `.lock` is opened for writing
        self.lock = RunLock(path) if writer else None  # one writer per run directory
        # what was here when this process took the lock: a failed start removes only what it added itself
        self._found = {n for n in (*RUN_FILES, *RUN_FOLDERS) if (path / n).exists() or (path / n).is_symlink()}

    def release(self) -> None:
        """Give up the lock (the process's exit does too)."""
        if self.lock is not None:
            self.lock.release()

    @contextlib.contextmanager
    def undone_on_failure(self):
        """A start refused or stopped (a signal during start-up) inside this block leaves the run directory as
        it found it: the run files it had written so far (config.yaml, train.log, metrics.jsonl, tb/) are
        removed, files that were there before are not touched, so the same command can simply run again."""
        try:
            yield
        except BaseException:
            if self.lock is not None and not self.lock.file.closed:  # held: nobody else writes here
                for name in (*RUN_FILES, *RUN_FOLDERS):
                    p = self.path / name
                    if name not in self._found and not p.is_symlink() and p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    elif name not in self._found and (p.exists() or p.is_symlink()):
                        p.unlink(missing_ok=True)
            self.release()
            if self.lock is not None and self._created is not None and \
                    {p.name for p in self.path.iterdir()} <= {".lock"}:
                (self.path / ".lock").unlink(missing_ok=True)
                for p in [self.path, *self.path.parents]:
                    p.rmdir()
                    if p == self._created:
                        break
            raise

    def to_resume(self, reload: bool) -> tuple[Path | None, list[str]]:
        """(the checkpoint `--reload` continues from, the damaged ones it passed over): the newest whose digests
        verify (last, last.old, a complete temporary, best). A run without --reload must be new."""
        earlier = [n for n in RUN_FILES if (self.path / n).exists()]
        if (ckpt.candidates(self.checkpoints) or earlier) and not reload:
            raise VitlabError(f"'{self.path}' already holds a run; pass --reload to resume it, "
                              f"or --savefile NAME for a new run (it has {', '.join(earlier) or 'checkpoints'})")
        if not reload:
            return None, []
        last, skipped = ckpt.newest_intact(self.checkpoints)
        if last is None and skipped:
            raise VitlabError(f"no intact checkpoint to resume in '{self.checkpoints}': {'; '.join(skipped)}; "
                              f"start a new run with --savefile NAME")
        lost = self._saved_before() if last is None else None
        if lost:
            raise VitlabError(f"'{self.path}' holds a run that saved checkpoints ({lost}) but none is left in "
                              f"'{self.checkpoints}'; vitlab will not start it over in place: pass --savefile "
                              f"NAME for a new run (or remove the old run's files)")
        return last, skipped

    def _saved_before(self) -> str | None:
        """Evidence that a checkpoint once existed here: a finished run's results.json, or an epoch record in
        metrics.jsonl (every epoch ends with a save). None for a run killed before its first save."""
        if (self.path / "results.json").exists():
            return "results.json"
        metrics = self.path / "metrics.jsonl"
        if metrics.is_file():
            tail = b""
            with open(metrics, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    if b'{"kind": "epoch"' in tail + block:
                        return "epochs in metrics.jsonl"
                    tail = block[-16:]
        return None

    def tidy(self, resumed_from: Path | None) -> None:
        """Holding the lock: set a damaged `last` aside (the next save must not turn it into `last.old` in place
        of the checkpoint the run continues from) and remove temporaries of interrupted saves."""
        last = self.checkpoints / "last"
        if resumed_from is not None and last.is_dir() and last != resumed_from and ckpt.damage(last) is not None:
            damaged = last.with_name("last.damaged")
            if damaged.exists() or damaged.is_symlink():
                ckpt.remove(damaged)
            os.replace(last, damaged)
        ckpt.remove_stale_temporaries(self.checkpoints, keep=resumed_from)

    def open(self, cfg: Config, resumed: tuple[int, int] | None, stream) -> RunLogger:
        """The directory, config.yaml and the logger; resumed at (epoch, step), metrics.jsonl loses the records
        after that checkpoint (their batches are about to be replayed)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if resumed is not None:
            truncate_metrics(self.path / "metrics.jsonl", *resumed)
        atomic_write(self.path / "config.yaml", cfg.dump())
        loggers = [n for n in cfg.output.loggers if n != "tensorboard" or cfg.output.tensorboard]
        trackers = open_trackers(loggers, self.path, cfg, resumed)
        return RunLogger(self.path, trackers, cfg.output.progress, append=resumed is not None, stream=stream)

    def finish(self, results: dict[str, Any], cfg: Config, eval_model, metadata: dict[str, str]) -> None:
        """results.json; with LoRA, the adapter alone (small) and merged weights that load into the plain model."""
        if cfg.lora.rank:
            ckpt.save_weights(self.path / "adapter.safetensors", adapter_state_dict(eval_model), metadata)
            plain = dataclasses.replace(cfg, lora=LoraConfig()).dump()  # what rebuilds the model merged loads into
            ckpt.save_weights(self.path / "merged.safetensors", merged_state_dict(eval_model),
                              {**metadata, "config": plain})
        atomic_write(self.path / "results.json", json.dumps(results, indent=2) + "\n")

    def artefacts(self) -> list[Path]:
        """The finished run's files a tracker keeps: config, results, the final weights (EMA and LoRA files too)."""
        last = self.checkpoints / "last"
        names = [self.path / "config.yaml", self.path / "results.json", last / ckpt.MODEL_FILE, last / ckpt.EMA_FILE,
                 self.path / "adapter.safetensors", self.path / "merged.safetensors"]
        return [p for p in names if p.is_file()]


def truncate_metrics(path: Path, epoch: int, step: int) -> None:
    """Drop records after the checkpoint (epoch `epoch` complete, `step` optimizer steps)."""
    if not path.is_file():
        return
    kept = []
    for raw in path.read_bytes().splitlines():
        try:
            line = raw.decode("utf-8")
            record = json.loads(line)
        except (ValueError, RecursionError):  # a line torn by a kill mid-write, or garbage
            continue
        if not isinstance(record, dict):
            continue
        at_epoch, at_step = record.get("epoch", 0), record.get("step", step + 1)
        if not isinstance(at_epoch, int) or not isinstance(at_step, int):
            continue
        if kept_on_resume(record.get("kind"), at_epoch, at_step, epoch, step):
            kept.append(line)
    atomic_write(path, "".join(line + "\n" for line in kept))


# -- the trainer state a checkpoint holds ---------------------------------------------------------------------
def metadata(t) -> dict[str, str]:
    """The weights files' metadata: model, config, dataset and position."""
    extra = {"dataset_info": dataclasses.asdict(t.data.info), "epoch": t.epoch, "step": t.step}
    return ckpt.model_metadata(t.model, t.cfg.dump(), extra)


def save_state(t, name: str) -> None:
    """`checkpoints/<name>` of trainer `t`. Called on every rank (gathering is collective); rank 0 writes.
    RNG states are kept per rank."""
    weights, optim_state = full_state(t.model, t.optimizer)
    rngs = all_gather_object(rng_state())
    epoch_rngs = all_gather_object(t.epoch_rng) if t.batch_in_epoch else None
    if not t.env.is_main:
        return
    state = {"epoch": t.epoch, "step": t.step, "best_val_loss": t.best_val_loss,
             "batch_in_epoch": t.batch_in_epoch, "epoch_rng": epoch_rngs,
             "optimizer": optim_state, "scheduler": t.scheduler.state_dict(),
             "scaler": t.scaler.state_dict(), "rng": rngs,
             "ema_n_averaged": t.ema.n_averaged if t.ema is not None else None,
             "skipped_steps": t.skipped_steps, "config": t.cfg.to_dict()}
    ckpt.save_checkpoint(t.run_dir / "checkpoints" / name, weights, metadata(t), state,
                         t.ema.module if t.ema is not None else None)


def load_state(t, path: Path) -> None:
    """Trainer `t` continues from checkpoint `path`: weights, optimizer, schedule, scaler, EMA, position and
    RNG states (each rank its own; another world size draws fresh per-rank streams)."""
    state = ckpt.load_trainer_state(path)
    needed = ("epoch", "step", "best_val_loss", "optimizer", "scheduler", "scaler", "rng", "config")
    if not isinstance(state, dict) or any(k not in state for k in needed) or not isinstance(state["config"], dict) \
            or not isinstance(state["rng"], list):
        raise VitlabError(f"{path / ckpt.STATE_FILE} is not a trainer state vitlab wrote; start a new run with "
                          f"--savefile NAME")
    _check_same_run(state["config"], t.cfg.to_dict(), path)
    load_full_state(t.model, t.optimizer, ckpt.load_weights(path / ckpt.MODEL_FILE), state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    t.scaler.load_state_dict(state["scaler"])
    if t.ema is not None and (path / ckpt.EMA_FILE).is_file():
        t.ema.module.load_state_dict(ckpt.load_weights(path / ckpt.EMA_FILE))
        t.ema.n_averaged.fill_(state["ema_n_averaged"])
    t.epoch, t.step, t.best_val_loss = state["epoch"], state["step"], state["best_val_loss"]
    t.skipped_steps = state.get("skipped_steps", 0)
    t.batch_in_epoch = state.get("batch_in_epoch", 0)
    rngs, rank, world = state["rng"], t.env.rank, t.env.world_size
    if t.batch_in_epoch:
        if len(rngs) != world:
            raise VitlabError(f"{path} was saved mid-epoch by {len(rngs)} process(es); resume it with as many "
                              f"(the data position is per rank), or from an epoch-end checkpoint")
        t.epoch_rng = state["epoch_rng"][rank]
    if len(rngs) == world:  # same world size: continue each rank's own streams exactly
        set_rng_state(rngs[rank])
    else:  # another world size: fresh per-rank streams, still a function of (seed, rank, epoch)
        seed_all(t.cfg.train.seed + rank + 1_000_003 * t.epoch)


def _check_same_run(saved: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    """A resume continues the saved model, optimizer and schedule states, which hold the old learning rate,
    weight decay, betas and batch geometry: a changed value would be recorded but not in effect, so it is
    refused. train.epochs / train.max_steps may change: the schedule is rebuilt for the new length."""
    if saved["model"] != now["model"]:
        raise VitlabError(f"the model config differs from the run being resumed ({path}); resume with the "
                          f"same model settings or start a new --savefile")
    changed = [f"optim.{k}: {v!r} -> {now['optim'][k]!r}" for k, v in saved["optim"].items()
               if now["optim"].get(k) != v]
    # the objective's distillation too (absent from checkpoints older than train.teacher: the defaults)
    defaults = {"teacher": None, "distill_weight": 0.5, "distill_temperature": 1.0}
    changed += [f"train.{k}: {saved['train'].get(k, defaults.get(k))!r} -> {now['train'][k]!r}"
                for k in ("batch_size", "accum_steps", *defaults)
                if saved["train"].get(k, defaults.get(k)) != now["train"][k]]
    if changed:
        raise VitlabError(f"resuming {path} with changed optimization ({'; '.join(changed)}): the saved optimizer "
                          f"and schedule would keep the old values; resume with the saved settings or start a "
                          f"new --savefile (to fine-tune from it: model.pretrained={path / ckpt.MODEL_FILE})")
