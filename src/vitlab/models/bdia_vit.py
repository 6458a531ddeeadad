"""BDIA-ViT: an exactly reversible ViT without changing the architecture (Zhang et al., arXiv 2407.09093).

With h_k(x) = Block_k(x) - x, fixed-point quantisation Q(y) = round(y 2^l) 2^-l (straight-through gradient)
and gamma_k in {+1/2, -1/2} drawn per sample and per block in training (0 in eval, the standard ViT):

    x_0 = Q(embedding),   x_1 = x_0 + Q[h_0(x_0)]
    x_{k+1} = Q[gamma_k (x_{k-1} + s_k 2^-l)] + Q[(1 - gamma_k) x_k + (1 + gamma_k) h_k(x_k)]      (k >= 1)

s_k = (x_{k-1} 2^l) mod 2 is one side bit per element: it makes x_{k-1} + s_k 2^-l an even multiple of 2^-l,
so the first term is exact, and the inverse

    x_{k-1} = (x_{k+1} - Q[(1 - gamma_k) x_k + (1 + gamma_k) h_k(x_k)]) / gamma_k - s_k 2^-l

is exact in floating point (all values on the 2^-l grid; division by +-1/2 is exact). `BDIAStack` keeps the
last two states, the side bits packed 8 per byte, and one integer seed from which the gammas and every
dropout / drop-path draw are regenerated; its backward walks down the blocks, rebuilding each state bit for
bit and recomputing h_k under autograd. State-dict keys are the reference ViT's: weights move both ways.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from .rev_vit import _block_grads, _recompute, _random, _trainable, branch_rng, extend_signature
from .vit import VisionTransformer
from .vit_registry import register_sizes


def quantize(y: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.round(y * 2.0 ** bits) * 2.0 ** -bits


def ste(y: torch.Tensor, bits: int) -> torch.Tensor:
    """Q(y) forward, identity backward (straight-through)."""
    return y + (quantize(y, bits) - y).detach()


def parity(x: torch.Tensor, bits: int) -> torch.Tensor:
    """s = (x 2^l) mod 2 as uint8 in {0, 1}, for x on the 2^-l grid (x 2^l is an integer; two's complement
    makes `& 1` the parity for negative values too)."""
    return ((x * 2.0 ** bits).to(torch.int32) & 1).to(torch.uint8)


def pack_bits(s: torch.Tensor) -> torch.Tensor:
    """{0, 1} tensor -> uint8, 8 elements per byte (element 8i + j is bit j of byte i)."""
    flat = s.reshape(-1).to(torch.uint8)
    if len(flat) % 8:
        flat = torch.cat([flat, flat.new_zeros(-len(flat) % 8)])
    shifts = torch.arange(8, dtype=torch.uint8, device=s.device)
    return (flat.view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)  # (n/8,)


def unpack_bits(packed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(1) >> shifts) & 1  # (n/8, 8)
    return bits.reshape(-1)[:like.numel()].view(like.shape).to(like.dtype)


def draw_gammas(seed: int | None, depth: int, x: torch.Tensor) -> torch.Tensor:
    """(depth, B, 1, 1) of +-1/2 from `seed` (zeros when None: eval)."""
    if seed is None:
        return x.new_zeros(depth, x.shape[0], 1, 1)
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (depth, x.shape[0], 1, 1), generator=g)
    return (signs.to(x.dtype) - 0.5).to(x.device)


def _h(block: nn.Module, rng: int | None, k: int):
    """h_k(x) = Block_k(x) - x with its dropout draws tied to (rng, k)."""
    def h(x: torch.Tensor) -> torch.Tensor:
        with branch_rng(rng, k, x.device):
            return block(x) - x
    return h


def bdia_forward(blocks: nn.Sequential, x0: torch.Tensor, gammas: torch.Tensor, bits: int, rng: int | None,
                 q=ste, trace: list | None = None):
    """The quantised BDIA forward (autograd-friendly with `q=ste`); block k's dropout draws follow `rng` + k
    (None: no randomness to tie). Returns (x_{L-1}, x_L, packed side bits)."""
    x_prev = q(x0, bits)
    x = x_prev + q(_h(blocks[0], rng, 0)(x_prev), bits)
    sides = []
    for k in range(1, len(blocks)):
        g = gammas[k]
        s = parity(x_prev.detach(), bits)
        sides.append(pack_bits(s))
        if trace is not None:
            trace.append(x_prev.detach().clone())
        # x_prev + s 2^-l is an even multiple of 2^-l, so Q[gamma (x_prev + s 2^-l)] with gamma = +-1/2 is the
        # product itself: the rounding is skipped, not approximated.
        x_next = g * (x_prev + s * 2.0 ** -bits) + q((1 - g) * x + (1 + g) * _h(blocks[k], rng, k)(x), bits)
        x_prev, x = x, x_next
    return x_prev, x, sides


class BDIAStack(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x0: torch.Tensor, blocks: nn.Sequential, bits: int, seed: int,
                trace: list | None, *params: torch.Tensor) -> torch.Tensor:
        rng = seed if _random(blocks) else None  # no dropout: skip forking the random stream per block
        with torch.no_grad():
            gammas = draw_gammas(seed, len(blocks), x0)
            x_prev, x, sides = bdia_forward(blocks, x0, gammas, bits, rng, q=quantize, trace=trace)
        ctx.blocks, ctx.bits, ctx.seed, ctx.rng, ctx.sides, ctx.trace = blocks, bits, seed, rng, sides, trace
        ctx.save_for_backward(x_prev, x)
        return x

    @staticmethod
    def backward(ctx: Any, dx: torch.Tensor):
        x, x_next = ctx.saved_tensors  # (x_{k}, x_{k+1}) with k = L-1
        blocks, bits, seed, rng = ctx.blocks, ctx.bits, ctx.seed, ctx.rng
        gammas = draw_gammas(seed, len(blocks), x)
        d_next, d_cur = dx, torch.zeros_like(dx)  # dL/dx_{k+1}, dL/dx_k (accumulating)
        grads = []
        for k in reversed(range(1, len(blocks))):
            g, params = gammas[k], _trainable(blocks[k])
            h, dh_x, dp = _recompute(_h(blocks[k], rng, k), x, params, (1 + g) * d_next, nullcontext())
            with torch.no_grad():
                term2 = quantize((1 - g) * x + (1 + g) * h, bits)
                s = unpack_bits(ctx.sides[k - 1], x)
                x_prev = (x_next - term2) / g - s * 2.0 ** -bits  # exact: every value is on the 2^-l grid
                d_cur = d_cur + (1 - g) * d_next + dh_x
                d_prev = g * d_next
            if ctx.trace is not None:
                ctx.trace.append(x_prev.clone())
            grads.append(_block_grads(blocks[k], params, dp, [], []))
            x_next, x, d_next, d_cur = x, x_prev, d_cur, d_prev
        # x_1 = x_0 + Q[h_0(x_0)]: d x_0 = d x_1 (+ d from x_2's gamma term) + J^T d x_1
        params = _trainable(blocks[0])
        _, dh_x, dp = _recompute(_h(blocks[0], rng, 0), x, params, d_next, nullcontext())
        grads.append(_block_grads(blocks[0], params, dp, [], []))
        d_x0 = d_cur + d_next + dh_x  # straight through Q(x_0)
        flat = [g for block_grads in reversed(grads) for g in block_grads]
        return (d_x0, None, None, None, None, *flat)


class BDIAViT(VisionTransformer):
    """The reference ViT trained with BDIA; `bits` is l of Q_l. Eval (gamma = 0) is the quantised ViT."""
    architecture = "bdia_vit"
    fsdp_compatible = False  # the custom backward runs blocks outside FSDP's hooks
    def __init__(self, *args: Any, bits: int = 9, memory_efficient: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.bits, self.memory_efficient = bits, memory_efficient
        self.trace: list | None = None  # set to a list to record forward / rebuilt states (tests, debugging)

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return bdia_forward(self.blocks, x, draw_gammas(None, len(self.blocks), x), self.bits, None)[1]
        seed = int(torch.randint(2 ** 62, (1,)))  # gammas and dropout draws all follow from it
        if self.memory_efficient and torch.is_grad_enabled() and len(self.blocks) > 1:
            params = [p for block in self.blocks for p in _trainable(block)]
            return BDIAStack.apply(x, self.blocks, self.bits, seed, self.trace, *params)
        return bdia_forward(self.blocks, x, draw_gammas(seed, len(self.blocks), x), self.bits,
                            seed if _random(self.blocks) else None)[1]


extend_signature(BDIAViT, bits=9, memory_efficient=True)
register_sizes("bdia_vit", BDIAViT, family="reversible")


def _register_seed003() -> None:
    """Seed 003's `--net` names: its CIFAR-10 ViT-small (patch 4 on 32 px, dim 512, depth 6, 8 heads, MLP 512,
    dropout 0.1) as a standard, reversible, BDIA and momentum model."""
    from ..registry import register_model
    from .momentum_vit import MomentumViT
    from .rev_vit import RevViT

    config = dict(img_size=32, patch_size=4, embed_dim=512, depth=6, num_heads=8, mlp_ratio=1.0, drop_rate=0.1,
                  num_classes=10)
    for name, builder in (("vit_small", VisionTransformer), ("vit_small_reverse", RevViT),
                          ("vit_small_bdia", BDIAViT), ("vit_small_momentum", MomentumViT)):
        register_model(name, builder, family="seed003", **config)


_register_seed003()
