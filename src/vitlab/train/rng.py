"""Random number streams: seeding, the states a checkpoint keeps, and replaying an epoch's data stream to the
batch a mid-epoch checkpoint was written at."""
from __future__ import annotations

import random
from typing import Any, Iterator

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """torch, Python and NumPy from one seed; NumPy's are 32-bit, so seed + rank past 2**32 - 1 wraps (the
    config keeps train.seed itself in range)."""
    seed %= 2 ** 32
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> dict[str, Any]:
    """torch, Python, NumPy and CUDA generator states, in tensors and lists (a weights-only torch.load reads them)."""
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


def replay_from(loader, start: int, epoch_rng: dict[str, Any]) -> Iterator:
    """The epoch's batches from batch `start`: the stream is rebuilt from the RNG states the epoch started with
    (DataLoader workers draw their seeds there), advanced past the batches already trained, and the RNG states
    of this moment are put back."""
    now = rng_state()
    set_rng_state(epoch_rng)
    if hasattr(loader, "batches_from"):  # in-memory data: skip without transforming
        batches = loader.batches_from(start)
    else:
        batches = iter(loader)
        for _ in range(start):
            next(batches)
    set_rng_state(now)
    return batches
