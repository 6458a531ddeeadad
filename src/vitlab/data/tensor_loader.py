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
    """Batches of an in-memory split, sharded over `world` ranks.

    Training: every rank draws the same permutation and the same augmentation parameters for each *global*
    batch of `batch_size x world` images and keeps its own contiguous slice, so the union over ranks is
    exactly the batch one process would see with the global batch size (a short last batch is padded by
    wrapping to a multiple of `world`, as DistributedSampler does). Evaluation: rank r takes samples
    r, r + world, ...; ranks short of ceil(n / world) samples get padding labelled -100, which the loss
    and accuracy ignore, so a reduction over ranks counts every sample exactly once.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, img_size: int,
                 in_chans: int, batch_size: int, train: bool, augment: str, seed: int = 0, mix=None,
                 rank: int = 0, world: int = 1):
        self.images, self.labels = images, labels  # (N, C, H, W) uint8, (N,) int64 or (N, H, W) masks
        self.info, self.img_size, self.in_chans = info, img_size, in_chans
        self.batch_size, self.train, self.seed, self.mix = batch_size, train, seed, mix
        self.rank, self.world = rank, world
        self.augment = train and augment != "none"
        self.pad = max(img_size // 8, 1)
        self.mean = torch.tensor(match_channels(info.mean, in_chans)).view(1, -1, 1, 1)
        self.std = torch.tensor(match_channels(info.std, in_chans)).view(1, -1, 1, 1)
        self.epoch = 0
        self.dataset = images  # len(loader.dataset) works as for a DataLoader

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for t in (self.images, self.labels):  # generated images and masks (MNIST-on-canvas) redraw their layout
            if hasattr(t, "set_epoch"):
                t.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.labels)
        if self.train:
            return -(-n // (self.batch_size * self.world))
        return -(-(-(-n // self.world)) // self.batch_size)

    def __iter__(self):
        return self._train_batches() if self.train else self._eval_batches()

    def batches_from(self, start: int):
        """The epoch's training batches from batch `start` (a resumed run): the skipped ones draw their
        augmentation parameters, so the rest are exactly those of an uninterrupted epoch, but are not built."""
        return self._train_batches(start)

    def _train_batches(self, skip: int = 0):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n, step = len(self.labels), self.batch_size * self.world
        order = torch.randperm(n, generator=g)
        for start in range(0, n, step):
            idx = order[start:start + step]
            if len(idx) % self.world:  # pad the last global batch by wrapping, so every rank gets as many
                idx = torch.cat([idx, order[:self.world - len(idx) % self.world]])
            params = self._draw(len(idx), g)  # for the global batch: identical on every rank
            if skip:  # resumed mid-epoch: draw, do not build
                skip -= 1
                continue
            per = len(idx) // self.world
            part = slice(self.rank * per, (self.rank + 1) * per)
            x = self.transform(self.images[idx[part]], *(p[part] for p in params))
            y = self.labels[idx[part]]
            yield self.mix(list(zip(x, y))) if self.mix is not None else (x, y)

    def _eval_batches(self):
        n = len(self.labels)
        idx = torch.arange(self.rank, n, self.world)
        short = -(-n // self.world) - len(idx)
        labels = self.labels[idx]  # (n,) classes, or (n, H, W) masks
        labels = torch.cat([labels, torch.full((short, *labels.shape[1:]), -100, dtype=labels.dtype)])
        idx = torch.cat([idx, torch.zeros(short, dtype=idx.dtype)])  # padding: any image, label ignored
        for start in range(0, len(idx), self.batch_size):
            part = slice(start, start + self.batch_size)
            yield self.transform(self.images[idx[part]]), labels[part]

    def _draw(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Per-sample augmentation parameters: crop offsets (n, 1) x 2, and flips (n,) where mirroring is valid."""
        if not self.augment:
            return ()
        span = 2 * self.pad + 1
        oy, ox = torch.randint(0, span, (n, 1), generator=g), torch.randint(0, span, (n, 1), generator=g)
        return (oy, ox, torch.rand(n, generator=g) < 0.5) if self.info.hflip else (oy, ox)

    def transform(self, x: torch.Tensor, oy: torch.Tensor | None = None, ox: torch.Tensor | None = None,
                  flip: torch.Tensor | None = None) -> torch.Tensor:
        x = x.float().div_(255.0)  # (B, C, H, W) in [0, 1]
        if x.shape[1] != self.in_chans:
            x = x.expand(-1, 3, -1, -1) if self.in_chans == 3 else _grey(x)
        if x.shape[-1] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", antialias=True,
                              align_corners=False)
        if oy is not None:
            x = self._random_crop(x, oy, ox)
        if flip is not None:
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x.sub_(self.mean).div_(self.std)

    def _random_crop(self, x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor) -> torch.Tensor:
        """Shift each image by its own offset inside a zero border (v2.RandomCrop(padding=p) on uint8)."""
        B, C, H, W = x.shape
        p = self.pad
        padded = F.pad(x, (p, p, p, p))
        rows = (oy + torch.arange(H)).view(B, 1, H, 1)  # source rows per sample
        cols = (ox + torch.arange(W)).view(B, 1, 1, W)  # source columns per sample
        b = torch.arange(B).view(B, 1, 1, 1)
        c = torch.arange(C).view(1, C, 1, 1)
        return padded[b, c, rows, cols]  # (B, C, H, W)


def _grey(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor([0.2989, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def match_channels(stats: tuple[float, ...], in_chans: int) -> list[float]:
    return list(stats) if len(stats) == in_chans else [sum(stats) / len(stats)] * in_chans
