"""Reversible ViT (Mangalam et al., "Reversible Vision Transformers", arXiv 2302.04869, eq. 3-6).

Two streams, both starting as the token embedding; block l with F = its pre-LN attention branch and G = its
pre-LN MLP branch (the reference `Block`'s `attn_residual` / `mlp_residual`):

    Y1 = X1 + F(X2),   Y2 = X2 + G(Y1)              (forward)
    X2 = Y2 - G(Y1),   X1 = Y1 - F(X2)              (inverse)

`ReversibleStack` runs the blocks without building a graph and keeps only the last (Y1, Y2); its backward
walks the blocks in reverse, rebuilds each block's inputs with the inverse and recomputes F and G under
autograd, so activation memory does not grow with depth. Dropout and drop-path draws are replayed: branch k
of a pass runs on the random stream seeded by (one integer drawn per pass) + k, so the backward keeps O(1)
state for them. Head: LN over the concatenated streams (2D), then the usual pooling.
Reconstruction is exact in real arithmetic; in floating point gradients agree with plain autograd to ~1e-6
for shallow fp32 stacks (tests/test_rev_vit.py) and drift slowly with depth (the paper's observation).
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from ..layers.block import LayerNorm
from .vit import VisionTransformer
from .vit_registry import register_sizes


@contextmanager
def branch_rng(base: int | None, index: int, device: torch.device) -> Iterator[None]:
    """Run a branch with the random stream seeded by (base, index), leaving the global stream untouched.

    Seeding per branch from one integer drawn per forward pass is what lets the backward replay dropout and
    drop-path draws while storing O(1) state (not one RNG state per block). `base=None`: no randomness to
    replay (eval, or no dropout), run as is."""
    if base is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(base + index)
        yield


def _random(blocks: nn.Sequential) -> bool:
    """Whether running `blocks` draws random numbers (training with dropout or drop-path)."""
    rates = (getattr(m, key, 0) for m in blocks.modules() for key in ("p", "attn_drop"))  # Dropout/DropPath, SDPA
    return blocks.training and any(isinstance(r, float) and r > 0 for r in rates)


class ReversibleStack(torch.autograd.Function):
    """(X1, X2) -> (Y1, Y2) through `blocks`; saves only the outputs. Parameter gradients are returned as
    the gradients of the flattened `params` inputs, so autograd (and DDP's hooks) see them normally."""

    @staticmethod
    def forward(ctx: Any, x1: torch.Tensor, x2: torch.Tensor, blocks: nn.Sequential, seed: int | None,
                *params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            x1, x2 = run_blocks(blocks, x1, x2, seed)
        ctx.blocks, ctx.seed = blocks, seed
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    def backward(ctx: Any, dy1: torch.Tensor, dy2: torch.Tensor):
        y1, y2 = ctx.saved_tensors
        grads: list[tuple[torch.Tensor | None, ...]] = []
        dev = y1.device
        for i in reversed(range(len(ctx.blocks))):
            block = ctx.blocks[i]
            f_params = _trainable(block.norm1, block.attn, block.ls1)
            g_params = _trainable(block.norm2, block.mlp, block.ls2)
            # G: Y2 = X2 + G(Y1) -> X2 = Y2 - G(Y1); dY1 += (dG/dY1)^T dY2
            g, dy1_g, dg = _recompute(block.mlp_residual, y1, g_params, dy2, branch_rng(ctx.seed, 2 * i + 1, dev))
            with torch.no_grad():
                x2 = y2 - g
                dy1 = dy1 + dy1_g
            # F: Y1 = X1 + F(X2) -> X1 = Y1 - F(X2); dX2 = dY2 + (dF/dX2)^T dY1
            f, dx2_f, df = _recompute(block.attn_residual, x2, f_params, dy1, branch_rng(ctx.seed, 2 * i, dev))
            with torch.no_grad():
                x1 = y1 - f
                dy2 = dy2 + dx2_f
            grads.append(_block_grads(block, f_params, df, g_params, dg))
            y1, y2 = x1, x2
        flat = [g for block_grads in reversed(grads) for g in block_grads]
        return (dy1, dy2, None, None, *flat)


def run_blocks(blocks: nn.Sequential, x1: torch.Tensor, x2: torch.Tensor,
               seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Y1 = X1 + F(X2), Y2 = X2 + G(Y1) through every block; branch k draws its randomness from seed + k."""
    for i, block in enumerate(blocks):
        with branch_rng(seed, 2 * i, x1.device):
            x1 = x1 + block.attn_residual(x2)
        with branch_rng(seed, 2 * i + 1, x1.device):
            x2 = x2 + block.mlp_residual(x1)
    return x1, x2


def _recompute(branch, x: torch.Tensor, params: list[torch.Tensor], grad_out: torch.Tensor, rng):
    """Re-run `branch(x)` under autograd inside `rng` (its forward-time draws): (output, dx, dparams)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), rng:
        out = branch(x)
    dx, *dparams = torch.autograd.grad(out, [x] + params, grad_out, allow_unused=True)
    return out.detach(), dx, dparams


def _trainable(*modules: nn.Module) -> list[torch.Tensor]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def _block_grads(block: nn.Module, f_params, df, g_params, dg) -> tuple[torch.Tensor | None, ...]:
    """The block's parameter gradients in `_trainable(block)` order (the order `params` was flattened in)."""
    by_id = {id(p): g for p, g in zip(f_params + g_params, list(df) + list(dg))}
    return tuple(by_id.get(id(p)) for p in _trainable(block))


class RevViT(VisionTransformer):
    """The reference ViT with two reversible streams; same embedding and blocks, a 2D-wide head."""
    architecture = "rev_vit"
    fsdp_compatible = False  # the custom backward runs blocks outside FSDP's hooks


    def __init__(self, *args: Any, memory_efficient: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        D, pool = 2 * self.embed_dim, self.global_pool
        self.norm = LayerNorm(D) if pool == "token" else nn.Identity()
        self.fc_norm = LayerNorm(D) if pool == "avg" else nn.Identity()
        self.head = nn.Linear(D, self.num_classes) if self.num_classes > 0 else nn.Identity()
        self.memory_efficient = memory_efficient  # False: plain autograd through the same network (tests)
        self.init_weights()

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        seed = int(torch.randint(2 ** 62, (1,))) if _random(self.blocks) else None  # one draw per pass
        if self.memory_efficient and torch.is_grad_enabled():
            params = [p for block in self.blocks for p in _trainable(block)]
            x1, x2 = ReversibleStack.apply(x, x, self.blocks, seed, *params)
        else:
            x1, x2 = run_blocks(self.blocks, x, x, seed)
        return torch.cat([x1, x2], dim=-1)  # (B, N, 2D)


def extend_signature(cls: type, **extra: Any) -> None:
    """Give `cls.__init__(*args, name=default, ..., **kwargs)` the reference ViT's signature plus `extra`, so
    `create_model` validates overrides by name for subclasses that pass the rest through."""
    sig = inspect.signature(VisionTransformer.__init__)
    cls.__init__.__signature__ = sig.replace(parameters=[
        *sig.parameters.values(), *(inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
                                    for k, v in extra.items())])


extend_signature(RevViT, memory_efficient=True)

register_sizes("rev_vit", RevViT, family="reversible")
