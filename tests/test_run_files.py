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
