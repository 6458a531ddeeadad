"""Per-token routing pieces of Res-ViT: a DynamicViT-style router and low-rank residual approximators.

Router (Rao et al., arXiv 2106.02034, as Res-ViT uses it): for a block of b layers, from the block's input x,

    e = GELU(W_e LN(x))                          local feature of each token        (B, N, h)
    g = mean(e[:, R:])                           global feature of the image        (B, 1, h)
    l = MLP([e; g])                              keep/skip logits per layer          (B, N, b, 2)

initialised to keep (bias 0 for skip, +5 for keep: p_keep = sigmoid(5) = 0.993), so fine-tuning starts from
the full model. Approximators: x -> U D x with D: (r, dim), U: (dim, r), both N(0, 0.01), one per key
(an inactive-run pattern or a run), standing in for the layers a token skipped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .block import LayerNorm


class TokenRouter(nn.Module):
    def __init__(self, dim: int, hidden: int = 512, layers: int = 1, reserved: int = 1, keep_bias: float = 5.0):
        super().__init__()
        self.layers, self.reserved, self.keep_bias = layers, reserved, keep_bias
        self.norm = LayerNorm(dim)
        self.local = nn.Linear(dim, hidden)
        self.mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden // 2),
                                 nn.GELU(), nn.Linear(hidden // 2, 2 * layers))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        last = self.mlp[-1]
        nn.init.normal_(last.weight, std=0.01)
        last.bias.view(self.layers, 2).copy_(torch.tensor([0.0, self.keep_bias]))  # (skip, keep) per layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) -> logits (B, N, layers, 2); index 1 is 'keep'."""
        e = F.gelu(self.local(self.norm(x)))  # (B, N, h)
        g = e[:, self.reserved:].mean(dim=1, keepdim=True)  # (B, 1, h)
        # W [e; g] + c = W_e e + (W_g g + c): the global half once per image, not once per token
        first, h = self.mlp[0], e.shape[-1]
        z = F.linear(e, first.weight[:, :h]) + F.linear(g, first.weight[:, h:], first.bias)  # (B, N, h)
        return self.mlp[1:](z).unflatten(-1, (self.layers, 2))


class LowRankApproximators(nn.Module):
    """`count` residual approximators U_k D_k of rank r, applied per token by key."""

    def __init__(self, dim: int, rank: int, count: int):
        super().__init__()
        self.down = nn.Parameter(torch.empty(count, rank, dim))
        self.up = nn.Parameter(torch.empty(count, dim, rank))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.down, std=0.01)
        nn.init.normal_(self.up, std=0.01)

    def forward(self, x: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """U_key D_key x for each token: x (B, N, dim), key (B, N) long -> (B, N, dim)."""
        if self.down.shape[0] == 1:
            return F.linear(F.linear(x, self.down[0]), self.up[0])
        h = torch.einsum("bnd,krd->bnkr", x, self.down)  # every key's projection, (B, N, K, r)
        out = torch.einsum("bnkr,kdr->bnkd", h, self.up)  # (B, N, K, dim)
        return out.gather(2, key[..., None, None].expand(-1, -1, 1, out.shape[-1])).squeeze(2)

    def add_to(self, x: torch.Tensor, key: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x + weight U_key D_key x, weight (B, N): with one approximator the weight scales the rank-r
        projection and the sum happens inside one matmul (inference's one pass over (B, N, dim), not three)."""
        if self.down.shape[0] != 1:
            return x + weight[..., None] * self(x, key)
        h = F.linear(x, self.down[0]) * weight[..., None]  # (B, N, r)
        return torch.addmm(x.flatten(0, 1), h.flatten(0, 1), self.up[0].t()).view_as(x)
