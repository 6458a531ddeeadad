"""Hub upload / download / train --upload against huggingface_hub with its HTTP layer faked (tests/fake_hub.py):
the exact files and paths sent, the settings' sources, one-line errors, and the token kept out of every output."""
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import QUICK, ROOT, run_cli
from fake_hub import FakeHub
from vitlab.errors import VitlabError
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
def test_hub_errors_are_one_line_exit_2_without_the_token(hub, monkeypatch, tmp_path, capsys, caplog, case,
                                                          message):
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
    # huggingface_hub's own log lines (its handler writes to the terminal, past capsys): none about retries
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub") and r.levelno >= logging.WARNING]
    if hub.down:
        assert "6 tries" in err  # the five retries, folded into the one line


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_down_is_one_line_in_a_real_process(tmp_path):
    """Nothing listening at HF_ENDPOINT, as a real process: huggingface_hub's retry warnings (two lines per
    retry, through its own stderr handler) are folded into vitlab's one line; its back-off sleeps skipped."""
    (tmp_path / "f.txt").write_text("x")
    boot = ("import sys, time; time.sleep = lambda s: None; from vitlab.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("HF_")},
           "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_REPOSITORY": "alice/vits", "HF_TOKEN": TOKEN,
           "PYTHONPATH": str(ROOT / "src")}
    for argv in (["upload", "f.txt", "dir"], ["download", "vit", "dl"]):
        p = subprocess.run([sys.executable, "-c", boot, *argv], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
        assert p.stderr.startswith("vitlab: error: cannot reach the Hugging Face Hub at http://127.0.0.1:")
        assert "6 tries" in p.stderr and TOKEN not in p.stdout + p.stderr
    assert not (tmp_path / "dl").exists()


def test_upload_reads_each_file_once_for_the_token(hub, monkeypatch, tmp_path, capsys):
    """The folder's listing and the commit gate share one scan per file (a multi-GB checkpoint is read for the
    token once, not twice); a file written after its scan is scanned again at the gate and refused."""
    import vitlab.hub as vh
    use_env(monkeypatch)
    monkeypatch.setattr(vh, "RACY_NS", 0)  # these files were written just now; see the racy case below
    reads: list[str] = []
    holds = vh._holds
    monkeypatch.setattr(vh, "_holds", lambda f, secret: reads.append(Path(f).name) or holds(f, secret))
    run = tmp_path / "run_01"
    (run / "checkpoints").mkdir(parents=True)
    for name, data in (("train.log", b"log"), ("results.json", b"{}"), ("checkpoints/model.safetensors", b"w" * 9)):
        (run / name).write_bytes(data)
    time.sleep(0.02)  # past the file system's timestamp tick
    code, _, err = run_cli(["upload", run, "."], capsys)
    assert code == 0, err
    assert sorted(reads) == ["model.safetensors", "results.json", "train.log"]
    reads.clear()
    code, _, err = run_cli(["upload", run / "train.log", "x"], capsys)  # a single file: once too
    assert code == 0 and reads == ["train.log"], err

    # changed between the scan and the gate: its signature (size, mtime, ctime) differs, so it is read again
    reads.clear()
    scanned: dict = {}
    files, _ = vh._folder_files(run, TOKEN, scanned)
    (run / "train.log").write_text(f"log {TOKEN}")
    with pytest.raises(VitlabError, match="run_01/train.log: it holds HF_TOKEN"):
        vh.upload_files({f"run_01/{k}": v for k, v in files.items()}, hub_target(True), "m", scanned)
    assert sorted(reads) == ["model.safetensors", "results.json", "train.log", "train.log"]
    assert len(hub.commits) == 2  # the refused commit sent nothing

    # racy: a file changed within RACY_NS before its scan may change again within the same timestamp tick
    # without its ctime moving, so that scan is not trusted later
    monkeypatch.setattr(vh, "RACY_NS", 2_000_000_000)
    (run / "train.log").write_text("log")
    reads.clear()
    code, _, err = run_cli(["upload", run / "train.log", "x"], capsys)
    assert code == 0 and reads == ["train.log", "train.log"], err


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
