"""Reversible ViT (Mangalam et al., "Reversible Vision Transformers", arXiv 2302.04869, eq. 3-6).

Two streams, both starting as the token embedding; block k with F = its pre-LN attention branch and G = its
pre-LN MLP branch (the reference `Block`'s `attn_residual` / `mlp_residual`):

    Y1 = X1 + F(X2),   Y2 = X2 + G(Y1)              (forward)
    X2 = Y2 - G(Y1),   X1 = Y1 - F(X2)              (inverse)

`layers.reversible.InvertibleStack` turns the pair into a backward that rebuilds each block's input instead
of storing it, so activation memory does not grow with depth. Head: LN over the concatenated streams (2D),
then the usual pooling. Reconstruction is exact in real arithmetic; in floating point gradients agree with
plain autograd to ~1e-6 for shallow fp32 stacks (tests/test_rev_vit.py) and drift slowly with depth (the
paper's observation).
"""
from __future__ import annotations

import torch

from ..layers.reversible import InvertibleStack, Pass, State
from .vit import VisionTransformer
from .sizes import register_sizes


class RevViT(InvertibleStack, VisionTransformer):
    """The reference ViT with two reversible streams; same embedding and blocks, a 2D-wide head."""
    _kind = "rev_vit"

    def _num_features(self) -> int:
        return 2 * self.embed_dim

    def initial_state(self, x: torch.Tensor) -> State:
        return x, x

    def step(self, k: int, state: State, p: Pass) -> State:
        x1, x2 = state
        block = self.blocks[k]
        y1 = x1 + p.branch(0, block.attn_residual, x2)
        return y1, x2 + p.branch(1, block.mlp_residual, y1)

    def inverse(self, k: int, state: State, p: Pass) -> State:
        y1, y2 = state
        block = self.blocks[k]
        x2 = y2 - p.branch(1, block.mlp_residual, y1)
        return y1 - p.branch(0, block.attn_residual, x2), x2

    def features(self, state: State) -> torch.Tensor:
        return torch.cat(state, dim=-1)  # (B, N, 2D)


register_sizes("rev_vit", RevViT)
