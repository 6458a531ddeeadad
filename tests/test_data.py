"""Datasets by name, splits, the batched in-memory loader against torchvision's transforms, and errors."""
import pytest
import torch
from PIL import Image

from conftest import MNIST_DIR
from vitlab.config import DataConfig
from vitlab.data import MixCollate, build_data
from vitlab.data.tensor_loader import TensorBatchLoader
from vitlab.errors import VitlabError


def _absolute(ds):
    """Indices of a (nested) Subset into the underlying dataset."""
    idx = None
    while isinstance(ds, torch.utils.data.Subset):
        here = torch.as_tensor(ds.indices)
        idx = here if idx is None else here[idx]
        ds = ds.dataset
    return set(idx.tolist())


def test_digits_splits_are_seeded_and_disjoint():
    a = build_data(DataConfig(dataset="digits"))
    b = build_data(DataConfig(dataset="digits"))
    sizes = {k: len(v) for k, v in a.splits.items()}
    assert sizes == {"train": 1294, "val": 144, "test": 359}
    parts = {k: _absolute(v) for k, v in a.splits.items()}
    assert set.union(*parts.values()) == set(range(1797)) and sum(map(len, parts.values())) == 1797
    assert parts == {k: _absolute(v) for k, v in b.splits.items()}  # same seed, same split
    c = build_data(DataConfig(dataset="digits", split_seed=1))
    assert _absolute(c.splits["test"]) != parts["test"]
    assert a.info.num_classes == 10 and a.in_chans == 1 and a.img_size == 8 and not a.info.hflip


@pytest.mark.skipif(not (MNIST_DIR / "MNIST" / "raw").is_dir(), reason="shared MNIST not present")
def test_real_mnist_loads():
    d = build_data(DataConfig(dataset="mnist", data_dir=str(MNIST_DIR)))
    assert {k: len(v) for k, v in d.splits.items()} == {"train": 54000, "val": 6000, "test": 10000}
    x, y = next(iter(d.loader("test", 64)))
    assert x.shape == (64, 1, 28, 28) and y.dtype == torch.long
    assert abs(x.mean().item()) < 0.2  # normalised with MNIST's statistics


@pytest.mark.parametrize("in_chans,img_size", [(1, 8), (3, 16)])
def test_batched_eval_loader_equals_torchvision_transforms(in_chans, img_size):
    d = build_data(DataConfig(dataset="digits"), img_size=img_size, in_chans=in_chans)
    loader = d.loader("val", 32)
    assert isinstance(loader, TensorBatchLoader)
    x, y = next(iter(loader))
    ds = d.dataset("val")
    ref = torch.stack([ds[i][0] for i in range(32)])
    assert x.shape == (32, in_chans, img_size, img_size)
    one_level = 1 / 255 / min(d.info.std)  # v2 rounds resized pixels to uint8; we resize in float
    torch.testing.assert_close(x, ref, atol=one_level, rtol=0)
    if img_size == 8:  # no resize: identical
        assert torch.equal(x, ref) or torch.allclose(x, ref, atol=1e-6, rtol=0)
    assert y.tolist() == [ds[i][1] for i in range(32)]


def test_batched_random_crop_is_per_sample_shift():
    d = build_data(DataConfig(dataset="digits"), img_size=8)
    loader = d.loader("train", 16, seed=3)
    raw = loader.images[:16].float()
    g = torch.Generator().manual_seed(1)
    oy, ox = torch.randint(0, 3, (16, 1), generator=g), torch.randint(0, 3, (16, 1), generator=g)
    out = loader._random_crop(raw, oy, ox)
    padded = torch.nn.functional.pad(raw, (1, 1, 1, 1))
    for i in range(16):
        assert torch.equal(out[i], padded[i, :, oy[i, 0]:oy[i, 0] + 8, ox[i, 0]:ox[i, 0] + 8])


def test_train_order_depends_on_seed_and_epoch_only():
    d = build_data(DataConfig(dataset="digits", augment="basic"))
    first = lambda loader: next(iter(loader))  # noqa: E731
    a, b = d.loader("train", 64, seed=1), d.loader("train", 64, seed=1)
    a.set_epoch(2), b.set_epoch(2)
    assert all(torch.equal(u, v) for u, v in zip(first(a), first(b)))
    b.set_epoch(3)
    assert not torch.equal(first(a)[1], first(b)[1])


def test_mixup_cutmix_give_soft_labels():
    d = build_data(DataConfig(dataset="digits"))
    x, y = next(iter(d.loader("train", 16, mix=MixCollate(10, mixup=0.8, cutmix=1.0))))
    assert y.shape == (16, 10) and torch.allclose(y.sum(1), torch.ones(16))


def test_randaugment_uses_per_sample_dataloader():
    """randaugment goes through torchvision's per-sample transforms: a DataLoader over the transformed split,
    whose batches are those transforms applied to the shuffled samples (not the in-memory loader's path)."""
    d = build_data(DataConfig(dataset="digits", augment="randaugment"), img_size=16)
    loader = d.loader("train", 8, num_workers=0, seed=5)
    assert isinstance(loader, torch.utils.data.DataLoader) and not isinstance(loader, TensorBatchLoader)
    torch.manual_seed(0)
    x, y = next(iter(loader))
    assert x.shape == (8, 1, 16, 16) and y.shape == (8,)
    order = list(iter(loader.sampler))[:8]
    ds = d.dataset("train")
    assert y.tolist() == [ds[i][1] for i in order]  # the sampler's samples, in its order
    plain = torch.stack([build_data(DataConfig(dataset="digits", augment="none"), img_size=16).dataset("train")[i][0]
                         for i in order])
    assert not torch.allclose(x, plain)  # augmented: not the plain resize + normalise


def _write_folder(root, classes, n=3, size=20):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (size + i, size), (40 * i, 80, 120)).save(root / c / f"{i}.png")


def test_imagefolder_layouts(tmp_path):
    _write_folder(tmp_path / "train", ["cat", "dog"], n=6)
    _write_folder(tmp_path / "val", ["cat", "dog"], n=2)
    d = build_data(DataConfig(dataset="imagefolder", data_dir=str(tmp_path), val_fraction=0.25), img_size=16)
    assert len(d.splits["test"]) == 4 and len(d.splits["val"]) == 3 and len(d.splits["train"]) == 9
    assert d.info.class_names == ["cat", "dog"]
    x, y = next(iter(d.loader("train", 4, num_workers=0)))
    assert x.shape == (4, 3, 16, 16)
    x, _ = next(iter(d.loader("test", 4)))
    assert x.shape == (4, 3, 16, 16)


def test_bach_needs_four_classes(tmp_path):
    _write_folder(tmp_path, ["Benign", "InSitu", "Invasive", "Normal"], n=5)
    d = build_data(DataConfig(dataset="bach", data_dir=str(tmp_path)), img_size=16)
    assert d.info.num_classes == 4 and len(d.splits["test"]) == 4
    other = tmp_path / "three"
    _write_folder(other, ["a", "b", "c"])
    with pytest.raises(VitlabError, match="bach needs 4 class folders, found 3"):
        build_data(DataConfig(dataset="bach", data_dir=str(other)))


def test_missing_data_is_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(VitlabError, match="data directory '.*nowhere' does not exist"):
        build_data(DataConfig(dataset="cifar10", data_dir=str(tmp_path / "nowhere")))
    with pytest.raises(VitlabError, match="mnist not found under .*data.download=true"):
        build_data(DataConfig(dataset="mnist", data_dir=str(tmp_path)))
    import urllib.error

    import torchvision.datasets.mnist as tv_mnist

    def offline(*a, **k):
        raise urllib.error.URLError("Temporary failure in name resolution")
    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    with pytest.raises(VitlabError, match="downloading mnist .* failed .*offline") as e:
        build_data(DataConfig(dataset="mnist", data_dir=str(tmp_path), download=True))
    assert "\n" not in str(e.value)


def test_synthetic_is_deterministic():
    d = build_data(DataConfig(dataset="synthetic", synthetic_size=20, synthetic_classes=3), img_size=32)
    again = build_data(DataConfig(dataset="synthetic", synthetic_size=20, synthetic_classes=3), img_size=32)
    assert torch.equal(d.splits["train"][5][0], again.splits["train"][5][0])  # a fresh build: the same images
    assert not torch.equal(d.splits["train"][5][0], d.splits["train"][6][0])
    assert d.info.num_classes == 3 and len(d.splits["test"]) == 2
