"""Turn a `DataConfig` into train/val/test splits and their loaders."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from ..config import DataConfig
from ..errors import VitlabError
from .datasets import IMAGENET_MEAN, IMAGENET_STD, DatasetInfo, RawSplits, TensorImages, load_raw, seeded_split
from .noise import NoisyImages, NoisySamples, RelabelledSamples, flipped_labels
from .tensor_loader import TensorBatchLoader
from .transforms import MixCollate, build_transform


class Transformed(Dataset):
    def __init__(self, ds: Dataset, transform):
        self.ds, self.transform = ds, transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        image, label = self.ds[i]
        return self.transform(image), label


class EvalShard(Dataset):
    """Samples rank, rank + world, ... of `ds`, padded to ceil(n / world) with label -100 (ignored)."""

    def __init__(self, ds: Dataset, rank: int, world: int):
        self.ds, self.rank, self.world = ds, rank, world

    def __len__(self) -> int:
        return -(-len(self.ds) // self.world)

    def __getitem__(self, i: int):
        j = self.rank + i * self.world
        if j < len(self.ds):
            return self.ds[j]
        return self.ds[0][0], -100


@dataclass
class DataBundle:
    """Raw splits plus how to transform them; `loader(split)` picks the fastest correct loader."""
    info: DatasetInfo
    img_size: int
    in_chans: int
    augment: str
    splits: dict[str, Dataset]

    def dataset(self, split: str) -> Dataset:
        """The split with per-sample torchvision transforms (training augmentation only on 'train')."""
        train = split == "train"
        return Transformed(self.splits[split], build_transform(self.info, self.img_size, self.in_chans,
                                                               self.augment, train))

    def loader(self, split: str, batch_size: int, num_workers: int = 0, seed: int = 0,
               mix: MixCollate | None = None, pin_memory: bool = False, rank: int = 0, world: int = 1):
        """This rank's loader of `split`: the batched `TensorBatchLoader` for in-memory datasets, else a
        DataLoader with workers. `batch_size` is per rank.

        Train loaders shuffle as a function of (seed, epoch) alone (`set_epoch`), so a resumed run sees the
        same batches, and shard with DistributedSampler's interleaving: the ranks' k-th batches together are
        the k-th batch of one process with `batch_size x world`. Evaluation shards never repeat a sample;
        short ranks get padding labelled -100, which `evaluate` ignores."""
        train = split == "train"
        tensors = _tensors(self.splits[split])
        if tensors is not None and not (train and self.augment == "randaugment"):
            return TensorBatchLoader(*tensors, self.info, self.img_size, self.in_chans, batch_size, train,
                                     self.augment, seed, mix if train else None, rank=rank, world=world)
        ds = self.dataset(split)
        workers = min(num_workers, os.cpu_count() or 1)
        if not train:
            return DataLoader(EvalShard(ds, rank, world), batch_size=batch_size, num_workers=workers,
                              pin_memory=pin_memory)
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=mix,
                          pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed))


def _tensors(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(images, labels) when `ds` is a TensorImages or a Subset of one, else None."""
    index = None
    while isinstance(ds, Subset):
        idx = torch.as_tensor(ds.indices)
        index = idx if index is None else idx[index]
        ds = ds.dataset
    if not isinstance(ds, TensorImages):
        return None
    if index is None:
        return ds.images, ds.labels
    # generated images and masks (MNIST-on-canvas) stay generated
    return tuple(t.subset(index) if hasattr(t, "subset") else t[index] for t in (ds.images, ds.labels))


def build_data(cfg: DataConfig, img_size: int | None = None, in_chans: int | None = None) -> DataBundle:
    """Load `cfg.dataset`; `img_size`/`in_chans` default to the data's own."""
    if cfg.canvas_clutter and cfg.dataset not in ("mnist_canvas", "mnist_canvas_seg"):
        raise VitlabError(f"data.canvas_clutter={cfg.canvas_clutter} applies to mnist_canvas and mnist_canvas_seg "
                          f"only, not {cfg.dataset}; drop it or set data.dataset=mnist_canvas")
    if not 0 <= cfg.label_noise < 1:  # the bound for the dataset's classes is checked once they are known
        raise VitlabError(f"data.label_noise={cfg.label_noise} must be a fraction in 0..1 (excluded) of the "
                          f"training labels")
    if not 0 <= cfg.pixel_noise <= 4:
        raise VitlabError(f"data.pixel_noise={cfg.pixel_noise} must be in 0..4 (the noise's std in units of the "
                          f"pixel range; 1.0 already hides most of an image)")
    raw = load_raw(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download, test_fraction=cfg.test_fraction,
                   split_seed=cfg.split_seed, img_size=cfg.img_size or img_size,
                   synthetic_size=cfg.synthetic_size, synthetic_classes=cfg.synthetic_classes,
                   canvas_size=cfg.canvas_size, canvas_digit_size=cfg.canvas_digit_size,
                   canvas_clutter=cfg.canvas_clutter,
                   image_key=cfg.image_key, label_key=cfg.label_key)
    if cfg.pixel_noise:
        raw = _with_pixel_noise(raw, cfg.pixel_noise, cfg.split_seed)
    train, val = raw.train, raw.val
    carved = val is None
    if carved:
        train, val = seeded_split(train, cfg.val_fraction, cfg.split_seed + 1)
    for split, ds, key in (("train", train, None), ("val", val, "data.val_fraction" if carved else None),
                           ("test", raw.test, "data.test_fraction")):
        if len(ds) == 0:  # an empty split would fail much later, inside a loader or a metric
            fix = f"raise {key} (now {getattr(cfg, key.split('.')[1])})" if key else "add images to it"
            raise VitlabError(f"the {split} split of {cfg.dataset} is empty; {fix}, or use a larger dataset")
    if 0 < cfg.max_train_samples < len(train):
        train, _ = seeded_split(train, 1 - cfg.max_train_samples / len(train), cfg.split_seed + 2)
    if cfg.label_noise:
        train = _with_label_noise(train, cfg.label_noise, raw.info, cfg.split_seed)
    info = raw.info
    if cfg.normalization != "dataset":
        mean, std = ((0.5,) * 3, (0.5,) * 3) if cfg.normalization == "half" else (IMAGENET_MEAN, IMAGENET_STD)
        info = dataclasses.replace(info, mean=mean, std=std)
    return DataBundle(info, cfg.img_size or img_size or raw.info.img_size, in_chans or raw.info.in_chans,
                      cfg.augment, {"train": train, "val": val, "test": raw.test})


def _with_pixel_noise(raw: RawSplits, sigma: float, split_seed: int) -> RawSplits:
    """Every split's images with their fixed noise (vitlab.data.noise). Noise follows a sample's id in its
    source dataset, and each source split has a seed of its own (a carved split shares its source's seed, with
    other ids)."""
    def noisy(ds: Dataset | None, salt: int) -> Dataset | None:
        seed = split_seed * 1_000_003 + 7919 * salt
        if ds is None:
            return None
        if isinstance(ds, Subset):  # a carved split: noise its source, by the source's sample ids
            return Subset(noisy(ds.dataset, salt), ds.indices)
        if isinstance(ds, TensorImages):  # in memory: the batched loader noises whole batches
            return TensorImages(NoisyImages(ds.images, sigma, seed), ds.labels)
        return NoisySamples(ds, sigma, seed)
    return dataclasses.replace(raw, train=noisy(raw.train, 1), test=noisy(raw.test, 2), val=noisy(raw.val, 3))


def _with_label_noise(train: Dataset, fraction: float, info: DatasetInfo, split_seed: int) -> Dataset:
    """The training split with `fraction` of its labels moved to a wrong class (vitlab.data.noise)."""
    classes = info.num_classes
    if info.task != "classify":
        raise VitlabError(f"data.label_noise applies to classification; {info.name} labels pixels (masks); "
                          f"drop data.label_noise")
    if not 0 <= fraction < 1 - 1 / classes:
        raise VitlabError(f"data.label_noise={fraction} must be in 0..{1 - 1 / classes:.3g} (excluded) for "
                          f"{classes} classes: at that fraction the true class is no longer the most frequent")
    which, shift = flipped_labels(len(train), fraction, classes, split_seed * 1_000_003 + 4)
    tensors = _tensors(train)
    if tensors is None:
        return RelabelledSamples(train, which, shift, classes)
    images, labels = tensors
    labels = labels.clone()
    labels[which] = (labels[which] + shift) % classes
    return TensorImages(images, labels)


def set_epoch(loader, epoch: int) -> None:
    """Make the loader's order and augmentation for this epoch a function of (seed, epoch)."""
    if isinstance(loader, TensorBatchLoader):
        loader.set_epoch(epoch)
    elif isinstance(loader.sampler, DistributedSampler):
        sampler = loader.sampler
        sampler.set_epoch(epoch)
        loader.generator.manual_seed((sampler.seed * 100_003 + epoch) * 1_009 + sampler.rank)  # worker seeds
