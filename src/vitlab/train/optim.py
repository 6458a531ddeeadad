"""Optimizers (AdamW, SGD) with decay/no-decay parameter groups, and warm-up + cosine schedules."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float, lr: float,
                 lr_scale: dict[str, float] | None = None) -> list[dict]:
    """No weight decay on biases, norm weights (1-D) and the model's `no_weight_decay()` names; parameters whose
    name contains a key of `lr_scale` (e.g. {"routers.": 10}: a new module fine-tuned beside a pretrained body)
    get lr times its value (the first key that matches)."""
    skip = getattr(model, "no_weight_decay", lambda: set())()
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((v for k, v in (lr_scale or {}).items() if k in name), 1.0)
        groups.setdefault((p.ndim > 1 and name not in skip, scale), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr": lr * scale}
            for (decay, scale), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """`optim.lr`, scaled by `optim.lr_scaling` for the global batch (explicit in the config, never implied)."""
    power = {"none": 0.0, "linear": 1.0, "sqrt": 0.5}[cfg.lr_scaling]
    return cfg.lr * (global_batch / cfg.base_batch_size) ** power


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device,
                    lr: float | None = None) -> torch.optim.Optimizer:
    lr = cfg.lr if lr is None else lr
    groups = param_groups(model, cfg.weight_decay, lr, cfg.lr_scale)
    # Fused kernels (one launch for all parameters) on CUDA; foreach elsewhere.
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, **fused)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **fused)


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine (or constant) decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int,
                    total: int) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-optimizer-step schedule over `total` steps; its state (the step count) goes into the trainer
    checkpoint."""
    warmup = cfg.warmup_steps or int(round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.schedule == "onecycle":  # as the Res-ViT project: OneCycleLR(max_lr, total_steps, pct_start=warm-up/total)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=max(total, 1),
            pct_start=min(max(warmup, 1) / max(total, 1), 1.0), cycle_momentum=cfg.cycle_momentum)
    min_ratio = cfg.min_lr / cfg.lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, cfg.schedule, min_ratio))
