"""LoRA (Hu et al., arXiv 2106.09685) for any registered model, as a fine-tuning option rather than a model.

A target Linear keeps its weight W (frozen) and gains a low-rank update in `parts` independent output slices:

    y = W x + b + (alpha / r) * [B_p A_p dropout(x)]_p        A_p: (r, in), B_p: (out / parts, r)

A fused `qkv` Linear gets three adapters (q, k and v, as the Res-ViT fine-tuning project and loralib's
MergedLinear), not one rank-r update over the 3D outputs. The Linear changes class in place (`LoRALinear` is
a `nn.Linear`), so the base keys stay timm's (`blocks.0.attn.qkv.weight`) and the adapter adds `...qkv.lora_A` /
`...qkv.lora_B`.

Init: `kaiming` (loralib: A Kaiming-uniform, B = 0, so the model starts equal to the base) or `normal001`
(the Res-ViT fine-tuning project: A and B ~ N(0, 0.01), a non-zero start). `merge_lora` folds the update into
W for inference or export; `unmerge_lora` takes it back out.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VitlabError

#: target name -> module path suffix, and how many independent output slices it has
TARGETS = {"qkv": ("attn.qkv", 3), "proj": ("attn.proj", 1), "fc1": ("mlp.fc1", 1), "fc2": ("mlp.fc2", 1)}

#: parameters the Res-ViT fine-tuning project trains besides the adapters (every LayerNorm stays frozen, a router's too)
TRAIN_WITH_LORA = ("routers.", "approximators.", "cls_token", "head.")


class LoRALinear(nn.Linear):
    """A Linear with a low-rank update; made by `LoRALinear.wrap`, never constructed directly."""

    parts: int
    scale: float
    merged: bool

    @classmethod
    def wrap(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float, parts: int,
             init: Literal["kaiming", "normal001"]) -> "LoRALinear":
        if linear.out_features % parts:
            raise VitlabError(f"LoRA: {linear.out_features} outputs do not split into {parts} parts")
        linear.__class__ = cls
        linear.parts, linear.scale, linear.merged = parts, alpha / rank, False
        linear.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = linear.weight
        linear.lora_A = nn.Parameter(torch.empty(parts, rank, linear.in_features, device=w.device, dtype=w.dtype))
        linear.lora_B = nn.Parameter(torch.empty(parts, linear.out_features // parts, rank, device=w.device,
                                                 dtype=w.dtype))
        with torch.no_grad():
            if init == "kaiming":
                for a in linear.lora_A:  # each part's A as loralib initialises a Linear(in, r)
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.zeros_(linear.lora_B)
            elif init == "normal001":
                nn.init.normal_(linear.lora_A, std=0.01)
                nn.init.normal_(linear.lora_B, std=0.01)
            else:
                raise VitlabError(f"lora.init must be 'kaiming' or 'normal001', got {init!r}")
        return linear

    def delta_weight(self) -> torch.Tensor:
        """scale * B A as one (out, in) matrix, the parts stacked along the outputs."""
        return self.scale * torch.bmm(self.lora_B, self.lora_A).reshape(self.out_features, self.in_features)

    def delta(self, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """The low-rank term of the outputs (of parts `rows` only, e.g. q alone)."""
        a, b = (self.lora_A, self.lora_B) if rows is None else (self.lora_A[rows], self.lora_B[rows])
        h = torch.einsum("...i,pri->...pr", self.lora_dropout(x), a)  # (..., parts, r)
        return self.scale * torch.einsum("...pr,por->...po", h, b).flatten(-2)  # (..., parts * out/parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y if self.merged else y + self.delta(x)


def linear_rows(linear: nn.Linear, x: torch.Tensor, part: range, parts: int) -> torch.Tensor:
    """Output slices `part` of `parts` computed alone, LoRA included: q of a fused qkv is range(0, 1) of 3, k and
    v together range(1, 3)."""
    n = linear.out_features // parts
    rows = slice(part.start * n, part.stop * n)
    y = F.linear(x, linear.weight[rows], None if linear.bias is None else linear.bias[rows])
    if not isinstance(linear, LoRALinear) or linear.merged:
        return y
    if linear.parts == parts:  # one adapter per slice: run only these slices'
        return y + linear.delta(x, slice(part.start, part.stop))
    return y + linear.delta(x)[..., rows]


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
               targets: Iterable[str] = ("qkv",), init: Literal["kaiming", "normal001"] = "kaiming") -> list[str]:
    """Add adapters to every Linear whose path ends in a target's suffix; returns their module names."""
    if rank <= 0:
        raise VitlabError(f"lora.rank must be positive, got {rank}")
    if alpha is not None and not alpha > 0:
        raise VitlabError(f"lora.alpha must be positive (the update is scaled by alpha / rank), got {alpha}; leave "
                          f"it unset for alpha = rank")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise VitlabError(f"unknown lora.targets {unknown}; choose from {', '.join(TARGETS)}")
    found = [(name, module, parts) for target in targets for suffix, parts in [TARGETS[target]]
             for name, module in model.named_modules() if name.endswith(suffix) and type(module) is nn.Linear]
    for name, module, parts in found:  # checked before any layer changes: a refusal leaves the model as it was
        width = min(module.in_features, module.out_features // parts)
        if rank > width:
            raise VitlabError(f"lora.rank={rank} is above the rank of {name} ({module.in_features} inputs, "
                              f"{module.out_features // parts} outputs per part): a low-rank update is at most "
                              f"{width}; lower lora.rank (4 to 16 is usual)")
    wrapped = []
    for name, module, parts in found:
        LoRALinear.wrap(module, rank, float(alpha or rank), dropout, parts, init)
        wrapped.append(name)
    if not wrapped:
        raise VitlabError(f"lora.targets {list(targets)} match no Linear layer of this model")
    return wrapped


def freeze_for_lora(model: nn.Module, trainable: Iterable[str] = TRAIN_WITH_LORA) -> None:
    """The Res-ViT fine-tuning project's policy: train the adapters and the parameters whose name contains one
    of `trainable`, never a LayerNorm's; freeze everything else."""
    norms = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)
             for p, _ in m.named_parameters(recurse=False)}
    pattern = re.compile("|".join(re.escape(t) for t in ("lora_", *trainable)))
    for name, p in model.named_parameters():
        p.requires_grad_(bool(pattern.search(name)) and name not in norms)


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@torch.no_grad()
def _set_merged(m: LoRALinear, merged: bool) -> None:
    if m.merged != merged:
        m.weight += (1 if merged else -1) * m.delta_weight().to(m.weight.dtype)
        m.merged = merged


def merge_lora(model: nn.Module) -> None:
    """W <- W + scale B A in every adapter (inference at the base model's cost); idempotent."""
    for m in lora_layers(model):
        _set_merged(m, True)


def unmerge_lora(model: nn.Module) -> None:
    """W <- W - scale B A: training the adapters again (equal to before merging up to rounding)."""
    for m in lora_layers(model):
        _set_merged(m, False)


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every update folded in (loads into the model without LoRA); the model
    itself is left untouched."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear) and not m.merged:
            sd[f"{name}.weight"] += m.delta_weight().to(m.weight.dtype)
    return sd


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What fine-tuning changed: every trainable parameter (adapters, head, routers...), a small file."""
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
