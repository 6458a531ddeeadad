"""The `vitlab` command: the happy paths work, and a real process prints no traceback (every user error, one line
with exit code 2: tests/test_bad_inputs.py)."""
import json

import pytest
from PIL import Image

from conftest import ROOT, run_cli, run_subprocess


def test_real_process_prints_no_traceback(tmp_path):
    r = run_subprocess(["-m", "vitlab", "train", "--model", "vit_nope", "--output", tmp_path])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = run_subprocess(["main.py", "--config", tmp_path / "absent.yaml"])  # seed 000's entry point
    assert r.returncode == 2 and "config file" in r.stderr and "Traceback" not in r.stderr


def test_evaluate_prints_json(trained_run, capsys):
    run_dir, results = trained_run
    code, out, _ = run_cli(["evaluate", "--checkpoint", run_dir / "checkpoints" / "last"], capsys)
    assert code == 0
    got = json.loads(out)
    assert got["split"] == "test" and got["n"] == 359
    assert got["top1"] == pytest.approx(results["test_top1"]) and got["loss"] == pytest.approx(results["test_loss"])
    code, out, _ = run_cli(["evaluate", "--checkpoint", run_dir, "--split", "val"], capsys)
    assert code == 0 and json.loads(out)["n"] == 144
    code, _, err = run_cli(["evaluate", "--checkpoint", run_dir, "--dataset", "cifar100", "--data_dir", run_dir],
                           capsys)
    assert code == 2 and "cifar100" in err


@pytest.mark.slow
def test_evaluate_compiled_matches_eager(trained_run, capsys):
    run_dir, results = trained_run
    code, out, _ = run_cli(["evaluate", "--checkpoint", run_dir, "--compile"], capsys)
    assert code == 0
    got = json.loads(out)
    assert got["top1"] == pytest.approx(results["test_top1"]) and got["loss"] == pytest.approx(results["test_loss"],
                                                                                              rel=1e-4)


def test_predict_prints_topk(trained_run, tmp_path, capsys):
    from sklearn.datasets import load_digits
    d = load_digits()
    paths = []
    for i in range(3):
        p = tmp_path / f"digit{i}.png"
        Image.fromarray((d.images[i] * 255 / 16).astype("uint8")).resize((8, 8)).save(p)
        paths.append(p)
    code, out, _ = run_cli(["predict", "--checkpoint", trained_run[0], *paths, "--topk", "3"], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 3 and all(line.count(",") == 2 for line in lines)
    code, _, err = run_cli(["predict", "--checkpoint", trained_run[0], tmp_path / "none.png"], capsys)
    assert code == 2 and "image" in err and "not found" in err


def test_models_lists_params_and_gflops(capsys):
    code, out, _ = run_cli(["models", "vit_small_patch16_2*"], capsys)
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("vit_small_patch16_224"))
    assert row.split()[1:3] == ["22.05", "4.599"]
    code, out, _ = run_cli(["models", "b1*", "--aliases"], capsys)
    assert "b16" in out


def test_train_via_cli_flags(tmp_path, capsys):
    code, out, err = run_cli(["train", "--model", "vit_micro_patch2_8", "--dataset", "digits", "--epochs", "1",
                              "--batch-size", "128", "--lr", "0.003", "--output", tmp_path, "--savefile", "x",
                              "--num_workers", "0", "--local", "model.depth=1", "output.progress=plain"], capsys)
    assert code == 0, err
    assert "test top-1" in out and "run saved in" in out
    assert "img/s" in out and "eta" in out
    assert (tmp_path / "vitlab" / "x" / "results.json").is_file()


def test_seed000_launcher_trains_gdt_vit_on_an_imagenet_layout(tmp_path):
    """`python main.py --config configs/gdt_vit.yaml --data_dir DIR --output O --savefile S` writes
    O/<task_name>/S (the recipe, shrunk by overrides to run here)."""
    for split, per_class in (("train", 4), ("val", 2)):
        for c in ("n01", "n02"):
            (tmp_path / "in" / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (40, 40), (60 * i, 100 if c == "n01" else 0, 30)).save(
                    tmp_path / "in" / split / c / f"{i}.JPEG")
    small = ["data.img_size=32", "model.stages=[[16,8,0.25],[8,4,0.5]]", "model.patch_size=4", "model.embed_dim=16",
             "model.depth=1", "model.num_heads=2", "model.stage_depth=1", "train.epochs=1", "train.batch_size=4",
             "data.num_workers=0", "output.progress=none"]
    r = run_subprocess(["main.py", "--config", ROOT / "configs" / "gdt_vit.yaml", "--data_dir", tmp_path / "in",
                        "--output", tmp_path / "out", "--savefile", "s", "--local", *small])
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "out" / "gdt_vit_imagenet_v1" / "s"
    results = json.loads((run / "results.json").read_text())
    assert results["model"] == "gdt_vit_base_256" and results["test_samples"] == 4
    assert "T = 13" in (run / "train.log").read_text()  # 3 of 16 px, 2 of 8 px, 8 of 4 px
