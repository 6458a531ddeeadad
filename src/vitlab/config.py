"""The run configuration: one dataclass tree, serialised as YAML, overridden by `section.key=value`.

Precedence (lowest first): dataclass defaults < YAML file < CLI flags (--epochs ...) < `key=value` overrides.
Unknown keys and wrong types are `VitlabError`s that name the key and the closest valid one.

The `model` section is open: besides `name` and `pretrained` it takes any constructor argument of the chosen
model (`model.beta`, `model.widths`, ...). This module knows no model or dataset: `vitlab.resolve` checks the
names and types the model arguments from the registered builder's signature, after parsing.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Union

import yaml

from .errors import VitlabError, did_you_mean
from .names import path_inside, safe_name


@dataclass
class ModelConfig:
    name: str = "vit_micro_patch2_8"
    # a local .safetensors/.pth/.npz file, or a Hub name: hf-hub:<owner>/<name>[@rev], timm's <arch>.<tag>
    pretrained: Optional[str] = None
    # Any other constructor argument of the model, e.g. {"depth": 4, "beta": 0.5}; typed by vitlab.resolve.
    # img_size, in_chans and num_classes default to the dataset's; None means "the model's default".
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    dataset: str = "digits"  # a registered name (`vitlab.data.dataset_names()`) or hf:<repo | folder | parquet>
    data_dir: str = "./data"
    download: bool = False  # try to download missing torchvision datasets
    img_size: Optional[int] = None  # resize to this; default: the model's, else the dataset's native size
    augment: Literal["none", "basic", "randaugment"] = "basic"
    mixup: float = 0.0  # MixUp alpha (0 = off)
    cutmix: float = 0.0  # CutMix alpha (0 = off)
    val_fraction: float = 0.1  # carved from train when the dataset has no validation split
    test_fraction: float = 0.2  # carved (before val) when the dataset has no test split
    split_seed: int = 0
    num_workers: int = 8
    synthetic_size: int = 1024  # `synthetic` only: number of training images
    synthetic_classes: int = 10
    # dataset: the dataset's own mean/std; half: 0.5/0.5 (the original ViT fine-tuning); imagenet: ImageNet's
    normalization: Literal["dataset", "half", "imagenet"] = "dataset"
    max_train_samples: int = 0  # train on a seeded subset of this many images (0: all)
    canvas_size: int = 56  # mnist_canvas: side of the black canvas
    canvas_digit_size: int = 28  # mnist_canvas: side the MNIST digit is resized to before it is pasted
    canvas_clutter: int = 0  # mnist_canvas: fragments of other digits pasted as distractors (label and mask unchanged)
    # additive Gaussian noise of this std (pixel range 1.0) fixed per image, in every split (vitlab.data.noise)
    pixel_noise: float = 0.0
    label_noise: float = 0.0  # this fraction of the training labels replaced by a wrong class (val/test stay true)
    image_key: Optional[str] = None  # hf: the image column (default: the first Image feature)
    label_key: Optional[str] = None  # hf: the label column (default: the first ClassLabel feature)


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    # cosine / constant after a linear warm-up; onecycle: torch's OneCycleLR (cosine up over the warm-up from
    # lr/25, then down to lr/25e4), cycling SGD momentum (AdamW beta1) between 0.85 and 0.95 (the Res-ViT
    # fine-tuning project's recipe)
    schedule: Literal["cosine", "constant", "onecycle"] = "cosine"
    cycle_momentum: bool = True  # onecycle only
    warmup_steps: int = 0
    warmup_epochs: float = 0.0  # used when warmup_steps is 0
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    # segmentation: add dice_weight x the soft Dice loss (1 - mean Dice over classes, every class weighing the
    # same) to the per-pixel cross-entropy, so that a dominant background cannot win alone
    dice_weight: float = 0.0
    clip_grad: float = 0.0  # max global grad norm; 0 = off
    # The learning rate used is lr x (global batch / base_batch_size)^k, k = 1 (linear), 1/2 (sqrt) or 0 (none);
    # global batch = train.batch_size x world size x train.accum_steps. The run log prints the result.
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    lr_scale: dict[str, float] = field(default_factory=dict)  # parameter-name substring -> lr multiplier
    base_batch_size: int = 256


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: int = 0  # > 0: train exactly this many optimizer steps (the last epoch stops early); overrides epochs
    batch_size: int = 128  # per device (process); the global batch is batch_size x world size x accum_steps
    eval_batch_size: Optional[int] = None  # default: 2 x batch_size
    accum_steps: int = 1
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms (CUDA; CPU runs are reproducible without it)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"  # auto: bf16 on CUDA, none on CPU
    compile: bool = False  # torch.compile the model
    strategy: Literal["ddp", "fsdp"] = "ddp"  # data parallel with replicated (ddp) or sharded (fsdp) weights
    dist_timeout: float = 600.0  # seconds any collective may wait before the job fails instead of hanging
    ema: bool = False
    ema_decay: float = 0.999
    val_every_n_batches: int = 0  # also log one validation batch's loss every N train batches; 0 = off
    log_every: int = 20  # flush per-batch metrics (and the progress line) every N batches
    # a non-finite loss stops the run (exit 3) when the metrics are next flushed; N > 0 instead skips up to N
    # optimizer steps whose loss or gradient norm is not finite (at the cost of one host sync per step)
    skip_nonfinite_steps: int = 0
    checkpoint_every_n_steps: int = 0  # also write `last` every N optimizer steps (mid-epoch); 0: epoch ends only
    # knowledge distillation (Hinton et al. 2015): a trained vitlab run (its folder or a checkpoint) whose
    # softened predictions are a second target: loss = (1 - w) CE + w T^2 KL(teacher_T || student_T)
    teacher: Optional[str] = None
    distill_weight: float = 0.5  # w
    distill_temperature: float = 1.0  # T


@dataclass
class LoraConfig:
    """LoRA fine-tuning of any model (vitlab.layers.lora); rank 0 trains every parameter instead."""
    rank: int = 0
    alpha: Optional[float] = None  # the update is scaled by alpha / rank; default alpha = rank
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["qkv"])  # of qkv, proj, fc1, fc2
    # loralib (B = 0: starts at the base model) or the Res-ViT fine-tuning project's
    init: Literal["kaiming", "normal001"] = "kaiming"
    # what trains besides the adapters (parameter-name substrings; LayerNorms never); null: the Res-ViT
    # fine-tuning project's set
    # (routers, approximators, cls token, head: vitlab.layers.lora.TRAIN_WITH_LORA)
    trainable: Optional[list[str]] = None


@dataclass
class OutputConfig:
    dir: str = "./output"
    savefile: str = "run_01"
    tensorboard: bool = True  # false: leave tensorboard out of `loggers`
    # experiment trackers (vitlab.train.trackers): tensorboard, csv, wandb, mlflow; metrics.jsonl is always written
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])
    wandb_project: str = ""  # W&B project; empty: the task name
    mlflow_tracking_uri: str = ""  # empty: MLFLOW_TRACKING_URI, else sqlite:///<output.dir>/mlflow.db
    progress: Literal["auto", "bar", "plain", "none"] = "auto"  # auto: a bar on a terminal, else plain lines
    # by_architecture: also write the final weights and training log as (the classic-vs-differential project's)
    # <dir>/<task_name>/checkpoints/<architecture>/model_<savefile>_<size>_<dataset>.{safetensors,_training.log}
    layout: Literal["vitlab", "by_architecture"] = "vitlab"
    upload: bool = False  # after training, upload the final weights and logs to HF_REPOSITORY (`--upload`)


@dataclass
class Config:
    task_name: str = "vitlab"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def run_dir(self) -> Path:
        """<output.dir>/<task_name>/<output.savefile>; either name that is not one plain folder name is a
        VitlabError (`vitlab.names.safe_name`), so the run cannot land outside output.dir."""
        return path_inside(self.output.dir, self.task_name, self.output.savefile, what="task_name / output.savefile")

    def to_dict(self) -> dict[str, Any]:
        tree = _plain(dataclasses.asdict(self))
        model = tree.pop("model")
        tree = {"task_name": tree.pop("task_name"),
                "model": {"name": model["name"], **model["args"], "pretrained": model["pretrained"]}, **tree}
        return tree

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def all_keys(cfg: Config | None = None) -> list[str]:
    """Every fixed dotted key of the schema, e.g. 'optim.lr' (the model section takes more)."""
    cfg = cfg or Config()
    keys = []
    for f in dataclasses.fields(cfg):
        sub = getattr(cfg, f.name)
        if dataclasses.is_dataclass(sub):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(sub) if g.name != "args"]
        else:
            keys.append(f.name)
    return keys


def _short(value: Any, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters (a message names a value, it does not print a whole file)."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxdict, r.maxlevel = limit, limit, 8, 8, 3
    text = r.repr(value) if isinstance(value, (list, tuple, dict, set)) else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "a list of " + ", ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, collections.abc.Sequence):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is collections.abc.Callable or tp is collections.abc.Callable:
        return "a Python callable (set it in code, not in a config)"
    return {type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats and strings, lists for tuples
    and sequences. Annotations a config value cannot meet (a callable) reject every value."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return coerce(value, arg, key)
            except VitlabError:
                pass
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise VitlabError(f"config key '{key}' must be {_type_name(tp)}, got {_short(value)}"
                          f"{did_you_mean(str(value)[:100], map(str, typing.get_args(tp)))}")
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(coerce(v, a, key) for v, a in zip(value, args))
    elif origin is dict:
        if isinstance(value, dict):
            k_tp, v_tp = typing.get_args(tp)
            return {coerce(k, k_tp, key): coerce(v, v_tp, key) for k, v in value.items()}
    elif origin in (list, collections.abc.Sequence):
        if isinstance(value, (list, tuple)):
            return [coerce(v, typing.get_args(tp)[0], key) for v in value]
    elif origin is collections.abc.Callable or tp is collections.abc.Callable:
        pass
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # nan compares false with every bound; inf passes every lower one
                raise VitlabError(f"config key '{key}' must be a finite number, got {value}")
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # output.savefile=7 names run "7"
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise VitlabError(f"config key '{key}' must be {_type_name(tp)}, got {_short(value, 200)} ({type(value).__name__})")


#: values renamed to say what they are; the old spellings stay accepted
OLD_VALUES = {("output.layout", "seed002"): "by_architecture"}  # an old spelling, still accepted


def _apply(cfg: Config, key: str, value: Any) -> None:
    if isinstance(value, str):
        value = OLD_VALUES.get((key, value), value)
    parts = key.split(".")
    if len(parts) == 2 and parts[0] == "model" and parts[1] not in ("name", "pretrained", "args"):
        cfg.model.args[parts[1]] = value  # typed against the model's signature by vitlab.resolve
        return
    target: Any = cfg
    for part in parts[:-1]:
        sub = getattr(target, part, None) if part in {f.name for f in dataclasses.fields(target)} else None
        if not dataclasses.is_dataclass(sub):
            raise VitlabError(f"unknown config key {_short(key)}{did_you_mean(key[:100], all_keys())}")
        target = sub
    names = {f.name: f for f in dataclasses.fields(target)}
    leaf = parts[-1]
    if leaf not in names or dataclasses.is_dataclass(getattr(target, leaf)) or leaf == "args":
        raise VitlabError(f"unknown config key {_short(key)}{did_you_mean(key[:100], all_keys())}")
    hints = typing.get_type_hints(type(target))
    setattr(target, leaf, coerce(value, hints[leaf], key))


def _flatten(tree: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key.count(".") < 1:  # sections; a model argument may itself be a mapping
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=3e-4' -> ('optim.lr', 0.0003); the value is read as YAML (numbers, bools, null, lists), bounded
    as a file is (size, nesting, alias expansion, repeated keys: one line each); text that is not YAML is a
    string."""
    import yaml

    from .untrusted import parse_yaml

    if "=" not in text:
        raise VitlabError(f"override {_short(text)} is not of the form section.key=value (e.g. optim.lr=3e-4)")
    key, raw = text.split("=", 1)
    try:
        value = parse_yaml(raw, f"the value of override {_short(key.strip())}", unique_keys=True) \
            if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), as_number(value)


def as_number(value: Any) -> Any:
    """YAML 1.1 reads '1e-3' (no dot) as a string; users mean a number."""
    if isinstance(value, str) and not value.strip().isdigit():
        try:
            return float(value)
        except ValueError:
            pass
    return value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config (or sweep spec) file, or a preset's name (`vitlab.presets`), as a mapping; one line for a file
    that is missing, not a regular file (a folder, FIFO, device), over the size any config has, not UTF-8, not
    YAML, nested or aliased beyond bounds, naming a key twice, or not a mapping."""
    import yaml

    from .presets import config_file
    from .untrusted import YAML_MAX_CHARS, parse_yaml, read_bytes

    path = config_file(path)  # a file, or the name of a shipped preset
    if not path.exists():
        raise VitlabError(f"config file '{path}' not found; pass an existing YAML file or a preset name "
                          f"(`vitlab configs` lists them, e.g. quickstart)")
    if path.is_file() and path.stat().st_size > YAML_MAX_CHARS:
        raise VitlabError(f"config file '{path}' is {path.stat().st_size / (1 << 20):.1f} MiB, more than the "
                          f"{YAML_MAX_CHARS >> 20} MiB vitlab reads (a config is a few KiB); pass the right file")
    data = read_bytes(path, "config file", limit=YAML_MAX_CHARS)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise VitlabError(f"config file '{path}' is not UTF-8 text (byte {exc.start} cannot be decoded); save it "
                          f"as UTF-8") from None
    try:
        tree = parse_yaml(text, f"config file '{path}'", unique_keys=True) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise VitlabError(f"config file '{path}' is not valid YAML{where}: {problem}; fix the syntax") from None
    if not isinstance(tree, dict):
        raise VitlabError(f"config file '{path}' must be a mapping of sections (model:, data:, ...), "
                          f"not a {type(tree).__name__}")
    return tree


def build_config(tree: dict[str, Any] | None = None, overrides: Iterable[tuple[str, Any]] = ()) -> Config:
    """Defaults, then a nested dict (from YAML), then (key, value) overrides; schema-checked. Names and
    model arguments are checked by `vitlab.resolve.resolve_config`."""
    cfg = Config()
    sections = {f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(getattr(cfg, f.name))}
    for name in sections & set(tree or {}):
        if tree[name] is not None and not isinstance(tree[name], dict):
            raise VitlabError(f"config section '{name}' must be a mapping of keys (in YAML, '{name}:' then indented "
                              f"'key: value' lines), got {_short(tree[name])}")
    for key, value in _flatten({k: v for k, v in (tree or {}).items() if v is not None or k not in sections}):
        _apply(cfg, key, as_number(value))
    for key, value in overrides:
        _apply(cfg, key, value)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load `path` (YAML) and apply `section.key=value` strings (schema checks only)."""
    tree = read_yaml(path) if path is not None else {}
    return build_config(tree, [parse_override(o) for o in overrides])


LOGGERS = ("tensorboard", "csv", "wandb", "mlflow")  # output.loggers (vitlab.train.trackers)
TRACKER_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}  # logger: the package and the extra that brings it


def check_loggers(names: list[str]) -> None:
    """output.loggers: known names, each once (checked whenever a config is built)."""
    if not isinstance(names, list) or any(n not in LOGGERS for n in names) or len(set(names)) != len(names):
        raise VitlabError(f"output.loggers {names!r}: a list of {', '.join(LOGGERS)}, each at most once "
                          f"(e.g. output.loggers=[tensorboard,wandb])")


def check_tracker_packages(names: list[str]) -> None:
    """Each tracker's package installed: one line otherwise. Checked when training starts, before the data
    loads (not when a config is built: evaluating or pushing a W&B run needs no wandb)."""
    import importlib.util

    for name in names:
        package = TRACKER_PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise VitlabError(f"output.loggers has {name}, but the {package} package is not installed; "
                              f"pip install 'vitlab[{package}]' (or leave {name} out of output.loggers)")


def _holds_secret(uri: str) -> bool:
    """A URI with a password (scheme://user:password@host) or a password/token in its query."""
    from urllib.parse import parse_qs, urlsplit

    try:
        parts = urlsplit(uri)
        return bool(parts.password) or any(k.lower() in ("password", "token", "access_token")
                                           for k in parse_qs(parts.query))
    except ValueError:  # a malformed address: MLflow will say so when it starts
        return False


def validate(cfg: Config) -> None:
    """Cross-field checks of the fixed sections."""
    check_loggers(cfg.output.loggers)
    if not 0 <= cfg.train.distill_weight <= 1 or cfg.train.distill_temperature <= 0:
        raise VitlabError(f"train.distill_weight must be in [0, 1] and train.distill_temperature positive, got "
                          f"{cfg.train.distill_weight} and {cfg.train.distill_temperature}")
    if _holds_secret(cfg.output.mlflow_tracking_uri):
        raise VitlabError("output.mlflow_tracking_uri holds a password or token, which would be written into "
                          "config.yaml and the trackers' parameters; set the URI in MLFLOW_TRACKING_URI (never "
                          "written), or give a server's MLFLOW_TRACKING_USERNAME/PASSWORD in the environment")
    positive = {"train.epochs": cfg.train.epochs, "train.batch_size": cfg.train.batch_size,
                "train.accum_steps": cfg.train.accum_steps, "train.log_every": cfg.train.log_every,
                "optim.lr": cfg.optim.lr}
    for key, value in positive.items():
        if value <= 0:
            raise VitlabError(f"config key '{key}' must be positive, got {value}")
    for key, value in (("train.max_steps", cfg.train.max_steps), ("lora.rank", cfg.lora.rank),
                       ("data.max_train_samples", cfg.data.max_train_samples)):
        if value < 0:
            raise VitlabError(f"config key '{key}' must be >= 0, got {value}")
    for key in ("data.val_fraction", "data.test_fraction"):
        value = getattr(cfg.data, key.split(".")[1])
        if not 0 <= value < 1:
            raise VitlabError(f"config key '{key}' must be in [0, 1), got {value}")
    if not 0 <= cfg.data.num_workers <= MAX_WORKERS:
        raise VitlabError(f"config key 'data.num_workers' must be 0 to {MAX_WORKERS} (loader processes per rank; "
                          f"0 loads in the training process), got {cfg.data.num_workers}")
    for key in ("data.synthetic_size", "data.synthetic_classes"):
        value = getattr(cfg.data, key.split(".")[1])
        if value < 1:
            raise VitlabError(f"config key '{key}' must be positive, got {value}")
    if cfg.lora.rank > MAX_LORA_RANK:
        raise VitlabError(f"config key 'lora.rank' is {cfg.lora.rank}, above any layer's width ({MAX_LORA_RANK}); "
                          f"4 to 16 is usual")
    at_least_zero = {"optim.weight_decay": cfg.optim.weight_decay, "optim.momentum": cfg.optim.momentum,
                     "optim.min_lr": cfg.optim.min_lr, "optim.clip_grad": cfg.optim.clip_grad,
                     "optim.dice_weight": cfg.optim.dice_weight,
                     "optim.warmup_steps": cfg.optim.warmup_steps, "optim.warmup_epochs": cfg.optim.warmup_epochs,
                     "data.mixup": cfg.data.mixup, "data.cutmix": cfg.data.cutmix,
                     "train.skip_nonfinite_steps": cfg.train.skip_nonfinite_steps,
                     "train.checkpoint_every_n_steps": cfg.train.checkpoint_every_n_steps,
                     "train.val_every_n_batches": cfg.train.val_every_n_batches, "lora.dropout": cfg.lora.dropout}
    for key, value in at_least_zero.items():
        if value < 0:
            raise VitlabError(f"config key '{key}' must be >= 0, got {value}")
    below_one = {"optim.label_smoothing": cfg.optim.label_smoothing, "optim.betas[0]": cfg.optim.betas[0],
                 "optim.betas[1]": cfg.optim.betas[1], "train.ema_decay": cfg.train.ema_decay,
                 "lora.dropout": cfg.lora.dropout}
    for key, value in below_one.items():
        if not 0 <= value < 1:
            raise VitlabError(f"config key '{key}' must be in [0, 1), got {value}")
    for key, value in (("data.img_size", cfg.data.img_size), ("train.eval_batch_size", cfg.train.eval_batch_size),
                       ("train.dist_timeout", cfg.train.dist_timeout),
                       ("optim.base_batch_size", cfg.optim.base_batch_size)):
        if value is not None and value <= 0:
            raise VitlabError(f"config key '{key}' must be positive, got {value}")
    _check_bounds(cfg)
    safe_name(cfg.task_name, "task_name", example="cifar10_vit")  # each one folder: the run stays in output.dir
    safe_name(cfg.output.savefile, "output.savefile (--savefile)")


#: seeds seed NumPy too, whose seeds are 32-bit (rng.seed_all wraps seed + rank past the top)
SEED_RANGE = (0, 2 ** 32 - 1)
#: learning rates, weight decay and per-parameter lr multipliers above this are no recipe's (LARS's largest
#: learning rates are ~30) and, far above it, leave float32 (3.4e38) inside the optimizer: an overflow, not a run
MAX_RATE = 1e6
#: DataLoader worker processes per rank: more than any machine has cores for
MAX_WORKERS = 256
#: a LoRA update's rank is at most its layer's width (checked per layer when the adapters are added)
MAX_LORA_RANK = 1 << 16
#: train.dist_timeout in seconds: at least one (a collective takes that long to start), at most a week
DIST_TIMEOUT_RANGE = (1.0, 7 * 24 * 3600.0)


def _check_bounds(cfg: Config) -> None:
    """Values each section accepts by type but nothing can run with: seeds outside NumPy's range, rates beyond
    float32 or any recipe, negative LoRA scales, collectives that would wait for ages, unavailable devices."""
    lo, hi = SEED_RANGE
    for key, value in (("train.seed", cfg.train.seed), ("data.split_seed", cfg.data.split_seed)):
        if not lo <= value <= hi:
            raise VitlabError(f"config key '{key}' must be in [0, 2**32 - 1] (NumPy's seed range), got {value}")
    rates = {"optim.lr": cfg.optim.lr, "optim.weight_decay": cfg.optim.weight_decay,
             "optim.min_lr": cfg.optim.min_lr,
             **{f"optim.lr_scale['{k}']": v for k, v in cfg.optim.lr_scale.items()}}
    for key, value in rates.items():
        if value > MAX_RATE:
            raise VitlabError(f"config key '{key}' is {value:g}, above {MAX_RATE:g}, which no recipe uses and which "
                              f"overflows float32 in the optimizer; use a value like 1e-3 (lr) or 0.05 (weight decay)")
    for key, value in cfg.optim.lr_scale.items():
        if value < 0:
            raise VitlabError(f"config key 'optim.lr_scale' must map names to multipliers >= 0, got {key}: {value}; "
                              f"0 freezes those parameters, 1 is the plain lr")
    if cfg.optim.momentum > 1:
        raise VitlabError(f"config key 'optim.momentum' must be in [0, 1], got {cfg.optim.momentum:g} "
                          f"(0.9 is usual)")
    if cfg.lora.alpha is not None and cfg.lora.alpha <= 0:
        raise VitlabError(f"config key 'lora.alpha' must be positive (the update is scaled by alpha / rank), got "
                          f"{cfg.lora.alpha:g}; leave it unset for alpha = rank")
    lo, hi = DIST_TIMEOUT_RANGE
    if not lo <= cfg.train.dist_timeout <= hi:
        raise VitlabError(f"config key 'train.dist_timeout' must be {lo:g} to {hi:g} seconds (a week), got "
                          f"{cfg.train.dist_timeout:g}; the default is 600")
    _check_device(cfg.train.device)


def _check_device(spec: str) -> None:
    """train.device names a device kind vitlab trains on: auto, cpu, cuda, cuda:N, or mps where this PyTorch
    has it. Whether cuda:N exists is checked when training starts (the config may be written for another
    machine); mps, which no launch can add, is checked here."""
    import re

    if not isinstance(spec, str) or not re.fullmatch(r"auto|cpu|cuda(:\d{1,4})?|mps(:0)?", spec):
        raise VitlabError(f"train.device {_short(spec)} is not supported; use auto, cpu, cuda or cuda:N (this "
                          f"machine has {available_devices()})")
    if spec.startswith("mps"):
        import torch

        if not torch.backends.mps.is_available():
            raise VitlabError(f"train.device '{spec}' is not available here (no Apple-silicon GPU in this PyTorch); "
                              f"this machine has {available_devices()}: use train.device=auto")


def available_devices() -> str:
    """The devices this process can train on, in words: 'cpu' or 'cpu, cuda:0, cuda:1'."""
    import torch

    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    mps = ["mps"] if torch.backends.mps.is_available() else []
    return ", ".join(["cpu", *cuda, *mps])
