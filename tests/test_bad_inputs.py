"""Every bad input is one line on stderr and exit code 2: no traceback, nothing written (issue 16's audit).
The one home of bad inputs: a refused value, file, run or argument is a case here, its message pinned in WORDS.

Each case is a distinct input a careful or careless user gives; the workspace holds a small finished run and
damaged or foreign files to point at. Adding a case here is how a new bad input is handled for good.
"""
import os
import shutil

import pytest
import torch

from conftest import QUICK, run_cli

RUN = "vitlab/run_01"  # the finished run of the workspace, relative to it

TRAIN = [  # (label, extra arguments to `vitlab train` on top of QUICK)
    ("lr nan", ["optim.lr=nan"]), ("lr inf", ["optim.lr=inf"]), ("lr negative", ["optim.lr=-1"]),
    ("lr zero", ["optim.lr=0"]), ("lr text", ["optim.lr=fast"]), ("weight decay negative", ["optim.weight_decay=-1"]),
    ("betas out of range", ["optim.betas=[2,3]"]), ("betas one value", ["optim.betas=[0.9]"]),
    ("momentum negative", ["optim.momentum=-1"]), ("label smoothing 1.5", ["optim.label_smoothing=1.5"]),
    ("clip negative", ["optim.clip_grad=-1"]), ("warmup negative", ["optim.warmup_steps=-5"]),
    ("unknown optimizer", ["optim.name=adam"]), ("unknown schedule", ["optim.schedule=linear"]),
    ("min lr inf", ["optim.min_lr=inf"]), ("dice weight negative", ["optim.dice_weight=-1"]),
    ("epochs zero", ["train.epochs=0"]), ("epochs negative", ["train.epochs=-1"]),
    ("batch zero", ["train.batch_size=0"]), ("accum zero", ["train.accum_steps=0"]),
    ("device tpu", ["train.device=tpu"]), ("device gibberish", ["train.device=gpu0"]),
    ("amp fp8", ["train.amp=fp8"]), ("log every zero", ["train.log_every=0"]),
    ("ema decay 1.5", ["train.ema_decay=1.5"]), ("timeout zero", ["train.dist_timeout=0"]),
    ("skip steps negative", ["train.skip_nonfinite_steps=-1"]), ("eval batch zero", ["train.eval_batch_size=0"]),
    ("unknown dataset", ["data.dataset=nope"]), ("img size negative", ["data.img_size=-8"]),
    ("val fraction 0", ["data.val_fraction=0"]), ("test fraction 0", ["data.test_fraction=0"]),
    ("val fraction 1.5", ["data.val_fraction=1.5"]), ("mixup negative", ["data.mixup=-1"]),
    ("cutmix negative", ["data.cutmix=-1"]), ("workers negative", ["data.num_workers=-1"]),
    ("unknown augment", ["data.augment=heavy"]), ("max samples negative", ["data.max_train_samples=-1"]),
    ("unknown model", ["model.name=nope"]), ("drop rate 2", ["model.drop_rate=2"]),
    ("drop path negative", ["model.drop_path_rate=-0.5"]), ("drop path 1.5", ["model.drop_path_rate=1.5"]),
    ("attn drop nan", ["model.attn_drop_rate=nan"]),
    ("patch not dividing", ["model.patch_size=5"]), ("heads not dividing", ["model.num_heads=5"]),
    ("unknown model key", ["model.colour=red"]), ("model arg wrong type", ["model.depth=deep"]),
    ("lora rank negative", ["lora.rank=-1"]), ("lora dropout 1.5", ["lora.dropout=1.5"]),
    ("empty savefile", ["output.savefile="]), ("savefile with slash", ["output.savefile=a/b"]),
    ("savefile dot-dot", ["output.savefile=.."]), ("unknown progress", ["output.progress=fancy"]),
    ("empty task name", ["task_name="]), ("unknown section key", ["foo.bar=1"]),
    ("misspelt key", ["optim.lrr=1"]),
    ("img size not a multiple of the patch", ["model.img_size=9"]),
    ("width not a multiple of the heads", ["model.embed_dim=102"]),
    ("token pooling without a class token", ["model.class_token=false"]), ("unknown flag", ["--bogus"]),
    ("override without =", ["optim.lr"]), ("config missing", ["--config", "missing.yaml"]),
    ("config not yaml", ["--config", "broken.yaml"]), ("config a list", ["--config", "list.yaml"]),
    ("config section a number", ["--config", "section.yaml"]), ("epochs flag text", ["--epochs", "abc"]),
    ("data dir a file", ["data.dataset=imagefolder", "--data_dir", "afile"]),
    ("data dir missing", ["data.dataset=imagefolder", "--data_dir", "missing"]),
    ("empty image folder", ["data.dataset=imagefolder", "--data_dir", "emptyfolder"]),
    ("output a file", ["--output", "afile"]), ("pretrained missing", ["model.pretrained=missing.safetensors"]),
    ("pretrained empty", ["model.pretrained=empty.safetensors"]),
    ("pretrained truncated", ["model.pretrained=truncated.safetensors"]),
    ("pretrained hostile pickle", ["model.pretrained=evil.pth"]),
    ("pretrained of another model", ["model.pretrained=other.safetensors"]),
    ("pretrained unknown format", ["model.pretrained=afile.txt"]),
    ("run exists without --reload", ["--output", ".", "--savefile", "run_01"]),
    ("resume with another lr", ["--output", ".", "--reload", "optim.lr=0.5"]),  # overrides after the flags too
    ("resume with another model", ["model.depth=3", "--output", ".", "--reload"]),
    ("resume a locked run", ["--output", ".", "--savefile", "locked", "--reload"]),
    ("resume with nothing intact", ["--output", ".", "--savefile", "damaged", "--reload"]),
    # issue 29: sizes that cannot build or fit (a hang, an OOM kill or a traceback before), checked before building
    ("depth a billion", ["model.depth=1000000000"]), ("img size 100000", ["model.img_size=100000"]),
    ("data img size 100000", ["data.img_size=100000"]), ("four million tokens", ["model.img_size=4096"]),
    ("1e11 parameters", ["model.embed_dim=40000"]), ("heads zero", ["model.num_heads=0"]),
    ("width zero", ["model.embed_dim=0"]), ("patch zero", ["model.patch_size=0"]),
    ("mlp ratio negative", ["model.mlp_ratio=-1"]), ("mlp ratio of no units", ["model.mlp_ratio=0.001"]),
    ("depth negative", ["model.depth=-1"]),
    ("staged width zero", ["model.name=staged_vit_patch4_32", "model.depth=null", "model.widths=[64,0]", "model.depths=[1,1]"]),
    ("gdt stage patch zero", ["model.name=gdt_vit_base_256", "model.stages=[[0,16,0.25]]"]),
    ("lr 1e308", ["optim.lr=1e308"]), ("weight decay 1e308", ["optim.weight_decay=1e308"]),
    ("lr yaml nan", ["optim.lr=.nan"]), ("lr yaml inf", ["optim.lr=.inf"]), ("momentum 2", ["optim.momentum=2"]),
    ("seed negative", ["train.seed=-1"]), ("seed 2**64", ["train.seed=18446744073709551616"]),
    ("split seed negative", ["data.split_seed=-1"]), ("device mps", ["train.device=mps"]),
    ("device xpu", ["train.device=xpu"]), ("device gpu7", ["train.device=gpu7"]),
    ("lora alpha negative", ["lora.alpha=-1"]), ("lora alpha negative with a rank", ["lora.rank=4", "lora.alpha=-2"]),
    ("lr scale negative", ["optim.lr_scale={lora_: -1}"]), ("lora rank above the width", ["lora.rank=100"]),
    ("lora rank a billion", ["lora.rank=1000000000"]), ("timeout 1e30", ["train.dist_timeout=1e30"]),
    ("workers 100000", ["data.num_workers=100000"]),
    ("synthetic size negative", ["data.dataset=synthetic", "data.synthetic_size=-5"]),
    ("canvas clutter on another dataset", ["data.canvas_clutter=3"]),
    ("pixel noise negative", ["data.pixel_noise=-0.1"]), ("label noise above the majority", ["data.label_noise=0.95"]),
    ("config repeats a key", ["--config", "dup.yaml"]), ("config repeats a key in a flow", ["--config", "dup_flow.yaml"]),
    ("config not utf-8", ["--config", "latin1.yaml"]), ("config nested 5000 deep", ["--config", "deep.yaml"]),
    ("config alias bomb", ["--config", "bomb.yaml"]), ("config a fifo", ["--config", "fifo"]),
    ("config a device", ["--config", "/dev/zero"]), ("config a folder", ["--config", "emptyfolder"]),
    ("config over 4 MiB", ["--config", "huge.yaml"]),
    ("override alias bomb", ["optim.lr_scale=" + "{a: &a [x, x, x, x, x, x, x, x, x], " + ", ".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(9)) + "}"]),
    ("override nested 5000 deep", ["optim.betas=" + "[" * 5000 + "]" * 5000]),
    ("override repeats a key", ["optim.lr_scale={a: 1, a: 2}"]),
    ("override over 4 MiB", ["optim.lr_scale=" + "x" * (5 << 20)]),
    ("override key with a newline", ["optim.lr\nx=1"]),
]

OTHER = [  # (label, full argument list)
    # flags alone: QUICK's model.name and data.dataset would override them
    ("model flag unknown", ["train", "--model", "vit_nope"]), ("dataset misspelt", ["train", "--dataset", "mnits"]),
    ("dataset without its folder", ["train", "--dataset", "cifar10", "--data_dir", "missing"]),
    ("evaluate missing checkpoint", ["evaluate", "--checkpoint", "missing"]),
    ("evaluate empty file", ["evaluate", "--checkpoint", "empty.safetensors"]),
    ("evaluate truncated file", ["evaluate", "--checkpoint", "truncated.safetensors"]),
    ("evaluate foreign weights", ["evaluate", "--checkpoint", "other.safetensors"]),
    ("evaluate damaged checkpoint", ["evaluate", "--checkpoint", "damaged/checkpoints/last"]),
    *[(f"evaluate {damage} weights{' file' if file else ''}",
       ["evaluate", "--checkpoint", f"{damage}/checkpoints/best{'/model.safetensors' if file else ''}"])
      for damage in ("flipped", "emptied", "cut") for file in (False, True)],
    ("evaluate batch 0", ["evaluate", "--checkpoint", RUN, "--batch-size", "0"]),
    ("evaluate batch -1", ["evaluate", "--checkpoint", RUN, "--batch-size", "-1"]),
    ("evaluate unknown split", ["evaluate", "--checkpoint", RUN, "--split", "dev"]),
    ("evaluate on missing data", ["evaluate", "--checkpoint", RUN, "--dataset", "cifar100",
                                  "--data_dir", "missing"]),
    ("evaluate stray argument", ["evaluate", "--checkpoint", RUN, "lr=3"]),
    ("predict missing checkpoint", ["predict", "--checkpoint", "missing", "image.png"]),
    ("predict missing image", ["predict", "--checkpoint", RUN, "missing.png"]),
    ("predict a folder", ["predict", "--checkpoint", RUN, "emptyfolder"]),
    ("predict truncated png", ["predict", "--checkpoint", RUN, "truncated.png"]),
    ("predict a text file", ["predict", "--checkpoint", RUN, "afile.txt"]),
    ("predict topk -1", ["predict", "--checkpoint", RUN, "--topk", "-1", "image.png"]),
    ("predict topk 0", ["predict", "--checkpoint", RUN, "--topk", "0", "image.png"]),
    ("collect missing", ["collect", "missing"]), ("collect no runs", ["collect", "emptyfolder"]),
    ("collect damaged results", ["collect", "bad_results"]), ("collect damaged config", ["collect", "bad_config"]),
    ("plot out a file", ["plot", RUN, "--out", "afile"]), ("plot nothing", ["plot"]),
    ("plot no runs", ["plot", "--out", "plots"]),
    ("report out a folder", ["report", RUN, "--out", "emptyfolder"]),
    ("sweep spec missing", ["sweep", "missing.yaml"]), ("sweep unknown key", ["sweep", "badspec.yaml"]),
    ("compare config missing", ["compare", "missing.yaml"]), ("report missing run", ["report", "missing"]),
    ("upload without a repository", ["upload", RUN, "x"]),
    ("models unknown pattern", ["models", "nothing_like_this*"]), ("unknown command", ["fly"]),
]

#: what the line says, where a case's message is worth pinning (a refusal that names the wrong thing is a bug too)
WORDS = {
    "weight decay negative": "optim.weight_decay", "betas out of range": "betas",
    "label smoothing 1.5": "label_smoothing", "mixup negative": "data.mixup", "img size negative": "data.img_size",
    "empty savefile": "savefile", "savefile with slash": "savefile",
    "val fraction 0": "val split of digits is empty; raise data.val_fraction",
    "test fraction 0": "test split of digits is empty; raise data.test_fraction",
    "drop rate 2": "model.drop_rate' is a probability", "drop path 1.5": "model.drop_path_rate' is a probability",
    "device tpu": "train.device 'tpu'", "data dir a file": "is a file, not a folder",
    "output a file": "a file is in the way", "config section a number": "config section 'model' must be a mapping",
    "pretrained empty": "cannot be read as .safetensors",
    "pretrained hostile pickle": "holds Python objects besides tensors",
    "resume with another lr": "optim.lr: 0.003 -> 0.5", "resume with nothing intact": "no intact checkpoint",
    "resume a locked run": f"pid {os.getpid()}",  # the workspace's lock is held by this process
    **{label: "damaged" for label, _ in OTHER if label.startswith(("evaluate flipped", "evaluate emptied",
                                                                    "evaluate cut"))},
    "evaluate batch 0": "positive integer", "predict topk -1": "positive integer",
    "predict truncated png": "cannot be decoded", "predict a folder": "is a folder",
    "plot out a file": "a file is in the way", "report out a folder": "that is a folder",
    "collect damaged results": "not valid JSON",
    "config missing": "config file 'missing.yaml' not found", "config not yaml": "is not valid YAML",
    "misspelt key": "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)",
    "unknown model": "unknown model 'nope'", "model flag unknown": "unknown model 'vit_nope'",
    "dataset misspelt": "unknown dataset 'mnits' (did you mean 'mnist'?)",
    "dataset without its folder": "data directory",
    "img size not a multiple of the patch": "image size 9 is not divisible by patch size 2",
    "width not a multiple of the heads": "embed_dim 102 is not divisible by num_heads 4",
    "token pooling without a class token": "set model.global_pool=avg or model.class_token=true",
    "epochs flag text": "argument --epochs/--n_epochs: invalid int value: 'abc'",
    "unknown flag": "unrecognized arguments: --bogus",
    "evaluate missing checkpoint": "no checkpoint at", "predict missing checkpoint": "no checkpoint at",
    "predict missing image": "not found",
    "models unknown pattern": "no model matches 'nothing_like_this*'", "unknown command": "invalid choice: 'fly'",
    "sweep spec missing": "config file 'missing.yaml' not found",
    "compare config missing": "config file 'missing.yaml' not found",
    "plot nothing": "required: --out", "plot no runs": "nothing to plot: pass run folders", "report missing run": "does not exist",
    "upload without a repository": "HF_REPOSITORY is not set",
    "depth a billion": "asks for 1000000000 blocks, more than the 1024",
    "img size 100000": "model.img_size=100000 is larger than the 8192 px",
    "data img size 100000": "img_size=100000 is larger than the 8192 px",
    "four million tokens": "makes 4,194,304 tokens per image, more than the 65,536",
    "1e11 parameters": "parameters, more than the 1e+10", "heads zero": "model.num_heads must be a positive integer",
    "width zero": "model.embed_dim must be a positive integer", "patch zero": "model.patch_size must be a positive",
    "mlp ratio negative": "model.mlp_ratio must be positive", "mlp ratio of no units": "makes an MLP of 0 units",
    "depth negative": "model.depth must be an integer >= 0", "staged width zero": "model.widths must be a list of positive",
    "gdt stage patch zero": "model.stages must be a list of (patch_in, patch_out, ratio)",
    "lr 1e308": "'optim.lr' is 1e+308, above 1e+06", "weight decay 1e308": "'optim.weight_decay' is 1e+308",
    "lr yaml nan": "must be a finite number", "lr yaml inf": "must be a finite number",
    "momentum 2": "'optim.momentum' must be in [0, 1]",
    "seed negative": "'train.seed' must be in [0, 2**32 - 1]", "seed 2**64": "'train.seed' must be in [0, 2**32 - 1]",
    "split seed negative": "'data.split_seed' must be in", "device mps": "train.device 'mps' is not available here",
    "device xpu": "train.device 'xpu' is not supported", "device gpu7": "(this machine has cpu",
    "lora alpha negative": "'lora.alpha' must be positive", "lora alpha negative with a rank": "'lora.alpha' must be",
    "lr scale negative": "'optim.lr_scale' must map names to multipliers >= 0",
    "lora rank above the width": "lora.rank=100 is above the rank of blocks.0.attn.qkv",
    "lora rank a billion": "'lora.rank' is 1000000000", "timeout 1e30": "'train.dist_timeout' must be 1 to 604800",
    "workers 100000": "'data.num_workers' must be 0 to 256", "synthetic size negative": "'data.synthetic_size'",
    "canvas clutter on another dataset": "data.canvas_clutter=3 applies to mnist_canvas and mnist_canvas_seg only",
    "pixel noise negative": "data.pixel_noise=-0.1 must be in 0..4",
    "label noise above the majority": "data.label_noise=0.95 must be in 0..0.9 (excluded) for 10 classes",
    "config repeats a key": "config file 'dup.yaml' names key 'lr' twice (lines 3 and 4)",
    "config repeats a key in a flow": "names key 'lr' twice (both on line 1)",
    "config not utf-8": "config file 'latin1.yaml' is not UTF-8", "config nested 5000 deep": "nested too deeply",
    "config alias bomb": "alias bomb", "config a fifo": "'fifo' is not a regular file",
    "config a device": "'/dev/zero' is not a regular file", "config a folder": "'emptyfolder' is a folder",
    "config over 4 MiB": "more than the 4 MiB", "override alias bomb": "alias bomb",
    "override nested 5000 deep": "override 'optim.betas' is nested too deeply",
    "override repeats a key": "names key 'a' twice", "override over 4 MiB": "more than vitlab reads",
    "override key with a newline": "unknown config key 'optim.lr\\nx'",
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder with a finished 1-epoch run and the damaged, foreign and odd files the cases point at."""
    root = tmp_path_factory.mktemp("bad_inputs")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        from vitlab.cli import main
        assert main(["train", "--output", ".", *QUICK, "train.epochs=1"]) == 0
        weights = (root / RUN / "checkpoints" / "last" / "model.safetensors").read_bytes()
        (root / "afile").write_text("x")
        (root / "afile.txt").write_text("not weights")
        (root / "empty.safetensors").write_bytes(b"")
        (root / "truncated.safetensors").write_bytes(weights[: len(weights) // 2])
        (root / "broken.yaml").write_text("model: [unclosed\n")
        (root / "list.yaml").write_text("- a\n- b\n")
        (root / "section.yaml").write_text("model: 5\n")
        (root / "badspec.yaml").write_text(f"base: {root / RUN / 'config.yaml'}\ngrids: {{}}\n")
        (root / "emptyfolder").mkdir()
        (root / "dup.yaml").write_text("optim:\n  name: adamw\n  lr: 0.1\n  lr: 0.2\n")
        (root / "dup_flow.yaml").write_text("optim: {lr: 0.1, lr: 0.2}\n")
        (root / "latin1.yaml").write_bytes("task_name: caf\xe9\n".encode("latin-1"))
        (root / "deep.yaml").write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
        (root / "bomb.yaml").write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(9)))
        os.mkfifo(root / "fifo")
        with open(root / "huge.yaml", "wb") as f:  # sparse: 5 MiB that take no disk
            f.truncate(5 << 20)
        from safetensors.torch import save_file
        save_file({"fc.weight": torch.zeros(3, 3)}, root / "other.safetensors")

        class Evil:
            def __reduce__(self):
                return (os.system, ("touch pwned",))
        torch.save({"w": Evil()}, root / "evil.pth")
        from PIL import Image
        Image.new("L", (40, 30), 200).save(root / "image.png")
        (root / "truncated.png").write_bytes((root / "image.png").read_bytes()[:50])
        for name in ("bad_results", "bad_config"):
            shutil.copytree(root / RUN, root / name)
        (root / "bad_results" / "results.json").write_text("{torn")
        (root / "bad_config" / "config.yaml").write_text("model: [unclosed\n")
        shutil.copytree(root / RUN, root / "vitlab" / "damaged")
        for ckpt in ("last", "best"):
            (root / "vitlab" / "damaged" / "checkpoints" / ckpt / "trainer_state.pt").write_bytes(b"")
        (root / "damaged").symlink_to(root / "vitlab" / "damaged")
        for damage in ("flipped", "emptied", "cut"):  # the best weights of a finished run, damaged
            shutil.copytree(root / RUN, root / damage)
            f = root / damage / "checkpoints" / "best" / "model.safetensors"
            data = bytearray(f.read_bytes())
            data[-5] ^= 0xFF
            f.write_bytes(bytes(data) if damage == "flipped" else b"" if damage == "emptied" else data[:len(data) // 2])
        shutil.copytree(root / RUN, root / "vitlab" / "locked")
        from vitlab.train.runlock import RunLock
        lock = RunLock(root / "vitlab" / "locked")  # held by this process: a live writer
        yield root
        lock.release()
    finally:
        os.chdir(cwd)


def snapshot(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*")
                  if ".lock" not in p.name and "tb" not in p.parts)


@pytest.mark.parametrize("label, argv", [(label, ["train", *QUICK, *extra]) for label, extra in TRAIN] + OTHER,
                         ids=[label for label, _ in TRAIN + OTHER])
def test_bad_input_is_one_line_and_exit_2(workspace, capsys, monkeypatch, label, argv):
    monkeypatch.chdir(workspace)
    before = snapshot(workspace)
    code, out, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("vitlab: error: "), (label, err[-2000:])
    assert WORDS.get(label, "") in err, (label, err)
    assert "Traceback" not in out + err
    assert snapshot(workspace) == before, "a refused input wrote nothing"
    assert not (workspace / "pwned").exists()


def test_the_audit_counts_its_cases():
    """The closing note quotes this count: distinct inputs tried (each a test above)."""
    assert len(TRAIN) + len(OTHER) == len({label for label, _ in TRAIN + OTHER}) >= 100
    assert set(WORDS) <= {label for label, _ in TRAIN + OTHER}


def test_what_the_bad_inputs_border_on_is_accepted(workspace, capsys, monkeypatch):
    """The other side of the line: a photo of any size (resized as in evaluation) with more top-k than classes,
    and one run named by a relative path."""
    monkeypatch.chdir(workspace)
    code, out, err = run_cli(["predict", "--checkpoint", RUN, "image.png", "--topk", "20"], capsys)
    assert code == 0 and out.startswith("image.png:"), err
    code, out, err = run_cli(["collect", RUN], capsys)
    assert code == 0, err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", ".nan"])
def test_non_finite_numbers_are_rejected_for_every_float_key(value):
    """Below the command line: the config refuses a non-finite number in any float key (models: when resolved)."""
    from vitlab.config import load_config
    from vitlab.errors import VitlabError
    from vitlab.resolve import resolve_config
    for key in ("optim.lr", "optim.weight_decay", "data.mixup", "model.drop_rate"):
        with pytest.raises(VitlabError, match="finite"):
            cfg = load_config(None, [f"{key}={value}"])
            if key.startswith("model."):
                resolve_config(cfg)


def test_a_size_that_hung_is_one_line_as_a_real_process(workspace):
    """model.depth=1e9 ran for hours (building blocks) before the sizes were checked: as a real process it is
    one line, exit 2, in seconds, with nothing written."""
    from conftest import run_subprocess
    before = snapshot(workspace)
    proc = run_subprocess(["-m", "vitlab", "train", "--output", workspace, *QUICK, "--savefile", "fresh",
                           "model.depth=1000000000"],
                          timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "more than the 1024" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert snapshot(workspace) == before


def test_what_the_size_and_file_bounds_border_on_is_accepted(tmp_path):
    """The other side of issue 29's bounds: every registered model's own sizes, the largest seed, a `<<` merge
    overriding a key it brings, ordinary aliases and an lr of 1e6 (which trains and diverges: exit 3) load."""
    from vitlab.config import load_config, read_yaml
    from vitlab.registry import list_models, model_args
    for name in list_models():
        model_args(name)  # registry.check_sizes on the defaults
    (tmp_path / "merge.yaml").write_text("base: &b {lr: 0.1, name: sgd}\noptim:\n  <<: *b\n  lr: 0.2\n")
    assert read_yaml(tmp_path / "merge.yaml")["optim"] == {"lr": 0.2, "name": "sgd"}
    cfg = load_config(None, ["train.seed=4294967295", "optim.lr=1e6", "optim.lr_scale={a: 0}", "lora.alpha=0.5",
                             "train.dist_timeout=604800", "optim.betas=&x [0.9, 0.99]"])
    assert cfg.train.seed == 2 ** 32 - 1 and cfg.optim.betas == (0.9, 0.99)
