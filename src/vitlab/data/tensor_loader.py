"""A loader for in-memory datasets that transforms whole batches at once.

For small datasets held as one uint8 tensor (digits, MNIST, CIFAR) per-sample torchvision transforms cost
more than the model on a CPU (~240 us per image). This loader slices batches straight from the tensor
and applies the same `none`/`basic` presets batch-wide: resize, per-sample padded random crop (one gather),
per-sample horizontal flip, scale to [0, 1] and normalise. Randomness comes from a generator seeded by
(seed, epoch), so a resumed run sees the same batches. RandAugment needs the per-sample path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .datasets import DatasetInfo


class TensorBatchLoader:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, img_size: int,
                 in_chans: int, batch_size: int, train: bool, augment: str, seed: int = 0, mix=None):
        self.images, self.labels = images, labels  # (N, C, H, W) uint8, (N,) int64
        self.info, self.img_size, self.in_chans = info, img_size, in_chans
        self.batch_size, self.train, self.seed, self.mix = batch_size, train, seed, mix
        self.augment = train and augment != "none"
        self.pad = max(img_size // 8, 1)
        self.mean = torch.tensor(match_channels(info.mean, in_chans)).view(1, -1, 1, 1)
        self.std = torch.tensor(match_channels(info.std, in_chans)).view(1, -1, 1, 1)
        self.epoch = 0
        self.dataset = images  # len(loader.dataset) works as for a DataLoader

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.labels)
        order = torch.randperm(n, generator=g) if self.train else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            x, y = self.transform(self.images[idx], g), self.labels[idx]
            yield self.mix(list(zip(x, y))) if self.mix is not None else (x, y)

    def transform(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x = x.float().div_(255.0)  # (B, C, H, W) in [0, 1]
        if x.shape[1] != self.in_chans:
            x = x.expand(-1, 3, -1, -1) if self.in_chans == 3 else _grey(x)
        if x.shape[-1] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", antialias=True,
                              align_corners=False)
        if self.augment:
            x = self._random_crop(x, g)
            if self.info.hflip:
                flip = torch.rand(x.shape[0], generator=g) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x.sub_(self.mean).div_(self.std)

    def _random_crop(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        B, C, H, W = x.shape
        p = self.pad
        padded = F.pad(x, (p, p, p, p))  # zero fill, like v2.RandomCrop(padding=p) on uint8 images
        oy = torch.randint(0, 2 * p + 1, (B, 1), generator=g) + torch.arange(H)  # (B, H) source rows
        ox = torch.randint(0, 2 * p + 1, (B, 1), generator=g) + torch.arange(W)  # (B, W) source columns
        b = torch.arange(B).view(B, 1, 1, 1)
        c = torch.arange(C).view(1, C, 1, 1)
        return padded[b, c, oy.view(B, 1, H, 1), ox.view(B, 1, 1, W)]  # (B, C, H, W)


def _grey(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor([0.2989, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def match_channels(stats: tuple[float, ...], in_chans: int) -> list[float]:
    return list(stats) if len(stats) == in_chans else [sum(stats) / len(stats)] * in_chans
