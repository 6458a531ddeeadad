"""Run logging: per-batch JSON lines, a human-readable log, the experiment trackers (TensorBoard, CSV, W&B,
MLflow: `trackers`) and a progress display.

The trainer buffers per-batch values as device tensors and converts them in one `tolist()` per `log_every`
batches, so the hot loop never waits on the GPU for logging. Only rank 0 logs; other ranks get `NullLogger`.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from ..names import printable

class BatchBuffer:
    """Per-batch training values (loss, accuracy, lr, a model's auxiliary terms and metrics), kept as device
    tensors until `flush`: one all-reduce over ranks and one device-to-host copy per `log_every` batches."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sizes: list[int] = []
        self.lrs: list[float] = []
        self.steps: list[int] = []  # the optimizer step each batch counts towards (micro-batches share one)
        self.rows: list[torch.Tensor] = []  # per batch: (loss, hits, *extras) sums over the batch's samples
        self.keys: list[str] = []

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def samples(self) -> int:
        """This rank's samples in the buffer."""
        return sum(self.sizes)

    def add(self, size: int, loss: torch.Tensor, hits: torch.Tensor, lr: float,
            extras: dict[str, torch.Tensor], step: int) -> None:
        """`loss` and `extras` are batch means, `hits` a count; the first batch fixes the extras' keys."""
        if not self.rows:
            self.keys = list(extras)
        values = [loss.detach().float() * size, hits.float(), *(extras[k].detach().float() * size for k in self.keys)]
        self.rows.append(torch.stack(values))
        self.sizes.append(size)
        self.lrs.append(lr)
        self.steps.append(step)

    def flush(self, reduce) -> list[dict[str, float]]:
        """Per-batch records {loss, acc, lr, *extras}, averaged over every rank's samples; empties the buffer.
        `reduce` sums a tensor over ranks."""
        n = torch.tensor(self.sizes, dtype=torch.float64).to(self.device, non_blocking=True)
        sums = reduce(torch.cat([torch.stack(self.rows).double(), n[:, None]], dim=1))  # (k, 2 + extras + 1)
        records = []
        for row, lr in zip(sums.tolist(), self.lrs):
            count = row[-1]
            rec = {"loss": row[0] / count, "acc": row[1] / count, "lr": lr}
            rec.update({k: v / count for k, v in zip(self.keys, row[2:-1])})
            records.append(rec)
        self.sizes, self.lrs, self.rows, self.steps = [], [], [], []
        return records


class EpochLog:
    """One epoch's per-batch training values and validation losses, buffered on the device and written
    together at each `flush` (one reduction over ranks and one device-to-host copy for each kind)."""

    def __init__(self, log, device: torch.device, reduce, world_size: int, epoch: int, epochs: int, start: int,
                 n_batches: int):
        self.log, self.reduce, self.world = log, reduce, world_size
        self.epoch, self.epochs, self.start, self.n_batches = epoch, epochs, start, n_batches
        self.buffer, self.pending_val = BatchBuffer(device), []
        self.first_batch = start + 1  # of the records not yet written
        self.t0 = self.t_flush = time.perf_counter()
        log.start_epoch(epoch, epochs, n_batches)

    def val(self, batch: int, step: int, loss: torch.Tensor) -> None:
        self.pending_val.append((self.epoch, batch, step, loss))

    def flush(self, batches_done: int, batches_left: int, check) -> None:
        """Write what is buffered after batch `batches_done` of the epoch; `check(first_batch, steps, records)`
        sees the training records first (it may stop the run before they are written)."""
        if self.pending_val:  # validation losses: the mean over ranks
            values = (self.reduce(torch.stack([p[3] for p in self.pending_val])) / self.world).tolist()
            self.log.val_batches([(e, b, s, loss) for (e, b, s, _), loss in zip(self.pending_val, values)])
            self.pending_val.clear()
        count, samples, sizes, steps = (len(self.buffer), self.buffer.samples, list(self.buffer.sizes),
                                        list(self.buffer.steps))
        records = self.buffer.flush(self.reduce)
        check(self.first_batch, steps, records)
        self.log.batches(self.epoch, self.first_batch, steps, records)
        now = time.perf_counter()
        eta = batches_left * (now - self.t0) / (batches_done - self.start)
        mean = lambda key: sum(r[key] * n for r, n in zip(records, sizes)) / samples  # noqa: E731
        self.log.update(count, self.epoch, self.epochs, batches_done, self.n_batches, mean("loss"), mean("acc"),
                        samples * self.world / (now - self.t_flush), eta)
        self.first_batch, self.t_flush = batches_done + 1, now


def kept_on_resume(kind: str, at_epoch: int, at_step: int, epoch: int, step: int) -> bool:
    """Whether a record written before a resume from a checkpoint at (`epoch` complete, `step`) stays: the
    epochs done, and the batches of the epoch in progress up to that step; later ones are replayed. The one
    rule for metrics.jsonl and every tracker file that can be cut back (the CSV files)."""
    return at_epoch <= epoch or (kind in ("train_batch", "val_batch") and at_step <= step)


class RunLogger:
    def __init__(self, run_dir: Path, trackers: list | None = None, progress: str = "auto", append: bool = False,
                 stream: TextIO | None = None):
        self.run_dir = Path(run_dir)
        mode = "a" if append else "w"
        self.jsonl = open(self.run_dir / "metrics.jsonl", mode, buffering=1)
        self.log_file = open(self.run_dir / "train.log", mode, buffering=1)
        self.stream = stream or sys.stdout
        self.trackers = list(trackers or [])  # vitlab.train.trackers.Tracker
        self.closed = False
        if progress == "auto":
            progress = "bar" if self.stream.isatty() else "plain"
        self.progress = progress
        self.bar = None

    # -- lines -------------------------------------------------------------------------------------------
    def info(self, text: str) -> None:
        """A line for the user and for train.log; a name's control characters show escaped, so one call is
        one line (vitlab.names.printable)."""
        text = printable(text)
        self.log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        if self.progress != "none":
            (self.bar.write if self.bar is not None else self._print)(text)

    def write(self, text: str) -> None:
        """A line for train.log only."""
        self.log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {printable(text)}\n")

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def record(self, kind: str, **values: Any) -> None:
        """One JSON line; every tracker gets the record too, at its optimizer step."""
        self.jsonl.write(json.dumps({"kind": kind, **values}) + "\n")
        self._track("log", kind, values, values.get("step", 0))

    def finish(self, results: dict[str, Any], files: list[Path]) -> None:
        """The trackers get the results and the run's files (config, results, final weights)."""
        self._track("finish", results, files)

    def _track(self, method: str, *args: Any) -> None:
        """Call `method` on every tracker. A tracker that fails (a full disk, a lost server) is dropped with a
        line in the log: it never ends the training run, whose own files are complete without it."""
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # noqa: BLE001  (any tracker's error; the run goes on)
                self.trackers.remove(tracker)
                with contextlib.suppress(Exception):
                    tracker.close(failed=True)
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                self.info(f"warning: logger {type(tracker).__name__} stopped ({type(exc).__name__}: {first}); "
                          f"metrics.jsonl has every record")

    # -- per-batch training values -----------------------------------------------------------------------
    def batches(self, epoch: int, first_batch: int, steps: list[int], records: list[dict[str, float]]) -> None:
        """Write buffered per-batch records (values already reduced over ranks); `steps`: each one's optimizer
        step (with train.accum_steps > 1 the micro-batches of a step share it)."""
        lines = []
        for i, rec in enumerate(records):
            batch, step = first_batch + i, steps[i]
            self.record("train_batch", epoch=epoch, batch=batch, step=step, **rec)
            extra = "".join(f" {k} {v:.4g}" for k, v in rec.items() if k not in ("loss", "acc", "lr"))
            lines.append(f"epoch {epoch} batch {batch} step {step} loss {rec['loss']:.4f} acc {rec['acc']:.3f} "
                         f"lr {rec['lr']:.3e}{extra}")
        self.log_file.write("\n".join(lines) + "\n")

    def val_batches(self, records: list[tuple[int, int, int, float]]) -> None:
        """(epoch, batch, step, loss) of validation batches logged during training (the classic-vs-differential
        project's per-batch validation loss), as JSON lines and log lines."""
        for epoch, batch, step, loss in records:
            self.record("val_batch", epoch=epoch, batch=batch, step=step, loss=loss)
        self.log_file.write("".join(f"epoch {e} batch {b} step {s} val_loss {v:.4f}\n" for e, b, s, v in records))

    # -- progress ----------------------------------------------------------------------------------------
    def start_epoch(self, epoch: int, epochs: int, total_batches: int) -> None:
        if self.progress == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=total_batches, desc=f"epoch {epoch}/{epochs}", file=self.stream,
                            dynamic_ncols=True, leave=True)

    def update(self, n_batches: int, epoch: int, epochs: int, batch: int, total: int, loss: float, acc: float,
               img_s: float, eta_s: float) -> None:
        if self.bar is not None:
            self.bar.update(n_batches)
            self.bar.set_postfix_str(f"loss {loss:.4f} acc {acc:.3f} {img_s:,.0f} img/s eta {_hms(eta_s)}")
        elif self.progress == "plain":
            self._print(f"epoch {epoch}/{epochs} batch {batch}/{total} loss {loss:.4f} acc {acc:.3f} "
                        f"{img_s:,.0f} img/s eta {_hms(eta_s)}")

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self, failed: bool = False) -> None:
        """Close the files and the trackers (`failed`: the run raised; MLflow marks it FAILED)."""
        self.end_epoch()
        self._track("close", failed)
        for f in (self.jsonl, self.log_file):
            f.close()
        self.closed = True


class NullLogger:
    """The logger of ranks other than 0: data-parallel jobs write one run directory and print once."""
    closed = True

    def info(self, text: str) -> None: ...
    def write(self, text: str) -> None: ...
    def record(self, kind: str, **values: Any) -> None: ...
    def finish(self, *args: Any) -> None: ...
    def batches(self, *args: Any) -> None: ...
    def val_batches(self, *args: Any) -> None: ...
    def start_epoch(self, *args: Any) -> None: ...
    def update(self, *args: Any) -> None: ...
    def end_epoch(self) -> None: ...
    def close(self, failed: bool = False) -> None: ...


def _hms(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
