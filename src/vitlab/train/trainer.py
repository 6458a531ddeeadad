"""The trainer: one loop for every model. It calls `model(x)`, never branches on the variant.

A run is a directory (`<output>/<task_name>/<savefile>/`): config.yaml, metrics.jsonl, train.log, tb/,
checkpoints/{last,best}/, results.json. `reload=True` resumes from `checkpoints/last` with weights,
optimizer, schedule, EMA and RNG states, so a killed run continues exactly where its last epoch ended.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, LoraConfig
from ..data import DataBundle, MixCollate, build_data, set_epoch
from ..errors import TrainingDiverged, TrainingStopped, VitlabError
from ..hub import hub_target
from ..layers.lora import adapter_state_dict, merged_state_dict
from ..objective import as_output
from ..registry import create_model, model_args, model_entry
from ..resolve import resolve_config
from ..stats import MemoryMeter, forward_gflops
from . import checkpoint as ckpt
from .distributed import (DistEnv, all_gather_object, all_reduce_sum, barrier, detect, full_state, load_full_state,
                          no_sync, parallelize, process_group, resolve_device)
from .evaluate import add_lora, autocast, evaluate
from .export import publish
from .metrics import BatchBuffer, NullLogger, RunLogger
from .optim import build_optimizer, build_scheduler, scaled_lr
from .runlock import RunLock
from .segmentation import soft_dice_loss


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped by SIGUSR1 (preemption / time limit), checkpoint saved, resume later


def requeue_slurm_job() -> str:
    """`scontrol requeue` this SLURM job (the sbatch script allows it with --requeue); what happened, as a
    phrase for the stop line ('' outside SLURM)."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID"))
    if not job:
        return ""
    if "SLURM_ARRAY_TASK_ID" in os.environ:
        job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"; scontrol requeue {job} failed ({type(exc).__name__})"
    if done.returncode == 0:
        return f"; requeued SLURM job {job}"
    why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
    return f"; scontrol requeue {job} failed: {why}"


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2])],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    key, pos = state["numpy"]
    np.random.set_state(("MT19937", key.numpy().astype(np.uint32), pos, 0, 0.0))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def resolve_img_size(cfg: Config) -> int:
    """data.img_size, else model.img_size, else the resolution in the model's name."""
    d, m = cfg.data.img_size, cfg.model.args.get("img_size")
    if d and m and d != m:
        raise VitlabError(f"data.img_size={d} and model.img_size={m} disagree; set only one of them")
    return d or m or model_args(cfg.model.name, patch_size=cfg.model.args.get("patch_size"))["img_size"]


def build_model(cfg: Config, data: DataBundle) -> nn.Module:
    """The configured model, sized for the data (image size, channels, classes), from pretrained weights
    when `model.pretrained` names a file."""
    info = data.info
    if cfg.model.args.get("num_classes") not in (None, info.num_classes):
        raise VitlabError(f"model.num_classes={cfg.model.args['num_classes']} but {info.name} has "
                          f"{info.num_classes} classes; drop model.num_classes to take it from the dataset")
    args = {**cfg.model.args, "img_size": data.img_size, "in_chans": data.in_chans, "num_classes": info.num_classes}
    if info.task == "segment":  # masks: a per-pixel head; joint augmentation of image and mask is not built
        if cfg.model.args.get("task") not in (None, "segment"):
            raise VitlabError(f"{info.name} holds masks; drop model.task or set model.task=segment")
        if data.augment != "none" or cfg.data.mixup or cfg.data.cutmix:
            raise VitlabError(f"{info.name} is a segmentation dataset and its masks are not augmented; set "
                              f"data.augment=none (and no mixup/cutmix)")
        if data.img_size != info.img_size:
            raise VitlabError(f"{info.name}'s masks are {info.img_size} px but the model reads {data.img_size} px; "
                              f"set data.img_size={info.img_size} (or the dataset's size to the model's)")
        args["task"] = "segment"
    model = create_model(cfg.model.name, **args)
    model.pretrained_notes = []
    if cfg.model.pretrained:
        from ..pretrained import load_pretrained
        model.pretrained_notes = load_pretrained(model, cfg.model.pretrained)
    add_lora(model, cfg.lora)
    return model


def build_loaders(cfg: Config, data: DataBundle, env: DistEnv, pin: bool) -> dict[str, Any]:
    """This rank's train / val / test loaders (MixUp/CutMix on train when configured)."""
    tc, dc = cfg.train, cfg.data
    mix = MixCollate(data.info.num_classes, dc.mixup, dc.cutmix) if dc.mixup or dc.cutmix else None
    eval_bs, shard = tc.eval_batch_size or 2 * tc.batch_size, {"rank": env.rank, "world": env.world_size}
    return {"train": data.loader("train", tc.batch_size, dc.num_workers, tc.seed, mix, pin, **shard),
            "val": data.loader("val", eval_bs, dc.num_workers, pin_memory=pin, **shard),
            "test": data.loader("test", eval_bs, dc.num_workers, pin_memory=pin, **shard)}


def build_ema(cfg: Config, model: nn.Module) -> nn.Module | None:
    if not cfg.train.ema:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)


class Trainer:
    """Trains one run. Under data parallelism every rank builds its own Trainer with its `DistEnv`; only
    rank 0 writes the run directory, and every value it logs is reduced over ranks."""

    def __init__(self, cfg: Config, reload: bool = False, stream=None, env: DistEnv | None = None,
                 command: str | None = None):
        self.env = env or DistEnv()
        self.command = command
        self.run_dir = cfg.run_dir
        created = next((p for p in [self.run_dir, *self.run_dir.parents][::-1] if not p.exists()), None)
        self.lock = RunLock(self.run_dir) if self.env.is_main else None  # one writer per run directory
        try:
            self._setup(cfg, reload, stream)
        except BaseException:  # a refused start leaves the run directory as it found it
            self.release()
            if self.lock is not None and created is not None and {p.name for p in self.run_dir.iterdir()} <= {".lock"}:
                (self.run_dir / ".lock").unlink(missing_ok=True)
                for p in [self.run_dir, *self.run_dir.parents]:
                    p.rmdir()
                    if p == created:
                        break
            raise

    def release(self) -> None:
        """Give up the run directory's lock (the process's exit does too)."""
        if self.lock is not None:
            self.lock.release()

    def _setup(self, cfg: Config, reload: bool, stream) -> None:
        self.cfg, tc, env = resolve_config(cfg), cfg.train, self.env
        checkpoints = self.run_dir / "checkpoints"
        if ckpt.candidates(checkpoints) and not reload:
            raise VitlabError(f"'{self.run_dir}' already holds a run; pass --reload to resume it, "
                              f"or --savefile NAME for a new run")
        # --reload: the newest checkpoint whose digests verify (last, last.old, a complete temporary, best)
        last, skipped = ckpt.newest_intact(checkpoints) if reload else (None, [])
        if reload and last is None and skipped:
            raise VitlabError(f"no intact checkpoint to resume in '{checkpoints}': {'; '.join(skipped)}; "
                              f"start a new run with --savefile NAME")
        if tc.strategy == "fsdp" and tc.ema:
            raise VitlabError("train.ema is not supported with train.strategy=fsdp yet; use train.strategy=ddp "
                              "or train.ema=false")
        self.device = resolve_device(tc.device, env)
        seed_all(tc.seed)  # the same on every rank: identical initial weights
        if tc.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)

        self.data = build_data(self.cfg.data, img_size=resolve_img_size(self.cfg),
                               in_chans=self.cfg.model.args.get("in_chans"))
        self.model = build_model(self.cfg, self.data)
        self.gflops = forward_gflops(self.model)
        self.model.to(self.device)
        self.ema = build_ema(self.cfg, self.model)
        # `model` stays the plain module (checkpoints, evaluation); `train_model` is what the loop calls.
        self.train_model = parallelize(self.model, self.device, tc.strategy, tc.compile)
        seed_all(tc.seed + env.rank)  # per-rank streams for dropout, drop-path, mixup
        self.loaders = build_loaders(self.cfg, self.data, env, pin=self.device.type == "cuda")
        self._build_optimization()
        self.epoch, self.step, self.best_val_loss = 0, 0, float("inf")
        self.skipped_steps, self._skipped_batches = 0, set()  # non-finite steps skipped (train.skip_nonfinite_steps)
        # mid-epoch position: batches of epoch `self.epoch + 1` already trained, and the RNG states its data
        # stream started from (a resume replays the stream to that batch, then restores the later states)
        self.batch_in_epoch, self._epoch_rng, self._stop_signal = 0, None, None
        resumed = reload and last is not None
        if resumed:
            self._resume(last)
        if env.is_main:  # holding the lock: no other process is writing these
            if resumed:
                self._set_aside_damaged(last)
            ckpt.remove_stale_temporaries(checkpoints, keep=last)
        self.log = self._open_log(resumed, stream)
        if skipped:
            self.log.info(f"warning: skipped damaged checkpoints: {'; '.join(skipped)}; resuming from {last.name}")
        if reload:
            self.log.info(f"resumed from {last} at epoch {self.epoch}, step {self.step}" if resumed
                          else "nothing to resume: starting a new run")

    def _build_optimization(self) -> None:
        """Optimizer, schedule, loss scaler and criterion, for the global batch of this launch."""
        cfg, tc = self.cfg, self.cfg.train
        self.steps_per_epoch = math.ceil(len(self.loaders["train"]) / tc.accum_steps)
        # train.max_steps (seed 001 counts steps) overrides epochs; the last epoch then stops early
        self.epochs = math.ceil(tc.max_steps / self.steps_per_epoch) if tc.max_steps else tc.epochs
        self.total_steps = tc.max_steps or self.steps_per_epoch * tc.epochs
        self.global_batch = tc.batch_size * self.env.world_size * tc.accum_steps
        self.lr = scaled_lr(cfg.optim, self.global_batch)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device, self.lr)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.steps_per_epoch, self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=tc.amp == "fp16" and self.device.type == "cuda")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)

    def _open_log(self, resumed: bool, stream) -> RunLogger | NullLogger:
        """Rank 0: the run directory, its config.yaml and logger, and the opening lines; others: a null log."""
        cfg, tc, env, info = self.cfg, self.cfg.train, self.env, self.data.info
        self.params = sum(p.numel() for p in self.model.parameters())  # FSDP's DTensors report global sizes
        self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        if not env.is_main:
            return NullLogger()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resumed:
            _truncate_metrics(self.run_dir / "metrics.jsonl", self.epoch, self.step)
        _atomic_write(self.run_dir / "config.yaml", cfg.dump())
        log = RunLogger(self.run_dir, cfg.output.tensorboard, cfg.output.progress, append=resumed, stream=stream)
        if self.command:
            log.info(f"command: {self.command}")
        backend = torch.distributed.get_backend() if env.launcher != "none" else "none"
        sizes = {k: len(v) for k, v in self.data.splits.items()}
        log.info(f"run {self.run_dir} | model {self.model.vitlab_name} ({self.params / 1e6:.2f}M params, "
                 f"{self.data.img_size}px, {self.data.in_chans}ch) | data {info.name}: {sizes['train']} train / "
                 f"{sizes['val']} val / {sizes['test']} test | device {self.device} "
                 f"(threads {torch.get_num_threads()}, amp {tc.amp}, compile {tc.compile})")
        log.info(f"parameters: {self.params:,} total, {self.trainable:,} trainable "
                 f"({100 * self.trainable / self.params:.2f}%)" + (f" | LoRA rank {cfg.lora.rank} on "
                                                                  f"{', '.join(cfg.lora.targets)}" if cfg.lora.rank else "")
                 + (f" | from {cfg.model.pretrained}" if cfg.model.pretrained else "")
                 + "".join(f"; {n}" for n in getattr(self.model, "pretrained_notes", []))
                 + (f" | {self.model.token_plan}" if hasattr(self.model, "token_plan") else ""))
        log.info(f"world size {env.world_size} (launcher {env.launcher}, backend {backend}, strategy "
                 f"{tc.strategy if env.launcher != 'none' else 'single'}) | batch {tc.batch_size}/device x "
                 f"{env.world_size} x accum {tc.accum_steps} = {self.global_batch} global | lr {self.lr:.3g}"
                 + (f" (optim.lr {cfg.optim.lr:g}, {cfg.optim.lr_scaling} scaling from "
                    f"{cfg.optim.base_batch_size})" if cfg.optim.lr_scaling != "none" else ""))
        return log

    # -- checkpoints -------------------------------------------------------------------------------------
    def _metadata(self) -> dict[str, str]:
        extra = {"dataset_info": dataclasses.asdict(self.data.info), "epoch": self.epoch, "step": self.step}
        return ckpt.model_metadata(self.model, self.cfg.dump(), extra)

    def save(self, name: str) -> None:
        """Called on every rank (gathering is collective); rank 0 writes. RNG states are kept per rank."""
        weights, optim_state = full_state(self.model, self.optimizer)
        rngs = all_gather_object(rng_state())
        epoch_rngs = all_gather_object(self._epoch_rng) if self.batch_in_epoch else None
        if not self.env.is_main:
            return
        state = {"epoch": self.epoch, "step": self.step, "best_val_loss": self.best_val_loss,
                 "batch_in_epoch": self.batch_in_epoch, "epoch_rng": epoch_rngs,
                 "optimizer": optim_state, "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "rng": rngs,
                 "ema_n_averaged": self.ema.n_averaged if self.ema is not None else None,
                 "skipped_steps": self.skipped_steps,
                 "config": self.cfg.to_dict()}
        ckpt.save_checkpoint(self.run_dir / "checkpoints" / name, weights, self._metadata(), state,
                             self.ema.module if self.ema is not None else None)

    def _resume(self, path: Path) -> None:
        state = ckpt.load_trainer_state(path)
        saved_model = state["config"]["model"]
        if saved_model != self.cfg.to_dict()["model"]:
            raise VitlabError(f"the model config differs from the run being resumed ({path}); resume with the "
                              f"same model settings or start a new --savefile")
        self._check_same_optimization(state["config"], path)
        load_full_state(self.model, self.optimizer, ckpt.load_weights(path / ckpt.MODEL_FILE), state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and (path / ckpt.EMA_FILE).is_file():
            self.ema.module.load_state_dict(ckpt.load_weights(path / ckpt.EMA_FILE))
            self.ema.n_averaged.fill_(state["ema_n_averaged"])
        self.epoch, self.step, self.best_val_loss = state["epoch"], state["step"], state["best_val_loss"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self.batch_in_epoch = state.get("batch_in_epoch", 0)
        rngs = state["rng"]
        if self.batch_in_epoch:
            if len(rngs) != self.env.world_size:
                raise VitlabError(f"{path} was saved mid-epoch by {len(rngs)} process(es); resume it with as many "
                                  f"(the data position is per rank), or from an epoch-end checkpoint")
            self._epoch_rng = state["epoch_rng"][self.env.rank]
        if len(rngs) == self.env.world_size:  # same world size: continue each rank's own streams exactly
            set_rng_state(rngs[self.env.rank])
        else:  # another world size: fresh per-rank streams, still a function of (seed, rank, epoch)
            seed_all(self.cfg.train.seed + self.env.rank + 1_000_003 * self.epoch)

    def _check_same_optimization(self, saved: dict[str, Any], path: Path) -> None:
        """A resume continues the saved optimizer and schedule states, which hold the old learning rate, weight
        decay, betas and batch geometry: a changed value would be recorded but not in effect, so it is refused.
        train.epochs / train.max_steps may change: the schedule is rebuilt for the new length."""
        now = self.cfg.to_dict()
        changed = [f"optim.{k}: {v!r} -> {now['optim'][k]!r}" for k, v in saved["optim"].items()
                   if now["optim"].get(k) != v]
        changed += [f"train.{k}: {saved['train'][k]!r} -> {now['train'][k]!r}"
                    for k in ("batch_size", "accum_steps") if saved["train"].get(k) != now["train"][k]]
        if changed:
            raise VitlabError(f"resuming {path} with changed optimization ({'; '.join(changed)}): the saved optimizer "
                              f"and schedule would keep the old values; resume with the saved settings or start a "
                              f"new --savefile (to fine-tune from it: model.pretrained={path / ckpt.MODEL_FILE})")

    def _set_aside_damaged(self, source: Path) -> None:
        """A damaged `last` that a resume did not start from becomes `last.damaged`: the next save must not
        turn it into `last.old` in place of the checkpoint the run continues from."""
        last = self.run_dir / "checkpoints" / "last"
        if last.is_dir() and last != source and ckpt.damage(last) is not None:
            damaged = last.with_name("last.damaged")
            if damaged.exists():
                shutil.rmtree(damaged)
            os.replace(last, damaged)

    def _merged_config(self) -> str:
        """The run's config without LoRA: what rebuilds the plain model `merged.safetensors` loads into."""
        return dataclasses.replace(self.cfg, lora=LoraConfig()).dump()

    # -- training ----------------------------------------------------------------------------------------
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def fit(self) -> dict[str, Any]:
        start = time.perf_counter()
        self.memory = MemoryMeter(self.device).start()
        train_time, train_images = 0.0, 0
        with self._stop_signals():
            while self.epoch < self.epochs:
                seconds, images = self._train_epoch(self.epoch + 1)
                train_time, train_images = train_time + seconds, train_images + images
                self._end_epoch(seconds, images)
                if self.epoch < self.epochs and self._stop_now(flushed=True):
                    self._stop(self.epoch)
        return self._finish(time.perf_counter() - start, train_time, train_images)

    def _end_epoch(self, seconds: float, images: int) -> None:
        """Validate, log, and write `best` (when the validation loss improved) and `last`."""
        val = evaluate(self.eval_model(), self.loaders["val"], self.device, self.cfg.train.amp)
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self._check_weights_finite()  # `last` and `best` are only ever finite weights
        improved = math.isfinite(val["loss"]) and val["loss"] < self.best_val_loss
        if improved:
            self.best_val_loss = val["loss"]
        self.log.record("epoch", epoch=self.epoch, step=self.step, val_loss=val["loss"], val_top1=val["top1"],
                        val_top5=val["top5"], epoch_seconds=seconds, images_per_second=images / seconds)
        self.log.info(f"epoch {self.epoch}/{self.epochs} val loss {val['loss']:.4f} top-1 {val['top1']:.4f} "
                      f"top-5 {val['top5']:.4f} | {images / seconds:,.0f} img/s, {seconds:.1f}s"
                      + (" | best" if improved else ""))
        if improved:
            self.save("best")
        self.save("last")

    @contextlib.contextmanager
    def _stop_signals(self):
        """SIGTERM, SIGINT and SIGUSR1 (SLURM's warning before the time limit) ask the loop to stop after the
        current optimizer step; a second signal of the same kind acts as if no handler were installed."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

        def handler(signum, frame):
            self._stop_signal = self._stop_signal or signum
            signal.signal(signum, previous[signum])  # the next one is not caught

        for sig in STOP_SIGNALS:
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _stop_now(self, flushed: bool) -> bool:
        """Whether a stop signal has arrived. One process: checked after every step (a Python flag, no sync).
        Data parallel: agreed over ranks at metric flushes only, where the loop synchronises anyway."""
        if self.env.world_size == 1:
            return self._stop_signal is not None
        if not flushed:
            return False
        flag = torch.tensor([float(self._stop_signal is not None)], device=self.device)
        return all_reduce_sum(flag).item() > 0

    def _stop(self, epoch: int) -> None:
        """Write `last` at the current step (mid-epoch) and end the run with one line (TrainingStopped)."""
        self._check_weights_finite()
        self.save("last")
        barrier()  # no rank exits (and gets the job step killed) before rank 0 has written the checkpoint
        signum = self._stop_signal or signal.SIGTERM
        name = signal.Signals(signum).name
        where = (f"epoch {epoch}, batch {self.batch_in_epoch}" if self.batch_in_epoch else
                 f"the end of epoch {epoch}") + f", step {self.step}"
        if signum == signal.SIGUSR1:  # preemption: requeue under SLURM, exit with the documented code
            requeued = requeue_slurm_job() if self.env.is_main else ""
            message = f"{name} (preemption) at {where}: saved checkpoints/last{requeued}; resume with --reload"
            exit_code = PREEMPTED_EXIT
        else:
            message, exit_code = f"stopped by {name} at {where}: saved checkpoints/last; resume with --reload", 0
        self.log.write(message)  # the CLI prints it
        self.log.close()
        raise TrainingStopped(message, exit_code)

    def _train_epoch(self, epoch: int) -> tuple[float, int]:
        """One pass over this rank's shard, from batch `batch_in_epoch` when resumed mid-epoch; returns
        (seconds, images seen by all ranks together)."""
        tc, loader = self.cfg.train, self.loaders["train"]
        self.train_model.train()
        set_epoch(loader, epoch)
        start = self.batch_in_epoch
        batches = self._data_stream(loader, start)
        # train.max_steps may end training inside this epoch
        n_batches = min(len(loader), start + (self.total_steps - self.step) * tc.accum_steps)
        buffer, pending_val, val_iter = BatchBuffer(self.device), [], None
        self._skipped_batches, self._group_finite = set(), None
        first_batch, first_step, images = start + 1, self.step + 1, 0
        t0 = t_flush = time.perf_counter()
        self.log.start_epoch(epoch, self.epochs, n_batches)
        for i, (x, y) in enumerate(batches, start=start):
            if i == n_batches:
                break
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            stepped = self._train_batch(i, n_batches, x, y, buffer)
            images += y.shape[0]
            if tc.val_every_n_batches and (i + 1) % tc.val_every_n_batches == 0:
                val_iter, loss_val = self._val_batch(val_iter)
                pending_val.append((epoch, i + 1, self.step, loss_val))
            every = tc.checkpoint_every_n_steps
            save_now = stepped and (every and self.step % every == 0 and i + 1 < n_batches)
            flushed = len(buffer) == tc.log_every or i + 1 == n_batches or save_now or \
                (stepped and self.env.world_size == 1 and self._stop_signal is not None)
            if flushed:
                self._flush_val(pending_val)
                count, samples, sizes = len(buffer), buffer.samples, list(buffer.sizes)
                records = buffer.flush(all_reduce_sum)
                self._check_losses_finite(epoch, first_batch, first_step, records)
                self.log.batches(epoch, first_batch, first_step, records)
                now = time.perf_counter()
                left = (self.total_steps - self.step) * tc.accum_steps * (now - t0) / (i + 1 - start)
                mean = lambda key: sum(r[key] * n for r, n in zip(records, sizes)) / samples  # noqa: E731
                self.log.update(count, epoch, self.epochs, i + 1, n_batches, mean("loss"), mean("acc"),
                                samples * self.env.world_size / (now - t_flush), left)
                first_batch, first_step, t_flush = i + 2, first_step + count, now
            if stepped and i + 1 < n_batches:
                stop = self._stop_now(flushed)
                if stop or save_now:
                    self.batch_in_epoch = i + 1  # a mid-epoch checkpoint: the position in the data stream
                    if stop:
                        self.log.end_epoch()
                        self._stop(epoch)
                    self._check_weights_finite()
                    self.save("last")
        self.log.end_epoch()
        # Every rank's shard has the same size (the loaders pad), so the global count is exact.
        return time.perf_counter() - t0, images * self.env.world_size

    def _data_stream(self, loader, start: int):
        """The epoch's batches from batch `start`. Resumed mid-epoch, the stream is rebuilt from the RNG
        states the epoch started with (DataLoader workers draw their seeds there), advanced past the batches
        already trained, and the RNG states of the moment of the checkpoint are put back."""
        if not start:
            self._epoch_rng = rng_state()
            return iter(loader)
        now = rng_state()
        set_rng_state(self._epoch_rng)
        if hasattr(loader, "batches_from"):  # in-memory data: skip without transforming
            batches = loader.batches_from(start)
        else:
            batches = iter(loader)
            for _ in range(start):
                next(batches)
        set_rng_state(now)
        return batches

    def _train_batch(self, i: int, n_batches: int, x: torch.Tensor, y: torch.Tensor, buffer: BatchBuffer) -> bool:
        """Forward, objective and backward of micro-batch i; an optimizer step on a group's last one (returns
        whether it took one)."""
        accum = self.cfg.train.accum_steps
        group_start = i - i % accum
        group_size = min(accum, n_batches - group_start)  # the last group of an epoch may be short
        step_now = i + 1 == group_start + group_size
        self.model.set_progress(self.step, self.total_steps)  # schedules that follow training
        with no_sync(self.train_model, sync=step_now):  # all-reduce gradients only on a group's last micro-batch
            with autocast(self.device, self.cfg.train.amp):
                out = as_output(self.train_model(x))
            # the objective: cross-entropy plus every auxiliary term the model returned, in fp32
            ce = self.criterion(out.logits.float(), y)
            terms = dict(out.losses)
            if self.cfg.optim.dice_weight and y.ndim == 3:  # segmentation masks (B, H, W)
                terms["dice"] = self.cfg.optim.dice_weight * soft_dice_loss(out.logits, y)
            loss = ce + sum(term.float() for term in terms.values())
            self.scaler.scale(loss / group_size).backward()
        if self.cfg.train.skip_nonfinite_steps:  # a device flag over the group's micro-batches, read at its step
            finite = torch.isfinite(loss.detach())
            self._group_finite = finite if i == group_start else self._group_finite & finite
        if step_now:
            self._optimizer_step(range(group_start + 1, i + 2))
        hard = y.argmax(dim=-1) if y.ndim == 2 else y  # soft (mixed) targets: the dominant class
        hits = out.logits.detach().argmax(dim=1) == hard  # (B,) or, segmenting, (B, H, W) pixels
        extras = {**({"ce": ce} if terms else {}), **terms, **out.metrics}
        buffer.add(y.shape[0], loss, hits.flatten(1).float().mean(1).sum() if hits.ndim > 1 else hits.sum(),
                   self.optimizer.param_groups[0]["lr"], extras)
        return step_now

    def _optimizer_step(self, batches: range) -> None:
        """Clip, step, schedule; under train.skip_nonfinite_steps a group whose loss or gradient norm is not
        finite on any rank is dropped instead (the schedule still advances: it follows steps taken in time)."""
        clip, skip = self.cfg.optim.clip_grad, self.cfg.train.skip_nonfinite_steps
        norm = None
        if clip > 0 or skip:
            self.scaler.unscale_(self.optimizer)
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        if skip and self._skip_step(norm, batches):
            self.scaler.update()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def _skip_step(self, norm: torch.Tensor, batches: range) -> bool:
        """Whether this step is dropped as non-finite (one host sync, agreed over ranks); too many stop the run."""
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
        bad = (~self._group_finite | ~torch.isfinite(norm)).float()
        if all_reduce_sum(bad).item() == 0:
            return False
        self.skipped_steps += 1
        self._skipped_batches.update(batches)
        limit = self.cfg.train.skip_nonfinite_steps
        self.log.info(f"skipped step {self.step + 1}: non-finite loss or gradient norm "
                      f"({self.skipped_steps} of at most {limit} skipped)")
        if self.skipped_steps > limit:
            raise TrainingDiverged(f"{self.skipped_steps} non-finite steps, more than train.skip_nonfinite_steps="
                                   f"{limit}; the last checkpoint is intact: lower optim.lr or set optim.clip_grad")
        return True

    def _check_losses_finite(self, epoch: int, first_batch: int, first_step: int,
                             records: list[dict[str, float]]) -> None:
        """Stop at the first non-finite training loss, at a flush (values already on the host: no extra sync),
        before anything is saved; batches of skipped steps are allowed."""
        for i, rec in enumerate(records):
            batch = first_batch + i
            if not math.isfinite(rec["loss"]) and batch not in self._skipped_batches:
                raise TrainingDiverged(
                    f"the training loss is {rec['loss']} at epoch {epoch}, batch {batch} (step {first_step + i}); "
                    f"stopped, the last checkpoint is intact. Lower optim.lr, set optim.clip_grad=1.0, prefer "
                    f"train.amp=bf16 to fp16, or let train.skip_nonfinite_steps=N skip rare bad batches")

    def _check_weights_finite(self) -> None:
        """One host sync per epoch: no checkpoint is written from non-finite weights (a last step can make
        them so after its own finite loss)."""
        # FSDP's parameters are DTensors: each rank checks its own shard, then one sum over ranks
        params = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in self.model.parameters()]
        bad = torch.stack([(~torch.isfinite(p)).any() for p in params]).sum().float()
        if all_reduce_sum(bad).item() > 0:  # FSDP: every rank checks its shard
            raise TrainingDiverged(f"the weights are no longer finite after epoch {self.epoch} (step {self.step}); "
                                   f"stopped, the last checkpoint is intact. Lower optim.lr or set optim.clip_grad=1.0")

    def _flush_val(self, pending: list) -> None:
        """Write buffered validation-batch losses (mean over ranks) with one device-to-host copy."""
        if pending:
            values = (all_reduce_sum(torch.stack([p[3] for p in pending])) / self.env.world_size).tolist()
            self.log.val_batches([(e, b, s, loss) for (e, b, s, _), loss in zip(pending, values)])
            pending.clear()

    def _val_batch(self, it):
        """(iterator, loss tensor) of the next validation batch of this rank's shard (seed 002 logs train and
        validation loss per batch)."""
        if it is None:
            it = iter(self.loaders["val"])
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(self.loaders["val"])
            x, y = next(it)
        model = self.eval_model()
        model.eval()
        with torch.no_grad(), autocast(self.device, self.cfg.train.amp):
            logits = as_output(model(x.to(self.device))).logits
            loss = F.cross_entropy(logits.float(), y.to(self.device))  # ignores -100 padding
        model.train()
        return it, loss

    def _finish(self, wall: float, train_time: float, train_images: int) -> dict[str, Any]:
        test = evaluate(self.eval_model(), self.loaders["test"], self.device, self.cfg.train.amp)
        results = {"test_top1": test["top1"], "test_top5": test["top5"], "test_loss": test["loss"],
                   "test_samples": test["n"], "params": self.params, "epochs": self.epoch,
                   "train_seconds": round(wall, 3),
                   "images_per_second": train_images / train_time if train_time else None,
                   "best_val_loss": self.best_val_loss, "model": self.model.vitlab_name,
                   "dataset": self.data.info.name, "device": str(self.device),
                   "weights": "ema" if self.ema is not None else "last", "run_dir": str(self.run_dir)}
        results.update(world_size=self.env.world_size, global_batch=self.global_batch, gflops=self.gflops,
                       **self.memory.read(), architecture=self.model.architecture,
                       family=model_entry(self.model.vitlab_name).family, model_args=self.model.vitlab_args)
        if self.cfg.lora.rank:
            results["trainable_params"] = self.trainable
        if "miou" in test:
            results.update(test_miou=test["miou"], test_dice=test["dice"])
        if self.env.is_main:
            if self.cfg.lora.rank:  # the adapter alone (small), and merged weights that load into the plain model
                meta = self._metadata()
                ckpt.save_weights(self.run_dir / "adapter.safetensors", adapter_state_dict(self.eval_model()), meta)
                ckpt.save_weights(self.run_dir / "merged.safetensors", merged_state_dict(self.eval_model()),
                                  {**meta, "config": self._merged_config()})
            _atomic_write(self.run_dir / "results.json", json.dumps(results, indent=2) + "\n")
        self.log.record("test", step=self.step, loss=test["loss"], top1=test["top1"], top5=test["top5"])
        seg = f" mIoU {test['miou']:.4f} Dice {test['dice']:.4f}" if "miou" in test else ""
        self.log.info(f"test top-1 {test['top1']:.4f} top-5 {test['top5']:.4f} loss {test['loss']:.4f}{seg} "
                      f"({test['n']} {'pixels' if seg else 'images'}) | {wall:.1f}s | run saved in {self.run_dir}")
        self.log.close()
        return results


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _truncate_metrics(path: Path, epoch: int, step: int) -> None:
    """Drop records after the checkpoint (epoch `epoch` complete, `step` optimizer steps): their batches are
    about to be replayed."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line torn by a kill mid-write
            continue
        batch_record = record.get("kind") in ("train_batch", "val_batch")
        if record.get("epoch", 0) <= epoch or (batch_record and record.get("step", step + 1) <= step):
            kept.append(line)
    _atomic_write(path, "".join(line + "\n" for line in kept))


def train(cfg: Config, reload: bool = False, stream=None, local: bool = False,
          command: str | None = None) -> dict[str, Any]:
    """Train `cfg` to the end (resuming when `reload`), test, and return results.json's content; then, on
    rank 0, write the export layout and upload the run when asked. `command`: the vitlab command line the run
    stands for, logged first (a translated seed command shows its equivalent).

    Under torchrun or srun this process joins the job's group (see `distributed.detect`); `local=True`
    (the `--local` flag) trains in one process even there, on rank 0, while other ranks step aside."""
    env = detect(local)
    if local and env.rank != 0:
        return {}
    # Checked before training, so a missing HF_TOKEN fails in a second, not after the last epoch.
    hub = hub_target(need_token=True) if cfg.output.upload and env.is_main else None
    device = resolve_device(cfg.train.device, env)
    with process_group(env, device, cfg.train.dist_timeout):
        trainer = Trainer(cfg, reload=reload, stream=stream, env=env, command=command)
        try:
            results = trainer.fit()
        finally:  # free DDP/FSDP state, which holds the group, before the group is destroyed
            trainer.release()
            del trainer
            gc.collect()
    if env.is_main:  # outside the group: a long upload cannot time out the other ranks' exit barrier
        publish(cfg, results, hub)
    return results
