"""Segmentation metrics from a confusion matrix: exact, and exact over ranks (the matrix is a sum, so one
all-reduce of it equals a one-process evaluation; averaging per-rank scores would not be)."""
from __future__ import annotations

import torch


def confusion(pred: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """(classes, classes) counts, rows the true class, columns the predicted one; targets < 0 are ignored."""
    keep = target >= 0
    index = target[keep] * classes + pred[keep]
    return torch.bincount(index.flatten(), minlength=classes * classes).reshape(classes, classes).double()


def iou_dice(matrix: torch.Tensor) -> dict[str, float]:
    """Mean IoU (tp / (tp + fp + fn)) and mean Dice (2 tp / (2 tp + fp + fn)) over the classes that occur in
    the targets or the predictions, and pixel accuracy."""
    tp = matrix.diagonal()
    fp, fn = matrix.sum(0) - tp, matrix.sum(1) - tp
    seen = (tp + fp + fn) > 0
    iou = tp[seen] / (tp + fp + fn)[seen]
    dice = 2 * tp[seen] / (2 * tp + fp + fn)[seen]
    return {"miou": iou.mean().item(), "dice": dice.mean().item(),
            "pixel_acc": (tp.sum() / matrix.sum().clamp(min=1)).item()}
