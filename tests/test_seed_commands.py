"""Every command line in ../shared/seeds/ that trains, evaluates, uploads or downloads, typed as its README
writes it with only the program name changed (`python main.py`, `python train.py`, `python run.py`,
`python train_cifar10.py` -> `vitlab`). CIFAR-10/100 and ImageNet cannot be fetched here, so those commands are
checked up to the config they resolve to (training is replaced by a recorder); the MNIST and BACH-layout
commands run to the end with a tiny override, and their run log shows the equivalent vitlab command.

Seed 004 (TowerViT vs stage-wise) is a notebook with no command line: examples/tower_vs_staged.ipynb."""
import json

import pytest
from PIL import Image

from conftest import MNIST_DIR, QUICK, run_cli
from test_hub import TOKEN, hub, use_env  # noqa: F401  (hub: the fixture)

TINY = ["data.num_workers=0", "output.progress=none", "output.tensorboard=false", "data.augment=none"]

# (seed file, the command as its README writes it with `vitlab` for the program, the config it must resolve to)
RESOLVED = [
    ("gdt-vit.md", "train --config configs/gdt_vit.yaml --data_dir /data/imagenet --output out --savefile run_07 "
                   "--num_workers 4 --local",
     {"model.name": "gdt_vit_base_256", "data.data_dir": "/data/imagenet", "output.dir": "out",
      "output.savefile": "run_07", "data.num_workers": 4}),
    ("vit-and-res-vit.md", "train --dataset CIFAR100 --model-arch b16 --batch-size 32 --lr 0.03",
     {"model.name": "vit_base_patch16_224", "data.dataset": "cifar100", "optim.name": "sgd", "optim.lr": 0.03,
      "optim.schedule": "onecycle", "train.max_steps": 15000, "train.batch_size": 32, "lora.rank": 0}),
    ("vit-and-res-vit.md", "train --dataset CIFAR100 --model-arch b16 --use-reslr True --dynamic-active-target 0.4",
     {"model.name": "resvit_base_patch16_224", "model.active_target": 0.4, "optim.name": "adamw",
      "optim.lr": 1e-4, "lora.rank": 8, "data.normalization": "half", "data.img_size": 224}),
    ("differential-vit.md", "train --model vit_classic --size 10B --dataset CIFAR-100 --epochs 50 --batch_size 512 "
                            "--upload true",
     {"model.name": "vit_classic_10m", "data.dataset": "cifar100", "train.epochs": 50, "train.batch_size": 512,
      "output.upload": True, "output.layout": "by_architecture", "data.img_size": 224, "optim.lr": 1e-4,
      "model.drop_rate": 0.2}),
    ("differential-vit.md", "train --model vit_differential --size 50B --dataset BACH --epochs 100 --batch_size 64 "
                            "--upload false",
     {"model.name": "vit_differential_bach_50m", "data.dataset": "bach", "train.epochs": 100,
      "output.upload": False, "data.img_size": 512}),
    ("reversible-bdia-vit.md", "train --net vit_small_bdia --dataset cifar10",
     {"model.name": "vit_small_bdia", "data.dataset": "cifar10", "train.epochs": 400, "train.batch_size": 512,
      "data.augment": "randaugment"}),
    ("reversible-bdia-vit.md", "train --net vit_small_reverse --dataset CIFAR10",
     {"model.name": "vit_small_reverse", "data.dataset": "cifar10", "train.epochs": 400}),
    ("reversible-bdia-vit.md", "train --net vit_small",
     {"model.name": "vit_small", "data.dataset": "cifar10", "train.epochs": 400}),
    ("reversible-bdia-vit.md", "train --net vit_small_momentum --dataset mnist --bs 64 --n_epochs 3 --noamp",
     {"model.name": "vit_small_momentum", "data.dataset": "mnist", "train.batch_size": 64, "train.epochs": 3,
      "train.amp": "none", "model.embed_dim": 64}),
]


def _value(cfg, key):
    section, name = key.split(".")
    if section == "model":
        return cfg.model.args.get(name, getattr(cfg.model, name, None))
    return getattr(getattr(cfg, section), name)


@pytest.mark.parametrize("seed, command, expected", RESOLVED, ids=[f"{s}: {c[:60]}" for s, c, _ in RESOLVED])
def test_seed_command_resolves_to_its_recipe(seed, command, expected, monkeypatch, capsys):
    import vitlab.train as vt
    seen = {}
    monkeypatch.setattr(vt, "train", lambda cfg, **kw: seen.update(cfg=cfg, **kw))
    code, _, err = run_cli(command.split(), capsys)
    assert code == 0, err
    assert {key: _value(seen["cfg"], key) for key in expected} == expected
    assert seen["command"].startswith("vitlab train")
    assert f"vitlab: as config: {seen['command']}" in err or "--config" in command


@pytest.mark.parametrize("spelling, expected", [("True", True), ("true", True), ("1", True), ("False", False),
                                                ("0", False), ("no", False)])
def test_boolean_flag_values_as_the_seeds_write_them(spelling, expected, monkeypatch, capsys):
    import vitlab.train as vt
    seen = {}
    monkeypatch.setattr(vt, "train", lambda cfg, **kw: seen.update(cfg=cfg))
    code, _, err = run_cli(["train", "--upload", spelling, *QUICK], capsys)
    assert code == 0, err
    assert seen["cfg"].output.upload is expected


def test_bare_upload_flag_still_means_true_before_overrides(monkeypatch, capsys):
    import vitlab.train as vt
    seen = {}
    monkeypatch.setattr(vt, "train", lambda cfg, **kw: seen.update(cfg=cfg))
    assert run_cli(["train", "--upload", *QUICK], capsys)[0] == 0 and seen["cfg"].output.upload is True


def test_a_size_without_a_sized_model_is_one_clear_line(capsys):
    code, _, err = run_cli(["train", "--model", "vit_small", "--size", "10B"], capsys)
    assert code == 2 and err.count("\n") == 1 and "vit_classic or vit_differential" in err
    code, _, err = run_cli(["train", "--model", "vit_classic", "--size", "12B"], capsys)
    assert code == 2 and "10B, 25B, 50B" in err


def make_bach(root, per_class=6, size=40):
    """A BACH-layout folder: four class folders of RGB images."""
    for c, name in enumerate(("Benign", "InSitu", "Invasive", "Normal")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (60 * c, 10 * i, 128)).save(root / name / f"{name}_{i:03d}.tif")
    return root


def test_seed002_train_then_evaluate_finds_that_runs_weights(tmp_path, capsys):
    """`run.py train` then `run.py evaluate` with the same --model/--size/--dataset: the evaluation loads the
    weights the training wrote in the by-architecture layout."""
    bach, out = make_bach(tmp_path / "BACH"), tmp_path / "out"
    small = [f"data.data_dir={bach}", "data.img_size=32", "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
             "train.val_every_n_batches=0", *TINY]
    code, _, err = run_cli(["train", "--model", "vit_differential", "--size", "25B", "--dataset", "BACH",
                            "--epochs", "1", "--batch_size", "8", "--output", out, *small], capsys)
    assert code == 0, err
    weights = list(out.rglob("checkpoints/vit_differential_bach/model_*_25M_bach.safetensors"))
    assert len(weights) == 1
    log = next(out.rglob("train.log")).read_text()
    assert "command: vitlab train --config configs/diff_vit/differential_bach_25m.yaml" in log
    code, stdout, err = run_cli(["evaluate", "--model", "vit_differential", "--size", "25B", "--dataset", "BACH",
                                 "--output", out], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["checkpoint"] == str(weights[0]) and result["dataset"] == "bach" and result["n"] > 0


def test_seed002_evaluate_without_a_run_says_how_to_make_one(tmp_path, capsys):
    code, _, err = run_cli(["evaluate", "--model", "vit_classic", "--size", "10B", "--dataset", "CIFAR-100",
                            "--output", tmp_path], capsys)
    assert code == 2 and "vitlab train --model vit_classic --size 10B" in err


def test_seed002_upload_and_download(hub, monkeypatch, tmp_path, capsys):  # noqa: F811
    """`run.py upload <local> <remote dir>` and `run.py download <remote> <local dir>`."""
    use_env(monkeypatch)
    local = tmp_path / "model_1_10M_CIFAR-100.safetensors"
    local.write_bytes(b"weights")
    code, _, err = run_cli(["upload", local, "vit_classic"], capsys)
    assert code == 0, err
    assert hub.files["vit_classic/model_1_10M_CIFAR-100.safetensors"] == b"weights"
    code, _, err = run_cli(["download", "vit_classic/model_1_10M_CIFAR-100.safetensors", tmp_path / "back"], capsys)
    assert code == 0, err
    assert (tmp_path / "back" / "model_1_10M_CIFAR-100.safetensors").read_bytes() == b"weights"
    assert TOKEN not in capsys.readouterr().err


@pytest.mark.skipif(not (MNIST_DIR / "MNIST" / "raw").is_dir(), reason="needs ../shared/data/MNIST")
def test_seed003_mnist_command_trains(tmp_path, capsys):
    """`train_MNIST.py --net vit_small_bdia` as `vitlab train --net vit_small_bdia --dataset mnist`."""
    code, _, err = run_cli(["train", "--net", "vit_small_bdia", "--dataset", "mnist", "--n_epochs", "1",
                            "--output", tmp_path, "data.max_train_samples=512", "train.log_every=4", *TINY], capsys)
    assert code == 0, err
    results = json.loads(next(tmp_path.rglob("results.json")).read_text())
    assert results["model"] == "vit_small_bdia" and results["dataset"] == "mnist" and results["test_samples"] == 10000
    assert "command: vitlab train --config configs/seed003/bdia_mnist.yaml" in next(tmp_path.rglob("train.log")).read_text()


def test_seed001_evaluate_command(capsys, trained_run):
    """`eval.py --checkpoint-path PATH --dataset CIFAR100`: the flags parse and the dataset resolves (here the
    CIFAR-100 files are absent, so it stops at the data, naming it); the same command on the run's own data."""
    run_dir, _ = trained_run
    code, _, err = run_cli(["evaluate", "--checkpoint-path", run_dir, "--dataset", "CIFAR100",
                            "--data_dir", run_dir / "nothing"], capsys)
    assert code == 2 and "cifar100" in err
    code, stdout, err = run_cli(["evaluate", "--checkpoint-path", run_dir, "--dataset", "DIGITS"], capsys)
    assert code == 0 and json.loads(stdout)["dataset"] == "digits", err


def test_evaluate_model_of_another_family_is_one_clear_line(tmp_path, capsys):
    code, _, err = run_cli(["evaluate", "--model", "vit_small", "--output", tmp_path], capsys)
    assert code == 2 and err.count("\n") == 1 and "pass --checkpoint PATH" in err
