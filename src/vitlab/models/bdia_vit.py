"""BDIA-ViT: an exactly reversible ViT without changing the architecture (Zhang et al., arXiv 2407.09093).

With h_k(x) = Block_k(x) - x, fixed-point quantisation Q(y) = round(y 2^l) 2^-l (straight-through gradient)
and gamma_k in {+1/2, -1/2} drawn per sample and per block in training (0 in eval, the standard ViT):

    x_0 = Q(embedding),   x_1 = x_0 + Q[h_0(x_0)]
    x_{k+1} = Q[gamma_k (x_{k-1} + s_k 2^-l)] + Q[(1 - gamma_k) x_k + (1 + gamma_k) h_k(x_k)]      (k >= 1)

s_k = (x_{k-1} 2^l) mod 2 is one side bit per element: it makes x_{k-1} + s_k 2^-l an even multiple of 2^-l,
so the first term is exact, and the inverse

    x_{k-1} = (x_{k+1} - Q[(1 - gamma_k) x_k + (1 + gamma_k) h_k(x_k)]) / gamma_k - s_k 2^-l

is exact in floating point (all values on the 2^-l grid; division by +-1/2 is exact). The state is
(x_{k-1}, x_k); `layers.reversible.InvertibleStack` keeps the last one, the side bits packed 8 per byte, and
one integer seed from which the gammas and every dropout / drop-path draw are regenerated, and rebuilds each
state bit for bit in the backward. State-dict keys are the reference ViT's: weights move both ways.
"""
from __future__ import annotations

from typing import Any

import torch

from ..layers.reversible import InvertibleStack, Pass, State
from .vit import VisionTransformer
from .sizes import register_sizes


def quantize(y: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.round(y * 2.0 ** bits) * 2.0 ** -bits


def ste(y: torch.Tensor, bits: int) -> torch.Tensor:
    """Q(y) forward (the same value, bit for bit), identity backward (straight-through)."""
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


class BDIAViT(InvertibleStack, VisionTransformer):
    """The reference ViT trained with BDIA; `bits` is l of Q_l. Eval (gamma = 0) is the quantised ViT."""
    _kind = "bdia_vit"
    draws_per_pass = True  # the gammas

    def __init__(self, *args: Any, bits: int = 9, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.bits = bits

    def q(self, y: torch.Tensor) -> torch.Tensor:
        """Q_l, straight-through under autograd (both give the same values)."""
        return ste(y, self.bits) if torch.is_grad_enabled() else quantize(y, self.bits)

    def h(self, k: int):
        block = self.blocks[k]
        return lambda x: block(x) - x  # h_k

    def gammas(self, p: Pass, x: torch.Tensor) -> torch.Tensor | None:
        if p.seed is None:
            return None
        if "gammas" not in p.memo:
            p.memo["gammas"] = draw_gammas(p.seed, len(self.blocks), x)
        return p.memo["gammas"]

    def initial_state(self, x: torch.Tensor) -> State:
        x0 = self.q(x)
        return x0, x0

    def step(self, k: int, state: State, p: Pass) -> State:
        x_prev, x = state
        h = p.branch(0, self.h(k), x)
        g = self.gammas(p, x)
        if k == 0 or g is None:  # x_1 = x_0 + Q[h_0(x_0)]; eval (gamma = 0): x_{k+1} = Q[x_k + h_k(x_k)]
            return x, x + self.q(h) if k == 0 else self.q(x + h)
        g = g[k]
        s = parity(x_prev.detach(), self.bits)
        if not torch.is_grad_enabled():
            p.side[k] = pack_bits(s)  # kept for the inverse (the replay under autograd recomputes it)
        # x_prev + s 2^-l is an even multiple of 2^-l, so Q[gamma (x_prev + s 2^-l)] with gamma = +-1/2 is the
        # product itself: the rounding is skipped, not approximated.
        return x, g * (x_prev + s * 2.0 ** -self.bits) + self.q((1 - g) * x + (1 + g) * h)

    def inverse(self, k: int, state: State, p: Pass) -> State:
        x, x_next = state
        if k == 0:
            return x, x
        g = self.gammas(p, x)[k]
        term2 = quantize((1 - g) * x + (1 + g) * p.branch(0, self.h(k), x), self.bits)
        s = unpack_bits(p.side.pop(k), x)
        return (x_next - term2) / g - s * 2.0 ** -self.bits, x  # exact: every value is on the 2^-l grid

    def features(self, state: State) -> torch.Tensor:
        return state[1]


register_sizes("bdia_vit", BDIAViT)
