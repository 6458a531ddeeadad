"""Where attention goes: every attention layer's map on given images, and the share of it that lands on kinds
of patches (a digit's, clutter's, background).

The Differential Transformer's evidence for its design is that it puts more attention on the relevant context
and less on noise; `attention_shares` measures that on images whose patches are labelled, for any attention
(`model.attn_layer`: each layer's `attention_map` returns what it multiplies V by, so a differential map is
the difference of its two softmax maps, rows summing to 1 - lambda, with negative weights where it cancels).
Used by the noise study (bench/seed002_noise.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention_maps(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Each attention layer's map (B, H, N, N), fp32, in the order the layers run, for one eval-mode forward
    pass of `images` (the model's mode is restored). Layers are the modules with an `attention_map(x)`."""
    maps: list[torch.Tensor] = []

    def record(module: nn.Module, args: tuple) -> None:
        maps.append(module.attention_map(args[0]).float())

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if hasattr(m, "attention_map")]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return maps


def patch_kinds(digit: torch.Tensor, clutter: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, T) kind of each patch in raster order from ink images (B, H, W) (any non-negative intensities):
    0 background (no ink), 1 digit (at least as much digit ink as clutter ink), 2 clutter (more clutter ink)."""
    d, c = (F.avg_pool2d(t.float()[:, None], patch).flatten(1) for t in (digit, clutter))  # (B, T) ink per patch
    kind = torch.where(c > d, 2, 1)
    return torch.where((d + c) > 0, kind, 0)


def attention_shares(maps: list[torch.Tensor], kinds: torch.Tensor, num_kinds: int, prefix: int,
                     query: str = "mean") -> torch.Tensor:
    """(layers, num_kinds): per layer, the share of attention over the patch keys that lands on each kind of
    patch, averaged over images.

    Per image: the map (B, H, N, N) is averaged over heads; the query row is the class token's (`query="cls"`)
    or the mean of the patch tokens' rows (`"mean"`, what a mean-pooled model reads out); it is restricted to
    the patch keys (after `prefix` class tokens) and divided by its sum there, so the shares of one image sum
    to 1 (a differential map's negative weights can take a share below 0 or above 1)."""
    if query not in ("cls", "mean"):
        raise ValueError(f"query must be 'cls' or 'mean', got {query!r}")
    if query == "cls" and prefix < 1:
        raise ValueError("query='cls' needs a class token (prefix >= 1)")
    onehot = F.one_hot(kinds.long(), num_kinds).float()  # (B, T, K)
    shares = []
    for m in maps:
        a = m.float().mean(1)  # (B, N, N): heads averaged
        row = a[:, 0] if query == "cls" else a[:, prefix:].mean(1)  # (B, N): the query's weights over keys
        row = row[:, prefix:]  # (B, T): over the patches
        mass = torch.einsum("bt,btk->bk", row, onehot)  # (B, K)
        shares.append((mass / row.sum(1, keepdim=True)).mean(0))
    return torch.stack(shares)  # (L, K)
