"""The command lines of the projects vitlab reproduces, translated to a config: a recipe (a YAML file under
configs/, or the fine-tuning project's embedded one) plus `key=value` overrides. Each user types what their
project's README says with the program name changed; the run log prints the equivalent vitlab command.
Only those projects' own spellings come here: the plain flags (--epochs, --lr, ...) are config keys (cli).

- ViT/Res-ViT fine-tuning (`train.py --model-arch b16 [--use-reslr True] ...`): SGD + OneCycle, or Res-ViT's
  AdamW + LoRA recipe (ROUTED_AND_ADAPTIVE.md B.2, B.4; configs/finetune/ holds the same as YAML).
- Classic vs differential ViT (`run.py train --model vit_classic --size 10B --dataset CIFAR-100 ...`):
  configs/diff_vit/<kind>_<dataset>_<size>.yaml, files written in that project's by-architecture layout.
- Small-dataset ViT, reversible, BDIA, momentum (`train_cifar10.py --net vit_small_bdia`):
  SMALL_DATASET_RECIPES/<variant>_<dataset>.yaml.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import canonical_dataset
from .errors import VitlabError
from .presets import PRESETS

CONFIGS = PRESETS  # the recipes, shipped as package data

FINETUNE_VIT = {"data": {"img_size": 224, "normalization": "half"},
                "optim": {"name": "sgd", "lr": 0.03, "momentum": 0.9, "weight_decay": 0.0, "schedule": "onecycle",
                          "warmup_steps": 500},
                "train": {"max_steps": 15000, "batch_size": 32}}
FINETUNE_RESVIT = {"data": {"img_size": 224, "normalization": "half"},
                   "optim": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.05, "schedule": "cosine",
                             "warmup_steps": 500, "clip_grad": 1.0},
                   "train": {"max_steps": 15000, "batch_size": 32}, "lora": {"rank": 8}}
FINETUNE_FLAGS = {"dynamic_active_target": "model.active_target", "dynamic_start_layer": "model.dynamic_start_layer",
                  "block_size": "model.block_size", "lora_rank": "lora.rank", "train_steps": "train.max_steps",
                  "warmup_steps": "optim.warmup_steps", "checkpoint_path": "model.pretrained"}

CLASSIC_VS_DIFFERENTIAL = ("vit_classic", "vit_differential")
SMALL_DATASET_RECIPES = "seed003"  # the folder under configs/ (a path: the recipes' file names are data)
SMALL_DATASET_NETS = {"vit_small": "vit", "vit_small_reverse": "rev", "vit_small_bdia": "bdia",
                      "vit_small_momentum": "momentum"}


BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def flag_bool(text: str) -> bool:
    """Boolean flag values as the projects write them: True/true/1/yes, False/false/0/no."""
    value = BOOL_WORDS.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return value


def model_size(text: str) -> str:
    """`--size 10B` (the classic-vs-differential project's spelling; also 10M, 10m, 10) -> '10m'."""
    match = re.fullmatch(r"(10|25|50)\s*[bBmM]?", text.strip())
    if not match:
        raise VitlabError(f"--size {text!r} is not one of the model sizes 10B, 25B, 50B")
    return f"{match.group(1)}m"


@dataclass
class Translation:
    """The original projects' flags of a train command as a recipe plus overrides."""
    recipe: Path | None = None  # a YAML file under configs/
    tree: dict[str, Any] | None = None  # an embedded recipe (when `recipe` is None)
    overrides: list[tuple[str, Any]] = field(default_factory=list)
    translated: bool = False  # a project's own flags were used (their recipe, their spellings)

    def command(self, overrides: list[tuple[str, Any]]) -> str:
        """The equivalent `vitlab train` command line: the recipe, then `overrides` as key=value."""
        parts = ["vitlab train"]
        if self.recipe is not None:
            shown = self.recipe.relative_to(CONFIGS.parent) if self.recipe.is_relative_to(CONFIGS.parent) else self.recipe
            parts.append(f"--config {shown}")
        elif self.tree:
            parts += [f"{section}.{key}={_text(v)}" for section, keys in self.tree.items() for key, v in keys.items()]
        return " ".join(parts + [f"{k}={_text(v)}" for k, v in overrides])


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def _recipe(relative: str) -> Path | None:
    path = CONFIGS / relative
    return path if path.is_file() else None


def translate_train(args: argparse.Namespace, model: str | None, dataset: str | None) -> Translation:
    """The recipe and overrides the original projects' flags of a `vitlab train` command line stand for
    (--size, --net, --noamp, the fine-tuning flags, --model vit_classic|vit_differential); `model` and
    `dataset` are the plain --model and --dataset, which pick the recipe. With --config, the flags only
    override it."""
    t, asked = Translation(), model
    overrides, size = [], args.size
    if size is not None and size.strip().isdigit() and int(size) not in (10, 25, 50):
        overrides.append(("data.img_size", int(size)))  # the small-dataset project's --size: the image side
        size = None
    dataset = canonical_dataset(dataset) if dataset else None
    if model in CLASSIC_VS_DIFFERENTIAL or size is not None:
        model, t.recipe = _classic_vs_differential(model, size, dataset)
        overrides += [("model.name", model), ("output.layout", "by_architecture")]  # its checkpoints/<arch>/ files
    if args.net is not None:
        variant = SMALL_DATASET_NETS.get(args.net)
        t.recipe = variant and _recipe(f"{SMALL_DATASET_RECIPES}/{variant}_{dataset or 'cifar10'}.yaml")
        overrides.append(("model.name", args.net))
    finetune = _finetune(args)
    if finetune or args.use_reslr is not None:
        t.tree = FINETUNE_RESVIT if args.use_reslr else FINETUNE_VIT
    overrides += finetune
    if args.noamp:
        overrides.append(("train.amp", "none"))
    t.translated = bool(args.net or args.size or args.noamp or finetune or args.use_reslr is not None
                        or asked in CLASSIC_VS_DIFFERENTIAL)
    if args.config:  # an explicit recipe wins; the flags override it
        t.recipe, t.tree = Path(args.config), None
    t.overrides = overrides
    return t


def _classic_vs_differential(model: str | None, size: str | None, dataset: str | None) -> tuple[str, Path | None]:
    """(model name, recipe) for `--model vit_classic|vit_differential --size 10B|25B|50B --dataset ...`."""
    if model not in CLASSIC_VS_DIFFERENTIAL:
        raise VitlabError(f"--size {size} picks a size of --model vit_classic or vit_differential, not "
                          f"{model or 'the default model'}; give one of those (or model.name=... without --size)")
    size = model_size(size or "10B")
    dataset = dataset or "cifar100"
    kind = model.removeprefix("vit_")
    name = f"{model}_bach_{size}" if dataset == "bach" else f"{model}_{size}"
    return name, _recipe(f"diff_vit/{kind}_{dataset}_{size}.yaml")


def _finetune(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """The ViT/Res-ViT fine-tuning project's flags as overrides."""
    from .registry import resolve_name

    out = [(key, getattr(args, dest)) for dest, key in FINETUNE_FLAGS.items() if getattr(args, dest) is not None]
    if args.model_arch:
        name = resolve_name(args.model_arch)
        out.insert(0, ("model.name", name.replace("vit_", "resvit_", 1) if args.use_reslr else name))
    if args.use_lora is not None and args.lora_rank is None:
        out.append(("lora.rank", 8 if args.use_lora else 0))
    return out


def find_by_architecture_weights(output: str, model: str, size: str | None, dataset: str | None) -> Path:
    """The newest final weights that `vitlab train --model M --size S --dataset D` wrote in the
    by-architecture layout under `output` (what the classic-vs-differential project's `evaluate` loads)."""
    from .registry import split_size

    if model not in CLASSIC_VS_DIFFERENTIAL:
        raise VitlabError(f"evaluate --model finds the weights of vit_classic or vit_differential runs, not {model}; "
                          f"for any other run pass --checkpoint PATH")
    name, _ = _classic_vs_differential(model, size, canonical_dataset(dataset) if dataset else None)
    arch, size_label = split_size(name)
    data = canonical_dataset(dataset) if dataset else "cifar100"
    pattern = f"*/checkpoints/{arch}/model_*_{size_label}_{data}.safetensors"
    found = sorted(Path(output).glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise VitlabError(f"no trained weights match {Path(output) / pattern}; train them first with `vitlab train "
                          f"--model {model} --size {size or '10B'} --dataset {dataset or 'CIFAR-100'}` (or give "
                          f"--output where that run wrote, or --checkpoint)")
    return found[-1]
