import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = ROOT.parent / "shared" / "data"

# One thread, here and in every process a test starts: the tiny models gain nothing from a second, and on a shared
# 2-core machine a second, spinning OpenMP thread makes in-process training 5-10x slower (the quickstart's 5
# epochs: 9 s on one thread, 80-130 s on two while other jobs run).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


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


#: argument names that size a model rather than choose what it is
SIZE_ARGS = {"img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads", "mlp_ratio",
             "widths", "depths", "head_dim", "stages", "stage_depth"}


def registered_name(builder) -> str:
    """The plainest registered name that `builder` (a model class) builds: the fewest defaults that are not
    sizes, then the shortest name (VisionTransformer -> vit_micro_patch2_8); a handle for `create_model` and
    checkpoints, whose choices a caller overrides."""
    from vitlab.registry import list_models, model_entry
    names = [n for n in list_models() if model_entry(n).builder is builder]
    if not names:
        raise LookupError(f"no registered name builds {builder.__name__}")
    return min(names, key=lambda n: (len(set(model_entry(n).defaults) - SIZE_ARGS), len(n), n))


def tiny_model(name, **overrides):
    """`name` (a registered name or a model class) at a tiny size for contract tests: two blocks of width 32
    (staged: two one-block stages), a 2 x 2 token grid, 5 classes, dropout and drop-path on so that replayed
    randomness is exercised (routed models: routing on in both blocks, undecided routers, so both paths of
    every token run)."""
    import vitlab
    from vitlab.registry import model_args
    if isinstance(name, type):
        name = registered_name(name)
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
