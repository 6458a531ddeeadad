"""Momentum ViT: the reference blocks as a momentum residual network (Sander et al., arXiv 2102.07870),
completing seed 003's unfinished `vit_small_momentum`.

With f_l(x) = Block_l(x) - x (the block's attention-then-MLP residual) and v_0 = 0:

    v_{l+1} = beta v_l + (1 - beta) f_l(x_l),    x_{l+1} = x_l + v_{l+1}            (forward)
    x_l = x_{l+1} - v_{l+1},    v_l = (v_{l+1} - (1 - beta) f_l(x_l)) / beta       (inverse)

so, as in the reversible ViT, `MomentumStack` keeps only (x_L, v_L) and its backward rebuilds each block's
input and recomputes f_l under autograd. With w = dL/dv_{l+1} + dL/dx_{l+1}:
dL/dv_l = beta w, dL/dx_l = dL/dx_{l+1} + (1 - beta) J_f^T w. The architecture is the reference ViT's
(same state dict, so weights move both ways); beta -> 0 gives the plain ViT back. Inversion divides by
beta, so rounding errors grow like beta^-depth: keep beta near 1 (default 0.9) for deep stacks.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import VitlabError
from .rev_vit import _block_grads, _random, _recompute, _trainable, branch_rng, extend_signature
from .vit import VisionTransformer
from .vit_registry import register_sizes


def run_momentum(blocks: nn.Sequential, x: torch.Tensor, beta: float,
                 seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    v = torch.zeros_like(x)
    for i, block in enumerate(blocks):
        with branch_rng(seed, i, x.device):
            f = block(x) - x
        v = beta * v + (1.0 - beta) * f
        x = x + v
    return x, v


class MomentumStack(torch.autograd.Function):
    """x_0 -> x_L through momentum residual blocks; saves only (x_L, v_L)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, blocks: nn.Sequential, beta: float, seed: int | None,
                *params: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x, v = run_momentum(blocks, x, beta, seed)
        ctx.blocks, ctx.beta, ctx.seed = blocks, beta, seed
        ctx.save_for_backward(x, v)
        return x

    @staticmethod
    def backward(ctx: Any, dx: torch.Tensor):
        x, v = ctx.saved_tensors
        beta, dv = ctx.beta, torch.zeros_like(dx)
        grads = []
        for i in reversed(range(len(ctx.blocks))):
            block = ctx.blocks[i]
            params = _trainable(block)
            with torch.no_grad():
                x = x - v  # x_l
            w = dv + dx
            f, dx_f, dp = _recompute(lambda t: block(t) - t, x, params, (1.0 - beta) * w,
                                     branch_rng(ctx.seed, i, x.device))
            with torch.no_grad():
                v = (v - (1.0 - beta) * f) / beta  # v_l
                dx = dx + dx_f
                dv = beta * w
            grads.append(_block_grads(block, params, dp, [], []))
        flat = [g for block_grads in reversed(grads) for g in block_grads]
        return (dx, None, None, None, *flat)


class MomentumViT(VisionTransformer):
    architecture = "momentum_vit"
    fsdp_compatible = False  # the custom backward runs blocks outside FSDP's hooks

    def __init__(self, *args: Any, beta: float = 0.9, memory_efficient: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not 0.0 < beta < 1.0:
            raise VitlabError(f"momentum beta must be in (0, 1) to be invertible, got {beta}")
        self.beta, self.memory_efficient = beta, memory_efficient

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        seed = int(torch.randint(2 ** 62, (1,))) if _random(self.blocks) else None
        if self.memory_efficient and torch.is_grad_enabled():
            params = [p for block in self.blocks for p in _trainable(block)]
            return MomentumStack.apply(x, self.blocks, self.beta, seed, *params)
        return run_momentum(self.blocks, x, self.beta, seed)[0]


extend_signature(MomentumViT, beta=0.9, memory_efficient=True)


register_sizes("momentum_vit", MomentumViT, family="reversible")
