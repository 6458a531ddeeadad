import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = ROOT.parent / "shared" / "data"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def no_hub_settings(monkeypatch):
    """Tests never see the developer's Hub repository or token."""
    for key in ("HF_REPOSITORY", "HF_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(key, raising=False)


def run_cli(argv, capsys):
    """Run `vitlab ARGV` in-process: (exit code, stdout, stderr)."""
    from vitlab.cli import main
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def run_subprocess(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT, **kw)


QUICK = ["data.dataset=digits", "model.name=vit_micro_patch2_8", "model.depth=2", "data.augment=none",
         "data.num_workers=0", "output.progress=none", "output.tensorboard=false", "train.batch_size=64",
         "optim.lr=3e-3"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A small digits run shared by the evaluate/predict/checkpoint tests."""
    from vitlab.config import load_config
    from vitlab.train import train
    out = tmp_path_factory.mktemp("out")
    cfg = load_config(None, QUICK + [f"output.dir={out}", "train.epochs=6", "train.val_every_n_batches=5"])
    results = train(cfg)
    return cfg.run_dir, results
