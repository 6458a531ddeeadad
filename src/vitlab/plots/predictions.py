"""What a trained model gets right and wrong: a grid of test images with true and predicted labels, and the
confusion matrix over the whole test split (as the TowerViT-vs-staged notebook shows them)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from .common import plot_text, subplots


@torch.inference_mode()
def test_predictions(checkpoint: str | Path, data_dir: str | None = None, split: str = "test"):
    """(first 64 images (N, C, H, W) normalised, all true labels, all predictions, class names, model name)."""
    from ..train import load_checkpoint
    from ..train.build import checkpoint_data

    model, cfg, _ = load_checkpoint(checkpoint)
    data = checkpoint_data(cfg, model, data_dir=data_dir)
    model.eval()
    images, labels, preds, kept = [], [], [], 0
    for x, y in data.loader(split, 256, 0):
        if kept < 64:  # the grid needs only the first few images
            images.append(x[:64 - kept])
            kept += len(images[-1])
        labels.append(y)
        preds.append(model(x).argmax(dim=-1))
    names = data.info.class_names or [str(i) for i in range(data.info.num_classes)]
    return torch.cat(images), torch.cat(labels), torch.cat(preds), names, model.vitlab_name


def sample_grid_figure(images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor, names: list[str],
                       title: str, n: int = 16) -> Figure:
    """The first `n` test images, titled 'true / predicted' (red when wrong)."""
    names, title = [plot_text(c) for c in names], plot_text(title)  # class and model names, shown as written
    n = min(n, len(images))
    cols = min(n, 8)
    rows = -(-n // cols)
    fig, axes = subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows + 0.4), squeeze=False)
    fig.suptitle(f"{title}: true / predicted")
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = images[i].float()
        img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-8)  # undo normalisation for display
        pixels = (img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)).numpy()  # (H, W) or (H, W, C)
        ax.imshow(pixels, cmap="gray" if img.shape[0] == 1 else None)
        t, p = int(labels[i]), int(preds[i])
        ax.set_title(f"{names[t]} / {names[p]}", fontsize=8, color="black" if t == p else "red")
    return fig


def confusion_figure(labels: torch.Tensor, preds: torch.Tensor, names: list[str], title: str) -> Figure:
    """Row-normalised confusion matrix (rows: true class); counts annotated when there are <= 20 classes."""
    k, names, title = len(names), [plot_text(c) for c in names], plot_text(title)
    counts = torch.bincount(labels * k + preds, minlength=k * k).view(k, k).numpy()  # (true, predicted)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.35 * k, 14)
    fig, ax = subplots(figsize=(size + 1, size))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    acc = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(f"{title}: confusion matrix (accuracy {100 * acc:.2f}%, {counts.sum()} images)")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if k <= 20:
        ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    return fig


@torch.inference_mode()
def segmentation_figure(checkpoint: str | Path, data_dir: str | None = None, n: int = 6) -> Figure:
    """The first `n` test images with their tokens' boxes (patches or leaves), true and predicted masks."""
    from ..train import load_checkpoint
    from ..train.build import checkpoint_data
    from .quadtree import leaves_figure

    model, cfg, _ = load_checkpoint(checkpoint)
    data = checkpoint_data(cfg, model, data_dir=data_dir)
    model.eval()
    x, y = next(iter(data.loader("test", n, 0)))
    boxes = model.tokenize(x).boxes
    return leaves_figure(x, boxes, f"{model.vitlab_name}: tokens, true and predicted masks", y,
                         model(x).argmax(dim=1), data.info.num_classes)


def prediction_figures(checkpoint: str | Path, data_dir: str | None = None) -> dict[str, Figure]:
    stem = Path(checkpoint).resolve().name
    from ..train.checkpoint import read_metadata, resolve_checkpoint
    args = json.loads(read_metadata(resolve_checkpoint(checkpoint)).get("model_args", "{}"))
    if args.get("head", args.get("task")) == "segment":  # `task`: runs saved before the head had its name
        return {f"segmentation_{stem}": segmentation_figure(checkpoint, data_dir)}
    images, labels, preds, names, model = test_predictions(checkpoint, data_dir)
    return {f"predictions_{stem}": sample_grid_figure(images, labels, preds, names, model),
            f"confusion_{stem}": confusion_figure(labels, preds, names, model)}
