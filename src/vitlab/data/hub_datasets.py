"""Image-classification datasets through Hugging Face `datasets`: `data.dataset=hf:<source>`, where source is

- a Hub repository (`hf:uoft-cs/cifar100`, `hf:1aurent/BACH`): the prepared Arrow tables are cached under
  `<data.data_dir>/huggingface` and read from there when the Hub cannot be reached (the downloaded files
  themselves go to Hugging Face's shared hub cache, `HF_HOME`, as for every other HF tool);
- a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
- parquet files: one file (its rows are the train split), or a folder of them whose names carry the split
  (`train-00000-of-00001.parquet`, `test.parquet`, ...).

The image column is the first `Image` feature (or `data.image_key`), the label column the first `ClassLabel`
(or `data.label_key`; an integer column also works), and the class names come from that ClassLabel. Splits map
onto train/val/test as the folder datasets' do: `validation` (or `val`, `valid`) is the validation split when a
test split exists beside it, else the reported one; what is missing is carved by a seeded split.
Small images (side <= 64) are decoded once into one uint8 tensor, so the in-memory batch loader applies.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import VitlabError
from .datasets import IMAGENET_MEAN, IMAGENET_STD, DatasetInfo, RawSplits, TensorImages, seeded_split

PREFIX = "hf:"
VAL_NAMES = ("validation", "val", "valid")
IN_MEMORY_SIDE = 64  # images at most this large are held in memory as one tensor


class HFImages(Dataset):
    """(PIL image, label) pairs of one split, decoded on access."""

    def __init__(self, split, image_key: str, label_key: str, mode: str):
        self.split, self.image_key, self.label_key, self.mode = split, image_key, label_key, mode

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        row = self.split[int(i)]
        return row[self.image_key].convert(self.mode), int(row[self.label_key])


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise VitlabError("data.dataset=hf:... reads Hugging Face datasets: pip install 'vitlab[hf]' "
                          "(the `datasets` library)") from None
    return datasets


def _open(source: str, cache_dir: Path):
    """A DatasetDict for `source`: a save_to_disk folder, parquet file(s), or a Hub repository."""
    datasets = _import_datasets()
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(str(path))
            return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
        files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
        if not files or any(f.suffix != ".parquet" for f in files):
            raise VitlabError(f"'{path}' is neither a save_to_disk folder nor parquet files; point data.dataset="
                              f"hf:<path> at one of those, or hf:<owner>/<name> at a Hub dataset")
        data_files = {"train": [str(f) for f in files]} if path.is_file() else _parquet_splits(files)
        try:
            return datasets.load_dataset("parquet", data_files=data_files, cache_dir=str(cache_dir))
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise VitlabError(f"'{path}' could not be read as parquet ({reason}); check the files, or point "
                              f"data.dataset=hf:<path> elsewhere") from None
    try:
        return datasets.load_dataset(source, cache_dir=str(cache_dir))
    except (ConnectionError, OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise VitlabError(f"Hugging Face dataset '{source}' could not be loaded and is not in the cache at "
                          f"{cache_dir} ({reason}); run once with network access (same data.data_dir), or give "
                          f"data.dataset=hf:<folder> of a save_to_disk copy or parquet files") from None


def _parquet_splits(files: list[Path]) -> dict[str, list[str]]:
    """{split: files} from file names (train-00000-of-00002.parquet -> train); unnamed files are train."""
    out: dict[str, list[str]] = {}
    for f in files:
        name = f.stem.split("-")[0].lower()
        split = name if name in ("train", "test", *VAL_NAMES) else "train"
        out.setdefault(split, []).append(str(f))
    return out


def _column(features: dict[str, Any], wanted: str | None, kind: str, names: tuple[str, ...], source: str) -> str:
    """The column named `wanted`, else the first feature of type `kind`, else the first of `names`."""
    if wanted is not None:
        if wanted not in features:
            raise VitlabError(f"'{source}' has no column '{wanted}' (columns: {', '.join(features)}); fix "
                              f"data.{'image' if kind == 'Image' else 'label'}_key")
        return wanted
    found = [k for k, f in features.items() if type(f).__name__ == kind]
    found += [k for k in names if k in features]
    if not found:
        key = "image" if kind == "Image" else "label"
        raise VitlabError(f"'{source}' has no {key} column found by type or name (columns: {', '.join(features)});"
                          f" name it with data.{key}_key=COLUMN")
    return found[0]


def load_hf(dataset: str, data_dir: str, test_fraction: float, split_seed: int, image_key: str | None = None,
            label_key: str | None = None, **_) -> RawSplits:
    source = dataset[len(PREFIX):]
    splits = _open(source, Path(data_dir).expanduser() / "huggingface")
    by_name = {name.lower(): split for name, split in splits.items()}
    if "train" not in by_name:
        raise VitlabError(f"'{source}' has no train split (splits: {', '.join(splits)}); vitlab trains on 'train'")
    train = by_name["train"]
    image_col = _column(train.features, image_key, "Image", ("image", "img", "pixel_values"), source)
    label_col = _column(train.features, label_key, "ClassLabel", ("label", "labels", "fine_label", "target"), source)
    feature = train.features[label_col]
    classes = list(feature.names) if hasattr(feature, "names") else []
    first = train[0][image_col]
    mode = "L" if first.mode in ("L", "1", "I;16", "I") else "RGB"
    in_chans, side = (1 if mode == "L" else 3), max(first.size)
    val_split = next((by_name[n] for n in VAL_NAMES if n in by_name), None)
    test_split = by_name.get("test")
    if test_split is None and val_split is not None:  # the ImageNet habit: report on validation, carve val
        test_split, val_split = val_split, None
    to_torch = lambda s: _as_torch(s, image_col, label_col, mode, side)  # noqa: E731
    train_ds = to_torch(train)
    if test_split is None:
        train_ds, test_ds = seeded_split(train_ds, test_fraction, split_seed)
    else:
        test_ds = to_torch(test_split)
    val_ds = to_torch(val_split) if val_split is not None else None
    if not classes:
        classes = [str(c) for c in range(int(max(train[label_col])) + 1)]
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,), (0.5,))
    info = DatasetInfo(dataset, len(classes), in_chans, side, mean, std, True,
                       "pad" if side <= IN_MEMORY_SIDE else "rrc", classes)
    return RawSplits(info, train_ds, test_ds, val_ds)


def _as_torch(split, image_col: str, label_col: str, mode: str, side: int) -> Dataset:
    """Small equal-sized images: one uint8 tensor (N, C, H, W); others: decoded per access."""
    if side <= IN_MEMORY_SIDE:
        images = [np.asarray(im.convert(mode)) for im in split[image_col]]
        if len({im.shape for im in images}) == 1:
            array = np.stack(images)
            array = array[:, None] if array.ndim == 3 else array.transpose(0, 3, 1, 2)  # (N, C, H, W)
            return TensorImages(torch.from_numpy(np.ascontiguousarray(array)),
                                torch.as_tensor(split[label_col], dtype=torch.int64))
    return HFImages(split.select_columns([image_col, label_col]), image_col, label_col, mode)
