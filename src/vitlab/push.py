"""`vitlab push RUN --repo owner/name`: a finished run as a Hub model repository the field can load.

The repository gets, in one commit:
  model.safetensors   the evaluated weights (the EMA's when the run kept one), metadata {"format": "pt"} only
  config.json         timm's layout: architecture, num_classes, num_features, global_pool, model_args,
                      pretrained_cfg (input size, mean, std, crop, interpolation), label_names; and a `vitlab`
                      block (the registered name and every argument) from which vitlab rebuilds any family
  README.md           the model card: front matter (license, library, tags), what the model is, the results,
                      the recipe and the exact command, the curves, how to load it
  config.yaml, results.json, plots/*.png   the run's own files

A standard ViT (our VisionTransformer with timm's attention, patch embedding, head and LayerNorm epsilon) is
written with timm's architecture name and arguments, so `timm.create_model("hf-hub:owner/name",
pretrained=True)` builds timm's twin of it and gives our logits; any other family is written under its vitlab
name, which only vitlab builds (`vitlab.create_model("hf-hub:owner/name", pretrained=True)`).

The token comes from HF_TOKEN (environment or `.env`); every file is checked for it before the commit
(`vitlab.hub.upload_files`). Names and values from the run go into the card escaped (Markdown cells, a fenced
block for the command), never as markup.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import VitlabError

#: our VisionTransformer's arguments that timm's VisionTransformer takes with the same meaning
TIMM_ARGS = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads", "mlp_ratio",
             "qkv_bias", "class_token", "global_pool", "init_values")
#: the values of our other arguments under which the model is exactly timm's
TIMM_DEFAULTS = {"norm_eps": 1e-6, "attn_layer": "mhsa", "tokenizer": "patch", "head": "classify", "merge": None}
TIMM_BASE = "vit_base_patch16_224"  # a timm architecture whose arguments model_args then set in full


def timm_architecture(model: torch.nn.Module) -> tuple[str, dict[str, Any]] | str:
    """(timm architecture name, model_args) for a model timm rebuilds exactly; else why not (a sentence)."""
    from .models.vit import VisionTransformer

    if type(model) is not VisionTransformer:
        return f"{model.vitlab_name} is a {type(model).__name__}, which timm does not have"
    args = model.vitlab_args
    differ = [f"{k}={args.get(k)!r}" for k, v in TIMM_DEFAULTS.items() if args.get(k, v) != v]
    if differ:
        return f"its {', '.join(differ)} differ from timm's ViT"
    return TIMM_BASE, {k: args[k] for k in TIMM_ARGS}


def _eval_weights(run_dir: Path) -> tuple[torch.nn.Module, Any, dict]:
    from .train.evaluate import load_checkpoint

    if not (run_dir / "results.json").is_file():
        raise VitlabError(f"'{run_dir}' is not a finished run (no results.json); push a run directory that "
                          f"finished training")
    return load_checkpoint(run_dir, use_ema=True)


def model_config(model: torch.nn.Module, info: dict[str, Any], crop: str) -> dict[str, Any]:
    """config.json in timm's layout, with the `vitlab` block."""
    from .data.tensor_loader import match_channels

    args = model.vitlab_args
    timm = timm_architecture(model)
    architecture, model_args = timm if isinstance(timm, tuple) else (model.vitlab_name, dict(args))
    channels, size = args.get("in_chans", 3), args.get("img_size", 224)
    labels = [str(c) for c in info.get("class_names") or []] or None
    config = {
        "architecture": architecture,
        "num_classes": args.get("num_classes"),
        "num_features": args.get("embed_dim"),
        "global_pool": args.get("global_pool"),
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [channels, size, size], "fixed_input_size": True,
            "mean": list(match_channels(tuple(info["mean"]), channels)),
            "std": list(match_channels(tuple(info["std"]), channels)),
            "interpolation": "bilinear", "crop_pct": 0.875 if crop == "rrc" else 1.0, "crop_mode": "center",
            "num_classes": args.get("num_classes"), "classifier": "head",
        },
        "vitlab": {"name": model.vitlab_name, "args": _jsonable(args), "timm": timm if isinstance(timm, str) else
                   "loads in timm"},
    }
    if labels and len(labels) == args.get("num_classes"):
        config["label_names"] = labels
    return config


def _jsonable(value: Any) -> Any:
    """Model arguments as JSON (tuples as lists); a callable argument cannot be written and is refused."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise VitlabError(f"a model argument is a {type(value).__name__}, which a config.json cannot hold; push "
                      f"runs of registered models configured by name")


def _cell(text: Any) -> str:
    """A Markdown table cell from run data: one line, no pipes, no markup characters that render."""
    from .names import printable

    out = printable(str(text)).replace("\\", "\\\\")
    for ch in "|`*_[]<>#!":
        out = out.replace(ch, "\\" + ch)
    return out


def _fenced(text: str) -> str:
    """A fenced block that `text` cannot close: a fence longer than any run of backticks in it."""
    longest = max((len(run) for run in text.split("\n") for run in _backtick_runs(run)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _backtick_runs(line: str) -> list[str]:
    return re.findall(r"`+", line)


def model_card(repo: str, config: dict, results: dict, run_cfg, command: str | None, plots: list[str],
               license: str) -> str:
    """README.md: the Hub's front matter, then what the model is, its results, recipe, curves and use."""
    timm_ok = config["vitlab"]["timm"] == "loads in timm"
    tags = ["image-classification", "vitlab", "vision-transformer"] + (["timm"] if timm_ok else [])
    front = {"license": license, "library_name": "timm" if timm_ok else "vitlab", "tags": tags,
             "pipeline_tag": "image-classification"}
    import yaml
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {_cell(repo)}", "",
             f"A {_cell(config['vitlab']['name'])} ({_cell(results.get('architecture', ''))}) trained with "
             f"vitlab on {_cell(results.get('dataset', ''))}, "
             f"{config['num_classes']} classes, {config['pretrained_cfg']['input_size'][-1]} px input.", "",
             "## Results", "", "| metric | value |", "|---|---:|"]
    rows = [("test top-1 %", results.get("test_top1"), lambda v: f"{100 * v:.2f}"),
            ("test top-5 %", results.get("test_top5"), lambda v: f"{100 * v:.2f}"),
            ("test images", results.get("test_samples"), str), ("parameters (M)", results.get("params"),
                                                                lambda v: f"{v / 1e6:.2f}"),
            ("GFLOPs", results.get("gflops"), lambda v: f"{v:.3f}"), ("epochs", results.get("epochs"), str),
            ("weights", results.get("weights"), str)]
    lines += [f"| {name} | {_cell(fmt(v))} |" for name, v, fmt in rows if isinstance(v, (int, float, str))
              and not isinstance(v, bool)]
    recipe = [("optimizer", f"{run_cfg.optim.name}, lr {run_cfg.optim.lr:g}, weight decay {run_cfg.optim.weight_decay:g}, "
                            f"{run_cfg.optim.schedule} schedule"),
              ("batch", f"{run_cfg.train.batch_size} per process"), ("augmentation", run_cfg.data.augment),
              ("normalisation", run_cfg.data.normalization), ("seed", run_cfg.train.seed)]
    lines += ["", "## Recipe", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in recipe]
    if command:
        lines += ["", "The exact command:", "", _fenced(command)]
    lines += ["", "The full resolved configuration is `config.yaml`; the results are `results.json`."]
    if plots:
        lines += ["", "## Training curves", ""] + [f"![{_cell(Path(p).stem)}]({p})" for p in plots]
    lines += ["", "## Use", "", "```python", "import vitlab", f"model = vitlab.create_model(\"hf-hub:{repo}\", "
              "pretrained=True).eval()", "```"]
    if timm_ok:
        lines += ["", "or with timm alone:", "", "```python", "import timm",
                  f"model = timm.create_model(\"hf-hub:{repo}\", pretrained=True).eval()", "```"]
    else:
        lines += ["", f"timm cannot build this model: {_cell(config['vitlab']['timm'])}."]
    lines += ["", "## License", "", f"{_cell(license)} (as declared by the uploader with `vitlab push --license`)."]
    return "\n".join(lines) + "\n"


def _command(run_dir: Path) -> str | None:
    """The command line the run's log records (its first `command:` line)."""
    log = run_dir / "train.log"
    if not log.is_file():
        return None
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines()[:50]:
        _, sep, rest = line.partition(" command: ")
        if sep:
            return rest.strip()
    return None


def _plots(run_dir: Path, folder: Path) -> list[str]:
    """The run's loss and accuracy curves as PNG files under folder/plots (paths relative to folder)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .experiments.runs import load_run
    from .plots.curves import accuracy_figure, loss_figures

    run = load_run(run_dir)
    figures = {**loss_figures([run])}
    accuracy = accuracy_figure([run])
    if accuracy is not None:
        figures["accuracy_per_epoch"] = accuracy
    (folder / "plots").mkdir()
    saved = []
    for name, fig in figures.items():
        path = f"plots/{''.join(c if c.isalnum() or c in '_-' else '_' for c in name)}.png"
        fig.savefig(folder / path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        saved.append(path)
    return saved


def repository_files(run_dir: Path, repo: str, folder: Path, license: str = "other") -> dict[str, Path]:
    """Write the repository's files for `run_dir` into `folder`; {path in the repository: local file}."""
    from safetensors.torch import save_file

    model, cfg, extra = _eval_weights(run_dir)
    info = extra.get("dataset_info") or {}
    results = json.loads((run_dir / "results.json").read_text())
    config = model_config(model, info, info.get("crop", "pad"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    plots = _plots(run_dir, folder)
    (folder / "README.md").write_text(model_card(repo, config, results, cfg, _command(run_dir), plots, license))
    files = {name: folder / name for name in ("model.safetensors", "config.json", "README.md")}
    files.update({p: folder / p for p in plots})
    files.update({name: run_dir / name for name in ("config.yaml", "results.json") if (run_dir / name).is_file()})
    return files


def push(run_dir: str | Path, repo: str, license: str = "other", private: bool = False) -> tuple[str, list[str]]:
    """Build the repository files of a finished run and commit them to the model repository `repo`
    (owner/name; not HF_REPOSITORY, which `vitlab upload` fills with runs), creating it, private when asked,
    if it does not exist; returns (repository id, paths written)."""
    import os

    from .hub import ensure_repo, hub_target, upload_files
    from .hub_models import valid_repo

    if not valid_repo(repo or ""):
        raise VitlabError(f"--repo {str(repo)[:100]!r} is not a model repository; write owner/name")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]{0,63}", license):
        raise VitlabError(f"--license {license[:70]!r} is not a license identifier; use one of the Hub's "
                          f"(apache-2.0, mit, cc-by-4.0, ..., or other)")
    target = hub_target(need_token=True, environ={**os.environ, "HF_REPOSITORY": repo})
    with tempfile.TemporaryDirectory(prefix="vitlab-push-") as tmp:
        files = repository_files(Path(run_dir), target.repo_id, Path(tmp), license)
        ensure_repo(target, private)
        sent = upload_files(files, target, f"vitlab push: {Path(run_dir).name}")
    return target.repo_id, sent
