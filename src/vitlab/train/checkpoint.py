"""Checkpoints: `model.safetensors` (+ `ema.safetensors`) and `trainer_state.pt`, written atomically.

A checkpoint is a directory (`checkpoints/last`, `checkpoints/best`). It is first written completely into a
temporary sibling, fsynced, then swapped in with two renames; if a kill lands between the renames the
previous checkpoint survives as `<name>.old` and `resolve_checkpoint` falls back to it. So at every moment
one complete checkpoint is on disk.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from ..errors import VitlabError

MODEL_FILE, EMA_FILE, STATE_FILE = "model.safetensors", "ema.safetensors", "trainer_state.pt"


def model_metadata(model: nn.Module, config_yaml: str, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """safetensors metadata (strings only): how to rebuild the model, and the run's resolved config."""
    meta = {"model_name": model.vitlab_name, "model_args": json.dumps(model.vitlab_args), "config": config_yaml}
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    return meta


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _state_dict(weights: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = weights.state_dict() if isinstance(weights, nn.Module) else weights
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def save_checkpoint(path: Path, model: nn.Module | dict[str, torch.Tensor], metadata: dict[str, str],
                    trainer_state: dict[str, Any] | None,
                    ema: nn.Module | dict[str, torch.Tensor] | None = None) -> None:
    """Atomically replace the checkpoint directory `path` (weights given as a module or a state dict)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file(_state_dict(model), tmp / MODEL_FILE, metadata=metadata)
        if ema is not None:
            save_file(_state_dict(ema), tmp / EMA_FILE, metadata=metadata)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / STATE_FILE)
        for f in tmp.iterdir():
            _fsync(f)
        old = path.with_name(path.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_weights(file: Path, weights: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """One safetensors file, written to a temporary sibling and renamed into place."""
    tmp = file.with_name(f".{file.name}.tmp")
    save_file({k: v.contiguous() for k, v in weights.items()}, tmp, metadata=metadata)
    os.replace(tmp, file)


def existing(path: Path) -> Path | None:
    """`path` if complete, else its `.old` twin left by a kill mid-swap, else None."""
    for p in (Path(path), Path(path).with_name(Path(path).name + ".old")):
        if (p / MODEL_FILE).is_file():
            return p
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a model.safetensors file, a checkpoint dir, or a run dir (-> checkpoints/best, then last)."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".safetensors":
        return p
    candidates = [p, p / "checkpoints" / "best", p / "checkpoints" / "last"]
    for c in candidates:
        found = existing(c)
        if found is not None:
            return found / MODEL_FILE
    raise VitlabError(f"no checkpoint at '{p}'; pass a run directory, a checkpoint directory "
                      f"(…/checkpoints/best) or a model.safetensors file")


def read_metadata(file: Path) -> dict[str, str]:
    with safe_open(str(file), framework="pt") as f:
        return f.metadata() or {}


def load_weights(file: Path) -> dict[str, torch.Tensor]:
    return load_file(str(file))


def load_trainer_state(ckpt_dir: Path) -> dict[str, Any]:
    return torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=True)
