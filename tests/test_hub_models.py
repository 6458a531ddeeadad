"""Pretrained models by Hub name (`hf-hub:<owner>/<name>[@rev]`, timm's `<architecture>.<tag>`), through the
real huggingface_hub client and its cache, against an in-memory Hub (fake_hub.py) holding a repository that
timm itself wrote (`timm.models.save_for_hf`). timm is the oracle: the model vitlab builds from the repository
gives timm's logits."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import QUICK, run_cli
from fake_hub import FakeHub

timm = pytest.importorskip("timm")

SRC = Path(__file__).resolve().parents[1] / "src"
REPO = "timm/vit_tiny_patch16_224.augreg_in21k"
TAG_NAME = "vit_tiny_patch16_224.augreg_in21k"
LABELS = ["cat", "dog", "emu", "fox", "gnu", "owl", "yak"]


@pytest.fixture(scope="module")
def timm_repo(tmp_path_factory):
    """{file: bytes} of a timm ViT-Ti/16 (2 blocks, 32 px, 7 classes) saved by timm for the Hub."""
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=7).eval()
    folder = tmp_path_factory.mktemp("timm_repo")
    save_for_hf(model, folder, model_config={"label_names": LABELS}, model_args={"img_size": 32, "depth": 2},
                safe_serialization=True)
    return model, {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """huggingface_hub's standard cache, in a temporary folder; no token, no .env."""
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    monkeypatch.chdir(tmp_path)
    for key in ("HF_TOKEN", "HF_REPOSITORY", "HF_ENDPOINT"):
        monkeypatch.delenv(key, raising=False)
    return tmp_path / "hub_cache"


@pytest.fixture
def hub(timm_repo, cache):
    fake = FakeHub(REPO, timm_repo[1]).install()
    yield fake
    FakeHub.uninstall()


def test_names():
    from vitlab.errors import VitlabError
    from vitlab.hub_models import hub_name
    assert hub_name("hf-hub:alice/run").repo == "alice/run" and hub_name("hf-hub:alice/run").revision is None
    assert hub_name("hf-hub:alice/run@v1.0").revision == "v1.0"
    assert hub_name(TAG_NAME).repo == REPO
    for local in ("weights.safetensors", "model.pth", "ViT-B_16.npz", "dir/file", None, ""):
        assert hub_name(local) is None
    for bad in ("hf-hub:alice", "hf-hub:../x/y", "hf-hub:a/b@../../etc", "hf-hub:a/b c"):
        with pytest.raises(VitlabError, match="not a Hub name"):
            hub_name(bad)


def test_timm_tag_gives_timms_logits_label_names_and_input_size(hub, timm_repo):
    import vitlab
    reference, _ = timm_repo
    model = vitlab.create_model(TAG_NAME, pretrained=True).eval()
    assert model.vitlab_name == "vit_tiny_patch16_224" and model.num_classes == 7
    assert model.pretrained_cfg["label_names"] == LABELS and model.pretrained_cfg["input_size"] == (3, 32, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    assert any("/resolve/" in str(r.url) and r.url.path.endswith("model.safetensors") for r in hub.requests)


def test_second_load_comes_from_the_cache(hub):
    import vitlab
    vitlab.create_model(f"hf-hub:{REPO}", pretrained=True)
    hub.down = True  # no network: the cache answers (huggingface_hub falls back to it)
    model = vitlab.create_model(f"hf-hub:{REPO}", pretrained=True, num_classes=3)  # new head, body loaded
    assert model.num_classes == 3 and any("head" in note for note in model.pretrained_notes)


def test_pretrained_into_a_registered_model_and_config_resolution(hub):
    import vitlab
    from vitlab.resolve import build
    model = vitlab.create_model("vit_tiny_patch16_224", pretrained=TAG_NAME, img_size=32, depth=2, num_classes=7)
    assert model.pretrained_cfg["label_names"] == LABELS
    cfg = build({"model": {"pretrained": f"hf-hub:{REPO}"}, "data": {"dataset": "digits"}})
    assert cfg.model.name == "vit_tiny_patch16_224" and cfg.model.args["depth"] == 2
    assert cfg.data.normalization == "half"  # timm's mean/std for the augreg ViTs: 0.5
    mine = build({"model": {"name": "vit_small_patch16_224", "pretrained": TAG_NAME},
                  "data": {"dataset": "digits", "normalization": "imagenet"}})
    assert mine.model.name == "vit_small_patch16_224" and mine.data.normalization == "imagenet"  # the config's own


def test_train_fine_tunes_a_hub_model_in_one_command(hub, capsys, tmp_path):
    args = [a for a in QUICK if not a.startswith("model.")]
    code, _, err = run_cli(["train", *args, "--pretrained", TAG_NAME, "data.img_size=32", "train.max_steps=3",
                            "--output", str(tmp_path / "out")], capsys)
    assert code == 0, err
    run_dir = next((tmp_path / "out").rglob("results.json")).parent
    saved = (run_dir / "config.yaml").read_text()
    assert "name: vit_tiny_patch16_224" in saved and f"pretrained: {TAG_NAME}" in saved
    log = (run_dir / "train.log").read_text()
    assert "head" in log  # the 7-class head was dropped for the 10 digits (a pretrained note)


def test_bad_hub_names_are_one_line(hub, capsys, timm_repo):
    import vitlab
    from vitlab.errors import VitlabError
    with pytest.raises(VitlabError, match="does not exist on the Hub"):
        vitlab.create_model("vit_tiny_patch16_224.no_such_tag", pretrained=True)
    with pytest.raises(VitlabError, match="does not exist on the Hub; check the owner"):
        vitlab.create_model("hf-hub:alice/nothing", pretrained=True)
    with pytest.raises(VitlabError, match="pretrained=True needs a Hub name"):
        vitlab.create_model("vit_tiny_patch16_224", pretrained=True)
    hub.gated = True
    with pytest.raises(VitlabError, match="is gated: accept its terms"):
        vitlab.create_model(f"hf-hub:{REPO}", pretrained=True)
    hub.gated = False
    hub.files["config.json"] = json.dumps({"architecture": "convnext_tiny", "num_classes": 7}).encode()
    code, _, err = run_cli(["train", "--pretrained", f"hf-hub:{REPO}"], capsys)
    assert code == 2 and err.count("\n") == 1 and "convnext_tiny, which vitlab does not have" in err


def test_offline_uses_the_cache_and_names_what_is_missing(hub, cache, tmp_path):
    """A real process with HF_HUB_OFFLINE=1 (read by huggingface_hub at import, as users set it)."""
    import vitlab
    vitlab.create_model(TAG_NAME, pretrained=True)  # cached online first
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(SRC)}
    env.pop("HF_TOKEN", None)
    code = (f"import vitlab, torch; m = vitlab.create_model({TAG_NAME!r}, pretrained=True); "
            f"print(m.vitlab_name, m.num_classes)")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.split() == ["vit_tiny_patch16_224", "7"], done.stderr
    missing = subprocess.run([sys.executable, "-m", "vitlab", "train", "--pretrained", "hf-hub:alice/uncached"],
                             env=env, capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "not in the Hugging Face cache" in missing.stderr and "HF_HUB_OFFLINE=1" in missing.stderr


def test_hub_down_and_uncached_is_one_line_with_the_tries(hub, capsys, monkeypatch, caplog):
    import logging

    import huggingface_hub.utils._http as hf_http
    monkeypatch.setattr(hf_http.time, "sleep", lambda seconds: None)  # the client's back-off, skipped
    hub.down = True
    code, _, err = run_cli(["train", "--pretrained", f"hf-hub:{REPO}"], capsys)
    assert code == 2 and err.count("\n") == 1 and "not in the Hugging Face cache" in err and "tries" in err
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub") and r.levelno >= logging.WARNING]


def test_names_the_client_would_refuse_and_missing_local_files_make_no_request(hub, capsys):
    import vitlab
    from vitlab.errors import VitlabError
    for bad in ("hf-hub:alice/a--b", "hf-hub:alice/name."):
        code, _, err = run_cli(["train", "--pretrained", bad], capsys)
        assert code == 2 and err.count("\n") == 1 and "is not a Hub name" in err
    before = len(hub.requests)
    code, _, err = run_cli(["train", *QUICK, "--pretrained", "weights.ckpt", "train.max_steps=1"], capsys)
    assert code == 2 and "'weights.ckpt' is neither a file here nor a timm name" in err and len(hub.requests) == before
    untrained = vitlab.create_model(TAG_NAME)  # as timm: the architecture, no download
    assert untrained.vitlab_name == "vit_tiny_patch16_224" and len(hub.requests) == before
    assert vitlab.create_model("vit_tiny_patch16_224", pretrained=None).vitlab_name == "vit_tiny_patch16_224"
    for call in (lambda: vitlab.create_model("deit_tiny_patch16_224.fb_in1k", pretrained=True),
                 lambda: vitlab.create_model("vit_tiny_patch16_224", pretrained="deit_tiny_patch16_224.fb_in1k")):
        with pytest.raises(VitlabError, match="has no architecture 'deit_tiny_patch16_224'"):
            call()
    assert len(hub.requests) == before


def test_a_path_object_is_loaded_not_ignored(tmp_path):
    from safetensors.torch import save_file

    import vitlab
    source = vitlab.create_model("vit_micro_patch2_8", num_classes=4)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    model = vitlab.create_model("vit_micro_patch2_8", pretrained=tmp_path / "w.safetensors", num_classes=4)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
