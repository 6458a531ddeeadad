"""Segmentation metrics from a confusion matrix: exact, and exact over ranks (the matrix is a sum, so one
all-reduce of it equals a one-process evaluation; averaging per-rank scores would not be); and the soft Dice
loss that `optim.dice_weight` adds to the cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean over classes of the soft Dice 2 sum(p y) / (sum(p) + sum(y)), summed over the batch's pixels
    (logits (B, K, H, W), target (B, H, W); targets < 0 ignored). Every class weighs the same, however few its
    pixels, which counters a dominant background; `eps` smooths classes absent from the batch."""
    probs = logits.float().softmax(dim=1)  # (B, K, H, W)
    keep = (target >= 0).unsqueeze(1)  # (B, 1, H, W)
    onehot = F.one_hot(target.clamp(min=0), probs.shape[1]).permute(0, 3, 1, 2) * keep  # (B, K, H, W)
    probs = probs * keep
    inter, total = (probs * onehot).sum((0, 2, 3)), probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return 1 - ((2 * inter + eps) / (total + eps)).mean()
