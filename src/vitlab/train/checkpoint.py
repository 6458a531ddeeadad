"""Checkpoints: `model.safetensors` (+ `ema.safetensors`) and `trainer_state.pt`, written atomically.

A checkpoint is a directory (`checkpoints/last`, `checkpoints/best`). It is first written completely into a
temporary sibling with a `manifest.json` of every file's SHA-256 (written last, so a manifest means a complete
copy), fsynced, then swapped in with two renames; if a kill lands between the renames the previous checkpoint
survives as `<name>.old`. The previous one is only removed once the new one is in place, so at every moment
one complete checkpoint is on disk, whatever sequence of crashes came before. Loading verifies the digests;
`newest_intact` picks the newest checkpoint that verifies, for `--reload`.
"""
from __future__ import annotations

import errno
import hashlib
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
MANIFEST_FILE = "manifest.json"


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
        _write_files(tmp, model, metadata, trainer_state, ema)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        full = getattr(exc, "errno", None) == errno.ENOSPC or shutil.disk_usage(path.parent).free < (1 << 20)
        why = "no space left on the device" if full else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise VitlabError(f"could not write checkpoint '{path}': {why}; the previous checkpoint is intact "
                          f"(free space, then --reload)") from None
    try:
        old = path.with_name(path.name + ".old")
        if path.exists():  # the current one becomes .old (an .old from an earlier crash goes first)
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        # without a current one (a crash between renames), the .old stays until the new one is in place
        os.replace(tmp, path)
        _fsync(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_files(tmp: Path, model, metadata: dict[str, str], trainer_state, ema) -> None:
    """The checkpoint's files into `tmp`, the manifest of their digests last, all fsynced."""
    save_file(_state_dict(model), tmp / MODEL_FILE, metadata=metadata)
    if ema is not None:
        save_file(_state_dict(ema), tmp / EMA_FILE, metadata=metadata)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / STATE_FILE)
    manifest = {f.name: _digest(f) for f in sorted(tmp.iterdir())}
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    for f in tmp.iterdir():
        _fsync(f)


def save_weights(file: Path, weights: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """One safetensors file, written to a temporary sibling and renamed into place."""
    tmp = file.with_name(f".{file.name}.tmp")
    save_file({k: v.contiguous() for k, v in weights.items()}, tmp, metadata=metadata)
    os.replace(tmp, file)


def _digest(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def damage(ckpt_dir: Path) -> str | None:
    """Why the checkpoint directory cannot be trusted (missing, truncated or altered files), or None if it
    verifies. Checkpoints from before manifests are checked by parsing the safetensors header."""
    ckpt_dir = Path(ckpt_dir)
    manifest = ckpt_dir / MANIFEST_FILE
    if not manifest.is_file():
        if not (ckpt_dir / MODEL_FILE).is_file():
            return f"no {MODEL_FILE}"
        try:
            read_metadata(ckpt_dir / MODEL_FILE)
        except Exception as exc:  # safetensors raises its own error types for a bad header
            return f"{MODEL_FILE} is unreadable ({type(exc).__name__})"
        return None
    try:
        expected = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return f"{MANIFEST_FILE} is unreadable"
    for name, digest in expected.items():
        f = ckpt_dir / name
        if not f.is_file():
            return f"{name} is missing"
        if _digest(f) != digest:
            return f"{name} does not match its digest (truncated or altered)"
    return None


def verified(file: Path) -> Path:
    """`file` (a checkpoint's weights) after checking its directory's digests; one line if damaged."""
    file = Path(file)
    if (file.parent / MANIFEST_FILE).is_file() or file.name == MODEL_FILE:
        why = damage(file.parent)
        if why is not None:
            raise VitlabError(f"checkpoint '{file.parent}' is damaged: {why}; use another checkpoint of the run "
                              f"(checkpoints/best or checkpoints/last)")
    return file


def candidates(checkpoints: Path) -> list[Path]:
    """Every checkpoint a resume could start from, in order of preference at equal step: last, its .old twin,
    complete temporaries a kill left behind, best."""
    checkpoints = Path(checkpoints)
    found = [checkpoints / "last", checkpoints / "last.old", *sorted(checkpoints.glob(".last.tmp-*")),
             checkpoints / "best", checkpoints / "best.old", *sorted(checkpoints.glob(".best.tmp-*"))]
    return [c for c in found if c.is_dir() and any(c.iterdir())]


def newest_intact(checkpoints: Path) -> tuple[Path | None, list[str]]:
    """(the intact checkpoint with the most optimizer steps, or None; 'name (why)' for each one skipped).
    A temporary counts only when its manifest was written, i.e. when it is complete."""
    best, skipped = None, []
    for c in candidates(checkpoints):
        if c.name.startswith(".") and not (c / MANIFEST_FILE).is_file():
            continue  # an unfinished temporary: not a checkpoint yet
        why = damage(c)
        if why is None:
            try:
                step = load_trainer_state(c)["step"]
            except Exception as exc:  # a missing or unreadable trainer state in a pre-manifest checkpoint
                why = f"{STATE_FILE} is unreadable ({type(exc).__name__})"
        if why is not None:
            skipped.append(f"{c.name} ({why})")
        elif best is None or step > best[0]:
            best = (step, c)
    return (best[1] if best else None), skipped


def remove_stale_temporaries(checkpoints: Path, keep: Path | None = None) -> None:
    """Temporaries left by a kill mid-save (the one a resume started from is kept until replaced)."""
    for tmp in Path(checkpoints).glob(".*.tmp-*"):
        if keep is None or tmp.resolve() != Path(keep).resolve():
            shutil.rmtree(tmp, ignore_errors=True)


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
