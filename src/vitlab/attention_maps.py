"""Where attention goes: every attention layer's map on given images, and the share of it that lands on kinds
of patches (a digit's, clutter's, background).

The Differential Transformer's evidence for its design is that it puts more attention on the relevant context
and less on noise; `attention_shares` measures that on images whose patches are labelled, for any attention
(`model.attn_layer`: each layer's `attention_map` returns what it multiplies V by, so a differential map is
the difference of its two softmax maps, rows summing to 1 - lambda, with negative weights where it cancels).
Maps are of eval mode (attention dropout off). Used by the noise study (bench/seed002_noise.py).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import VitlabError


def attention_maps(model: nn.Module, images: torch.Tensor,
                   reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Each attention layer's map (B, H, N, N), fp32, in the order the layers run, for one eval-mode forward
    pass of `images` (the model's mode is restored); `reduce`, when given, is applied to each map as it is made
    (keep only what you need: at 785 tokens a layer's maps of 256 images take GBs). Layers are the modules with
    an `attention_map(x)`; every one must run through its own forward, on unmerged tokens, so that map rows and
    columns are the model's tokens (prefix, then patches in raster order)."""
    maps: list[torch.Tensor] = []
    layers = [m for m in model.modules() if hasattr(m, "attention_map")]
    if any(getattr(model, "merge", None) or ()):
        raise VitlabError("this model merges tokens (model.merge), so its attention rows no longer match the "
                          "patches; measure attention on the model without merging")

    def record(module: nn.Module, args: tuple) -> None:
        if len(args) > 1 and args[1] is not None:  # token merging passed in by a block
            raise VitlabError("an attention layer received merged tokens; measure attention without model.merge")
        m = module.attention_map(args[0]).float()
        maps.append(reduce(m) if reduce is not None else m)

    hooks = [m.register_forward_pre_hook(record) for m in layers]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if len(maps) != len(layers):
        raise VitlabError(f"{len(layers)} attention layers but {len(maps)} ran through their forward (a family that "
                          f"routes or skips tokens calls attention another way); attention maps need plain blocks")
    return maps


def patch_kinds(digit: torch.Tensor, clutter: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, T) kind of each patch in raster order from ink images (B, H, W) (any non-negative intensities):
    0 background (no ink), 1 digit (at least as much digit ink as clutter ink), 2 clutter (more clutter ink)."""
    d, c = (F.avg_pool2d(t.float()[:, None], patch).flatten(1) for t in (digit, clutter))  # (B, T) ink per patch
    kind = torch.where(c > d, 2, 1)
    return torch.where((d + c) > 0, kind, 0)


def readout_row(m: torch.Tensor, prefix: int, query: str = "mean") -> torch.Tensor:
    """(B, N) from maps (B, H, N, N): the heads' mean weight from the read-out query to every key: the class
    token's row (`query="cls"`), or the mean of the patch tokens' rows (`"mean"`, what a mean-pooled model
    reads out)."""
    if query not in ("cls", "mean"):
        raise ValueError(f"query must be 'cls' or 'mean', got {query!r}")
    if query == "cls" and prefix < 1:
        raise ValueError("query='cls' needs a class token (prefix >= 1)")
    a = m.float().mean(1)  # (B, N, N): heads averaged
    return a[:, 0] if query == "cls" else a[:, prefix:].mean(1)


def attention_shares(rows: list[torch.Tensor], kinds: torch.Tensor, num_kinds: int, prefix: int) -> torch.Tensor:
    """(layers, num_kinds): per layer, the share of the read-out query's positive attention over the patch keys
    that lands on each kind of patch, from each layer's `readout_row`s (B, N) of B images.

    A share is a ratio of sums over the images: the positive weight on that kind's patches over the positive
    weight on all patches (after `prefix` class tokens). For a softmax map that is all of its weight. A
    differential map's rows sum to 1 - lambda and hold negative weights (what it cancels, `negative_share`), so
    their plain sums can come near 0 or below, and a share of them would mean nothing; its positive part is
    where the attention that survives the cancellation goes."""
    onehot = F.one_hot(kinds.long(), num_kinds).float()  # (B, T, K)
    shares = []
    for row in rows:
        positive = row.float()[:, prefix:].clamp(min=0)  # (B, T)
        mass = torch.einsum("bt,btk->k", positive, onehot)  # (K,): summed over the images
        shares.append(mass / positive.sum())
    return torch.stack(shares)  # (L, K)


def negative_share(rows: list[torch.Tensor], prefix: int) -> torch.Tensor:
    """(layers,): the negative part of the read-out query's weights over the patch keys as a share of all their
    absolute weight, summed over the images: 0 for softmax attention; what a differential map cancels."""
    out = []
    for row in rows:
        patches = row.float()[:, prefix:]
        out.append(patches.clamp(max=0).abs().sum() / patches.abs().sum())
    return torch.stack(out)
