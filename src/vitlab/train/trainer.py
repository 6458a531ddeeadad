"""The trainer: one loop for every model. It calls `model(x)`, never branches on the variant.

A run is a directory (`<output>/<task_name>/<savefile>/`): config.yaml, metrics.jsonl, train.log, tb/,
checkpoints/{last,best}/, results.json. `reload=True` resumes from `checkpoints/last` with weights,
optimizer, schedule, EMA and RNG states, so a killed run continues exactly where its last epoch ended.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, ModelConfig
from ..data import MixCollate, build_data, set_epoch
from ..errors import VitlabError
from ..registry import create_model, model_args
from . import checkpoint as ckpt
from .evaluate import autocast, evaluate
from .metrics import RunLogger
from .optim import build_optimizer, build_scheduler

# ModelConfig fields passed to create_model as-is; the others are resolved from the data or handled apart.
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(ModelConfig)
                   if f.name not in ("name", "pretrained", "img_size", "in_chans", "num_classes"))


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VitlabError(f"train.device is '{spec}' but no CUDA device is available; use train.device=cpu or auto")
    return device


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


def build_model_for(cfg: Config, img_size: int, in_chans: int, num_classes: int) -> nn.Module:
    overrides = {k: getattr(cfg.model, k) for k in MODEL_KEYS}
    return create_model(cfg.model.name, img_size=img_size, in_chans=in_chans, num_classes=num_classes, **overrides)


def resolve_img_size(cfg: Config) -> int:
    """data.img_size, else model.img_size, else the resolution in the model's name."""
    d, m = cfg.data.img_size, cfg.model.img_size
    if d and m and d != m:
        raise VitlabError(f"data.img_size={d} and model.img_size={m} disagree; set only one of them")
    return d or m or model_args(cfg.model.name, patch_size=cfg.model.patch_size)["img_size"]


class Trainer:
    def __init__(self, cfg: Config, reload: bool = False, stream=None):
        self.cfg, tc = cfg, cfg.train
        self.run_dir = cfg.run_dir
        last = ckpt.existing(self.run_dir / "checkpoints" / "last")
        if last is not None and not reload:
            raise VitlabError(f"'{self.run_dir}' already holds a run; pass --reload to resume it, "
                              f"or --savefile NAME for a new run")
        self.device = resolve_device(tc.device)
        torch.manual_seed(tc.seed)
        random.seed(tc.seed)
        np.random.seed(tc.seed)
        if tc.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)

        img_size = resolve_img_size(cfg)
        self.data = build_data(cfg.data, img_size=img_size, in_chans=cfg.model.in_chans)
        info = self.data.info
        if cfg.model.num_classes not in (None, info.num_classes):
            raise VitlabError(f"model.num_classes={cfg.model.num_classes} but {info.name} has {info.num_classes} "
                              f"classes; drop model.num_classes to take it from the dataset")
        self.model = build_model_for(cfg, self.data.img_size, self.data.in_chans, info.num_classes)
        if cfg.model.pretrained:
            from ..pretrained import load_pretrained
            load_pretrained(self.model, cfg.model.pretrained)
        self.model.to(self.device)
        self.train_model = torch.compile(self.model) if tc.compile else self.model
        self.ema = None
        if tc.ema:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay), use_buffers=True)

        pin = self.device.type == "cuda"
        mix = MixCollate(info.num_classes, cfg.data.mixup, cfg.data.cutmix) if cfg.data.mixup or cfg.data.cutmix else None
        eval_bs = tc.eval_batch_size or 2 * tc.batch_size
        self.train_loader = self.data.loader("train", tc.batch_size, cfg.data.num_workers, tc.seed, mix, pin)
        self.val_loader = self.data.loader("val", eval_bs, cfg.data.num_workers, pin_memory=pin)
        self.test_loader = self.data.loader("test", eval_bs, cfg.data.num_workers, pin_memory=pin)
        self.steps_per_epoch = math.ceil(len(self.train_loader) / tc.accum_steps)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.steps_per_epoch, tc.epochs)
        self.scaler = torch.amp.GradScaler("cuda", enabled=tc.amp == "fp16" and self.device.type == "cuda")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)

        self.epoch, self.step, self.best_val_loss = 0, 0, float("inf")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resumed = reload and last is not None
        if resumed:
            self._resume(last)
        _atomic_write(self.run_dir / "config.yaml", cfg.dump())
        self.log = RunLogger(self.run_dir, cfg.output.tensorboard, cfg.output.progress, append=resumed,
                             stream=stream)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.log.info(f"run {self.run_dir} | model {self.model.vitlab_name} ({self.params / 1e6:.2f}M params, "
                      f"{self.data.img_size}px, {self.data.in_chans}ch) | data {info.name}: "
                      f"{len(self.data.splits['train'])} train / {len(self.data.splits['val'])} val / "
                      f"{len(self.data.splits['test'])} test | device {self.device} "
                      f"(threads {torch.get_num_threads()}, amp {tc.amp}, compile {tc.compile})")
        if reload:
            self.log.info(f"resumed from {last} at epoch {self.epoch}, step {self.step}" if resumed
                          else "nothing to resume: starting a new run")

    # -- checkpoints -------------------------------------------------------------------------------------
    def _metadata(self) -> dict[str, str]:
        extra = {"dataset_info": dataclasses.asdict(self.data.info), "epoch": self.epoch, "step": self.step}
        return ckpt.model_metadata(self.model, self.cfg.dump(), extra)

    def _trainer_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "best_val_loss": self.best_val_loss,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng_state(),
                "ema_n_averaged": self.ema.n_averaged if self.ema is not None else None,
                "config": self.cfg.to_dict()}

    def save(self, name: str) -> None:
        ckpt.save_checkpoint(self.run_dir / "checkpoints" / name, self.model, self._metadata(),
                             self._trainer_state(), self.ema.module if self.ema is not None else None)

    def _resume(self, path: Path) -> None:
        state = ckpt.load_trainer_state(path)
        saved_model = state["config"]["model"]
        if saved_model != self.cfg.to_dict()["model"]:
            raise VitlabError(f"the model config differs from the run being resumed ({path}); resume with the "
                              f"same model settings or start a new --savefile")
        self.model.load_state_dict(ckpt.load_weights(path / ckpt.MODEL_FILE))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and (path / ckpt.EMA_FILE).is_file():
            self.ema.module.load_state_dict(ckpt.load_weights(path / ckpt.EMA_FILE))
            self.ema.n_averaged.fill_(state["ema_n_averaged"])
        self.epoch, self.step, self.best_val_loss = state["epoch"], state["step"], state["best_val_loss"]
        set_rng_state(state["rng"])
        _truncate_metrics(self.run_dir / "metrics.jsonl", self.epoch)

    # -- training ----------------------------------------------------------------------------------------
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def fit(self) -> dict[str, Any]:
        tc = self.cfg.train
        start = time.perf_counter()
        train_time, train_images = 0.0, 0
        while self.epoch < tc.epochs:
            epoch = self.epoch + 1
            seconds, images = self._train_epoch(epoch)
            train_time, train_images = train_time + seconds, train_images + images
            val = evaluate(self.eval_model(), self.val_loader, self.device, tc.amp)
            self.epoch = epoch
            improved = val["loss"] < self.best_val_loss
            self.best_val_loss = min(self.best_val_loss, val["loss"])
            self.log.record("epoch", epoch=epoch, step=self.step, val_loss=val["loss"], val_top1=val["top1"],
                            val_top5=val["top5"], epoch_seconds=seconds, images_per_second=images / seconds)
            self.log.info(f"epoch {epoch}/{tc.epochs} val loss {val['loss']:.4f} top-1 {val['top1']:.4f} "
                          f"top-5 {val['top5']:.4f} | {images / seconds:,.0f} img/s, {seconds:.1f}s"
                          + (" | best" if improved else ""))
            if improved:
                self.save("best")
            self.save("last")
        return self._finish(time.perf_counter() - start, train_time, train_images)

    def _train_epoch(self, epoch: int) -> tuple[float, int]:
        tc, model, device = self.cfg.train, self.train_model, self.device
        model.train()
        set_epoch(self.train_loader, epoch)
        n_batches, accum = len(self.train_loader), tc.accum_steps
        losses, correct, sizes, lrs = [], [], [], []
        first_batch, first_step = 1, self.step + 1
        images, t0, t_flush = 0, time.perf_counter(), time.perf_counter()
        self.log.start_epoch(epoch, tc.epochs, n_batches)
        val_iter, val_losses = None, []
        for i, (x, y) in enumerate(self.train_loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            group_start = i - i % accum
            group_size = min(accum, n_batches - group_start)
            with autocast(device, tc.amp):
                logits = model(x)
            loss = self.criterion(logits.float(), y)
            self.scaler.scale(loss / group_size).backward()
            if i + 1 == group_start + group_size:
                self._optimizer_step()
            hard = y.argmax(dim=-1) if y.ndim == 2 else y  # soft (mixed) targets: the dominant class
            losses.append(loss.detach())
            correct.append((logits.detach().argmax(dim=-1) == hard).sum())
            sizes.append(y.shape[0])
            lrs.append(self.optimizer.param_groups[0]["lr"])
            images += y.shape[0]
            if tc.val_every_n_batches and (i + 1) % tc.val_every_n_batches == 0:
                val_iter, loss_val = self._val_batch(val_iter)
                val_losses.append((epoch, i + 1, self.step, loss_val))
            if len(losses) == tc.log_every or i + 1 == n_batches:
                self._flush_val(val_losses)
                loss_avg, acc = self.log.batches(epoch, first_batch, first_step, losses, correct, sizes, lrs)
                now = time.perf_counter()
                done = (epoch - 1) * n_batches + i + 1
                per_batch = (now - t0) / (i + 1)
                self.log.update(len(losses), epoch, tc.epochs, i + 1, n_batches, loss_avg, acc,
                                sum(sizes) / (now - t_flush), per_batch * (tc.epochs * n_batches - done))
                first_batch, first_step = i + 2, first_step + len(losses)
                losses, correct, sizes, lrs, t_flush = [], [], [], [], now
        self.log.end_epoch()
        return time.perf_counter() - t0, images

    def _optimizer_step(self) -> None:
        if self.cfg.optim.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def _flush_val(self, pending: list) -> None:
        """Write buffered validation-batch losses with one device-to-host copy."""
        if pending:
            values = torch.stack([p[3] for p in pending]).tolist()
            for (epoch, batch, step, _), loss in zip(pending, values):
                self.log.record("val_batch", epoch=epoch, batch=batch, step=step, loss=loss)
            pending.clear()

    def _val_batch(self, it):
        """(iterator, loss tensor) of the next validation batch (seed 002 logs train and validation loss per batch)."""
        if it is None:
            it = iter(self.val_loader)
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(self.val_loader)
            x, y = next(it)
        model = self.eval_model()
        model.eval()
        with torch.no_grad(), autocast(self.device, self.cfg.train.amp):
            loss = F.cross_entropy(model(x.to(self.device)).float(), y.to(self.device))
        model.train()
        return it, loss

    def _finish(self, wall: float, train_time: float, train_images: int) -> dict[str, Any]:
        test = evaluate(self.eval_model(), self.test_loader, self.device, self.cfg.train.amp)
        results = {"test_top1": test["top1"], "test_top5": test["top5"], "test_loss": test["loss"],
                   "test_samples": test["n"], "params": self.params, "epochs": self.epoch,
                   "train_seconds": round(wall, 3),
                   "images_per_second": train_images / train_time if train_time else None,
                   "best_val_loss": self.best_val_loss, "model": self.model.vitlab_name,
                   "dataset": self.data.info.name, "device": str(self.device),
                   "weights": "ema" if self.ema is not None else "last", "run_dir": str(self.run_dir)}
        _atomic_write(self.run_dir / "results.json", json.dumps(results, indent=2) + "\n")
        self.log.record("test", step=self.step, loss=test["loss"], top1=test["top1"], top5=test["top5"])
        self.log.info(f"test top-1 {test['top1']:.4f} top-5 {test['top5']:.4f} loss {test['loss']:.4f} "
                      f"({test['n']} images) | {wall:.1f}s | run saved in {self.run_dir}")
        self.log.close()
        return results


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _truncate_metrics(path: Path, epoch: int) -> None:
    """Drop records of the epoch a kill interrupted; its batches are about to be replayed."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line).get("epoch", 0) <= epoch]
    _atomic_write(path, "".join(line + "\n" for line in kept))


def train(cfg: Config, reload: bool = False, stream=None) -> dict[str, Any]:
    """Train `cfg` to the end (resuming when `reload`), test, and return results.json's content."""
    return Trainer(cfg, reload=reload, stream=stream).fit()
