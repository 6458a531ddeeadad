"""Momentum ViT: the reference blocks as a momentum residual network (Sander et al., arXiv 2102.07870),
completing the reversible/BDIA project's unfinished `vit_small_momentum`.

With f_k(x) = Block_k(x) - x (the block's attention-then-MLP residual) and v_0 = 0:

    v_{k+1} = beta v_k + (1 - beta) f_k(x_k),    x_{k+1} = x_k + v_{k+1}            (forward)
    x_k = x_{k+1} - v_{k+1},    v_k = (v_{k+1} - (1 - beta) f_k(x_k)) / beta       (inverse)

so, as in the reversible ViT, `layers.reversible.InvertibleStack` keeps only (x_L, v_L) and rebuilds each
block's input in the backward. The architecture is the reference ViT's (same state dict, so weights move
both ways); beta -> 0 gives the plain ViT back. Inversion divides by beta, so rounding errors grow like
beta^-depth: keep beta near 1 (default 0.9) for deep stacks.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import VitlabError
from ..layers.reversible import InvertibleStack, Pass, State
from .vit import VisionTransformer
from .sizes import register_sizes


class MomentumViT(InvertibleStack, VisionTransformer):
    _kind = "momentum_vit"

    def __init__(self, *args: Any, beta: float = 0.9, **kwargs: Any):
        if not 0.0 < beta < 1.0:
            raise VitlabError(f"momentum beta must be in (0, 1) to be invertible, got {beta}")
        super().__init__(*args, **kwargs)
        self.beta = beta

    def residual(self, k: int):
        block = self.blocks[k]
        return lambda x: block(x) - x  # f_k

    def initial_state(self, x: torch.Tensor) -> State:
        return x, torch.zeros_like(x)

    def step(self, k: int, state: State, p: Pass) -> State:
        x, v = state
        v = self.beta * v + (1.0 - self.beta) * p.branch(0, self.residual(k), x)
        return x + v, v

    def inverse(self, k: int, state: State, p: Pass) -> State:
        x, v = state
        x = x - v
        return x, (v - (1.0 - self.beta) * p.branch(0, self.residual(k), x)) / self.beta

    def features(self, state: State) -> torch.Tensor:
        return state[0]


register_sizes("momentum_vit", MomentumViT)
