"""vitlab as a package, not a checkout: the presets ship as package data and resolve by name, dependencies carry
lower bounds only, and a built wheel installed into a fresh virtual environment outside the checkout runs the
quickstart and an original project's command line.

The fresh environment borrows this one's installed dependencies (torch is too large to install per test) through
a path file, but not its vitlab: the editable install's hook lives in a `.pth` file, which Python runs only in
site directories, and the borrowed folder is added as a plain path. The test checks that the vitlab that runs
is the wheel's."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

from conftest import MNIST_DIR, run_cli
from vitlab.presets import PRESETS, config_file, preset_path, presets

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["output.progress=none", "output.tensorboard=false", "data.num_workers=0"]


def test_presets_resolve_by_name_and_stay_inside_their_folder(tmp_path, monkeypatch):
    quickstart = PRESETS / "quickstart.yaml"
    for name in ("quickstart", "quickstart.yaml", "configs/quickstart.yaml", "./configs/quickstart"):
        assert preset_path(name) == quickstart.resolve()
    assert preset_path("gdt/learned_clutter") == (PRESETS / "gdt" / "learned_clutter.yaml").resolve()
    for outside in ("../pyproject", "/etc/passwd", "gdt/../../cli.py", "", "gdt"):
        assert preset_path(outside) is None
    # a file on disk wins over the preset of the same name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart.yaml").write_text("train: {epochs: 1}\n")
    assert config_file("quickstart.yaml") == Path("quickstart.yaml")
    assert config_file("quickstart") == quickstart.resolve()


def test_every_preset_is_listed_with_its_kind_and_reads(capsys):
    found = {p.name: p for p in presets()}
    assert len(found) == len(list(PRESETS.rglob("*.yaml"))) >= 50
    assert found["quickstart"].kind == "config" and found["sweeps/quickstart_2x2"].kind == "sweep"
    assert all(p.summary for p in found.values()), [n for n, p in found.items() if not p.summary]
    code, out, err = run_cli(["configs", "seed003"], capsys)
    assert code == 0 and "seed003/bdia_mnist" in out and "quickstart " not in out, err
    code, _, err = run_cli(["configs", "no_such_preset"], capsys)
    assert code == 2 and err.count("\n") == 1 and "vitlab configs" in err


def test_missing_config_names_the_presets(capsys):
    code, _, err = run_cli(["train", "--config", "quickstrat"], capsys)
    assert code == 2 and err.count("\n") == 1 and "vitlab configs" in err


def test_dependencies_carry_lower_bounds_only():
    """Exact versions belong in constraints.txt (what make installs); a dependency with an upper bound would
    refuse every user whose torch is newer."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    assert not [d for d in specs if any(op in d for op in ("<", "==", "~=", "!="))]
    pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line]
    assert {p.split("==")[0] for p in pins} >= {"torch", "torchvision"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A wheel built from this checkout, installed with pip into a fresh venv outside it: its bin folder."""
    tmp = tmp_path_factory.mktemp("package")
    # build from a copy of the checkout's files (tracked, and new ones git does not ignore), so that the checkout
    # gets no build/ or egg-info folders
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode()
    source = tmp / "source"
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file() and not (ROOT / name).is_symlink():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels,
                    source], check=True, capture_output=True)
    wheel = next(wheels.glob("vitlab-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index",
                    wheel], check=True, capture_output=True)
    return wheel, venv / "bin"


def _run(bin_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([bin_dir / "vitlab", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_wheel_ships_every_preset(installed):
    wheel, _ = installed
    names = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("vitlab/configs/")}
    expected = {f"vitlab/configs/{p.relative_to(PRESETS).as_posix()}" for p in PRESETS.rglob("*.yaml")}
    assert names == expected


def test_installed_wheel_runs_the_quickstart_by_name(installed, tmp_path):
    _, bin_dir = installed
    where = subprocess.run([bin_dir / "python", "-c", "import vitlab; print(vitlab.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    assert str(ROOT) not in where and "site-packages" in where  # the wheel's vitlab, not the checkout's
    listing = _run(bin_dir, tmp_path, "configs")
    assert listing.returncode == 0 and "quickstart" in listing.stdout and str(ROOT) not in listing.stdout
    done = _run(bin_dir, tmp_path, "train", "--config", "quickstart", "--output", "out", "train.epochs=1", *QUIET)
    assert done.returncode == 0, done.stderr
    results = json.loads(next((tmp_path / "out").rglob("results.json")).read_text())
    assert results["dataset"] == "digits" and results["epochs"] == 1 and results["test_samples"] > 0


@pytest.mark.skipif(not (MNIST_DIR / "MNIST" / "raw").is_dir(), reason="needs ../shared/data/MNIST")
def test_installed_wheel_runs_an_original_command_line(installed, tmp_path):
    """Seed 003's `train_MNIST.py --net vit_small_bdia` needs its recipe, which comes from the package data."""
    _, bin_dir = installed
    done = _run(bin_dir, tmp_path, "train", "--net", "vit_small_bdia", "--dataset", "mnist", "--n_epochs", "1",
                "--data_dir", str(MNIST_DIR), "--output", "out", "data.max_train_samples=256", "data.augment=none",
                "model.depth=2", *QUIET)
    assert done.returncode == 0, done.stderr
    assert "as config: vitlab train --config configs/seed003/bdia_mnist.yaml" in done.stderr
    results = json.loads(next((tmp_path / "out").rglob("results.json")).read_text())
    assert results["model"] == "vit_small_bdia" and results["dataset"] == "mnist"


def test_a_folder_named_like_a_preset_does_not_hide_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mnist").mkdir()  # a dataset folder in the working directory
    assert config_file("mnist") == (PRESETS / "mnist.yaml").resolve()
