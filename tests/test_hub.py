"""Hub upload / download / train --upload against huggingface_hub with its HTTP layer faked (tests/fake_hub.py):
the exact files and paths sent, the settings' sources, one-line errors, and the token kept out of every output."""
import pytest

from conftest import QUICK, run_cli
from fake_hub import FakeHub
from vitlab.hub import hub_target, parse_repository, read_settings

TOKEN = "hf_GOODTOKEN123"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # .env is read from the working directory
    for key in ("HF_REPOSITORY", "HF_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(key, raising=False)
    fake = FakeHub().install()
    yield fake
    FakeHub.uninstall()


def use_env(monkeypatch, repo="alice/vits", token=TOKEN):
    if repo:
        monkeypatch.setenv("HF_REPOSITORY", repo)
    if token:
        monkeypatch.setenv("HF_TOKEN", token)


def test_settings_environment_wins_over_dotenv(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text('HF_REPOSITORY="https://huggingface.co/bob/models"\nexport HF_TOKEN=hf_fromfile\n')
    assert read_settings({}, env_file) == {"HF_REPOSITORY": "https://huggingface.co/bob/models",
                                           "HF_TOKEN": "hf_fromfile"}
    assert read_settings({"HF_TOKEN": "hf_env"}, env_file)["HF_TOKEN"] == "hf_env"
    target = hub_target(True, {}, env_file)
    assert (target.repo_id, target.repo_type, target.token) == ("bob/models", "model", "hf_fromfile")
    assert "hf_fromfile" not in repr(target)


@pytest.mark.parametrize("text,expected", [
    ("alice/vits", ("alice/vits", "model")),
    ("https://huggingface.co/alice/vits/", ("alice/vits", "model")),
    ("https://huggingface.co/datasets/alice/logs", ("alice/logs", "dataset")),
])
def test_repository_forms(text, expected):
    assert parse_repository(text) == expected


def test_upload_file_sends_exactly_that_file(hub, monkeypatch, tmp_path, capsys):
    use_env(monkeypatch)
    (tmp_path / "w.safetensors").write_bytes(b"\x00weights\x01")
    code, out, err = run_cli(["upload", "w.safetensors", "vit_classic"], capsys)
    assert code == 0, err
    assert [c["files"] for c in hub.commits] == [{"vit_classic/w.safetensors": b"\x00weights\x01"}]
    commit = next(r for r in hub.requests if r.url.path.endswith("/commit/main"))
    assert commit.url.path == "/api/models/alice/vits/commit/main"
    assert commit.headers["authorization"] == f"Bearer {TOKEN}"
    assert "vit_classic/w.safetensors" in out and TOKEN not in out + err


def test_upload_folder_keeps_its_layout(hub, monkeypatch, tmp_path, capsys):
    use_env(monkeypatch)
    run = tmp_path / "run_01"
    (run / "checkpoints").mkdir(parents=True)
    (run / "train.log").write_text("log")
    (run / "checkpoints" / "model.safetensors").write_bytes(b"w")
    code, _, _ = run_cli(["upload", run, "."], capsys)
    assert code == 0
    assert hub.files == {"run_01/train.log": b"log", "run_01/checkpoints/model.safetensors": b"w"}


def test_download_file_and_folder(hub, monkeypatch, tmp_path, capsys):
    use_env(monkeypatch, token=None)  # public repositories need no token
    hub.files.update({"vit/model_1_10M_cifar100.safetensors": b"abc", "vit/logs/a.log": b"A", "other.txt": b"o"})
    code, out, _ = run_cli(["download", "vit/model_1_10M_cifar100.safetensors", tmp_path / "dl"], capsys)
    assert code == 0 and (tmp_path / "dl" / "model_1_10M_cifar100.safetensors").read_bytes() == b"abc"
    code, out, _ = run_cli(["download", "vit", tmp_path / "dl2"], capsys)
    assert code == 0 and "2 file(s)" in out
    assert (tmp_path / "dl2" / "vit" / "logs" / "a.log").read_bytes() == b"A"
    assert sorted(p.relative_to(tmp_path / "dl2").as_posix() for p in (tmp_path / "dl2").rglob("*") if p.is_file()) \
        == ["vit/logs/a.log", "vit/model_1_10M_cifar100.safetensors"]  # no temporary leftovers
    code, _, err = run_cli(["download", "missing.bin", tmp_path], capsys)
    assert code == 2 and "'missing.bin' is not in model repository alice/vits" in err


@pytest.mark.parametrize("case,message", [
    ("no_token", "HF_TOKEN is not set"),
    ("no_repo", "HF_REPOSITORY is not set"),
    ("down", "cannot reach the Hugging Face Hub at https://huggingface.co"),
    ("bad_token", "the Hub refused access to model repository alice/vits (HTTP 401)"),
    ("no_such_repo", "model repository alice/other was not found"),
])
def test_hub_errors_are_one_line_exit_2_without_the_token(hub, monkeypatch, tmp_path, capsys, case, message):
    token = {"no_token": None, "bad_token": "hf_WRONGSECRET"}.get(case, TOKEN)
    use_env(monkeypatch, repo={"no_repo": None, "no_such_repo": "alice/other"}.get(case, "alice/vits"), token=token)
    hub.down = case == "down"
    if hub.down:  # huggingface_hub retries a refused connection with back-off (23 s of sleeping): skip the waits
        import huggingface_hub.utils._http as hf_http
        monkeypatch.setattr(hf_http.time, "sleep", lambda seconds: None)
    (tmp_path / "f.txt").write_text("x")
    code, out, err = run_cli(["upload", "f.txt", "dir"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    if token:
        assert token not in out + err


def test_train_upload_sends_the_run_and_never_writes_the_token(hub, monkeypatch, tmp_path, capsys):
    (tmp_path / ".env").write_text(f"HF_REPOSITORY=alice/vits\nHF_TOKEN={TOKEN}\n")
    code, out, err = run_cli(["train", "--upload", *QUICK, "train.epochs=1", f"output.dir={tmp_path / 'out'}",
                              "output.savefile=r1"], capsys)
    assert code == 0, err
    run = tmp_path / "out" / "vitlab" / "r1"
    assert [sorted(c["files"]) for c in hub.commits] == [[f"vitlab/r1/{n}" for n in (
        "config.yaml", "metrics.jsonl", "model.safetensors", "results.json", "train.log")]]
    files = hub.commits[0]["files"]
    assert files["vitlab/r1/model.safetensors"] == (run / "checkpoints" / "last" / "model.safetensors").read_bytes()
    assert files["vitlab/r1/results.json"] == (run / "results.json").read_bytes()
    written = [p for p in run.rglob("*") if p.is_file()]
    assert written and not any(TOKEN.encode() in p.read_bytes() for p in written)
    assert TOKEN not in out + err and "uploaded 5 files to alice/vits" in out


def test_train_upload_seed002_layout(hub, monkeypatch, tmp_path, capsys):
    use_env(monkeypatch)
    code, _, err = run_cli(["train", "--upload", *QUICK, "train.epochs=1", f"output.dir={tmp_path}",
                            "output.savefile=7", "output.layout=seed002", "train.val_every_n_batches=5"], capsys)
    assert code == 0, err
    folder = tmp_path / "vitlab" / "checkpoints" / "vit"
    stem = "model_7_0.10M_digits"
    assert sorted(p.name for p in folder.iterdir()) == [f"{stem}.safetensors", f"{stem}_training.log"]
    log = (folder / f"{stem}_training.log").read_text()
    assert " loss " in log and " val_loss " in log  # per-batch training and validation loss
    assert hub.commits[0]["files"] == {f"vit/{stem}.safetensors": (folder / f"{stem}.safetensors").read_bytes(),
                                       f"vit/{stem}_training.log": log.encode()}


def test_train_upload_without_token_fails_before_training(hub, monkeypatch, tmp_path, capsys):
    use_env(monkeypatch, token=None)
    code, _, err = run_cli(["train", "--upload", *QUICK, f"output.dir={tmp_path / 'out'}"], capsys)
    assert code == 2 and "HF_TOKEN is not set" in err
    assert not hub.requests and not (tmp_path / "out").exists()
