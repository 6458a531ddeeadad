"""The shipped recipes end to end (minutes each): `make test-slow`."""
import pytest

from conftest import MNIST_DIR, ROOT
from vitlab.config import load_config
from vitlab.train import train

pytestmark = pytest.mark.slow


def test_quickstart_recipe(tmp_path):
    """What `make demo` trains. Measured (bench/RESULTS.md): 94.2 / 95.8 / 94.2% for seeds 0 / 1 / 2, and 97.2%
    when train.deterministic was on by default. The test split holds 359 images, so one image is 0.28 points.
    The guard sits below that spread; the first version's 0.95 came from the single 97.2% run."""
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [f"output.dir={tmp_path}", "output.progress=none"])
    assert train(cfg)["test_top1"] >= 0.93


@pytest.mark.skipif(not (MNIST_DIR / "MNIST" / "raw").is_dir(), reason="shared MNIST not present")
def test_mnist_recipe(tmp_path):
    """Regression guard at the measured 98.1% (bench/RESULTS.md); the 99.0% target is not reached yet."""
    cfg = load_config(ROOT / "configs" / "mnist.yaml",
                      [f"output.dir={tmp_path}", f"data.data_dir={MNIST_DIR}", "output.progress=none"])
    assert train(cfg)["test_top1"] >= 0.978
