"""Evaluation (loss, top-1, top-5 over a whole split), checkpoint loading and prediction."""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..errors import VitlabError
from ..objective import as_output
from ..registry import MAX_DEPTH, MAX_LIST, MAX_MODEL_NUMBER
from ..resolve import build
from .build import rebuild_model
from ..untrusted import load_yaml
from .checkpoint import EMA_FILE, load_weights, read_metadata, resolve_checkpoint, verified
from .distributed import all_reduce_sum
from .segmentation import confusion, iou_dice


def autocast(device: torch.device, amp: str):
    """bf16 (or fp16) autocast on CUDA; nothing on CPU unless asked for."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, amp: str = "auto") -> dict[str, float]:
    """Mean cross-entropy, top-1 and top-5 accuracy (fractions) over every sample of `loader`; for
    segmentation (logits (B, K, H, W) against masks (B, H, W)) the same per pixel, plus mean IoU and Dice.

    Under data parallelism each rank passes its shard; the sums (and the confusion matrix) are reduced over
    ranks in one collective each, and padding labelled -100 counts nowhere, so the result equals a
    one-process evaluation."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits, samples
    matrix = None  # segmentation's confusion matrix
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = as_output(model(x)).logits
        logits = logits.float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(y.unsqueeze(1))  # (B, k[, H, W]); a -100 label never hits
        totals += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(), hits[:, 0].sum(),
                               hits.any(dim=1).sum(), (y >= 0).sum()]).double()
        if logits.ndim == 4:
            part = confusion(logits.argmax(1), y, logits.shape[1])
            matrix = part if matrix is None else matrix + part
    model.train(was_training)
    loss_sum, top1, top5, n = all_reduce_sum(totals).tolist()
    if n == 0:
        raise VitlabError("the evaluation split is empty; lower data.val_fraction/test_fraction or add data")
    out = {"loss": loss_sum / n, "top1": top1 / n, "top5": top5 / n, "n": int(n)}
    if matrix is not None:
        out.update(iou_dice(all_reduce_sum(matrix)))
    return out


def validation_batch_loss(model: nn.Module, it, loader: Iterable, device: torch.device, amp: str):
    """(iterator, loss tensor) of the next batch of `loader` (started or restarted as needed), in eval mode:
    the per-batch validation loss logged during training, as the classic-vs-differential project logs it."""
    if it is None:
        it = iter(loader)
    try:
        x, y = next(it)
    except StopIteration:
        it = iter(loader)
        x, y = next(it)
    model.eval()
    with torch.no_grad(), autocast(device, amp):
        logits = as_output(model(x.to(device))).logits
        loss = F.cross_entropy(logits.float(), y.to(device))  # ignores -100 padding
    model.train()
    return it, loss


def load_checkpoint(path: str | Path, use_ema: bool = True) -> tuple[nn.Module, Config, dict]:
    """Rebuild the model saved at `path` (file, checkpoint dir or run dir); EMA weights when present."""
    file = verified(resolve_checkpoint(path))
    try:
        meta = read_metadata(file)
    except Exception as exc:  # safetensors' own error types: a truncated or foreign file
        raise VitlabError(f"'{file}' is not a readable safetensors file ({type(exc).__name__}: it may be truncated "
                          f"or empty); pass another checkpoint") from None
    if "model_name" not in meta:
        raise VitlabError(f"'{file}' has no vitlab metadata; use vitlab.load_pretrained() for foreign weights")
    stored = load_yaml(meta.get("config", ""), f"the config stored in '{file}'")
    if not isinstance(stored, dict):
        raise VitlabError(f"the config stored in '{file}' is not a mapping; it is not a checkpoint vitlab wrote")
    cfg = build(stored)
    name, args, extra = _model_metadata(file, meta)
    ema = file.with_name(EMA_FILE)
    source = ema if use_ema and ema.is_file() and not ema.is_symlink() else file
    _check_fits(source, name, args, cfg, adapter=file.name == "adapter.safetensors")
    model = rebuild_model(name, args, cfg)
    weights = load_weights(source)
    if file.name == "adapter.safetensors":  # the adapter alone: the base comes from the run's pretrained file
        if not cfg.model.pretrained:
            raise VitlabError(f"'{file}' holds a LoRA adapter but its run names no model.pretrained base; "
                              f"load the run's merged.safetensors or a full checkpoint instead")
        from ..pretrained import load_pretrained
        load_pretrained(model, cfg.model.pretrained)
        _, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected:
            raise VitlabError(f"'{file}' does not fit its run's model: unexpected {unexpected[:4]}")
    else:
        try:
            model.load_state_dict(weights)
        except RuntimeError as exc:
            raise VitlabError(f"'{file}' does not fit the model its metadata names ({meta['model_name']}): "
                              f"{str(exc).splitlines()[0]}") from None
    return model.eval(), cfg, extra


def _model_metadata(file: Path, meta: dict[str, str]) -> tuple[str, dict, dict]:
    """(model name, its arguments, the other metadata) of a weights file, refused with one line when they are
    not what vitlab writes: not JSON, not a mapping, or holding numbers no model could be built with."""
    bad = f"'{file}' holds checkpoint metadata vitlab did not write"
    try:
        args = json.loads(meta["model_args"])
        extra = {k: json.loads(v) for k, v in meta.items() if k not in ("model_name", "model_args", "config")}
    except (KeyError, ValueError, RecursionError):
        raise VitlabError(f"{bad} (model_args or another entry is not JSON)") from None
    if not isinstance(args, dict) or not isinstance(meta["model_name"], str):
        raise VitlabError(f"{bad} (model_args is not a mapping)")
    if not isinstance(extra.get("dataset_info", {}), dict):
        raise VitlabError(f"{bad} (dataset_info is not a mapping)")

    def numbers(value):
        if isinstance(value, (list, tuple)):
            for v in value:
                yield from numbers(v)
        elif isinstance(value, dict):
            for v in value.values():
                yield from numbers(v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield value

    for key, value in args.items():
        found = list(numbers(value))
        for x in found:
            if not abs(x) <= MAX_MODEL_NUMBER:  # also NaN
                raise VitlabError(f"{bad}: model argument {key}={x!r} is beyond any model vitlab builds "
                                  f"(at most {MAX_MODEL_NUMBER}); refusing to build it")
        if "depth" in key and sum(found) > MAX_DEPTH or isinstance(value, list) and len(value) > MAX_LIST:
            raise VitlabError(f"{bad}: model argument {key} asks for more blocks than vitlab builds (at most "
                              f"{MAX_DEPTH} in all); refusing to build it")
    return meta["model_name"], args, extra


def _check_fits(file: Path, name: str, args: dict, cfg: Config, adapter: bool) -> None:
    """Build the architecture the metadata names on the meta device (no memory) and compare its parameter
    names and shapes with the file's header before allocating anything: metadata naming a model larger than
    the weights it comes with is refused in seconds instead of building it."""
    from safetensors import safe_open

    with torch.device("meta"):
        skeleton = rebuild_model(name, args, cfg)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    with safe_open(str(file), framework="pt") as f:
        stored = skeleton.upgrade_keys({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    wrong = [k for k in (stored if adapter else expected) if stored.get(k) != expected.get(k)]
    if wrong and not adapter:
        raise VitlabError(f"'{file}' does not fit the model its metadata names ({name}): {wrong[0]} is "
                          f"{stored.get(wrong[0], 'missing')} in the file, {expected.get(wrong[0], 'absent')} in "
                          f"the model")
    if wrong:
        raise VitlabError(f"'{file}' does not fit its run's model: unexpected {wrong[:4]}")


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, topk: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (probabilities, class indices) for a normalised batch (B, C, H, W)."""
    probs = as_output(model(images)).logits.float().softmax(dim=-1)
    return probs.topk(min(topk, probs.shape[-1]), dim=-1)
