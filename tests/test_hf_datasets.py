"""`data.dataset=hf:...` through Hugging Face `datasets`, offline: datasets the tests build on disk
(save_to_disk folders, parquet files) and a Hub dataset repository served by tests/fake_hub.py (the real
`datasets` and huggingface_hub code runs; only the network is replaced), then read back from the cache with
the Hub down."""
import json

import pytest

datasets = pytest.importorskip("datasets")
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from conftest import run_cli, run_subprocess  # noqa: E402
from fake_hub import FakeHub  # noqa: E402
from vitlab.config import DataConfig  # noqa: E402
from vitlab.data import build_data  # noqa: E402

CLASSES = ["circle", "square", "triangle"]
TRAIN = ["model.name=vit_micro_patch2_8", "model.depth=1", "train.epochs=1", "train.batch_size=16",
         "data.num_workers=0", "output.progress=none", "output.tensorboard=false", "data.augment=none"]


def images(n, side, mode="L", seed=0):
    rng = np.random.default_rng(seed)
    shape = (side, side) if mode == "L" else (side, side, 3)
    return [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode) for _ in range(n)]


def split(n, side=16, mode="L", image="image", label="label", seed=0):
    features = datasets.Features({image: datasets.Image(), label: datasets.ClassLabel(names=CLASSES)})
    return datasets.Dataset.from_dict({image: images(n, side, mode, seed), label: [i % 3 for i in range(n)]},
                                      features=features)


def data(source, tmp_path, **kw):
    return build_data(DataConfig(dataset=f"hf:{source}", data_dir=str(tmp_path / "cache"), **kw))


def test_save_to_disk_folder_trains_with_its_splits_and_class_names(tmp_path, capsys):
    datasets.DatasetDict(train=split(60), test=split(20, seed=1)).save_to_disk(tmp_path / "saved")
    bundle = data(tmp_path / "saved", tmp_path)
    assert bundle.info.class_names == CLASSES and bundle.info.in_chans == 1 and bundle.info.img_size == 16
    assert {k: len(v) for k, v in bundle.splits.items()} == {"train": 54, "val": 6, "test": 20}
    code, _, err = run_cli(["train", f"data.dataset=hf:{tmp_path / 'saved'}", f"data.data_dir={tmp_path}",
                            f"output.dir={tmp_path / 'out'}", *TRAIN], capsys)
    assert code == 0, err
    results = json.loads(next((tmp_path / "out").rglob("results.json")).read_text())
    assert results["dataset"] == f"hf:{tmp_path / 'saved'}" and results["test_samples"] == 20


def test_parquet_folder_splits_from_file_names_validation_becomes_test(tmp_path):
    """train + validation and no test (the ImageNet habit): report on validation, carve val from train."""
    split(50).to_parquet(tmp_path / "pq" / "train-00000-of-00001.parquet")
    split(10, seed=1).to_parquet(tmp_path / "pq" / "validation-00000-of-00001.parquet")
    bundle = data(tmp_path / "pq", tmp_path)
    assert {k: len(v) for k, v in bundle.splits.items()} == {"train": 45, "val": 5, "test": 10}


def test_one_parquet_file_is_carved_into_all_three_splits(tmp_path):
    split(50).to_parquet(tmp_path / "all.parquet")
    bundle = data(tmp_path / "all.parquet", tmp_path)
    assert {k: len(v) for k, v in bundle.splits.items()} == {"train": 36, "val": 4, "test": 10}


def test_named_columns_and_large_rgb_images_decode_lazily(tmp_path):
    datasets.DatasetDict(train=split(12, side=72, mode="RGB", image="picture", label="y"),
                         test=split(4, side=72, mode="RGB", image="picture", label="y")).save_to_disk(tmp_path / "s")
    bundle = data(tmp_path / "s", tmp_path, image_key="picture", label_key="y")
    assert bundle.info.in_chans == 3 and bundle.info.img_size == 72
    image, label = bundle.splits["test"][1]
    assert image.size == (72, 72) and image.mode == "RGB" and label == 1
    x, y = next(iter(bundle.loader("train", 4)))
    assert x.shape == (4, 3, 72, 72)


def test_a_missing_column_is_one_clear_line(tmp_path, capsys):
    datasets.DatasetDict(train=split(10), test=split(4)).save_to_disk(tmp_path / "s")
    capsys.readouterr()  # the save's progress bars
    code, _, err = run_cli(["train", f"data.dataset=hf:{tmp_path / 's'}", "data.image_key=photo", *TRAIN,
                            f"output.dir={tmp_path / 'out'}"], capsys)
    assert code == 2 and err.count("\n") == 1 and "no column 'photo'" in err and "image, label" in err


def test_a_damaged_parquet_file_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "train.parquet").write_bytes(b"not parquet at all")
    code, _, err = run_cli(["train", f"data.dataset=hf:{tmp_path / 'train.parquet'}", *TRAIN,
                            f"data.data_dir={tmp_path}", f"output.dir={tmp_path / 'out'}"], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "could not be read as parquet" in err, err


def test_hub_dataset_is_cached_under_data_dir_and_read_offline(tmp_path, monkeypatch, capsys):
    """`hf:alice/shapes` from the (fake) Hub, cached under data.data_dir; then with the Hub down and offline
    mode on, the same config trains from that cache alone."""
    repo_files = {}
    for name, ds in (("train", split(60)), ("test", split(20, seed=1))):
        ds.to_parquet(tmp_path / f"{name}.parquet")
        repo_files[f"data/{name}-00000-of-00001.parquet"] = (tmp_path / f"{name}.parquet").read_bytes()
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # raw files: not ~/.cache
    hub = FakeHub("alice/shapes", repo_files, repo_type="dataset").install()
    try:
        bundle = data("alice/shapes", tmp_path)
        assert {k: len(v) for k, v in bundle.splits.items()} == {"train": 54, "val": 6, "test": 20}
        assert any(str(r.url).endswith("data/train-00000-of-00001.parquet") for r in hub.requests)
        assert list((tmp_path / "cache" / "huggingface").glob("alice___shapes"))  # the prepared Arrow tables
        assert list((tmp_path / "hub").glob("datasets--alice--shapes"))  # the downloaded files
        hub.down = True
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        code, _, err = run_cli(["train", "data.dataset=hf:alice/shapes", f"data.data_dir={tmp_path / 'cache'}",
                                f"output.dir={tmp_path / 'out'}", *TRAIN], capsys)
        assert code == 0, err
    finally:
        FakeHub.uninstall()


def test_an_uncached_hub_dataset_without_network_is_one_clear_line(tmp_path):
    run = run_subprocess(["-m", "vitlab", "train", "data.dataset=hf:nobody/nothing", f"data.data_dir={tmp_path}",
                          f"output.dir={tmp_path / 'out'}"], env_extra={"HF_HUB_OFFLINE": "1"})
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "'nobody/nothing' could not be loaded and is not in the cache" in run.stderr
    assert not (tmp_path / "out").exists()


def test_hf_names_keep_their_case_and_unknown_names_mention_hf():
    from vitlab.data import canonical_dataset
    assert canonical_dataset("HF:uoft-cs/CIFAR100") == "hf:uoft-cs/CIFAR100"
    assert canonical_dataset("hf:1aurent/BACH") == "hf:1aurent/BACH"
