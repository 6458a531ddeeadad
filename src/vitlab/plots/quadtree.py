"""Where a quadtree put its tokens: leaf boxes drawn over sample images, and for segmentation the true and
predicted masks beside them."""
from __future__ import annotations

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .common import subplots


def _show(ax, image: torch.Tensor) -> None:
    img = image.float()
    img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-8)  # undo normalisation for display
    ax.imshow((img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)).numpy(),
              cmap="gray" if img.shape[0] == 1 else None)


def leaves_figure(images: torch.Tensor, boxes: torch.Tensor | list[torch.Tensor], title: str,
                  masks: torch.Tensor | None = None, preds: torch.Tensor | None = None,
                  classes: int | None = None) -> Figure:
    """One row per image: the image with its leaves' boxes ((B, T, 3), or a list of (T_b, 3) under per-image
    budgets) as (x, y, size); with `masks` and `preds` ((B, H, W) class indices) also the true and the
    predicted mask."""
    n, cols = len(images), 1 if masks is None else 3
    fig, axes = subplots(n, cols, figsize=(2.4 * cols, 2.4 * n + 0.4), squeeze=False)
    fig.suptitle(title, fontsize=9)
    vmax = classes - 1 if classes else None
    for i in range(n):
        ax = axes[i, 0]
        _show(ax, images[i])
        for x, y, s in boxes[i].tolist():
            if s > 0:
                ax.add_patch(Rectangle((x - 0.5, y - 0.5), s, s, fill=False, lw=0.6, ec="tab:orange"))
        ax.set_title(f"{int((boxes[i][:, 2] > 0).sum())} leaves", fontsize=8)
        if masks is not None:
            for ax, m, name in ((axes[i, 1], masks[i], "true mask"), (axes[i, 2], preds[i], "predicted")):
                ax.imshow(m.numpy(), cmap="tab20", vmin=0, vmax=vmax, interpolation="nearest")
                ax.set_title(name, fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    return fig
