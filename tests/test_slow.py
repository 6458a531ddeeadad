"""The shipped recipes end to end (minutes each): `make test-slow`."""
import pytest

from conftest import MNIST_DIR, ROOT
from vitlab.config import load_config
from vitlab.train import train

pytestmark = pytest.mark.slow


def test_quickstart_recipe(tmp_path):
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [f"output.dir={tmp_path}", "output.progress=none"])
    assert train(cfg)["test_top1"] >= 0.95


@pytest.mark.skipif(not (MNIST_DIR / "MNIST" / "raw").is_dir(), reason="shared MNIST not present")
def test_mnist_recipe(tmp_path):
    """Regression guard at the measured 98.1% (bench/RESULTS.md); the 99.0% target is not reached yet."""
    cfg = load_config(ROOT / "configs" / "mnist.yaml",
                      [f"output.dir={tmp_path}", f"data.data_dir={MNIST_DIR}", "output.progress=none"])
    assert train(cfg)["test_top1"] >= 0.978
