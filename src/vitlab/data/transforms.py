"""Transform presets (torchvision.transforms.v2) and batch-level MixUp/CutMix.

Presets: `none` (resize + normalise), `basic` (random crop + flip where the dataset allows it),
`randaugment` (basic + RandAugment, Cubuk et al. arXiv 1909.13719).
"""
from __future__ import annotations

import torch
from torch.utils.data import default_collate
from torchvision.transforms import v2

from .datasets import DatasetInfo
from .tensor_loader import match_channels


def build_transform(info: DatasetInfo, img_size: int, in_chans: int, augment: str, train: bool) -> v2.Compose:
    ops: list = [v2.ToImage()]
    if in_chans != info.in_chans:  # e.g. an RGB-pretrained model on MNIST
        ops.append(v2.RGB() if in_chans == 3 else v2.Grayscale(num_output_channels=in_chans))
    if train and augment != "none":
        if info.crop == "rrc":
            ops.append(v2.RandomResizedCrop(img_size, antialias=True))
        else:
            if img_size != info.img_size:
                ops.append(v2.Resize((img_size, img_size), antialias=True))
            ops.append(v2.RandomCrop(img_size, padding=max(img_size // 8, 1)))
        if info.hflip:
            ops.append(v2.RandomHorizontalFlip())
        if augment == "randaugment":
            ops.append(v2.RandAugment())
    elif info.crop == "rrc":  # photos: resize the short side, centre crop (ImageNet's 0.875 ratio)
        ops += [v2.Resize(int(round(img_size / 0.875)), antialias=True), v2.CenterCrop(img_size)]
    elif img_size != info.img_size:
        ops.append(v2.Resize((img_size, img_size), antialias=True))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(match_channels(info.mean, in_chans), match_channels(info.std, in_chans))]
    return v2.Compose(ops)


class MixCollate:
    """Collate a batch, then apply MixUp or CutMix (one picked at random when both are on); soft labels out."""

    def __init__(self, num_classes: int, mixup: float, cutmix: float):
        ops = []
        if mixup > 0:
            ops.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
        if cutmix > 0:
            ops.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
        self.op = ops[0] if len(ops) == 1 else v2.RandomChoice(ops)

    def __call__(self, batch):
        return self.op(*default_collate(batch))
