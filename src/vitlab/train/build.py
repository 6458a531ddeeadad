"""Everything a run is made of, built from one resolved config: the data, the model (with pretrained weights
and LoRA), the loaders, EMA, and the optimizer with its schedule. Train, evaluate, predict, the plots and the
Python API build through these functions, in this order:

    data = build_data_for(cfg)
    model = build_model(cfg, data)            # create_model + pretrained weights + LoRA
    ema = build_ema(cfg, model)
    loaders = build_loaders(cfg, data, env, pin)
    opt = build_optimization(cfg, model, device, len(loaders["train"]), env.world_size)

A saved model comes back through `rebuild_model` (its metadata) and `checkpoint_data` (the data it reads).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from ..config import Config, LoraConfig
from ..data import DataBundle, MixCollate, build_data
from ..errors import VitlabError
from ..layers.lora import TRAIN_WITH_LORA, apply_lora, freeze_for_lora
from ..registry import create_model, model_args
from .distributed import DistEnv
from .optim import build_optimizer, build_scheduler, scaled_lr


def resolve_img_size(cfg: Config) -> int:
    """data.img_size, else model.img_size, else the resolution in the model's name."""
    d, m = cfg.data.img_size, cfg.model.args.get("img_size")
    if d and m and d != m:
        raise VitlabError(f"data.img_size={d} and model.img_size={m} disagree; set only one of them")
    return d or m or model_args(cfg.model.name, patch_size=cfg.model.args.get("patch_size"))["img_size"]


def build_data_for(cfg: Config) -> DataBundle:
    """The configured dataset, at the size and channels the model reads; the model's sizes are checked first
    (`registry.check_sizes`), so an image size no model can take is refused before any image is resized."""
    img_size = resolve_img_size(cfg)
    model_args(cfg.model.name, **{**cfg.model.args, "img_size": img_size})
    return build_data(cfg.data, img_size=img_size, in_chans=cfg.model.args.get("in_chans"))


def _segmentation_args(cfg: Config, data: DataBundle) -> dict[str, Any]:
    """A dataset of masks asks for a per-pixel head; joint augmentation of image and mask is not built."""
    info = data.info
    if info.task != "segment":
        if cfg.model.args.get("head") == "segment":
            raise VitlabError(f"model.head=segment predicts a mask per image, but {info.name} has one class per "
                              f"image; use a segmentation dataset (e.g. mnist_canvas_seg) or drop model.head")
        return {}
    if cfg.model.args.get("head") not in (None, "segment"):  # `model.task`, its old spelling, is renamed on resolving
        raise VitlabError(f"{info.name} holds masks; drop model.head or set model.head=segment")
    if data.augment != "none" or cfg.data.mixup or cfg.data.cutmix:
        raise VitlabError(f"{info.name} is a segmentation dataset and its masks are not augmented; set "
                          f"data.augment=none (and no mixup/cutmix)")
    if data.img_size != info.img_size:
        raise VitlabError(f"{info.name}'s masks are {info.img_size} px but the model reads {data.img_size} px; "
                          f"set data.img_size={info.img_size} (or the dataset's size to the model's)")
    return {"head": "segment"}


def build_model(cfg: Config, data: DataBundle) -> nn.Module:
    """The configured model, sized for the data (image size, channels, classes), from pretrained weights
    when `model.pretrained` names a file, with LoRA adapters when `lora.rank` > 0."""
    info = data.info
    if cfg.model.args.get("num_classes") not in (None, info.num_classes):
        raise VitlabError(f"model.num_classes={cfg.model.args['num_classes']} but {info.name} has "
                          f"{info.num_classes} classes; drop model.num_classes to take it from the dataset")
    args = {**cfg.model.args, "img_size": data.img_size, "in_chans": data.in_chans, "num_classes": info.num_classes,
            **_segmentation_args(cfg, data)}
    model = create_model(cfg.model.name, **args)
    model.pretrained_notes = []
    if cfg.model.pretrained:
        from ..pretrained import load_pretrained
        model.pretrained_notes = load_pretrained(model, cfg.model.pretrained)
    add_lora(model, cfg.lora)
    return model


def rebuild_model(name: str, args: dict[str, Any], cfg: Config) -> nn.Module:
    """A saved model's architecture (no weights) from its metadata: name, full arguments, LoRA settings."""
    model = create_model(name, **args)
    add_lora(model, cfg.lora)
    return model


def add_lora(model: nn.Module, lc: LoraConfig) -> None:
    """LoRA adapters and the freeze policy when `lora.rank` > 0 (building a model, or rebuilding a saved one)."""
    if lc.rank > 0:
        apply_lora(model, lc.rank, lc.alpha, lc.dropout, lc.targets, lc.init)
        freeze_for_lora(model, TRAIN_WITH_LORA if lc.trainable is None else lc.trainable)


def checkpoint_data(cfg: Config, model: nn.Module, dataset: str | None = None,
                    data_dir: str | None = None) -> DataBundle:
    """The data a saved model reads: its run's dataset (or `dataset`, from `data_dir`) at the model's size."""
    from ..resolve import resolve_config

    if dataset or data_dir:  # another dataset or folder: its name is checked again
        cfg = resolve_config(dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, dataset=dataset or cfg.data.dataset, data_dir=data_dir or cfg.data.data_dir)))
    a = model.vitlab_args
    data = build_data(cfg.data, img_size=a["img_size"], in_chans=a["in_chans"])
    if data.info.num_classes != a["num_classes"]:
        raise VitlabError(f"the checkpoint predicts {a['num_classes']} classes but {data.info.name} has "
                          f"{data.info.num_classes}; evaluate on the dataset it was trained for")
    return data


def build_loaders(cfg: Config, data: DataBundle, env: DistEnv, pin: bool) -> dict[str, Any]:
    """This rank's train / val / test loaders (MixUp/CutMix on train when configured)."""
    tc, dc = cfg.train, cfg.data
    mix = MixCollate(data.info.num_classes, dc.mixup, dc.cutmix) if dc.mixup or dc.cutmix else None
    eval_bs, shard = tc.eval_batch_size or 2 * tc.batch_size, {"rank": env.rank, "world": env.world_size}
    return {"train": data.loader("train", tc.batch_size, dc.num_workers, tc.seed, mix, pin, **shard),
            "val": data.loader("val", eval_bs, dc.num_workers, pin_memory=pin, **shard),
            "test": data.loader("test", eval_bs, dc.num_workers, pin_memory=pin, **shard)}


def build_teacher(cfg: Config, data: DataBundle, device: torch.device) -> nn.Module | None:
    """train.teacher: the trained model distilled from, frozen, in eval mode, on `device`. It must classify
    the same classes and read the same images as the student: size, channels and the normalisation applied
    (mean and std per channel); each difference is named in one line."""
    if not cfg.train.teacher:
        return None
    if data.info.task != "classify":
        raise VitlabError("train.teacher distils class predictions; it is not supported for segmentation")
    from ..data.tensor_loader import match_channels
    from .evaluate import load_checkpoint

    teacher, _, extra = load_checkpoint(cfg.train.teacher)
    seen, a, info = extra.get("dataset_info") or {}, teacher.vitlab_args, data.info
    if a.get("head", "classify") != "classify" or a.get("num_classes") != info.num_classes:
        raise VitlabError(f"the teacher ({a.get('head', 'classify')}, {a.get('num_classes')} classes) must classify "
                          f"{info.name}'s {info.num_classes} classes; distil from a classifier of the same classes")
    names = seen.get("class_names")
    if names and info.class_names and list(names) != list(info.class_names):
        raise VitlabError(f"the teacher's classes ({', '.join(map(str, names[:4]))}, ...) are not {info.name}'s "
                          f"({', '.join(info.class_names[:4])}, ...) in the same order; distil from a model of "
                          f"this dataset")

    def stats(key: str) -> list[float] | None:
        values = seen.get(key)
        ok = isinstance(values, list) and values and all(isinstance(v, (int, float)) and math.isfinite(v)
                                                         for v in values)
        return match_channels(tuple(values), data.in_chans) if ok else None
    differ = []
    if a.get("img_size") != data.img_size:
        differ.append(f"{a.get('img_size')} px, not {data.img_size} (data.img_size)")
    if a.get("in_chans") != data.in_chans:
        differ.append(f"{a.get('in_chans')} channels, not {data.in_chans} (model.in_chans)")
    for key in ("mean", "std"):
        theirs, ours = stats(key), match_channels(tuple(getattr(info, key)), data.in_chans)
        if theirs is None:
            differ.append(f"no recorded {key}")
        elif not all(math.isclose(t, o, rel_tol=1e-3, abs_tol=1e-6) for t, o in zip(theirs, ours)):
            differ.append(f"{key} {[round(v, 4) for v in theirs]}, not {[round(v, 4) for v in ours]} "
                          f"(data.normalization)")
    if differ:
        raise VitlabError(f"the teacher reads other images than this run: {'; '.join(differ)}; set them to the "
                          f"teacher's, or distil from a teacher trained on this input")
    teacher.requires_grad_(False)
    return teacher.eval().to(device)


def build_ema(cfg: Config, model: nn.Module) -> nn.Module | None:
    """An exponential moving average of the weights (train.ema), evaluated and tested in their place."""
    if not cfg.train.ema:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)


@dataclasses.dataclass
class Optimization:
    """The optimizer and what drives it, for the global batch of this launch."""
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    lr: float  # optim.lr after batch-size scaling
    steps_per_epoch: int  # optimizer steps
    epochs: int
    total_steps: int
    global_batch: int  # samples per optimizer step over every rank and micro-batch


def build_optimization(cfg: Config, model: nn.Module, device: torch.device, train_batches: int,
                       world_size: int) -> Optimization:
    """Optimizer, schedule, loss scaler and criterion; `train_batches`: this rank's batches per epoch."""
    tc = cfg.train
    steps_per_epoch = math.ceil(train_batches / tc.accum_steps)
    # train.max_steps (training counted in steps) overrides epochs; the last epoch then stops early
    epochs = math.ceil(tc.max_steps / steps_per_epoch) if tc.max_steps else tc.epochs
    total_steps = tc.max_steps or steps_per_epoch * tc.epochs
    global_batch = tc.batch_size * world_size * tc.accum_steps
    lr = scaled_lr(cfg.optim, global_batch)
    optimizer = build_optimizer(model, cfg.optim, device, lr)
    return Optimization(
        optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg.optim, steps_per_epoch, total_steps),
        scaler=torch.amp.GradScaler("cuda", enabled=tc.amp == "fp16" and device.type == "cuda"),
        criterion=nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing), lr=lr,
        steps_per_epoch=steps_per_epoch, epochs=epochs, total_steps=total_steps, global_batch=global_batch)
