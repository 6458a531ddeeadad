"""The `vitlab` command: train, evaluate, predict, models, configs; sweep, collect, plot, compare, report;
upload, download, push.

Thin by design: parse, build a config, call library functions. A user error (VitlabError, bad flags)
prints one line on stderr and exits 2; no traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from .errors import TrainingStopped, VitlabError
from .names import atomic_write, printable

# `vitlab.compat` (and the data and model modules it imports) is imported inside the functions that use it, so
# that `vitlab train` catches stop signals before its heavy imports (see `_catch_startup_signals`).

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + error; we print one line
        raise VitlabError(f"{message} (see `{self.prog} --help`)")


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse `argv`; `key=value` overrides may come before, between or after the flags (argparse alone takes
    positionals in one run, so `train a=1 --reload b=2` would reject `b=2`)."""
    # `--upload` alone means true; a value after it is read only when it is a boolean word (`--upload true`)
    from .compat import BOOL_WORDS

    argv = [*argv]
    for i, a in enumerate(argv):
        if a == "--upload" and (i + 1 == len(argv) or argv[i + 1].lower() not in BOOL_WORDS):
            argv.insert(i + 1, "true")
    args, extra = _parser().parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        raise VitlabError(f"unrecognized arguments: {' '.join(stray)} (see `vitlab --help`)")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a batch size, a top-k)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vitlab", description="Train, evaluate and compare Vision Transformers.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    _add_train(sub.add_parser("train", help="train a model from a YAML config plus overrides"))

    e = sub.add_parser("evaluate", help="loss, top-1 and top-5 of a checkpoint on a dataset split (JSON)")
    e.add_argument("--checkpoint", "--checkpoint-path", "--checkpoint_path", dest="checkpoint",
                   help="run dir, checkpoint dir or model.safetensors")
    e.add_argument("--model", help="with --size: the newest weights `vitlab train --model M --size S --dataset D` "
                                   "wrote (vit_classic, vit_differential), found under --output")
    e.add_argument("--size", help="10B, 25B or 50B (with --model)")
    e.add_argument("--output", default="./output", help="where to look for --model's weights (default ./output)")
    e.add_argument("--dataset", help="dataset name (default: the one it was trained on)")
    e.add_argument("--data_dir", "--data-dir", help="dataset folder")
    e.add_argument("--split", choices=("train", "val", "test"), default="test")
    e.add_argument("--batch-size", "--batch_size", dest="batch_size", type=positive_int, default=256)
    e.add_argument("--device", default="auto")
    e.add_argument("--compile", action="store_true",
                   help="torch.compile the model first (static shapes; pays off on large splits)")

    pr = sub.add_parser("predict", help="top-k labels for image files")
    pr.add_argument("--checkpoint", required=True, help="run dir, checkpoint dir or model.safetensors")
    pr.add_argument("images", nargs="+", metavar="IMAGE")
    pr.add_argument("--topk", type=positive_int, default=5)

    m = sub.add_parser("models", help="list model names with parameters and GFLOPs")
    m.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'vit_small*'")
    m.add_argument("--aliases", action="store_true", help="also list aliases (b16, l16, ...)")

    cf = sub.add_parser("configs", help="list the shipped presets (recipes and sweep specs) by name")
    cf.add_argument("pattern", nargs="?", default="*", help="shell pattern or part of a name, e.g. 'gdt/*' or seed003")

    sw = sub.add_parser("sweep", help="one run per point of a grid (SPEC: base, grid, zip, set); rerun resumes")
    sw.add_argument("spec", help="sweep spec YAML, or a preset's name (e.g. sweeps/quickstart_2x2)")
    sw.add_argument("--output", help="folder of the sweep's runs (default output/sweeps/<spec name>)")
    sw.add_argument("--launcher", choices=("local", "torchrun", "slurm"), default="local",
                    help="local: run here one after another; torchrun/slurm: write the launch script")
    sw.add_argument("--submit", action="store_true", help="torchrun/slurm: also launch the script (bash / sbatch)")
    sw.add_argument("--dry-run", action="store_true", help="list the points and their status; run nothing")

    c = sub.add_parser("collect", help="one table of every run under the folders (Markdown; CSV file)")
    c.add_argument("dirs", nargs="+", metavar="DIR")
    c.add_argument("--csv", help="CSV path (default <first DIR>/runs.csv)")

    pl = sub.add_parser("plot", help="loss curves, scaling laws, comparisons (PNG + SVG) from run folders")
    pl.add_argument("dirs", nargs="*", metavar="DIR")
    pl.add_argument("--out", required=True, help="folder for the figures")
    pl.add_argument("--checkpoint", action="append", default=[],
                    help="also a sample-prediction grid and confusion matrix for this run/checkpoint (repeatable)")
    pl.add_argument("--data_dir", "--data-dir", help="dataset folder for --checkpoint (default: the run's)")

    cp = sub.add_parser("compare", help="train (or collect) several configs on one dataset; one table "
                                                  "(top-1, epochs, params, memory, img/s)")
    cp.add_argument("configs", nargs="+", metavar="CONFIG")
    cp.add_argument("--epochs", type=positive_int, help="the same epoch budget for every model")
    cp.add_argument("--output", default="output/compare", help="folder of the runs and compare.{md,csv}")
    cp.set_defaults(overrides=[])  # key=value after the configs: the same overrides for every model

    r = sub.add_parser("report", help="one self-contained HTML page: the collect table and every plot")
    r.add_argument("dirs", nargs="+", metavar="DIR")
    r.add_argument("--out", default="report.html", help="HTML file to write")
    r.add_argument("--title", default="vitlab report")

    up = sub.add_parser("upload", help="put a file or folder into a folder of HF_REPOSITORY (token: HF_TOKEN)")
    up.add_argument("local_path", metavar="LOCAL_PATH")
    up.add_argument("remote_dir", metavar="REMOTE_DIR", help="folder in the repository ('.' for its root)")
    ps = sub.add_parser("push", help="a finished run as a Hub model repository: weights, timm-style config.json, "
                                     "model card (token: HF_TOKEN)")
    ps.add_argument("run", metavar="RUN", help="the run directory")
    ps.add_argument("--repo", required=True, help="owner/name of the model repository; created (with --private, "
                                                   "private) when it does not exist")
    ps.add_argument("--license", default="other", help="the model's license identifier (default other)")
    ps.add_argument("--private", action="store_true", help="create the repository private (an existing one keeps "
                                                           "its visibility)")
    dl = sub.add_parser("download", help="fetch a file or folder of HF_REPOSITORY into a local folder")
    dl.add_argument("remote_path", metavar="REMOTE_PATH")
    dl.add_argument("local_dir", metavar="LOCAL_DIR")
    return p


def _add_train(t: argparse.ArgumentParser) -> None:
    """`vitlab train`: plain flags (each sets the config key in its `dest`), then the original projects' flags
    (translated by `compat`), then `key=value` overrides."""
    from .compat import flag_bool

    t.add_argument("--config", help="YAML config file, or a preset's name (`vitlab configs`; e.g. quickstart)")
    t.add_argument("--reload", action="store_true", help="resume the run from its last checkpoint")
    t.add_argument("--local", action="store_true", help="train in this one process even under torchrun/srun "
                                                        "(the GDT-ViT project's fallback; other ranks exit)")
    # plain flags: their `dest` is the config key they set
    t.add_argument("--data_dir", "--data-dir", dest="data.data_dir", help="dataset folder (data.data_dir)")
    t.add_argument("--output", dest="output.dir", help="base output folder (output.dir, default ./output)")
    t.add_argument("--pretrained", dest="model.pretrained",
                   help="weights to start from: a local file, hf-hub:<owner>/<name>[@rev] or timm's <arch>.<tag> "
                        "(model.pretrained)")
    t.add_argument("--savefile", dest="output.savefile",
                   help="run name under <output>/<task_name>/ (output.savefile, default run_01)")
    t.add_argument("--num_workers", "--num-workers", dest="data.num_workers", type=int,
                   help="data loader workers (data.num_workers, default 8)")
    t.add_argument("--model", dest="model.name", help="model name (model.name); `vitlab models` lists them")
    t.add_argument("--dataset", dest="data.dataset",
                   help="dataset name (data.dataset; any case, dashes optional: CIFAR-100)")
    t.add_argument("--epochs", "--n_epochs", dest="train.epochs", type=int, help="train.epochs")
    t.add_argument("--batch-size", "--batch_size", "--bs", dest="train.batch_size", type=int, help="train.batch_size")
    t.add_argument("--lr", dest="optim.lr", type=float, help="optim.lr")
    t.add_argument("--upload", dest="output.upload", type=flag_bool, metavar="BOOL",
                   help="upload the final weights and logs to HF_REPOSITORY (token: HF_TOKEN; env or .env)")
    s2 = t.add_argument_group("classic vs differential ViT (`run.py train`; without --config they bring its recipe)")
    s2.add_argument("--size", help="10B, 25B or 50B with --model vit_classic|vit_differential (a bare pixel "
                                   "count, as in --size 32, sets data.img_size)")
    s3 = t.add_argument_group("small-dataset ViTs (`train_cifar10.py`; without --config they bring its recipe)")
    s3.add_argument("--net", help="vit_small, vit_small_reverse, vit_small_bdia, vit_small_momentum (model.name)")
    s3.add_argument("--noamp", action="store_true", help="train.amp=none")
    s3.add_argument("--resume", dest="reload", action="store_true", help="same as --reload")
    s1 = t.add_argument_group("ViT / Res-ViT fine-tuning (`train.py`; without --config they bring its recipe)")
    s1.add_argument("--model-arch", "--model_arch", dest="model_arch", help="b16, b32, l16, l32, h14 (model.name)")
    s1.add_argument("--use-reslr", "--use_reslr", dest="use_reslr", type=flag_bool, metavar="BOOL",
                    help="Res-ViT: token routers and low-rank approximators (resvit_* of the same size)")
    s1.add_argument("--use-lora", "--use_lora", dest="use_lora", type=flag_bool, metavar="BOOL",
                    help="LoRA fine-tuning (lora.rank 8 unless --lora-rank)")
    s1.add_argument("--lora-rank", "--lora_rank", dest="lora_rank", type=int, help="lora.rank")
    s1.add_argument("--dynamic-active-target", "--dynamic_active_target", dest="dynamic_active_target", type=float,
                    help="Res-ViT target active ratio (model.active_target)")
    s1.add_argument("--dynamic-start-layer", "--dynamic_start_layer", dest="dynamic_start_layer", type=int)
    s1.add_argument("--block-size", "--block_size", dest="block_size", type=int)
    s1.add_argument("--train-steps", "--train_steps", dest="train_steps", type=int, help="train.max_steps")
    s1.add_argument("--warmup-steps", "--warmup_steps", dest="warmup_steps", type=int, help="optim.warmup_steps")
    s1.add_argument("--checkpoint-path", "--checkpoint_path", dest="checkpoint_path",
                    help="pretrained weights to fine-tune (model.pretrained; .pth, .npz or .safetensors)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=3e-4")


def cmd_train(args) -> int:
    from .compat import translate_train
    from .config import parse_override, read_yaml
    from .resolve import build
    from .train import train

    flags = {k: v for k, v in vars(args).items() if "." in k and v is not None}  # plain flags: config keys
    translation = translate_train(args, flags.get("model.name"), flags.get("data.dataset"))
    tree = read_yaml(translation.recipe) if translation.recipe else translation.tree or {}
    overrides = list({**flags, **dict(translation.overrides)}.items())  # a project's spelling wins over --model
    command = translation.command(overrides) + "".join(f" {o}" for o in args.overrides)
    cfg = build(tree, overrides + [parse_override(o) for o in args.overrides])  # resolved once, here
    if translation.translated:  # a project's own command line: show what it stands for
        print(f"vitlab: as config: {command}", file=sys.stderr)
    train(cfg, reload=args.reload, local=args.local, command=command)
    return 0


def cmd_evaluate(args) -> int:
    import torch

    from .train import evaluate, load_checkpoint
    from .train.build import checkpoint_data
    from .train.distributed import DistEnv, resolve_device

    if args.checkpoint is None:
        if args.model is None:
            raise VitlabError("evaluate needs --checkpoint PATH (a run, checkpoint dir or .safetensors), or --model "
                              "with --size and --dataset to find that run's weights")
        from .compat import find_by_architecture_weights
        args.checkpoint = find_by_architecture_weights(args.output, args.model, args.size, args.dataset)
    model, cfg, _ = load_checkpoint(args.checkpoint)
    data = checkpoint_data(cfg, model, args.dataset, args.data_dir)
    device = resolve_device(args.device, DistEnv())
    loader = data.loader(args.split, args.batch_size, min(cfg.data.num_workers, 4), pin_memory=device.type == "cuda")
    model = model.to(device)
    if args.compile:  # one graph per batch shape (the last batch may add one), no dynamic-shape kernels
        model = torch.compile(model, dynamic=False)
    with torch.inference_mode():
        metrics = evaluate(model, loader, device, cfg.train.amp)
    print(json.dumps({"checkpoint": str(args.checkpoint), "dataset": data.info.name, "split": args.split,
                      **metrics}))  # top1, top5, loss, n (samples; pixels when segmenting: with miou, dice)
    return 0


def cmd_predict(args) -> int:
    import torch
    from PIL import Image

    from .data import DatasetInfo
    from .data.transforms import build_transform
    from .train import load_checkpoint, predict
    from .untrusted import open_image

    model, _, extra = load_checkpoint(args.checkpoint)
    info = DatasetInfo(**extra["dataset_info"])
    a = model.vitlab_args
    if a.get("head") == "segment":
        raise VitlabError(f"'{args.checkpoint}' segments (a mask per image); `vitlab evaluate` scores it and "
                          f"`vitlab plot --checkpoint` draws its masks")
    tf = build_transform(info, a["img_size"], a["in_chans"], "none", train=False)
    # any photo size: photo datasets' transform already resizes and crops; the others resize to the model's
    # input like evaluation resizes the dataset's images (bilinear, antialiased)
    size = None if info.crop == "rrc" else (a["img_size"], a["img_size"])
    batch = []
    for path in args.images:
        if Path(path).is_dir():
            raise VitlabError(f"'{path}' is a folder; pass image files (e.g. {path}/*.png)")
        # one line for a FIFO or device, a missing, undecodable or oversized image; >8-bit images scaled
        im = open_image(path, info.in_chans)
        batch.append(tf(im.resize(size, Image.BILINEAR) if size and im.size != size else im))
    probs, idx = predict(model, torch.stack(batch), min(args.topk, a["num_classes"]))
    names = info.class_names or [str(i) for i in range(a["num_classes"])]
    for path, p_row, i_row in zip(args.images, probs.tolist(), idx.tolist()):
        print(f"{path}: " + ", ".join(f"{names[i]} {p:.3f}" for p, i in zip(p_row, i_row)))
    return 0


def cmd_configs(args) -> int:
    from .presets import PRESETS, preset_table

    print(preset_table(args.pattern))
    print(f"config: vitlab train --config NAME; sweep: vitlab sweep NAME (files in {PRESETS})")
    return 0


def cmd_models(args) -> int:
    from .registry import list_models
    from .stats import model_stats

    names = list_models(args.pattern, aliases=args.aliases)
    if not names:
        raise VitlabError(f"no model matches '{args.pattern}'; try `vitlab models` for the full list")
    print(f"{'model':<28} {'params (M)':>11} {'GFLOPs':>9} {'img':>5}")
    for name in names:
        s = model_stats(name)
        print(f"{name:<28} {s['params'] / 1e6:>11.2f} {s['gflops']:>9.3f} {s['img_size']:>5}")
    print("GFLOPs: multiply-accumulates of one forward pass at the model's own resolution, in billions "
          "(the timm/fvcore convention; ViT-S/16 = 4.6)")
    return 0


def cmd_sweep(args) -> int:
    from .experiments import sweep as sw

    spec = sw.load_spec(args.spec)
    root = Path(args.output or Path("output") / "sweeps" / spec.name)
    if args.dry_run:
        for p in spec.points:
            print(f"{p.status(root):>8}  {root / p.name}")
        return 0
    if args.launcher == "local":
        outcome = sw.run_local(spec, root)
        ran = sum(status != "finished" for _, status in outcome)
        print(f"sweep {spec.name}: {len(outcome)} runs in {root} ({ran} trained or resumed now, "
              f"{len(outcome) - ran} already finished); `vitlab collect {root}` tabulates them")
        return 0
    script = (sw.write_torchrun if args.launcher == "torchrun" else sw.write_slurm)(spec, root)
    tool = "sbatch" if args.launcher == "slurm" else "bash"
    print(f"wrote {script}" + ("" if args.submit else f"; launch it with `{tool} {script}`"))
    if args.submit:
        sw.submit(script, args.launcher)
    return 0


def cmd_collect(args) -> int:
    from .experiments.collect import markdown, table, to_csv
    from .experiments.runs import find_runs

    runs = find_runs(args.dirs)
    print(markdown(*table(runs)))
    out = Path(args.csv or Path(args.dirs[0]) / "runs.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, to_csv(runs))
    print(f"\n{len(runs)} runs; CSV: {out}")
    return 0


def cmd_plot(args) -> int:
    from .experiments.runs import find_runs
    from .plots import all_run_figures, save

    if not args.dirs and not args.checkpoint:
        raise VitlabError("nothing to plot: pass run folders and/or --checkpoint RUN")
    figures = all_run_figures(find_runs(args.dirs)) if args.dirs else {}
    if args.checkpoint:
        from .plots.predictions import prediction_figures

        for ck in args.checkpoint:
            figures.update(prediction_figures(ck, args.data_dir))
    written = save(figures, args.out)
    print(f"{len(figures)} figures ({len(written)} files) in {args.out}: {', '.join(sorted(figures))}")
    return 0


def cmd_compare(args) -> int:
    from .config import parse_override
    from .experiments.compare import comparison_outputs, run_comparison

    root = Path(args.output)
    overrides = dict(parse_override(o) for o in args.overrides)
    runs = run_comparison(args.configs, args.epochs, root, overrides)
    print(comparison_outputs(runs, root))
    print(f"\nruns in {root}; table also in {root / 'compare.md'} and {root / 'compare.csv'}")
    return 0


def cmd_report(args) -> int:
    from .experiments.report import build_report
    from .experiments.runs import find_runs
    from .plots import all_run_figures

    runs = find_runs(args.dirs)
    figures = all_run_figures(runs)
    page = build_report(runs, figures, args.title)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, page)  # an existing page stays whole on a full disk
    print(f"report of {len(runs)} runs with {len(figures)} figures: {out}")
    return 0


def cmd_upload(args) -> int:
    from .hub import hub_target, upload

    target = hub_target(need_token=True)
    sent = upload(args.local_path, args.remote_dir, target)
    print(f"uploaded {len(sent)} file(s) to {target.repo_id}: " + ", ".join(sent[:10])
          + (f" ... (+{len(sent) - 10})" if len(sent) > 10 else ""))
    return 0


def cmd_push(args) -> int:
    from .push import push

    repo, sent = push(args.run, args.repo, args.license, args.private)
    print(f"pushed {len(sent)} file(s) to {repo}: " + ", ".join(sent[:8]) + (" ..." if len(sent) > 8 else ""))
    print(f"load it: vitlab.create_model(\"hf-hub:{repo}\", pretrained=True)")
    return 0


def cmd_download(args) -> int:
    from .hub import download, hub_target

    target = hub_target(need_token=False)
    got = download(args.remote_path, args.local_dir, target)
    print(f"downloaded {len(got)} file(s) from {target.repo_id} into {args.local_dir}")
    return 0


def _rank_prefix() -> str:
    """'[rank 3] ' inside a multi-process launch, so a failing rank is identifiable; '' otherwise."""
    rank, world = os.environ.get("RANK", os.environ.get("SLURM_PROCID")), os.environ.get("WORLD_SIZE",
                                                                                         os.environ.get("SLURM_NTASKS"))
    return f"[rank {rank}] " if rank is not None and world not in (None, "1") else ""


def describe_os_error(exc: OSError) -> str:
    """One line for a filesystem error: what failed, on which path, and what to do."""
    import errno
    where = f" '{exc.filename}'" if exc.filename else ""
    if exc.errno == errno.ENOSPC:
        return f"no space left on device writing{where}; free some space (checkpoints are intact: --reload)"
    fix = {errno.EACCES: "choose a location you can write to (--output / --out)",
           errno.EROFS: "choose a location you can write to (--output / --out)",
           errno.ENOTDIR: "a file is in the way of a folder; choose another --output / --out",
           errno.EEXIST: "a file is in the way of a folder; choose another --output / --out",
           errno.EISDIR: "that is a folder; pass a file path"}.get(exc.errno, "check the path")
    return f"{exc.strerror or exc}{where}; {fix}"


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "models": cmd_models,
            "configs": cmd_configs,
            "sweep": cmd_sweep, "collect": cmd_collect, "plot": cmd_plot, "compare": cmd_compare,
            "report": cmd_report, "upload": cmd_upload, "download": cmd_download,
            "push": cmd_push}


def _shown(message: object) -> str:
    """An error line as printed: the Hub token redacted (in any escaped form), control characters escaped.
    Only `vitlab.hub` reads the token, so where it was never imported there is nothing to redact."""
    hub = sys.modules.get("vitlab.hub")
    return printable(hub.redact(str(message)) if hub else message)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    restore = _catch_startup_signals() if argv[:1] == ["train"] else None
    try:
        return _main(argv)
    except _StopSignal as stop:  # arrived while `_main` was already printing its last line
        return _stopped(stop.signum)
    finally:
        if restore is not None:
            restore()


def _main(argv: list[str]) -> int:
    try:
        args = parse(argv)
        return COMMANDS[args.command](args)
    except VitlabError as exc:  # one line, whatever names it quotes (vitlab.names.printable)
        print(f"vitlab: error: {_rank_prefix()}{_shown(exc)}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `vitlab collect ... | head`: the reader left; stop quietly like other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # the filesystem: a path that is a file, read-only, missing, or a full disk
        print(f"vitlab: error: {_rank_prefix()}{_shown(describe_os_error(exc))}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:  # a signal: the checkpoint is written; not an error
        print(f"vitlab: {_rank_prefix()}{exc}", file=sys.stderr)
        return exc.exit_code
    except _StopSignal as stop:  # a signal before the training loop took over its handling, or after it
        if isinstance(stop.__context__, TrainingStopped):  # a second signal while the loop's stop unwound
            print(f"vitlab: {_rank_prefix()}{stop.__context__}", file=sys.stderr)
            return stop.__context__.exit_code
        return _stopped(stop.signum)
    except KeyboardInterrupt:
        print("vitlab: interrupted; the last checkpoint is intact (resume with --reload)", file=sys.stderr)
        return 130


# -- stop signals outside the training loop --------------------------------------------------------------------
# The trainer handles SIGTERM, SIGINT and SIGUSR1 while it trains (`vitlab.train.signals`: finish the step, save,
# exit 0, or 75 and a SLURM requeue for SIGUSR1). `vitlab train` catches them from its first instant too, so a
# signal during start-up (imports, data, model, process group) or after the loop (test, results.json, export)
# ends the command with one line instead of killing it silently; a SLURM job preempted while starting is
# requeued like one preempted while training.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
PREEMPTED_EXIT = 75  # as vitlab.train.signals.PREEMPTED_EXIT (EX_TEMPFAIL: not finished, run it again)


class _StopSignal(BaseException):
    """Raised in the main thread by the handler `_catch_startup_signals` installs. A BaseException: no `except
    Exception` on its way swallows it, and `RunDirectory.undone_on_failure` removes what the start wrote."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _catch_startup_signals():
    """Install the command-level handler for the stop signals; returns what puts the previous ones back. Only
    the main thread can install handlers: elsewhere (a notebook thread calling `main`) this does nothing."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != pid:  # a forked child (a data-loader worker) ends as it would have without us
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise _StopSignal(signum)

    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    stop = sys.modules.get("vitlab.train.signals")
    if stop is not None:  # an earlier run in this process
        stop.training_began = False

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)
    return restore


def _stopped(signum: int) -> int:
    """The one line and exit code of a stop outside the training loop: 75 (130 for SIGINT); a SIGUSR1 on rank 0
    requeues the SLURM job as it does during training."""
    for sig in STOP_SIGNALS:  # a second signal acts as usual
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    name = signal.Signals(signum).name + (" (preemption)" if signum == signal.SIGUSR1 else "")
    main_rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"
    requeued = _requeue_slurm_job() if signum == signal.SIGUSR1 and main_rank else ""
    again = "" if requeued.startswith("; requeued") else "; run the same command again"
    stop = sys.modules.get("vitlab.train.signals")
    if stop is not None and stop.training_began:
        message = (f"stopped by {name} after training, before the run was finished (test, results.json, export): "
                   f"checkpoints/last holds the trained weights{requeued}; finish it with --reload")
    else:
        message = f"stopped by {name} during start-up, before training began: nothing was lost{requeued}{again}"
    print(f"vitlab: {_rank_prefix()}{message}", file=sys.stderr)
    return 130 if signum == signal.SIGINT else PREEMPTED_EXIT


def _requeue_slurm_job() -> str:
    """`vitlab.train.signals.requeue_slurm_job`, without importing the `vitlab.train` package (the trainer and
    everything it imports) when a signal came before it was: signals.py needs only the standard library."""
    stop = sys.modules.get("vitlab.train.signals")
    if stop is None:
        import importlib.util

        spec = importlib.util.spec_from_file_location("_vitlab_stop_signals",
                                                      Path(__file__).with_name("train") / "signals.py")
        stop = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(stop)
    return stop.requeue_slurm_job()


if __name__ == "__main__":
    sys.exit(main())
