"""Quadtree geometry over batches of images: square patches with their boxes, split into children, resized to
one leaf size, and painted back (the inverse, for per-leaf predictions such as segmentation masks).

A patch's pixels are flattened in (channel, row, column) order, the order of a Conv2d(C, D, p, p) weight
viewed as (D, C*p*p) and of `nn.Unfold`; boxes are (x, y, size) with (x, y) the top-left pixel, x the column.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass
class LeafGroup:
    """Leaves of one size: pixels (B, n, C*size*size) and top-left corners (B, n, 2) as [x, y]."""
    pixels: torch.Tensor
    size: int
    coords: torch.Tensor


def patchify(images: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) -> raster-order patches (B, N, C*p*p) and their corners (B, N, 2) as [x, y] (float32)."""
    B, C, H, W = images.shape
    rows, cols = H // patch, W // patch
    x = images.reshape(B, C, rows, patch, cols, patch).permute(0, 2, 4, 1, 3, 5)  # (B, rows, cols, C, p, p)
    gy, gx = torch.meshgrid(torch.arange(rows, device=images.device), torch.arange(cols, device=images.device),
                            indexing="ij")
    coords = torch.stack([gx, gy], dim=-1).reshape(1, -1, 2).float() * patch  # (1, N, 2), pixels
    return x.reshape(B, rows * cols, C * patch * patch), coords.expand(B, -1, -1)


def split_children(pixels: torch.Tensor, coords: torch.Tensor, size: int, child: int,
                   channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch (B, k, C*s*s) at (B, k, 2) -> its q*q children (B, k*q*q, C*c*c), row-major inside each
    parent, parents in their given order; child (i, j) sits at [x + j*c, y + i*c]."""
    B, k = pixels.shape[:2]
    q = size // child
    x = pixels.reshape(B, k, channels, q, child, q, child).permute(0, 1, 3, 5, 2, 4, 6)  # (B, k, q, q, C, c, c)
    i, j = torch.meshgrid(torch.arange(q, device=pixels.device), torch.arange(q, device=pixels.device),
                          indexing="ij")
    offsets = torch.stack([j, i], dim=-1).reshape(1, 1, q * q, 2).to(coords.dtype) * child  # [x, y] per child
    children = (coords[:, :, None, :] + offsets).reshape(B, k * q * q, 2)
    return x.reshape(B, k * q * q, channels * child * child), children


def resize_leaves(group: LeafGroup, target: int, channels: int, antialias: bool = False) -> torch.Tensor:
    """(B, n, C*p*p) -> (B, n, C*t*t): every leaf bilinearly resized to t x t (the identity at p == t)."""
    B, n = group.pixels.shape[:2]
    if group.size == target or n == 0:
        return group.pixels if group.size == target else group.pixels.new_zeros(B, 0, channels * target * target)
    x = group.pixels.reshape(B * n, channels, group.size, group.size)
    x = F.interpolate(x, size=(target, target), mode="bilinear", align_corners=False,
                      antialias=antialias and group.size > target)
    return x.reshape(B, n, channels * target * target)


def paint(values: torch.Tensor, coords: torch.Tensor, groups: Sequence[tuple[int, int]], image_size: int,
          mode: str = "nearest") -> torch.Tensor:
    """Per-leaf predictions back into their boxes (the inverse of leaf extraction): values (B, T, K, c, c), a
    c x c grid per leaf; coords (B, T, 2) as [x, y]; groups: (size, count) of consecutive leaves in sequence
    order (size 0: padding, painted nowhere) -> (B, K, H, W). One scatter per leaf size, none per leaf."""
    B, T, K, c = values.shape[:4]
    H = image_size
    out = values.new_zeros(B, K, H * H)
    start = 0
    for size, count in groups:
        if size and count:
            v = values[:, start:start + count].reshape(B * count, K, c, c)
            if size != c:
                v = F.interpolate(v, size=(size, size), mode=mode)
            v = v.reshape(B, count, K, size * size).permute(0, 2, 1, 3).reshape(B, K, count * size * size)
            r, q = torch.meshgrid(torch.arange(size, device=values.device), torch.arange(size, device=values.device),
                                  indexing="ij")
            xy = coords[:, start:start + count].long()  # (B, count, 2)
            pixel = (xy[..., 1:] + r.reshape(1, 1, -1)) * H + xy[..., :1] + q.reshape(1, 1, -1)  # (B, count, s*s)
            out.scatter_(2, pixel.reshape(B, 1, -1).expand(B, K, -1), v)
        start += count
    return out.reshape(B, K, H, H)
