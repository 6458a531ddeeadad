"""Datasets by name, each returning raw (image, label) pairs; transforms are added by `build_splits`.

Small datasets (digits, MNIST, Fashion-MNIST, CIFAR) are held in memory as one uint8 tensor, which makes
per-sample transforms cheap. Folder datasets (imagefolder, bach) read files lazily. Every dataset ends up
with train/val/test splits: a dataset without a test split gets one carved off by a seeded split, and
validation is always carved from train unless the dataset has its own (a `val/` folder next to `test/`).
"""
from __future__ import annotations

import dataclasses
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Subset

from ..errors import VitlabError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class DatasetInfo:
    """What a dataset is: sizes, statistics and which augmentations make sense for it."""
    name: str
    num_classes: int
    in_chans: int
    img_size: int  # native (or typical) side length
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool = True  # mirrored digits are not digits
    crop: str = "pad"  # "pad": padded random crop (small images); "rrc": RandomResizedCrop (photos)
    class_names: list[str] = field(default_factory=list)
    task: str = "classify"  # "segment": labels are (H, W) masks of class indices (0: background)


@dataclass
class RawSplits:
    info: DatasetInfo
    train: Dataset
    test: Dataset
    val: Dataset | None = None  # None: carve from train


class TensorImages(Dataset):
    """Images as one uint8 tensor (N, C, H, W) plus int64 labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


def _require_dir(data_dir: str, name: str) -> Path:
    root = Path(data_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise VitlabError(f"data directory '{root}' is a file, not a folder; pass --data_dir pointing at the folder "
                          f"of the {name} data")
    if not root.is_dir():
        raise VitlabError(f"data directory '{root}' does not exist; pass --data_dir pointing at the {name} data "
                          f"(or data.download=true for torchvision datasets)")
    return root


def _torchvision(cls_name: str, name: str, num_classes: int, in_chans: int, img_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...], hflip: bool) -> Callable[..., RawSplits]:
    def build(data_dir: str, download: bool, **_) -> RawSplits:
        import torchvision

        root = Path(data_dir).expanduser()
        if not download:
            _require_dir(data_dir, name)
        cls = getattr(torchvision.datasets, cls_name)
        try:
            parts = [cls(str(root), train=train, download=download) for train in (True, False)]
        except (RuntimeError, urllib.error.URLError, OSError) as exc:
            if download:  # torchvision wraps network errors in a multi-line RuntimeError: keep its first line
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(":")
                raise VitlabError(f"downloading {name} into '{root}' failed ({reason}); this machine may be "
                                  f"offline: copy the dataset there and run with data.download=false") from None
            raise VitlabError(f"{name} not found under '{root}'; pass --data_dir pointing at the folder that "
                              f"holds it, or set data.download=true where the internet is reachable") from None
        splits = []
        for ds in parts:
            images = torch.as_tensor(ds.data)
            images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # (N, C, H, W)
            splits.append(TensorImages(images.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long)))
        info = DatasetInfo(name, num_classes, in_chans, img_size, mean, std, hflip, "pad", list(parts[0].classes))
        return RawSplits(info, splits[0], splits[1])
    return build


def _digits(test_fraction: float, split_seed: int, **_) -> RawSplits:
    """scikit-learn's bundled 8x8 digits (1,797 images, 16 grey levels): works offline, trains in seconds."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.as_tensor(d.images * (255.0 / 16.0)).round().to(torch.uint8).unsqueeze(1)  # (N, 1, 8, 8)
    full = TensorImages(images, torch.as_tensor(d.target, dtype=torch.long))
    train, test = seeded_split(full, test_fraction, split_seed)
    mean, std = float(images.float().mean() / 255), float(images.float().std() / 255)
    info = DatasetInfo("digits", 10, 1, 8, (mean,), (std,), hflip=False, class_names=[str(i) for i in range(10)])
    return RawSplits(info, train, test)


class SyntheticImages(Dataset):
    """Random images and labels, generated on the fly from a seed: for benchmarks and smoke tests only."""

    def __init__(self, n: int, num_classes: int, img_size: int, in_chans: int, seed: int):
        self.n, self.num_classes, self.shape, self.seed = n, num_classes, (in_chans, img_size, img_size), seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        image = torch.randint(0, 256, self.shape, generator=g, dtype=torch.uint8)
        return image, int(torch.randint(self.num_classes, (1,), generator=g))


def _synthetic(img_size: int | None, synthetic_size: int, synthetic_classes: int, split_seed: int, **_) -> RawSplits:
    size = img_size or 224
    info = DatasetInfo("synthetic", synthetic_classes, 3, size, (0.5,) * 3, (0.5,) * 3,
                       class_names=[str(i) for i in range(synthetic_classes)])
    n_eval = max(synthetic_size // 10, 1)
    return RawSplits(info, SyntheticImages(synthetic_size, synthetic_classes, size, 3, split_seed),
                     SyntheticImages(n_eval, synthetic_classes, size, 3, split_seed + 1))


def _pil_rgb(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _image_folder(root: Path):
    from torchvision.datasets import ImageFolder

    return ImageFolder(str(root), loader=_pil_rgb)


def _folder_splits(name: str, data_dir: str, test_fraction: float, split_seed: int,
                   expect_classes: int | None = None, **_) -> RawSplits:
    """train/ [val/] [test/] folders of class subfolders; or class subfolders directly (all carved)."""
    root = _require_dir(data_dir, name)
    sub = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    try:
        if "train" in sub:
            train = _image_folder(sub["train"])
            if "test" in sub:  # a dedicated val split only when a test split exists beside it
                test, val = _image_folder(sub["test"]), _image_folder(sub["val"]) if "val" in sub else None
            elif "val" in sub:  # ImageNet layout: report on val/, carve validation from train
                test, val = _image_folder(sub["val"]), None
            else:
                train, test = seeded_split(train, test_fraction, split_seed)
                val = None
        else:
            full = _image_folder(root)
            train, test = seeded_split(full, test_fraction, split_seed)
            val = None
    except FileNotFoundError as exc:
        raise VitlabError(f"'{root}' has no images in the expected layout ({exc}); use "
                          f"{root}/train/<class>/*.jpg (and val/ or test/), or {root}/<class>/*.jpg") from None
    classes = _base(train).classes
    if expect_classes is not None and len(classes) != expect_classes:
        raise VitlabError(f"{name} needs {expect_classes} class folders, found {len(classes)} under '{root}' "
                          f"({', '.join(classes)}); check --data_dir")
    info = DatasetInfo(name, len(classes), 3, 224, IMAGENET_MEAN, IMAGENET_STD, True, "rrc", list(classes))
    return RawSplits(info, train, test, val)


def _base(ds: Dataset) -> Dataset:
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


def seeded_split(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split off `fraction` of `ds` by a seeded permutation: (rest, part)."""
    n = len(ds)
    n_part = int(round(n * fraction))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(ds, perm[n_part:]), Subset(ds, perm[:n_part])


_MNIST = ((0.1307,), (0.3081,))
_FASHION = ((0.2860,), (0.3530,))
_CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100 = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))

class CanvasDigits:
    """MNIST-on-canvas: each digit resized to `digit` px and pasted at a random position on a black `canvas`
    px square, so most of an image (most tokens) is background. Indexing with a batch of indices renders those
    images (uint8, (B, 1, canvas, canvas)); positions are redrawn by `set_epoch` (training) and fixed at epoch
    0 otherwise (validation and test). They are a function of (seed, epoch, sample, the largest sample id of the
    set): a subset draws its own layout, as it always has (published runs depend on it).

    `clutter` > 0 adds that many fragments per image: squares of digit // 3 px cut from the middle of random
    digits of `pool` (the whole split; MNIST leaves a margin of a sixth around the ink, so nearly every fragment
    shows a stroke) and pasted at random positions (brightest pixel wins). They are a function of (seed, epoch,
    sample) alone, the same in every subset. They look like strokes of a digit but carry no label: distractors
    for a tokenizer that follows edges and for attention. The label, and the segmentation mask
    (`render(..., clutter=False)`), stay the digit's."""

    def __init__(self, digits: torch.Tensor, canvas: int, digit: int, seed: int, ids: torch.Tensor | None = None,
                 clutter: int = 0, pool: torch.Tensor | None = None):
        if not 0 < digit <= canvas:
            raise VitlabError(f"data.canvas_digit_size={digit} must be in 1..data.canvas_size={canvas}")
        if not 0 <= clutter <= 64:
            raise VitlabError(f"data.canvas_clutter={clutter} must be in 0..64 fragments per image")
        if digits.shape[-1] != digit:
            digits = torch.nn.functional.interpolate(digits.float(), size=(digit, digit), mode="bilinear",
                                                     antialias=True).round().clamp(0, 255).to(torch.uint8)
        self.digits, self.canvas, self.digit, self.seed = digits, canvas, digit, seed
        self.ids = torch.arange(len(digits)) if ids is None else ids  # sample identity: positions follow it
        self.clutter, self.fragment = clutter, max(1, digit // 3)
        self.pool = digits if pool is None else pool  # the whole split (ids index it): fragments' sources
        self.set_epoch(0)

    def __len__(self) -> int:
        return len(self.digits)

    def set_epoch(self, epoch: int) -> None:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        span, n = self.canvas - self.digit + 1, int(self.ids.max()) + 1 if len(self.ids) else 0
        every = torch.randint(0, span, (2, n), generator=g)
        self.offsets = every[:, self.ids]  # (2, n): row and column of each digit's top-left corner
        if self.clutter:  # a stream of its own, drawn for the whole split: the same in every subset
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 2 + 1)
            f, k, n = self.fragment, self.clutter, len(self.pool)
            margin = min(self.digit // 6, (self.digit - f) // 2)  # crops from the middle of the digit's box
            source = torch.randint(0, n, (k, n), generator=g, dtype=torch.int32)
            crop = torch.randint(margin, self.digit - f - margin + 1, (2, k, n), generator=g, dtype=torch.int32)
            place = torch.randint(0, self.canvas - f + 1, (2, k, n), generator=g, dtype=torch.int32)
            # (5, k, samples): source digit, crop row/column in it, paste row/column on the canvas
            self.fragments = torch.cat([source[None], crop, place])[:, :, self.ids]

    def subset(self, index: torch.Tensor) -> "CanvasDigits":
        return CanvasDigits(self.digits[index], self.canvas, self.digit, self.seed, self.ids[index], self.clutter,
                            self.pool)

    def __getitem__(self, index) -> torch.Tensor:
        single = isinstance(index, int)
        out = self.render(torch.as_tensor([index] if single else index))
        return out[0] if single else out

    def render(self, index: torch.Tensor, clutter: bool = True) -> torch.Tensor:
        """The canvases of samples `index` (uint8, (B, 1, canvas, canvas)); without the fragments if not `clutter`."""
        oy, ox = self.offsets[:, index]
        out = self._paste(self.digits[index][:, 0], oy, ox, 0, 0, self.digit)
        if clutter and self.clutter:
            source, cy, cx, py, px = self.fragments[:, :, index].long()  # each (k, B)
            for k in range(self.clutter):  # a few fragments, each pasted over the whole batch at once
                out = torch.maximum(out, self._paste(self.pool[source[k]][:, 0], py[k], px[k], cy[k], cx[k],
                                                     self.fragment))
        return out.unsqueeze(1)  # (B, 1, c, c)

    def _paste(self, src: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, cy: torch.Tensor | int,
               cx: torch.Tensor | int, size: int) -> torch.Tensor:
        """(B, c, c) uint8: the `size` px square of each `src` image (B, d, d) at (cy, cx) placed at (oy, ox)."""
        c = self.canvas
        # canvas pixel (r, s) shows source pixel (cy + r - oy, cx + s - ox) where r - oy, s - ox are in 0..size-1
        r = torch.arange(c).view(1, c, 1) - torch.as_tensor(oy).view(-1, 1, 1)
        s = torch.arange(c).view(1, 1, c) - torch.as_tensor(ox).view(-1, 1, 1)
        inside = (r >= 0) & (r < size) & (s >= 0) & (s < size)
        r = (r.clamp(0, size - 1) + torch.as_tensor(cy).view(-1, 1, 1))
        s = (s.clamp(0, size - 1) + torch.as_tensor(cx).view(-1, 1, 1))
        b = torch.arange(len(src)).view(-1, 1, 1)
        return torch.where(inside, src[b, r, s], 0).to(torch.uint8)


class CanvasMasks:
    """The per-pixel labels of a CanvasDigits: each digit's class + 1 where its pixel is brighter than half
    (int64 (B, canvas, canvas)), background 0; rendered from the same layout, redrawn by `set_epoch` alike."""

    def __init__(self, canvas: CanvasDigits, labels: torch.Tensor):
        self.canvas, self.labels = canvas, labels

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.canvas.set_epoch(epoch)

    def subset(self, index: torch.Tensor) -> "CanvasMasks":
        return CanvasMasks(self.canvas.subset(index), self.labels[index])

    def __getitem__(self, index) -> torch.Tensor:
        single = isinstance(index, int)
        index = torch.as_tensor([index] if single else index)
        pixels = self.canvas.render(index, clutter=False)[:, 0]  # (B, c, c) uint8: the digit alone
        out = torch.where(pixels > 127, self.labels[index].view(-1, 1, 1) + 1, 0)
        return out[0] if single else out


def _mnist_canvas_seg(data_dir: str, download: bool, canvas_size: int, canvas_digit_size: int, split_seed: int,
                      canvas_clutter: int = 0, **_) -> RawSplits:
    """MNIST-on-canvas for segmentation: the digit's pixels labelled with its class + 1, background and clutter 0."""
    raw = _mnist_canvas(data_dir, download, canvas_size, canvas_digit_size, split_seed, canvas_clutter)
    splits = [TensorImages(part.images, CanvasMasks(part.images, part.labels)) for part in (raw.train, raw.test)]
    info = dataclasses.replace(raw.info, name="mnist_canvas_seg", num_classes=11, task="segment",
                               class_names=["background", *raw.info.class_names])
    return RawSplits(info, *splits)


class MaskFolder(Dataset):
    """images/<name>.<ext> with masks/<name>.png (class index per pixel), paired by file stem."""

    def __init__(self, root: Path):
        masks = {p.stem: p for p in sorted((root / "masks").glob("*.png"))}
        self.pairs = [(p, masks[p.stem]) for p in sorted((root / "images").iterdir()) if p.stem in masks]
        if not self.pairs:
            raise VitlabError(f"'{root}' has no image/mask pairs; use {root}/images/<name>.<ext> with "
                              f"{root}/masks/<name>.png holding class indices")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[object, torch.Tensor]:
        image, mask = self.pairs[i]
        return _pil_rgb(str(image)), torch.as_tensor(np.array(Image.open(mask)), dtype=torch.long)


def _segfolder(data_dir: str, test_fraction: float, split_seed: int, img_size: int | None = None, **_) -> RawSplits:
    """A segmentation folder: images/ + masks/ (paired by file name), or train/ and test/ folders of that
    layout; loaded into memory as tensors at `data.img_size` (masks resized by nearest neighbour)."""
    root = _require_dir(data_dir, "segfolder")
    parts = [MaskFolder(root / s) for s in ("train", "test") if (root / s).is_dir()] or [MaskFolder(root)]
    tensors = []
    for part in parts:
        images, masks = zip(*(part[i] for i in range(len(part))))
        size = img_size or images[0].size[0]
        x = torch.stack([torch.as_tensor(np.array(im.resize((size, size)))).permute(2, 0, 1) for im in images])
        y = torch.stack([F.interpolate(m[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()
                         for m in masks])
        tensors.append(TensorImages(x.contiguous(), y))
    train, test = tensors if len(tensors) == 2 else seeded_split(tensors[0], test_fraction, split_seed)
    classes = int(max(int(t.labels.max()) for t in tensors)) + 1
    info = DatasetInfo("segfolder", classes, 3, int(tensors[0].images.shape[-1]), IMAGENET_MEAN, IMAGENET_STD,
                       hflip=False, class_names=[str(c) for c in range(classes)], task="segment")
    return RawSplits(info, train, test)


def _mnist_canvas(data_dir: str, download: bool, canvas_size: int, canvas_digit_size: int, split_seed: int,
                  canvas_clutter: int = 0, **_) -> RawSplits:
    mnist = DATASETS["mnist"](data_dir=data_dir, download=download)
    splits = [TensorImages(CanvasDigits(part.images, canvas_size, canvas_digit_size, split_seed + k,
                                        clutter=canvas_clutter), part.labels)
              for k, part in enumerate((mnist.train, mnist.test))]
    if canvas_clutter:  # overlapping fragments: measured on the first 4096 training canvases of the epoch-0 layout
        pixels = splits[0].images[torch.arange(min(4096, len(splits[0].images)))].float() / 255
        mean, square = float(pixels.mean()), float(pixels.square().mean())
    else:  # statistics of the canvases, exactly: the digit's moments diluted by the black area around it
        area, pixels = (canvas_digit_size / canvas_size) ** 2, splits[0].images.digits.float() / 255
        mean, square = float(pixels.mean()) * area, float(pixels.square().mean()) * area
    info = DatasetInfo("mnist_canvas", 10, 1, canvas_size, (mean,), ((square - mean ** 2) ** 0.5,), hflip=False,
                       crop="pad", class_names=mnist.info.class_names)
    return RawSplits(info, *splits)


DATASETS: dict[str, Callable[..., RawSplits]] = {
    "digits": _digits,
    "mnist": _torchvision("MNIST", "mnist", 10, 1, 28, *_MNIST, hflip=False),
    "fashion_mnist": _torchvision("FashionMNIST", "fashion_mnist", 10, 1, 28, *_FASHION, hflip=True),
    "cifar10": _torchvision("CIFAR10", "cifar10", 10, 3, 32, *_CIFAR10, hflip=True),
    "cifar100": _torchvision("CIFAR100", "cifar100", 100, 3, 32, *_CIFAR100, hflip=True),
    "imagefolder": lambda **kw: _folder_splits("imagefolder", **kw),
    "bach": lambda **kw: _folder_splits("bach", expect_classes=4, **kw),
    "synthetic": _synthetic,
    "mnist_canvas": _mnist_canvas,
    "mnist_canvas_seg": _mnist_canvas_seg,
    "segfolder": _segfolder,
}


def dataset_names() -> list[str]:
    return list(DATASETS)


def canonical_dataset(name: str) -> str | None:
    """The registered name for any spelling that differs only in case, dashes and underscores
    (CIFAR-100, CIFAR100, cifar_100 -> cifar100); None when there is none."""
    if name.lower().startswith("hf:"):  # a Hugging Face source: its repository or path is case-sensitive
        return "hf:" + name[3:]
    key = lambda n: n.lower().replace("-", "").replace("_", "")  # noqa: E731
    return next((n for n in DATASETS if key(n) == key(name)), None)


def load_raw(name: str, **kwargs) -> RawSplits:
    if name.startswith("hf:"):
        from .hub_datasets import load_hf
        return load_hf(name, **kwargs)
    return DATASETS[name](**kwargs)
