"""Routed models: which tokens ran, drawn over the images, and accuracy against measured FLOPs."""
from __future__ import annotations

import matplotlib
import torch
from matplotlib.figure import Figure

from .common import new_figure, plot_text, subplots


def routing_figure(images: torch.Tensor, keep: torch.Tensor, grid: int, title: str) -> Figure:
    """Each image with, per patch, the number of dynamic layers the token ran in (0: skipped them all).
    images (B, C, H, W), already scaled to [0, 1]; keep (B, dynamic layers, prefix + grid^2) bool."""
    n, layers = min(len(images), 8), keep.shape[1]
    counts = keep[:n, :, -grid * grid:].sum(1).view(n, grid, grid).float()  # (n, grid, grid)
    fig, axes = subplots(1, n, figsize=(1.6 * n, 2.0))
    for ax, image, count in zip(axes, images[:n], counts):
        ax.imshow(image.permute(1, 2, 0).squeeze(-1).clamp(0, 1), cmap="gray",
                  extent=(0, grid, grid, 0), interpolation="nearest")
        shown = ax.imshow(count, cmap="viridis", alpha=0.45, vmin=0, vmax=layers, extent=(0, grid, grid, 0))
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown, ax=axes, shrink=0.8, label="layers run")
    fig.suptitle(title, fontsize=10)
    return fig


def accuracy_flops_figure(points: list[dict], title: str = "accuracy against measured FLOPs", x: str = "gflops",
                          y: str = "top1", xlabel: str = "GFLOPs per image (measured, multiply-adds)",
                          ylabel: str = "test top-1") -> Figure:
    """points: {"group", x, y}; one marker series per group (cost against quality: FLOPs or tokens, top-1 or
    mIoU)."""
    fig, ax = new_figure(title, xlabel, ylabel)
    groups = sorted({p["group"] for p in points})
    colors = matplotlib.colormaps["tab20" if len(groups) > 10 else "tab10"].colors  # a colour per group
    for i, group in enumerate(groups):
        mine = sorted((p for p in points if p["group"] == group), key=lambda p: p[x])
        ax.plot([p[x] for p in mine], [p[y] for p in mine], "o-", label=plot_text(group), alpha=0.8,
                color=colors[i % len(colors)])
    ax.legend(fontsize=8)
    return fig
