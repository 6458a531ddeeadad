"""Checkpoints: `model.safetensors` (+ `ema.safetensors`) and `trainer_state.pt`, written atomically.

A checkpoint is a directory (`checkpoints/last`, `checkpoints/best`). It is first written completely into a
temporary sibling with a `manifest.json` of every file's SHA-256 (written last, so a manifest means a complete
copy), fsynced, then swapped in with two renames; if a kill lands between the renames the previous checkpoint
survives as `<name>.old`. The previous one is only removed once the new one is in place, so at every moment
one complete checkpoint is on disk, whatever sequence of crashes came before. Loading verifies the digests;
`newest_intact` picks the newest checkpoint that verifies, for `--reload`.

A checkpoint directory is not trusted (it may be downloaded, copied or tampered with): vitlab never writes
symbolic links into one, so a checkpoint that is a link, or that holds links, FIFOs, devices or folders where
its files go, does not verify; a manifest must be a small object naming plain files of this directory with
SHA-256 digests, and every weights or state file present must be listed in it. Nothing outside the
directory is read, hashed or deleted on a checkpoint's behalf.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from ..errors import VitlabError

MODEL_FILE, EMA_FILE, STATE_FILE = "model.safetensors", "ema.safetensors", "trainer_state.pt"
MANIFEST_FILE = "manifest.json"
MANIFEST_LIMIT = 1 << 20  # a manifest lists a handful of files
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
    except (OSError, RuntimeError, SafetensorError) as exc:  # torch.save: a full disk is a RuntimeError
        why = write_failure(exc, path.parent)  # before the temporary goes: its bytes are what filled the disk
        shutil.rmtree(tmp, ignore_errors=True)
        kept = ("the previous checkpoints are intact (free space, then --reload)" if candidates(path.parent) else
                "no checkpoint was saved before it (free space, then start again; --savefile NAME for a new run)")
        raise VitlabError(f"could not write checkpoint '{path}': {why}; {kept}") from None
    try:
        old = path.with_name(path.name + ".old")
        if path.exists() or path.is_symlink():  # the current one becomes .old (an .old from a crash goes first)
            if old.exists() or old.is_symlink():
                remove(old)
            os.replace(path, old)
        # without a current one (a crash between renames), the .old stays until the new one is in place
        os.replace(tmp, path)
        _fsync(path.parent)
        remove(old, ignore_errors=True)
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


def write_failure(exc: BaseException, folder: Path) -> str:
    """Why writing into `folder` failed, as a phrase: 'no space left on device' for a full disk however the
    writer reports it (OSError ENOSPC; safetensors' SafetensorError 'os error 28'; torch.save's RuntimeError
    'unexpected pos' with the disk nearly full), else the error's first line."""
    text = str(exc).strip()
    full = getattr(exc, "errno", None) == errno.ENOSPC or "os error 28" in text or "No space left" in text
    if not full and isinstance(exc, RuntimeError):
        try:
            full = shutil.disk_usage(folder).free < (1 << 20)
        except OSError:
            pass
    return "no space left on device" if full else (text.splitlines() or [type(exc).__name__])[0][:200]


def save_weights(file: Path, weights: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """One safetensors file, written to a temporary sibling and renamed into place; a full disk (or another
    write error) is one line, and whatever was at `file` before stays."""
    fd, name = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".tmp", dir=file.parent)  # exclusive: no link
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in weights.items()}, name, metadata=metadata)
        os.chmod(name, 0o644)
        os.replace(name, file)
    except (OSError, SafetensorError) as exc:
        why = write_failure(exc, file.parent)
        Path(name).unlink(missing_ok=True)
        raise VitlabError(f"could not write '{file}': {why}; the run's checkpoints are intact (free space, then "
                          f"--reload finishes the run)") from None
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def remove(path: Path, ignore_errors: bool = False) -> None:
    """Delete a checkpoint directory, or only the link when it is a symbolic link (never what it points at)."""
    path = Path(path)
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path)
    except OSError:
        if not ignore_errors:
            raise


def _digest(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _kind(path: Path) -> str | None:
    """None for a plain file; else what it is instead ('missing', 'a symbolic link', 'a folder', ...)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if stat.S_ISREG(mode):
        return None
    return ("a symbolic link" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode)
            else "not a regular file (a FIFO, device or socket)")


def damage(ckpt_dir: Path, need_state: bool = False) -> str | None:
    """Why the checkpoint directory cannot be trusted (a link, missing, truncated or altered files, a manifest
    that is not vitlab's), or None if it verifies. Checkpoints from before manifests are checked by parsing the
    safetensors header. Only plain files inside `ckpt_dir` are read; `need_state`: its trainer state too."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.is_symlink():
        return "it is a symbolic link (vitlab never writes one; not followed)"
    if not ckpt_dir.is_dir():
        return "it is not a folder"
    manifest = ckpt_dir / MANIFEST_FILE
    present = {n: _kind(ckpt_dir / n) for n in (MODEL_FILE, EMA_FILE, STATE_FILE, MANIFEST_FILE)}
    odd = next((f"{n} is {k}" for n, k in present.items() if k not in (None, "missing")), None)
    if odd:
        return odd
    if present[MANIFEST_FILE] == "missing":
        if present[MODEL_FILE] == "missing":
            return f"no {MODEL_FILE}"
        if need_state and present[STATE_FILE] == "missing":
            return f"no {STATE_FILE}"
        try:
            read_metadata(ckpt_dir / MODEL_FILE)
        except Exception as exc:  # safetensors raises its own error types for a bad header
            return f"{MODEL_FILE} is unreadable ({type(exc).__name__})"
        return None
    expected = _read_manifest(manifest)
    if isinstance(expected, str):
        return expected
    unlisted = [n for n in (MODEL_FILE, EMA_FILE, STATE_FILE) if present[n] is None and n not in expected]
    if unlisted:
        return f"{unlisted[0]} is not in {MANIFEST_FILE} (added after the save?)"
    for name in [MODEL_FILE] + ([STATE_FILE] if need_state else []):
        if name not in expected:
            return f"{MANIFEST_FILE} does not list {name}"
    for name, digest in expected.items():
        f = ckpt_dir / name
        kind = _kind(f)
        if kind is not None:
            return f"{name} is {kind}"
        if _digest(f) != digest:
            return f"{name} does not match its digest (truncated or altered)"
    return None


def _read_manifest(manifest: Path) -> dict[str, str] | str:
    """The manifest's {file name: sha256}, or why it is not one vitlab wrote."""
    try:
        size = os.lstat(manifest).st_size
        if size > MANIFEST_LIMIT:
            return f"{MANIFEST_FILE} is {size} bytes, not a manifest vitlab wrote"
        expected = json.loads(manifest.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return f"{MANIFEST_FILE} is unreadable"
    if not isinstance(expected, dict) or not expected:
        return f"{MANIFEST_FILE} is not an object of file digests"
    for name, digest in expected.items():
        if not _PLAIN_NAME.fullmatch(name) or name == MANIFEST_FILE:
            return f"{MANIFEST_FILE} names {name[:60]!r}, not a file of this checkpoint"
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            return f"{MANIFEST_FILE} holds a digest for {name} that is not a SHA-256"
    return expected


def verified(file: Path) -> Path:
    """`file` (a checkpoint's weights) after checking its directory's digests; one line if damaged."""
    file = Path(file)
    if (file.parent / MANIFEST_FILE).exists() or (file.parent / MANIFEST_FILE).is_symlink() \
            or file.name == MODEL_FILE:
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
    return [c for c in found if c.is_symlink() or (c.exists() and not c.is_dir()) or (c.is_dir() and any(c.iterdir()))]


def newest_intact(checkpoints: Path) -> tuple[Path | None, list[str]]:
    """(the intact checkpoint with the most optimizer steps, or None; 'name (why)' for each one skipped).
    A temporary counts only when its manifest was written, i.e. when it is complete."""
    best, skipped = None, []
    for c in candidates(checkpoints):
        if c.name.startswith(".") and not (c / MANIFEST_FILE).is_file():
            continue  # an unfinished temporary: not a checkpoint yet
        why = damage(c, need_state=True)
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
        if keep is None or tmp.is_symlink() or tmp.absolute() != Path(keep).absolute():
            remove(tmp, ignore_errors=True)


def existing(path: Path) -> Path | None:
    """`path` if complete, else its `.old` twin left by a kill mid-swap, else None."""
    for p in (Path(path), Path(path).with_name(Path(path).name + ".old")):
        if not p.is_symlink() and (p / MODEL_FILE).is_file():
            return p
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a model.safetensors file, a checkpoint dir, or a run dir (-> checkpoints/best, then last)."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".safetensors":
        return p
    if p.exists() and not p.is_dir():
        raise VitlabError(f"'{p}' is not a checkpoint: pass a run directory, a checkpoint directory or a "
                          f"model.safetensors file")
    links = [c for c in (p / "checkpoints", p / "checkpoints" / "best", p / "checkpoints" / "last")
             if c.is_symlink()]
    if links:
        raise VitlabError(f"'{links[0]}' is a symbolic link; vitlab reads a run's checkpoints only inside its "
                          f"directory and does not follow links there")
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
    """The trainer state, unpickled with torch's weights_only loader (no code runs); a plain file only."""
    kind = _kind(Path(ckpt_dir) / STATE_FILE)
    if kind is not None:
        raise VitlabError(f"{Path(ckpt_dir) / STATE_FILE} is {kind}")
    return torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=True)
