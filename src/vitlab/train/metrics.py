"""Run logging: per-batch JSON lines, a human-readable log, TensorBoard scalars and a progress display.

Per-batch values arrive as device tensors and are converted in one `tolist()` per `log_every` batches, so
the hot loop never waits on the GPU for logging.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch


class RunLogger:
    def __init__(self, run_dir: Path, tensorboard: bool = True, progress: str = "auto", append: bool = False,
                 stream: TextIO | None = None):
        self.run_dir = Path(run_dir)
        mode = "a" if append else "w"
        self.jsonl = open(self.run_dir / "metrics.jsonl", mode, buffering=1)
        self.log_file = open(self.run_dir / "train.log", mode, buffering=1)
        self.stream = stream or sys.stdout
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.run_dir / "tb"))
        if progress == "auto":
            progress = "bar" if self.stream.isatty() else "plain"
        self.progress = progress
        self.bar = None

    # -- lines -------------------------------------------------------------------------------------------
    def info(self, text: str) -> None:
        """A line for the user and for train.log."""
        self.log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        if self.progress != "none":
            (self.bar.write if self.bar is not None else self._print)(text)

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def record(self, kind: str, **values: Any) -> None:
        """One JSON line; numbers also go to TensorBoard under `kind/key` at the record's step."""
        self.jsonl.write(json.dumps({"kind": kind, **values}) + "\n")
        if self.tb is not None and "step" in values:
            for k, v in values.items():
                if k not in ("step", "epoch", "batch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, values["step"])

    # -- per-batch training values -----------------------------------------------------------------------
    def batches(self, epoch: int, first_batch: int, first_step: int, losses: list[torch.Tensor],
                correct: list[torch.Tensor], sizes: list[int], lrs: list[float]) -> tuple[float, float]:
        """Write buffered per-batch records; returns (mean loss, accuracy) of the buffer."""
        loss_vals = torch.stack(losses).float().tolist()
        correct_vals = torch.stack(correct).tolist()
        lines = []
        for i, (loss, c, n, lr) in enumerate(zip(loss_vals, correct_vals, sizes, lrs)):
            batch, step = first_batch + i, first_step + i
            self.record("train_batch", epoch=epoch, batch=batch, step=step, loss=loss, acc=c / n, lr=lr)
            lines.append(f"epoch {epoch} batch {batch} step {step} loss {loss:.4f} acc {c / n:.3f} lr {lr:.3e}")
        self.log_file.write("\n".join(lines) + "\n")
        return sum(loss_vals) / len(loss_vals), sum(correct_vals) / sum(sizes)

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

    def close(self) -> None:
        self.end_epoch()
        for f in (self.jsonl, self.log_file):
            f.close()
        if self.tb is not None:
            self.tb.close()


def _hms(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
