"""`vitlab push`: a finished run as a Hub model repository, committed through the real huggingface_hub client to
the in-memory Hub (fake_hub.py), then loaded back from it by timm (`create_model("hf-hub:...")`, the oracle: our
logits) and by vitlab, for a standard ViT and for a family timm does not have."""
import json

import pytest
import torch
import yaml

from conftest import QUICK, run_cli
from fake_hub import FakeHub
from test_hub import TOKEN

timm = pytest.importorskip("timm")

REPO = "alice/digits-vit"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    monkeypatch.chdir(tmp_path)
    for key in ("HF_REPOSITORY", "HF_ENDPOINT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    fake = FakeHub(REPO).install()
    yield fake
    FakeHub.uninstall()


def train(capsys, tmp_path, *extra):
    code, _, err = run_cli(["train", *QUICK, "train.epochs=1", "data.max_train_samples=256", "--output",
                            str(tmp_path / "runs"), *extra], capsys)
    assert code == 0, err
    return next((tmp_path / "runs").rglob("results.json")).parent


def our_logits(run_dir, x):
    from vitlab.train import load_checkpoint
    model, _, _ = load_checkpoint(run_dir)
    with torch.no_grad():
        return model.eval()(x)


def card(hub) -> tuple[dict, str]:
    text = hub.files["README.md"].decode()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_a_standard_vit_loads_in_timm_with_our_logits(hub, capsys, tmp_path, pool):
    run_dir = train(capsys, tmp_path, f"model.global_pool={pool}", "train.ema=true", "--savefile", f"vit_{pool}")
    code, out, err = run_cli(["push", str(run_dir), "--repo", REPO, "--license", "mit"], capsys)
    assert code == 0, err
    assert {"model.safetensors", "config.json", "README.md", "config.yaml", "results.json"} <= set(hub.files)
    assert any(name.startswith("plots/") and name.endswith(".png") for name in hub.files)
    assert not any(TOKEN.encode() in data for data in hub.files.values())  # the token is in no file
    config = json.loads(hub.files["config.json"])
    assert config["vitlab"]["timm"] == "loads in timm" and config["label_names"] == [str(i) for i in range(10)]
    x = torch.randn(4, 1, 8, 8)
    ours = our_logits(run_dir, x)  # the EMA's weights: what the run evaluated
    theirs = timm.create_model(f"hf-hub:{REPO}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours, rtol=1e-5, atol=1e-5)
    import vitlab
    back = vitlab.create_model(f"hf-hub:{REPO}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours, rtol=1e-5, atol=1e-5)
    front, body = card(hub)
    assert front["license"] == "mit" and front["library_name"] == "timm" and "timm" in front["tags"]
    results = json.loads((run_dir / "results.json").read_text())
    assert f"| test top-1 % | {100 * results['test_top1']:.2f} |" in body
    assert "```text\nvitlab train" in body and f'timm.create_model("hf-hub:{REPO}"' in body


def test_another_family_loads_back_in_vitlab(hub, capsys, tmp_path):
    run_dir = train(capsys, tmp_path, "model.name=rev_vit_micro_patch2_8", "model.depth=2")
    code, _, err = run_cli(["push", str(run_dir), "--repo", REPO], capsys)
    assert code == 0, err
    config = json.loads(hub.files["config.json"])
    assert config["architecture"] == "rev_vit_micro_patch2_8" and "timm does not have" in config["vitlab"]["timm"]
    front, body = card(hub)
    assert front["library_name"] == "vitlab" and front["license"] == "other" and "timm cannot build" in body
    import vitlab
    x = torch.randn(3, 1, 8, 8)
    back = vitlab.create_model(f"hf-hub:{REPO}", pretrained=True).eval()
    assert back.vitlab_name == "rev_vit_micro_patch2_8" and back.vitlab_args["depth"] == 2
    with torch.no_grad():
        torch.testing.assert_close(back(x), our_logits(run_dir, x))


def test_run_data_in_the_card_is_escaped():
    from vitlab.push import _cell, _fenced
    assert _cell("a|b`c`<img src=x>[l](u)") == "a\\|b\\`c\\`\\<img src=x\\>\\[l\\](u)"
    text = "vitlab train --savefile 'x```\n# heading'"
    block = _fenced(text)
    fence = block.splitlines()[0].removesuffix("text")
    assert len(fence) == 4 and block.endswith("\n" + fence)  # no run of backticks inside can close it


def test_bad_pushes_are_one_line(hub, capsys, tmp_path, monkeypatch):
    (tmp_path / "unfinished").mkdir()
    code, _, err = run_cli(["push", str(tmp_path / "unfinished"), "--repo", REPO], capsys)
    assert code == 2 and err.count("\n") == 1 and "not a finished run" in err
    code, _, err = run_cli(["push", str(tmp_path / "unfinished"), "--repo", REPO, "--license", "MIT; rm"], capsys)
    assert code == 2 and err.count("\n") == 1 and "not a license identifier" in err
    monkeypatch.delenv("HF_TOKEN")
    code, _, err = run_cli(["push", str(tmp_path / "unfinished"), "--repo", REPO], capsys)
    assert code == 2 and err.count("\n") == 1 and "HF_TOKEN is not set" in err
