"""Issue 29, points 3-5 (secrets, run-directory files, untrusted sizes and special files): hostile run directories,
tokens, uploads, downloads, checkpoints and images. The CLI's own output is checked in real processes (exit 2,
one line on stderr, no traceback, the token nowhere); nothing outside a run directory is read, hashed, deleted or
followed (a FIFO or /dev/zero outside would hang the process if it were), and no run is silently started over."""
import json
import logging
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import QUICK, ROOT, run_cli
from fake_hub import FakeHub
from vitlab.errors import VitlabError

TOKEN = "hf_GOODTOKEN123"
TESTS = Path(__file__).resolve().parent


def vitlab(*args, cwd=None, env=None, timeout=240, fake_hub: dict | None = None):
    """`python -m vitlab ARGS` in its own process (or, with `fake_hub`, the same CLI with the fake Hub
    installed): (exit code, stdout, stderr)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    full_env.update({"PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{TESTS}", **(env or {})})
    if fake_hub is None:
        cmd = [sys.executable, "-m", "vitlab", *map(str, args)]
    else:
        boot = ("import sys, json; from fake_hub import FakeHub; "
                f"FakeHub(files={{k: v.encode() for k, v in json.loads({json.dumps(json.dumps(fake_hub))}).items()}})"
                ".install(); from vitlab.cli import main; sys.exit(main(sys.argv[1:]))")
        cmd = [sys.executable, "-c", boot, *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=cwd or ROOT, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def cli(*args, cwd, env, monkeypatch, capsys, fake_hub: dict | None = None):
    """The same command as `vitlab(...)`, in this process (the first case of each test runs as a real process,
    which proves no traceback reaches the terminal; the rest check the same line here, 4 s cheaper each)."""
    for key in [k for k in os.environ if k.startswith("HF_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(cwd)
    if fake_hub is not None:
        FakeHub(files={k: v.encode() for k, v in fake_hub.items()}).install()
    try:
        return run_cli(list(args), capsys)
    finally:
        if fake_hub is not None:
            FakeHub.uninstall()


def one_line(code, out, err, *needles, secret=None):
    assert code == 2, (code, out, err)
    assert err.count("\n") == 1 and err.startswith("vitlab: error: "), err
    assert "Traceback" not in out + err
    for needle in needles:
        assert needle in err, err
    if secret:
        for part in {secret, secret.strip(), repr(secret)[1:-1]}:
            assert part not in out + err


# -- secrets -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("token,kind", [
    ("hf_GOODTOKEN123\r", "carriage return"), ("hf_GOOD\tTOKEN123", "a tab"), ("hf_GOOD\nTOKEN123", "line break"),
    ("hf_GOODTOKÉN123", "non-ASCII"), ("hf_GOOD TOKEN123", "a space"), ("hf_GOOD\x1bTOKEN", "control"),
])
def test_a_token_with_characters_no_token_has_is_one_line_and_never_echoed(tmp_path, token, kind, monkeypatch,
                                                                         capsys):
    (tmp_path / "f.txt").write_text("x")
    env = {"HF_REPOSITORY": "alice/vits", "HF_TOKEN": token}
    if kind == "carriage return":
        code, out, err = vitlab("upload", "f.txt", "d", cwd=tmp_path, env=env)
    else:
        code, out, err = cli("upload", "f.txt", "d", cwd=tmp_path, env=env, monkeypatch=monkeypatch, capsys=capsys)
    one_line(code, out, err, "HF_TOKEN holds characters a token cannot", kind, secret=token)
    assert "GOOD" not in err


def test_a_token_in_dotenv_windows_line_ends_or_escapes(tmp_path):
    from vitlab.hub import hub_target
    (tmp_path / ".env").write_bytes(f"HF_REPOSITORY=alice/vits\r\nHF_TOKEN={TOKEN}\r\n".encode())
    assert hub_target(True, {}, tmp_path / ".env").token == TOKEN  # the line ending is not part of it
    (tmp_path / ".env").write_text('HF_REPOSITORY=alice/vits\nHF_TOKEN="hf_GOOD\\r\\tTOKEN"\n')
    (tmp_path / "f.txt").write_text("x")
    code, out, err = vitlab("upload", "f.txt", "d", cwd=tmp_path)
    one_line(code, out, err, "HF_TOKEN holds characters a token cannot", secret="hf_GOOD\r\tTOKEN")
    assert "GOOD" not in err


def test_redact_removes_escaped_forms():
    from vitlab.hub import redact
    for token in ("hf_SECRET99\r", "hf_SECRÉT99", "hf_SEC\tRET99"):
        for text in (f"Illegal header value b'Bearer {token.encode('utf-8', 'backslashreplace')!r}'",
                     f"Illegal header value {('Bearer ' + token).encode('utf-8')!r}", repr(token), token,
                     f"url?token={__import__('urllib.parse').parse.quote(token)}"):
            assert "SEC" not in redact(text, {token}).replace("***", ""), (token, text, redact(text, {token}))


def test_library_log_records_and_tracebacks_are_scrubbed(tmp_path, caplog):
    from vitlab.hub import remember_secret
    secret = "hf_LOGSECRET42"
    remember_secret(secret)
    with caplog.at_level(logging.WARNING):
        logging.getLogger("httpx").warning("sending Authorization: Bearer %s", secret)
        try:
            raise RuntimeError(f"header b'Bearer {secret}\\r'")
        except RuntimeError:
            logging.getLogger("huggingface_hub").exception("failed")
    assert secret not in caplog.text and "Bearer ***" in caplog.text
    script = ("import sys; sys.path[:0] = [sys.argv[1]]; from vitlab.hub import remember_secret; "
              f"remember_secret({secret!r}); raise RuntimeError('token ' + {secret!r})")
    p = subprocess.run([sys.executable, "-c", script, str(ROOT / "src")], capture_output=True, text=True)
    assert p.returncode == 1 and "RuntimeError: token ***" in p.stderr and secret not in p.stderr


@pytest.fixture
def hub(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_REPOSITORY", "alice/vits")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    fake = FakeHub().install()
    yield fake
    FakeHub.uninstall()


def test_upload_of_the_folder_holding_dotenv_never_sends_it_or_the_token(hub, tmp_path, capsys):
    (tmp_path / ".env").write_text(f"HF_REPOSITORY=alice/vits\nHF_TOKEN={TOKEN}\n")
    (tmp_path / ".env.local").write_text("OTHER=1\n")
    (tmp_path / "notes.txt").write_text(f"my token is {TOKEN}\n")
    (tmp_path / "big.bin").write_bytes(b"\0" * (3 << 20) + TOKEN.encode() + b"\0")  # past the first block
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "train.log").write_text("log")
    outside = tmp_path.parent / f"{tmp_path.name}-private.txt"
    outside.write_text("private")
    (tmp_path / "runs" / "link.txt").symlink_to(outside)
    os.mkfifo(tmp_path / "runs" / "pipe")
    code, out, err = run_cli(["upload", ".", "runs"], capsys)
    assert code == 0, err
    assert hub.files == {"runs/runs/train.log": b"log"}
    assert TOKEN not in out + err and ".env" in err and "notes.txt" in err
    sent = b"".join(r.content for r in hub.requests if r.method == "POST")
    assert TOKEN.encode() not in sent and b"private" not in sent
    code, _, err = run_cli(["upload", ".env", "x"], capsys)
    assert code == 2 and "not uploading '.env'" in err and err.count("\n") == 1
    code, _, err = run_cli(["upload", "notes.txt", "x"], capsys)
    assert code == 2 and "it holds HF_TOKEN" in err and TOKEN not in err
    assert len(hub.commits) == 1


@pytest.mark.parametrize("argv,env,files,needle", [
    (["download", "vit", "{out}"], {}, {"vit/../../evil.txt": "x", "vit/ok.txt": "y"}, "lists a path"),
    (["download", "vit", "{out}"], {}, {"vit/a/../../../evil.txt": "x"}, "lists a path"),
    (["download", "../../etc", "{out}"], {}, {"etc/passwd": "x"}, "the remote path '../../etc'"),
    (["download", "vit/../..", "{out}"], {}, {"vit/a": "x"}, "is not a plain path"),
    (["upload", "f.txt", "../x"], {"HF_TOKEN": TOKEN}, {}, "the remote folder '../x'"),
    (["upload", "f.txt", "a\nb"], {"HF_TOKEN": TOKEN}, {}, "is not a plain path"),
    (["download", "vit", "{out}"], {"HF_REPOSITORY": "alice/my repo"}, {"vit/a": "x"}, "is not a repository"),
    (["download", "vit", "{out}"], {"HF_REPOSITORY": "../../alice"}, {"vit/a": "x"}, "is not a repository"),
])
def test_hostile_repository_paths_are_one_line_and_write_nothing(tmp_path, argv, env, files, needle, monkeypatch,
                                                                 capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "f.txt").write_text("x")
    out = work / "dl"
    args, env = [a.format(out=out) for a in argv], {"HF_REPOSITORY": "alice/vits", **env}
    if needle == "lists a path" and "evil.txt" in "".join(files) and "vit/ok.txt" in files:  # the first case
        code, stdout, err = vitlab(*args, cwd=work, env=env, fake_hub=files)
    else:
        code, stdout, err = cli(*args, cwd=work, env=env, fake_hub=files, monkeypatch=monkeypatch, capsys=capsys)
    one_line(code, stdout, err, needle, secret=env.get("HF_TOKEN"))
    assert not (tmp_path / "evil.txt").exists() and not list(tmp_path.rglob("evil.txt"))
    assert not out.exists() or not any(out.rglob("*.txt"))


# -- run directories ---------------------------------------------------------------------------------------------
TRAIN = [*QUICK, "train.epochs=1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished 1-epoch digits run (in process); tests copy it."""
    from vitlab.config import load_config
    from vitlab.train import train
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, TRAIN + [f"output.dir={out}", "output.savefile=r1"])
    train(cfg)
    return cfg.run_dir


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run: (output dir, run dir)."""
    out = tmp_path / "out"
    dest = out / finished.relative_to(finished.parents[1])
    shutil.copytree(finished, dest, symlinks=True)
    (dest / ".lock").unlink(missing_ok=True)
    return out, dest


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in run_dir.rglob("*")
            if p.is_file() and not p.is_symlink() and p.name != ".lock"}


def train_again(out, *extra, timeout=240):
    return vitlab("train", *TRAIN, f"output.dir={out}", "output.savefile=r1", *extra, timeout=timeout)


@pytest.mark.parametrize("reload", [False, True])
def test_a_finished_run_whose_checkpoints_were_deleted_is_never_overwritten(run, reload):
    out, run_dir = run
    shutil.rmtree(run_dir / "checkpoints")
    before = snapshot(run_dir)
    code, stdout, err = train_again(out, *(["--reload"] if reload else []))
    if reload:
        one_line(code, stdout, err, "holds a run that saved checkpoints (results.json)", "--savefile")
    else:
        one_line(code, stdout, err, "already holds a run; pass --reload", "--savefile", "results.json")
    assert snapshot(run_dir) == before


def test_a_run_killed_before_its_first_save_still_restarts_under_reload(run):
    out, run_dir = run
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "results.json").unlink()
    (run_dir / "metrics.jsonl").write_text('{"kind": "train_batch", "epoch": 1, "step": 3}\n')
    from vitlab.train.rundir import RunDirectory
    d = RunDirectory(run_dir, writer=False)
    assert d.to_resume(reload=True) == (None, [])
    with pytest.raises(VitlabError, match="already holds a run; pass --reload"):
        d.to_resume(reload=False)


def _outside_fifo(tmp_path) -> Path:
    fifo = tmp_path / "outside-fifo"
    os.mkfifo(fifo)
    return fifo


def _relist(ckpt: Path, **entries) -> None:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest.update(entries)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def _hostile(kind: str, run_dir: Path, tmp_path: Path) -> str:
    """Make checkpoints/last (and best) hostile in one way; the reason expected in the refusal."""
    ck = run_dir / "checkpoints"
    for name in ("last", "best"):
        c = ck / name
        if kind == "manifest_dotdot":  # hashing it would block forever on the FIFO
            _outside_fifo(tmp_path) if not (tmp_path / "outside-fifo").exists() else None
            _relist(c, **{"../../../../outside-fifo": "0" * 64})
            why = "not a file of this checkpoint"
        elif kind == "manifest_symlink_dev_zero":
            (c / "ema.safetensors").symlink_to("/dev/zero")
            _relist(c, **{"ema.safetensors": "0" * 64})
            why = "ema.safetensors is a symbolic link"
        elif kind == "state_symlink":
            target = tmp_path / f"outside-state-{name}.pt"
            shutil.copy(c / "trainer_state.pt", target)
            (c / "trainer_state.pt").unlink()
            (c / "trainer_state.pt").symlink_to(target)
            why = "trainer_state.pt is a symbolic link"
        elif kind == "state_fifo":
            (c / "trainer_state.pt").unlink()
            os.mkfifo(c / "trainer_state.pt")
            why = "trainer_state.pt is not a regular file"
        elif kind == "hostile_pickle_no_manifest":
            (c / "manifest.json").unlink()
            (c / "trainer_state.pt").write_bytes(pickle.dumps(_Payload(tmp_path / "PWNED")))
            why = "trainer_state.pt is unreadable"
        elif kind == "unlisted_state":
            manifest = json.loads((c / "manifest.json").read_text())
            del manifest["trainer_state.pt"]
            (c / "manifest.json").write_text(json.dumps(manifest))
            why = "trainer_state.pt is not in manifest.json"
        elif kind == "model_is_a_folder":
            (c / "model.safetensors").unlink()
            (c / "model.safetensors").mkdir()
            why = "model.safetensors is a folder"
        elif kind == "manifest_list":
            (c / "manifest.json").write_text("[1, 2]")
            why = "manifest.json is not an object"
        elif kind == "manifest_huge":
            (c / "manifest.json").write_bytes(b" " * (2 << 20) + b"{}")
            why = "not a manifest vitlab wrote"
        elif kind == "manifest_garbage":
            (c / "manifest.json").write_bytes(b"\xff\xfe{\x00")
            why = "manifest.json is unreadable"
        elif kind == "checkpoint_symlink":
            target = tmp_path / f"outside-{name}"
            shutil.move(str(c), target)
            c.symlink_to(target, target_is_directory=True)
            why = "it is a symbolic link"
        elif kind == "checkpoint_is_a_file":
            shutil.rmtree(c)
            c.write_text("not a checkpoint")
            why = "it is not a folder"
    return why


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


KINDS = ["manifest_dotdot", "manifest_symlink_dev_zero", "state_symlink", "state_fifo", "hostile_pickle_no_manifest",
         "unlisted_state", "model_is_a_folder", "manifest_list", "manifest_huge", "manifest_garbage",
         "checkpoint_symlink", "checkpoint_is_a_file"]


@pytest.mark.parametrize("kind", KINDS)
def test_reload_refuses_a_hostile_checkpoint_and_touches_nothing_outside(run, tmp_path, kind):
    """In process (the CLI's one line is checked in the subprocess test below): refused, never followed, and
    nothing of the run replaced."""
    out, run_dir = run
    why = _hostile(kind, run_dir, tmp_path)
    outside = {p: p.read_bytes() for p in tmp_path.glob("outside-state-*")}
    from vitlab.train.rundir import RunDirectory
    with pytest.raises(VitlabError) as err:
        RunDirectory(run_dir, writer=False).to_resume(reload=True)
    assert "no intact checkpoint to resume" in str(err.value) and why in str(err.value), str(err.value)
    assert not (tmp_path / "PWNED").exists()
    assert all(p.read_bytes() == b for p, b in outside.items())


def test_reload_of_a_hostile_run_in_a_real_process(run, tmp_path):
    out, run_dir = run
    _hostile("manifest_dotdot", run_dir, tmp_path)
    (run_dir / "checkpoints" / "best" / "ema.safetensors").symlink_to("/dev/zero")
    before = snapshot(run_dir)
    code, stdout, err = train_again(out, "--reload", timeout=120)  # following either link would hang
    one_line(code, stdout, err, "no intact checkpoint to resume", "--savefile")
    assert snapshot(run_dir) == before and (tmp_path / "outside-fifo").exists()


@pytest.mark.parametrize("name", ["train.log", "metrics.jsonl", "config.yaml", ".lock", "tb"])
def test_run_files_that_are_links_out_are_refused_and_their_targets_untouched(run, tmp_path, name):
    out, run_dir = run
    target = tmp_path / "precious.txt"
    target.write_text("precious\n")
    (run_dir / name).unlink(missing_ok=True) if not (run_dir / name).is_dir() else shutil.rmtree(run_dir / name)
    (run_dir / name).symlink_to(target)
    from vitlab.train.rundir import RunDirectory
    with pytest.raises(VitlabError, match="is a symbolic link"):
        RunDirectory(run_dir, writer=True)
    assert target.read_text() == "precious\n"


def test_evaluate_and_plot_do_not_follow_a_run_checkpoint_link(run, tmp_path):
    out, run_dir = run
    ck = run_dir / "checkpoints"
    moved = tmp_path / "elsewhere"
    shutil.move(str(ck / "best"), moved)
    (ck / "best").symlink_to(moved, target_is_directory=True)
    code, stdout, err = vitlab("evaluate", "--checkpoint", run_dir)
    one_line(code, stdout, err, "is a symbolic link")
    from vitlab.train.evaluate import load_checkpoint
    with pytest.raises(VitlabError, match="ema.safetensors is a symbolic link"):
        (ck / "last" / "ema.safetensors").symlink_to("/dev/zero")
        load_checkpoint(ck / "last")


def test_damaged_metrics_lines_are_dropped_on_resume(tmp_path):
    from vitlab.train.rundir import truncate_metrics
    m = tmp_path / "metrics.jsonl"
    m.write_bytes(b'{"kind": "epoch", "epoch": 1, "step": 5}\n\xff\xfe garbage\n[1, 2]\n"text"\n'
                  b'{"kind": "epoch", "epoch": "2"}\n{"kind": "epoch", "epoch": 2, "step": 10}\n'
                  + b"[" * 100000 + b"\n")
    truncate_metrics(m, 1, 5)
    assert m.read_text() == '{"kind": "epoch", "epoch": 1, "step": 5}\n'


# -- untrusted sizes: checkpoint metadata ------------------------------------------------------------------------
def _forged(run_dir: Path, tmp_path: Path, **changes) -> Path:
    """checkpoints/last's weights with metadata entries replaced, as a loose file (no manifest to verify)."""
    from safetensors.torch import load_file, save_file
    from vitlab.train.checkpoint import read_metadata
    src = run_dir / "checkpoints" / "last" / "model.safetensors"
    meta = {**read_metadata(src), **changes}
    dest = tmp_path / "forged.safetensors"
    save_file(load_file(src), dest, metadata=meta)
    return dest


def _args(run_dir, **changes):
    from vitlab.train.checkpoint import read_metadata
    args = json.loads(read_metadata(run_dir / "checkpoints" / "last" / "model.safetensors")["model_args"])
    return json.dumps({**args, **changes})


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9))


@pytest.mark.parametrize("case,needle", [
    ("depth_1e7", "model argument depth=10000000 is beyond"),
    ("depth_5000", "asks for more blocks"),
    ("embed_nan", "is beyond any model"),
    ("depth_3", "does not fit the model its metadata names"),
    ("yaml_bomb", "expands to more than"),
    ("yaml_python", "is not plain YAML"),
    ("config_list", "is not a mapping"),
    ("args_not_json", "is not JSON"),
    ("args_list", "model_args is not a mapping"),
    ("deep_yaml", "nested too deeply"),
])
def test_evaluate_refuses_forged_metadata_in_seconds(run, tmp_path, case, needle):
    _, run_dir = run
    change = {
        "depth_1e7": {"model_args": _args(run_dir, depth=10 ** 7)},
        "depth_5000": {"model_args": _args(run_dir, depth=5000)},
        "embed_nan": {"model_args": _args(run_dir, embed_dim=float("nan"))},
        "depth_3": {"model_args": _args(run_dir, depth=3)},
        "yaml_bomb": {"config": BOMB},
        "yaml_python": {"config": "!!python/object/apply:os.system ['touch PWNED']"},
        "config_list": {"config": "[1, 2]"},
        "args_not_json": {"model_args": "{depth: 3"},
        "args_list": {"model_args": "[1, 2]"},
        "deep_yaml": {"config": "[" * 20000 + "]" * 20000},
    }[case]
    file = _forged(run_dir, tmp_path, **change)
    code, stdout, err = vitlab("evaluate", "--checkpoint", file, cwd=tmp_path, timeout=90)
    one_line(code, stdout, err, needle)
    assert not (tmp_path / "PWNED").exists()


def test_load_yaml_keeps_ordinary_aliases():
    from vitlab.untrusted import load_yaml
    assert load_yaml("a: &x [1, 2]\nb: *x\n") == {"a": [1, 2], "b": [1, 2]}
    with pytest.raises(VitlabError, match="alias bomb"):
        load_yaml(BOMB)


# -- images ------------------------------------------------------------------------------------------------------
def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header declares w x h (a decompression bomb needs no more to be refused)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


def test_predict_refuses_fifos_devices_and_bombs_with_one_line(run, tmp_path):
    _, run_dir = run
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    bomb, big = tmp_path / "bomb.png", tmp_path / "big.png"
    _png_header_only(bomb, 20000, 20000)
    _png_header_only(big, 10000, 10000)
    for image, needle in ((fifo, "not a regular file"), ("/dev/zero", "not a regular file"),
                          (bomb, "decompression bomb"), (big, "10000x10000 pixels"), (tmp_path, "is a folder")):
        code, stdout, err = vitlab("predict", "--checkpoint", run_dir, image, timeout=90)  # a FIFO would block
        one_line(code, stdout, err, needle)


def test_deep_images_are_scaled_not_clipped(tmp_path):
    from vitlab.untrusted import open_image
    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    want = np.rint(ramp * 255).astype(np.uint8)
    Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(tmp_path / "a16.png")
    Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(tmp_path / "a16.tif")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "af.tif")
    Image.fromarray((ramp * 1000 - 500).astype(np.float32)).save(tmp_path / "wide.tif")  # any range: min..max
    for name in ("a16.png", "a16.tif", "af.tif", "wide.tif"):
        got = np.asarray(open_image(tmp_path / name, 1))
        assert np.abs(got.astype(int) - want).max() <= 1, name
        assert np.asarray(open_image(tmp_path / name, 3)).shape == (64, 64, 3)


def test_predict_gives_the_same_answer_for_8_16_bit_and_float_images(run, tmp_path):
    _, run_dir = run
    from sklearn.datasets import load_digits
    digit = load_digits().images[0] / 16.0  # 8x8 in [0, 1]
    Image.fromarray(np.rint(digit * 255).astype(np.uint8)).save(tmp_path / "d8.png")
    Image.fromarray(np.rint(digit * 65535).astype(np.uint16)).save(tmp_path / "d16.png")
    Image.fromarray(np.rint(digit * 65535).astype(np.uint16)).save(tmp_path / "d16.tif")
    Image.fromarray((np.rint(digit * 255) / 255).astype(np.float32)).save(tmp_path / "df.tif")
    code, stdout, err = vitlab("predict", "--checkpoint", run_dir, *(tmp_path / n for n in (
        "d8.png", "d16.png", "d16.tif", "df.tif")), "--topk", "2")
    assert code == 0, err
    answers = [line.split(": ", 1)[1] for line in stdout.splitlines()]
    assert len(answers) == 4 and len(set(answers)) == 1, stdout


def test_atomic_writes_never_write_through_a_planted_temporary_link(tmp_path):
    """A hostile run directory may plant links at the temporary names a writer would use; the writers create
    their temporary file exclusively (random name, O_EXCL), so the link's target is never touched."""
    import torch

    from vitlab.names import atomic_write
    from vitlab.train.checkpoint import save_weights

    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("results.json", "metrics.jsonl", "model.safetensors"):
        for tmp in (f".{name}.tmp", f".{name}.{os.getpid()}.tmp"):
            (run / tmp).symlink_to(victim)
    atomic_write(run / "results.json", "{}")
    atomic_write(run / "metrics.jsonl", "")
    save_weights(run / "model.safetensors", {"w": torch.zeros(2)}, {"format": "pt"})
    assert victim.read_text() == "keep" and (run / "results.json").read_text() == "{}"
    assert not (run / "results.json").is_symlink() and not (run / "model.safetensors").is_symlink()


# -- run directories read by collect, plot and report (and vitlab.load_run) --------------------------------------
# A copied run is not trusted: each damage below is applied to one run beside an intact one. "skip": the run is
# left out with one warning naming the file (alone, it is the one-line error); "values": the run stays, the wrong
# values are dropped with one warning; "lines": the run stays, its bad metrics lines are dropped with one warning
# where the metrics are read (report, plot; collect reads them only for unfinished runs); "quiet": no warning.
def _put(name, data):
    def damage(run, outside):
        (run / name).unlink()
        (run / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return damage


def _results(**changes):
    def damage(run, outside):
        d = json.loads((run / "results.json").read_text())
        (run / "results.json").write_text(json.dumps({**d, **changes}))
    return damage


def _append(text):
    def damage(run, outside):
        with open(run / "metrics.jsonl", "ab") as f:
            f.write(text if isinstance(text, bytes) else text.encode())
    return damage


def _link(name, target):
    def damage(run, outside):
        (run / name).unlink()
        (run / name).symlink_to(target if target == "/dev/zero" else outside / name)
    return damage


def _special(name, kind):
    def damage(run, outside):
        (run / name).unlink()
        os.mkfifo(run / name) if kind == "fifo" else (run / name).mkdir()
    return damage


def _sparse(name, size):
    def damage(run, outside):
        with open(run / name, "wb") as f:
            f.truncate(size)
    return damage


DAMAGES = {  # name: (damage, expected, words in the warning)
    "config_list": (_put("config.yaml", "- a\n- b\n"), "skip", "is a list, not a mapping"),
    "config_string": (_put("config.yaml", "hello\n"), "skip", "is a str, not a mapping"),
    "config_not_yaml": (_put("config.yaml", "model: [unclosed\n"), "skip", "is not plain YAML"),
    "config_not_utf8": (_put("config.yaml", b"model:\n  name: \xff\xfe\n"), "skip", "is not UTF-8"),
    "config_python_tag": (_put("config.yaml", "model: !!python/object/apply:os.system ['touch pwned']\n"), "skip",
                          "is not plain YAML"),
    "config_alias_bomb": (_put("config.yaml", BOMB), "skip", "expands to more than"),
    "config_nested_50000": (_put("config.yaml", "a: " + "[" * 50000), "skip", "config.yaml"),
    "config_link_out": (_link("config.yaml", "out"), "skip", "is a symbolic link"),
    "config_link_dev_zero": (_link("config.yaml", "/dev/zero"), "skip", "is a symbolic link"),
    "config_fifo": (_special("config.yaml", "fifo"), "skip", "not a regular file"),
    "config_folder": (_special("config.yaml", "dir"), "skip", "is a folder"),
    "config_model_a_list": (_put("config.yaml", "model: [1, 2]\ntrain: 5\n"), "quiet", ""),
    "config_html_key": (_put("config.yaml", "model: {name: vit_micro_patch2_8}\n'<img src=x onerror=alert(1)>': "
                                            "'=cmd|x'\n"), "quiet", ""),
    "results_list": (_put("results.json", "[1, 2]"), "skip", "holds a JSON list, not an object"),
    "results_string": (_put("results.json", '"hello"'), "skip", "holds a JSON str"),
    "results_torn": (_put("results.json", '{"test_top1": 0.5,'), "skip", "is not valid JSON"),
    "results_not_utf8": (_put("results.json", b'{"model": "\xff\xfe"}'), "skip", "is not UTF-8"),
    "results_nested_100000": (_put("results.json", "[" * 100000), "skip", "is not valid JSON"),
    "results_5000_digits": (_put("results.json", '{"params": ' + "9" * 5000 + "}"), "skip", "is not valid JSON"),
    "results_link_out": (_link("results.json", "out"), "skip", "is a symbolic link"),
    "results_link_dev_zero": (_link("results.json", "/dev/zero"), "skip", "is a symbolic link"),
    "results_fifo": (_special("results.json", "fifo"), "skip", "not a regular file"),
    "results_folder": (_special("results.json", "dir"), "skip", "is a folder"),
    "results_1gib": (_sparse("results.json", 1 << 30), "skip", "more than the 16 MiB"),
    "results_strings_lists": (_results(test_top1="high", params="big", epochs=[1], gflops={"a": 1}), "values",
                              "ignored test_top1, params, epochs, gflops"),
    "results_nan_inf": (_results(test_top1=float("nan"), params=float("inf"), images_per_second=float("-inf")),
                        "values", "ignored test_top1, params, images_per_second"),
    "results_bools": (_results(test_top1=True, params=False), "values", "ignored test_top1, params"),
    "results_out_of_range": (_results(test_top1=7.0, params=-5, train_memory_mb=10 ** 400), "values",
                             "ignored test_top1, params, train_memory_mb"),
    "results_names_not_text": (_results(model=["a"], architecture={"x": 1}), "values", "ignored model, architecture"),
    "results_html_names": (_results(model="<script>alert(1)</script>", architecture="<b>$\\frac{"), "quiet", ""),
    "metrics_binary_garbage": (_append(b"\xff\xfe\x00garbage\x01\n" + bytes(range(11, 256)) + b"\n"), "lines",
                               "skipped 2 damaged lines (first: line 24"),
    "metrics_not_objects": (_append('[1, 2]\n"x"\n5\nnull\n'), "lines", "skipped 4 damaged lines"),
    "metrics_strings_lists": (_append('{"kind": "train_batch", "epoch": 1, "step": "x", "loss": "abc"}\n'
                                      '{"kind": "epoch", "epoch": [1], "val_top1": "x", "val_loss": [2]}\n'
                                      '{"kind": ["epoch"], "epoch": 1}\n'), "lines", "skipped 3 damaged lines"),
    "metrics_nested_100000": (_append("[" * 100000 + "\n"), "lines", "skipped 1 damaged line"),
    "metrics_5000_digits": (_append('{"kind": "train_batch", "epoch": 1, "step": ' + "9" * 5000 + "}\n"), "lines",
                            "skipped 1 damaged line"),
    "metrics_not_utf8": (_put("metrics.jsonl", '{"kind": "epoch", "epoch": 1}\n'.encode("utf-16")), "lines",
                         "skipped 1 damaged line (first: line 1"),
    "metrics_link_out": (_link("metrics.jsonl", "out"), "lines", "is a symbolic link"),
    "metrics_link_dev_zero": (_link("metrics.jsonl", "/dev/zero"), "lines", "is a symbolic link"),
    "metrics_fifo": (_special("metrics.jsonl", "fifo"), "lines", "not a regular file"),
    "metrics_folder": (_special("metrics.jsonl", "dir"), "lines", "is a folder"),
    "metrics_torn_last_line": (_append('{"kind": "train_batch", "epoch": 1, "st'), "quiet", ""),
    "metrics_missing_keys": (_append('{"kind": "train_batch"}\n{"kind": "epoch"}\n{"kind": "val_batch"}\n'), "quiet",
                             ""),
    "metrics_nan_inf_values": (_append('{"kind": "train_batch", "epoch": 1, "step": 22, "loss": NaN}\n'
                                       '{"kind": "epoch", "epoch": 2, "val_top1": Infinity, "val_loss": NaN}\n'),
                               "quiet", ""),
}
# A skipped run is left out by find_runs, the same for every command: report and plot are run on a few of those,
# on every damage that leaves the run in (their figures read the damaged values), collect on all.
ANALYSIS = ([(d, "collect") for d in DAMAGES]
            + [(d, "report") for d, (_, e, _) in DAMAGES.items() if e != "skip" or d in ("config_fifo", "results_list")]
            + [(d, "plot") for d in DAMAGES if d.startswith(("metrics", "results_n"))])


@pytest.fixture(scope="module")
def run_files(finished):
    """The finished run's three files an analysis reads (config.yaml, results.json, metrics.jsonl)."""
    return {n: (finished / n).read_bytes() for n in ("config.yaml", "results.json", "metrics.jsonl")}


def _analysis_run(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def _damaged(tmp_path, run_files, damage):
    """runs/ok (intact) and runs/bad (damaged), and the intact files a link may point at (outside/)."""
    outside = _analysis_run(tmp_path / "outside", run_files)
    _analysis_run(tmp_path / "runs" / "ok", run_files)
    DAMAGES[damage][0](_analysis_run(tmp_path / "runs" / "bad", run_files), outside)
    return tmp_path / "runs", outside


@pytest.mark.parametrize("damage,command", ANALYSIS, ids=[f"{d}-{c}" for d, c in ANALYSIS])
def test_damaged_run_files_are_skipped_or_warned_never_a_traceback(run_files, tmp_path, capsys, damage, command):
    root, outside = _damaged(tmp_path, run_files, damage)
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    out = tmp_path / "made"
    argv = {"collect": ["collect", root, "--csv", out / "runs.csv"], "report": ["report", root, "--out",
            out / "r.html"], "plot": ["plot", root, "--out", out]}[command]
    code, stdout, err = run_cli(argv, capsys)
    _, expected, words = DAMAGES[damage]
    assert code == 0 and "Traceback" not in stdout + err, err
    lines = err.splitlines()
    warned = expected in ("skip", "values") or (expected == "lines" and command != "collect")
    assert len(lines) == warned, err
    if warned:
        assert lines[0].startswith("vitlab: warning: ") and words in lines[0] and "/bad/" in lines[0], err
    if command == "collect":
        table = [line for line in stdout.splitlines() if line.startswith("| ") and "---" not in line]
        assert [line.split(" | ")[0] for line in table[1:]] == (["| ok"] if expected == "skip" else ["| bad", "| ok"])
        assert "'=cmd|x" in (out / "runs.csv").read_text() if damage == "config_html_key" else True
    elif command == "report":
        page = (out / "r.html").read_text()
        assert "<script>" not in page and "<img src=x" not in page and "<b>" not in page
    else:
        assert (out / "accuracy_per_epoch.png").is_file()
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before  # nothing outside touched
    assert not (tmp_path / "pwned").exists() and not (ROOT / "pwned").exists()


@pytest.mark.parametrize("damage", [d for d, (_, e, _) in DAMAGES.items() if e == "skip"])
def test_a_damaged_run_alone_is_one_line_naming_its_file(run_files, tmp_path, capsys, damage):
    root, _ = _damaged(tmp_path, run_files, damage)
    code, stdout, err = run_cli(["collect", root / "bad", "--csv", tmp_path / "runs.csv"], capsys)
    one_line(code, stdout, err, DAMAGES[damage][2], "/bad/")
    assert not (tmp_path / "runs.csv").exists()
    from vitlab.api import TrainedRun
    with pytest.raises(VitlabError, match="/bad/"):
        TrainedRun.load(root / "bad")


def test_metrics_are_read_with_bounds_and_a_running_runs_torn_line_silently(tmp_path, capsys, monkeypatch):
    from vitlab.experiments import runs
    m = tmp_path / "metrics.jsonl"
    good = '{"kind": "train_batch", "epoch": 1, "step": %d, "loss": 1.0}\n'
    m.write_text(good % 1 + '{"kind": "x", "pad": "' + "a" * 300 + '"}\n' + good % 2 + '{"kind": "train_batch", "ep')
    monkeypatch.setattr(runs, "METRICS_MAX_LINE", 100)
    assert [r["step"] for r in runs.read_jsonl(m)] == [1, 2]  # the overlong line skipped to its end, not split
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "skipped 1 damaged line (first: line 2" in err
    monkeypatch.setattr(runs, "METRICS_MAX_BYTES", 120)
    assert [r["step"] for r in runs.read_jsonl(m)] == [1]
    err = capsys.readouterr().err
    assert "larger than 0 MiB; only its first" in err and err.count("\n") == 2
    monkeypatch.undo()
    m.write_text(good % 1 + good % 2 + '{"kind": "train_batch", "ep')  # a run still writing: no warning
    assert len(runs.read_jsonl(m)) == 2 and capsys.readouterr().err == ""


def test_searching_for_runs_follows_no_link_and_stops(run_files, tmp_path, capsys, monkeypatch):
    from vitlab.experiments import runs
    root = tmp_path / "root"
    _analysis_run(root / "a" / "run", run_files)
    elsewhere = _analysis_run(tmp_path / "elsewhere" / "run", run_files)
    (root / "loop").symlink_to(root, target_is_directory=True)  # a folder that holds itself
    (root / "a" / "up").symlink_to(tmp_path, target_is_directory=True)
    (root / "linked_run").symlink_to(elsewhere, target_is_directory=True)
    (root / ".hidden" / "run").mkdir(parents=True)
    (root / ".hidden" / "run" / "config.yaml").write_text("{}")
    deep = root.joinpath(*["d"] * 40)
    deep.mkdir(parents=True)
    (deep / "config.yaml").write_text("{}")
    assert [r.path for r in runs.find_runs([root])] == [root / "a" / "run"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did not search more than 32 folders deep" in err
    assert [r.path for r in runs.find_runs([root / "linked_run"])] == [root / "linked_run"]  # named: the user's
    for i in range(60):
        (root / "many" / str(i)).mkdir(parents=True)
    monkeypatch.setattr(runs, "SCAN_MAX_FOLDERS", 50)
    runs.find_runs([root])
    assert "stopped searching" in capsys.readouterr().err


def test_trained_run_from_a_damaged_directory(run_files, tmp_path, capsys):
    from vitlab.api import TrainedRun
    run = _analysis_run(tmp_path / "r", run_files)
    _results(model="<script>x</script>", test_top1="0.9")(run, None)
    _link("metrics.jsonl", "/dev/zero")(run, None)
    r = TrainedRun.load(run)
    assert "<script>" not in r._repr_html_() and "test_top1" not in r.results and repr(r).endswith("')")
    assert r.records("epoch") == [] and list(r.figures()) == ["parameters"]  # no curves: no metrics read
    err = capsys.readouterr().err
    assert "ignored test_top1" in err and "is a symbolic link" in err and err.count("\n") == 2


def test_damaged_runs_in_a_real_process(run_files, tmp_path):
    """Every kind of damage at once, as a real process: a report of the intact runs, one warning line per damaged
    run or file, no traceback, no hang (a FIFO or /dev/zero followed would block or never end)."""
    kinds = ["config_fifo", "config_link_dev_zero", "results_list", "results_strings_lists", "metrics_fifo",
             "metrics_link_dev_zero", "metrics_binary_garbage", "metrics_torn_last_line"]
    outside = _analysis_run(tmp_path / "outside", run_files)
    _analysis_run(tmp_path / "runs" / "ok", run_files)
    for kind in kinds:
        DAMAGES[kind][0](_analysis_run(tmp_path / "runs" / kind, run_files), outside)
    code, stdout, err = vitlab("report", tmp_path / "runs", "--out", tmp_path / "r.html", timeout=120)
    assert code == 0 and "Traceback" not in err and "report of 6 runs" in stdout, err
    lines = err.splitlines()
    assert len(lines) == 7 and all(line.startswith("vitlab: warning: ") for line in lines), err
