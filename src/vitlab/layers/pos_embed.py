"""Resampling a learned position embedding to a new grid (ViT §3.2, fine-tuning at higher resolution)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int = 1,
                       mode: str = "bicubic", antialias: bool = True) -> torch.Tensor:
    """Resample a (1, prefix + g*g, D) table to (1, prefix + new_grid**2, D); prefix (cls) rows stay as they are."""
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = math.isqrt(grid.shape[1])
    if old_grid * old_grid != grid.shape[1]:
        raise ValueError(f"position embedding with {grid.shape[1]} patch tokens is not a square grid")
    if old_grid == new_grid:
        return pos_embed
    D = grid.shape[-1]
    grid = grid.float().reshape(1, old_grid, old_grid, D).permute(0, 3, 1, 2)  # (1, D, g, g)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode=mode, antialias=antialias, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, D).to(pos_embed.dtype)  # (1, g'*g', D)
    return torch.cat([prefix, grid], dim=1)


def sincos_2d(coords: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal encoding of 2-D points, (..., 2) as [x, y] -> (..., dim):
    [sin(x w), cos(x w), sin(y w), cos(y w)] with w_j = 10000^(-2j / (dim/2)), j < dim/4 (dim % 4 == 0).

    Computed in the coords' dtype when it is float32 or float64 (a float64 model gets a float64 code), else
    (integer, float16, bfloat16 coords) in float32; the caller casts the result to its tokens' dtype."""
    dtype = coords.dtype if coords.dtype in (torch.float32, torch.float64) else torch.float32
    j = torch.arange(dim // 4, device=coords.device, dtype=dtype)
    omega = 10000.0 ** (-2.0 * j / (dim / 2))  # (dim/4,)
    x, y = coords[..., :1].to(dtype) * omega, coords[..., 1:].to(dtype) * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=-1)
