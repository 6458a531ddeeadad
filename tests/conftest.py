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


def run_subprocess(args, env_extra=None, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env_extra or {})}
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


def tiny_model(name, **overrides):
    """`name` at a tiny size for contract tests: two blocks of width 32 (staged: two one-block stages),
    a 2 x 2 token grid, 5 classes, dropout and drop-path on so that replayed randomness is exercised (routed
    models: routing on in both blocks, undecided routers, so both paths of every token run)."""
    import vitlab
    from vitlab.registry import model_args
    args = model_args(name)
    size = ({"widths": [16, 32], "depths": [1, 1], "head_dim": 8} if "widths" in args
            else {"embed_dim": 32, "depth": 2, "num_heads": 2})
    kw = dict(img_size=2 * args["patch_size"], num_classes=5, drop_path_rate=0.1, drop_rate=0.1, **size)
    if "stages" in args:  # quadtree: 16 px, 4 patches of 8 px, half split into 4 px children: 2 + 8 tokens
        kw.update(img_size=16, patch_size=4, stages=[[8, 4, 0.5]], stage_depth=1)
    if "router_keep_bias" in args:  # routed: both layers dynamic, routers undecided, every token read by the head
        kw.update(dynamic_start_layer=0, router_keep_bias=0.0, global_pool="avg", router_hdim=16, low_rank_dim=4)
    return vitlab.create_model(name, **{**kw, **overrides})


def model_input(model, batch=3, seed=0):
    a = model.vitlab_args
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, a["in_chans"], a["img_size"], a["img_size"], generator=g)
