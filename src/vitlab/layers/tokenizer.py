"""Where tokens come from: one interface for every tokenizer (patch grid, conv stem, shifted patches, content
quadtree, learned quadtree).

A tokenizer turns images (B, C, H, W) into a `TokenSet`: the embedded tokens (B, T, D), without positions, and
each token's box in pixels. The model adds positions from the boxes (or, for a fixed grid, from the learned
table the boxes index), puts its prefix (class) token in front and runs its blocks; a head turns the tokens into
logits or a mask (painting each token's prediction back into its box). The blocks never ask which tokenizer
made the sequence, so any tokenizer composes with any family.

Every tokenizer is registered on the model as `patch_embed` (timm's key for the patch projection), so
`patch_embed.proj.weight` stays where timm and the original JAX weights put it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TokenSet:
    """tokens (B, T, D), embedded, no positions; boxes (B, T, 3) as (x, y, size) in pixels, (x, y) the
    top-left corner; levels: each token's size class ((T,) or (B, T)), an index into the tokenizer's `sizes`
    (0 = the largest); tree: what a learned tokenizer decided (for plots and tests), else None."""
    tokens: torch.Tensor
    boxes: torch.Tensor
    levels: torch.Tensor
    tree: Any = None


@dataclass
class TokenGroups:
    """Images whose token counts differ (a content quadtree with per-image budgets), as groups of images with
    equal counts: `groups` holds (rows, TokenSet) pairs, rows the images' indices in the batch (a long
    tensor); `counts` (B,) is each image's token count. No token is padded and no image attends to another:
    the model runs each group as one dense batch (`map`), a loop over distinct counts, not over images."""
    groups: list[tuple[torch.Tensor, TokenSet]]
    counts: torch.Tensor

    def map(self, fn: Callable[[TokenSet], torch.Tensor]) -> torch.Tensor:
        """fn applied to every group, the results (B_g, ...) put back in batch order (B, ...)."""
        rows = torch.cat([r for r, _ in self.groups])
        out = torch.cat([fn(t) for _, t in self.groups])
        return out[torch.argsort(rows)]

    @property
    def boxes(self) -> list[torch.Tensor]:
        """Each image's boxes (T_b, 3), in batch order (what a plot of the leaves reads)."""
        per_image = [None] * len(self.counts)
        for rows, t in self.groups:
            for r, b in zip(rows.tolist(), t.boxes):
                per_image[r] = b
        return per_image


class Tokenizer(nn.Module):
    """The interface. Attributes: img_size (px, square), patch_size (px each token's pixels are resized to
    before the projection), num_tokens (T), sizes (every box size a token can have, largest first),
    fixed_layout (True: every image gets the same boxes, in raster order: a grid, whose positions are a
    learned table row per token)."""
    img_size: int
    patch_size: int
    num_tokens: int
    sizes: list[int]
    fixed_layout: bool = False

    def tokenize(self, x: torch.Tensor) -> TokenSet | TokenGroups:
        """Images -> their tokens; TokenGroups when images get different token counts."""
        raise NotImplementedError

    def init_weights(self) -> None:
        """Initialise the projection (called at the projection's turn in the model's initialisation)."""

    def init_late(self) -> None:
        """Initialise what only this tokenizer has (a learned scorer), after every weight the reference ViT
        shares, so those stay the reference's at the same seed."""


def lecun_normal_(weight: torch.Tensor) -> None:
    """Truncated normal with std sqrt(1 / fan_in) on a projection, as a Linear layer over one patch."""
    nn.init.trunc_normal_(weight, std=(1.0 / weight[0].numel()) ** 0.5)


def project(proj: nn.Conv2d, patches: torch.Tensor) -> torch.Tensor:
    """(B, T, C*P*P) -> (B, T, D): a patch projection Conv2d(C, D, P, P) as the Linear it is on one patch
    (flattened in (C, row, column) order); on CPU the GEMM is faster than the strided convolution."""
    return F.linear(patches, proj.weight.reshape(proj.out_channels, -1), proj.bias)
