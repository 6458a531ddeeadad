"""Controlled noise for robustness studies (`data.pixel_noise`, `data.label_noise`).

Pixel noise is additive Gaussian noise of standard deviation sigma, in units of the pixel range (1.0: the
distance from black to white), added to the stored uint8 image, rounded and clipped to 0..255: a noisy
sensor's image, as a dataset would hold it. The noise of an image is a fixed function of (seed, split, sample
id, pixel), computed by a counter-based hash rather than drawn from a generator, so it is the same in every
epoch, every subset, every batch size and for every model of a study (differences between models are paired
on identical images), and a batch is noised in one vectorised pass. Augmentation, resizing and normalisation
come after it, as for any stored image: the noise belongs to the image at its stored resolution, so resizing
changes it (upsampling 32 px CIFAR to 224 px spreads each noisy pixel over a 7 px blob; downsampling a large
photo averages it away), and a level means different things on datasets of different resolutions.

Label noise replaces a fixed fraction of the training split's labels by a different class drawn uniformly
("symmetric" label noise); which samples and which wrong class are drawn from (seed, split size) alone.
Validation and test labels stay true, so they measure what a model learned of the truth.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2.functional import pil_to_tensor

from ..errors import VitlabError

_MASK = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche (T. Mueller's, 0x45d9f3b), on int64 tensors holding values
    in 0..2^32-1; every product stays below 2^59, so nothing overflows."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK
    return (x >> 16) ^ x


def gaussian_noise(ids: torch.Tensor, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal noise (len(ids), *shape), float32, a function of (seed, each id, each element) alone.

    Each element pair gets two hashed uniforms of 24 bits and the Box-Muller transform gives both of its
    normals. The hash input is the sample's key XOR a hash of the element's index, not the index itself: with a
    plain counter, two samples whose keys differ only in their low bits would get the same noise permuted."""
    ids = torch.as_tensor(ids, dtype=torch.int64).view(-1, 1)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > _MASK):
        raise ValueError("sample ids for pixel noise must be in 0..2^32-1")
    n = math.prod(shape)
    pairs = (n + 1) // 2
    key = _mix32(ids ^ _mix32(torch.tensor(seed & _MASK)))  # (B, 1)
    element = _mix32(_mix32(torch.arange(2 * pairs, dtype=torch.int64)) ^ 0x9E3779B9).view(1, -1)  # (1, 2p)
    bits = _mix32(key ^ element) >> 8  # (B, 2p), 24 bits: exact in float32
    u = (bits.to(torch.float32) + 0.5) * 2.0 ** -24  # in (0, 1), never 0: the log is finite
    radius = torch.sqrt(-2.0 * torch.log(u[:, :pairs]))
    angle = (2.0 * math.pi) * u[:, pairs:]
    z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, :n]
    return z.reshape(-1, *shape)


def add_pixel_noise(images: torch.Tensor, ids: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """uint8 images (B, C, H, W) or (C, H, W) with the fixed noise of samples `ids` added (rounded, clipped)."""
    single = images.dim() == 3
    x = images.unsqueeze(0) if single else images
    noise = gaussian_noise(ids, tuple(x.shape[1:]), seed)
    out = (x.float() + noise * (255.0 * sigma)).round_().clamp_(0, 255).to(torch.uint8)
    return out[0] if single else out


class NoisyImages:
    """An in-memory split's images (a uint8 tensor (N, C, H, W), or generated images such as MNIST-on-canvas)
    with each image's fixed pixel noise; indexes like the tensor, so the batched loader slices it as it is.
    Stored images are noised once, when first drawn, and kept (N more bytes per pixel); generated ones, whose
    layout changes every epoch, are noised as they are drawn."""

    def __init__(self, images, sigma: float, seed: int, ids: torch.Tensor | None = None):
        self.images, self.sigma, self.seed = images, sigma, seed
        self.ids = torch.arange(len(images)) if ids is None else ids  # sample identity: the noise follows it
        stored = isinstance(images, torch.Tensor)
        self.cache = torch.empty_like(images) if stored else None
        self.cached = torch.zeros(len(images), dtype=torch.bool) if stored else None

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.images, "set_epoch"):  # a canvas redraws its layout; the noise stays
            self.images.set_epoch(epoch)

    def subset(self, index: torch.Tensor) -> "NoisyImages":
        inner = self.images.subset(index) if hasattr(self.images, "subset") else self.images[index]
        return NoisyImages(inner, self.sigma, self.seed, self.ids[index])

    def __getitem__(self, index) -> torch.Tensor:
        single = isinstance(index, int)
        index = torch.as_tensor([index] if single else index)
        if self.cache is None:
            out = add_pixel_noise(self.images[index], self.ids[index], self.sigma, self.seed)
        else:
            new = index[~self.cached[index]].unique()
            if len(new):
                self.cache[new] = add_pixel_noise(self.images[new], self.ids[new], self.sigma, self.seed)
                self.cached[new] = True
            out = self.cache[index]
        return out[0] if single else out


class NoisySamples(Dataset):
    """A per-sample dataset (image files) whose images get their fixed pixel noise: sample i's image, as a
    uint8 tensor (C, H, W), plus the noise of id i; the transforms that follow accept tensors as images."""

    def __init__(self, ds: Dataset, sigma: float, seed: int):
        self.ds, self.sigma, self.seed = ds, sigma, seed

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        image, label = self.ds[i]
        x = image if isinstance(image, torch.Tensor) else pil_to_tensor(image)
        if x.dtype != torch.uint8:
            raise VitlabError(f"data.pixel_noise adds noise to 8-bit images; sample {i} is {x.dtype} "
                              f"(mode {getattr(image, 'mode', '?')}); convert the images to 8 bits or drop the option")
        return add_pixel_noise(x, torch.tensor([i]), self.sigma, self.seed), label


def flipped_labels(n: int, fraction: float, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(which, shift): round(fraction x n) distinct sample positions, and for each a shift in 1..C-1; the
    noisy label is (label + shift) mod C, so it is always wrong and uniform over the wrong classes."""
    g = torch.Generator().manual_seed(seed)
    which = torch.randperm(n, generator=g)[:round(fraction * n)]
    return which, torch.randint(1, num_classes, (len(which),), generator=g)


class RelabelledSamples(Dataset):
    """A per-sample dataset with some labels shifted (see `flipped_labels`)."""

    def __init__(self, ds: Dataset, which: torch.Tensor, shift: torch.Tensor, num_classes: int):
        self.ds, self.num_classes = ds, num_classes
        self.shift = torch.zeros(len(ds), dtype=torch.int64)
        self.shift[which] = shift

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        image, label = self.ds[i]
        return image, (int(label) + int(self.shift[i])) % self.num_classes
