"""The trainer: one loop for every model. It calls `model(x)`, never branches on the variant.

Read it top to bottom: `Trainer.__init__` builds the run from its config (`build`) and claims its directory
(`rundir`); `fit` runs epochs; `_train_epoch` runs batches; `_train_batch` is one forward and backward;
`_optimizer_step` one update. Non-finite values are `guards`, stop signals `signals`, RNG streams `rng`.

A run is a directory (`<output>/<task_name>/<savefile>/`): config.yaml, metrics.jsonl, train.log, tb/,
checkpoints/{last,best}/, results.json. `reload=True` resumes from `checkpoints/last` with weights,
optimizer, schedule, EMA and RNG states, so a killed run continues exactly where it was last saved.
"""
from __future__ import annotations

import gc
import math
import os
import signal
import sys
import time
from typing import Any

import torch
from torch import nn

from ..config import Config, check_tracker_packages
from ..data import set_epoch
from ..errors import TrainingStopped, VitlabError
from ..hub import hub_target
from ..objective import as_output, distillation_loss
from ..resolve import resolve_config
from ..stats import MemoryMeter, forward_gflops
from .build import build_data_for, build_ema, build_loaders, build_model, build_optimization, build_teacher
from .distributed import DistEnv, all_reduce_sum, barrier, detect, no_sync, parallelize, process_group, resolve_device
from .evaluate import autocast, evaluate, validation_batch_loss
from .export import publish
from .guards import check_losses_finite, check_weights_finite, step_is_bad, too_many_skipped
from .metrics import BatchBuffer, EpochLog, NullLogger, RunLogger
from .rng import replay_from, rng_state, seed_all
from .rundir import RunDirectory, load_state, metadata, save_state
from .segmentation import soft_dice_loss
from .signals import stop_message, stop_signals
from . import summary


class Trainer:
    """Trains one run. Under data parallelism every rank builds its own Trainer with its `DistEnv`; only
    rank 0 writes the run directory, and every value it logs is reduced over ranks."""

    def __init__(self, cfg: Config, reload: bool = False, stream=None, env: DistEnv | None = None,
                 command: str | None = None):
        self.env, self.command, self.run_dir = env or DistEnv(), command, cfg.run_dir
        self.directory = RunDirectory(self.run_dir, writer=self.env.is_main)
        with self.directory.undone_on_failure():
            self._build(resolve_config(cfg), reload, stream)

    def release(self, failed: bool = False) -> None:
        """Close a log the run left open (it raised; `failed`: an error rather than an interruption, and its
        trackers are told so) and give up the run directory's lock (the process's exit does too). An error
        while closing never hides the run's own."""
        log = getattr(self, "log", None)
        try:
            if log is not None and not log.closed:
                log.close(failed=failed)
        except Exception:  # noqa: BLE001  (a full disk closing the files: the run's error is the one to see)
            pass
        finally:
            self.directory.release()

    def _build(self, cfg: Config, reload: bool, stream) -> None:
        """Everything from the config, in this order: the order of random draws is part of an exact resume."""
        self.cfg, tc, env = cfg, cfg.train, self.env
        check_tracker_packages(cfg.output.loggers)  # on every rank: all stop together, before the data loads
        resume_from, damaged = self.directory.to_resume(reload)
        if tc.strategy == "fsdp" and tc.ema:
            raise VitlabError("train.ema is not supported with train.strategy=fsdp yet; use train.strategy=ddp "
                              "or train.ema=false")
        self.device = resolve_device(tc.device, env)
        seed_all(tc.seed)  # the same on every rank: identical initial weights
        if tc.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.data = build_data_for(cfg)
        self.model = build_model(cfg, self.data)
        self.gflops = forward_gflops(self.model)
        self.model.to(self.device)
        self.ema = build_ema(cfg, self.model)
        self.teacher = build_teacher(cfg, self.data, self.device)  # train.teacher: distilled from, frozen
        # `model` stays the plain module (checkpoints, evaluation); `train_model` is what the loop calls
        self.train_model = parallelize(self.model, self.device, tc.strategy, tc.compile)
        seed_all(tc.seed + env.rank)  # per-rank streams for dropout, drop-path, mixup
        self.loaders = build_loaders(cfg, self.data, env, pin=self.device.type == "cuda")
        opt = build_optimization(cfg, self.model, self.device, len(self.loaders["train"]), env.world_size)
        self.optimizer, self.scheduler, self.scaler, self.criterion = (opt.optimizer, opt.scheduler, opt.scaler,
                                                                       opt.criterion)
        self.lr, self.global_batch = opt.lr, opt.global_batch
        self.steps_per_epoch, self.epochs, self.total_steps = opt.steps_per_epoch, opt.epochs, opt.total_steps
        # the position: epochs done, optimizer steps taken, batches of epoch `epoch + 1` done (a mid-epoch
        # checkpoint) and the RNG states that epoch's data stream started from
        self.epoch, self.step, self.batch_in_epoch, self.epoch_rng = 0, 0, 0, None
        self.best_val_loss, self.skipped_steps, self._stop_signal = float("inf"), 0, None
        self._skipped_batches, self._group_finite = set(), None  # this epoch's non-finite steps
        if resume_from is not None:
            load_state(self, resume_from)
        self.params = sum(p.numel() for p in self.model.parameters())  # FSDP's DTensors report global sizes
        self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.log = self._open_log(resume_from, damaged, reload, stream)

    def _open_log(self, resume_from, damaged: list[str], reload: bool, stream) -> RunLogger | NullLogger:
        """Rank 0: the run directory tidied and opened, and the opening lines; other ranks: a null log."""
        if not self.env.is_main:
            return NullLogger()
        self.directory.tidy(resume_from)  # holding the lock: no other process is writing here
        log = self.directory.open(self.cfg, (self.epoch, self.step) if resume_from else None, stream)
        for line in summary.opening_lines(self):
            log.info(line)
        if damaged:
            log.info(f"warning: skipped damaged checkpoints: {'; '.join(damaged)}; resuming from {resume_from.name}")
        if reload:
            log.info(f"resumed from {resume_from} at epoch {self.epoch}, step {self.step}" if resume_from
                     else "nothing to resume: starting a new run")
        return log

    def eval_model(self) -> nn.Module:
        """The weights validated, tested and exported: the EMA's when train.ema."""
        return self.ema.module if self.ema is not None else self.model

    def save(self, name: str) -> None:
        """`checkpoints/<name>`; on every rank (gathering is collective), rank 0 writes."""
        save_state(self, name)

    # -- the loop --------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs, validating and saving after each; then test. Returns results.json's content."""
        start = time.perf_counter()
        self.memory = MemoryMeter(self.device).start()
        train_time, train_images = 0.0, 0
        with stop_signals(self._note_signal):
            while self.epoch < self.epochs:
                seconds, images = self._train_epoch(self.epoch + 1)
                train_time, train_images = train_time + seconds, train_images + images
                self._end_epoch(seconds, images)
                if self.epoch < self.epochs and self._stop_now(flushed=True):
                    self._stop(self.epoch)
        return self._finish(time.perf_counter() - start, train_time, train_images)

    def _train_epoch(self, epoch: int) -> tuple[float, int]:
        """One pass over this rank's shard, from batch `batch_in_epoch` when resumed mid-epoch; returns
        (seconds, images seen by all ranks together)."""
        tc, loader, start, world = self.cfg.train, self.loaders["train"], self.batch_in_epoch, self.env.world_size
        self.train_model.train()
        set_epoch(loader, epoch)  # the sampler's shuffle of this epoch
        # a new epoch keeps the RNG states its data stream starts from; a resumed one replays it to its batch
        if start:
            batches = replay_from(loader, start, self.epoch_rng)
        else:
            self.epoch_rng, batches = rng_state(), iter(loader)
        # train.max_steps may end training inside this epoch
        n_batches = min(len(loader), start + (self.total_steps - self.step) * tc.accum_steps)
        meter = EpochLog(self.log, self.device, all_reduce_sum, world, epoch, self.epochs, start, n_batches)
        self._skipped_batches, self._group_finite, val_stream, images = set(), None, None, 0
        for i, (x, y) in enumerate(batches, start=start):
            if i == n_batches:
                break
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            stepped = self._train_batch(i, n_batches, x, y, meter.buffer)
            images += y.shape[0]
            last = i + 1 == n_batches
            # a validation batch's loss every train.val_every_n_batches batches, written at the next flush
            if tc.val_every_n_batches and (i + 1) % tc.val_every_n_batches == 0:
                val_stream, loss = validation_batch_loss(self.eval_model(), val_stream, self.loaders["val"],
                                                         self.device, tc.amp)
                meter.val(i + 1, self.step, loss)
            # a mid-epoch checkpoint every train.checkpoint_every_n_steps steps (the epoch's end saves anyway)
            every = tc.checkpoint_every_n_steps
            save_now = stepped and every and self.step % every == 0 and not last
            # metrics reach the host every train.log_every batches, at the epoch's end, before a mid-epoch save,
            # and in one process before a stop
            flushed = len(meter.buffer) == tc.log_every or last or save_now or \
                (stepped and world == 1 and self._stop_signal is not None)
            if flushed:
                meter.flush(i + 1, (self.total_steps - self.step) * tc.accum_steps, self._check_losses(epoch))
            # between optimizer steps only: stop on a signal, or save mid-epoch, at this position in the stream
            if stepped and not last:
                stop = self._stop_now(flushed)
                if stop or save_now:
                    self.batch_in_epoch = i + 1
                    if stop:
                        self.log.end_epoch()
                        self._stop(epoch)
                    check_weights_finite(self.model, self.epoch, self.step)
                    self.save("last")
        self.log.end_epoch()
        # Every rank's shard has the same size (the loaders pad), so the global count is exact.
        return time.perf_counter() - meter.t0, images * world

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
                with torch.no_grad():  # train.teacher: its predictions on the same batch, a second target
                    soft = as_output(self.teacher(x)).logits.float() if self.teacher is not None else None
            # the objective: cross-entropy plus every auxiliary term the model returned, in fp32
            ce = self.criterion(out.logits.float(), y)
            terms = dict(out.losses)
            ce_weight = 1.0
            if soft is not None:  # (1 - w) CE + w T^2 KL: the hard labels' share moves to the teacher's
                w, t = self.cfg.train.distill_weight, self.cfg.train.distill_temperature
                terms["kd"], ce_weight = w * distillation_loss(out.logits.float(), soft, t), 1.0 - w
            if self.cfg.optim.dice_weight and y.ndim == 3:  # segmentation masks (B, H, W)
                terms["dice"] = self.cfg.optim.dice_weight * soft_dice_loss(out.logits, y)
            loss = ce_weight * ce + sum(term.float() for term in terms.values())
            self.scaler.scale(loss / group_size).backward()  # the mean over the group's micro-batches
        if self.cfg.train.skip_nonfinite_steps:  # a device flag over the group's micro-batches, read at its step
            finite = torch.isfinite(loss.detach())
            self._group_finite = finite if i == group_start else self._group_finite & finite
        if step_now:
            self._optimizer_step(range(group_start + 1, i + 2))
        hard = y.argmax(dim=-1) if y.ndim == 2 else y  # soft (mixed) targets: the dominant class
        hits = out.logits.detach().argmax(dim=1) == hard  # (B,) or, segmenting, (B, H, W) pixels
        extras = {**({"ce": ce} if terms else {}), **terms, **out.metrics}
        # the record's step: the optimizer step this micro-batch counts towards (taken above on a group's last)
        buffer.add(y.shape[0], loss, hits.flatten(1).float().mean(1).sum() if hits.ndim > 1 else hits.sum(),
                   self.optimizer.param_groups[0]["lr"], extras, self.step if step_now else self.step + 1)
        return step_now

    def _optimizer_step(self, batches: range) -> None:
        """Clip, step, schedule, EMA. Under train.skip_nonfinite_steps a group (`batches`, 1-based) whose loss or
        gradient norm is not finite on any rank is dropped instead; the schedule still advances (it follows
        steps taken in time)."""
        clip, skip = self.cfg.optim.clip_grad, self.cfg.train.skip_nonfinite_steps
        norm = None
        if clip > 0 or skip:  # the norm of the true (unscaled) gradients
            self.scaler.unscale_(self.optimizer)
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        if skip and step_is_bad(self._group_finite, norm):
            self.skipped_steps += 1
            self._skipped_batches.update(batches)
            self.log.info(f"skipped step {self.step + 1}: non-finite loss or gradient norm "
                          f"({self.skipped_steps} of at most {skip} skipped)")
            too_many_skipped(self.skipped_steps, skip)
        else:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def _check_losses(self, epoch: int):
        """The check a flush runs on the training records before writing them."""
        return lambda first_batch, steps, records: check_losses_finite(
            epoch, first_batch, steps, records, self._skipped_batches)

    def _end_epoch(self, seconds: float, images: int) -> None:
        """Validate, log, and write `best` (when the validation loss improved) and `last`."""
        val = evaluate(self.eval_model(), self.loaders["val"], self.device, self.cfg.train.amp)
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        check_weights_finite(self.model, self.epoch, self.step)  # `last` and `best` are only ever finite weights
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

    # -- stopping and finishing ------------------------------------------------------------------------------
    def _note_signal(self, signum: int) -> None:
        self._stop_signal = self._stop_signal or signum

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
        check_weights_finite(self.model, self.epoch, self.step)
        self.save("last")
        barrier()  # no rank exits (and gets the job step killed) before rank 0 has written the checkpoint
        where = (f"epoch {epoch}, batch {self.batch_in_epoch}" if self.batch_in_epoch else
                 f"the end of epoch {epoch}") + f", step {self.step}"
        message, exit_code = stop_message(self._stop_signal or signal.SIGTERM, where, self.env.is_main)
        self.log.write(message)  # the CLI prints it
        self.log.close()
        raise TrainingStopped(message, exit_code)

    def _finish(self, wall: float, train_time: float, train_images: int) -> dict[str, Any]:
        """Test, write results.json (and a LoRA run's adapter and merged weights), close the log."""
        test = evaluate(self.eval_model(), self.loaders["test"], self.device, self.cfg.train.amp)
        out = summary.results(self, test, wall, train_time, train_images)
        if self.env.is_main:
            self.directory.finish(out, self.cfg, self.eval_model(), metadata(self))
        self.log.record("test", step=self.step, loss=test["loss"], top1=test["top1"], top5=test["top5"])
        self.log.finish(out, self.directory.artefacts())  # the trackers: results, config, final weights
        self.log.info(summary.test_line(test, wall, self.run_dir))
        self.log.close()
        return out


def train(cfg: Config, reload: bool = False, stream=None, local: bool = False,
          command: str | None = None) -> dict[str, Any]:
    """Train `cfg` to the end (resuming when `reload`), test, and return results.json's content; then, on
    rank 0, write the export layout and upload the run when asked. `command`: the vitlab command line the run
    stands for, logged first (a translated command of an original project shows its equivalent).

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
            trainer.release(failed=isinstance(sys.exc_info()[1], Exception))  # an error, not Ctrl-C
            del trainer
            gc.collect()
    if env.is_main:  # outside the group: a long upload cannot time out the other ranks' exit barrier
        publish(cfg, results, hub)
    return results
